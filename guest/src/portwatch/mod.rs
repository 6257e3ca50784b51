//! The port watcher: which TCP ports the inner container listens on, the
//! moment that changes.
//!
//! Kernel side: `nestbox_ebpf::PortProbe` (sockops `TCP_LISTEN_CB` and
//! `STATE_CB`, `cgroup/sock_release`) attached to the inner container's
//! cgroup, feeding one ring buffer. User side:
//! - [`watcher`]: reads the ring buffer through tokio's `AsyncFd` (no
//!   polling) and reconciles with the kernel's socket table at start and
//!   whenever the kernel reports lost records;
//! - [`table`]: folds socket-level listen/close into port-level events (a
//!   port is published while any socket listens on it);
//! - [`sockdiag`]: the listening sockets of a network namespace, by
//!   `NETLINK_SOCK_DIAG`, with their cgroup and socket cookie.

mod event;
mod owners;
pub mod sockdiag;
pub mod table;
mod watcher;

pub use event::{Origin, PortEvent, Process};
pub use watcher::{WatchError, Watcher};
