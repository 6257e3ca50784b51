//! Files that survive a crash. The host's VM records and tokens, the
//! guest's service definitions and certificates, and the build's images
//! are all replaced through [`write_atomic`]: a reader, or the machine
//! after a power cut, finds the old content or the new, never a part and
//! never an empty file.
//!
//! The mechanism is the one POSIX gives: a temporary file in the same
//! directory (so the rename stays within one filesystem), `fsync` of the
//! file (its data is on the disk before its name is), `rename(2)` over the
//! target (atomic), and `fsync` of the directory (the rename itself is on
//! the disk). Each temporary name is unique, so two writers of one file
//! never write into each other's temporary file.

#![forbid(unsafe_code)]

#[cfg(feature = "faults")]
pub mod faults;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file could not be written durably.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct DurableError {
    /// What was being done: `create`, `write`, `fsync`, `rename`, ….
    pub op: &'static str,
    /// The file or directory it was done to.
    pub path: PathBuf,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

impl DurableError {
    fn at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| Self {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

impl From<DurableError> for std::io::Error {
    fn from(e: DurableError) -> Self {
        Self::new(e.source.kind(), e)
    }
}

/// Replaces `path` with `bytes`, created with `mode` (before the umask is
/// applied, then set exactly): see the module's documentation.
///
/// # Errors
/// [`DurableError`] naming the step and the file; the temporary file is
/// removed and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DurableError> {
    write_atomic_with(path, mode, |file| file.write_all(bytes))
}

/// Replaces `path` with what `fill` writes into the (unbuffered) temporary
/// file, as [`write_atomic`] does: for content too large to hold in memory.
///
/// # Errors
/// [`DurableError`]; the temporary file is removed and `path` is left as
/// it was, whatever `fill` wrote.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), DurableError> {
    let dir = parent(path);
    let tmp = temporary_beside(path);
    let mut tmp_file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(DurableError::at("create", &tmp))?;
    let written = tmp_file
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(DurableError::at("chmod", &tmp))
        .and_then(|()| fill(&mut tmp_file).map_err(DurableError::at("write", &tmp)))
        .and_then(|()| {
            point("durable.written", path);
            tmp_file.sync_all().map_err(DurableError::at("fsync", &tmp))
        })
        .and_then(|()| {
            point("durable.synced", path);
            std::fs::rename(&tmp, path).map_err(DurableError::at("rename", path))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    point("durable.renamed", path);
    sync_dir(dir)
}

/// A crash point between two steps of a write (only in builds with the
/// `faults` feature: see [`faults`]); nothing otherwise.
#[inline]
fn point(name: &'static str, path: &Path) {
    #[cfg(feature = "faults")]
    faults::reached(name, path);
    #[cfg(not(feature = "faults"))]
    let _ = (name, path);
}

/// Copies `from` over `to` as [`write_atomic`] does, with `from`'s mode.
///
/// # Errors
/// [`DurableError`].
pub fn copy_atomic(from: &Path, to: &Path) -> Result<(), DurableError> {
    let mut source = File::open(from).map_err(DurableError::at("open", from))?;
    let mode = source
        .metadata()
        .map_err(DurableError::at("stat", from))?
        .permissions()
        .mode()
        & 0o7777;
    write_atomic_with(to, mode, |file| {
        std::io::copy(&mut source, file).map(|_| ())
    })
}

/// `fsync`s the directory `dir`, so that names created, renamed or removed
/// in it survive a crash.
///
/// # Errors
/// [`DurableError`].
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(DurableError::at("fsync", dir))
}

/// Removes `path` if it exists and makes the removal durable.
///
/// # Errors
/// [`DurableError`] for anything but the file not existing.
pub fn remove(path: &Path) -> Result<(), DurableError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DurableError::at("remove", path)(e)),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A name in `path`'s directory that no other writer uses: hidden, with
/// this process's id and a counter (`create_new` refuses a leftover).
fn temporary_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy());
    parent(path).join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Whether `name` is a temporary file [`write_atomic`] left behind when
/// its process died mid-write (to be removed by whoever lists the
/// directory).
#[must_use]
pub fn is_leftover(name: &str) -> bool {
    // Our own names, in our own case: not a user's file extension.
    #[allow(
        clippy::case_sensitive_file_extension_comparisons,
        reason = "the suffix is ours, always lower case"
    )]
    let ours = name.starts_with('.') && name.ends_with(".tmp");
    ours
}

/// Removes every temporary file a crash left in `dir` (see
/// [`is_leftover`]): what they were replacing is still whole under its own
/// name. Returns how many went.
///
/// # Errors
/// [`DurableError`] if `dir` cannot be listed or a leftover removed.
pub fn remove_leftovers(dir: &Path) -> Result<usize, DurableError> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(DurableError::at("list", dir))? {
        let path = entry.map_err(DurableError::at("list", dir))?.path();
        if path
            .file_name()
            .is_some_and(|n| is_leftover(&n.to_string_lossy()))
        {
            std::fs::remove_file(&path).map_err(DurableError::at("remove", &path))?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_go_and_nothing_else() {
        let dir = scratch("leftovers");
        write_atomic(&dir.join("kept"), b"whole", 0o600).unwrap();
        std::fs::write(dir.join(".kept.1.0.tmp"), b"torn").unwrap();
        std::fs::write(dir.join("user.tmp"), b"not ours").unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(names(&dir), ["kept", "user.tmp"]);
        assert_eq!(remove_leftovers(&dir).unwrap(), 0);
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nb-durable-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_with_the_mode_and_leaves_nothing_else() {
        let dir = scratch("mode");
        let path = dir.join("a.json");
        write_atomic(&path, b"one", 0o644).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(names(&dir), ["a.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_fill_keeps_the_old_content_and_no_temporary() {
        let dir = scratch("fail");
        let path = dir.join("a");
        write_atomic(&path, b"old", 0o644).unwrap();
        let err = write_atomic_with(&path, 0o644, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.op, "write");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(&dir), ["a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_writers_never_mix() {
        let dir = scratch("race");
        let path = dir.join("a");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..50 {
                        write_atomic(path, &[i; 4096], 0o644).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|&b| b == got[0]), "one writer's content");
        assert_eq!(names(&dir), ["a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn copies_with_the_source_mode() {
        let dir = scratch("copy");
        let from = dir.join("from");
        write_atomic(&from, b"x", 0o755).unwrap();
        copy_atomic(&from, &dir.join("to")).unwrap();
        let mode = std::fs::metadata(dir.join("to"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(is_leftover(".to.1.2.tmp") && !is_leftover("to"));
        remove(&from).unwrap();
        remove(&from).unwrap();
        assert_eq!(names(&dir), ["to"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
