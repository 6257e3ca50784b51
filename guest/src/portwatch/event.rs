//! Port-level events, as the rest of the platform sees them.

use std::net::IpAddr;

use serde::Serialize;

/// The process that owned a listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    /// Process id (in the root pid namespace).
    pub pid: u32,
    /// Task name (`comm`).
    pub comm: String,
}

/// How the watcher learned of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "via")]
pub enum Origin {
    /// A kernel event; `ktime_ns` is `CLOCK_MONOTONIC` when the hook ran.
    Kernel {
        /// When the BPF program ran.
        ktime_ns: u64,
    },
    /// Reconciliation with the kernel's socket table (at start, or after the
    /// ring buffer lost records).
    Reconcile,
}

/// A port of the inner container's network namespace started or stopped
/// being listened on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum PortEvent {
    /// The first socket on `port` is listening.
    Listening {
        /// The TCP port.
        port: u16,
        /// The local addresses of the sockets listening on it.
        addrs: Vec<IpAddr>,
        /// The process that listened, when known.
        process: Option<Process>,
        /// Where the news came from.
        origin: Origin,
    },
    /// The last socket on `port` is gone.
    Closed {
        /// The TCP port.
        port: u16,
        /// The address of that last socket.
        addrs: Vec<IpAddr>,
        /// The process that had listened, when known.
        process: Option<Process>,
        /// Where the news came from.
        origin: Origin,
    },
}

impl PortEvent {
    /// The port the event is about.
    #[must_use]
    pub fn port(&self) -> u16 {
        match self {
            Self::Listening { port, .. } | Self::Closed { port, .. } => *port,
        }
    }

    /// Whether the port is now published.
    #[must_use]
    pub fn is_listening(&self) -> bool {
        matches!(self, Self::Listening { .. })
    }

    /// The event's origin.
    #[must_use]
    pub fn origin(&self) -> Origin {
        match self {
            Self::Listening { origin, .. } | Self::Closed { origin, .. } => *origin,
        }
    }
}

impl std::fmt::Display for PortEvent {
    /// One line for operators: `+ 8080 listening on 0.0.0.0,:: by python3[42] (kernel)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sign, verb, port, addrs, process, origin) = match self {
            Self::Listening {
                port,
                addrs,
                process,
                origin,
            } => ('+', "listening", port, addrs, process, origin),
            Self::Closed {
                port,
                addrs,
                process,
                origin,
            } => ('-', "closed", port, addrs, process, origin),
        };
        let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        write!(f, "{sign} {port} {verb} on {}", addrs.join(","))?;
        if let Some(p) = process {
            write!(f, " by {}[{}]", p.comm, p.pid)?;
        }
        match origin {
            Origin::Kernel { .. } => write!(f, " (kernel)"),
            Origin::Reconcile => write!(f, " (reconcile)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_the_event_and_origin() {
        let e = PortEvent::Listening {
            port: 8080,
            addrs: vec!["0.0.0.0".parse().unwrap()],
            process: Some(Process {
                pid: 7,
                comm: "python3".into(),
            }),
            origin: Origin::Kernel { ktime_ns: 5 },
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "listening");
        assert_eq!(v["port"], 8080);
        assert_eq!(v["origin"]["via"], "kernel");
        assert_eq!(v["process"]["comm"], "python3");
        assert_eq!(
            e.to_string(),
            "+ 8080 listening on 0.0.0.0 by python3[7] (kernel)"
        );
    }
}
