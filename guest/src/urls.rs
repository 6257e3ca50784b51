//! URL auth's state in the guest: each port's mode, the grants (scoped
//! tokens, share links) and the VM's signing key, kept on the platform's
//! disk (`<data>/urls/`) and handed to the ingress ([`Access`]), which
//! checks every request to a published port.
//!
//! Each change is written (atomically, fsynced) before it takes effect and
//! before it is answered: a crash loses no answered change, and a change
//! that was not written is not in force. The key (32 random bytes, made on
//! first start) never leaves the platform's disk; grants hold the SHA-256
//! of their token or link, never the token.
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use nestbox_api::types::{Link, ScopedToken, Share, UrlAuth};
use nestbox_ingress::access::{self, Access, Claims, Grant, Kind, Settings};
use serde::{Deserialize, Serialize};

use crate::publish::Names;

/// `[urls]` of the guest configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UrlSettings {
    /// The mode of a port nobody has set: `private` (the default),
    /// `public` or `token`.
    pub default_auth: UrlAuth,
    /// Where a browser without credentials is sent (`?url=` names the URL
    /// it asked for), instead of the page that says how to log in.
    pub login_url: Option<String>,
    /// How long a browser stays logged in after a login link, in hours.
    pub session_hours: u64,
}

impl Default for UrlSettings {
    fn default() -> Self {
        Self {
            default_auth: UrlAuth::Private,
            login_url: None,
            session_hours: 24,
        }
    }
}

/// The shortest and longest share link.
pub const SHARE_TTL_SECS: std::ops::RangeInclusive<u64> = 60..=24 * 3600;
/// The shortest and longest scoped token.
pub const TOKEN_TTL_SECS: std::ops::RangeInclusive<u64> = 60..=365 * 24 * 3600;

/// What is kept on the disk.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    modes: BTreeMap<u16, UrlAuth>,
    grants: Vec<Grant>,
}

/// Why a URL auth operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(String),
    /// No such grant.
    #[error("no {0} with id {1:?}")]
    NotFound(&'static str, String),
    /// The state could not be written (nothing changed).
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// URL auth's state; cheap to clone.
#[derive(Clone)]
pub struct Urls {
    access: Access,
    names: Names,
    file: PathBuf,
    stored: std::sync::Arc<tokio::sync::Mutex<Stored>>,
}

impl std::fmt::Debug for Urls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Urls")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

fn ms(secs: u64) -> u64 {
    secs.saturating_mul(1000)
}

impl Urls {
    /// Opens (or makes) the state in `dir`, for the VM `names` whose token
    /// hashes to `owner`. Grants past their expiry are dropped.
    ///
    /// # Errors
    /// The key or the state cannot be read or made.
    #[expect(
        clippy::disallowed_methods,
        reason = "runs once at start, before the runtime serves"
    )]
    pub fn open(
        dir: &Path,
        settings: &UrlSettings,
        names: Names,
        owner: [u8; 32],
    ) -> Result<Self, UrlError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| UrlError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key_file = dir.join("key");
        let key: [u8; 32] = match std::fs::read(&key_file) {
            Ok(bytes) => bytes.try_into().map_err(|_| UrlError::Io {
                path: key_file.clone(),
                source: std::io::Error::other("not 32 bytes: remove it and restart to make a new key (every link and token is then refused)"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                nestbox_durable::write_atomic(&key_file, &key, 0o600)
                    .map_err(|e| io(&key_file)(e.into()))?;
                key
            }
            Err(e) => return Err(io(&key_file)(e)),
        };
        let file = dir.join("state.json");
        let mut stored: Stored = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                // Written atomically, so only a bad edit gets here; the
                // defaults are the safe side (private, no grant).
                tracing::error!(file = %file.display(), %err, "URL auth state unreadable; starting from the defaults");
                Stored::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(io(&file)(e)),
        };
        let now = access::now();
        stored.grants.retain(|g| g.expires > now);
        let access = Access::new(Settings {
            vm: names.name.clone(),
            key,
            owner,
            default: settings.default_auth,
            login_url: settings.login_url.clone(),
            session_secs: settings.session_hours.max(1) * 3600,
        });
        let urls = Self {
            access,
            names,
            file,
            stored: std::sync::Arc::new(tokio::sync::Mutex::new(Stored::default())),
        };
        urls.apply(&stored);
        *urls.stored.try_lock().expect("not shared yet") = stored;
        Ok(urls)
    }

    /// What the ingress checks requests with.
    #[must_use]
    pub fn access(&self) -> &Access {
        &self.access
    }

    fn apply(&self, stored: &Stored) {
        self.access.set_modes(
            stored
                .modes
                .iter()
                .map(|(p, m)| (*p, *m))
                .collect::<HashMap<_, _>>(),
        );
        self.access.set_grants(stored.grants.iter().cloned());
    }

    /// Writes `next`, then puts it in force.
    async fn commit(&self, current: &mut Stored, next: Stored) -> Result<(), UrlError> {
        let bytes = serde_json::to_vec_pretty(&next).expect("the state serializes");
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || nestbox_durable::write_atomic(&file, &bytes, 0o600))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r.map_err(Into::into))
            .map_err(|source| UrlError::Io {
                path: self.file.clone(),
                source,
            })?;
        self.apply(&next);
        *current = next;
        Ok(())
    }

    /// `port`'s mode.
    #[must_use]
    pub fn mode(&self, port: u16) -> UrlAuth {
        self.access.mode(port)
    }

    /// Sets `port`'s mode (in force for the next request).
    ///
    /// # Errors
    /// [`UrlError::Io`]: not written, not changed.
    pub async fn set_mode(&self, port: u16, mode: UrlAuth) -> Result<(), UrlError> {
        let mut current = self.stored.lock().await;
        let mut next = current.clone();
        next.modes.insert(port, mode);
        self.commit(&mut current, next).await
    }

    /// The host of `port`'s URL, or of the primary URL.
    fn host(&self, port: u16, primary: bool) -> String {
        if primary {
            self.names.vm_host()
        } else {
            self.names.port_host(port)
        }
    }

    /// `port`'s URL, or the primary URL.
    #[must_use]
    pub fn url(&self, port: u16, primary: bool) -> String {
        format!("https://{}/", self.host(port, primary))
    }

    /// A login link (60 s, single use) to `port`'s URL (or the primary
    /// URL), landing on `path`.
    ///
    /// # Errors
    /// [`UrlError::Invalid`] for a path that is not on the same host.
    pub fn login_link(&self, port: u16, primary: bool, path: &str) -> Result<Link, UrlError> {
        if !access::is_local_path(path) {
            return Err(UrlError::Invalid(format!(
                "path {path:?} must be a path on the same host, starting with one '/'"
            )));
        }
        let host = self.host(port, primary);
        let exp = access::now() + access::LOGIN_TTL_SECS;
        let token = self.access.sign(&Claims {
            k: Kind::Login,
            vm: self.names.name.clone(),
            id: access::new_id("l-"),
            exp,
            h: Some(host.clone()),
            p: Vec::new(),
            r: Some(path.to_owned()),
            s: None,
        });
        Ok(Link {
            url: format!("https://{host}{}?t={token}", access::AUTH_PATH),
            expires_ms: ms(exp),
        })
    }

    /// A share link to `port`'s URL (or the primary URL) for `ttl_secs`.
    ///
    /// # Errors
    /// [`UrlError::Invalid`] for a TTL out of range; [`UrlError::Io`].
    pub async fn share(&self, port: u16, primary: bool, ttl_secs: u64) -> Result<Share, UrlError> {
        if !SHARE_TTL_SECS.contains(&ttl_secs) {
            return Err(UrlError::Invalid(format!(
                "ttl_secs {ttl_secs} is out of range: a share link lasts 60 s to 24 h (60 to 86400)"
            )));
        }
        let host = self.host(port, primary);
        let (token, grant) =
            self.signed_grant(Kind::Share, ttl_secs, Some(host.clone()), vec![port]);
        let url = format!("https://{host}{}?t={token}", access::AUTH_PATH);
        let share = self.share_of(&grant, Some(url));
        self.grant(grant).await?;
        Ok(share)
    }

    /// A new grant of `kind` for `ttl_secs` (a share names its `host`; a
    /// token, its `ports`) and the signed token it is for.
    fn signed_grant(
        &self,
        kind: Kind,
        ttl_secs: u64,
        host: Option<String>,
        ports: Vec<u16>,
    ) -> (String, Grant) {
        let now = access::now();
        let id = access::new_id(if kind == Kind::Share { "s-" } else { "t-" });
        let token = self.access.sign(&Claims {
            k: kind,
            vm: self.names.name.clone(),
            id: id.clone(),
            exp: now + ttl_secs,
            h: host.clone(),
            p: if kind == Kind::Token {
                ports.clone()
            } else {
                Vec::new()
            },
            r: None,
            s: None,
        });
        let grant = Grant {
            id,
            kind,
            ports,
            host,
            created: now,
            expires: now + ttl_secs,
            sha256: access::sha256_hex(&token),
        };
        (token, grant)
    }

    fn share_of(&self, g: &Grant, url: Option<String>) -> Share {
        Share {
            id: g.id.clone(),
            port: g.ports.first().copied().unwrap_or_default(),
            primary: g.host.as_deref() == Some(self.names.vm_host().as_str()),
            created_ms: ms(g.created),
            expires_ms: ms(g.expires),
            url,
        }
    }

    /// A bearer token for `ports` (empty: all) for `ttl_secs`.
    ///
    /// # Errors
    /// [`UrlError::Invalid`] for a TTL or port out of range; [`UrlError::Io`].
    pub async fn token(&self, ports: Vec<u16>, ttl_secs: u64) -> Result<ScopedToken, UrlError> {
        if !TOKEN_TTL_SECS.contains(&ttl_secs) {
            return Err(UrlError::Invalid(format!(
                "ttl_secs {ttl_secs} is out of range: a token lasts 60 s to 365 days (60 to 31536000)"
            )));
        }
        if ports.contains(&0) {
            return Err(UrlError::Invalid("port 0 is not a port".into()));
        }
        let (token, grant) = self.signed_grant(Kind::Token, ttl_secs, None, ports.clone());
        let (id, created, expires) = (grant.id.clone(), grant.created, grant.expires);
        self.grant(grant).await?;
        Ok(ScopedToken {
            id,
            ports,
            created_ms: ms(created),
            expires_ms: ms(expires),
            token: Some(token),
        })
    }

    async fn grant(&self, grant: Grant) -> Result<(), UrlError> {
        let mut current = self.stored.lock().await;
        let mut next = current.clone();
        let now = access::now();
        next.grants.retain(|g| g.expires > now);
        next.grants.push(grant);
        self.commit(&mut current, next).await
    }

    async fn grants(&self, kind: Kind) -> Vec<Grant> {
        let now = access::now();
        self.stored
            .lock()
            .await
            .grants
            .iter()
            .filter(|g| g.kind == kind && g.expires > now)
            .cloned()
            .collect()
    }

    /// The share links in force.
    pub async fn shares(&self) -> Vec<Share> {
        self.grants(Kind::Share)
            .await
            .iter()
            .map(|g| self.share_of(g, None))
            .collect()
    }

    /// The scoped tokens in force.
    pub async fn tokens(&self) -> Vec<ScopedToken> {
        self.grants(Kind::Token)
            .await
            .into_iter()
            .map(|g| ScopedToken {
                id: g.id,
                ports: g.ports,
                created_ms: ms(g.created),
                expires_ms: ms(g.expires),
                token: None,
            })
            .collect()
    }

    /// Revokes the grants of `kind` that `id` names (all of them for
    /// `None`); returns how many. From the next request on they are
    /// refused, and so is every cookie opened through a revoked share.
    ///
    /// # Errors
    /// [`UrlError::NotFound`] for an id that is not in force; [`UrlError::Io`].
    pub async fn revoke(&self, kind: Kind, id: Option<&str>) -> Result<usize, UrlError> {
        let mut current = self.stored.lock().await;
        let mut next = current.clone();
        let before = next.grants.len();
        next.grants
            .retain(|g| g.kind != kind || id.is_some_and(|id| g.id != id));
        let revoked = before - next.grants.len();
        if let (Some(id), 0) = (id, revoked) {
            let what = if kind == Kind::Share {
                "share link"
            } else {
                "token"
            };
            return Err(UrlError::NotFound(what, id.to_owned()));
        }
        self.commit(&mut current, next).await?;
        Ok(revoked)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "a test's own files")]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            name: "web".into(),
            domain: "test".into(),
        }
    }

    #[tokio::test]
    async fn changes_are_kept_across_a_restart_and_revocations_take_effect() {
        let dir = std::env::temp_dir().join(format!("nb-urls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let urls = Urls::open(&dir, &UrlSettings::default(), names(), [1; 32]).unwrap();
        assert_eq!(urls.mode(8080), UrlAuth::Private);
        urls.set_mode(3000, UrlAuth::Public).await.unwrap();
        let share = urls.share(8080, true, 600).await.unwrap();
        assert!(
            share
                .url
                .as_deref()
                .unwrap()
                .starts_with("https://web.test/__nestbox/auth?t=nb1.")
        );
        let token = urls.token(vec![3000], 3600).await.unwrap();
        assert!(urls.share(8080, true, 59).await.is_err());
        assert!(urls.share(8080, true, 86_401).await.is_err());
        assert!(urls.login_link(8080, true, "//evil.test/").is_err());

        let again = Urls::open(&dir, &UrlSettings::default(), names(), [1; 32]).unwrap();
        assert_eq!(again.mode(3000), UrlAuth::Public);
        assert_eq!(again.shares().await.len(), 1);
        assert_eq!(again.tokens().await[0].id, token.id);
        // The same key: a link of the first run verifies in the second.
        assert!(
            again
                .access()
                .verify(token.token.as_deref().unwrap())
                .is_ok()
        );
        assert!(matches!(
            again.revoke(Kind::Share, Some("s-none")).await,
            Err(UrlError::NotFound(..))
        ));
        assert_eq!(again.revoke(Kind::Share, None).await.unwrap(), 1);
        assert_eq!(again.revoke(Kind::Token, Some(&token.id)).await.unwrap(), 1);
        let text = std::fs::read_to_string(dir.join("state.json")).unwrap();
        assert!(!text.contains("nb1."), "only hashes are stored: {text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
