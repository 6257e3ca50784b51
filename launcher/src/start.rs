//! Start: run a stopped (or crashed) VM again, with its data disk as it
//! was. The network is set up again (idempotent: a host reboot loses taps)
//! and the config disk rewritten from the current `launcher.toml`; the VM
//! boots the image installed now, which is how a platform update reaches a
//! VM — on its next boot, never while it runs.

use crate::image::Image;
use crate::name::VmName;
use crate::state::process::VmmProcess;
use crate::state::record::VmRecord;
use crate::state::status::{self, VmState};
use crate::vmm::Vmm;
use crate::{Launcher, LauncherError, token};

impl Launcher {
    /// Starts VM `name` with `vmm`; returns its updated record.
    ///
    /// # Errors
    /// [`LauncherError::Running`], [`LauncherError::Incomplete`], or the
    /// failing step (the VM is then stopped again).
    pub fn start(&self, name: &str, vmm: &dyn Vmm) -> Result<VmRecord, LauncherError> {
        let name = VmName::new(name)?;
        let image = Image::open(&self.config.image)?;
        let _span = tracing::info_span!("start", vm = %name).entered();
        let _lock = self.lock()?;
        let (dir, mut record) = self.load(&name)?;
        match status::classify(&record, false, VmmProcess::is_alive) {
            VmState::Running => return Err(LauncherError::Running(name.to_string())),
            VmState::Stopped | VmState::Crashed => {}
            VmState::Creating | VmState::Destroying | VmState::Incomplete => {
                return Err(LauncherError::Incomplete(name.to_string()));
            }
        }
        record.set_process(None);
        let result = self
            .network(&record)
            .set_up()
            .map_err(LauncherError::from)
            .and_then(|()| {
                let token = token::read(&dir.token())?;
                self.write_disks(&dir, &record, &token::sha256_hex(&token))?;
                self.launch(&dir, &mut record, &image, vmm)
            });
        if let Err(error) = result {
            record.set_process(None);
            let _ = record.save(&dir);
            return Err(error);
        }
        Ok(record)
    }
}
