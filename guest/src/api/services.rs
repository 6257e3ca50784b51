//! `/v1/services…`: create, list, get, delete, start and stop user
//! services.
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};

use super::body::{self, Body};
use super::{ApiError, Parts};
use crate::services::{ServiceError, ServiceSpec};

/// Largest service definition accepted.
const MAX_SPEC: usize = 256 * 1024;

fn api_error(err: &ServiceError) -> ApiError {
    let status = match err.code() {
        "invalid" => StatusCode::BAD_REQUEST,
        "exists" | "needed" => StatusCode::CONFLICT,
        "not_found" => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError {
        status,
        code: err.code(),
        message: err.to_string(),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "no service named \"{name}\" (GET /v1/services lists them)"
    ))
}

pub(super) fn list(p: &Parts) -> Response<Body> {
    body::json(StatusCode::OK, &p.services.list())
}

pub(super) fn get(p: &Parts, name: &str) -> Result<Response<Body>, ApiError> {
    let status = p.services.get(name).ok_or_else(|| not_found(name))?;
    Ok(body::json(StatusCode::OK, &status))
}

pub(super) async fn create(
    p: &Parts,
    req: axum::extract::Request,
) -> Result<Response<Body>, ApiError> {
    let spec: ServiceSpec = body::read_json(req, MAX_SPEC, "service definition").await?;
    let status = p.services.create(spec).await.map_err(|e| api_error(&e))?;
    Ok(body::json(StatusCode::CREATED, &status))
}

pub(super) async fn delete(p: &Parts, name: &str) -> Result<Response<Body>, ApiError> {
    p.services.delete(name).await.map_err(|e| api_error(&e))?;
    Ok(body::no_content())
}

pub(super) async fn start(p: &Parts, name: &str) -> Result<Response<Body>, ApiError> {
    p.services.start(name).await.map_err(|e| api_error(&e))?;
    get(p, name)
}

pub(super) async fn stop(p: &Parts, name: &str) -> Result<Response<Body>, ApiError> {
    p.services.stop(name).await.map_err(|e| api_error(&e))?;
    get(p, name)
}
