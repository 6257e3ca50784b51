//! Exec sessions: commands started through the API (`/v1/exec`), run in
//! the inner container exactly as services are (its namespaces, a cgroup
//! of its build — `exec-ID` — its limits, its user and confinement), with
//! pipes or a pseudo-terminal of the container, and kept by the guest
//! rather than by a connection: a client may detach and attach again, and
//! gets what it missed from the session's [`output`] buffer. A session's
//! process runs on after its last client left for
//! `max_run_after_disconnect` (a TTY's forever by default, otherwise
//! 10 s), then everything in its cgroup is killed; a bounce ends every
//! session with the container. Ended sessions stay listed, with their
//! output and exit status, for [`ExecSettings::keep_exited_secs`].
//!
//! The wire format is [`nestbox_api::exec`]'s; the WebSocket side is in
//! `api/exec.rs`.
#![deny(clippy::disallowed_methods)]

pub mod output;
pub mod pty;
mod session;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nestbox_api::exec::ExecParams;
use parking_lot::Mutex;
use serde::Deserialize;

pub use session::{Attached, Chunk, Session};

use crate::bounce::Current;

/// `[exec]` of the guest configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ExecSettings {
    /// Output of each session kept in memory, in KiB.
    pub memory_kib: usize,
    /// Output of each session kept in all (beyond memory in a ring file on
    /// the data disk), in MiB: a client reattaching within this many bytes
    /// of output misses nothing. 0 keeps only what memory holds.
    pub buffer_mib: u64,
    /// How long an ended session stays listed and attachable (its output
    /// and exit status), in seconds.
    pub keep_exited_secs: u64,
    /// Running sessions at once; as many ended ones are kept besides (the
    /// oldest forgotten first).
    pub max_sessions: usize,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            memory_kib: 256,
            buffer_mib: 64,
            keep_exited_secs: 300,
            max_sessions: 64,
        }
    }
}

/// Why a session cannot start, or be found.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A parameter is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The container is not running.
    #[error(
        "the inner container is not running (it is being rebuilt, or failed: see GET /v1/status)"
    )]
    NoContainer,
    /// Too many sessions.
    #[error(
        "{0} sessions are running ([exec] max_sessions): end some (POST /v1/exec/ID/kill) and try again"
    )]
    TooMany(usize),
    /// No such session.
    #[error(
        "no exec session {0} (GET /v1/exec lists them; an ended one is kept for a while, then forgotten)"
    )]
    NotFound(String),
    /// Starting it failed.
    #[error("the command could not be started: {0}")]
    Spawn(std::io::Error),
}

struct Inner {
    settings: ExecSettings,
    /// Where the sessions' ring files are.
    dir: PathBuf,
    /// The container's cgroup (its OOM kills are counted there).
    container_cgroup: PathBuf,
    current: Current,
    next_id: AtomicU64,
    sessions: Mutex<BTreeMap<u64, Arc<Session>>>,
}

/// The sessions; cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// The sessions of the container `current`, their ring files in `dir`
    /// (emptied: a session never outlives the guest).
    ///
    /// # Errors
    /// Why `dir` cannot be made.
    #[allow(
        clippy::disallowed_methods,
        reason = "at startup, before anything is served"
    )]
    pub(crate) fn new(
        settings: ExecSettings,
        dir: &Path,
        inner_cgroup: &Path,
        current: Current,
    ) -> std::io::Result<Self> {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                dir: dir.to_owned(),
                container_cgroup: inner_cgroup.to_owned(),
                current,
                next_id: AtomicU64::new(1),
                sessions: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// Starts a session.
    ///
    /// # Errors
    /// [`ExecError`].
    pub async fn start(&self, params: ExecParams) -> Result<Arc<Session>, ExecError> {
        let linger = linger(&params)?;
        let max = self.inner.settings.max_sessions;
        let forgotten = {
            let mut sessions = self.inner.sessions.lock();
            if sessions.values().filter(|s| s.is_running()).count() >= max {
                return Err(ExecError::TooMany(max));
            }
            // Ended sessions are kept up to as many: the oldest go first.
            let ended: Vec<u64> = sessions
                .iter()
                .filter(|(_, s)| !s.is_running())
                .map(|(id, _)| *id)
                .collect();
            let extra = (ended.len() + 1).saturating_sub(max);
            ended[..extra]
                .iter()
                .filter_map(|id| sessions.remove(id))
                .collect::<Vec<_>>()
        };
        for old in forgotten {
            old.forget().await;
        }
        let container = self.inner.current.get().ok_or(ExecError::NoContainer)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Session::start(
            id,
            &params,
            linger,
            &container,
            &self.inner.settings,
            &self.inner.dir,
            &self.inner.container_cgroup,
        )
        .await?;
        self.inner.sessions.lock().insert(id, session.clone());
        // Forgotten a while after it ends.
        let (me, ended, keep) = (
            Arc::downgrade(&self.inner),
            session.clone(),
            Duration::from_secs(self.inner.settings.keep_exited_secs),
        );
        tokio::spawn(async move {
            ended.exited().await;
            tokio::time::sleep(keep).await;
            if let Some(inner) = me.upgrade() {
                inner.sessions.lock().remove(&id);
            }
            ended.forget().await;
        });
        Ok(session)
    }

    /// The session `id`.
    ///
    /// # Errors
    /// [`ExecError::NotFound`].
    pub fn get(&self, id: &str) -> Result<Arc<Session>, ExecError> {
        id.parse::<u64>()
            .ok()
            .and_then(|n| self.inner.sessions.lock().get(&n).cloned())
            .ok_or_else(|| ExecError::NotFound(id.to_owned()))
    }

    /// Every session, oldest first.
    #[must_use]
    pub fn list(&self) -> Vec<nestbox_api::exec::Session> {
        let sessions: Vec<Arc<Session>> = self.inner.sessions.lock().values().cloned().collect();
        sessions.iter().map(|s| s.describe()).collect()
    }
}

/// `max_run_after_disconnect`: `None` is forever.
fn linger(params: &ExecParams) -> Result<Option<Duration>, ExecError> {
    let Some(text) = params.max_run_after_disconnect.as_deref() else {
        return Ok(if params.tty {
            None
        } else {
            Some(Duration::from_secs(10))
        });
    };
    if text.trim() == "0" {
        return Ok(None);
    }
    let d = humantime::parse_duration(text).map_err(|e| {
        ExecError::Invalid(format!(
            "`max_run_after_disconnect`: {text:?} is not a duration such as 10s, 500ms or 0 (forever): {e}"
        ))
    })?;
    Ok(if d.is_zero() { None } else { Some(d) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linger_defaults_and_parses() {
        let tty = ExecParams {
            tty: true,
            ..ExecParams::default()
        };
        assert_eq!(linger(&tty).unwrap(), None);
        assert_eq!(
            linger(&ExecParams::default()).unwrap(),
            Some(Duration::from_secs(10))
        );
        let with = |s: &str| ExecParams {
            max_run_after_disconnect: Some(s.into()),
            ..ExecParams::default()
        };
        assert_eq!(linger(&with("0")).unwrap(), None);
        assert_eq!(linger(&with("0s")).unwrap(), None);
        assert_eq!(
            linger(&with("1m 30s")).unwrap(),
            Some(Duration::from_secs(90))
        );
        assert!(linger(&with("soon")).is_err());
    }
}
