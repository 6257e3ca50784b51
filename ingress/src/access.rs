//! URL auth: who may open a published port's URL, checked by the ingress
//! before a request reaches the user's app.
//!
//! Every gated route belongs to a port, and every port has a mode
//! ([`UrlAuth`]): `private` (the default) admits the owner's bearer token, a
//! scoped token, or a browser holding our cookie; `token` admits bearer
//! tokens only; `public` admits anyone. Credentials:
//!
//! - the VM token (`Authorization: Bearer`), checked against its SHA-256;
//! - scoped tokens, login links, share links and session cookies: all
//!   *signed claims* `nb1.<payload>.<mac>` — the payload is JSON (kind, VM,
//!   host or ports, expiry, id), the MAC HMAC-SHA256 under this VM's key.
//!   Scoped tokens and share links must also still be on the grant list
//!   (which holds their SHA-256, never the token), so they can be revoked;
//!   a cookie got through a share link dies with the share.
//!
//! A login link (≤ 60 s, single use) or a share link opened at
//! `/__nestbox/auth?t=…` sets the host-only cookie `__Host-nestbox`
//! (`Secure`, `HttpOnly`, `SameSite=Lax`) and redirects to the clean URL. Before a
//! request goes on, the ingress removes its own cookie and an
//! `Authorization` it accepted, and sets [`CALLER_HEADER`] (any value the
//! client sent is dropped first), so the app learns who is calling and
//! never sees a credential of ours.
#![deny(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use data_encoding::BASE64URL_NOPAD;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use nestbox_api::types::UrlAuth;

use crate::pages;
use crate::proxy::Body;

/// The header that tells the app who is calling: `owner`, `token:<id>`,
/// `share:<id>` or `anonymous`. The ingress always sets it itself.
pub const CALLER_HEADER: HeaderName = HeaderName::from_static("x-nestbox-caller");
/// The session cookie's name (`__Host-`: Secure, `Path=/`, no `Domain`, so
/// it is the host's own and a sibling name cannot set or read it).
pub const COOKIE: &str = "__Host-nestbox";
/// Where login and share links are opened.
pub const AUTH_PATH: &str = "/__nestbox/auth";
/// Where a browser drops its cookie.
pub const LOGOUT_PATH: &str = "/__nestbox/logout";
/// The longest a login link works.
pub const LOGIN_TTL_SECS: u64 = 60;
/// The prefix of every signed claim.
const PREFIX: &str = "nb1.";

/// What a signed claim is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A browser login link (single use).
    Login,
    /// A share link (until revoked or expired).
    Share,
    /// The cookie a link sets.
    Session,
    /// A scoped bearer token.
    Token,
}

/// The signed payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// What it is.
    pub k: Kind,
    /// The VM it was issued by.
    pub vm: String,
    /// Its id (the grant's, or a fresh one for a login or a session).
    pub id: String,
    /// Unix seconds after which it is refused.
    pub exp: u64,
    /// The host it opens (links, sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h: Option<String>,
    /// The ports it opens (tokens; empty: every port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub p: Vec<u16>,
    /// Where a login link lands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<String>,
    /// The share a session came through (it ends with the share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<String>,
}

/// A revocable grant: a scoped token or a share link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Its id.
    pub id: String,
    /// A token or a share.
    pub kind: Kind,
    /// The ports it opens (a share: its one port; a token: empty for all).
    pub ports: Vec<u16>,
    /// The host a share opens.
    #[serde(default)]
    pub host: Option<String>,
    /// Unix seconds of its creation.
    pub created: u64,
    /// Unix seconds after which it is refused.
    pub expires: u64,
    /// SHA-256 of the token or link, hex.
    pub sha256: String,
}

/// The fixed part of the configuration.
#[derive(Clone)]
pub struct Settings {
    /// The VM's name (claims name it).
    pub vm: String,
    /// The HMAC key, this VM's own.
    pub key: [u8; 32],
    /// SHA-256 of the VM token.
    pub owner: [u8; 32],
    /// The mode of a port nobody has set.
    pub default: UrlAuth,
    /// Where an unauthenticated browser is sent (with `?url=` the URL it
    /// asked for), instead of the page that says how to log in.
    pub login_url: Option<String>,
    /// How long a login's cookie lasts, in seconds.
    pub session_secs: u64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("vm", &self.vm)
            .field("default", &self.default)
            .field("login_url", &self.login_url)
            .field("session_secs", &self.session_secs)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: Settings,
    key: ring::hmac::Key,
    modes: ArcSwap<HashMap<u16, UrlAuth>>,
    grants: ArcSwap<HashMap<String, Grant>>,
    /// Login links already used, until they expire.
    used: Mutex<HashMap<String, u64>>,
}

/// The URL auth state the ingress checks; clones share it.
#[derive(Clone)]
pub struct Access(Arc<Inner>);

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Access").field(&self.0.settings).finish()
    }
}

/// Who a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The owner: the VM token, or a login's cookie.
    Owner,
    /// A scoped token.
    Token(String),
    /// A share link's cookie.
    Share(String),
    /// Nobody we know (public URLs only).
    Anonymous,
}

impl Caller {
    fn header(&self) -> HeaderValue {
        let text = match self {
            Self::Owner => "owner".to_owned(),
            Self::Token(id) => format!("token:{id}"),
            Self::Share(id) => format!("share:{id}"),
            Self::Anonymous => "anonymous".to_owned(),
        };
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("anonymous"))
    }
}

/// Unix seconds now.
#[must_use]
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// SHA-256 of `text`, hex.
#[must_use]
pub fn sha256_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    data_encoding::HEXLOWER.encode(digest.as_ref())
}

/// A fresh random id with `prefix` (`t-`, `s-`).
#[must_use]
pub fn new_id(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}{n:016x}")
}

/// Equality that takes the same time wherever the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// Why a credential was refused (said on the page, never which secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not one of ours, or tampered with.
    Invalid,
    /// Past its expiry.
    Expired,
    /// Revoked (or never granted).
    Revoked,
    /// For another host, port or VM.
    Elsewhere,
    /// A login link opened a second time.
    Used,
}

impl Refusal {
    fn says(self) -> &'static str {
        match self {
            Self::Invalid => "is not valid",
            Self::Expired => "has expired",
            Self::Revoked => "has been revoked",
            Self::Elsewhere => "is for another URL",
            Self::Used => "has already been used (a login link works once)",
        }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision {
    /// Pass it on: the headers are cleaned and carry the caller.
    Pass(Caller),
    /// Answer it ourselves (a refusal, a login's redirect).
    Answer(Response<Body>),
}

impl Access {
    /// URL auth under `settings`, with no port set and no grant.
    #[must_use]
    pub fn new(settings: Settings) -> Self {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &settings.key);
        Self(Arc::new(Inner {
            settings,
            key,
            modes: ArcSwap::default(),
            grants: ArcSwap::default(),
            used: Mutex::default(),
        }))
    }

    /// The modes set by port (others have the default).
    pub fn set_modes(&self, modes: HashMap<u16, UrlAuth>) {
        self.0.modes.store(Arc::new(modes));
    }

    /// The grants in force (any other is refused from the next request).
    pub fn set_grants(&self, grants: impl IntoIterator<Item = Grant>) {
        let map = grants.into_iter().map(|g| (g.id.clone(), g)).collect();
        self.0.grants.store(Arc::new(map));
    }

    /// `port`'s mode.
    #[must_use]
    pub fn mode(&self, port: u16) -> UrlAuth {
        self.0
            .modes
            .load()
            .get(&port)
            .copied()
            .unwrap_or(self.0.settings.default)
    }

    /// The settings.
    #[must_use]
    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    /// Signs `claims`.
    #[must_use]
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).expect("claims serialize");
        let body = format!("{PREFIX}{}", BASE64URL_NOPAD.encode(&json));
        let tag = ring::hmac::sign(&self.0.key, body.as_bytes());
        format!("{body}.{}", BASE64URL_NOPAD.encode(tag.as_ref()))
    }

    /// The claims of `token` if its signature is ours and it is this VM's
    /// and not expired.
    ///
    /// # Errors
    /// The [`Refusal`].
    pub fn verify(&self, token: &str) -> Result<Claims, Refusal> {
        let (body, tag) = token.rsplit_once('.').ok_or(Refusal::Invalid)?;
        let payload = body.strip_prefix(PREFIX).ok_or(Refusal::Invalid)?;
        let tag = BASE64URL_NOPAD
            .decode(tag.as_bytes())
            .map_err(|_| Refusal::Invalid)?;
        ring::hmac::verify(&self.0.key, body.as_bytes(), &tag).map_err(|_| Refusal::Invalid)?;
        let json = BASE64URL_NOPAD
            .decode(payload.as_bytes())
            .map_err(|_| Refusal::Invalid)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| Refusal::Invalid)?;
        if claims.vm != self.0.settings.vm {
            return Err(Refusal::Elsewhere);
        }
        if claims.exp <= now() {
            return Err(Refusal::Expired);
        }
        Ok(claims)
    }

    /// The grant `id` of `kind`, if it is in force and `token` is the one
    /// it was made for.
    fn grant(&self, id: &str, kind: Kind, token: Option<&str>) -> Result<Grant, Refusal> {
        let grants = self.0.grants.load();
        let grant = grants
            .get(id)
            .filter(|g| g.kind == kind)
            .ok_or(Refusal::Revoked)?;
        if grant.expires <= now() {
            return Err(Refusal::Expired);
        }
        if let Some(token) = token
            && !same(sha256_hex(token).as_bytes(), grant.sha256.as_bytes())
        {
            return Err(Refusal::Revoked);
        }
        Ok(grant.clone())
    }

    fn is_owner(&self, token: &str) -> bool {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        same(digest.as_ref(), &self.0.settings.owner)
    }

    /// Who a bearer token is, for `port`.
    fn bearer(&self, token: &str, port: u16) -> Result<Caller, Refusal> {
        if self.is_owner(token) {
            return Ok(Caller::Owner);
        }
        let claims = self.verify(token)?;
        if claims.k != Kind::Token {
            return Err(Refusal::Invalid);
        }
        if !claims.p.is_empty() && !claims.p.contains(&port) {
            return Err(Refusal::Elsewhere);
        }
        self.grant(&claims.id, Kind::Token, Some(token))?;
        Ok(Caller::Token(claims.id))
    }

    /// Who a session cookie is, on `host`.
    fn session(&self, cookie: &str, host: &str) -> Result<Caller, Refusal> {
        let claims = self.verify(cookie)?;
        if claims.k != Kind::Session {
            return Err(Refusal::Invalid);
        }
        if claims.h.as_deref() != Some(host) {
            return Err(Refusal::Elsewhere);
        }
        match claims.s {
            None => Ok(Caller::Owner),
            Some(share) => {
                self.grant(&share, Kind::Share, None)?;
                Ok(Caller::Share(share))
            }
        }
    }

    /// Decides on a request for `host` (a route of `port`), cleaning its
    /// headers when it passes. `path_and_query` is the request target.
    pub fn decide(
        &self,
        host: &str,
        port: u16,
        path_and_query: &str,
        headers: &mut HeaderMap,
    ) -> Decision {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        if path == AUTH_PATH {
            return Decision::Answer(self.open_link(host, query));
        }
        if path == LOGOUT_PATH {
            return Decision::Answer(redirect("/", Some(clear_cookie())));
        }
        let mode = self.mode(port);
        headers.remove(&CALLER_HEADER);
        let cookie = take_cookie(headers);
        let bearer = bearer_of(headers);
        let mut caller = None;
        let mut refusal = None;
        if let Some(token) = bearer {
            match self.bearer(&token, port) {
                Ok(who) => {
                    // Ours: the app never sees it.
                    headers.remove(header::AUTHORIZATION);
                    caller = Some(who);
                }
                // On a public URL an Authorization we do not know is the
                // app's own.
                Err(why) if mode != UrlAuth::Public => refusal = Some(("token", why)),
                Err(_) => {}
            }
        }
        if caller.is_none()
            && mode != UrlAuth::Token
            && let Some(cookie) = cookie
        {
            match self.session(&cookie, host) {
                Ok(who) => caller = Some(who),
                Err(why) => refusal = refusal.or(Some(("session", why))),
            }
        }
        match (caller, mode) {
            (Some(who), _) => {
                headers.insert(CALLER_HEADER, who.header());
                Decision::Pass(who)
            }
            (None, UrlAuth::Public) => {
                headers.insert(CALLER_HEADER, Caller::Anonymous.header());
                Decision::Pass(Caller::Anonymous)
            }
            (None, mode) => {
                Decision::Answer(self.refuse(host, path_and_query, mode, refusal, headers))
            }
        }
    }

    /// `/__nestbox/auth?t=…`: a login or share link becomes a cookie.
    fn open_link(&self, host: &str, query: &str) -> Response<Body> {
        let Some(token) = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "t")
            .map(|(_, v)| v.into_owned())
        else {
            return pages::auth_refused("This link has no token (`?t=`): copy the whole link.");
        };
        match self.link_session(&token, host) {
            Ok((session, max_age, to)) => {
                let cookie = format!(
                    "{COOKIE}={session}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"
                );
                redirect(&to, HeaderValue::from_str(&cookie).ok())
            }
            Err(why) => pages::auth_refused(&format!(
                "This link {}. Ask for a new one: `nestbox url VM` makes a login link, \
                 `nestbox url share VM` a share link.",
                why.says()
            )),
        }
    }

    /// The session a link opens: its cookie, lifetime and landing path.
    fn link_session(&self, token: &str, host: &str) -> Result<(String, u64, String), Refusal> {
        let claims = self.verify(token)?;
        if claims.h.as_deref() != Some(host) {
            return Err(Refusal::Elsewhere);
        }
        let now = now();
        let (exp, share, to) = match claims.k {
            Kind::Login => {
                {
                    let mut used = self.0.used.lock();
                    used.retain(|_, exp| *exp > now);
                    if used.insert(claims.id.clone(), claims.exp).is_some() {
                        return Err(Refusal::Used);
                    }
                }
                let to = claims
                    .r
                    .filter(|r| is_local_path(r))
                    .unwrap_or_else(|| "/".into());
                (now + self.0.settings.session_secs, None, to)
            }
            Kind::Share => {
                let grant = self.grant(&claims.id, Kind::Share, Some(token))?;
                (grant.expires, Some(claims.id), "/".to_owned())
            }
            Kind::Session | Kind::Token => return Err(Refusal::Invalid),
        };
        let session = self.sign(&Claims {
            k: Kind::Session,
            vm: self.0.settings.vm.clone(),
            id: new_id("c-"),
            exp,
            h: Some(host.to_owned()),
            p: Vec::new(),
            r: None,
            s: share,
        });
        Ok((session, exp.saturating_sub(now), to))
    }

    fn refuse(
        &self,
        host: &str,
        path_and_query: &str,
        mode: UrlAuth,
        refusal: Option<(&str, Refusal)>,
        headers: &HeaderMap,
    ) -> Response<Body> {
        let browser = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"));
        if let (true, UrlAuth::Private, Some(login), None) =
            (browser, mode, &self.0.settings.login_url, refusal)
        {
            let wanted = format!("https://{host}{path_and_query}");
            let to: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("url", &wanted)
                .finish();
            let sep = if login.contains('?') { '&' } else { '?' };
            return redirect(&format!("{login}{sep}{to}"), None);
        }
        let why = match refusal {
            Some((what, why)) => format!("The {what} sent {}. ", why.says()),
            None => String::new(),
        };
        let how = match mode {
            UrlAuth::Token => {
                "It takes `Authorization: Bearer` with the VM token or a scoped token."
            }
            _ => {
                "Log in with the link `nestbox url VM` prints, open a share link, or send \
                 `Authorization: Bearer` with the VM token or a scoped token."
            }
        };
        pages::unauthorized(host, &format!("{why}{how}"))
    }
}

/// Whether `path` is a path on this host (no scheme, no `//host`): where a
/// login link may land.
#[must_use]
pub fn is_local_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.starts_with("//")
        && !path.starts_with("/\\")
        && !path.bytes().any(|b| b.is_ascii_control())
}

fn redirect(to: &str, cookie: Option<HeaderValue>) -> Response<Body> {
    let mut resp = Response::new(pages::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(location) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    if let Some(cookie) = cookie {
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax"
    ))
    .expect("a valid header value")
}

/// The bearer token of `Authorization`, if it has one.
fn bearer_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Removes our cookie from every `Cookie` header (HTTP/2 may send several),
/// keeping the app's own, and returns its value.
fn take_cookie(headers: &mut HeaderMap) -> Option<String> {
    let mut ours = None;
    let mut kept: Vec<String> = Vec::new();
    let mut touched = false;
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else {
            kept.push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            continue;
        };
        let mut rest = Vec::new();
        for pair in text.split(';') {
            let pair = pair.trim();
            match pair.split_once('=') {
                Some((name, value)) if name.trim() == COOKIE => {
                    ours.get_or_insert_with(|| value.trim().to_owned());
                    touched = true;
                }
                _ if pair.is_empty() => {}
                _ => rest.push(pair),
            }
        }
        kept.push(rest.join("; "));
    }
    if touched {
        headers.remove(header::COOKIE);
        for value in kept.iter().filter(|v| !v.is_empty()) {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.append(header::COOKIE, v);
            }
        }
    }
    ours
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(default: UrlAuth) -> Access {
        let owner = ring::digest::digest(&ring::digest::SHA256, b"owner-token");
        let mut hash = [0u8; 32];
        hash.copy_from_slice(owner.as_ref());
        Access::new(Settings {
            vm: "web".into(),
            key: [7; 32],
            owner: hash,
            default,
            login_url: None,
            session_secs: 3600,
        })
    }

    fn link(a: &Access, kind: Kind, id: &str, exp: u64, host: &str) -> String {
        a.sign(&Claims {
            k: kind,
            vm: "web".into(),
            id: id.into(),
            exp,
            h: Some(host.into()),
            p: vec![],
            r: Some("/app?x=1".into()),
            s: None,
        })
    }

    fn cookie_of(resp: &Response<Body>) -> String {
        let set = resp.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(set.contains("Secure; HttpOnly; SameSite=Lax"), "{set}");
        assert!(set.contains("Path=/"), "{set}");
        set.split(';').next().unwrap().to_owned()
    }

    fn status(d: &Decision) -> Option<StatusCode> {
        match d {
            Decision::Answer(r) => Some(r.status()),
            Decision::Pass(_) => None,
        }
    }

    #[test]
    fn private_refuses_strangers_and_admits_the_owner_without_forwarding_the_token() {
        let a = access(UrlAuth::Private);
        let mut h = HeaderMap::new();
        h.insert(CALLER_HEADER, HeaderValue::from_static("owner"));
        assert_eq!(
            status(&a.decide("web.test", 8080, "/", &mut h)),
            Some(StatusCode::UNAUTHORIZED)
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer wrong"),
        );
        assert_eq!(
            status(&a.decide("web.test", 8080, "/", &mut h)),
            Some(StatusCode::UNAUTHORIZED)
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer owner-token"),
        );
        assert!(matches!(
            a.decide("web.test", 8080, "/", &mut h),
            Decision::Pass(Caller::Owner)
        ));
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert_eq!(h[CALLER_HEADER], "owner");
    }

    #[test]
    fn public_passes_the_apps_own_authorization_and_a_spoofed_caller_is_replaced() {
        let a = access(UrlAuth::Public);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpw"),
        );
        h.insert(CALLER_HEADER, HeaderValue::from_static("owner"));
        assert!(matches!(
            a.decide("web.test", 80, "/", &mut h),
            Decision::Pass(Caller::Anonymous)
        ));
        assert_eq!(h[header::AUTHORIZATION], "Basic dTpw");
        assert_eq!(h[CALLER_HEADER], "anonymous");
    }

    #[test]
    fn a_login_link_works_once_sets_a_host_cookie_and_lands_on_its_path() {
        let a = access(UrlAuth::Private);
        let token = link(&a, Kind::Login, "l1", now() + 60, "web.test");
        let path = format!("{AUTH_PATH}?t={token}");
        let Decision::Answer(resp) = a.decide("web.test", 8080, &path, &mut HeaderMap::new())
        else {
            panic!("a link is answered by the ingress")
        };
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()[header::LOCATION], "/app?x=1");
        let cookie = cookie_of(&resp);
        assert_eq!(
            status(&a.decide("web.test", 8080, &path, &mut HeaderMap::new())),
            Some(StatusCode::FORBIDDEN)
        );
        // The cookie admits, and is taken out; the app's cookies stay.
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=1; {cookie}; b=2")).unwrap(),
        );
        assert!(matches!(
            a.decide("web.test", 8080, "/", &mut h),
            Decision::Pass(Caller::Owner)
        ));
        assert_eq!(h[header::COOKIE], "a=1; b=2");
        // Not on another host, not in token mode.
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert_eq!(
            status(&a.decide("3000.web.test", 3000, "/", &mut h)),
            Some(StatusCode::UNAUTHORIZED)
        );
        a.set_modes(HashMap::from([(8080, UrlAuth::Token)]));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert_eq!(
            status(&a.decide("web.test", 8080, "/", &mut h)),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert!(!h.contains_key(header::COOKIE));
    }

    #[test]
    fn expired_tampered_and_foreign_links_are_refused() {
        let a = access(UrlAuth::Private);
        let old = link(&a, Kind::Login, "l2", now() - 1, "web.test");
        assert_eq!(a.verify(&old), Err(Refusal::Expired));
        let good = link(&a, Kind::Login, "l3", now() + 60, "web.test");
        let mut bad = good.clone();
        bad.replace_range(5..6, if &good[5..6] == "A" { "B" } else { "A" });
        assert_eq!(a.verify(&bad), Err(Refusal::Invalid));
        let other = Access::new(Settings {
            key: [8; 32],
            ..a.settings().clone()
        });
        let foreign = link(&other, Kind::Login, "l4", now() + 60, "web.test");
        assert_eq!(a.verify(&foreign), Err(Refusal::Invalid), "another key");
        let mut claims = a.verify(&good).unwrap();
        claims.vm = "other".into();
        assert_eq!(
            a.verify(&a.sign(&claims)),
            Err(Refusal::Elsewhere),
            "another VM"
        );
        let path = format!("{AUTH_PATH}?t={good}");
        assert_eq!(
            status(&a.decide("api.web.test", 1, &path, &mut HeaderMap::new())),
            Some(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn a_share_and_its_cookies_end_when_it_is_revoked() {
        let a = access(UrlAuth::Private);
        let token = link(&a, Kind::Share, "s-1", now() + 600, "web.test");
        let grant = Grant {
            id: "s-1".into(),
            kind: Kind::Share,
            ports: vec![8080],
            host: Some("web.test".into()),
            created: now(),
            expires: now() + 600,
            sha256: sha256_hex(&token),
        };
        let path = format!("{AUTH_PATH}?t={token}");
        assert_eq!(
            status(&a.decide("web.test", 8080, &path, &mut HeaderMap::new())),
            Some(StatusCode::FORBIDDEN),
            "not granted"
        );
        a.set_grants([grant]);
        let Decision::Answer(resp) = a.decide("web.test", 8080, &path, &mut HeaderMap::new())
        else {
            panic!()
        };
        let cookie = cookie_of(&resp);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert_eq!(
            a.decide("web.test", 8080, "/", &mut h.clone()).pass(),
            Some(Caller::Share("s-1".into()))
        );
        a.set_grants([]);
        assert_eq!(
            status(&a.decide("web.test", 8080, "/", &mut h)),
            Some(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn scoped_tokens_open_their_ports_only_until_revoked() {
        let a = access(UrlAuth::Token);
        let token = a.sign(&Claims {
            k: Kind::Token,
            vm: "web".into(),
            id: "t-1".into(),
            exp: now() + 600,
            h: None,
            p: vec![3000],
            r: None,
            s: None,
        });
        let grant = Grant {
            id: "t-1".into(),
            kind: Kind::Token,
            ports: vec![3000],
            host: None,
            created: now(),
            expires: now() + 600,
            sha256: sha256_hex(&token),
        };
        a.set_grants([grant]);
        let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, bearer.clone());
        assert_eq!(
            a.decide("3000.web.test", 3000, "/", &mut h).pass(),
            Some(Caller::Token("t-1".into()))
        );
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, bearer.clone());
        assert_eq!(
            status(&a.decide("8080.web.test", 8080, "/", &mut h)),
            Some(StatusCode::UNAUTHORIZED)
        );
        a.set_grants([]);
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, bearer);
        assert_eq!(
            status(&a.decide("3000.web.test", 3000, "/", &mut h)),
            Some(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn only_local_paths_are_landing_places() {
        assert!(is_local_path("/a/b?c"));
        for p in [
            "//evil.test/",
            "https://evil.test/",
            "/\\evil.test",
            "",
            "a",
        ] {
            assert!(!is_local_path(p), "{p}");
        }
    }

    impl Decision {
        fn pass(self) -> Option<Caller> {
            match self {
                Decision::Pass(c) => Some(c),
                Decision::Answer(_) => None,
            }
        }
    }
}
