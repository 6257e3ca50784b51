//! Kernel modules the guest loads at boot: what this cloud kernel leaves
//! out that nestbox needs, with their dependencies resolved by
//! `modprobe --show-depends` against the unpacked kernel. PID 1 loads them
//! in the listed order with `finit_module` — there is no modprobe in the
//! VM, and so no on-demand loading (`request_module`) either: everything
//! the platform could make the kernel ask for must be listed here.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::kernel::Kernel;
use super::tree::Tree;
use crate::util;

/// Where PID 1 finds the list of the modules loaded at boot.
pub const LIST: &str = "etc/nestbox/modules";
/// Where it finds those loaded once the platform serves
/// (`guest/src/init.rs`, `LATE_MODULE_LIST`).
pub const LATE_LIST: &str = "etc/nestbox/modules.late";

/// The modules loaded after the API serves: btrfs runs the raid6
/// benchmark when it loads (about 2 s under TCG), and only the user's
/// disk needs it. Dependencies loaded at boot already are skipped.
pub const LATE: &[(&str, &str)] = &[("btrfs", "the user's disk (checkpoints as snapshots)")];

/// The modules nestbox needs, each with what needs it.
pub const WANTED: &[(&str, &str)] = &[
    // Devices (`-M microvm` exposes virtio over MMIO).
    ("virtio_mmio", "the virtio transport of -M microvm"),
    ("virtio_blk", "the data and config disks"),
    ("virtio_net", "the VM's network interface"),
    // Without a hardware RNG the kernel's CRNG takes seconds to seed under
    // TCG, and getrandom() blocks: mkfs.ext4's UUIDs, every TLS key.
    (
        "virtio_rng",
        "entropy from the host (-device virtio-rng-device)",
    ),
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
/// `/lib/modules/<release>/` and writes [`LIST`], then those of [`LATE`]
/// not in it already to [`LATE_LIST`]. Returns both lists, in order.
pub fn add(tree: &mut Tree, kernel: &Kernel) -> Result<Vec<String>> {
    let boot = add_list(tree, kernel, WANTED, LIST, &[])?;
    let late = add_list(tree, kernel, LATE, LATE_LIST, &boot)?;
    Ok(boot.into_iter().chain(late).collect())
}

/// One list: `wanted` with their dependencies, less `loaded`.
///
/// `modprobe --show-depends` gives the load order but also soft
/// dependencies (`softdep … pre:`), which are optional and may not load:
/// crc32c-intel, libcrc32c's, fails with ENODEV on a CPU without SSE4.2
/// (TCG's default). Only what `modules.dep` says a wanted module needs is
/// kept, so that every listed module must load.
fn add_list(
    tree: &mut Tree,
    kernel: &Kernel,
    wanted: &[(&str, &str)],
    list_path: &str,
    loaded: &[String],
) -> Result<Vec<String>> {
    let dir = format!("/lib/modules/{}/", kernel.release);
    let hard = hard_dependencies(&kernel.root.join(dir.trim_start_matches('/')))?;
    let mut order: Vec<String> = Vec::new();
    let mut keep: HashSet<String> = HashSet::new();
    for (name, why) in wanted {
        let out = util::output(
            Command::new("/sbin/modprobe")
                // The host's /etc/modprobe.d has no say in the guest.
                .args(["-C", "/dev/null", "-d"])
                .arg(&kernel.root)
                .args(["-S", &kernel.release, "--show-depends", name]),
        )
        .with_context(|| format!("module {name} ({why}) is not in kernel {}", kernel.release))?;
        let paths = parse(&out, &kernel.root)?;
        // modprobe names the module itself last; a built-in one, not at all.
        if let Some(module) = paths.last() {
            let rel = module.strip_prefix(&dir).unwrap_or(module);
            let deps = hard
                .get(rel)
                .with_context(|| format!("{module} is not in modules.dep"))?;
            keep.insert(module.clone());
            keep.extend(deps.iter().map(|d| format!("{dir}{d}")));
        }
        for path in paths {
            if !order.contains(&path) {
                order.push(path);
            }
        }
    }
    for path in order.iter().filter(|p| !keep.contains(*p)) {
        eprintln!("kernel module {path}: a soft dependency only, left out");
    }
    order.retain(|p| keep.contains(p) && !loaded.contains(p));
    for path in &order {
        tree.copy(path, &kernel.root.join(path.trim_start_matches('/')))?;
    }
    let mut list = order.join("\n");
    list.push('\n');
    tree.file(list_path, 0o644, list.into_bytes())?;
    Ok(order)
}

/// `modules.dep`: each module (path relative to `lib/modules/<release>`)
/// and every module it needs, transitively.
fn hard_dependencies(dir: &Path) -> Result<HashMap<String, Vec<String>>> {
    let path = dir.join("modules.dep");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(parse_dep(&text))
}

fn parse_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(module, deps)| {
            (
                module.trim().to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect()
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

    #[test]
    fn reads_modules_dep() {
        let dep = parse_dep("kernel/lib/libcrc32c.ko:\nkernel/a.ko: kernel/b.ko kernel/c.ko\n");
        assert_eq!(dep["kernel/lib/libcrc32c.ko"], Vec::<String>::new());
        assert_eq!(dep["kernel/a.ko"], ["kernel/b.ko", "kernel/c.ko"]);
    }
}
