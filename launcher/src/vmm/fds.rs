//! What a VMM gets as descriptors, at fixed numbers: the launcher opens the
//! tap, the disks, the console log and the control socket, so the VMM —
//! jailed and unprivileged (see [`super::jail`]) — opens nothing itself.
//!
//! A read-write disk is passed twice, read-write and read-only: QEMU probes
//! a disk read-only before it opens it for writing, and takes from its
//! descriptor set the one whose access mode matches.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{VmSpec, VmmError, jail};

/// The tap.
pub const TAP: RawFd = 3;
/// The console log, opened for appending.
pub const CONSOLE: RawFd = 4;
/// The control socket (QMP), bound and listening.
pub const CONTROL: RawFd = 5;
/// The data disk, read-write.
pub const DATA: RawFd = 6;
/// The data disk, read-only.
pub const DATA_RO: RawFd = 7;
/// The user disk, read-write (when the VM has one).
pub const USER: RawFd = 8;
/// The user disk, read-only.
pub const USER_RO: RawFd = 9;
/// The config disk, read-only.
pub const CONFIG: RawFd = 10;

/// The descriptors opened for one VMM, each with the number it gets.
#[derive(Debug)]
pub struct Passed {
    fds: Vec<(OwnedFd, RawFd)>,
}

fn file(path: &Path, write: bool, append: bool) -> Result<OwnedFd, VmmError> {
    std::fs::OpenOptions::new()
        .read(!append)
        .write(write || append)
        .append(append)
        .create(append)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(Into::into)
        .map_err(|source| VmmError::Open {
            path: path.to_owned(),
            source,
        })
}

impl Passed {
    /// Opens everything `spec` names (binding the control socket afresh).
    ///
    /// # Errors
    /// [`VmmError::Open`] or [`VmmError::Tap`] naming what failed.
    pub fn open(spec: &VmSpec) -> Result<Self, VmmError> {
        let mut fds = vec![
            (
                crate::net::tap::open(&spec.tap).map_err(|e| VmmError::Tap(Box::new(e)))?,
                TAP,
            ),
            (file(&spec.console_log, false, true)?, CONSOLE),
            (control_socket(&spec.control_socket)?, CONTROL),
            (file(&spec.data_disk, true, false)?, DATA),
            (file(&spec.data_disk, false, false)?, DATA_RO),
            (file(&spec.config_disk, false, false)?, CONFIG),
        ];
        if let Some(user) = &spec.user_disk {
            fds.push((file(user, true, false)?, USER));
            fds.push((file(user, false, false)?, USER_RO));
        }
        let fds = fds
            .into_iter()
            .map(|(fd, to)| {
                jail::high(&fd)
                    .map(|high| (high, to))
                    .map_err(|source| VmmError::Open {
                        path: spec.dir.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { fds })
    }

    /// Nothing (a stub that needs no device).
    #[must_use]
    pub fn none() -> Self {
        Self { fds: Vec::new() }
    }

    /// `(from, to)` pairs for [`jail::place`] in the child.
    #[must_use]
    pub fn mapping(&self) -> Vec<(RawFd, RawFd)> {
        self.fds
            .iter()
            .map(|(fd, to)| (fd.as_raw_fd(), *to))
            .collect()
    }
}

/// The control socket at `path`, bound (a stale file replaced) and
/// listening, readable by root only.
fn control_socket(path: &Path) -> Result<OwnedFd, VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| VmmError::Open {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    Ok(listener.into())
}
