//! `nestbox-guest`: the platform that runs in a nestbox VM's root namespace.
//!
//! Modules, one concept each:
//! - [`container`]: the inner container (namespaces, overlay root,
//!   processes started inside it, `cgroup.kill`);
//! - [`init`]: PID 1 duties (mounts, reaping, power-off, network);
//! - [`disk`]: the platform's and the user's disks (formatted only when
//!   blank, repaired with `e2fsck -p`, otherwise refused untouched);
//! - [`config`]: the guest's configuration document, checked at start;
//! - [`cgroup`]: finding the cgroup v2 mount and walking a cgroup subtree;
//! - [`resources`]: the platform's and the container's sibling cgroups,
//!   with the container's limits and the platform's reserve;
//! - [`netns`]: doing work inside another network namespace, on a thread of
//!   its own (never on a tokio worker);
//! - [`publish`]: port events become ingress routes (and the API's port
//!   list and stream);
//! - [`run`]: the whole platform of a VM, from its configuration;
//! - [`bounce`]: the inner container's lifecycle: up, down, bounce;
//! - [`graveyard`]: old builds' namespaces and veths, freed once bounces
//!   pause;
//! - [`api`]: the VM's own API (HTTP/JSON, token, `OpenAPI` document);
//! - [`services`]: user services, kept on the data disk, started in the
//!   container, restarted when they crash;
//! - [`logs`]: their output, on disk and followable;
//! - [`urls`]: URL auth's state (each port's mode, tokens, share links,
//!   the signing key), checked by the ingress;
//! - [`storage`]: the user's disk as btrfs, the container's layer as a
//!   subvolume, checkpoints as snapshots restored by an atomic swap;
//! - [`supervisor`]: runs each platform service, restarting it on failure;
//! - [`portwatch`]: the eBPF port watcher that turns listen/close in the inner
//!   container into port events.
#![allow(
    clippy::disallowed_methods,
    reason = "blocking calls are denied only in the modules that run on the runtime thread (see clippy.toml)"
)]

pub mod api;
pub mod bounce;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod disk;
pub mod exec;
pub mod faults;
pub mod files;
pub mod graveyard;
pub mod init;
pub mod logs;
pub mod netns;
pub mod portwatch;
pub mod publish;
pub mod resources;
pub mod run;
pub mod services;
pub mod spawn;
pub mod storage;
pub mod supervisor;
pub mod urls;
