//! The fault-injection suite (root; real VMs under QEMU, run serially):
//! each test injects a real fault — a damaged disk, a killed VMM, a CA
//! that never answers, a flood of clients or log lines — and checks that
//! nothing acknowledged is lost and the platform keeps serving.
//!
//! Layout per test K (40 and up): as in `vm.rs`, the pool `10.124.K.0/24`
//! and Pebble at `10.125.K.2`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nestbox_tests::vms::{Host, body};
use serde_json::Value;

/// Writes a file into the container's writable layer (on the user's disk)
/// once, then stays up: the file and the definition must survive.
const KEEPER: &str = r#"{"name": "keeper", "cmd": "/bin/sh", "args": ["-c", "test -f /kept.txt || echo kept > /kept.txt; sync; exec sleep 2147483647"]}"#;

fn disk(host: &Host, vm: &str, file: &str) -> PathBuf {
    host.dir.join("vms").join(vm).join(file)
}

/// The VM's status once its API answers (whatever the container's state).
fn status_when_up(host: &Host, vm: &str) -> Value {
    let deadline = Instant::now() + Duration::from_mins(3);
    loop {
        let out = host.api(vm, "GET", "/v1/status", None);
        if out.status.success()
            && let Ok(v) = serde_json::from_str::<Value>(&body(&out))
            && v["container"]["state"] != "starting"
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "VM {vm}: the API did not come up: {}\nconsole:\n{}",
            body(&out),
            host.console(vm)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn disk_report<'a>(status: &'a Value, role: &str) -> &'a Value {
    status["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["role"] == role))
        .unwrap_or_else(|| panic!("no {role} disk in the status: {status}"))
}

/// A byte-for-byte copy of `image` (sparse), to compare it with later.
fn snapshot(image: &Path) -> PathBuf {
    let copy = image.with_extension("before");
    let out = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(image)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "cp: {out:?}");
    copy
}

fn identical(a: &Path, b: &Path) -> bool {
    std::process::Command::new("cmp")
        .args(["-s"])
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// Zeroes btrfs's primary superblock (at 64 KiB).
fn lose_btrfs_superblock(image: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.write_all_at(&[0u8; 4096], 64 << 10).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_damaged_disk_is_repaired_or_refused_and_never_formatted() {
    nestbox_tests::require_tool("debugfs", "e2fsprogs");
    nestbox_tests::require_tool("mkfs.minix", "util-linux");
    let mut host = Host::new(40);
    host.create("fd1");
    host.create_service("fd1", KEEPER);
    let kept = host.in_container(
        "fd1",
        "while ! test -f /kept.txt; do sleep 0.2; done; cat /kept.txt",
        Duration::from_mins(1),
    );
    assert!(kept.iter().any(|l| l == "kept"), "{kept:?}");
    host.launcher_ok(&["stop", "fd1"]);

    // A repairable fault: a wrong group-descriptor checksum makes the
    // kernel refuse the mount (EUCLEAN); `e2fsck -p` fixes it.
    let data = disk(&host, "fd1", "data.img");
    let out = std::process::Command::new("debugfs")
        .args(["-w", "-R", "set_bg 0 checksum 0x1234"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs: {out:?}");
    host.launcher_ok(&["start", "fd1"]);
    host.wait_ready("fd1");
    let status = status_when_up(&host, "fd1");
    let platform = disk_report(&status, "platform");
    assert_eq!(platform["state"], "repaired", "{status}");
    let services = body(&host.api("fd1", "GET", "/v1/services", None));
    assert!(
        services.contains("\"keeper\""),
        "the definitions survived the repair: {services}"
    );
    assert_eq!(disk_report(&status, "user")["state"], "mounted");
    host.launcher_ok(&["stop", "fd1"]);

    // A lost superblock on the user's (btrfs) disk: the first 128 KiB read
    // as zeros now, but its mirror says btrfs; it does not mount, so it is
    // refused, byte for byte as it was — never formatted as a blank one;
    // the platform serves on.
    let user = disk(&host, "fd1", "user.img");
    lose_btrfs_superblock(&user);
    let before = snapshot(&user);
    host.launcher_ok(&["start", "fd1"]);
    let status = status_when_up(&host, "fd1");
    let report = disk_report(&status, "user");
    assert_eq!(report["state"], "refused", "{status}");
    let why = report["detail"].as_str().unwrap_or_default();
    assert!(why.contains("left untouched"), "{status}");
    assert_eq!(status["container"]["state"], "failed", "{status}");
    assert!(
        status["container"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("user's disk")),
        "{status}"
    );
    assert!(
        host.console("fd1").contains("the user disk is refused"),
        "the console says why"
    );
    host.launcher_ok(&["stop", "fd1"]);
    assert!(identical(&user, &before), "the refused disk was written");

    // A filesystem the guest does not mount as ext4 (minix): refused too.
    let out = std::process::Command::new("mkfs.minix")
        .arg(&user)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.minix: {out:?}");
    let before_minix = snapshot(&user);
    host.launcher_ok(&["start", "fd1"]);
    let status = status_when_up(&host, "fd1");
    assert_eq!(disk_report(&status, "user")["state"], "refused", "{status}");
    assert_eq!(disk_report(&status, "platform")["state"], "mounted");
    host.launcher_ok(&["stop", "fd1"]);
    assert!(
        identical(&user, &before_minix),
        "the minix disk was written"
    );
    for copy in [before, before_minix] {
        let _ = std::fs::remove_file(copy);
    }
}

/// Logs with their sequence numbers: `(seq, line)`.
fn numbered_lines(host: &Host, vm: &str, service: &str, query: &str) -> Vec<(u64, String)> {
    let out = host.api(
        vm,
        "GET",
        &format!("/v1/services/{service}/logs{query}"),
        None,
    );
    body(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["stream"] == "stdout")
        .map(|v| {
            (
                v["seq"].as_u64().unwrap_or_default(),
                v["line"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Runs `f` on the (stopped) VM's platform disk, mounted.
fn on_data_disk<T>(host: &Host, vm: &str, f: impl FnOnce(&Path) -> T) -> T {
    on_disk(host, vm, "data.img", f)
}

/// Runs `f` on the (stopped) VM's disk image `file`, mounted.
fn on_disk<T>(host: &Host, vm: &str, file: &str, f: impl FnOnce(&Path) -> T) -> T {
    let mnt = host.dir.join(format!("{vm}-{file}"));
    std::fs::create_dir_all(&mnt).unwrap();
    let image = disk(host, vm, file);
    // Read-write: a journal left to replay is replayed (the VM is stopped).
    let out = std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "mount {file}: {out:?}");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mnt)));
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    result.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The temporary files of interrupted writes in `dir`.
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

/// Every `certs/*.pem` on the (stopped) VM's platform disk holds a key and
/// a certificate for that key, and no interrupted write is left; returns
/// how many pairs it checked.
fn check_stored_pairs(host: &Host, vm: &str) -> usize {
    on_data_disk(host, vm, |mnt| {
        let pubkey = |args: &[&str], file: &Path| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .arg(file)
                .output()
                .unwrap();
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
            out.stdout
        };
        let certs = mnt.join("acme/certs");
        let mut checked = 0;
        let found: Vec<PathBuf> = std::fs::read_dir(&certs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for pem in found
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        {
            let of_key = pubkey(&["pkey", "-pubout", "-in"], pem);
            let of_cert = pubkey(&["x509", "-noout", "-pubkey", "-in"], pem);
            assert_eq!(
                of_key,
                of_cert,
                "{}: the certificate is not for the key",
                pem.display()
            );
            checked += 1;
        }
        let torn = leftovers(&certs);
        assert!(torn.is_empty(), "{torn:?}");
        checked
    })
}

#[test]
fn a_killed_vmm_loses_nothing_acknowledged() {
    nestbox_tests::require_tool("openssl", "openssl");
    let mut host = Host::new(41);
    let ip = host.create("fd2");
    for h in ["8081.fd2.test", "8082.fd2.test"] {
        host.pebble.add_a(h, &ip).unwrap();
    }
    // A service that logs as fast as it can.
    host.create_service(
        "fd2",
        r#"{"name": "burst", "cmd": "/bin/sh", "args": ["-c", "i=0; while :; do i=$((i+1)); echo \"line $i\"; done"]}"#,
    );
    // Two new ports: certificates are being issued and stored while the
    // VMM dies.
    for port in [8081, 8082] {
        let spec = format!(
            r#"{{"name": "web{port}", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "{port}", "-h", "/www"]}}"#
        );
        host.create_service("fd2", &spec);
    }
    // Definitions created one after another until the kill.
    let mut acknowledged = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let name = format!("def{}", acknowledged.len());
        let spec = format!(r#"{{"name": "{name}", "cmd": "/bin/sleep", "args": ["1000"]}}"#);
        let out = host.api("fd2", "POST", "/v1/services", Some(&spec));
        if body(&out).contains("\"name\"") {
            acknowledged.push(name);
        }
    }
    // Lines first, then how far lines are synced: every line read with a
    // number up to it was on the disk before the kill.
    let lines = numbered_lines(&host, "fd2", "burst", "?last=2000");
    let status: Value =
        serde_json::from_str(&body(&host.api("fd2", "GET", "/v1/status", None))).unwrap();
    let synced = status["logs"]["synced_seq"].as_u64().unwrap();
    let durable: Vec<(u64, String)> = lines.into_iter().filter(|(s, _)| *s <= synced).collect();
    assert!(
        !durable.is_empty(),
        "no line was synced within a second: {status}"
    );
    host.kill_vmm("fd2");

    host.launcher_ok(&["start", "fd2"]);
    host.wait_ready("fd2");
    let services = body(&host.api("fd2", "GET", "/v1/services", None));
    for name in &acknowledged {
        assert!(
            services.contains(&format!("\"{name}\"")),
            "{name} was lost: {services}"
        );
    }
    let after: std::collections::HashSet<(u64, String)> = numbered_lines(&host, "fd2", "burst", "")
        .into_iter()
        .collect();
    let lost: Vec<&(u64, String)> = durable.iter().filter(|l| !after.contains(l)).collect();
    assert!(
        lost.is_empty(),
        "synced lines lost: {lost:?} (synced_seq {synced})"
    );
    // The certificates load and serve: each name answers over HTTPS.
    for h in ["8081.fd2.test", "8082.fd2.test"] {
        host.wait_body("fd2", h, "/", nestbox_tests::vms::INDEX);
    }
    host.launcher_ok(&["stop", "fd2"]);
    // api.fd2.test's, 8081's and 8082's.
    assert!(
        check_stored_pairs(&host, "fd2") >= 3,
        "the pairs on the disk match"
    );
}

/// Waits until VM `vm` is seen crashed (its QEMU gone without a stop) and
/// returns its console, which must show that the guest stopped at `point`.
fn crashed_at(host: &Host, vm: &str, point: &str) -> String {
    let deadline = Instant::now() + Duration::from_mins(2);
    while host.state(vm) != "crashed" {
        assert!(
            Instant::now() < deadline,
            "VM {vm} did not crash at {point}; console:\n{}",
            host.console(vm)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = host.console(vm);
    assert!(
        console.contains(&format!("fault: Crash at {point}")),
        "VM {vm} crashed, but not at {point}:\n{console}"
    );
    console
}

/// Logs about 2,000 numbered lines a second, in bursts of ten.
const BURST: &str = r#"{"name": "burst", "cmd": "/bin/sh", "args": ["-c", "i=0; while :; do for j in 0 1 2 3 4 5 6 7 8 9; do i=$((i+1)); echo \"line $i\"; done; usleep 5000; done"]}"#;

#[test]
fn crashes_at_the_points_of_a_log_sync_and_a_definition_write_lose_nothing_acknowledged() {
    let mut host = Host::with_image(42, &nestbox_tests::vms::faults_image_dir());
    host.create("fd3");
    let kept = r#"{"name": "kept", "cmd": "/bin/sleep", "args": ["1000"]}"#;
    host.create_service("fd3", kept);

    // 1. Lines written and not yet synced when the VM dies. Lines first,
    // then how far lines are synced: every line read with a number up to it
    // was on the disk, the API says. Only then is the crash armed, at the
    // next sync of the burst's lines, so the VM never dies before both
    // answers (arming first raced the 1 s sync on a loaded machine), and
    // what the burst wrote after that sync is lost with the VM.
    host.create_service("fd3", BURST);
    std::thread::sleep(Duration::from_secs(2));
    let lines = numbered_lines(&host, "fd3", "burst", "?last=5000");
    let out = host.api("fd3", "GET", "/v1/status", None);
    let synced = serde_json::from_str::<Value>(&body(&out))
        .ok()
        .and_then(|s| s["logs"]["synced_seq"].as_u64())
        .unwrap_or_else(|| panic!("no logs.synced_seq in the status: {}", body(&out)));
    assert!(!lines.is_empty(), "the burst logged no line in 2 s");
    host.arm_fault(
        "fd3",
        r#"{"point": "logs.sync", "subject": "burst", "action": "crash"}"#,
    );
    crashed_at(&host, "fd3", "logs.sync");
    host.launcher_ok(&["start", "fd3"]);
    host.wait_ready("fd3");
    let durable: Vec<&(u64, String)> = lines.iter().filter(|(s, _)| *s <= synced).collect();
    assert!(
        !durable.is_empty(),
        "no line was synced: synced_seq {synced}"
    );
    let after: std::collections::HashSet<(u64, String)> = numbered_lines(&host, "fd3", "burst", "")
        .into_iter()
        .collect();
    let lost: Vec<&&(u64, String)> = durable.iter().filter(|l| !after.contains(l)).collect();
    assert!(
        lost.is_empty(),
        "lines acknowledged as synced were lost: {} of them, from {:?} (synced_seq {synced})",
        lost.len(),
        lost.first()
    );

    // 2. A definition being written when the VM dies, before its data is
    // synced and after its rename: the others are whole, and it is either
    // absent (never acknowledged) or whole.
    for (i, point) in ["durable.written", "durable.renamed"].iter().enumerate() {
        host.arm_fault(
            "fd3",
            &format!(r#"{{"point": "{point}", "subject": "services/new{i}", "action": "crash"}}"#),
        );
        let spec = format!(r#"{{"name": "new{i}", "cmd": "/bin/sleep", "args": ["{i}000"]}}"#);
        let out = host.api("fd3", "POST", "/v1/services", Some(&spec));
        let acknowledged = body(&out).contains("\"name\"");
        crashed_at(&host, "fd3", point);
        host.launcher_ok(&["start", "fd3"]);
        host.wait_ready("fd3");
        let services: Value =
            serde_json::from_str(&body(&host.api("fd3", "GET", "/v1/services", None))).unwrap();
        let by_name = |name: &str| {
            services
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == name)
                .cloned()
        };
        for whole in ["kept", "burst"] {
            assert!(
                by_name(whole).is_some(),
                "{whole} was lost at {point}: {services}"
            );
        }
        match by_name(&format!("new{i}")) {
            Some(new) => assert_eq!(
                new["spec"]["args"][0],
                format!("{i}000"),
                "new{i} is not whole after a crash at {point}: {new}"
            ),
            None => assert!(
                !acknowledged,
                "new{i} was acknowledged and then lost at {point}"
            ),
        }
    }
    host.launcher_ok(&["stop", "fd3"]);
    let torn = on_data_disk(&host, "fd3", |mnt| leftovers(&mnt.join("services")));
    assert!(torn.is_empty(), "interrupted writes left behind: {torn:?}");
}

#[test]
fn crashes_and_a_killed_vmm_during_certificate_renewals_leave_a_matching_pair_that_serves() {
    nestbox_tests::require_tool("openssl", "openssl");
    let mut host = Host::with_image(43, &nestbox_tests::vms::faults_image_dir());
    host.create("fd4");
    let served_serial = |host: &Host| {
        let out = host
            .curl("fd4", "api.fd4.test")
            .args(["-v", "-o", "/dev/null", "https://api.fd4.test/v1/status"])
            .output()
            .unwrap();
        let verbose = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{verbose}");
        verbose
            .lines()
            .find(|l| l.contains("start date:"))
            .unwrap_or_default()
            .to_owned()
    };
    // A renewal with no fault first: the API starts it, and a new
    // certificate is served.
    let before = served_serial(&host);
    let out = host.api("fd4", "POST", "/v1/certificates/renew", None);
    assert!(body(&out).contains("api.fd4.test"), "{}", body(&out));
    std::thread::sleep(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_mins(1);
    while served_serial(&host) == before {
        assert!(
            Instant::now() < deadline,
            "the forced renewal served nothing new"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // The VM dies while a renewal stores its pair: while the pair it
    // replaces is kept as the fallback (`.pem.prev`, written first), before
    // its data is synced; while the new pair replaces the old (skipping the
    // fallback's write), after the rename; and the host kills QEMU while
    // the new pair's write hangs between its sync and its rename.
    for (point, skip, action) in [
        ("durable.written", 0, "crash"),
        ("durable.renamed", 1, "crash"),
        ("durable.synced", 1, "hang"),
    ] {
        host.arm_fault(
            "fd4",
            &format!(
                r#"{{"point": "{point}", "subject": "certs/api.fd4.test.pem", "action": "{action}", "skip": {skip}}}"#
            ),
        );
        let out = host.api("fd4", "POST", "/v1/certificates/renew", None);
        assert!(body(&out).contains("renewing"), "{}", body(&out));
        if action == "crash" {
            crashed_at(&host, "fd4", point);
        } else {
            let deadline = Instant::now() + Duration::from_mins(1);
            while !host
                .console("fd4")
                .contains(&format!("fault: Hang at {point}"))
            {
                assert!(
                    Instant::now() < deadline,
                    "the renewal never reached {point}:\n{}",
                    host.console("fd4")
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            host.kill_vmm("fd4");
        }
        host.launcher_ok(&["start", "fd4"]);
        // Its API is served over HTTPS with a verified certificate: the
        // pair it loaded matches.
        host.wait_ready("fd4");
    }
    host.launcher_ok(&["stop", "fd4"]);
    assert!(
        check_stored_pairs(&host, "fd4") >= 1,
        "the pairs on the disk match"
    );
}

/// The ids of VM `vm`'s checkpoints.
fn checkpoint_ids(host: &Host, vm: &str) -> Vec<String> {
    let list: Value =
        serde_json::from_str(&body(&host.api(vm, "GET", "/v1/checkpoints", None))).unwrap();
    list["checkpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// What `/state` of VM `vm`'s container holds.
fn state_file(host: &Host, vm: &str) -> String {
    host.in_container(vm, "cat /state", Duration::from_mins(2))
        .into_iter()
        .find(|l| !l.is_empty() && !l.starts_with("started, pid") && l != "NB-DONE")
        .unwrap_or_default()
}

/// Arms a crash at `point` for `subject`, POSTs `path`, and waits until
/// VM `vm` crashed there and is up again.
fn crash_during(host: &Host, vm: &str, point: &str, subject: &str, path: &str) {
    host.arm_fault(
        vm,
        &format!(r#"{{"point": "{point}", "subject": "{subject}", "action": "crash"}}"#),
    );
    let _ = host.api(vm, "POST", path, None);
    crashed_at(host, vm, point);
    host.launcher_ok(&["start", vm]);
    host.wait_ready(vm);
}

#[test]
fn crashes_in_a_checkpoint_or_a_restore_leave_a_whole_layer_and_every_checkpoint() {
    let mut host = Host::with_image(46, &nestbox_tests::vms::faults_image_dir());
    host.create("fs4");
    host.in_container("fs4", "echo zero > /state", Duration::from_mins(2));
    let out = host.api("fs4", "POST", "/v1/checkpoints", None);
    assert!(body(&out).contains("\"complete\""), "{}", body(&out));
    host.in_container("fs4", "echo one > /state", Duration::from_mins(2));

    // The power fails with v0's writable copy made, before the swap: the
    // layer is the one before.
    crash_during(
        &host,
        "fs4",
        "storage.swap",
        "v0",
        "/v1/checkpoints/v0/restore",
    );
    assert_eq!(state_file(&host, "fs4"), "one");
    assert_eq!(checkpoint_ids(&host, "fs4"), ["v0"]);

    // After the swap, before the old layer is deleted: v0's layer.
    crash_during(
        &host,
        "fs4",
        "storage.swapped",
        "v0",
        "/v1/checkpoints/v0/restore",
    );
    assert_eq!(state_file(&host, "fs4"), "zero");

    // A checkpoint's snapshot made, its record not written: adopted after
    // the restart (or absent if the snapshot had not reached the disk),
    // and its id is not given again.
    crash_during(&host, "fs4", "storage.snapshotted", "v1", "/v1/checkpoints");
    let ids = checkpoint_ids(&host, "fs4");
    assert!(ids == ["v0"] || ids == ["v0", "v1"], "{ids:?}");
    let out = host.api("fs4", "POST", "/v1/checkpoints", None);
    let next = if ids.len() == 2 { "\"v2\"" } else { "\"v1\"" };
    assert!(body(&out).contains(next), "{ids:?}: {}", body(&out));

    // On the disk: a whole layer subvolume, no half-swapped one left.
    host.launcher_ok(&["stop", "fs4"]);
    on_disk(&host, "fs4", "user.img", |mnt| {
        assert!(mnt.join("layer/upper").is_dir());
        assert!(
            !mnt.join("layer.swap").exists(),
            "the layer that lost the swap is left"
        );
        assert!(mnt.join("checkpoints/v0/upper").is_dir());
    });
}
