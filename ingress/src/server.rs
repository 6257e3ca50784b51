//! The listeners: HTTPS (TLS with ALPN h2 / http/1.1, and acme-tls/1 for
//! TLS-ALPN-01) and plain HTTP (ACME HTTP-01 answers, redirects to https).
//!
//! Limits that protect the proxy: a TLS handshake timeout, a header read
//! timeout (slowloris; for HTTP/1.1 it also bounds how long an idle
//! keep-alive connection waits for its next request), a maximum header size,
//! and a maximum number of concurrent connections (accepting pauses at the
//! limit). Shutdown stops accepting and lets in-flight requests finish, up to
//! a drain deadline.
#![deny(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::proxy::{Body, Peer, Proxy};
use crate::tls::ACME_TLS_ALPN;

/// Client-facing limits. Every field has a default that works out of the box.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Seconds a client has to send a request's headers (and, on HTTP/1.1,
    /// to start the next request on a kept-alive connection).
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to finish the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Largest request head accepted, in bytes.
    pub max_header_bytes: usize,
    /// Concurrent client connections; accepting pauses at the limit.
    pub max_connections: usize,
    /// Seconds in-flight requests get to finish on shutdown.
    pub drain_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout_secs: 10,
            tls_handshake_timeout_secs: 10,
            max_header_bytes: 64 * 1024,
            max_connections: 20_000,
            drain_timeout_secs: 30,
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone). Its
/// future holds no borrow of the value, so the accept loops stay `Send`.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Pending HTTP-01 answers: token → key authorization.
pub type Http01 = Arc<ArcSwap<HashMap<String, String>>>;

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs))
        .max_buf_size(limits.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Serves HTTPS on `listener` until `shutdown` turns true, then drains.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    proxy: Proxy,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder(&limits));
    // One Arc clone per request instead of one per field.
    let proxy = Arc::new(proxy);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = stopped(&mut shutdown) => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(?err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake = Duration::from_secs(limits.tls_handshake_timeout_secs);
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, ?err, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                // TLS-ALPN-01 validation: the handshake was the answer.
                return;
            }
            let client = Arc::new(Peer::new(peer));
            let service = service_fn(move |req: Request<Incoming>| {
                let proxy = proxy.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, &client).await) }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(err) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, ?err, "connection ended with an error");
            }
        });
    }
    drain(graceful, &limits).await;
}

async fn drain(graceful: GracefulShutdown, limits: &Limits) {
    let deadline = Duration::from_secs(limits.drain_timeout_secs);
    if tokio::time::timeout(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain deadline; closing them");
    }
}

fn small(status: StatusCode, text: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text.to_owned()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The plain-HTTP answer: an HTTP-01 key authorization, a page saying
/// that the name's certificate waits for the ACME order budget, or a
/// redirect to the same URL over https.
#[must_use]
pub fn http_answer(req: &Request<Incoming>, acme: &crate::acme::Challenges) -> Response<Body> {
    if let Some(token) = req
        .uri()
        .path()
        .strip_prefix("/.well-known/acme-challenge/")
    {
        return match acme.http01.load().get(token) {
            Some(key_auth) => small(StatusCode::OK, key_auth),
            None => small(StatusCode::NOT_FOUND, "no such ACME challenge"),
        };
    }
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(crate::routes::normalize_host)
    else {
        return small(StatusCode::BAD_REQUEST, "no Host header");
    };
    if let Some(at) = acme.waiting.load().get(&host) {
        let wait = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs();
        let mut resp = small(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "https://{host}/ has no certificate yet: this VM has started as many certificate \
                 orders as it may in an hour (the ACME budget, `orders_per_hour`). Its order \
                 starts in about {wait} s; HTTPS answers once it is issued.\n"
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&wait.max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return resp;
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut resp = small(StatusCode::PERMANENT_REDIRECT, "use https\n");
    if let Ok(location) = HeaderValue::from_str(&format!("https://{host}{path}")) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

/// Serves plain HTTP on `listener` (HTTP-01 and redirects) until `shutdown`.
pub async fn serve_http(
    listener: TcpListener,
    acme: crate::acme::Challenges,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder(&limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = stopped(&mut shutdown) => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    tracing::warn!(?err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let acme = acme.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = http_answer(&req, &acme);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    drain(graceful, &limits).await;
}
