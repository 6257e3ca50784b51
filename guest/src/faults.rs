//! Crash points for the fault-injection suite (`tests/tests/faults.rs`).
//!
//! Compiled in only with the `faults` feature, which the tests' builds
//! turn on (`cargo xtask test` builds the guest and a second VM image with
//! it) and a shipped image never has: without it the points are not
//! compiled, [`armed`] never resolves, and `/v1/faults` does not exist.
//!
//! A test arms a fault through `POST /v1/faults` (the VM's API, so it works
//! in a real VM as in the netns-simulated guest):
//! `{"point": "durable.renamed", "subject": "certs/", "action": "crash",
//! "skip": 0}`. The first time the running code passes a point of that
//! name whose subject (the file being written, the services being synced)
//! contains `subject`, after `skip` passes, the action happens once:
//! - `crash`: the VM stops dead, as at a power cut — in a VM the platform
//!   restarts the kernel itself, without syncing (QEMU runs with
//!   `-no-reboot`, so it exits and nothing in the guest's page cache
//!   reaches the disk; the platform's plain death would not do: PID 1 then
//!   syncs and powers off); outside a VM only the process aborts;
//! - `hang`: the thread stops there for ever (the test then kills QEMU:
//!   a host crash in the middle of the operation);
//! - `panic`: the task panics (its supervisor restarts it).
//!
//! The points: `durable.written`, `durable.synced` and `durable.renamed`
//! (each step of every atomic file replacement: service definitions,
//! certificates; the subject is the file), `logs.sync` (log lines written,
//! not yet synced; the subject is the services), `portwatch` (the port
//! watcher's event loop; only `panic`), `api` (the API's listeners: a
//! `panic` restarts the API, dropping its connections; only `panic`), and
//! the storage stack's steps (the subject is the checkpoint's id):
//! `storage.snapshotted` (a checkpoint's snapshot made, its record not
//! written), `storage.swap` (a restore's writable snapshot made, not yet
//! swapped in) and `storage.swapped` (swapped in and synced, the old layer
//! not yet deleted).

#[cfg(feature = "faults")]
pub use enabled::{Fault, arm, armed, install, list, point};

/// Never resolves: this build has no crash points.
#[cfg(not(feature = "faults"))]
pub async fn armed(_name: &'static str) {
    std::future::pending::<()>().await;
}

/// Nothing to install: this build has no crash points.
#[cfg(not(feature = "faults"))]
pub fn install(_in_vm: bool) {}

#[cfg(feature = "faults")]
mod enabled {
    use std::sync::OnceLock;

    use std::sync::atomic::{AtomicBool, Ordering};

    use parking_lot::Mutex;
    use serde::{Deserialize, Serialize};
    use tokio::sync::Notify;

    /// What happens at an armed point.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Action {
        /// Stop the VM dead (reboot without sync), or abort the process.
        Crash,
        /// Stop this thread for ever.
        Hang,
        /// Panic.
        Panic,
    }

    /// One armed fault.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Fault {
        /// The point's name (see the module's documentation).
        pub point: String,
        /// Only where the point's subject contains this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub subject: Option<String>,
        /// What happens there.
        pub action: Action,
        /// Matching passes let by first.
        #[serde(default)]
        pub skip: u32,
    }

    const POINTS: &[&str] = &[
        "durable.written",
        "durable.synced",
        "durable.renamed",
        "logs.sync",
        "portwatch",
        "api",
        "storage.snapshotted",
        "storage.swap",
        "storage.swapped",
    ];

    static ARMED: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

    /// Whether the platform runs as a VM's (a crash may stop the kernel).
    static IN_VM: AtomicBool = AtomicBool::new(false);

    fn notify() -> &'static Notify {
        static NOTIFY: OnceLock<Notify> = OnceLock::new();
        NOTIFY.get_or_init(Notify::new)
    }

    /// Makes the atomic writes of `nestbox-durable` crash points too;
    /// `in_vm` says whether this is a VM's platform (under PID 1 of its
    /// own kernel), where a crash stops the kernel.
    pub fn install(in_vm: bool) {
        IN_VM.store(in_vm, Ordering::SeqCst);
        nestbox_durable::faults::set_hook(|name, path| point(name, &path.to_string_lossy()));
    }

    /// Arms `fault`.
    ///
    /// # Errors
    /// A message if the point does not exist.
    pub fn arm(fault: Fault) -> Result<(), String> {
        if !POINTS.contains(&fault.point.as_str()) {
            return Err(format!(
                "no crash point {:?}; there are {POINTS:?}",
                fault.point
            ));
        }
        tracing::warn!(?fault, "fault armed");
        ARMED.lock().push(fault);
        notify().notify_waiters();
        Ok(())
    }

    /// The armed fault that fires at this pass of `name`, if any (taken).
    fn take(name: &str, subject: &str) -> Option<Fault> {
        let mut armed = ARMED.lock();
        let i = armed.iter().position(|f| {
            f.point == name && f.subject.as_deref().is_none_or(|s| subject.contains(s))
        })?;
        if armed[i].skip > 0 {
            armed[i].skip -= 1;
            return None;
        }
        Some(armed.remove(i))
    }

    /// A crash point: does what a fault armed for it says, if one is.
    pub fn point(name: &'static str, subject: &str) {
        let Some(fault) = take(name, subject) else {
            return;
        };
        // On the console before anything else: the test reads it there.
        eprintln!(
            "nestbox-guest: fault: {:?} at {name} ({subject})",
            fault.action
        );
        match fault.action {
            Action::Crash => crash(),
            Action::Hang => loop {
                std::thread::park();
            },
            Action::Panic => panic!("injected fault at {name} ({subject})"),
        }
    }

    /// Resolves when a fault is armed for `name` (whose action is then
    /// carried out by the caller: only `panic` makes sense in a task).
    pub async fn armed(name: &'static str) {
        loop {
            let notified = notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(fault) = take(name, "") {
                eprintln!("nestbox-guest: fault: {:?} at {name}", fault.action);
                return;
            }
            notified.await;
        }
    }

    /// A power cut: in a VM, restart the kernel without syncing anything;
    /// otherwise (the netns-simulated guest, on the CI machine's own
    /// kernel) only this process dies.
    fn crash() -> ! {
        if IN_VM.load(Ordering::SeqCst) {
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        }
        std::process::abort()
    }

    /// What is armed now.
    pub fn list() -> Vec<Fault> {
        ARMED.lock().clone()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_fault_fires_once_after_its_skips_and_only_on_its_subject() {
            arm(Fault {
                point: "logs.sync".into(),
                subject: Some("only-this".into()),
                action: Action::Panic,
                skip: 1,
            })
            .unwrap();
            // Another subject: not even counted.
            assert!(take("logs.sync", "other").is_none());
            // The skipped pass.
            assert!(take("logs.sync", "only-this svc").is_none());
            assert!(take("logs.sync", "only-this svc").is_some());
            assert!(take("logs.sync", "only-this svc").is_none());
            assert!(
                arm(Fault {
                    point: "nowhere".into(),
                    subject: None,
                    action: Action::Crash,
                    skip: 0,
                })
                .is_err()
            );
        }
    }
}
