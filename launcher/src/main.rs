//! `nestbox-launcher`: runs nestbox VMs on this host. Parses the command
//! line, sets up logging, calls the library, maps errors to exit codes:
//! 0 done, 1 failed, 2 refused (name, state, options), 3 configuration or
//! guest image unusable.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use nestbox_launcher::{CreateOptions, Launcher, LauncherError, StopOutcome};

#[derive(Parser)]
#[command(
    name = "nestbox-launcher",
    version,
    about = "Runs nestbox VMs on this host: a tap, a VMM process and a record file per VM, and no daemon"
)]
struct Cli {
    /// The state directory: VM records, disks and logs. Its `launcher.toml`
    /// (optional) is the configuration.
    #[arg(long, global = true, default_value = "/var/lib/nestbox")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a VM and start it.
    Create {
        /// Its name, a DNS label: `https://NAME.DOMAIN/` is its URL.
        name: String,
        /// Memory in MiB (default: `memory_mib` of launcher.toml).
        #[arg(long)]
        memory: Option<u32>,
        /// Virtual CPUs (default: `cpus` of launcher.toml).
        #[arg(long)]
        cpus: Option<u8>,
        /// The port served at `https://NAME.DOMAIN/` (default 8080).
        #[arg(long)]
        primary_port: Option<u16>,
        /// The data disk's size in GiB (default: `disk_gib` of launcher.toml).
        #[arg(long)]
        disk_size: Option<u32>,
        /// Build the user's disk from a checkpoint in the object store
        /// (`[storage]` of launcher.toml): BUCKET/PREFIX@ID, e.g.
        /// `bucket/nestbox/web@v3` (another host's VM, or a destroyed one).
        #[arg(long, value_name = "BUCKET/PREFIX@ID")]
        from: Option<String>,
    },
    /// List the VMs: running, stopped, crashed, …, and their acceleration.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Power a VM off (ACPI), killing it after the timeout.
    Stop {
        /// The VM.
        name: String,
        /// Seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Start a stopped or crashed VM again (its data disk is kept).
    Start {
        /// The VM.
        name: String,
    },
    /// Remove a VM and everything it had: process, tap, route, nftables
    /// table, disks, logs.
    Destroy {
        /// The VM.
        name: String,
    },
    /// Print a VM's console log.
    Logs {
        /// The VM.
        name: String,
        /// Keep printing what is appended.
        #[arg(long, short)]
        follow: bool,
    },
    /// Print a VM's API token.
    Token {
        /// The VM.
        name: String,
    },
}

/// Logs to stderr, filtered by `RUST_LOG` (`level` or `level,target=level`);
/// warnings by default, so command output stays clean.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse().ok())
        .unwrap_or_else(|| "warn".parse().expect("a level parses"));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nestbox-launcher: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<LauncherError>() {
        Some(
            LauncherError::Name(_)
            | LauncherError::Option { .. }
            | LauncherError::Exists(_)
            | LauncherError::NotFound(_)
            | LauncherError::PoolFull(_)
            | LauncherError::Running(_)
            | LauncherError::Incomplete(_),
        ) => 2,
        Some(LauncherError::Config(_) | LauncherError::Image(_)) => 3,
        _ => 1,
    }
}

fn run(cli: Cli) -> Result<()> {
    let launcher = Launcher::open(&cli.state_dir)?;
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Create {
            name,
            memory,
            cpus,
            primary_port,
            disk_size,
            from,
        } => {
            let opts = CreateOptions {
                name,
                memory_mib: memory,
                cpus,
                primary_port,
                disk_gib: disk_size,
                from,
            };
            let created = launcher.create(&opts, &launcher.qemu())?;
            let r = &created.record;
            writeln!(out, "name     {}", r.name)?;
            writeln!(out, "address  {} (tap {})", r.address, r.tap)?;
            writeln!(out, "accel    {} ({})", r.accel, created.accel_why)?;
            writeln!(out, "url      {}", created.url)?;
            writeln!(out, "api      {}", created.api_url)?;
            writeln!(out, "token    {}", created.token_file.display())?;
        }
        Command::List { json } => {
            let vms = launcher.list()?;
            if json {
                let array: Vec<_> = vms
                    .iter()
                    .map(nestbox_launcher::ListedVm::to_json)
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&array)?)?;
            } else {
                print_table(&mut out, &vms)?;
            }
        }
        Command::Stop { name, timeout } => {
            let outcome = launcher.stop(&name, Duration::from_secs(timeout), &launcher.qemu())?;
            match outcome {
                StopOutcome::Graceful => writeln!(out, "{name} stopped")?,
                StopOutcome::Killed(why) => writeln!(out, "{name} killed: {why}")?,
                StopOutcome::AlreadyStopped => writeln!(out, "{name} was not running")?,
                StopOutcome::WasCrashed => {
                    writeln!(out, "{name} had crashed; it is now recorded as stopped")?;
                }
            }
        }
        Command::Start { name } => {
            let record = launcher.start(&name, &launcher.qemu())?;
            writeln!(
                out,
                "{name} started (accel {}, image {})",
                record.accel, record.image_version
            )?;
        }
        Command::Destroy { name } => {
            launcher.destroy(&name)?;
            writeln!(out, "{name} destroyed")?;
        }
        Command::Logs { name, follow } => launcher.logs(&name, follow, &mut out)?,
        Command::Token { name } => writeln!(out, "{}", launcher.token(&name)?)?,
    }
    Ok(())
}

fn print_table(out: &mut impl Write, vms: &[nestbox_launcher::ListedVm]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20} {:<10} {:<5} {:<15} {:<8} {:>6} {:>4} {:<8} {:<22} IMAGE",
        "NAME", "STATE", "ACCEL", "ADDRESS", "TAP", "MEMORY", "CPUS", "PID", "CREATED"
    )?;
    for vm in vms {
        let Some(r) = &vm.record else {
            writeln!(out, "{:<20} {:<10}", vm.name, vm.state.to_string())?;
            continue;
        };
        let pid = r.pid.map(|p| p.to_string()).unwrap_or_default();
        writeln!(
            out,
            "{:<20} {:<10} {:<5} {:<15} {:<8} {:>6} {:>4} {:<8} {:<22} {}",
            vm.name,
            vm.state.to_string(),
            r.accel.to_string(),
            r.address.to_string(),
            r.tap,
            r.memory_mib,
            r.cpus,
            pid,
            r.created,
            r.image_version
        )?;
    }
    Ok(())
}
