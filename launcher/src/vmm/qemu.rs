//! The QEMU backend: the `microvm` machine (virtio-mmio devices, no PCI,
//! no firmware) with ACPI and the RTC kept on — ACPI is how the guest sees
//! the virtio-mmio devices and the power button, and without the RTC the
//! boot takes seconds longer.
//!
//! Devices, per the contract: serial console to a file, virtio-net on the
//! VM's tap, two virtio-blk disks told apart by serial (`nestbox-data`,
//! read-write; `nestbox-config`, read-only), virtio-rng so the guest's
//! CRNG is ready at once under TCG, and QMP on a Unix socket for the
//! graceful stop (`system_powerdown` presses the ACPI power button).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::accel::{Accel, AccelChoice, AccelSetting};
use super::qmp::Qmp;
use super::{VmSpec, Vmm, VmmError};
use crate::guest_config::{CONFIG_SERIAL, DATA_SERIAL};
use crate::state::process::VmmProcess;

/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// QEMU, with the acceleration chosen once.
#[derive(Clone, Debug)]
pub struct Qemu {
    binary: PathBuf,
    accel: AccelChoice,
}

/// A path inside a QEMU option value, where `,` must be doubled.
fn opt_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

impl Qemu {
    /// The backend running `binary`, with the acceleration `setting`
    /// resolves to on this host.
    #[must_use]
    pub fn new(binary: &Path, setting: AccelSetting) -> Self {
        Self::with_accel(binary, super::accel::choose(setting))
    }

    /// The backend with a given acceleration (no probing).
    #[must_use]
    pub fn with_accel(binary: &Path, accel: AccelChoice) -> Self {
        Self {
            binary: binary.to_owned(),
            accel,
        }
    }

    /// QEMU's arguments for `spec`.
    #[must_use]
    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let accel = match self.accel.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg | Accel::None => "tcg",
        };
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("nestbox-{}", spec.name),
            "-machine".into(),
            "microvm,acpi=on,rtc=on".into(),
            "-accel".into(),
            accel.into(),
        ];
        if self.accel.accel == Accel::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args.extend([
            "-m".into(),
            spec.memory_mib.to_string(),
            "-smp".into(),
            spec.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            spec.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            spec.initramfs.to_string_lossy().into_owned(),
            "-append".into(),
            spec.cmdline.clone(),
            "-chardev".into(),
            format!(
                "file,id=console,path={},append=on",
                opt_path(&spec.console_log)
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-netdev".into(),
            format!("tap,id=net0,ifname={},script=no,downscript=no", spec.tap),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", spec.mac),
            "-drive".into(),
            format!(
                "id=data,file={},format=raw,if=none,discard=unmap",
                opt_path(&spec.data_disk)
            ),
            "-device".into(),
            format!("virtio-blk-device,drive=data,serial={DATA_SERIAL}"),
            "-drive".into(),
            format!(
                "id=config,file={},format=raw,if=none,read-only=on",
                opt_path(&spec.config_disk)
            ),
            "-device".into(),
            format!("virtio-blk-device,drive=config,serial={CONFIG_SERIAL}"),
            "-device".into(),
            "virtio-rng-device".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", opt_path(&spec.control_socket)),
        ]);
        args.into_iter().map(OsString::from).collect()
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    fn command(&self, spec: &VmSpec) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args(spec));
        cmd
    }

    fn is_up(&self, control_socket: &Path) -> bool {
        std::os::unix::net::UnixStream::connect(control_socket).is_ok()
    }

    fn request_stop(&self, control_socket: &Path, _process: &VmmProcess) -> Result<(), VmmError> {
        let control = |source| VmmError::Control {
            socket: control_socket.to_owned(),
            source,
        };
        let mut qmp = Qmp::connect(control_socket, QMP_TIMEOUT).map_err(control)?;
        qmp.execute("system_powerdown").map_err(control)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let dir = PathBuf::from("/var/lib/nestbox/vms/vm1");
        VmSpec {
            name: "vm1".into(),
            kernel: "/img/vmlinux".into(),
            initramfs: "/img/initramfs.cpio".into(),
            cmdline: "console=ttyS0 panic=-1".into(),
            memory_mib: 512,
            cpus: 1,
            tap: "nb2".into(),
            mac: "02:6e:62:7b:00:02".into(),
            console_log: dir.join("console.log"),
            data_disk: dir.join("data.img"),
            config_disk: dir.join("config.img"),
            control_socket: dir.join("qmp.sock"),
            dir,
        }
    }

    fn tcg() -> Qemu {
        Qemu::with_accel(
            Path::new("qemu-system-x86_64"),
            AccelChoice {
                accel: Accel::Tcg,
                why: "test".into(),
            },
        )
    }

    fn argv(qemu: &Qemu, spec: &VmSpec) -> String {
        qemu.args(spec)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_argv_is_a_microvm_with_the_contracts_devices() {
        let line = argv(&tcg(), &spec());
        let expected = [
            "-machine microvm,acpi=on,rtc=on",
            "-accel tcg",
            "-m 512 -smp 1",
            "-nodefaults -no-user-config -nographic -no-reboot",
            "-kernel /img/vmlinux -initrd /img/initramfs.cpio",
            "-append console=ttyS0 panic=-1",
            "-chardev file,id=console,path=/var/lib/nestbox/vms/vm1/console.log,append=on -serial chardev:console",
            "-netdev tap,id=net0,ifname=nb2,script=no,downscript=no",
            "-device virtio-net-device,netdev=net0,mac=02:6e:62:7b:00:02",
            "-drive id=data,file=/var/lib/nestbox/vms/vm1/data.img,format=raw,if=none,discard=unmap",
            "-device virtio-blk-device,drive=data,serial=nestbox-data",
            "-drive id=config,file=/var/lib/nestbox/vms/vm1/config.img,format=raw,if=none,read-only=on",
            "-device virtio-blk-device,drive=config,serial=nestbox-config",
            "-device virtio-rng-device",
            "-qmp unix:/var/lib/nestbox/vms/vm1/qmp.sock,server=on,wait=off",
        ];
        for part in expected {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
        assert!(!line.contains("-cpu"), "TCG keeps the default CPU: {line}");
        // The command line is one argument, spaces and all.
        let args = tcg().args(&spec());
        let i = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[i + 1], "console=ttyS0 panic=-1");
    }

    #[test]
    fn kvm_gets_the_host_cpu() {
        let kvm = Qemu::with_accel(
            Path::new("qemu-system-x86_64"),
            AccelChoice {
                accel: Accel::Kvm,
                why: "test".into(),
            },
        );
        let line = argv(&kvm, &spec());
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
    }

    #[test]
    fn commas_in_paths_are_doubled() {
        let mut spec = spec();
        spec.data_disk = PathBuf::from("/srv/a,b/data.img");
        let line = argv(&tcg(), &spec);
        assert!(
            line.contains("file=/srv/a,,b/data.img,format=raw"),
            "{line}"
        );
    }
}
