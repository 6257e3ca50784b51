//! The inner container's base rootfs, under [`BASE`]: a static busybox
//! with its applets as relative symlinks, enough for the tests and for a
//! shell in the container. PID 1 mounts an overlay over it.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use super::{libs, tree::Tree};
use crate::util;

/// Where the base rootfs lives in the image (the launcher's `base_rootfs`).
pub const BASE: &str = "usr/share/nestbox/rootfs";

/// The VM id that is root of the inner container: the guest maps container
/// ids 0–65535 to 100000–165535 (`guest/src/container/idmap.rs`,
/// `HOST_BASE`), so the base belongs to it.
const CONTAINER_ROOT: u32 = 100_000;

/// Debian's busybox-static.
const BUSYBOX: &str = "/bin/busybox";

/// Adds the base rootfs; returns the number of applets.
pub fn add(tree: &mut Tree) -> Result<usize> {
    // Debian's dynamic `busybox` package installs the same path; it would
    // not run in the container, which has no libraries.
    if !libs::needed(Path::new(BUSYBOX))?.is_empty() {
        bail!("{BUSYBOX} is dynamically linked: apt-get install busybox-static");
    }
    let at = |p: &str| format!("{BASE}/{p}");
    tree.copy(&at("bin/busybox"), Path::new(BUSYBOX))?;
    let list = util::output(Command::new(BUSYBOX).arg("--list"))?;
    let applets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .collect();
    for applet in &applets {
        tree.symlink(&at(&format!("bin/{applet}")), "busybox")?;
    }
    for dir in ["etc", "proc", "dev", "sys", "www"] {
        tree.dir(&at(dir), 0o755)?;
    }
    tree.dir(&at("tmp"), 0o1777)?;
    tree.file(
        &at("etc/passwd"),
        0o644,
        b"root:x:0:0:root:/:/bin/sh\n".to_vec(),
    )?;
    tree.file(&at("etc/group"), 0o644, b"root:x:0:\n".to_vec())?;
    tree.file(
        &at("www/index.html"),
        0o644,
        b"hello from nestbox\n".to_vec(),
    )?;
    tree.own(BASE, CONTAINER_ROOT)?;
    Ok(applets.len())
}
