//! The ingress of a nestbox VM: an HTTPS reverse proxy in the VM's root
//! namespace that serves every published port of the inner container.
//!
//! - [`routes`]: the live route table, hostname → backend (lock-free reads);
//! - [`dial`]: connecting to backends *inside* a network namespace, from a
//!   thread that entered it (so `127.0.0.1`-only listeners are reachable);
//! - [`pool`]: kept-alive HTTP/1.1 connections to each backend;
//! - [`proxy`]: one request: routing, header rewriting, streaming, upgrades,
//!   error pages;
//! - [`server`]: the listeners (HTTPS with ALPN h2/http1.1, plain HTTP for
//!   redirects and ACME HTTP-01), limits and graceful shutdown;
//! - [`tls`]: certificates by SNI, swapped with no dropped connection;
//! - [`config`]: the `nestbox-ingress serve` configuration file.

#![forbid(unsafe_code)]

pub mod acme;
pub mod chunked;
pub mod config;
pub mod dial;
pub mod pages;
pub mod pool;
pub mod proxy;
pub mod routes;
pub mod serve;
pub mod server;
pub mod tls;
