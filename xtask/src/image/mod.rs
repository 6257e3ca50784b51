//! `cargo xtask image`: the VM image — Debian's cloud kernel and an
//! initramfs with `nestbox-guest` as `/init`, the kernel modules it loads,
//! the programs it runs (`mkfs.ext4`, `e2fsck`, `mkfs.btrfs`, `btrfs`, `nft`) with their libraries, and the
//! inner container's base rootfs, laid out as the launcher (`manifest.json`)
//! and PID 1 (`/etc/nestbox/…`) expect.
//!
//! The kernel download is cached in `target/image-cache/`; the initramfs is
//! rebuilt on every run (a few seconds). The image version is the guest's
//! crate version plus a digest of the initramfs, so a different image never
//! carries the same version.

mod cpio;
mod kernel;
mod libs;
mod modules;
mod rootfs;
mod tree;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{deps, util};
use tree::Tree;

/// Where PID 1 and the API read the image version.
const VERSION_FILE: &str = "etc/nestbox/image-version";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Image directory (default: <workspace>/target/image, or
    /// target/image-faults with --faults).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The fault-injection suite's image: the guest is built with its
    /// crash points (the `faults` feature). Never one to ship.
    #[arg(long)]
    pub faults: bool,
}

/// `manifest.json`: what the launcher reads. File names are relative to
/// the image directory.
#[derive(Serialize)]
struct Manifest<'a> {
    /// The image version (also `/etc/nestbox/image-version`).
    version: &'a str,
    /// `uname -r` of the kernel.
    kernel_release: &'a str,
    /// The bzImage.
    kernel: &'a str,
    /// The uncompressed kernel, if extracted.
    vmlinux: Option<&'a str>,
    /// The newc cpio initramfs, uncompressed.
    initramfs: &'a str,
}

pub fn run(args: &Args) -> Result<()> {
    build(args).map(drop)
}

/// Builds the image and returns its directory.
pub fn build(args: &Args) -> Result<PathBuf> {
    let started = Instant::now();
    let target = util::root().join("target");
    let default_dir = if args.faults { "image-faults" } else { "image" };
    let out = args.out.clone().unwrap_or_else(|| target.join(default_dir));
    let cache = target.join("image-cache");
    deps::ensure(&deps::BUILD)?;
    deps::ensure(&deps::IMAGE)?;
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;

    let guest = guest_binary(&cache, args.faults)?;
    let kernel = kernel::fetch(&cache)?;

    let mut tree = Tree::default();
    for dir in [
        "proc",
        "sys",
        "dev",
        "run",
        "data",
        "sys/fs/cgroup",
        "sys/fs/bpf",
    ] {
        tree.dir(dir, 0o755)?;
    }
    tree.dir("tmp", 0o1777)?;
    // The kernel's built-in initramfs has it too; a kernel built without
    // one would leave /init without stdin, stdout and stderr.
    tree.char_dev("dev/console", 0o600, 5, 1)?;
    libs::add_program(&mut tree, "init", &guest)?;
    libs::add_program(&mut tree, "usr/sbin/mke2fs", Path::new("/sbin/mke2fs"))?;
    // mke2fs takes the file system type from its name.
    tree.symlink("usr/sbin/mkfs.ext4", "mke2fs")?;
    tree.copy("etc/mke2fs.conf", Path::new("/etc/mke2fs.conf"))?;
    // A disk that holds data but does not mount is repaired, never
    // reformatted (guest/src/disk.rs).
    libs::add_program(&mut tree, "usr/sbin/e2fsck", Path::new("/sbin/e2fsck"))?;
    // e2fsck checks that the device is not mounted through /etc/mtab.
    tree.symlink("etc/mtab", "/proc/self/mounts")?;
    // The user's disk is btrfs (guest/src/storage/): formatted once.
    libs::add_program(
        &mut tree,
        "usr/sbin/mkfs.btrfs",
        Path::new("/sbin/mkfs.btrfs"),
    )?;
    // Checkpoints travel to and from the object store as `btrfs send`
    // streams (guest/src/storage/upload.rs, rebuild.rs).
    libs::add_program(&mut tree, "usr/sbin/btrfs", Path::new("/bin/btrfs"))?;
    libs::add_program(&mut tree, "usr/sbin/nft", Path::new("/usr/sbin/nft"))?;
    // The web PKI roots, for an ACME directory such as Let's Encrypt's
    // (a test CA's root comes inline in the guest configuration).
    tree.copy(
        "etc/ssl/certs/ca-certificates.crt",
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
    )?;
    let loaded = modules::add(&mut tree, &kernel)?;
    let applets = rootfs::add(&mut tree)?;
    tree.dir("etc/nestbox", 0o755)?;

    let digest = hex(&tree.digest(VERSION_FILE));
    let version = format!("{}+{}", guest_version()?, &digest[..12]);
    tree.file(VERSION_FILE, 0o644, format!("{version}\n").into_bytes())?;

    let initramfs = out.join("initramfs.cpio");
    write_atomic(&initramfs, |f| tree.write_cpio(f).map(drop))?;
    copy_atomic(&kernel.vmlinuz, &out.join("vmlinuz"))?;
    let vmlinux = if let Some(elf) = &kernel.vmlinux {
        copy_atomic(elf, &out.join("vmlinux"))?;
        Some("vmlinux")
    } else {
        // A stale one from an earlier kernel must not be booted.
        let _ = std::fs::remove_file(out.join("vmlinux"));
        None
    };
    let manifest = Manifest {
        version: &version,
        kernel_release: &kernel.release,
        kernel: "vmlinuz",
        vmlinux,
        initramfs: "initramfs.cpio",
    };
    let mut json = serde_json::to_string_pretty(&manifest)?;
    json.push('\n');
    write_atomic(&out.join("manifest.json"), |f| f.write_all(json.as_bytes()))?;

    let size = |name: &str| {
        std::fs::metadata(out.join(name)).map_or_else(|_| "-".to_owned(), |m| mib(m.len()))
    };
    let mut report = format!(
        "image {version} in {} ({:.1} s)\n  kernel   {} ({})\n",
        out.display(),
        started.elapsed().as_secs_f64(),
        kernel.release,
        kernel.package
    );
    for name in ["vmlinuz", "vmlinux", "initramfs.cpio"] {
        let _ = writeln!(report, "  {name:<15}{:>10}", size(name));
    }
    let _ = writeln!(
        report,
        "  initramfs: {} entries, /init {}, {} modules, {applets} busybox applets",
        tree.len(),
        mib(std::fs::metadata(&guest)?.len()),
        loaded.len()
    );
    eprint!("{report}");
    Ok(out)
}

/// Builds `nestbox-guest` as it ships (with `faults`, plus its crash
/// points) and returns a copy without debug information: `--profile guest`
/// keeps line tables (as release does), which would triple the size of an
/// initramfs that lives in the VM's RAM. The symbol table stays, so
/// backtraces still name functions.
fn guest_binary(cache: &Path, faults: bool) -> Result<PathBuf> {
    let mut cargo = util::cargo();
    cargo.args([
        "build",
        "--profile",
        "guest",
        "-p",
        "nestbox-guest",
        "--bin",
        "nestbox-guest",
        "--message-format",
        "json-render-diagnostics",
    ]);
    if faults {
        cargo.args(["--features", "faults"]);
    }
    // The two variants share `target/guest/nestbox-guest`; cargo names the
    // one it built.
    let executable = util::artifact(&mut cargo, "nestbox-guest")?;
    let stripped = cache.join(if faults {
        "nestbox-guest-faults"
    } else {
        "nestbox-guest"
    });
    util::run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(executable),
    )?;
    Ok(stripped)
}

/// The `nestbox-guest` crate's version, from `cargo metadata`.
fn guest_version() -> Result<String> {
    let meta =
        util::output(util::cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("parse cargo metadata")?;
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "nestbox-guest")
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .context("no nestbox-guest package in cargo metadata")
}

/// Writes `path` through a temporary file renamed over it (the one
/// atomic write of the workspace), so that a launcher never reads half an
/// image, even after a crash.
fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&mut std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    nestbox_durable::write_atomic_with(path, 0o644, |file| {
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        w.flush()
    })
    .map_err(Into::into)
}

fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    nestbox_durable::copy_atomic(from, to).map_err(Into::into)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[allow(clippy::cast_precision_loss, reason = "sizes shown to 0.1 MiB")]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
