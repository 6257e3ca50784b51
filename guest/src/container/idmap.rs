//! The inner container's user namespace: ids 0–65535 of the container are
//! ids [`HOST_BASE`]… of the VM, none of which the platform uses, so root
//! in the container holds no privilege over the VM — sysctls, modules, raw
//! devices, BPF, mounts and the platform's files are out of reach by
//! construction.
//!
//! Files keep the VM's view of their owners on disk: the base rootfs is
//! built owned by [`HOST_BASE`] (the image does that), and what the
//! container writes to its layer is stored with the VM ids the kernel maps
//! it to. Why this rather than idmapped mounts: the guest kernel (Linux
//! 6.1) cannot idmap the tmpfs the base lives on (tmpfs gained that in
//! 6.3), while ownership set once costs nothing at run time and works on
//! any filesystem the user's layer may move to. The mapping is fixed, so a
//! layer (or a checkpoint of it) means the same in every VM.
//!
//! A writable layer made before the container had a user namespace is
//! owned by the VM's own ids: it is shifted into the range once
//! ([`prepare_layer`]), and a marker file records that it was.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The VM id that is id 0 in the container.
pub const HOST_BASE: u32 = 100_000;
/// How many ids the container has (0–65535).
pub const COUNT: u32 = 65_536;

/// The marker beside a layer whose ids are in the container's range.
const MARKER: &str = "idmap";

/// `/proc/PID/uid_map` and `gid_map` contents.
#[must_use]
pub fn map_line() -> String {
    format!("0 {HOST_BASE} {COUNT}\n")
}

/// Errors preparing a layer.
#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    /// The base rootfs is not owned by the container's root.
    #[error(
        "the base rootfs {path} is owned by uid {uid}, but root in the container is uid {HOST_BASE} of the VM (a user namespace): shift its owners into the container's range, e.g. `chown -R {HOST_BASE}:{HOST_BASE} {path}` (the guest image is built that way)"
    )]
    BaseOwner {
        /// The base.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A file could not be read or changed.
    #[error("cannot prepare {path} for the container's user namespace: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdmapError + use<> {
    let path = path.to_owned();
    move |source| IdmapError::Io { path, source }
}

/// The VM id of container id `id`, or `None` for an id outside the range.
#[must_use]
pub fn to_host(id: u32) -> Option<u32> {
    (id < COUNT).then(|| HOST_BASE + id)
}

/// Checks that the base rootfs at `base` is owned by the container's root.
///
/// # Errors
/// [`IdmapError::BaseOwner`], or why it cannot be read.
pub fn check_base(base: &Path) -> Result<(), IdmapError> {
    let meta = std::fs::metadata(base).map_err(io_error(base))?;
    if meta.uid() != HOST_BASE {
        return Err(IdmapError::BaseOwner {
            path: base.to_owned(),
            uid: meta.uid(),
        });
    }
    Ok(())
}

/// Makes the writable layer `upper` ready for the container: created owned
/// by the container's root if missing; shifted into the container's range
/// once if it was made without a user namespace. `marker_dir` holds the
/// marker (beside `upper`, outside what the container sees). Blocking.
///
/// # Errors
/// [`IdmapError::Io`] naming the file.
pub fn prepare_layer(upper: &Path, marker_dir: &Path) -> Result<(), IdmapError> {
    let marker = marker_dir.join(MARKER);
    if marker.exists() && upper.is_dir() {
        return Ok(());
    }
    match std::fs::symlink_metadata(upper) {
        Ok(_) => {
            let shifted = shift_tree(upper)?;
            tracing::info!(
                layer = %upper.display(),
                shifted,
                "the writable layer's owners moved into the container's id range"
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(upper).map_err(io_error(upper))?;
            chown(upper, HOST_BASE, HOST_BASE)?;
        }
        Err(e) => return Err(io_error(upper)(e)),
    }
    // Only its existence counts, and it is written after the shift: a
    // crash before it means the (idempotent) shift runs again.
    std::fs::write(&marker, map_line()).map_err(io_error(&marker))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), IdmapError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_error(path))
}

/// Shifts the owner and group of every file under `root` (itself
/// included, symbolic links not followed, one filesystem) from a VM id
/// below [`COUNT`] to the container's range; ids already shifted stay.
/// Returns how many files changed.
///
/// # Errors
/// [`IdmapError::Io`] naming the file.
pub fn shift_tree(root: &Path) -> Result<u64, IdmapError> {
    let device = std::fs::symlink_metadata(root)
        .map_err(io_error(root))?
        .dev();
    let mut changed = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(io_error(&path))?;
        if meta.dev() != device {
            continue;
        }
        let shift = |id: u32| if id < COUNT { HOST_BASE + id } else { id };
        let (uid, gid) = (shift(meta.uid()), shift(meta.gid()));
        if (uid, gid) != (meta.uid(), meta.gid()) {
            // chown clears setuid/setgid bits; put them back.
            let mode = meta.mode() & 0o7777;
            chown(&path, uid, gid)?;
            if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(io_error(&path))?;
            }
            changed += 1;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io_error(&path))? {
                stack.push(entry.map_err(io_error(&path))?.path());
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_and_the_conversion_agree() {
        assert_eq!(map_line(), "0 100000 65536\n");
        assert_eq!(to_host(0), Some(HOST_BASE));
        assert_eq!(to_host(65_535), Some(HOST_BASE + 65_535));
        assert_eq!(to_host(65_536), None);
    }

    /// Root (CI): chown needs it.
    #[test]
    fn an_old_layer_is_shifted_once_and_a_new_one_is_made_owned_by_container_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nb-idmap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let upper = dir.join("upper");
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::write(upper.join("etc/passwd"), "x").unwrap();
        std::fs::write(upper.join("sudo"), "x").unwrap();
        std::fs::set_permissions(upper.join("sudo"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::os::unix::fs::symlink("etc/passwd", upper.join("link")).unwrap();
        std::os::unix::fs::lchown(upper.join("etc/passwd"), Some(33), Some(33)).unwrap();
        prepare_layer(&upper, &dir).unwrap();
        let meta = |p: &str| std::fs::symlink_metadata(upper.join(p)).unwrap();
        assert_eq!((meta("").uid(), meta("").gid()), (HOST_BASE, HOST_BASE));
        assert_eq!(meta("etc/passwd").uid(), HOST_BASE + 33);
        assert_eq!(meta("link").uid(), HOST_BASE);
        assert_eq!(meta("sudo").mode() & 0o7777, 0o4755, "setuid kept");
        // Once: a file the container later gives a VM-range owner stays.
        std::os::unix::fs::lchown(upper.join("etc/passwd"), Some(0), Some(0)).unwrap();
        prepare_layer(&upper, &dir).unwrap();
        assert_eq!(meta("etc/passwd").uid(), 0);

        let fresh = dir.join("fresh");
        let marks = dir.join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        prepare_layer(&fresh, &marks).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().uid(), HOST_BASE);
        assert!(check_base(&fresh).is_ok());
        let err = check_base(&dir).unwrap_err().to_string();
        assert!(err.contains("chown -R 100000:100000"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
