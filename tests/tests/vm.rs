//! Real VMs (root; QEMU, TCG here; run serially): `nestbox-launcher` boots
//! the guest image (`cargo xtask image`) with `nestbox-guest` as PID 1, and
//! the host reaches the user's service at its HTTPS URL.
//!
//! Layout per test K: a launcher state directory of its own with the pool
//! `10.124.K.0/24` (the host is `10.124.K.1` on every tap) and tap prefix
//! `nvK`; Pebble runs in a network namespace of its own at `10.125.K.2`
//! (allow-listed in the firewall: VMs reach nothing on the host itself) and
//! its DNS answers each VM's names with the VM's address. The client is
//! curl on the host, verifying against Pebble's issuing root.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nestbox_tests::pebble::Pebble;
use serde_json::Value;

/// How long a VM under TCG may take from `create` to a serving API
/// (boot, modules, data disk format, ACME for the API's name).
const READY: Duration = Duration::from_mins(3);

struct Host {
    k: u8,
    dir: PathBuf,
    pebble: Pebble,
    root: PathBuf,
    created: Vec<String>,
}

fn body(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn image_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image");
    assert!(
        dir.join("manifest.json").exists(),
        "no guest image at {}: build it with `cargo xtask image` (cargo xtask test does)",
        dir.display()
    );
    dir
}

impl Host {
    fn new(k: u8) -> Self {
        nestbox_tests::require_root();
        nestbox_tests::require_tool("qemu-system-x86_64", "qemu-system-x86");
        let dir = std::env::temp_dir().join(format!("nestbox-vm-{}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pebble = Pebble::start_for_vms(&dir.join("pebble"), &format!("10.125.{k}")).unwrap();
        let config = pebble
            .launcher_toml(
                &image_dir(),
                "test",
                &format!("10.124.{k}.0/24"),
                &format!("nv{k}"),
            )
            .unwrap();
        std::fs::write(dir.join("launcher.toml"), config).unwrap();
        let root = pebble.issuing_root().unwrap();
        Self {
            k,
            dir,
            pebble,
            root,
            created: Vec::new(),
        }
    }

    fn launcher(&self, args: &[&str]) -> Output {
        Command::new(nestbox_tests::workspace_binary("nestbox-launcher"))
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap()
    }

    fn launcher_ok(&self, args: &[&str]) -> String {
        let out = self.launcher(args);
        assert!(
            out.status.success(),
            "nestbox-launcher {args:?} failed: {}{}",
            body(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        body(&out)
    }

    /// The VM's record in `list --json`.
    fn record(&self, name: &str) -> Option<Value> {
        let list: Value = serde_json::from_str(&self.launcher_ok(&["list", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
    }

    fn address(&self, name: &str) -> String {
        self.record(name).expect("no such VM")["address"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn state(&self, name: &str) -> String {
        self.record(name).expect("no such VM")["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn console(&self, name: &str) -> String {
        let out = self.launcher(&["logs", name]);
        let text = body(&out);
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Creates `name`, makes the DNS answer its names, waits for its API.
    fn create(&mut self, name: &str) -> String {
        self.created.push(name.to_owned());
        self.launcher_ok(&["create", name]);
        let ip = self.address(name);
        for host in [
            format!("{name}.test"),
            format!("api.{name}.test"),
            format!("8080.{name}.test"),
        ] {
            self.pebble.add_a(&host, &ip).unwrap();
        }
        self.wait_ready(name);
        ip
    }

    fn token(&self, name: &str) -> String {
        self.launcher_ok(&["token", name]).trim().to_owned()
    }

    fn curl(&self, name: &str, host: &str) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&self.root)
            .args(["--resolve", &format!("{host}:443:{}", self.address(name))]);
        cmd
    }

    fn api(&self, name: &str, method: &str, path: &str, json: Option<&str>) -> Output {
        let host = format!("api.{name}.test");
        let mut cmd = self.curl(name, &host);
        cmd.args(["-X", method])
            .args(["-H", &format!("Authorization: Bearer {}", self.token(name))]);
        if let Some(json) = json {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                json,
            ]);
        }
        cmd.arg(format!("https://{host}{path}")).output().unwrap()
    }

    fn api_stream(
        &self,
        name: &str,
        path: &str,
    ) -> (Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
        let host = format!("api.{name}.test");
        let mut child = self
            .curl(name, &host)
            .args(["-N", "--max-time", "120"])
            .args(["-H", &format!("Authorization: Bearer {}", self.token(name))])
            .arg(format!("https://{host}{path}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    }

    fn wait_ready(&self, name: &str) {
        let deadline = Instant::now() + READY;
        loop {
            let out = self.api(name, "GET", "/v1/status", None);
            if out.status.success() && body(&out).contains("\"running\"") {
                let status = body(&out);
                assert!(status.contains("\"image\":\"0."), "{status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name}: the API did not report a running container in {READY:?}: {}{}\nconsole:\n{}",
                body(&out),
                String::from_utf8_lossy(&out.stderr),
                self.console(name)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until `https://{host}{path}` of VM `name` answers `want`.
    fn wait_body(&self, name: &str, host: &str, path: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_mins(2);
        loop {
            let out = self
                .curl(name, host)
                .arg(format!("https://{host}{path}"))
                .output()
                .unwrap();
            if out.status.success() && body(&out) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "https://{host}{path} did not serve {want:?}: {}{}\nconsole:\n{}",
                body(&out),
                String::from_utf8_lossy(&out.stderr),
                self.console(name)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn get(&self, name: &str, host: &str, path: &str) -> String {
        let out = self
            .curl(name, host)
            .arg("-f")
            .arg(format!("https://{host}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "GET https://{host}{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        body(&out)
    }

    fn create_service(&self, name: &str, json: &str) {
        let out = self.api(name, "POST", "/v1/services", Some(json));
        assert!(
            body(&out).contains("\"name\""),
            "create failed: {}{}\nconsole:\n{}",
            body(&out),
            String::from_utf8_lossy(&out.stderr),
            self.console(name)
        );
    }

    /// What VM `name` left on the host: taps, routes, nft tables,
    /// processes and files that mention it.
    fn leftovers(&self, name: &str, tap: &str, ip: &str) -> Vec<String> {
        let mut left = Vec::new();
        let links = run("ip", &["-o", "link", "show"]);
        if links.lines().any(|l| l.contains(&format!(" {tap}:"))) {
            left.push(format!("tap {tap}"));
        }
        let routes = run("ip", &["-4", "route", "show", "table", "all"]);
        for r in routes.lines().filter(|r| r.contains(ip) || r.contains(tap)) {
            left.push(format!("route {r}"));
        }
        let tables = run("nft", &["list", "tables"]);
        for t in tables
            .lines()
            .filter(|t| t.contains(tap) || t.contains(name))
        {
            left.push(format!("nft {t}"));
        }
        let vm_dir = self.dir.join("vms").join(name);
        // The launcher marks the VMM's environment with its VM directory
        // (QEMU's command line names none of the VM's files: it gets them
        // as descriptors).
        let marker = format!("NESTBOX_VM_DIR={}", vm_dir.display());
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let environ = std::fs::read(p.path().join("environ")).unwrap_or_default();
            if String::from_utf8_lossy(&environ)
                .split('\0')
                .any(|v| v == marker)
            {
                left.push(format!("process {}", p.file_name().to_string_lossy()));
            }
        }
        let cgroups = nestbox_launcher::vmm::cgroup::host().unwrap().dirs(tap);
        for cgroup in cgroups.iter().filter(|c| c.exists()) {
            left.push(format!("cgroup {}", cgroup.display()));
        }
        if vm_dir.exists() {
            left.push(format!("files {}", vm_dir.display()));
        }
        left
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.created) {
            let _ = self.launcher(&["destroy", &name]);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let _ = self.k;
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const WEB: &str = r#"{"name": "web", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "8080", "-h", "/www"], "http_port": 8080}"#;

/// Writes the time of its first run into the container's writable layer
/// (on the data disk), once: a file that survives stop/start keeps it.
const STAMP: &str = r#"{"name": "stamp", "cmd": "/bin/sh", "args": ["-c", "test -f /www/stamp.txt || date +%s%N > /www/stamp.txt; exec sleep 2147483647"]}"#;

const INDEX: &str = "hello from nestbox\n";

#[test]
fn a_vm_serves_its_user_service_and_keeps_it_across_bounce_and_restart() {
    let mut host = Host::new(1);
    host.create("vm1");
    let (mut stream, mut events) = host.api_stream("vm1", "/v1/ports/events");
    host.create_service("vm1", WEB);
    host.create_service("vm1", STAMP);
    host.wait_body("vm1", "vm1.test", "/", INDEX);
    host.wait_body("vm1", "8080.vm1.test", "/", INDEX);
    let open = events
        .next()
        .expect("the event stream ended without the open")
        .unwrap();
    assert!(
        open.contains("\"event\":\"open\"") && open.contains("\"port\":8080"),
        "{open}"
    );
    let _ = stream.kill();
    let _ = stream.wait();

    // Bounce: the container restarts, the URL comes back.
    let out = host.api("vm1", "POST", "/v1/bounce", None);
    assert!(
        out.status.success() && body(&out).contains("running"),
        "bounce: {}\nconsole:\n{}",
        body(&out),
        host.console("vm1")
    );
    host.wait_body("vm1", "vm1.test", "/", INDEX);

    // Stop and start: the definitions and the data disk survive.
    let stamp = host.get("vm1", "vm1.test", "/stamp.txt");
    assert!(!stamp.trim().is_empty());
    host.launcher_ok(&["stop", "vm1"]);
    assert_eq!(host.state("vm1"), "stopped");
    host.launcher_ok(&["start", "vm1"]);
    host.wait_ready("vm1");
    host.wait_body("vm1", "vm1.test", "/", INDEX);
    assert_eq!(host.get("vm1", "vm1.test", "/stamp.txt"), stamp);
    let services = body(&host.api("vm1", "GET", "/v1/services", None));
    assert!(
        services.contains("\"web\"") && services.contains("\"stamp\""),
        "{services}"
    );
}

#[test]
fn a_crashed_vm_is_reported_and_destroy_leaves_nothing() {
    let mut host = Host::new(2);
    let ip = host.create("vm2");
    let record = host.record("vm2").unwrap();
    let tap = record["tap"].as_str().unwrap().to_owned();
    let pid = record["pid"].as_u64().expect("a running VM has a pid");
    assert!(
        !host.leftovers("vm2", &tap, &ip).is_empty(),
        "a running VM shows up"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.state("vm2") != "crashed" {
        assert!(Instant::now() < deadline, "list never said crashed");
        std::thread::sleep(Duration::from_millis(100));
    }
    host.launcher_ok(&["destroy", "vm2"]);
    host.created.clear();
    assert_eq!(host.leftovers("vm2", &tap, &ip), Vec::<String>::new());
    assert!(host.record("vm2").is_none());
}

#[test]
fn two_vms_have_their_own_address_and_url() {
    let mut host = Host::new(3);
    let a = host.create("alpha");
    let b = host.create("beta");
    assert_ne!(a, b);
    host.create_service("alpha", WEB);
    host.create_service("beta", WEB);
    host.wait_body("alpha", "alpha.test", "/", INDEX);
    host.wait_body("beta", "beta.test", "/", INDEX);
    let tap = host.record("alpha").unwrap()["tap"]
        .as_str()
        .unwrap()
        .to_owned();
    host.launcher_ok(&["destroy", "alpha"]);
    host.created.retain(|n| n != "alpha");
    assert_eq!(host.leftovers("alpha", &tap, &a), Vec::<String>::new());
    host.wait_body("beta", "beta.test", "/", INDEX);
}
