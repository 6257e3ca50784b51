//! Destroy: remove a VM and everything it had — VMM process, nftables
//! table, route, tap, disks, logs, token, record. Works on a running,
//! stopped, crashed or half-made VM. Every step runs even when one before
//! failed; the record goes last, only when all the rest is gone, so a
//! failed destroy can simply be run again.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::name::VmName;
use crate::state::VmDir;
use crate::state::process::{self, VmmProcess};
use crate::state::record::{Phase, VmRecord};
use crate::{Launcher, LauncherError, net};

/// How long a process killed with SIGKILL may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl Launcher {
    /// Destroys VM `name`.
    ///
    /// # Errors
    /// [`LauncherError::NotFound`], or [`LauncherError::Teardown`] listing
    /// every step that failed.
    pub fn destroy(&self, name: &str) -> Result<(), LauncherError> {
        let name = VmName::new(name)?;
        let _span = tracing::info_span!("destroy", vm = %name).entered();
        let _lock = self.lock()?;
        let dir = self.state.vm(&name);
        let mut record = VmRecord::load(&dir)?;
        if record.is_none() && !dir.path().exists() {
            return Err(LauncherError::NotFound(name.to_string()));
        }
        if let Some(r) = &mut record {
            r.phase = Phase::Destroying;
            r.save(&dir)?;
        }
        let mut errors = Self::tear_down(&dir, record.as_ref());
        if errors.is_empty()
            && let Err(e) = Self::remove_dir(&dir)
        {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LauncherError::Teardown {
                name: name.to_string(),
                errors,
            })
        }
    }

    /// Kills the VM's processes, removes its network and every file but
    /// the record; returns every failure. Idempotent.
    pub(crate) fn tear_down(dir: &VmDir, record: Option<&VmRecord>) -> Vec<String> {
        let mut errors = Vec::new();
        // The recorded VMM, and any process started for this VM that no
        // record names (a launcher killed between spawn and record).
        let mut victims = process::marked(dir.path());
        if let Some(p) = record.and_then(VmRecord::process)
            && p.is_alive()
            && !victims.contains(&p)
        {
            victims.push(p);
        }
        for p in &victims {
            if let Err(e) = p.signal(Signal::SIGKILL) {
                errors.push(format!("kill the VMM (pid {}): {e}", p.pid));
            }
        }
        for p in victims
            .iter()
            .filter(|p| !VmmProcess::wait_gone(p, KILL_WAIT))
        {
            errors.push(format!("the VMM (pid {}) survived SIGKILL", p.pid));
        }
        if let Some(r) = record {
            errors.extend(
                net::tear_down(&r.tap, r.address)
                    .iter()
                    .map(ToString::to_string),
            );
            if let Err(e) = crate::vmm::cgroup::remove_for(&r.tap) {
                errors.push(e.to_string());
            }
        }
        match std::fs::read_dir(dir.path()) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path == dir.record() {
                        continue;
                    }
                    // The jail's (empty) mount point is the one directory.
                    let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        std::fs::remove_dir(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    if let Err(e) = removed
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        errors.push(format!("remove {}: {e}", path.display()));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("read {}: {e}", dir.path().display())),
        }
        errors
    }

    /// Removes the record, then the (otherwise empty) directory.
    pub(crate) fn remove_dir(dir: &VmDir) -> Result<(), LauncherError> {
        match std::fs::remove_file(dir.record()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LauncherError::file("remove", &dir.record())(e));
            }
            _ => {}
        }
        match std::fs::remove_dir(dir.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(LauncherError::file("remove", dir.path())(e))
            }
            _ => Ok(()),
        }
    }
}
