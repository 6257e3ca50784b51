//! `nestbox status`, `nestbox ports [-w]`, `nestbox bounce`.

use http::Method;
use nestbox_api::types::{Bounced, ContainerState, PortChange, PortChangeKind, PortInfo};

use crate::target::Context;

pub async fn status(ctx: &mut Context, vm: &str, json: bool) -> anyhow::Result<u8> {
    let s = ctx.client(vm)?.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    let container = match &s.container {
        ContainerState::Failed(why) => format!("failed: {why}"),
        other => serde_json::to_value(other)?["state"]
            .as_str()
            .unwrap_or("?")
            .to_owned(),
    };
    println!("{}  {}", s.name, s.url);
    println!(
        "  guest {} (image {}), API {}, up {} s",
        s.version,
        s.image.as_deref().unwrap_or("-"),
        s.api_version,
        s.uptime_s
    );
    println!(
        "  container: {container}; {} services, {} ports open",
        s.services, s.ports
    );
    if let Some(mem) = s.usage.memory_bytes {
        let max = s
            .limits
            .memory_max
            .map_or_else(|| "-".to_owned(), |m| format!("{} MiB", m >> 20));
        println!("  memory: {} MiB of {max}", mem >> 20);
    }
    if let Some(d) = &s.user_disk {
        println!(
            "  user disk: {} MiB used, {} MiB free",
            d.used_bytes >> 20,
            d.available_bytes >> 20
        );
    }
    for d in &s.disks {
        println!(
            "  disk {} ({}): {:?}{}",
            d.role,
            d.device,
            d.state,
            d.detail
                .as_ref()
                .map_or(String::new(), |x| format!(": {x}"))
        );
    }
    Ok(0)
}

fn port_line(p: &PortInfo) -> String {
    let addrs: Vec<String> = p.addrs.iter().map(ToString::to_string).collect();
    format!(
        "{:<6} {:<24} {:<14} {:<8} {}{}",
        p.port,
        addrs.join(","),
        p.process.as_deref().unwrap_or("-"),
        p.auth,
        p.url,
        if p.primary { "  (primary)" } else { "" }
    )
}

pub async fn ports(ctx: &mut Context, vm: &str, watch: bool, json: bool) -> anyhow::Result<u8> {
    let client = ctx.client(vm)?;
    if watch {
        client
            .follow("/v1/ports/events", |c: PortChange| {
                if json {
                    println!("{}", serde_json::to_string(&c).unwrap_or_default());
                } else {
                    let what = match c.event {
                        PortChangeKind::Open => "open ",
                        PortChangeKind::Close => "close",
                    };
                    println!("{what} {}", port_line(&c.port));
                }
                true
            })
            .await?;
        return Ok(0);
    }
    let list: Vec<PortInfo> = client.json(Method::GET, "/v1/ports", None::<&()>).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        println!(
            "{:<6} {:<24} {:<14} {:<8} URL",
            "PORT", "ADDRESSES", "PROCESS", "AUTH"
        );
        for p in &list {
            println!("{}", port_line(p));
        }
    }
    Ok(0)
}

pub async fn bounce(ctx: &mut Context, vm: &str) -> anyhow::Result<u8> {
    let t0 = std::time::Instant::now();
    let b: Bounced = ctx
        .client(vm)?
        .json(Method::POST, "/v1/bounce", None::<&()>)
        .await?;
    println!(
        "{vm}: container {} again after {:.0} ms",
        b.container,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    Ok(0)
}
