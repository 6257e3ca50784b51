//! The per-user configuration, `~/.config/nestbox/config.toml` (or
//! `$NESTBOX_CONFIG_DIR`, or `--config-dir`): where each VM's API is, the
//! CA its certificates chain to, and its token — so `nestbox exec web -- …`
//! needs nothing else. Written atomically, readable by its owner only (it
//! holds tokens).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `config.toml`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The launcher's state directory, for `create`, `list`, `destroy` and
    /// VMs not listed here (default `/var/lib/nestbox`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// The CA file VMs' certificates chain to when a VM names none
    /// (default: the system's, `/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Each VM, by name.
    #[serde(default)]
    pub vms: BTreeMap<String, VmEntry>,
}

/// One VM's API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// Its API's host name (`api.NAME.DOMAIN`), checked in its certificate.
    pub host: String,
    /// Where to connect (its address and port 443).
    pub address: std::net::SocketAddr,
    /// The CA its certificate chains to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Its API token.
    pub token: String,
}

/// Errors of the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid.
    #[error("{path} is not a valid nestbox configuration: {why} (fix or remove it)")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The configuration directory: `--config-dir`, `$NESTBOX_CONFIG_DIR`,
/// `$XDG_CONFIG_HOME/nestbox`, `~/.config/nestbox`.
#[must_use]
pub fn dir(flag: Option<&Path>) -> PathBuf {
    if let Some(d) = flag {
        return d.to_owned();
    }
    if let Some(d) = std::env::var_os("NESTBOX_CONFIG_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(d).join("nestbox");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".config/nestbox")
}

impl Config {
    /// Reads `dir/config.toml` (an empty configuration if there is none).
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                path,
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Io { path, source }),
        }
    }

    /// Writes `dir/config.toml` atomically, mode 0600.
    ///
    /// # Errors
    /// [`ConfigError::Io`].
    pub fn save(&self, dir: &Path) -> Result<(), ConfigError> {
        let path = dir.join("config.toml");
        let io = |source| ConfigError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let text = toml::to_string_pretty(self).expect("the configuration serializes");
        nestbox_durable::write_atomic(&path, text.as_bytes(), 0o600)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_configuration_loads_back_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nestbox-cli-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Config::load(&dir).unwrap().vms.is_empty());
        let mut c = Config::default();
        c.vms.insert(
            "web".into(),
            VmEntry {
                host: "api.web.test".into(),
                address: "10.0.0.2:443".parse().unwrap(),
                ca: Some("/tmp/ca.pem".into()),
                token: "secret".into(),
            },
        );
        c.save(&dir).unwrap();
        let back = Config::load(&dir).unwrap();
        assert_eq!(back.vms, c.vms);
        let mode = std::fs::metadata(dir.join("config.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join("config.toml"), "bogus = 1").unwrap();
        assert!(Config::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
