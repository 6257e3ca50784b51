//! Real VMs for the tests (root; QEMU, TCG here; run serially):
//! `nestbox-launcher` boots the guest image (`cargo xtask image`) with
//! `nestbox-guest` as PID 1.
//!
//! Layout per host K: a launcher state directory of its own with the pool
//! `10.124.K.0/24` (the host is `10.124.K.1` on every tap) and tap prefix
//! `nvK`; Pebble runs in a network namespace of its own at `10.125.K.2`
//! (allow-listed in the firewall: VMs reach nothing on the host itself) and
//! its DNS answers each VM's names with the VM's address. The client is
//! curl on the host, verifying against Pebble's issuing root.

#![allow(
    clippy::missing_panics_doc,
    reason = "test helpers: a failed step is a failed test, with its message"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pebble::Pebble;

/// The static helper the tests and benches run inside containers
/// (`tests/src/escape/nb-escape.c`: the escape suite's attempts, a web app
/// that never forks, a system call loop).
pub const NB_ESCAPE: &str = env!("NB_ESCAPE");

/// A fork bomb, a memory hog and a CPU spin at once, from one service. The
/// hog (two 256 MiB buffers at once, more than the container may have,
/// again and again; one buffer the size of the VM would be refused by the
/// kernel's overcommit check before it took anything) starts first: once
/// the bomb holds every process slot and the CPU, a new hog can neither
/// fork nor run. It attacks once: a marker on the user's disk keeps a
/// bounced container clean although the service stays registered.
pub const EXHAUST: &str = r"if [ -e /attacked ]; then echo clean; exec sleep 2147483647; fi
touch /attacked
(while :; do :; done) &
(while :; do dd if=/dev/zero of=/dev/null bs=256M count=4; done) &
(while :; do dd if=/dev/zero of=/dev/null bs=256M count=4; done) &
sleep 10
b() { b | b & }
b
exec sleep 2147483647";

/// The user's web app for the resource tests and benches: `nb-escape
/// serve`, one process that never forks (busybox httpd forks per request,
/// and a fork bomb in the same container leaves no process to fork).
pub const WEB_NO_FORK: &str =
    r#"{"name": "web", "cmd": "/nb-escape", "args": ["serve", "8080"], "http_port": 8080}"#;

/// What [`WEB_NO_FORK`] serves.
pub const INDEX: &str = "hello from nestbox\n";

/// How long a VM under TCG may take from `create` to a serving API
/// (boot, modules, data disk format, ACME for the API's name).
const READY: Duration = Duration::from_mins(3);

/// A host running real VMs: a launcher state directory, Pebble in a
/// namespace of its own, and the VMs it created (destroyed on drop).
pub struct Host {
    k: u8,
    /// The launcher's state directory.
    pub dir: PathBuf,
    /// The ACME test CA the VMs use.
    pub pebble: Pebble,
    root: PathBuf,
    /// The VMs made (destroyed on drop).
    pub created: Vec<String>,
    /// Servers this host started for its VMs (killed on drop).
    servers: Vec<Child>,
    probes: std::cell::Cell<u32>,
    /// Each VM's API token, read once from the launcher.
    tokens: std::cell::RefCell<std::collections::HashMap<String, String>>,
}

/// A command's standard output, as text.
#[must_use]
pub fn body(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest image `cargo xtask image` built.
///
/// # Panics
/// If there is none.
#[must_use]
pub fn image_dir() -> PathBuf {
    built_image("image", "cargo xtask image")
}

/// The fault-injection suite's image: the guest with its crash points
/// (`cargo xtask image --faults`).
///
/// # Panics
/// If there is none.
#[must_use]
pub fn faults_image_dir() -> PathBuf {
    built_image("image-faults", "cargo xtask image --faults")
}

fn built_image(name: &str, how: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(name);
    assert!(
        dir.join("manifest.json").exists(),
        "no guest image at {}: build it with `{how}` (cargo xtask test does)",
        dir.display()
    );
    dir
}

impl Host {
    #[must_use]
    pub fn new(k: u8) -> Self {
        Self::with_image(k, &image_dir())
    }

    /// A host whose VMs boot the image in `image`.
    #[must_use]
    pub fn with_image(k: u8, image: &Path) -> Self {
        crate::require_root();
        crate::require_tool("qemu-system-x86_64", "qemu-system-x86");
        let dir = std::env::temp_dir().join(format!("nestbox-vm-{}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pebble = Pebble::start_for_vms(&dir.join("pebble"), &format!("10.125.{k}")).unwrap();
        let config = pebble
            .launcher_toml(
                image,
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
            servers: Vec::new(),
            probes: std::cell::Cell::new(0),
            tokens: std::cell::RefCell::default(),
        }
    }

    /// The root VMs' certificates chain to (Pebble's issuing root).
    #[must_use]
    pub fn ca(&self) -> &Path {
        &self.root
    }

    /// Makes the DNS answer VM `name`'s names with `ip`, and destroys it
    /// with the host (a VM made by something else than [`Host::create`]:
    /// the `nestbox` CLI).
    pub fn adopt(&mut self, name: &str, ip: &str) {
        self.created.push(name.to_owned());
        for host in [
            format!("{name}.test"),
            format!("api.{name}.test"),
            format!("8080.{name}.test"),
        ] {
            self.pebble.add_a(&host, ip).unwrap();
        }
    }

    pub fn launcher(&self, args: &[&str]) -> Output {
        Command::new(crate::workspace_binary("nestbox-launcher"))
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn launcher_ok(&self, args: &[&str]) -> String {
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
    pub fn record(&self, name: &str) -> Option<Value> {
        let list: Value = serde_json::from_str(&self.launcher_ok(&["list", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
    }

    pub fn address(&self, name: &str) -> String {
        self.record(name).expect("no such VM")["address"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn state(&self, name: &str) -> String {
        self.record(name).expect("no such VM")["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn console(&self, name: &str) -> String {
        let out = self.launcher(&["logs", name]);
        let text = body(&out);
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Creates `name`, makes the DNS answer its names, waits for its API.
    pub fn create(&mut self, name: &str) -> String {
        self.create_with(name, &[])
    }

    /// [`Host::create`] with more `create` options (`--disk-size 1`, …).
    pub fn create_with(&mut self, name: &str, options: &[&str]) -> String {
        self.created.push(name.to_owned());
        self.tokens.borrow_mut().remove(name);
        let mut args = vec!["create", name];
        args.extend_from_slice(options);
        self.launcher_ok(&args);
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

    pub fn token(&self, name: &str) -> String {
        if let Some(token) = self.tokens.borrow().get(name) {
            return token.clone();
        }
        let token = self.launcher_ok(&["token", name]).trim().to_owned();
        self.tokens
            .borrow_mut()
            .insert(name.to_owned(), token.clone());
        token
    }

    pub fn curl(&self, name: &str, host: &str) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "20", "--cacert"])
            .arg(&self.root)
            .args(["--resolve", &format!("{host}:443:{}", self.address(name))]);
        cmd
    }

    /// [`Host::curl`] as the owner of VM `name` (its URLs are private by
    /// default: the VM token opens them).
    pub fn owner_curl(&self, name: &str, host: &str) -> Command {
        let mut cmd = self.curl(name, host);
        cmd.args(["-H", &format!("Authorization: Bearer {}", self.token(name))]);
        cmd
    }

    pub fn api(&self, name: &str, method: &str, path: &str, json: Option<&str>) -> Output {
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

    pub fn api_stream(
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

    /// `kill -9` of VM `name`'s QEMU (a host crash, as the guest sees
    /// it); returns once the launcher sees it crashed.
    pub fn kill_vmm(&self, name: &str) {
        let pid = self.record(name).unwrap()["pid"]
            .as_u64()
            .expect("a running VM has a pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.state(name) != "crashed" {
            assert!(Instant::now() < deadline, "the VM was not seen crashed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET /v1/checkpoints` of VM `name`, and its ids in order.
    pub fn checkpoints(&self, name: &str) -> (Value, Vec<String>) {
        let out = self.api(name, "GET", "/v1/checkpoints", None);
        let list: Value =
            serde_json::from_str(&body(&out)).unwrap_or_else(|e| panic!("{e}: {}", body(&out)));
        let ids = list["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        (list, ids)
    }

    /// Appends `text` to this host's `launcher.toml` (a table of its own,
    /// such as `[storage]`), for the VMs created after.
    pub fn add_to_launcher_toml(&self, text: &str) {
        let path = self.dir.join("launcher.toml");
        let mut config = std::fs::read_to_string(&path).unwrap();
        config.push('\n');
        config.push_str(text);
        std::fs::write(path, config).unwrap();
    }

    /// The address and network namespace of the allow-listed servers
    /// (Pebble's), for a server the VMs are to reach.
    #[must_use]
    pub fn lan(&self) -> (String, PathBuf) {
        let netns = self.pebble.netns().expect("Pebble for VMs has a namespace");
        (self.pebble.address().to_owned(), netns.netns())
    }

    pub fn wait_ready(&self, name: &str) {
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
    pub fn wait_body(&self, name: &str, host: &str, path: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_mins(2);
        loop {
            let out = self
                .owner_curl(name, host)
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

    pub fn get(&self, name: &str, host: &str, path: &str) -> String {
        let out = self
            .owner_curl(name, host)
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

    pub fn create_service(&self, name: &str, json: &str) {
        let out = self.api(name, "POST", "/v1/services", Some(json));
        assert!(
            body(&out).contains("\"name\""),
            "create failed: {}{}\nconsole:\n{}",
            body(&out),
            String::from_utf8_lossy(&out.stderr),
            self.console(name)
        );
    }

    /// Arms a crash point of VM `name`'s guest, which must boot
    /// [`faults_image_dir`] (see `guest/src/faults.rs`).
    pub fn arm_fault(&self, name: &str, fault: &str) {
        let out = self.api(name, "POST", "/v1/faults", Some(fault));
        assert!(
            body(&out).starts_with('['),
            "arming {fault}: {}{} (does the VM boot the image with crash points?)",
            body(&out),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The lines service `service` of VM `name` wrote (stdout and stderr),
    /// from the logs API.
    pub fn service_lines(&self, name: &str, service: &str) -> Vec<String> {
        let logs = body(&self.api(name, "GET", &format!("/v1/services/{service}/logs"), None));
        logs.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["line"].as_str().map(str::to_owned))
            .collect()
    }

    /// Runs `script` (busybox `sh`) in VM `name`'s inner container, as a
    /// user would — a service registered through the API — and returns
    /// every line it wrote once it is done (within `within`); the service
    /// is then deleted.
    pub fn in_container(&self, name: &str, script: &str, within: Duration) -> Vec<String> {
        let n = self.probes.get() + 1;
        self.probes.set(n);
        let service = format!("probe-{n}");
        let wrapped = format!("{script}\necho\necho NB-DONE\nexec sleep 2147483647");
        let spec = serde_json::json!({"name": service, "cmd": "/bin/sh", "args": ["-c", wrapped]});
        self.create_service(name, &spec.to_string());
        let deadline = Instant::now() + within;
        let lines = loop {
            let lines = self.service_lines(name, &service);
            if lines.iter().any(|l| l == "NB-DONE") {
                break lines;
            }
            assert!(
                Instant::now() < deadline,
                "the script did not finish within {within:?}: {lines:#?}\nconsole:\n{}",
                self.console(name)
            );
            std::thread::sleep(Duration::from_millis(300));
        };
        let out = self.api(name, "DELETE", &format!("/v1/services/{service}"), None);
        assert!(out.status.success(), "delete {service}: {}", body(&out));
        lines
    }

    /// Serves `file` over HTTP from Pebble's namespace (an allow-listed
    /// address VMs reach, as they would reach a mirror on the LAN), and
    /// returns its URL.
    pub fn serve(&mut self, file: &Path) -> String {
        crate::require_tool("busybox", "busybox-static");
        let www = self.dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(file, www.join(&name)).unwrap();
        let ip = self.pebble.address().to_owned();
        let netns = self.pebble.netns().expect("Pebble for VMs has a namespace");
        if self.servers.is_empty() {
            let server = netns
                .command_in("busybox", None)
                .args(["httpd", "-f", "-p", &format!("{ip}:8000"), "-h"])
                .arg(&www)
                .spawn()
                .unwrap();
            self.servers.push(server);
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect((ip.as_str(), 8000)).is_err() {
                assert!(Instant::now() < deadline, "busybox httpd did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        format!("http://{ip}:8000/{name}")
    }

    /// Fetches [`NB_ESCAPE`] into VM `name`'s container at `/nb-escape`,
    /// from an allow-listed address (see [`Host::serve`]).
    pub fn install_helper(&mut self, name: &str) {
        let url = self.serve(Path::new(NB_ESCAPE));
        let lines = self.in_container(
            name,
            &format!("wget -q -O /nb-escape {url} && chmod 755 /nb-escape && echo fetched"),
            Duration::from_mins(2),
        );
        assert!(lines.iter().any(|l| l == "fetched"), "{lines:#?}");
    }

    /// What VM `name` left on the host: taps, routes, nft tables,
    /// processes and files that mention it.
    pub fn leftovers(&self, name: &str, tap: &str, ip: &str) -> Vec<String> {
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
        for mut server in std::mem::take(&mut self.servers) {
            let _ = server.kill();
            let _ = server.wait();
        }
        for name in std::mem::take(&mut self.created) {
            let _ = self.launcher(&["destroy", &name]);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let _ = self.k;
    }
}

/// The standard output of `cmd args`.
///
/// # Panics
/// If it cannot run.
#[must_use]
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
