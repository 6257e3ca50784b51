//! `nestbox-guest`: PID 1 of a nestbox VM, and its debugging commands.
#![allow(
    clippy::disallowed_methods,
    reason = "blocking calls are denied only in the modules that run on the runtime thread (see clippy.toml)"
)]

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
    /// Run the platform of a VM from a configuration file, outside PID 1
    /// (the host's mounts and network are used as they are). SIGTERM stops
    /// the services, then the inner container.
    Run {
        /// The guest configuration (TOML; see the `config` module).
        #[arg(long)]
        config: PathBuf,
    },
    /// (internal) PID 1 of the inner container; started by `run`.
    #[command(hide = true)]
    ContainerInit {
        #[arg(long)]
        hostname: String,
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        api_dir: Option<PathBuf>,
        #[arg(long)]
        shm_bytes: u64,
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
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

/// Logs to stderr, filtered by `RUST_LOG`. As PID 1 the log is the VM's
/// console, so it says what happens (info).
fn init_logging() {
    let default = if nestbox_guest::init::is_pid1() {
        "info"
    } else {
        "warn"
    };
    nestbox_ingress::logging::init(default);
}

fn main() -> ExitCode {
    init_logging();
    if nestbox_guest::init::is_pid1() {
        // The VM's init: mounts, then the platform runs in a child while
        // this process reaps and powers off at the end.
        nestbox_guest::init::become_init();
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let path = match nestbox_guest::init::resolve_device(&nestbox_guest::init::config_path(
            &cmdline,
        )) {
            Ok(path) => path,
            Err(why) => {
                eprintln!("nestbox-guest: no configuration: {why}");
                return ExitCode::FAILURE;
            }
        };
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => match rt.block_on(run(&path, true)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("nestbox-guest: {err}");
                    ExitCode::FAILURE
                }
            },
            Err(err) => {
                eprintln!("nestbox-guest: cannot start the async runtime: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    if let Command::ContainerInit {
        hostname,
        base,
        state_dir,
        api_dir,
        shm_bytes,
        checkpoints,
    } = &cli.command
    {
        // Before any thread exists: it forks and runs code in the child.
        let layout = nestbox_guest::container::init::layout_from(
            base,
            state_dir,
            api_dir.as_deref(),
            *shm_bytes,
            checkpoints.as_deref(),
        );
        nestbox_guest::container::init::main(&layout, hostname);
    }
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
            Command::Run { config } => run(&config, false).await,
            Command::ContainerInit { .. } => unreachable!("handled before the runtime starts"),
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

async fn run(path: &std::path::Path, as_init: bool) -> anyhow::Result<()> {
    let config = nestbox_guest::config::GuestConfig::load(path)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    if as_init {
        let stop_tx = stop_tx.clone();
        nestbox_guest::init::watch_power_button(move || {
            let _ = stop_tx.send(true);
        });
    }
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
    });
    nestbox_guest::run::run(config, stop_rx, as_init).await?;
    Ok(())
}
