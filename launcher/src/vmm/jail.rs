//! The VMM's jail, on the model of Firecracker's jailer: between `fork` and
//! `exec` the VMM's process joins its VM's cgroup, takes new mount, network,
//! IPC and UTS namespaces, makes a tmpfs its root holding only what the VMM
//! reads — the system's programs and libraries read-only (`/usr` and its
//! top-level links), the kernel and initramfs read-only, and `/dev/null`,
//! `zero`, `full`, `random`, `urandom` (and `kvm` when KVM runs it) — and
//! becomes the VM's own unprivileged user. Everything else it uses it gets
//! as descriptors the launcher opened (see [`super::fds`]): the tap, the
//! disks, the console log and the QMP socket.
//!
//! So a guest that escapes into QEMU (TCG is a large surface) is an
//! unprivileged process of a user no other process has, seccomp-filtered
//! (QEMU's `-sandbox`), in a read-only root with nothing to read, in a
//! network namespace with no interface, inside a cgroup that caps its
//! memory and CPU — not root on the host.
//!
//! The jail is a list of steps ([`Step`]) made before the fork, so that the
//! child (a copy of a possibly multi-threaded launcher) only makes system
//! calls on memory prepared for it; a failing step is reported to the
//! parent by its index.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The host's top-level entries that hold programs and libraries: bound
/// read-only (directories) or copied (symbolic links, as in a merged-`/usr`
/// system where `/lib` is `usr/lib`).
const SYSTEM: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Files of `/etc` the dynamic linker reads.
const ETC: [&str; 1] = ["/etc/ld.so.cache"];

/// Device nodes every VMM gets.
const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// What a VMM's jail holds and who it runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    /// An empty directory of the host that becomes the VMM's root (a tmpfs
    /// mounted on it inside the VMM's own mount namespace, so nothing shows
    /// on the host).
    pub root: PathBuf,
    /// The user id it runs as.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Supplementary groups (`kvm` when KVM runs the VM).
    pub groups: Vec<u32>,
    /// Host files made visible read-only at the same path (the kernel, the
    /// initramfs, the VMM's program when it is not under `/usr`).
    pub read_only: Vec<PathBuf>,
    /// Extra device nodes under `/dev` (`kvm`).
    pub devices: Vec<String>,
    /// `cgroup.procs` files of the cgroups the VMM joins.
    pub cgroups: Vec<PathBuf>,
}

/// One step of entering the jail, with everything it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write `0` (this process) to a `cgroup.procs` file.
    JoinCgroup(CString),
    /// `unshare(flags)`.
    Unshare(libc::c_int),
    /// Make every mount private, so nothing propagates back to the host.
    Private,
    /// Mount a tmpfs (size-limited, `nosuid,nodev`) on a directory.
    Tmpfs(CString),
    /// `mkdir(path, 0755)` (an existing one is fine).
    Mkdir(CString),
    /// Create an empty file (a bind-mount target).
    Touch(CString),
    /// `symlink(target, link)`.
    Symlink {
        /// What the link points to.
        target: CString,
        /// The link.
        link: CString,
    },
    /// Bind `source` on `target`, then make the bind read-only,
    /// `nosuid`, `nodev`.
    BindReadOnly {
        /// The host path.
        source: CString,
        /// Where it shows in the jail.
        target: CString,
    },
    /// Bind a device node (read-write, `nosuid`).
    BindDevice {
        /// The host node.
        source: CString,
        /// Where it shows in the jail.
        target: CString,
    },
    /// `pivot_root(new, put_old)`, `chdir("/")`, detach the old root and
    /// remove its mount point.
    Pivot {
        /// The new root.
        new_root: CString,
        /// The old root's mount point, below the new root.
        put_old: CString,
        /// The same, as seen from the new root.
        old_inside: CString,
    },
    /// Make `/` (the jail's tmpfs) read-only.
    RootReadOnly,
    /// `setgroups`, `setresgid`, `setresuid`: become the VM's user.
    Become {
        /// Supplementary groups.
        groups: Vec<libc::gid_t>,
        /// Group.
        gid: libc::gid_t,
        /// User.
        uid: libc::uid_t,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Self::JoinCgroup(p) => write!(f, "join the cgroup ({})", s(p)),
            Self::Unshare(_) => write!(f, "unshare the mount, network, IPC and UTS namespaces"),
            Self::Private => write!(f, "make the mounts private"),
            Self::Tmpfs(p) => write!(f, "mount a tmpfs on {}", s(p)),
            Self::Mkdir(p) => write!(f, "mkdir {}", s(p)),
            Self::Touch(p) => write!(f, "create {}", s(p)),
            Self::Symlink { target, link } => write!(f, "symlink {} -> {}", s(link), s(target)),
            Self::BindReadOnly { source, target } => {
                write!(f, "bind {} read-only on {}", s(source), s(target))
            }
            Self::BindDevice { source, target } => write!(f, "bind {} on {}", s(source), s(target)),
            Self::Pivot { new_root, .. } => write!(f, "pivot_root into {}", s(new_root)),
            Self::RootReadOnly => write!(f, "make the jail's root read-only"),
            Self::Become { uid, gid, .. } => write!(f, "become uid {uid}, gid {gid}"),
        }
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", path.display()),
        )
    })
}

/// `root` joined with the absolute `path` (`/a/b` → `root/a/b`).
fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl Jail {
    /// The steps that enter the jail, in order. Reads the host's top-level
    /// entries (which are links, which directories) to lay out the same.
    ///
    /// # Errors
    /// A path with a NUL byte, or a read-only path that is not absolute.
    pub fn steps(&self) -> io::Result<Vec<Step>> {
        let c = |p: &Path| cstring(p);
        let root = &self.root;
        let mut steps: Vec<Step> = self
            .cgroups
            .iter()
            .map(|p| c(p).map(Step::JoinCgroup))
            .collect::<io::Result<_>>()?;
        steps.extend([
            Step::Unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
            ),
            Step::Private,
            Step::Tmpfs(c(root)?),
        ]);
        // What is visible so far, to know which parents still need making.
        let mut visible: Vec<PathBuf> = Vec::new();
        for name in SYSTEM {
            let host = Path::new("/").join(name);
            let Ok(meta) = std::fs::symlink_metadata(&host) else {
                continue;
            };
            let target = inside(root, &host);
            if meta.file_type().is_symlink() {
                steps.push(Step::Symlink {
                    target: c(&std::fs::read_link(&host)?)?,
                    link: c(&target)?,
                });
            } else if meta.is_dir() {
                steps.push(Step::Mkdir(c(&target)?));
                steps.push(Step::BindReadOnly {
                    source: c(&host)?,
                    target: c(&target)?,
                });
            }
            visible.push(host);
        }
        let dev = inside(root, Path::new("/dev"));
        steps.push(Step::Mkdir(c(&dev)?));
        steps.push(Step::Tmpfs(c(&dev)?));
        for name in DEVICES
            .iter()
            .copied()
            .chain(self.devices.iter().map(String::as_str))
        {
            let node = dev.join(name);
            steps.push(Step::Touch(c(&node)?));
            steps.push(Step::BindDevice {
                source: c(&Path::new("/dev").join(name))?,
                target: c(&node)?,
            });
        }
        let etc = ETC.iter().map(PathBuf::from).filter(|p| p.exists());
        for path in self.read_only.iter().cloned().chain(etc) {
            if !path.is_absolute() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
            if visible.iter().any(|v| path.starts_with(v)) {
                continue;
            }
            let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
            parents.reverse();
            for parent in parents.into_iter().skip(1) {
                let dir = inside(root, parent);
                let step = Step::Mkdir(c(&dir)?);
                if !steps.contains(&step) {
                    steps.push(step);
                }
            }
            let target = inside(root, &path);
            if path.is_dir() {
                steps.push(Step::Mkdir(c(&target)?));
            } else {
                steps.push(Step::Touch(c(&target)?));
            }
            steps.push(Step::BindReadOnly {
                source: c(&path)?,
                target: c(&target)?,
            });
        }
        let old = inside(root, Path::new("/.old"));
        steps.extend([
            Step::Mkdir(c(&old)?),
            Step::Pivot {
                new_root: c(root)?,
                put_old: c(&old)?,
                old_inside: CString::new("/.old").expect("no NUL"),
            },
            Step::RootReadOnly,
            Step::Become {
                groups: self.groups.clone(),
                gid: self.gid,
                uid: self.uid,
            },
        ]);
        Ok(steps)
    }
}

/// The steps and where the child reports which one failed.
pub struct Prepared {
    steps: Vec<Step>,
    report: OwnedFd,
}

/// A CLOEXEC pipe: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

impl Prepared {
    /// Prepares `steps` for a child; returns it and the read end of the
    /// report pipe, from which [`failed_step`] tells which step failed.
    ///
    /// # Errors
    /// The pipe cannot be made.
    pub fn new(steps: Vec<Step>) -> io::Result<(Self, OwnedFd)> {
        let (read, write) = pipe()?;
        Ok((
            Self {
                steps,
                report: write,
            },
            read,
        ))
    }

    /// Runs the steps. Only in the child between `fork` and `exec`: it
    /// makes system calls only, on memory prepared before the fork.
    ///
    /// # Errors
    /// The error of the step that failed (its index went to the pipe).
    pub fn enter(&self) -> io::Result<()> {
        for (i, step) in self.steps.iter().enumerate() {
            // SAFETY: each step is system calls on its own prepared
            // strings; this process is the forked child, alone.
            if let Err(err) = unsafe { run(step) } {
                let index = u32::try_from(i).unwrap_or(u32::MAX).to_ne_bytes();
                // SAFETY: write(2) of a local buffer to our pipe.
                unsafe {
                    libc::write(self.report.as_raw_fd(), index.as_ptr().cast(), index.len());
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// The step with `index`.
    #[must_use]
    pub fn step(&self, index: usize) -> Option<&Step> {
        self.steps.get(index)
    }
}

/// Which step the child reported, after a failed spawn (`report` is the
/// read end from [`Prepared::new`]; the parent's copy of the write end
/// must be closed first).
#[must_use]
pub fn failed_step(report: OwnedFd) -> Option<usize> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::from(report).read_to_end(&mut bytes).ok()?;
    let index: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    usize::try_from(u32::from_ne_bytes(index)).ok()
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_int(rc: libc::c_int) -> io::Result<()> {
    check(libc::c_long::from(rc))
}

/// One step's system calls.
///
/// # Safety
/// Only in the forked child before exec (it changes this process's
/// namespaces, mounts and credentials).
unsafe fn run(step: &Step) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: system calls on NUL-terminated strings that live in `step`.
    unsafe {
        match step {
            Step::JoinCgroup(path) => {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check_int(fd)?;
                let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                check(libc::c_long::try_from(wrote).unwrap_or(-1))
            }
            Step::Unshare(flags) => check_int(libc::unshare(*flags)),
            Step::Private => check_int(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )),
            Step::Tmpfs(target) => check_int(libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=755,size=1m".as_ptr().cast(),
            )),
            Step::Mkdir(path) => {
                if libc::mkdir(path.as_ptr(), 0o755) == 0
                    || *libc::__errno_location() == libc::EEXIST
                {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            Step::Touch(path) => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                check_int(fd)?;
                libc::close(fd);
                Ok(())
            }
            Step::Symlink { target, link } => {
                check_int(libc::symlink(target.as_ptr(), link.as_ptr()))
            }
            Step::BindReadOnly { source, target } => bind(source, target, ro),
            Step::BindDevice { source, target } => bind(
                source,
                target,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC,
            ),
            Step::Pivot {
                new_root,
                put_old,
                old_inside,
            } => pivot(new_root, put_old, old_inside),
            Step::RootReadOnly => {
                check_int(libc::mount(null, c"/".as_ptr(), null, ro, std::ptr::null()))
            }
            Step::Become { groups, gid, uid } => {
                // Raw system calls: libc's wrappers would try to change the
                // ids of the parent's other threads too.
                check(libc::syscall(
                    libc::SYS_setgroups,
                    groups.len(),
                    groups.as_ptr(),
                ))?;
                check(libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid))?;
                check(libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid))
            }
        }
    }
}

/// Binds `source` on `target` and remounts the bind with `flags`.
///
/// # Safety
/// As [`run`].
unsafe fn bind(source: &CString, target: &CString, flags: libc::c_ulong) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: mount(2) on NUL-terminated strings the caller holds.
    unsafe {
        check_int(libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check_int(libc::mount(
            null,
            target.as_ptr(),
            null,
            flags,
            std::ptr::null(),
        ))
    }
}

/// `pivot_root` into `new_root`, then leave the old root behind.
///
/// # Safety
/// As [`run`].
unsafe fn pivot(new_root: &CString, put_old: &CString, old_inside: &CString) -> io::Result<()> {
    // SAFETY: system calls on NUL-terminated strings the caller holds.
    unsafe {
        check(libc::syscall(
            libc::SYS_pivot_root,
            new_root.as_ptr(),
            put_old.as_ptr(),
        ))?;
        check_int(libc::chdir(c"/".as_ptr()))?;
        check_int(libc::umount2(old_inside.as_ptr(), libc::MNT_DETACH))?;
        check_int(libc::rmdir(old_inside.as_ptr()))
    }
}

/// Moves `fd` to a descriptor number of at least 64 (close-on-exec), so
/// that placing the passed descriptors at 3, 4, … in the child never
/// overwrites one still to be placed.
///
/// # Errors
/// `fcntl`'s.
pub fn high(fd: &impl std::os::fd::AsFd) -> io::Result<OwnedFd> {
    Ok(
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64)).map(|raw| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        })?,
    )
}

/// In the child: `dup2` each `(from, to)` (which also clears close-on-exec
/// on `to`).
///
/// # Errors
/// `dup2`'s.
pub fn place(fds: &[(RawFd, RawFd)]) -> io::Result<()> {
    for &(from, to) in fds {
        // SAFETY: dup2 on descriptors this process holds.
        check_int(unsafe { libc::dup2(from, to) })?;
    }
    Ok(())
}

/// The program `name` resolves to: itself if it has a `/`, else the first
/// executable file of that name in `PATH`.
#[must_use]
pub fn resolve_program(name: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = Path::new(name);
    if name.as_bytes().contains(&b'/') {
        return std::fs::canonicalize(path).ok();
    }
    let dirs = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&dirs)
        .map(|d| d.join(path))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .and_then(|p| std::fs::canonicalize(p).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail() -> Jail {
        Jail {
            root: "/var/lib/nestbox/vms/vm1/jail".into(),
            uid: 175_833_090,
            gid: 175_833_090,
            groups: vec![],
            read_only: vec![
                "/srv/images/1/vmlinux".into(),
                "/srv/images/1/initramfs.cpio".into(),
                "/usr/share/nestbox/image/vmlinux".into(),
            ],
            devices: vec!["kvm".into()],
            cgroups: vec!["/sys/fs/cgroup/nestbox/nb2/cgroup.procs".into()],
        }
    }

    fn text(steps: &[Step]) -> Vec<String> {
        steps.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_jail_joins_first_and_becomes_the_user_last() {
        let steps = jail().steps().unwrap();
        let text = text(&steps);
        assert!(text[0].starts_with("join the cgroup"), "{text:?}");
        assert!(text[1].starts_with("unshare"), "{text:?}");
        assert_eq!(text.last().unwrap(), "become uid 175833090, gid 175833090");
        let pivot = text
            .iter()
            .position(|s| s.starts_with("pivot_root"))
            .unwrap();
        assert_eq!(text[pivot + 1], "make the jail's root read-only");
        // Everything before the pivot happens inside the jail's root.
        for step in &steps[..pivot] {
            if let Step::Mkdir(p) | Step::Touch(p) | Step::Tmpfs(p) = step {
                assert!(
                    p.to_str()
                        .unwrap()
                        .starts_with("/var/lib/nestbox/vms/vm1/jail"),
                    "{step}"
                );
            }
        }
    }

    #[test]
    fn files_outside_the_system_tree_are_bound_at_their_own_path() {
        let text = text(&jail().steps().unwrap());
        for want in [
            "mkdir /var/lib/nestbox/vms/vm1/jail/srv",
            "mkdir /var/lib/nestbox/vms/vm1/jail/srv/images/1",
            "bind /srv/images/1/vmlinux read-only on /var/lib/nestbox/vms/vm1/jail/srv/images/1/vmlinux",
            "bind /dev/kvm on /var/lib/nestbox/vms/vm1/jail/dev/kvm",
            "bind /dev/urandom on /var/lib/nestbox/vms/vm1/jail/dev/urandom",
        ] {
            assert!(text.iter().any(|s| s == want), "{want}: {text:#?}");
        }
        // Under /usr already: not bound again; each directory made once.
        assert!(
            !text
                .iter()
                .any(|s| s.contains("usr/share/nestbox/image/vmlinux"))
        );
        let srv = text
            .iter()
            .filter(|s| *s == "mkdir /var/lib/nestbox/vms/vm1/jail/srv")
            .count();
        assert_eq!(srv, 1);
        let mut relative = jail();
        relative.read_only = vec!["images/vmlinux".into()];
        assert!(relative.steps().is_err());
    }

    #[test]
    fn programs_resolve_through_path() {
        let sh = resolve_program(OsStr::new("sh")).unwrap();
        assert!(sh.is_absolute() && sh.exists(), "{}", sh.display());
        assert_eq!(resolve_program(OsStr::new("nestbox-no-such-program")), None);
    }
}
