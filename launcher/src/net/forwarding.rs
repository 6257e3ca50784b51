//! IPv4 forwarding (`net.ipv4.ip_forward`), without which the guests'
//! traffic stops at the host.

use super::NetError;

const PATH: &str = "/proc/sys/net/ipv4/ip_forward";

/// Turns forwarding on (a no-op when it is on).
///
/// # Errors
/// [`NetError::Forwarding`].
pub fn enable() -> Result<(), NetError> {
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    tracing::info!("enabling IPv4 forwarding");
    std::fs::write(PATH, "1").map_err(|source| NetError::Forwarding { path: PATH, source })
}
