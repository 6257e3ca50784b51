//! The QEMU backend: the `microvm` machine (virtio-mmio devices, no PCI,
//! no firmware) with ACPI and the RTC kept on — ACPI is how the guest sees
//! the virtio-mmio devices and the power button, and without the RTC the
//! boot takes seconds longer.
//!
//! Devices, per the contract: serial console to a file, virtio-net on the
//! VM's tap, virtio-blk disks told apart by serial (`nestbox-data` and
//! `nestbox-user`, read-write; `nestbox-config`, read-only), virtio-rng so
//! the guest's CRNG is ready at once under TCG, and QMP for the graceful
//! stop (`system_powerdown` presses the ACPI power button). Every one of
//! them comes as a descriptor the launcher opened ([`super::fds`]): QEMU
//! runs jailed as the VM's own user and may open nothing.
//!
//! QEMU's seccomp sandbox is on with every option that denies: obsolete
//! system calls, raising privileges (it never had any to drop), spawning
//! processes and changing its own scheduling or resources.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::accel::{Accel, AccelChoice, AccelSetting};
use super::fds;
use super::qmp::Qmp;
use super::{VmSpec, Vmm, VmmError};
use crate::guest_config::{CONFIG_SERIAL, DATA_SERIAL, USER_SERIAL};
use crate::state::process::VmmProcess;

/// How long one QMP exchange may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the launcher's "is it up yet" probe waits for the greeting.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// QEMU's seccomp sandbox, everything denied that can be.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The TCG translation cache, in MiB: bounded so that QEMU's memory is
/// (QEMU's own default is 1 GiB).
const TB_MIB: u32 = 128;

/// QEMU, with the acceleration chosen once.
#[derive(Clone, Debug)]
pub struct Qemu {
    binary: PathBuf,
    accel: AccelChoice,
}

/// The arguments that add a descriptor set `set` holding `fds`, and the
/// path QEMU opens it by.
fn fdset(args: &mut Vec<String>, set: u32, fds: &[i32]) -> String {
    for fd in fds {
        args.extend(["-add-fd".into(), format!("fd={fd},set={set}")]);
    }
    format!("/dev/fdset/{set}")
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

    /// QEMU's arguments for `spec`, with the devices at the descriptor
    /// numbers of [`fds`].
    #[must_use]
    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let accel = match self.accel.accel {
            Accel::Kvm => "kvm".to_owned(),
            Accel::Tcg | Accel::None => format!("tcg,tb-size={TB_MIB}"),
        };
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("nestbox-{}", spec.name),
            "-machine".into(),
            "microvm,acpi=on,rtc=on".into(),
            "-accel".into(),
            accel,
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
            "-sandbox".into(),
            SANDBOX.into(),
            "-kernel".into(),
            spec.kernel.to_string_lossy().into_owned(),
            "-initrd".into(),
            spec.initramfs.to_string_lossy().into_owned(),
            "-append".into(),
            spec.cmdline.clone(),
        ]);
        let console = fdset(&mut args, 1, &[fds::CONSOLE]);
        args.extend([
            "-chardev".into(),
            format!("file,id=console,path={console},append=on"),
            "-serial".into(),
            "chardev:console".into(),
            "-netdev".into(),
            format!("tap,id=net0,fd={}", fds::TAP),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", spec.mac),
        ]);
        let data = fdset(&mut args, 2, &[fds::DATA, fds::DATA_RO]);
        args.extend([
            "-drive".into(),
            format!("id=data,file={data},format=raw,if=none,discard=unmap"),
            "-device".into(),
            format!("virtio-blk-device,drive=data,serial={DATA_SERIAL}"),
        ]);
        if spec.user_disk.is_some() {
            let user = fdset(&mut args, 3, &[fds::USER, fds::USER_RO]);
            args.extend([
                "-drive".into(),
                format!("id=user,file={user},format=raw,if=none,discard=unmap"),
                "-device".into(),
                format!("virtio-blk-device,drive=user,serial={USER_SERIAL}"),
            ]);
        }
        let config = fdset(&mut args, 4, &[fds::CONFIG]);
        args.extend([
            "-drive".into(),
            format!("id=config,file={config},format=raw,if=none,read-only=on"),
            "-device".into(),
            format!("virtio-blk-device,drive=config,serial={CONFIG_SERIAL}"),
            "-device".into(),
            "virtio-rng-device".into(),
            "-chardev".into(),
            format!("socket,id=control,fd={},server=on,wait=off", fds::CONTROL),
            "-mon".into(),
            "chardev=control,mode=control".into(),
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

    fn cache_mib(&self) -> u32 {
        if self.accel.accel == Accel::Kvm {
            0
        } else {
            TB_MIB
        }
    }

    /// Up once QEMU answers on the control socket: the launcher made the
    /// socket, so a connection alone would succeed before QEMU runs.
    fn is_up(&self, control_socket: &Path) -> bool {
        Qmp::connect(control_socket, PROBE_TIMEOUT).is_ok()
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
            user_disk: Some(dir.join("user.img")),
            config_disk: dir.join("config.img"),
            control_socket: dir.join("qmp.sock"),
            uid: 175_833_090,
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
    fn the_argv_is_a_sandboxed_microvm_with_every_device_a_descriptor() {
        let line = argv(&tcg(), &spec());
        let expected = [
            "-machine microvm,acpi=on,rtc=on",
            "-accel tcg,tb-size=128",
            "-m 512 -smp 1",
            "-nodefaults -no-user-config -nographic -no-reboot",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel /img/vmlinux -initrd /img/initramfs.cpio",
            "-append console=ttyS0 panic=-1",
            "-add-fd fd=4,set=1 -chardev file,id=console,path=/dev/fdset/1,append=on -serial chardev:console",
            "-netdev tap,id=net0,fd=3",
            "-device virtio-net-device,netdev=net0,mac=02:6e:62:7b:00:02",
            "-add-fd fd=6,set=2 -add-fd fd=7,set=2 -drive id=data,file=/dev/fdset/2,format=raw,if=none,discard=unmap",
            "-device virtio-blk-device,drive=data,serial=nestbox-data",
            "-add-fd fd=8,set=3 -add-fd fd=9,set=3 -drive id=user,file=/dev/fdset/3,format=raw,if=none,discard=unmap",
            "-device virtio-blk-device,drive=user,serial=nestbox-user",
            "-add-fd fd=10,set=4 -drive id=config,file=/dev/fdset/4,format=raw,if=none,read-only=on",
            "-device virtio-blk-device,drive=config,serial=nestbox-config",
            "-device virtio-rng-device",
            "-chardev socket,id=control,fd=5,server=on,wait=off -mon chardev=control,mode=control",
        ];
        for part in expected {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
        assert!(!line.contains("-cpu"), "TCG keeps the default CPU: {line}");
        assert!(
            !line.contains("/var/lib/nestbox"),
            "QEMU opens no path of the VM's: {line}"
        );
        // The command line is one argument, spaces and all.
        let args = tcg().args(&spec());
        let i = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[i + 1], "console=ttyS0 panic=-1");
        // A VM from before user disks has none.
        let mut old = spec();
        old.user_disk = None;
        assert!(!argv(&tcg(), &old).contains("nestbox-user"));
    }

    #[test]
    fn kvm_gets_the_host_cpu_and_no_translation_cache() {
        let kvm = Qemu::with_accel(
            Path::new("qemu-system-x86_64"),
            AccelChoice {
                accel: Accel::Kvm,
                why: "test".into(),
            },
        );
        let line = argv(&kvm, &spec());
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert_eq!(kvm.cache_mib(), 0);
        assert_eq!(tcg().cache_mib(), 128);
    }
}
