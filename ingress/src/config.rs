//! The configuration file of `nestbox-ingress serve` (TOML).
//!
//! ```toml
//! https = "0.0.0.0:443"
//! http = "0.0.0.0:80"
//!
//! [[route]]
//! host = "vm.example.com"
//! backend = "127.0.0.1:8080"
//! netns = "/run/netns/inner"     # optional: dial inside this namespace
//!
//! [[certificate]]                # static certificates, or [acme] below
//! names = ["vm.example.com"]
//! cert = "/etc/nestbox/vm.pem"
//! key = "/etc/nestbox/vm.key"
//!
//! [acme]
//! directory = "https://acme-v02.api.letsencrypt.org/directory"
//! ca_root = "/etc/nestbox/pebble-root.pem"   # optional extra root for the directory's TLS
//! state_dir = "/var/lib/nestbox/acme"
//! challenge = "http-01"                      # or "tls-alpn-01"
//!
//! [limits]                       # optional; see server::Limits
//! header_read_timeout_secs = 10
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::server::Limits;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        source: toml::de::Error,
    },
    /// A value is not acceptable.
    #[error("{path}: {field}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// Why.
        why: String,
    },
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTPS listen address.
    #[serde(default = "default_https")]
    pub https: SocketAddr,
    /// Plain HTTP listen address (ACME HTTP-01, redirects to https).
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// Routes, hostname → backend.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Static certificates.
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateConfig>,
    /// ACME: obtain and renew certificates for every route's hostname.
    pub acme: Option<AcmeConfig>,
    /// Client-facing limits.
    #[serde(default)]
    pub limits: Limits,
}

fn default_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}

/// One route.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The hostname clients use.
    pub host: String,
    /// Where to send its requests.
    pub backend: SocketAddr,
    /// Network namespace to dial the backend in.
    pub netns: Option<PathBuf>,
}

/// A certificate from files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The names it serves (`*.example.com` allowed).
    pub names: Vec<String>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Which ACME challenge proves control of a name.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ChallengeKind {
    /// A token under `/.well-known/acme-challenge/` on port 80.
    #[serde(rename = "http-01")]
    Http01,
    /// A special certificate over `acme-tls/1` on port 443.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// ACME settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME directory URL.
    pub directory: String,
    /// An extra CA root (PEM file) to trust for the directory's TLS (Pebble).
    pub ca_root: Option<PathBuf>,
    /// The same root given inline as PEM text, for a configuration that
    /// travels without its files (a VM's config disk). At most one of
    /// `ca_root` and `ca_root_pem`.
    pub ca_root_pem: Option<String>,
    /// Where the account key, certificates and keys are kept.
    pub state_dir: PathBuf,
    /// The challenge to use.
    #[serde(default = "default_challenge")]
    pub challenge: ChallengeKind,
    /// Contact URLs for the account (`mailto:…`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// Each request to the CA is given up after this long (a CA that
    /// accepts the connection and never answers stops nothing else).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A whole order (challenge, validation, issuance) is given up after
    /// this long, and retried with backoff.
    #[serde(default = "default_order_timeout_ms")]
    pub order_timeout_ms: u64,
    /// Orders for different hostnames run at once, up to this many.
    #[serde(default = "default_concurrent_orders")]
    pub concurrent_orders: usize,
    /// At most this many orders are started in any hour (new names and
    /// renewals alike): a tenant opening a thousand ports cannot spend the
    /// CA's rate limits for the whole fleet. A name over the budget waits
    /// for the next slot (its plain-HTTP URL says so).
    #[serde(default = "default_orders_per_hour")]
    pub orders_per_hour: usize,
}

fn default_challenge() -> ChallengeKind {
    ChallengeKind::Http01
}

fn default_request_timeout_ms() -> u64 {
    10_000
}

fn default_order_timeout_ms() -> u64 {
    90_000
}

fn default_concurrent_orders() -> usize {
    4
}

fn default_orders_per_hour() -> usize {
    50
}

impl Config {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check(path)?;
        Ok(config)
    }

    /// Checks the values that parsing cannot (`path` is for messages).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, why: &str| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            why: why.to_owned(),
        };
        for (i, r) in self.routes.iter().enumerate() {
            if r.host.is_empty() || r.host.contains(['/', ' ', ':']) {
                return Err(invalid(
                    format!("route[{i}].host"),
                    "must be a bare hostname",
                ));
            }
        }
        if self.certificates.is_empty() && self.acme.is_none() {
            return Err(invalid(
                "certificate / acme".into(),
                "give static [[certificate]] entries or an [acme] section",
            ));
        }
        for (i, c) in self.certificates.iter().enumerate() {
            if c.names.is_empty() {
                return Err(invalid(
                    format!("certificate[{i}].names"),
                    "must name at least one host",
                ));
            }
        }
        if let Some(acme) = &self.acme
            && acme.ca_root.is_some()
            && acme.ca_root_pem.is_some()
        {
            return Err(invalid(
                "acme.ca_root_pem".into(),
                "give the extra root as a file (ca_root) or inline (ca_root_pem), not both",
            ));
        }
        if let Some(pem) = self.acme.as_ref().and_then(|a| a.ca_root_pem.as_ref())
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(invalid(
                "acme.ca_root_pem".into(),
                "must be a PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections".into(),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "t.toml".into(),
            source,
        })?;
        config.check(Path::new("t.toml"))?;
        Ok(config)
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
            https = "127.0.0.1:8443"
            [[route]]
            host = "vm.test"
            backend = "127.0.0.1:8080"
            netns = "/run/netns/inner"
            [acme]
            directory = "https://localhost:14000/dir"
            state_dir = "/tmp/acme"
            challenge = "tls-alpn-01"
            [limits]
            header_read_timeout_secs = 3
            "#,
        )
        .unwrap();
        assert_eq!(
            c.routes[0].netns.as_deref(),
            Some(Path::new("/run/netns/inner"))
        );
        assert_eq!(c.acme.unwrap().challenge, ChallengeKind::TlsAlpn01);
        assert_eq!(c.limits.header_read_timeout_secs, 3);
        assert_eq!(c.limits.max_connections, Limits::default().max_connections);
        assert_eq!(c.http, default_http());
    }

    #[test]
    fn inline_ca_root_is_checked() {
        let base = "[acme]\ndirectory = \"https://localhost:14000/dir\"\nstate_dir = \"/tmp/a\"\n";
        let pem =
            "ca_root_pem = \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"\n";
        assert!(parse(&format!("{base}{pem}")).is_ok());
        let both = parse(&format!("{base}{pem}ca_root = \"/r.pem\"\n")).unwrap_err();
        assert!(both.to_string().contains("acme.ca_root_pem"), "{both}");
        let junk = parse(&format!("{base}ca_root_pem = \"hello\"\n")).unwrap_err();
        assert!(junk.to_string().contains("PEM certificate"), "{junk}");
    }

    #[test]
    fn errors_name_the_field() {
        let err =
            parse("[[route]]\nhost = \"a\"\nbackend = \"1.2.3.4:1\"\nport = 3\n").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        let err = parse("[[route]]\nhost = \"a/b\"\nbackend = \"1.2.3.4:1\"\n").unwrap_err();
        assert!(err.to_string().contains("route[0].host"), "{err}");
        let err = parse("").unwrap_err();
        assert!(err.to_string().contains("acme"), "{err}");
    }
}
