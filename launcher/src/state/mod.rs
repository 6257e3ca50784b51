//! What the launcher remembers, as files: the state directory holds
//! `launcher.toml`, a `lock` file (flock) that serializes every change, and
//! one directory per VM under `vms/`:
//!
//! | file | what |
//! | --- | --- |
//! | `vm.json` | the VM's record ([`record::VmRecord`]), replaced atomically |
//! | `token` | the API token (0600) |
//! | `data.img` | the data disk: a sparse raw file, formatted by the guest |
//! | `config.img` | the config disk: guest TOML + NUL padding |
//! | `console.log` | the guest's serial console |
//! | `vmm.log` | the VMM's own stdout and stderr |
//! | `qmp.sock` | the VMM's control socket (QEMU's QMP) |
//!
//! There is no daemon: a record plus `/proc` is all the state there is
//! ([`status`] derives running / stopped / crashed from them).

pub mod lock;
pub mod process;
pub mod record;
pub mod status;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::name::VmName;

/// Errors reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The lock could not be taken.
    #[error("cannot lock {path}: {source} (is the state directory writable?)")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: nix::Error,
    },
    /// A record that does not parse.
    #[error(
        "the VM record {path} is damaged: {source}. Repair it, or remove the VM's tap, nft table and directory by hand"
    )]
    Record {
        /// The record.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
}

impl StateError {
    pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { what, path, source }
    }
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`, resolved to the canonical path it
    /// has (or will have once created): VMMs are marked with their VM
    /// directory's path and found by it later, so every launcher run must
    /// spell it the same way.
    #[must_use]
    pub fn new(root: &Path) -> Self {
        Self {
            root: resolve(root),
        }
    }

    /// Its path.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lock every change takes.
    #[must_use]
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("lock")
    }

    /// The directory of VM directories.
    #[must_use]
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// The directory of VM `name`.
    #[must_use]
    pub fn vm(&self, name: &VmName) -> VmDir {
        VmDir {
            path: self.vms().join(name.as_str()),
        }
    }

    /// Makes the state directory and `vms/` (root only: tokens and disks).
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn ensure(&self) -> Result<(), StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.vms())
            .map_err(StateError::io("create", &self.vms()))
    }

    /// The names of the VM directories, sorted (none when the state
    /// directory does not exist yet).
    ///
    /// # Errors
    /// [`StateError::Io`] when `vms/` cannot be read.
    pub fn vm_names(&self) -> Result<Vec<VmName>, StateError> {
        let entries = match std::fs::read_dir(self.vms()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StateError::io("read", &self.vms())(e)),
        };
        let mut names: Vec<VmName> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| VmName::new(e.file_name().to_str()?).ok())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// `path` made absolute with its longest existing ancestor canonicalized
/// (symlinks resolved), the rest appended as written.
fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut rest = Vec::new();
    let mut base = absolute.as_path();
    loop {
        if let Ok(canonical) = std::fs::canonicalize(base) {
            return rest
                .iter()
                .rev()
                .fold(canonical, |p: PathBuf, c: &&std::ffi::OsStr| p.join(c));
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                base = parent;
            }
            _ => return absolute,
        }
    }
}

/// One VM's directory and the files in it.
#[derive(Clone, Debug)]
pub struct VmDir {
    path: PathBuf,
}

impl VmDir {
    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// `vm.json`.
    #[must_use]
    pub fn record(&self) -> PathBuf {
        self.path.join("vm.json")
    }
    /// `token`.
    #[must_use]
    pub fn token(&self) -> PathBuf {
        self.path.join("token")
    }
    /// `data.img`.
    #[must_use]
    pub fn data_disk(&self) -> PathBuf {
        self.path.join("data.img")
    }
    /// `config.img`.
    #[must_use]
    pub fn config_disk(&self) -> PathBuf {
        self.path.join("config.img")
    }
    /// `user.img`.
    #[must_use]
    pub fn user_disk(&self) -> PathBuf {
        self.path.join("user.img")
    }
    /// `console.log`.
    #[must_use]
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    /// `vmm.log`.
    #[must_use]
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }
    /// `qmp.sock`.
    #[must_use]
    pub fn control_socket(&self) -> PathBuf {
        self.path.join("qmp.sock")
    }

    /// Makes the directory (root only).
    ///
    /// # Errors
    /// [`StateError::Io`].
    pub fn create(&self) -> Result<(), StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(StateError::io("create", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_the_directories_that_are_names() {
        let root = std::env::temp_dir().join(format!("nb-state-{}", std::process::id()));
        let state = StateDir::new(&root);
        assert!(state.vm_names().unwrap().is_empty(), "no directory yet");
        state.ensure().unwrap();
        for d in ["b", "a", "Not_A_Name"] {
            std::fs::create_dir(state.vms().join(d)).unwrap();
        }
        std::fs::write(state.vms().join("c"), "").unwrap();
        let names: Vec<String> = state
            .vm_names()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["a", "b"]);
        let vm = state.vm(&VmName::new("a").unwrap());
        assert!(vm.record().ends_with("vms/a/vm.json"));
        assert!(vm.path().is_absolute());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_state_dir_is_spelled_the_same_before_and_after_it_exists() {
        let base = std::env::temp_dir().join(format!("nb-resolve-{}", std::process::id()));
        std::fs::create_dir_all(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        let before = StateDir::new(&base.join("link/state/"));
        std::fs::create_dir_all(base.join("real/state")).unwrap();
        let after = StateDir::new(&base.join("link/state"));
        assert_eq!(before.root(), after.root());
        assert!(
            after.root().ends_with("real/state"),
            "{}",
            after.root().display()
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
