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
    /// The certificate was not issued for the private key beside it.
    #[error("{path}: the certificate does not match its private key ({source}); replace both")]
    Mismatch {
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
///
/// Cipher suites are picked in the server's order, AES-128-GCM first (as Go's
/// TLS stack and Caddy do): on CPUs with AES instructions it is the cheapest
/// suite, and its SHA-256 key schedule costs less per handshake than
/// SHA-384's. One TLS 1.3 session ticket per handshake (as Go sends) instead
/// of rustls' default two: a resuming client needs one, and each ticket is
/// an extra record to make and send on every new connection.
#[must_use]
pub fn server_config(resolver: Arc<Resolver>) -> ServerConfig {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| suite_rank(s.suite()));
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    config.ignore_client_order = true;
    config.send_tls13_tickets = 1;
    config
}

/// Server preference among cipher suites (lower first); the sort is stable,
/// so ring's order holds within a rank.
fn suite_rank(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384 | S::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        _ => 2,
    }
}

/// Parses a PEM certificate chain and private key into a signing key,
/// and checks that the certificate is the key's.
///
/// # Errors
/// [`TlsError`] naming the bad input.
pub fn certified_key(
    chain_pem: &[u8],
    key_pem: &[u8],
    origin: &Path,
) -> Result<CertifiedKey, TlsError> {
    let certified = certified_key_unchecked(chain_pem, key_pem, origin)?;
    // A chain renewed without its key (or the reverse) would fail every
    // handshake; refuse it here rather than serve it.
    certified
        .keys_match()
        .map_err(|source| TlsError::Mismatch {
            path: origin.to_owned(),
            source,
        })?;
    Ok(certified)
}

/// [`certified_key`] without the pair check, for a certificate made here
/// from its key (a TLS-ALPN-01 challenge certificate, whose critical
/// `acmeIdentifier` extension the check's parser refuses).
///
/// # Errors
/// [`TlsError`] naming the bad input.
pub fn certified_key_unchecked(
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

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use rustls::client::ClientSessionStore;
    use rustls::client::{Tls12ClientSessionValue, Tls13ClientSessionValue};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, NamedGroup, RootCertStore, ServerConnection};
    use std::io::{Read, Write};

    /// Counts the TLS 1.3 tickets a client receives.
    #[derive(Debug, Default)]
    struct Tickets(Mutex<usize>);

    impl ClientSessionStore for Tickets {
        fn set_kx_hint(&self, _: ServerName<'static>, _: NamedGroup) {}
        fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
            None
        }
        fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}
        fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
            None
        }
        fn remove_tls12_session(&self, _: &ServerName<'static>) {}
        fn insert_tls13_ticket(&self, _: ServerName<'static>, _: Tls13ClientSessionValue) {
            *self.0.lock() += 1;
        }
        fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
            None
        }
    }

    /// A client that prefers AES-256 (ring's default order) gets AES-128
    /// and one ticket.
    #[test]
    fn server_picks_aes128_and_sends_one_ticket() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["vm.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let certified = certified_key(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            Path::new("test"),
        )
        .unwrap();
        let mut set = CertSet::default();
        set.insert(&["vm.test".to_owned()], &Arc::new(certified));
        let (_tx, rx) = watch::channel(Arc::new(set));
        let server = Arc::new(server_config(Arc::new(Resolver::new(rx, Arc::default()))));

        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let tickets = Arc::new(Tickets::default());
        let mut client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.resumption = rustls::client::Resumption::store(tickets.clone());
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client must prefer another suite for this test to mean anything"
        );

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_side = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let mut tls = rustls::StreamOwned::new(ServerConnection::new(server).unwrap(), tcp);
            tls.write_all(b"x").unwrap();
            tls.flush().unwrap();
            tls.conn.negotiated_cipher_suite().unwrap().suite()
        });
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        let name = ServerName::try_from("vm.test").unwrap();
        let conn = ClientConnection::new(Arc::new(client), name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).unwrap();
        assert_eq!(
            server_side.join().unwrap(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(*tickets.0.lock(), 1);
    }
}
