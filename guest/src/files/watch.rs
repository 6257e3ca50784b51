//! `watch`: inotify events of a directory (and, recursively, of the
//! directories below it, new ones included), as the API's frames. The
//! watches are added through `/proc/self/fd/N` of a directory opened with
//! the container-rooted resolution, so only the container's directories
//! can be watched.
#![deny(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nestbox_api::fs::WatchEvent;
use nix::fcntl::OFlag;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::mpsc;

use super::FsError;
use super::resolve::open;

use crate::publish::now_ms;

struct Watcher<'a> {
    root: &'a OwnedFd,
    inotify: Inotify,
    paths: HashMap<WatchDescriptor, String>,
    recursive: bool,
}

const MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ONLYDIR);

impl Watcher<'_> {
    fn add(&mut self, path: &str) -> Result<(), FsError> {
        let fd = open(self.root, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
        let wd = self
            .inotify
            .add_watch(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(), MASK)
            .map_err(|e| FsError::os(path, e))?;
        self.paths.insert(wd, path.to_owned());
        if self.recursive {
            let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| FsError::os(path, e))?;
            let subdirs: Vec<String> = dir
                .iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type() == Some(nix::dir::Type::Directory))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "." && n != "..")
                .collect();
            for n in subdirs {
                let sub = if path == "/" {
                    format!("/{n}")
                } else {
                    format!("{path}/{n}")
                };
                // A directory gone meanwhile is no error.
                let _ = self.add(&sub);
            }
        }
        Ok(())
    }
}

/// Watches `path` until `tx` is closed.
///
/// # Errors
/// [`FsError`] when the first watch cannot be made.
pub fn watch(
    root: &OwnedFd,
    path: &str,
    recursive: bool,
    tx: &mpsc::Sender<WatchEvent>,
) -> Result<(), FsError> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| FsError::os(path, e))?;
    let mut w = Watcher {
        root,
        inotify,
        paths: HashMap::new(),
        recursive,
    };
    w.add(path)?;
    let mut moved_from: HashMap<u32, String> = HashMap::new();
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        let mut fds = [nix::poll::PollFd::new(
            w.inotify.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16));
        let Ok(events) = w.inotify.read_events() else {
            continue;
        };
        for e in events {
            if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                let _ = tx.blocking_send(WatchEvent::Overflow {
                    message: "the kernel's event queue overflowed: events were lost; list the directory again".into(),
                });
                continue;
            }
            let Some(dir) = w.paths.get(&e.wd).cloned() else {
                continue;
            };
            let Some(name) = e.name.as_ref().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let path = if dir == "/" {
                format!("/{name}")
            } else {
                format!("{dir}/{name}")
            };
            let is_dir = e.mask.contains(AddWatchFlags::IN_ISDIR);
            let (event, from) = if e.mask.contains(AddWatchFlags::IN_CREATE) {
                if is_dir && w.recursive {
                    let _ = w.add(&path);
                }
                ("created", None)
            } else if e.mask.contains(AddWatchFlags::IN_MODIFY) {
                ("modified", None)
            } else if e.mask.contains(AddWatchFlags::IN_DELETE) {
                ("deleted", None)
            } else if e.mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                moved_from.insert(e.cookie, path);
                continue;
            } else if e.mask.contains(AddWatchFlags::IN_MOVED_TO) {
                match moved_from.remove(&e.cookie) {
                    Some(old) => ("renamed", Some(old)),
                    None => ("created", None),
                }
            } else {
                continue;
            };
            let frame = WatchEvent::Event {
                event: event.into(),
                path,
                from,
                is_dir,
                timestamp: now_ms(),
            };
            if tx.blocking_send(frame).is_err() {
                return Ok(());
            }
        }
        // A move out of the watched tree: its other half never comes.
        for (_, old) in moved_from.drain() {
            let frame = WatchEvent::Event {
                event: "deleted".into(),
                path: old,
                from: None,
                is_dir: false,
                timestamp: now_ms(),
            };
            if tx.blocking_send(frame).is_err() {
                return Ok(());
            }
        }
    }
}
