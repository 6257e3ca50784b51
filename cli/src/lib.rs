//! The `nestbox` command line: VMs on this host (through the launcher),
//! and each VM's own API — exec and shells, sessions, URLs and their auth,
//! TCP tunnels, checkpoints and restores,
//! services, ports, status, bounce. One module per group of commands.
#![forbid(unsafe_code)]

mod cmd;
pub mod config;
mod target;
mod term;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use target::TargetError;

#[derive(Parser)]
#[command(
    name = "nestbox",
    version,
    about = "nestbox: sandboxes as microVMs — create one, run commands and shells in it, reach its ports"
)]
pub struct Cli {
    /// The per-user configuration directory (default
    /// `$NESTBOX_CONFIG_DIR`, else `~/.config/nestbox`).
    #[arg(long, global = true)]
    config_dir: Option<PathBuf>,
    /// The launcher's state directory (default: the configuration's
    /// `state_dir`, else `/var/lib/nestbox`).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a VM on this host (as root) and remember its API.
    Create(cmd::vm::CreateArgs),
    /// List this host's VMs.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Destroy a VM and everything it had, and forget it.
    Destroy {
        /// The VM.
        vm: String,
    },
    /// Remember a VM's API (one created elsewhere, or by `nestbox-launcher`).
    Login(cmd::vm::LoginArgs),
    /// Run a command in a VM's container: `nestbox exec VM -- CMD ARGS…`.
    /// Its exit code is nestbox's.
    Exec(cmd::exec::ExecArgs),
    /// An interactive shell in a VM's container (`Ctrl-]` detaches; the
    /// shell goes on: `nestbox sessions attach`).
    Console(cmd::exec::ConsoleArgs),
    /// Copy files and directories: `nestbox cp ./site web:/srv/`,
    /// `nestbox cp web:/var/log/app.log .`.
    Cp(cmd::files::CpArgs),
    /// List a directory of a VM's container: `nestbox ls web:/srv`.
    Ls(cmd::files::LsArgs),
    /// Exec sessions: list, attach, kill.
    Sessions {
        #[command(subcommand)]
        command: cmd::sessions::SessionsCommand,
    },
    /// A TCP tunnel to a port in a VM's container: `nestbox proxy VM 5432`,
    /// `nestbox proxy VM 3001:3000`, `nestbox proxy VM -W localhost:22`.
    Proxy(cmd::proxy::ProxyArgs),
    /// A VM's URL and who may open it: `nestbox url VM [--port P] [--auth
    /// private|public|token]` (a private URL comes with a browser login
    /// link), `nestbox url share VM --ttl 1h`, `shares`, `revoke`, `token`.
    Url(cmd::url::UrlArgs),
    /// A VM's status: its guest, container, limits, disks.
    Status {
        /// The VM.
        vm: String,
        /// The JSON as the API answers it.
        #[arg(long)]
        json: bool,
    },
    /// A VM's open ports and their URLs.
    Ports {
        /// The VM.
        vm: String,
        /// Keep printing openings and closings.
        #[arg(long, short)]
        watch: bool,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a VM's container (its services start again).
    Bounce {
        /// The VM.
        vm: String,
    },
    /// Checkpoints of a VM's filesystem: create, list, info, delete.
    Checkpoint {
        #[command(subcommand)]
        command: cmd::checkpoint::CheckpointCommand,
    },
    /// Put a VM's filesystem back as a checkpoint had it (its container
    /// restarts on it, services included): `nestbox restore VM v3`.
    Restore {
        /// The VM.
        vm: String,
        /// The checkpoint.
        id: String,
    },
    /// A VM's services: create, list, logs, start, stop, delete.
    Services {
        #[command(subcommand)]
        command: cmd::services::ServicesCommand,
    },
}

/// Runs a command; answers the exit code.
///
/// # Errors
/// What went wrong, for [`exit_code`] and the user.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let mut ctx = target::Context::new(cli.config_dir.as_deref(), cli.state_dir.as_deref())?;
    match cli.command {
        Command::Create(args) => cmd::vm::create(&mut ctx, &args).await,
        Command::List { json } => cmd::vm::list(&mut ctx, json),
        Command::Destroy { vm } => cmd::vm::destroy(&mut ctx, &vm).await,
        Command::Login(args) => cmd::vm::login(&mut ctx, &args).await,
        Command::Exec(args) => cmd::exec::exec(&mut ctx, &args).await,
        Command::Console(args) => cmd::exec::console(&mut ctx, &args).await,
        Command::Cp(args) => cmd::files::cp(&mut ctx, &args).await,
        Command::Ls(args) => cmd::files::ls(&mut ctx, &args).await,
        Command::Sessions { command } => cmd::sessions::run(&mut ctx, command).await,
        Command::Proxy(args) => cmd::proxy::run(&mut ctx, &args).await,
        Command::Url(args) => cmd::url::run(&mut ctx, args).await,
        Command::Status { vm, json } => cmd::info::status(&mut ctx, &vm, json).await,
        Command::Ports { vm, watch, json } => cmd::info::ports(&mut ctx, &vm, watch, json).await,
        Command::Bounce { vm } => cmd::info::bounce(&mut ctx, &vm).await,
        Command::Services { command } => cmd::services::run(&mut ctx, command).await,
        Command::Checkpoint { command } => cmd::checkpoint::run(&mut ctx, command).await,
        Command::Restore { vm, id } => cmd::checkpoint::restore(&mut ctx, &vm, &id).await,
    }
}

/// The exit code for an error: 2 refused (arguments, names, the guest's
/// 4xx), 3 not reachable, 1 otherwise.
#[must_use]
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use nestbox_api::client::ClientError;
    if let Some(e) = err.downcast_ref::<ClientError>() {
        return match e {
            ClientError::Api { status, .. } if status.is_client_error() => 2,
            ClientError::Connect { .. } => 3,
            _ => 1,
        };
    }
    if err.downcast_ref::<TargetError>().is_some() {
        return 2;
    }
    1
}
