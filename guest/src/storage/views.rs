//! The recent checkpoints, read-only, inside the container at
//! `/.nestbox/checkpoints/<id>`: each an overlay of the checkpoint's
//! layer over the base image with no upper directory (so nothing can
//! write it), mounted by the VM's root under a tmpfs of its own
//! ([`VIEWS`]). That tmpfs is a *shared* mount and the container's mount
//! namespace holds a slave copy of it (see `container/init.rs`), so a
//! view mounted or unmounted here appears or goes in the running
//! container at once, and nothing the container does propagates back.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Where the VM's root mounts the views.
pub const VIEWS: &str = "/run/nestbox/checkpoints";
/// Where the container sees them.
pub const IN_CONTAINER: &str = "/.nestbox/checkpoints";

/// A mount that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct ViewError {
    /// What was being done.
    pub what: &'static str,
    /// On what.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: nix::errno::Errno,
}

fn fail(what: &'static str, path: &Path) -> impl FnOnce(nix::errno::Errno) -> ViewError {
    let path = path.to_owned();
    move |source| ViewError { what, path, source }
}

/// The views' root: a small tmpfs at `dir`, made shared (blocking; done
/// once, before the container starts). Mounted again over a stale one.
///
/// # Errors
/// [`ViewError`].
pub fn set_up(dir: &Path) -> Result<(), ViewError> {
    std::fs::create_dir_all(dir).map_err(|e| ViewError {
        what: "create",
        path: dir.to_owned(),
        source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    mount(
        Some("nestbox-checkpoints"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=755,size=64k"),
    )
    .map_err(fail("mount a tmpfs on", dir))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(fail("make shared", dir))
}

/// Mounts the view of the checkpoint whose layer is `layer` (its `upper`)
/// over `base` at `dir/id`.
///
/// # Errors
/// [`ViewError`].
pub fn show(dir: &Path, id: &str, layer: &Path, base: &Path) -> Result<(), ViewError> {
    let target = dir.join(id);
    let _ = std::fs::create_dir(&target);
    let options = format!(
        "lowerdir={}:{}",
        layer.join("upper").display(),
        base.display()
    );
    mount(
        Some("nestbox-checkpoint"),
        &target,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(fail("mount the checkpoint's view on", &target))
}

/// Unmounts the view `dir/id` (lazily: a process of the container inside
/// it keeps what it holds) and removes its mount point. One not shown is
/// fine.
pub fn hide(dir: &Path, id: &str) {
    let target = dir.join(id);
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            tracing::warn!(view = %target.display(), %e, "a checkpoint's view did not unmount");
        }
    }
    let _ = std::fs::remove_dir(&target);
}
