//! Small helpers shared by the tasks.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

/// `cargo` as cargo invoked us.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// The profile the host's binaries (launcher, CLI, demo) are built with by
/// `demo` and `install`: the guest's own. Profiles share no artifacts, so
/// building them with `release` compiled every dependency a second time on
/// a first run; with the guest's, one compilation serves the image and the
/// host (dependencies whose features differ between the two are the
/// exception).
pub const HOST_PROFILE: &str = "guest";

/// Builds the binaries `bins` (package, binary) with [`HOST_PROFILE`], and
/// no others (each binary is a whole-program link); answers the directory
/// they are in.
pub fn build_host_binaries(bins: &[(&str, &str)]) -> Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--profile", HOST_PROFILE]);
    for (package, bin) in bins {
        build.args(["-p", package, "--bin", bin]);
    }
    run(&mut build)?;
    Ok(root().join("target").join(HOST_PROFILE))
}

/// Runs a command, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs a `cargo build … --message-format json-render-diagnostics`
/// (its progress and diagnostics on the terminal) and returns the path of
/// the executable it made for the target `bin`.
pub fn artifact(cmd: &mut Command, bin: &str) -> Result<PathBuf> {
    eprintln!("+ {}", show(cmd));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", show(cmd), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("`{}` made no executable {bin}", show(cmd)))
}

/// Runs a command quietly and returns its standard output; fails with its
/// standard error if it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", show(cmd)))
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fails unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    // /proc/self/status names the effective uid; no libc call needed.
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    if euid != "0" {
        bail!("{what} needs root (netns, cgroups, BPF): run it as root");
    }
    Ok(())
}
