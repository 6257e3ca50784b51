//! `nb-demo`, run by `cargo xtask demo`: the platform live, on the embedded
//! defaults.
//!
//! For now (port watcher only): an inner container stand-in (a network
//! namespace + a cgroup), `nestbox-guest watch-ports` attached to it and
//! printing events as they happen, and a small workload inside that opens
//! and closes ports. Anything you start in the sandbox shows up too. Ctrl-C
//! stops it all and removes the sandbox.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use nestbox_tests::{Owner, Sandbox};

#[derive(Parser)]
struct Args {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("install Ctrl-C handler")?;

    let sandbox = Sandbox::new("demo")?;
    println!("inner container stand-in:");
    println!("  network namespace  {}", sandbox.netns().display());
    println!("  cgroup             {}", sandbox.cgroup().display());
    println!("start anything inside it from another terminal, e.g.:");
    println!(
        "  nsenter --net={} sh -c 'echo $$ > {}/cgroup.procs; exec python3 -m http.server 8000'",
        sandbox.netns().display(),
        sandbox.cgroup().display()
    );
    println!("port events (Ctrl-C to stop):");

    let mut watcher = std::process::Command::new(bin.join("nestbox-guest"))
        .arg("watch-ports")
        .arg("--cgroup")
        .arg(sandbox.cgroup())
        .arg("--netns")
        .arg(sandbox.netns())
        .stdout(Stdio::piped())
        .spawn()
        .context("start nestbox-guest watch-ports")?;
    let stdout = watcher.stdout.take().context("stdout")?;
    let (attached_tx, attached) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            println!("  {line}");
            let _ = attached_tx.send(());
        }
    });
    let result = workload(
        &sandbox,
        &bin.join("nb-listen"),
        &stop,
        args.seconds,
        &attached,
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    drop(sandbox);
    println!("stopped; the sandbox is removed");
    result
}

/// A web app on 8080 (IPv4 + IPv6), and a port that comes and goes.
fn workload(
    sandbox: &Sandbox,
    nb_listen: &Path,
    stop: &AtomicBool,
    seconds: Option<u64>,
    attached: &std::sync::mpsc::Receiver<()>,
) -> Result<()> {
    let mut app = Owner::spawn(sandbox.command(nb_listen))?;
    app.listen("0.0.0.0:8080", "")?;
    // The first event (reconciled or live) shows the watcher is attached.
    attached
        .recv_timeout(Duration::from_secs(30))
        .context("the watcher printed nothing within 30 s")?;
    app.listen("[::]:8080", "v6only")?;
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut toggled: Option<u64> = None;
    let mut last = Instant::now();
    while !stop.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        if last.elapsed() >= Duration::from_secs(3) {
            last = Instant::now();
            toggled = match toggled {
                Some(id) => {
                    app.close(id)?;
                    None
                }
                None => Some(app.listen("127.0.0.1:9000", "")?.id),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    app.kill()
}
