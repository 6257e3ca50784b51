//! `nestbox url`: a VM's URLs and who may open them — the mode of each
//! port (private, public, token), browser login links, share links and
//! scoped tokens.

use nestbox_api::types::{Share, UrlAuth};

use crate::target::Context;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct UrlArgs {
    #[command(subcommand)]
    command: Option<UrlCommand>,
    /// The VM.
    #[arg(required = true)]
    vm: Option<String>,
    #[command(flatten)]
    show: ShowArgs,
}

#[derive(clap::Args)]
struct ShowArgs {
    /// The port (default: the VM's primary URL).
    #[arg(long, short)]
    port: Option<u16>,
    /// Set who may open it: private (the owner: the VM token or a login),
    /// public (anyone), token (bearer tokens only).
    #[arg(long)]
    auth: Option<UrlAuth>,
    /// JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum UrlCommand {
    /// A share link: anyone who opens it may use the URL until it expires
    /// or is revoked.
    Share {
        /// The VM.
        vm: String,
        /// The port (default: the primary URL).
        #[arg(long, short)]
        port: Option<u16>,
        /// How long it works: 60s to 24h (`90s`, `15m`, `1h`).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// The share links in force.
    Shares {
        /// The VM.
        vm: String,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a share link, or all of them (and every browser they let in).
    Revoke {
        /// The VM.
        vm: String,
        /// The share link's id (`nestbox url shares VM`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every share link.
        #[arg(long)]
        all: bool,
    },
    /// A bearer token that opens some ports' URLs only.
    Token {
        /// The VM.
        vm: String,
        /// A port it opens (repeat; none: every port).
        #[arg(long, short)]
        port: Vec<u16>,
        /// How long it works: 60s to 365d (`1h`, `7d`).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Seconds in `text`: a number with a unit `s`, `m`, `h` or `d` (a bare
/// number is seconds).
fn seconds(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits.parse().map_err(|_| {
        anyhow::anyhow!("{text:?} is not a duration: write e.g. 90s, 15m, 1h or 7d")
    })?;
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => anyhow::bail!("unknown unit {other:?} in {text:?}: use s, m, h or d"),
    };
    Ok(n.saturating_mul(unit))
}

fn when(ms: u64) -> String {
    let left = ms.saturating_sub(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    ) / 1000;
    match left {
        0..120 => format!("in {left} s"),
        120..7200 => format!("in {} min", left / 60),
        _ => format!("in {} h", left / 3600),
    }
}

pub async fn run(ctx: &mut Context, args: UrlArgs) -> anyhow::Result<u8> {
    match args.command {
        None => {
            let vm = args.vm.expect("clap requires it");
            show(ctx, &vm, &args.show).await
        }
        Some(UrlCommand::Share {
            vm,
            port,
            ttl,
            json,
        }) => {
            let share = ctx.client(&vm)?.share(port, seconds(&ttl)?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&share)?);
            } else {
                println!("{}", share.url.as_deref().unwrap_or("-"));
                eprintln!(
                    "share {} of port {}: works until revoked or {} (`nestbox url revoke {vm} {}`)",
                    share.id,
                    share.port,
                    when(share.expires_ms),
                    share.id
                );
            }
            Ok(0)
        }
        Some(UrlCommand::Shares { vm, json }) => {
            let shares: Vec<Share> = ctx.client(&vm)?.shares().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&shares)?);
            } else {
                println!("{:<20} {:<6} EXPIRES", "ID", "PORT");
                for s in &shares {
                    println!("{:<20} {:<6} {}", s.id, s.port, when(s.expires_ms));
                }
            }
            Ok(0)
        }
        Some(UrlCommand::Revoke { vm, id, all }) => {
            let client = ctx.client(&vm)?;
            let revoked = client
                .revoke_shares(if all { None } else { id.as_deref() })
                .await?;
            println!("{vm}: {} share link(s) revoked", revoked.revoked);
            Ok(0)
        }
        Some(UrlCommand::Token {
            vm,
            port,
            ttl,
            json,
        }) => {
            let token = ctx.client(&vm)?.scoped_token(port, seconds(&ttl)?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&token)?);
            } else {
                println!("{}", token.token.as_deref().unwrap_or("-"));
                let ports = if token.ports.is_empty() {
                    "every port".to_owned()
                } else {
                    format!("ports {:?}", token.ports)
                };
                eprintln!(
                    "token {} for {ports}, until {}: send it as `Authorization: Bearer`",
                    token.id,
                    when(token.expires_ms)
                );
            }
            Ok(0)
        }
    }
}

/// The URL and its mode (set first with `--auth`); a private URL comes
/// with a login link for a browser.
async fn show(ctx: &mut Context, vm: &str, args: &ShowArgs) -> anyhow::Result<u8> {
    let client = ctx.client(vm)?;
    let auth = match args.auth {
        Some(mode) => client.set_port_auth(args.port, mode).await?,
        None => client.port_auth(args.port).await?,
    };
    let login = match auth.mode {
        UrlAuth::Private => Some(client.login_link(args.port, None).await?),
        UrlAuth::Public | UrlAuth::Token => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&auth)?;
        if let Some(link) = &login {
            v["login"] = serde_json::to_value(link)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("{}", auth.url);
    match (auth.mode, &login) {
        (UrlAuth::Private, Some(link)) => eprintln!(
            "private: open this login link in your browser within 60 s (it works once):\n  {}\n\
             or send `Authorization: Bearer` with the VM token; `--auth public` opens it to anyone",
            link.url
        ),
        (UrlAuth::Token, _) => eprintln!(
            "token: only `Authorization: Bearer` with the VM token or a scoped token \
             (`nestbox url token {vm}`) opens it"
        ),
        _ => eprintln!("public: anyone may open it"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::seconds;

    #[test]
    fn durations() {
        assert_eq!(seconds("90").unwrap(), 90);
        assert_eq!(seconds("15m").unwrap(), 900);
        assert_eq!(seconds("1h").unwrap(), 3600);
        assert_eq!(seconds("7d").unwrap(), 604_800);
        assert!(seconds("1w").is_err());
        assert!(seconds("h").is_err());
    }
}
