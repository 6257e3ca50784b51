//! The kernel switches a VM's network needs: IPv4 forwarding (without it
//! the guests' traffic stops at the host) and no IPv6 on the taps (the
//! launcher routes, filters and allocates IPv4 only; an IPv6 link-local
//! address would be an unfiltered path between guest and host).

use super::NetError;

const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";

/// Turns IPv4 forwarding on (a no-op when it is on). It is never turned
/// off again: other things on the host may rely on it.
///
/// # Errors
/// [`NetError::Sysctl`].
pub fn enable_forwarding() -> Result<(), NetError> {
    if std::fs::read_to_string(FORWARDING).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    tracing::info!("enabling IPv4 forwarding");
    std::fs::write(FORWARDING, "1").map_err(|source| NetError::Sysctl {
        path: FORWARDING.into(),
        source,
    })
}

/// Turns IPv6 off on interface `iface`; a host without IPv6 has nothing
/// to turn off.
///
/// # Errors
/// [`NetError::Sysctl`].
pub fn disable_ipv6(iface: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|source| NetError::Sysctl { path, source }),
    }
}
