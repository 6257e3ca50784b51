//! One proxied request: route by host, rewrite headers, stream both bodies,
//! pass upgrades (WebSocket) through, and answer failures with a page that
//! says what went wrong.
#![deny(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use crate::access::{Access, Decision};
use crate::client::{BackendClient, ClientError};
use crate::pages;
use crate::routes::RouteTable;

/// Response body: the backend's, streamed, one of ours, or a local
/// service's (which need not be `Sync`: axum's are not).
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Timeouts toward backends.
#[derive(Clone, Copy, Debug)]
pub struct BackendLimits {
    /// Connecting to the backend.
    pub connect_timeout: Duration,
    /// From the end of the request body to the response head (a slow
    /// upload is not a slow backend).
    pub response_timeout: Duration,
    /// How long an idle kept-alive backend connection is kept.
    pub pool_idle_timeout: Duration,
}

impl Default for BackendLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_mins(1),
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// The proxy: a route table and a pooled client that dials backends.
#[derive(Clone, Debug)]
pub struct Proxy {
    routes: RouteTable,
    client: BackendClient,
    limits: BackendLimits,
    access: Option<Access>,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including those `Connection` names. For an
/// upgrade, `Connection: upgrade` and `Upgrade` are put back.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade = headers.get(header::UPGRADE).cloned();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if keep_upgrade && let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The host a request is for, as a `Host` value: `:authority` (HTTP/2) or
/// `Host`.
fn request_host(req: &Request<Incoming>) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

/// The client of a connection, with its address already rendered for
/// `X-Forwarded-For` (once per connection, not per request).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// `addr`'s IP as a header value.
    pub ip_header: HeaderValue,
}

impl Peer {
    /// Describes the client at `addr`.
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        let ip_header = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Self { addr, ip_header }
    }

    fn ip_text(&self) -> &str {
        self.ip_header.to_str().unwrap_or_default()
    }
}

impl Proxy {
    /// A proxy over `routes`.
    #[must_use]
    pub fn new(routes: RouteTable, limits: BackendLimits) -> Self {
        let client = BackendClient::new(
            limits.connect_timeout,
            limits.pool_idle_timeout,
            limits.response_timeout,
        );
        client.follow(&routes);
        Self {
            routes,
            client,
            limits,
            access: None,
        }
    }

    /// This proxy with `access` deciding who may use the gated routes.
    #[must_use]
    pub fn with_access(mut self, access: Option<Access>) -> Self {
        self.access = access;
        self
    }

    /// Proxies one request from `peer`.
    pub async fn handle(&self, mut req: Request<Incoming>, peer: &Peer) -> Response<Body> {
        // Framing: hyper refuses conflicting Content-Lengths and, given both
        // Content-Length and Transfer-Encoding, lets the latter win, drops
        // the former and closes the connection after the response (RFC 9112
        // §6.3). The body is re-framed toward the backend, so nothing sent
        // after the chunked end can reach it as a request.
        let Some(host) = request_host(&req) else {
            return pages::bad_request("The request names no host.");
        };
        let Some(route) = host.to_str().ok().and_then(|h| self.routes.get(h)) else {
            let shown = host
                .to_str()
                .map_or_else(|_| "?".to_owned(), crate::routes::normalize_host);
            return pages::no_route(&shown);
        };
        if let Some(local) = &route.local {
            return local.0.call(req).await;
        }
        let port = route.backend.addr.port();
        if let Some(gate) = route.gate {
            let Some(access) = &self.access else {
                return pages::no_access();
            };
            // A clone of the target shares its bytes (no copy per request).
            let target = req.uri().path_and_query().cloned();
            let target = target.as_ref().map_or("/", |p| p.as_str());
            if let Decision::Answer(resp) =
                access.decide(&route.host, gate, target, req.headers_mut())
            {
                return resp;
            }
        }
        let upgrade = is_upgrade(&req);

        // Rewrite for the backend: origin-form over HTTP/1.1 to b<id>.
        let mut target = http::uri::Parts::default();
        target.scheme = Some(http::uri::Scheme::HTTP);
        target.authority = Some(route.authority.clone());
        target.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        let Ok(uri) = Uri::from_parts(target) else {
            return pages::bad_request("The request target is not valid.");
        };
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.insert(header::HOST, host);
        let forwarded_for = match parts.headers.get(&X_FORWARDED_FOR) {
            Some(prior) => {
                let joined = format!("{}, {}", prior.to_str().unwrap_or_default(), peer.ip_text());
                HeaderValue::from_str(&joined).unwrap_or_else(|_| peer.ip_header.clone())
            }
            None => peer.ip_header.clone(),
        };
        parts.headers.insert(X_FORWARDED_FOR, forwarded_for);
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        parts
            .headers
            .insert(X_FORWARDED_HOST, route.host_header.clone());
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let out = Request::from_parts(parts, body);
        let host = &route.host;

        let resp = match self.client.send(&route, out).await {
            Err(err) => return self.failure(host, port, &err),
            Ok(resp) => resp,
        };

        let (mut parts, body) = resp.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // The client answers 101 only to an upgrade request.
            if let (Some(client_upgrade), Some((mut backend, early))) =
                (client_upgrade, body.into_upgraded())
            {
                tokio::spawn(async move {
                    match client_upgrade.await {
                        Ok(client) => {
                            let mut client = TokioIo::new(client);
                            if client.write_all(&early).await.is_ok() {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                            }
                        }
                        Err(err) => tracing::debug!(?err, "upgrade failed"),
                    }
                });
            }
            strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(parts, pages::empty());
        }
        strip_hop_by_hop(&mut parts.headers, false);
        Response::from_parts(parts, body.boxed_unsync())
    }

    fn failure(&self, host: &str, port: u16, err: &ClientError) -> Response<Body> {
        tracing::info!(%host, port, %err, "backend failed");
        match err {
            ClientError::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                pages::too_slow(port, self.limits.connect_timeout.as_secs())
            }
            ClientError::Connect(_) => pages::not_listening(port),
            ClientError::Timeout(after) => pages::too_slow(port, after.as_secs()),
            ClientError::Io(_) | ClientError::Protocol(_) | ClientError::RequestBody(_) => {
                pages::backend_failed(port)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut up = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(up.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!up.contains_key("x-secret"));
    }
}
