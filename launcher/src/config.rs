//! The launcher's configuration: `launcher.toml` in the state directory.
//! Every field is optional and the defaults work on a host with the guest
//! image installed; the file is checked before anything is touched, and
//! errors name the field.
//!
//! ```toml
//! image = "/usr/share/nestbox/image"   # holds manifest.json
//! domain = "nestbox.test"              # https://NAME.nestbox.test/
//! pool = "10.123.0.0/16"               # host 10.123.0.1, guests .2, .3, …
//! tap_prefix = "nb"                    # taps nb2, nb3, …
//! memory_mib = 512
//! cpus = 1
//! disk_gib = 1                         # the user's disk (the container's files)
//! platform_disk_gib = 1                # the platform's disk (services, logs, certificates)
//! qemu = "qemu-system-x86_64"
//! accel = "auto"                       # or "kvm", "tcg"
//! egress = true                        # NAT for the guests' own traffic
//! mitigations = true                   # false: the guest kernel boots with mitigations=off
//!
//! [firewall]
//! allow = ["10.99.0.0/24"]             # private prefixes VMs may reach all the same
//!
//! [storage]                            # where checkpoints are kept off the VM
//! url = "s3://bucket/nestbox"          # each VM under its own prefix: s3://bucket/nestbox/NAME
//! endpoint = "http://10.99.0.2:8333"   # an S3 server (default: AWS)
//! access_key_id = "…"
//! secret_access_key = "…"
//! allow_http = true
//!
//! [guest]                              # merged into every guest's configuration
//! [guest.ingress.acme]
//! directory = "https://acme.example/directory"
//! state_dir = "/data/acme"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::net::prefix::Ipv4Prefix;
use crate::pool::Pool;
use crate::vmm::accel::AccelSetting;

/// The configuration file's name in the state directory.
pub const FILE: &str = "launcher.toml";

/// Errors reading `launcher.toml`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema (unknown fields included).
    #[error("the configuration {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, naming the line and field.
        source: toml::de::Error,
    },
    /// A field whose value cannot work.
    #[error("the configuration {path}: `{field}` {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, as written in the file.
        field: String,
        /// What is wrong and what is expected.
        why: String,
    },
}

/// `launcher.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LauncherConfig {
    /// The guest image: a directory with `manifest.json`, the kernel and
    /// the initramfs (`cargo xtask image` makes one). A relative path is
    /// taken from the state directory.
    pub image: PathBuf,
    /// The domain VM names live under: VM `web` is `https://web.DOMAIN/`
    /// and its API `https://api.web.DOMAIN/v1/`.
    pub domain: String,
    /// The IPv4 network VM addresses come from, in CIDR form. The host
    /// takes its first address (on every tap); VMs get the next free ones.
    pub pool: Pool,
    /// Tap devices are named this prefix followed by the VM's address index
    /// (`nb2`, `nb3`, …); the whole name must fit Linux's 15 characters.
    /// Traffic between taps of this prefix is dropped (tenant isolation).
    pub tap_prefix: String,
    /// A VM's memory in MiB, unless `create --memory` says otherwise.
    pub memory_mib: u32,
    /// A VM's virtual CPUs, unless `create --cpus` says otherwise.
    pub cpus: u8,
    /// The size of a VM's user disk in GiB (a sparse file holding the
    /// inner container's writable layer), unless `create --disk-size` says
    /// otherwise.
    pub disk_gib: u32,
    /// The size of a VM's platform disk in GiB (a sparse file: service
    /// definitions, logs, certificates; the user cannot write to it).
    pub platform_disk_gib: u32,
    /// The QEMU binary (a name looked up in `PATH`, or a path).
    pub qemu: PathBuf,
    /// Acceleration: `auto` uses KVM only when this host can really run the
    /// guest with it (CPU virtualization flags and a working `/dev/kvm`),
    /// else TCG; `kvm` and `tcg` force one.
    pub accel: AccelSetting,
    /// Whether guests reach beyond the host: IPv4 forwarding plus a
    /// masquerade rule for each VM's address.
    pub egress: bool,
    /// Whether the guest kernel keeps its CPU vulnerability mitigations
    /// (Spectre, Meltdown, …). `false` boots it with `mitigations=off`:
    /// a little faster, and a weaker boundary between the user's code and
    /// the platform inside each VM.
    pub mitigations: bool,
    /// The firewall on each VM's tap (default deny; see `net::nft`).
    pub firewall: Firewall,
    /// `[storage]`: the object store each VM's checkpoints are uploaded
    /// to, under `url/NAME`; also what `create --from` reads. Its other
    /// keys (`endpoint`, `region`, `access_key_id`, `secret_access_key`,
    /// `allow_http`, `full_every`, `parallel`) go to the guest as they are.
    /// None: each VM keeps its uploads on its own user disk.
    pub storage: Option<toml::Table>,
    /// A TOML table merged into every guest's configuration as it is (for
    /// example `[guest.ingress]` and `[guest.ingress.acme]`). The keys the
    /// launcher sets itself (`name`, `domain`, `primary_port`, `data_dir`,
    /// `base_rootfs`, `data_device`, `api.token_sha256`, `network`) may not
    /// appear here.
    pub guest: toml::Table,
}

/// `[firewall]`: what VMs may reach besides the internet.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Firewall {
    /// IPv4 prefixes VMs may reach although they are private, link-local or
    /// otherwise refused (an ACME server or a package mirror on the LAN).
    /// Other VMs stay unreachable whatever this says.
    pub allow: Vec<Ipv4Prefix>,
}

impl Default for LauncherConfig {
    fn default() -> Self {
        Self {
            image: PathBuf::from("/usr/share/nestbox/image"),
            domain: "nestbox.test".into(),
            pool: "10.123.0.0/16".parse().expect("the default pool parses"),
            tap_prefix: "nb".into(),
            memory_mib: 512,
            cpus: 1,
            disk_gib: 1,
            platform_disk_gib: 1,
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: AccelSetting::Auto,
            egress: true,
            mitigations: true,
            firewall: Firewall::default(),
            storage: None,
            guest: toml::Table::new(),
        }
    }
}

impl LauncherConfig {
    /// Reads `launcher.toml` from `state_dir` (the defaults when there is
    /// none) and checks it.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the field.
    pub fn load(state_dir: &Path) -> Result<Self, ConfigError> {
        let path = state_dir.join(FILE);
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let config = Self::default();
                config.check(&path)?;
                config
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        if config.image.is_relative() {
            config.image = state_dir.join(&config.image);
        }
        Ok(config)
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
        let invalid = |field: &str, why: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            why,
        };
        if !crate::name::is_domain(&self.domain) {
            return Err(invalid(
                "domain",
                "must be DNS labels (a-z, 0-9, '-') joined by dots, e.g. \"nestbox.test\"".into(),
            ));
        }
        if self.tap_prefix.is_empty()
            || !self
                .tap_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "tap_prefix",
                "must be letters, digits, '-' or '_' (e.g. \"nb\")".into(),
            ));
        }
        let longest = self.tap_prefix.len() + self.pool.last_index().to_string().len();
        if longest > 15 {
            return Err(invalid(
                "tap_prefix",
                format!(
                    "is too long for the pool {}: tap names would reach {longest} characters and Linux allows 15; shorten the prefix or the pool",
                    self.pool
                ),
            ));
        }
        if self.memory_mib < 64 {
            return Err(invalid("memory_mib", "must be at least 64".into()));
        }
        if self.cpus == 0 {
            return Err(invalid("cpus", "must be at least 1".into()));
        }
        if self.disk_gib == 0 {
            return Err(invalid("disk_gib", "must be at least 1".into()));
        }
        if self.platform_disk_gib == 0 {
            return Err(invalid("platform_disk_gib", "must be at least 1".into()));
        }
        if let Some(storage) = &self.storage {
            crate::guest_config::check_storage(storage)
                .map_err(|(key, why)| invalid(&format!("storage.{key}"), why))?;
        }
        crate::guest_config::check_template(&self.guest).map_err(|key| {
            invalid(
                &format!("guest.{key}"),
                "is set by the launcher for each VM: remove it from [guest]".into(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LauncherConfig, ConfigError> {
        LauncherConfig::parse(text, Path::new("launcher.toml"))
    }

    #[test]
    fn an_empty_file_has_working_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.image, Path::new("/usr/share/nestbox/image"));
        assert_eq!(c.domain, "nestbox.test");
        assert_eq!(c.pool.to_string(), "10.123.0.0/16");
        assert_eq!(c.tap_prefix, "nb");
        assert_eq!((c.memory_mib, c.cpus, c.disk_gib), (512, 1, 1));
        assert_eq!(c.qemu, Path::new("qemu-system-x86_64"));
        assert_eq!(c.accel, AccelSetting::Auto);
        assert!(c.egress);
        assert!(c.mitigations);
        assert_eq!(c.platform_disk_gib, 1);
        assert!(c.firewall.allow.is_empty());
        assert!(c.guest.is_empty());
    }

    #[test]
    fn a_missing_file_means_the_defaults_and_relative_images_follow_the_state_dir() {
        let dir = std::env::temp_dir().join(format!("nb-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = LauncherConfig::load(&dir).unwrap();
        assert_eq!(c.domain, "nestbox.test");
        std::fs::write(dir.join(FILE), "image = \"img\"\n").unwrap();
        let c = LauncherConfig::load(&dir).unwrap();
        assert_eq!(c.image, dir.join("img"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_field_can_be_set() {
        let c = parse(
            "image = \"/img\"\ndomain = \"test\"\npool = \"10.211.0.0/24\"\ntap_prefix = \"nbt\"\n\
             memory_mib = 256\ncpus = 2\ndisk_gib = 3\nplatform_disk_gib = 2\nqemu = \"/bin/q\"\naccel = \"tcg\"\negress = false\n\
             mitigations = false\n[firewall]\nallow = [\"10.99.0.0/24\", \"192.0.2.7/32\"]\n\
             [guest.ingress.acme]\ndirectory = \"https://ca.test/dir\"\n",
        )
        .unwrap();
        assert!(!c.mitigations);
        assert_eq!(c.platform_disk_gib, 2);
        assert_eq!(c.firewall.allow.len(), 2);
        assert_eq!(c.pool.host_address().to_string(), "10.211.0.1");
        assert_eq!(c.accel, AccelSetting::Tcg);
        assert!(!c.egress);
        assert_eq!(
            c.guest["ingress"]["acme"]["directory"].as_str(),
            Some("https://ca.test/dir")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("colour = 1", "colour"),
            ("pool = \"10.0.0.1/8\"", "did you mean 10.0.0.0/8"),
            ("pool = \"nope\"", "CIDR"),
            ("domain = \"a..b\"", "`domain`"),
            ("tap_prefix = \"a*\"", "`tap_prefix`"),
            ("tap_prefix = \"abcdefghijk\"", "15"),
            ("memory_mib = 10", "`memory_mib`"),
            ("cpus = 0", "`cpus`"),
            ("disk_gib = 0", "`disk_gib`"),
            ("platform_disk_gib = 0", "`platform_disk_gib`"),
            (
                "[firewall]\nallow = [\"10.99.0.1/24\"]",
                "did you mean 10.99.0.0/24",
            ),
            ("[firewall]\nallow = [\"fd00::/8\"]", "IPv6"),
            ("[firewall]\ndeny = []", "deny"),
            ("accel = \"fast\"", "accel"),
            ("[guest]\nname = \"x\"", "`guest.name`"),
            (
                "[guest.api]\ntoken_sha256 = \"x\"",
                "`guest.api.token_sha256`",
            ),
            ("[guest.network]\naddress = \"1.2.3.4\"", "`guest.network`"),
            ("[guest.storage]\nurl = \"s3://b/p\"", "`guest.storage`"),
            ("[storage]\nendpoint = \"http://x\"", "`storage.url`"),
            ("[storage]\nurl = \"ftp://b/p\"", "`storage.url`"),
            ("[storage]\nurl = \"s3://b/p\"\nfrom = {}", "`storage.from`"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        // A /16 with the default prefix fits; a long prefix with a /8 does not.
        assert!(parse("tap_prefix = \"abcdefghij\"\npool = \"10.1.0.0/24\"").is_ok());
        assert!(parse("tap_prefix = \"abcdefghij\"\npool = \"10.0.0.0/8\"").is_err());
    }
}
