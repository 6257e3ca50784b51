//! User services: definitions kept on the data disk, started in dependency
//! order inside the inner container, restarted with backoff when they
//! crash, stopped and started on request; their output goes to [`Logs`].
//!
//! [`Logs`]: crate::logs::Logs
#![deny(clippy::disallowed_methods)]

mod manager;
mod spec;

use std::path::PathBuf;

use crate::spawn::{Process, Spawn, Stdio};

pub use manager::Manager;
pub use spec::{Check, Restart, ServiceSpec, start_order};

/// A started process, or why it did not start, some time later.
pub type Spawning<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Process>> + Send + 'a>>;

/// Starts a service's process; the real one runs it inside the inner
/// container. The child must have stdout and stderr piped and lead its own
/// process group. Starting waits for the child's exec (or its report of
/// why it could not), which is never done on the runtime thread: that
/// thread serves HTTPS and the API, and the exec of a large program takes
/// a while.
pub trait Launcher: Send + Sync + 'static {
    /// Starts `spec`'s process.
    fn spawn<'a>(&'a self, spec: &'a ServiceSpec) -> Spawning<'a>;
}

/// The command for `spec`: its program, arguments, environment (only its
/// own, with a default `PATH`), working directory, piped output, its own
/// process group.
#[must_use]
pub fn command(spec: &ServiceSpec) -> Spawn {
    let mut cmd = Spawn::new(&spec.cmd);
    cmd.args(&spec.args)
        .env("PATH", crate::spawn::DEFAULT_PATH)
        .envs(&spec.env)
        .current_dir(spec.dir.as_deref().unwrap_or("/"))
        .stdout(Stdio::Piped)
        .stderr(Stdio::Piped)
        .process_group();
    cmd
}

/// Starts services as plain child processes of the guest (tests, and
/// anyone running services without a container).
#[derive(Debug, Default)]
pub struct HostLauncher;

impl Launcher for HostLauncher {
    fn spawn<'a>(&'a self, spec: &'a ServiceSpec) -> Spawning<'a> {
        let cmd = command(spec);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || cmd.spawn(None))
                .await
                .map_err(std::io::Error::other)?
        })
    }
}

pub use nestbox_api::types::{ServiceState as State, ServiceStatus};

/// Errors of the service manager.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A field of a definition is not valid.
    #[error("`{field}` {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The name is taken.
    #[error("a service named \"{0}\" exists: delete it first, or pick another name")]
    Exists(String),
    /// No such service.
    #[error("no service named \"{0}\"")]
    NotFound(String),
    /// Other services need this one.
    #[error("\"{name}\" is needed by {by}: delete or change those first")]
    Needed {
        /// The service.
        name: String,
        /// The services that need it.
        by: String,
    },
    /// The definitions on disk could not be read or written.
    #[error("service definition {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl ServiceError {
    /// A stable code for the API.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid",
            Self::Exists(_) => "exists",
            Self::NotFound(_) => "not_found",
            Self::Needed { .. } => "needed",
            Self::Io { .. } => "io",
        }
    }
}
