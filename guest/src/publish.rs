//! Publishing: the port watcher's events become ingress routes.
//!
//! A port that opens in the inner container is published at once as
//! `https://<port>.<vm>.<domain>/`, and the primary port also as
//! `https://<vm>.<domain>/`; when its last listener closes the routes are
//! withdrawn. The ingress dials the port inside the inner network namespace,
//! on the loopback address when the listener accepts it (a wildcard or a
//! loopback listener), else on the address it listens on. The open ports and
//! a live stream of changes are kept here for the API.
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nestbox_ingress::routes::Backend;
use nestbox_ingress::serve::Handles;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::portwatch::PortEvent;

pub use nestbox_api::types::{PortChange, PortChangeKind, PortInfo, UrlAuth};

/// The VM's names.
#[derive(Clone, Debug)]
pub struct Names {
    /// The VM's name.
    pub name: String,
    /// Its domain.
    pub domain: String,
}

impl Names {
    /// `<name>.<domain>`.
    #[must_use]
    pub fn vm_host(&self) -> String {
        format!("{}.{}", self.name, self.domain)
    }

    /// `<port>.<name>.<domain>`.
    #[must_use]
    pub fn port_host(&self, port: u16) -> String {
        format!("{port}.{}.{}", self.name, self.domain)
    }
}

struct State {
    ports: BTreeMap<u16, PortInfo>,
    primary: u16,
    netns: Option<PathBuf>,
}

/// Turns port events into routes; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    handles: Handles,
    names: Names,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<PortChange>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// Where the ingress dials a port whose listeners are bound to `addrs`.
#[must_use]
pub fn dial_addr(addrs: &[IpAddr], port: u16) -> SocketAddr {
    let v4_local = addrs
        .iter()
        .any(|a| matches!(a, IpAddr::V4(v4) if v4.is_unspecified() || v4.is_loopback()));
    let v6_local = addrs
        .iter()
        .any(|a| matches!(a, IpAddr::V6(v6) if v6.is_unspecified() || v6.is_loopback()));
    let ip = if v4_local {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else if v6_local {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        addrs
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    };
    SocketAddr::new(ip, port)
}

/// Now, in ms since the Unix epoch (the wire's time).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Publisher {
    /// A publisher into `handles` for the VM `names`, with `primary` as the
    /// primary port.
    #[must_use]
    pub fn new(handles: Handles, names: Names, primary: u16) -> Self {
        Self {
            handles,
            names,
            state: Arc::new(Mutex::new(State {
                ports: BTreeMap::new(),
                primary,
                netns: None,
            })),
            changes: broadcast::channel(1024).0,
        }
    }

    /// The primary port.
    #[must_use]
    pub fn primary(&self) -> u16 {
        self.state.lock().primary
    }

    /// The VM's names.
    #[must_use]
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Sets the network namespace ports are dialed in (the inner
    /// container's, which changes when it is rebuilt). Withdraws every port
    /// published from the previous one.
    pub fn set_netns(&self, netns: Option<PathBuf>) {
        self.withdraw_all();
        self.state.lock().netns = netns;
    }

    /// Makes `port` the primary port (`https://<vm>.<domain>/`).
    pub fn set_primary(&self, port: u16) {
        let mut st = self.state.lock();
        if st.primary == port {
            return;
        }
        let old = std::mem::replace(&mut st.primary, port);
        if let Some(info) = st.ports.get_mut(&old) {
            info.primary = false;
            self.handles.unpublish(&self.names.vm_host());
        }
        if let Some(info) = st.ports.get_mut(&port) {
            info.primary = true;
            let backend = Backend {
                addr: dial_addr(&info.addrs, port),
                netns: st.netns.clone(),
            };
            self.handles
                .publish_gated(&self.names.vm_host(), backend, port);
        }
    }

    /// `port`'s URL auth mode now.
    fn auth(&self, port: u16) -> UrlAuth {
        self.handles
            .access()
            .map_or(UrlAuth::Private, |a| a.mode(port))
    }

    /// Applies one event from the port watcher.
    pub fn apply(&self, event: &PortEvent) {
        let mut st = self.state.lock();
        let port = event.port();
        let primary = port == st.primary;
        match event {
            PortEvent::Listening { addrs, process, .. } => {
                let backend = Backend {
                    addr: dial_addr(addrs, port),
                    netns: st.netns.clone(),
                };
                let host = self.names.port_host(port);
                self.handles.publish_gated(&host, backend.clone(), port);
                if primary {
                    self.handles
                        .publish_gated(&self.names.vm_host(), backend, port);
                }
                let info = PortInfo {
                    port,
                    addrs: addrs.clone(),
                    pid: process.as_ref().map(|p| p.pid),
                    process: process.as_ref().map(|p| p.comm.clone()),
                    url: format!("https://{host}/"),
                    primary,
                    auth: self.auth(port),
                };
                tracing::info!(port, url = %info.url, primary, "port published");
                st.ports.insert(port, info.clone());
                let _ = self.changes.send(PortChange {
                    event: PortChangeKind::Open,
                    port: info,
                    ts_ms: now_ms(),
                });
            }
            PortEvent::Closed { .. } => {
                if let Some(info) = st.ports.remove(&port) {
                    self.withdraw(&info);
                }
            }
        }
    }

    fn withdraw(&self, info: &PortInfo) {
        self.handles.unpublish(&self.names.port_host(info.port));
        if info.primary {
            self.handles.unpublish(&self.names.vm_host());
        }
        tracing::info!(port = info.port, "port withdrawn");
        let mut info = info.clone();
        info.auth = self.auth(info.port);
        let _ = self.changes.send(PortChange {
            event: PortChangeKind::Close,
            port: info,
            ts_ms: now_ms(),
        });
    }

    /// Withdraws every published port (the container is going away).
    pub fn withdraw_all(&self) {
        let ports = std::mem::take(&mut self.state.lock().ports);
        for info in ports.values() {
            self.withdraw(info);
        }
    }

    /// Withdraws the ports not in `open` (after the watcher was started
    /// again: ports that closed while it was down).
    pub fn keep_only(&self, open: &[u16]) {
        let gone: Vec<PortInfo> = {
            let mut st = self.state.lock();
            let gone: Vec<u16> = st
                .ports
                .keys()
                .filter(|p| !open.contains(p))
                .copied()
                .collect();
            gone.iter().filter_map(|p| st.ports.remove(p)).collect()
        };
        for info in &gone {
            self.withdraw(info);
        }
    }

    /// The open ports.
    #[must_use]
    pub fn ports(&self) -> Vec<PortInfo> {
        let st = self.state.lock();
        st.ports
            .values()
            .map(|info| PortInfo {
                auth: self.auth(info.port),
                ..info.clone()
            })
            .collect()
    }

    /// Live changes from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<PortChange> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn dials_loopback_when_the_listener_accepts_it() {
        let cases = [
            (vec![ip("0.0.0.0")], "127.0.0.1:80"),
            (vec![ip("127.0.0.1")], "127.0.0.1:80"),
            (vec![ip("::")], "[::1]:80"),
            (vec![ip("::1")], "[::1]:80"),
            (vec![ip("::"), ip("0.0.0.0")], "127.0.0.1:80"),
            (vec![ip("10.1.2.3")], "10.1.2.3:80"),
        ];
        for (addrs, want) in cases {
            assert_eq!(dial_addr(&addrs, 80).to_string(), want, "{addrs:?}");
        }
    }

    fn listening(port: u16, addr: &str) -> PortEvent {
        PortEvent::Listening {
            port,
            addrs: vec![ip(addr)],
            process: Some(crate::portwatch::Process {
                pid: 42,
                comm: "server".into(),
            }),
            origin: crate::portwatch::Origin::Reconcile,
        }
    }

    fn closed(port: u16) -> PortEvent {
        PortEvent::Closed {
            port,
            addrs: vec![],
            process: None,
            origin: crate::portwatch::Origin::Reconcile,
        }
    }

    /// A route listener that panics when armed.
    struct Bomb(std::sync::atomic::AtomicBool);

    impl nestbox_ingress::routes::RouteListener for Bomb {
        fn backends_changed(
            &self,
            _: &std::collections::HashMap<u64, nestbox_ingress::routes::Backend>,
        ) {
            assert!(
                !self.0.swap(false, std::sync::atomic::Ordering::SeqCst),
                "injected panic"
            );
        }
    }

    #[test]
    fn a_panic_while_the_publisher_and_route_locks_are_held_leaves_both_usable() {
        let routes = nestbox_ingress::routes::RouteTable::new();
        let names = Names {
            name: "vm1".into(),
            domain: "test".into(),
        };
        let p = Publisher::new(Handles::detached(routes.clone()), names, 8080);
        let bomb = Arc::new(Bomb(std::sync::atomic::AtomicBool::new(false)));
        let listener: Arc<dyn nestbox_ingress::routes::RouteListener> = bomb.clone();
        routes.listen(&listener);
        bomb.0.store(true, std::sync::atomic::Ordering::SeqCst);
        // The panic unwinds through the route table's writer lock and the
        // publisher's lock, as a bug in either would.
        let hit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.apply(&listening(8080, "0.0.0.0"));
        }));
        assert!(hit.is_err(), "the injected panic happened");
        // A supervised restart would go on with the same locks: they work.
        p.apply(&listening(3000, "127.0.0.1"));
        assert!(routes.get("3000.vm1.test").is_some());
        p.set_primary(3000);
        assert_eq!(routes.get("vm1.test").unwrap().backend.addr.port(), 3000);
        assert!(p.ports().iter().any(|i| i.port == 3000));
    }

    #[test]
    fn ports_become_routes_and_go_away() {
        let routes = nestbox_ingress::routes::RouteTable::new();
        let names = Names {
            name: "vm1".into(),
            domain: "test".into(),
        };
        let p = Publisher::new(Handles::detached(routes.clone()), names, 8080);
        p.set_netns(Some("/proc/1/ns/net".into()));
        let mut changes = p.subscribe();
        p.apply(&listening(8080, "0.0.0.0"));
        p.apply(&listening(3000, "127.0.0.1"));
        let primary = routes.get("vm1.test").unwrap();
        assert_eq!(primary.backend.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(
            primary.backend.netns.as_deref(),
            Some(std::path::Path::new("/proc/1/ns/net"))
        );
        assert!(routes.get("8080.vm1.test").is_some());
        assert!(routes.get("3000.vm1.test").is_some());
        let ports = p.ports();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[1].url, "https://8080.vm1.test/");
        assert!(ports[1].primary && !ports[0].primary);
        assert_eq!(ports[0].process.as_deref(), Some("server"));
        let first = changes.try_recv().unwrap();
        assert_eq!((first.event, first.port.port), (PortChangeKind::Open, 8080));

        p.apply(&closed(8080));
        assert!(routes.get("vm1.test").is_none());
        assert!(routes.get("8080.vm1.test").is_none());
        assert!(routes.get("3000.vm1.test").is_some());
        // The primary moves to 3000, which is open.
        p.set_primary(3000);
        assert_eq!(routes.get("vm1.test").unwrap().backend.addr.port(), 3000);
        p.withdraw_all();
        assert!(routes.hosts().is_empty());
        let events: Vec<_> = std::iter::from_fn(|| changes.try_recv().ok())
            .map(|c| (c.event, c.port.port))
            .collect();
        assert_eq!(
            events,
            [
                (PortChangeKind::Open, 3000),
                (PortChangeKind::Close, 8080),
                (PortChangeKind::Close, 3000)
            ]
        );
    }
}
