//! The inner container's lifecycle: up, down and **bounce** (down, then
//! up: `cgroup.kill` of the build, a fresh build, egress again, the port
//! watcher retargeted and the services started again, while the root
//! namespace serves on). The old build's namespace and veth go to the
//! [`crate::graveyard`].
#![deny(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::api::ContainerState;
use crate::container::egress::{self, Egress};
use crate::container::{Container, ContainerSpec};
use crate::graveyard::{Graveyard, Remains};
use crate::publish::Publisher;
use crate::run::RunError;
use crate::services::{Launcher, Manager, ServiceSpec};

/// The running inner container, replaced on bounce.
#[derive(Clone, Default, Debug)]
pub struct Current(Arc<Mutex<Option<Arc<Container>>>>);

impl Current {
    /// The container now, if one runs.
    #[must_use]
    pub fn get(&self) -> Option<Arc<Container>> {
        self.0.lock().clone()
    }

    pub(crate) fn set(&self, c: Option<Arc<Container>>) -> Option<Arc<Container>> {
        std::mem::replace(&mut *self.0.lock(), c)
    }
}

/// Starts services inside whichever container is current.
pub(crate) struct InContainer(pub(crate) Current);

impl Launcher for InContainer {
    fn spawn<'a>(&'a self, spec: &'a ServiceSpec) -> crate::services::Spawning<'a> {
        let container = self.0.get();
        Box::pin(async move {
            let container = container.ok_or_else(|| {
                std::io::Error::other("the inner container is not running (it is being rebuilt)")
            })?;
            container
                .spawn(
                    crate::services::command(spec),
                    &format!("svc-{}", spec.name),
                )
                .await
        })
    }
}

async fn start_container(spec: ContainerSpec) -> Result<Arc<Container>, RunError> {
    tokio::task::spawn_blocking(move || Container::start(spec))
        .await
        .map_err(|e| RunError::Container(e.to_string()))?
        .map(Arc::new)
        .map_err(|e| RunError::Container(e.to_string()))
}

async fn stop_container(container: Option<Arc<Container>>) {
    let Some(container) = container else { return };
    let stopped = tokio::task::spawn_blocking(move || match Arc::try_unwrap(container) {
        Ok(c) => c.stop().map_err(|e| e.to_string()),
        Err(_) => Err("the container is still in use".to_owned()),
    })
    .await;
    match stopped {
        Ok(Ok(())) => {}
        Ok(Err(why)) => tracing::warn!(%why, "the inner container did not stop cleanly"),
        Err(e) => tracing::warn!(%e, "stopping the inner container failed"),
    }
}

/// Everything the control loop works with.
pub(crate) struct Platform {
    pub(crate) spec: ContainerSpec,
    pub(crate) egress: Egress,
    /// Whether forwarding and the masquerade rule are in place.
    pub(crate) egress_rules: std::sync::atomic::AtomicBool,
    /// The root side of the current container's veth pair.
    pub(crate) egress_link: parking_lot::Mutex<Option<&'static str>>,
    pub(crate) current: Current,
    pub(crate) publisher: Publisher,
    pub(crate) services: Manager,
    pub(crate) netns: watch::Sender<Option<PathBuf>>,
    pub(crate) state: watch::Sender<ContainerState>,
    pub(crate) graveyard: Graveyard,
    /// Why the user's disk is not mounted (the container then does not
    /// start: its layer must never land on the platform's disk).
    pub(crate) user_disk_error: Option<String>,
}

/// Milliseconds, for log fields.
fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Platform {
    pub(crate) async fn up(&self) -> Result<(), RunError> {
        if let Some(why) = &self.user_disk_error {
            let err = RunError::Container(format!("the user's disk is not mounted: {why}"));
            self.state
                .send_replace(ContainerState::Failed(err.to_string()));
            return Err(err);
        }
        self.state.send_replace(ContainerState::Starting);
        let t0 = std::time::Instant::now();
        let container = match start_container(self.spec.clone()).await {
            Ok(c) => c,
            Err(err) => {
                self.state
                    .send_replace(ContainerState::Failed(err.to_string()));
                return Err(err);
            }
        };
        let netns = container.netns_path();
        let t_container = t0.elapsed();
        if self.egress.enabled {
            let first = !self
                .egress_rules
                .swap(true, std::sync::atomic::Ordering::SeqCst);
            match egress::set_up(&self.egress, container.pid1(), &netns, first).await {
                Ok(link) => *self.egress_link.lock() = Some(link),
                Err(err) => {
                    self.egress_rules
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    tracing::error!(%err, "the inner container has no way out");
                }
            }
        }
        self.current.set(Some(container));
        self.publisher.set_netns(Some(netns.clone()));
        self.netns.send_replace(Some(netns));
        let t_egress = t0.elapsed();
        self.services.up().await;
        self.state.send_replace(ContainerState::Running);
        tracing::info!(
            container_ms = ms(t_container),
            egress_ms = ms(t_egress.saturating_sub(t_container)),
            services_ms = ms(t0.elapsed().saturating_sub(t_egress)),
            "the inner container is up"
        );
        Ok(())
    }

    /// Stops the services and the container. Returns what is left of it
    /// to free later: its network namespace (held open) and the root side of
    /// its veth pair.
    pub(crate) async fn down(&self) -> Remains {
        let t0 = std::time::Instant::now();
        self.services.down().await;
        let t_services = t0.elapsed();
        self.publisher.set_netns(None);
        #[allow(
            clippy::disallowed_methods,
            reason = "opening /proc/PID/ns/net is a lookup in procfs, no disk I/O"
        )]
        let netns = self
            .netns
            .send_replace(None)
            .and_then(|path| std::fs::File::open(path).ok());
        stop_container(self.current.set(None)).await;
        let link = self.egress_link.lock().take();
        tracing::info!(
            services_ms = ms(t_services),
            container_ms = ms(t0.elapsed().saturating_sub(t_services)),
            "the inner container is down"
        );
        Remains { netns, link }
    }

    pub(crate) async fn bounce(&self) -> Result<(), String> {
        self.rebuild(async {}).await.1
    }

    /// Down, `between`, then up (retried a few times: each failure is
    /// logged with its cause) while the root namespace serves on.
    async fn rebuild<T>(
        &self,
        between: impl std::future::Future<Output = T>,
    ) -> (T, Result<(), String>) {
        self.state.send_replace(ContainerState::Bouncing);
        let remains = self.down().await;
        let done = between.await;
        let mut up = self.up().await;
        for attempt in 1..=3u32 {
            let Err(err) = &up else { break };
            tracing::error!(%err, attempt, "the inner container did not come back; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(200) * attempt).await;
            up = self.up().await;
        }
        self.graveyard.bury(remains);
        let up = up.map_err(|e| {
            tracing::error!(err = %e, "the inner container did not come back");
            e.to_string()
        });
        (done, up)
    }

    /// Puts the container's layer back as checkpoint `id` had it: the
    /// container stops, the layer is swapped (see
    /// [`crate::storage::layer::restore`]), the container and its services
    /// start again.
    pub(crate) async fn restore(
        &self,
        storage: &crate::storage::Storage,
        id: String,
    ) -> Result<nestbox_api::types::Checkpoint, crate::storage::StoreError> {
        use crate::storage::StoreError;
        let t0 = std::time::Instant::now();
        let storage = storage.clone();
        let swap = async move {
            tokio::task::spawn_blocking(move || storage.store()?.restore(&id))
                .await
                .map_err(|e| StoreError::Unavailable(format!("the restore task failed: {e}")))?
        };
        let (restored, up) = self.rebuild(swap).await;
        let restored = restored?;
        tracing::info!(id = %restored.id, ms = ms(t0.elapsed()), "restored");
        up.map_err(|why| {
            StoreError::Unavailable(format!(
                "{} was restored, but the container did not come back: {why} (bounce to retry)",
                restored.id
            ))
        })?;
        Ok(restored)
    }
}
