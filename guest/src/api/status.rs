//! `GET /v1/status`: version, uptime, the container's state.

use std::time::Instant;

use http::{Response, StatusCode};
use serde::Serialize;

use super::body::{self, Body};
use super::{API_VERSION, ContainerState, GUEST_VERSION, Parts};

#[derive(Serialize)]
struct Status {
    version: &'static str,
    api_version: &'static str,
    name: String,
    url: String,
    uptime_s: u64,
    container: ContainerState,
    services: usize,
    ports: usize,
}

pub(super) fn get(p: &Parts, started: Instant) -> Response<Body> {
    let names = p.publisher.names();
    body::json(
        StatusCode::OK,
        &Status {
            version: GUEST_VERSION,
            api_version: API_VERSION,
            name: names.name.clone(),
            url: format!("https://{}/", names.vm_host()),
            uptime_s: started.elapsed().as_secs(),
            container: p.container.borrow().clone(),
            services: p.services.list().len(),
            ports: p.publisher.ports().len(),
        },
    )
}
