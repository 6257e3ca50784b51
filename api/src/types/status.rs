//! `GET /v1/status` and the answers of the VM-wide operations.

use serde::{Deserialize, Serialize};

use super::LogStats;

/// The inner container's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum ContainerState {
    /// Being built.
    Starting,
    /// Up; services run in it.
    Running,
    /// Being torn down and built again.
    Bouncing,
    /// Could not be built (why).
    Failed(String),
}

/// The container's limits in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The container's `memory.max`, in bytes.
    pub memory_max: Option<u64>,
    /// The container's `memory.high`, in bytes.
    pub memory_high: Option<u64>,
    /// The platform's `memory.min`, in bytes.
    pub platform_memory_min: Option<u64>,
    /// The container's `pids.max`.
    pub pids_max: Option<u64>,
    /// The container's `cpu.weight`.
    pub cpu_weight: Option<u16>,
    /// The container's `io.weight`.
    pub io_weight: Option<u16>,
    /// Limits that are not in force, each with the reason.
    pub missing: Vec<String>,
}

/// What the container uses now, and how often it ran into its limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Its memory (`memory.current`), in bytes.
    pub memory_bytes: Option<u64>,
    /// Times it was over `memory.high` and throttled (`memory.events` high).
    pub memory_high_events: Option<u64>,
    /// Processes its own OOM killer killed (`memory.events` `oom_kill`).
    pub oom_kills: Option<u64>,
    /// Its processes and threads (`pids.current`).
    pub pids: Option<u64>,
    /// Forks refused at `pids.max` (`pids.events` max).
    pub pids_max_events: Option<u64>,
}

/// What became of a disk at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    /// It mounted as it was.
    Mounted,
    /// It was blank and was formatted (a new VM).
    Formatted,
    /// It did not mount; `e2fsck -p` repaired it and it mounted.
    Repaired,
    /// It did not mount and could not be repaired without a decision: it
    /// is left untouched and not mounted.
    Refused,
}

/// One disk's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    /// `platform` or `user`.
    pub role: String,
    /// The device (`virtio:SERIAL` as configured, or its path).
    pub device: String,
    /// Where it is (or would be) mounted.
    pub mount: String,
    /// What happened to it.
    pub state: DiskState,
    /// Why it was refused, or what the repair fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Space on a filesystem, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Where it is mounted (the container's writable layer).
    pub path: String,
    /// Its size.
    pub total_bytes: u64,
    /// Used.
    pub used_bytes: u64,
    /// What the container may still write.
    pub available_bytes: u64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The guest's version.
    pub version: String,
    /// The VM image this guest booted from (none outside a VM image).
    pub image: Option<String>,
    /// The API version the guest speaks (its newest).
    pub api_version: String,
    /// The VM's name.
    pub name: String,
    /// Its primary URL.
    pub url: String,
    /// Seconds since the guest started.
    pub uptime_s: u64,
    /// The inner container's state.
    pub container: ContainerState,
    /// How many services are defined.
    pub services: usize,
    /// How many ports are open.
    pub ports: usize,
    /// The container's resource limits (and those not in force, why).
    pub limits: Applied,
    /// What the container uses now, and how often it met its limits.
    pub usage: Usage,
    /// The filesystem of the container's writable layer.
    pub user_disk: Option<DiskUsage>,
    /// Each disk's state at boot.
    pub disks: Vec<DiskReport>,
    /// The services' logs: how far they are on the disk, what was dropped.
    pub logs: LogStats,
    /// The user's disk being built from an object store's checkpoint
    /// (`nestbox-launcher create --from`): how far it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<Rebuild>,
}

/// Where a rebuild from the object store is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebuildState {
    /// Downloading and receiving the chain.
    Running,
    /// The user's disk holds the checkpoint; the container runs on it.
    Done,
    /// It stopped (`error` says why); the container stays down and the
    /// next start tries again.
    Failed,
}

/// `Status::rebuild`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuild {
    /// The prefix read (`s3://BUCKET/PREFIX`).
    pub from: String,
    /// The checkpoint rebuilt.
    pub checkpoint: String,
    /// Where it is.
    pub state: RebuildState,
    /// Checkpoints in the chain (the full stream and its incrementals).
    pub streams: usize,
    /// The chain's bytes received so far.
    pub bytes: u64,
    /// All of the chain's bytes (0 until its manifests are read).
    pub total_bytes: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/bounce`: the container is up again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounced {
    /// Always `running`.
    pub container: String,
}

/// `POST /v1/certificates/renew`: the names being renewed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewing {
    /// The host names.
    pub renewing: Vec<String>,
}
