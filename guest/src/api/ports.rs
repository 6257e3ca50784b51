//! `GET /v1/ports` and `GET /v1/ports/events`: the open ports, and an
//! NDJSON stream that starts with every port open now (`ts_ms` 0) and goes
//! on with each opening and closing as it happens.
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};
use tokio::sync::broadcast::error::RecvError;

use super::Parts;
use super::body::{self, Body};
use crate::publish::PortChange;

pub(super) fn list(p: &Parts) -> Response<Body> {
    body::json(StatusCode::OK, &p.publisher.ports())
}

pub(super) fn events(p: &Parts) -> Response<Body> {
    // Subscribed before the snapshot: nothing falls between the two.
    let mut changes = p.publisher.subscribe();
    let snapshot: Vec<PortChange> = p
        .publisher
        .ports()
        .into_iter()
        .map(|port| PortChange {
            event: crate::publish::PortChangeKind::Open,
            port,
            ts_ms: 0,
        })
        .collect();
    let (tx, resp) = body::ndjson_stream();
    tokio::spawn(async move {
        // The ports open now come first, so a watcher misses nothing that
        // opened before it connected.
        for change in &snapshot {
            if tx.send(body::ndjson_line(change)).await.is_err() {
                return;
            }
        }
        loop {
            let line = match changes.recv().await {
                Ok(change) => body::ndjson_line(&change),
                Err(RecvError::Lagged(n)) => body::ndjson_line(&serde_json::json!({
                    "event": "lagged",
                    "missed": n,
                    "hint": "re-read GET /v1/ports for the current set",
                })),
                Err(RecvError::Closed) => return,
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    resp
}
