//! `GET /v1/status`: version, uptime, the container's state, the limits it
//! runs under, how full the user's disk is and what became of each disk.
#![deny(clippy::disallowed_methods)]

use std::time::Instant;

use http::{Response, StatusCode};
use nestbox_api::types::{DiskUsage, Status};

use super::body::{self, Body};
use super::{API_VERSION, GUEST_VERSION, Parts};

/// The usage of the filesystem holding `path` (`statvfs`, blocking).
fn disk_usage(path: &std::path::Path) -> Option<DiskUsage> {
    let fs = nix::sys::statvfs::statvfs(path).ok()?;
    let block = fs.fragment_size();
    let total = fs.blocks() * block;
    Some(DiskUsage {
        path: path.display().to_string(),
        total_bytes: total,
        used_bytes: total.saturating_sub(fs.blocks_free() * block),
        available_bytes: fs.blocks_available() * block,
    })
}

/// Where the guest image records its version.
const IMAGE_VERSION: &str = "/etc/nestbox/image-version";

/// The image version, read once (the image never changes under a running
/// VM: a new platform version is a new VM).
#[allow(
    clippy::disallowed_methods,
    reason = "read once, on the blocking pool (see `get`)"
)]
pub(crate) fn image_version() -> Option<&'static str> {
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

pub(super) async fn get(p: &Parts, started: Instant) -> Response<Body> {
    let names = p.publisher.names();
    let user_dir = p.user_dir.clone();
    let inner = p.inner_cgroup.clone();
    let (user_disk, usage, image) = tokio::task::spawn_blocking(move || {
        (
            disk_usage(&user_dir),
            crate::resources::usage(&inner),
            image_version(),
        )
    })
    .await
    .unwrap_or_default();
    body::json(
        StatusCode::OK,
        &Status {
            version: GUEST_VERSION.to_owned(),
            image: image.map(str::to_owned),
            api_version: API_VERSION.to_string(),
            name: names.name.clone(),
            url: format!("https://{}/", names.vm_host()),
            uptime_s: started.elapsed().as_secs(),
            container: p.container.borrow().clone(),
            services: p.services.list().len(),
            ports: p.publisher.ports().len(),
            limits: p.limits.clone(),
            usage,
            user_disk,
            disks: p.disks.lock().clone(),
            logs: p.logs.stats(),
            rebuild: p.storage.rebuild(),
        },
    )
}
