//! Kernel modules the guest loads at boot: what this cloud kernel leaves
//! out that nestbox needs, with their dependencies resolved by
//! `modprobe --show-depends` against the unpacked kernel. PID 1 loads them
//! in the listed order with `finit_module` — there is no modprobe in the
//! VM, and so no on-demand loading (`request_module`) either: everything
//! the platform could make the kernel ask for must be listed here.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::kernel::Kernel;
use super::tree::Tree;
use crate::util;

/// Where PID 1 finds the list.
pub const LIST: &str = "etc/nestbox/modules";

/// The modules nestbox needs, each with what needs it.
pub const WANTED: &[(&str, &str)] = &[
    // Devices (`-M microvm` exposes virtio over MMIO).
    ("virtio_mmio", "the virtio transport of -M microvm"),
    ("virtio_blk", "the data and config disks"),
    ("virtio_net", "the VM's network interface"),
    // The inner container.
    ("overlay", "the container's root (overlayfs)"),
    ("veth", "the container's link to the VM"),
    // The container's egress (`guest/src/container/egress.rs`): a nat
    // chain with `ip saddr … oifname != … masquerade`. Payload, cmp,
    // bitwise and meta are part of nf_tables itself.
    ("nf_tables", "nft"),
    ("nft_chain_nat", "nft: `type nat hook postrouting`"),
    ("nft_masq", "nft: `masquerade`"),
    // The port watcher reads listening sockets with sock_diag.
    ("tcp_diag", "the port watcher (inet_diag, TCP)"),
    // Graceful stop: QMP system_powerdown presses the ACPI power button.
    ("button", "the ACPI power button"),
    ("evdev", "the power button's input events"),
];

/// Adds the `.ko` files of [`WANTED`] and their dependencies under
/// `/lib/modules/<release>/` and writes [`LIST`]. Returns the list.
pub fn add(tree: &mut Tree, kernel: &Kernel) -> Result<Vec<String>> {
    let mut order: Vec<String> = Vec::new();
    for (name, why) in WANTED {
        let out = util::output(
            Command::new("/sbin/modprobe")
                .arg("-d")
                .arg(&kernel.root)
                .args(["-S", &kernel.release, "--show-depends", name]),
        )
        .with_context(|| format!("module {name} ({why}) is not in kernel {}", kernel.release))?;
        for path in parse(&out, &kernel.root)? {
            if !order.contains(&path) {
                order.push(path);
            }
        }
    }
    for path in &order {
        tree.copy(path, &kernel.root.join(path.trim_start_matches('/')))?;
    }
    let mut list = order.join("\n");
    list.push('\n');
    tree.file(LIST, 0o644, list.into_bytes())?;
    Ok(order)
}

/// The image paths (`/lib/modules/…`) of the `insmod` lines, in order;
/// `builtin` lines need nothing.
fn parse(out: &str, root: &Path) -> Result<Vec<String>> {
    let root = root.to_str().context("kernel cache path is not UTF-8")?;
    let mut paths = Vec::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("insmod"), Some(path)) => {
                let Some(path) = path.strip_prefix(root) else {
                    bail!("modprobe named {path}, outside {root}");
                };
                if !path.starts_with("/lib/modules/") {
                    bail!("modprobe named {path}, not under /lib/modules");
                }
                paths.push(path.to_owned());
            }
            (Some("builtin") | None, _) => {}
            _ => bail!("unexpected modprobe output: {line}"),
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_cache_root() {
        let out = "insmod /c/k/lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko \n\
                   builtin ext4\n\
                   insmod /c/k/lib/modules/6.1/kernel/a.ko opt=1\n";
        assert_eq!(
            parse(out, Path::new("/c/k")).unwrap(),
            [
                "/lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko",
                "/lib/modules/6.1/kernel/a.ko"
            ]
        );
        assert!(parse("insmod /elsewhere/x.ko\n", Path::new("/c/k")).is_err());
    }
}
