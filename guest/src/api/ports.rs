//! `GET /v1/ports` and `GET /v1/ports/events`: the open ports, and a live
//! NDJSON stream of their opening and closing.

use http::{Response, StatusCode};
use tokio::sync::broadcast::error::RecvError;

use super::Parts;
use super::body::{self, Body};

pub(super) fn list(p: &Parts) -> Response<Body> {
    body::json(StatusCode::OK, &p.publisher.ports())
}

pub(super) fn events(p: &Parts) -> Response<Body> {
    let mut changes = p.publisher.subscribe();
    let (tx, resp) = body::ndjson_stream();
    tokio::spawn(async move {
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
