//! Create: a new VM from its name. Under the state lock: clean up what an
//! interrupted create or destroy of the same name left, allocate an
//! address, write the record (phase "creating") *before* anything else
//! exists, then token, network, disks and the VMM — each step idempotent.
//! A create that fails undoes what it did; one that is killed leaves a
//! record that the next `create` or `destroy` of the name cleans up.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::image::Image;
use crate::name::VmName;
use crate::state::VmDir;
use crate::state::record::{Phase, VmRecord};
use crate::vmm::Vmm;
use crate::{Launcher, LauncherError, token};

/// What `create` is asked for; unset sizes come from `launcher.toml`.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// The VM's name (a DNS label).
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: Option<u32>,
    /// Virtual CPUs.
    pub cpus: Option<u8>,
    /// The port served at `https://NAME.DOMAIN/` (8080 if unset).
    pub primary_port: Option<u16>,
    /// The user disk's size in GiB.
    pub disk_gib: Option<u32>,
    /// Build the user's disk from a checkpoint in the object store:
    /// `BUCKET/PREFIX@ID` (a VM's prefix, e.g. `bucket/nestbox/web@v3`).
    pub from: Option<String>,
}

/// `--from BUCKET/PREFIX@ID`: the prefix and the checkpoint.
pub(crate) fn parse_from(from: &str) -> Result<(&str, &str), LauncherError> {
    let bad = LauncherError::Option {
        flag: "--from",
        why: "must be BUCKET/PREFIX@ID, a VM's prefix in the object store and one of its \
              checkpoints (e.g. bucket/nestbox/web@v3)",
    };
    let Some((prefix, id)) = from.rsplit_once('@') else {
        return Err(bad);
    };
    let id_ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if prefix.trim_matches('/').is_empty() || !id_ok {
        return Err(bad);
    }
    Ok((prefix, id))
}

impl CreateOptions {
    /// A VM called `name` with the configured sizes.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }
}

/// A created (and running) VM.
#[derive(Clone, Debug)]
pub struct Created {
    /// Its record.
    pub record: VmRecord,
    /// Its primary URL, `https://NAME.DOMAIN/`.
    pub url: String,
    /// Its API, `https://api.NAME.DOMAIN/v1/`.
    pub api_url: String,
    /// The file holding its API token.
    pub token_file: PathBuf,
    /// Why it got its acceleration.
    pub accel_why: String,
}

/// A new VM's sizes.
#[derive(Debug)]
struct Sizes {
    memory_mib: u32,
    cpus: u8,
    primary_port: u16,
    disk_gib: u32,
}

/// The primary port when `create` does not say.
const DEFAULT_PRIMARY_PORT: u16 = 8080;

/// The guest's MAC address: a locally administered prefix (`02:6e:62`,
/// "nb") and the address's last three octets, so it is unique in the pool.
#[must_use]
pub fn mac_for(address: std::net::Ipv4Addr) -> String {
    let [_, b, c, d] = address.octets();
    format!("02:6e:62:{b:02x}:{c:02x}:{d:02x}")
}

impl Launcher {
    /// Creates and starts VM `opts.name` with `vmm`.
    ///
    /// # Errors
    /// Refusals (bad name or option, existing name, full pool, no image)
    /// before anything is touched; otherwise the failing step, after the
    /// VM's resources were removed again ([`LauncherError::Leftovers`] if
    /// that failed too).
    pub fn create(&self, opts: &CreateOptions, vmm: &dyn Vmm) -> Result<Created, LauncherError> {
        let name = VmName::new(&opts.name)?;
        let sizes = self.sizes(opts)?;
        if let Some(from) = &opts.from {
            parse_from(from)?;
        }
        if opts.from.is_some() && self.config.storage.is_none() {
            return Err(LauncherError::Option {
                flag: "--from",
                why: "needs an object store: set [storage] in launcher.toml (url, endpoint, \
                      credentials)",
            });
        }
        let image = Image::open(&self.config.image)?;
        let _span = tracing::info_span!("create", vm = %name).entered();
        let _lock = self.lock()?;
        let dir = self.state.vm(&name);
        Self::clear_leftovers(&name, &dir)?;
        let index = self.allocate()?;
        let pool = self.config.pool;
        let address = pool.address(index);
        let mut record = VmRecord {
            name: name.to_string(),
            phase: Phase::Creating,
            index,
            address,
            host_address: pool.host_address(),
            prefix_len: pool.prefix_len(),
            tap: format!("{}{index}", self.config.tap_prefix),
            mac: mac_for(address),
            created: time::OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            vmm: vmm.name().to_owned(),
            accel: vmm.accel().accel,
            image_version: image.manifest.version.clone(),
            memory_mib: sizes.memory_mib,
            cpus: sizes.cpus,
            primary_port: sizes.primary_port,
            disk_gib: sizes.disk_gib,
            user_disk: true,
            from: opts.from.clone(),
            pid: None,
            pid_start: None,
        };
        dir.create()?;
        record.save(&dir)?;
        tracing::info!(address = %record.address, tap = %record.tap, "record written");

        if let Err(error) = self.build(&dir, &mut record, &image, vmm) {
            tracing::info!(%error, "create failed; removing what it made");
            let mut cleanup = Self::tear_down(&dir, Some(&record));
            if cleanup.is_empty()
                && let Err(e) = Self::remove_dir(&dir)
            {
                cleanup.push(e.to_string());
            }
            return Err(if cleanup.is_empty() {
                error
            } else {
                LauncherError::Leftovers {
                    name: name.to_string(),
                    error: Box::new(error),
                    cleanup,
                }
            });
        }
        let domain = &self.config.domain;
        Ok(Created {
            url: format!("https://{name}.{domain}/"),
            api_url: format!("https://api.{name}.{domain}/v1/"),
            token_file: dir.token(),
            accel_why: vmm.accel().why.clone(),
            record,
        })
    }

    /// The sizes of a new VM: the options, else the configuration.
    fn sizes(&self, opts: &CreateOptions) -> Result<Sizes, LauncherError> {
        let option = |flag, why| LauncherError::Option { flag, why };
        let memory_mib = opts.memory_mib.unwrap_or(self.config.memory_mib);
        if memory_mib < 64 {
            return Err(option("--memory", "must be at least 64 (MiB)"));
        }
        let cpus = opts.cpus.unwrap_or(self.config.cpus);
        if cpus == 0 {
            return Err(option("--cpus", "must be at least 1"));
        }
        let disk_gib = opts.disk_gib.unwrap_or(self.config.disk_gib);
        if disk_gib == 0 {
            return Err(option("--disk-size", "must be at least 1 (GiB)"));
        }
        let primary_port = opts.primary_port.unwrap_or(DEFAULT_PRIMARY_PORT);
        if primary_port == 0 {
            return Err(option("--primary-port", "must be a port from 1 to 65535"));
        }
        Ok(Sizes {
            memory_mib,
            cpus,
            primary_port,
            disk_gib,
        })
    }

    /// Refuses an existing VM; removes what an interrupted create or
    /// destroy of the same name left (the lock is ours, so nobody is still
    /// working on it).
    fn clear_leftovers(name: &VmName, dir: &VmDir) -> Result<(), LauncherError> {
        let record = match VmRecord::load(dir)? {
            Some(r) if r.phase == Phase::Ready => {
                return Err(LauncherError::Exists(name.to_string()));
            }
            Some(r) => Some(r),
            None if dir.path().exists() => None,
            None => return Ok(()),
        };
        tracing::info!("cleaning up what an interrupted create or destroy left");
        let errors = Self::tear_down(dir, record.as_ref());
        if !errors.is_empty() {
            return Err(LauncherError::Teardown {
                name: name.to_string(),
                errors,
            });
        }
        Self::remove_dir(dir)
    }

    /// The lowest free address index: not in any record, and not the
    /// suffix of a tap that already exists (another state directory with
    /// the same prefix, or a record lost by hand).
    fn allocate(&self) -> Result<u32, LauncherError> {
        let mut used = BTreeSet::new();
        for name in self.state.vm_names()? {
            match VmRecord::load(&self.state.vm(&name)) {
                Ok(Some(r)) => {
                    used.insert(r.index);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%e, "a damaged record: its address may be reused"),
            }
        }
        let pool = self.config.pool;
        let mut index = pool.allocate(&used);
        while let Some(i) = index {
            let tap = format!("{}{i}", self.config.tap_prefix);
            if !std::path::Path::new("/sys/class/net").join(&tap).exists() {
                return Ok(i);
            }
            tracing::warn!(%tap, "exists without a record here; skipping its address");
            used.insert(i);
            index = pool.allocate(&used);
        }
        Err(LauncherError::PoolFull(pool.to_string()))
    }

    /// Token, network, disks, VMM.
    fn build(
        &self,
        dir: &VmDir,
        record: &mut VmRecord,
        image: &Image,
        vmm: &dyn Vmm,
    ) -> Result<(), LauncherError> {
        let token = token::generate()?;
        token::write(&dir.token(), &token)?;
        self.network(record).set_up()?;
        self.write_disks(dir, record, &token::sha256_hex(&token))?;
        self.launch(dir, record, image, vmm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_carries_the_address() {
        assert_eq!(
            mac_for(std::net::Ipv4Addr::new(10, 123, 1, 44)),
            "02:6e:62:7b:01:2c"
        );
    }

    #[test]
    fn sizes_default_to_the_configuration_and_are_checked() {
        let launcher = Launcher::with_config(
            std::path::Path::new("/nonexistent"),
            crate::LauncherConfig::default(),
        );
        let r = launcher.sizes(&CreateOptions::new("a")).unwrap();
        assert_eq!(
            (r.memory_mib, r.cpus, r.disk_gib, r.primary_port),
            (512, 1, 1, 8080)
        );
        let opts = CreateOptions {
            memory_mib: Some(1024),
            cpus: Some(2),
            primary_port: Some(3000),
            disk_gib: Some(4),
            ..CreateOptions::new("a")
        };
        let r = launcher.sizes(&opts).unwrap();
        assert_eq!(
            (r.memory_mib, r.cpus, r.disk_gib, r.primary_port),
            (1024, 2, 4, 3000)
        );
        for (opts, flag) in [
            (
                CreateOptions {
                    memory_mib: Some(8),
                    ..CreateOptions::new("a")
                },
                "--memory",
            ),
            (
                CreateOptions {
                    cpus: Some(0),
                    ..CreateOptions::new("a")
                },
                "--cpus",
            ),
            (
                CreateOptions {
                    disk_gib: Some(0),
                    ..CreateOptions::new("a")
                },
                "--disk-size",
            ),
            (
                CreateOptions {
                    primary_port: Some(0),
                    ..CreateOptions::new("a")
                },
                "--primary-port",
            ),
        ] {
            let err = launcher.sizes(&opts).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err}");
        }
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_touched() {
        let root = std::env::temp_dir().join(format!("nb-create-{}", std::process::id()));
        let launcher = Launcher::with_config(&root, crate::LauncherConfig::default());
        let stub = crate::vmm::stub::Stub::new("true", [] as [&str; 0]);
        let err = launcher
            .create(&CreateOptions::new("Bad_Name"), &stub)
            .unwrap_err();
        assert!(matches!(err, LauncherError::Name(_)), "{err}");
        assert!(!root.exists(), "nothing made for a refused name");
    }
}
