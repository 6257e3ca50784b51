//! `cargo xtask test`: the README's test command and what CI runs.
//!
//! Installs missing system packages, checks formatting and clippy
//! (`-D warnings`), builds every binary (the integration tests run
//! `nestbox-guest` and `nestbox-launcher`) and the guest image, then runs
//! every test of the workspace — unit tests, the privileged
//! netns/cgroup/BPF tests and the real-VM (QEMU) tests — serially, as root.
//!
//! The tests' guest has its crash points (the `faults` feature of
//! `nestbox-guest`): the debug build the netns-simulated tests run, and a
//! second VM image (`target/image-faults`) beside the one that ships.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{deps, util};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Only tests whose name contains this.
    filter: Option<String>,
}

/// The tests' builds: the guest with its crash points.
const FAULTS: [&str; 2] = ["--features", "nestbox-guest/faults"];

pub fn run(args: &Args) -> Result<()> {
    util::require_root("cargo xtask test")?;
    deps::ensure(&deps::BUILD)?;
    deps::ensure(&deps::RUN)?;
    // The object-storage tests' S3 server.
    deps::ensure_wheel(&deps::SEAWEEDFS)?;
    if !args.no_lint {
        util::run(util::cargo().args(["fmt", "--all", "--check"]))?;
        // As shipped, and with the crash points.
        for features in [&[][..], &FAULTS[..]] {
            util::run(
                util::cargo()
                    .args(["clippy", "--workspace", "--all-targets"])
                    .args(features)
                    .args(["--", "-D", "warnings"]),
            )?;
        }
    }
    util::run(
        util::cargo()
            .args(["build", "--workspace", "--bins"])
            .args(FAULTS),
    )?;
    // The real-VM tests boot the guest image; the fault-injection suite
    // boots the one with crash points.
    deps::ensure(&deps::VM)?;
    for faults in [false, true] {
        crate::image::build(&crate::image::Args { out: None, faults })?;
    }
    let mut test = util::cargo();
    test.args(["test", "--workspace"]).args(FAULTS).arg("--");
    // Privileged tests share the machine's cgroup tree and BPF state.
    test.arg("--test-threads=1");
    if let Some(filter) = &args.filter {
        test.arg(filter);
    }
    run_counting(&mut test)
}

/// Runs `cargo test`, passing its output through, and ends with one line
/// that totals every test binary's result (cargo's own last line is the
/// doc-test run of the last crate, which says little).
fn run_counting(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            passed += count(counts, " passed");
            failed += count(counts, " failed");
            ignored += count(counts, " ignored");
        }
    }
    let status = child.wait()?;
    println!("\nxtask test: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// The number before `label` in a `test result:` line.
fn count(line: &str, label: &str) -> u64 {
    line.split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn totals_a_result_line() {
        let line =
            "ok. 11 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 3.93s";
        assert_eq!(count(line, " passed"), 11);
        assert_eq!(count(line, " failed"), 0);
        assert_eq!(count(line, " ignored"), 2);
        assert_eq!(count("FAILED. 3 passed; 1 failed; 0 ignored", " failed"), 1);
    }
}
