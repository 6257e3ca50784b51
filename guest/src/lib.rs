//! `nestbox-guest`: the platform that runs in a nestbox VM's root namespace.
//!
//! Modules, one concept each:
//! - [`cgroup`]: finding the cgroup v2 mount and walking a cgroup subtree;
//! - [`netns`]: doing work inside another network namespace, on a thread of
//!   its own (never on a tokio worker);
//! - [`portwatch`]: the eBPF port watcher that turns listen/close in the inner
//!   container into port events.

pub mod cgroup;
pub mod netns;
pub mod portwatch;
