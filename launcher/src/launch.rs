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

impl Launcher {
    /// What the VMM of `record` runs with.
    pub(crate) fn spec(
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
            kernel: image.kernel(),
            initramfs: image.initramfs(),
            cmdline: cmdline::kernel_cmdline(cmdline::host_tsc_khz()),
            memory_mib: record.memory_mib,
            cpus: record.cpus,
            tap: record.tap.clone(),
            mac: record.mac.clone(),
            console_log: dir.console_log(),
            data_disk: dir.data_disk(),
            config_disk: dir.config_disk(),
            control_socket,
        })
    }

    /// Starts the VMM for `record`, records its process (before waiting,
    /// so that a launcher killed while it waits leaves a VMM the record
    /// names), waits until it is up, and marks the VM ready.
    pub(crate) fn launch(
        dir: &VmDir,
        record: &mut VmRecord,
        image: &Image,
        vmm: &dyn Vmm,
    ) -> Result<(), LauncherError> {
        let spec = Self::spec(dir, record, image)?;
        // A socket file left by a VMM that died would look like one that is up.
        let _ = std::fs::remove_file(&spec.control_socket);
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
