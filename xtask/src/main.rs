//! `cargo xtask …`: everything beyond `cargo build` — system packages, eBPF
//! objects, the full test run, benchmarks and the demo. One module per task.

#![forbid(unsafe_code)]

mod bench;
mod build_ebpf;
mod demo;
mod deps;
mod image;
mod install;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "nestbox's build, test, bench and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the system packages nestbox needs (apt-get; as root).
    Deps,
    /// Compile the C eBPF programs into target/bpf/ (cargo build does this
    /// too, through ebpf/build.rs).
    BuildEbpf,
    /// Formatting, clippy, unit tests and the privileged integration tests.
    Test(test::Args),
    /// Build the VM image (kernel, initramfs, manifest) into target/image/.
    Image(image::Args),
    /// Install the guest image (/usr/share/nestbox/image) and the `nestbox`
    /// and `nestbox-launcher` binaries (/usr/local/bin).
    Install(install::Args),
    /// Run the platform live on the embedded defaults.
    Demo(demo::Args),
    /// Run a benchmark and print its table.
    Bench(bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Deps => deps::install(),
        Task::BuildEbpf => build_ebpf::run(),
        Task::Image(args) => image::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Install(args) => install::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
