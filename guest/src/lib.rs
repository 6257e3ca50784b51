//! `nestbox-guest`: the platform that runs in a nestbox VM's root namespace.
//!
//! Modules, one concept each:
//! - [`config`]: the guest's configuration document, checked at start;
//! - [`cgroup`]: finding the cgroup v2 mount and walking a cgroup subtree;
//! - [`netns`]: doing work inside another network namespace, on a thread of
//!   its own (never on a tokio worker);
//! - [`publish`]: port events become ingress routes (and the API's port
//!   list and stream);
//! - [`supervisor`]: runs each platform service, restarting it on failure;
//! - [`portwatch`]: the eBPF port watcher that turns listen/close in the inner
//!   container into port events.

pub mod cgroup;
pub mod config;
pub mod netns;
pub mod portwatch;
pub mod publish;
pub mod supervisor;
