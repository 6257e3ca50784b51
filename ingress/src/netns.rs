//! Work inside another network namespace: the platform's one mechanism.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread* for
//! good, so work that must happen in another namespace runs on a thread of
//! its own that entered it once ([`NetnsThread`]), never on a tokio worker.
//! A socket keeps the namespace it was made in: one made there can then be
//! used from anywhere. The ingress keeps one such thread per backend
//! namespace to make its sockets ([`crate::dial`]); the guest's port
//! watcher and container setup run one-off work with [`run_in`].
#![deny(clippy::disallowed_methods)]

use std::io;
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;

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
    /// The thread could not be started, or is gone.
    #[error("the network-namespace thread failed: {0}")]
    Thread(String),
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside one network namespace that runs what it is given, in
/// order; it ends when this handle is dropped (after the work queued).
#[derive(Debug)]
pub struct NetnsThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl NetnsThread {
    /// Starts a thread named `name` that enters the namespace at `netns`
    /// (or stays in the current one when `None`). Blocking: it waits until
    /// the thread is in.
    ///
    /// # Errors
    /// [`NetNsError`] if the namespace cannot be entered.
    #[allow(
        clippy::disallowed_methods,
        reason = "blocking by design: callers use spawn_blocking or a plain thread"
    )]
    pub fn enter(name: &str, netns: Option<&Path>) -> Result<Self, NetNsError> {
        let target = match netns {
            Some(path) => Some((
                path.to_owned(),
                std::fs::File::open(path).map_err(|source| NetNsError::Open {
                    path: path.to_owned(),
                    source,
                })?,
            )),
            None => None,
        };
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                if let Some((path, file)) = target
                    && let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                {
                    let _ = ready_tx.send(Err(NetNsError::Enter {
                        path,
                        source: e.into(),
                    }));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                // Ends when the handle (the only sender) is dropped.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|e| NetNsError::Thread(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| NetNsError::Thread("it died while entering".into()))??;
        Ok(Self { jobs })
    }

    /// Runs `f` on the thread; its result comes on the receiver (awaited,
    /// or `blocking_recv`ed off the runtime).
    ///
    /// # Errors
    /// [`NetNsError::Thread`] if the thread is gone.
    pub fn submit<R, F>(&self, f: F) -> Result<oneshot::Receiver<R>, NetNsError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetNsError::Thread("it is gone".into()))?;
        Ok(rx)
    }
}

/// Runs `f` on a new thread that has entered the network namespace at
/// `netns` (or stays in the current one when `None`) and returns its
/// result.
///
/// Blocking: call it from `spawn_blocking` or a plain thread in async code.
///
/// # Errors
/// [`NetNsError`] if the namespace cannot be entered, or `f` panicked.
pub fn run_in<R, F>(netns: Option<&Path>, f: F) -> Result<R, NetNsError>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    NetnsThread::enter("nestbox-netns", netns)?
        .submit(f)?
        .blocking_recv()
        .map_err(|_| NetNsError::Thread("the work panicked".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_work_and_names_a_missing_namespace() {
        assert_eq!(run_in(None, || 7).unwrap(), 7);
        let err = run_in(Some(Path::new("/run/netns/nestbox-no-such")), || ()).unwrap_err();
        assert!(matches!(err, NetNsError::Open { .. }), "{err}");
        assert!(err.to_string().contains("/run/netns/nestbox-no-such"));
        let panicked = run_in(None, || panic!("injected"));
        assert!(matches!(panicked, Err(NetNsError::Thread(_))));
    }
}
