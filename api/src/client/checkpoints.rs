//! Checkpoints: take, list, inspect, delete, restore.

use http::Method;

use super::{Client, ClientError};
use crate::types::{Checkpoint, CheckpointRequest, Checkpoints, Progress, ProgressKind};

/// The end of a progress stream: the checkpoint, or the guest's error.
fn outcome(last: Option<Progress>, what: &str) -> Result<Checkpoint, ClientError> {
    match last {
        Some(Progress {
            kind: ProgressKind::Complete,
            checkpoint: Some(c),
            ..
        }) => Ok(c),
        Some(Progress {
            kind: ProgressKind::Error,
            error,
            code,
            ..
        }) => Err(ClientError::Api {
            status: http::StatusCode::OK,
            code: code.unwrap_or_else(|| "internal".to_owned()),
            message: error.unwrap_or_default(),
        }),
        _ => Err(ClientError::Decode {
            what: what.to_owned(),
            why: "the progress stream ended before its last line".to_owned(),
        }),
    }
}

impl Client {
    /// `GET /v1/checkpoints`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn checkpoints(&self) -> Result<Checkpoints, ClientError> {
        self.json(Method::GET, "/v1/checkpoints", None::<&()>).await
    }

    /// `GET /v1/checkpoints/{id}`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn checkpoint(&self, id: &str) -> Result<Checkpoint, ClientError> {
        self.json(Method::GET, &format!("/v1/checkpoints/{id}"), None::<&()>)
            .await
    }

    /// `DELETE /v1/checkpoints/{id}`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn delete_checkpoint(&self, id: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &format!("/v1/checkpoints/{id}"), None)
            .await
            .map(drop)
    }

    /// `POST /v1/checkpoints`: `progress` hears each line; the checkpoint
    /// made is the answer.
    ///
    /// # Errors
    /// [`ClientError`] (an `error` line becomes [`ClientError::Api`]).
    pub async fn create_checkpoint(
        &self,
        request: &CheckpointRequest,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Checkpoint, ClientError> {
        let mut last = None;
        self.follow_with(
            Method::POST,
            "/v1/checkpoints",
            Some(request),
            |p: Progress| {
                progress(&p);
                last = Some(p);
                true
            },
        )
        .await?;
        outcome(last, "POST /v1/checkpoints")
    }

    /// `POST /v1/checkpoints/{id}/restore`: answers once the container and
    /// its services are up again on the restored filesystem.
    ///
    /// # Errors
    /// [`ClientError`] (an `error` line becomes [`ClientError::Api`]).
    pub async fn restore(
        &self,
        id: &str,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Checkpoint, ClientError> {
        let path = format!("/v1/checkpoints/{id}/restore");
        let mut last = None;
        self.follow_with(Method::POST, &path, None::<&()>, |p: Progress| {
            progress(&p);
            last = Some(p);
            true
        })
        .await?;
        outcome(last, &format!("POST {path}"))
    }
}
