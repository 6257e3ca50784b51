//! `POST /v1/certificates/renew`: renew every ACME certificate now.
#![deny(clippy::disallowed_methods)]

use http::{Response, StatusCode};

use super::body::{self, Body};
use super::{ApiError, Parts};

pub(super) fn renew(p: &Parts) -> Result<Response<Body>, ApiError> {
    let Some(ingress) = &p.acme else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_acme",
            "this VM's certificates come from files ([ingress] certificates), not from ACME",
        ));
    };
    ingress.renew.notify_one();
    let hosts = ingress.routes.hosts();
    tracing::info!(?hosts, "renewing every certificate (API)");
    Ok(body::json(
        StatusCode::ACCEPTED,
        &nestbox_api::types::Renewing { renewing: hosts },
    ))
}
