//! `nestbox-launcher`: the host side of nestbox. Per VM it makes a tap,
//! starts a VMM process and keeps a record file — and nothing else: there
//! is no daemon. Every command is a short process that takes the state
//! lock, reads the records, does its work and exits; the VMMs run on by
//! themselves.
//!
//! Concepts, one module each:
//! - [`config`] — `launcher.toml`;
//! - [`name`] — VM names (DNS labels);
//! - [`pool`] — the IPv4 pool and address allocation;
//! - [`image`] — the guest image (`manifest.json`);
//! - [`guest_config`] — the guest's configuration and its config disk;
//! - [`token`] — the VM's API token;
//! - [`net`] — tap (ioctl), addresses and routes (rtnetlink), nftables;
//! - [`vmm`] — the VMM trait, the QEMU backend, starting detached, QMP;
//! - [`state`] — the state directory, records, the lock, process identity.
//!
//! Verbs, one file each, as methods of [`Launcher`]: `create`, `start`,
//! `stop`, `destroy`, `list`, `logs` (plus `launch`, the VMM start shared
//! by `create` and `start`). They block; do not call them on an async
//! runtime's worker thread.
//!
//! ```no_run
//! # fn main() -> Result<(), nestbox_launcher::LauncherError> {
//! use nestbox_launcher::{CreateOptions, Launcher, vmm::stub::Stub};
//! let launcher = Launcher::open("/var/lib/nestbox".as_ref())?;
//! // A benchmark times create up to the VMM's exec with a stub command.
//! let created = launcher.create(&CreateOptions::new("bench-1"), &Stub::new("sleep", ["1000"]))?;
//! launcher.destroy("bench-1")?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod error;
pub mod guest_config;
pub mod image;
pub mod name;
pub mod net;
pub mod pool;
pub mod state;
pub mod token;
pub mod vmm;

mod create;
mod destroy;
mod launch;
mod list;
mod logs;
mod start;
mod stop;

use std::path::{Path, PathBuf};

pub use config::LauncherConfig;
pub use create::{CreateOptions, Created};
pub use error::LauncherError;
pub use list::ListedVm;
pub use state::status::VmState;
pub use stop::StopOutcome;

use name::VmName;
use state::lock::StateLock;
use state::record::VmRecord;
use state::{StateDir, VmDir};

/// Makes the sparse disk image `path` of `gib` GiB, or grows an existing
/// smaller one (never shrinks: that would cut a filesystem).
/// `[create, size]` say what failed.
fn sparse_disk(
    path: &Path,
    gib: u32,
    [create, size_it]: [&'static str; 2],
) -> Result<(), LauncherError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(LauncherError::file(create, path))?;
    let size = u64::from(gib) << 30;
    let len = file
        .metadata()
        .map_err(LauncherError::file("read the size of", path))?
        .len();
    if len < size {
        file.set_len(size)
            .map_err(LauncherError::file(size_it, path))?;
    }
    Ok(())
}

/// The launcher: a state directory and its configuration.
#[derive(Clone, Debug)]
pub struct Launcher {
    state: StateDir,
    config: LauncherConfig,
}

impl Launcher {
    /// Opens the state directory `state_dir` (created by the first
    /// `create`) and reads its `launcher.toml`.
    ///
    /// # Errors
    /// [`LauncherError::Config`] when the configuration is not valid.
    pub fn open(state_dir: &Path) -> Result<Self, LauncherError> {
        let state = StateDir::new(state_dir);
        let config = LauncherConfig::load(state.root())?;
        Ok(Self { state, config })
    }

    /// A launcher on `state_dir` with a given configuration (benchmarks and
    /// tests; `launcher.toml` is not read).
    #[must_use]
    pub fn with_config(state_dir: &Path, config: LauncherConfig) -> Self {
        Self {
            state: StateDir::new(state_dir),
            config,
        }
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &LauncherConfig {
        &self.config
    }

    /// The state directory.
    #[must_use]
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// The QEMU backend as configured (`qemu`, `accel`; probes the host).
    #[must_use]
    pub fn qemu(&self) -> vmm::qemu::Qemu {
        vmm::qemu::Qemu::new(&self.config.qemu, self.config.accel)
    }

    /// The API token of VM `name`.
    ///
    /// # Errors
    /// [`LauncherError::NotFound`], or the token file cannot be read.
    pub fn token(&self, name: &str) -> Result<String, LauncherError> {
        let (dir, _) = self.load(&VmName::new(name)?)?;
        Ok(token::read(&dir.token())?)
    }

    /// The path of the API token file of VM `name`.
    ///
    /// # Errors
    /// [`LauncherError::Name`] for a bad name.
    pub fn token_file(&self, name: &str) -> Result<PathBuf, LauncherError> {
        Ok(self.state.vm(&VmName::new(name)?).token())
    }

    /// Takes the state lock (making the state directory if needed).
    fn lock(&self) -> Result<StateLock, LauncherError> {
        self.state.ensure()?;
        Ok(state::lock::lock(&self.state.lock_file())?)
    }

    /// The directory and record of an existing VM.
    fn load(&self, name: &VmName) -> Result<(VmDir, VmRecord), LauncherError> {
        let dir = self.state.vm(name);
        match VmRecord::load(&dir)? {
            Some(record) => Ok((dir, record)),
            None if dir.path().exists() => Err(LauncherError::Incomplete(name.to_string())),
            None => Err(LauncherError::NotFound(name.to_string())),
        }
    }

    /// The network of the VM `record` describes.
    fn network<'a>(&'a self, record: &'a VmRecord) -> net::VmNetwork<'a> {
        net::VmNetwork {
            tap: &record.tap,
            tap_prefix: &self.config.tap_prefix,
            guest: record.address,
            host: record.host_address,
            egress: self.config.egress,
            pool: self.config.pool.to_string(),
            allow: &self.config.firewall.allow,
        }
    }

    /// Makes the data disk and the user disk (sparse; existing ones are
    /// kept, and grown if the size grew) and writes the config disk for
    /// `record`.
    fn write_disks(
        &self,
        dir: &VmDir,
        record: &VmRecord,
        token_sha256: &str,
    ) -> Result<(), LauncherError> {
        const DATA: [&str; 2] = ["create the data disk", "size the data disk"];
        const USER: [&str; 2] = ["create the user disk", "size the user disk"];
        // Checked at create.
        let from = record
            .from
            .as_deref()
            .and_then(|f| create::parse_from(f).ok());
        if record.user_disk {
            sparse_disk(&dir.data_disk(), self.config.platform_disk_gib, DATA)?;
            sparse_disk(&dir.user_disk(), record.disk_gib, USER)?;
        } else {
            sparse_disk(&dir.data_disk(), record.disk_gib, DATA)?;
        }
        let text = guest_config::render(
            &guest_config::GuestSettings {
                name: &record.name,
                domain: &self.config.domain,
                primary_port: record.primary_port,
                token_sha256,
                address: record.address,
                prefix_len: record.prefix_len,
                gateway: record.host_address,
                user_disk: record.user_disk,
                storage: self.config.storage.as_ref(),
                from,
            },
            &self.config.guest,
        );
        let config = dir.config_disk();
        nestbox_durable::write_atomic(&config, &guest_config::disk_image(&text), 0o600)
            .map_err(std::io::Error::from)
            .map_err(LauncherError::file("write the config disk", &config))
    }
}
