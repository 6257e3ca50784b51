//! Launch: start the VMM of a prepared VM (network and disks in place),
//! record it, and wait until it is up. Shared by `create` and `start`.

use std::time::Duration;

use crate::image::Image;
use crate::state::VmDir;
use crate::state::record::{Phase, VmRecord};
use crate::vmm::{VmSpec, Vmm, VmmError, cmdline, spawn};
use crate::{Launcher, LauncherError};

/// How long a VMM may take to be up (QEMU: to listen on QMP).
const UP_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The user (and group) id of the VM at `address`'s VMM: the address as a
/// number. Unique on the host as long as VM addresses are (two VMs cannot
/// share an address), so no VMM can signal, trace or read another's; no
/// allocation to keep; and far above the ids of the host's own users
/// (10.0.0.0 is 167,772,160).
#[must_use]
pub fn vmm_uid(address: std::net::Ipv4Addr) -> u32 {
    u32::from(address)
}

/// `path` without `..` or symbolic links, when it exists.
fn canonical(path: std::path::PathBuf) -> std::path::PathBuf {
    std::fs::canonicalize(&path).unwrap_or(path)
}

impl Launcher {
    /// What the VMM of `record` runs with.
    pub(crate) fn spec(
        &self,
        dir: &VmDir,
        record: &VmRecord,
        image: &Image,
    ) -> Result<VmSpec, LauncherError> {
        let control_socket = dir.control_socket();
        if control_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmmError::SocketPath(control_socket).into());
        }
        Ok(VmSpec {
            name: record.name.clone(),
            dir: dir.path().to_owned(),
            // Canonical: the jail shows them at exactly this path.
            kernel: canonical(image.kernel()),
            initramfs: canonical(image.initramfs()),
            cmdline: cmdline::kernel_cmdline(cmdline::host_tsc_khz(), self.config.mitigations),
            memory_mib: record.memory_mib,
            cpus: record.cpus,
            tap: record.tap.clone(),
            mac: record.mac.clone(),
            console_log: dir.console_log(),
            data_disk: dir.data_disk(),
            user_disk: record.user_disk.then(|| dir.user_disk()),
            config_disk: dir.config_disk(),
            control_socket,
            uid: vmm_uid(record.address),
        })
    }

    /// Starts the VMM for `record`, records its process (before waiting,
    /// so that a launcher killed while it waits leaves a VMM the record
    /// names), waits until it is up, and marks the VM ready.
    pub(crate) fn launch(
        &self,
        dir: &VmDir,
        record: &mut VmRecord,
        image: &Image,
        vmm: &dyn Vmm,
    ) -> Result<(), LauncherError> {
        let spec = self.spec(dir, record, image)?;
        let started = spawn::spawn(vmm, &spec, &dir.vmm_log())?;
        record.set_process(Some(started.process));
        vmm.name().clone_into(&mut record.vmm);
        record.accel = vmm.accel().accel;
        record.image_version.clone_from(&image.manifest.version);
        record.save(dir)?;
        started.wait_up(vmm, &spec, &dir.vmm_log(), UP_TIMEOUT)?;
        record.phase = Phase::Ready;
        record.save(dir)?;
        Ok(())
    }
}
