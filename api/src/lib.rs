//! The contract of a nestbox VM's API, shared by the guest that serves it,
//! the `nestbox` CLI and the tests: the wire types of every operation
//! ([`types`], [`exec`]), the error shape ([`error`]), the version header
//! and how a client speaking version N talks to a guest speaking N or N−1
//! ([`version`]), and, with the `client` feature, a typed async client
//! (HTTP/1.1 over TLS or a Unix socket, `WebSocket`s for exec and tunnels).
//!
//! Every type has a JSON fixture in `fixtures/` that the tests parse and
//! compare: a later version that can no longer read a fixture of the
//! previous one breaks N−1 compatibility, and its test says which.
#![forbid(unsafe_code)]

pub mod error;
pub mod exec;
pub mod fs;
pub mod proxy;
pub mod types;
pub mod version;

#[cfg(feature = "client")]
pub mod client;

pub use error::{ErrorBody, ErrorDetail};
pub use version::{API_VERSION, CAPABILITIES_HEADER, VERSION_HEADER};

#[cfg(test)]
mod fixtures;
