//! Stop: ask the guest to power off (QEMU: ACPI power button through QMP),
//! wait for the VMM to exit, and SIGKILL it after the timeout. The tap,
//! disks and record stay; `start` boots the VM again.
//!
//! The state lock is held to read and to update the record, not while
//! waiting, so a slow guest does not hold up other VMs' commands.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::name::VmName;
use crate::state::record::{Phase, VmRecord};
use crate::vmm::{Vmm, VmmError};
use crate::{Launcher, LauncherError};

/// How long a VMM killed with SIGKILL may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How a stop went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest powered off within the timeout.
    Graceful,
    /// The VMM was killed: the guest did not power off in time, or the
    /// request could not be delivered (the reason).
    Killed(String),
    /// It was not running.
    AlreadyStopped,
    /// Its VMM had died without a stop (now recorded as stopped).
    WasCrashed,
}

impl Launcher {
    /// Stops VM `name`, waiting up to `timeout` for a clean power-off.
    ///
    /// # Errors
    /// [`LauncherError::NotFound`], [`LauncherError::Incomplete`], or a VMM
    /// that survives SIGKILL.
    pub fn stop(
        &self,
        name: &str,
        timeout: Duration,
        vmm: &dyn Vmm,
    ) -> Result<StopOutcome, LauncherError> {
        let name = VmName::new(name)?;
        let _span = tracing::info_span!("stop", vm = %name).entered();
        let (dir, process) = {
            let _lock = self.lock()?;
            let (dir, mut record) = self.load(&name)?;
            if record.phase != Phase::Ready {
                return Err(LauncherError::Incomplete(name.to_string()));
            }
            let Some(process) = record.process() else {
                return Ok(StopOutcome::AlreadyStopped);
            };
            if !process.is_alive() {
                record.set_process(None);
                record.save(&dir)?;
                return Ok(StopOutcome::WasCrashed);
            }
            (dir, process)
        };

        let outcome = match vmm.request_stop(&dir.control_socket(), &process) {
            Ok(()) if process.wait_gone(timeout) => StopOutcome::Graceful,
            Ok(()) => StopOutcome::Killed(format!(
                "the guest did not power off within {} s",
                timeout.as_secs()
            )),
            Err(e) => StopOutcome::Killed(e.to_string()),
        };
        if let StopOutcome::Killed(why) = &outcome {
            tracing::warn!(%why, pid = process.pid, "killing the VMM");
            process
                .signal(Signal::SIGKILL)
                .map_err(|source| VmmError::Signal {
                    pid: process.pid,
                    source,
                })?;
            if !process.wait_gone(KILL_WAIT) {
                return Err(LauncherError::Unkillable {
                    name: name.to_string(),
                    pid: process.pid,
                });
            }
        }

        let _lock = self.lock()?;
        if let Some(mut record) = VmRecord::load(&dir)? {
            // Unless someone else has restarted it meanwhile.
            if record.process() == Some(process) {
                record.set_process(None);
                record.save(&dir)?;
                if let Err(e) = crate::vmm::cgroup::remove_for(&record.tap) {
                    tracing::warn!(%e, "the VMM's cgroup stays until the next start or destroy");
                }
            }
        }
        Ok(outcome)
    }
}
