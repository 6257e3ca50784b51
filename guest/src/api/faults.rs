//! `GET /v1/faults` (what is armed) and `POST /v1/faults` (arm one): only
//! in builds with the `faults` feature (see `crate::faults`).
#![deny(clippy::disallowed_methods)]

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::ApiError;
use super::body::{self, Body};

pub(super) async fn handle(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    if req.method() == Method::POST {
        let fault: crate::faults::Fault = body::read_json(req, 4096, "fault").await?;
        crate::faults::arm(fault)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_fault", e))?;
    } else if req.method() != Method::GET {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GET or POST /v1/faults",
        ));
    }
    Ok(body::json(StatusCode::OK, &crate::faults::list()))
}
