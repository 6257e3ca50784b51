//! TCP tunnels over a WebSocket (`GET /v1/proxy`), Sprites' wire format:
//! one WebSocket per TCP connection; the client's first frame is a JSON
//! text frame [`ProxyInit`], the guest answers [`ProxyStatus`] (`connected`
//! and the address dialed, or `error` and why, then a close), and then
//! binary frames carry the connection's bytes both ways. The guest dials
//! inside the inner container's network namespace, so its loopback-only
//! listeners are reachable.

use serde::{Deserialize, Serialize};

/// The client's first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInit {
    /// `localhost` (the default), or an IP address, as the container sees
    /// it.
    #[serde(default)]
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

/// The guest's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// `connected` or `error`.
    pub status: String,
    /// The address dialed, once connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
