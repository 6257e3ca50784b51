//! The event record shared with the kernel (`src/bpf/events.h`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Linux's address families, as the u16 the records carry (UAPI values).
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Mirror of `struct nb_event` in `events.h`.
///
/// `tests::layout_matches_c` compiles the header with the host C compiler and
/// compares size and offsets, so this struct cannot drift from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_get_socket_cookie()`; equals `inet_diag`'s `idiag_cookie`.
    pub socket_cookie: u64,
    /// `bpf_get_netns_cookie()`; equals `SO_NETNS_COOKIE`.
    pub netns_cookie: u64,
    /// cgroup v2 id of the calling task (inode number of its directory).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()`: `CLOCK_MONOTONIC` when the hook ran.
    pub ktime_ns: u64,
    /// Process id of the caller (0 without process context).
    pub tgid: u32,
    /// Thread id of the caller.
    pub pid: u32,
    /// Local address in network byte order; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// Local port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// `enum nb_event_kind`.
    pub kind: u8,
    /// `enum nb_event_source`.
    pub source: u8,
    /// Padding, zero.
    pub pad: [u8; 2],
    /// Task comm of the caller, NUL-padded.
    pub comm: [u8; 16],
}

/// A record the kernel handed over could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The record is shorter than `struct nb_event`: the object and this
    /// crate were built from different `events.h`.
    #[error(
        "event record of {len} bytes, expected {expected}: rebuild nestbox (object and loader disagree)"
    )]
    Short {
        /// Bytes received.
        len: usize,
        /// `size_of::<RawEvent>()`.
        expected: usize,
    },
    /// An unknown `kind`, `source` or `family` value.
    #[error(
        "event record has unknown {field} = {value}: rebuild nestbox (object and loader disagree)"
    )]
    Unknown {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u32,
    },
}

/// Mirror of `struct nb_listener` in `events.h`: what the kernel remembers
/// about a listening socket so it can report its close.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawListener {
    /// Local address in network byte order; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// Local port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Padding, zero.
    pub pad: u32,
    /// `bpf_get_netns_cookie()` of the socket.
    pub netns_cookie: u64,
}

// SAFETY: RawListener is repr(C), made of integers only, with the padding
// spelled out, so every bit pattern is valid and it has no uninit bytes.
unsafe impl aya::Pod for RawListener {}

impl RawListener {
    /// Describes a socket at `ip:port` in the namespace `netns_cookie`.
    #[must_use]
    pub fn new(ip: IpAddr, port: u16, netns_cookie: u64) -> Self {
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let (family, addr) = match ip {
            IpAddr::V4(v4) => (AF_INET, [word(&v4.octets()), 0, 0, 0]),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                (
                    AF_INET6,
                    [
                        word(&o[0..4]),
                        word(&o[4..8]),
                        word(&o[8..12]),
                        word(&o[12..16]),
                    ],
                )
            }
        };
        Self {
            addr,
            port,
            family,
            pad: 0,
            netns_cookie,
        }
    }
}

/// What happened to a listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `listen()` succeeded.
    Listen,
    /// The listener went away (close, shutdown, process exit).
    Close,
}

/// Which kernel hook reported the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventSource {
    /// sockops `BPF_SOCK_OPS_TCP_LISTEN_CB`.
    ListenCallback,
    /// sockops `BPF_SOCK_OPS_STATE_CB` (LISTEN to CLOSE).
    StateCallback,
    /// `cgroup/sock_release`.
    SockRelease,
}

impl RawEvent {
    /// Copies a record out of a ring buffer item.
    ///
    /// # Errors
    /// [`DecodeError`] if the record is too short or has unknown enum values.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let expected = size_of::<Self>();
        if bytes.len() < expected {
            return Err(DecodeError::Short {
                len: bytes.len(),
                expected,
            });
        }
        // SAFETY: `bytes` holds at least `size_of::<RawEvent>()` bytes, the
        // read is unaligned-safe, and every bit pattern is a valid RawEvent
        // (integers and byte arrays only).
        let event = unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() };
        event.kind()?;
        event.source()?;
        event.ip()?;
        Ok(event)
    }

    /// The event's kind.
    ///
    /// # Errors
    /// [`DecodeError::Unknown`] for a value `events.h` does not define.
    pub fn kind(&self) -> Result<EventKind, DecodeError> {
        match self.kind {
            1 => Ok(EventKind::Listen),
            2 => Ok(EventKind::Close),
            other => Err(DecodeError::Unknown {
                field: "kind",
                value: other.into(),
            }),
        }
    }

    /// The hook that reported it.
    ///
    /// # Errors
    /// [`DecodeError::Unknown`] for a value `events.h` does not define.
    pub fn source(&self) -> Result<EventSource, DecodeError> {
        match self.source {
            1 => Ok(EventSource::ListenCallback),
            2 => Ok(EventSource::StateCallback),
            3 => Ok(EventSource::SockRelease),
            other => Err(DecodeError::Unknown {
                field: "source",
                value: other.into(),
            }),
        }
    }

    /// The local address.
    ///
    /// # Errors
    /// [`DecodeError::Unknown`] for a family other than IPv4 or IPv6.
    pub fn ip(&self) -> Result<IpAddr, DecodeError> {
        // The words hold network-order bytes as the kernel stored them.
        let bytes = |w: u32| w.to_ne_bytes();
        match self.family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::from(bytes(self.addr[0])))),
            AF_INET6 => {
                let mut octets = [0u8; 16];
                for (chunk, word) in octets.chunks_exact_mut(4).zip(self.addr) {
                    chunk.copy_from_slice(&bytes(word));
                }
                Ok(IpAddr::V6(Ipv6Addr::from(octets)))
            }
            _ => Err(DecodeError::Unknown {
                field: "family",
                value: self.family.into(),
            }),
        }
    }

    /// The caller's task name.
    #[must_use]
    pub fn comm(&self) -> String {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use std::path::PathBuf;
    use std::process::Command;

    /// Compiles a host program that prints the C layout of `struct nb_event`
    /// and compares it with the Rust mirror.
    #[test]
    fn layout_matches_c() {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("nestbox-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("layout.c");
        let exe = dir.join("layout");
        std::fs::write(
            &src,
            r#"#include <stdio.h>
#include <stddef.h>
#include "events.h"
#define F(f) printf(#f " %zu\n", offsetof(struct nb_event, f));
#define L(f) printf("listener." #f " %zu\n", offsetof(struct nb_listener, f));
int main(void) {
    printf("size %zu\n", sizeof(struct nb_event));
    F(socket_cookie) F(netns_cookie) F(cgroup_id) F(ktime_ns) F(tgid) F(pid)
    F(addr) F(port) F(family) F(kind) F(source) F(_pad) F(comm)
    printf("listener_size %zu\n", sizeof(struct nb_listener));
    L(addr) L(port) L(family) L(_pad) L(netns_cookie)
    return 0;
}
"#,
        )
        .unwrap();
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = Command::new(&cc)
            .arg("-I")
            .arg(manifest.join("src/bpf"))
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run the C compiler `{cc}` ({e}): apt-get install gcc")
            });
        assert!(status.success(), "compiling the layout probe failed");
        let out = Command::new(&exe).output().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let c: Vec<(String, usize)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect();
        let rust = vec![
            ("size", size_of::<RawEvent>()),
            ("socket_cookie", offset_of!(RawEvent, socket_cookie)),
            ("netns_cookie", offset_of!(RawEvent, netns_cookie)),
            ("cgroup_id", offset_of!(RawEvent, cgroup_id)),
            ("ktime_ns", offset_of!(RawEvent, ktime_ns)),
            ("tgid", offset_of!(RawEvent, tgid)),
            ("pid", offset_of!(RawEvent, pid)),
            ("addr", offset_of!(RawEvent, addr)),
            ("port", offset_of!(RawEvent, port)),
            ("family", offset_of!(RawEvent, family)),
            ("kind", offset_of!(RawEvent, kind)),
            ("source", offset_of!(RawEvent, source)),
            ("_pad", offset_of!(RawEvent, pad)),
            ("comm", offset_of!(RawEvent, comm)),
            ("listener_size", size_of::<RawListener>()),
            ("listener.addr", offset_of!(RawListener, addr)),
            ("listener.port", offset_of!(RawListener, port)),
            ("listener.family", offset_of!(RawListener, family)),
            ("listener._pad", offset_of!(RawListener, pad)),
            (
                "listener.netns_cookie",
                offset_of!(RawListener, netns_cookie),
            ),
        ];
        let rust: Vec<(String, usize)> = rust.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(c, rust, "events.h and RawEvent disagree");
    }

    fn sample() -> RawEvent {
        RawEvent {
            socket_cookie: 7,
            netns_cookie: 9,
            cgroup_id: 11,
            ktime_ns: 13,
            tgid: 100,
            pid: 101,
            addr: [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0],
            port: 8080,
            family: 2,
            kind: 1,
            source: 1,
            pad: [0; 2],
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
        }
    }

    fn bytes_of(e: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent is repr(C) plain data; reading its bytes is sound.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(e).cast::<u8>(), size_of::<RawEvent>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_record() {
        let e = RawEvent::from_bytes(&bytes_of(&sample())).unwrap();
        assert_eq!(e.ip().unwrap(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.kind().unwrap(), EventKind::Listen);
        assert_eq!(e.source().unwrap(), EventSource::ListenCallback);
        assert_eq!(e.comm(), "python3");
    }

    #[test]
    fn decodes_ipv6_record() {
        let mut raw = sample();
        raw.family = 10;
        let ip: Ipv6Addr = "fd00::1:2".parse().unwrap();
        for (i, chunk) in ip.octets().chunks_exact(4).enumerate() {
            raw.addr[i] = u32::from_ne_bytes(chunk.try_into().unwrap());
        }
        let e = RawEvent::from_bytes(&bytes_of(&raw)).unwrap();
        assert_eq!(e.ip().unwrap(), IpAddr::V6(ip));
    }

    #[test]
    fn listener_round_trips_through_an_event() {
        let ip: IpAddr = "fd00::7".parse().unwrap();
        let l = RawListener::new(ip, 443, 3);
        let mut raw = sample();
        raw.addr = l.addr;
        raw.family = l.family;
        assert_eq!(raw.ip().unwrap(), ip);
        let v4 = RawListener::new("10.1.2.3".parse().unwrap(), 80, 3);
        raw.addr = v4.addr;
        raw.family = v4.family;
        assert_eq!(raw.ip().unwrap(), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let bytes = bytes_of(&sample());
        assert!(matches!(
            RawEvent::from_bytes(&bytes[..10]),
            Err(DecodeError::Short { len: 10, .. })
        ));
        let mut raw = sample();
        raw.kind = 9;
        assert!(matches!(
            RawEvent::from_bytes(&bytes_of(&raw)),
            Err(DecodeError::Unknown {
                field: "kind",
                value: 9
            })
        ));
        let mut raw = sample();
        raw.family = 1;
        assert!(RawEvent::from_bytes(&bytes_of(&raw)).is_err());
    }
}
