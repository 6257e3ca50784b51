//! URL auth through the API: `/v1/ports/{port}/auth` (a port's mode;
//! `{port}` may be `primary`), `/v1/urls/login` (a browser login link),
//! `/v1/urls/shares…` (share links) and `/v1/tokens…` (scoped tokens).
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};
use nestbox_api::types::{
    LoginRequest, PortAuth, Revoked, SetPortAuth, ShareRequest, TokenRequest,
};
use nestbox_ingress::access::Kind;

use super::body::{self, Body};
use super::{ApiError, Parts};
use crate::urls::UrlError;

/// Largest request body of these operations.
const MAX_REQUEST: usize = 16 * 1024;

fn api_error(err: &UrlError) -> ApiError {
    match err {
        UrlError::Invalid(why) => ApiError::invalid(why.clone()),
        UrlError::NotFound(..) => ApiError::not_found(err.to_string()),
        UrlError::Io { .. } => ApiError::internal(err.to_string()),
    }
}

/// The port `{port}` names (`primary`: the primary port) and whether it
/// means the primary URL.
fn port_of(p: &Parts, segment: &str) -> Result<(u16, bool), ApiError> {
    if segment == "primary" {
        return Ok((p.publisher.primary(), true));
    }
    match segment.parse::<u16>() {
        Ok(port) if port > 0 => Ok((port, false)),
        _ => Err(ApiError::invalid(format!(
            "{segment:?} is not a port: use 1 to 65535, or `primary` for the VM's own URL"
        ))),
    }
}

/// The port a request names (default: the primary URL).
fn requested(p: &Parts, port: Option<u16>) -> Result<(u16, bool), ApiError> {
    match port {
        None => Ok((p.publisher.primary(), true)),
        Some(0) => Err(ApiError::invalid("port 0 is not a port")),
        Some(port) => Ok((port, false)),
    }
}

pub(super) fn get_auth(p: &Parts, segment: &str) -> Result<Response<Body>, ApiError> {
    let (port, primary) = port_of(p, segment)?;
    Ok(body::json(
        StatusCode::OK,
        &PortAuth {
            port,
            mode: p.urls.mode(port),
            url: p.urls.url(port, primary),
        },
    ))
}

pub(super) async fn set_auth(
    p: &Parts,
    segment: &str,
    req: axum::extract::Request,
) -> Result<Response<Body>, ApiError> {
    let (port, _) = port_of(p, segment)?;
    let set: SetPortAuth = body::read_json(req, MAX_REQUEST, "mode").await?;
    p.urls
        .set_mode(port, set.mode)
        .await
        .map_err(|e| api_error(&e))?;
    tracing::info!(port, mode = %set.mode, "URL auth mode set");
    get_auth(p, segment)
}

pub(super) async fn login(
    p: &Parts,
    req: axum::extract::Request,
) -> Result<Response<Body>, ApiError> {
    let want: LoginRequest = body::read_json(req, MAX_REQUEST, "login request").await?;
    let (port, primary) = requested(p, want.port)?;
    let link = p
        .urls
        .login_link(port, primary, want.path.as_deref().unwrap_or("/"))
        .map_err(|e| api_error(&e))?;
    Ok(body::json(StatusCode::CREATED, &link))
}

pub(super) async fn list_shares(p: &Parts) -> Response<Body> {
    body::json(StatusCode::OK, &p.urls.shares().await)
}

pub(super) async fn share(
    p: &Parts,
    req: axum::extract::Request,
) -> Result<Response<Body>, ApiError> {
    let want: ShareRequest = body::read_json(req, MAX_REQUEST, "share request").await?;
    let (port, primary) = requested(p, want.port)?;
    let share = p
        .urls
        .share(port, primary, want.ttl_secs)
        .await
        .map_err(|e| api_error(&e))?;
    tracing::info!(id = %share.id, port, ttl_secs = want.ttl_secs, "share link made");
    Ok(body::json(StatusCode::CREATED, &share))
}

pub(super) async fn revoke(
    p: &Parts,
    kind: Kind,
    id: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let revoked = p.urls.revoke(kind, id).await.map_err(|e| api_error(&e))?;
    tracing::info!(?kind, ?id, revoked, "revoked");
    Ok(body::json(StatusCode::OK, &Revoked { revoked }))
}

pub(super) async fn list_tokens(p: &Parts) -> Response<Body> {
    body::json(StatusCode::OK, &p.urls.tokens().await)
}

pub(super) async fn token(
    p: &Parts,
    req: axum::extract::Request,
) -> Result<Response<Body>, ApiError> {
    let want: TokenRequest = body::read_json(req, MAX_REQUEST, "token request").await?;
    let token = p
        .urls
        .token(want.ports, want.ttl_secs)
        .await
        .map_err(|e| api_error(&e))?;
    tracing::info!(id = %token.id, ports = ?token.ports, "scoped token made");
    Ok(body::json(StatusCode::CREATED, &token))
}
