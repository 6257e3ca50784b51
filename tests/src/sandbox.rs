//! A network namespace + cgroup pair standing in for the inner container.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace (`/run/netns/NAME`) and a cgroup (`CGROUP2/NAME`),
/// removed on drop.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    cgroup: PathBuf,
}

impl Sandbox {
    /// Creates the pair; `tag` shows up in the names.
    ///
    /// # Errors
    /// If `ip` is missing, or the namespace or cgroup cannot be made.
    pub fn new(tag: &str) -> Result<Self> {
        crate::require_root();
        crate::require_tool("ip", "iproute2");
        let name = format!(
            "nbt-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mount = nestbox_guest::cgroup::cgroup2_mount()?;
        let cgroup = mount.join(&name);
        // Construct first so that Drop cleans up whatever part was made.
        let sandbox = Self { name, cgroup };
        run(Command::new("ip").args(["netns", "add", &sandbox.name]))?;
        run(Command::new("ip").args(["-n", &sandbox.name, "link", "set", "lo", "up"]))?;
        std::fs::create_dir(&sandbox.cgroup)
            .with_context(|| format!("mkdir {}", sandbox.cgroup.display()))?;
        Ok(sandbox)
    }

    /// The namespace file, `/run/netns/NAME`.
    #[must_use]
    pub fn netns(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The cgroup directory.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Creates a child cgroup `NAME` below the sandbox's and returns it.
    ///
    /// # Errors
    /// If mkdir fails.
    pub fn child_cgroup(&self, name: &str) -> Result<PathBuf> {
        let dir = self.cgroup.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    }

    /// Links the namespace to the caller's with a veth pair: `host_cidr` on
    /// the caller's side, `ns_cidr` inside (e.g. `10.201.3.1/24` and
    /// `10.201.3.2/24`). The pair goes away with the namespace.
    ///
    /// # Errors
    /// If `ip` fails.
    pub fn link_to_host(&self, host_cidr: &str, ns_cidr: &str) -> Result<()> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let host_if = format!("nbh{}x{n}", std::process::id() % 100_000);
        let ns_if = format!("nbn{}x{n}", std::process::id() % 100_000);
        run(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &self.name,
        ]))?;
        run(Command::new("ip").args(["addr", "add", host_cidr, "dev", &host_if]))?;
        run(Command::new("ip").args(["link", "set", &host_if, "up"]))?;
        run(Command::new("ip").args(["-n", &self.name, "addr", "add", ns_cidr, "dev", &ns_if]))?;
        run(Command::new("ip").args(["-n", &self.name, "link", "set", &ns_if, "up"]))?;
        Ok(())
    }

    /// Routes everything the namespace sends that is not on one of its links
    /// through `gateway` (the host's side of [`Sandbox::link_to_host`]).
    ///
    /// # Errors
    /// If `ip` fails.
    pub fn default_route(&self, gateway: &str) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name, "route", "add", "default", "via", gateway]))
    }

    /// A command that runs in the namespace and the sandbox's cgroup.
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_in(program, Some(&self.cgroup))
    }

    /// A command that runs in the namespace and in `cgroup` (or stays in the
    /// caller's cgroup when `None`).
    #[must_use]
    pub fn command_in(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        cgroup: Option<&Path>,
    ) -> Command {
        crate::require_tool("nsenter", "util-linux");
        // nsenter enters the namespace, then a shell joins the cgroup and
        // execs the program, so that the program's very first socket is
        // already in both. The caller's .arg()s land in "$@".
        let join = match cgroup {
            Some(dir) => format!("echo $$ > '{}/cgroup.procs' && exec \"$@\"", dir.display()),
            None => "exec \"$@\"".to_owned(),
        };
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns().display()))
            .args(["--", "sh", "-c", &join, "sh"])
            .arg(program);
        cmd
    }
}

impl Drop for Sandbox {
    /// Kills the cgroup's processes, removes its directories (deepest first)
    /// and deletes the namespace. Every step is tried; failures are printed
    /// together.
    fn drop(&mut self) {
        let mut errors = Vec::new();
        if self.cgroup.is_dir()
            && let Err(e) = kill_and_remove(&self.cgroup)
        {
            errors.push(format!("cgroup {}: {e:#}", self.cgroup.display()));
        }
        if self.netns().exists()
            && let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name]))
        {
            errors.push(format!("netns {}: {e:#}", self.name));
        }
        if !errors.is_empty() {
            eprintln!("sandbox cleanup left things behind: {}", errors.join("; "));
        }
    }
}

fn kill_and_remove(dir: &Path) -> Result<()> {
    // cgroup.kill (Linux 5.14) SIGKILLs the whole subtree at once.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"))
        .context("write cgroup.kill")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = nestbox_guest::cgroup::subtree_pids(dir)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} survived cgroup.kill");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_tree(dir)
}

fn remove_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
