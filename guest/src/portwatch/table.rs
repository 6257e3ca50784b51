//! From sockets to ports.
//!
//! The kernel reports sockets; users care about ports. A port is published
//! while at least one socket listens on it: `0.0.0.0:8080` + `[::]:8080`, or
//! two `SO_REUSEPORT` listeners, are one port, and it closes only when the
//! last of them goes. Sockets are keyed by their cookie, which the kernel
//! never reuses, so repeated or late news about a socket is harmless.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::event::{Origin, PortEvent, Process};

/// One listening socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socket {
    /// Kernel socket cookie.
    pub cookie: u64,
    /// Local port.
    pub port: u16,
    /// Local address.
    pub addr: IpAddr,
    /// The process that listened, when known.
    pub process: Option<Process>,
}

/// What [`PortTable::reconcile`] changed.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Port events, closes first.
    pub events: Vec<PortEvent>,
    /// Sockets that were listening unseen.
    pub added: Vec<Socket>,
    /// Cookies of sockets that had gone unseen.
    pub removed: Vec<u64>,
}

/// The published ports and the sockets behind them.
#[derive(Debug, Default)]
pub struct PortTable {
    sockets: HashMap<u64, Socket>,
    ports: BTreeMap<u16, BTreeSet<u64>>,
}

impl PortTable {
    /// Records a listening socket; returns `Listening` if its port was not
    /// published before.
    pub fn listen(&mut self, socket: Socket, origin: Origin) -> Option<PortEvent> {
        if self.sockets.contains_key(&socket.cookie) {
            return None;
        }
        let cookies = self.ports.entry(socket.port).or_default();
        cookies.insert(socket.cookie);
        let first = cookies.len() == 1;
        let event = first.then(|| PortEvent::Listening {
            port: socket.port,
            addrs: vec![socket.addr],
            process: socket.process.clone(),
            origin,
        });
        self.sockets.insert(socket.cookie, socket);
        event
    }

    /// Forgets a socket; returns `Closed` if it was the last on its port.
    /// Unknown cookies (a close already handled by reconciliation) are
    /// ignored.
    pub fn close(&mut self, cookie: u64, origin: Origin) -> Option<PortEvent> {
        let socket = self.sockets.remove(&cookie)?;
        let cookies = self.ports.get_mut(&socket.port)?;
        cookies.remove(&cookie);
        if !cookies.is_empty() {
            return None;
        }
        self.ports.remove(&socket.port);
        Some(PortEvent::Closed {
            port: socket.port,
            addrs: vec![socket.addr],
            process: socket.process,
            origin,
        })
    }

    /// Makes the table equal to `truth`, the sockets that listen right now.
    /// Returns the port events that takes (closes first, then listens) and
    /// which sockets came and went.
    pub fn reconcile(&mut self, truth: Vec<Socket>) -> Reconciled {
        let live: BTreeSet<u64> = truth.iter().map(|s| s.cookie).collect();
        let removed: Vec<u64> = self
            .sockets
            .keys()
            .copied()
            .filter(|c| !live.contains(c))
            .collect();
        let mut events: Vec<PortEvent> = removed
            .iter()
            .filter_map(|&c| self.close(c, Origin::Reconcile))
            .collect();
        let added: Vec<Socket> = truth
            .into_iter()
            .filter(|s| !self.sockets.contains_key(&s.cookie))
            .collect();
        events.extend(
            added
                .iter()
                .filter_map(|s| self.listen(s.clone(), Origin::Reconcile)),
        );
        Reconciled {
            events,
            added,
            removed,
        }
    }

    /// Published ports with the addresses listening on each, in port order.
    #[must_use]
    pub fn ports(&self) -> Vec<(u16, Vec<IpAddr>)> {
        self.ports
            .iter()
            .map(|(port, cookies)| {
                let addrs = cookies
                    .iter()
                    .filter_map(|c| self.sockets.get(c).map(|s| s.addr))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                (*port, addrs)
            })
            .collect()
    }

    /// Whether `port` is published.
    #[must_use]
    pub fn is_published(&self, port: u16) -> bool {
        self.ports.contains_key(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Origin = Origin::Kernel { ktime_ns: 1 };

    fn sock(cookie: u64, port: u16, addr: &str) -> Socket {
        Socket {
            cookie,
            port,
            addr: addr.parse().unwrap(),
            process: None,
        }
    }

    #[test]
    fn dual_stack_pair_is_one_port() {
        let mut t = PortTable::default();
        assert!(t.listen(sock(1, 8080, "0.0.0.0"), K).is_some());
        assert!(t.listen(sock(2, 8080, "::"), K).is_none());
        assert_eq!(
            t.ports(),
            vec![(
                8080,
                vec!["0.0.0.0".parse().unwrap(), "::".parse().unwrap()]
            )]
        );
        assert!(t.close(1, K).is_none(), "one socket still listens");
        let closed = t.close(2, K).unwrap();
        assert_eq!(closed.port(), 8080);
        assert!(!closed.is_listening());
        assert!(t.ports().is_empty());
    }

    #[test]
    fn duplicate_and_unknown_news_is_ignored() {
        let mut t = PortTable::default();
        assert!(t.listen(sock(1, 80, "0.0.0.0"), K).is_some());
        assert!(t.listen(sock(1, 80, "0.0.0.0"), K).is_none());
        assert!(t.close(9, K).is_none());
        assert!(t.close(1, K).is_some());
        assert!(t.close(1, K).is_none());
    }

    #[test]
    fn reconcile_adds_and_removes() {
        let mut t = PortTable::default();
        t.listen(sock(1, 80, "0.0.0.0"), K);
        t.listen(sock(2, 81, "0.0.0.0"), K);
        t.listen(sock(3, 81, "::"), K);
        // Socket 2 went away unseen, socket 4 appeared unseen, 1 is gone.
        let r = t.reconcile(vec![sock(3, 81, "::"), sock(4, 82, "127.0.0.1")]);
        let mut removed = r.removed.clone();
        removed.sort_unstable();
        assert_eq!(removed, vec![1, 2]);
        assert_eq!(r.added, vec![sock(4, 82, "127.0.0.1")]);
        let events = r.events;
        let summary: Vec<(u16, bool)> = events
            .iter()
            .map(|e| (e.port(), e.is_listening()))
            .collect();
        assert_eq!(summary, vec![(80, false), (82, true)]);
        assert!(events.iter().all(|e| e.origin() == Origin::Reconcile));
        assert!(t.is_published(81));
        assert!(!t.is_published(80));
        let again = t.reconcile(vec![sock(3, 81, "::"), sock(4, 82, "127.0.0.1")]);
        assert!(again.events.is_empty() && again.added.is_empty() && again.removed.is_empty());
    }
}
