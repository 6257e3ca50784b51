//! `nestbox services create|list|logs|start|stop|delete`.

use std::collections::BTreeMap;

use anyhow::Context as _;
use http::Method;
use nestbox_api::types::{LogLine, Restart, ServiceSpec, ServiceStatus};

use crate::target::Context;

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The VM.
    vm: String,
    /// The service's name.
    name: String,
    /// The port it serves HTTP on: the VM's primary URL goes there.
    #[arg(long)]
    http_port: Option<u16>,
    /// KEY=VALUE (repeatable).
    #[arg(short, long)]
    env: Vec<String>,
    /// Its working directory.
    #[arg(long)]
    dir: Option<String>,
    /// Services started before it (repeatable).
    #[arg(long)]
    needs: Vec<String>,
    /// always, on-failure or never.
    #[arg(long, default_value = "always")]
    restart: String,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(clap::Subcommand)]
pub enum ServicesCommand {
    /// Define a service and start it: `nestbox services create VM NAME -- CMD ARGS…`.
    Create(CreateArgs),
    /// The VM's services.
    List {
        /// The VM.
        vm: String,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// A service's log.
    Logs {
        /// The VM.
        vm: String,
        /// The service.
        name: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// The last N lines.
        #[arg(long)]
        last: Option<usize>,
    },
    /// Start a stopped service.
    Start {
        /// The VM.
        vm: String,
        /// The service.
        name: String,
    },
    /// Stop a service (it stays stopped).
    Stop {
        /// The VM.
        vm: String,
        /// The service.
        name: String,
    },
    /// Delete a service.
    Delete {
        /// The VM.
        vm: String,
        /// The service.
        name: String,
    },
}

fn show(s: &ServiceStatus) {
    println!(
        "{:<16} {:<9} {:<8} {:<9} {}",
        s.name,
        serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        s.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        s.restarts,
        std::iter::once(s.spec.cmd.as_str())
            .chain(s.spec.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

async fn create(ctx: &mut Context, args: CreateArgs) -> anyhow::Result<()> {
    let CreateArgs {
        vm,
        name,
        http_port,
        env,
        dir,
        needs,
        restart,
        cmd,
    } = args;
    let restart: Restart = serde_json::from_value(serde_json::Value::String(restart.clone()))
        .with_context(|| format!("--restart {restart:?}: always, on-failure or never"))?;
    let mut vars = BTreeMap::new();
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?} is not KEY=VALUE"))?;
        vars.insert(k.to_owned(), v.to_owned());
    }
    let spec = ServiceSpec {
        name,
        cmd: cmd[0].clone(),
        args: cmd[1..].to_vec(),
        env: vars,
        dir,
        needs,
        http_port,
        restart,
    };
    let s: ServiceStatus = ctx
        .client(&vm)?
        .json(Method::POST, "/v1/services", Some(&spec))
        .await?;
    show(&s);
    Ok(())
}

pub async fn run(ctx: &mut Context, command: ServicesCommand) -> anyhow::Result<u8> {
    match command {
        ServicesCommand::Create(args) => create(ctx, args).await?,
        ServicesCommand::List { vm, json } => {
            let list: Vec<ServiceStatus> = ctx
                .client(&vm)?
                .json(Method::GET, "/v1/services", None::<&()>)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<16} {:<9} {:<8} {:<9} COMMAND",
                    "NAME", "STATE", "PID", "RESTARTS"
                );
                list.iter().for_each(show);
            }
        }
        ServicesCommand::Logs {
            vm,
            name,
            follow,
            last,
        } => {
            let mut query = vec![];
            if follow {
                query.push("follow=true".to_owned());
            }
            if let Some(n) = last {
                query.push(format!("last={n}"));
            }
            let path = format!("/v1/services/{name}/logs?{}", query.join("&"));
            ctx.client(&vm)?
                .follow(&path, |l: LogLine| {
                    println!("{}", l.line);
                    true
                })
                .await?;
        }
        ServicesCommand::Start { vm, name } => {
            let s: ServiceStatus = ctx
                .client(&vm)?
                .json(
                    Method::POST,
                    &format!("/v1/services/{name}/start"),
                    None::<&()>,
                )
                .await?;
            show(&s);
        }
        ServicesCommand::Stop { vm, name } => {
            let s: ServiceStatus = ctx
                .client(&vm)?
                .json(
                    Method::POST,
                    &format!("/v1/services/{name}/stop"),
                    None::<&()>,
                )
                .await?;
            show(&s);
        }
        ServicesCommand::Delete { vm, name } => {
            ctx.client(&vm)?
                .send(Method::DELETE, &format!("/v1/services/{name}"), None)
                .await?;
            println!("{name}: deleted");
        }
    }
    Ok(0)
}
