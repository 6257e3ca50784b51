//! Hosts served in the ingress's own process: a request for one is handed
//! to its service as it came (body, upgrade and all) instead of being
//! proxied over a socket. The VM's API lives in the same process as the
//! ingress, so its hostname is served this way: no loopback hop, no second
//! HTTP parse, no copy of every byte of an upload or download through a
//! socket pair. The route keeps its backend address, which ACME follows
//! and the table's bookkeeping needs.
#![deny(clippy::disallowed_methods)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::proxy::Body;

/// What a local service answers with.
pub type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// A service that answers requests in this process.
pub trait LocalService: Send + Sync + 'static {
    /// Answers `req`. An upgrade request carries hyper's `OnUpgrade` in
    /// its extensions, as a server's requests do.
    fn call(&self, req: Request<Incoming>) -> Answer;
}

/// A shared [`LocalService`], as a route holds it.
#[derive(Clone)]
pub struct Local(pub Arc<dyn LocalService>);

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Local")
    }
}
