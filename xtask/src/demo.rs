//! `cargo xtask demo`: one real nestbox VM, on the embedded defaults.
//!
//! Installs what is missing, builds the launcher and the guest image, and
//! runs `nb-demo` (see `tests/src/bin/nb-demo.rs`): Pebble on the host, a VM
//! booted by `nestbox-launcher`, a web app in its inner container at an
//! HTTPS URL, live port events; Ctrl-C destroys the VM. xtask itself
//! depends on no crate that embeds eBPF objects, so it builds on a machine
//! that has no clang yet.

use anyhow::{Context, Result};

use crate::{deps, image, util};

#[derive(clap::Args)]
pub struct Args {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root("cargo xtask demo")?;
    deps::install()?;
    let image = image::build(&image::Args {
        out: None,
        faults: false,
    })?;
    let bin = util::build_host_binaries(&[
        ("nestbox-launcher", "nestbox-launcher"),
        ("nestbox-cli", "nestbox"),
        ("nestbox-tests", "nb-demo"),
    ])?;
    // Ctrl-C reaches the demo too; it cleans up and exits, and we wait for it.
    ctrlc::set_handler(|| {}).context("install Ctrl-C handler")?;
    let mut demo = std::process::Command::new(bin.join("nb-demo"));
    demo.arg("--image").arg(image);
    if let Some(s) = args.seconds {
        demo.arg("--seconds").arg(s.to_string());
    }
    util::run(&mut demo)
}
