//! The VM's own API, served by the VM: HTTP/1.1 JSON under `/v1`, behind a
//! bearer token, on a loopback TCP port of the root namespace (the ingress
//! routes `https://api.<vm>.<domain>/` there) and on a Unix socket that is
//! mounted into the inner container, so user code can manage its own
//! services. Every response carries the API version header; errors are
//! `{"error": {"code", "message"}}`. The document `guest/openapi.json`
//! describes it, and a test holds the two together.
#![deny(clippy::disallowed_methods)]

mod auth;
mod body;
mod bounce;
mod certificates;
mod error;
#[cfg(feature = "faults")]
mod faults;
mod logs;
mod ports;
mod services;
mod status;

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};

pub use auth::TokenHash;
pub use body::Body;
pub use error::ApiError;

use crate::logs::Logs;
use crate::publish::Publisher;
use crate::services::Manager;

/// The API version this guest serves.
pub const API_VERSION: &str = "1";
/// The header that carries it on every response.
pub const VERSION_HEADER: &str = "nestbox-api-version";
/// The guest's version.
pub const GUEST_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Every operation: method, path template (`{name}` is one segment).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/status"),
    ("GET", "/v1/ports"),
    ("GET", "/v1/ports/events"),
    ("GET", "/v1/services"),
    ("POST", "/v1/services"),
    ("GET", "/v1/services/{name}"),
    ("DELETE", "/v1/services/{name}"),
    ("POST", "/v1/services/{name}/start"),
    ("POST", "/v1/services/{name}/stop"),
    ("GET", "/v1/services/{name}/logs"),
    ("POST", "/v1/bounce"),
    ("POST", "/v1/certificates/renew"),
];

/// The inner container's state, as the API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum ContainerState {
    /// Being built.
    Starting,
    /// Up; services run in it.
    Running,
    /// Being torn down and built again.
    Bouncing,
    /// Could not be built (why).
    Failed(String),
}

/// Requests the API passes to the guest's supervisor.
#[derive(Debug)]
pub enum Control {
    /// Rebuild the inner container; answer when services are up again.
    Bounce(oneshot::Sender<Result<(), String>>),
}

/// What the API works with.
#[derive(Debug)]
pub struct Parts {
    /// The bearer token's hash.
    pub token: TokenHash,
    /// Open ports and their stream.
    pub publisher: Publisher,
    /// User services.
    pub services: Manager,
    /// Their logs.
    pub logs: Logs,
    /// Requests to the supervisor.
    pub control: mpsc::Sender<Control>,
    /// The container's state.
    pub container: watch::Receiver<ContainerState>,
    /// The container's resource limits in force.
    pub limits: crate::resources::Applied,
    /// Where the container's writable layer lives (its disk's usage is
    /// reported).
    pub user_dir: std::path::PathBuf,
    /// The container's cgroup (its usage is reported).
    pub inner_cgroup: std::path::PathBuf,
    /// What became of the VM's disks at boot (empty outside a VM).
    pub disks: Vec<crate::disk::DiskReport>,
    /// The ingress's handles, when its certificates come from ACME.
    pub acme: Option<nestbox_ingress::serve::Handles>,
}

/// The API; cheap to clone.
#[derive(Clone, Debug)]
pub struct Api {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    parts: Parts,
    started: Instant,
}

/// Which route a request matched, with the `{name}` segment.
fn route<'p>(method: &Method, path: &'p str) -> Result<(usize, Option<&'p str>), ApiError> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut path_matched = false;
    for (i, (m, template)) in ROUTES.iter().enumerate() {
        let parts: Vec<&str> = template.split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut name = None;
        let fits = parts.iter().zip(&segments).all(|(t, s)| {
            if *t == "{name}" {
                name = Some(*s);
                !s.is_empty()
            } else {
                t == s
            }
        });
        if !fits {
            continue;
        }
        path_matched = true;
        if method.as_str() == *m {
            return Ok((i, name));
        }
    }
    if path_matched {
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        ))
    } else {
        Err(ApiError::not_found(format!(
            "no such API path: {path} (see /v1 in the API document)"
        )))
    }
}

impl Api {
    /// An API over `parts`.
    #[must_use]
    pub fn new(parts: Parts) -> Self {
        Self {
            inner: Arc::new(Inner {
                parts,
                started: Instant::now(),
            }),
        }
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let mut resp = match self.dispatch(req).await {
            Ok(resp) => resp,
            Err(err) => body::error(&err),
        };
        resp.headers_mut()
            .insert(VERSION_HEADER, HeaderValue::from_static(API_VERSION));
        resp
    }

    async fn dispatch(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let p = &self.inner.parts;
        if !p.token.allows(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid token is needed: send `Authorization: Bearer <token>`",
            ));
        }
        let path = req.uri().path().to_owned();
        // Not part of the API's document: test builds only.
        #[cfg(feature = "faults")]
        if path == "/v1/faults" {
            return faults::handle(req).await;
        }
        let (index, name) = route(req.method(), &path)?;
        let name = name.map(str::to_owned);
        let name = || name.clone().expect("the route has a {name} segment");
        match ROUTES[index].1 {
            "/v1/status" => Ok(status::get(p, self.inner.started).await),
            "/v1/ports" => Ok(ports::list(p)),
            "/v1/ports/events" => Ok(ports::events(p)),
            "/v1/services" if req.method() == Method::GET => Ok(services::list(p)),
            "/v1/services" => services::create(p, req).await,
            "/v1/services/{name}" if req.method() == Method::GET => services::get(p, &name()),
            "/v1/services/{name}" => services::delete(p, &name()).await,
            "/v1/services/{name}/start" => services::start(p, &name()).await,
            "/v1/services/{name}/stop" => services::stop(p, &name()).await,
            "/v1/services/{name}/logs" => logs::get(p, &name(), req.uri().query()).await,
            "/v1/bounce" => bounce::post(p).await,
            "/v1/certificates/renew" => certificates::renew(p),
            other => Err(ApiError::internal(format!("route {other} has no handler"))),
        }
    }

    async fn serve_connection<S>(&self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let api = self.clone();
        let service = service_fn(move |req| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        if let Err(err) = http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .await
        {
            tracing::debug!(?err, "API connection ended with an error");
        }
    }

    /// Serves the API on `listener` (TCP) until the task is dropped.
    pub async fn serve_tcp(self, listener: TcpListener) {
        self.serve_accepted(|| async { listener.accept().await.map(|(s, _)| s) })
            .await;
    }

    /// Serves the API on the Unix socket `listener` until the task is
    /// dropped.
    pub async fn serve_unix(self, listener: UnixListener) {
        self.serve_accepted(|| async { listener.accept().await.map(|(s, _)| s) })
            .await;
    }

    /// The accept loop, whatever the listener: each connection on its task;
    /// a failed accept (EMFILE …) backs off instead of spinning.
    async fn serve_accepted<S, F, Fut>(self, mut accept: F)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<S>>,
    {
        loop {
            match accept().await {
                Ok(stream) => {
                    let api = self.clone();
                    tokio::spawn(async move { api.serve_connection(stream).await });
                }
                Err(err) => {
                    tracing::warn!(?err, "API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Binds the API's Unix socket at `path` (replacing a stale one), writable
/// by anyone who can reach the path: the token is still required.
///
/// # Errors
/// The bind error.
#[allow(
    clippy::disallowed_methods,
    reason = "at startup, before anything is served"
)]
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_templates() {
        let get = Method::GET;
        assert_eq!(route(&get, "/v1/status").unwrap(), (0, None));
        assert_eq!(route(&get, "/v1/services/web").unwrap(), (5, Some("web")));
        assert_eq!(
            route(&Method::POST, "/v1/services/web/stop").unwrap(),
            (8, Some("web"))
        );
        assert_eq!(route(&get, "/v1/nothing").unwrap_err().code, "not_found");
        assert_eq!(
            route(&Method::PUT, "/v1/status").unwrap_err().code,
            "method_not_allowed"
        );
        assert_eq!(
            route(&get, "/v1/services//logs").unwrap_err().code,
            "not_found"
        );
    }

    /// The checked-in `OpenAPI` document describes exactly the routes served.
    #[test]
    fn openapi_document_matches_the_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../openapi.json")).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().unwrap().keys() {
                if method != "parameters" {
                    documented.push((method.to_uppercase(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
        // Every operation documents the error shape and the auth failure.
        for (method, path) in &served {
            let op = &doc["paths"][path][method.to_lowercase()];
            assert!(op["responses"]["401"].is_object(), "{method} {path}: 401");
        }
        assert_eq!(doc["info"]["version"], API_VERSION);
    }
}
