//! `nestbox checkpoint create|list|info|delete` and `nestbox restore`.

use std::io::IsTerminal;

use nestbox_api::types::{Checkpoint, CheckpointRequest, Progress, ProgressKind, UploadState};

use crate::target::Context;

#[derive(clap::Subcommand)]
pub enum CheckpointCommand {
    /// Take a checkpoint of the VM's filesystem (its id is printed).
    Create {
        /// The VM.
        vm: String,
        /// A note kept with it.
        #[arg(long, short)]
        comment: Option<String>,
        /// Wait until it is durable in the object store (a progress bar
        /// shows the upload).
        #[arg(long)]
        durable: bool,
    },
    /// The VM's checkpoints, oldest first (`*`: what the filesystem
    /// descends from now).
    List {
        /// The VM.
        vm: String,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// One checkpoint.
    Info {
        /// The VM.
        vm: String,
        /// The checkpoint (`v3`).
        id: String,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint.
    Delete {
        /// The VM.
        vm: String,
        /// The checkpoint.
        id: String,
    },
}

/// Progress lines on stderr when it is a terminal (the result alone on
/// stdout, for scripts).
fn show(p: &Progress) {
    if p.kind == ProgressKind::Info
        && let Some(data) = &p.data
        && std::io::stderr().is_terminal()
    {
        eprintln!("  {data}");
    }
}

fn when(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss, reason = "a size for people")]
    let m = bytes as f64 / f64::from(1 << 20);
    format!("{m:.1} MiB")
}

fn describe(c: &Checkpoint) {
    println!("id:       {}", c.id);
    println!("created:  {}", when(c.created_ms));
    println!("size:     {}", mib(c.size_bytes));
    println!("parent:   {}", c.parent.as_deref().unwrap_or("-"));
    println!("image:    {}", c.image.as_deref().unwrap_or("-"));
    println!("comment:  {}", c.comment.as_deref().unwrap_or(""));
    println!(
        "mounted:  {}",
        c.mounted_at
            .as_deref()
            .unwrap_or("no (only the most recent are)")
    );
    println!("upload:   {}", upload(c));
}

/// Where a checkpoint's upload is, for people.
fn upload(c: &Checkpoint) -> String {
    let Some(u) = &c.upload else {
        return "off".to_owned();
    };
    let kind = u
        .base
        .as_deref()
        .map_or_else(|| "full".to_owned(), |b| format!("incremental to {b}"));
    match u.state {
        UploadState::Local => "waiting".to_owned(),
        UploadState::Uploading => format!(
            "uploading ({kind}): {} read, {} sent{}",
            crate::term::bytes(u.stream_bytes),
            crate::term::bytes(u.sent_bytes),
            u.error
                .as_deref()
                .map(|e| format!("; retrying after: {e}"))
                .unwrap_or_default()
        ),
        UploadState::Durable => format!(
            "durable ({kind}, {} stream, {} sent)",
            crate::term::bytes(u.stream_bytes),
            crate::term::bytes(u.sent_bytes)
        ),
    }
}

/// Waits until checkpoint `id` is durable, a bar showing its upload.
async fn wait_durable(
    client: &nestbox_api::client::Client,
    id: &str,
) -> anyhow::Result<Checkpoint> {
    let mut bar = crate::term::Bar::new("upload");
    loop {
        let c = client.checkpoint(id).await?;
        match &c.upload {
            None => {
                bar.end();
                anyhow::bail!("this VM uploads no checkpoints ([storage] upload = false)");
            }
            Some(u) if u.state == UploadState::Durable => {
                bar.show(u.stream_bytes, u.stream_bytes);
                bar.end();
                return Ok(c);
            }
            Some(u) => bar.show(u.stream_bytes, 0),
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

pub async fn run(ctx: &mut Context, command: CheckpointCommand) -> anyhow::Result<u8> {
    match command {
        CheckpointCommand::Create {
            vm,
            comment,
            durable,
        } => {
            let t0 = std::time::Instant::now();
            let client = ctx.client(&vm)?;
            let mut c = client
                .create_checkpoint(&CheckpointRequest { comment }, show)
                .await?;
            if durable {
                c = wait_durable(&client, &c.id).await?;
                if std::io::stderr().is_terminal() {
                    eprintln!("{vm}: {} is {}", c.id, upload(&c));
                }
            }
            if std::io::stderr().is_terminal() {
                eprintln!(
                    "{vm}: checkpoint {} ({}) in {:.0} ms",
                    c.id,
                    mib(c.size_bytes),
                    t0.elapsed().as_secs_f64() * 1000.0
                );
            }
            println!("{}", c.id);
            Ok(0)
        }
        CheckpointCommand::List { vm, json } => {
            let list = ctx.client(&vm)?.checkpoints().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<7} {:<21} {:>10} {:<7} {:<8} {:<10} COMMENT",
                "ID", "CREATED", "SIZE", "PARENT", "MOUNTED", "UPLOAD"
            );
            for c in &list.checkpoints {
                let head = if list.head.as_deref() == Some(c.id.as_str()) {
                    "*"
                } else {
                    ""
                };
                let state = match c.upload.as_ref().map(|u| u.state) {
                    None => "off",
                    Some(UploadState::Local) => "waiting",
                    Some(UploadState::Uploading) => "uploading",
                    Some(UploadState::Durable) => "durable",
                };
                println!(
                    "{:<7} {:<21} {:>10} {:<7} {:<8} {:<10} {}",
                    format!("{}{head}", c.id),
                    when(c.created_ms),
                    mib(c.size_bytes),
                    c.parent.as_deref().unwrap_or("-"),
                    if c.mounted_at.is_some() { "yes" } else { "no" },
                    state,
                    c.comment.as_deref().unwrap_or("")
                );
            }
            Ok(0)
        }
        CheckpointCommand::Info { vm, id, json } => {
            let c = ctx.client(&vm)?.checkpoint(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                describe(&c);
            }
            Ok(0)
        }
        CheckpointCommand::Delete { vm, id } => {
            ctx.client(&vm)?.delete_checkpoint(&id).await?;
            println!("{vm}: checkpoint {id} deleted");
            Ok(0)
        }
    }
}

/// `nestbox restore VM ID`.
pub async fn restore(ctx: &mut Context, vm: &str, id: &str) -> anyhow::Result<u8> {
    let t0 = std::time::Instant::now();
    let c = ctx.client(vm)?.restore(id, show).await?;
    println!(
        "{vm}: restored {} in {:.0} ms; the container and its services are up",
        c.id,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    Ok(0)
}
