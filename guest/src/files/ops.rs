//! The file operations, each run on a thread of [`super::as_container`]
//! (blocking system calls on purpose: never on the runtime).
#![deny(clippy::disallowed_methods)]

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use nestbox_api::fs::{Affected, CopiedFile, Entry};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};
use tokio::sync::mpsc;

use super::resolve::{open, parent};
use super::{CHUNK, FsError};

/// The type of a `stat` as the API names it.
fn kind(st: &FileStat) -> &'static str {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        _ => "other",
    }
}

/// How much of an upload is written back to the disk at a time.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// Writes an upload back to the disk as it arrives (on the upload's
/// second thread, beside the hash), one window behind:
/// each full window is handed to writeback at once and the one before it
/// waited for. The disk works while the network does (the final `fsync`
/// finds at most two windows dirty), and an upload never holds more than
/// that much dirty page cache.
struct Writeback {
    fd: std::os::fd::RawFd,
    /// Where the window being written starts.
    start: u64,
    /// The window handed to writeback, not yet waited for.
    pending: Option<(u64, u64)>,
}

impl Writeback {
    fn new(file: &std::fs::File) -> Self {
        use std::os::fd::AsRawFd;
        Self {
            fd: file.as_raw_fd(),
            start: 0,
            pending: None,
        }
    }

    /// `written` bytes are in the file (not in a buffer).
    fn advance(&mut self, written: u64) {
        let len = written - self.start;
        if len < WRITEBACK_WINDOW {
            return;
        }
        self.range(self.start, len, libc::SYNC_FILE_RANGE_WRITE);
        if let Some((start, len)) = self.pending.take() {
            self.range(
                start,
                len,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
        self.pending = Some((self.start, len));
        self.start = written;
    }

    /// An advisory `sync_file_range`: a failure (EIO included) shows again
    /// at the `fsync` that decides the upload.
    fn range(&self, start: u64, len: u64, flags: libc::c_uint) {
        let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a plain system call on a descriptor the caller's `File`
        // keeps open; no memory is passed.
        let _ = unsafe { libc::sync_file_range(self.fd, start, len, flags) };
    }
}

/// Writes every frame of `batch` at the file's offset, in as few vectored
/// writes as the kernel allows. Returns the bytes written.
fn write_batch(mut file: &std::fs::File, batch: &[Bytes]) -> std::io::Result<u64> {
    let mut slices: Vec<std::io::IoSlice<'_>> =
        batch.iter().map(|b| std::io::IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    let mut total = 0u64;
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                total += n as u64;
                std::io::IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Bytes as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Permission bits, octal.
#[must_use]
pub fn octal(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

/// Parses octal permission bits (`0755`, `755`).
///
/// # Errors
/// [`FsError::Invalid`].
pub fn parse_mode(text: &str) -> Result<u32, FsError> {
    u32::from_str_radix(text.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            FsError::Invalid(format!(
                "`mode` {text:?} is not octal permission bits such as 0644"
            ))
        })
}

fn mtime(st: &FileStat) -> String {
    let t = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(st.st_mtime).unwrap_or(0))
        + Duration::from_nanos(u64::try_from(st.st_mtime_nsec).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn lstat_at(dir: &OwnedFd, name: &str, path: &str) -> Result<FileStat, FsError> {
    nix::sys::stat::fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| FsError::os(path, e))
}

fn entry(dir: &OwnedFd, name: &str, path: &str) -> Result<Entry, FsError> {
    let st = lstat_at(dir, name, path)?;
    let target = (kind(&st) == "symlink")
        .then(|| nix::fcntl::readlinkat(dir.as_fd(), name).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    Ok(Entry {
        name: name.to_owned(),
        path: path.to_owned(),
        kind: kind(&st).to_owned(),
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: octal(st.st_mode),
        mod_time: mtime(&st),
        is_dir: kind(&st) == "directory",
        target,
    })
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The names in the directory `fd` (without `.` and `..`), sorted.
pub(crate) fn names(fd: &OwnedFd, path: &str) -> Result<Vec<String>, FsError> {
    let dup = fd.try_clone().map_err(|e| FsError::os(path, e))?;
    let mut dir = nix::dir::Dir::from_fd(dup).map_err(|e| FsError::os(path, e))?;
    let mut names: Vec<String> = dir
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    Ok(names)
}

/// `list`: a directory's entries, or the one entry of anything else.
///
/// # Errors
/// [`FsError`].
pub fn list(root: &OwnedFd, path: &str) -> Result<Vec<Entry>, FsError> {
    let fd = open(root, path, OFlag::O_RDONLY, 0)?;
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| FsError::os(path, e))?;
    if kind(&st) != "directory" {
        let (dir, name) = parent(root, path)?;
        return Ok(vec![entry(&dir, &name, path)?]);
    }
    names(&fd, path)?
        .iter()
        .map(|n| entry(&fd, n, &join(path, n)))
        .collect()
}

/// What `read` serves: the file open at its start, its size, its tag.
pub struct Readable {
    /// The file.
    pub file: std::fs::File,
    /// Its size.
    pub size: u64,
    /// An entity tag for `ETag`: inode, size and modification time.
    pub etag: String,
}

/// Opens a file to read.
///
/// # Errors
/// [`FsError`]; a directory is `EISDIR`.
pub fn open_read(root: &OwnedFd, path: &str) -> Result<Readable, FsError> {
    let fd = open(root, path, OFlag::O_RDONLY, 0)?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| FsError::os(path, e))?;
    if meta.is_dir() {
        return Err(FsError::os(
            path,
            std::io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    let etag = format!(
        "\"{:x}-{:x}-{:x}{:09x}\"",
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    Ok(Readable {
        size: meta.size(),
        file,
        etag,
    })
}

/// Sends `len` bytes of `file` from `start` to `tx`, a chunk at a time
/// (the channel's bound is the memory a transfer takes).
pub fn stream_out(mut file: std::fs::File, start: u64, len: u64, tx: &mpsc::Sender<Bytes>) {
    if file.seek(std::io::SeekFrom::Start(start)).is_err() {
        return;
    }
    let mut left = len;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        match file.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                left -= n as u64;
                if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    return;
                }
            }
        }
    }
}

/// Makes the directories of `path` that do not exist (like `mkdir -p`).
///
/// # Errors
/// [`FsError`].
pub fn mkdir_all(root: &OwnedFd, path: &str, mode: u32) -> Result<(), FsError> {
    let mut at = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        at = format!("{at}/{part}");
        match open(root, &at, OFlag::O_PATH | OFlag::O_DIRECTORY, 0) {
            Ok(_) => continue,
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let (dir, name) = parent(root, &at)?;
        match nix::sys::stat::mkdirat(dir.as_fd(), name.as_str(), Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(FsError::os(&at, e)),
        }
    }
    Ok(())
}

/// A temporary file's name beside the target (`.nestbox-upload.…`, which
/// the startup sweep of ours never touches: it is the container's disk).
fn temporary_name(name: &str) -> String {
    let mut rnd = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    let tag = hex(&rnd);
    format!(".{name}.nestbox-upload.{tag}")
}

/// `write`: what comes on `rx` into a temporary file beside `path`, then
/// fsync, the mode, rename into place, fsync of the directory. Answers the
/// size and SHA-256; on any failure the temporary file is removed.
///
/// # Errors
/// [`FsError`]; `ENOSPC`/`EDQUOT` when the disk is full.
pub fn write(
    root: &OwnedFd,
    path: &str,
    mode: u32,
    mkdir: bool,
    rx: &mut mpsc::Receiver<super::Batch>,
) -> Result<(u64, String), FsError> {
    if mkdir && let Some((dir, _)) = path.rsplit_once('/') {
        mkdir_all(root, dir, 0o755)?;
    }
    let (dir, name) = parent(root, path)?;
    let tmp = temporary_name(&name);
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| FsError::os(path, e))?;
    let file = std::sync::Arc::new(std::fs::File::from(fd));
    let result = (|| {
        // The writes here; the hash and the writeback on a second thread,
        // so that neither waits for the other (nor for the disk's
        // throttling of writeback).
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Vec<Bytes>>(super::IN_FLIGHT);
        let follower = {
            let file = file.clone();
            std::thread::Builder::new()
                .name("nestbox-files".into())
                .spawn(move || {
                    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                    let mut writeback = Writeback::new(&file);
                    let mut written = 0u64;
                    for batch in done_rx {
                        for chunk in &batch {
                            digest.update(chunk);
                            written += chunk.len() as u64;
                        }
                        writeback.advance(written);
                    }
                    digest.finish()
                })
                .map_err(|e| FsError::os(path, e))?
        };
        let written = (|| {
            let mut size = 0u64;
            while let Some(batch) = rx.blocking_recv() {
                let batch = batch
                    .map_err(|why| FsError::Invalid(format!("the upload broke off: {why}")))?;
                size += write_batch(&file, &batch).map_err(|e| FsError::os(path, e))?;
                // Gone only if the follower panicked: its join says so.
                let _ = done_tx.send(batch);
            }
            Ok(size)
        })();
        drop(done_tx);
        #[allow(
            clippy::disallowed_methods,
            reason = "on the upload's own thread, never the runtime's"
        )]
        let digest = follower
            .join()
            .map_err(|_| FsError::Invalid("the upload's hashing thread failed".into()))?;
        let size = written?;
        file.sync_all().map_err(|e| FsError::os(path, e))?;
        nix::sys::stat::fchmod(file.as_fd(), Mode::from_bits_truncate(mode))
            .map_err(|e| FsError::os(path, e))?;
        nix::fcntl::renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), name.as_str())
            .map_err(|e| FsError::os(path, e))?;
        nix::unistd::fsync(dir.as_fd()).map_err(|e| FsError::os(path, e))?;
        let hex = hex(digest.as_ref());
        Ok((size, hex))
    })();
    if result.is_err() {
        let _ = nix::unistd::unlinkat(
            dir.as_fd(),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    result
}

/// `delete`: a file, a symlink (not its target), an empty directory, or
/// with `recursive` a directory and all it holds. Answers what went.
///
/// # Errors
/// [`FsError`].
pub fn delete(root: &OwnedFd, path: &str, recursive: bool) -> Result<Vec<String>, FsError> {
    let (dir, name) = parent(root, path)?;
    let mut gone = Vec::new();
    remove_at(&dir, &name, path, recursive, &mut gone)?;
    Ok(gone)
}

fn remove_at(
    dir: &OwnedFd,
    name: &str,
    path: &str,
    recursive: bool,
    gone: &mut Vec<String>,
) -> Result<(), FsError> {
    let st = lstat_at(dir, name, path)?;
    if kind(&st) == "directory" {
        if recursive {
            let sub = nix::fcntl::openat(
                dir.as_fd(),
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| FsError::os(path, e))?;
            for n in names(&sub, path)? {
                remove_at(&sub, &n, &join(path, &n), true, gone)?;
            }
        }
        nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::RemoveDir)
            .map_err(|e| FsError::os(path, e))?;
    } else {
        nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(|e| FsError::os(path, e))?;
    }
    gone.push(path.to_owned());
    Ok(())
}

/// `rename`.
///
/// # Errors
/// [`FsError`].
pub fn rename(root: &OwnedFd, source: &str, dest: &str) -> Result<(), FsError> {
    let (from_dir, from) = parent(root, source)?;
    let (to_dir, to) = parent(root, dest)?;
    nix::fcntl::renameat(from_dir.as_fd(), from.as_str(), to_dir.as_fd(), to.as_str())
        .map_err(|e| FsError::os(source, e))
}

/// `copy`: a file (its mode kept), a symlink (as a symlink), or with
/// `recursive` a directory tree.
///
/// # Errors
/// [`FsError`].
pub fn copy(
    root: &OwnedFd,
    source: &str,
    dest: &str,
    recursive: bool,
    copied: &mut Vec<CopiedFile>,
) -> Result<u64, FsError> {
    let (sdir, sname) = parent(root, source)?;
    let st = lstat_at(&sdir, &sname, source)?;
    let (ddir, dname) = parent(root, dest)?;
    let mut bytes = 0;
    match kind(&st) {
        "directory" => {
            if !recursive {
                return Err(FsError::Invalid(format!(
                    "{source} is a directory: copy it with `recursive`"
                )));
            }
            match nix::sys::stat::mkdirat(
                ddir.as_fd(),
                dname.as_str(),
                Mode::from_bits_truncate(st.st_mode & 0o7777),
            ) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(FsError::os(dest, e)),
            }
            let sub = open(root, source, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
            for n in names(&sub, source)? {
                bytes += copy(root, &join(source, &n), &join(dest, &n), true, copied)?;
            }
        }
        "symlink" => {
            let target = nix::fcntl::readlinkat(sdir.as_fd(), sname.as_str())
                .map_err(|e| FsError::os(source, e))?;
            nix::unistd::symlinkat(target.as_os_str(), ddir.as_fd(), dname.as_str())
                .map_err(|e| FsError::os(dest, e))?;
        }
        "file" => {
            let mut from = std::fs::File::from(open(root, source, OFlag::O_RDONLY, 0)?);
            let to = nix::fcntl::openat(
                ddir.as_fd(),
                dname.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_TRUNC
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(st.st_mode & 0o7777),
            )
            .map_err(|e| FsError::os(dest, e))?;
            let mut to = std::fs::File::from(to);
            bytes = std::io::copy(&mut from, &mut to).map_err(|e| FsError::os(dest, e))?;
            to.sync_all().map_err(|e| FsError::os(dest, e))?;
        }
        _ => {
            return Err(FsError::Invalid(format!(
                "{source}: only files, directories and symlinks are copied"
            )));
        }
    }
    copied.push(CopiedFile {
        source: source.to_owned(),
        dest: dest.to_owned(),
    });
    Ok(bytes)
}

/// `chmod` (with `recursive`, everything below a directory too; symlinks
/// are left alone, as chmod leaves them).
///
/// # Errors
/// [`FsError`].
pub fn chmod(
    root: &OwnedFd,
    path: &str,
    mode: u32,
    recursive: bool,
    affected: &mut Vec<Affected>,
) -> Result<(), FsError> {
    let fd = open(root, path, OFlag::O_RDONLY, 0)?;
    nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))
        .map_err(|e| FsError::os(path, e))?;
    affected.push(Affected {
        path: path.to_owned(),
        mode: octal(mode),
    });
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| FsError::os(path, e))?;
    if recursive && kind(&st) == "directory" {
        for n in names(&fd, path)? {
            let sub = join(path, &n);
            let (dir, name) = parent(root, &sub)?;
            if kind(&lstat_at(&dir, &name, &sub)?) != "symlink" {
                chmod(root, &sub, mode, true, affected)?;
            }
        }
    }
    Ok(())
}
