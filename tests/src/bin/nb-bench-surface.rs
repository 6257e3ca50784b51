//! `cargo xtask bench surface`: the user's surface of a running guest (the
//! `guest` build profile, as it ships, in a netns-simulated VM: see
//! `benchvm`), each figure beside its floor from the same run:
//!
//! - `exec -- true` round trip (connect, upgrade, start in the container,
//!   exit frame) vs a plain HTTPS `GET /v1/status`;
//! - a TTY reattach without an offset → the first byte of the screen;
//! - a 1 GiB upload and download through the ingress (`curl -T` to
//!   `/v1/fs/write`, `curl` of `/v1/fs/read`) vs the same `curl`s against
//!   nginx (`WebDAV` PUT, static GET, same certificate) in a netns of its
//!   own with its root on the same kind of ext4 disk (loop images in RAM
//!   by default, `--disks`), over HTTP/1.1 and
//!   over HTTP/2 (both servers on the same protocol each time); the guest's
//!   peak RSS during each transfer;
//! - 20 tunnels opened at once to a loopback-only listener in the
//!   container: all connected, p50/p99 of the time to `connected`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nestbox_api::client::exec::Event;
use nestbox_api::client::{Client, Transport};
use nestbox_api::exec::ExecParams;
use nestbox_tests::Sandbox;
use nestbox_tests::benchvm::{TOKEN, VM_IP, Vm, start_in, user_disk};

#[derive(Parser)]
struct Args {
    /// Round trips timed (exec, status, reattach).
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// The transfer's size in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Each transfer's repeats (the median of each figure is shown: the
    /// disk's speed varies with what the machine did just before).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Where the VM's and nginx's directories and disk images go. The
    /// default, RAM, measures the software on both sides: this machine's
    /// disk runs at 0.1–1.3 GB/s depending on what it wrote a minute
    /// before. `--disks /tmp` puts them on that disk.
    #[arg(long, default_value = "/dev/shm")]
    disks: PathBuf,
    /// Tunnels opened at once.
    #[arg(long, default_value_t = 20)]
    tunnels: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `nestbox-guest` binary (default: next to this one).
    #[arg(long)]
    guest: Option<PathBuf>,
}

#[derive(serde::Serialize, Default)]
struct Results {
    exec_ms: (f64, f64),
    status_ms: (f64, f64),
    reattach_ms: (f64, f64),
    /// One per protocol curl speaks to both servers.
    transfers: Vec<Transfer>,
    tunnels_connected: usize,
    tunnels: usize,
    tunnel_connect_ms: (f64, f64),
}

/// The 1 GiB up and down over one protocol, ours and nginx's.
#[derive(serde::Serialize, Default)]
struct Transfer {
    /// `http/1.1` or `h2`.
    protocol: &'static str,
    upload_mib_s: f64,
    download_mib_s: f64,
    nginx_upload_mib_s: f64,
    /// nginx's upload with the `fsync` it does not do and ours does before
    /// answering (the durable floor).
    nginx_upload_fsync_mib_s: f64,
    nginx_download_mib_s: f64,
    upload_peak_rss_kib: u64,
    download_peak_rss_kib: u64,
}

fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q| v[nestbox_tests::quantile_index(v.len(), q)];
    (at(0.5), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `nestbox-guest` process among `pid` and its descendants.
fn guest_pid(pid: u32) -> u32 {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "nestbox-guest" {
        return pid;
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(guest_pid)
        .find(|p| *p != 0)
        .unwrap_or(0)
}

/// Runs `f` while sampling the RSS of process `pid`: its answer and the
/// highest RSS (KiB) seen meanwhile.
fn with_peak_rss<T>(pid: u32, f: impl FnOnce() -> Result<T>) -> Result<(T, u64)> {
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let running = running.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while running.load(Ordering::Relaxed) {
                peak = peak.max(nestbox_tests::status_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let answer = f();
    running.store(false, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    Ok((answer?, peak))
}

/// `curl` in the test's namespace against `host` at `ip`; answers seconds.
fn curl(ip: &str, host: &str, ca: &Path, args: &[&str], url: &str) -> Result<f64> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "900",
            "-o",
            "/dev/null",
            "-w",
            "%{time_total}",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", &format!("{host}:443:{ip}")])
        .args(args)
        .arg(url)
        .output()?;
    if !out.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// nginx with `WebDAV` PUT and the same certificate, in a namespace at
/// 10.203.2.2, its root on an ext4 disk of its own.
struct Nginx {
    dir: PathBuf,
    _sandbox: Sandbox,
    child: std::process::Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg(self.dir.join("user")).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_nginx(base: &Path, cert_dir: &Path) -> Result<Nginx> {
    nestbox_tests::require_tool("nginx", "nginx");
    let dir = base.join(format!("nestbox-bench-nginx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    user_disk(&dir)?;
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nuser root;\nworker_processes 1;\npid {0}/nginx.pid;\nerror_log {0}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {0}/user/tmp;\n  client_max_body_size 0;\n\
             sendfile on;\n\
             server {{\n    listen 443 ssl http2;\n    server_name _;\n    ssl_certificate {1}/cert.pem;\n\
             ssl_certificate_key {1}/key.pem;\n    ssl_protocols TLSv1.3;\n    root {0}/user/www;\n\
             location / {{ dav_methods PUT; create_full_put_path on; }}\n  }}\n}}\n",
            dir.display(),
            cert_dir.display()
        ),
    )?;
    std::fs::create_dir_all(dir.join("user/tmp"))?;
    std::fs::create_dir_all(dir.join("user/www"))?;
    let sandbox = Sandbox::new("benchnginx")?;
    sandbox.link_to_host("10.203.2.1/24", "10.203.2.2/24")?;
    let child = sandbox
        .command("nginx")
        .arg("-c")
        .arg(&config)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stderr(Stdio::null())
        .spawn()
        .context("start nginx")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("10.203.2.2", 443)).is_err() {
        if Instant::now() > deadline {
            bail!("nginx did not listen");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Nginx {
        dir,
        _sandbox: sandbox,
        child,
    })
}

/// A file of `mib` MiB of pseudo-random bytes.
fn payload(path: &Path, mib: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in &mut chunk {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state.to_le_bytes()[0];
        }
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(())
}

async fn exec_round_trips(client: &Client, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut exec, mut status) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t0 = Instant::now();
        let (_tx, mut rx) = client
            .exec(&ExecParams {
                cmd: vec!["true".into()],
                ..ExecParams::default()
            })
            .await?;
        loop {
            match rx.next().await? {
                Event::Exit(_) => break,
                Event::Closed => bail!("exec closed without an exit"),
                _ => {}
            }
        }
        exec.push(ms(t0.elapsed()));
        let t0 = Instant::now();
        client.status().await?;
        status.push(ms(t0.elapsed()));
    }
    Ok((exec, status))
}

async fn reattaches(client: &Client, n: usize) -> Result<Vec<f64>> {
    let (mut tx, mut rx) = client
        .exec(&ExecParams {
            cmd: vec!["sh".into()],
            tty: true,
            ..ExecParams::default()
        })
        .await?;
    let id = rx.info().context("session_info")?.session_id.clone();
    tx.stdin(b"echo ready\n").await?;
    loop {
        if let Event::Output(_, d) = rx.next().await?
            && String::from_utf8_lossy(&d).contains("ready")
        {
            break;
        }
    }
    tx.close().await?;
    drop(rx);
    let mut times = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let (tx, mut rx) = client.attach(&id, None).await?;
        match rx.next().await? {
            Event::Screen(_) => times.push(ms(t0.elapsed())),
            other => bail!("a reattach began with {other:?}, not the screen"),
        }
        tx.close().await?;
    }
    Ok(times)
}

async fn tunnel_connects(client: &Client, n: usize) -> Result<(usize, Vec<f64>)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            client
                .proxy("localhost", 3000)
                .await
                .map(|t| (t, ms(t0.elapsed())))
        }));
    }
    let (mut ok, mut times, mut open) = (0, Vec::new(), Vec::new());
    for t in tasks {
        if let Ok((tunnel, time)) = t.await? {
            ok += 1;
            times.push(time);
            open.push(tunnel);
        }
    }
    Ok((ok, times))
}

/// The transfers over HTTP/1.1 and HTTP/2 (what curl picks by ALPN), each
/// server in turn on the same protocol.
fn transfers(vm: &Vm, args: &Args, results: &mut Results) -> Result<()> {
    let file = vm.dir.join("payload.bin");
    payload(&file, args.mib)?;
    // On disk before anything is timed: its writeback would otherwise
    // compete with whichever upload comes first.
    std::fs::File::open(&file)?.sync_all()?;
    let nginx = start_nginx(&args.disks, &vm.dir)?;
    for (protocol, flag) in [("http/1.1", "--http1.1"), ("h2", "--http2")] {
        let mut runs = Vec::new();
        for _ in 0..args.repeat.max(1) {
            runs.push(transfer(vm, &nginx, &file, args, flag)?);
        }
        let mut t = median(&runs);
        t.protocol = protocol;
        results.transfers.push(t);
    }
    drop(nginx);
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Each figure's median over `runs`.
fn median(runs: &[Transfer]) -> Transfer {
    let mid = |f: fn(&Transfer) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let most = |f: fn(&Transfer) -> u64| runs.iter().map(f).max().unwrap_or(0);
    Transfer {
        protocol: "",
        upload_mib_s: mid(|t| t.upload_mib_s),
        download_mib_s: mid(|t| t.download_mib_s),
        nginx_upload_mib_s: mid(|t| t.nginx_upload_mib_s),
        nginx_upload_fsync_mib_s: mid(|t| t.nginx_upload_fsync_mib_s),
        nginx_download_mib_s: mid(|t| t.nginx_download_mib_s),
        upload_peak_rss_kib: most(|t| t.upload_peak_rss_kib),
        download_peak_rss_kib: most(|t| t.download_peak_rss_kib),
    }
}

fn transfer(vm: &Vm, nginx: &Nginx, file: &Path, args: &Args, flag: &str) -> Result<Transfer> {
    let mut r = Transfer::default();
    let ca = vm.dir.join("cert.pem");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let mib = u64_f64(args.mib);
    let file_arg = file.display().to_string();
    let pid = guest_pid(vm.guest.id());
    let (up, rss) = with_peak_rss(pid, || {
        curl(
            VM_IP,
            "api.vm1.test",
            &ca,
            &[flag, "-T", &file_arg, "-H", &auth],
            "https://api.vm1.test/v1/fs/write?path=/payload.bin",
        )
    })?;
    r.upload_peak_rss_kib = rss;
    r.upload_mib_s = mib / up;
    let (down, rss) = with_peak_rss(pid, || {
        curl(
            VM_IP,
            "api.vm1.test",
            &ca,
            &[flag, "-H", &auth],
            "https://api.vm1.test/v1/fs/read?path=/payload.bin",
        )
    })?;
    r.download_peak_rss_kib = rss;
    r.download_mib_s = mib / down;
    let up = curl(
        "10.203.2.2",
        "vm1.test",
        &ca,
        &[flag, "-T", &file_arg],
        "https://vm1.test/payload.bin",
    )?;
    r.nginx_upload_mib_s = mib / up;
    let t = Instant::now();
    std::fs::File::open(nginx.dir.join("user/www/payload.bin"))?.sync_all()?;
    r.nginx_upload_fsync_mib_s = mib / (up + t.elapsed().as_secs_f64());
    let down = curl(
        "10.203.2.2",
        "vm1.test",
        &ca,
        &[flag],
        "https://vm1.test/payload.bin",
    )?;
    r.nginx_download_mib_s = mib / down;
    Ok(r)
}

#[allow(clippy::cast_precision_loss, reason = "a figure for a person")]
fn u64_f64(n: u64) -> f64 {
    n as f64
}

fn main() -> Result<()> {
    let args = Args::parse();
    nestbox_tests::require_root();
    let guest = args.guest.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("nestbox-guest")
    });
    let vm = start_in(&args.disks, &guest, "")?;
    vm.api(
        "POST",
        "/v1/services",
        Some(r#"{"name": "echo", "cmd": "/bin/nb-escape", "args": ["echo", "3000"]}"#),
    )?;
    let roots = nestbox_api::client::roots_from_pem(&vm.dir.join("cert.pem"))?;
    let client = Client::new(
        Transport::Tls {
            host: "api.vm1.test".into(),
            addr: format!("{VM_IP}:443").parse()?,
            roots,
        },
        TOKEN,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut results = Results::default();
    rt.block_on(async {
        // Warm: the certificate, the container's first exec.
        let _ = exec_round_trips(&client, 3).await?;
        let (exec, status) = exec_round_trips(&client, args.rounds).await?;
        results.exec_ms = p50_p99(exec);
        results.status_ms = p50_p99(status);
        results.reattach_ms = p50_p99(reattaches(&client, args.rounds).await?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.proxy("localhost", 3000).await.is_err() {
            if Instant::now() > deadline {
                bail!("the echo service did not listen");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (ok, times) = tunnel_connects(&client, args.tunnels).await?;
        results.tunnels_connected = ok;
        results.tunnels = args.tunnels;
        results.tunnel_connect_ms = p50_p99(times);
        anyhow::Ok(())
    })?;
    transfers(&vm, &args, &mut results)?;
    print(&results, &args);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    drop(vm);
    Ok(())
}

fn print(r: &Results, args: &Args) {
    println!(
        "\nthe user's surface, guest as it ships (netns-simulated VM), {} rounds",
        args.rounds
    );
    println!("  {:<44} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!(
        "  {:<44} {:>10.2} {:>10.2}",
        "exec -- true round trip", r.exec_ms.0, r.exec_ms.1
    );
    println!(
        "  {:<44} {:>10.2} {:>10.2}",
        "  floor: HTTPS GET /v1/status", r.status_ms.0, r.status_ms.1
    );
    println!(
        "  {:<44} {:>10.2} {:>10.2}   (target ≤ 100 ms)",
        "TTY reattach → first byte of the screen", r.reattach_ms.0, r.reattach_ms.1
    );
    println!(
        "  {:<44} {:>10.2} {:>10.2}   ({}/{} connected)",
        format!("{} tunnels at once → connected", r.tunnels),
        r.tunnel_connect_ms.0,
        r.tunnel_connect_ms.1,
        r.tunnels_connected,
        r.tunnels
    );
    println!(
        "\n  {} MiB through the ingress vs nginx (curl, same certificate, same protocol; ext4 on loop images in {}; median of {}, peak RSS of all):",
        args.mib,
        args.disks.display(),
        args.repeat
    );
    println!(
        "  {:<26} {:>12} {:>12} {:>8} {:>16}",
        "", "nestbox MiB/s", "nginx MiB/s", "ratio", "guest peak RSS"
    );
    for t in &r.transfers {
        let p = t.protocol;
        for (what, ours, theirs, rss) in [
            (
                format!("{p} upload"),
                t.upload_mib_s,
                t.nginx_upload_mib_s,
                t.upload_peak_rss_kib,
            ),
            (
                format!("{p} download"),
                t.download_mib_s,
                t.nginx_download_mib_s,
                t.download_peak_rss_kib,
            ),
        ] {
            println!(
                "  {what:<26} {ours:>12.1} {theirs:>12.1} {:>7.2}× {:>12.1} MiB   (target ≥ 0.8×)",
                ours / theirs,
                u64_f64(rss) / 1024.0
            );
        }
        println!(
            "  {:<26} {:>12.1} {:>12.1} {:>7.2}×   (nginx's upload + the fsync it skips and ours does before answering)",
            format!("{p} upload, durable"),
            t.upload_mib_s,
            t.nginx_upload_fsync_mib_s,
            t.upload_mib_s / t.nginx_upload_fsync_mib_s
        );
    }
}
