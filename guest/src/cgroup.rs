//! cgroup v2: where the hierarchy is mounted and which cgroups lie under a
//! directory.
//!
//! The mount is read from `/proc/mounts` (build machines mount cgroup2 at
//! `/sys/fs/cgroup/unified`, a VM at `/sys/fs/cgroup`). A cgroup's id, as BPF
//! and sock_diag report it, is the inode number of its directory.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Errors about cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem is mounted: mount one (`mount -t cgroup2 none /sys/fs/cgroup`)")]
    NoCgroup2Mount,
    /// `/proc/mounts` could not be read.
    #[error("cannot read /proc/mounts: {0}: is /proc mounted?")]
    Mounts(#[source] io::Error),
    /// The directory does not exist.
    #[error("cgroup {path} does not exist: create it with mkdir under the cgroup2 mount")]
    Missing {
        /// The directory.
        path: PathBuf,
    },
    /// The directory is not on a cgroup2 filesystem.
    #[error(
        "{path} is not a cgroup v2 directory: give a directory under the cgroup2 mount {mount}"
    )]
    NotCgroup2 {
        /// The directory.
        path: PathBuf,
        /// Where cgroup2 is mounted.
        mount: PathBuf,
    },
    /// Reading the cgroup tree failed.
    #[error("cannot read cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The first cgroup2 mount point listed in `/proc/mounts`.
///
/// # Errors
/// [`CgroupError::NoCgroup2Mount`] or [`CgroupError::Mounts`].
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(CgroupError::Mounts)?;
    parse_cgroup2_mount(&mounts).ok_or(CgroupError::NoCgroup2Mount)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(byte) = code {
            out.push(char::from(byte));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// Turns a user-given cgroup into an absolute directory on the cgroup2
/// mount: absolute paths are taken as they are, relative ones are relative
/// to the mount. The directory must exist and be on cgroup2.
///
/// # Errors
/// [`CgroupError`] naming what is wrong.
pub fn resolve(dir: &Path) -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let path = if dir.is_absolute() {
        dir.to_owned()
    } else {
        mount.join(dir)
    };
    if !path.is_dir() {
        return Err(CgroupError::Missing { path });
    }
    let fs = nix::sys::statfs::statfs(&path).map_err(|e| CgroupError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 { path, mount });
    }
    Ok(path)
}

/// The cgroup v2 directory of this process (from `/proc/self/cgroup`).
///
/// # Errors
/// [`CgroupError`] if cgroup2 is not mounted or the file cannot be read.
pub fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })?;
    let relative = parse_own_cgroup(&text).ok_or_else(|| CgroupError::Io {
        path: path.to_owned(),
        source: io::Error::other("no cgroup v2 entry (0::/…)"),
    })?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

fn parse_own_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The ids of `dir` and every cgroup below it.
///
/// # Errors
/// [`CgroupError::Io`] if the tree cannot be read.
pub fn subtree_ids(dir: &Path) -> Result<BTreeSet<u64>, CgroupError> {
    let mut ids = BTreeSet::new();
    walk(dir, &mut |d| {
        let meta = std::fs::metadata(d).map_err(|source| CgroupError::Io {
            path: d.to_owned(),
            source,
        })?;
        ids.insert(meta.ino());
        Ok(())
    })?;
    Ok(ids)
}

/// The processes of `dir` and of every cgroup below it.
///
/// # Errors
/// [`CgroupError::Io`] if the tree cannot be read.
pub fn subtree_pids(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let mut pids = Vec::new();
    walk(dir, &mut |d| {
        let file = d.join("cgroup.procs");
        match std::fs::read_to_string(&file) {
            Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
            // The cgroup went away while we walked.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(CgroupError::Io { path: file, source }),
        }
        Ok(())
    })?;
    Ok(pids)
}

fn walk(
    dir: &Path,
    visit: &mut dyn FnMut(&Path) -> Result<(), CgroupError>,
) -> Result<(), CgroupError> {
    visit(dir)?;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), visit)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_mounts() {
        let mounts = "proc /proc proc rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_octal_in_mount_paths() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path(r"/x\\y"), r"/x\\y");
    }

    #[test]
    fn subtree_walks_nested_directories() {
        let root = std::env::temp_dir().join(format!("nestbox-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("cgroup.procs"), "1\n2\n").unwrap();
        std::fs::write(root.join("a/b/cgroup.procs"), "3\n").unwrap();
        let mut pids = subtree_pids(&root).unwrap();
        pids.sort_unstable();
        assert_eq!(pids, vec![1, 2, 3]);
        assert_eq!(subtree_ids(&root).unwrap().len(), 3);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn own_cgroup_line() {
        let text = "12:cpu:/x\n0::/user.slice/session-1.scope\n";
        assert_eq!(parse_own_cgroup(text), Some("/user.slice/session-1.scope"));
        assert_eq!(parse_own_cgroup("1:name=systemd:/\n"), None);
    }
}
