//! `cargo xtask bench client`: the ingress's own HTTP/1.1 backend client
//! against hyper's (`hyper::client::conn::http1` with a pool of ready
//! connections), isolated from the rest of the proxy: the same
//! `nb-backend`, the same requests, a `current_thread` runtime pinned to
//! CPU 0 as the guest's is, the backend on CPU 1. Each client runs in a
//! process of its own (so its memory is its own), twice, alternating.
//!
//! Rows: keep-alive GET req/s with 1 and 64 requests in flight; MiB/s of
//! 1 MiB bodies with 8 in flight; and memory per connection — resident
//! memory added by 1,000 requests in flight at once (a backend that waits
//! 2 s before answering), and by the 1,000 idle kept-alive connections
//! they leave.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::Request;

#[derive(Parser)]
struct Args {
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Requests in flight for the memory rows.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure this client (`ours` or `hyper`) and print JSON.
    #[arg(long)]
    run: Option<String>,
}

const BACKEND: &str = "127.0.0.1:18190";

/// A table row: its label and the figure it shows.
type Row = (&'static str, fn(&Figures) -> f64);

#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Figures {
    rps_1: f64,
    rps_64: f64,
    mib_per_s_1mib_8: f64,
    /// KiB of resident memory per request in flight.
    kib_per_in_flight: f64,
    /// KiB of resident memory per idle kept-alive connection.
    kib_per_idle: f64,
}

/// One client under test.
trait Client: Send + Sync + 'static {
    /// GET `path`; the body's length once read to the end.
    fn get(
        &self,
        path: &'static str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize>> + Send + '_>>;
}

/// The ingress's own client.
struct Ours {
    client: nestbox_ingress::client::BackendClient,
    route: Arc<nestbox_ingress::routes::Route>,
}

impl Ours {
    fn new() -> Self {
        let routes = nestbox_ingress::routes::RouteTable::new();
        routes.insert(
            "bench.test",
            nestbox_ingress::routes::Backend {
                addr: BACKEND.parse().expect("an address"),
                netns: None,
            },
        );
        let client = nestbox_ingress::client::BackendClient::new(
            Duration::from_secs(5),
            Duration::from_secs(90),
            Duration::from_mins(1),
        );
        client.follow(&routes);
        Self {
            client,
            route: routes.get("bench.test").expect("just inserted"),
        }
    }
}

impl Client for Ours {
    fn get(
        &self,
        path: &'static str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize>> + Send + '_>> {
        Box::pin(async move {
            let req = Request::get(path)
                .header("host", "bench.test")
                .body(Empty::<Bytes>::new())?;
            let resp = self.client.send(&self.route, req).await?;
            Ok(resp.into_body().collect().await?.to_bytes().len())
        })
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// hyper's client connection with a pool of ready senders, as a proxy
/// would keep one (hyper-util's pooled client adds more on top).
#[derive(Default)]
struct Hyper {
    idle: parking_lot::Mutex<Vec<Sender>>,
}

impl Hyper {
    async fn sender(&self) -> Result<Sender> {
        loop {
            let Some(mut sender) = self.idle.lock().pop() else {
                break;
            };
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let tcp = tokio::net::TcpStream::connect(BACKEND).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

impl Client for Hyper {
    fn get(
        &self,
        path: &'static str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize>> + Send + '_>> {
        Box::pin(async move {
            let mut sender = self.sender().await?;
            let req = Request::get(path)
                .header("host", "bench.test")
                .body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await?;
            let len = resp.into_body().collect().await?.to_bytes().len();
            self.idle.lock().push(sender);
            Ok(len)
        })
    }
}

fn rss_kib() -> u64 {
    nestbox_tests::status_kib(std::process::id(), "VmRSS:")
}

/// Requests per second of `path` with `concurrency` in flight, and bytes
/// read.
async fn throughput(
    client: &Arc<dyn Client>,
    path: &'static str,
    concurrency: usize,
    secs: u64,
) -> Result<(f64, f64)> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        tasks.spawn(async move {
            let (mut n, mut bytes) = (0u64, 0u64);
            while Instant::now() < until {
                bytes += client.get(path).await? as u64;
                n += 1;
            }
            Ok::<_, anyhow::Error>((n, bytes))
        });
    }
    let (mut n, mut bytes) = (0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        let (a, b) = done??;
        n += a;
        bytes += b;
    }
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let per_s = |v: u64| v as f64 / secs as f64;
    Ok((per_s(n), per_s(bytes)))
}

/// Measures one client in this process.
async fn measure(name: &str, args: &Args) -> Result<Figures> {
    let client: Arc<dyn Client> = match name {
        "ours" => Arc::new(Ours::new()),
        "hyper" => Arc::new(Hyper::default()),
        other => bail!("unknown client {other}"),
    };
    // Warm up.
    throughput(&client, "/hello", 8, 1).await?;
    let (rps_1, _) = throughput(&client, "/hello", 1, args.seconds).await?;
    let (rps_64, _) = throughput(&client, "/hello", 64, args.seconds).await?;
    let (_, bytes) = throughput(&client, "/bytes?n=1048576", 8, args.seconds).await?;
    // Memory: a fresh client, so that the connections counted are its own.
    let client: Arc<dyn Client> = match name {
        "ours" => Arc::new(Ours::new()),
        _ => Arc::new(Hyper::default()),
    };
    let before = rss_kib();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.in_flight {
        let client = client.clone();
        tasks.spawn(async move { client.get("/slow?ms=2000").await });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = rss_kib();
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let idle = rss_kib();
    #[expect(clippy::cast_precision_loss, reason = "KiB counts far below 2^52")]
    let per = |kib: u64| kib as f64 / args.in_flight as f64;
    Ok(Figures {
        rps_1,
        rps_64,
        mib_per_s_1mib_8: bytes / f64::from(1 << 20),
        kib_per_in_flight: per(during.saturating_sub(before)),
        kib_per_idle: per(idle.saturating_sub(before)),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(name) = &args.run {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let figures = runtime.block_on(measure(name, &args))?;
        println!("{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    nestbox_tests::require_tool("taskset", "util-linux");
    let me = std::env::current_exe()?;
    let bin = me.parent().context("binary dir")?.to_owned();
    let mut backend = Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin.join("nb-backend"))
        .arg(BACKEND)
        .stdout(Stdio::null())
        .spawn()
        .context("start nb-backend")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(BACKEND).is_err() {
        if Instant::now() > deadline {
            bail!("nb-backend did not listen on {BACKEND}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut results: Vec<(&str, Figures)> = Vec::new();
    for name in ["ours", "hyper", "hyper", "ours"] {
        eprintln!("{name} …");
        let out = Command::new("taskset")
            .args(["-c", "0"])
            .arg(&me)
            .args(["--run", name, "--seconds", &args.seconds.to_string()])
            .args(["--in-flight", &args.in_flight.to_string()])
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("the {name} run failed");
        }
        results.push((name, serde_json::from_slice(&out.stdout)?));
    }
    let _ = backend.kill();
    let _ = backend.wait();
    let mean = |name: &str, pick: fn(&Figures) -> f64| {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == name)
            .map(|r| pick(&r.1))
            .collect();
        #[expect(clippy::cast_precision_loss, reason = "two runs")]
        let n = v.len() as f64;
        v.iter().sum::<f64>() / n
    };
    println!("| measure (mean of 2 runs each) | ours | hyper http1 | ours / hyper |");
    println!("| --- | ---: | ---: | ---: |");
    let rows: [Row; 5] = [
        ("GET req/s, 1 in flight", |f| f.rps_1),
        ("GET req/s, 64 in flight", |f| f.rps_64),
        ("MiB/s of 1 MiB bodies, 8 in flight", |f| f.mib_per_s_1mib_8),
        ("KiB per request in flight", |f| f.kib_per_in_flight),
        ("KiB per idle kept-alive connection", |f| f.kib_per_idle),
    ];
    for (label, pick) in rows {
        let (ours, theirs) = (mean("ours", pick), mean("hyper", pick));
        println!(
            "| {label} | {ours:.1} | {theirs:.1} | {:.2}× |",
            ours / theirs
        );
    }
    if let Some(path) = &args.json {
        let doc: Vec<_> = results
            .iter()
            .map(|(name, f)| serde_json::json!({"client": name, "figures": f}))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}
