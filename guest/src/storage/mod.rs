//! The storage stack, in the VM's root namespace: the user's disk as
//! btrfs, the container's writable layer as a subvolume on it
//! ([`layer`]), checkpoints as read-only snapshots restorable in place
//! ([`checkpoints`]), the recent ones shown read-only in the container
//! ([`views`]), through the kernel's btrfs ioctls ([`btrfs`]); their
//! copies in an object store ([`remote`]): uploaded in the background
//! ([`upload`]), and a new VM's disk built from them ([`rebuild`]).

pub mod btrfs;
pub mod checkpoints;
pub mod layer;
pub mod rebuild;
pub mod remote;
pub mod upload;
pub mod views;

use std::sync::{Arc, OnceLock};

pub use checkpoints::{Store, StoreError};

/// A crash point of the fault-injection suite (see [`crate::faults`]);
/// nothing in a shipped build.
#[inline]
fn point(name: &'static str, subject: &str) {
    #[cfg(feature = "faults")]
    crate::faults::point(name, subject);
    #[cfg(not(feature = "faults"))]
    let _ = (name, subject);
}

/// Runs `f` (it blocks: a btrfs call, a file) off the runtime thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("a storage task failed: {e}"))?
}

/// The checkpoint store once the user's disk is up (it comes up after the
/// API serves), and a rebuild's progress; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Storage(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    store: OnceLock<Result<Arc<Store>, String>>,
    rebuild: parking_lot::Mutex<Option<nestbox_api::types::Rebuild>>,
}

impl Storage {
    /// Sets what the user's disk gave: the store, or why there is none.
    pub fn set(&self, store: Result<Store, String>) {
        if self.0.store.set(store.map(Arc::new)).is_err() {
            tracing::warn!("the checkpoint store was set twice; the first stays");
        }
    }

    /// A rebuild's progress, for `GET /v1/status`.
    #[must_use]
    pub fn rebuild(&self) -> Option<nestbox_api::types::Rebuild> {
        self.0.rebuild.lock().clone()
    }

    /// A rebuild begins (its progress, as `GET /v1/status` shows it).
    pub fn start_rebuild(&self, rebuild: nestbox_api::types::Rebuild) {
        *self.0.rebuild.lock() = Some(rebuild);
    }

    /// Updates the rebuild's progress (nothing if none began).
    pub fn update_rebuild(&self, f: impl FnOnce(&mut nestbox_api::types::Rebuild)) {
        if let Some(r) = self.0.rebuild.lock().as_mut() {
            f(r);
        }
    }

    /// The store, to keep.
    ///
    /// # Errors
    /// As [`Storage::store`].
    pub fn shared_store(&self) -> Result<Arc<Store>, StoreError> {
        self.get().cloned()
    }

    /// The store.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] saying why there is none.
    pub fn store(&self) -> Result<&Store, StoreError> {
        self.get().map(|s| &**s)
    }

    fn get(&self) -> Result<&Arc<Store>, StoreError> {
        match self.0.store.get() {
            Some(Ok(store)) => Ok(store),
            Some(Err(why)) => Err(StoreError::Unavailable(why.clone())),
            None => Err(StoreError::Unavailable(
                "the user's disk is still coming up: try again in a few seconds".to_owned(),
            )),
        }
    }
}
