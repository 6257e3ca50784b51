//! The route table: hostname → backend.
//!
//! Readers (every request) load an `Arc` snapshot through `arc_swap`: no
//! lock, so a writer can never stall the request path. Writers (route
//! changes, rare) build a new snapshot under a mutex and swap it in; the next
//! request sees it.
//!
//! Each backend has an id (routes to one backend share it, and with it
//! their pooled connections). When the last route to a backend goes — a
//! bounce gives the container a new network namespace, so every backend
//! changes — its id is forgotten and the [`RouteListener`]s hear of it, so
//! the connection pool closes that backend's idle sockets (which would
//! otherwise keep the dead namespace alive).
#![deny(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

/// Where a route's requests go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Address to dial (e.g. `127.0.0.1:8080`).
    pub addr: SocketAddr,
    /// Network namespace to dial it in (`/run/netns/NAME`, `/proc/PID/ns/net`);
    /// `None` dials from the proxy's own namespace.
    pub netns: Option<PathBuf>,
}

/// A route as the proxy uses it.
#[derive(Debug)]
pub struct Route {
    /// The hostname, lower case.
    pub host: String,
    /// Where it goes.
    pub backend: Backend,
    /// Identifies the backend for connection pooling: routes to the same
    /// backend share an id, and so their kept-alive connections.
    pub backend_id: u64,
    /// The URI authority requests to this backend carry (`b<id>`), made
    /// once; it names the backend in logs and never leaves the VM.
    pub authority: http::uri::Authority,
    /// `host` as a header value (for `X-Forwarded-Host`), made once.
    pub host_header: http::HeaderValue,
    /// The published port whose URL auth mode decides who may use this
    /// route (see [`crate::access`]); `None`: no check here (the VM's API
    /// checks its own token).
    pub gate: Option<u16>,
    /// Served in this process instead of proxied to `backend` (see
    /// [`crate::local`]).
    pub local: Option<crate::local::Local>,
}

#[derive(Debug, Default)]
struct Snapshot {
    by_host: HashMap<String, Arc<Route>>,
    by_backend: HashMap<u64, Arc<Route>>,
}

/// Told of the backends in use after every change of the table.
pub trait RouteListener: Send + Sync {
    /// The backends that still have a route, by id; any other id is gone
    /// for good (ids are never reused).
    fn backends_changed(&self, live: &HashMap<u64, Backend>);
}

#[derive(Default)]
struct Ids {
    next: u64,
    of: HashMap<Backend, u64>,
    listeners: Vec<Weak<dyn RouteListener>>,
}

impl std::fmt::Debug for Ids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ids")
            .field("next", &self.next)
            .field("of", &self.of)
            .finish_non_exhaustive()
    }
}

/// The live route table; clones share it.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    snapshot: Arc<ArcSwap<Snapshot>>,
    ids: Arc<Mutex<Ids>>,
}

/// Lower-cases a hostname and drops a trailing dot and any `:port`.
#[must_use]
pub fn normalize_host(host: &str) -> String {
    let host = match host.rsplit_once(':') {
        // "[::1]:443" or "name:443"; a bare IPv6 literal has more colons.
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl RouteTable {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the route for `host`, with no URL auth check.
    pub fn insert(&self, host: &str, backend: Backend) {
        self.insert_gated(host, backend, None);
    }

    /// Adds or replaces the route for `host`, checked by the URL auth mode
    /// of port `gate`.
    pub fn insert_gated(&self, host: &str, backend: Backend, gate: Option<u16>) {
        self.insert_route(host, backend, gate, None);
    }

    /// Adds or replaces the route for `host`, answered by `local` in this
    /// process; `backend` is where the same service listens on a socket.
    pub fn insert_local(&self, host: &str, backend: Backend, local: crate::local::Local) {
        self.insert_route(host, backend, None, Some(local));
    }

    fn insert_route(
        &self,
        host: &str,
        backend: Backend,
        gate: Option<u16>,
        local: Option<crate::local::Local>,
    ) {
        let host = normalize_host(host);
        let mut ids = self.ids.lock();
        let backend_id = if let Some(id) = ids.of.get(&backend) {
            *id
        } else {
            ids.next += 1;
            let id = ids.next;
            ids.of.insert(backend.clone(), id);
            id
        };
        let route = Arc::new(Route {
            authority: http::uri::Authority::from_maybe_shared(bytes::Bytes::from(format!(
                "b{backend_id}"
            )))
            .expect("b<digits> is a valid authority"),
            host_header: http::HeaderValue::from_str(&host)
                .unwrap_or_else(|_| http::HeaderValue::from_static("invalid")),
            host: host.clone(),
            backend,
            backend_id,
            gate,
            local,
        });
        let old = self.snapshot.load();
        let mut by_host = old.by_host.clone();
        by_host.insert(host, route);
        self.publish(&mut ids, by_host);
    }

    /// Removes the route for `host`; returns whether there was one.
    #[must_use = "false means there was no such route"]
    pub fn remove(&self, host: &str) -> bool {
        let host = normalize_host(host);
        let mut ids = self.ids.lock();
        let old = self.snapshot.load();
        if !old.by_host.contains_key(&host) {
            return false;
        }
        let mut by_host = old.by_host.clone();
        by_host.remove(&host);
        self.publish(&mut ids, by_host);
        true
    }

    /// Has `listener` told of every change from now on (and of the
    /// backends in use now); it is dropped from the list once the last
    /// `Arc` to it is.
    pub fn listen(&self, listener: &Arc<dyn RouteListener>) {
        let mut ids = self.ids.lock();
        ids.listeners.push(Arc::downgrade(listener));
        listener.backends_changed(&Self::live(&self.snapshot.load()));
    }

    fn live(snapshot: &Snapshot) -> HashMap<u64, Backend> {
        snapshot
            .by_backend
            .iter()
            .map(|(id, r)| (*id, r.backend.clone()))
            .collect()
    }

    /// Swaps in `by_host`, forgets the ids of backends left without a
    /// route and tells the listeners (with the writer lock held, so they
    /// hear of changes in order).
    fn publish(&self, ids: &mut Ids, by_host: HashMap<String, Arc<Route>>) {
        let by_backend: HashMap<u64, Arc<Route>> = by_host
            .values()
            .map(|r| (r.backend_id, r.clone()))
            .collect();
        ids.of.retain(|_, id| by_backend.contains_key(id));
        let snapshot = Snapshot {
            by_host,
            by_backend,
        };
        let live = Self::live(&snapshot);
        self.snapshot.store(Arc::new(snapshot));
        ids.listeners.retain(|l| match l.upgrade() {
            Some(listener) => {
                listener.backends_changed(&live);
                true
            }
            None => false,
        });
    }

    /// How many backends have an id (one per backend with a route).
    #[must_use]
    pub fn backend_ids(&self) -> usize {
        self.ids.lock().of.len()
    }

    /// The route for a `Host`/`:authority`/SNI value.
    #[must_use]
    pub fn get(&self, host: &str) -> Option<Arc<Route>> {
        self.snapshot
            .load()
            .by_host
            .get(&normalize_host(host))
            .cloned()
    }

    /// A route that uses backend `id` (for the connector).
    #[must_use]
    pub fn by_backend(&self, id: u64) -> Option<Arc<Route>> {
        self.snapshot.load().by_backend.get(&id).cloned()
    }

    /// Every routed hostname, sorted.
    #[must_use]
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.snapshot.load().by_host.keys().cloned().collect();
        hosts.sort();
        hosts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16) -> Backend {
        Backend {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            netns: None,
        }
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("VM.Example.COM."), "vm.example.com");
        assert_eq!(normalize_host("vm.example.com:443"), "vm.example.com");
        assert_eq!(normalize_host("[::1]:8443"), "[::1]");
    }

    #[test]
    fn insert_get_remove() {
        let t = RouteTable::new();
        t.insert("a.test", backend(1));
        t.insert("8080.a.test", backend(1));
        t.insert("b.test", backend(2));
        let a = t.get("A.test:443").unwrap();
        assert_eq!(a.backend, backend(1));
        // Same backend, same pool.
        assert_eq!(a.backend_id, t.get("8080.a.test").unwrap().backend_id);
        assert_ne!(a.backend_id, t.get("b.test").unwrap().backend_id);
        assert!(t.by_backend(a.backend_id).is_some());
        assert!(t.remove("a.test"));
        assert!(!t.remove("a.test"));
        assert!(t.get("a.test").is_none());
        assert_eq!(t.hosts(), vec!["8080.a.test", "b.test"]);
    }

    #[derive(Default)]
    struct Heard(Mutex<Vec<Vec<u64>>>);

    impl RouteListener for Heard {
        fn backends_changed(&self, live: &HashMap<u64, Backend>) {
            let mut ids: Vec<u64> = live.keys().copied().collect();
            ids.sort_unstable();
            self.0.lock().push(ids);
        }
    }

    #[test]
    fn a_backend_without_routes_is_forgotten_and_listeners_hear_of_it() {
        let t = RouteTable::new();
        t.insert("a.test", backend(1));
        let heard = Arc::new(Heard::default());
        let listener: Arc<dyn RouteListener> = heard.clone();
        t.listen(&listener);
        t.insert("8080.a.test", backend(1));
        // A bounce: every route moves to a new backend.
        for port in 2..100 {
            t.insert("a.test", backend(port));
            t.insert("8080.a.test", backend(port));
        }
        assert_eq!(t.backend_ids(), 1, "only the backend in use keeps an id");
        let id = t.get("a.test").unwrap().backend_id;
        assert_eq!(heard.0.lock().last().unwrap(), &vec![id]);
        assert!(t.remove("a.test") && t.remove("8080.a.test"));
        assert_eq!(t.backend_ids(), 0);
        assert_eq!(heard.0.lock().last().unwrap(), &Vec::<u64>::new());
        drop(listener);
        drop(heard);
        t.insert("b.test", backend(7));
        assert!(t.ids.lock().listeners.is_empty(), "dropped listeners go");
    }

    #[test]
    fn readers_keep_their_snapshot_while_writers_swap() {
        let t = RouteTable::new();
        t.insert("a.test", backend(1));
        let held = t.get("a.test").unwrap();
        t.insert("a.test", backend(9));
        assert_eq!(held.backend, backend(1));
        assert_eq!(t.get("a.test").unwrap().backend, backend(9));
    }
}
