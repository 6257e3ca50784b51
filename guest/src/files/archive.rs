//! `archive`: a directory as a tar stream (gzip when asked), and a tar
//! stream extracted into a directory — both through the container-rooted
//! resolution of [`super::resolve`], so an entry named `../x` or a symlink
//! pointing to `/etc` can only ever touch the container's own files.
#![deny(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Component;

use bytes::Bytes;
use nestbox_api::fs::Extracted;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tokio::sync::mpsc;

use super::ops::mkdir_all;
use super::resolve::{open, parent};
use super::{CHUNK, FsError};

/// A `Write` that sends full chunks down a bounded channel.
struct ChannelWriter<'a> {
    tx: &'a mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

/// A `Read` over batches from a channel.
struct ChannelReader<'a> {
    rx: &'a mut mpsc::Receiver<super::Batch>,
    /// The rest of the batch.
    pending: std::vec::IntoIter<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if let Some(next) = self.pending.next() {
                self.current = next;
                continue;
            }
            match self.rx.blocking_recv() {
                Some(Ok(batch)) => self.pending = batch.into_iter(),
                Some(Err(why)) => return Err(std::io::Error::other(why)),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

fn io(path: &str) -> impl Fn(std::io::Error) -> FsError + '_ {
    move |e| FsError::os(path, e)
}

/// Streams `path` (a directory, or one file) as tar to `tx`.
///
/// # Errors
/// [`FsError`].
pub fn pack(
    root: &OwnedFd,
    path: &str,
    gzip: bool,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), FsError> {
    let writer = ChannelWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
    };
    let base = path
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(".")
        .to_owned();
    if gzip {
        let gz = flate2::write::GzEncoder::new(writer, flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        add(&mut builder, root, path, &base)?;
        let gz = builder.into_inner().map_err(io(path))?;
        let mut writer = gz.finish().map_err(io(path))?;
        writer.flush().map_err(io(path))
    } else {
        let mut builder = tar::Builder::new(writer);
        add(&mut builder, root, path, &base)?;
        let mut writer = builder.into_inner().map_err(io(path))?;
        writer.flush().map_err(io(path))
    }
}

fn add<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &OwnedFd,
    path: &str,
    name: &str,
) -> Result<(), FsError> {
    let (dir, last) = parent(root, path).or_else(|_| {
        // The root itself.
        let fd = open(root, "/", OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
        Ok::<_, FsError>((fd, ".".to_owned()))
    })?;
    let st = nix::sys::stat::fstatat(
        dir.as_fd(),
        last.as_str(),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| FsError::os(path, e))?;
    let mut header = tar::Header::new_gnu();
    header.set_mode(st.st_mode & 0o7777);
    header.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, format!("{name}/"), std::io::empty())
                .map_err(io(path))?;
            let fd = open(root, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
            let names = super::ops::names(&fd, path)?;
            for n in names {
                let sub = if path == "/" {
                    format!("/{n}")
                } else {
                    format!("{path}/{n}")
                };
                add(builder, root, &sub, &format!("{name}/{n}"))?;
            }
        }
        libc::S_IFREG => {
            let file =
                std::fs::File::from(open(root, path, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)?);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(u64::try_from(st.st_size).unwrap_or(0));
            builder
                .append_data(&mut header, name, file)
                .map_err(io(path))?;
        }
        libc::S_IFLNK => {
            let target = nix::fcntl::readlinkat(dir.as_fd(), last.as_str())
                .map_err(|e| FsError::os(path, e))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder
                .append_link(&mut header, name, std::path::Path::new(&target))
                .map_err(io(path))?;
        }
        // Sockets, FIFOs, devices: not content.
        _ => {}
    }
    Ok(())
}

/// The path of an archive entry below the destination: its normal
/// components only (a leading `/` and `.` dropped; `..` refused).
fn relative(entry: &std::path::Path) -> Result<String, FsError> {
    let mut parts = Vec::new();
    for c in entry.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(FsError::Invalid(format!(
                    "the archive's entry {} climbs out of its directory",
                    entry.display()
                )));
            }
        }
    }
    Ok(parts.join("/"))
}

/// Extracts the tar stream on `rx` into the directory `dest` (made if
/// missing): files, directories and symlinks; other kinds are skipped and
/// counted.
///
/// # Errors
/// [`FsError`]; `ENOSPC` when the disk is full (what was extracted stays).
pub fn unpack(
    root: &OwnedFd,
    dest: &str,
    gzip: bool,
    rx: &mut mpsc::Receiver<super::Batch>,
) -> Result<Extracted, FsError> {
    mkdir_all(root, dest, 0o755)?;
    let reader = ChannelReader {
        rx,
        pending: Vec::new().into_iter(),
        current: Bytes::new(),
    };
    let input: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(input);
    let mut done = Extracted {
        path: dest.to_owned(),
        entries: 0,
        bytes: 0,
        skipped: 0,
    };
    for entry in archive.entries().map_err(io(dest))? {
        let mut entry = entry.map_err(io(dest))?;
        let rel = relative(&entry.path().map_err(io(dest))?)?;
        if rel.is_empty() {
            continue;
        }
        let target = if dest == "/" {
            format!("/{rel}")
        } else {
            format!("{dest}/{rel}")
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        if let Some((dir, _)) = target.rsplit_once('/') {
            mkdir_all(root, dir, 0o755)?;
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => mkdir_all(root, &target, mode)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let (dir, name) = parent(root, &target)?;
                let fd = nix::fcntl::openat(
                    dir.as_fd(),
                    name.as_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_TRUNC
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(mode),
                )
                .map_err(|e| FsError::os(&target, e))?;
                let mut file = std::fs::File::from(fd);
                done.bytes += std::io::copy(&mut entry, &mut file).map_err(io(&target))?;
                file.sync_all().map_err(io(&target))?;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(io(&target))?.ok_or_else(|| {
                    FsError::Invalid(format!("{rel}: a symlink without a target"))
                })?;
                let (dir, name) = parent(root, &target)?;
                match nix::unistd::symlinkat(link.as_os_str(), dir.as_fd(), name.as_str()) {
                    Ok(()) => {}
                    Err(nix::errno::Errno::EEXIST) => {
                        let _ = nix::unistd::unlinkat(
                            dir.as_fd(),
                            name.as_str(),
                            nix::unistd::UnlinkatFlags::NoRemoveDir,
                        );
                        nix::unistd::symlinkat(link.as_os_str(), dir.as_fd(), name.as_str())
                            .map_err(|e| FsError::os(&target, e))?;
                    }
                    Err(e) => return Err(FsError::os(&target, e)),
                }
            }
            _ => {
                done.skipped += 1;
                continue;
            }
        }
        done.entries += 1;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_may_not_climb_out() {
        assert_eq!(relative(std::path::Path::new("./a/b")).unwrap(), "a/b");
        assert_eq!(relative(std::path::Path::new("/etc/x")).unwrap(), "etc/x");
        assert!(relative(std::path::Path::new("a/../../x")).is_err());
    }
}
