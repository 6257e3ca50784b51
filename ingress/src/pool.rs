//! Kept-alive HTTP/1.1 connections to backends, per backend.
//!
//! A small pool over hyper's connection API: an idle connection whose
//! sender is ready is reused; otherwise a new one is dialed (inside the
//! backend's network namespace, see [`crate::dial`]). A connection goes back
//! to the pool as soon as the response head arrives and becomes usable again
//! when its body is done. A request that could not be sent on a reused
//! connection (the backend closed it while idle) is retried once on a fresh
//! one. Replacing hyper-util's general client removes a layer of futures and
//! copies from every request.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::dial::{self, Dialers};
use crate::routes::Route;

/// Idle connections kept per backend at most.
const MAX_IDLE_PER_BACKEND: usize = 512;

/// Why a backend exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made.
    #[error("cannot connect to the backend: {0}")]
    Connect(#[source] io::Error),
    /// The exchange failed after connecting.
    #[error("the backend failed: {0}")]
    Http(#[source] hyper::Error),
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// The pool; clones share it.
#[derive(Clone)]
pub struct Pool {
    idle: Arc<Mutex<HashMap<u64, Vec<Idle>>>>,
    dialers: Arc<Dialers>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool that gives up connecting after `connect_timeout` and drops
    /// connections idle for `idle_timeout`.
    #[must_use]
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            idle: Arc::default(),
            dialers: Arc::new(Dialers::default()),
            connect_timeout,
            idle_timeout,
        }
    }

    fn checkout(&self, id: u64) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&id)?;
        let now = Instant::now();
        list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout);
        let ready = list.iter().position(|c| c.sender.is_ready())?;
        Some(list.swap_remove(ready).sender)
    }

    fn checkin(&self, id: u64, sender: SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(id).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, route: &Route) -> Result<SendRequest<Incoming>, PoolError> {
        let dialer = match &route.backend.netns {
            Some(path) => Some(
                self.dialers
                    .get(path)
                    .map_err(|e| PoolError::Connect(io::Error::other(e)))?,
            ),
            None => None,
        };
        let stream = dial::connect(dialer.as_deref(), route.backend.addr, self.connect_timeout)
            .await
            .map_err(PoolError::Connect)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Http)?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(?err, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` to the route's backend and returns the response head (the
    /// body streams).
    ///
    /// # Errors
    /// [`PoolError`] if no connection could be made or the exchange failed.
    pub async fn send(
        &self,
        route: &Route,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, PoolError> {
        let id = route.backend_id;
        let req = match self.checkout(id) {
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(id, sender);
                    return Ok(resp);
                }
                Err(mut err) => match err.take_message() {
                    // Not sent: the idle connection was dead. Try a new one.
                    Some(req) => req,
                    None => return Err(PoolError::Http(err.into_error())),
                },
            },
            None => req,
        };
        let mut sender = self.connect(route).await?;
        let resp = sender.send_request(req).await.map_err(PoolError::Http)?;
        self.checkin(id, sender);
        Ok(resp)
    }
}
