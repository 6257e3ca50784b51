//! `cargo xtask test`: the README's test command and what CI runs.
//!
//! Installs missing system packages, checks formatting and clippy
//! (`-D warnings`), builds every binary (the integration tests run
//! `nestbox-guest`), then runs every test of the workspace — unit tests and
//! the privileged netns/cgroup/BPF tests — serially, as root.

use anyhow::Result;

use crate::{deps, util};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Only tests whose name contains this.
    filter: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root("cargo xtask test")?;
    deps::ensure(&deps::BUILD)?;
    deps::ensure(&deps::RUN)?;
    if !args.no_lint {
        util::run(util::cargo().args(["fmt", "--all", "--check"]))?;
        util::run(util::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    util::run(util::cargo().args(["build", "--workspace", "--bins"]))?;
    let mut test = util::cargo();
    test.args(["test", "--workspace", "--"]);
    // Privileged tests share the machine's cgroup tree and BPF state.
    test.arg("--test-threads=1");
    if let Some(filter) = &args.filter {
        test.arg(filter);
    }
    util::run(&mut test)
}
