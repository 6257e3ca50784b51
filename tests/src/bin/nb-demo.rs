//! `nb-demo`, run by `cargo xtask demo`: one real nestbox VM, on the
//! embedded defaults.
//!
//! Starts Pebble (the ACME test CA) and its DNS on the host, boots a VM with
//! `nestbox-launcher` (guest image from `cargo xtask image`), starts a small
//! web app in its inner container through the VM's own API, prints the
//! HTTPS URL (private by default) with a `curl` command that works as
//! printed (the VM token opens it) and the `nestbox url` that gives a
//! browser its login link, and shows the VM's
//! port events live (a second app opens a port a few seconds in). Ctrl-C
//! destroys the VM and stops everything the demo started.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nestbox_tests::pebble::Pebble;

#[derive(Parser)]
struct Args {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// The guest image directory (`cargo xtask image`).
    #[arg(long)]
    image: PathBuf,
    /// The VM's name.
    #[arg(long, default_value = "demo")]
    name: String,
}

/// The demo's embedded defaults.
const DOMAIN: &str = "nestbox.test";
const POOL: &str = "10.123.0.0/24";
/// Where the demo's ACME test CA runs: a namespace of its own behind the
/// host (VMs reach nothing on the host itself), allow-listed in the
/// firewall.
const ACME_SUBNET: &str = "10.122.0";
const WORK: &str = "/tmp/nestbox-demo";

const WEB: &str = r#"{"name": "web", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "8080", "-h", "/www"], "http_port": 8080}"#;
const SECOND: &str = r#"{"name": "second", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "3000", "-h", "/www"]}"#;

struct Demo {
    work: PathBuf,
    launcher: PathBuf,
    name: String,
    created: bool,
}

impl Demo {
    fn launcher(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.launcher)
            .arg("--state-dir")
            .arg(self.work.join("state"))
            .args(args)
            .output()
            .context("run nestbox-launcher")?;
        if !out.status.success() {
            bail!(
                "nestbox-launcher {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn address(&self) -> Result<String> {
        let list: serde_json::Value = serde_json::from_str(&self.launcher(&["list", "--json"])?)?;
        list.as_array()
            .and_then(|vms| vms.iter().find(|v| v["name"] == self.name.as_str()))
            .and_then(|v| v["address"].as_str())
            .map(str::to_owned)
            .context("the VM is not in the launcher's list")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.created {
            println!("destroying {} …", self.name);
            if let Err(err) = self.launcher(&["destroy", &self.name.clone()]) {
                eprintln!("{err}");
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("install Ctrl-C handler")?;
    let deadline = args
        .seconds
        .map(|s| Instant::now() + Duration::from_secs(s));
    let over = || stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() > d);

    // launcher.toml lives in the state directory: give it an absolute path.
    let image = std::fs::canonicalize(&args.image)
        .with_context(|| format!("no guest image at {}", args.image.display()))?;
    let work = PathBuf::from(WORK);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("state"))?;
    println!("starting Pebble (ACME test CA) and its DNS on the host …");
    let pebble = Pebble::start_for_vms(&work.join("pebble"), ACME_SUBNET)?;
    std::fs::write(
        work.join("state/launcher.toml"),
        pebble.launcher_toml(&image, DOMAIN, POOL, "nbdemo")?,
    )?;
    let mut demo = Demo {
        work: work.clone(),
        launcher: bin.join("nestbox-launcher"),
        name: args.name.clone(),
        created: false,
    };
    println!("booting VM {} (QEMU) …", demo.name);
    let started = Instant::now();
    print!("{}", demo.launcher(&["create", &demo.name.clone()])?);
    demo.created = true;
    let ip = demo.address()?;
    let vm = format!("{}.{DOMAIN}", demo.name);
    for host in [
        vm.clone(),
        format!("api.{vm}"),
        format!("8080.{vm}"),
        format!("3000.{vm}"),
    ] {
        pebble.add_a(&host, &ip)?;
    }
    let token = demo
        .launcher(&["token", &demo.name.clone()])?
        .trim()
        .to_owned();
    let root = pebble.issuing_root()?;
    let token_file = work.join("token");
    std::fs::write(&token_file, &token)?;
    let client = Client {
        root: root.clone(),
        ip: ip.clone(),
        token,
        api: format!("api.{vm}"),
    };
    wait_ready(&client, &over)?;
    println!(
        "the VM's API is up {:.1} s after create",
        started.elapsed().as_secs_f64()
    );
    let nestbox = bin.join("nestbox");
    cli_login(&nestbox, &demo.name, &ip, &vm, &token_file, &root)?;
    let mut events = client.stream("/v1/ports/events")?;
    client.post("/v1/services", WEB)?;
    print_how(&vm, &ip, &root, &token_file, &nestbox, &demo);
    println!();
    println!("port events (Ctrl-C destroys the VM):");
    let lines = events.stdout.take().context("event stream")?;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(lines).lines() {
            let Ok(line) = line else { break };
            println!("  {line}");
        }
    });
    let second_at = Instant::now() + Duration::from_secs(5);
    let mut second = false;
    while !over() {
        if !second && Instant::now() > second_at {
            second = true;
            client.post("/v1/services", SECOND)?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = events.kill();
    let _ = events.wait();
    drop(demo);
    drop(pebble);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The URL, and the commands that reach the VM, as printed.
fn print_how(
    vm: &str,
    ip: &str,
    root: &std::path::Path,
    token_file: &std::path::Path,
    nestbox: &std::path::Path,
    demo: &Demo,
) {
    println!();
    println!("your app: https://{vm}/  (private: URLs open to the VM's owner only)");
    println!(
        "try:      curl --cacert {} --resolve {vm}:443:{ip} -H \"Authorization: Bearer $(cat {})\" https://{vm}/",
        root.display(),
        token_file.display()
    );
    println!(
        "browser:  {} url {}   (a login link for your browser; `--auth public` opens the URL to anyone)",
        nestbox.display(),
        demo.name
    );
    println!("shell:    {} console {}", nestbox.display(), demo.name);
    println!(
        "run:      {} exec {} -- uname -a",
        nestbox.display(),
        demo.name
    );
    println!(
        "save:     {0} checkpoint create {1}   (then `{0} restore {1} v0` puts the files back)",
        nestbox.display(),
        demo.name
    );
    println!(
        "boot log: {} --state-dir {} logs {}",
        demo.launcher.display(),
        demo.work.join("state").display(),
        demo.name
    );
}

/// Has the CLI remember the VM (its address, the CA, the token), so the
/// commands the demo prints work as printed.
fn cli_login(
    nestbox: &std::path::Path,
    name: &str,
    ip: &str,
    vm: &str,
    token_file: &std::path::Path,
    root: &std::path::Path,
) -> Result<()> {
    let login = Command::new(nestbox)
        .args([
            "login",
            name,
            "--address",
            ip,
            "--host",
            &format!("api.{vm}"),
        ])
        .arg("--token-file")
        .arg(token_file)
        .arg("--ca")
        .arg(root)
        .output()
        .context("run nestbox login")?;
    anyhow::ensure!(
        login.status.success(),
        "nestbox login: {}",
        String::from_utf8_lossy(&login.stderr)
    );
    Ok(())
}

/// curl against the VM's API, through its HTTPS ingress.
struct Client {
    root: PathBuf,
    ip: String,
    token: String,
    api: String,
}

impl Client {
    fn curl(&self, path: &str) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--cacert"])
            .arg(&self.root)
            .args(["--resolve", &format!("{}:443:{}", self.api, self.ip)])
            .args(["-H", &format!("Authorization: Bearer {}", self.token)])
            .arg(format!("https://{}{path}", self.api));
        cmd
    }

    fn get(&self, path: &str) -> Option<String> {
        let out = self.curl(path).args(["--max-time", "10"]).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn post(&self, path: &str, json: &str) -> Result<()> {
        let out = self
            .curl(path)
            .args(["--max-time", "30", "-X", "POST"])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                json,
            ])
            .output()?;
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("\"name\"") {
            bail!(
                "POST {path}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn stream(&self, path: &str) -> Result<std::process::Child> {
        Ok(self.curl(path).arg("-N").stdout(Stdio::piped()).spawn()?)
    }
}

fn wait_ready(client: &Client, over: &dyn Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_mins(3);
    while !over() {
        if client
            .get("/v1/status")
            .is_some_and(|s| s.contains("\"running\""))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the VM's API did not come up within 3 minutes; see its console (logs)");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("stopped before the VM was ready")
}
