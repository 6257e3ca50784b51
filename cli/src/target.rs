//! Which VM a command means and how to reach its API: the per-user
//! configuration first; else, for a VM of this host's launcher (as root),
//! its record, its token and the launcher's domain — remembered then.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nestbox_api::client::{Client, Transport, roots_from_pem};

use crate::config::{self, Config, VmEntry};

/// The system's CA bundle (Debian's).
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The launcher's default state directory.
const STATE_DIR: &str = "/var/lib/nestbox";

/// Why a VM cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Not known.
    #[error(
        "no VM named {name:?} is known: create it (`nestbox create {name}`), or remember one made elsewhere (`nestbox login {name} --address IP --host api.{name}.DOMAIN --token-file FILE`); `nestbox list` shows this host's"
    )]
    Unknown {
        /// The name.
        name: String,
    },
    /// The launcher failed.
    #[error("{0}")]
    Launcher(#[from] nestbox_launcher::LauncherError),
    /// The configuration failed.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
}

/// The configuration and the launcher's state directory.
pub struct Context {
    /// The configuration directory.
    pub dir: PathBuf,
    /// The configuration.
    pub config: Config,
    /// The launcher's state directory.
    pub state_dir: PathBuf,
}

impl Context {
    /// Loads the configuration.
    ///
    /// # Errors
    /// [`TargetError::Config`].
    pub fn new(config_dir: Option<&Path>, state_dir: Option<&Path>) -> Result<Self, TargetError> {
        let dir = config::dir(config_dir);
        let config = Config::load(&dir)?;
        let state_dir = state_dir
            .map(Path::to_owned)
            .or_else(|| config.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(STATE_DIR));
        Ok(Self {
            dir,
            config,
            state_dir,
        })
    }

    /// The launcher of this host.
    ///
    /// # Errors
    /// [`TargetError::Launcher`].
    pub fn launcher(&self) -> Result<nestbox_launcher::Launcher, TargetError> {
        Ok(nestbox_launcher::Launcher::open(&self.state_dir)?)
    }

    /// The CA file for `entry`.
    fn ca(&self, entry: &VmEntry) -> PathBuf {
        entry
            .ca
            .clone()
            .or_else(|| self.config.ca.clone())
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA))
    }

    /// `name`'s entry: the configuration's, or made from this host's
    /// launcher (and remembered).
    ///
    /// # Errors
    /// [`TargetError`].
    pub fn entry(&mut self, name: &str) -> Result<VmEntry, TargetError> {
        if let Some(e) = self.config.vms.get(name) {
            return Ok(e.clone());
        }
        let unknown = || TargetError::Unknown {
            name: name.to_owned(),
        };
        let Ok(launcher) = self.launcher() else {
            return Err(unknown());
        };
        let listed = launcher.list().map_err(|_| unknown())?;
        let Some(record) = listed
            .into_iter()
            .find(|v| v.name == name)
            .and_then(|v| v.record)
        else {
            return Err(unknown());
        };
        let entry = VmEntry {
            host: format!("api.{name}.{}", launcher.config().domain),
            address: SocketAddr::from((record.address, 443)),
            ca: None,
            token: launcher.token(name)?,
        };
        self.remember(name, entry.clone())?;
        Ok(entry)
    }

    /// Remembers `entry` as `name`.
    ///
    /// # Errors
    /// [`TargetError::Config`].
    pub fn remember(&mut self, name: &str, entry: VmEntry) -> Result<(), TargetError> {
        self.config.vms.insert(name.to_owned(), entry);
        self.config.save(&self.dir)?;
        Ok(())
    }

    /// Forgets `name`.
    ///
    /// # Errors
    /// [`TargetError::Config`].
    pub fn forget(&mut self, name: &str) -> Result<(), TargetError> {
        if self.config.vms.remove(name).is_some() {
            self.config.save(&self.dir)?;
        }
        Ok(())
    }

    /// A client of `name`'s API.
    ///
    /// # Errors
    /// [`TargetError`], or the CA file's error.
    pub fn client(&mut self, name: &str) -> anyhow::Result<Client> {
        let entry = self.entry(name)?;
        let roots = roots_from_pem(&self.ca(&entry))?;
        Ok(Client::new(
            Transport::Tls {
                host: entry.host,
                addr: entry.address,
                roots,
            },
            entry.token,
        ))
    }
}
