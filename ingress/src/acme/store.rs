//! The certificate store on disk: `account.json` (ACME account key),
//! `certs/HOST.pem` (chain) and `certs/HOST.key` (private key).
//!
//! Files are written atomically (temporary file, fsync, rename, fsync of the
//! directory), keys and the account with mode 0600, so a crash leaves either
//! the old file or the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;

use crate::tls::{TlsError, certified_key};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("certificate store {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A stored certificate or key does not parse.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A certificate's validity could not be read.
    #[error("{path}: cannot read the certificate's validity: {why}")]
    Validity {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The hostname cannot be a file name.
    #[error("hostname {0:?} cannot be stored (letters, digits, '-', '.', '*' only)")]
    BadHost(String),
    /// A blocking store task failed.
    #[error("certificate store task failed: {0}")]
    Task(String),
    /// The account file does not parse.
    #[error("{path}: {source}")]
    Account {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
}

/// A certificate ready to serve.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The signing key and chain.
    pub key: Arc<CertifiedKey>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The store's directory.
#[derive(Clone, Debug)]
pub struct CertStore {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().expect("store paths have a parent");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .expect("store paths have a name")
            .to_string_lossy()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn validity(chain_pem: &[u8], path: &Path) -> Result<(SystemTime, SystemTime), StoreError> {
    let bad = |why: String| StoreError::Validity {
        path: path.to_owned(),
        why,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem).map_err(|e| bad(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).map_err(|_| bad("validity before 1970".into()))?;
        Ok::<_, StoreError>(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    };
    Ok((
        to_system(cert.validity().not_before)?,
        to_system(cert.validity().not_after)?,
    ))
}

impl CertStore {
    /// Opens (creating, mode 0700) the store at `dir`.
    ///
    /// # Errors
    /// [`StoreError::Io`] if it cannot be created.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(io_err(&certs))?;
        for d in [dir, certs.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(d))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn paths(&self, host: &str) -> Result<(PathBuf, PathBuf), StoreError> {
        if host.is_empty()
            || host.starts_with('.')
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.*".contains(c))
        {
            return Err(StoreError::BadHost(host.to_owned()));
        }
        let base = self.dir.join("certs");
        Ok((
            base.join(format!("{host}.pem")),
            base.join(format!("{host}.key")),
        ))
    }

    /// The stored certificate for `host`, if any.
    ///
    /// # Errors
    /// [`StoreError`] if files exist but are unusable.
    pub fn load(&self, host: &str) -> Result<Option<Stored>, StoreError> {
        let (cert, key) = self.paths(host)?;
        let chain = match std::fs::read(&cert) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path: cert, source }),
        };
        let key_pem = std::fs::read(&key).map_err(io_err(&key))?;
        Self::stored(&chain, &key_pem, &cert).map(Some)
    }

    fn stored(chain: &[u8], key: &[u8], origin: &Path) -> Result<Stored, StoreError> {
        let certified = certified_key(chain, key, origin)?;
        let (not_before, not_after) = validity(chain, origin)?;
        Ok(Stored {
            key: Arc::new(certified),
            not_before,
            not_after,
        })
    }

    /// Checks and stores a new chain and key for `host` (key first, then the
    /// chain, so a stored chain always has its key).
    ///
    /// # Errors
    /// [`StoreError`] if they do not parse or cannot be written.
    pub fn save(&self, host: &str, chain_pem: &str, key_pem: &str) -> Result<Stored, StoreError> {
        let (cert, key) = self.paths(host)?;
        let stored = Self::stored(chain_pem.as_bytes(), key_pem.as_bytes(), &cert)?;
        write_atomic(&key, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert, chain_pem.as_bytes(), 0o644)?;
        Ok(stored)
    }

    /// The saved ACME account, if any.
    ///
    /// # Errors
    /// [`StoreError`] if the file exists but is unusable.
    pub fn account(&self) -> Result<Option<instant_acme::AccountCredentials>, StoreError> {
        let path = self.dir.join("account.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Account { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Removes the saved ACME account (the CA no longer knows it).
    ///
    /// # Errors
    /// [`StoreError::Io`] if it cannot be removed.
    pub fn forget_account(&self) -> Result<(), StoreError> {
        let path = self.dir.join("account.json");
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Writes an inline CA root (PEM) next to the account, for the ACME
    /// client that reads its extra root from a file; returns the file.
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be written.
    pub fn save_ca_root(&self, pem: &str) -> Result<PathBuf, StoreError> {
        let path = self.dir.join("ca-root.pem");
        write_atomic(&path, pem.as_bytes(), 0o644)?;
        Ok(path)
    }

    /// Saves the ACME account (mode 0600).
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be written.
    pub fn save_account(&self, creds: &instant_acme::AccountCredentials) -> Result<(), StoreError> {
        let path = self.dir.join("account.json");
        let bytes = serde_json::to_vec(creds).map_err(|source| StoreError::Account {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(host: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn save_then_load_with_modes() {
        let dir = std::env::temp_dir().join(format!("nestbox-store-{}", std::process::id()));
        let store = CertStore::open(&dir).unwrap();
        assert!(store.load("vm.test").unwrap().is_none());
        let (chain, key) = self_signed("vm.test");
        let saved = store.save("vm.test", &chain, &key).unwrap();
        let loaded = store.load("vm.test").unwrap().unwrap();
        assert_eq!(saved.not_after, loaded.not_after);
        assert!(loaded.not_before < loaded.not_after);
        let mode = std::fs::metadata(dir.join("certs/vm.test.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(store.save("../evil", &chain, &key).is_err());
        assert!(store.save("bad.test", "not pem", &key).is_err());
        assert!(
            store.load("bad.test").unwrap().is_none(),
            "a rejected save writes nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
