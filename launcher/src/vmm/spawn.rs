//! Starting a VMM detached: there is no launcher daemon, so the VMM must
//! outlive the command that starts it and be unaffected by its terminal.
//! It runs in a session of its own (`setsid`: no controlling terminal, no
//! Ctrl-C or SIGHUP from the launcher's), with stdin from /dev/null and
//! stdout/stderr appended to `vmm.log`, in the VM's directory, marked with
//! `NESTBOX_VM_DIR` (see [`crate::state::process`]).
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

use super::{VmSpec, Vmm, VmmError};
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

    let mut cmd = vmm.command(spec);
    cmd.current_dir(&spec.dir)
        .env(MARKER_VAR, &spec.dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setsid(2), which is async-signal-safe and touches no memory of
    // the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd
        .spawn()
        .map_err(|source| VmmError::Spawn { program, source })?;
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
    use crate::vmm::accel::{Accel, AccelChoice};
    use crate::vmm::stub::Stub;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            name: "t".into(),
            dir: dir.to_owned(),
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            cmdline: String::new(),
            memory_mib: 64,
            cpus: 1,
            tap: "x".into(),
            mac: String::new(),
            console_log: dir.join("console.log"),
            data_disk: dir.join("data.img"),
            config_disk: dir.join("config.img"),
            control_socket: dir.join("ready"),
        }
    }

    /// A stub that is up once its control "socket" file exists.
    struct FileReady(Stub);

    impl Vmm for FileReady {
        fn name(&self) -> &'static str {
            "file-ready"
        }
        fn accel(&self) -> &AccelChoice {
            self.0.accel()
        }
        fn command(&self, spec: &VmSpec) -> std::process::Command {
            self.0.command(spec)
        }
        fn is_up(&self, control_socket: &Path) -> bool {
            control_socket.exists()
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

    fn sh(script: &str) -> FileReady {
        FileReady(Stub::new("sh", ["-c", script]))
    }

    #[test]
    fn a_started_vmm_runs_detached_in_its_directory() {
        let dir = dir("up");
        let vmm = sh(
            "echo \"$PWD $NESTBOX_VM_DIR $(cut -d' ' -f6 /proc/$$/stat)\"; touch ready; exec sleep 100",
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
        assert!(
            text.contains("nestbox-launcher starts file-ready"),
            "{text}"
        );
        let d = dir.display();
        assert!(
            text.contains(&format!("{d} {d} {pid}")),
            "own session, in its dir: {text}"
        );
        process.signal(Signal::SIGKILL).unwrap();
        assert!(process.wait_gone(Duration::from_secs(5)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vmm_that_exits_at_start_fails_with_its_log() {
        let dir = dir("exit");
        let vmm = sh("echo 'qemu: could not open tap' >&2; exit 1");
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
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vmm_that_never_comes_up_is_killed() {
        let dir = dir("slow");
        let vmm = sh("exec sleep 100");
        let spec = spec(&dir);
        let log = dir.join("vmm.log");
        let started = spawn(&vmm, &spec, &log).unwrap();
        let process = started.process;
        let err = started
            .wait_up(&vmm, &spec, &log, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, VmmError::NotUp { .. }), "{err}");
        assert!(!process.is_alive());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_program_says_what_to_install() {
        let dir = dir("missing");
        let vmm = FileReady(Stub::new("/nonexistent/qemu", [] as [&str; 0]));
        let err = spawn(&vmm, &spec(&dir), &dir.join("vmm.log"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/qemu") && err.contains("apt-get install"),
            "{err}"
        );
        let _ = Accel::None;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
