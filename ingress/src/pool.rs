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

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

/// The pool, for request bodies of type `B` (the proxy forwards hyper's
/// `Incoming`); clones share it.
pub struct Pool<B = Incoming> {
    idle: Arc<Mutex<HashMap<u64, Vec<Idle<B>>>>>,
    dialers: Arc<Dialers>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self {
            idle: self.idle.clone(),
            dialers: self.dialers.clone(),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl<B> Pool<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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

    fn checkout(&self, id: u64) -> Option<SendRequest<B>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&id)?;
        let now = Instant::now();
        list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout);
        let ready = list.iter().position(|c| c.sender.is_ready())?;
        Some(list.swap_remove(ready).sender)
    }

    fn checkin(&self, id: u64, sender: SendRequest<B>) {
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

    async fn connect(&self, route: &Route) -> Result<SendRequest<B>, PoolError> {
        let dialer = match &route.backend.netns {
            None => None,
            Some(path) => {
                if let Some(dialer) = self.dialers.cached(path) {
                    Some(dialer)
                } else {
                    // The first dial into a namespace starts its socket
                    // thread: off the runtime's workers.
                    let (dialers, path) = (self.dialers.clone(), path.clone());
                    let made = tokio::task::spawn_blocking(move || dialers.get(&path))
                        .await
                        .map_err(|e| PoolError::Connect(io::Error::other(e)))?;
                    Some(made.map_err(|e| PoolError::Connect(io::Error::other(e)))?)
                }
            }
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
        req: Request<B>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{Backend, RouteTable};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers `ok` to two requests per connection, then
    /// closes it, and counts connections.
    async fn backend() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..2 {
                        let mut head = Vec::new();
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = tcp.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            head.extend_from_slice(&buf[..n]);
                        }
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn get(pool: &Pool<Empty<Bytes>>, route: &Route) -> String {
        let req = Request::get("http://b/").body(Empty::new()).unwrap();
        let resp = pool.send(route, req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn reuses_connections_and_replaces_closed_ones() {
        let (addr, accepted) = backend().await;
        let routes = RouteTable::new();
        routes.insert("a.test", Backend { addr, netns: None });
        let route = routes.get("a.test").unwrap();
        let pool = Pool::new(Duration::from_secs(2), Duration::from_mins(1));
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second request reused the connection"
        );
        // The backend closed that connection after two requests: the next
        // request must still succeed, on a new connection.
        assert_eq!(get(&pool, &route).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refused_connect_is_a_connect_error() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let routes = RouteTable::new();
        routes.insert(
            "a.test",
            Backend {
                addr: free,
                netns: None,
            },
        );
        let route = routes.get("a.test").unwrap();
        let pool: Pool<Empty<Bytes>> = Pool::new(Duration::from_secs(2), Duration::from_mins(1));
        let req = Request::get("http://b/").body(Empty::new()).unwrap();
        let err = pool.send(&route, req).await.unwrap_err();
        assert!(
            matches!(&err, PoolError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "{err}"
        );
    }
}
