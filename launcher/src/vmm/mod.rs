//! The VMM: the process that is the VM. A backend ([`Vmm`]) says what
//! command runs a VM, how to tell that it is up, and how to ask it to stop;
//! everything else — opening its devices ([`fds`]), its cgroup
//! ([`cgroup`]) and jail ([`jail`]), starting it detached, recording it,
//! killing it — is the same for every backend ([`spawn`],
//! [`crate::state::process`]).
//!
//! Backends: [`qemu::Qemu`] (microvm), and [`stub::Stub`], any command in
//! place of a VM, for benchmarks that time the launcher's own work. A
//! Firecracker or cloud-hypervisor backend implements the same trait.

pub mod accel;
pub mod cgroup;
pub mod cmdline;
pub mod fds;
pub mod jail;
pub mod qemu;
pub mod qmp;
pub mod spawn;
pub mod stub;

use std::path::{Path, PathBuf};
use std::process::Command;

use accel::AccelChoice;

use crate::state::process::VmmProcess;

/// Errors starting or stopping a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The command could not be started.
    #[error(
        "cannot start the VMM `{program}`: {source}. Install it (apt-get install qemu-system-x86) or set `qemu` in launcher.toml"
    )]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// It exited before it was up.
    #[error("the VMM exited as it started ({status}). The end of {log}:\n{tail}")]
    Exited {
        /// How it ended.
        status: String,
        /// Its log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// It did not come up in time (and was killed).
    #[error("the VMM was not up after {secs} s and was killed. The end of {log}:\n{tail}")]
    NotUp {
        /// The time it had.
        secs: u64,
        /// Its log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// Its log file cannot be opened.
    #[error("cannot open the VMM log {path}: {source}")]
    Log {
        /// The log.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The control socket path does not fit a Unix socket address.
    #[error(
        "the control socket {0} is longer than a Unix socket path may be (107 bytes): use a shorter --state-dir"
    )]
    SocketPath(PathBuf),
    /// The stop request did not get through.
    #[error("cannot ask the VM to stop through {socket}: {source}")]
    Control {
        /// The control socket.
        socket: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A signal could not be sent.
    #[error("cannot signal the VMM (pid {pid}): {source}")]
    Signal {
        /// The VMM's pid.
        pid: u32,
        /// The error.
        source: nix::Error,
    },
    /// A file or socket the VMM gets could not be opened.
    #[error("cannot open {path} for the VMM: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The tap could not be opened for the VMM.
    #[error(transparent)]
    Tap(Box<crate::net::tap::TapError>),
    /// The VMM's cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// A step of the jail failed in the VMM's process before it ran.
    #[error("cannot jail the VMM: {step}: {source}")]
    Jail {
        /// The step.
        step: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Everything a backend needs to run one VM; the launcher decides it all.
/// Paths are absolute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's name.
    pub name: String,
    /// Its directory (the VMM's working directory).
    pub dir: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u8,
    /// The tap to attach the network device to.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// Where the serial console goes (appended to).
    pub console_log: PathBuf,
    /// The data disk (raw, read-write): the platform's.
    pub data_disk: PathBuf,
    /// The user disk (raw, read-write), when the VM has one.
    pub user_disk: Option<PathBuf>,
    /// The config disk (raw, read-only).
    pub config_disk: PathBuf,
    /// The VMM's control socket.
    pub control_socket: PathBuf,
    /// The user (and group) id the VMM runs as: the VM's own, no other
    /// process's.
    pub uid: u32,
}

/// A VMM backend.
pub trait Vmm {
    /// The backend's name, recorded with the VM (`qemu`).
    fn name(&self) -> &str;

    /// The acceleration its VMs get, and why.
    fn accel(&self) -> &AccelChoice;

    /// The command that runs the VM, using the descriptors of [`fds`]. The
    /// launcher adds the environment marker, the log, a new session, the
    /// cgroup and the jail.
    fn command(&self, spec: &VmSpec) -> Command;

    /// Whether the VMM gets the VM's devices as descriptors ([`fds`]); a
    /// stub that runs no VM gets none.
    fn takes_devices(&self) -> bool {
        true
    }

    /// The translation cache (MiB) it keeps beside the guest's memory, for
    /// its memory limit.
    fn cache_mib(&self) -> u32 {
        0
    }

    /// Whether the VMM that `command` started is up, given the VM's
    /// control socket path (QEMU: the socket accepts connections). The
    /// launcher polls this after starting.
    fn is_up(&self, control_socket: &Path) -> bool {
        let _ = control_socket;
        true
    }

    /// Asks the VM to shut down cleanly (through its control socket, or by
    /// signalling `process`); the launcher then waits for the process to end
    /// and kills it after the timeout.
    ///
    /// # Errors
    /// [`VmmError`] when the request cannot be delivered.
    fn request_stop(&self, control_socket: &Path, process: &VmmProcess) -> Result<(), VmmError>;
}
