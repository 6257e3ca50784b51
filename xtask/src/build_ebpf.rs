//! `cargo xtask build-ebpf`: the C eBPF objects, built on their own into
//! `target/bpf/` with the same code `ebpf/build.rs` uses.

#[path = "../../ebpf/build/compile.rs"]
mod compile;

use anyhow::{Context, Result};

use crate::{deps, util};

pub fn run() -> Result<()> {
    deps::ensure(&deps::BUILD)?;
    let root = util::root();
    let out = root.join("target/bpf");
    std::fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let objects = compile::compile_all(&root.join("ebpf/src/bpf"), &out)?;
    for object in objects {
        println!("{}", object.display());
    }
    Ok(())
}
