//! Persistent tap devices through `/dev/net/tun`: `TUNSETIFF` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` makes (or attaches to) the device,
//! `TUNSETPERSIST 1` keeps it when the file descriptor closes, so the tap
//! outlives this short-lived process. The launcher attaches to it again
//! ([`open`]) and hands that descriptor to the VMM, which then needs no
//! privilege to use the tap.
//! Deleting goes through netlink ([`super::netlink::Netlink::del_link`]).
//!
//! Two ioctls on one file descriptor, in this small module rather than a
//! crate: `tun-tap` is unmaintained and has no way to set persistence, and
//! `tun` is built around owning and doing I/O on the device (plus address
//! configuration by ioctl, which we do with rtnetlink) — we need neither,
//! only a device that exists and carries `IFF_VNET_HDR` so QEMU can offload.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// The clone device.
const TUN_PATH: &str = "/dev/net/tun";

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags (the
/// union's first member here); padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors making a tap.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the tap {tap} through /dev/net/tun: {source}{hint}")]
pub struct TapError {
    /// The tap's name.
    pub tap: String,
    /// The error.
    pub source: std::io::Error,
    /// What to do about it.
    pub hint: &'static str,
}

fn hint(err: &std::io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => " (run nestbox-launcher as root)",
        Some(libc::ENOENT | libc::ENODEV) => " (load the tun module: modprobe tun)",
        Some(libc::EINVAL) => {
            " (an interface of that name exists and is not a tap: remove it or change tap_prefix)"
        }
        Some(libc::EBUSY) => " (a process still has it open: is an old VMM still running?)",
        _ => "",
    }
}

/// How long a tap that is still attached (`EBUSY`) is waited for: a VMM
/// that was just killed, or exited, lets go of it a moment after it is seen
/// dead (its leader is a zombie while its other threads still exit, and
/// they hold its descriptors).
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Attaches to the tap `name` (making it, not persistent, if it does not
/// exist) and returns the descriptor; waits up to [`BUSY_WAIT`] while
/// another process still holds it.
fn attach(name: &str) -> Result<std::fs::File, TapError> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match attach_once(name) {
            Err(e)
                if e.source.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn attach_once(name: &str) -> Result<std::fs::File, TapError> {
    let fail = |source: std::io::Error| TapError {
        tap: name.to_owned(),
        hint: hint(&source),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(fail(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)
        .map_err(fail)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the flags are 0x5002, within c_short"
        )]
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `req` is a
    // properly laid out, NUL-terminated `struct ifreq` that lives across the
    // call; TUNSETIFF reads it and writes the final name back into it.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(tun)
}

/// The tap `name`, attached, for the VMM (which gets the descriptor; it is
/// not allowed to open the device itself).
///
/// # Errors
/// [`TapError`] with a hint.
pub fn open(name: &str) -> Result<std::os::fd::OwnedFd, TapError> {
    attach(name).map(Into::into)
}

/// Makes the persistent tap `name` (at most 15 bytes), or reuses it if it
/// exists: idempotent.
///
/// # Errors
/// [`TapError`] with a hint.
pub fn create_persistent(name: &str) -> Result<(), TapError> {
    let fail = |source: std::io::Error| TapError {
        tap: name.to_owned(),
        hint: hint(&source),
        source,
    };
    let tun = attach(name)?;
    // SAFETY: same descriptor, now attached to the tap; TUNSETPERSIST takes
    // its argument by value.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    tracing::debug!(tap = name, "persistent tap ready");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn overlong_names_are_refused_before_any_ioctl() {
        let err = create_persistent("a-very-long-name").unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(libc::EINVAL));
        assert!(create_persistent("").is_err());
    }
}
