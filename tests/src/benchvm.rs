//! A netns-simulated VM for the benchmarks: `nestbox-guest run` in a
//! network namespace of its own at [`VM_IP`], with a self-signed
//! certificate for `vm1.test`, `8080.vm1.test` and `api.vm1.test` (no
//! ACME), the container's layer on an ext4 disk of its own (as in a VM),
//! a busybox base with the `nb-escape` helper (and a 100 MB program,
//! `nb-big`) in `/bin`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Sandbox;

/// The VM's address.
pub const VM_IP: &str = "10.203.1.2";
/// Its API token.
pub const TOKEN: &str = "bench-token";

/// A running guest; stopped and removed on drop.
pub struct Vm {
    /// Its directory (configuration, rootfs, data, logs).
    pub dir: PathBuf,
    /// Its namespace.
    pub sandbox: Sandbox,
    /// The guest process.
    pub guest: Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.guest.id().to_string()])
            .status();
        let _ = self.guest.wait();
        let _ = Command::new("umount").arg(self.dir.join("user")).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The guest binary a bench runs: `given`, or the one next to the bench.
///
/// # Errors
/// The bench's own path is unknown.
pub fn guest_binary(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(path) => Ok(path.to_owned()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("nestbox-guest")),
    }
}

/// The filesystem of the user's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserFs {
    /// As older VMs had it (no checkpoints).
    Ext4,
    /// As VMs have it now: checkpoints are snapshots.
    Btrfs,
}

/// The user's disk, as a VM has it: an ext4 filesystem of its own (a loop
/// device on a sparse file), mounted at `dir/user`. On the host's own
/// filesystem the container's layer would share a journal with everything
/// else the host writes, and unmounting the overlay at a bounce (which
/// syncs its upper filesystem) would wait for all of it.
///
/// # Errors
/// A failed `mkfs.ext4` or mount.
pub fn user_disk(dir: &Path) -> Result<()> {
    // Room for the surface bench's 1 GiB transfer (a sparse file).
    user_disk_of(dir, UserFs::Ext4, 4 << 30)
}

/// [`user_disk`] with its filesystem and size.
///
/// # Errors
/// A failed mkfs or mount.
pub fn user_disk_of(dir: &Path, fs: UserFs, bytes: u64) -> Result<()> {
    let image = dir.join("user.img");
    std::fs::File::create(&image)?.set_len(bytes)?;
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    match fs {
        UserFs::Ext4 => run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image))?,
        UserFs::Btrfs => {
            crate::require_tool("mkfs.btrfs", "btrfs-progs");
            run(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&image))?;
        }
    }
    let mount = dir.join("user");
    std::fs::create_dir_all(&mount)?;
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mount))
}

/// One HTTPS GET of `/` on a new connection to the VM, as its owner (the
/// URL is private, the default); the status code.
#[must_use]
pub fn https_status(tls: &Arc<rustls::ClientConfig>, host: &str) -> Option<u16> {
    let tcp = TcpStream::connect((VM_IP, 443)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // As curl and browsers do: without it, Nagle's algorithm holds the
    // request back until the server's delayed ACK (40 ms).
    tcp.set_nodelay(true).ok()?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).ok()?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Waits (up to 30 s) until `https://vm1.test/` answers 200.
///
/// # Errors
/// It did not.
pub fn wait_ok(tls: &Arc<rustls::ClientConfig>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while https_status(tls, "vm1.test") != Some(200) {
        if Instant::now() > deadline {
            bail!("https://vm1.test/ did not answer 200");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The benches' web app: busybox httpd on 8080 (the primary URL), serving
/// the base's `/www`.
pub const WEB: &str = r#"{"name": "web", "cmd": "/bin/busybox", "args": ["httpd", "-f", "-p", "8080", "-h", "/www"], "http_port": 8080}"#;

impl Vm {
    /// Registers [`WEB`] and waits until `https://vm1.test/` serves it;
    /// returns the TLS client that reached it.
    ///
    /// # Errors
    /// The API's, or the URL never served.
    pub fn serve_web(&self) -> Result<Arc<rustls::ClientConfig>> {
        self.api("POST", "/v1/services", Some(WEB))?;
        let tls = self.tls()?;
        wait_ok(&tls)?;
        Ok(tls)
    }

    /// A TLS client trusting the VM's certificate.
    ///
    /// # Errors
    /// The certificate file's.
    pub fn tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &std::fs::read(self.dir.join("cert.pem"))?[..]) {
            roots.add(cert?)?;
        }
        Ok(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
        ))
    }

    /// A request to its API on its loopback port (inside its namespace).
    ///
    /// # Errors
    /// The request's failure.
    pub fn api(&self, method: &str, path: &str, json: Option<&str>) -> Result<String> {
        let mut cmd = self.sandbox.command_in("curl", None);
        cmd.args(["-sSf", "--max-time", "60", "-X", method])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
        if let Some(json) = json {
            cmd.args(["--data-binary", json]);
        }
        let out = cmd.arg(format!("http://127.0.0.1:7070{path}")).output()?;
        if !out.status.success() {
            bail!(
                "API {method} {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The guest's configuration: the user's layer in `dir/user`, and `extra`
/// tables at the end.
///
/// # Errors
/// The certificate's or a file's error.
pub fn write_config(dir: &Path, extra: &str) -> Result<PathBuf> {
    let key = rcgen::KeyPair::generate()?;
    let names = ["vm1.test", "8080.vm1.test", "api.vm1.test"].map(str::to_owned);
    let cert = rcgen::CertificateParams::new(names.to_vec())?.self_signed(&key)?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    let hash = Command::new("sh")
        .args(["-c", &format!("printf %s {TOKEN} | sha256sum")])
        .output()?;
    let hash = String::from_utf8(hash.stdout)?;
    let mut text = String::new();
    let _ = write!(
        text,
        "name = \"vm1\"\ndomain = \"test\"\ndata_dir = \"{0}/data\"\nbase_rootfs = \"{0}/rootfs\"\n\
         user_dir = \"{0}/user\"\n\
         [api]\ntoken_sha256 = \"{1}\"\n[ingress]\nhttps = \"0.0.0.0:443\"\nhttp = \"0.0.0.0:80\"\n\
         [[ingress.certificate]]\nnames = [\"vm1.test\", \"8080.vm1.test\", \"api.vm1.test\"]\n\
         cert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n{2}\n",
        dir.display(),
        &hash[..64],
        extra
    );
    let path = dir.join("guest.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts a guest in a netns-simulated VM; `extra` goes at the end of its
/// configuration.
///
/// # Errors
/// Why the guest did not start.
pub fn start(bin: &Path, extra: &str) -> Result<Vm> {
    start_in(&std::env::temp_dir(), bin, extra)
}

/// [`start`] with the VM's directory, and with it its disks' images, under
/// `base` (`/dev/shm`: disks in RAM, whose speed does not depend on what
/// the machine wrote a minute before).
///
/// # Errors
/// Why the guest did not start.
pub fn start_in(base: &Path, bin: &Path, extra: &str) -> Result<Vm> {
    start_on(base, bin, extra, UserFs::Ext4, 4 << 30)
}

/// [`start_in`] with the user's disk's filesystem and size.
///
/// # Errors
/// Why the guest did not start.
pub fn start_on(base: &Path, bin: &Path, extra: &str, fs: UserFs, disk_bytes: u64) -> Result<Vm> {
    let dir = base.join(format!("nestbox-bench-guest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rootfs = dir.join("rootfs");
    crate::busybox_rootfs(&rootfs);
    // The system call loop, owned like the rest of the base by the
    // container's root.
    let helper = rootfs.join("bin/nb-escape");
    std::fs::copy(crate::vms::NB_ESCAPE, &helper)?;
    std::os::unix::fs::lchown(&helper, Some(100_000), Some(100_000))?;
    // A 100 MB program: the helper with 100 MB of data after it (an ELF
    // file's loader ignores what follows its segments).
    let big = rootfs.join("bin/nb-big");
    {
        let mut f = std::fs::File::create(&big)?;
        f.write_all(&std::fs::read(crate::vms::NB_ESCAPE)?)?;
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..100 {
            f.write_all(&chunk)?;
        }
    }
    std::fs::set_permissions(&big, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::os::unix::fs::lchown(&big, Some(100_000), Some(100_000))?;
    user_disk_of(&dir, fs, disk_bytes)?;
    let config = write_config(&dir, extra)?;
    let sandbox = Sandbox::new("benchvm")?;
    sandbox.link_to_host("10.203.1.1/24", &format!("{VM_IP}/24"))?;
    let guest = sandbox
        .command(bin)
        .args(["run", "--config"])
        .arg(&config)
        // NB_GUEST_LOG overrides, to look into a bounce's timeline.
        .env(
            "RUST_LOG",
            std::env::var("NB_GUEST_LOG").unwrap_or_else(|_| "warn,nestbox_guest::run=info".into()),
        )
        .stderr(std::fs::File::create(dir.join("guest.log"))?)
        .spawn()
        .context("start nestbox-guest")?;
    let vm = Vm {
        dir,
        sandbox,
        guest,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm
        .api("GET", "/v1/status", None)
        .is_ok_and(|s| s.contains("\"running\""))
    {
        if Instant::now() > deadline {
            bail!(
                "the guest did not start: {}",
                std::fs::read_to_string(vm.dir.join("guest.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(vm)
}
