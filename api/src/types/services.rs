//! `/v1/services`: a service's definition and its live state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A user service, as registered through the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Its name, a DNS label.
    pub name: String,
    /// The program (absolute, or found through `PATH` in the container).
    pub cmd: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its environment (nothing else is inherited; `PATH` defaults to the
    /// usual directories).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Its working directory in the container (default `/`).
    #[serde(default)]
    pub dir: Option<String>,
    /// Services started before this one.
    #[serde(default)]
    pub needs: Vec<String>,
    /// The port this service serves HTTP on: the VM's primary URL
    /// (`https://<vm>.<domain>/`) goes to it.
    #[serde(default)]
    pub http_port: Option<u16>,
    /// When it is started again after its process ends.
    #[serde(default)]
    pub restart: Restart,
}

/// When a service is started again after its process ends (with a backoff
/// that grows while it keeps exiting quickly). Whatever the policy, every
/// service not stopped on request starts again when the container is
/// rebuilt (a bounce).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Always (a server).
    #[default]
    Always,
    /// Only if it failed: a non-zero exit, a signal, or no start at all.
    OnFailure,
    /// Never: a one-shot task; it shows as `exited`.
    Never,
}

impl Restart {
    /// Whether a run that ended `successfully` is followed by another.
    #[must_use]
    pub fn again(self, successfully: bool) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => !successfully,
            Self::Never => false,
        }
    }
}

/// A service's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Its process runs.
    Running,
    /// Being started.
    Starting,
    /// Waiting to be started again after it exited.
    Backoff,
    /// Not running, on request (or the container is down).
    Stopped,
    /// Its process ended and its restart policy does not start it again
    /// (until the container is rebuilt, or it is started on request).
    Exited,
}

/// A service as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Its name.
    pub name: String,
    /// Its definition.
    pub spec: ServiceSpec,
    /// Its state.
    pub state: ServiceState,
    /// Its process id (as the VM sees it) while running.
    pub pid: Option<u32>,
    /// How many times it was started again after exiting.
    pub restarts: u32,
    /// How its last run ended.
    pub last_exit: Option<String>,
    /// Its log lines dropped since the guest started (over the rate, or
    /// with the disk behind).
    pub logs_dropped: u64,
}
