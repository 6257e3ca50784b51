//! Builds the C eBPF objects that `src/lib.rs` embeds, so that a plain
//! `cargo build` works after a fresh clone. `cargo xtask build-ebpf` runs the
//! same code (`build/compile.rs`).

#[path = "build/compile.rs"]
mod compile;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let src = manifest.join("src/bpf");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed=build/compile.rs");
    println!("cargo:rerun-if-env-changed=CLANG");
    if let Err(err) = compile::compile_all(&src, &out) {
        // A build script reports through its exit status and stderr.
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
