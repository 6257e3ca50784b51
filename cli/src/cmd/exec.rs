//! `nestbox exec` and `nestbox console`, and the loop that joins a session
//! to this terminal (also `nestbox sessions attach`): input, output, the
//! window size, a detach key, and an automatic reattach from the last
//! offset when the connection drops.

use std::time::Duration;

use anyhow::Context as _;
use nestbox_api::client::Client;
use nestbox_api::client::exec::{Event, Receiver, Sender};
use nestbox_api::exec::{ExecParams, StreamId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::target::Context;
use crate::term;

/// The key that detaches from a TTY session: `Ctrl-]`.
pub const DETACH_KEY: u8 = 0x1d;
/// Reattaches after a dropped connection, at most.
const REATTACHES: u32 = 5;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The VM.
    vm: String,
    /// A TTY (default: when stdin and stdout are terminals).
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    tty: bool,
    /// No TTY, whatever the terminal.
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// The working directory in the container.
    #[arg(long)]
    dir: Option<String>,
    /// An environment variable, KEY=VALUE (repeatable; replaces the default
    /// environment).
    #[arg(short, long)]
    env: Vec<String>,
    /// Keep it running this long after a disconnect (`10s`, `0` = forever).
    #[arg(long)]
    max_run_after_disconnect: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(clap::Args)]
pub struct ConsoleArgs {
    /// The VM.
    vm: String,
    /// The shell (default: the container's `/bin/sh`).
    #[arg(long)]
    shell: Option<String>,
}

/// An exit status as this process's exit code.
fn code(exit: i32) -> u8 {
    u8::try_from(exit.clamp(0, 255)).unwrap_or(255)
}

pub async fn exec(ctx: &mut Context, args: &ExecArgs) -> anyhow::Result<u8> {
    let client = ctx.client(&args.vm)?;
    let tty = args.tty || (!args.no_tty && term::stdin_is_tty() && term::stdout_is_tty());
    let size = term::size();
    let params = ExecParams {
        cmd: args.cmd.clone(),
        tty,
        rows: size.filter(|_| tty).map(|s| s.0),
        cols: size.filter(|_| tty).map(|s| s.1),
        stdin: Some(true),
        dir: args.dir.clone(),
        env: args.env.clone(),
        max_run_after_disconnect: args.max_run_after_disconnect.clone(),
        path: None,
    };
    let (tx, rx) = client
        .exec(&params)
        .await
        .with_context(|| format!("exec in {}", args.vm))?;
    Ok(attach_loop(&client, tx, rx, None).await?.map_or(0, code))
}

pub async fn console(ctx: &mut Context, args: &ConsoleArgs) -> anyhow::Result<u8> {
    let client = ctx.client(&args.vm)?;
    let size = term::size();
    let params = ExecParams {
        cmd: args.shell.iter().cloned().collect(),
        tty: true,
        rows: size.map(|s| s.0),
        cols: size.map(|s| s.1),
        stdin: Some(true),
        ..ExecParams::default()
    };
    let (tx, rx) = client
        .exec(&params)
        .await
        .with_context(|| format!("a console in {}", args.vm))?;
    let id = rx
        .info()
        .map_or_else(|| "?".to_owned(), |i| i.session_id.clone());
    if term::stdin_is_tty() {
        eprint!("nestbox: session {id} in {}; Ctrl-] detaches\r\n", args.vm);
    }
    match attach_loop(&client, tx, rx, Some(&args.vm)).await? {
        Some(exit) => Ok(code(exit)),
        None => Ok(0),
    }
}

/// Joins a session to this terminal until it exits (its exit code) or the
/// user detaches (`None`, with `detach_hint`'s VM in the message).
pub async fn attach_loop(
    client: &Client,
    mut tx: Sender,
    mut rx: Receiver,
    detach_hint: Option<&str>,
) -> anyhow::Result<Option<i32>> {
    let mut info = rx.info().cloned();
    let mut tty = info.as_ref().is_some_and(|i| i.tty);
    if tty && let Some((rows, cols)) = term::size() {
        tx.resize(rows, cols).await?;
    }
    let raw = if term::stdin_is_tty() {
        term::Raw::enter().ok()
    } else {
        None
    };
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut buf = vec![0u8; 16 << 10];
    let mut stdin_open = true;
    let mut reattaches = 0;
    loop {
        tokio::select! {
            event = rx.next() => match event? {
                Event::Info(i) => {
                    tty = i.tty;
                    if tty && let Some((rows, cols)) = term::size() {
                        tx.resize(rows, cols).await?;
                    }
                    info = Some(i);
                }
                Event::Output(StreamId::Stderr, data) => {
                    stderr.write_all(&data).await?;
                    stderr.flush().await?;
                }
                Event::Screen(data) | Event::Output(_, data) => {
                    stdout.write_all(&data).await?;
                    stdout.flush().await?;
                }
                Event::Gap { from, to } => {
                    drop(raw);
                    anyhow::bail!("output from byte {from} to {to} was no longer held by the VM (raise [exec] buffer_mib)");
                }
                Event::Exit(status) => {
                    drop(raw);
                    if status.oom_killed {
                        eprintln!("nestbox: the kernel's OOM killer ended it: the container reached its memory limit (see `nestbox status`)");
                    } else if let Some(signal) = &status.signal {
                        eprintln!("nestbox: killed by SIG{signal}");
                    }
                    return Ok(Some(status.exit_code));
                }
                Event::Closed => {
                    // Dropped without an exit: attach again from where we
                    // were, so nothing is lost.
                    let Some(id) = info.as_ref().map(|i| i.session_id.clone()) else {
                        anyhow::bail!("the VM closed the session before it started");
                    };
                    reattaches += 1;
                    if reattaches > REATTACHES {
                        anyhow::bail!("the connection to session {id} keeps dropping; `nestbox sessions attach` resumes it");
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(reattaches))).await;
                    let (t, r) = client.attach(&id, Some(rx.offset())).await?;
                    tx = t;
                    rx = r;
                }
            },
            n = stdin.read(&mut buf), if stdin_open => {
                let n = n?;
                if n == 0 {
                    stdin_open = false;
                    tx.stdin_eof().await?;
                    continue;
                }
                let data = &buf[..n];
                if tty && raw.is_some() && data.contains(&DETACH_KEY) {
                    let before = &data[..data.iter().position(|b| *b == DETACH_KEY).unwrap_or(0)];
                    if !before.is_empty() {
                        tx.stdin(before).await?;
                    }
                    let _ = tx.close().await;
                    drop(raw);
                    let id = info.as_ref().map_or("?", |i| i.session_id.as_str());
                    let vm = detach_hint.unwrap_or("VM");
                    eprintln!("\r\nnestbox: detached from session {id}; it goes on: `nestbox sessions attach {vm} {id}` resumes it");
                    return Ok(None);
                }
                tx.stdin(data).await?;
            },
            Some(()) = async { match &mut winch { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                if tty && let Some((rows, cols)) = term::size() {
                    tx.resize(rows, cols).await?;
                }
            },
        }
    }
}
