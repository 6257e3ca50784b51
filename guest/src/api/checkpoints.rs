//! `/v1/checkpoints`: take, list, inspect, delete and restore checkpoints
//! of the user's filesystem (see [`crate::storage`]). Taking and restoring
//! answer with an NDJSON stream of [`Progress`] lines, Sprites' shape:
//! `info` steps, then one `complete` (with the checkpoint) or `error`.
//! Whatever can be refused before any work (no such checkpoint, no btrfs
//! user disk) is refused with a plain error instead.
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};
use nestbox_api::types::{Checkpoint, CheckpointRequest, Progress, ProgressKind};
use tokio::sync::{mpsc, oneshot};

use super::body::{self, Body};
use super::{ApiError, Control, Parts};
use crate::storage::StoreError;

/// The largest checkpoint request (a comment).
const MAX_REQUEST: usize = 16 << 10;

pub(super) fn api_error(e: &StoreError) -> ApiError {
    match e {
        StoreError::NotFound(_) => ApiError::not_found(e.to_string()),
        StoreError::Unavailable(_) => {
            ApiError::new(StatusCode::CONFLICT, "unavailable", e.to_string())
        }
        StoreError::Full(_) => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.code(), e.to_string())
        }
        _ => ApiError::internal(e.to_string()),
    }
}

/// Runs `op` on the store off the runtime thread (every store call
/// blocks: ioctls, fsyncs, its lock).
async fn in_store<T: Send + 'static>(
    p: &Parts,
    op: impl FnOnce(&crate::storage::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let storage = p.storage.clone();
    tokio::task::spawn_blocking(move || op(storage.store()?))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| api_error(&e))
}

fn line(kind: ProgressKind, data: Option<String>, checkpoint: Option<Checkpoint>) -> Progress {
    Progress {
        kind,
        data,
        error: None,
        code: None,
        time_ms: crate::publish::now_ms(),
        checkpoint,
    }
}

fn failed(e: &StoreError) -> Progress {
    Progress {
        error: Some(e.to_string()),
        code: Some(e.code().to_owned()),
        ..line(ProgressKind::Error, None, None)
    }
}

async fn send(tx: &mpsc::Sender<bytes::Bytes>, p: &Progress) {
    // A client that left still gets its checkpoint made: nothing to do.
    let _ = tx.send(body::ndjson_line(p)).await;
}

pub(super) async fn create(
    p: &Parts,
    req: axum::extract::Request,
) -> Result<Response<Body>, ApiError> {
    let request: CheckpointRequest =
        body::read_json_or_default(req, MAX_REQUEST, "checkpoint request").await?;
    p.storage.store().map_err(|e| api_error(&e))?;
    let (tx, resp) = body::ndjson_stream();
    let storage = p.storage.clone();
    tokio::spawn(async move {
        send(
            &tx,
            &line(
                ProgressKind::Info,
                Some("taking a snapshot of the filesystem".into()),
                None,
            ),
        )
        .await;
        let (taken_tx, taken_rx) = oneshot::channel::<String>();
        let made = tokio::task::spawn_blocking(move || {
            storage
                .store()?
                .create(request.comment, |id| drop(taken_tx.send(id.to_owned())))
        });
        if let Ok(id) = taken_rx.await {
            send(
                &tx,
                &line(
                    ProgressKind::Info,
                    Some(format!("snapshot {id} taken")),
                    None,
                ),
            )
            .await;
        }
        let done = match made.await {
            Ok(Ok(c)) => line(
                ProgressKind::Complete,
                Some(format!("checkpoint {} created", c.id)),
                Some(c),
            ),
            Ok(Err(e)) => failed(&e),
            Err(e) => failed(&StoreError::Unavailable(format!(
                "the checkpoint task failed: {e}"
            ))),
        };
        send(&tx, &done).await;
    });
    Ok(resp)
}

pub(super) async fn list(p: &Parts) -> Result<Response<Body>, ApiError> {
    let listed = in_store(p, |store| Ok(store.list())).await?;
    Ok(body::json(StatusCode::OK, &listed))
}

pub(super) async fn get(p: &Parts, id: &str) -> Result<Response<Body>, ApiError> {
    let id = id.to_owned();
    let found = in_store(p, move |store| store.get(&id)).await?;
    Ok(body::json(StatusCode::OK, &found))
}

pub(super) async fn delete(p: &Parts, id: &str) -> Result<Response<Body>, ApiError> {
    let id = id.to_owned();
    in_store(p, move |store| store.delete(&id)).await?;
    Ok(body::no_content())
}

pub(super) async fn restore(p: &Parts, id: &str) -> Result<Response<Body>, ApiError> {
    // Refused before the container stops.
    let known = id.to_owned();
    in_store(p, move |store| store.get(&known)).await?;
    let (reply, answer) = oneshot::channel();
    p.control
        .send(Control::Restore(id.to_owned(), reply))
        .await
        .map_err(|_| ApiError::internal("the supervisor is not running"))?;
    let (tx, resp) = body::ndjson_stream();
    let id = id.to_owned();
    tokio::spawn(async move {
        send(
            &tx,
            &line(
                ProgressKind::Info,
                Some(format!(
                    "restoring {id}: the container stops, its layer is swapped"
                )),
                None,
            ),
        )
        .await;
        let done = match answer.await {
            Ok(Ok(c)) => line(
                ProgressKind::Complete,
                Some(format!(
                    "restored {}; the container and its services are up",
                    c.id
                )),
                Some(c),
            ),
            Ok(Err(e)) => failed(&e),
            Err(_) => failed(&StoreError::Unavailable(
                "the supervisor dropped the restore".into(),
            )),
        };
        send(&tx, &done).await;
    });
    Ok(resp)
}
