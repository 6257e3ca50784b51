//! `cargo xtask bench launcher`: what the host pays per VM.
//!
//! 1. Host-side cost of `create` up to the VMM's exec — tap (ioctl),
//!    address and route (rtnetlink), the VM's nftables table, record, token,
//!    disks — and of `destroy`, over N creates/destroys with a stub VMM
//!    (`sleep`) through the launcher's library.
//! 2. Boot → API ready under QEMU (the accel the launcher picks here):
//!    `nestbox-launcher create` until `GET https://api.NAME.test/v1/status`
//!    answers with a running container (boot, modules, data disk, the
//!    API's certificate from Pebble on the host), over M boots.
//! 3. Memory of the host side per running VM besides the VMM process: every
//!    process that appeared with the VM and is still there, other than the
//!    VMM (the target is none: there is no daemon).
//! 4. The cost of the boundary under attack: the VM's `GET /v1/status` and
//!    its primary URL (a web app that never forks), each request a new
//!    HTTPS connection from the host, idle and then while the container
//!    runs a fork bomb, a memory hog and a CPU spin at once: p50, p99 and
//!    timeouts (the target: p99 within 5× the idle p99, no timeout).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nestbox_launcher::vmm::stub::Stub;
use nestbox_launcher::{CreateOptions, Launcher};
use nestbox_tests::pebble::Pebble;
use nestbox_tests::vms::{EXHAUST, Host, INDEX, WEB_NO_FORK};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// Creates/destroys with the stub VMM.
    #[arg(long, default_value_t = 50)]
    creates: usize,
    /// Real boots.
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// The guest image directory.
    #[arg(long)]
    image: PathBuf,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Requests per measurement of the API and the URL, idle and under
    /// attack (100: the p99 is then not simply the slowest one).
    #[arg(long, default_value_t = 100)]
    samples: usize,
}

#[derive(Serialize)]
struct Results {
    create_ms: Vec<f64>,
    destroy_ms: Vec<f64>,
    boot_to_api_s: Vec<f64>,
    accel: String,
    host_processes_per_vm: usize,
    host_rss_kib_per_vm: u64,
    vmm_rss_kib: u64,
    attack: Attack,
}

/// Latencies in ms of successful requests, and how many failed (timed out
/// after 20 s, or answered other than 200).
#[derive(Default, Serialize)]
struct Latencies {
    ms: Vec<f64>,
    failed: usize,
}

/// Measurement 4.
#[derive(Default, Serialize)]
struct Attack {
    status_idle: Latencies,
    status_attacked: Latencies,
    url_idle: Latencies,
    url_attacked: Latencies,
}

const POOL: &str = "10.126.0.0/24";
/// Where the benchmark's Pebble runs: a namespace of its own behind the
/// host, allow-listed in the firewall.
const ACME_SUBNET: &str = "10.127.0";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[nestbox_tests::quantile_index(sorted.len(), p)]
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}

fn pids() -> std::collections::BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    nestbox_tests::status_kib(pid, "VmRSS:")
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default()
}

/// Creates and destroys `n` VMs with a stub VMM through the library.
fn host_side(dir: &Path, image: &Path, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("launcher.toml"),
        format!(
            "image = {:?}\ndomain = \"test\"\npool = {POOL:?}\ntap_prefix = \"nbb\"\n",
            image.display().to_string()
        ),
    )?;
    let launcher = Launcher::open(dir)?;
    let stub = Stub::new("sleep", ["1000"]);
    let (mut create_ms, mut destroy_ms) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("bench{i}");
        let t0 = Instant::now();
        launcher.create(&CreateOptions::new(&name), &stub)?;
        create_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        launcher.destroy(&name)?;
        destroy_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((create_ms, destroy_ms))
}

struct Boots {
    dir: PathBuf,
    launcher: PathBuf,
    pebble: Pebble,
    root: PathBuf,
}

impl Boots {
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.launcher)
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "nestbox-launcher {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn record(&self, name: &str) -> Result<serde_json::Value> {
        let list: serde_json::Value = serde_json::from_str(&self.cli(&["list", "--json"])?)?;
        list.as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == name))
            .cloned()
            .context("VM not listed")
    }

    /// Boots `name`; returns seconds from create to a serving API.
    fn boot(&self, name: &str) -> Result<f64> {
        let t0 = Instant::now();
        self.cli(&["create", name])?;
        let record = self.record(name)?;
        let ip = record["address"].as_str().context("address")?.to_owned();
        let api = format!("api.{name}.test");
        self.pebble.add_a(&api, &ip)?;
        self.pebble.add_a(&format!("{name}.test"), &ip)?;
        let token = self.cli(&["token", name])?.trim().to_owned();
        let deadline = Instant::now() + Duration::from_mins(3);
        loop {
            let out = Command::new("curl")
                .args(["-s", "--max-time", "5", "--cacert"])
                .arg(&self.root)
                .args(["--resolve", &format!("{api}:443:{ip}")])
                .args(["-H", &format!("Authorization: Bearer {token}")])
                .arg(format!("https://{api}/v1/status"))
                .output()?;
            if String::from_utf8_lossy(&out.stdout).contains("\"running\"") {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!("{name}: the API did not come up in 3 minutes");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    nestbox_tests::require_root();
    nestbox_tests::require_tool("qemu-system-x86_64", "qemu-system-x86");
    let bin = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_owned();
    let work = std::env::temp_dir().join(format!("nestbox-bench-launcher-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);

    eprintln!(
        "host side: {} creates/destroys with a stub VMM …",
        args.creates
    );
    let (create_ms, destroy_ms) = host_side(&work.join("stub"), &args.image, args.creates)?;

    eprintln!("boots: {} under QEMU …", args.boots);
    let pebble = Pebble::start_for_vms(&work.join("pebble"), ACME_SUBNET)?;
    let dir = work.join("vms");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("launcher.toml"),
        pebble.launcher_toml(&args.image, "test", POOL, "nbb")?,
    )?;
    let root = pebble.issuing_root()?;
    let boots = Boots {
        dir,
        launcher: bin.join("nestbox-launcher"),
        pebble,
        root,
    };
    let mut boot_to_api_s = Vec::new();
    let (mut accel, mut host_processes, mut host_rss, mut vmm_rss) = (String::new(), 0, 0, 0);
    for i in 0..args.boots {
        let name = format!("boot{i}");
        let before = pids();
        let took = boots.boot(&name);
        if let Ok(s) = took {
            boot_to_api_s.push(s);
            let record = boots.record(&name)?;
            record["accel"]
                .as_str()
                .unwrap_or_default()
                .clone_into(&mut accel);
            let vmm = u32::try_from(record["pid"].as_u64().context("pid")?)?;
            vmm_rss = rss_kib(vmm);
            // What appeared with the VM and is still here, besides the VMM
            // (curl and the launcher itself have exited).
            let extra: Vec<u32> = pids()
                .difference(&before)
                .copied()
                .filter(|&p| p != vmm)
                // Kernel threads have no command line.
                .filter(|&p| {
                    std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| !c.is_empty())
                })
                .collect();
            for p in &extra {
                eprintln!("  still running besides the VMM: {p} {}", comm(*p));
            }
            host_processes = extra.len();
            host_rss = extra.iter().map(|&p| rss_kib(p)).sum();
        }
        let _ = boots.cli(&["destroy", &name]);
        took?;
    }

    drop(boots);
    eprintln!("the API and the URL, idle and under attack …");
    let attack = under_attack(args.samples);
    let results = Results {
        create_ms,
        destroy_ms,
        boot_to_api_s,
        accel,
        host_processes_per_vm: host_processes,
        host_rss_kib_per_vm: host_rss,
        vmm_rss_kib: vmm_rss,
        attack,
    };
    print_table(&results);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// `samples` requests to `host_name`'s `path` on VM `vm`, each a new
/// connection (a curl process; its own time excluded: curl's `time_total`).
fn latencies(
    host: &Host,
    vm: &str,
    host_name: &str,
    path: &str,
    token: Option<&str>,
    samples: usize,
) -> Latencies {
    let mut out = Latencies::default();
    for _ in 0..samples {
        let mut cmd = host.curl(vm, host_name);
        if let Some(token) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        let result = cmd
            .args(["-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
            .arg(format!("https://{host_name}{path}"))
            .output();
        let text = result
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        match text.split_once(' ') {
            Some(("200", secs)) => out
                .ms
                .push(secs.trim().parse::<f64>().unwrap_or(0.0) * 1000.0),
            _ => out.failed += 1,
        }
    }
    out
}

/// Measurement 4, on a VM of its own.
fn under_attack(samples: usize) -> Attack {
    const VM: &str = "attacked";
    let mut host = Host::new(60);
    host.create(VM);
    host.install_helper(VM);
    host.create_service(VM, WEB_NO_FORK);
    host.wait_body(VM, "attacked.test", "/", INDEX);
    let token = host.token(VM);
    let api = format!("api.{VM}.test");
    let measure = |host: &Host| {
        (
            latencies(host, VM, &api, "/v1/status", Some(&token), samples),
            latencies(host, VM, "attacked.test", "/", Some(&token), samples),
        )
    };
    let (status_idle, url_idle) = measure(&host);
    let spec = serde_json::json!({"name": "exhaust", "cmd": "/bin/sh", "args": ["-c", EXHAUST]});
    host.create_service(VM, &spec.to_string());
    // The hog reaches memory.max, then the bomb pids.max.
    std::thread::sleep(Duration::from_secs(25));
    let (status_attacked, url_attacked) = measure(&host);
    let status = nestbox_tests::vms::body(&host.api(VM, "GET", "/v1/status", None));
    eprintln!("  under attack: {status}");
    Attack {
        status_idle,
        status_attacked,
        url_idle,
        url_attacked,
    }
}

fn print_table(results: &Results) {
    let (c, d, b) = (
        sorted(&results.create_ms),
        sorted(&results.destroy_ms),
        sorted(&results.boot_to_api_s),
    );
    println!("| measure | value |");
    println!("| --- | ---: |");
    // A measurement skipped (`--creates 0`, `--boots 0`) has no row.
    if !c.is_empty() {
        println!(
            "| create up to the VMM's exec (stub VMM), p50 / p99 of {} | {:.1} / {:.1} ms |",
            c.len(),
            percentile(&c, 0.5),
            percentile(&c, 0.99)
        );
        println!(
            "| destroy (stub VMM), p50 / p99 of {} | {:.1} / {:.1} ms |",
            d.len(),
            percentile(&d, 0.5),
            percentile(&d, 0.99)
        );
    }
    if !b.is_empty() {
        println!(
            "| boot → API ready ({}), p50 of {} | {:.2} s |",
            results.accel,
            b.len(),
            percentile(&b, 0.5)
        );
    }
    println!(
        "| host processes per running VM besides the VMM | {} ({} KiB) |",
        results.host_processes_per_vm, results.host_rss_kib_per_vm
    );
    let attack = &results.attack;
    let row = |what: &str, l: &Latencies| {
        let ms = sorted(&l.ms);
        if ms.is_empty() {
            println!("| {what} | no answer ({} failed) |", l.failed);
        } else {
            println!(
                "| {what}, p50 / p99 of {} | {:.1} / {:.1} ms ({} failed) |",
                ms.len() + l.failed,
                percentile(&ms, 0.5),
                percentile(&ms, 0.99),
                l.failed
            );
        }
    };
    row("GET /v1/status, idle", &attack.status_idle);
    row(
        "GET /v1/status, fork bomb + memory hog + CPU spin in the container",
        &attack.status_attacked,
    );
    row("primary URL, idle", &attack.url_idle);
    row("primary URL, under the same attack", &attack.url_attacked);
    let p99 = |l: &Latencies| {
        let ms = sorted(&l.ms);
        if ms.is_empty() {
            f64::INFINITY
        } else {
            percentile(&ms, 0.99)
        }
    };
    println!(
        "| status p99 under attack / idle p99 (target ≤ 5×, no failure) | {:.1}× |",
        p99(&attack.status_attacked) / p99(&attack.status_idle)
    );
    println!(
        "| (the VMM process itself, QEMU RSS) | {:.1} MiB |",
        f64::from(u32::try_from(results.vmm_rss_kib).unwrap_or(u32::MAX)) / 1024.0
    );
}
