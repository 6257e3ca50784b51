//! The VM's own API, served by the VM: HTTP/1.1 JSON under `/v1`, behind a
//! bearer token, on a loopback TCP port of the root namespace (the ingress
//! routes `https://api.<vm>.<domain>/` there) and on a Unix socket that is
//! mounted into the inner container, so user code can manage its own
//! services. Every response carries the API version header; errors are
//! `{"error": {"code", "message"}}`. The document `guest/openapi.json`
//! describes it, and a test holds the two together.
//!
//! The routing is axum's; the stack around every route, outermost first:
//! the version header, the token check, a limit on request bodies ([`MAX_BODY`]) and a deadline
//! for the response head ([`DEADLINE`]; streams flow on after it).
#![deny(clippy::disallowed_methods)]

mod auth;
mod body;
mod bounce;
mod certificates;
mod checkpoints;
mod error;
mod exec;
#[cfg(feature = "faults")]
mod faults;
mod fs;
mod logs;
mod ports;
mod proxy;
mod services;
mod status;
mod urls;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as Segment, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::routing::{MethodRouter, delete, get, post, put};
use http::{HeaderValue, StatusCode, Uri};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};

pub use auth::TokenHash;
pub use body::Body;
pub use error::ApiError;
pub(crate) use status::image_version;

use crate::logs::Logs;
use crate::publish::Publisher;
use crate::services::Manager;

pub use nestbox_api::{API_VERSION, CAPABILITIES_HEADER, VERSION_HEADER};
/// The guest's version.
pub const GUEST_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The largest request body any operation takes.
pub const MAX_BODY: usize = 1 << 20;
/// How long an operation has to start its answer (a bounce waits for the
/// services; a stream's head comes at once and its body flows on after).
pub const DEADLINE: Duration = Duration::from_mins(2);

/// Every operation: method, path template (`{name}` is one segment).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/status"),
    ("GET", "/v1/ports"),
    ("GET", "/v1/ports/events"),
    ("GET", "/v1/ports/{port}/auth"),
    ("PUT", "/v1/ports/{port}/auth"),
    ("POST", "/v1/urls/login"),
    ("GET", "/v1/urls/shares"),
    ("POST", "/v1/urls/shares"),
    ("DELETE", "/v1/urls/shares"),
    ("DELETE", "/v1/urls/shares/{id}"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{id}"),
    ("GET", "/v1/services"),
    ("POST", "/v1/services"),
    ("GET", "/v1/services/{name}"),
    ("DELETE", "/v1/services/{name}"),
    ("POST", "/v1/services/{name}/start"),
    ("POST", "/v1/services/{name}/stop"),
    ("GET", "/v1/services/{name}/logs"),
    ("POST", "/v1/bounce"),
    ("POST", "/v1/certificates/renew"),
    ("GET", "/v1/checkpoints"),
    ("POST", "/v1/checkpoints"),
    ("GET", "/v1/checkpoints/{id}"),
    ("DELETE", "/v1/checkpoints/{id}"),
    ("POST", "/v1/checkpoints/{id}/restore"),
    ("GET", "/v1/exec"),
    ("GET", "/v1/exec/{id}"),
    ("POST", "/v1/exec/{id}/kill"),
    ("GET", "/v1/proxy"),
    ("GET", "/v1/fs/read"),
    ("PUT", "/v1/fs/write"),
    ("GET", "/v1/fs/list"),
    ("DELETE", "/v1/fs/delete"),
    ("POST", "/v1/fs/rename"),
    ("POST", "/v1/fs/copy"),
    ("POST", "/v1/fs/chmod"),
    ("GET", "/v1/fs/archive"),
    ("PUT", "/v1/fs/archive"),
    ("GET", "/v1/fs/watch"),
];

/// Operations whose request body is a stream of any size (no body limit,
/// no deadline: the answer comes when the upload has ended).
const UPLOADS: &[(&str, &str)] = &[("PUT", "/v1/fs/write"), ("PUT", "/v1/fs/archive")];

fn is_upload(req: &Request) -> bool {
    UPLOADS
        .iter()
        .any(|(m, p)| req.method().as_str() == *m && req.uri().path() == *p)
}

pub use nestbox_api::types::ContainerState;

/// Requests the API passes to the guest's supervisor.
#[derive(Debug)]
pub enum Control {
    /// Rebuild the inner container; answer when services are up again.
    Bounce(oneshot::Sender<Result<(), String>>),
    /// Stop the container, put its layer back as checkpoint `id` was, and
    /// start it again; answer when services are up again.
    Restore(
        String,
        oneshot::Sender<Result<nestbox_api::types::Checkpoint, crate::storage::StoreError>>,
    ),
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
    /// What became of the VM's disks at boot (empty outside a VM; the
    /// user's comes once it is up).
    pub disks: Arc<parking_lot::Mutex<Vec<crate::disk::DiskReport>>>,
    /// Checkpoints of the user's filesystem.
    pub storage: crate::storage::Storage,
    /// The ingress's handles, when its certificates come from ACME.
    pub acme: Option<nestbox_ingress::serve::Handles>,
    /// Exec sessions.
    pub exec: crate::exec::Sessions,
    /// The container now (tunnels dial in its network namespace).
    pub current: crate::bounce::Current,
    /// Socket threads of the container's network namespaces, for tunnels.
    pub dialers: Arc<nestbox_ingress::dial::Dialers>,
    /// URL auth: modes, share links, scoped tokens.
    pub urls: crate::urls::Urls,
}

/// The API; cheap to clone.
#[derive(Clone, Debug)]
pub struct Api {
    router: Router,
}

#[derive(Debug)]
struct Inner {
    parts: Parts,
    started: Instant,
}

impl Api {
    /// An API over `parts`.
    #[must_use]
    pub fn new(parts: Parts) -> Self {
        let shared = Arc::new(Inner {
            parts,
            started: Instant::now(),
        });
        Self {
            router: router(shared),
        }
    }

    async fn serve_connection<S>(&self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper_util::service::TowerToHyperService::new(self.router.clone());
        if let Err(err) = http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
        {
            tracing::debug!(?err, "API connection ended with an error");
        }
    }

    /// Serves the API on every listener of `listeners` until the future
    /// is dropped — which also drops every connection it accepted (a
    /// restart of the API): only upgraded connections (exec sessions),
    /// which run on tasks of their own, go on. In the tests' builds the
    /// crash point `api` makes it panic, for the supervisor to restart it.
    ///
    /// # Errors
    /// None so far: it serves until dropped.
    pub async fn serve(self, listeners: Listeners) -> Result<(), std::io::Error> {
        let mut loops = tokio::task::JoinSet::new();
        for listener in listeners.0 {
            let api = self.clone();
            match listener {
                Listener::Tcp(l) => {
                    loops.spawn(api.serve_accepted(move || {
                        let l = l.clone();
                        async move { l.accept().await.map(|(s, _)| s) }
                    }));
                }
                Listener::Unix(l) => {
                    loops.spawn(api.serve_accepted(move || {
                        let l = l.clone();
                        async move { l.accept().await.map(|(s, _)| s) }
                    }));
                }
            }
        }
        tokio::select! {
            () = crate::faults::armed("api") => panic!("injected fault at api"),
            _ = loops.join_next() => Err(std::io::Error::other("an API accept loop ended")),
        }
    }

    /// The accept loop, whatever the listener: each connection on a task of
    /// the loop's own (dropped with it); a failed accept (EMFILE …) backs
    /// off instead of spinning.
    async fn serve_accepted<S, F, Fut>(self, mut accept: F)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<S>>,
    {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = accept() => match accepted {
                    Ok(stream) => {
                        let api = self.clone();
                        connections.spawn(async move { api.serve_connection(stream).await });
                    }
                    Err(err) => {
                        tracing::warn!(?err, "API accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next() => {}
            }
        }
    }
}

/// The API served by the ingress in this process: a request for the API's
/// hostname goes to the router as it came, upgrade included, with no
/// loopback hop (see [`nestbox_ingress::local`]). A restart of the API's
/// listeners does not touch it.
impl nestbox_ingress::local::LocalService for Api {
    fn call(&self, req: Request<hyper::body::Incoming>) -> nestbox_ingress::local::Answer {
        let service = hyper_util::service::TowerToHyperService::new(self.router.clone());
        Box::pin(async move {
            let Ok(resp) = hyper::service::Service::call(&service, req).await;
            resp.map(|body| {
                http_body_util::BodyExt::boxed_unsync(http_body_util::BodyExt::map_err(
                    body,
                    std::io::Error::other,
                ))
            })
        })
    }
}

/// A listener of the API.
#[derive(Debug)]
pub enum Listener {
    /// TCP (loopback, or the container's gateway).
    Tcp(Arc<TcpListener>),
    /// The Unix socket mounted into the container.
    Unix(Arc<UnixListener>),
}

/// The API's listeners.
#[derive(Debug, Default)]
pub struct Listeners(pub Vec<Listener>);

type Shared = Arc<Inner>;

/// The handler of each file operation in [`ROUTES`].
fn fs_operation(method: &str, path: &str) -> Option<MethodRouter<Shared>> {
    Some(match (method, path) {
        ("GET", "/v1/fs/read") => {
            get(
                |State(s): State<Shared>, req: Request| async move { fs::read(&s.parts, req).await },
            )
        }
        ("PUT", "/v1/fs/write") => {
            put(
                |State(s): State<Shared>, req: Request| async move { fs::write(&s.parts, req).await },
            )
        }
        ("GET", "/v1/fs/list") => {
            get(
                |State(s): State<Shared>, req: Request| async move { fs::list(&s.parts, req).await },
            )
        }
        ("DELETE", "/v1/fs/delete") => delete(|State(s): State<Shared>, req: Request| async move {
            fs::delete(&s.parts, req).await
        }),
        ("POST", "/v1/fs/rename") => {
            post(
                |State(s): State<Shared>, req: Request| async move { fs::rename(&s.parts, req).await },
            )
        }
        ("POST", "/v1/fs/copy") => {
            post(
                |State(s): State<Shared>, req: Request| async move { fs::copy(&s.parts, req).await },
            )
        }
        ("POST", "/v1/fs/chmod") => {
            post(
                |State(s): State<Shared>, req: Request| async move { fs::chmod(&s.parts, req).await },
            )
        }
        ("GET", "/v1/fs/archive") => {
            get(
                |State(s): State<Shared>, req: Request| async move { fs::pack(&s.parts, req).await },
            )
        }
        ("PUT", "/v1/fs/archive") => {
            put(
                |State(s): State<Shared>, req: Request| async move { fs::unpack(&s.parts, req).await },
            )
        }
        ("GET", "/v1/fs/watch") => {
            get(
                |State(s): State<Shared>, req: Request| async move { fs::watch(&s.parts, req).await },
            )
        }
        _ => return None,
    })
}

/// The handler of each URL auth operation in [`ROUTES`].
fn url_operation(method: &str, path: &str) -> Option<MethodRouter<Shared>> {
    use nestbox_ingress::access::Kind;
    Some(match (method, path) {
        ("GET", "/v1/ports/{port}/auth") => get(
            |State(s): State<Shared>, Segment(port): Segment<String>| async move {
                urls::get_auth(&s.parts, &port)
            },
        ),
        ("PUT", "/v1/ports/{port}/auth") => put(
            |State(s): State<Shared>, Segment(port): Segment<String>, req: Request| async move {
                urls::set_auth(&s.parts, &port, req).await
            },
        ),
        ("POST", "/v1/urls/login") => {
            post(
                |State(s): State<Shared>, req: Request| async move { urls::login(&s.parts, req).await },
            )
        }
        ("GET", "/v1/urls/shares") => {
            get(|State(s): State<Shared>| async move { urls::list_shares(&s.parts).await })
        }
        ("POST", "/v1/urls/shares") => {
            post(
                |State(s): State<Shared>, req: Request| async move { urls::share(&s.parts, req).await },
            )
        }
        ("DELETE", "/v1/urls/shares") => delete(|State(s): State<Shared>| async move {
            urls::revoke(&s.parts, Kind::Share, None).await
        }),
        ("DELETE", "/v1/urls/shares/{id}") => delete(
            |State(s): State<Shared>, Segment(id): Segment<String>| async move {
                urls::revoke(&s.parts, Kind::Share, Some(&id)).await
            },
        ),
        ("GET", "/v1/tokens") => {
            get(|State(s): State<Shared>| async move { urls::list_tokens(&s.parts).await })
        }
        ("POST", "/v1/tokens") => {
            post(
                |State(s): State<Shared>, req: Request| async move { urls::token(&s.parts, req).await },
            )
        }
        ("DELETE", "/v1/tokens/{id}") => delete(
            |State(s): State<Shared>, Segment(id): Segment<String>| async move {
                urls::revoke(&s.parts, Kind::Token, Some(&id)).await
            },
        ),
        _ => return None,
    })
}

/// The handler of each operation in [`ROUTES`].
fn operation(method: &str, path: &str) -> MethodRouter<Shared> {
    if let Some(op) = fs_operation(method, path).or_else(|| url_operation(method, path)) {
        return op;
    }
    match (method, path) {
        ("GET", "/v1/status") => {
            get(|State(s): State<Shared>| async move { status::get(&s.parts, s.started).await })
        }
        ("GET", "/v1/ports") => get(|State(s): State<Shared>| async move { ports::list(&s.parts) }),
        ("GET", "/v1/ports/events") => {
            get(|State(s): State<Shared>| async move { ports::events(&s.parts) })
        }
        ("GET", "/v1/services") => {
            get(|State(s): State<Shared>| async move { services::list(&s.parts) })
        }
        ("POST", "/v1/services") => post(|State(s): State<Shared>, req: Request| async move {
            services::create(&s.parts, req).await
        }),
        ("GET", "/v1/services/{name}") => get(
            |State(s): State<Shared>, Segment(name): Segment<String>| async move {
                services::get(&s.parts, &name)
            },
        ),
        ("DELETE", "/v1/services/{name}") => delete(
            |State(s): State<Shared>, Segment(name): Segment<String>| async move {
                services::delete(&s.parts, &name).await
            },
        ),
        ("POST", "/v1/services/{name}/start") => post(
            |State(s): State<Shared>, Segment(name): Segment<String>| async move {
                services::start(&s.parts, &name).await
            },
        ),
        ("POST", "/v1/services/{name}/stop") => post(
            |State(s): State<Shared>, Segment(name): Segment<String>| async move {
                services::stop(&s.parts, &name).await
            },
        ),
        ("GET", "/v1/services/{name}/logs") => get(
            |State(s): State<Shared>, Segment(name): Segment<String>, RawQuery(q): RawQuery| async move {
                logs::get(&s.parts, &name, q.as_deref()).await
            },
        ),
        ("POST", "/v1/bounce") => {
            post(|State(s): State<Shared>| async move { bounce::post(&s.parts).await })
        }
        ("POST", "/v1/certificates/renew") => {
            post(|State(s): State<Shared>| async move { certificates::renew(&s.parts) })
        }
        ("GET", "/v1/checkpoints") => {
            get(|State(s): State<Shared>| async move { checkpoints::list(&s.parts).await })
        }
        ("POST", "/v1/checkpoints") => post(|State(s): State<Shared>, req: Request| async move {
            checkpoints::create(&s.parts, req).await
        }),
        ("GET", "/v1/checkpoints/{id}") => get(
            |State(s): State<Shared>, Segment(id): Segment<String>| async move {
                checkpoints::get(&s.parts, &id).await
            },
        ),
        ("DELETE", "/v1/checkpoints/{id}") => delete(
            |State(s): State<Shared>, Segment(id): Segment<String>| async move {
                checkpoints::delete(&s.parts, &id).await
            },
        ),
        ("POST", "/v1/checkpoints/{id}/restore") => post(
            |State(s): State<Shared>, Segment(id): Segment<String>| async move {
                checkpoints::restore(&s.parts, &id).await
            },
        ),
        ("GET", "/v1/exec") => get(|State(s): State<Shared>, req: Request| async move {
            exec::list_or_start(&s.parts, req).await
        }),
        ("GET", "/v1/exec/{id}") => get(
            |State(s): State<Shared>, Segment(id): Segment<String>, req: Request| async move {
                exec::attach(&s.parts, &id, req).await
            },
        ),
        ("POST", "/v1/exec/{id}/kill") => post(
            |State(s): State<Shared>, Segment(id): Segment<String>, req: Request| async move {
                exec::kill(&s.parts, &id, req).await
            },
        ),
        ("GET", "/v1/proxy") => {
            get(
                |State(s): State<Shared>, req: Request| async move { proxy::open(&s.parts, req).await },
            )
        }
        (method, path) => panic!("no handler for {method} {path} in ROUTES"),
    }
}

/// Every operation of [`ROUTES`] (the document's), behind the stack the
/// module's documentation describes.
fn router(shared: Shared) -> Router {
    let mut router = Router::new();
    for (method, path) in ROUTES {
        router = router.route(path, operation(method, path));
    }
    // Not part of the API's document: test builds only.
    #[cfg(feature = "faults")]
    {
        router = router.route("/v1/faults", get(faults::list).post(faults::arm));
    }
    router
        .fallback(|uri: Uri| async move {
            ApiError::not_found(format!(
                "no such API path: {} (see /v1 in the API document)",
                uri.path()
            ))
        })
        .method_not_allowed_fallback(|method: http::Method, uri: Uri| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        .layer(middleware::from_fn(deadline))
        .layer(middleware::from_fn(limit_body))
        .layer(middleware::from_fn_with_state(shared.clone(), authorize))
        .layer(middleware::from_fn(version))
        .with_state(shared)
}

async fn authorize(State(s): State<Shared>, req: Request, next: Next) -> axum::response::Response {
    if !s.parts.token.allows(req.headers()) {
        return axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is needed: send `Authorization: Bearer <token>`",
        ));
    }
    next.run(req).await
}

async fn limit_body(req: Request, next: Next) -> axum::response::Response {
    if is_upload(&req) {
        return next.run(req).await;
    }
    let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, MAX_BODY)));
    next.run(req).await
}

async fn deadline(req: Request, next: Next) -> axum::response::Response {
    if is_upload(&req) {
        return next.run(req).await;
    }
    let what = format!("{} {}", req.method(), req.uri().path());
    match tokio::time::timeout(DEADLINE, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "{what} did not answer within {} s; try again",
                DEADLINE.as_secs()
            ),
        )),
    }
}

/// The version both sides speak ([`nestbox_api::version::negotiate`]) on
/// every answer, and the extensions this guest serves; a client older than
/// N−1 is refused before anything else.
async fn version(req: Request, next: Next) -> axum::response::Response {
    let offered = req
        .headers()
        .get(VERSION_HEADER)
        .map(|v| v.to_str().unwrap_or("?"));
    let (version, mut resp) = match nestbox_api::version::negotiate(offered) {
        Ok(v) => (v, next.run(req).await),
        Err(err) => (
            API_VERSION,
            axum::response::IntoResponse::into_response(ApiError::invalid_code(
                "unsupported_version",
                err.to_string(),
            )),
        ),
    };
    let headers = resp.headers_mut();
    headers.insert(VERSION_HEADER, HeaderValue::from(version));
    headers.insert(
        CAPABILITIES_HEADER,
        HeaderValue::from_static(capabilities()),
    );
    resp
}

/// [`nestbox_api::version::CAPABILITIES`], comma-separated.
fn capabilities() -> &'static str {
    static LIST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LIST.get_or_init(|| nestbox_api::version::CAPABILITIES.join(", "))
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
        assert_eq!(doc["info"]["version"], API_VERSION.to_string());
        // Each has its handler (the router is built from the same table).
        for (method, path) in ROUTES {
            let _ = operation(method, path);
        }
    }
}
