//! nestbox's eBPF programs and their typed loader.
//!
//! The programs are C (`src/bpf/*.bpf.c`), compiled by clang from `build.rs`
//! and embedded here. [`PortProbe`] loads `portwatch.bpf.o`, attaches its
//! `sockops` and `cgroup/sock_release` programs to one cgroup v2 directory
//! (link-based attach, so dropping the probe detaches everything and leaves
//! nothing pinned), and hands out the ring buffer of [`RawEvent`]s.

mod event;
mod probe;

pub use event::{DecodeError, EventKind, EventSource, RawEvent, RawListener};
pub use probe::{PortProbe, ProbeError};

/// The compiled `portwatch.bpf.o`, aligned for the ELF parser.
pub static PORTWATCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch.bpf.o"));

/// Re-exported so users of the probe can name the ring buffer type.
pub use aya::maps::{MapData, RingBuf};
