//! URL auth: each published port's mode (`/v1/ports/{port}/auth`), browser
//! login links (`/v1/urls/login`), share links (`/v1/urls/shares`) and
//! scoped tokens (`/v1/tokens`).

use serde::{Deserialize, Serialize};

/// Who may open a published port's URL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UrlAuth {
    /// The VM's owner: `Authorization: Bearer` with the VM token or a
    /// scoped token, or a browser holding the cookie of a login or share
    /// link. The default.
    #[default]
    Private,
    /// Anyone.
    Public,
    /// `Authorization: Bearer` with the VM token or a scoped token only
    /// (machine clients; no cookie is accepted).
    Token,
}

impl UrlAuth {
    /// The mode's name on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Public => "public",
            Self::Token => "token",
        }
    }
}

impl std::fmt::Display for UrlAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for UrlAuth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "private" => Ok(Self::Private),
            "public" => Ok(Self::Public),
            "token" => Ok(Self::Token),
            other => Err(format!(
                "unknown URL auth mode {other:?}: use private, public or token"
            )),
        }
    }
}

/// `PUT /v1/ports/{port}/auth`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPortAuth {
    /// The new mode.
    pub mode: UrlAuth,
}

/// A port's mode (`GET`/`PUT /v1/ports/{port}/auth`; `{port}` may be
/// `primary`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAuth {
    /// The port.
    pub port: u16,
    /// Its mode, in force for the next request.
    pub mode: UrlAuth,
    /// Its URL (`https://<port>.<vm>.<domain>/`, or the VM's own name for
    /// the primary port).
    pub url: String,
}

/// `POST /v1/urls/login`: a link that logs a browser in to one URL.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The port (default: the primary URL).
    #[serde(default)]
    pub port: Option<u16>,
    /// Where the browser lands after the login (a path on the same host,
    /// default `/`).
    #[serde(default)]
    pub path: Option<String>,
}

/// A signed link (login links answer with it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The link: open it in a browser.
    pub url: String,
    /// Unix milliseconds after which it no longer works.
    pub expires_ms: u64,
}

/// `POST /v1/urls/shares`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareRequest {
    /// The port (default: the primary URL).
    #[serde(default)]
    pub port: Option<u16>,
    /// How long the link works: 60 s to 24 h.
    pub ttl_secs: u64,
}

/// A share link. Only its creation answers with `url`; the VM keeps a
/// hash of the link, never the link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Its id (`DELETE /v1/urls/shares/{id}` revokes it).
    pub id: String,
    /// The port it opens.
    pub port: u16,
    /// Whether it opens the primary URL (else the port's own).
    pub primary: bool,
    /// Unix milliseconds of its creation.
    pub created_ms: u64,
    /// Unix milliseconds after which it no longer works.
    pub expires_ms: u64,
    /// The link (at creation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `POST /v1/tokens`: a bearer token for some ports only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The ports it opens (empty: every port).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// How long it works: 60 s to 365 days.
    pub ttl_secs: u64,
}

/// A scoped token. Only its creation answers with `token`; the VM keeps
/// its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopedToken {
    /// Its id (`DELETE /v1/tokens/{id}` revokes it).
    pub id: String,
    /// The ports it opens (empty: every port).
    pub ports: Vec<u16>,
    /// Unix milliseconds of its creation.
    pub created_ms: u64,
    /// Unix milliseconds after which it no longer works.
    pub expires_ms: u64,
    /// The token (at creation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// How many grants a revocation removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The count.
    pub revoked: usize,
}
