//! The inside of the inner container: `nestbox-guest container-init`.
//!
//! The guest starts this program (itself, re-executed) with the mount, UTS,
//! IPC, network and cgroup namespaces already unshared and the process
//! already in the inner cgroup (see [`super::Container::start`]); the pid
//! namespace was unshared too, which applies to children, so it forks once:
//! the child is PID 1 of the container. PID 1 builds the root filesystem
//! (overlay of the base and the writable layer, a minimal `/dev`, the API
//! socket's directory at `/.nestbox`), `pivot_root`s into it, mounts a fresh
//! `/proc` with the kernel's knobs read-only and its secrets masked
//! ([`proc_plan`]), sets the hostname, enters a new user namespace (whose
//! ids the guest then maps, see [`super::idmap`]), says `ready`, and then
//! becomes the reaper (`reaper.c`, a few KiB): it reaps orphans for as long
//! as the container lives. The parent prints PID 1's pid as the host sees
//! it and exits.
//!
//! Everything here is mounted by the VM's root before the user namespace
//! exists, in namespaces the VM's root owns: nothing in the container can
//! unmount or remount it (that needs `CAP_SYS_ADMIN` over the mount
//! namespace's owner).
//!
//! Messages to the guest go to stdout, one per line: `pid N`, then `ready`
//! or `error: …`.

use std::io::Write;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pivot_root};

/// One step of building the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `mkdir -p`.
    Dir(PathBuf),
    /// An empty file (a bind-mount target).
    File(PathBuf),
    /// `mount -t fstype source target -o data` with flags.
    Mount {
        /// Source.
        source: String,
        /// Target.
        target: PathBuf,
        /// Filesystem type (none for a bind).
        fstype: Option<&'static str>,
        /// Flags.
        flags: MsFlags,
        /// Options.
        data: Option<String>,
    },
    /// A symbolic link `link` → `to`.
    Symlink {
        /// The link.
        link: PathBuf,
        /// What it points to.
        to: &'static str,
    },
    /// Bind `path` on itself read-only (skipped if it does not exist).
    ReadOnly(PathBuf),
    /// Hide `path`: `/dev/null` over a file, an empty read-only tmpfs over
    /// a directory (skipped if it does not exist).
    Mask(PathBuf),
}

/// Where the pieces are.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Read-only base.
    pub lower: PathBuf,
    /// Writable layer.
    pub upper: PathBuf,
    /// Overlay work directory (same filesystem as `upper`).
    pub work: PathBuf,
    /// Where the overlay is mounted.
    pub merged: PathBuf,
    /// Directory bind-mounted at `/.nestbox` (the API socket), if any.
    pub api_dir: Option<PathBuf>,
    /// The size of `/dev/shm`, in bytes.
    pub shm_bytes: u64,
    /// The VM's shared mount of checkpoint views, bound (as a slave: it
    /// follows the VM's mounts and unmounts, never the other way) at
    /// `/.nestbox/checkpoints`.
    pub checkpoints: Option<PathBuf>,
}

/// `/proc` files and directories that change the kernel rather than
/// describe the container: read-only (the OCI runtime spec's defaults).
const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// `/proc` entries that show the kernel's memory, keys or timing of other
/// tenants' work: masked (the OCI runtime spec's default masked paths,
/// with Docker's additions).
const PROC_MASKED: [&str; 10] = [
    "acpi",
    "asound",
    "interrupts",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
];

/// Device nodes bind-mounted from the VM's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The steps that build the root filesystem at `layout.merged`, before
/// `pivot_root` (pure: tested without root).
#[must_use]
pub fn plan(layout: &Layout) -> Vec<Step> {
    let m = &layout.merged;
    let mut steps = vec![
        Step::Dir(layout.upper.clone()),
        Step::Dir(layout.work.clone()),
        Step::Dir(m.clone()),
        Step::Mount {
            source: "overlay".into(),
            target: m.clone(),
            fstype: Some("overlay"),
            flags: MsFlags::empty(),
            data: Some(format!(
                "lowerdir={},upperdir={},workdir={}",
                layout.lower.display(),
                layout.upper.display(),
                layout.work.display()
            )),
        },
        Step::Dir(m.join("dev")),
        Step::Mount {
            source: "tmpfs".into(),
            target: m.join("dev"),
            fstype: Some("tmpfs"),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("mode=755,size=64k".into()),
        },
    ];
    for dev in DEVICES {
        steps.push(Step::File(m.join("dev").join(dev)));
        steps.push(Step::Mount {
            source: format!("/dev/{dev}"),
            target: m.join("dev").join(dev),
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        });
    }
    steps.extend([
        Step::Dir(m.join("dev/pts")),
        Step::Mount {
            source: "devpts".into(),
            target: m.join("dev/pts"),
            fstype: Some("devpts"),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=620".into()),
        },
        Step::Symlink {
            link: m.join("dev/ptmx"),
            to: "pts/ptmx",
        },
        Step::Symlink {
            link: m.join("dev/fd"),
            to: "/proc/self/fd",
        },
        Step::Symlink {
            link: m.join("dev/stdin"),
            to: "/proc/self/fd/0",
        },
        Step::Symlink {
            link: m.join("dev/stdout"),
            to: "/proc/self/fd/1",
        },
        Step::Symlink {
            link: m.join("dev/stderr"),
            to: "/proc/self/fd/2",
        },
        Step::Dir(m.join("dev/shm")),
        Step::Mount {
            source: "shm".into(),
            target: m.join("dev/shm"),
            fstype: Some("tmpfs"),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some(format!("mode=1777,size={}", layout.shm_bytes)),
        },
        Step::Dir(m.join("proc")),
        Step::Dir(m.join("tmp")),
        Step::Dir(m.join(".oldroot")),
    ]);
    if let Some(api) = &layout.api_dir {
        steps.push(Step::Dir(m.join(".nestbox")));
        steps.push(Step::Mount {
            source: api.display().to_string(),
            target: m.join(".nestbox"),
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        });
    }
    if let Some(views) = &layout.checkpoints {
        let at = m.join(crate::storage::views::IN_CONTAINER.trim_start_matches('/'));
        steps.push(Step::Dir(at.clone()));
        // Recursive: the views mounted before the container started are
        // submounts of it.
        steps.push(Step::Mount {
            source: views.display().to_string(),
            target: at,
            fstype: None,
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            data: None,
        });
    }
    steps
}

/// The steps that lock `/proc` down once it is mounted (pure).
#[must_use]
pub fn proc_plan(proc: &Path) -> Vec<Step> {
    PROC_READ_ONLY
        .iter()
        .map(|p| Step::ReadOnly(proc.join(p)))
        .chain(PROC_MASKED.iter().map(|p| Step::Mask(proc.join(p))))
        .collect()
}

/// Binds `path` on itself and makes the bind read-only.
fn bind_read_only(path: &Path, source: &Path) -> nix::Result<()> {
    mount(
        Some(source),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

fn apply(step: &Step) -> Result<(), String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    match step {
        Step::Dir(d) => {
            std::fs::create_dir_all(d).map_err(|e| fail(&format!("mkdir {}", d.display()), &e))
        }
        Step::File(f) => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(f)
            .map(drop)
            .map_err(|e| fail(&format!("create {}", f.display()), &e)),
        Step::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => mount(
            Some(source.as_str()),
            target,
            *fstype,
            *flags,
            data.as_deref(),
        )
        .map_err(|e| fail(&format!("mount {source} on {}", target.display()), &e)),
        Step::Symlink { link, to } => std::os::unix::fs::symlink(to, link)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| fail(&format!("symlink {}", link.display()), &e)),
        Step::ReadOnly(path) => match std::fs::symlink_metadata(path) {
            Err(_) => Ok(()),
            Ok(_) => bind_read_only(path, path)
                .map_err(|e| fail(&format!("make {} read-only", path.display()), &e)),
        },
        Step::Mask(path) => match std::fs::symlink_metadata(path) {
            Err(_) => Ok(()),
            Ok(meta) if meta.is_dir() => mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=555"),
            )
            .map_err(|e| fail(&format!("mask {}", path.display()), &e)),
            Ok(_) => bind_read_only(path, Path::new("/dev/null"))
                .map_err(|e| fail(&format!("mask {}", path.display()), &e)),
        },
    }
}

/// PID 1's setup: everything up to `ready`.
fn build_root(layout: &Layout, hostname: &str) -> Result<(), String> {
    // Nothing mounted here may propagate back to the VM's namespace; what
    // the VM mounts under a shared mount of its own (the checkpoints'
    // views, nothing else is shared) comes in.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| format!("make / a slave: {e}"))?;
    for step in plan(layout) {
        apply(&step)?;
    }
    let m = &layout.merged;
    pivot_root(m, &m.join(".oldroot"))
        .map_err(|e| format!("pivot_root to {}: {e}", m.display()))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    umount2("/.oldroot", MntFlags::MNT_DETACH).map_err(|e| format!("detach the old root: {e}"))?;
    let _ = std::fs::remove_dir("/.oldroot");
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mount /proc: {e}"))?;
    for step in proc_plan(Path::new("/proc")) {
        apply(&step)?;
    }
    nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname {hostname}: {e}"))?;
    // Last: from here on this process has no privilege over anything the
    // VM's root made, and the namespaces above stay owned by the VM's root.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("unshare the user namespace: {e}"))?;
    Ok(())
}

/// Reaps every child until there are none and no more can come; PID 1 of a
/// pid namespace is the parent of every orphan in it.
fn reap_forever() -> ! {
    loop {
        if let Err(nix::errno::Errno::ECHILD) =
            waitpid(Pid::from_raw(-1), Some(WaitPidFlag::empty()))
        {
            // No children right now: wait for one to be reparented.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// The reaper (`reaper.c`), built by `build.rs`.
#[cfg(nestbox_reaper)]
const REAPER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reaper"));

/// Replaces this process with the reaper, run from a memfd (the container's
/// root does not have it): the same duty, a few KiB instead of this
/// program's runtime. Returns only on failure.
#[cfg(nestbox_reaper)]
fn become_reaper() -> Result<std::convert::Infallible, String> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(c"nestbox-reaper", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    std::fs::File::from(fd.try_clone().map_err(|e| format!("dup: {e}"))?)
        .write_all(REAPER)
        .map_err(|e| format!("write the reaper: {e}"))?;
    let no_env: [&std::ffi::CStr; 0] = [];
    nix::unistd::fexecve(&fd, &[c"nestbox-reaper"], &no_env).map_err(|e| format!("fexecve: {e}"))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The body of `nestbox-guest container-init`.
pub fn main(layout: &Layout, hostname: &str) -> ! {
    // SAFETY: this process is single-threaded (it was just exec'd and has
    // started no threads), so the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => {
            say(&format!("error: fork PID 1: {e}"));
            std::process::exit(1);
        }
        Ok(ForkResult::Parent { child }) => {
            // PID 1 needs no parent of ours: whoever adopts it (the VM's
            // init) reaps it once `cgroup.kill` has ended it. Not waiting
            // here keeps one process fewer in the VM.
            say(&format!("pid {child}"));
            std::process::exit(0);
        }
        Ok(ForkResult::Child) => {
            match build_root(layout, hostname) {
                Ok(()) => say("ready"),
                Err(why) => {
                    say(&format!("error: {why}"));
                    std::process::exit(1);
                }
            }
            #[cfg(nestbox_reaper)]
            {
                let Err(why) = become_reaper();
                eprintln!("nestbox-guest: the container's PID 1 stays this program: {why}");
            }
            reap_forever()
        }
    }
}

/// Parses the arguments the guest passes (see [`super::Container::start`]).
#[must_use]
pub fn layout_from(
    lower: &Path,
    state_dir: &Path,
    api_dir: Option<&Path>,
    shm_bytes: u64,
    checkpoints: Option<&Path>,
) -> Layout {
    Layout {
        lower: lower.to_owned(),
        upper: crate::storage::layer::upper(state_dir),
        work: crate::storage::layer::work(state_dir),
        merged: state_dir.join("rootfs"),
        api_dir: api_dir.map(Path::to_owned),
        shm_bytes,
        checkpoints: checkpoints.map(Path::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_keeps_the_kernel_knobs_read_only_and_its_secrets_masked() {
        let plan = proc_plan(Path::new("/proc"));
        for ro in [
            "/proc/sys",
            "/proc/sysrq-trigger",
            "/proc/irq",
            "/proc/bus",
            "/proc/fs",
        ] {
            assert!(plan.contains(&Step::ReadOnly(ro.into())), "{ro}");
        }
        for masked in [
            "/proc/kcore",
            "/proc/keys",
            "/proc/timer_list",
            "/proc/sched_debug",
        ] {
            assert!(plan.contains(&Step::Mask(masked.into())), "{masked}");
        }
    }

    #[test]
    fn plan_mounts_the_overlay_first_and_keeps_everything_inside_merged() {
        let layout = layout_from(
            Path::new("/base"),
            Path::new("/data/c"),
            Some(Path::new("/data/api")),
            1 << 20,
            Some(Path::new("/run/nestbox/checkpoints")),
        );
        let steps = plan(&layout);
        let first_mount = steps.iter().find_map(|s| match s {
            Step::Mount {
                fstype,
                data,
                target,
                ..
            } => Some((*fstype, data.clone(), target.clone())),
            _ => None,
        });
        assert_eq!(
            first_mount,
            Some((
                Some("overlay"),
                Some(
                    "lowerdir=/base,upperdir=/data/c/layer/upper,workdir=/data/c/layer/work".into()
                ),
                PathBuf::from("/data/c/rootfs")
            ))
        );
        for s in &steps {
            let target = match s {
                Step::Mount { target, .. }
                | Step::File(target)
                | Step::ReadOnly(target)
                | Step::Mask(target) => target,
                Step::Symlink { link, .. } => link,
                Step::Dir(_) => continue,
            };
            assert!(target.starts_with("/data/c/rootfs"), "{s:?}");
        }
        assert!(steps.contains(&Step::Mount {
            source: "/data/api".into(),
            target: "/data/c/rootfs/.nestbox".into(),
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        }));
        // The checkpoints' views come after the API's directory they sit in.
        let api = steps
            .iter()
            .position(|s| matches!(s, Step::Mount { target, .. } if target.ends_with(".nestbox")));
        let views = steps.iter().position(|s| {
            *s == Step::Mount {
                source: "/run/nestbox/checkpoints".into(),
                target: "/data/c/rootfs/.nestbox/checkpoints".into(),
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                data: None,
            }
        });
        assert!(api.is_some() && views > api, "{steps:#?}");
        assert!(steps.iter().any(|s| matches!(s,
            Step::Mount { target, data: Some(d), .. }
                if target.ends_with("dev/shm") && d.ends_with("size=1048576"))));
        // No API directory, no /.nestbox.
        let layout = layout_from(
            Path::new("/base"),
            Path::new("/data/c"),
            None,
            1 << 20,
            None,
        );
        assert!(
            !plan(&layout)
                .iter()
                .any(|s| matches!(s, Step::Dir(d) if d.ends_with(".nestbox")))
        );
    }
}
