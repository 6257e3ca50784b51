//! Starting programs with `clone3`: placed in a cgroup at birth
//! (`CLONE_INTO_CGROUP`) and watched through a pidfd.
//!
//! Why not `std::process::Command` with a `pre_exec` hook that writes `0`
//! to the cgroup's `cgroup.procs`: moving a live process between cgroups
//! takes the kernel's cgroup thread-group lock for writing, which waits for
//! an RCU grace period. Measured here, that write took 6–15 ms whenever
//! cgroups had been quiet for a moment (every bounce), while `clone3` puts
//! the child in the cgroup in about 0.05 ms. It was the largest single part
//! of a bounce.
//!
//! The child side runs between `clone3` and `execve` in a copy of a
//! multi-threaded process, so it makes only async-signal-safe system calls
//! on memory prepared before the clone: no allocation, no locks, and raw
//! system calls where libc would coordinate with threads the copy does not
//! have (`setresuid` and friends). Needs Linux ≥ 5.7.
//!
//! A process started in the inner container is also *confined* by its
//! child side ([`Confinement`]): it enters the container's user namespace,
//! takes its ids there, drops every capability it may not keep from the
//! bounding set, installs the seccomp filters, sets its permitted,
//! effective and inheritable sets and clears the ambient one — all before
//! `execve`, so that not one instruction of the user's program runs with
//! more.

use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

/// `PATH` when the environment given has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of `linux/sched.h`, up to `cgroup` (version 2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// The kernel's `struct sigaction` (not libc's); all zero is `SIG_DFL`.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// `_LINUX_CAPABILITY_VERSION_3` of `linux/capability.h`: 64-bit sets in
/// two 32-bit halves.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// How a process started in the inner container is confined, between
/// `clone3` and `execve` (see the module's documentation).
#[derive(Clone, Debug)]
pub struct Confinement {
    /// The container's user namespace.
    pub userns: Arc<OwnedFd>,
    /// The user id it runs as, in that namespace.
    pub uid: u32,
    /// The group id, in that namespace (no supplementary groups).
    pub gid: u32,
    /// Its capability sets.
    pub caps: Arc<crate::container::caps::CapSets>,
    /// Seccomp filters, installed in order (none: no filter).
    pub seccomp: Arc<Vec<seccompiler::BpfProgram>>,
    /// Whether to set `no_new_privs` (setuid programs such as `sudo` then
    /// gain nothing).
    pub no_new_privs: bool,
}

/// A [`Confinement`] laid out for the child.
struct PreparedConfinement {
    userns: RawFd,
    uid: libc::uid_t,
    gid: libc::gid_t,
    drop_bounding: Vec<libc::c_ulong>,
    header: CapHeader,
    data: [CapData; 2],
    /// Point into `_keep.seccomp`.
    filters: Vec<libc::sock_fprog>,
    no_new_privs: bool,
    /// Keeps the descriptor and the filters alive until after the clone.
    _keep: Confinement,
}

impl PreparedConfinement {
    fn new(c: &Confinement) -> io::Result<Self> {
        let filters = c
            .seccomp
            .iter()
            .map(|prog| {
                Ok(libc::sock_fprog {
                    len: u16::try_from(prog.len()).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidInput, "a seccomp filter is too long")
                    })?,
                    filter: prog.as_ptr().cast_mut().cast(),
                })
            })
            .collect::<io::Result<_>>()?;
        let (low, high) = split_mask(c.caps.mask);
        Ok(Self {
            userns: c.userns.as_raw_fd(),
            uid: c.uid,
            gid: c.gid,
            drop_bounding: c
                .caps
                .drop_bounding
                .iter()
                .map(|&cap| libc::c_ulong::from(cap))
                .collect(),
            header: CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            },
            data: [low, high],
            filters,
            no_new_privs: c.no_new_privs,
            _keep: c.clone(),
        })
    }
}

/// A 64-bit capability mask as the two halves `capset` takes, with the
/// same bits permitted, effective and inheritable.
fn split_mask(mask: u64) -> (CapData, CapData) {
    let half = |bits: u64| {
        let bits = u32::try_from(bits & u64::from(u32::MAX)).expect("masked to 32 bits");
        CapData {
            effective: bits,
            permitted: bits,
            inheritable: bits,
        }
    };
    (half(mask), half(mask >> 32))
}

/// Where a standard stream of the child goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdio {
    /// `/dev/null`.
    Null,
    /// A pipe whose other end the [`Process`] holds.
    Piped,
    /// The same as this process's.
    Inherit,
}

/// A program to start, the way [`std::process::Command`] describes one.
#[derive(Debug)]
pub struct Spawn {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<OsString>,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    process_group: bool,
    /// A terminal's slave side: the child's stdin, stdout and stderr, and
    /// its controlling terminal in a session of its own.
    terminal: Option<OwnedFd>,
    unshare: libc::c_int,
    confine: Option<Confinement>,
}

/// A started program.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    watch: Option<AsyncFd<OwnedFd>>,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// The write end of its stdin, when piped.
    pub stdin: Option<OwnedFd>,
    /// The read end of its stdout, when piped.
    pub stdout: Option<OwnedFd>,
    /// The read end of its stderr, when piped.
    pub stderr: Option<OwnedFd>,
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", s.to_string_lossy()),
        )
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

fn dev_null(write: bool) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")?;
    Ok(file.into())
}

/// The descriptors an output stream needs: the child's end and, when piped,
/// ours.
fn output(how: Stdio) -> io::Result<(Option<OwnedFd>, Option<OwnedFd>)> {
    match how {
        Stdio::Inherit => Ok((None, None)),
        Stdio::Null => Ok((Some(dev_null(true)?), None)),
        Stdio::Piped => {
            let (read, write) = pipe()?;
            Ok((Some(write), Some(read)))
        }
    }
}

/// Everything the child needs, prepared before the clone.
struct Prepared {
    candidates: Vec<CString>,
    /// Point into `strings`.
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The arguments and the environment.
    _strings: [Vec<CString>; 2],
    dir: Option<CString>,
    /// The child's stdin, stdout and stderr (`None`: inherited).
    fds: [Option<RawFd>; 3],
    /// Closed in the parent after the clone.
    _child_fds: [Option<OwnedFd>; 3],
    /// Our ends of the piped stdin, stdout and stderr.
    ours: [Option<OwnedFd>; 3],
    process_group: bool,
    /// Whether the child leads a new session whose controlling terminal is
    /// its stdin.
    session: bool,
    unshare: libc::c_int,
    confine: Option<PreparedConfinement>,
    report: RawFd,
}

/// The child's side: no allocation, no locks, only system calls. Never
/// returns.
fn child(p: &Prepared) -> ! {
    // SAFETY: raw system calls on memory prepared before the clone, which
    // this copy of the process owns alone.
    unsafe {
        let fail = |step: i32| -> ! {
            let err = [*libc::__errno_location(), step];
            let bytes = std::mem::size_of_val(&err);
            libc::write(p.report, err.as_ptr().cast(), bytes);
            libc::_exit(127)
        };
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut());
        // Ignored signals stay ignored across exec (Rust ignores SIGPIPE).
        // The raw system call, because libc refuses the signals it keeps
        // for itself.
        let default = KernelSigaction::default();
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &raw const default,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8,
                );
            }
        }
        if p.session {
            if libc::setsid() < 0 {
                fail(1);
            }
        } else if p.process_group && libc::setpgid(0, 0) != 0 {
            fail(1);
        }
        for (target, fd) in (0..).zip(p.fds) {
            let Some(fd) = fd else { continue };
            let ok = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                fail(2);
            }
        }
        if p.session && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
            fail(12);
        }
        if let Some(c) = &p.confine
            && let Err(step) = confine(c)
        {
            fail(step);
        }
        if let Some(dir) = &p.dir
            && libc::chdir(dir.as_ptr()) != 0
        {
            fail(3);
        }
        if p.unshare != 0 && libc::unshare(p.unshare) != 0 {
            fail(4);
        }
        let mut denied = false;
        for path in &p.candidates {
            libc::execve(path.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => denied = true,
                _ => fail(5),
            }
        }
        if denied {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(5)
    }
}

/// The child's confinement (see [`Confinement`]). On failure, the step
/// that failed (errno says why).
///
/// # Safety
/// Only in the child of a clone, before exec: it changes the process's
/// namespaces and credentials.
unsafe fn confine(c: &PreparedConfinement) -> Result<(), i32> {
    // SAFETY: raw system calls on memory prepared before the clone.
    unsafe {
        // The platform shields itself from the OOM killer; the user's
        // processes must not inherit that (raising the score is always
        // allowed).
        let adj = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if adj >= 0 {
            libc::write(adj, b"0".as_ptr().cast(), 1);
            libc::close(adj);
        }
        // Raw system calls from here on: libc's wrappers for the id calls
        // would signal the parent's threads, which this copy does not have.
        if libc::syscall(libc::SYS_setns, c.userns, libc::CLONE_NEWUSER) != 0 {
            return Err(6);
        }
        for &cap in &c.drop_bounding {
            if libc::syscall(libc::SYS_prctl, libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(7);
            }
        }
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0
            || libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0
        {
            return Err(8);
        }
        // Before the capabilities go: without no_new_privs a filter needs
        // CAP_SYS_ADMIN (in the user namespace, which setns gave).
        for filter in &c.filters {
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                std::ptr::from_ref(filter),
            ) != 0
            {
                return Err(9);
            }
        }
        if libc::syscall(
            libc::SYS_capset,
            std::ptr::from_ref(&c.header),
            c.data.as_ptr(),
        ) != 0
            || libc::syscall(
                libc::SYS_prctl,
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
        {
            return Err(10);
        }
        if c.no_new_privs
            && libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(11);
        }
    }
    Ok(())
}

const STEPS: [&str; 13] = [
    "",
    "setpgid",
    "redirecting its output",
    "chdir",
    "unshare",
    "exec",
    "entering the container's user namespace",
    "dropping capabilities from the bounding set",
    "setting its user and groups",
    "installing the seccomp filter",
    "setting its capabilities",
    "setting no_new_privs",
    "taking its terminal",
];

impl Spawn {
    /// Runs `program` (looked up in the child's `PATH` unless it has a
    /// `/`), with nothing on stdin, this process's stdout and stderr, an
    /// empty environment.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            stdin: Stdio::Null,
            stdout: Stdio::Inherit,
            stderr: Stdio::Inherit,
            process_group: false,
            terminal: None,
            unshare: 0,
            confine: None,
        }
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&mut self, args: I) -> &mut Self {
        for a in args {
            self.arg(a);
        }
        self
    }

    /// Sets an environment variable (the last setting of a name wins).
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.as_ref().to_owned()));
        self
    }

    /// Sets environment variables.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    /// The working directory.
    pub fn current_dir(&mut self, dir: impl AsRef<OsStr>) -> &mut Self {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Where stdin comes from (`Null` unless set).
    pub fn stdin(&mut self, how: Stdio) -> &mut Self {
        self.stdin = how;
        self
    }

    /// Gives the child the terminal whose slave side is `slave` as its
    /// stdin, stdout, stderr and controlling terminal, in a new session
    /// (which is also a new process group).
    pub fn terminal(&mut self, slave: OwnedFd) -> &mut Self {
        self.terminal = Some(slave);
        self
    }

    /// Where stdout goes.
    pub fn stdout(&mut self, how: Stdio) -> &mut Self {
        self.stdout = how;
        self
    }

    /// Where stderr goes.
    pub fn stderr(&mut self, how: Stdio) -> &mut Self {
        self.stderr = how;
        self
    }

    /// Makes the child lead a new process group.
    pub fn process_group(&mut self) -> &mut Self {
        self.process_group = true;
        self
    }

    /// Namespaces (`CLONE_NEW*`) the child unshares before it execs.
    pub fn unshare(&mut self, flags: libc::c_int) -> &mut Self {
        self.unshare = flags;
        self
    }

    /// Confines the child as a process of the inner container (user
    /// namespace, capabilities, seccomp) before it execs.
    pub fn confine(&mut self, how: Confinement) -> &mut Self {
        self.confine = Some(how);
        self
    }

    fn candidates(&self) -> io::Result<Vec<CString>> {
        if self.program.as_bytes().contains(&b'/') {
            return Ok(vec![cstring(&self.program)?]);
        }
        if self.program.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the program name is empty",
            ));
        }
        let path = self
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or_else(|| OsString::from(DEFAULT_PATH), |(_, v)| v.clone());
        path.as_bytes()
            .split(|b| *b == b':')
            .map(|dir| {
                let dir = if dir.is_empty() { b".".as_slice() } else { dir };
                let mut full = dir.to_vec();
                full.push(b'/');
                full.extend_from_slice(self.program.as_bytes());
                cstring(OsStr::from_bytes(&full))
            })
            .collect()
    }

    /// Everything the child needs, prepared before the clone.
    fn prepare(&self, report: RawFd) -> io::Result<Prepared> {
        let strings = std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| cstring(a))
            .collect::<io::Result<Vec<_>>>()?;
        let env = self
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone();
                kv.push("=");
                kv.push(v);
                cstring(&kv)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let (child_in, our_in, child_out, our_out, child_err, our_err) =
            if let Some(slave) = &self.terminal {
                let dup = || slave.try_clone().map(Some);
                (dup()?, None, dup()?, None, dup()?, None)
            } else {
                let (child_in, our_in) = match self.stdin {
                    Stdio::Inherit => (None, None),
                    Stdio::Null => (Some(dev_null(false)?), None),
                    Stdio::Piped => {
                        let (read, write) = pipe()?;
                        (Some(read), Some(write))
                    }
                };
                let (child_out, our_out) = output(self.stdout)?;
                let (child_err, our_err) = output(self.stderr)?;
                (child_in, our_in, child_out, our_out, child_err, our_err)
            };
        let pointers = |v: &[CString]| {
            v.iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        Ok(Prepared {
            candidates: self.candidates()?,
            argv: pointers(&strings),
            envp: pointers(&env),
            _strings: [strings, env],
            dir: self.dir.as_deref().map(cstring).transpose()?,
            fds: [&child_in, &child_out, &child_err].map(|f| f.as_ref().map(AsRawFd::as_raw_fd)),
            _child_fds: [child_in, child_out, child_err],
            ours: [our_in, our_out, our_err],
            process_group: self.process_group,
            session: self.terminal.is_some(),
            unshare: self.unshare,
            confine: self
                .confine
                .as_ref()
                .map(PreparedConfinement::new)
                .transpose()?,
            report,
        })
    }

    /// Starts the program, in `cgroup` (a descriptor of a cgroup v2
    /// directory) when given, else in this process's cgroup.
    ///
    /// # Errors
    /// Why it did not start, including the child's own failure (which step,
    /// and the system error) before exec.
    pub fn spawn(&self, cgroup: Option<BorrowedFd<'_>>) -> io::Result<Process> {
        let (report_read, report_write) = pipe()?;
        let mut prepared = self.prepare(report_write.as_raw_fd())?;
        let mut pidfd: RawFd = -1;
        let mut args = CloneArgs {
            flags: CLONE_PIDFD,
            pidfd: (&raw mut pidfd) as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        if let Some(cg) = cgroup {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = u64::try_from(cg.as_raw_fd()).unwrap_or_default();
        }
        // SAFETY: clone3 without a stack behaves like fork; the child runs
        // only `child`, which never returns.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &raw const args,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            child(&prepared);
        }
        if pid < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENOSYS) => io::Error::other(
                    "clone3 is not available: Linux ≥ 5.7 is needed, without a seccomp filter that refuses clone3 (as container runtimes apply unless privileged)",
                ),
                _ if cgroup.is_some() => io::Error::other(format!("clone3 into the cgroup: {err}")),
                _ => err,
            });
        }
        drop(report_write);
        let [stdin, stdout, stderr] = std::mem::take(&mut prepared.ours);
        drop(prepared);
        let mut process = Process {
            pid: u32::try_from(pid).map_err(io::Error::other)?,
            watch: None,
            // SAFETY: CLONE_PIDFD stored a new descriptor for the child.
            pidfd: Some(unsafe { OwnedFd::from_raw_fd(pidfd) }),
            status: None,
            stdin,
            stdout,
            stderr,
        };
        let mut report = Vec::new();
        std::fs::File::from(report_read).read_to_end(&mut report)?;
        let Ok(report) = <[u8; 8]>::try_from(report.as_slice()) else {
            // Nothing came (the child writes its 8 bytes at once, or
            // nothing): the exec happened.
            return Ok(process);
        };
        let _ = process.wait_blocking();
        Err(self.failure(report))
    }

    /// The error the child reported before exec: `[errno, step]`.
    fn failure(&self, report: [u8; 8]) -> io::Error {
        let errno = i32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
        let step = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
        let err = io::Error::from_raw_os_error(errno);
        let step = usize::try_from(step)
            .ok()
            .and_then(|s| STEPS.get(s))
            .unwrap_or(&"start");
        if *step == "exec" {
            io::Error::new(
                err.kind(),
                format!("{}: {err}", self.program.to_string_lossy()),
            )
        } else {
            io::Error::new(err.kind(), format!("{step} in the child: {err}"))
        }
    }
}

impl Process {
    /// Its process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.pid
    }

    fn pidfd(&self) -> Option<RawFd> {
        self.watch
            .as_ref()
            .map(AsyncFd::as_raw_fd)
            .or_else(|| self.pidfd.as_ref().map(AsRawFd::as_raw_fd))
    }

    /// Reaps it if it has exited.
    fn try_reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        loop {
            // SAFETY: waitpid on our own child, with a valid out pointer.
            let r = unsafe { libc::waitpid(self.pid.cast_signed(), &raw mut raw, flags) };
            if r == 0 {
                return Ok(None);
            }
            if r > 0 {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                return Ok(Some(status));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Waits for it to exit, blocking the thread.
    ///
    /// # Errors
    /// The error of `waitpid`.
    pub fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        self.try_reap(0)
            .map(|s| s.expect("a blocking waitpid returns a status"))
    }

    /// Waits for it to exit without blocking the runtime: the pidfd turns
    /// readable when it does.
    ///
    /// # Errors
    /// The error of registering the pidfd or of `waitpid`.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_reap(libc::WNOHANG)? {
            return Ok(status);
        }
        if self.watch.is_none() {
            let fd = self.pidfd.take().expect("a pidfd until it is watched");
            // SAFETY: the AsyncFd owns the pidfd, which stays open and
            // the same file until the AsyncFd is dropped.
            let watch =
                unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
            self.watch = Some(watch.map_err(io::Error::from)?);
        }
        loop {
            let watch = self.watch.as_ref().expect("set above");
            let mut ready = watch.readable().await?;
            ready.clear_ready();
            if let Some(status) = self.try_reap(libc::WNOHANG)? {
                return Ok(status);
            }
        }
    }

    /// Sends `signal` to it (not to a process that reused its pid).
    ///
    /// # Errors
    /// The error of `pidfd_send_signal`; none once it has been reaped.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let fd = self.pidfd().expect("a pidfd until reaped");
        // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reaps it if it has exited, without waiting.
    ///
    /// # Errors
    /// The error of `waitpid`.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.try_reap(libc::WNOHANG)
    }

    /// A second descriptor of its pidfd (readable once it has exited), to
    /// wait on while the process itself stays where signals reach it.
    ///
    /// # Errors
    /// The error of `dup`; once reaped, there is none.
    pub fn pidfd_clone(&self) -> io::Result<OwnedFd> {
        let fd = self
            .pidfd()
            .ok_or_else(|| io::Error::other("the process has been reaped"))?;
        // SAFETY: the descriptor is ours and open while `self` lives.
        unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
    }

    /// Sends `signal` to its process group (it must lead one); nothing once
    /// it has been reaped (until then its id cannot be reused, so the group
    /// is its own).
    ///
    /// # Errors
    /// The error of `kill`.
    pub fn signal_group(&self, signal: libc::c_int) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid.cast_signed()),
            nix::sys::signal::Signal::try_from(signal).map_err(io::Error::from)?,
        )
        .map_err(io::Error::from)
    }

    /// Its stdin as an async writer (when piped).
    ///
    /// # Errors
    /// The error of registering the pipe with the runtime.
    pub fn take_stdin(&mut self) -> io::Result<Option<tokio::net::unix::pipe::Sender>> {
        self.stdin
            .take()
            .map(tokio::net::unix::pipe::Sender::from_owned_fd)
            .transpose()
    }

    /// Its stdout as an async reader (when piped).
    ///
    /// # Errors
    /// The error of registering the pipe with the runtime.
    pub fn take_stdout(&mut self) -> io::Result<Option<tokio::net::unix::pipe::Receiver>> {
        self.stdout
            .take()
            .map(tokio::net::unix::pipe::Receiver::from_owned_fd)
            .transpose()
    }

    /// Its stderr as an async reader (when piped).
    ///
    /// # Errors
    /// As [`Self::take_stdout`].
    pub fn take_stderr(&mut self) -> io::Result<Option<tokio::net::unix::pipe::Receiver>> {
        self.stderr
            .take()
            .map(tokio::net::unix::pipe::Receiver::from_owned_fd)
            .transpose()
    }
}

impl Drop for Process {
    /// A process dropped while it runs is reaped when it exits, so it does
    /// not linger as a zombie.
    fn drop(&mut self) {
        if matches!(self.try_reap(libc::WNOHANG), Ok(Some(_)) | Err(_)) {
            return;
        }
        let mut rest = Self {
            pid: self.pid,
            watch: self.watch.take(),
            pidfd: self.pidfd.take(),
            status: None,
            stdin: None,
            stdout: None,
            stderr: None,
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            // A runtime shutting down drops this task unpolled, or in the
            // wait: `Reap` then hands the process to a thread (dropping a
            // `Process` there would come back to this function, and spawn
            // again, for ever). So the task holds a `Reap` from the start.
            let mut reap = Reap(Some(rest));
            handle.spawn(async move {
                if let Some(process) = reap.0.as_mut() {
                    let _ = process.wait().await;
                }
                drop(reap.0.take());
            });
        } else {
            std::thread::spawn(move || {
                let _ = rest.wait_blocking();
            });
        }
    }
}

/// A process to reap; if dropped with it still there, a thread waits for
/// it.
struct Reap(Option<Process>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(mut process) = self.0.take() {
            std::thread::spawn(move || {
                let _ = process.wait_blocking();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;

    use tokio::io::AsyncReadExt;

    use super::*;

    fn sh(script: &str) -> Spawn {
        let mut s = Spawn::new("sh");
        s.arg("-c").arg(script);
        s
    }

    #[tokio::test]
    async fn output_exit_status_and_environment() {
        let mut s = sh("echo out $FOO; echo err >&2; pwd; exit 3");
        s.env("FOO", "bar")
            .current_dir("/tmp")
            .stdout(Stdio::Piped)
            .stderr(Stdio::Piped);
        let mut p = s.spawn(None).unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        p.take_stdout()
            .unwrap()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        p.take_stderr()
            .unwrap()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        assert_eq!(out, "out bar\n/tmp\n");
        assert_eq!(err, "err\n");
        assert_eq!(p.wait().await.unwrap().code(), Some(3));
    }

    #[test]
    fn a_missing_program_or_directory_is_an_error_naming_it() {
        let err = Spawn::new("nestbox-no-such-program")
            .spawn(None)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("nestbox-no-such-program"), "{err}");
        let err = sh("true")
            .current_dir("/nestbox-no-such-dir")
            .spawn(None)
            .unwrap_err();
        assert!(err.to_string().starts_with("chdir in the child"), "{err}");
    }

    #[tokio::test]
    async fn signal_and_process_group() {
        let mut s = sh("sleep 30");
        s.process_group();
        let mut p = s.spawn(None).unwrap();
        // SAFETY: getpgid on a pid, no memory.
        let group = unsafe { libc::getpgid(p.id().cast_signed()) };
        assert_eq!(group, p.id().cast_signed());
        p.signal(libc::SIGKILL).unwrap();
        assert_eq!(p.wait().await.unwrap().signal(), Some(libc::SIGKILL));
        // After the reap, signalling is a no-op rather than a stray kill.
        p.signal(libc::SIGKILL).unwrap();
    }

    #[test]
    fn ignored_signals_are_not_ignored_in_the_child() {
        // Rust ignores SIGPIPE; a child must get the default back.
        let mut s = sh("grep SigIgn /proc/self/status");
        s.stdout(Stdio::Piped);
        let mut p = s.spawn(None).unwrap();
        let mut out = String::new();
        std::fs::File::from(p.stdout.take().unwrap())
            .read_to_string(&mut out)
            .unwrap();
        p.wait_blocking().unwrap();
        assert_eq!(out.trim(), "SigIgn:\t0000000000000000");
    }

    #[test]
    fn the_child_is_born_in_the_cgroup_given() {
        // Root (CI): makes a cgroup below this process's own.
        let own = crate::cgroup::own_cgroup().expect("cgroup v2 is mounted");
        let dir = own.join(format!("nb-spawn-test-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("making a cgroup needs root");
        let fd = std::fs::File::open(&dir).unwrap();
        let mut s = Spawn::new("cat");
        s.arg("/proc/self/cgroup").stdout(Stdio::Piped);
        let spawned = s.spawn(Some(fd.as_fd()));
        let mut out = String::new();
        let status = spawned.map(|mut p| {
            std::fs::File::from(p.stdout.take().unwrap())
                .read_to_string(&mut out)
                .unwrap();
            p.wait_blocking().unwrap()
        });
        std::fs::remove_dir(&dir).unwrap();
        assert!(status.unwrap().success());
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(out.trim_end().ends_with(&format!("/{name}")), "{out}");
    }

    #[test]
    fn a_nul_byte_is_refused() {
        let err = sh("true").arg("a\0b").spawn(None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
