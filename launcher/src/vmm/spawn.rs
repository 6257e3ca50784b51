//! Starting a VMM detached: there is no launcher daemon, so the VMM must
//! outlive the command that starts it and be unaffected by its terminal.
//! It runs in a session of its own (`setsid`: no controlling terminal, no
//! Ctrl-C or SIGHUP from the launcher's), with stdin from /dev/null and
//! stdout/stderr appended to `vmm.log`, marked with `NESTBOX_VM_DIR` (see
//! [`crate::state::process`]), with its devices as descriptors
//! ([`super::fds`]), in its own cgroup ([`super::cgroup`]) and jail
//! ([`super::jail`]), as the VM's own user.
//!
//! The launcher then waits until the backend says the VMM is up, or fails
//! with the end of `vmm.log` when it exits or takes too long.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::fds::Passed;
use super::jail::{self, Jail};
use super::{VmSpec, Vmm, VmmError, cgroup};
use crate::state::process::{MARKER_VAR, VmmProcess};

/// How many lines of `vmm.log` an error shows.
const TAIL_LINES: usize = 20;

/// A VMM that has been started.
#[derive(Debug)]
pub struct Started {
    /// Its process, as recorded.
    pub process: VmmProcess,
    child: Child,
    log_offset: u64,
}

/// Starts `vmm`'s command for `spec`, detached, logging to `log`.
///
/// # Errors
/// [`VmmError::Log`] or [`VmmError::Spawn`].
pub fn spawn(vmm: &dyn Vmm, spec: &VmSpec, log: &Path) -> Result<Started, VmmError> {
    let log_err = |source| VmmError::Log {
        path: log.to_owned(),
        source,
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(log_err)?;
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    writeln!(out, "--- {now} nestbox-launcher starts {} ---", vmm.name()).map_err(log_err)?;
    let log_offset = out.seek(SeekFrom::End(0)).map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;

    let backend = vmm.command(spec);
    let program = backend.get_program().to_string_lossy().into_owned();
    let resolved = jail::resolve_program(backend.get_program()).ok_or_else(|| VmmError::Spawn {
        program: program.clone(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let passed = if vmm.takes_devices() {
        Passed::open(spec)?
    } else {
        Passed::none()
    };
    let mapping = passed.mapping();
    let jail = jail_for(vmm, spec, &resolved)?;
    let (prepared, report) =
        jail::Prepared::new(jail.steps().map_err(|source| VmmError::Jail {
            step: "prepare".into(),
            source,
        })?)
        .map_err(|source| VmmError::Jail {
            step: "prepare".into(),
            source,
        })?;

    let mut cmd = std::process::Command::new(&resolved);
    cmd.args(backend.get_args());
    for (key, value) in backend.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    cmd.env(MARKER_VAR, &spec.dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the forked child before exec and makes
    // system calls only (setsid, dup2, and the jail's prepared steps),
    // touching no memory of the parent's but what was prepared for it.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            jail::place(&mapping)?;
            prepared.enter()
        });
    }
    let spawned = cmd.spawn();
    // The child has its copies; ours go (the control socket's too, so
    // that only the VMM accepts on it).
    drop(passed);
    drop(cmd);
    let child = match spawned {
        Ok(child) => child,
        Err(source) => {
            let step = jail::failed_step(report)
                .and_then(|i| jail.steps().ok()?.get(i).map(ToString::to_string));
            return Err(match step {
                Some(step) => VmmError::Jail { step, source },
                None => VmmError::Spawn { program, source },
            });
        }
    };
    let pid = child.id();
    let process = VmmProcess::of(pid).unwrap_or(VmmProcess { pid, start_time: 0 });
    tracing::info!(vm = %spec.name, pid, "VMM started");
    Ok(Started {
        process,
        child,
        log_offset,
    })
}

impl Started {
    /// Waits until `vmm` says the VMM is up. On failure the VMM is killed
    /// and the error carries what it logged since it started.
    ///
    /// # Errors
    /// [`VmmError::Exited`] or [`VmmError::NotUp`].
    pub fn wait_up(
        mut self,
        vmm: &dyn Vmm,
        spec: &VmSpec,
        log: &Path,
        timeout: Duration,
    ) -> Result<VmmProcess, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(VmmError::Exited {
                    status: status.to_string(),
                    log: log.to_owned(),
                    tail: tail(log, self.log_offset),
                });
            }
            if vmm.is_up(&spec.control_socket) {
                return Ok(self.process);
            }
            if Instant::now() >= deadline {
                let _ = self.process.signal(Signal::SIGKILL);
                let _ = self.child.wait();
                return Err(VmmError::NotUp {
                    secs: timeout.as_secs(),
                    log: log.to_owned(),
                    tail: tail(log, self.log_offset),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The VMM's jail: its directory in the VM's, the VM's own user (and the
/// `kvm` group when KVM runs it), the kernel, initramfs and program
/// read-only, and its cgroup, made here with the VM's limits.
fn jail_for(vmm: &dyn Vmm, spec: &VmSpec, program: &Path) -> Result<Jail, VmmError> {
    let root = spec.dir.join("jail");
    std::fs::create_dir_all(&root).map_err(|source| VmmError::Open {
        path: root.clone(),
        source,
    })?;
    let kvm = vmm.accel().accel == super::accel::Accel::Kvm;
    let groups = if kvm {
        nix::unistd::Group::from_name("kvm")
            .ok()
            .flatten()
            .map(|g| vec![g.gid.as_raw()])
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let limits = cgroup::Limits {
        memory: cgroup::memory_for(spec.memory_mib, vmm.cache_mib()),
        cpus: spec.cpus,
    };
    let cgroups = cgroup::host()?.create(&spec.tap, limits)?;
    let read_only = [&spec.kernel, &spec.initramfs]
        .into_iter()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .chain(std::iter::once(program.to_owned()))
        .collect();
    Ok(Jail {
        root,
        uid: spec.uid,
        gid: spec.uid,
        groups,
        read_only,
        devices: if kvm { vec!["kvm".into()] } else { Vec::new() },
        cgroups,
    })
}

/// The last lines of `log` after `offset`.
#[must_use]
pub fn tail(log: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    if tail.is_empty() {
        "(nothing)".into()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::vmm::accel::AccelChoice;
    use crate::vmm::stub::Stub;

    /// Root (CI): every test jails a stub in a cgroup of its own tap name.
    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            name: "t".into(),
            dir: dir.to_owned(),
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            cmdline: String::new(),
            memory_mib: 64,
            cpus: 1,
            tap: format!("nbst{}", std::process::id() % 100_000),
            mac: String::new(),
            console_log: dir.join("console.log"),
            data_disk: dir.join("data.img"),
            user_disk: None,
            config_disk: dir.join("config.img"),
            control_socket: dir.join("ready"),
            uid: 4_000_000_007,
        }
    }

    /// A stub that is up once it has said so in the log.
    struct LogReady(Stub, PathBuf);

    impl Vmm for LogReady {
        fn name(&self) -> &'static str {
            "log-ready"
        }
        fn accel(&self) -> &AccelChoice {
            self.0.accel()
        }
        fn command(&self, spec: &VmSpec) -> std::process::Command {
            self.0.command(spec)
        }
        fn takes_devices(&self) -> bool {
            false
        }
        fn is_up(&self, _control_socket: &Path) -> bool {
            std::fs::read_to_string(&self.1).is_ok_and(|t| t.contains("stub is up"))
        }
        fn request_stop(&self, control_socket: &Path, p: &VmmProcess) -> Result<(), VmmError> {
            self.0.request_stop(control_socket, p)
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nb-spawn-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::canonicalize(dir).unwrap()
    }

    fn sh(dir: &Path, script: &str) -> LogReady {
        LogReady(Stub::new("sh", ["-c", script]), dir.join("vmm.log"))
    }

    fn clean(spec: &VmSpec) {
        let _ = cgroup::remove_for(&spec.tap);
        std::fs::remove_dir_all(&spec.dir).unwrap();
    }

    #[test]
    fn a_started_vmm_runs_detached_jailed_and_as_the_vms_user() {
        let dir = dir("up");
        let vmm = sh(
            &dir,
            "echo \"$NESTBOX_VM_DIR $(cut -d' ' -f6 /proc/$$/stat 2>/dev/null) $(id -u):$(id -g) $PWD\"; \
             ls /; ls /proc 2>&1 | head -1; echo x > /written 2>&1 || echo read-only; \
             echo stub is up; exec sleep 100",
        );
        let spec = spec(&dir);
        let log = dir.join("vmm.log");
        let started = spawn(&vmm, &spec, &log).unwrap();
        let pid = started.process.pid;
        let process = started
            .wait_up(&vmm, &spec, &log, Duration::from_secs(10))
            .unwrap();
        assert!(process.is_alive());
        assert_eq!(process.pid, pid);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("nestbox-launcher starts log-ready"), "{text}");
        let d = dir.display();
        // Its marker, no /proc (so no session id read), the VM's own user,
        // the jail's root as its working directory.
        assert!(
            text.contains(&format!("{d}  4000000007:4000000007 /")),
            "{text}"
        );
        assert!(
            text.contains("read-only"),
            "the jail's root is read-only: {text}"
        );
        assert!(
            !text.contains("\nwork\n") && !text.contains("\ntmp\n"),
            "only what a VMM needs: {text}"
        );
        assert!(text.contains("usr") && text.contains("dev"), "{text}");
        // Its own session: the launcher's terminal signals never reach it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let session = crate::state::process::parse_stat(&stat).unwrap().session;
        assert_eq!(session, i64::from(pid));
        // In its cgroup.
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cgroups.contains(&format!("nestbox/{}", spec.tap)),
            "{cgroups}"
        );
        process.signal(Signal::SIGKILL).unwrap();
        assert!(process.wait_gone(Duration::from_secs(5)));
        clean(&spec);
    }

    #[test]
    fn a_vmm_that_exits_at_start_fails_with_its_log() {
        let dir = dir("exit");
        let vmm = sh(&dir, "echo 'qemu: could not open tap' >&2; exit 1");
        let spec = spec(&dir);
        let log = dir.join("vmm.log");
        std::fs::write(&log, "an older run's output\n").unwrap();
        let err = spawn(&vmm, &spec, &log)
            .unwrap()
            .wait_up(&vmm, &spec, &log, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("could not open tap"), "{err}");
        assert!(!err.contains("older run"), "only this start's lines: {err}");
        clean(&spec);
    }

    #[test]
    fn a_vmm_that_never_comes_up_is_killed() {
        let dir = dir("slow");
        let vmm = sh(&dir, "exec sleep 100");
        let spec = spec(&dir);
        let log = dir.join("vmm.log");
        let started = spawn(&vmm, &spec, &log).unwrap();
        let process = started.process;
        let err = started
            .wait_up(&vmm, &spec, &log, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, VmmError::NotUp { .. }), "{err}");
        assert!(!process.is_alive());
        clean(&spec);
    }

    #[test]
    fn a_missing_program_says_what_to_install() {
        let dir = dir("missing");
        let vmm = LogReady(
            Stub::new("/nonexistent/qemu", [] as [&str; 0]),
            dir.join("vmm.log"),
        );
        let spec = spec(&dir);
        let err = spawn(&vmm, &spec, &dir.join("vmm.log"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/qemu") && err.contains("apt-get install"),
            "{err}"
        );
        clean(&spec);
    }

    #[test]
    fn a_failing_jail_step_is_named() {
        let dir = dir("jailfail");
        let vmm = sh(&dir, "echo stub is up; exec sleep 100");
        let mut spec = spec(&dir);
        // The jail's mount point is a file: the tmpfs cannot go on it.
        std::fs::write(dir.join("jail"), "").unwrap();
        spec.name = "jailfail".into();
        let err = spawn(&vmm, &spec, &dir.join("vmm.log"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("jail"), "{err}");
        clean(&spec);
    }
}
