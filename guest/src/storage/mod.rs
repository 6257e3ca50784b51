//! The storage stack, in the VM's root namespace: the user's disk as
//! btrfs, the container's writable layer as a subvolume on it
//! ([`layer`]), checkpoints as read-only snapshots restorable in place
//! ([`checkpoints`]), the recent ones shown read-only in the container
//! ([`views`]), through the kernel's btrfs ioctls ([`btrfs`]).

pub mod btrfs;
pub mod checkpoints;
pub mod layer;
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

/// The checkpoint store once the user's disk is up (it comes up after the
/// API serves); cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Storage(Arc<OnceLock<Result<Store, String>>>);

impl Storage {
    /// Sets what the user's disk gave: the store, or why there is none.
    pub fn set(&self, store: Result<Store, String>) {
        if self.0.set(store).is_err() {
            tracing::warn!("the checkpoint store was set twice; the first stays");
        }
    }

    /// The store.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] saying why there is none.
    pub fn store(&self) -> Result<&Store, StoreError> {
        match self.0.get() {
            Some(Ok(store)) => Ok(store),
            Some(Err(why)) => Err(StoreError::Unavailable(why.clone())),
            None => Err(StoreError::Unavailable(
                "the user's disk is still coming up: try again in a few seconds".to_owned(),
            )),
        }
    }
}
