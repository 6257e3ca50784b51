//! PID 1 duties, used only when `nestbox-guest` is the VM's init.
//!
//! As PID 1 the guest mounts what a Linux userland needs (`/proc`, `/sys`,
//! `/dev`, `/run`, cgroup2 at `/sys/fs/cgroup`, bpffs), then forks: the
//! child runs the platform ([`crate::run`]) like `nestbox-guest run` does,
//! the parent stays PID 1. PID 1 reaps every orphan (they are all
//! reparented to it; reaping there never steals an exit status from the
//! platform's own process waits, which live in the child), passes SIGTERM
//! and SIGINT on to the platform (which stops services in order, flushes
//! logs and exits), and when the platform has exited, syncs and powers the
//! VM off. Network and data disk setup happen in the platform, with
//! rtnetlink ([`configure_network`]). Outside PID 1 none of this runs: the
//! host already has its mounts and network.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use serde::Deserialize;

/// One filesystem PID 1 mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseMount {
    /// Filesystem type (also the source).
    pub fstype: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Flags.
    pub flags: MsFlags,
    /// Options.
    pub data: Option<&'static str>,
}

/// What a userland needs, in order (parents first).
#[must_use]
pub fn base_mounts() -> Vec<BaseMount> {
    let secure = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        BaseMount {
            fstype: "proc",
            target: "/proc",
            flags: secure,
            data: None,
        },
        BaseMount {
            fstype: "sysfs",
            target: "/sys",
            flags: secure,
            data: None,
        },
        BaseMount {
            fstype: "devtmpfs",
            target: "/dev",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        BaseMount {
            fstype: "devpts",
            target: "/dev/pts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("ptmxmode=0666,mode=620"),
        },
        BaseMount {
            fstype: "tmpfs",
            target: "/run",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        BaseMount {
            fstype: "cgroup2",
            target: "/sys/fs/cgroup",
            flags: secure,
            data: None,
        },
        BaseMount {
            fstype: "bpf",
            target: "/sys/fs/bpf",
            flags: secure,
            data: None,
        },
    ]
}

/// Where the guest image lists the kernel modules PID 1 loads: absolute
/// `.ko` paths, one per line, dependencies first.
pub const MODULE_LIST: &str = "/etc/nestbox/modules";
/// The modules loaded once the platform serves (btrfs, for the user's
/// disk: its load runs the raid6 benchmark, ~2 s under TCG), same format.
pub const LATE_MODULE_LIST: &str = "/etc/nestbox/modules.late";

/// Loads the modules of `list` in order with `finit_module` (virtio
/// transports and disks, overlayfs, veth, `nf_tables`, the power button: the
/// cloud kernel builds none of them in). A module already loaded or built
/// in is fine; any other failure is reported and the next module is tried.
/// No list (a kernel that needs none) is fine too.
pub fn load_modules(list: &Path) {
    let Ok(text) = std::fs::read_to_string(list) else {
        return;
    };
    for path in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let loaded = std::fs::File::open(path)
            .map_err(|e| e.to_string())
            .and_then(|file| {
                match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            });
        if let Err(why) = loaded {
            eprintln!("nestbox-guest: cannot load kernel module {path}: {why}");
        }
    }
}

/// Makes `/` a mount that `pivot_root` can leave. The kernel unpacks the
/// initramfs into `rootfs`, the one mount with no parent, and `pivot_root`
/// refuses to move away from it — which the inner container must do. So PID
/// 1 binds the initramfs onto a directory of itself, moves that bind mount
/// over `/` and `chroot`s into it: the same files, now on a mount whose
/// parent is `rootfs`. Nothing to do when `/` is a real filesystem.
///
/// # Errors
/// The failing step.
pub fn make_root_pivotable() -> Result<(), String> {
    use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};
    // linux/magic.h; nix names TMPFS_MAGIC but not this one.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let kind = statfs("/")
        .map_err(|e| format!("statfs /: {e}"))?
        .filesystem_type();
    if kind != RAMFS_MAGIC && kind != TMPFS_MAGIC {
        return Ok(());
    }
    let dir = Path::new("/.nestbox-root");
    let step = |what: &str| {
        let what = what.to_owned();
        move |e: nix::errno::Errno| format!("{what}: {e}")
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    nix::mount::mount(Some("/"), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(step("bind / on itself"))?;
    nix::unistd::chdir(dir).map_err(step("chdir into the bind mount"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("move the bind mount to /"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// The block device `spec` names: `virtio:SERIAL` is the virtio disk whose
/// serial the VMM set to `SERIAL` (device names depend on probe order, the
/// serial does not); anything else is a path. Waits a little for the disk
/// to appear (its driver was just loaded).
///
/// # Errors
/// No disk with that serial.
pub fn resolve_device(spec: &Path) -> Result<PathBuf, String> {
    let Some(serial) = spec.to_str().and_then(|s| s.strip_prefix("virtio:")) else {
        return Ok(spec.to_owned());
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(name) = disk_with_serial(Path::new("/sys/block"), serial) {
            return Ok(Path::new("/dev").join(name));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "no virtio disk has serial {serial:?} (the VMM must attach it with serial={serial})"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The name of the disk under `sys_block` whose `serial` is `serial`.
fn disk_with_serial(sys_block: &Path, serial: &str) -> Option<String> {
    std::fs::read_dir(sys_block)
        .ok()?
        .flatten()
        .find(|d| {
            std::fs::read_to_string(d.path().join("serial")).is_ok_and(|s| s.trim() == serial)
        })
        .map(|d| d.file_name().to_string_lossy().into_owned())
}

/// Calls `on_press` when the VM's power button is pressed (the VMM's
/// graceful stop: ACPI power button → evdev `KEY_POWER`). One thread per
/// power-button input device; nothing happens if there is none.
pub fn watch_power_button(on_press: impl Fn() + Clone + Send + 'static) {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let Ok(inputs) = std::fs::read_dir("/sys/class/input") else {
        return;
    };
    for input in inputs.flatten() {
        let name = input.file_name().to_string_lossy().into_owned();
        let is_button = std::fs::read_to_string(input.path().join("device/name"))
            .is_ok_and(|n| n.trim() == "Power Button");
        if !name.starts_with("event") || !is_button {
            continue;
        }
        let Ok(mut dev) = std::fs::File::open(Path::new("/dev/input").join(&name)) else {
            continue;
        };
        let on_press = on_press.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            // struct input_event on 64-bit: timeval (16), type u16, code u16, value i32.
            let mut ev = [0u8; 24];
            while dev.read_exact(&mut ev).is_ok() {
                let kind = u16::from_ne_bytes([ev[16], ev[17]]);
                let code = u16::from_ne_bytes([ev[18], ev[19]]);
                let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                if kind == EV_KEY && code == KEY_POWER && value == 1 {
                    on_press();
                }
            }
        });
    }
}

/// The mount points listed in a `/proc/self/mountinfo` text.
#[must_use]
pub fn mounted(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect()
}

/// Mounts what is not mounted yet; failures are reported and skipped (a
/// kernel without bpffs still runs everything but the port watcher).
pub fn mount_base() {
    for m in base_mounts() {
        let already = std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|t| mounted(&t).iter().any(|p| p == m.target));
        if already {
            continue;
        }
        let _ = std::fs::create_dir_all(m.target);
        if let Err(err) =
            nix::mount::mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data)
        {
            eprintln!(
                "nestbox-guest: cannot mount {} on {}: {err}",
                m.fstype, m.target
            );
        }
    }
}

/// The VM's interface settings (`[network]` in the configuration).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The interface (`eth0`).
    #[serde(default = "default_interface")]
    pub interface: String,
    /// Its address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
}

fn default_interface() -> String {
    "eth0".into()
}

/// Errors configuring the network.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A netlink request failed.
    #[error("network setup: {what}: {source}")]
    Netlink {
        /// The step.
        what: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// No netlink socket.
    #[error("network setup: no netlink socket: {0}")]
    Socket(#[source] std::io::Error),
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<u32, InitError> {
    let what = || format!("find {name}");
    crate::container::egress::link_index(handle, name)
        .await
        .map_err(|source| InitError::Netlink {
            what: what(),
            source,
        })?
        .ok_or_else(|| InitError::Netlink {
            what: what(),
            source: rtnetlink::Error::RequestFailed,
        })
}

/// Brings `lo` and the VM's interface up, addresses it and adds the
/// default route (as PID 1, from the `[network]` configuration).
///
/// # Errors
/// [`InitError`] naming the step.
pub async fn configure_network(net: &Network) -> Result<(), InitError> {
    use rtnetlink::{LinkUnspec, RouteMessageBuilder};
    let (conn, handle, _) = rtnetlink::new_connection().map_err(InitError::Socket)?;
    tokio::spawn(conn);
    let step = |what: &str| {
        let what = what.to_owned();
        move |source| InitError::Netlink { what, source }
    };
    for name in ["lo", net.interface.as_str()] {
        let index = link_index(&handle, name).await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(step(&format!("bring {name} up")))?;
    }
    let index = link_index(&handle, &net.interface).await?;
    handle
        .address()
        .add(index, net.address.into(), net.prefix_len)
        .execute()
        .await
        .map_err(step(&format!("address {}", net.interface)))?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(net.gateway)
                .build(),
        )
        .execute()
        .await
        .map_err(step("default route"))?;
    Ok(())
}

/// The configuration file PID 1 reads: `nestbox.config=PATH` on the kernel
/// command line, else `/etc/nestbox/guest.toml`.
#[must_use]
pub fn config_path(cmdline: &str) -> PathBuf {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nestbox.config="))
        .map_or_else(|| PathBuf::from("/etc/nestbox/guest.toml"), PathBuf::from)
}

/// PID 1: mounts, then forks the platform and stays behind to reap orphans
/// and power off when the platform ends. Returns only in the child, which
/// goes on to run the platform.
pub fn become_init() {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::{ForkResult, Pid, fork};

    // The kernel starts init with no PATH; the platform runs `nft` and
    // `mkfs.ext4` from the image's /usr/sbin.
    // SAFETY: no other thread exists yet, so nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") };

    if let Err(why) = make_root_pivotable() {
        eprintln!("nestbox-guest: the inner container cannot pivot_root: {why}");
    }
    mount_base();
    load_modules(Path::new(MODULE_LIST));
    // PID 1 starts with 1024 open files; the platform it forks inherits
    // the raised limit (the ingress alone may hold 20,000).
    crate::resources::raise_nofile();
    let signals = [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
    ];
    let mut set = SigSet::empty();
    for s in signals {
        set.add(s);
    }
    // Blocked before the fork, so that no SIGCHLD is lost in between.
    let _ = set.thread_block();
    // SAFETY: nothing else runs yet: this process has no other thread.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = set.thread_unblock();
            return;
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(err) => {
            eprintln!("nestbox-guest: cannot fork the platform: {err}");
            power_off();
        }
    };
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))
                        if pid == child =>
                    {
                        eprintln!("nestbox-guest: the platform has stopped; powering off");
                        power_off();
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            },
            Ok(_) => {
                let _ = nix::sys::signal::kill(child, Signal::SIGTERM);
            }
            Err(_) => {}
        }
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(0)
}

/// Whether this process is PID 1.
#[must_use]
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parents_first_and_skips_mounted() {
        let targets: Vec<&str> = base_mounts().iter().map(|m| m.target).collect();
        for (i, t) in targets.iter().enumerate() {
            for later in &targets[i + 1..] {
                assert!(
                    !t.starts_with(&format!("{later}/")),
                    "{t} before its parent {later}"
                );
            }
        }
        let info =
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n23 1 0:22 / /sys rw - sysfs sysfs rw\n";
        assert_eq!(mounted(info), ["/proc", "/sys"]);
    }

    #[test]
    fn disks_are_found_by_serial() {
        let dir = std::env::temp_dir().join(format!("nb-serial-{}", std::process::id()));
        for (disk, serial) in [("vda", "nestbox-config\n"), ("vdb", "nestbox-data\n")] {
            std::fs::create_dir_all(dir.join(disk)).unwrap();
            std::fs::write(dir.join(disk).join("serial"), serial).unwrap();
        }
        std::fs::create_dir_all(dir.join("loop0")).unwrap();
        assert_eq!(
            disk_with_serial(&dir, "nestbox-data").as_deref(),
            Some("vdb")
        );
        assert_eq!(
            disk_with_serial(&dir, "nestbox-config").as_deref(),
            Some("vda")
        );
        assert_eq!(disk_with_serial(&dir, "other"), None);
        assert_eq!(
            resolve_device(Path::new("/dev/vdc")).unwrap(),
            PathBuf::from("/dev/vdc")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_path_from_the_kernel_command_line() {
        assert_eq!(
            config_path("console=ttyS0 nestbox.config=/data/g.toml quiet"),
            PathBuf::from("/data/g.toml")
        );
        assert_eq!(
            config_path("console=ttyS0"),
            PathBuf::from("/etc/nestbox/guest.toml")
        );
    }
}
