//! The inner container's files, for the API (`/v1/fs/…`): every path is
//! resolved inside the container's root and every access is made with the
//! container root's ids and no capability — never as the VM's root.
//!
//! How: each request gets a descriptor of the container's root
//! (`/proc/PID1/root`, opened by the platform) and runs on a thread of its
//! own ([`as_container`]) that has dropped, for itself only, its
//! supplementary groups, set its filesystem ids to the container root's
//! ([`HOST_BASE`]) and cleared its effective capabilities. Paths are walked
//! by the kernel with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! from that descriptor ([`resolve`]): `..` and absolute symlinks stay
//! inside the container's root, `/proc/self/root`-style magic links are
//! refused, and what the container could not touch (another user's 0600
//! file, a read-only mount) this cannot either.
//!
//! Transfers stream through bounded channels of 64 KiB chunks: a file of
//! any size costs a few chunks of memory. A write goes to a temporary file
//! in the target directory, is fsynced and renamed into place, and the
//! directory fsynced, before the answer; a full disk answers 507 and leaves
//! nothing behind.
//!
//! [`HOST_BASE`]: crate::container::idmap::HOST_BASE
#![deny(clippy::disallowed_methods)]

pub mod archive;
pub mod ops;
pub mod resolve;
pub mod watch;

use std::os::fd::OwnedFd;

use crate::bounce::Current;
use crate::container::idmap::HOST_BASE;

/// The size of each chunk of a transfer.
pub const CHUNK: usize = 64 << 10;
/// Chunks in flight per transfer.
pub const IN_FLIGHT: usize = 4;

/// A run of an upload's body as it arrived (frames kept as they are: one
/// vectored write takes them, with no copy to join them), or why the
/// upload broke off.
pub type Batch = Result<Vec<bytes::Bytes>, String>;

/// Errors of file operations.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The system's error, about a path.
    #[error("{path}: {source}")]
    Os {
        /// The path (the container's).
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A request that makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// The container is not running.
    #[error("the inner container is not running (see GET /v1/status)")]
    NoContainer,
}

impl FsError {
    /// An error of `source` about `path`.
    pub fn os(path: &str, source: impl Into<std::io::Error>) -> Self {
        Self::Os {
            path: path.to_owned(),
            source: source.into(),
        }
    }

    /// The errno, for the API's code.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A descriptor of the current container's root.
///
/// # Errors
/// [`FsError::NoContainer`], or the open's error.
pub async fn container_root(current: &Current) -> Result<OwnedFd, FsError> {
    let container = current.get().ok_or(FsError::NoContainer)?;
    let path = format!("/proc/{}/root", container.pid1());
    drop(container);
    tokio::task::spawn_blocking(move || {
        nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| FsError::os("/", e))
    })
    .await
    .map_err(|e| FsError::Invalid(e.to_string()))?
}

/// Makes the calling thread act as the container's root on files: no
/// supplementary groups, filesystem ids [`HOST_BASE`], no effective
/// capability. Affects this thread only (raw system calls: libc's wrappers
/// would change every thread).
///
/// # Errors
/// The first call that failed.
fn drop_to_container_ids() -> std::io::Result<()> {
    // SAFETY: setgroups with an empty list; the raw call changes this
    // thread's credentials only.
    if unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: setfsgid/setfsuid take an id and change this thread only.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, HOST_BASE);
        libc::syscall(libc::SYS_setfsuid, HOST_BASE);
    }
    // Both return the previous id: asking again says whether it took.
    // SAFETY: as above; u32::MAX (-1) changes nothing and returns the id.
    let (uid, gid) = unsafe {
        (
            libc::syscall(libc::SYS_setfsuid, u32::MAX),
            libc::syscall(libc::SYS_setfsgid, u32::MAX),
        )
    };
    if uid != i64::from(HOST_BASE) || gid != i64::from(HOST_BASE) {
        return Err(std::io::Error::other(
            "the file thread could not take the container's ids",
        ));
    }
    caps::clear(None, caps::CapSet::Effective).map_err(|e| std::io::Error::other(e.to_string()))
}

/// Runs `f` on a new thread acting as the container's root on files (see
/// [`drop_to_container_ids`]), and gives its result.
///
/// # Errors
/// [`FsError`] if the thread cannot start or take the ids.
pub async fn as_container<T, F>(f: F) -> Result<T, FsError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, FsError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nestbox-files".into())
        .spawn(move || {
            let result = drop_to_container_ids()
                .map_err(|e| FsError::os("/", e))
                .and_then(|()| f());
            let _ = tx.send(result);
        })
        .map_err(|e| FsError::os("/", e))?;
    rx.await
        .map_err(|_| FsError::Invalid("the file thread ended without an answer".into()))?
}
