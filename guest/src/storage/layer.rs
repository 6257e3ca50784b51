//! The container's writable layer on the user's disk: `layer/` holds the
//! overlay's `upper` and `work` (they must share a filesystem *and*, on
//! btrfs, a subvolume: overlayfs renames from one into the other). On a
//! btrfs disk `layer` is a subvolume, so that a checkpoint is a snapshot
//! of it and a restore swaps another in under the same name; on any other
//! filesystem it is a plain directory (no checkpoints).
//!
//! A restore swaps names in one `renameat2(RENAME_EXCHANGE)`: the layer
//! is always whole, the old one or the new one, and a crash leaves at
//! most `layer.swap` (whichever lost) to delete at the next start.
//!
//! Layers written before `layer/` existed (`upper`, `work` at the top of
//! the user's disk) are moved into it once.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::btrfs::{self, BtrfsError};

/// The layer's name on the user's disk.
pub const LAYER: &str = "layer";
/// A layer being swapped in, or the one swapped out.
const SWAP: &str = "layer.swap";
/// A layer being assembled from an older disk's `upper` and `work`.
const MIGRATING: &str = "layer.migrating";

/// The writable layer's directories under the user's disk `root`.
#[must_use]
pub fn upper(root: &Path) -> PathBuf {
    root.join(LAYER).join("upper")
}

/// The overlay's work directory under `root`.
#[must_use]
pub fn work(root: &Path) -> PathBuf {
    root.join(LAYER).join("work")
}

/// What went wrong with the layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A btrfs call.
    #[error(transparent)]
    Btrfs(#[from] BtrfsError),
    /// A file operation.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LayerError {
    let path = path.to_owned();
    move |source| LayerError::Io { what, path, source }
}

/// Makes `root/layer` exist (blocking): a subvolume on btrfs, a directory
/// elsewhere; finishes an interrupted restore (deletes the layer that
/// lost the swap) and moves an older disk's `upper`/`work` in.
///
/// # Errors
/// [`LayerError`] naming the step.
pub fn prepare(root: &Path) -> Result<(), LayerError> {
    let on_btrfs = btrfs::is_btrfs(root);
    if on_btrfs {
        btrfs::delete_subvolume(root, OsStr::new(SWAP))?;
    }
    let layer = root.join(LAYER);
    if layer.is_dir() {
        return Ok(());
    }
    let old_upper = root.join("upper");
    let staging = root.join(MIGRATING);
    if old_upper.exists() || staging.exists() {
        // An ext4 disk from before: one rename per directory, each
        // repeatable, then the staging directory takes the layer's name.
        std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
        for part in ["upper", "work"] {
            let from = root.join(part);
            if from.exists() {
                std::fs::rename(&from, staging.join(part)).map_err(io("move", &from))?;
            }
        }
        std::fs::rename(&staging, &layer).map_err(io("rename", &staging))?;
        tracing::info!(layer = %layer.display(), "the writable layer moved into layer/");
    } else if on_btrfs {
        btrfs::create_subvolume(root, OsStr::new(LAYER))?;
    } else {
        std::fs::create_dir_all(&layer).map_err(io("create", &layer))?;
    }
    Ok(())
}

/// Replaces the layer with a writable snapshot of `checkpoint` (blocking;
/// the container must be down). On any failure before the swap the layer
/// is untouched; the swap itself is one atomic rename.
///
/// # Errors
/// [`LayerError`]: [`BtrfsError::is_full`] says the disk is full.
pub fn restore(root: &Path, checkpoint: &Path) -> Result<(), LayerError> {
    btrfs::delete_subvolume(root, OsStr::new(SWAP))?;
    btrfs::snapshot(checkpoint, root, OsStr::new(SWAP), false)?;
    let id = checkpoint
        .file_name()
        .map(OsStr::to_string_lossy)
        .unwrap_or_default();
    super::point("storage.swap", &id);
    if root.join(LAYER).exists() {
        btrfs::exchange(root, OsStr::new(SWAP), OsStr::new(LAYER))?;
    } else {
        std::fs::rename(root.join(SWAP), root.join(LAYER)).map_err(io("rename", root))?;
    }
    btrfs::sync(root)?;
    super::point("storage.swapped", &id);
    // The old layer; a crash before this leaves it for `prepare`.
    btrfs::delete_subvolume(root, OsStr::new(SWAP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_disk_s_layer_moves_in_whole() {
        let dir = tempdir();
        std::fs::create_dir_all(dir.join("upper/etc")).unwrap();
        std::fs::write(dir.join("upper/etc/motd"), "hi").unwrap();
        std::fs::create_dir_all(dir.join("work/work")).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(upper(&dir).join("etc/motd")).unwrap(),
            "hi"
        );
        assert!(work(&dir).join("work").is_dir());
        assert!(!dir.join("upper").exists() && !dir.join(MIGRATING).exists());
        // Again: nothing to do.
        prepare(&dir).unwrap();
        assert!(upper(&dir).join("etc/motd").exists());
    }

    #[test]
    fn an_interrupted_move_is_finished() {
        let dir = tempdir();
        std::fs::create_dir_all(dir.join(MIGRATING).join("upper")).unwrap();
        std::fs::write(dir.join(MIGRATING).join("upper/a"), "a").unwrap();
        std::fs::create_dir_all(dir.join("work")).unwrap();
        prepare(&dir).unwrap();
        assert!(upper(&dir).join("a").exists() && work(&dir).is_dir());
    }

    #[test]
    fn a_new_disk_gets_an_empty_layer() {
        let dir = tempdir();
        prepare(&dir).unwrap();
        assert!(dir.join(LAYER).is_dir());
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "nestbox-layer-{}-{}",
            std::process::id(),
            crate::publish::now_ms() ^ u64::from(rand::random::<u32>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
