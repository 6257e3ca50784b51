//! The btrfs calls the storage stack makes, as the kernel's ioctls
//! (`linux/btrfs.h`): a subvolume created, snapshotted (read-only for a
//! checkpoint, writable for a restore) and deleted, with no `btrfs` program
//! on the path of a checkpoint. Each call takes the directory the
//! subvolume is (or goes) in and a plain name inside it.
#![allow(
    clippy::cast_possible_wrap,
    reason = "the ioctls take file descriptors as the kernel's __s64"
)]

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

/// `BTRFS_SUPER_MAGIC` (`linux/magic.h`).
pub const SUPER_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x9123_683e);

/// The inode number of every subvolume's root directory
/// (`BTRFS_FIRST_FREE_OBJECTID`).
const SUBVOLUME_ROOT_INODE: u64 = 256;

/// `BTRFS_IOCTL_MAGIC`.
const IOCTL_MAGIC: u8 = 0x94;
/// `BTRFS_PATH_NAME_MAX`.
const PATH_NAME_MAX: usize = 4087;
/// `BTRFS_SUBVOL_NAME_MAX`.
const SUBVOL_NAME_MAX: usize = 4039;
/// `BTRFS_SUBVOL_RDONLY`.
const SUBVOL_RDONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` (the union of sizes and ids unused).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME_MAX + 1],
}

/// `BTRFS_VOL_NAME_MAX`.
const VOL_NAME_MAX: usize = 255;

/// `struct btrfs_ioctl_timespec`.
#[repr(C)]
#[allow(dead_code, reason = "the kernel's layout")]
#[derive(Clone, Copy)]
struct Timespec {
    sec: u64,
    nsec: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args`.
#[repr(C)]
#[allow(
    dead_code,
    reason = "the kernel's layout: each field counts for the size and the offsets"
)]
struct SubvolInfo {
    treeid: u64,
    name: [u8; VOL_NAME_MAX + 1],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: Timespec,
    otime: Timespec,
    stime: Timespec,
    rtime: Timespec,
    reserved: [u64; 8],
}

nix::ioctl_write_ptr!(subvol_create, IOCTL_MAGIC, 14, VolArgs);
nix::ioctl_read!(get_subvol_info, IOCTL_MAGIC, 60, SubvolInfo);
nix::ioctl_write_ptr!(snap_destroy, IOCTL_MAGIC, 15, VolArgs);
nix::ioctl_write_ptr!(snap_create_v2, IOCTL_MAGIC, 23, VolArgsV2);

/// A btrfs call that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct BtrfsError {
    /// What was being done.
    pub what: &'static str,
    /// On what.
    pub path: PathBuf,
    /// The kernel's answer.
    #[source]
    pub source: std::io::Error,
}

impl BtrfsError {
    fn new(what: &'static str, path: &Path, errno: nix::errno::Errno) -> Self {
        Self {
            what,
            path: path.to_owned(),
            source: std::io::Error::from(errno),
        }
    }

    /// Whether the filesystem is full.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.source.raw_os_error() == Some(libc::ENOSPC)
            || self.source.raw_os_error() == Some(libc::EDQUOT)
    }
}

/// Whether `path` is on btrfs.
#[must_use]
pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type() == SUPER_MAGIC)
}

/// Whether `path` is the root of a subvolume (on btrfs).
#[must_use]
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    is_btrfs(path)
        && std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.is_dir() && m.ino() == SUBVOLUME_ROOT_INODE)
}

fn open_dir(path: &Path, what: &'static str) -> Result<OwnedFd, BtrfsError> {
    open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BtrfsError::new(what, path, e))
}

/// Copies `name` into an ioctl's NUL-terminated name field.
fn set_name<const N: usize>(
    field: &mut [u8; N],
    name: &OsStr,
    path: &Path,
) -> Result<(), BtrfsError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= N || bytes.contains(&b'/') || bytes.contains(&0) {
        return Err(BtrfsError::new("name", path, nix::errno::Errno::EINVAL));
    }
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// The `btrfs_ioctl_vol_args` naming `name` (whose path, for errors, is
/// `target`).
fn vol_args(name: &OsStr, target: &Path) -> Result<VolArgs, BtrfsError> {
    let mut args = VolArgs {
        fd: 0,
        name: [0; PATH_NAME_MAX + 1],
    };
    set_name(&mut args.name, name, target)?;
    Ok(args)
}

/// Creates the empty subvolume `dir/name`.
///
/// # Errors
/// The kernel's answer (`EEXIST`, `ENOSPC`, `ENOTTY` off btrfs …).
pub fn create_subvolume(dir: &Path, name: &OsStr) -> Result<(), BtrfsError> {
    let target = dir.join(name);
    let parent = open_dir(dir, "open")?;
    let args = vol_args(name, &target)?;
    // SAFETY: `args` is a valid `btrfs_ioctl_vol_args` that outlives the
    // call; the kernel only reads it.
    unsafe { subvol_create(parent.as_raw_fd(), &raw const args) }
        .map_err(|e| BtrfsError::new("create the subvolume", &target, e))?;
    Ok(())
}

/// Snapshots the subvolume `source` as `dir/name`, read-only or writable.
/// The kernel flushes the source's dirty data first and takes the snapshot
/// in one transaction: a point in time, as a power cut would leave it.
///
/// # Errors
/// The kernel's answer.
pub fn snapshot(
    source: &Path,
    dir: &Path,
    name: &OsStr,
    read_only: bool,
) -> Result<(), BtrfsError> {
    let target = dir.join(name);
    let src = open_dir(source, "open")?;
    let parent = open_dir(dir, "open")?;
    let mut args = VolArgsV2 {
        fd: i64::from(src.as_raw_fd()),
        transid: 0,
        flags: if read_only { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; SUBVOL_NAME_MAX + 1],
    };
    set_name(&mut args.name, name, &target)?;
    // SAFETY: `args` is a valid `btrfs_ioctl_vol_args_v2` whose fd stays
    // open for the call; the kernel only reads it.
    unsafe { snap_create_v2(parent.as_raw_fd(), &raw const args) }
        .map_err(|e| BtrfsError::new("snapshot into", &target, e))?;
    Ok(())
}

/// Deletes the subvolume `dir/name` with everything in it (read-only ones
/// included). One that is gone already is fine.
///
/// # Errors
/// The kernel's answer.
pub fn delete_subvolume(dir: &Path, name: &OsStr) -> Result<(), BtrfsError> {
    let target = dir.join(name);
    if std::fs::symlink_metadata(&target).is_err() {
        return Ok(());
    }
    let parent = open_dir(dir, "open")?;
    let args = vol_args(name, &target)?;
    // SAFETY: as in `create_subvolume`.
    unsafe { snap_destroy(parent.as_raw_fd(), &raw const args) }
        .map_err(|e| BtrfsError::new("delete the subvolume", &target, e))?;
    Ok(())
}

/// Swaps the names `dir/a` and `dir/b` in one step (`renameat2` with
/// `RENAME_EXCHANGE`): no moment where either is missing.
///
/// # Errors
/// The kernel's answer.
pub fn exchange(dir: &Path, a: &OsStr, b: &OsStr) -> Result<(), BtrfsError> {
    let fd = open_dir(dir, "open")?;
    nix::fcntl::renameat2(&fd, a, &fd, b, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
        .map_err(|e| BtrfsError::new("exchange", &dir.join(a), e))
}

/// When the subvolume (or snapshot) at `path` was made, from its root
/// item (its root directory's own times are the source's, copied).
///
/// # Errors
/// The kernel's answer.
pub fn created(path: &Path) -> Result<std::time::SystemTime, BtrfsError> {
    let info = subvol_info(path)?;
    Ok(std::time::UNIX_EPOCH
        + std::time::Duration::new(info.otime.sec, info.otime.nsec.min(999_999_999)))
}

/// Who the subvolume at `path` is across filesystems: the UUID it was
/// received as (a snapshot `btrfs receive` made), else its own; hex.
///
/// # Errors
/// The kernel's answer.
pub fn identity(path: &Path) -> Result<String, BtrfsError> {
    let info = subvol_info(path)?;
    let uuid = if info.received_uuid == [0; 16] {
        info.uuid
    } else {
        info.received_uuid
    };
    Ok(uuid.iter().fold(String::with_capacity(32), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}

fn subvol_info(path: &Path) -> Result<SubvolInfo, BtrfsError> {
    let fd = open_dir(path, "open")?;
    // SAFETY: all-zero bytes are a valid value of this plain C struct.
    let mut info: SubvolInfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `btrfs_ioctl_get_subvol_info_args`
    // that outlives the call.
    unsafe { get_subvol_info(fd.as_raw_fd(), &raw mut info) }
        .map_err(|e| BtrfsError::new("read the subvolume's root item", path, e))?;
    Ok(info)
}

/// `syncfs(2)` of the filesystem holding `dir`: what was renamed or
/// created is on the disk.
///
/// # Errors
/// The kernel's answer.
pub fn sync(dir: &Path) -> Result<(), BtrfsError> {
    let fd = open_dir(dir, "open")?;
    nix::unistd::syncfs(&fd).map_err(|e| BtrfsError::new("syncfs", dir, e))
}
