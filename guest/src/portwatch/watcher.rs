//! The watcher task: ring buffer in, port events out.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

use nestbox_ebpf::{EventKind, MapData, PortProbe, ProbeError, RawEvent, RawListener, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::event::{Origin, PortEvent, Process};
use super::owners;
use super::sockdiag::{SockDiag, SockDiagError};
use super::table::{PortTable, Socket};
use crate::cgroup::{self, CgroupError};
use crate::netns::{self, NetNsError};

/// Why the watcher stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The cgroup to watch is not usable.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The eBPF programs could not be loaded or attached.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The network namespace could not be entered.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// Reconciliation could not list the listening sockets.
    #[error("cannot list listening sockets for reconciliation: {0}")]
    SockDiag(#[from] SockDiagError),
    /// The namespace cookie could not be read.
    #[error("cannot read the network namespace cookie (SO_NETNS_COOKIE needs Linux >= 5.14): {0}")]
    NetnsCookie(#[source] io::Error),
    /// Waiting on the ring buffer failed.
    #[error("cannot wait for port events on the ring buffer: {0}")]
    Ring(#[source] io::Error),
    /// A helper task died.
    #[error("a blocking helper task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Watches one cgroup subtree's TCP listeners in one network namespace.
///
/// Created with [`Watcher::start`]; [`Watcher::next`] yields port events in
/// the order they happened per port. Dropping it detaches the programs.
pub struct Watcher {
    probe: PortProbe,
    ring: AsyncFd<RingBuf<MapData>>,
    /// Taken while a dump runs on the blocking pool.
    diag: Option<SockDiag>,
    table: PortTable,
    pending: VecDeque<PortEvent>,
    cgroup: PathBuf,
    netns_cookie: u64,
    dropped_seen: u64,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("cgroup", &self.cgroup)
            .field("netns_cookie", &self.netns_cookie)
            .field("ports", &self.table.ports())
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Attaches to the cgroup v2 directory `cgroup` (absolute, or relative to
    /// the cgroup2 mount) and watches the network namespace at `netns` (the
    /// caller's when `None`). Listeners that already exist are reported first,
    /// with [`Origin::Reconcile`].
    ///
    /// # Errors
    /// [`WatchError`] saying what is missing.
    pub async fn start(cgroup: &Path, netns: Option<&Path>) -> Result<Self, WatchError> {
        Self::start_with(cgroup, netns, None).await
    }

    /// [`Watcher::start`] with a kernel ring buffer of `ring_bytes` (a power
    /// of two, at least one page; default 1 MiB, about 12,000 events). A
    /// smaller ring loses events sooner under bursts; the watcher then
    /// reconciles, so nothing is missed, only reported later.
    ///
    /// # Errors
    /// [`WatchError`] saying what is missing.
    pub async fn start_with(
        cgroup: &Path,
        netns: Option<&Path>,
        ring_bytes: Option<u32>,
    ) -> Result<Self, WatchError> {
        let cgroup = cgroup::resolve(cgroup)?;
        let (diag, netns_cookie) = open_netns(netns).await?;
        // Attach before the first dump so that nothing falls between them.
        let (probe, ring) = PortProbe::attach_with(&cgroup, ring_bytes)?;
        // SAFETY: the ring buffer owns its fd, keeps it open and returns the
        // same fd until it is dropped, which happens only with the AsyncFd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| WatchError::Ring(e.into()))?;
        let dropped_seen = probe.dropped()?;
        let mut watcher = Self {
            probe,
            ring,
            diag: Some(diag),
            table: PortTable::default(),
            pending: VecDeque::new(),
            cgroup,
            netns_cookie,
            dropped_seen,
        };
        watcher.reconcile().await?;
        tracing::info!(cgroup = %watcher.cgroup.display(), netns_cookie, "port watcher attached");
        Ok(watcher)
    }

    /// The next port event. Cancel-safe: an event is removed from the queue
    /// only when it is returned.
    ///
    /// # Errors
    /// [`WatchError`] if the ring buffer or reconciliation fails.
    pub async fn next(&mut self) -> Result<PortEvent, WatchError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            let mut guard = self.ring.readable_mut().await.map_err(WatchError::Ring)?;
            let mut undecodable = false;
            let mut raws = Vec::new();
            while let Some(item) = guard.get_inner_mut().next() {
                match RawEvent::from_bytes(&item) {
                    Ok(raw) => raws.push(raw),
                    Err(err) => {
                        tracing::error!(%err, "undecodable port event; reconciling");
                        undecodable = true;
                    }
                }
            }
            guard.clear_ready();
            tracing::debug!(events = raws.len(), "port events read");
            let owners = self.owners_of(&raws).await;
            for raw in &raws {
                let owner = owners.get(&raw.socket_cookie).cloned();
                if let Some(event) = apply(&mut self.table, raw, self.netns_cookie, owner) {
                    self.pending.push_back(event);
                }
            }
            let dropped = self.probe.dropped()?;
            if dropped > self.dropped_seen || undecodable {
                tracing::warn!(
                    lost = dropped - self.dropped_seen,
                    "the ring buffer lost port events; reconciling with the kernel's socket table"
                );
                self.dropped_seen = dropped;
                self.reconcile().await?;
            }
        }
    }

    /// The owners of newly listening sockets, by cookie, when the kernel
    /// could not name them (sockops without task helpers): sock_diag gives
    /// each socket's inode, `/proc/PID/fd` of the cgroup's processes the
    /// process holding it. Empty when events already carry the task.
    async fn owners_of(&mut self, raws: &[RawEvent]) -> HashMap<u64, Process> {
        let cookies: BTreeSet<u64> = raws
            .iter()
            .filter(|r| r.tgid == 0 && r.netns_cookie == self.netns_cookie)
            .filter(|r| matches!(r.kind(), Ok(EventKind::Listen)))
            .map(|r| r.socket_cookie)
            .collect();
        if self.probe.reports_tasks() || cookies.is_empty() {
            return HashMap::new();
        }
        let Some(diag) = self.diag.take() else {
            return HashMap::new();
        };
        let cgroup = self.cgroup.clone();
        let Ok((diag, owners)) = tokio::task::spawn_blocking(move || {
            let owners = owners_by_cookie(&diag, &cgroup, &cookies);
            (diag, owners)
        })
        .await
        else {
            return HashMap::new();
        };
        self.diag = Some(diag);
        owners
    }

    /// The published ports and their listening addresses, as of the events
    /// returned so far plus those queued.
    #[must_use]
    pub fn ports(&self) -> Vec<(u16, Vec<std::net::IpAddr>)> {
        self.table.ports()
    }

    /// The cgroup directory being watched.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Brings the table in line with the sockets listening right now.
    /// Watches another network namespace (the container was rebuilt)
    /// with the programs already attached: what was known is forgotten
    /// without events, and the new namespace's listeners are reported as
    /// at start.
    ///
    /// # Errors
    /// [`WatchError`] if the namespace cannot be entered or dumped.
    pub async fn retarget(&mut self, netns: Option<&Path>) -> Result<(), WatchError> {
        let (diag, netns_cookie) = open_netns(netns).await?;
        self.diag = Some(diag);
        self.netns_cookie = netns_cookie;
        self.table = PortTable::default();
        self.pending.clear();
        self.reconcile().await
    }

    async fn reconcile(&mut self) -> Result<(), WatchError> {
        let diag = self
            .diag
            .take()
            .expect("sock_diag socket is returned after each dump");
        let cgroup = self.cgroup.clone();
        let (diag, truth) = tokio::task::spawn_blocking(move || {
            let truth = snapshot(&diag, &cgroup);
            (diag, truth)
        })
        .await?;
        self.diag = Some(diag);
        let changes = self.table.reconcile(truth?);
        // Sockets found here may predate the probe: without listen-time
        // state the kernel reports their close only if told their cookie.
        for socket in &changes.added {
            let listener = RawListener::new(socket.addr, socket.port, self.netns_cookie);
            self.probe.track(socket.cookie, listener)?;
        }
        for &cookie in &changes.removed {
            self.probe.untrack(cookie)?;
        }
        self.pending.extend(changes.events);
        Ok(())
    }
}

/// A `sock_diag` socket in `netns` (this process's when `None`) and the
/// namespace's cookie, made off the runtime's workers.
async fn open_netns(netns: Option<&Path>) -> Result<(SockDiag, u64), WatchError> {
    let netns = netns.map(Path::to_owned);
    tokio::task::spawn_blocking(move || {
        let diag = SockDiag::open_in(netns.as_deref())?;
        let cookie = netns::run_in(netns.as_deref(), netns::current_cookie)?
            .map_err(WatchError::NetnsCookie)?;
        Ok::<_, WatchError>((diag, cookie))
    })
    .await?
}

/// Applies one kernel record to the table.
fn apply(
    table: &mut PortTable,
    raw: &RawEvent,
    netns_cookie: u64,
    owner: Option<Process>,
) -> Option<PortEvent> {
    if raw.netns_cookie != netns_cookie {
        // A process of the cgroup in some other namespace: its ports are not
        // reachable where ingress dials, so they are not published.
        tracing::debug!(
            port = raw.port,
            netns = raw.netns_cookie,
            "listener in another netns"
        );
        return None;
    }
    let origin = Origin::Kernel {
        ktime_ns: raw.ktime_ns,
    };
    match raw.kind().ok()? {
        EventKind::Listen => {
            let process = (raw.tgid != 0)
                .then(|| Process {
                    pid: raw.tgid,
                    comm: raw.comm(),
                })
                .or(owner);
            table.listen(
                Socket {
                    cookie: raw.socket_cookie,
                    port: raw.port,
                    addr: raw.ip().ok()?,
                    process,
                },
                origin,
            )
        }
        EventKind::Close => table.close(raw.socket_cookie, origin),
    }
}

/// The processes holding the listening sockets `cookies` (those that are
/// still open), found through their inodes.
fn owners_by_cookie(
    diag: &SockDiag,
    cgroup: &Path,
    cookies: &BTreeSet<u64>,
) -> HashMap<u64, Process> {
    let Ok(listeners) = diag.listeners() else {
        return HashMap::new();
    };
    let inodes: HashMap<u32, u64> = listeners
        .iter()
        .filter(|l| cookies.contains(&l.cookie))
        .map(|l| (l.inode, l.cookie))
        .collect();
    let Ok(pids) = cgroup::subtree_pids(cgroup) else {
        return HashMap::new();
    };
    owners::find(&pids, &inodes.keys().copied().collect())
        .into_iter()
        .filter_map(|(inode, process)| Some((*inodes.get(&inode)?, process)))
        .collect()
}

/// The listeners of the watched cgroup subtree, now.
fn snapshot(diag: &SockDiag, cgroup: &Path) -> Result<Vec<Socket>, WatchError> {
    let ids = cgroup::subtree_ids(cgroup)?;
    let listeners: Vec<_> = diag
        .listeners()?
        .into_iter()
        // Without INET_DIAG_CGROUP_ID (Linux < 5.7) every listener of the
        // namespace counts: the inner container owns its namespace.
        .filter(|l| l.cgroup_id.is_none_or(|id| ids.contains(&id)))
        .collect();
    let inodes: BTreeSet<u32> = listeners.iter().map(|l| l.inode).collect();
    let owners = if inodes.is_empty() {
        std::collections::HashMap::new()
    } else {
        owners::find(&cgroup::subtree_pids(cgroup)?, &inodes)
    };
    Ok(listeners
        .into_iter()
        .map(|l| Socket {
            cookie: l.cookie,
            port: l.port,
            addr: l.addr,
            process: owners.get(&l.inode).cloned(),
        })
        .collect())
}
