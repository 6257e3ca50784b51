//! `cargo xtask bench portwatch`: how fast, and at what CPU cost, the port
//! watcher notices a `listen()` — against the way peers do it, in the same
//! run on the same listens.
//!
//! One `nb-listen` process in a sandbox (netns + cgroup) opens N listeners
//! on distinct ports at jittered intervals, holds each long enough for a 2 s
//! poller to see it, then closes it. Three detectors watch at once:
//! - nestbox: the eBPF watcher (sockops + ring buffer + tokio `AsyncFd`), on
//!   a thread of its own with a current-thread runtime;
//! - polling `/proc/PID/net/tcp{,6}` every 1 s (E2B's envd) and every 2 s
//!   (VS Code / Gitpod port detection), each on its own thread.
//!
//! Latency is `CLOCK_MONOTONIC` just before `listen()` (taken by the
//! listener) to the moment the detector's thread has the news. CPU is each
//! detector thread's `CLOCK_THREAD_CPUTIME_ID`, during the listens and during
//! an idle stretch; the kernel time of the BPF programs is reported apart
//! (`BPF_ENABLE_STATS`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use nestbox_guest::portwatch::{Origin, PortEvent, Watcher};
use nestbox_tests::{Lcg, Owner, Sandbox, monotonic_ns, thread_cpu_ns};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

#[derive(Parser)]
struct Args {
    /// Number of listens.
    #[arg(long, default_value_t = 1000)]
    listens: usize,
    /// Mean gap between two listens, in milliseconds (jittered ±50 %).
    #[arg(long, default_value_t = 30)]
    gap_ms: u64,
    /// How long each listener stays open, in milliseconds (must exceed the
    /// slowest poll interval so that the pollers can see every one).
    #[arg(long, default_value_t = 2500)]
    hold_ms: u64,
    /// Length of the idle stretch, in seconds.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// First port used.
    #[arg(long, default_value_t = 30_000)]
    base_port: u16,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

enum Ctl {
    Cpu(oneshot::Sender<u64>),
    Stop(oneshot::Sender<Vec<(u16, u64)>>),
}

/// The eBPF watcher on its own thread; returns its control channel.
fn start_watcher(
    sb: &Sandbox,
) -> Result<(mpsc::UnboundedSender<Ctl>, std::thread::JoinHandle<()>)> {
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Ctl>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let cgroup = sb.cgroup().to_owned();
    let netns = sb.netns();
    let handle = std::thread::Builder::new()
        .name("nestbox-watcher".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut w = match Watcher::start(&cgroup, Some(&netns)).await {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut seen: Vec<(u16, u64)> = Vec::new();
                loop {
                    tokio::select! {
                        event = w.next() => {
                            let at = monotonic_ns();
                            match event {
                                Ok(PortEvent::Listening { port, origin: Origin::Kernel { .. }, .. }) => seen.push((port, at)),
                                Ok(_) => {}
                                Err(e) => panic!("watcher failed: {e}"),
                            }
                        }
                        ctl = ctl_rx.recv() => match ctl {
                            Some(Ctl::Cpu(reply)) => { let _ = reply.send(thread_cpu_ns()); }
                            Some(Ctl::Stop(reply)) => { let _ = reply.send(std::mem::take(&mut seen)); break; }
                            None => break,
                        }
                    }
                }
            });
        })?;
    ready_rx.recv().context("watcher thread died")??;
    Ok((ctl_tx, handle))
}

fn ask_cpu(ctl: &mpsc::UnboundedSender<Ctl>) -> Result<u64> {
    let (tx, rx) = oneshot::channel();
    ctl.send(Ctl::Cpu(tx)).ok().context("watcher gone")?;
    rx.blocking_recv().context("watcher gone")
}

/// A peer-style poller of `/proc/PID/net/tcp{,6}`.
struct Poller {
    seen: Arc<std::sync::Mutex<HashMap<u16, u64>>>,
    cpu: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(pid: u32, interval: Duration) -> Result<Self> {
        let seen = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let cpu = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, st) = (seen.clone(), cpu.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name(format!("poll-{}ms", interval.as_millis()))
            .spawn(move || {
                let files = [
                    format!("/proc/{pid}/net/tcp"),
                    format!("/proc/{pid}/net/tcp6"),
                ];
                let mut next = monotonic_ns();
                let mut open: HashSet<u16> = HashSet::new();
                while !st.load(Ordering::Relaxed) {
                    let mut now_open = HashSet::new();
                    for f in &files {
                        if let Ok(text) = std::fs::read_to_string(f) {
                            now_open.extend(listening_ports(&text));
                        }
                    }
                    let at = monotonic_ns();
                    {
                        let mut seen = s.lock().expect("poller lock");
                        for port in now_open.difference(&open) {
                            seen.entry(*port).or_insert(at);
                        }
                    }
                    open = now_open;
                    c.store(thread_cpu_ns(), Ordering::Relaxed);
                    // A ticker: fixed schedule, like Go's time.Ticker.
                    next += u64::try_from(interval.as_nanos()).expect("interval fits");
                    let now = monotonic_ns();
                    if next > now {
                        std::thread::sleep(Duration::from_nanos(next - now));
                    }
                }
            })?;
        Ok(Self {
            seen,
            cpu,
            stop,
            handle: Some(handle),
        })
    }

    fn cpu(&self) -> u64 {
        self.cpu.load(Ordering::Relaxed)
    }

    fn finish(mut self) -> HashMap<u16, u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        std::mem::take(&mut self.seen.lock().expect("poller lock"))
    }
}

/// Local ports of LISTEN (state 0A) rows of a `/proc/net/tcp{,6}` table.
fn listening_ports(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let mut f = line.split_whitespace();
        let local = f.nth(1)?;
        let state = f.nth(1)?;
        (state == "0A")
            .then(|| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())
            .flatten()
    })
}

#[derive(Serialize)]
struct Row {
    approach: String,
    detected: usize,
    missed: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    cpu_idle_ms_per_min: f64,
    cpu_ms_per_1000_listens: f64,
    kernel_bpf_ms_per_1000_listens: Option<f64>,
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds well below 2^52")]
    let v = sorted[nestbox_tests::quantile_index(sorted.len(), q)] as f64;
    v / 1000.0
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts and nanoseconds well below 2^52"
)]
fn row(
    approach: &str,
    listens: &[(u16, u64)],
    detected_at: &HashMap<u16, u64>,
    idle_cpu_ns: u64,
    idle_secs: u64,
    active_cpu_ns: u64,
    kernel_ns: Option<u64>,
) -> Row {
    let mut lat: Vec<u64> = listens
        .iter()
        .filter_map(|(port, t0)| detected_at.get(port).map(|t| t.saturating_sub(*t0)))
        .collect();
    lat.sort_unstable();
    let n = listens.len() as f64;
    Row {
        approach: approach.to_owned(),
        detected: lat.len(),
        missed: listens.len() - lat.len(),
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        max_us: lat.last().map_or(f64::NAN, |&m| m as f64 / 1000.0),
        cpu_idle_ms_per_min: idle_cpu_ns as f64 / 1e6 * 60.0 / idle_secs as f64,
        cpu_ms_per_1000_listens: active_cpu_ns as f64 / 1e6 / n * 1000.0,
        kernel_bpf_ms_per_1000_listens: kernel_ns.map(|k| k as f64 / 1e6 / n * 1000.0),
    }
}

fn fmt_ms(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// Opens `args.listens` listeners at jittered intervals, each held for
/// `args.hold_ms`, and closes them all. Returns (port, t0) per listen.
fn drive(owner: &mut Owner, args: &Args) -> Result<Vec<(u16, u64)>> {
    let mut rng = Lcg(7);
    let mut listens = Vec::with_capacity(args.listens);
    let mut open: std::collections::VecDeque<(u64, u64)> = std::collections::VecDeque::new();
    let start = monotonic_ns();
    let mut at = start;
    for i in 0..args.listens {
        at += (args.gap_ms / 2 + rng.below(args.gap_ms.max(1))) * 1_000_000;
        while let Some(&(opened, id)) = open.front() {
            if opened + args.hold_ms * 1_000_000 > at {
                break;
            }
            owner.close(id)?;
            open.pop_front();
        }
        let now = monotonic_ns();
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
        let port =
            args.base_port + u16::try_from(i).context("too many listens for the port range")?;
        let l = owner.listen(&format!("0.0.0.0:{port}"), "")?;
        listens.push((port, l.t0_ns));
        open.push_back((l.t0_ns, l.id));
    }
    std::thread::sleep(Duration::from_millis(args.hold_ms));
    for (_, id) in open.drain(..) {
        owner.close(id)?;
    }
    Ok(listens)
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| approach | p50 | p99 | max | missed | CPU idle (per min) | CPU per 1,000 listens |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let kernel = r
            .kernel_bpf_ms_per_1000_listens
            .map(|k| format!(" + {k:.2} ms in BPF programs"))
            .unwrap_or_default();
        println!(
            "| {} | {} | {} | {} | {} | {:.2} ms | {:.1} ms{} |",
            r.approach,
            fmt_ms(r.p50_us),
            fmt_ms(r.p99_us),
            fmt_ms(r.max_us),
            r.missed,
            r.cpu_idle_ms_per_min,
            r.cpu_ms_per_1000_listens,
            kernel
        );
    }
}

/// Kernel time of each BPF program during the listens.
fn print_kernel(delta: &[(String, u64, u64)]) {
    let runs: u64 = delta.iter().map(|d| d.2).sum();
    let ns: u64 = delta.iter().map(|d| d.1).sum();
    println!(
        "\nBPF programs ran {runs} times during the listens, {} ns per run on average",
        ns / runs.max(1)
    );
    for (name, time, runs) in delta {
        println!(
            "  {name}: {runs} runs, {} ns per run",
            *time / (*runs).max(1)
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nb_listen = std::env::current_exe()?.with_file_name("nb-listen");
    let sb = Sandbox::new("bench")?;
    let mut owner = Owner::spawn(sb.command(&nb_listen))?;
    // Kernel run time of the BPF programs is counted while this fd is open.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let (ctl, watcher_thread) = start_watcher(&sb)?;
    let pollers = [
        Poller::start(owner.pid(), Duration::from_secs(1))?,
        Poller::start(owner.pid(), Duration::from_secs(2))?,
    ];
    let kernel_before = per_program();

    eprintln!(
        "portwatch bench: {} listens, ~{} ms apart, each held {} ms, then {} s idle…",
        args.listens, args.gap_ms, args.hold_ms, args.idle_secs
    );
    let cpu0 = (ask_cpu(&ctl)?, pollers.each_ref().map(Poller::cpu));
    let listens = drive(&mut owner, &args)?;
    // Let the 2 s poller take one more look.
    std::thread::sleep(Duration::from_millis(2100));
    let cpu1 = (ask_cpu(&ctl)?, pollers.each_ref().map(Poller::cpu));
    // Zero when the kernel refused BPF_ENABLE_STATS.
    // Per program: (name, ns, runs) during the listens.
    let kernel_delta: Vec<(String, u64, u64)> = per_program()
        .into_iter()
        .map(|(name, t, n)| {
            let (t0, n0) = kernel_before
                .iter()
                .find(|(b, ..)| *b == name)
                .map_or((0, 0), |(_, t0, n0)| (*t0, *n0));
            (name, t - t0, n - n0)
        })
        .collect();
    let kernel_active = stats
        .as_ref()
        .map(|_| kernel_delta.iter().map(|d| d.1).sum::<u64>());

    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let cpu2 = (ask_cpu(&ctl)?, pollers.each_ref().map(Poller::cpu));

    let (tx, rx) = oneshot::channel();
    ctl.send(Ctl::Stop(tx)).ok().context("watcher gone")?;
    let ours: HashMap<u16, u64> = rx.blocking_recv()?.into_iter().collect();
    watcher_thread.join().ok();
    drop(stats);
    let [p1, p2] = pollers;
    let seen = [p1.finish(), p2.finish()];

    let mut rows = vec![row(
        "nestbox eBPF (sockops + ring buffer)",
        &listens,
        &ours,
        cpu2.0 - cpu1.0,
        args.idle_secs,
        cpu1.0 - cpu0.0,
        kernel_active,
    )];
    for (i, (name, seen)) in [
        "poll /proc/net/tcp every 1 s (E2B)",
        "poll /proc/net/tcp every 2 s (VS Code, Gitpod)",
    ]
    .into_iter()
    .zip(&seen)
    .enumerate()
    {
        rows.push(row(
            name,
            &listens,
            seen,
            cpu2.1[i] - cpu1.1[i],
            args.idle_secs,
            cpu1.1[i] - cpu0.1[i],
            None,
        ));
    }

    print_table(&rows);
    if kernel_active.is_some() {
        print_kernel(&kernel_delta);
    }
    let target = rows[0].p99_us <= 1000.0 && rows[0].missed == 0;
    println!(
        "\n{} listens; target for nestbox p99 <= 1 ms with none missed: {}",
        listens.len(),
        if target { "met" } else { "NOT met" }
    );
    if let Some(path) = &args.json {
        let doc: BTreeMap<&str, serde_json::Value> = BTreeMap::from([
            ("listens", serde_json::json!(listens.len())),
            ("rows", serde_json::to_value(&rows)?),
        ]);
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    owner.kill()?;
    Ok(())
}

/// Run time (ns) and count of each of our programs since it was loaded.
fn per_program() -> Vec<(String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| matches!(p.name_as_str(), Some("nb_sockops" | "nb_sock_release")))
        .map(|p| {
            (
                p.name_as_str().unwrap_or_default().to_owned(),
                u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                p.run_count(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1F91 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert_eq!(listening_ports(table).collect::<Vec<_>>(), vec![8080]);
    }
}
