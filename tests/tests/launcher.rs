//! `nestbox-launcher` on the host (root): taps, routes, nftables tables,
//! records and VMM processes, with `nb-fake-qemu` in place of QEMU
//! (`qemu = …` in `launcher.toml`: honest configuration, no test mode), so
//! each create takes milliseconds and needs no guest image. Real QEMU and
//! the real guest are `tests/vm.rs`.
//!
//! Test K has a state directory of its own, the pool `10.211.K.0/24` and
//! the tap prefix `nlK`, so tests never see each other's VMs; a guard
//! destroys what a test made, and force-removes whatever remains, also when
//! the test fails.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nestbox_tests::Lcg;
use serde_json::Value;

struct Env {
    dir: PathBuf,
    prefix: String,
    net: String,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    text(&out.stdout)
}

/// A guest image that is only a manifest and empty files: the fake QEMU
/// never reads them.
fn fake_image(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        r#"{"version": "test-1", "kernel_release": "6.1.0-test", "kernel": "vmlinuz", "vmlinux": null, "initramfs": "initramfs.cpio"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("vmlinuz"), "").unwrap();
    std::fs::write(dir.join("initramfs.cpio"), "").unwrap();
}

impl Env {
    fn new(k: u8) -> Self {
        nestbox_tests::require_root();
        nestbox_tests::require_tool("nft", "nftables");
        let dir = std::env::temp_dir().join(format!("nestbox-launcher-{}-{k}", std::process::id()));
        let env = Self {
            dir,
            prefix: format!("nl{k}"),
            net: format!("10.211.{k}."),
        };
        env.force_clean();
        std::fs::create_dir_all(&env.dir).unwrap();
        fake_image(&env.dir.join("image"));
        let config = format!(
            "image = \"image\"\ndomain = \"test\"\npool = \"10.211.{k}.0/24\"\ntap_prefix = \"{prefix}\"\n\
             qemu = {qemu:?}\nmemory_mib = 128\n\
             [guest.ingress.acme]\ndirectory = \"https://10.211.{k}.1:14000/dir\"\nstate_dir = \"/data/acme\"\n",
            prefix = env.prefix,
            qemu = nestbox_tests::workspace_binary("nb-fake-qemu")
                .display()
                .to_string(),
        );
        std::fs::write(env.dir.join("launcher.toml"), config).unwrap();
        env
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(nestbox_tests::workspace_binary("nestbox-launcher"));
        cmd.arg("--state-dir").arg(&self.dir).args(args);
        cmd
    }

    fn launcher(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.launcher(args);
        assert!(
            out.status.success(),
            "nestbox-launcher {args:?} failed ({}): {}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// A refusal: exit code 2 and a message containing `want`.
    fn refused(&self, args: &[&str], want: &str) {
        let out = self.launcher(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }

    fn list(&self) -> Vec<Value> {
        let list: Value = serde_json::from_str(&self.ok(&["list", "--json"])).unwrap();
        list.as_array().unwrap().clone()
    }

    fn record(&self, name: &str) -> Value {
        self.list()
            .into_iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not listed"))
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.join("vms").join(name)
    }

    fn taps(&self) -> Vec<String> {
        run("ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .filter(|n| n.starts_with(&self.prefix))
            .collect()
    }

    fn tables(&self) -> Vec<String> {
        run("nft", &["list", "tables"])
            .lines()
            .filter(|t| t.contains(&format!("nestbox-{}", self.prefix)))
            .map(str::to_owned)
            .collect()
    }

    /// Processes started for this state directory (the launcher marks
    /// them), or naming it on their command line.
    fn processes(&self) -> Vec<u32> {
        let needle = self.dir.to_string_lossy().into_owned();
        let marker = format!("NESTBOX_VM_DIR={needle}");
        let mut found = Vec::new();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let cmdline = text(&std::fs::read(p.path().join("cmdline")).unwrap_or_default());
            let environ = text(&std::fs::read(p.path().join("environ")).unwrap_or_default());
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            if !zombie
                && (environ.split('\0').any(|v| v.starts_with(&marker))
                    || (cmdline.contains(&needle) && !cmdline.contains("nestbox-launcher")))
            {
                found.push(pid);
            }
        }
        found
    }

    /// Everything of this test's launcher still on the host.
    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .taps()
            .into_iter()
            .map(|t| format!("tap {t}"))
            .collect();
        let routes = run("ip", &["-4", "route", "show", "table", "all"]);
        left.extend(
            routes
                .lines()
                .filter(|r| r.contains(&self.net) || r.contains(&format!("dev {}", self.prefix)))
                .map(|r| format!("route {r}")),
        );
        left.extend(self.tables().into_iter().map(|t| format!("nft {t}")));
        left.extend(self.processes().into_iter().map(|p| format!("process {p}")));
        if let Ok(entries) = std::fs::read_dir(self.dir.join("vms")) {
            left.extend(
                entries
                    .flatten()
                    .map(|e| format!("files {}", e.path().display())),
            );
        }
        left
    }

    fn assert_clean(&self) {
        assert_eq!(self.leftovers(), Vec::<String>::new());
    }

    /// Removes whatever this test's launcher left, without the launcher.
    fn force_clean(&self) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for tap in self.taps() {
            let _ = Command::new("ip").args(["link", "del", &tap]).status();
        }
        for table in self.tables() {
            // "table ip nestbox-nl1…"
            let name = table
                .split_whitespace()
                .last()
                .unwrap_or_default()
                .to_owned();
            for family in ["ip", "inet"] {
                let _ = Command::new("nft")
                    .args(["delete", "table", family, &name])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn pid(&self, name: &str) -> u32 {
        u32::try_from(
            self.record(name)["pid"]
                .as_u64()
                .expect("a running VM has a pid"),
        )
        .unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.dir.join("vms")) {
            for e in entries.flatten() {
                let _ = self.launcher(&["destroy", &e.file_name().to_string_lossy()]);
            }
        }
        self.force_clean();
    }
}

fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn sha256_hex(data: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(data.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The tap is up with the host address, the guest is routed, the VM's
/// nftables table holds its rules, forwarding is on.
fn check_network() {
    let addr = run("ip", &["-o", "-4", "addr", "show", "dev", "nl12"]);
    assert!(addr.contains("10.211.1.1/32"), "{addr}");
    let ipv6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/nl12/disable_ipv6");
    assert_eq!(ipv6.unwrap().trim(), "1", "IPv4 only on the tap");
    let link = run("ip", &["-o", "link", "show", "nl12"]);
    assert!(link.contains(",UP") || link.contains("<UP"), "{link}");
    let route = run("ip", &["-4", "route", "show", "10.211.1.2"]);
    assert!(
        route.contains("dev nl12") && route.contains("src 10.211.1.1"),
        "{route}"
    );
    // The table is there (what its rules do is tested with real packets
    // from real VMs, in tests/host_boundary.rs).
    let table = run("nft", &["list", "table", "inet", "nestbox-nl12"]);
    for rule in [
        "iifname \"nl12\" ip saddr != 10.211.1.2 drop",
        "iifname \"nl12\" oifname \"nl1*\" drop",
        "ip saddr 10.211.1.2 oifname != \"nl12\" masquerade",
    ] {
        assert!(table.contains(rule), "{rule:?} not in {table}");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );
}

/// A private token, a sparse data disk of the platform's size, a sparse
/// user disk of the size asked for, the config disk.
fn check_files(env: &Env, vm: &Path) {
    let token = env.ok(&["token", "vm1"]).trim().to_owned();
    assert_eq!(token.len(), 64);
    let meta = std::fs::metadata(vm.join("token")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let data = std::fs::metadata(vm.join("data.img")).unwrap();
    assert_eq!(data.len(), 1 << 30);
    assert!(data.blocks() * 512 < 1 << 20, "the data disk is sparse");
    let user = std::fs::metadata(vm.join("user.img")).unwrap();
    assert_eq!(user.len(), 2 << 30);
    assert!(user.blocks() * 512 < 1 << 20, "the user disk is sparse");
    let config = std::fs::read(vm.join("config.img")).unwrap();
    assert_eq!(config.len() % 512, 0);
    let config = text(&config[..config.iter().position(|&b| b == 0).unwrap()]);
    for want in [
        "name = \"vm1\"".to_owned(),
        "domain = \"test\"".to_owned(),
        "primary_port = 3000".to_owned(),
        "data_device = \"virtio:nestbox-data\"".to_owned(),
        "user_device = \"virtio:nestbox-user\"".to_owned(),
        "user_dir = \"/user\"".to_owned(),
        format!("token_sha256 = \"{}\"", sha256_hex(&token)),
        "address = \"10.211.1.2\"".to_owned(),
        "prefix_len = 24".to_owned(),
        "gateway = \"10.211.1.1\"".to_owned(),
        "directory = \"https://10.211.1.1:14000/dir\"".to_owned(),
    ] {
        assert!(config.contains(&want), "{want:?} not in {config}");
    }
    assert!(
        !config.contains(&token),
        "the token itself stays on the host"
    );
}

/// What the VMM was started with, who it runs as, and its console.
fn check_vmm(env: &Env, vm: &Path) {
    let vmm_log = std::fs::read_to_string(vm.join("vmm.log")).unwrap();
    for want in [
        "-machine microvm,acpi=on,rtc=on",
        "-m 256 -smp 1",
        "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-netdev tap,id=net0,fd=3",
        "virtio-net-device,netdev=net0,mac=02:6e:62:d3:01:02",
        "serial=nestbox-data",
        "serial=nestbox-user",
        "read-only=on",
        "serial=nestbox-config",
        "nestbox.config=virtio:nestbox-config",
        // 10.211.1.2 as a number: the VM's own user, nobody else's.
        "runs as uid 181600514 gid 181600514; / holds ",
    ] {
        assert!(vmm_log.contains(want), "{want:?} not in {vmm_log}");
    }
    // Its root holds the system's programs, its devices, and the top of
    // the image's and this fake binary's paths: no /proc, /home, /root,
    // /var, /run or /sys.
    let root: Vec<&str> = vmm_log
        .lines()
        .find_map(|l| l.split_once("; / holds ").map(|(_, r)| r))
        .unwrap()
        .split_whitespace()
        .collect();
    let top = |p: &Path| {
        p.components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned()
    };
    let mut expected = vec!["bin", "dev", "etc", "lib", "lib64", "sbin", "usr"];
    let binary = top(&nestbox_tests::workspace_binary("nb-fake-qemu"));
    let image = top(&env.dir);
    for extra in [binary.as_str(), image.as_str()] {
        if !expected.contains(&extra) {
            expected.push(extra);
        }
    }
    expected.sort_unstable();
    assert_eq!(root, expected, "{vmm_log}");
    assert!(!vmm_log.contains("mitigations=off"), "{vmm_log}");
    assert!(env.ok(&["logs", "vm1"]).contains("fake qemu: booted"));
    // Its cgroup caps its memory (256 MiB of guest + 256 of overhead, no
    // translation cache for a VMM that is not QEMU) and its CPU (one).
    let pid = env.pid("vm1");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains("nestbox/nl12"), "{cgroups}");
}

#[test]
fn create_makes_the_network_and_files_and_destroy_removes_them_all() {
    let env = Env::new(1);
    let out = env.ok(&[
        "create",
        "vm1",
        "--memory",
        "256",
        "--primary-port",
        "3000",
        "--disk-size",
        "2",
    ]);
    let vm = env.vm_dir("vm1");
    for want in [
        "name     vm1",
        "address  10.211.1.2 (tap nl12)",
        "accel    ",
        "https://vm1.test/",
        "https://api.vm1.test/v1/",
        &format!("token    {}", vm.join("token").display()),
    ] {
        assert!(out.contains(want), "{want:?} not in {out}");
    }
    let r = env.record("vm1");
    assert_eq!(r["state"], "running");
    assert_eq!(r["address"], "10.211.1.2");
    assert_eq!(r["host_address"], "10.211.1.1");
    assert_eq!(r["tap"], "nl12");
    assert_eq!(r["mac"], "02:6e:62:d3:01:02");
    assert_eq!(r["memory_mib"], 256);
    assert_eq!(r["image_version"], "test-1");
    assert!(r["accel"] == "tcg" || r["accel"] == "kvm", "{r}");

    check_network();
    check_files(&env, &vm);
    check_vmm(&env, &vm);

    // Stop (the fake powers off on system_powerdown), start: the data
    // disk is kept, the network stays.
    let first = env.pid("vm1");
    let mut disk = std::fs::OpenOptions::new()
        .write(true)
        .open(vm.join("data.img"))
        .unwrap();
    disk.write_all(b"kept").unwrap();
    drop(disk);
    assert!(env.ok(&["stop", "vm1"]).contains("vm1 stopped"));
    let r = env.record("vm1");
    assert_eq!(r["state"], "stopped");
    assert!(r.get("pid").is_none(), "{r}");
    assert!(env.processes().is_empty());
    assert!(env.taps().contains(&"nl12".to_owned()));
    env.ok(&["start", "vm1"]);
    assert_eq!(env.record("vm1")["state"], "running");
    assert_ne!(env.pid("vm1"), first);
    assert!(
        std::fs::read(vm.join("data.img"))
            .unwrap()
            .starts_with(b"kept")
    );
    env.refused(&["start", "vm1"], "already running");
    let logs = env.ok(&["logs", "vm1"]);
    assert_eq!(logs.matches("fake qemu: booted").count(), 2, "{logs}");

    assert!(env.ok(&["destroy", "vm1"]).contains("vm1 destroyed"));
    env.assert_clean();
    assert!(env.list().is_empty());
}

#[test]
fn stop_kills_a_guest_that_does_not_power_off() {
    let env = Env::new(2);
    let out = env
        .command(&["create", "hung"])
        .env("NB_FAKE_QEMU_IGNORE_POWERDOWN", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let started = Instant::now();
    let out = env.ok(&["stop", "hung", "--timeout", "1"]);
    assert!(out.contains("hung killed"), "{out}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(env.record("hung")["state"], "stopped");
    assert!(env.processes().is_empty());
    assert!(env.ok(&["stop", "hung"]).contains("was not running"));
    env.ok(&["destroy", "hung"]);
    env.assert_clean();
}

#[test]
fn a_killed_vmm_is_crashed_and_destroy_cleans_up_only_that_vm() {
    let env = Env::new(3);
    env.ok(&["create", "alpha"]);
    env.ok(&["create", "beta"]);
    let (a, b) = (env.record("alpha"), env.record("beta"));
    assert_ne!(a["address"], b["address"]);
    assert_ne!(a["tap"], b["tap"]);
    kill9(env.pid("alpha"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.record("alpha")["state"] != "crashed" {
        assert!(Instant::now() < deadline, "list never said crashed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.record("beta")["state"], "running");
    env.ok(&["destroy", "alpha"]);
    let left = env.leftovers();
    assert!(
        left.iter().all(|l| l.contains("nl33")
            || l.contains("10.211.3.3")
            || l.contains("process")
            || l.contains("vms/beta")),
        "only beta's things remain: {left:?}"
    );
    assert!(env.taps() == ["nl33"], "{:?}", env.taps());
    assert_eq!(env.processes().len(), 1);
    // The freed address is given out again.
    env.ok(&["create", "gamma"]);
    assert_eq!(env.record("gamma")["address"], "10.211.3.2");
    env.ok(&["destroy", "beta"]);
    env.ok(&["destroy", "gamma"]);
    env.assert_clean();
}

#[test]
fn a_launcher_killed_during_create_leaves_nothing_the_next_command_trips_over() {
    let env = Env::new(4);
    // How long a whole create takes here: the window to kill in.
    let t0 = Instant::now();
    env.ok(&["create", "probe"]);
    let window = t0.elapsed();
    env.ok(&["destroy", "probe"]);
    env.assert_clean();

    let mut rng = Lcg(4);
    let window_us = u64::try_from(window.as_micros()).unwrap().max(1000) * 5 / 4;
    let mut interrupted = 0;
    for round in 0..20 {
        let mut child = env.command(&["create", "victim"]).spawn().unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(window_us)));
        let _ = child.kill();
        let _ = child.wait();
        if !env.leftovers().is_empty() && env.list().iter().any(|v| v["state"] == "incomplete") {
            interrupted += 1;
        }
        // Whatever was left, list copes with it.
        let states: Vec<Value> = env.list().iter().map(|v| v["state"].clone()).collect();
        assert!(
            states.iter().all(|s| s == "incomplete" || s == "running"),
            "round {round}: {states:?}"
        );
        if round % 2 == 0 {
            // A second create either refuses (the first finished) or
            // cleans up and succeeds.
            let out = env.launcher(&["create", "victim"]);
            let err = text(&out.stderr);
            assert!(
                out.status.success() || err.contains("already exists"),
                "round {round}: second create: {err}"
            );
            assert_eq!(env.record("victim")["state"], "running", "round {round}");
            env.ok(&["destroy", "victim"]);
        } else {
            let out = env.launcher(&["destroy", "victim"]);
            let err = text(&out.stderr);
            assert!(
                out.status.success() || err.contains("no VM named victim"),
                "round {round}: destroy: {err}"
            );
        }
        let left = env.leftovers();
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
    // The kills must have landed inside create, not before or after it.
    assert!(
        interrupted >= 5,
        "only {interrupted} of 20 kills left a half-made VM"
    );
}

#[test]
fn bad_and_duplicate_names_are_refused() {
    let env = Env::new(5);
    let long = "x".repeat(64);
    for bad in ["Web", "-a", "a-", "a_b", "a.b", "../etc", long.as_str(), ""] {
        // `--`: a leading '-' would otherwise be taken for an option.
        env.refused(&["create", "--", bad], "DNS label");
    }
    assert!(env.list().is_empty());
    assert!(env.taps().is_empty());

    env.ok(&["create", "dup"]);
    let pid = env.pid("dup");
    env.refused(&["create", "dup"], "already exists");
    assert_eq!(env.list().len(), 1);
    assert_eq!(env.pid("dup"), pid, "the existing VM is untouched");
    assert_eq!(env.taps(), ["nl52"]);

    env.refused(&["destroy", "nosuch"], "no VM named nosuch");
    env.refused(&["stop", "nosuch"], "no VM named nosuch");
    env.refused(&["start", "Bad"], "DNS label");
    env.refused(&["create", "ok", "--cpus", "0"], "--cpus");
    env.ok(&["destroy", "dup"]);
    env.assert_clean();
}

#[test]
fn a_vmm_that_fails_at_start_leaves_nothing_and_says_why() {
    let env = Env::new(6);
    let out = env
        .command(&["create", "broken"])
        .env("NB_FAKE_QEMU_FAIL", "1")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("could not open tap"),
        "the VMM's own words: {err}"
    );
    env.assert_clean();
    assert!(env.list().is_empty());
}

#[test]
fn the_library_times_create_up_to_the_vmm_exec_with_a_stub() {
    use nestbox_launcher::vmm::stub::Stub;
    use nestbox_launcher::{CreateOptions, Launcher, StopOutcome, VmState};
    let env = Env::new(7);
    let launcher = Launcher::open(&env.dir).unwrap();
    let stub = Stub::new("sleep", ["1000"]);
    let created = launcher
        .create(&CreateOptions::new("bench"), &stub)
        .unwrap();
    assert_eq!(created.record.tap, "nl72");
    assert_eq!(created.record.accel.to_string(), "none");
    let vms = launcher.list().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].state, VmState::Running);
    assert_eq!(env.processes().len(), 1);
    let outcome = launcher
        .stop("bench", Duration::from_secs(5), &stub)
        .unwrap();
    assert_eq!(outcome, StopOutcome::Graceful);
    launcher.start("bench", &stub).unwrap();
    launcher.destroy("bench").unwrap();
    env.assert_clean();
}
