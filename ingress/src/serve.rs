//! `nestbox-ingress serve`: a whole ingress from a configuration file —
//! routes, certificates (static or ACME), both listeners — until shutdown.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::access::Access;
use crate::acme::{self, Challenges, Manager};
use crate::config::{Config, RouteConfig};
use crate::proxy::{BackendLimits, Proxy};
use crate::routes::{Backend, RouteTable};
use crate::server;
use crate::tls::{self, CertSet, Resolver};

/// Errors starting the ingress.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source} (in use, or binding a port below 1024 needs root)")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A static certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The ACME state could not be opened.
    #[error(transparent)]
    Acme(#[from] acme::AcmeError),
}

/// A running ingress's handles.
#[derive(Debug, Clone)]
pub struct Handles {
    /// The live route table.
    pub routes: RouteTable,
    /// Renews every ACME certificate now when notified (nothing without
    /// ACME). It outlives the ingress: a notification while the ingress is
    /// being restarted is kept for the next one.
    pub renew: Arc<Notify>,
    /// The hostnames ACME keeps certificates for (follows the routes).
    hosts: Arc<watch::Sender<Vec<String>>>,
    /// URL auth for gated routes (none: a gated route is refused).
    access: Option<Access>,
}

impl Handles {
    /// Makes the routes equal to `wanted` (added, changed and removed routes
    /// take effect for the next request) and lets ACME follow.
    pub fn set_routes(&self, wanted: &[RouteConfig]) {
        for r in wanted {
            self.routes.insert(
                &r.host,
                Backend {
                    addr: r.backend,
                    netns: r.netns.clone(),
                },
            );
        }
        let keep: Vec<String> = wanted
            .iter()
            .map(|r| crate::routes::normalize_host(&r.host))
            .collect();
        for host in self.routes.hosts() {
            if !keep.contains(&host) {
                let _ = self.routes.remove(&host);
            }
        }
        self.hosts.send_replace(self.routes.hosts());
    }
}

impl Handles {
    /// Handles over `routes` with no ingress running behind them (tools and
    /// tests).
    #[must_use]
    pub fn detached(routes: RouteTable) -> Self {
        Self {
            routes,
            renew: Arc::new(Notify::new()),
            hosts: Arc::new(watch::channel(Vec::new()).0),
            access: None,
        }
    }

    /// These handles with `access` checking the gated routes.
    #[must_use]
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = Some(access);
        self
    }

    /// The URL auth of the gated routes.
    #[must_use]
    pub fn access(&self) -> Option<&Access> {
        self.access.as_ref()
    }

    /// Publishes `host` → `backend` now, gated by the URL auth mode of
    /// `port` (see [`crate::access`]).
    pub fn publish_gated(&self, host: &str, backend: Backend, port: u16) {
        self.routes.insert_gated(host, backend, Some(port));
        self.hosts.send_replace(self.routes.hosts());
    }

    /// Publishes `host`, answered in this process by `local` (see
    /// [`crate::local`]); `backend` is where the same service listens.
    pub fn publish_local(&self, host: &str, backend: Backend, local: crate::local::Local) {
        self.routes.insert_local(host, backend, local);
        self.hosts.send_replace(self.routes.hosts());
    }

    /// Publishes `host` → `backend` now (replacing any route for `host`);
    /// ACME starts keeping a certificate for it.
    pub fn publish(&self, host: &str, backend: Backend) {
        self.routes.insert(host, backend);
        self.hosts.send_replace(self.routes.hosts());
    }

    /// Withdraws the route for `host`; requests for it get the 404 page
    /// from the next one on. The stored certificate stays on disk, so a
    /// route published again is served at once.
    pub fn unpublish(&self, host: &str) {
        let _ = self.routes.remove(host);
        self.hosts.send_replace(self.routes.hosts());
    }
}

/// Connections the kernel queues for a listener before `accept`: more than
/// tokio's default of 1,024, so that a burst of clients (thousands opening
/// at once) waits in the queue instead of having its SYNs dropped and
/// retried a second later. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 8192;

/// A listener on `addr` with [`LISTEN_BACKLOG`].
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Serves `config` until `shutdown` turns true; `started` receives the
/// handles once both listeners are bound.
///
/// # Errors
/// [`ServeError`] if the ingress cannot start.
pub async fn serve(
    config: Config,
    shutdown: watch::Receiver<bool>,
    started: impl FnOnce(Handles),
) -> Result<(), ServeError> {
    let handles = Handles::detached(RouteTable::new());
    handles.set_routes(&config.routes);
    serve_with(config, handles, shutdown, started).await
}

/// [`serve`] over routes that outlive it: `handles` come from the caller
/// (the guest publishes ports into them), the configuration's static routes
/// are added, and an ingress started again after a failure serves the same
/// routes.
///
/// # Errors
/// [`ServeError`] if the ingress cannot start.
pub async fn serve_with(
    config: Config,
    handles: Handles,
    shutdown: watch::Receiver<bool>,
    started: impl FnOnce(Handles),
) -> Result<(), ServeError> {
    for r in &config.routes {
        handles.publish(
            &r.host,
            Backend {
                addr: r.backend,
                netns: r.netns.clone(),
            },
        );
    }
    let routes = handles.routes.clone();
    let hosts_rx = handles.hosts.subscribe();
    let mut set = CertSet::default();
    for c in &config.certificates {
        let key = Arc::new(tls::load_files(&c.cert, &c.key)?);
        set.insert(&c.names, &key);
    }
    let (certs_tx, certs_rx) = watch::channel(Arc::new(set));
    let challenges = Challenges::default();
    let mut manager_task = None;
    if let Some(acme) = config.acme {
        // Certificates for every routed name.
        let manager = Manager::new(acme, hosts_rx, certs_tx, challenges.clone())?
            .renew_on(handles.renew.clone());
        manager_task = Some(tokio::spawn(manager.run()));
    }
    let resolver = Arc::new(Resolver::new(certs_rx, challenges.alpn.clone()));
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(resolver)));
    let bind = |addr: std::net::SocketAddr| async move {
        listen(addr).map_err(|source| ServeError::Bind { addr, source })
    };
    let https = bind(config.https).await?;
    let http = bind(config.http).await?;
    tracing::info!(https = %config.https, http = %config.http, routes = ?routes.hosts(), "ingress listening");
    let access = handles.access.clone();
    started(handles);
    let proxy = Proxy::new(routes, BackendLimits::default()).with_access(access);
    tokio::join!(
        server::serve_https(https, acceptor, proxy, config.limits, shutdown.clone()),
        server::serve_http(http, challenges, config.limits, shutdown),
    );
    if let Some(task) = manager_task {
        task.abort();
    }
    Ok(())
}
