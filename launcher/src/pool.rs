//! The IPv4 pool VM addresses come from (`pool` in `launcher.toml`).
//!
//! Offset 0 is the network, offset 1 the host: every tap carries the host
//! address as a /32, so each guest's gateway is the same address whichever
//! tap it sits behind. Guests get offsets 2 and up (the broadcast address
//! excluded); a VM's offset is its *index*, which also names its tap.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network in CIDR form, e.g. `10.123.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// A `pool` that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Not `ADDRESS/PREFIX`.
    #[error("{0:?} is not an IPv4 network in CIDR form (e.g. \"10.123.0.0/16\")")]
    Syntax(String),
    /// A prefix that leaves no room for the host and a guest.
    #[error(
        "the pool {0} is too small: its prefix must be between /8 and /30 (a /30 holds the host and one VM)"
    )]
    Size(String),
    /// Bits set below the prefix.
    #[error("the pool {given} has host bits set: did you mean {network}?")]
    HostBits {
        /// As written.
        given: String,
        /// The network it is in.
        network: String,
    },
}

impl FromStr for Pool {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, PoolError> {
        use crate::net::prefix::{Ipv4Prefix, PrefixError};
        let prefix: Ipv4Prefix = s.parse().map_err(|e| match e {
            PrefixError::Syntax(_) => PoolError::Syntax(s.to_owned()),
            PrefixError::HostBits { given, network } => PoolError::HostBits { given, network },
        })?;
        if !(8..=30).contains(&prefix.prefix_len()) {
            return Err(PoolError::Size(s.to_owned()));
        }
        Ok(Self {
            network: prefix.network(),
            prefix_len: prefix.prefix_len(),
        })
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl<'de> serde::Deserialize<'de> for Pool {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Pool {
    /// The prefix length (the guests' `prefix_len`).
    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The host's address on every tap (and the guests' gateway).
    #[must_use]
    pub fn host_address(&self) -> Ipv4Addr {
        self.address(1)
    }

    /// The address at `index` (offset from the network address).
    #[must_use]
    pub fn address(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + index)
    }

    /// The largest index a guest can have (the one below broadcast).
    #[must_use]
    pub fn last_index(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix_len))) - 2
    }

    /// The lowest guest index not in `used`, if any is left.
    #[must_use]
    pub fn allocate(&self, used: &BTreeSet<u32>) -> Option<u32> {
        (2..=self.last_index()).find(|i| !used.contains(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_takes_the_first_address_and_guests_the_next_free_ones() {
        let pool: Pool = "10.123.0.0/16".parse().unwrap();
        assert_eq!(pool.host_address(), Ipv4Addr::new(10, 123, 0, 1));
        assert_eq!(pool.prefix_len(), 16);
        assert_eq!(pool.to_string(), "10.123.0.0/16");
        let mut used = BTreeSet::new();
        assert_eq!(pool.allocate(&used), Some(2));
        used.extend([2, 3, 5]);
        assert_eq!(pool.allocate(&used), Some(4));
        assert_eq!(pool.address(4), Ipv4Addr::new(10, 123, 0, 4));
        assert_eq!(pool.address(300), Ipv4Addr::new(10, 123, 1, 44));
        assert_eq!(pool.last_index(), 65534);
    }

    #[test]
    fn a_full_pool_allocates_nothing() {
        let pool: Pool = "10.211.0.0/30".parse().unwrap();
        assert_eq!(pool.last_index(), 2);
        assert_eq!(pool.allocate(&BTreeSet::new()), Some(2));
        assert_eq!(pool.allocate(&BTreeSet::from([2])), None);
        let pool: Pool = "10.211.0.0/24".parse().unwrap();
        let used: BTreeSet<u32> = (2..=254).collect();
        assert_eq!(pool.allocate(&used), None, "255 is broadcast");
    }

    #[test]
    fn bad_pools_are_refused_saying_why() {
        assert!(matches!(
            "10.0.0.0".parse::<Pool>(),
            Err(PoolError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0/8".parse::<Pool>(),
            Err(PoolError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Pool>(),
            Err(PoolError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/31".parse::<Pool>(),
            Err(PoolError::Size(_))
        ));
        assert!(matches!(
            "0.0.0.0/0".parse::<Pool>(),
            Err(PoolError::Size(_))
        ));
        let err = "10.123.0.5/16".parse::<Pool>().unwrap_err();
        assert!(
            err.to_string().contains("did you mean 10.123.0.0/16"),
            "{err}"
        );
    }
}
