//! The VMM's cgroup on the host: `nestbox/<tap>` with a memory limit (the
//! guest's memory plus the VMM's own overhead) and a CPU limit (its
//! virtual CPUs), so a VM that runs away, or a VMM that a guest took over,
//! cannot take the host's memory or CPU.
//!
//! cgroup v2 when its hierarchy has the `memory` and `cpu` controllers
//! (`memory.max`, `cpu.max`); otherwise the v1 `memory` and `cpu`
//! hierarchies of a hybrid host (`memory.limit_in_bytes`,
//! `cpu.cfs_quota_us`), as the build machines have. The tap names the
//! cgroup: it is unique on the host, whichever state directory the VM
//! belongs to. The VMM joins it between fork and exec (see [`super::jail`]);
//! the cgroup is removed once the VMM is gone.

use std::io;
use std::path::{Path, PathBuf};

/// The directory, below each hierarchy's root, that holds the VMs' cgroups.
const PARENT: &str = "nestbox";

/// The CPU period the quota is counted in (microseconds): 10 ms rather
/// than the kernel's 100. A busy guest spends its whole quota in its vCPU
/// thread, and then every thread of the VMM — the one that moves the
/// network's packets too — waits for the next period: with 100 ms periods
/// the VM's API answered in up to 200 ms under load, with 10 ms it does
/// not wait more than 10.
const PERIOD_US: u64 = 10_000;

/// Errors making or removing a VMM's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a cgroup v2 hierarchy with `memory` and `cpu` nor v1
    /// hierarchies of both are mounted.
    #[error(
        "no cgroup hierarchy with the memory and cpu controllers is mounted (looked for cgroup2 with both in cgroup.controllers, or cgroup v1 memory and cpu): mount one to run VMs with limits"
    )]
    NoControllers,
    /// A cgroup file could not be written.
    #[error("cannot set up the VMM's cgroup: {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + use<> {
    let path = path.to_owned();
    move |source| CgroupError::Io { path, source }
}

/// Where the controllers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// One cgroup v2 hierarchy with both controllers.
    V2(PathBuf),
    /// The v1 `memory` and `cpu` hierarchies.
    V1 {
        /// The `memory` mount.
        memory: PathBuf,
        /// The `cpu` mount.
        cpu: PathBuf,
    },
}

/// The limits of one VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory.
    pub memory: u64,
    /// CPUs (the quota is this many periods per period).
    pub cpus: u8,
}

/// Finds the hierarchy in a `/proc/mounts` text; `controllers` reads a v2
/// mount's `cgroup.controllers`.
#[must_use]
pub fn find(mounts: &str, controllers: impl Fn(&Path) -> String) -> Option<Hierarchy> {
    let mut v1_memory = None;
    let mut v1_cpu = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, fstype, options, ..] = fields[..] else {
            continue;
        };
        let dir = PathBuf::from(dir);
        match fstype {
            "cgroup2" => {
                let have = controllers(&dir);
                let have: Vec<&str> = have.split_whitespace().collect();
                if have.contains(&"memory") && have.contains(&"cpu") {
                    return Some(Hierarchy::V2(dir));
                }
            }
            "cgroup" => {
                let options: Vec<&str> = options.split(',').collect();
                if options.contains(&"memory") {
                    v1_memory.get_or_insert(dir.clone());
                }
                if options.contains(&"cpu") {
                    v1_cpu.get_or_insert(dir);
                }
            }
            _ => {}
        }
    }
    Some(Hierarchy::V1 {
        memory: v1_memory?,
        cpu: v1_cpu?,
    })
}

/// This host's hierarchy.
///
/// # Errors
/// [`CgroupError::NoControllers`].
pub fn host() -> Result<Hierarchy, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    find(&mounts, |dir| {
        std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default()
    })
    .ok_or(CgroupError::NoControllers)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_error(path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

impl Hierarchy {
    /// The VM's cgroup directories (one for v2, memory and cpu for v1).
    #[must_use]
    pub fn dirs(&self, key: &str) -> Vec<PathBuf> {
        match self {
            Self::V2(root) => vec![root.join(PARENT).join(key)],
            Self::V1 { memory, cpu } => {
                let dirs = vec![memory.join(PARENT).join(key), cpu.join(PARENT).join(key)];
                if memory == cpu {
                    dirs[..1].to_vec()
                } else {
                    dirs
                }
            }
        }
    }

    /// Makes the VM's cgroup with `limits`; returns the `cgroup.procs`
    /// files the VMM joins. Idempotent.
    ///
    /// # Errors
    /// [`CgroupError::Io`].
    pub fn create(&self, key: &str, limits: Limits) -> Result<Vec<PathBuf>, CgroupError> {
        let quota = u64::from(limits.cpus) * PERIOD_US;
        match self {
            Self::V2(root) => {
                let parent = root.join(PARENT);
                // The root cgroup may hand controllers down whatever it holds;
                // the parent holds no process of its own.
                write(&root.join("cgroup.subtree_control"), "+memory +cpu")?;
                mkdir(&parent)?;
                write(&parent.join("cgroup.subtree_control"), "+memory +cpu")?;
                let dir = parent.join(key);
                mkdir(&dir)?;
                write(&dir.join("memory.max"), &limits.memory.to_string())?;
                // No swap: a VMM over its limit is killed, not slowed to a crawl.
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                Ok(vec![dir.join("cgroup.procs")])
            }
            Self::V1 { memory, cpu } => {
                let mem = memory.join(PARENT).join(key);
                mkdir(&memory.join(PARENT))?;
                mkdir(&mem)?;
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory.to_string(),
                )?;
                let cpu_dir = cpu.join(PARENT).join(key);
                mkdir(&cpu.join(PARENT))?;
                mkdir(&cpu_dir)?;
                write(&cpu_dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&cpu_dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                let mut procs = vec![mem.join("cgroup.procs")];
                if cpu_dir != mem {
                    procs.push(cpu_dir.join("cgroup.procs"));
                }
                Ok(procs)
            }
        }
    }

    /// Removes the VM's cgroup (its VMM must be gone); a missing one is
    /// fine. A VMM killed a moment ago stays in the cgroup until its new
    /// parent (the host's init, once the launcher that started it has
    /// exited) reaps it, so a busy cgroup is retried for a while. Whatever
    /// still runs in it is the VM's and is killed: a launcher killed
    /// between forking its VMM and recording it leaves a child that goes
    /// on to exec the VMM, found by nothing but its cgroup.
    ///
    /// # Errors
    /// [`CgroupError::Io`], e.g. when a process is still in it.
    pub fn remove(&self, key: &str) -> Result<(), CgroupError> {
        /// How long a zombie may take to be reaped.
        const REAPED: std::time::Duration = std::time::Duration::from_secs(5);
        for dir in self.dirs(key) {
            let deadline = std::time::Instant::now() + REAPED;
            loop {
                match std::fs::remove_dir(&dir) {
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && std::time::Instant::now() < deadline =>
                    {
                        kill_members(&dir);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_error(&dir)(e));
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// `SIGKILL` to every process in the cgroup `dir`.
fn kill_members(dir: &Path) {
    let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        tracing::warn!(pid, cgroup = %dir.display(), "killing a process left in a VM's cgroup");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Removes the cgroup of the VMM on tap `key` on this host, if any.
///
/// # Errors
/// [`CgroupError::Io`]; none on a host without the controllers (there was
/// never a cgroup).
pub fn remove_for(key: &str) -> Result<(), CgroupError> {
    match host() {
        Ok(h) => h.remove(key),
        Err(CgroupError::NoControllers) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The memory a VMM of a `guest_mib` guest may use: the guest's RAM, the
/// TCG translation cache (`tb_mib`, 0 under KVM) and the VMM's own
/// overhead (its code, device emulation, I/O buffers and the page cache of
/// its disks, which counts in its cgroup).
#[must_use]
pub fn memory_for(guest_mib: u32, tb_mib: u32) -> u64 {
    /// What QEMU needs besides the guest's RAM, measured with margin.
    const OVERHEAD_MIB: u64 = 256;
    (u64::from(guest_mib) + u64::from(tb_mib) + OVERHEAD_MIB) << 20
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
        cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";

    #[test]
    fn a_hybrid_host_uses_v1_and_a_v2_host_v2() {
        let found = find(HYBRID, |_| "hugetlb".into()).unwrap();
        assert_eq!(
            found,
            Hierarchy::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu".into()
            }
        );
        assert_eq!(
            found.dirs("nb2"),
            [
                PathBuf::from("/sys/fs/cgroup/memory/nestbox/nb2"),
                PathBuf::from("/sys/fs/cgroup/cpu/nestbox/nb2")
            ]
        );
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let found = find(v2, |_| "cpuset cpu io memory pids".into()).unwrap();
        assert_eq!(found, Hierarchy::V2("/sys/fs/cgroup".into()));
        assert_eq!(find(v2, |_| "pids".into()), None);
        assert_eq!(find("", |_| String::new()), None);
    }

    #[test]
    fn memory_is_the_guest_plus_the_overheads() {
        assert_eq!(memory_for(512, 128), (512 + 128 + 256) << 20);
    }

    /// Root (CI): a real cgroup on this host, made, limited and removed.
    #[test]
    fn a_cgroup_is_made_with_its_limits_and_removed() {
        let h = host().unwrap();
        let key = format!("nbtest{}", std::process::id());
        let procs = h
            .create(
                &key,
                Limits {
                    memory: 300 << 20,
                    cpus: 1,
                },
            )
            .unwrap();
        assert!(procs.iter().all(|p| p.exists()));
        match &h {
            Hierarchy::V2(_) => {
                let dir = &h.dirs(&key)[0];
                assert_eq!(
                    std::fs::read_to_string(dir.join("memory.max"))
                        .unwrap()
                        .trim(),
                    (300u64 << 20).to_string()
                );
                assert_eq!(
                    std::fs::read_to_string(dir.join("cpu.max")).unwrap().trim(),
                    "10000 10000"
                );
            }
            Hierarchy::V1 { .. } => {
                let dirs = h.dirs(&key);
                assert_eq!(
                    std::fs::read_to_string(dirs[0].join("memory.limit_in_bytes"))
                        .unwrap()
                        .trim(),
                    (300u64 << 20).to_string()
                );
                assert_eq!(
                    std::fs::read_to_string(dirs[1].join("cpu.cfs_quota_us"))
                        .unwrap()
                        .trim(),
                    "10000"
                );
            }
        }
        h.remove(&key).unwrap();
        assert!(h.dirs(&key).iter().all(|d| !d.exists()));
        h.remove(&key).unwrap();
    }
}
