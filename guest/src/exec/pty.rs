//! A session's terminal: a pseudo-terminal of the container's own `devpts`
//! instance (opened on the container's thread, so `tty` in the session
//! names a `/dev/pts/N` of the container), whose master side the guest
//! reads and writes without blocking its runtime.
#![deny(clippy::disallowed_methods)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;

use crate::container::idmap::HOST_BASE;

/// Opens a pseudo-terminal: `(master, slave)`. Run it on the container's
/// thread (its `/dev/ptmx`). The slave belongs to the container's root.
///
/// # Errors
/// The error of opening, unlocking or reaching the slave.
#[allow(
    clippy::disallowed_methods,
    reason = "runs on the container's own thread, never on the runtime"
)]
pub fn open() -> io::Result<(OwnedFd, OwnedFd)> {
    let master: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/ptmx")?
        .into();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the pointer, which is valid.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER opens the master's own slave (no path lookup) and
    // returns a new descriptor, or -1.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned by nothing else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    nix::unistd::fchown(
        &slave,
        Some(nix::unistd::Uid::from_raw(HOST_BASE)),
        Some(nix::unistd::Gid::from_raw(HOST_BASE)),
    )?;
    Ok((master, slave))
}

/// Sets the terminal's size (the kernel sends `SIGWINCH` to its
/// foreground process group).
///
/// # Errors
/// The error of `TIOCSWINSZ`.
pub fn set_size(master: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &raw const size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The master side, registered with the runtime.
#[derive(Debug)]
pub struct Master(AsyncFd<OwnedFd>);

impl Master {
    /// Registers `master` (opened non-blocking by [`open`]).
    ///
    /// # Errors
    /// The error of registering it.
    pub fn new(master: OwnedFd) -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the descriptor, which stays open and the
        // same file until it is dropped.
        let fd = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
        Ok(Self(fd))
    }

    /// Reads what the terminal's programs wrote; 0 once every slave
    /// descriptor is closed (the kernel says `EIO`).
    ///
    /// # Errors
    /// A read error other than that.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| {
                // SAFETY: read into a buffer of the length given.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n.cast_unsigned())
                }
            }) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    /// Writes all of `data` (the terminal's input).
    ///
    /// # Errors
    /// The write's error.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|fd| {
                // SAFETY: write from a buffer of the length given.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n.cast_unsigned())
                }
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets the terminal's size.
    ///
    /// # Errors
    /// As [`set_size`].
    pub fn set_size(&self, rows: u16, cols: u16) -> io::Result<()> {
        set_size(self.0.get_ref(), rows, cols)
    }
}
