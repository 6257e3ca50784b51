//! `cargo xtask bench guest`: the guest's memory and the time a bounce takes.
//!
//! A netns-simulated VM runs `nestbox-guest run` (static certificate, no
//! ACME; the container's layer on an ext4 disk of its own, as in a VM) with
//! one service, busybox httpd on 8080 (the primary URL). Reported:
//! RSS summed over the platform's processes (the guest and the inner
//! container's init; the user's httpd apart) idle with the one published
//! port, and again after 10,000 HTTPS requests; then 20 bounces, each timed
//! from the API call to the first 200 from `https://vm1.test/`; then the
//! cost of the container's seccomp filter: a system call loop in the
//! container (`nb-escape syscalls`), in this guest and in a second one
//! started with `[container] seccomp = false`; then HTTPS latency through
//! the ingress (a new TLS connection per request, `https://vm1.test/`)
//! idle, and while one service logs 100,000 lines a second and another, a
//! 100 MB binary, is started through the API every second.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Bounces to time.
    #[arg(long, default_value_t = 20)]
    bounces: usize,
    /// Requests between the two memory readings.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `nestbox-guest` binary (default: next to this one).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Iterations of the system call loop (each run; five runs).
    #[arg(long, default_value_t = 2_000_000)]
    syscalls: u64,
    /// HTTPS requests timed idle, and again under the log flood.
    #[arg(long, default_value_t = 500)]
    latency_requests: usize,
    /// Lines a second the flooding service writes.
    #[arg(long, default_value_t = 100_000)]
    flood_lines: u64,
}

use nestbox_tests::benchvm::{TOKEN, VM_IP, Vm, https_status as get, start, wait_ok};

#[derive(serde::Serialize)]
struct Results {
    rss_idle_kib: u64,
    rss_after_kib: u64,
    service_rss_kib: u64,
    requests: usize,
    bounce_ms: Vec<f64>,
    bounce_p50_ms: f64,
    bounce_p99_ms: f64,
    /// ns per `getppid` in the container, with the filter and without.
    getppid_ns: (f64, f64),
    /// ns per `socket` + `close`, with the filter and without.
    socket_close_ns: (f64, f64),
    /// HTTPS request p50 / p99 (ms), idle.
    https_idle_ms: (f64, f64),
    /// The same while a service floods its log and a 100 MB binary starts
    /// every second.
    https_loaded_ms: (f64, f64),
    /// Lines the flooding service's log took and dropped, a second.
    flood_kept_per_s: f64,
    flood_dropped_per_s: f64,
    /// Starts of the 100 MB binary during the loaded measurement.
    big_starts: usize,
}

fn kib(pid: u32, field: &str) -> u64 {
    nestbox_tests::status_kib(pid, field)
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// RSS of the platform (the guest and its `nestbox-guest` descendants) and
/// of everything else the guest started (the user's services).
/// Whether `pid` is PID 1 of its pid namespace (the container's init,
/// whatever program it is now): the platform's, counted as such.
fn is_container_init(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|ids| {
                ids.split_whitespace().count() > 1 && ids.split_whitespace().last() == Some("1")
            })
    })
}

fn rss(guest: u32) -> (u64, u64) {
    let (mut platform, mut services) = (kib(guest, "VmRSS:"), 0);
    eprintln!(
        "  guest pid {guest}: {} KiB (anon {} KiB, file {} KiB)",
        kib(guest, "VmRSS:"),
        kib(guest, "RssAnon:"),
        kib(guest, "RssFile:")
    );
    let mut todo = children(guest);
    // The container's PID 1 is the platform's too, though its parent (the
    // short-lived container-init) is gone: find it in the inner cgroup's
    // builds (`inner/cN`), beside the guest's own `platform` cgroup.
    let own = std::fs::read_to_string(format!("/proc/{guest}/cgroup")).unwrap_or_default();
    if let (Some(rel), Ok(mount)) = (
        own.lines().find_map(|l| l.strip_prefix("0::")),
        nestbox_guest::cgroup::cgroup2_mount(),
    ) {
        let own = mount.join(rel.trim_start_matches('/'));
        let inner = own.parent().unwrap_or(&own).join("inner");
        let pids = nestbox_guest::cgroup::subtree_pids(&inner).unwrap_or_default();
        todo.extend(pids.into_iter().filter(|p| is_container_init(*p)));
    }
    while let Some(pid) = todo.pop() {
        if comm(pid) == "nestbox-guest" || is_container_init(pid) {
            eprintln!(
                "  container init pid {pid}: {} KiB (anon {} KiB, file {} KiB)",
                kib(pid, "VmRSS:"),
                kib(pid, "RssAnon:"),
                kib(pid, "RssFile:")
            );
            platform += kib(pid, "VmRSS:");
        } else {
            services += kib(pid, "VmRSS:");
        }
        todo.extend(children(pid));
    }
    (platform, services)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[nestbox_tests::quantile_index(sorted.len(), p)]
}

fn main() -> Result<()> {
    let args = Args::parse();
    nestbox_tests::require_root();
    nestbox_tests::require_tool("curl", "curl");
    let guest_bin = nestbox_tests::benchvm::guest_binary(args.guest.as_deref())?;
    let vm = start(&guest_bin, "")?;
    let tls = vm.serve_web()?;
    std::thread::sleep(Duration::from_secs(2));
    let guest = vm.guest.id();
    let (rss_idle_kib, _) = rss(guest);

    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(vm.dir.join("cert.pem"))
        .args(["--resolve", &format!("vm1.test:443:{VM_IP}")])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["-o", "/dev/null", "-w", "%{http_code}\\n"])
        .arg(format!("https://vm1.test/?n=[1-{}]", args.requests))
        .stderr(Stdio::inherit())
        .output()?;
    let ok = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| *l == "200")
        .count();
    if ok != args.requests {
        bail!("{ok} of {} requests answered 200", args.requests);
    }
    let (rss_after_kib, service_rss_kib) = rss(guest);

    let mut bounce_ms = Vec::new();
    for _ in 0..args.bounces {
        let t0 = Instant::now();
        vm.api("POST", "/v1/bounce", None)?;
        wait_ok(&tls)?;
        bounce_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let mut sorted = bounce_ms.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!("HTTPS latency idle, then under a log flood and a 100 MB binary's starts …");
    let load = latency_under_load(&vm, &tls, &args)?;
    let log = std::fs::read_to_string(vm.dir.join("guest.log")).unwrap_or_default();
    eprintln!("system calls in the container, with the seccomp filter …");
    let with = syscall_costs(&vm, args.syscalls)?;
    drop(vm);
    eprintln!("… and in a guest without it ([container] seccomp = false) …");
    let without = start(&guest_bin, "[container]\nseccomp = false")?;
    let without_costs = syscall_costs(&without, args.syscalls)?;
    drop(without);
    let results = Results {
        rss_idle_kib,
        rss_after_kib,
        service_rss_kib,
        requests: args.requests,
        bounce_p50_ms: percentile(&sorted, 0.5),
        bounce_p99_ms: percentile(&sorted, 0.99),
        bounce_ms,
        getppid_ns: (with.0, without_costs.0),
        socket_close_ns: (with.1, without_costs.1),
        https_idle_ms: load.idle,
        https_loaded_ms: load.loaded,
        flood_kept_per_s: load.kept_per_s,
        flood_dropped_per_s: load.dropped_per_s,
        big_starts: load.big_starts,
    };
    print_table(&results, args.bounces, &log);
    if let Some(path) = &args.json {
        // The guest's log next to the results.
        let _ = std::fs::write(path.with_extension("log"), &log);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}

struct Load {
    idle: (f64, f64),
    loaded: (f64, f64),
    kept_per_s: f64,
    dropped_per_s: f64,
    big_starts: usize,
}

/// p50 and p99 (ms) of `n` HTTPS requests, each on a new connection.
fn https_latency(tls: &Arc<rustls::ClientConfig>, n: usize) -> Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        if get(tls, "vm1.test") != Some(200) {
            bail!("https://vm1.test/ did not answer 200");
        }
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(5));
    }
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99)))
}

/// The `logs` object of the guest's status.
fn log_stats(vm: &Vm) -> Result<serde_json::Value> {
    let status: serde_json::Value = serde_json::from_str(&vm.api("GET", "/v1/status", None)?)?;
    Ok(status["logs"].clone())
}

fn latency_under_load(vm: &Vm, tls: &Arc<rustls::ClientConfig>, args: &Args) -> Result<Load> {
    let idle = https_latency(tls, args.latency_requests)?;
    vm.api(
        "POST",
        "/v1/services",
        Some(&format!(
            r#"{{"name": "flood", "cmd": "/bin/nb-escape", "args": ["lines", "{}"]}}"#,
            args.flood_lines
        )),
    )?;
    vm.api(
        "POST",
        "/v1/services",
        Some(r#"{"name": "big", "cmd": "/bin/nb-big", "args": ["exit"], "restart": "never"}"#),
    )?;
    // The flood settles.
    std::thread::sleep(Duration::from_secs(2));
    let before = (log_stats(vm)?, Instant::now());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (loaded, big_starts) = std::thread::scope(|s| -> Result<((f64, f64), usize)> {
        let starter = s.spawn(|| {
            let mut starts = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if vm.api("POST", "/v1/services/big/start", None).is_ok() {
                    starts += 1;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            starts
        });
        let loaded = https_latency(tls, args.latency_requests);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let starts = starter.join().expect("the starter thread");
        Ok((loaded?, starts))
    })?;
    let after = (log_stats(vm)?, Instant::now());
    let secs = after.1.duration_since(before.1).as_secs_f64();
    let count = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_default();
    #[expect(clippy::cast_precision_loss, reason = "line counts far below 2^52")]
    let per_s = |k: &str| (count(&after.0, k) - count(&before.0, k)) as f64 / secs;
    let kept_per_s = per_s("last_seq");
    let dropped_per_s = per_s("dropped");
    for name in ["flood", "big"] {
        vm.api("DELETE", &format!("/v1/services/{name}"), None)?;
    }
    Ok(Load {
        idle,
        loaded,
        kept_per_s,
        dropped_per_s,
        big_starts,
    })
}

/// The results as the README's table.
fn print_table(results: &Results, bounces: usize, log: &str) {
    #[expect(clippy::cast_precision_loss, reason = "KiB counts are small")]
    let mib = |k: u64| k as f64 / 1024.0;
    println!("| measure | value | target |");
    println!("| --- | ---: | ---: |");
    println!(
        "| platform RSS, idle, one published port | {:.1} MiB | ≤ 12 MiB |",
        mib(results.rss_idle_kib)
    );
    println!(
        "| platform RSS after {} HTTPS requests | {:.1} MiB | ≤ 12 MiB |",
        results.requests,
        mib(results.rss_after_kib)
    );
    println!(
        "| (the user's httpd, not counted) | {:.1} MiB | |",
        mib(results.service_rss_kib)
    );
    println!(
        "| bounce → primary URL serving, p50 of {} | {:.1} ms | ≤ 100 ms |",
        bounces, results.bounce_p50_ms
    );
    println!(
        "| bounce → primary URL serving, p99 of {} | {:.1} ms | ≤ 100 ms |",
        bounces, results.bounce_p99_ms
    );
    print_phases(log);
    let overhead = |(with, without): (f64, f64)| (with / without - 1.0) * 100.0;
    println!(
        "| getppid in the container, with / without seccomp (median of 5) | {:.1} / {:.1} ns ({:+.1} %) | |",
        results.getppid_ns.0,
        results.getppid_ns.1,
        overhead(results.getppid_ns)
    );
    println!(
        "| socket + close in the container, with / without seccomp | {:.1} / {:.1} ns ({:+.1} %) | |",
        results.socket_close_ns.0,
        results.socket_close_ns.1,
        overhead(results.socket_close_ns)
    );
    println!(
        "| HTTPS request (new TLS connection), idle, p50 / p99 | {:.2} / {:.2} ms | |",
        results.https_idle_ms.0, results.https_idle_ms.1
    );
    println!(
        "| the same, one service logging and a 100 MB binary started every second, p50 / p99 | {:.2} / {:.2} ms ({:.2}× idle p99) | ≤ 2× |",
        results.https_loaded_ms.0,
        results.https_loaded_ms.1,
        results.https_loaded_ms.1 / results.https_idle_ms.1
    );
    println!(
        "| (the flooding service's lines: kept / dropped by its rate limit, a second; starts of the big binary) | {:.0} / {:.0}; {} | |",
        results.flood_kept_per_s, results.flood_dropped_per_s, results.big_starts
    );
}

/// The median over five runs of `nb-escape syscalls n` in `vm`'s container:
/// ns per `getppid`, and per `socket` + `close`.
fn syscall_costs(vm: &Vm, n: u64) -> Result<(f64, f64)> {
    let script = format!(
        "for i in 1 2 3 4 5; do /bin/nb-escape syscalls {n}; done; echo NB-DONE; exec sleep 2147483647"
    );
    let spec = serde_json::json!({"name": "syscalls", "cmd": "/bin/sh", "args": ["-c", script]});
    vm.api("POST", "/v1/services", Some(&spec.to_string()))?;
    let deadline = Instant::now() + Duration::from_mins(5);
    let lines = loop {
        let logs = vm.api("GET", "/v1/services/syscalls/logs", None)?;
        let lines: Vec<String> = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["line"].as_str().map(str::to_owned))
            .collect();
        if lines.iter().any(|l| l == "NB-DONE") {
            break lines;
        }
        if Instant::now() > deadline {
            bail!("the system call loop did not finish: {lines:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut getppid = Vec::new();
    let mut socket = Vec::new();
    for line in &lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let ["SYSCALLS", "getppid", g, "socket+close", s] = fields[..] {
            getppid.push(g.parse::<f64>()?);
            socket.push(s.parse::<f64>()?);
        }
    }
    if getppid.len() != 5 {
        bail!("the system call loop printed {lines:?}");
    }
    getppid.sort_by(f64::total_cmp);
    socket.sort_by(f64::total_cmp);
    Ok((percentile(&getppid, 0.5), percentile(&socket, 0.5)))
}

/// The median of each bounce phase, from the guest's log.
fn print_phases(log: &str) {
    for (what, line, field) in [
        (
            "services stopped",
            "the inner container is down",
            "services_ms",
        ),
        (
            "container killed",
            "the inner container is down",
            "container_ms",
        ),
        (
            "container built",
            "the inner container is up",
            "container_ms",
        ),
        ("egress set up", "the inner container is up", "egress_ms"),
        (
            "services started",
            "the inner container is up",
            "services_ms",
        ),
    ] {
        let mut values = phase_ms(log, line, field);
        values.sort_by(f64::total_cmp);
        if !values.is_empty() {
            println!(
                "| (bounce phase: {what}, p50) | {:.1} ms | |",
                percentile(&values, 0.5)
            );
        }
    }
}

/// The values of `field=` on the guest's log lines that contain `line`
/// (its bounce phase timings).
fn phase_ms(log: &str, line: &str, field: &str) -> Vec<f64> {
    let key = format!("{field}=");
    log.lines()
        .filter(|l| l.contains(line))
        .filter_map(|l| {
            // Strip ANSI colours before looking for `field=`.
            let mut parts = l.split('\u{1b}');
            let mut plain = parts.next().unwrap_or_default().to_owned();
            for part in parts {
                plain.push_str(part.split_once('m').map_or(part, |(_, rest)| rest));
            }
            let value = plain.split(&key).nth(1)?.split_whitespace().next()?;
            value.parse().ok()
        })
        .collect()
}
