//! The launcher's errors: each module's own, rolled up, plus the refusals
//! of the commands themselves. Every message says what to do next.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::image::ImageError;
use crate::name::NameError;
use crate::net::NetError;
use crate::state::StateError;
use crate::token::TokenError;
use crate::vmm::VmmError;

/// Any launcher failure.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// A name that is not a DNS label.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `launcher.toml` is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The guest image is missing or broken.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The state directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VM's network.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The VMM.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The API token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A file of the VM (disk, log).
    #[error("cannot {what} {path}: {source}")]
    File {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A command-line value that cannot work.
    #[error("{flag} {why}")]
    Option {
        /// The option (`--memory`).
        flag: &'static str,
        /// What is wrong and what is expected.
        why: &'static str,
    },
    /// `create` of a name in use.
    #[error("a VM named {0} already exists: choose another name, or `destroy {0}` first")]
    Exists(String),
    /// No such VM.
    #[error("no VM named {0}: `nestbox-launcher list` shows the VMs")]
    NotFound(String),
    /// No address left.
    #[error(
        "the address pool {0} is full: destroy a VM, or give `pool` in launcher.toml a larger network"
    )]
    PoolFull(String),
    /// `start` of a running VM.
    #[error("VM {0} is already running")]
    Running(String),
    /// A VM whose create or destroy did not finish.
    #[error(
        "VM {0} was not completely created or destroyed: run `create {0}` again, or `destroy {0}`"
    )]
    Incomplete(String),
    /// A VMM that would not die.
    #[error("the VMM of {name} (pid {pid}) is still running after SIGKILL: look at it with `ps`")]
    Unkillable {
        /// The VM.
        name: String,
        /// The VMM's pid.
        pid: u32,
    },
    /// Cleanup steps that failed (every step ran).
    #[error(
        "cleaning up VM {name} failed in {} step(s): {}. Fix the cause, then run `destroy {name}` again",
        .errors.len(),
        .errors.join("; ")
    )]
    Teardown {
        /// The VM.
        name: String,
        /// Each failed step.
        errors: Vec<String>,
    },
    /// A `create` that failed and could not clean up after itself.
    #[error(
        "{error}\nand cleaning up after it failed too: {}. Run `destroy {name}` once the cause is fixed",
        .cleanup.join("; ")
    )]
    Leftovers {
        /// The VM.
        name: String,
        /// Why create failed.
        error: Box<LauncherError>,
        /// The cleanup steps that failed.
        cleanup: Vec<String>,
    },
}

impl LauncherError {
    pub(crate) fn file(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::File { what, path, source }
    }
}
