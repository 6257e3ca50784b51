//! `cargo xtask bench …`: benchmarks, built in release and run as root.
//! They print a table (and write JSON under `target/bench/`); speed targets
//! are checked here, never by timed assertions in tests.

use anyhow::Result;

use crate::{deps, util};

#[derive(clap::Args)]
pub struct Args {
    /// Which benchmark.
    #[arg(value_enum)]
    what: Bench,
    /// Extra arguments for the benchmark binary (after `--`).
    #[arg(last = true)]
    extra: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// Port detection latency and CPU: eBPF vs polling /proc/net/tcp.
    Portwatch,
    /// The HTTPS ingress vs nginx: req/s (HTTP/1.1, HTTP/2), new TLS
    /// connections/s, latency, peak RSS.
    Ingress,
    /// The guest: platform RSS idle and after 10,000 requests; bounce time.
    Guest,
    /// The host side per VM: create/destroy cost (stub VMM), boot → API
    /// ready under QEMU, host processes per running VM besides the VMM.
    Launcher,
    /// The ingress's own backend client against hyper's, isolated: req/s,
    /// body throughput, memory per connection.
    Client,
    /// The user's surface: exec round trip, TTY reattach, 1 GiB up and down
    /// through the ingress vs nginx, 20 tunnels at once.
    Surface,
    /// Checkpoints: take and restore (→ URL serving) with 500 MiB on a
    /// 1 GiB btrfs user disk and 10 MiB changed, the incremental stream, vs
    /// ext4 + rsync.
    Storage,
}

pub fn run(args: &Args) -> Result<()> {
    util::require_root("cargo xtask bench")?;
    deps::install()?;
    let name = match args.what {
        Bench::Portwatch => "portwatch",
        Bench::Ingress => {
            deps::ensure(&deps::BENCH)?;
            "ingress"
        }
        Bench::Guest => "guest",
        Bench::Client => "client",
        Bench::Surface => {
            deps::ensure(&deps::BENCH)?;
            "surface"
        }
        Bench::Storage => {
            deps::ensure(&deps::BENCH)?;
            // Uploads go to SeaweedFS.
            deps::ensure_wheel(&deps::SEAWEEDFS)?;
            "storage"
        }
        Bench::Launcher => {
            deps::ensure(&deps::VM)?;
            "launcher"
        }
    };
    util::run(util::cargo().args([
        "build",
        "--profile",
        "perf",
        "-p",
        "nestbox-tests",
        "-p",
        "nestbox-ingress",
        "-p",
        "nestbox-guest",
        "-p",
        "nestbox-launcher",
        "--bins",
    ]))?;
    let root = util::root();
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let mut bench = std::process::Command::new(root.join(format!("target/perf/nb-bench-{name}")));
    bench.arg("--json").arg(out.join(format!("{name}.json")));
    if matches!(args.what, Bench::Guest | Bench::Surface | Bench::Storage) {
        // The guest as it ships: the size-optimized `guest` profile.
        util::run(util::cargo().args(["build", "--profile", "guest", "-p", "nestbox-guest"]))?;
        bench
            .arg("--guest")
            .arg(root.join("target/guest/nestbox-guest"));
    }
    if matches!(args.what, Bench::Ingress) {
        // The ingress as it ships in the VM: the guest's build profile.
        util::run(util::cargo().args(["build", "--profile", "guest", "-p", "nestbox-ingress"]))?;
        bench
            .arg("--ingress")
            .arg(root.join("target/guest/nestbox-ingress"));
    }
    if matches!(args.what, Bench::Launcher) {
        let image = crate::image::build(&crate::image::Args {
            out: None,
            faults: false,
        })?;
        bench.arg("--image").arg(image);
    }
    util::run(bench.args(&args.extra))
}
