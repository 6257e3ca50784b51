//! Helpers for nestbox's privileged tests and benches.
//!
//! [`Sandbox`] is the stand-in for a VM's inner container: a fresh network
//! namespace plus a fresh cgroup v2 directory. Commands started through it
//! join both *before* they exec, so every socket they create belongs to the
//! cgroup (a socket's cgroup is fixed at `socket()`). Dropping the sandbox
//! kills what runs in it and removes the namespace and the cgroups, also when
//! a test panics.
//!
//! [`vms::Host`] runs real VMs with the launcher, for the VM tests, the
//! escape suite and the host boundary's tests.
//!
//! [`Owner`] drives the `nb-listen` helper, a process that creates and closes
//! sockets on command, so a test decides exactly when each listen happens.

#![forbid(unsafe_code)]

pub mod benchvm;
pub mod owner;
pub mod pebble;
pub mod sandbox;
pub mod seaweed;
pub mod vms;
pub mod wire;

pub use owner::{Listened, Owner};
pub use sandbox::Sandbox;

/// `CLOCK_MONOTONIC` in nanoseconds: the clock BPF's `bpf_ktime_get_ns()`
/// uses, so user and kernel timestamps compare directly.
#[must_use]
pub fn monotonic_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// CPU time consumed by the calling thread, in nanoseconds.
#[must_use]
pub fn thread_cpu_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    let ts = nix::time::clock_gettime(clock).expect("clock_gettime on a standard clock");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// A small deterministic generator (Knuth's MMIX LCG): tests and benches
/// must not depend on luck, and their runs must repeat.
#[derive(Debug)]
pub struct Lcg(pub u64);

impl Lcg {
    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Fails with a message naming the package to install when `tool` is
/// missing from `PATH`.
///
/// # Panics
/// When the tool is missing: the test cannot run without it.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    assert!(
        found,
        "`{tool}` is not installed: apt-get install {package} (or run `cargo xtask test`, which installs it)"
    );
}

/// A binary of another workspace crate in the running program's profile
/// directory (`target/PROFILE/NAME`: a test runs from `target/PROFILE/deps`,
/// a bench from `target/PROFILE`).
///
/// # Panics
/// When it has not been built: `cargo xtask test` builds every binary first.
#[must_use]
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the running program's path");
    let dir = exe.parent().expect("a program is in a directory");
    let dir = if dir.file_name().is_some_and(|d| d == "deps") {
        dir.parent().expect("deps is in the profile's directory")
    } else {
        dir
    };
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --workspace --bins`; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Fails unless the test runs as root.
///
/// # Panics
/// When not root: privileged tests must not pass by skipping.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (netns, cgroups, BPF): run it through `cargo xtask test` as root"
    );
}

/// A busybox root filesystem for the inner container, with web pages in
/// `/www` (`index.html`, `second.html`).
///
/// # Panics
/// If busybox is missing (install `busybox-static`) or the files cannot be
/// written.
pub fn busybox_rootfs(dir: &std::path::Path) {
    require_tool("busybox", "busybox-static");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = std::process::Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .unwrap();
    let busybox = String::from_utf8(busybox.stdout).unwrap();
    std::fs::copy(busybox.trim(), bin.join("busybox")).unwrap();
    // Relative links: the rootfs is seen from inside the container.
    let applets = std::process::Command::new(bin.join("busybox"))
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(applets.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    for d in ["www", "tmp", "etc", "proc", "dev", "sys"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(
        dir.join("www/index.html"),
        "hello from the inner container\n",
    )
    .unwrap();
    std::fs::write(dir.join("www/second.html"), "second service\n").unwrap();
    // Root in the container is uid 100000 of the VM (its user namespace):
    // the base belongs to it, as the guest image's does.
    nestbox_guest::container::idmap::shift_tree(dir).unwrap();
}

/// The index of the `q` quantile (0.0–1.0, nearest rank) in a sorted
/// sample of `len` values.
///
/// # Panics
/// If `len` is 0.
#[must_use]
pub fn quantile_index(len: usize, q: f64) -> usize {
    assert!(len > 0, "a quantile of nothing");
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index of a small vector"
    )]
    let i = ((len as f64 - 1.0) * q).round() as usize;
    i
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`, `RssAnon:` …);
/// 0 when the process or the field is gone.
#[must_use]
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
