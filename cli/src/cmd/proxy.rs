//! `nestbox proxy VM [LOCAL:]REMOTE` (a local listener; one tunnel per
//! connection) and `nestbox proxy VM -W HOST:PORT` (stdin/stdout, for
//! `ssh -o ProxyCommand='nestbox proxy %h -W localhost:22'`).

use anyhow::Context as _;

use crate::target::Context;

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// The VM.
    vm: String,
    /// `PORT` or `LOCAL:REMOTE`: listen on 127.0.0.1:LOCAL, tunnel each
    /// connection to REMOTE on the container's loopback.
    #[arg(required_unless_present = "stdio")]
    ports: Option<String>,
    /// `HOST:PORT` in the container, over stdin and stdout.
    #[arg(short = 'W', value_name = "HOST:PORT")]
    stdio: Option<String>,
    /// The local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
}

fn host_port(s: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = s
        .rsplit_once(':')
        .with_context(|| format!("{s:?} is not HOST:PORT"))?;
    let port = port
        .parse()
        .with_context(|| format!("{port:?} is not a port"))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

fn ports(s: &str) -> anyhow::Result<(u16, u16)> {
    let parse = |p: &str| -> anyhow::Result<u16> {
        p.parse().with_context(|| format!("{p:?} is not a port"))
    };
    if let Some((local, remote)) = s.split_once(':') {
        Ok((parse(local)?, parse(remote)?))
    } else {
        let p = parse(s)?;
        Ok((p, p))
    }
}

pub async fn run(ctx: &mut Context, args: &ProxyArgs) -> anyhow::Result<u8> {
    let client = ctx.client(&args.vm)?;
    if let Some(target) = &args.stdio {
        let (host, port) = host_port(target)?;
        let tunnel = client.proxy(&host, port).await?;
        tunnel.pipe(tokio::io::stdin(), tokio::io::stdout()).await?;
        return Ok(0);
    }
    let (local, remote) = ports(args.ports.as_deref().unwrap_or_default())?;
    let listener = tokio::net::TcpListener::bind((args.bind, local))
        .await
        .with_context(|| format!("listening on {}:{local}", args.bind))?;
    eprintln!(
        "nestbox: {}:{} → {} port {remote} (Ctrl-C stops)",
        args.bind,
        listener.local_addr()?.port(),
        args.vm
    );
    loop {
        let (socket, peer) = listener.accept().await?;
        let client = client.clone();
        tokio::spawn(async move {
            match client.proxy("localhost", remote).await {
                Ok(tunnel) => {
                    let (r, w) = socket.into_split();
                    if let Err(err) = tunnel.pipe(r, w).await {
                        eprintln!("nestbox: {peer}: {err}");
                    }
                }
                Err(err) => eprintln!("nestbox: {peer}: {err}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forms() {
        assert_eq!(ports("5432").unwrap(), (5432, 5432));
        assert_eq!(ports("3001:3000").unwrap(), (3001, 3000));
        assert!(ports("x").is_err());
        assert_eq!(host_port("localhost:22").unwrap(), ("localhost".into(), 22));
        assert_eq!(host_port("[::1]:22").unwrap(), ("::1".into(), 22));
        assert!(host_port("22").is_err());
    }
}
