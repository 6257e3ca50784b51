//! Doing work inside a network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread* for
//! good, so work that must happen in another namespace runs on a fresh
//! thread made for it, never on a tokio worker. Sockets keep the namespace
//! they were created in: a netlink socket or listener made on that thread can
//! then be used from anywhere.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `SO_NETNS_COOKIE` (Linux 5.14); not yet in the libc crate.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Errors entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    /// The namespace file could not be opened.
    #[error(
        "cannot open network namespace {path}: {source} (give a path such as /run/netns/NAME or /proc/PID/ns/net)"
    )]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `setns` failed.
    #[error(
        "cannot enter network namespace {path}: {source} (is it a network namespace? entering needs CAP_SYS_ADMIN)"
    )]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The helper thread could not be started or panicked.
    #[error("the network-namespace helper thread failed: {0}")]
    Thread(String),
}

/// Runs `f` on a new thread that has entered the network namespace at
/// `netns` (or stays in the current one when `None`) and returns its result.
///
/// Blocking: call it from `spawn_blocking` or a plain thread in async code.
///
/// # Errors
/// [`NetNsError`] if the namespace cannot be entered.
pub fn run_in<R, F>(netns: Option<&Path>, f: F) -> Result<R, NetNsError>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let target = match netns {
        Some(path) => Some((
            path.to_owned(),
            File::open(path).map_err(|source| NetNsError::Open {
                path: path.to_owned(),
                source,
            })?,
        )),
        None => None,
    };
    let handle = std::thread::Builder::new()
        .name("nestbox-netns".into())
        .spawn(move || {
            if let Some((path, file)) = target {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetNsError::Enter {
                        path,
                        source: e.into(),
                    }
                })?;
            }
            Ok(f())
        })
        .map_err(|e| NetNsError::Thread(e.to_string()))?;
    handle
        .join()
        .map_err(|_| NetNsError::Thread("panicked".into()))?
}

/// The cookie of the calling thread's network namespace, as BPF's
/// `bpf_get_netns_cookie()` reports it.
///
/// # Errors
/// The socket or getsockopt error (Linux < 5.14 lacks `SO_NETNS_COOKIE`).
pub fn current_cookie() -> io::Result<u64> {
    let sock =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    let mut cookie: u64 = 0;
    // size_of::<u64>() is 8, which socklen_t holds.
    let mut len: libc::socklen_t = 8;
    // SAFETY: the fd is a live socket owned by `sock`; `cookie` and `len`
    // point to writable memory of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_closure_in_current_namespace() {
        let here = current_cookie().unwrap();
        let there = run_in(None, current_cookie).unwrap().unwrap();
        assert_eq!(here, there);
    }

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = run_in(Some(Path::new("/run/netns/nestbox-no-such")), || ()).unwrap_err();
        assert!(matches!(err, NetNsError::Open { .. }), "{err}");
        assert!(err.to_string().contains("/run/netns/nestbox-no-such"));
    }
}
