//! `nestbox-guest`: PID 1 of a nestbox VM, and its debugging commands.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nestbox_guest::portwatch::Watcher;

#[derive(Parser)]
#[command(
    name = "nestbox-guest",
    version,
    about = "The platform inside a nestbox VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print one line per TCP port that processes of a cgroup start or stop
    /// listening on, as it happens (ports already listening come first).
    WatchPorts {
        /// cgroup v2 directory to watch (with every cgroup below it);
        /// absolute, or relative to the cgroup2 mount.
        #[arg(long)]
        cgroup: PathBuf,
        /// Network namespace whose ports count (e.g. /run/netns/NAME);
        /// default: this process's.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("nestbox-guest: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::WatchPorts {
                cgroup,
                netns,
                json,
            } => watch_ports(cgroup, netns, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Our error messages already carry their causes.
            eprintln!("nestbox-guest: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn watch_ports(cgroup: PathBuf, netns: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let mut watcher = Watcher::start(&cgroup, netns.as_deref()).await?;
    let mut stdout = std::io::stdout().lock();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let event = tokio::select! {
            event = watcher.next() => event?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        };
        if json {
            serde_json::to_writer(&mut stdout, &event)?;
            writeln!(stdout)?;
        } else {
            writeln!(stdout, "{event}")?;
        }
        stdout.flush()?;
    }
}
