//! What the platform keeps and what the container may use: the platform
//! and the inner container in sibling cgroups below the guest's own
//! (`platform/`, `inner/`), with the container's `memory.max`,
//! `memory.high`, `pids.max`, `cpu.weight` and `io.weight`, and
//! `memory.min` protecting the platform. So a fork bomb meets `pids.max`,
//! a memory hog the container's own OOM killer (never the platform's
//! pages), and a CPU spin a thousandth of the platform's weight: the API, the
//! URLs and a bounce keep working.
//!
//! cgroup v2 lets only a cgroup without processes of its own hand
//! controllers to its children, so the guest first moves itself into
//! `platform/` (as PID 1's child in a VM, PID 1 itself stays in the root
//! cgroup, which is exempt). Where a controller is not available (a host
//! whose cgroup v2 hierarchy lacks it, as the netns-simulated tests run
//! on), the limit is reported missing with the reason and the rest still
//! applies; `GET /v1/status` shows both.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cgroup::CgroupError;

/// `[limits]` of the guest configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory (MiB) kept for the platform: the container's `memory.max` is
    /// what the VM has available when the platform starts, less this; the
    /// platform's cgroup gets it as `memory.min`.
    pub platform_reserve_mib: u64,
    /// The container's `memory.high` (reclaim and throttling start there)
    /// as a percentage of its `memory.max`, 1 to 100.
    pub memory_high_percent: u8,
    /// The most processes and threads the container may have at once
    /// (`pids.max`).
    pub pids_max: u64,
    /// The container's `cpu.weight`, 1 to 10000; the platform has 10000, so
    /// under contention the platform gets its share first.
    pub cpu_weight: u16,
    /// The container's `io.weight`, 1 to 10000 (the platform has 100);
    /// it takes effect on disks whose I/O scheduler honours weights.
    pub io_weight: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            platform_reserve_mib: 64,
            memory_high_percent: 90,
            pids_max: 1024,
            cpu_weight: 10,
            io_weight: 10,
        }
    }
}

impl Limits {
    /// Checks the values; the error names the field and says why.
    ///
    /// # Errors
    /// `(field, why)`.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if !(1..=100).contains(&self.memory_high_percent) {
            return Err(("limits.memory_high_percent", "must be from 1 to 100"));
        }
        if self.pids_max < 16 {
            return Err(("limits.pids_max", "must be at least 16"));
        }
        for (field, weight) in [
            ("limits.cpu_weight", self.cpu_weight),
            ("limits.io_weight", self.io_weight),
        ] {
            if !(1..=10_000).contains(&weight) {
                return Err((field, "must be from 1 to 10000"));
            }
        }
        Ok(())
    }
}

/// The platform's own `io.weight` (the kernel's default, written so it does
/// not depend on one).
const PLATFORM_WEIGHT: u16 = 100;

/// The platform's `cpu.weight`: the most there is. Under contention it gets
/// its share whatever the container's weight, and the scheduler prefers it
/// at once when it wakes (its virtual time advances a thousandth as fast as
/// the container's): with the kernel's 100 against the container's 10, the
/// API's tail under a fork bomb was twice as long. The platform is idle
/// most of the time, so this takes nothing from the user's code until the
/// platform has work.
const PLATFORM_CPU_WEIGHT: u16 = 10_000;

/// The controllers the limits need.
const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "io"];

/// The container's `memory.max` never goes below this (a VM too small for
/// its reserve still runs a shell).
const MIN_CONTAINER_BYTES: u64 = 32 << 20;

pub use nestbox_api::types::{Applied, Usage};

/// A number from a one-value cgroup file.
fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed cgroup file (`memory.events`);
/// blocking.
pub(crate) fn read_key(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The container's usage, from its cgroup `inner` (blocking: small files).
#[must_use]
pub fn usage(inner: &Path) -> Usage {
    Usage {
        memory_bytes: read_number(&inner.join("memory.current")),
        memory_high_events: read_key(&inner.join("memory.events"), "high"),
        oom_kills: read_key(&inner.join("memory.events"), "oom_kill"),
        pids: read_number(&inner.join("pids.current")),
        pids_max_events: read_key(&inner.join("pids.events"), "max"),
    }
}

/// The two cgroups and what was applied.
#[derive(Clone, Debug)]
pub struct CgroupLayout {
    /// The platform's cgroup (this process is in it).
    pub platform: PathBuf,
    /// The inner container's cgroup (each build gets a child of it).
    pub inner: PathBuf,
    /// The limits in force.
    pub applied: Applied,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + use<> {
    let path = path.to_owned();
    move |source| CgroupError::Io { path, source }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
#[must_use]
pub fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let kib = l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok().map(|k| k * 1024)
    })
}

/// The container's `memory.max` and `memory.high` for `available` bytes.
#[must_use]
pub fn memory_limits(available: u64, limits: &Limits) -> (u64, u64) {
    let max = available
        .saturating_sub(limits.platform_reserve_mib << 20)
        .max(MIN_CONTAINER_BYTES);
    let high = max / 100 * u64::from(limits.memory_high_percent);
    (max, high)
}

/// Sets up `root/platform` (moving this process into it) and
/// `root/inner` with `limits`. Blocking (cgroup files; call it before the
/// platform serves).
///
/// # Errors
/// [`CgroupError::Io`] if the cgroups cannot be made or this process
/// cannot move; a limit that cannot be set is reported in
/// [`Applied::missing`] instead.
pub fn set_up(root: &Path, limits: &Limits) -> Result<CgroupLayout, CgroupError> {
    let platform = root.join("platform");
    let inner = root.join("inner");
    for dir in [&platform, &inner] {
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(dir)(e)),
            _ => {}
        }
    }
    let procs = platform.join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(io(&procs))?;

    let mut result = Applied::default();
    let missing = &mut result.missing;
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let mut enabled = Vec::new();
    for controller in CONTROLLERS {
        if !available.split_whitespace().any(|c| c == controller) {
            missing.push(format!(
                "{controller}: the controller is not available in {} (cgroup.controllers)",
                root.display()
            ));
            continue;
        }
        let control = root.join("cgroup.subtree_control");
        match std::fs::write(&control, format!("+{controller}")) {
            Ok(()) => enabled.push(controller),
            Err(e) => missing.push(format!(
                "{controller}: cannot enable it in {} ({e}); the guest must be alone in its cgroup",
                control.display()
            )),
        }
    }
    let on = |c: &str| enabled.contains(&c);
    if on("memory") {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        match mem_available(&meminfo) {
            Some(available) => {
                let (max, high) = memory_limits(available, limits);
                let min = limits.platform_reserve_mib << 20;
                result.memory_max = write(&inner, "memory.max", max, missing);
                result.memory_high = write(&inner, "memory.high", high, missing);
                // No swap for the container: a full memory.max means its own
                // OOM killer, not thrashing.
                let _ = std::fs::write(inner.join("memory.swap.max"), "0");
                result.platform_memory_min = write(&platform, "memory.min", min, missing);
            }
            None => missing.push("memory: /proc/meminfo has no MemAvailable".into()),
        }
    }
    if on("pids") {
        result.pids_max = write(&inner, "pids.max", limits.pids_max, missing);
    }
    if on("cpu") {
        write(&platform, "cpu.weight", PLATFORM_CPU_WEIGHT, missing);
        result.cpu_weight = write(&inner, "cpu.weight", limits.cpu_weight, missing);
        // Down to each build, which shares it among its services.
        if let Err(e) = std::fs::write(inner.join("cgroup.subtree_control"), "+cpu") {
            missing.push(format!(
                "cpu: cannot hand it to the container's builds ({e})"
            ));
        }
    }
    if on("io") {
        if inner.join("io.weight").exists() {
            write(&platform, "io.weight", Weight(PLATFORM_WEIGHT), missing);
            result.io_weight =
                write(&inner, "io.weight", Weight(limits.io_weight), missing).map(|w| w.0);
        } else {
            missing.push("io.weight: this kernel has no weight-based I/O control".into());
        }
    }
    for why in &result.missing {
        tracing::warn!(%why, "a limit of the inner container is not in force");
    }
    tracing::info!(
        memory_max = ?result.memory_max,
        pids_max = ?result.pids_max,
        cpu_weight = ?result.cpu_weight,
        "the inner container's limits"
    );
    Ok(CgroupLayout {
        platform,
        inner,
        applied: result,
    })
}

/// An `io.weight` value (`default N`).
#[derive(Clone, Copy)]
struct Weight(u16);

impl std::fmt::Display for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "default {}", self.0)
    }
}

/// Writes `value` to `dir/file`; on failure says so in `missing`.
fn write<T: std::fmt::Display + Copy>(
    dir: &Path,
    file: &str,
    value: T,
    missing: &mut Vec<String>,
) -> Option<T> {
    let path = dir.join(file);
    match std::fs::write(&path, value.to_string()) {
        Ok(()) => Some(value),
        Err(e) => {
            missing.push(format!("{file} = {value}: {} ({e})", path.display()));
            None
        }
    }
}

/// Raises this process's open-file limit as far as it may go (the kernel's
/// `fs.nr_open` for root, else the hard limit): the ingress alone may hold
/// two descriptors for each of 10,000 connections, and PID 1 starts with
/// 1024. Children inherit it.
pub fn raise_nofile() {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    let target = ceiling.map_or(hard, |c| c.max(hard));
    if nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, target, target)
        .is_err()
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_container_gets_what_is_available_less_the_reserve() {
        let meminfo = "MemTotal:  491520 kB\nMemFree: 400000 kB\nMemAvailable:  419840 kB\n";
        let available = mem_available(meminfo).unwrap();
        assert_eq!(available, 410 << 20);
        let (max, high) = memory_limits(available, &Limits::default());
        assert_eq!(max, 346 << 20);
        assert_eq!(high, (346 << 20) / 100 * 90);
        // A VM smaller than its reserve still gets a floor.
        assert_eq!(memory_limits(16 << 20, &Limits::default()).0, 32 << 20);
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn usage_reads_the_counters_and_skips_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("nb-usage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 12\nmax 3\noom 2\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(dir.join("pids.events"), "max 7\n").unwrap();
        let u = usage(&dir);
        assert_eq!(u.memory_bytes, Some(4096));
        assert_eq!(u.memory_high_events, Some(12));
        assert_eq!(u.oom_kills, Some(2));
        assert_eq!(u.pids, None);
        assert_eq!(u.pids_max_events, Some(7));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_limits_name_the_field() {
        let bad = Limits {
            memory_high_percent: 0,
            ..Limits::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "limits.memory_high_percent");
        let bad = Limits {
            cpu_weight: 0,
            ..Limits::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "limits.cpu_weight");
        assert!(Limits::default().check().is_ok());
    }
}
