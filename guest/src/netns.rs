//! Doing work inside a network namespace: the platform's one mechanism
//! ([`nestbox_ingress::netns`]: a thread that entered the namespace), and
//! the namespace's cookie as BPF sees it. Sockets keep the namespace they
//! were created in: a netlink socket or listener made on that thread can
//! then be used from anywhere.

use std::io;
use std::os::fd::AsRawFd;

/// `SO_NETNS_COOKIE` (Linux 5.14); not yet in the libc crate.
const SO_NETNS_COOKIE: libc::c_int = 71;

pub use nestbox_ingress::netns::{NetNsError, run_in};

/// The cookie of the calling thread's network namespace, as BPF's
/// `bpf_get_netns_cookie()` reports it.
///
/// # Errors
/// The socket or getsockopt error (Linux < 5.14 lacks `SO_NETNS_COOKIE`).
pub fn current_cookie() -> io::Result<u64> {
    let sock =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    let mut cookie: u64 = 0;
    // size_of::<u64>() is 8, which socklen_t holds.
    let mut len: libc::socklen_t = 8;
    // SAFETY: the fd is a live socket owned by `sock`; `cookie` and `len`
    // point to writable memory of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_closure_in_current_namespace() {
        let here = current_cookie().unwrap();
        let there = run_in(None, current_cookie).unwrap().unwrap();
        assert_eq!(here, there);
    }
}
