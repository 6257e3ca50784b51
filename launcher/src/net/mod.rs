//! A VM's network on the host: a persistent tap ([`tap`]), the host
//! address on it and a /32 route to the guest ([`netlink`]), IPv4
//! forwarding and no IPv6 on the tap ([`sysctl`]) and the VM's nftables
//! table ([`nft`]).
//!
//! Setting up is idempotent (run again by `start`, and by a `create` that
//! finds its own leftovers); tearing down runs every step and returns every
//! error, so one failure never leaves the rest in place.

pub mod netlink;
pub mod nft;
pub mod prefix;
pub mod sysctl;
pub mod tap;

use std::net::Ipv4Addr;

use netlink::Netlink;

/// Errors setting up or tearing down a VM's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be made.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// No netlink socket.
    #[error("cannot open a netlink socket: {0} (run nestbox-launcher as root)")]
    Socket(#[source] std::io::Error),
    /// A netlink request failed.
    #[error("netlink: {what} on {iface}: {source}")]
    Netlink {
        /// The step.
        what: &'static str,
        /// The interface.
        iface: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// The tap disappeared between creating and configuring it.
    #[error("the tap {0} vanished while it was being configured: is something else deleting taps?")]
    Vanished(String),
    /// A sysctl could not be set.
    #[error("cannot set {path}: {source}")]
    Sysctl {
        /// The sysctl file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// nft cannot run.
    #[error("cannot run nft: {0}. Install nftables (apt-get install nftables)")]
    NftMissing(#[source] std::io::Error),
    /// nft refused the transaction.
    #[error("nft refused the rules of table {table}: {stderr}")]
    Nft {
        /// The VM's table.
        table: String,
        /// nft's message.
        stderr: String,
    },
}

/// One VM's network.
#[derive(Clone, Debug)]
pub struct VmNetwork<'a> {
    /// The tap's name.
    pub tap: &'a str,
    /// The launcher's tap prefix (taps the VM may not reach).
    pub tap_prefix: &'a str,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The host's address on the tap.
    pub host: Ipv4Addr,
    /// Whether the guest's traffic is forwarded and masqueraded.
    pub egress: bool,
    /// The pool every VM's address comes from.
    pub pool: String,
    /// Private or link-local prefixes the guest may reach all the same.
    pub allow: &'a [prefix::Ipv4Prefix],
}

impl VmNetwork<'_> {
    /// Makes the tap (IPv4 only), addresses it, routes the guest, enables
    /// forwarding and loads the VM's table. Idempotent.
    ///
    /// # Errors
    /// The first step that fails.
    pub fn set_up(&self) -> Result<(), NetError> {
        let _span = tracing::info_span!("network", tap = self.tap).entered();
        tap::create_persistent(self.tap)?;
        sysctl::disable_ipv6(self.tap)?;
        let nl = Netlink::connect()?;
        let index = nl
            .link_index(self.tap)?
            .ok_or_else(|| NetError::Vanished(self.tap.to_owned()))?;
        nl.add_addr(self.tap, index, self.host, 32)?;
        nl.set_up(self.tap, index)?;
        nl.add_route(self.tap, index, self.guest, self.host)?;
        if self.egress {
            sysctl::enable_forwarding()?;
        }
        nft::apply(
            self.tap,
            &nft::ruleset(&nft::Rules {
                tap: self.tap,
                tap_prefix: self.tap_prefix,
                guest: self.guest,
                pool: &self.pool,
                egress: self.egress,
                allow: self.allow,
            }),
        )
    }
}

/// Removes the table of `tap`, the route to `guest` and the tap, each step
/// whatever happened to the one before; returns every error. Forwarding
/// stays on (other things on the host may rely on it).
#[must_use]
pub fn tear_down(tap: &str, guest: Ipv4Addr) -> Vec<NetError> {
    let _span = tracing::info_span!("network teardown", tap).entered();
    let mut errors = Vec::new();
    if let Err(e) = nft::apply(tap, &nft::delete_script(tap)) {
        errors.push(e);
    }
    match Netlink::connect() {
        Err(e) => errors.push(e),
        Ok(nl) => match nl.link_index(tap) {
            Err(e) => errors.push(e),
            Ok(None) => {}
            Ok(Some(index)) => {
                if let Err(e) = nl.del_route(tap, index, guest) {
                    errors.push(e);
                }
                if let Err(e) = nl.del_link(tap, index) {
                    errors.push(e);
                }
            }
        },
    }
    errors
}
