//! `GET /v1/ports` and the stream `GET /v1/ports/events`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// An open port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    /// The TCP port.
    pub port: u16,
    /// The addresses its listeners are bound to.
    pub addrs: Vec<IpAddr>,
    /// The listening process (the VM's pid namespace), when known.
    pub pid: Option<u32>,
    /// Its name (`comm`), when known.
    pub process: Option<String>,
    /// Its URL.
    pub url: String,
    /// Whether it is also the VM's primary URL.
    pub primary: bool,
    /// Who may open its URL (absent from guests before URL auth: public).
    #[serde(default = "public")]
    pub auth: super::UrlAuth,
}

fn public() -> super::UrlAuth {
    super::UrlAuth::Public
}

/// Whether a port opened or closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortChangeKind {
    /// It opened (or was open when the stream started: `ts_ms` 0).
    Open,
    /// It closed.
    Close,
}

/// One line of `GET /v1/ports/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortChange {
    /// What happened.
    pub event: PortChangeKind,
    /// The port, as it was when the change happened.
    #[serde(flatten)]
    pub port: PortInfo,
    /// When the guest learned of it (Unix ms; 0 for the ports open when
    /// the stream started).
    pub ts_ms: u64,
}
