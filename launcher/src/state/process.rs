//! A VMM process as the record knows it: its pid plus its start time from
//! `/proc/PID/stat` (field 22, clock ticks since boot), so that a pid the
//! kernel has since given to another process is never taken for the VMM —
//! nor signalled.
//!
//! Every VMM also carries `NESTBOX_VM_DIR=<its VM directory>` in its
//! environment. A launcher killed between starting a VMM and recording its
//! pid leaves a process no record names; teardown finds it by that marker
//! in `/proc/PID/environ` (a marker no other process has, unlike a working
//! directory an administrator's shell may share).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// The environment variable that marks a VM's processes.
pub const MARKER_VAR: &str = "NESTBOX_VM_DIR";

/// A process identified by pid and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

/// What `/proc/PID/stat` says that matters here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// The session id (field 6).
    pub session: i64,
    /// The start time (field 22).
    pub start_time: u64,
}

/// Parses a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
#[must_use]
pub fn parse_stat(line: &str) -> Option<Stat> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state).
    Some(Stat {
        state: fields.first()?.chars().next()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn nix_pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

impl VmmProcess {
    /// The live process `pid`, with its start time.
    #[must_use]
    pub fn of(pid: u32) -> Option<Self> {
        stat(pid).map(|s| Self {
            pid,
            start_time: s.start_time,
        })
    }

    /// Whether this very process still runs (a zombie does not).
    #[must_use]
    pub fn is_alive(&self) -> bool {
        stat(self.pid)
            .is_some_and(|s| s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X'))
    }

    /// Sends `signal` if the process is still this one.
    ///
    /// # Errors
    /// The `kill` error (not for a process already gone).
    pub fn signal(&self, signal: Signal) -> Result<(), nix::Error> {
        if !self.is_alive() {
            return Ok(());
        }
        match nix::sys::signal::kill(nix_pid(self.pid), signal) {
            Err(nix::errno::Errno::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// Waits up to `timeout` for the process to end; true when it has.
    /// Reaps it if it is this process's child (when the library runs in a
    /// long-lived process such as a benchmark).
    #[must_use]
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            reap(self.pid);
            if !self.is_alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Collects the exit status of `pid` if it is an exited child of ours.
fn reap(pid: u32) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let _ = waitpid(nix_pid(pid), Some(WaitPidFlag::WNOHANG));
}

/// The processes whose environment carries `NESTBOX_VM_DIR=<dir>`.
#[must_use]
pub fn marked(dir: &Path) -> Vec<VmmProcess> {
    let mut entry = format!("{MARKER_VAR}=").into_bytes();
    entry.extend_from_slice(dir.as_os_str().as_encoded_bytes());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == entry.as_slice()))
        })
        .filter_map(VmmProcess::of)
        .filter(VmmProcess::is_alive)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let line = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 123456 1000 50 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                session: 4242,
                start_time: 123_456
            })
        );
        assert_eq!(parse_stat("1 (x) S 0"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_different_start_time_is_not_it() {
        let me = VmmProcess::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let impostor = VmmProcess {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
        impostor.signal(Signal::SIGKILL).unwrap();
        assert!(impostor.wait_gone(Duration::ZERO));
    }

    #[test]
    fn a_marked_child_is_found_killed_and_reaped() {
        let dir = std::env::temp_dir().join(format!("nb-marked-{}", std::process::id()));
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .env(MARKER_VAR, &dir)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            // The marker shows once the child has exec'd.
            let found = marked(&dir);
            if !found.is_empty() || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pid, child.id());
        found[0].signal(Signal::SIGKILL).unwrap();
        assert!(found[0].wait_gone(Duration::from_secs(5)));
        assert!(marked(&dir).is_empty());
        let _ = child.wait(); // already reaped by wait_gone
    }
}
