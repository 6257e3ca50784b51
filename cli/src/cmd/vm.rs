//! `create`, `list`, `destroy` (this host's launcher) and `login` (a VM's
//! API remembered by hand).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nestbox_launcher::CreateOptions;

use crate::config::VmEntry;
use crate::target::Context;

#[derive(clap::Args)]
pub struct CreateArgs {
    /// Its name, a DNS label: `https://NAME.DOMAIN/` is its URL.
    name: String,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<u32>,
    /// Virtual CPUs.
    #[arg(long)]
    cpus: Option<u8>,
    /// The user disk's size in GiB.
    #[arg(long)]
    disk_size: Option<u32>,
    /// The port served at the primary URL (8080).
    #[arg(long)]
    primary_port: Option<u16>,
    /// The CA file the VM's certificates chain to (default: the
    /// configuration's `ca`, else the system's).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Do not wait for its API to answer.
    #[arg(long)]
    no_wait: bool,
    /// Build its user disk from a checkpoint in the object store
    /// (`[storage]` of the launcher's configuration): BUCKET/PREFIX@ID,
    /// e.g. `bucket/nestbox/web@v3`. A progress bar shows the download.
    #[arg(long, value_name = "BUCKET/PREFIX@ID")]
    from: Option<String>,
}

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The name to know it by.
    name: String,
    /// Its address (port 443 unless given).
    #[arg(long)]
    address: String,
    /// Its API's host name, as in its certificate (`api.NAME.DOMAIN`).
    #[arg(long)]
    host: String,
    /// A file holding its API token.
    #[arg(long)]
    token_file: PathBuf,
    /// The CA file its certificates chain to.
    #[arg(long)]
    ca: Option<PathBuf>,
}

/// How long `create` waits for the VM's API.
const READY: Duration = Duration::from_mins(3);

pub async fn create(ctx: &mut Context, args: &CreateArgs) -> anyhow::Result<u8> {
    let launcher = ctx.launcher()?;
    let opts = CreateOptions {
        name: args.name.clone(),
        memory_mib: args.memory,
        cpus: args.cpus,
        primary_port: args.primary_port,
        disk_gib: args.disk_size,
        from: args.from.clone(),
    };
    let created = tokio::task::spawn_blocking(move || {
        let qemu = launcher.qemu();
        launcher.create(&opts, &qemu)
    })
    .await?
    .with_context(|| format!("creating {}", args.name))?;
    let launcher = ctx.launcher()?;
    let entry = VmEntry {
        host: format!("api.{}.{}", args.name, launcher.config().domain),
        address: SocketAddr::from((created.record.address, 443)),
        ca: args.ca.clone(),
        token: launcher.token(&args.name)?,
    };
    ctx.remember(&args.name, entry)?;
    println!("{}: {} ({})", args.name, created.url, created.accel_why);
    if !args.no_wait {
        let client = ctx.client(&args.name)?;
        let t0 = Instant::now();
        let mut bar = crate::term::Bar::new("rebuild");
        loop {
            let status = client.status().await;
            if let Ok(s) = &status
                && let Some(r) = &s.rebuild
            {
                use nestbox_api::types::RebuildState;
                bar.show(r.bytes, r.total_bytes);
                if r.state == RebuildState::Failed {
                    bar.end();
                    anyhow::bail!(
                        "{}: the rebuild from {}@{} failed: {} (the VM keeps trying at each start: \
                         `nestbox-launcher stop {n}` then `start {n}`, or `destroy {n}`)",
                        args.name,
                        r.from,
                        r.checkpoint,
                        r.error.as_deref().unwrap_or("?"),
                        n = args.name
                    );
                }
            }
            match status {
                Ok(s) if matches!(s.container, nestbox_api::types::ContainerState::Running) => {
                    if let Some(r) = &s.rebuild {
                        bar.show(r.bytes, r.total_bytes);
                        bar.end();
                        println!(
                            "{}: rebuilt from {}@{} ({} streams, {})",
                            args.name,
                            r.from,
                            r.checkpoint,
                            r.streams,
                            crate::term::bytes(r.total_bytes)
                        );
                    }
                    break;
                }
                Err(err) if t0.elapsed() > READY => {
                    anyhow::bail!(
                        "{} did not answer within {} s: {err} (its console: `nestbox-launcher logs {}`)",
                        args.name,
                        READY.as_secs(),
                        args.name
                    );
                }
                Ok(_) | Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        println!(
            "{} is ready in {:.1} s: `nestbox exec {} -- uname -a`, `nestbox console {}`",
            args.name,
            t0.elapsed().as_secs_f64(),
            args.name,
            args.name
        );
    }
    Ok(0)
}

pub fn list(ctx: &mut Context, json: bool) -> anyhow::Result<u8> {
    let launcher = ctx.launcher()?;
    let vms = launcher.list()?;
    if json {
        let list: Vec<serde_json::Value> = vms
            .iter()
            .map(nestbox_launcher::ListedVm::to_json)
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!("{:<20} {:<10} {:<16} URL", "NAME", "STATE", "ADDRESS");
    for vm in &vms {
        let v = vm.to_json();
        let address = v["address"].as_str().unwrap_or("-");
        println!(
            "{:<20} {:<10} {:<16} https://{}.{}/",
            vm.name,
            v["state"].as_str().unwrap_or("?"),
            address,
            vm.name,
            launcher.config().domain
        );
    }
    Ok(0)
}

pub async fn destroy(ctx: &mut Context, name: &str) -> anyhow::Result<u8> {
    // The launcher runs its own runtime for netlink: off this one.
    let launcher = ctx.launcher()?;
    let vm = name.to_owned();
    tokio::task::spawn_blocking(move || launcher.destroy(&vm))
        .await?
        .with_context(|| format!("destroying {name}"))?;
    ctx.forget(name)?;
    println!("{name}: destroyed");
    Ok(0)
}

pub async fn login(ctx: &mut Context, args: &LoginArgs) -> anyhow::Result<u8> {
    let address: SocketAddr = args
        .address
        .parse()
        .or_else(|_| format!("{}:443", args.address).parse())
        .with_context(|| {
            format!(
                "{:?} is not an IP address (with an optional :port)",
                args.address
            )
        })?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?
        .trim()
        .to_owned();
    ctx.remember(
        &args.name,
        VmEntry {
            host: args.host.clone(),
            address,
            ca: args.ca.clone(),
            token,
        },
    )?;
    match ctx.client(&args.name)?.status().await {
        Ok(s) => println!("{}: {} answers (guest {})", args.name, args.host, s.version),
        Err(err) => eprintln!(
            "nestbox: remembered {}, but its API does not answer yet: {err}",
            args.name
        ),
    }
    Ok(0)
}
