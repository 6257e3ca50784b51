//! The guest's configuration: one TOML document, read at start and checked
//! before anything runs, with errors that name the field.
//!
//! ```toml
//! name = "vm1"                 # the VM's name: https://vm1.test/
//! domain = "test"
//! primary_port = 8080          # served at https://<name>.<domain>/
//! data_dir = "/data"           # the platform's disk: services, logs, certificates
//! user_dir = "/user"           # the user's disk: the container's writable layer
//! base_rootfs = "/rootfs"      # the inner container's read-only base
//!
//! [limits]                     # what the container may use (see resources.rs)
//! pids_max = 1024
//!
//! [container]                  # how it is confined
//! shm_mib = 64
//!
//! [checkpoints]                # scheduled ones (see storage/checkpoints.rs)
//! auto_interval_secs = 0       # 0: none; else auto-N every so many seconds
//! auto_keep = 3                # the scheduled ones kept
//!
//! [urls]                      # URL auth (see urls.rs)
//! default_auth = "private"     # private | public | token
//!
//! [api]
//! token_sha256 = "…64 hex digits…"   # sha256 of the bearer token
//!
//! [ingress]                    # nestbox-ingress's own configuration
//! https = "0.0.0.0:443"
//! [ingress.acme]
//! directory = "https://acme-v02.api.letsencrypt.org/directory"
//! state_dir = "/data/acme"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("the configuration {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, naming the line and field.
        source: toml::de::Error,
    },
    /// A field has a value that cannot work.
    #[error("the configuration {path}: `{field}` {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, as written in the file.
        field: &'static str,
        /// What is wrong and what is expected.
        why: String,
    },
    /// The ingress part is not valid (the message names the file).
    #[error("table [ingress]: {0}")]
    Ingress(#[source] Box<nestbox_ingress::config::ConfigError>),
}

/// The whole document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// The VM's name, a DNS label: its URL is `https://<name>.<domain>/`.
    pub name: String,
    /// The domain the VM's names live under.
    pub domain: String,
    /// The port whose listener is the VM's primary URL.
    #[serde(default = "default_primary_port")]
    pub primary_port: u16,
    /// The data directory (the platform's disk): service definitions, logs,
    /// certificates. Created if missing. Nothing in the container can
    /// write to it.
    pub data_dir: PathBuf,
    /// Where the container's writable layer lives (`upper`, `work`): the
    /// user's disk, so that a full one stops the user and never the
    /// platform. Default: `<data_dir>/container`, on the platform's disk
    /// (outside a VM, or a VM made before it had a user disk).
    pub user_dir: Option<PathBuf>,
    /// The inner container's read-only base root filesystem.
    pub base_rootfs: PathBuf,
    /// The VM's own API.
    pub api: ApiConfig,
    /// As PID 1: the VM's interface (address, gateway), set with rtnetlink.
    pub network: Option<crate::init::Network>,
    /// As PID 1: the data disk's block device, mounted on `data_dir`
    /// (formatted ext4 on first boot).
    pub data_device: Option<PathBuf>,
    /// As PID 1: the user's disk, mounted on `user_dir` (formatted ext4 on
    /// first boot). Needs `user_dir`.
    pub user_device: Option<PathBuf>,
    /// The inner container's resource limits, and the platform's reserve.
    #[serde(default)]
    pub limits: crate::resources::Limits,
    /// How the inner container's processes are confined.
    #[serde(default)]
    pub container: crate::container::Settings,
    /// The inner container's way out (veth + NAT); on by default.
    #[serde(default)]
    pub egress: crate::container::egress::Egress,
    /// The services' logs: file sizes, rates, and how often they are
    /// synced to the disk.
    #[serde(default)]
    pub logs: crate::logs::LogLimits,
    /// Exec sessions: how much of their output is kept for a reattach, how
    /// long ended ones stay, how many at once.
    #[serde(default)]
    pub exec: crate::exec::ExecSettings,
    /// URL auth: the mode of a port nobody has set (private), where a
    /// browser without credentials goes, how long a login lasts.
    #[serde(default)]
    pub urls: crate::urls::UrlSettings,
    /// Checkpoints of the user's filesystem: scheduled ones (off by
    /// default) and how many of those are kept.
    #[serde(default)]
    pub checkpoints: crate::storage::checkpoints::Settings,
    /// The object store checkpoints are uploaded to (and a new VM's disk
    /// built from): a directory on the user's disk by default. Its
    /// credentials stay in the platform: nothing in the container can read
    /// them.
    #[serde(default)]
    pub storage: crate::storage::remote::Settings,
    /// The HTTPS proxy: listeners, certificates (ACME or files), limits.
    /// Routes are made by the guest as ports open; static ones may be
    /// added here too.
    #[serde(default = "default_ingress")]
    pub ingress: nestbox_ingress::config::Config,
}

/// The API's settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// SHA-256 of the bearer token, 64 hex digits (`printf %s "$TOKEN" |
    /// sha256sum`). The token itself is never stored in the VM.
    pub token_sha256: String,
    /// Where the API listens in the root namespace; ingress routes
    /// `api.<name>.<domain>` here.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
}

fn default_primary_port() -> u16 {
    8080
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}

fn default_ingress() -> nestbox_ingress::config::Config {
    toml::from_str("").expect("the ingress configuration has defaults for every field")
}

/// Whether `label` is a DNS label: 1–63 of `a-z0-9-`, not starting or
/// ending with `-`.
#[must_use]
pub fn is_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

impl GuestConfig {
    /// Reads and checks the configuration at `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // A config disk holds the document followed by NUL padding.
        if let Some(end) = bytes.iter().position(|&b| b == 0) {
            bytes.truncate(end);
        }
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text` (read from `path`, for messages).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, why: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            why: why.to_owned(),
        };
        if !is_dns_label(&self.name) {
            return Err(invalid(
                "name",
                "must be a DNS label: 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
            ));
        }
        if self.domain.is_empty() || !self.domain.split('.').all(is_dns_label) {
            return Err(invalid(
                "domain",
                "must be a domain name of DNS labels (a-z, 0-9, '-') separated by dots",
            ));
        }
        if self.primary_port == 0 {
            return Err(invalid("primary_port", "must be a port from 1 to 65535"));
        }
        for (field, dir) in [
            ("data_dir", Some(&self.data_dir)),
            ("base_rootfs", Some(&self.base_rootfs)),
            ("user_dir", self.user_dir.as_ref()),
        ] {
            if dir.is_some_and(|d| !d.is_absolute()) {
                return Err(invalid(field, "must be an absolute path"));
            }
        }
        if self.user_device.is_some() && self.user_dir.is_none() {
            return Err(invalid(
                "user_device",
                "needs `user_dir`, where the user's disk is mounted",
            ));
        }
        if let Err((field, why)) = self.limits.check() {
            return Err(invalid(field, why));
        }
        if let Some(url) = &self.urls.login_url
            && !url.starts_with("https://")
        {
            return Err(invalid("urls.login_url", "must be an https:// URL"));
        }
        if self.container.shm_mib == 0 {
            return Err(invalid("container.shm_mib", "must be at least 1"));
        }
        let hash = &self.api.token_sha256;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "api.token_sha256",
                "must be the SHA-256 of the token as 64 hex digits (printf %s \"$TOKEN\" | sha256sum)",
            ));
        }
        self.ingress
            .check(path)
            .map_err(|e| ConfigError::Ingress(Box::new(e)))
    }

    /// The VM's names (`<name>.<domain>`, `<port>.<name>.<domain>`).
    #[must_use]
    pub fn names(&self) -> crate::publish::Names {
        crate::publish::Names {
            name: self.name.clone(),
            domain: self.domain.clone(),
        }
    }

    /// The API's host name.
    #[must_use]
    pub fn api_host(&self) -> String {
        format!("api.{}.{}", self.name, self.domain)
    }

    /// Where the container's writable layer lives.
    #[must_use]
    pub fn user_dir(&self) -> PathBuf {
        self.user_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("container"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn parse(text: &str) -> Result<GuestConfig, ConfigError> {
        GuestConfig::parse(text, Path::new("guest.toml"))
    }

    fn minimal(extra: &str) -> String {
        format!(
            "name = \"vm1\"\ndomain = \"test\"\ndata_dir = \"/data\"\nbase_rootfs = \"/rootfs\"\n{extra}\n\
             [api]\ntoken_sha256 = \"{HASH}\"\n\
             [ingress.acme]\ndirectory = \"https://ca.test/dir\"\nstate_dir = \"/data/acme\"\n"
        )
    }

    #[test]
    fn minimal_config_has_working_defaults() {
        let c = parse(&minimal("")).unwrap();
        assert_eq!(c.primary_port, 8080);
        assert_eq!(c.names().vm_host(), "vm1.test");
        assert_eq!(c.names().port_host(3000), "3000.vm1.test");
        assert_eq!(c.api_host(), "api.vm1.test");
        assert_eq!(c.api.listen, default_api_listen());
        assert_eq!(c.ingress.https.port(), 443);
        assert_eq!(c.user_dir(), Path::new("/data/container"));
        assert_eq!(c.limits, crate::resources::Limits::default());
        assert!(c.container.seccomp && !c.container.no_new_privs);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (minimal("").replace("vm1", "VM_1"), "`name`"),
            (minimal("").replace("\"test\"", "\"a..b\""), "`domain`"),
            (minimal("primary_port = 0"), "`primary_port`"),
            (minimal("").replace("\"/data\"", "\"data\""), "`data_dir`"),
            (minimal("").replace(HASH, "abc"), "`api.token_sha256`"),
            (minimal("user_dir = \"user\""), "`user_dir`"),
            (minimal("user_device = \"/dev/vdc\""), "`user_device`"),
            (minimal("[limits]\npids_max = 1"), "`limits.pids_max`"),
            (minimal("[container]\nshm_mib = 0"), "`container.shm_mib`"),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let err = parse(&minimal("colour = 1")).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
        let err = parse(&minimal("").replace(
            "[ingress.acme]",
            "[ingress]\nhttps = \"nope\"\n[ingress.acme]",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("https"), "{err}");
        let no_certificates = minimal("").replace("[ingress.acme]", "[x]");
        let err = parse(no_certificates.split("[x]").next().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("[ingress]") && err.contains("acme"), "{err}");
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "vm-1", "0", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
