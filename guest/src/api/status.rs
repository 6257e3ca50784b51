//! `GET /v1/status`: version, uptime, the container's state.

use std::time::Instant;

use http::{Response, StatusCode};
use serde::Serialize;

use super::body::{self, Body};
use super::{API_VERSION, ContainerState, GUEST_VERSION, Parts};

#[derive(Serialize)]
struct Status {
    version: &'static str,
    /// The VM image this guest booted from (`None` outside a VM image).
    image: Option<&'static str>,
    api_version: &'static str,
    name: String,
    url: String,
    uptime_s: u64,
    container: ContainerState,
    services: usize,
    ports: usize,
}

/// Where the guest image records its version.
const IMAGE_VERSION: &str = "/etc/nestbox/image-version";

/// The image version, read once (the image never changes under a running
/// VM: a new platform version is a new VM).
fn image_version() -> Option<&'static str> {
    static VERSION: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    VERSION
        .get_or_init(|| {
            std::fs::read_to_string(IMAGE_VERSION)
                .ok()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        })
        .as_deref()
}

pub(super) fn get(p: &Parts, started: Instant) -> Response<Body> {
    let names = p.publisher.names();
    body::json(
        StatusCode::OK,
        &Status {
            version: GUEST_VERSION,
            image: image_version(),
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
