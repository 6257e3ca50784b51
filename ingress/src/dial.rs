//! Connecting to backends inside a network namespace.
//!
//! A socket belongs to the namespace of the thread that called `socket()`.
//! Each namespace gets one [`NetnsThread`] that has done `setns` once and
//! only creates sockets on request; the (non-blocking) socket is handed back
//! and connected by tokio as usual. No tokio worker ever changes namespace.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::NetnsThread;

pub use crate::netns::NetNsError as DialError;

/// Makes sockets inside one network namespace, on a thread that entered
/// it.
#[derive(Debug)]
pub struct NetnsDialer {
    thread: NetnsThread,
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

impl NetnsDialer {
    /// Starts the socket thread for the namespace at `path` (blocking).
    ///
    /// # Errors
    /// [`DialError`] if the namespace cannot be entered.
    pub fn open(path: &Path) -> Result<Self, DialError> {
        Ok(Self {
            thread: NetnsThread::enter("ingress-netns", Some(path))?,
        })
    }

    async fn socket(&self, addr: SocketAddr) -> io::Result<Socket> {
        let gone = || io::Error::other("the namespace socket thread is gone");
        self.thread
            .submit(move || new_socket(addr))
            .map_err(|_| gone())?
            .await
            .map_err(|_| gone())?
    }
}

/// Connects to `addr`, inside `netns` when given, within `timeout`.
///
/// # Errors
/// The connect error (`ConnectionRefused` when nothing listens), or
/// `TimedOut`.
pub async fn connect(
    netns: Option<&NetnsDialer>,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match netns {
        Some(dialer) => dialer.socket(addr).await?,
        None => new_socket(addr)?,
    };
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })?
}

/// The identity of the namespace a path refers to now: `/proc/PID/ns/net`
/// names another namespace once PID is reused.
fn namespace_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

#[derive(Debug)]
struct Entry {
    dialer: Arc<NetnsDialer>,
    namespace: (u64, u64),
}

/// One dialer per namespace, made on first use. A dialer is kept while its
/// path still names its namespace: making a new one drops those whose path
/// is gone or names another namespace (a rebuilt inner container has a new
/// namespace at a new path every time), so their threads end — and with
/// them the last reference that would keep a dead namespace alive.
#[derive(Debug, Default)]
pub struct Dialers {
    by_path: Mutex<HashMap<PathBuf, Entry>>,
}

impl Dialers {
    /// The dialer for `path` if one was made already for the namespace it
    /// names now (one `stat`; never blocks on a thread).
    #[must_use]
    pub fn cached(&self, path: &Path) -> Option<Arc<NetnsDialer>> {
        let namespace = namespace_id(path).ok()?;
        let map = self.by_path.lock();
        let entry = map.get(path)?;
        (entry.namespace == namespace).then(|| entry.dialer.clone())
    }

    /// The dialer for `path`, made if needed. Making one starts a thread and
    /// waits for it to enter the namespace: call from a blocking context.
    ///
    /// # Errors
    /// [`DialError`] if the namespace cannot be entered.
    pub fn get(&self, path: &Path) -> Result<Arc<NetnsDialer>, DialError> {
        let open_err = |source| DialError::Open {
            path: path.to_owned(),
            source,
        };
        let namespace = namespace_id(path).map_err(open_err)?;
        let mut map = self.by_path.lock();
        if let Some(entry) = map.get(path)
            && entry.namespace == namespace
        {
            return Ok(entry.dialer.clone());
        }
        map.retain(|p, e| namespace_id(p).is_ok_and(|id| id == e.namespace));
        let dialer = Arc::new(NetnsDialer::open(path)?);
        map.insert(
            path.to_owned(),
            Entry {
                dialer: dialer.clone(),
                namespace,
            },
        );
        Ok(dialer)
    }

    /// Keeps only the dialers for the namespace paths `keep` accepts (the
    /// others' threads end as their last user lets go).
    pub fn retain(&self, keep: impl Fn(&Path) -> bool) {
        let gone: Vec<Entry> = {
            let mut map = self.by_path.lock();
            let paths: Vec<PathBuf> = map.keys().filter(|p| !keep(p)).cloned().collect();
            paths.iter().filter_map(|p| map.remove(p)).collect()
        };
        drop(gone);
    }

    /// How many dialers (and so socket threads) are kept.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_path.lock().len()
    }

    /// Whether none is kept.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
