//! Paths inside the container's root: joined with the working directory,
//! then walked by the kernel from a descriptor of that root with
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`.
#![deny(clippy::disallowed_methods)]

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use super::FsError;

/// `path` as an absolute path of the container: relative to `working_dir`
/// (default `/`), with `.` and empty components dropped (`..` is left to
/// the kernel, which keeps it inside the root).
///
/// # Errors
/// [`FsError::Invalid`] for an empty path or one with a NUL byte.
pub fn absolute(working_dir: Option<&str>, path: &str) -> Result<String, FsError> {
    if path.is_empty() {
        return Err(FsError::Invalid("`path` is empty".into()));
    }
    if path.contains('\0') || working_dir.is_some_and(|w| w.contains('\0')) {
        return Err(FsError::Invalid("a path may not contain a NUL byte".into()));
    }
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", working_dir.unwrap_or("/"))
    };
    let parts: Vec<&str> = joined
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    Ok(format!("/{}", parts.join("/")))
}

fn how(flags: OFlag, mode: u32) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Opens `path` (absolute, of the container) inside `root`.
///
/// # Errors
/// The kernel's error, about `path`.
pub fn open(root: &OwnedFd, path: &str, flags: OFlag, mode: u32) -> Result<OwnedFd, FsError> {
    nix::fcntl::openat2(root.as_fd(), path, how(flags, mode)).map_err(|e| FsError::os(path, e))
}

/// The directory holding `path`'s last component, opened (for `*at`
/// calls and an fsync), and that component's name.
///
/// # Errors
/// [`FsError::Invalid`] when `path` names the root; the open's error.
pub fn parent(root: &OwnedFd, path: &str) -> Result<(OwnedFd, String), FsError> {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name.is_empty() || name == "." || name == ".." {
        return Err(FsError::Invalid(format!(
            "{path}: name a file or directory, not the root or `..`"
        )));
    }
    let dir = if dir.is_empty() { "/" } else { dir };
    let fd = open(root, dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
    Ok((fd, name.to_owned()))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "a test's files")]
mod tests {
    use super::*;

    #[test]
    fn paths_join_and_normalize() {
        assert_eq!(absolute(None, "a/b").unwrap(), "/a/b");
        assert_eq!(absolute(Some("/srv/"), "./x//y").unwrap(), "/srv/x/y");
        assert_eq!(absolute(Some("/srv"), "/etc/hosts").unwrap(), "/etc/hosts");
        assert_eq!(absolute(None, "/").unwrap(), "/");
        assert_eq!(absolute(None, "../..").unwrap(), "/../..");
        assert!(absolute(None, "").is_err());
        assert!(absolute(None, "a\0b").is_err());
    }

    /// The kernel keeps `..`, absolute symlinks and magic links inside the
    /// root (no privilege needed: `openat2` is for everyone).
    #[test]
    fn resolution_stays_inside_the_root() {
        let base = std::env::temp_dir().join(format!("nb-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root_dir = base.join("root");
        std::fs::create_dir_all(root_dir.join("etc")).unwrap();
        std::fs::write(root_dir.join("etc/secret"), "inside").unwrap();
        std::fs::write(base.join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink("/etc/secret", root_dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../secret", root_dir.join("etc/up")).unwrap();
        let root: OwnedFd = std::fs::File::open(&root_dir).unwrap().into();
        let read = |p: &str| -> Result<String, FsError> {
            let fd = open(&root, p, OFlag::O_RDONLY, 0)?;
            Ok(std::io::read_to_string(std::fs::File::from(fd)).unwrap())
        };
        assert_eq!(read("/etc/secret").unwrap(), "inside");
        assert_eq!(read("/../secret").unwrap_err().errno(), Some(libc::ENOENT));
        assert_eq!(read("/../etc/secret").unwrap(), "inside");
        assert_eq!(read("/abs").unwrap(), "inside");
        assert_eq!(read("/etc/up").unwrap_err().errno(), Some(libc::ENOENT));
        let magic = format!(
            "/proc/{}/root/{}",
            std::process::id(),
            base.join("secret").display()
        );
        assert!(read(&magic).is_err(), "a magic link must not lead out");
        assert!(parent(&root, "/").is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
