//! One exec session: its process, its input, its output buffer, who is
//! attached and how it ended.
#![deny(clippy::disallowed_methods)]

use std::num::NonZeroU16;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nestbox_api::exec::{ExecParams, ExitStatus, KillEvent, SessionInfo, StreamId, signal_name};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::output::{Held, Output, READ_MAX, Spill};
use super::pty::{self, Master};
use super::{ExecError, ExecSettings};
use crate::container::Container;
use crate::spawn::{Process, Spawn, Stdio};

/// A terminal's size when the client gives none.
const DEFAULT_SIZE: (u16, u16) = (24, 80);
/// How long the output may go on after the process exited (a child that
/// kept its stdout) before the exit is announced anyway.
const DRAIN: Duration = Duration::from_secs(2);

/// Where input goes.
enum Input {
    /// Nowhere (no stdin, or after EOF).
    Closed,
    /// A pipe to its stdin.
    Pipe(tokio::net::unix::pipe::Sender),
    /// The terminal.
    Terminal(Arc<Master>),
}

/// Who is attached.
struct Clients {
    attached: u32,
    owner: Option<u64>,
    size: (u16, u16),
    last_activity: SystemTime,
    /// What the terminal shows (a TTY's), for an attach without an offset.
    screen: Option<vt100::Parser>,
    /// Kills the process when nobody comes back in time.
    linger: Option<tokio::task::JoinHandle<()>>,
}

/// A session.
pub struct Session {
    id: u64,
    command: String,
    workdir: String,
    tty: bool,
    created: SystemTime,
    pid: u32,
    /// Its cgroup (`cgroup.kill` ends everything it started).
    cgroup: PathBuf,
    linger: Option<Duration>,
    process: Mutex<Process>,
    input: tokio::sync::Mutex<Input>,
    master: Option<Arc<Master>>,
    output: Mutex<Output>,
    /// Serializes writers of the output (ring file, then memory).
    writing: tokio::sync::Mutex<()>,
    spill_path: Option<PathBuf>,
    /// The output's end, for attached clients to wait on.
    progress: watch::Sender<u64>,
    exit: watch::Sender<Option<ExitStatus>>,
    clients: Mutex<Clients>,
    next_conn: AtomicU64,
}

/// What [`Session::read`] gives.
#[derive(Debug)]
pub enum Chunk {
    /// Bytes of a stream.
    Data(StreamId, Vec<u8>),
    /// Bytes up to this offset are lost; go on from it.
    Gap(u64),
    /// Nothing more yet.
    End,
}

/// A client's attachment; dropping it detaches.
pub struct Attached {
    session: Arc<Session>,
    conn: u64,
    /// The `session_info` for this connection.
    pub info: SessionInfo,
    /// When the offset asked for is gone: `(asked, first held)`.
    pub gap: Option<(u64, u64)>,
    /// The screen to send first (a TTY attach without an offset).
    pub screen: Option<Vec<u8>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.session.detach(self.conn);
    }
}

impl Attached {
    /// Whether this connection owns the session now.
    #[must_use]
    pub fn is_owner(&self) -> bool {
        self.session.clients.lock().owner == Some(self.conn)
    }

    /// Resizes the terminal, if this connection owns the session.
    pub fn resize(&self, rows: u16, cols: u16) {
        let mut c = self.session.clients.lock();
        if c.owner != Some(self.conn) {
            return;
        }
        let rows = if rows == 0 { c.size.0 } else { rows };
        let cols = if cols == 0 { c.size.1 } else { cols };
        c.size = (rows, cols);
        if let (Some(screen), Some(r), Some(k)) =
            (&mut c.screen, NonZeroU16::new(rows), NonZeroU16::new(cols))
        {
            screen.set_size(r, k);
        }
        if let Some(master) = &self.session.master
            && let Err(err) = master.set_size(rows, cols)
        {
            tracing::debug!(%err, "resizing a session's terminal");
        }
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn oom_kills(inner_cgroup: &Path) -> u64 {
    let path = inner_cgroup.join("memory.events");
    tokio::task::spawn_blocking(move || crate::resources::read_key(&path, "oom_kill"))
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// `cgroup.kill` of `cgroup` (blocking on the pool).
async fn kill_cgroup(cgroup: &Path) {
    let kill = cgroup.join("cgroup.kill");
    #[allow(
        clippy::disallowed_methods,
        reason = "a one-line cgroup write, on the blocking pool"
    )]
    let done = tokio::task::spawn_blocking(move || std::fs::write(&kill, "1")).await;
    if let Ok(Err(err)) = done {
        tracing::debug!(%err, "cgroup.kill of a session");
    }
}

/// The command a session runs: its argv (the shell when none), its
/// environment (the client's replaces the defaults), its directory.
fn command(params: &ExecParams) -> Result<(Spawn, String), ExecError> {
    let argv: Vec<String> = if params.cmd.is_empty() {
        vec!["/bin/sh".to_owned()]
    } else {
        params.cmd.clone()
    };
    let program = params.path.clone().unwrap_or_else(|| argv[0].clone());
    let mut cmd = Spawn::new(&program);
    cmd.args(&argv[1..]);
    if params.env.is_empty() {
        cmd.env("PATH", crate::spawn::DEFAULT_PATH)
            .env("HOME", "/root");
        if params.tty {
            cmd.env("TERM", "xterm-256color");
        }
    } else {
        cmd.env("PATH", crate::spawn::DEFAULT_PATH);
        for kv in &params.env {
            let (k, v) = kv.split_once('=').expect("checked by the query's parser");
            if k.is_empty() {
                return Err(ExecError::Invalid(format!("`env`: {kv:?} has no name")));
            }
            cmd.env(k, v);
        }
    }
    cmd.current_dir(params.dir.as_deref().unwrap_or("/"));
    Ok((cmd, argv.join(" ")))
}

impl Session {
    pub(super) async fn start(
        id: u64,
        params: &ExecParams,
        linger: Option<Duration>,
        container: &Container,
        settings: &ExecSettings,
        dir: &Path,
        inner_cgroup: &Path,
    ) -> Result<Arc<Self>, ExecError> {
        let (mut cmd, command) = command(params)?;
        let workdir = params.dir.clone().unwrap_or_else(|| "/".to_owned());
        let size = (
            params.rows.filter(|r| *r > 0).unwrap_or(DEFAULT_SIZE.0),
            params.cols.filter(|c| *c > 0).unwrap_or(DEFAULT_SIZE.1),
        );
        let master = if params.tty {
            let (master, slave) = container
                .run_inside(pty::open)
                .await
                .and_then(|r| r)
                .map_err(ExecError::Spawn)?;
            pty::set_size(&master, size.0, size.1).map_err(ExecError::Spawn)?;
            cmd.terminal(slave);
            Some(Arc::new(Master::new(master).map_err(ExecError::Spawn)?))
        } else {
            cmd.stdin(if params.wants_stdin() {
                Stdio::Piped
            } else {
                Stdio::Null
            })
            .stdout(Stdio::Piped)
            .stderr(Stdio::Piped)
            .process_group();
            None
        };
        let group = format!("exec-{id}");
        let cgroup = container
            .group_path(&group)
            .await
            .map_err(ExecError::Spawn)?;
        let ooms_before = oom_kills(inner_cgroup).await;
        let (spill, spill_path) = ring_file(settings, dir, id).await;
        let mut process = container
            .spawn(cmd, &group)
            .await
            .map_err(ExecError::Spawn)?;
        let stdin = process.take_stdin().map_err(ExecError::Spawn)?;
        let stdout = process.take_stdout().map_err(ExecError::Spawn)?;
        let stderr = process.take_stderr().map_err(ExecError::Spawn)?;
        let pidfd = process.pidfd_clone().map_err(ExecError::Spawn)?;
        let input = match (&master, stdin) {
            (Some(m), _) if params.wants_stdin() => Input::Terminal(m.clone()),
            (None, Some(pipe)) => Input::Pipe(pipe),
            _ => Input::Closed,
        };
        let now = SystemTime::now();
        let session = Arc::new(Self {
            id,
            command,
            workdir,
            tty: params.tty,
            created: now,
            pid: process.id(),
            cgroup,
            linger,
            process: Mutex::new(process),
            input: tokio::sync::Mutex::new(input),
            master: master.clone(),
            output: Mutex::new(Output::new(settings.memory_kib << 10, spill)),
            writing: tokio::sync::Mutex::new(()),
            spill_path,
            progress: watch::Sender::new(0),
            exit: watch::Sender::new(None),
            clients: Mutex::new(Clients {
                attached: 0,
                owner: None,
                size,
                last_activity: now,
                screen: params.tty.then(|| {
                    let nz = |n: u16, d: u16| {
                        NonZeroU16::new(n).unwrap_or(NonZeroU16::MIN.saturating_add(d - 1))
                    };
                    vt100::Parser::new(nz(size.0, 24), nz(size.1, 80), 0)
                }),
                linger: None,
            }),
            next_conn: AtomicU64::new(1),
        });
        tracing::info!(id, pid = session.pid, command = %session.command, tty = params.tty, "exec session started");
        let pumps = session.pumps(master, [stdout, stderr]);
        let s = session.clone();
        let inner_cgroup = inner_cgroup.to_owned();
        tokio::spawn(async move {
            s.wait_exit(pidfd, pumps, ooms_before, &inner_cgroup).await;
        });
        // Nobody is attached yet: the linger clock runs from the start
        // (an attach stops it).
        session.arm_linger();
        Ok(session)
    }

    /// The tasks that move its output into the buffer: the terminal's, or
    /// its stdout's and stderr's.
    fn pumps(
        self: &Arc<Self>,
        master: Option<Arc<Master>>,
        pipes: [Option<tokio::net::unix::pipe::Receiver>; 2],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut pumps = Vec::new();
        if let Some(master) = master {
            let s = self.clone();
            pumps.push(tokio::spawn(async move {
                let mut buf = vec![0; READ_MAX];
                loop {
                    match master.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => s.publish(StreamId::Stdout, &buf[..n]).await,
                    }
                }
            }));
        }
        for (stream, pipe) in [StreamId::Stdout, StreamId::Stderr].into_iter().zip(pipes) {
            let Some(mut pipe) = pipe else { continue };
            let s = self.clone();
            pumps.push(tokio::spawn(async move {
                let mut buf = vec![0; READ_MAX];
                loop {
                    match pipe.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => s.publish(stream, &buf[..n]).await,
                    }
                }
            }));
        }
        pumps
    }

    /// Waits for the process, then for its output, and publishes the exit.
    async fn wait_exit(
        self: &Arc<Self>,
        pidfd: OwnedFd,
        pumps: Vec<tokio::task::JoinHandle<()>>,
        ooms_before: u64,
        inner_cgroup: &Path,
    ) {
        // SAFETY: the AsyncFd owns the pidfd (a clone), which stays open
        // and the same file until it is dropped.
        let watched = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        };
        // Woken by the pidfd; polled if it cannot be watched.
        let mut watched = watched.ok();
        let status = loop {
            if let Ok(Some(status)) = self.process.lock().try_wait() {
                break status;
            }
            let woken = match &watched {
                Some(fd) => fd
                    .readable()
                    .await
                    .map(|mut ready| ready.clear_ready())
                    .is_ok(),
                None => false,
            };
            if !woken {
                watched = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let drained = futures_util::future::join_all(pumps);
        let _ = tokio::time::timeout(DRAIN, drained).await;
        let oom = oom_kills(inner_cgroup).await > ooms_before;
        let exit = match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus {
                exit_code: code,
                ..ExitStatus::default()
            },
            (None, Some(sig)) => ExitStatus {
                exit_code: 128 + sig,
                signal: Some(signal_name(sig)),
                oom_killed: oom && sig == libc::SIGKILL,
                core_dumped: status.core_dumped(),
            },
            (None, None) => ExitStatus {
                exit_code: 255,
                ..ExitStatus::default()
            },
        };
        tracing::info!(id = self.id, ?exit, "exec session ended");
        *self.input.lock().await = Input::Closed;
        self.exit.send_replace(Some(exit));
        if let Some(linger) = self.clients.lock().linger.take() {
            linger.abort();
        }
        // What it left behind (a daemon it started) ends with it.
        kill_cgroup(&self.cgroup).await;
        let cgroup = self.cgroup.clone();
        #[allow(clippy::disallowed_methods, reason = "an rmdir, on the blocking pool")]
        let _ = tokio::task::spawn_blocking(move || {
            for _ in 0..50 {
                match std::fs::remove_dir(&cgroup) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => return,
                }
            }
        })
        .await;
    }

    /// Appends output: to the ring file first, then to memory, then wakes
    /// the attached clients.
    async fn publish(&self, stream: StreamId, data: &[u8]) {
        let _writing = self.writing.lock().await;
        let (spill, at) = {
            let out = self.output.lock();
            (out.spill(), out.end())
        };
        if let Some(spill) = spill {
            let bytes = data.to_vec();
            let written = tokio::task::spawn_blocking(move || spill.write(at, &bytes)).await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::warn!(
                    id = self.id,
                    "a session's ring file could not be written: its replay holds what memory does"
                );
            }
        }
        let end = {
            let mut out = self.output.lock();
            out.push(stream, data);
            out.end()
        };
        {
            let mut c = self.clients.lock();
            c.last_activity = SystemTime::now();
            if let Some(screen) = &mut c.screen {
                screen.process(data);
            }
        }
        self.progress.send_replace(end);
    }

    /// The output from `offset`.
    pub async fn read(&self, offset: u64) -> Chunk {
        let held = self.output.lock().read(offset);
        match held {
            Held::Memory(stream, data) => Chunk::Data(stream, data),
            Held::End => Chunk::End,
            Held::Gap(to) => Chunk::Gap(to),
            Held::Disk {
                stream,
                offset,
                len,
            } => {
                let Some(spill) = self.output.lock().spill() else {
                    return Chunk::Gap(self.output.lock().start());
                };
                let data = tokio::task::spawn_blocking(move || spill.read(offset, len)).await;
                let out = self.output.lock();
                match data {
                    Ok(Ok(data)) if out.still_held(offset) => Chunk::Data(stream, data),
                    _ => Chunk::Gap(out.start()),
                }
            }
        }
    }

    /// Attaches a client that wants the output from `offset` (`None`: a
    /// TTY's current screen, or everything held).
    pub fn attach(self: &Arc<Self>, offset: Option<u64>) -> Attached {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (start, end) = {
            let out = self.output.lock();
            (out.start(), out.end())
        };
        let mut c = self.clients.lock();
        c.attached += 1;
        if let Some(linger) = c.linger.take() {
            linger.abort();
        }
        if c.owner.is_none() {
            c.owner = Some(conn);
        }
        let screen = match (offset, &c.screen) {
            (None, Some(parser)) => Some(parser.screen().state_formatted().into_bytes()),
            _ => None,
        };
        let (from, gap) = match offset {
            _ if screen.is_some() => (end, None),
            None => (start, None),
            Some(o) if o < start => (start, Some((o, start))),
            Some(o) => (o.min(end), None),
        };
        let (rows, cols) = if self.tty { c.size } else { (0, 0) };
        let info = SessionInfo {
            session_id: self.id.to_string(),
            command: self.command.clone(),
            created: unix_seconds(self.created),
            cols,
            rows,
            is_owner: c.owner == Some(conn),
            tty: self.tty,
            offset: gap.map_or(from, |(_, to)| to),
            screen: screen.is_some(),
        };
        drop(c);
        Attached {
            session: self.clone(),
            conn,
            info,
            gap,
            screen,
        }
    }

    fn detach(self: &Arc<Self>, conn: u64) {
        let mut c = self.clients.lock();
        c.attached = c.attached.saturating_sub(1);
        if c.owner == Some(conn) {
            c.owner = None;
        }
        let idle = c.attached == 0;
        drop(c);
        if idle {
            self.arm_linger();
        }
    }

    /// With nobody attached: kill everything in the session's cgroup once
    /// `max_run_after_disconnect` has passed (unless someone attaches).
    fn arm_linger(self: &Arc<Self>) {
        let Some(after) = self.linger else { return };
        if self.exit.borrow().is_some() {
            return;
        }
        let me = Arc::downgrade(self);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(s) = me.upgrade() {
                tracing::info!(
                    id = s.id,
                    "exec session: nobody came back within max_run_after_disconnect; killing it"
                );
                kill_cgroup(&s.cgroup).await;
            }
        });
        if let Some(old) = self.clients.lock().linger.replace(timer) {
            old.abort();
        }
    }

    /// Forwards input (ignored once stdin is closed).
    pub async fn input(&self, data: &[u8]) {
        let mut input = self.input.lock().await;
        let failed = match &mut *input {
            Input::Closed => false,
            Input::Pipe(pipe) => pipe.write_all(data).await.is_err(),
            Input::Terminal(master) => master.write_all(data).await.is_err(),
        };
        if failed {
            *input = Input::Closed;
        }
        drop(input);
        self.clients.lock().last_activity = SystemTime::now();
    }

    /// Closes stdin (a pipe's; a terminal's EOF is its `^D`).
    pub async fn close_stdin(&self) {
        let mut input = self.input.lock().await;
        if matches!(*input, Input::Pipe(_)) {
            *input = Input::Closed;
        }
    }

    /// Sends `signal` to the session's process group.
    ///
    /// # Errors
    /// The error of `kill`.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        self.process.lock().signal_group(signal)
    }

    /// `signal`, then `SIGKILL` for everything in its cgroup after
    /// `grace`; each step goes to `events`, the last with the exit status.
    pub async fn kill(&self, signal: i32, grace: Duration, events: mpsc::Sender<KillEvent>) {
        let mut exit = self.exit.subscribe();
        let running = exit.borrow().is_none();
        if running {
            let name = signal_name(signal);
            let message = match self.signal(signal) {
                Ok(()) => format!("sent SIG{name} to process group {}", self.pid),
                Err(e) => format!("SIG{name} to process group {}: {e}", self.pid),
            };
            let _ = events
                .send(KillEvent::Signal {
                    message,
                    signal: name,
                    pid: self.pid,
                })
                .await;
            let ended = tokio::time::timeout(grace, async {
                let _ = exit.wait_for(Option::is_some).await;
            })
            .await;
            if ended.is_ok() {
                let _ = events
                    .send(KillEvent::Exited {
                        message: "it exited".into(),
                    })
                    .await;
            } else {
                let _ = events
                    .send(KillEvent::Timeout {
                        message: format!("still running after {} ms", grace.as_millis()),
                    })
                    .await;
                kill_cgroup(&self.cgroup).await;
                let _ = events
                    .send(KillEvent::Killed {
                        message: "killed everything in its cgroup".into(),
                    })
                    .await;
            }
        }
        let status = match exit.wait_for(Option::is_some).await {
            Ok(e) => e.clone().unwrap_or_default(),
            Err(_) => nestbox_api::exec::ExitStatus::default(),
        };
        let _ = events
            .send(KillEvent::Complete {
                exit_code: status.exit_code,
                exit: status,
            })
            .await;
    }

    /// The output's end, to wait on.
    #[must_use]
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Its exit status, once it has ended.
    #[must_use]
    pub fn exit_status(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.exit.subscribe()
    }

    /// Whether it takes input.
    pub async fn takes_input(&self) -> bool {
        !matches!(*self.input.lock().await, Input::Closed)
    }

    /// Whether its process still runs.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.exit.borrow().is_none()
    }

    /// Whether it has a TTY.
    #[must_use]
    pub fn tty(&self) -> bool {
        self.tty
    }

    /// Waits until it has ended.
    pub(super) async fn exited(&self) {
        let mut exit = self.exit.subscribe();
        let _ = exit.wait_for(Option::is_some).await;
    }

    /// Removes its ring file (it is forgotten).
    pub(super) async fn forget(&self) {
        if let Some(path) = self.spill_path.clone() {
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// As `GET /v1/exec` lists it.
    #[must_use]
    pub fn describe(&self) -> nestbox_api::exec::Session {
        let c = self.clients.lock();
        let exit = self.exit.borrow().clone();
        nestbox_api::exec::Session {
            id: self.id.to_string(),
            command: self.command.clone(),
            workdir: self.workdir.clone(),
            created: rfc3339(self.created),
            tty: self.tty,
            is_active: c.attached > 0,
            last_activity: rfc3339(c.last_activity),
            attached: c.attached,
            pid: exit.is_none().then_some(self.pid),
            output_bytes: self.output.lock().end(),
            exit,
        }
    }
}

/// The session's ring file on the data disk (none when memory holds the
/// whole buffer, or the file cannot be made: then memory is all).
async fn ring_file(
    settings: &ExecSettings,
    dir: &Path,
    id: u64,
) -> (Option<Arc<Spill>>, Option<PathBuf>) {
    let cap = settings.buffer_mib << 20;
    if cap <= (settings.memory_kib as u64) << 10 {
        return (None, None);
    }
    let path = dir.join(format!("{id}.out"));
    let opened = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .await;
    match opened {
        Ok(file) => (Some(Spill::new(file.into_std().await, cap)), Some(path)),
        Err(err) => {
            tracing::warn!(%err, path = %path.display(), "a session's ring file: its replay holds what memory does");
            (None, None)
        }
    }
}
