//! `cargo xtask bench storage`: checkpoints and restores of a 1 GiB btrfs
//! user disk holding 500 MiB, each after 10 MiB changed, beside the floor:
//! the same files on a plain ext4 directory kept by `rsync`.
//!
//! A netns-simulated VM runs the guest as it ships with its user's disk a
//! btrfs loop image (in `/dev/shm` by default: this machine's disk speed
//! swings tenfold from one minute to the next) and one service, busybox
//! httpd on 8080. The container writes 500 MiB (50 files of 10 MiB from
//! `/dev/urandom`) and `v0` is taken; then, each round, one file is
//! rewritten (10 MiB) and the web page removed, a checkpoint is taken
//! (timed from the API call to the line that names its id, and to the
//! last line), and `v0` is restored (timed from the API call until
//! `https://vm1.test/` answers 200 again: the container and its service
//! up on the restored files). The incremental `btrfs send -p` stream
//! between consecutive checkpoints is what an upload would carry; its size
//! and time are reported. The floor: the same 500 MiB on ext4, the same
//! change, `rsync -a --delete` to a second directory (a "checkpoint") and
//! back (a "restore").
//!
//! Uploads: the guest uploads each checkpoint to `SeaweedFS` (on this
//! machine, at an address on its loopback that the VM's namespace routes
//! to); each is timed from its id to `durable` in `GET
//! /v1/checkpoints/{id}`, with its stream's bytes and the bytes sent. Then
//! the VM is stopped and a new one is built from the bucket (the last
//! checkpoint's chain: v0's full stream and one incremental), timed from
//! its start to the rebuild done and the container running; the floor: an
//! `rsync -a` of the same files into an empty directory.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nestbox_tests::benchvm::{TOKEN, UserFs, Vm, start_on, wait_ok};

#[derive(Parser)]
struct Args {
    /// Rounds (change, checkpoint, restore).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `nestbox-guest` binary (default: next to this one).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Where the disks' images go.
    #[arg(long, default_value = "/dev/shm")]
    disks: PathBuf,
    /// MiB of data before the first checkpoint.
    #[arg(long, default_value_t = 500)]
    data_mib: u64,
}

#[derive(serde::Serialize)]
struct Results {
    data_mib: u64,
    changed_mib: u64,
    first_checkpoint_ms: f64,
    checkpoint_id_ms: Vec<f64>,
    checkpoint_done_ms: Vec<f64>,
    restore_serving_ms: Vec<f64>,
    send_bytes: Vec<u64>,
    send_ms: Vec<f64>,
    rsync_checkpoint_ms: Vec<f64>,
    rsync_restore_ms: Vec<f64>,
    rsync_sent_bytes: Vec<u64>,
    upload_first_ms: f64,
    upload_first_stream_bytes: u64,
    upload_ms: Vec<f64>,
    upload_stream_bytes: Vec<u64>,
    upload_sent_bytes: Vec<u64>,
    rebuild_ms: f64,
    rebuild_bytes: u64,
    rsync_full_ms: f64,
}

/// The S3 server's address (on this machine's loopback).
const S3_IP: &str = "10.204.1.1";

/// [`S3_IP`] on this machine's loopback interface (a local address the
/// VMs' namespaces route to through their link); removed on drop.
struct S3Link;

impl S3Link {
    fn new() -> Result<Self> {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{S3_IP}/32"), "dev", "lo"])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["addr", "add", &format!("{S3_IP}/32"), "dev", "lo"]))?;
        Ok(Self)
    }
}

impl Drop for S3Link {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{S3_IP}/32"), "dev", "lo"])
            .status();
    }
}

/// The VM's way to the S3 server.
fn route_to_s3(vm: &Vm) -> Result<()> {
    run(vm.sandbox.command_in("ip", None).args([
        "route",
        "add",
        &format!("{S3_IP}/32"),
        "via",
        "10.203.1.1",
    ]))?;
    Ok(())
}

/// Waits until checkpoint `id` is durable: ms since `t0`, its stream's
/// bytes and the bytes sent.
fn uploaded(vm: &Vm, id: &str, t0: Instant) -> Result<(f64, u64, u64)> {
    let deadline = Instant::now() + Duration::from_mins(10);
    loop {
        let c: serde_json::Value =
            serde_json::from_str(&vm.api("GET", &format!("/v1/checkpoints/{id}"), None)?)?;
        let up = &c["upload"];
        if up["state"] == "durable" {
            return Ok((
                ms(t0),
                up["stream_bytes"].as_u64().context("stream_bytes")?,
                up["sent_bytes"].as_u64().context("sent_bytes")?,
            ));
        }
        if Instant::now() > deadline {
            bail!("{id} was never durable: {c}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Runs `script` in the container as a service and waits for its `done`.
fn in_container(vm: &Vm, name: &str, script: &str) -> Result<()> {
    let wrapped = format!("{script} && echo nb-done || echo nb-failed; exec sleep 2147483647");
    let spec = serde_json::json!({"name": name, "cmd": "/bin/sh", "args": ["-c", wrapped]});
    vm.api("POST", "/v1/services", Some(&spec.to_string()))?;
    let deadline = Instant::now() + Duration::from_mins(5);
    loop {
        let logs = vm.api("GET", &format!("/v1/services/{name}/logs"), None)?;
        if logs.contains("nb-done") {
            break;
        }
        if logs.contains("nb-failed") || Instant::now() > deadline {
            bail!("{name} failed in the container: {logs}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.api("DELETE", &format!("/v1/services/{name}"), None)?;
    Ok(())
}

/// A checkpoint taken through the API's stream.
struct Taken {
    id: String,
    parent: Option<String>,
    /// ms from the call to the line naming it.
    id_ms: f64,
    /// ms to the last line.
    done_ms: f64,
}

/// Takes a checkpoint through the API's stream.
fn checkpoint(vm: &Vm) -> Result<Taken> {
    let t0 = Instant::now();
    let mut child = vm
        .sandbox
        .command_in("curl", None)
        .args(["-sSfN", "-X", "POST", "--max-time", "120"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg("http://127.0.0.1:7070/v1/checkpoints")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut id_ms = None;
    let mut last = String::new();
    for line in std::io::BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        if id_ms.is_none() && line.contains(" taken\"") {
            id_ms = Some(ms(t0));
        }
        last = line;
    }
    let done = ms(t0);
    child.wait()?;
    let v: serde_json::Value = serde_json::from_str(&last).with_context(|| last.clone())?;
    if v["type"] != "complete" {
        bail!("the checkpoint failed: {last}");
    }
    Ok(Taken {
        id: v["checkpoint"]["id"].as_str().context("id")?.to_owned(),
        parent: v["checkpoint"]["parent"].as_str().map(str::to_owned),
        id_ms: id_ms.unwrap_or(done),
        done_ms: done,
    })
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `btrfs send -p parent child`'s size and time.
fn send(user: &Path, parent: &str, child: &str) -> Result<(u64, f64)> {
    let snaps = user.join("checkpoints");
    let t0 = Instant::now();
    let mut p = Command::new("btrfs")
        .args(["-q", "send", "-p"])
        .arg(snaps.join(parent))
        .arg(snaps.join(child))
        .stdout(Stdio::piped())
        .spawn()?;
    let bytes = std::io::copy(
        &mut p.stdout.take().context("stdout")?,
        &mut std::io::sink(),
    )?;
    if !p.wait()?.success() {
        bail!("btrfs send failed");
    }
    Ok((bytes, ms(t0)))
}

/// The floor's disk: ext4 on a loop image at `dir/floor`.
struct Floor {
    dir: PathBuf,
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.join("mnt")).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rsync(from: &Path, to: &Path) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let out = run(Command::new("rsync")
        .args(["-a", "--delete", "--stats"])
        .arg(format!("{}/", from.display()))
        .arg(to))?;
    let took = ms(t0);
    let sent = out
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map_or(0, |n| n.replace(',', "").trim().parse().unwrap_or(0));
    Ok((took, sent))
}

fn p50(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[nestbox_tests::quantile_index(s.len(), 0.5)]
}

#[allow(
    clippy::too_many_lines,
    reason = "one straight sequence of measurements"
)]
fn main() -> Result<()> {
    let args = Args::parse();
    nestbox_tests::require_root();
    nestbox_tests::require_tool("curl", "curl");
    nestbox_tests::require_tool("btrfs", "btrfs-progs");
    nestbox_tests::require_tool("rsync", "rsync");
    let guest_bin = nestbox_tests::benchvm::guest_binary(args.guest.as_deref())?;
    let link = S3Link::new()?;
    let s3 = nestbox_tests::seaweed::Seaweed::start(
        S3_IP,
        &args
            .disks
            .join(format!("nestbox-bench-s3-{}", std::process::id())),
        None,
    );
    let vm = start_on(
        &args.disks,
        &guest_bin,
        &s3.launcher_toml("bench/vm1"),
        UserFs::Btrfs,
        1 << 30,
    )?;
    route_to_s3(&vm)?;
    let tls = vm.serve_web()?;
    let files = args.data_mib / 10;
    eprintln!("the container writes {} MiB …", files * 10);
    in_container(
        &vm,
        "fill",
        &format!(
            "mkdir -p /data && for i in $(seq 1 {files}); do head -c 10485760 /dev/urandom > /data/f$i; done && sync"
        ),
    )?;
    let t0 = Instant::now();
    let first = checkpoint(&vm)?;
    let v0 = first.id.clone();
    let (upload_first_ms, upload_first_stream_bytes, _) = uploaded(&vm, &v0, t0)?;
    eprintln!("  {v0}: {upload_first_stream_bytes} B uploaded in {upload_first_ms:.0} ms");
    let user = vm.dir.join("user");

    // The floor: the same files on ext4, kept by rsync.
    let floor = Floor {
        dir: args
            .disks
            .join(format!("nestbox-bench-floor-{}", std::process::id())),
    };
    std::fs::create_dir_all(floor.dir.join("mnt"))?;
    let img = floor.dir.join("floor.img");
    std::fs::File::create(&img)?.set_len(3 << 30)?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(floor.dir.join("mnt")))?;
    let (src, copy) = (floor.dir.join("mnt/src"), floor.dir.join("mnt/copy"));
    std::fs::create_dir_all(&src)?;
    run(Command::new("cp")
        .args(["-a"])
        .arg(user.join(format!("checkpoints/{v0}/upper/data")))
        .arg(&src))?;
    rsync(&src, &copy)?;
    run(&mut Command::new("sync"))?;

    let mut r = Results {
        data_mib: files * 10,
        changed_mib: 10,
        first_checkpoint_ms: first.done_ms,
        checkpoint_id_ms: Vec::new(),
        checkpoint_done_ms: Vec::new(),
        restore_serving_ms: Vec::new(),
        send_bytes: Vec::new(),
        send_ms: Vec::new(),
        rsync_checkpoint_ms: Vec::new(),
        rsync_restore_ms: Vec::new(),
        rsync_sent_bytes: Vec::new(),
        upload_first_ms,
        upload_first_stream_bytes,
        upload_ms: Vec::new(),
        upload_stream_bytes: Vec::new(),
        upload_sent_bytes: Vec::new(),
        rebuild_ms: 0.0,
        rebuild_bytes: 0,
        rsync_full_ms: 0.0,
    };
    let mut last = v0.clone();
    for round in 0..args.rounds {
        let n = round as u64 % files + 1;
        in_container(
            &vm,
            &format!("change-{round}"),
            &format!("head -c 10485760 /dev/urandom > /data/f{n} && rm -f /www/index.html && sync"),
        )?;
        let t0 = Instant::now();
        let taken = checkpoint(&vm)?;
        let (id, id_ms, done_ms) = (taken.id, taken.id_ms, taken.done_ms);
        let (up_ms, up_stream, up_sent) = uploaded(&vm, &id, t0)?;
        r.upload_ms.push(up_ms - id_ms);
        r.upload_stream_bytes.push(up_stream);
        r.upload_sent_bytes.push(up_sent);
        last.clone_from(&id);
        r.checkpoint_id_ms.push(id_ms);
        r.checkpoint_done_ms.push(done_ms);
        // Against the checkpoint it descends from (v0, restored each
        // round): the chain an upload sends.
        let parent = taken.parent.context("a checkpoint after v0 has a parent")?;
        let (bytes, send_ms) = send(&user, &parent, &id)?;
        r.send_bytes.push(bytes);
        r.send_ms.push(send_ms);

        // The same change on the floor, kept and put back by rsync.
        std::fs::copy(
            user.join(format!("checkpoints/{parent}/upper/data/f{n}")),
            src.join(format!("data/f{n}")),
        )?;
        run(&mut Command::new("sync"))?;
        let (took, sent) = rsync(&src, &copy)?;
        r.rsync_checkpoint_ms.push(took);
        r.rsync_sent_bytes.push(sent);
        std::fs::write(
            src.join(format!("data/f{n}")),
            b"changed after the checkpoint",
        )?;
        let (took, _) = rsync(&copy, &src)?;
        r.rsync_restore_ms.push(took);

        let t0 = Instant::now();
        vm.api("POST", &format!("/v1/checkpoints/{v0}/restore"), None)?;
        wait_ok(&tls)?;
        r.restore_serving_ms.push(ms(t0));
        eprintln!(
            "  round {round}: checkpoint {id} {id_ms:.1} ms (done {done_ms:.1}), send {bytes} B, uploaded {up_sent} B in {:.0} ms, restore {v0} → serving {:.0} ms",
            r.upload_ms[round], r.restore_serving_ms[round]
        );
    }

    // The floor of a rebuild: the files copied whole.
    let fresh = floor.dir.join("mnt/fresh");
    let t0 = Instant::now();
    run(Command::new("rsync")
        .args(["-a"])
        .arg(format!("{}/", src.display()))
        .arg(&fresh))?;
    run(&mut Command::new("sync"))?;
    r.rsync_full_ms = ms(t0);

    // A new VM built from the bucket: the last checkpoint's chain.
    drop(vm);
    eprintln!("a new VM is built from s3://nestbox/bench/vm1@{last} …");
    let t0 = Instant::now();
    let from = format!(
        "{}upload = false\n[storage.from]\nurl = \"s3://nestbox/bench/vm1\"\ncheckpoint = \"{last}\"\n",
        s3.launcher_toml("bench/vm2")
    );
    let vm2 = start_on(&args.disks, &guest_bin, &from, UserFs::Btrfs, 1 << 30)?;
    route_to_s3(&vm2)?;
    let deadline = Instant::now() + Duration::from_mins(10);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&vm2.api("GET", "/v1/status", None)?)?;
        let rebuild = &status["rebuild"];
        if rebuild["state"] == "done" && status["container"]["state"] == "running" {
            r.rebuild_ms = ms(t0);
            r.rebuild_bytes = rebuild["total_bytes"].as_u64().context("total_bytes")?;
            break;
        }
        if rebuild["state"] == "failed" || Instant::now() > deadline {
            bail!("the rebuild did not finish: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(vm2);
    drop(s3);
    drop(link);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    }
    #[allow(clippy::cast_precision_loss, reason = "sizes for people")]
    let mb = |v: &[u64]| p50(&v.iter().map(|b| *b as f64 / 1e6).collect::<Vec<_>>());
    println!();
    println!(
        "{} MiB on a 1 GiB user disk, {} MiB changed per round, {} rounds (median)",
        r.data_mib, r.changed_mib, args.rounds
    );
    println!("| measure | nestbox (btrfs) | floor (ext4 + rsync) | target |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| checkpoint: API call → id | {:.1} ms | rsync -a --delete: {:.1} ms | ≤ 100 ms |",
        p50(&r.checkpoint_id_ms),
        p50(&r.rsync_checkpoint_ms)
    );
    println!(
        "| checkpoint: API call → last line | {:.1} ms | | |",
        p50(&r.checkpoint_done_ms)
    );
    println!(
        "| first checkpoint ({} MiB) | {:.1} ms | | |",
        r.data_mib, r.first_checkpoint_ms
    );
    println!(
        "| restore: API call → URL serving again | {:.0} ms | rsync back: {:.1} ms (no restart) | ≤ 1 s (Sprites ~1 s) |",
        p50(&r.restore_serving_ms),
        p50(&r.rsync_restore_ms)
    );
    println!(
        "| incremental stream (btrfs send -p) | {:.2} MB in {:.0} ms | rsync sent {:.2} MB | ≤ 2 × 10.49 MB |",
        mb(&r.send_bytes),
        p50(&r.send_ms),
        mb(&r.rsync_sent_bytes)
    );
    #[allow(clippy::cast_precision_loss, reason = "sizes for people")]
    let one = |b: u64| b as f64 / 1e6;
    println!(
        "| incremental upload to SeaweedFS: id → durable | {:.2} MB sent ({:.2} MB stream) in {:.0} ms | rsync sent {:.2} MB | ≤ 2 × 10.49 MB |",
        mb(&r.upload_sent_bytes),
        mb(&r.upload_stream_bytes),
        p50(&r.upload_ms),
        mb(&r.rsync_sent_bytes)
    );
    println!(
        "| first upload ({} MiB, full stream) | {:.1} MB in {:.0} ms | | |",
        r.data_mib,
        one(r.upload_first_stream_bytes),
        r.upload_first_ms
    );
    println!(
        "| rebuild of a new VM from the bucket: start → container running | {:.1} s ({:.1} MB, full + 1 incremental) | rsync -a of the files: {:.1} s | |",
        r.rebuild_ms / 1000.0,
        one(r.rebuild_bytes),
        r.rsync_full_ms / 1000.0
    );
    Ok(())
}
