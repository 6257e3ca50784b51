//! `GET /v1/faults` (what is armed) and `POST /v1/faults` (arm one): only
//! in builds with the `faults` feature (see `crate::faults`).
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};

use super::ApiError;
use super::body::{self, Body};

pub(super) async fn list() -> Response<Body> {
    body::json(StatusCode::OK, &crate::faults::list())
}

pub(super) async fn arm(req: axum::extract::Request) -> Result<Response<Body>, ApiError> {
    let fault: crate::faults::Fault = body::read_json(req, 4096, "fault").await?;
    crate::faults::arm(fault)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_fault", e))?;
    Ok(list().await)
}
