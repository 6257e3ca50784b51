//! The service manager: definitions on disk, one supervising task per
//! running service.
//!
//! Files: `<state_dir>/services/<name>.json` holds a definition and whether
//! it was stopped on request, written atomically (temporary file, fsync,
//! rename, fsync of the directory) before the call that changed it returns.
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Check, Launcher, ServiceError, ServiceSpec, ServiceStatus, State, start_order};
use crate::logs::{Logs, Stream};

/// The wait before a restart: 100 ms, doubled per quick exit, up to 30 s.
const RESTART: nestbox_ingress::backoff::Backoff =
    nestbox_ingress::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
/// A run this long resets the backoff.
const STEADY: Duration = Duration::from_secs(10);
/// SIGTERM, then SIGKILL after this long.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Stored {
    spec: ServiceSpec,
    #[serde(default)]
    stopped: bool,
}

struct Live {
    state: State,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<String>,
}

struct Entry {
    spec: ServiceSpec,
    stopped: bool,
    live: Arc<Mutex<Live>>,
    run: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

/// A service's definition and live state, for readers that do not wait.
type View = (ServiceSpec, Arc<Mutex<Live>>);

struct Inner {
    dir: PathBuf,
    logs: Logs,
    launcher: Arc<dyn Launcher>,
    grace: Duration,
    up: AtomicBool,
    entries: tokio::sync::Mutex<BTreeMap<String, Entry>>,
    /// A copy of the statuses for synchronous readers.
    view: Mutex<BTreeMap<String, View>>,
    /// The port of the service that is the primary URL, if one is.
    primary: watch::Sender<Option<u16>>,
}

/// The service manager; cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError + '_ {
    move |source| ServiceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Runs `op` on the definition file `path`, on the blocking pool (it
/// fsyncs).
async fn on_disk(
    path: PathBuf,
    op: impl FnOnce(&Path) -> Result<(), nestbox_durable::DurableError> + Send + 'static,
) -> Result<(), ServiceError> {
    let shown = path.clone();
    let io = |source| ServiceError::Io {
        path: shown.clone(),
        source,
    };
    tokio::task::spawn_blocking(move || op(&path))
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(|e| io(e.into()))
}

impl Manager {
    /// Loads the definitions kept in `state_dir/services`.
    ///
    /// # Errors
    /// [`ServiceError::Io`] if the directory or a file cannot be read.
    pub fn open(
        state_dir: &Path,
        logs: Logs,
        launcher: Arc<dyn Launcher>,
    ) -> Result<Self, ServiceError> {
        Self::open_with(state_dir, logs, launcher, GRACE)
    }

    /// [`Manager::open`] with a stop grace period.
    ///
    /// # Errors
    /// As [`Manager::open`].
    #[allow(
        clippy::disallowed_methods,
        reason = "at startup, before anything is served"
    )]
    pub fn open_with(
        state_dir: &Path,
        logs: Logs,
        launcher: Arc<dyn Launcher>,
        grace: Duration,
    ) -> Result<Self, ServiceError> {
        let dir = state_dir.join("services");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Writes that a crash interrupted: each definition they were
        // replacing is still whole under its own name.
        let torn = nestbox_durable::remove_leftovers(&dir).map_err(|e| io_err(&dir)(e.into()))?;
        if torn > 0 {
            tracing::warn!(torn, "interrupted definition writes removed");
        }
        let mut entries = BTreeMap::new();
        let mut view = BTreeMap::new();
        for item in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = item.map_err(io_err(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read(&path).map_err(io_err(&path))?;
            let stored: Stored = match serde_json::from_slice(&text) {
                Ok(stored) => stored,
                Err(err) => {
                    // One unreadable definition must not keep every other
                    // service down; the file is left for the user to see.
                    tracing::error!(path = %path.display(), %err, "a service definition does not parse; skipped");
                    continue;
                }
            };
            let live = Arc::new(Mutex::new(Live {
                state: State::Stopped,
                pid: None,
                restarts: 0,
                last_exit: None,
            }));
            view.insert(
                stored.spec.name.clone(),
                (stored.spec.clone(), live.clone()),
            );
            entries.insert(
                stored.spec.name.clone(),
                Entry {
                    spec: stored.spec,
                    stopped: stored.stopped,
                    live,
                    run: None,
                },
            );
        }
        let primary = entries.values().find_map(|e| e.spec.http_port);
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                logs,
                launcher,
                grace,
                up: AtomicBool::new(false),
                entries: tokio::sync::Mutex::new(entries),
                primary: watch::Sender::new(primary),
                view: Mutex::new(view),
            }),
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.inner.dir.join(format!("{name}.json"))
    }

    /// Writes a definition (with fsyncs) on the blocking pool, not on a
    /// runtime worker.
    async fn persist(&self, spec: &ServiceSpec, stopped: bool) -> Result<(), ServiceError> {
        let bytes = serde_json::to_vec_pretty(&Stored {
            spec: spec.clone(),
            stopped,
        })
        .expect("a definition serializes");
        on_disk(self.file(&spec.name), move |path| {
            nestbox_durable::write_atomic(path, &bytes, 0o600)
        })
        .await
    }

    fn status(&self, spec: &ServiceSpec, live: &Mutex<Live>) -> ServiceStatus {
        let l = live.lock();
        ServiceStatus {
            name: spec.name.clone(),
            spec: spec.clone(),
            state: l.state,
            pid: l.pid,
            restarts: l.restarts,
            last_exit: l.last_exit.clone(),
            logs_dropped: self.inner.logs.dropped(&spec.name),
        }
    }

    /// Every service.
    #[must_use]
    pub fn list(&self) -> Vec<ServiceStatus> {
        let view = self.inner.view.lock();
        view.values().map(|(s, l)| self.status(s, l)).collect()
    }

    /// One service.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<ServiceStatus> {
        let view = self.inner.view.lock();
        view.get(name).map(|(s, l)| self.status(s, l))
    }

    /// The primary service's port now and at every change (a service with
    /// an `http_port` created or deleted): the primary URL follows it.
    #[must_use]
    pub fn primary_changes(&self) -> watch::Receiver<Option<u16>> {
        self.inner.primary.subscribe()
    }

    /// Registers `spec` (kept on disk before this returns) and starts it if
    /// the container is up.
    ///
    /// # Errors
    /// [`ServiceError`]: invalid, name taken, or the disk failed.
    pub async fn create(&self, spec: ServiceSpec) -> Result<ServiceStatus, ServiceError> {
        spec.check()?;
        let mut entries = self.inner.entries.lock().await;
        if entries.contains_key(&spec.name) {
            return Err(ServiceError::Exists(spec.name));
        }
        if let Some(port) = spec.http_port
            && let Some(other) = entries.values().find(|e| e.spec.http_port.is_some())
        {
            return Err(ServiceError::Invalid {
                field: "http_port",
                why: format!(
                    "{port}: \"{}\" is already the primary URL (on {}); one service can be",
                    other.spec.name,
                    other.spec.http_port.unwrap_or_default()
                ),
            });
        }
        let mut specs: BTreeMap<String, ServiceSpec> = entries
            .iter()
            .map(|(n, e)| (n.clone(), e.spec.clone()))
            .collect();
        specs.insert(spec.name.clone(), spec.clone());
        start_order(&specs)?;
        self.persist(&spec, false).await?;
        let live = Arc::new(Mutex::new(Live {
            state: State::Stopped,
            pid: None,
            restarts: 0,
            last_exit: None,
        }));
        self.inner
            .view
            .lock()
            .insert(spec.name.clone(), (spec.clone(), live.clone()));
        let mut entry = Entry {
            spec: spec.clone(),
            stopped: false,
            live: live.clone(),
            run: None,
        };
        if self.inner.up.load(Ordering::SeqCst) {
            drop(self.launch(&mut entry));
        }
        entries.insert(spec.name.clone(), entry);
        if let Some(port) = spec.http_port {
            self.inner.primary.send_replace(Some(port));
        }
        Ok(self.status(&spec, &live))
    }

    /// Stops `name` and forgets it, with its logs.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or the disk failed.
    pub async fn delete(&self, name: &str) -> Result<(), ServiceError> {
        let mut entries = self.inner.entries.lock().await;
        if !entries.contains_key(name) {
            return Err(ServiceError::NotFound(name.to_owned()));
        }
        let by: Vec<&str> = entries
            .values()
            .filter(|e| e.spec.needs.iter().any(|n| n == name))
            .map(|e| e.spec.name.as_str())
            .collect();
        if !by.is_empty() {
            return Err(ServiceError::Needed {
                name: name.to_owned(),
                by: by.join(", "),
            });
        }
        let mut entry = entries.remove(name).expect("checked above");
        Self::halt(&mut entry).await;
        on_disk(self.file(name), nestbox_durable::remove).await?;
        self.inner.view.lock().remove(name);
        if entry.spec.http_port.is_some() {
            self.inner.primary.send_replace(None);
        }
        self.inner.logs.remove(name).await;
        Ok(())
    }

    /// Starts a stopped service (it stays wanted across restarts).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or the disk failed.
    pub async fn start(&self, name: &str) -> Result<(), ServiceError> {
        let mut entries = self.inner.entries.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ServiceError::NotFound(name.to_owned()))?;
        if entry.stopped {
            self.persist(&entry.spec, false).await?;
            entry.stopped = false;
        }
        if self.inner.up.load(Ordering::SeqCst) {
            // A one-shot that has run is run again on request.
            let exited = entry.live.lock().state == State::Exited;
            if exited {
                Self::halt(entry).await;
            }
            if entry.run.is_none() {
                drop(self.launch(entry));
            }
        }
        Ok(())
    }

    /// Stops a service; it stays stopped until started.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or the disk failed.
    pub async fn stop(&self, name: &str) -> Result<(), ServiceError> {
        let mut entries = self.inner.entries.lock().await;
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| ServiceError::NotFound(name.to_owned()))?;
        if !entry.stopped {
            self.persist(&entry.spec, true).await?;
            entry.stopped = true;
        }
        Self::halt(entry).await;
        Ok(())
    }

    /// The container is up: starts every service not stopped on request, in
    /// dependency order.
    pub async fn up(&self) {
        let mut entries = self.inner.entries.lock().await;
        self.inner.up.store(true, Ordering::SeqCst);
        let specs = entries
            .iter()
            .map(|(n, e)| (n.clone(), e.spec.clone()))
            .collect();
        let order = start_order(&specs).unwrap_or_else(|err| {
            tracing::error!(%err, "service dependencies are broken; starting in name order");
            specs.keys().cloned().collect()
        });
        for name in order {
            if let Some(entry) = entries.get_mut(&name)
                && !entry.stopped
                && entry.run.is_none()
            {
                // Each started (its exec done, or failed) before the next:
                // what `needs` promises.
                let _ = self.launch(entry).await;
            }
        }
    }

    /// The container is going down: stops every service, in reverse
    /// dependency order.
    pub async fn down(&self) {
        let mut entries = self.inner.entries.lock().await;
        self.inner.up.store(false, Ordering::SeqCst);
        let specs = entries
            .iter()
            .map(|(n, e)| (n.clone(), e.spec.clone()))
            .collect();
        let mut order = start_order(&specs).unwrap_or_else(|_| specs.keys().cloned().collect());
        order.reverse();
        for name in order {
            if let Some(entry) = entries.get_mut(&name) {
                Self::halt(entry).await;
            }
        }
    }

    async fn halt(entry: &mut Entry) {
        if let Some((stop, task)) = entry.run.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// Starts supervising `entry`; the receiver says when its first start
    /// has been tried.
    fn launch(&self, entry: &mut Entry) -> tokio::sync::oneshot::Receiver<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (tried_tx, tried_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(supervise(
            entry.spec.clone(),
            entry.live.clone(),
            self.inner.clone(),
            stop_rx,
            tried_tx,
        ));
        entry.run = Some((stop_tx, task));
        tried_rx
    }
}

fn set(live: &Mutex<Live>, state: State, pid: Option<u32>) {
    let mut l = live.lock();
    l.state = state;
    l.pid = pid;
}

/// Sends `signal` to the process group led by `pid`.
fn signal_group(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Captures one output stream of a service into its logs; a pipe that
/// cannot be registered is logged as such.
fn capture(
    logs: &Logs,
    name: &str,
    stream: Stream,
    pipe: std::io::Result<Option<tokio::net::unix::pipe::Receiver>>,
) -> Option<tokio::task::JoinHandle<()>> {
    match pipe {
        Ok(pipe) => pipe.map(|p| logs.capture(name, stream, p)),
        Err(err) => {
            logs.record(
                name,
                Stream::System,
                format!("cannot capture {stream:?}: {err}"),
            );
            None
        }
    }
}

/// Resolves once `stop` turns true; holds no borrow across the wait.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs one service until `stop`: start, capture, wait, restart with
/// backoff.
async fn supervise(
    spec: ServiceSpec,
    live: Arc<Mutex<Live>>,
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
    tried: tokio::sync::oneshot::Sender<()>,
) {
    let mut tried = Some(tried);
    let name = spec.name.clone();
    let logs = &inner.logs;
    let mut quick_exits = 0u32;
    loop {
        set(&live, State::Starting, None);
        let started = tokio::time::Instant::now();
        let spawned = inner.launcher.spawn(&spec).await;
        if let Some(tried) = tried.take() {
            let _ = tried.send(());
        }
        let succeeded = match spawned {
            Err(err) => {
                logs.record(&name, Stream::System, format!("cannot start: {err}"));
                live.lock().last_exit = Some(format!("not started: {err}"));
                false
            }
            Ok(mut child) => {
                let pid = child.id();
                logs.record(&name, Stream::System, format!("started, pid {pid}"));
                let out = capture(logs, &name, Stream::Stdout, child.take_stdout());
                let err = capture(logs, &name, Stream::Stderr, child.take_stderr());
                set(&live, State::Running, Some(pid));
                let status = tokio::select! {
                    status = child.wait() => status,
                    () = stopped(&mut stop) => {
                        signal_group(pid, nix::sys::signal::Signal::SIGTERM);
                        if let Ok(status) = tokio::time::timeout(inner.grace, child.wait()).await {
                            status
                        } else {
                            signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                            child.wait().await
                        }
                    }
                };
                // The output that was written before the exit is kept.
                for capture in [out, err].into_iter().flatten() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), capture).await;
                }
                let succeeded = matches!(&status, Ok(s) if s.success());
                let text = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                logs.record(&name, Stream::System, format!("exited: {text}"));
                live.lock().last_exit = Some(text);
                succeeded
            }
        };
        if *stop.borrow() {
            break;
        }
        if !spec.restart.again(succeeded) {
            let why = if succeeded {
                "it succeeded"
            } else {
                "it failed"
            };
            logs.record(
                &name,
                Stream::System,
                format!(
                    "not restarted: {why}, and its restart policy is {:?}",
                    spec.restart
                ),
            );
            set(&live, State::Exited, None);
            // Waits for a stop (delete, stop, bounce) without running again.
            stopped(&mut stop).await;
            return set(&live, State::Stopped, None);
        }
        if started.elapsed() >= STEADY {
            quick_exits = 0;
        }
        let wait = RESTART.wait(quick_exits);
        quick_exits = quick_exits.saturating_add(1);
        set(&live, State::Backoff, None);
        logs.record(&name, Stream::System, format!("restarting in {wait:?}"));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => break,
        }
        live.lock().restarts += 1;
    }
    set(&live, State::Stopped, None);
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests")]
mod tests {
    use super::*;
    use crate::logs::LogLimits;
    use crate::services::HostLauncher;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nestbox-svc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sh(name: &str, script: &str, needs: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::new(),
            dir: None,
            needs: needs.iter().map(|s| (*s).to_owned()).collect(),
            http_port: None,
            restart: crate::services::Restart::Always,
        }
    }

    fn manager(dir: &Path, grace: Duration) -> Manager {
        let logs = Logs::open(&dir.join("logs"), LogLimits::default()).unwrap();
        Manager::open_with(dir, logs, Arc::new(HostLauncher), grace).unwrap()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn starts_in_dependency_order_and_persists() {
        let dir = temp("order");
        let order = dir.join("order");
        let m = manager(&dir, GRACE);
        let append = |n: &str| format!("echo {n} >> {}; exec sleep 60", order.display());
        m.create(sh("web", &append("web"), &["cache", "db"]))
            .await
            .unwrap_err();
        m.create(sh("db", &append("db"), &[])).await.unwrap();
        m.create(sh("cache", &append("cache"), &["db"]))
            .await
            .unwrap();
        m.create(sh("web", &append("web"), &["cache", "db"]))
            .await
            .unwrap();
        assert_eq!(
            m.create(sh("db", "true", &[])).await.unwrap_err().code(),
            "exists"
        );
        assert_eq!(m.delete("db").await.unwrap_err().code(), "needed");
        let mut primary = sh("p1", "true", &[]);
        primary.http_port = Some(8080);
        m.create(primary.clone()).await.unwrap();
        primary.name = "p2".into();
        let err = m.create(primary).await.unwrap_err().to_string();
        assert!(err.contains("`http_port`") && err.contains("p1"), "{err}");
        m.delete("p1").await.unwrap();
        m.stop("cache").await.unwrap();
        m.up().await;
        until("two started", || {
            std::fs::read_to_string(&order)
                .unwrap_or_default()
                .lines()
                .count()
                == 2
        })
        .await;
        let text = std::fs::read_to_string(&order).unwrap();
        assert_eq!(text, "db\nweb\n");
        m.down().await;
        assert!(m.list().iter().all(|s| s.state == State::Stopped));
        // Reopened: definitions and the stop intent are kept.
        let again = manager(&dir, GRACE);
        assert_eq!(again.list().len(), 3);
        again.up().await;
        until("db and web again", || {
            again
                .list()
                .iter()
                .filter(|s| s.state == State::Running)
                .count()
                == 2
        })
        .await;
        assert_eq!(again.get("cache").unwrap().state, State::Stopped);
        again.down().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_crash_restarts_with_logs_from_both_runs() {
        let dir = temp("crash");
        let m = manager(&dir, GRACE);
        m.up().await;
        m.create(sh("flaky", "echo run; echo oops >&2; exit 3", &[]))
            .await
            .unwrap();
        until("two restarts", || m.get("flaky").unwrap().restarts >= 2).await;
        m.stop("flaky").await.unwrap();
        let lines = m.inner.logs.query("flaky", None, None).unwrap();
        let out = lines.iter().filter(|l| l.line == "run").count();
        assert!(out >= 2, "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.stream == Stream::Stderr && l.line == "oops")
        );
        assert!(lines.iter().any(|l| l.line.contains("exit status: 3")));
        let restarts = m.get("flaky").unwrap().restarts;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            m.get("flaky").unwrap().restarts,
            restarts,
            "stopped means stopped"
        );
        m.delete("flaky").await.unwrap();
        assert!(m.get("flaky").is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn restart_policies_decide_what_runs_again() {
        use crate::services::Restart;
        let dir = temp("policy");
        let count = |n: &str| {
            std::fs::read_to_string(dir.join(n))
                .unwrap_or_default()
                .lines()
                .count()
        };
        let m = manager(&dir, GRACE);
        m.up().await;
        let runs =
            |n: &str, code: u8| format!("echo run >> {}; exit {code}", dir.join(n).display());
        let mut once = sh("once", &runs("once", 0), &[]);
        once.restart = Restart::Never;
        let mut done = sh("done", &runs("done", 0), &[]);
        done.restart = Restart::OnFailure;
        let mut retry = sh("retry", &runs("retry", 1), &[]);
        retry.restart = Restart::OnFailure;
        let mut failed_once = sh("failed-once", &runs("failed-once", 2), &[]);
        failed_once.restart = Restart::Never;
        for s in [once, done, retry, failed_once] {
            m.create(s).await.unwrap();
        }
        until("the failing one restarts", || count("retry") >= 2).await;
        for name in ["once", "done", "failed-once"] {
            until("exited", || m.get(name).unwrap().state == State::Exited).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            (count("once"), count("done"), count("failed-once")),
            (1, 1, 1),
            "ran once each"
        );
        assert_eq!(m.get("once").unwrap().restarts, 0);
        let lines = m.inner.logs.query("once", None, None).unwrap();
        assert!(
            lines.iter().any(|l| l.line.contains("not restarted")),
            "{lines:?}"
        );
        // Started on request, a one-shot runs again.
        m.start("once").await.unwrap();
        until("ran twice", || count("once") == 2).await;
        until("exited again", || {
            m.get("once").unwrap().state == State::Exited
        })
        .await;
        // A bounce runs it again too; down stops everything.
        m.down().await;
        assert!(m.list().iter().all(|s| s.state == State::Stopped));
        m.up().await;
        until("ran a third time", || count("once") == 3).await;
        m.down().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn stop_kills_what_ignores_sigterm() {
        let dir = temp("kill");
        let m = manager(&dir, Duration::from_millis(200));
        m.up().await;
        m.create(sh(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
            &[],
        ))
        .await
        .unwrap();
        until("running", || {
            m.get("stubborn").unwrap().state == State::Running
        })
        .await;
        let pid = m.get("stubborn").unwrap().pid.unwrap();
        until("ready", || {
            m.inner
                .logs
                .tail("stubborn")
                .iter()
                .any(|l| l.line == "ready")
        })
        .await;
        m.stop("stubborn").await.unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                // A zombie until reaped elsewhere is fine; it must not run.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z")
            }
        );
        assert!(
            m.get("stubborn")
                .unwrap()
                .last_exit
                .unwrap()
                .contains("signal: 9")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
