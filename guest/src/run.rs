//! `nestbox-guest run`: the platform of one VM, from its configuration —
//! the ingress, the inner container, the port watcher that publishes its
//! ports, the user services and their logs, and the API — each platform
//! service supervised, until SIGTERM stops everything in order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nestbox_ingress::routes::{Backend, RouteTable};
use nestbox_ingress::serve::Handles;
use tokio::sync::{Notify, mpsc, watch};

use crate::api::{self, Api, ContainerState, Control, TokenHash};
use crate::config::GuestConfig;
use crate::container::egress::{self, Egress};
use crate::container::{Container, ContainerSpec};
use crate::disk::{DiskReport, DiskState};
use crate::logs::{LogLimits, Logs};
use crate::portwatch::{WatchError, Watcher};
use crate::publish::Publisher;
use crate::resources::CgroupLayout;
use crate::services::{Launcher, Manager, ServiceSpec};
use crate::supervisor::supervise;

/// Errors starting the guest.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A directory on the data disk could not be made.
    #[error("cannot create {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The API could not listen.
    #[error("the API cannot listen on {what}: {source}")]
    ApiListen {
        /// The address or socket path.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot handle a signal: {0}")]
    Signal(#[source] std::io::Error),
    /// Logs could not be opened.
    #[error(transparent)]
    Logs(#[from] crate::logs::LogError),
    /// Service definitions could not be loaded.
    #[error(transparent)]
    Services(#[from] crate::services::ServiceError),
    /// The inner container could not be built.
    #[error("the inner container could not be built: {0}")]
    Container(String),
    /// The cgroup setup failed.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The container's seccomp filter does not compile.
    #[error(transparent)]
    Seccomp(#[from] crate::container::seccomp::SeccompError),
}

/// The running inner container, replaced on bounce.
#[derive(Clone, Default)]
struct Current(Arc<Mutex<Option<Arc<Container>>>>);

impl Current {
    fn get(&self) -> Option<Arc<Container>> {
        self.0.lock().expect("container lock").clone()
    }

    fn set(&self, c: Option<Arc<Container>>) -> Option<Arc<Container>> {
        std::mem::replace(&mut *self.0.lock().expect("container lock"), c)
    }
}

/// Starts services inside whichever container is current.
struct InContainer(Current);

impl Launcher for InContainer {
    fn spawn(&self, spec: &ServiceSpec) -> std::io::Result<crate::spawn::Process> {
        let container = self.0.get().ok_or_else(|| {
            std::io::Error::other("the inner container is not running (it is being rebuilt)")
        })?;
        container.spawn(
            crate::services::command(spec),
            &format!("svc-{}", spec.name),
        )
    }
}

fn data_dir(path: &Path) -> Result<PathBuf, RunError> {
    std::fs::create_dir_all(path).map_err(|source| RunError::DataDir {
        path: path.to_owned(),
        source,
    })?;
    Ok(path.to_owned())
}

/// The platform's and the container's cgroups, below the guest's own,
/// with the container's limits.
async fn cgroups(limits: &crate::resources::Limits) -> Result<CgroupLayout, RunError> {
    let root = crate::cgroup::own_cgroup()?;
    let limits = limits.clone();
    tokio::task::spawn_blocking(move || crate::resources::set_up(&root, &limits))
        .await
        .map_err(|e| RunError::Container(e.to_string()))?
        .map_err(RunError::from)
}

async fn start_container(spec: ContainerSpec) -> Result<Arc<Container>, RunError> {
    tokio::task::spawn_blocking(move || Container::start(spec))
        .await
        .map_err(|e| RunError::Container(e.to_string()))?
        .map(Arc::new)
        .map_err(|e| RunError::Container(e.to_string()))
}

async fn stop_container(container: Option<Arc<Container>>) {
    let Some(container) = container else { return };
    let stopped = tokio::task::spawn_blocking(move || match Arc::try_unwrap(container) {
        Ok(c) => c.stop().map_err(|e| e.to_string()),
        Err(_) => Err("the container is still in use".to_owned()),
    })
    .await;
    match stopped {
        Ok(Ok(())) => {}
        Ok(Err(why)) => tracing::warn!(%why, "the inner container did not stop cleanly"),
        Err(e) => tracing::warn!(%e, "stopping the inner container failed"),
    }
}

/// A listener on `addr` even while no interface has that address yet.
fn bind_freebind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_freebind_v4(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Follows the container's network namespace: the programs stay attached
/// to the inner cgroup; a rebuilt container only retargets the watcher.
async fn watch_ports(
    cgroup: PathBuf,
    mut netns: watch::Receiver<Option<PathBuf>>,
    publisher: Publisher,
    fault: Arc<Notify>,
) -> Result<(), WatchError> {
    let mut watcher: Option<Watcher> = None;
    loop {
        let current = netns.borrow_and_update().clone();
        if let Some(path) = current {
            let w = match watcher.as_mut() {
                Some(w) => {
                    let t0 = std::time::Instant::now();
                    w.retarget(Some(&path)).await?;
                    tracing::debug!(
                        ms = t0.elapsed().as_secs_f64() * 1e3,
                        ports = w.ports().len(),
                        "port watcher retargeted"
                    );
                    w
                }
                None => watcher.insert(
                    Watcher::start_with(&cgroup, Some(&path), Some(PORT_EVENT_RING_BYTES)).await?,
                ),
            };
            let open: Vec<u16> = w.ports().iter().map(|(port, _)| *port).collect();
            publisher.keep_only(&open);
        }
        loop {
            let next = async {
                match watcher.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = next => publisher.apply(&event?),
                () = fault.notified() => panic!("injected fault (SIGUSR2 with faults = true)"),
                changed = netns.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    break;
                }
            }
        }
    }
}

/// Everything the control loop works with.
struct Platform {
    spec: ContainerSpec,
    egress: Egress,
    /// Whether forwarding and the masquerade rule are in place.
    egress_rules: std::sync::atomic::AtomicBool,
    /// The root side of the current container's veth pair.
    egress_link: std::sync::Mutex<Option<&'static str>>,
    current: Current,
    publisher: Publisher,
    services: Manager,
    netns: watch::Sender<Option<PathBuf>>,
    state: watch::Sender<ContainerState>,
    graveyard: Graveyard,
    /// Why the user's disk is not mounted (the container then does not
    /// start: its layer must never land on the platform's disk).
    user_disk_error: Option<String>,
}

/// Old containers' namespaces and veths, freed when bounces pause.
///
/// Destroying a network namespace and deleting a veth hold the kernel's
/// rtnl lock through RCU grace periods and burn tens of milliseconds of CPU
/// here: done right after a bounce they slow the new container on its way
/// to serving (and the next bounce). So they wait until no bounce has come
/// for [`Graveyard::QUIET`], then go together (the kernel tears dropped
/// namespaces down in one batch); at most [`Graveyard::MAX`] wait.
#[derive(Clone, Default)]
struct Graveyard {
    buried: Arc<std::sync::Mutex<Vec<Remains>>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Graveyard {
    const QUIET: std::time::Duration = std::time::Duration::from_secs(2);
    const MAX: usize = 8;

    fn bury(&self, remains: Remains) {
        use std::sync::atomic::Ordering;
        let overflow = {
            let mut buried = self.buried.lock().expect("not poisoned");
            buried.push(remains);
            (buried.len() > Self::MAX).then(|| buried.remove(0))
        };
        if let Some(oldest) = overflow {
            free_off_runtime(vec![oldest]);
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Self::QUIET).await;
            if this.generation.load(Ordering::SeqCst) == generation {
                free_off_runtime(this.take());
            }
        });
    }

    fn take(&self) -> Vec<Remains> {
        std::mem::take(&mut *self.buried.lock().expect("not poisoned"))
    }
}

/// Frees `remains`. Their namespaces go at once, all together (closing the
/// descriptors is cheap; the kernel tears the namespaces down in one batch
/// on its own worker). Their veths are deleted on a thread of their own:
/// deleting a veth runs inside the netlink `sendmsg` and holds it for the
/// kernel's RCU grace periods (tens of milliseconds), which on the guest's
/// single runtime thread would stall ingress and the port watcher with it.
/// Returns that thread, if one was needed.
fn free_off_runtime(remains: Vec<Remains>) -> Option<std::thread::JoinHandle<()>> {
    let (namespaces, links): (Vec<_>, Vec<_>) =
        remains.into_iter().map(|r| (r.netns, r.link)).unzip();
    drop(namespaces);
    let links: Vec<_> = links.into_iter().flatten().collect();
    if links.is_empty() {
        return None;
    }
    let stay = |err: &dyn std::fmt::Display| {
        tracing::warn!(%err, "old containers' veths stay until their namespaces go");
    };
    let freed = std::thread::Builder::new()
        .name("nestbox-graveyard".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(runtime) => runtime.block_on(async {
                    for link in links {
                        egress::remove_link(link).await;
                    }
                }),
                Err(err) => stay(&err),
            }
        });
    freed.inspect_err(|err| stay(err)).ok()
}

/// The port watcher's kernel ring buffer in a VM: 128 KiB, about 1,500
/// events between two reads (the watcher reads as they come; a burst beyond
/// that is recovered by reconciliation). The ring's pages are mapped twice
/// and count in the guest's resident memory, so the standalone default of
/// 1 MiB would cost 2 MiB there.
const PORT_EVENT_RING_BYTES: u32 = 128 * 1024;

/// What a stopped container leaves to free once its successor serves.
struct Remains {
    /// Its network namespace, held open so the kernel does not tear it
    /// down yet.
    netns: Option<std::fs::File>,
    /// The root side of its veth pair.
    link: Option<&'static str>,
}

/// Milliseconds, for log fields.
fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Platform {
    async fn up(&self) -> Result<(), RunError> {
        if let Some(why) = &self.user_disk_error {
            let err = RunError::Container(format!("the user's disk is not mounted: {why}"));
            self.state
                .send_replace(ContainerState::Failed(err.to_string()));
            return Err(err);
        }
        self.state.send_replace(ContainerState::Starting);
        let t0 = std::time::Instant::now();
        let container = match start_container(self.spec.clone()).await {
            Ok(c) => c,
            Err(err) => {
                self.state
                    .send_replace(ContainerState::Failed(err.to_string()));
                return Err(err);
            }
        };
        let netns = container.netns_path();
        let t_container = t0.elapsed();
        if self.egress.enabled {
            let first = !self
                .egress_rules
                .swap(true, std::sync::atomic::Ordering::SeqCst);
            match egress::set_up(&self.egress, container.pid1(), &netns, first).await {
                Ok(link) => *self.egress_link.lock().expect("not poisoned") = Some(link),
                Err(err) => {
                    self.egress_rules
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    tracing::error!(%err, "the inner container has no way out");
                }
            }
        }
        self.current.set(Some(container));
        self.publisher.set_netns(Some(netns.clone()));
        self.netns.send_replace(Some(netns));
        let t_egress = t0.elapsed();
        self.services.up().await;
        self.state.send_replace(ContainerState::Running);
        tracing::info!(
            container_ms = ms(t_container),
            egress_ms = ms(t_egress.saturating_sub(t_container)),
            services_ms = ms(t0.elapsed().saturating_sub(t_egress)),
            "the inner container is up"
        );
        Ok(())
    }

    /// Stops the services and the container. Returns what is left of it
    /// to free later: its network namespace (held open) and the root side of
    /// its veth pair.
    async fn down(&self) -> Remains {
        let t0 = std::time::Instant::now();
        self.services.down().await;
        let t_services = t0.elapsed();
        self.publisher.set_netns(None);
        let netns = self
            .netns
            .send_replace(None)
            .and_then(|path| std::fs::File::open(path).ok());
        stop_container(self.current.set(None)).await;
        let link = self.egress_link.lock().expect("not poisoned").take();
        tracing::info!(
            services_ms = ms(t_services),
            container_ms = ms(t0.elapsed().saturating_sub(t_services)),
            "the inner container is down"
        );
        Remains { netns, link }
    }

    async fn bounce(&self) -> Result<(), String> {
        self.state.send_replace(ContainerState::Bouncing);
        let remains = self.down().await;
        let mut up = self.up().await;
        // A container that does not come back is retried a few times (each
        // failure is logged with its cause) before the bounce reports it.
        for attempt in 1..=3u32 {
            let Err(err) = &up else { break };
            tracing::error!(%err, attempt, "the inner container did not come back; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(200) * attempt).await;
            up = self.up().await;
        }
        self.graveyard.bury(remains);
        up.map_err(|e| {
            tracing::error!(err = %e, "the inner container did not come back");
            e.to_string()
        })
    }
}

/// Supervises the port watcher; with `faults`, SIGUSR2 makes it panic.
fn start_portwatch(
    faults: bool,
    cgroup: PathBuf,
    netns_rx: watch::Receiver<Option<PathBuf>>,
    publisher: Publisher,
) -> Result<(), RunError> {
    let fault = Arc::new(Notify::new());
    if faults {
        let fault = fault.clone();
        let mut usr2 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
                .map_err(RunError::Signal)?;
        tokio::spawn(async move {
            while usr2.recv().await.is_some() {
                tracing::warn!("SIGUSR2: injecting a panic into the port watcher");
                fault.notify_one();
            }
        });
    }
    supervise("portwatch", move || {
        watch_ports(
            cgroup.clone(),
            netns_rx.clone(),
            publisher.clone(),
            fault.clone(),
        )
    });
    Ok(())
}

/// Serves the API on its loopback port, on the container's gateway
/// address (with egress) and on the Unix socket mounted into the container.
fn serve_api(config: &GuestConfig, api: &Api, api_dir: &Path) -> Result<(), RunError> {
    let tcp = std::net::TcpListener::bind(config.api.listen)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .map_err(|source| RunError::ApiListen {
            what: config.api.listen.to_string(),
            source,
        })?;
    let socket = api_dir.join("api.sock");
    let unix = api::bind_unix(&socket).map_err(|source| RunError::ApiListen {
        what: socket.display().to_string(),
        source,
    })?;
    tokio::spawn(api.clone().serve_tcp(tcp));
    if config.egress.enabled {
        // The container reaches the API over TCP at its gateway (the token
        // is still needed); bound before the address exists.
        let addr = std::net::SocketAddr::from((config.egress.root_addr, config.api.listen.port()));
        let gateway = bind_freebind(addr).map_err(|source| RunError::ApiListen {
            what: addr.to_string(),
            source,
        })?;
        tokio::spawn(api.clone().serve_tcp(gateway));
    }
    tokio::spawn(api.clone().serve_unix(unix));

    Ok(())
}

/// As PID 1: the platform's and the user's disks and the network
/// (failures are logged; the API still comes up to say what is wrong).
/// Returns what became of each disk.
async fn init_vm(config: &GuestConfig) -> Vec<DiskReport> {
    let mount = |role, device: PathBuf, dir: PathBuf, args: &'static [&'static str]| async move {
        let shown = device.display().to_string();
        tokio::task::spawn_blocking(move || crate::disk::bring_up(role, &device, &dir, args))
            .await
            .unwrap_or_else(|e| DiskReport {
                role,
                device: shown,
                mount: String::new(),
                state: DiskState::Refused,
                detail: Some(format!("the mount task failed: {e}")),
            })
    };
    let mut disks = Vec::new();
    if let Some(device) = config.data_device.clone() {
        let report = mount("platform", device, config.data_dir.clone(), &["-F"]).await;
        if report.state == DiskState::Refused {
            tracing::error!(
                "the platform's disk is not mounted: definitions, logs and certificates are kept \
                 in memory until it is fixed"
            );
        }
        disks.push(report);
    }
    if let Some(device) = config.user_device.clone() {
        // No blocks reserved for the VM's root: nobody but the container
        // writes here.
        let report = mount(
            "user",
            device,
            config.user_dir(),
            &["-F", "-m", "0", "-L", "nestbox-user"],
        )
        .await;
        if report.state == DiskState::Refused {
            tracing::error!("the user's disk is not mounted; the inner container stays down");
        }
        disks.push(report);
    }
    if let Some(net) = &config.network
        && let Err(err) = crate::init::configure_network(net).await
    {
        tracing::error!(%err, "the network is not configured");
    }
    disks
}

/// Why the `role` disk was refused, if it was.
fn refused(role: &str, disks: &[DiskReport]) -> Option<String> {
    disks
        .iter()
        .find(|d| d.role == role && d.state == DiskState::Refused)
        .map(|d| d.detail.clone().unwrap_or_default())
}

/// As the VM's platform: the kernel's OOM killer never picks the platform
/// (the container has its own limit and its own OOM kills). The processes
/// started in the container reset this for themselves.
fn shield_from_oom() {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!(%e, "the platform is not shielded from the OOM killer");
    }
}

/// What comes before anything serves: the open-file limit, the cgroups
/// (first, so that every process the platform starts, mkfs and nft
/// included, counts in its own), and as PID 1 the OOM shield, the disks
/// and the network. Returns the cgroups and what became of each disk.
async fn prepare(
    config: &GuestConfig,
    as_init: bool,
) -> Result<(CgroupLayout, Vec<DiskReport>), RunError> {
    crate::resources::raise_nofile();
    let layout = cgroups(&config.limits).await?;
    let disks = if as_init {
        shield_from_oom();
        init_vm(config).await
    } else {
        Vec::new()
    };
    Ok((layout, disks))
}

/// Runs the guest until `shutdown` turns true.
///
/// # Errors
/// [`RunError`] if the platform cannot start.
pub async fn run(
    config: GuestConfig,
    mut shutdown: watch::Receiver<bool>,
    as_init: bool,
) -> Result<(), RunError> {
    let (layout, disks) = prepare(&config, as_init).await?;
    let user_disk_error = refused("user", &disks);
    let isolation = crate::container::Isolation::new(&config.container)?;
    let data = data_dir(&config.data_dir)?;
    let names = config.names();
    let handles = Handles::detached(RouteTable::new());
    let publisher = Publisher::new(handles.clone(), names, config.primary_port);
    handles.publish(
        &config.api_host(),
        Backend {
            addr: config.api.listen,
            netns: None,
        },
    );
    {
        let (ingress, handles, stop) = (config.ingress.clone(), handles.clone(), shutdown.clone());
        supervise("ingress", move || {
            nestbox_ingress::serve::serve_with(
                ingress.clone(),
                handles.clone(),
                stop.clone(),
                |_| {},
            )
        });
    }

    let logs = Logs::open(&data_dir(&data.join("logs"))?, LogLimits::default())?;
    let current = Current::default();
    let services = Manager::open(&data, logs.clone(), Arc::new(InContainer(current.clone())))?;
    if let Some((_, port)) = services.primary() {
        publisher.set_primary(port);
    }
    let cgroup = layout.inner.clone();
    let api_dir = data_dir(&data.join("api"))?;
    let spec = ContainerSpec {
        hostname: config.name.clone(),
        base_rootfs: config.base_rootfs.clone(),
        state_dir: config.user_dir(),
        cgroup: cgroup.clone(),
        api_dir: Some(api_dir.clone()),
        shm_bytes: config.container.shm_mib << 20,
        isolation,
    };
    let (netns_tx, netns_rx) = watch::channel(None);
    start_portwatch(config.faults, cgroup.clone(), netns_rx, publisher.clone())?;
    let (state_tx, state_rx) = watch::channel(ContainerState::Starting);
    let (control_tx, mut control_rx) = mpsc::channel(4);
    let api = Api::new(api::Parts {
        token: TokenHash::from_hex(&config.api.token_sha256).expect("checked by the configuration"),
        publisher: publisher.clone(),
        services: services.clone(),
        logs,
        control: control_tx,
        container: state_rx,
        limits: layout.applied.clone(),
        user_dir: config.user_dir(),
        inner_cgroup: layout.inner.clone(),
        disks,
    });
    serve_api(&config, &api, &api_dir)?;

    let platform = Platform {
        spec,
        egress: config.egress.clone(),
        egress_rules: std::sync::atomic::AtomicBool::new(false),
        egress_link: std::sync::Mutex::new(None),
        graveyard: Graveyard::default(),
        current,
        publisher,
        services,
        netns: netns_tx,
        state: state_tx,
        user_disk_error,
    };
    if let Err(err) = platform.up().await {
        tracing::error!(%err, "the inner container could not start; the API stays up (bounce to retry)");
    }
    loop {
        tokio::select! {
            request = control_rx.recv() => match request {
                Some(Control::Bounce(reply)) => {
                    tracing::info!("bouncing the inner container");
                    let _ = reply.send(platform.bounce().await);
                }
                None => break,
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    tracing::info!("stopping: services, then the inner container");
    let mut remains = platform.graveyard.take();
    remains.push(platform.down().await);
    if let Some(freeing) = free_off_runtime(remains) {
        let _ = tokio::task::spawn_blocking(move || freeing.join()).await;
    }
    if config.egress.enabled {
        egress::tear_down().await;
    }
    Ok(())
}
