//! Compiles nestbox's C eBPF programs with clang.
//!
//! Shared, through `#[path]`, by `ebpf/build.rs` (so a plain `cargo build`
//! after a fresh clone works) and by `cargo xtask build-ebpf` (to build the
//! objects on their own, for inspection with `llvm-objdump` or `bpftool`).
//! Only the standard library is used: build scripts cannot share the
//! workspace's dependencies cheaply.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The programs: source file stem in `ebpf/src/bpf/`, one object each.
pub const PROGRAMS: &[&str] = &["portwatch"];

/// Why an eBPF object could not be built.
#[derive(Debug)]
pub enum CompileError {
    /// clang is not installed.
    ClangMissing,
    /// The libbpf headers (`bpf/bpf_helpers.h`) are not installed.
    HeadersMissing,
    /// clang ran and failed; its output has already been shown.
    Failed { source: PathBuf, status: String },
    /// clang could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClangMissing => write!(
                f,
                "clang is not installed: run `apt-get install clang libbpf-dev` \
                 (or `cargo xtask deps`, which installs every system package nestbox needs)"
            ),
            Self::HeadersMissing => write!(
                f,
                "the libbpf headers (bpf/bpf_helpers.h) are missing: run `apt-get install libbpf-dev` \
                 (or `cargo xtask deps`)"
            ),
            Self::Failed { source, status } => {
                write!(f, "clang failed to compile {} ({status})", source.display())
            }
            Self::Spawn(err) => write!(f, "could not run clang: {err}"),
        }
    }
}

impl std::error::Error for CompileError {}

/// The clang to use: `$CLANG`, else `clang` from `PATH`.
fn clang() -> String {
    std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned())
}

/// Include directories for `-target bpf`: the multiarch directory holds
/// `asm/types.h`, which `linux/types.h` needs.
fn multiarch_include() -> Option<PathBuf> {
    let dir = PathBuf::from(format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH));
    dir.is_dir().then_some(dir)
}

/// Compiles `src_dir/NAME.bpf.c` into `out_dir/NAME.bpf.o` for each program
/// and returns the objects' paths.
pub fn compile_all(src_dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, CompileError> {
    if Command::new(clang()).arg("--version").output().is_err() {
        return Err(CompileError::ClangMissing);
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        return Err(CompileError::HeadersMissing);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x86",
        "aarch64" => "arm64",
        other => other,
    };
    PROGRAMS
        .iter()
        .map(|name| {
            let source = src_dir.join(format!("{name}.bpf.c"));
            let object = out_dir.join(format!("{name}.bpf.o"));
            let mut cmd = Command::new(clang());
            cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
                .arg(format!("-D__TARGET_ARCH_{arch}"))
                .arg("-I")
                .arg(src_dir);
            if let Some(dir) = multiarch_include() {
                cmd.arg("-I").arg(dir);
            }
            let status = cmd
                .arg("-c")
                .arg(&source)
                .arg("-o")
                .arg(&object)
                .status()
                .map_err(CompileError::Spawn)?;
            if status.success() {
                Ok(object)
            } else {
                Err(CompileError::Failed {
                    source,
                    status: status.to_string(),
                })
            }
        })
        .collect()
}
