//! The newc ("070701") cpio format: what the kernel unpacks an initramfs
//! from (`init/initramfs.c`).
//!
//! Written here rather than with a crate: the format is a fixed 110-byte
//! ASCII header per entry, and the image needs control over every field
//! (mtime 0, the owner each entry is given, sequential inode numbers) so
//! that the same inputs give the same bytes.

use std::io::{self, Write};

/// The newc magic.
const MAGIC: &[u8; 6] = b"070701";
/// The name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode` (`linux/stat.h`).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(&'a [u8]),
    /// A symbolic link to this target.
    Symlink(&'a str),
    /// A character device node.
    CharDev {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// One archive member.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Path inside the archive, relative (no leading `/`).
    pub path: &'a str,
    /// Permission bits (`0o7777` at most); the type bits come from `kind`.
    pub perm: u32,
    /// Its owner, user and group alike.
    pub owner: u32,
    /// What it is.
    pub kind: Kind<'a>,
}

impl Entry<'_> {
    /// `st_mode` as the header carries it: type bits and permissions.
    pub fn mode(&self) -> u32 {
        let kind = match self.kind {
            Kind::Dir => S_IFDIR,
            Kind::File(_) => S_IFREG,
            Kind::Symlink(_) => S_IFLNK,
            Kind::CharDev { .. } => S_IFCHR,
        };
        kind | (self.perm & 0o7777)
    }

    /// The bytes stored after the header: file contents or link target.
    pub fn data(&self) -> &[u8] {
        match self.kind {
            Kind::File(data) => data,
            Kind::Symlink(target) => target.as_bytes(),
            Kind::Dir | Kind::CharDev { .. } => &[],
        }
    }
}

/// Writes `entries`, in the order given, and the trailer. Entries get inode
/// numbers 1, 2, … in that order; every timestamp is 0. Returns the number
/// of bytes written.
///
/// # Errors
/// An entry too large for the format's 32-bit size field, or the writer's
/// error.
pub fn write<'a, W: Write>(
    out: W,
    entries: impl IntoIterator<Item = Entry<'a>>,
) -> io::Result<u64> {
    let mut out = Counting { inner: out, n: 0 };
    let mut ino = 0u32;
    for entry in entries {
        ino += 1;
        let (rmaj, rmin) = match entry.kind {
            Kind::CharDev { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let nlink = if entry.kind == Kind::Dir { 2 } else { 1 };
        header(
            &mut out,
            ino,
            entry.mode(),
            entry.owner,
            nlink,
            entry.path,
            entry.data(),
            (rmaj, rmin),
        )?;
    }
    header(&mut out, 0, 0, 0, 1, TRAILER, &[], (0, 0))?;
    out.inner.flush()?;
    Ok(out.n)
}

/// One header, the NUL-terminated name and the data, each padded to 4 bytes.
#[allow(clippy::too_many_arguments, reason = "one per header field")]
fn header<W: Write>(
    out: &mut Counting<W>,
    ino: u32,
    mode: u32,
    owner: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    (rdev_major, rdev_minor): (u32, u32),
) -> io::Result<()> {
    let too_big = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpio entry {name}: {what} does not fit newc's 32-bit field"),
        )
    };
    let filesize = u32::try_from(data.len()).map_err(|_| too_big("size"))?;
    let namesize = u32::try_from(name.len() + 1).map_err(|_| too_big("name"))?;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
    // rdevminor namesize check
    let fields = [
        ino, mode, owner, owner, nlink, 0, filesize, 0, 0, rdev_major, rdev_minor, namesize, 0,
    ];
    out.write_all(MAGIC)?;
    for f in fields {
        write!(out, "{f:08x}")?;
    }
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.pad()?;
    out.write_all(data)?;
    out.pad()
}

/// A writer that counts bytes, for padding and the total.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Counting<W> {
    /// NULs up to the next multiple of 4.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.n % 4) % 4;
        self.write_all(&[0; 3][..usize::try_from(pad).expect("below 4")])
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member as parsed back from an archive.
    #[derive(Debug, PartialEq)]
    struct Parsed {
        ino: u32,
        mode: u32,
        owner: (u32, u32),
        nlink: u32,
        rdev: (u32, u32),
        name: String,
        data: Vec<u8>,
    }

    /// A newc reader, independent of the writer: checks magic, padding
    /// and that the archive ends right after the trailer.
    fn parse(mut buf: &[u8]) -> Vec<Parsed> {
        let total = buf.len();
        assert_eq!(total % 4, 0, "archive length is a multiple of 4");
        let mut out = Vec::new();
        loop {
            let offset = total - buf.len();
            assert_eq!(offset % 4, 0, "header at {offset} is aligned");
            assert_eq!(&buf[..6], MAGIC);
            let field = |i: usize| {
                let hex = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (ino, mode, uid, gid, nlink, mtime) =
                (field(0), field(1), field(2), field(3), field(4), field(5));
            assert_eq!((mtime, field(12)), (0, 0));
            let size = field(6) as usize;
            let namesize = field(11) as usize;
            let name = &buf[110..110 + namesize];
            assert_eq!(name.last(), Some(&0), "name is NUL-terminated");
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = buf[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            assert!(buf[110 + namesize..data_at].iter().all(|&b| b == 0));
            assert!(buf[data_at + size..next].iter().all(|&b| b == 0));
            buf = &buf[next..];
            if name == TRAILER {
                assert!(buf.is_empty(), "nothing after the trailer");
                return out;
            }
            out.push(Parsed {
                ino,
                mode,
                owner: (uid, gid),
                nlink,
                rdev: (field(9), field(10)),
                name,
                data,
            });
        }
    }

    fn sample() -> Vec<Entry<'static>> {
        vec![
            Entry {
                path: "dev",
                perm: 0o755,
                owner: 0,
                kind: Kind::Dir,
            },
            Entry {
                path: "dev/console",
                perm: 0o600,
                owner: 0,
                kind: Kind::CharDev { major: 5, minor: 1 },
            },
            Entry {
                path: "etc",
                perm: 0o755,
                owner: 0,
                kind: Kind::Dir,
            },
            Entry {
                path: "etc/a",
                perm: 0o644,
                owner: 100_000,
                kind: Kind::File(b"hello\n"),
            },
            Entry {
                path: "etc/b",
                perm: 0o777,
                owner: 0,
                kind: Kind::Symlink("a"),
            },
            Entry {
                path: "init",
                perm: 0o755,
                owner: 0,
                kind: Kind::File(b""),
            },
        ]
    }

    #[test]
    fn round_trips_through_a_reader() {
        let mut buf = Vec::new();
        let n = write(&mut buf, sample()).unwrap();
        assert_eq!(n, buf.len() as u64);
        let parsed = parse(&buf);
        let expect = [
            (1, 0o040_755, 2, (0, 0), "dev", &b""[..]),
            (2, 0o020_600, 1, (5, 1), "dev/console", b""),
            (3, 0o040_755, 2, (0, 0), "etc", b""),
            (4, 0o100_644, 1, (0, 0), "etc/a", b"hello\n"),
            (5, 0o120_777, 1, (0, 0), "etc/b", b"a"),
            (6, 0o100_755, 1, (0, 0), "init", b""),
        ];
        let expect: Vec<Parsed> = expect
            .into_iter()
            .map(|(ino, mode, nlink, rdev, name, data)| Parsed {
                ino,
                mode,
                owner: if name == "etc/a" {
                    (100_000, 100_000)
                } else {
                    (0, 0)
                },
                nlink,
                rdev,
                name: name.to_owned(),
                data: data.to_vec(),
            })
            .collect();
        assert_eq!(parsed, expect);
    }

    #[test]
    fn is_deterministic() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write(&mut a, sample()).unwrap();
        write(&mut b, sample()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let mut buf = Vec::new();
        write(&mut buf, []).unwrap();
        assert!(parse(&buf).is_empty());
        // 110-byte header + "TRAILER!!!\0" (11) = 121, padded to 124.
        assert_eq!(buf.len(), 124);
    }

    /// GNU cpio reads the archive back (when it is installed; `cargo xtask
    /// image` installs it).
    #[test]
    fn gnu_cpio_lists_it() {
        let cpio = std::path::Path::new("/usr/bin/cpio");
        assert!(
            cpio.exists(),
            "no /usr/bin/cpio: apt-get install cpio (cargo xtask image installs it)"
        );
        let mut buf = Vec::new();
        write(&mut buf, sample()).unwrap();
        let mut child = std::process::Command::new(cpio)
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let names: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(
            names,
            ["dev", "dev/console", "etc", "etc/a", "etc/b", "init"]
        );
    }
}
