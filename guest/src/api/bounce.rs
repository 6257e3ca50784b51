//! `POST /v1/bounce`: rebuild the inner container; answers once the
//! services are started again.
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};
use tokio::sync::oneshot;

use super::body::{self, Body};
use super::{ApiError, Control, Parts};

pub(super) async fn post(p: &Parts) -> Result<Response<Body>, ApiError> {
    let (tx, rx) = oneshot::channel();
    p.control
        .send(Control::Bounce(tx))
        .await
        .map_err(|_| ApiError::internal("the supervisor is not running"))?;
    match rx.await {
        Ok(Ok(())) => Ok(body::json(
            StatusCode::OK,
            &nestbox_api::types::Bounced {
                container: "running".to_owned(),
            },
        )),
        Ok(Err(why)) => Err(ApiError::internal(format!("the bounce failed: {why}"))),
        Err(_) => Err(ApiError::internal("the supervisor dropped the bounce")),
    }
}
