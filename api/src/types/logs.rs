//! `GET /v1/services/{name}/logs` and the log store's figures.

use serde::{Deserialize, Serialize};

/// Which output a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// The service manager (started, exited, restarting).
    System,
}

/// One line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its number: increasing across every service's lines and across
    /// restarts of the guest (0 in files written before lines had one).
    #[serde(default)]
    pub seq: u64,
    /// When it was read (Unix ms).
    pub ts_ms: u64,
    /// The service.
    pub service: String,
    /// Where it came from.
    pub stream: Stream,
    /// The text (lossy UTF-8, without the newline).
    pub line: String,
}

/// How the log store is doing (`GET /v1/status` → `logs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// The newest line's number.
    pub last_seq: u64,
    /// Every line numbered up to this one is on the disk.
    pub synced_seq: u64,
    /// Lines waiting for the disk.
    pub queued: usize,
    /// Lines dropped (over a rate, or with the queue full), all services.
    pub dropped: u64,
    /// Lines the disk refused (full, or failing).
    pub failed: u64,
}
