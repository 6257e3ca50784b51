//! `cargo xtask bench ingress`: nestbox's ingress against nginx as a
//! TLS-terminating reverse proxy, same machine, same run, same backend.
//!
//! Both proxies get the same ECDSA P-256 certificate, TLS 1.3, keep-alive to
//! the same `nb-backend` (`GET /hello`), and are pinned to CPU 0 (nestbox's
//! runtime then has one worker; nginx runs one worker). The system under
//! test is the proxy with its app, as in a VM where both share the CPUs: the
//! backend runs on CPU 0 too. The load generators (wrk, h2load) have CPU 1
//! to themselves, so that they are not what limits a row: with the backend
//! beside them, the new-connection row stopped at the same ~3,250 conn/s
//! for both proxies with nestbox's CPU 42 % idle — it measured the load
//! generator, not the proxies. Each pair runs twice in alternating order
//! (nestbox, nginx, nginx, nestbox).
//!
//! Rows: keep-alive HTTP/1.1 req/s and p50/p99 latency (wrk), HTTP/2 req/s
//! (h2load), new TLS connections per second (wrk with `Connection: close`),
//! and each proxy's peak RSS (`VmHWM`, summed over nginx's processes).
//!
//! Then the first certificate: nestbox-ingress and Caddy, each started with
//! an empty state directory against a freshly started Pebble
//! (`PEBBLE_VA_NOSLEEP`, HTTP-01 on 127.0.0.1:80), timed from the spawn to
//! the first HTTPS answer that verifies against Pebble's root; the median
//! of `--cert-runs` each, alternating.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Concurrent connections of the load generators.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The nestbox-ingress binary to measure (default: beside this one).
    #[arg(long)]
    ingress: Option<PathBuf>,
    /// First-certificate runs per proxy (0: skip that part).
    #[arg(long, default_value_t = 5)]
    cert_runs: usize,
    /// Only the first-certificate part.
    #[arg(long)]
    cert_only: bool,
}

const BACKEND: &str = "127.0.0.1:18090";
const NESTBOX_PORT: u16 = 18443;
const NGINX_PORT: u16 = 28443;

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Figures {
    h1_rps: f64,
    h1_p50_ms: f64,
    h1_p99_ms: f64,
    h2_rps: f64,
    new_tls_per_s: f64,
    /// The proxy's CPU time (user + system, all its processes) per 1,000
    /// new TLS connections: what a connection costs the proxy, apart from
    /// how fast the load generator can open them.
    tls_cpu_ms_per_1000: f64,
    peak_rss_mib: f64,
}

fn require(tool: &str, package: &str) {
    nestbox_tests::require_tool(tool, package);
}

fn write_cert(dir: &Path) -> Result<()> {
    // rcgen's default key is ECDSA P-256.
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(())
}

fn pinned(cpu: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string()]).arg(program);
    cmd
}

fn ensure_free(port: u16) -> Result<()> {
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        bail!("port {port} is taken (a previous run left a process behind?): free it first");
    }
    Ok(())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} after 20 s")
}

struct Proxy {
    name: &'static str,
    port: u16,
    child: Child,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Pebble's issuing root, fetched after every restart (it changes).
fn client_config(root: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &std::fs::read(root)?[..]) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One HTTPS GET of `/hello` on 127.0.0.1:443 as `host`: whether it
/// verified and answered 200.
fn https_ok(config: &Arc<rustls::ClientConfig>, host: &'static str) -> bool {
    use std::io::{Read, Write};
    let Ok(tcp) = std::net::TcpStream::connect(("127.0.0.1", 443)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let Ok(conn) = rustls::ClientConnection::new(config.clone(), host.try_into().expect("a name"))
    else {
        return false;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if tls.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// Spawns `start`, then polls until `host` answers over HTTPS with a
/// certificate from `root`; the time from the spawn.
fn first_certificate(
    root: &Path,
    host: &'static str,
    start: impl FnOnce() -> Result<Child>,
) -> Result<Duration> {
    let config = client_config(root)?;
    let t0 = Instant::now();
    let mut child = start()?;
    let deadline = t0 + Duration::from_mins(1);
    let took = loop {
        if https_ok(&config, host) {
            break t0.elapsed();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{host}: no valid HTTPS answer within 60 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    Ok(took)
}

/// The first-certificate race; returns (nestbox, caddy) in ms, each run.
fn certificate_race(dir: &Path, ingress: &Path, runs: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    const HOST: &str = "bench.test";
    for port in [80, 443, 14000, 15000, 8053, 8055] {
        ensure_free(port)?;
    }
    let mut pebble =
        nestbox_tests::pebble::Pebble::start(&dir.join("pebble"), "127.0.0.1", "127.0.0.1", 8053)?;
    let ca = pebble.listener_ca();
    let (mut ours, mut caddy) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for name in if run % 2 == 0 {
            ["nestbox", "caddy"]
        } else {
            ["caddy", "nestbox"]
        } {
            // Fresh state on both sides.
            pebble.stop()?;
            pebble.resume()?;
            let root = pebble.issuing_root()?;
            let state = dir.join(format!("cert-{name}-{run}"));
            std::fs::create_dir_all(&state)?;
            let took = if name == "nestbox" {
                let config = state.join("ingress.toml");
                std::fs::write(
                    &config,
                    format!(
                        "https = \"127.0.0.1:443\"\nhttp = \"127.0.0.1:80\"\n\
                         [acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\nca_root = \"{}\"\n\
                         state_dir = \"{}\"\nchallenge = \"http-01\"\n\
                         [[route]]\nhost = \"{HOST}\"\nbackend = \"{BACKEND}\"\n",
                        ca.display(),
                        state.join("acme").display()
                    ),
                )?;
                let log = std::fs::File::create(state.join("ingress.log"))?;
                // NB_INGRESS_LOG (e.g. `nestbox_ingress=debug`) shows the
                // order's steps and their times.
                let filter = std::env::var("NB_INGRESS_LOG").ok();
                let took = first_certificate(&root, HOST, || {
                    Command::new(ingress)
                        .args(["serve", "--config"])
                        .arg(&config)
                        .env("RUST_LOG", filter.as_deref().unwrap_or("warn"))
                        .stderr(log)
                        .spawn()
                        .context("start nestbox-ingress")
                })?;
                if filter.is_some() {
                    eprintln!("{}", std::fs::read_to_string(state.join("ingress.log"))?);
                }
                took
            } else {
                let config = state.join("Caddyfile");
                std::fs::write(
                    &config,
                    format!(
                        "{{\n  admin off\n  http_port 80\n  https_port 443\n  skip_install_trust\n  \
                         acme_ca https://127.0.0.1:14000/dir\n  acme_ca_root {}\n  \
                         storage file_system {}\n}}\n\
                         {HOST} {{\n  bind 127.0.0.1\n  reverse_proxy {BACKEND}\n}}\n",
                        ca.display(),
                        state.join("caddy").display()
                    ),
                )?;
                let log = std::fs::File::create(state.join("caddy.log"))?;
                first_certificate(&root, HOST, || {
                    Command::new("caddy")
                        .args(["run", "--adapter", "caddyfile", "--config"])
                        .arg(&config)
                        .env("HOME", &state)
                        .env("XDG_DATA_HOME", state.join("data"))
                        .env("XDG_CONFIG_HOME", state.join("config"))
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .context("start caddy")
                })?
            };
            eprintln!(
                "  first certificate, {name}: {:.0} ms",
                took.as_secs_f64() * 1000.0
            );
            if name == "nestbox" {
                ours.push(took.as_secs_f64() * 1000.0);
            } else {
                caddy.push(took.as_secs_f64() * 1000.0);
            }
        }
    }
    Ok((ours, caddy))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn start_nestbox(dir: &Path, bin: &Path) -> Result<Proxy> {
    let config = dir.join("ingress.toml");
    std::fs::write(
        &config,
        format!(
            "https = \"127.0.0.1:{NESTBOX_PORT}\"\nhttp = \"127.0.0.1:18081\"\n\
             [[route]]\nhost = \"localhost\"\nbackend = \"{BACKEND}\"\n\
             [[certificate]]\nnames = [\"localhost\"]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n\
             ",
            dir.display()
        ),
    )?;
    let child = pinned(0, bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.join("ingress.log"))?)
        .spawn()
        .context("start nestbox-ingress")?;
    wait_port(NESTBOX_PORT)?;
    Ok(Proxy {
        name: "nestbox",
        port: NESTBOX_PORT,
        child,
    })
}

fn start_nginx(dir: &Path) -> Result<Proxy> {
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nworker_processes 1;\npid {0}/nginx.pid;\nerror_log {0}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {0}/body;\n  proxy_temp_path {0}/proxy;\n\
             fastcgi_temp_path {0}/fcgi;\n  uwsgi_temp_path {0}/uwsgi;\n  scgi_temp_path {0}/scgi;\n\
             upstream app {{ server {BACKEND}; keepalive 128; }}\n\
             server {{\n    listen 127.0.0.1:{NGINX_PORT} ssl http2;\n    server_name localhost;\n\
             ssl_certificate {0}/cert.pem;\n    ssl_certificate_key {0}/key.pem;\n    ssl_protocols TLSv1.3;\n\
             keepalive_requests 1000000;\n\
             location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
             proxy_set_header X-Forwarded-For $remote_addr;\n      proxy_set_header X-Forwarded-Proto https;\n\
             proxy_buffering off;\n    }}\n  }}\n}}\n",
            dir.display()
        ),
    )?;
    let child = pinned(0, "nginx")
        .arg("-c")
        .arg(&config)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .stderr(Stdio::null())
        .spawn()
        .context("start nginx")?;
    wait_port(NGINX_PORT)?;
    Ok(Proxy {
        name: "nginx",
        port: NGINX_PORT,
        child,
    })
}

/// The pid and its children's pids.
fn family(pid: u32) -> Vec<String> {
    let mut pids = vec![pid.to_string()];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(children.split_whitespace().map(str::to_owned));
    }
    pids
}

/// CPU time (user + system) of a process and its children, in ms.
fn cpu_ms(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    let ticks: u64 = family(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    #[expect(clippy::cast_precision_loss, reason = "tick counts far below 2^52")]
    let ms = ticks as f64 * 1000.0 / hz as f64;
    ms
}

/// Peak RSS of a process and its children, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let hwm = |p: &str| -> u64 {
        p.parse()
            .map_or(0, |pid| nestbox_tests::status_kib(pid, "VmHWM:"))
    };
    let total: u64 = family(pid).iter().map(|p| hwm(p)).sum();
    #[expect(clippy::cast_precision_loss, reason = "KiB counts far below 2^52")]
    let mib = total as f64 / 1024.0;
    mib
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// wrk's "Requests/sec:", failing if wrk saw errors.
fn wrk_rps(out: &str) -> Result<f64> {
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("wrk saw errors ({}):\n{out}", line.trim());
    }
    Ok(out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("wrk printed no Requests/sec")?
        .trim()
        .parse()?)
}

/// wrk's "Requests/sec:" and its 50 %/99 % latencies (ms).
fn parse_wrk(out: &str) -> Result<(f64, f64, f64)> {
    let rps = wrk_rps(out)?;
    let pct = |p: &str| -> Result<f64> {
        let v = out
            .lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .with_context(|| format!("wrk printed no {p} latency"))?
            .trim();
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let num: f64 = num.parse()?;
        Ok(match unit {
            "us" => num / 1000.0,
            "ms" => num,
            "s" => num * 1000.0,
            other => bail!("unknown wrk unit {other}"),
        })
    };
    Ok((rps, pct("50%")?, pct("99%")?))
}

fn parse_h2load(out: &str) -> Result<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .context("h2load printed no result")?;
    let rps = line
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" req/s"))
        .context("no req/s in h2load's result")?;
    let failed = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(',').find_map(|p| p.trim().strip_suffix(" failed")))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if failed > 0 {
        bail!("h2load: {failed} requests failed:\n{out}");
    }
    Ok(rps.trim().parse()?)
}

fn measure(proxy: &Proxy, args: &Args) -> Result<Figures> {
    let url = format!("https://localhost:{}/hello", proxy.port);
    let secs = format!("{}s", args.seconds);
    let conns = args.connections.to_string();
    // Warm up (handshakes, pools).
    run(pinned(1, "wrk").args(["-t1", "-c", &conns, "-d", "2s", &url]))?;
    let out = run(pinned(1, "wrk").args(["-t1", "-c", &conns, "-d", &secs, "--latency", &url]))?;
    let (h1_rps, h1_p50_ms, h1_p99_ms) = parse_wrk(&out)?;
    let out = run(pinned(1, "h2load").args([
        "-c",
        &conns,
        "-m",
        "10",
        "-D",
        &args.seconds.to_string(),
        "--warm-up-time=1",
        &url,
    ]))?;
    let h2_rps = parse_h2load(&out)?;
    let cpu_before = cpu_ms(proxy.child.id());
    let out = run(pinned(1, "wrk").args([
        "-t1",
        "-c",
        &conns,
        "-d",
        &secs,
        "-H",
        "Connection: close",
        &url,
    ]))?;
    let cpu = cpu_ms(proxy.child.id()) - cpu_before;
    let new_tls_per_s = wrk_rps(&out)?;
    #[expect(clippy::cast_precision_loss, reason = "seconds are small")]
    let opened = new_tls_per_s * args.seconds as f64;
    Ok(Figures {
        h1_rps,
        h1_p50_ms,
        h1_p99_ms,
        h2_rps,
        new_tls_per_s,
        tls_cpu_ms_per_1000: cpu / opened * 1000.0,
        peak_rss_mib: peak_rss_mib(proxy.child.id()),
    })
}

/// A ratio row: label, the figure, whether higher is better.
type Row = (&'static str, fn(&Figures) -> f64, bool);

/// The table of every run and the nestbox/nginx ratios.
fn report(results: &[(usize, &'static str, Figures)]) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| round | proxy | HTTP/1.1 keep-alive req/s | p50 | p99 | HTTP/2 req/s | new TLS conn/s | proxy CPU per 1,000 new conns | peak RSS |"
    );
    let _ = writeln!(
        table,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (round, name, f) in results {
        let _ = writeln!(
            table,
            "| {round} | {name} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.0} | {:.0} ms | {:.1} MiB |",
            f.h1_rps,
            f.h1_p50_ms,
            f.h1_p99_ms,
            f.h2_rps,
            f.new_tls_per_s,
            f.tls_cpu_ms_per_1000,
            f.peak_rss_mib
        );
    }
    let mean = |name: &str, pick: fn(&Figures) -> f64| -> f64 {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.1 == name)
            .map(|r| pick(&r.2))
            .collect();
        #[expect(clippy::cast_precision_loss, reason = "two rounds")]
        let n = v.len() as f64;
        v.iter().sum::<f64>() / n
    };
    let _ = writeln!(
        table,
        "\nnestbox / nginx (mean of the rounds; ≥ 1.00 is as good or better):"
    );
    let rows: [Row; 7] = [
        ("HTTP/1.1 req/s", |f| f.h1_rps, true),
        ("HTTP/1.1 p50 latency", |f| f.h1_p50_ms, false),
        ("HTTP/1.1 p99 latency", |f| f.h1_p99_ms, false),
        ("HTTP/2 req/s", |f| f.h2_rps, true),
        ("new TLS connections/s", |f| f.new_tls_per_s, true),
        ("proxy CPU per new conn", |f| f.tls_cpu_ms_per_1000, false),
        ("peak RSS", |f| f.peak_rss_mib, false),
    ];
    for (label, pick, higher_is_better) in rows {
        let (ours, theirs) = (mean("nestbox", pick), mean("nginx", pick));
        let ratio = if higher_is_better {
            ours / theirs
        } else {
            theirs / ours
        };
        let _ = writeln!(
            table,
            "  {label:<24} {ratio:.2}×  (nestbox {ours:.2}, nginx {theirs:.2})"
        );
    }
    table
}

fn main() -> Result<()> {
    let args = Args::parse();
    for (tool, package) in [
        ("taskset", "util-linux"),
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("caddy", "caddy"),
    ] {
        require(tool, package);
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("binary dir")?
        .to_owned();
    let ingress = args
        .ingress
        .clone()
        .unwrap_or_else(|| bin.join("nestbox-ingress"));
    eprintln!("nestbox-ingress: {}", ingress.display());
    let dir = std::env::temp_dir().join(format!("nestbox-bench-ingress-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    write_cert(&dir)?;
    for port in [18090, 18081, NESTBOX_PORT, NGINX_PORT] {
        ensure_free(port)?;
    }
    let mut backend = pinned(0, bin.join("nb-backend"))
        .arg(BACKEND)
        .stdout(Stdio::null())
        .spawn()
        .context("start nb-backend")?;
    wait_port(18090)?;

    let mut results: Vec<(usize, &'static str, Figures)> = Vec::new();
    let rounds: &[[&str; 2]] = if args.cert_only {
        &[]
    } else {
        &[["nestbox", "nginx"], ["nginx", "nestbox"]]
    };
    for (round, order) in rounds.iter().enumerate() {
        for name in order {
            eprintln!("round {}: {name}…", round + 1);
            let proxy = if *name == "nestbox" {
                start_nestbox(&dir, &ingress)?
            } else {
                start_nginx(&dir)?
            };
            let figures = measure(&proxy, &args)?;
            results.push((round + 1, proxy.name, figures));
        }
    }
    let race = if args.cert_runs > 0 {
        eprintln!("the first certificate, against a fresh Pebble…");
        Some(certificate_race(&dir, &ingress, args.cert_runs)?)
    } else {
        None
    };
    let _ = backend.kill();
    let _ = backend.wait();

    if !results.is_empty() {
        println!("\n{}", report(&results));
    }
    if let Some((ours, caddy)) = &race {
        let (a, b) = (median(ours), median(caddy));
        println!(
            "first certificate (spawn → first verified HTTPS answer), median of {}: \
             nestbox {a:.0} ms, Caddy {b:.0} ms → {:.2}× Caddy's time (target ≤ 0.50×)",
            ours.len(),
            a / b
        );
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "runs": results
                .iter()
                .map(|(round, name, f)| serde_json::json!({"round": round, "proxy": name, "figures": f}))
                .collect::<Vec<_>>(),
            "first_certificate_ms": race.as_ref().map(|(ours, caddy)| serde_json::json!({"nestbox": ours, "caddy": caddy})),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
