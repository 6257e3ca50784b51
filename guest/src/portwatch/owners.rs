//! Which process owns a socket, found through `/proc/PID/fd`.
//!
//! sock_diag reports a socket's inode but not its process. For the few
//! sockets found by reconciliation, the processes of the watched cgroup
//! subtree are searched for an fd that links to `socket:[INODE]`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::event::Process;

/// Maps each wanted socket inode to a process of `pids` holding it. Processes
/// that exit during the search are skipped.
#[must_use]
pub fn find(pids: &[u32], wanted: &BTreeSet<u32>) -> HashMap<u32, Process> {
    let mut found = HashMap::new();
    for &pid in pids {
        if found.len() == wanted.len() {
            break;
        }
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(&target.to_string_lossy()) else {
                continue;
            };
            if wanted.contains(&inode) && !found.contains_key(&inode) {
                let comm = std::fs::read_to_string(proc_dir.join("comm"))
                    .map(|c| c.trim_end().to_owned())
                    .unwrap_or_default();
                found.insert(inode, Process { pid, comm });
            }
        }
    }
    found
}

fn socket_inode(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[1]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn finds_our_own_socket() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode = socket_inode(&link.to_string_lossy()).unwrap();
        let me = std::process::id();
        let found = find(&[me], &BTreeSet::from([inode]));
        assert_eq!(found[&inode].pid, me);
        // The inode in /proc matches the socket's fstat inode.
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        assert_eq!(u64::from(inode), meta.ino());
    }
}
