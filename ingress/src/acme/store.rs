//! The certificate store on disk: `account.json` (ACME account key) and
//! `certs/HOST.pem`, which holds a private key *and* its chain: one file,
//! so a renewal replaces both with one rename and a crash can never pair a
//! new key with an old chain. `certs/HOST.pem.prev` keeps the pair it
//! replaced; a `HOST.pem` that does not load (or whose certificate is not
//! for its key) falls back to it.
//!
//! Files go through the workspace's one atomic write (`nestbox-durable`:
//! temporary file, fsync, rename, fsync of the directory), with mode 0600.
//! Stores written before keys and chains were kept together
//! (`HOST.pem` + `HOST.key`) still load, with the same check.
#![allow(
    clippy::disallowed_methods,
    reason = "blocking by design: the manager calls the store through off_runtime"
)]

use std::os::unix::fs::PermissionsExt;
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
    nestbox_durable::write_atomic(path, bytes, mode).map_err(|e| StoreError::Io {
        path: path.to_owned(),
        source: e.into(),
    })
}

fn validity(chain_pem: &[u8], path: &Path) -> Result<(SystemTime, SystemTime), StoreError> {
    let bad = |why: String| StoreError::Validity {
        path: path.to_owned(),
        why,
    };
    // The end-entity certificate: the first CERTIFICATE block (the key
    // comes before it in a stored pair).
    let pem = x509_parser::pem::Pem::iter_from_buffer(chain_pem)
        .find_map(|p| match p {
            Ok(p) if p.label == "CERTIFICATE" => Some(Ok(p)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .ok_or_else(|| bad("no certificate".into()))?
        .map_err(|e| bad(e.to_string()))?;
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
        // Pairs whose replacement a crash interrupted are whole under their
        // own names; the half-written temporaries (keys among them) go.
        let torn =
            nestbox_durable::remove_leftovers(&certs).map_err(|e| io_err(&certs)(e.into()))?;
        if torn > 0 {
            tracing::warn!(torn, "interrupted certificate writes removed");
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// `certs/HOST.pem` (key and chain), `certs/HOST.pem.prev` (the pair it
    /// replaced) and `certs/HOST.key` (the key of a store from before
    /// pairs were kept in one file).
    fn paths(&self, host: &str) -> Result<[PathBuf; 3], StoreError> {
        if host.is_empty()
            || host.starts_with('.')
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.*".contains(c))
        {
            return Err(StoreError::BadHost(host.to_owned()));
        }
        let base = self.dir.join("certs");
        Ok([
            base.join(format!("{host}.pem")),
            base.join(format!("{host}.pem.prev")),
            base.join(format!("{host}.key")),
        ])
    }

    /// The stored certificate for `host`, if any: the current pair, or, if
    /// it is unusable, the one it replaced (the failure is logged).
    ///
    /// # Errors
    /// [`StoreError`] if files exist but neither pair is usable.
    pub fn load(&self, host: &str) -> Result<Option<Stored>, StoreError> {
        let [current, previous, legacy_key] = self.paths(host)?;
        let failed = match Self::load_pair(&current, &legacy_key) {
            Ok(found) => return Ok(found),
            Err(err) => err,
        };
        tracing::error!(%host, err = %failed, "the stored certificate is unusable; trying the one it replaced");
        match Self::load_pair(&previous, &legacy_key) {
            Ok(Some(stored)) => Ok(Some(stored)),
            Ok(None) | Err(_) => Err(failed),
        }
    }

    /// One pair from `bundle` (key and chain), or from `bundle` (chain)
    /// and `legacy_key` as a store written before pairs were one file.
    fn load_pair(bundle: &Path, legacy_key: &Path) -> Result<Option<Stored>, StoreError> {
        match Self::read_pair(bundle, legacy_key)? {
            Some(pair) => Self::stored(&pair, &pair, bundle).map(Some),
            None => Ok(None),
        }
    }

    /// The bytes of a pair as one file (key, then chain): `bundle` as it
    /// is, or with the old layout's `legacy_key` put in front.
    fn read_pair(bundle: &Path, legacy_key: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        let text = match std::fs::read(bundle) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: bundle.to_owned(),
                    source,
                });
            }
        };
        if matches!(rustls_pemfile::private_key(&mut &text[..]), Ok(Some(_))) {
            return Ok(Some(text));
        }
        let mut pair = std::fs::read(legacy_key).map_err(io_err(legacy_key))?;
        pair.extend_from_slice(&text);
        Ok(Some(pair))
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

    /// Checks and stores a new chain and key for `host`, as one file
    /// replaced by one rename; the pair it replaces, if usable, is kept as
    /// the fallback.
    ///
    /// # Errors
    /// [`StoreError`] if they do not parse, do not match, or cannot be
    /// written.
    pub fn save(&self, host: &str, chain_pem: &str, key_pem: &str) -> Result<Stored, StoreError> {
        let [current, previous, legacy_key] = self.paths(host)?;
        let stored = Self::stored(chain_pem.as_bytes(), key_pem.as_bytes(), &current)?;
        // The pair it replaces, if usable, is the fallback.
        if let Ok(Some(pair)) = Self::read_pair(&current, &legacy_key)
            && Self::stored(&pair, &pair, &current).is_ok()
        {
            write_atomic(&previous, &pair, 0o600)?;
        }
        let mut bundle = String::with_capacity(key_pem.len() + chain_pem.len() + 1);
        bundle.push_str(key_pem);
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(chain_pem);
        write_atomic(&current, bundle.as_bytes(), 0o600)?;
        // The old layout's key is now inside both files.
        nestbox_durable::remove(&legacy_key).map_err(|e| StoreError::Io {
            path: legacy_key.clone(),
            source: e.into(),
        })?;
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

    fn scratch(name: &str) -> (PathBuf, CertStore) {
        let dir = std::env::temp_dir().join(format!("nestbox-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = CertStore::open(&dir).unwrap();
        (dir, store)
    }

    #[test]
    fn save_then_load_with_modes() {
        let (dir, store) = scratch("modes");
        assert!(store.load("vm.test").unwrap().is_none());
        let (chain, key) = self_signed("vm.test");
        let saved = store.save("vm.test", &chain, &key).unwrap();
        let loaded = store.load("vm.test").unwrap().unwrap();
        assert_eq!(saved.not_after, loaded.not_after);
        assert!(loaded.not_before < loaded.not_after);
        let mode = std::fs::metadata(dir.join("certs/vm.test.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the file holds the key");
        assert!(store.save("../evil", &chain, &key).is_err());
        assert!(store.save("bad.test", "not pem", &key).is_err());
        assert!(
            store.load("bad.test").unwrap().is_none(),
            "a rejected save writes nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_chain_with_another_key_is_refused() {
        let (dir, store) = scratch("mismatch");
        let (chain, _) = self_signed("vm.test");
        let (_, other_key) = self_signed("vm.test");
        let err = store.save("vm.test", &chain, &other_key).unwrap_err();
        assert!(
            matches!(err, StoreError::Tls(TlsError::Mismatch { .. })),
            "{err}"
        );
        assert!(store.load("vm.test").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unusable_pair_falls_back_to_the_one_it_replaced() {
        let (dir, store) = scratch("fallback");
        let (chain1, key1) = self_signed("vm.test");
        store.save("vm.test", &chain1, &key1).unwrap();
        let (chain2, key2) = self_signed("vm.test");
        store.save("vm.test", &chain2, &key2).unwrap();
        let current = dir.join("certs/vm.test.pem");
        // What a torn renewal of the old layout could leave: a new key
        // beside the previous chain.
        std::fs::write(&current, format!("{key2}{chain1}")).unwrap();
        let loaded = store.load("vm.test").unwrap().unwrap();
        let public = |pem: &str| {
            let key = rustls_pemfile::private_key(&mut pem.as_bytes())
                .unwrap()
                .unwrap();
            let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
            signer.public_key().unwrap().to_vec()
        };
        assert_eq!(
            loaded.key.key.public_key().unwrap().to_vec(),
            public(&key1),
            "the mismatched pair is not served: the last good one is"
        );
        assert!(loaded.key.keys_match().is_ok());
        // Garbage is no better.
        std::fs::write(&current, b"garbage").unwrap();
        assert!(store.load("vm.test").unwrap().is_some());
        std::fs::remove_file(dir.join("certs/vm.test.pem.prev")).unwrap();
        assert!(store.load("vm.test").is_err(), "nothing usable is an error");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_from_before_pairs_were_one_file_loads_and_is_checked() {
        let (dir, store) = scratch("legacy");
        let (chain, key) = self_signed("vm.test");
        std::fs::write(dir.join("certs/vm.test.pem"), &chain).unwrap();
        std::fs::write(dir.join("certs/vm.test.key"), &key).unwrap();
        assert!(store.load("vm.test").unwrap().is_some());
        let (_, other) = self_signed("vm.test");
        std::fs::write(dir.join("certs/vm.test.key"), &other).unwrap();
        assert!(store.load("vm.test").is_err(), "a torn old-layout pair");
        std::fs::write(dir.join("certs/vm.test.key"), &key).unwrap();
        let (chain2, key2) = self_signed("vm.test");
        store.save("vm.test", &chain2, &key2).unwrap();
        assert!(!dir.join("certs/vm.test.key").exists());
        assert!(
            dir.join("certs/vm.test.pem.prev").exists(),
            "the old pair, whole"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
