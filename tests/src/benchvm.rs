//! A netns-simulated VM for the benchmarks: `nestbox-guest run` in a
//! network namespace of its own at [`VM_IP`], with a self-signed
//! certificate for `vm1.test`, `8080.vm1.test` and `api.vm1.test` (no
//! ACME), the container's layer on an ext4 disk of its own (as in a VM),
//! a busybox base with the `nb-escape` helper (and a 100 MB program,
//! `nb-big`) in `/bin`.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

/// The user's disk, as a VM has it: an ext4 filesystem of its own (a loop
/// device on a sparse file), mounted at `dir/user`. On the host's own
/// filesystem the container's layer would share a journal with everything
/// else the host writes, and unmounting the overlay at a bounce (which
/// syncs its upper filesystem) would wait for all of it.
///
/// # Errors
/// A failed `mkfs.ext4` or mount.
pub fn user_disk(dir: &Path) -> Result<()> {
    let image = dir.join("user.img");
    // Room for the surface bench's 1 GiB transfer (a sparse file).
    std::fs::File::create(&image)?.set_len(4 << 30)?;
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(&image))?;
    let mount = dir.join("user");
    std::fs::create_dir_all(&mount)?;
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mount))
}

impl Vm {
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
    user_disk(&dir)?;
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
