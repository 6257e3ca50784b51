//! The state directory's lock: an exclusive `flock` on `<state>/lock`,
//! held by every command that changes something (address allocation,
//! create, start, destroy, the record updates of stop). The kernel drops it
//! when the holder dies, which is how a later command tells an interrupted
//! create (record says "creating", lock free) from one in progress.
//!
//! The lock file is opened close-on-exec (Rust's default), so a VMM the
//! launcher starts never inherits it.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::StateError;

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct StateLock {
    _flock: Flock<File>,
}

fn open(path: &Path) -> Result<File, StateError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(StateError::io("open the lock", path))
}

/// Takes the lock, waiting for the current holder.
///
/// # Errors
/// [`StateError`] when the file cannot be opened or locked.
pub fn lock(path: &Path) -> Result<StateLock, StateError> {
    let file = open(path)?;
    let flock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| StateError::Lock {
            path: path.to_owned(),
            source,
        })?;
    Ok(StateLock { _flock: flock })
}

/// Whether some process holds the lock right now (a probe that never
/// waits; false when there is no lock file).
#[must_use]
pub fn is_held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_probe) => false,
        Err((_, errno)) => errno == nix::errno::Errno::EWOULDBLOCK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_seen_held_until_dropped() {
        let path = std::env::temp_dir().join(format!("nb-lock-{}", std::process::id()));
        assert!(!is_held(&path), "no file, no holder");
        let held = lock(&path).unwrap();
        assert!(is_held(&path));
        drop(held);
        assert!(!is_held(&path));
        std::fs::remove_file(&path).unwrap();
    }
}
