//! An IPv4 prefix in CIDR form (`10.99.0.0/24`, `192.0.2.7/32`), as the
//! firewall's allow-list in `launcher.toml` gives it.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: an address with no bits below its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Prefix {
    network: Ipv4Addr,
    len: u8,
}

/// A prefix that cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Not `ADDRESS/LENGTH` with an IPv4 address and a length up to 32.
    #[error(
        "{0:?} is not an IPv4 prefix in CIDR form (e.g. \"10.99.0.0/24\"; VMs have no IPv6, so IPv6 prefixes have no use here)"
    )]
    Syntax(String),
    /// Bits set below the length.
    #[error("the prefix {given} has host bits set: did you mean {network}?")]
    HostBits {
        /// As written.
        given: String,
        /// The network it is in.
        network: String,
    },
}

impl FromStr for Ipv4Prefix {
    type Err = PrefixError;

    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let syntax = || PrefixError::Syntax(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        if len > 32 {
            return Err(syntax());
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(PrefixError::HostBits {
                given: s.to_owned(),
                network: format!("{network}/{len}"),
            });
        }
        Ok(Self { network, len })
    }
}

impl Ipv4Prefix {
    /// The network address.
    #[must_use]
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_print_back() {
        for ok in ["10.99.0.0/24", "192.0.2.7/32", "0.0.0.0/0", "100.64.0.0/10"] {
            assert_eq!(ok.parse::<Ipv4Prefix>().unwrap().to_string(), ok);
        }
        assert!(matches!(
            "10.99.0.1/24".parse::<Ipv4Prefix>(),
            Err(PrefixError::HostBits { network, .. }) if network == "10.99.0.0/24"
        ));
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/8", "x/8"] {
            assert!(bad.parse::<Ipv4Prefix>().is_err(), "{bad}");
        }
    }
}
