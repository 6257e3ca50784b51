//! The listening TCP sockets of a network namespace, by `NETLINK_SOCK_DIAG`.
//!
//! This is how the watcher learns what already listens (at start, or after
//! the ring buffer lost records). inet_diag gives, per socket, the same
//! cookie BPF reports (`idiag_cookie`) and the socket's cgroup id
//! (`INET_DIAG_CGROUP_ID`, Linux 5.7), so the answer can be limited to the
//! inner container's cgroups and matched against kernel events exactly —
//! unlike `/proc/net/tcp`, which has neither.
//!
//! The netlink socket is created inside the target namespace on a helper
//! thread ([`crate::netns::run_in`]) and answers for that namespace from any
//! thread afterwards. A dump is a few blocking syscalls: call it from
//! `spawn_blocking`.

use std::io;
use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::Nla as _;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netns::{self, NetNsError};

/// `INET_DIAG_CGROUP_ID` from `linux/inet_diag.h`.
const INET_DIAG_CGROUP_ID: u16 = 21;

/// Errors talking sock_diag.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The namespace could not be entered.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// The netlink socket failed.
    #[error("sock_diag netlink socket in {netns}: {source}")]
    Socket {
        /// The namespace (or "the current network namespace").
        netns: String,
        /// The error.
        source: io::Error,
    },
    /// The kernel answered something this code cannot read.
    #[error("sock_diag answer could not be decoded: {0}")]
    Decode(String),
    /// The kernel answered with an error.
    #[error("sock_diag dump failed: {0}")]
    Kernel(String),
}

/// One listening socket as inet_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Socket cookie (same as BPF's `bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Local port.
    pub port: u16,
    /// Local address.
    pub addr: IpAddr,
    /// cgroup v2 id the socket was created in (None before Linux 5.7).
    pub cgroup_id: Option<u64>,
    /// Socket inode, to find the owning process through `/proc/PID/fd`.
    pub inode: u32,
}

/// A sock_diag socket bound to one network namespace.
pub struct SockDiag {
    socket: netlink_sys::Socket,
    netns: String,
}

impl std::fmt::Debug for SockDiag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockDiag")
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl SockDiag {
    /// Opens a sock_diag socket inside the namespace at `netns` (the current
    /// one when `None`).
    ///
    /// # Errors
    /// [`SockDiagError`] if the namespace or socket cannot be had.
    pub fn open_in(netns: Option<&Path>) -> Result<Self, SockDiagError> {
        let name = netns.map_or_else(
            || "the current network namespace".to_owned(),
            |p| p.display().to_string(),
        );
        let socket = netns::run_in(netns, || {
            let mut socket = netlink_sys::Socket::new(NETLINK_SOCK_DIAG)?;
            socket.bind_auto()?;
            socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
            Ok::<_, io::Error>(socket)
        })?
        .map_err(|source| SockDiagError::Socket {
            netns: name.clone(),
            source,
        })?;
        Ok(Self {
            socket,
            netns: name,
        })
    }

    /// Every listening TCP socket (IPv4 and IPv6) of the namespace.
    ///
    /// # Errors
    /// [`SockDiagError`] if the dump fails.
    pub fn listeners(&self) -> Result<Vec<Listener>, SockDiagError> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(family, &mut out)?;
        }
        Ok(out)
    }

    fn io_err(&self, source: io::Error) -> SockDiagError {
        SockDiagError::Socket {
            netns: self.netns.clone(),
            source,
        }
    }

    fn dump(&self, family: u8, out: &mut Vec<Listener>) -> Result<(), SockDiagError> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|e| self.io_err(e))?;

        let mut rx = Vec::with_capacity(64 * 1024);
        loop {
            rx.clear();
            let size = self.socket.recv(&mut rx, 0).map_err(|e| self.io_err(e))?;
            let mut offset = 0;
            while offset < size {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[offset..size])
                    .map_err(|e| SockDiagError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return Err(SockDiagError::Kernel(format!("{e:?}")));
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                        let cgroup_id = resp.nlas.iter().find_map(|nla| match nla {
                            Nla::Other(o) if o.kind() == INET_DIAG_CGROUP_ID => {
                                let mut v = [0u8; 8];
                                o.emit_value(&mut v);
                                Some(u64::from_ne_bytes(v))
                            }
                            _ => None,
                        });
                        let id = &resp.header.socket_id;
                        out.push(Listener {
                            cookie: cookie_of(id.cookie),
                            port: id.source_port,
                            addr: id.source_address,
                            cgroup_id,
                            inode: resp.header.inode,
                        });
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

/// The kernel stores the 64-bit cookie as two native-endian u32 halves,
/// low half first (`sock_diag_save_cookie`).
fn cookie_of(bytes: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let hi = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    u64::from(lo) | (u64::from(hi) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_halves_are_low_first() {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&0xdead_beef_u32.to_ne_bytes());
        b[4..].copy_from_slice(&0x1_u32.to_ne_bytes());
        assert_eq!(cookie_of(b), 0x1_dead_beef);
    }

    #[test]
    fn sees_a_loopback_listener_here() {
        // Needs no privilege: sock_diag of our own namespace.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let diag = SockDiag::open_in(None).unwrap();
        let found = diag.listeners().unwrap();
        let mine = found.iter().find(|l| l.port == port).expect("our listener");
        assert_eq!(mine.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_ne!(mine.cookie, 0);
        assert!(mine.cgroup_id.is_some());
    }
}
