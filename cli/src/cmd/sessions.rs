//! `nestbox sessions list|attach|kill`.

use nestbox_api::exec::{KillEvent, KillRequest};

use crate::target::Context;

#[derive(clap::Subcommand)]
pub enum SessionsCommand {
    /// The VM's exec sessions.
    List {
        /// The VM.
        vm: String,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Attach to a session (a TTY's screen shows at once; `Ctrl-]`
    /// detaches again).
    Attach {
        /// The VM.
        vm: String,
        /// The session.
        id: String,
        /// Replay its output from this byte (default: a TTY's screen, or
        /// everything held).
        #[arg(long)]
        offset: Option<u64>,
    },
    /// End a session: the signal, then SIGKILL for all it started after
    /// the grace.
    Kill {
        /// The VM.
        vm: String,
        /// The session.
        id: String,
        /// The first signal.
        #[arg(long, default_value = "TERM")]
        signal: String,
        /// Milliseconds before SIGKILL.
        #[arg(long, default_value_t = 10_000)]
        grace_ms: u64,
    },
}

pub async fn run(ctx: &mut Context, command: SessionsCommand) -> anyhow::Result<u8> {
    match command {
        SessionsCommand::List { vm, json } => {
            let list = ctx.client(&vm)?.sessions().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<5} {:<4} {:<9} {:<10} {:<21} COMMAND",
                "ID", "TTY", "ATTACHED", "OUTPUT", "STATE"
            );
            for s in &list.sessions {
                let state = s.exit.as_ref().map_or_else(
                    || format!("running (pid {})", s.pid.unwrap_or(0)),
                    |e| match &e.signal {
                        Some(sig) => format!("killed by SIG{sig}"),
                        None => format!("exited {}", e.exit_code),
                    },
                );
                println!(
                    "{:<5} {:<4} {:<9} {:<10} {:<21} {}",
                    s.id,
                    if s.tty { "yes" } else { "no" },
                    s.attached,
                    s.output_bytes,
                    state,
                    s.command
                );
            }
            Ok(0)
        }
        SessionsCommand::Attach { vm, id, offset } => {
            let client = ctx.client(&vm)?;
            let (tx, rx) = client.attach(&id, offset).await?;
            let exit = super::exec::attach_loop(&client, tx, rx, Some(&vm)).await?;
            Ok(exit.map_or(0, |c| u8::try_from(c.clamp(0, 255)).unwrap_or(255)))
        }
        SessionsCommand::Kill {
            vm,
            id,
            signal,
            grace_ms,
        } => {
            let events = ctx
                .client(&vm)?
                .kill(
                    &id,
                    &KillRequest {
                        signal: Some(signal),
                        grace_ms: Some(grace_ms),
                    },
                )
                .await?;
            for e in &events {
                match e {
                    KillEvent::Signal { message, .. }
                    | KillEvent::Timeout { message }
                    | KillEvent::Exited { message }
                    | KillEvent::Killed { message } => println!("{message}"),
                    KillEvent::Complete { exit, .. } => match &exit.signal {
                        Some(sig) => println!("session {id} ended: killed by SIG{sig}"),
                        None => println!("session {id} ended: exit {}", exit.exit_code),
                    },
                }
            }
            Ok(0)
        }
    }
}
