//! The inner container: where the user's code runs, beside the platform.
//!
//! Namespaces: its own user, pid, mount, network, UTS, IPC and cgroup
//! namespaces. The user namespace maps the container's ids 0–65535 to an
//! unprivileged range of the VM ([`idmap`]); the other namespaces are
//! owned by the VM's root, so root in the container holds no capability
//! over them (no mounts, no routes, no sysctls).
//! Root filesystem: an overlay of the read-only base and a writable layer on
//! the user's disk, entered with `pivot_root`, with a fresh `/proc` (its
//! knobs read-only, its secrets masked), a minimal `/dev`, a sized
//! `/dev/shm` and the API socket's directory at `/.nestbox` (see [`init`]).
//!
//! How it is built: the guest re-executes itself as `nestbox-guest
//! container-init`, started by `clone3` straight into its cgroup
//! (see [`crate::spawn`]) and unsharing the namespaces before exec; that
//! program forks PID 1 of the new pid namespace, which builds the root and
//! reaps orphans. Re-executing (rather than forking the guest) gives a
//! single-threaded process in which any code may run after `fork`.
//!
//! How programs are started inside: a dedicated OS thread per container
//! unshares its filesystem attributes and `setns`es into PID 1's cgroup,
//! IPC, UTS, network, pid and mount namespaces; every child it forks starts
//! in all of them, with the container's root as `/`, and is born in the
//! container's cgroup (`CLONE_INTO_CGROUP`, through a descriptor opened before
//! entering), so that its first socket already belongs to the cgroup the
//! port watcher watches. The children are the guest's own: the service
//! manager waits for them through their pidfds. Each child confines itself
//! before it execs (see [`crate::spawn::Confinement`]): it enters the
//! container's user namespace (a thread of the multi-threaded guest cannot),
//! takes explicit capability sets ([`caps`]) and installs the seccomp
//! filters ([`seccomp`]).
//!
//! Cgroups: each build of the container gets a fresh cgroup below the inner
//! one (see [`fresh_leaf`] for why), and in it a cgroup per group of its
//! processes — `init` for its PID 1, `svc-NAME` for each service — which
//! share the container's CPU by equal weight, so a service that spins or
//! forks without end takes its own share, not its neighbours'. The port
//! watcher watches the inner cgroup's whole subtree.
//!
//! Stopping: `cgroup.kill` on the build's cgroup kills every process in it
//! at once (PID 1 included); the mount namespace and its overlay go with
//! the last of them; then the cgroup is removed. The writable layer stays on
//! the data disk.

pub mod caps;
pub mod egress;
pub mod idmap;
pub mod init;
pub mod seccomp;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

use crate::spawn::{Confinement, Process, Spawn, Stdio};

/// Errors building, entering or stopping the container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// A directory could not be made.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The container's init could not be started.
    #[error("cannot start the container's init ({program}): {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The container's init failed while building the container.
    #[error("the container could not be built: {0}")]
    Init(String),
    /// Entering the container's namespaces failed.
    #[error("cannot enter the container's {namespace} namespace: {source}")]
    Enter {
        /// Which namespace.
        namespace: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Processes were still in the cgroup after the kill.
    #[error("processes are still in {cgroup} {secs} s after cgroup.kill")]
    Lingering {
        /// The cgroup.
        cgroup: PathBuf,
        /// How long we waited.
        secs: u64,
    },
    /// A cgroup file could not be used.
    #[error("cannot use {path}: {source}")]
    Cgroup {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The base or the writable layer cannot be used in the user namespace.
    #[error(transparent)]
    Idmap(#[from] idmap::IdmapError),
    /// The user namespace's ids could not be mapped.
    #[error("cannot map the ids of the container's user namespace ({path}): {source}")]
    Userns {
        /// The map file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// The container's hostname (the VM's name).
    pub hostname: String,
    /// The read-only base root filesystem.
    pub base_rootfs: PathBuf,
    /// Where the writable layer (`layer/upper`, `layer/work`, see
    /// [`crate::storage::layer`]) and the mount point (`rootfs`) live, on
    /// the user's disk.
    pub state_dir: PathBuf,
    /// The inner cgroup v2 directory (created if missing).
    pub cgroup: PathBuf,
    /// A directory to bind-mount at `/.nestbox` (the API socket's).
    pub api_dir: Option<PathBuf>,
    /// The size of the container's `/dev/shm`, in bytes.
    pub shm_bytes: u64,
    /// The shared mount of the recent checkpoints' views, shown at
    /// `/.nestbox/checkpoints` (see [`crate::storage::views`]).
    pub checkpoints: Option<PathBuf>,
    /// How its processes are confined.
    pub isolation: Isolation,
}

/// `[container]` of the guest configuration.
#[derive(Clone, Debug, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The size of the container's `/dev/shm` in MiB (a tmpfs; its pages
    /// count against the container's memory).
    pub shm_mib: u64,
    /// Sets `no_new_privs` on every process of the container: setuid
    /// programs (`sudo`, `su`) then gain nothing. Off by default because
    /// it breaks `sudo` in the container; the user namespace already keeps
    /// root in the container unprivileged in the VM.
    pub no_new_privs: bool,
    /// The default seccomp filter. Off only to measure what it costs: it
    /// opens the kernel's whole system call surface to the container.
    pub seccomp: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            shm_mib: 64,
            no_new_privs: false,
            seccomp: true,
        }
    }
}

/// How the container's processes are confined beyond its namespaces: the
/// same for every process, built once.
#[derive(Clone, Debug)]
pub struct Isolation {
    /// Their capability sets.
    pub caps: Arc<caps::CapSets>,
    /// The seccomp filters (empty: none, which only a benchmark of the
    /// filter's cost asks for).
    pub seccomp: Arc<Vec<seccompiler::BpfProgram>>,
    /// Whether `no_new_privs` is set (then setuid programs such as `sudo`
    /// gain nothing in the container).
    pub no_new_privs: bool,
}

impl Isolation {
    /// The kept capabilities and, as `settings` say, the default filter
    /// and `no_new_privs`.
    ///
    /// # Errors
    /// If the filter does not compile (a bug).
    pub fn new(settings: &Settings) -> Result<Self, seccomp::SeccompError> {
        if !settings.seccomp {
            tracing::warn!(
                "the inner container runs WITHOUT its seccomp filter ([container] seccomp = false)"
            );
        }
        Ok(Self {
            caps: Arc::new(caps::CapSets::container()),
            seccomp: Arc::new(if settings.seccomp {
                seccomp::default_filters()?
            } else {
                Vec::new()
            }),
            no_new_privs: settings.no_new_privs,
        })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A running inner container.
#[derive(Debug)]
pub struct Container {
    spec: ContainerSpec,
    init: Process,
    /// This build's cgroup, below the inner cgroup (see [`fresh_leaf`]).
    leaf: PathBuf,
    pid1: u32,
    /// The user namespace its processes enter.
    userns: Arc<OwnedFd>,
    jobs: Option<mpsc::Sender<Job>>,
}

/// What the container's init says as it starts: two lines, in either
/// order — the parent's `pid N` as it forks, and PID 1's `ready` (or
/// `error: …`) once the root is built (PID 1 may be quicker than its
/// parent). Returns PID 1's pid.
fn read_start(out: &mut impl BufRead) -> Result<u32, ContainerError> {
    let first = read_line(out)?;
    if let Some(why) = first.strip_prefix("error: ") {
        // The fork failed, or PID 1 did before its parent spoke.
        return Err(ContainerError::Init(why.to_owned()));
    }
    let lines = [first, read_line(out)?];
    let pid1 = lines
        .iter()
        .find_map(|l| l.strip_prefix("pid ").and_then(|p| p.parse::<u32>().ok()));
    let outcome = lines
        .iter()
        .find(|l| !l.starts_with("pid "))
        .map_or("", String::as_str);
    match (pid1, outcome) {
        (Some(pid1), "ready") => Ok(pid1),
        _ => Err(ContainerError::Init(
            outcome
                .strip_prefix("error: ")
                .unwrap_or(&lines.join("; "))
                .to_owned(),
        )),
    }
}

fn read_line(out: &mut impl BufRead) -> Result<String, ContainerError> {
    let mut line = String::new();
    out.read_line(&mut line)
        .map_err(|e| ContainerError::Init(format!("reading from the container's init: {e}")))?;
    if line.is_empty() {
        return Err(ContainerError::Init(
            "the container's init exited before it was ready".into(),
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// A [`ContainerError::Cgroup`] about `path`.
fn cgroup_error(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + use<> {
    let path = path.to_owned();
    move |source| ContainerError::Cgroup { path, source }
}

/// A [`ContainerError::Dir`] about `path`.
fn dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError + use<> {
    let path = path.to_owned();
    move |source| ContainerError::Dir { path, source }
}

/// The cgroup directory, opened for `CLONE_INTO_CGROUP`.
fn cgroup_dir(cgroup: &Path) -> Result<File, ContainerError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(cgroup)
        .map_err(cgroup_error(cgroup))
}

/// The container network namespace's own settings: root in the container
/// holds no capability in a namespace the VM's root owns, so ports below
/// 1024 are opened to every user of this namespace (as Docker does) and so
/// are ICMP echo sockets (`ping` without raw sockets). Both are knobs of
/// this network namespace only.
const NETNS_SYSCTLS: [(&str, &str); 2] = [
    ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
    ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
];

/// The cgroup of the container's PID 1, in each build's.
const INIT_GROUP: &str = "init";

/// The cgroup `group` of the build `leaf` (made if new), opened for
/// `CLONE_INTO_CGROUP`.
fn group_dir(leaf: &Path, group: &str) -> Result<File, ContainerError> {
    let dir = leaf.join(group);
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(dir_error(&dir)(e)),
        _ => {}
    }
    cgroup_dir(&dir)
}

/// Lets the groups of a build share its CPU by weight (`+cpu` in its
/// `cgroup.subtree_control`), where the controller reaches it (not on a
/// host whose cgroup v2 lacks it).
fn delegate_cpu(leaf: &Path) {
    let available = std::fs::read_to_string(leaf.join("cgroup.controllers")).unwrap_or_default();
    if available.split_whitespace().any(|c| c == "cpu")
        && let Err(err) = std::fs::write(leaf.join("cgroup.subtree_control"), "+cpu")
    {
        tracing::warn!(%err, "the container's services share its CPU unweighted");
    }
}

/// Brings `lo` up in the network namespace at `netns` and sets its
/// [`NETNS_SYSCTLS`].
fn loopback_up(netns: &Path) -> Result<(), ContainerError> {
    let enter = |e: std::io::Error| ContainerError::Enter {
        namespace: "network",
        source: e,
    };
    crate::netns::run_in(Some(netns), || -> std::io::Result<()> {
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = libc::c_char::try_from(*src).unwrap_or_default();
        }
        // SAFETY: fd is a socket we own; req is a valid ifreq for "lo".
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe {
            req.ifr_ifru.ifru_flags |= i16::try_from(libc::IFF_UP).unwrap_or_default();
        }
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (knob, value) in NETNS_SYSCTLS {
            std::fs::write(knob, value)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{knob}: {e}")))?;
        }
        Ok(())
    })
    .map_err(|e| enter(std::io::Error::other(e.to_string())))?
    .map_err(enter)
}

impl Container {
    /// Builds the container and returns once its PID 1 is ready. Blocking:
    /// call from `spawn_blocking`.
    ///
    /// # Errors
    /// [`ContainerError`] saying which step failed.
    pub fn start(spec: ContainerSpec) -> Result<Self, ContainerError> {
        for dir in [&spec.state_dir, &spec.cgroup] {
            std::fs::create_dir_all(dir).map_err(dir_error(dir))?;
        }
        idmap::check_base(&spec.base_rootfs)?;
        crate::storage::layer::prepare(&spec.state_dir)
            .map_err(|e| ContainerError::Init(format!("the writable layer: {e}")))?;
        idmap::prepare_layer(
            &crate::storage::layer::upper(&spec.state_dir),
            &spec.state_dir,
        )?;
        let program = std::env::current_exe().map_err(|source| ContainerError::Spawn {
            program: "/proc/self/exe".into(),
            source,
        })?;
        let leaf = fresh_leaf(&spec.cgroup)?;
        delegate_cpu(&leaf);
        let dir = group_dir(&leaf, INIT_GROUP)?;
        let mut cmd = Spawn::new(&program);
        cmd.arg("container-init")
            .arg("--hostname")
            .arg(&spec.hostname)
            .arg("--base")
            .arg(&spec.base_rootfs)
            .arg("--state-dir")
            .arg(&spec.state_dir)
            .arg("--shm-bytes")
            .arg(spec.shm_bytes.to_string())
            .envs(std::env::vars_os())
            .stdout(Stdio::Piped)
            .unshare(
                libc::CLONE_NEWNS
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWNET
                    | libc::CLONE_NEWCGROUP
                    | libc::CLONE_NEWPID,
            );
        if let Some(api) = &spec.api_dir {
            cmd.arg("--api-dir").arg(api);
        }
        if let Some(views) = &spec.checkpoints {
            cmd.arg("--checkpoints").arg(views);
        }
        let mut init = cmd
            .spawn(Some(dir.as_fd()))
            .map_err(|source| ContainerError::Spawn {
                program: program.clone(),
                source,
            })?;
        let mut out = BufReader::new(File::from(init.stdout.take().expect("piped")));
        let started = read_start(&mut out);
        // The init's parent process exits once PID 1 is forked.
        let status = init.wait_blocking();
        let pid1 = match started {
            Ok(pid) => pid,
            Err(ContainerError::Init(why)) => {
                let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                return Err(ContainerError::Init(format!("{why} ({how})")));
            }
            Err(err) => return Err(err),
        };
        let userns = map_ids(pid1)?;
        drop(dir);
        let mut container = Self {
            spec,
            init,
            leaf,
            pid1,
            userns: Arc::new(userns),
            jobs: None,
        };
        loopback_up(&container.netns_path())?;
        container.jobs = Some(container.enter_thread()?);
        tracing::info!(pid1, hostname = %container.spec.hostname, "inner container ready");
        Ok(container)
    }

    /// The thread that has entered the container and forks its processes.
    fn enter_thread(&self) -> Result<mpsc::Sender<Job>, ContainerError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let pid1 = self.pid1;
        std::thread::Builder::new()
            .name("nestbox-container".into())
            .spawn(move || {
                let entered = enter_namespaces(pid1);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| ContainerError::Enter {
                namespace: "thread",
                source,
            })?;
        ready_rx.recv().map_err(|_| ContainerError::Enter {
            namespace: "thread",
            source: std::io::Error::other("the entering thread died"),
        })??;
        Ok(tx)
    }

    /// The container's network namespace, as a path ingress and the port
    /// watcher can open.
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid1))
    }

    /// PID 1 of the container, as the VM sees it.
    #[must_use]
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// The cgroup of this build of the container, below the inner cgroup.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.leaf
    }

    /// How a process started in this container is confined, as root of
    /// the container.
    #[must_use]
    pub fn confinement(&self) -> Confinement {
        let isolation = &self.spec.isolation;
        Confinement {
            userns: self.userns.clone(),
            uid: 0,
            gid: 0,
            caps: isolation.caps.clone(),
            seccomp: isolation.seccomp.clone(),
            no_new_privs: isolation.no_new_privs,
        }
    }

    /// Starts `cmd` inside the container: its namespaces, its root, the
    /// container's cgroup `group` (made if new; the child is born in it),
    /// confined as [`Self::confinement`] says. The child is this process's
    /// own. The cgroup is made on the blocking pool and the child forked,
    /// and waited for until its exec, by the container's own thread: the
    /// caller's runtime thread only awaits.
    ///
    /// # Errors
    /// The spawn error, or why the container cannot take it.
    pub async fn spawn(&self, mut cmd: Spawn, group: &str) -> std::io::Result<Process> {
        cmd.confine(self.confinement());
        let (leaf, group) = (self.leaf.clone(), group.to_owned());
        let dir = tokio::task::spawn_blocking(move || group_dir(&leaf, &group))
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
        self.run_inside(move || cmd.spawn(Some(dir.as_fd())))
            .await?
    }

    /// Runs `f` on the container's own thread, which is in its namespaces
    /// (its `/dev/ptmx` is the container's), and gives what it returns.
    ///
    /// # Errors
    /// Why the container cannot take it (stopping).
    pub async fn run_inside<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the container is stopping"))?
            .send(job)
            .map_err(|_| std::io::Error::other("the container's thread is gone"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the container's thread dropped the request"))
    }

    /// The directory of the cgroup `group` of this build (made if new).
    ///
    /// # Errors
    /// Why it cannot be made.
    pub async fn group_path(&self, group: &str) -> std::io::Result<PathBuf> {
        let (leaf, group) = (self.leaf.clone(), group.to_owned());
        tokio::task::spawn_blocking(move || {
            group_dir(&leaf, &group)
                .map(|_| leaf.join(&group))
                .map_err(std::io::Error::other)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Kills everything in the container and waits until its cgroup is
    /// empty. Blocking. The writable layer stays.
    ///
    /// # Errors
    /// [`ContainerError`] if the cgroup cannot be emptied.
    pub fn stop(mut self) -> Result<(), ContainerError> {
        self.kill_all()
    }

    fn kill_all(&mut self) -> Result<(), ContainerError> {
        // The entering thread holds the mount namespace: let it end.
        self.jobs = None;
        let emptied = empty_and_remove(&self.leaf);
        let _ = self.init.wait_blocking();
        emptied
    }
}

/// Kills everything in the cgroup `dir` (and below), waits until it is
/// empty, then removes it and its descendants. Blocking.
fn empty_and_remove(dir: &Path) -> Result<(), ContainerError> {
    let t0 = Instant::now();
    let kill = dir.join("cgroup.kill");
    std::fs::write(&kill, "1").map_err(cgroup_error(&kill))?;
    let killed = t0.elapsed();
    let events = dir.join("cgroup.events");
    let file = File::open(&events).map_err(cgroup_error(&events))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut text = [0u8; 256];
        let n = nix::sys::uio::pread(&file, &mut text, 0)
            .map_err(|e| cgroup_error(&events)(e.into()))?;
        if text[..n]
            .split(|b| *b == b'\n')
            .any(|l| l == b"populated 0")
        {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ContainerError::Lingering {
                cgroup: dir.to_owned(),
                secs: 10,
            });
        }
        // cgroup.events signals a change as POLLPRI.
        let mut fds = [nix::poll::PollFd::new(
            file.as_fd(),
            nix::poll::PollFlags::POLLPRI,
        )];
        let wait = nix::poll::PollTimeout::try_from(left.min(Duration::from_millis(100)))
            .unwrap_or(nix::poll::PollTimeout::MAX);
        let _ = nix::poll::poll(&mut fds, wait);
    }
    let emptied = t0.elapsed();
    let removed = remove_tree(dir).map_err(cgroup_error(dir));
    tracing::debug!(
        kill_ms = killed.as_secs_f64() * 1e3,
        empty_ms = emptied.as_secs_f64() * 1e3,
        remove_ms = t0.elapsed().as_secs_f64() * 1e3,
        "container cgroup emptied"
    );
    removed
}

/// Removes an empty cgroup and its descendants, deepest first.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A fresh cgroup below `inner` for one build of the container, after
/// emptying and removing any left by an earlier one (a guest that
/// crashed).
///
/// Why a fresh one each time rather than `inner` itself: after a
/// `cgroup.kill`, Linux 6.14 and later (seen on 6.18) SIGKILL every child
/// that `clone3` starts into that cgroup, because the fork compares the
/// cgroup's kill count with the parent's own cgroup's. A cgroup never
/// killed has nothing to compare wrongly. It also keeps a process of one
/// build from ever counting as part of the next. The port watcher watches
/// `inner` and everything below it.
fn fresh_leaf(inner: &Path) -> Result<PathBuf, ContainerError> {
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for entry in std::fs::read_dir(inner).map_err(dir_error(inner))? {
        let entry = entry.map_err(dir_error(inner))?;
        if entry.file_type().map_err(dir_error(inner))?.is_dir() {
            tracing::warn!(cgroup = %entry.path().display(), "removing a cgroup left by an earlier container");
            empty_and_remove(&entry.path())?;
        }
    }
    loop {
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let leaf = inner.join(format!("c{n}"));
        match std::fs::create_dir(&leaf) {
            Ok(()) => return Ok(leaf),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(dir_error(&leaf)(e)),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.jobs.is_some()
            && let Err(err) = self.kill_all()
        {
            tracing::warn!(%err, "the inner container was not emptied");
        }
    }
}

/// Maps the ids of the user namespace PID 1 (`pid1`) entered, and opens
/// it for the processes that will join it.
fn map_ids(pid1: u32) -> Result<OwnedFd, ContainerError> {
    for map in ["uid_map", "gid_map"] {
        let path = PathBuf::from(format!("/proc/{pid1}/{map}"));
        std::fs::write(&path, idmap::map_line())
            .map_err(|source| ContainerError::Userns { path, source })?;
    }
    let path = PathBuf::from(format!("/proc/{pid1}/ns/user"));
    File::open(&path)
        .map(OwnedFd::from)
        .map_err(|source| ContainerError::Userns { path, source })
}

/// Joins PID 1's namespaces on this thread (after unsharing the
/// filesystem attributes, which `setns` into a mount namespace needs).
fn enter_namespaces(pid1: u32) -> Result<(), ContainerError> {
    let order = [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    // Open all first: after entering the mount namespace, /proc paths are
    // the container's.
    let mut files = Vec::new();
    for (name, flag) in order {
        let file = File::open(format!("/proc/{pid1}/ns/{name}")).map_err(|source| {
            ContainerError::Enter {
                namespace: name,
                source,
            }
        })?;
        files.push((name, flag, file));
    }
    nix::sched::unshare(CloneFlags::CLONE_FS).map_err(|e| ContainerError::Enter {
        namespace: "fs",
        source: e.into(),
    })?;
    for (name, flag, file) in files {
        nix::sched::setns(&file, flag).map_err(|e| ContainerError::Enter {
            namespace: name,
            source: e.into(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn the_start_lines_come_in_either_order() {
        let start = |text: &str| read_start(&mut text.as_bytes());
        assert_eq!(start("pid 7\nready\n").unwrap(), 7);
        // PID 1 built its root before its parent wrote the pid.
        assert_eq!(start("ready\npid 7\n").unwrap(), 7);
        let err = |text: &str| start(text).unwrap_err().to_string();
        assert!(err("pid 7\nerror: no overlay\n").contains("no overlay"));
        assert!(err("error: fork PID 1: EAGAIN\n").contains("EAGAIN"));
        assert!(err("ready\n").contains("exited before it was ready"));
        assert!(err("pid x\nready\n").contains("pid x"));
    }

    /// Root (CI): cgroups below this process's own.
    #[test]
    fn a_build_gets_a_fresh_cgroup_and_strays_of_an_earlier_one_are_killed() {
        let own = crate::cgroup::own_cgroup().expect("cgroup v2 is mounted");
        let inner = own.join(format!("nb-leaf-test-{}", std::process::id()));
        std::fs::create_dir(&inner).expect("making a cgroup needs root");
        // A cgroup left by a crashed guest, with a process in it.
        let stale = inner.join("c-stale");
        std::fs::create_dir(&stale).unwrap();
        let dir = cgroup_dir(&stale).unwrap();
        let mut stray = Spawn::new("sleep")
            .arg("600")
            .spawn(Some(dir.as_fd()))
            .unwrap();
        drop(dir);

        let leaf = fresh_leaf(&inner).unwrap();
        let status = stray.wait_blocking().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(!stale.exists());
        assert!(leaf.starts_with(&inner) && leaf.is_dir());

        // A build's cgroup can be killed and a new one used at once: the
        // child started into the new one lives (Linux ≥ 6.14 would kill it
        // if the killed cgroup were reused).
        empty_and_remove(&leaf).unwrap();
        assert!(!leaf.exists());
        let next = fresh_leaf(&inner).unwrap();
        assert_ne!(next, leaf);
        let dir = cgroup_dir(&next).unwrap();
        let status = Spawn::new("true")
            .spawn(Some(dir.as_fd()))
            .unwrap()
            .wait_blocking()
            .unwrap();
        assert!(status.success(), "{status}");
        drop(dir);
        empty_and_remove(&next).unwrap();
        std::fs::remove_dir(&inner).unwrap();
    }
}
