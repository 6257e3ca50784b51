//! Server certificates, picked by SNI.
//!
//! The certificate set is published through a `tokio::sync::watch` of
//! `Arc<CertSet>`: a renewal sends a new set, and the next handshake uses it;
//! connections already established keep theirs, so a swap drops nothing.
//! TLS-ALPN-01 challenge certificates live apart and are served only to
//! handshakes that offer `acme-tls/1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

/// ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Errors loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A PEM file held no certificate or key.
    #[error("{path} holds no {what} in PEM form")]
    Empty {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// rustls rejected the key.
    #[error(
        "the private key {path} is not usable (ECDSA, Ed25519 or RSA in PKCS#8/SEC1/PKCS#1): {source}"
    )]
    Key {
        /// The file.
        path: PathBuf,
        /// rustls's error.
        source: rustls::Error,
    },
}

/// Certificates by hostname; `*.example.com` entries cover one label.
#[derive(Clone, Debug, Default)]
pub struct CertSet {
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl CertSet {
    /// Adds `key` for each of `names`.
    pub fn insert(&mut self, names: &[String], key: &Arc<CertifiedKey>) {
        for name in names {
            self.by_name.insert(name.to_ascii_lowercase(), key.clone());
        }
    }

    /// The certificate for `name`: exact, else the wildcard of its parent.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        self.by_name.get(&name).cloned().or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.by_name.get(&format!("*.{parent}")).cloned()
        })
    }
}

/// Picks certificates for handshakes.
#[derive(Debug)]
pub struct Resolver {
    certs: watch::Receiver<Arc<CertSet>>,
    challenges: Arc<ArcSwap<HashMap<String, Arc<CertifiedKey>>>>,
}

impl Resolver {
    /// A resolver reading `certs`, and TLS-ALPN-01 certificates from
    /// `challenges`.
    #[must_use]
    pub fn new(
        certs: watch::Receiver<Arc<CertSet>>,
        challenges: Arc<ArcSwap<HashMap<String, Arc<CertifiedKey>>>>,
    ) -> Self {
        Self { certs, challenges }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme {
            return self.challenges.load().get(&name).cloned();
        }
        let found = self.certs.borrow().get(&name);
        if found.is_none() {
            tracing::debug!(%name, "no certificate for this name");
        }
        found
    }
}

/// The server configuration: TLS 1.2/1.3 with ring, ALPN h2, http/1.1 and
/// acme-tls/1.
#[must_use]
pub fn server_config(resolver: Arc<Resolver>) -> ServerConfig {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    config
}

/// Parses a PEM certificate chain and private key into a signing key.
///
/// # Errors
/// [`TlsError`] naming the bad input.
pub fn certified_key(
    chain_pem: &[u8],
    key_pem: &[u8],
    origin: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &chain_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: origin.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::Empty {
            path: origin.to_owned(),
            what: "certificate",
        });
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Read {
            path: origin.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            path: origin.to_owned(),
            what: "private key",
        })?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|source| TlsError::Key {
            path: origin.to_owned(),
            source,
        })?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Loads a certificate chain and key from two PEM files.
///
/// # Errors
/// [`TlsError`] naming the file.
pub fn load_files(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_owned(),
            source,
        })
    };
    certified_key(&read(cert)?, &read(key)?, cert)
}
