//! The ingress of a nestbox VM: an HTTPS reverse proxy in the VM's root
//! namespace that serves every published port of the inner container.
//!
//! - [`access`]: URL auth — each port's mode, tokens, login and share
//!   links, the session cookie;
//! - [`routes`]: the live route table, hostname → backend (lock-free reads);
//! - [`backoff`]: the platform's one retry backoff;
//! - [`netns`]: work inside another network namespace, on a thread that
//!   entered it (the platform's one mechanism for it);
//! - [`dial`]: connecting to backends *inside* a network namespace, from a
//!   thread that entered it (so `127.0.0.1`-only listeners are reachable);
//! - [`client`]: the HTTP/1.1 client to backends, with its kept-alive
//!   connections;
//! - [`local`]: hosts served in this process (the VM's API), with no
//!   socket between;
//! - [`proxy`]: one request: routing, header rewriting, streaming, upgrades,
//!   error pages;
//! - [`server`]: the listeners (HTTPS with ALPN h2/http1.1, plain HTTP for
//!   redirects and ACME HTTP-01), limits and graceful shutdown;
//! - [`tls`]: certificates by SNI, swapped with no dropped connection;
//! - [`config`]: the `nestbox-ingress serve` configuration file;
//! - [`logging`]: the logging setup of the platform's binaries.
#![allow(
    clippy::disallowed_methods,
    reason = "blocking calls are denied only in the modules that run on the runtime thread (see clippy.toml)"
)]
#![forbid(unsafe_code)]

pub mod access;
pub mod acme;
pub mod backoff;
pub mod chunked;
pub mod client;
pub mod config;
pub mod dial;
pub mod local;
pub mod logging;
pub mod netns;
pub mod pages;
pub mod proxy;
pub mod routes;
pub mod serve;
pub mod server;
pub mod tls;
