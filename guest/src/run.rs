//! `nestbox-guest run`: the platform of one VM, from its configuration —
//! the ingress, the inner container, the port watcher that publishes its
//! ports, the user services and their logs, and the API — each platform
//! service supervised, until SIGTERM stops everything in order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nestbox_ingress::routes::{Backend, RouteTable};
use nestbox_ingress::serve::Handles;
use tokio::sync::{mpsc, watch};

use crate::api::{self, Api, ContainerState, Control, TokenHash};
use crate::bounce::{Current, InContainer, Platform};
use crate::config::GuestConfig;
use crate::container::ContainerSpec;
use crate::container::egress;
use crate::disk::{DiskReport, DiskState};
use crate::graveyard::{Graveyard, free_off_runtime};
use crate::logs::Logs;
use crate::portwatch::{WatchError, Watcher};
use crate::publish::Publisher;
use crate::resources::CgroupLayout;
use crate::services::Manager;
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
                () = crate::faults::armed("portwatch") => panic!("injected fault at portwatch"),
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

/// The port watcher's kernel ring buffer in a VM: 128 KiB, about 1,500
/// events between two reads (the watcher reads as they come; a burst beyond
/// that is recovered by reconciliation). The ring's pages are mapped twice
/// and count in the guest's resident memory, so the standalone default of
/// 1 MiB would cost 2 MiB there.
const PORT_EVENT_RING_BYTES: u32 = 128 * 1024;

/// The primary URL goes to the port of the service that has an
/// `http_port`, from its creation to its deletion, and otherwise to the
/// configured `default` port.
fn follow_primary(services: &Manager, publisher: &Publisher, default: u16) {
    let mut changes = services.primary_changes();
    publisher.set_primary(changes.borrow_and_update().unwrap_or(default));
    let publisher = publisher.clone();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let port = changes.borrow_and_update().unwrap_or(default);
            tracing::info!(port, "the primary URL moves");
            publisher.set_primary(port);
        }
    });
}

/// Supervises the port watcher (a test build's `portwatch` fault makes it
/// panic).
fn start_portwatch(
    cgroup: PathBuf,
    netns_rx: watch::Receiver<Option<PathBuf>>,
    publisher: Publisher,
) {
    supervise("portwatch", move || {
        watch_ports(cgroup.clone(), netns_rx.clone(), publisher.clone())
    });
}

/// Binds the API's listeners: its loopback port, the container's gateway
/// address (with egress) and the Unix socket mounted into the container.
fn bind_api(
    listen: std::net::SocketAddr,
    gateway: Option<std::net::SocketAddr>,
    api_dir: &Path,
) -> Result<api::Listeners, RunError> {
    use api::Listener;
    let tcp = std::net::TcpListener::bind(listen)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        })
        .map_err(|source| RunError::ApiListen {
            what: listen.to_string(),
            source,
        })?;
    let mut listeners = vec![Listener::Tcp(Arc::new(tcp))];
    if let Some(addr) = gateway {
        // The container reaches the API over TCP at its gateway (the token
        // is still needed); bound before the address exists.
        let gateway = bind_freebind(addr).map_err(|source| RunError::ApiListen {
            what: addr.to_string(),
            source,
        })?;
        listeners.push(Listener::Tcp(Arc::new(gateway)));
    }
    let socket = api_dir.join("api.sock");
    let unix = api::bind_unix(&socket).map_err(|source| RunError::ApiListen {
        what: socket.display().to_string(),
        source,
    })?;
    listeners.push(Listener::Unix(Arc::new(unix)));
    Ok(api::Listeners(listeners))
}

/// The API's loopback listener, as a route's backend.
fn api_backend(config: &GuestConfig) -> Backend {
    Backend {
        addr: config.api.listen,
        netns: None,
    }
}

/// Serves the API as a platform service: bound here (a failure stops the
/// start), bound again by each restart after a panic. The ingress hands
/// the requests for the API's hostname to it in this process from now on
/// (restarts of the listeners do not touch that path).
fn serve_api(
    config: &GuestConfig,
    api: &Api,
    api_dir: &Path,
    handles: &Handles,
) -> Result<(), RunError> {
    handles.publish_local(
        &config.api_host(),
        api_backend(config),
        nestbox_ingress::local::Local(Arc::new(api.clone())),
    );
    let listen = config.api.listen;
    let gateway = config
        .egress
        .enabled
        .then(|| std::net::SocketAddr::from((config.egress.root_addr, listen.port())));
    let first = parking_lot::Mutex::new(Some(bind_api(listen, gateway, api_dir)?));
    let (api, api_dir) = (api.clone(), api_dir.to_owned());
    supervise("api", move || {
        let listeners = first.lock().take();
        let (api, api_dir) = (api.clone(), api_dir.clone());
        async move {
            let listeners = match listeners {
                Some(l) => l,
                None => bind_api(listen, gateway, &api_dir).map_err(|e| e.to_string())?,
            };
            api.serve(listeners).await.map_err(|e| e.to_string())
        }
    });
    Ok(())
}

/// Brings up one disk off the runtime thread.
async fn mount_disk(
    role: &'static str,
    device: PathBuf,
    dir: PathBuf,
    format: crate::disk::Format,
) -> DiskReport {
    let shown = device.display().to_string();
    tokio::task::spawn_blocking(move || crate::disk::bring_up(role, &device, &dir, format))
        .await
        .unwrap_or_else(|e| DiskReport {
            role: role.to_owned(),
            device: shown,
            mount: String::new(),
            state: DiskState::Refused,
            detail: Some(format!("the mount task failed: {e}")),
        })
}

/// As PID 1: the platform's disk and the network (failures are logged;
/// the API still comes up to say what is wrong). Returns what became of
/// the disk. The user's disk comes later ([`user_disk`]).
async fn init_vm(config: &GuestConfig) -> Vec<DiskReport> {
    let mut disks = Vec::new();
    if let Some(device) = config.data_device.clone() {
        let format = crate::disk::Format {
            fs: crate::disk::Fs::Ext4,
            args: &["-F"],
        };
        let report = mount_disk("platform", device, config.data_dir.clone(), format).await;
        if report.state == DiskState::Refused {
            tracing::error!(
                "the platform's disk is not mounted: definitions, logs and certificates are kept \
                 in memory until it is fixed"
            );
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

/// As PID 1, once the API serves: the user's disk, btrfs (its kernel
/// module loads first: about 2 s under TCG, which is why this waits until
/// the platform serves). Returns what became of it.
async fn user_disk(config: &GuestConfig) -> Option<DiskReport> {
    let device = config.user_device.clone()?;
    let t0 = std::time::Instant::now();
    let _ = tokio::task::spawn_blocking(|| {
        crate::init::load_modules(Path::new(crate::init::LATE_MODULE_LIST));
    })
    .await;
    let modules = t0.elapsed();
    // No `-m 0` to mind: btrfs reserves nothing for root; a label to find
    // it by.
    let format = crate::disk::Format {
        fs: crate::disk::Fs::Btrfs,
        args: &["-f", "-L", "nestbox-user"],
    };
    let report = mount_disk("user", device, config.user_dir(), format).await;
    tracing::info!(
        modules_ms = modules.as_secs_f64() * 1e3,
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        "the user's disk is up"
    );
    if report.state == DiskState::Refused {
        tracing::error!("the user's disk is not mounted; the inner container stays down");
    }
    Some(report)
}

/// The checkpoint store of the user's disk (blocking), or why there is
/// none.
fn open_storage(
    user: PathBuf,
    base: PathBuf,
    data: &Path,
    views: Option<PathBuf>,
    uploads: bool,
) -> Result<crate::storage::Store, String> {
    let paths = crate::storage::checkpoints::Paths {
        user,
        index_dir: data.join("checkpoints"),
        base,
        views,
        image: crate::api::image_version().map(str::to_owned),
        uploads,
    };
    crate::storage::Store::open(paths).map_err(|e| e.to_string())
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
    // The object store's HTTPS client (reqwest) takes the process's
    // provider: ring, the workspace's only one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let layout = cgroups(&config.limits).await?;
    let disks = if as_init {
        shield_from_oom();
        init_vm(config).await
    } else {
        Vec::new()
    };
    Ok((layout, disks))
}

/// Supervises the ingress, over routes that outlive its restarts.
fn start_ingress(config: &GuestConfig, handles: &Handles, shutdown: &watch::Receiver<bool>) {
    let (ingress, handles, stop) = (config.ingress.clone(), handles.clone(), shutdown.clone());
    supervise("ingress", move || {
        nestbox_ingress::serve::serve_with(ingress.clone(), handles.clone(), stop.clone(), |_| {})
    });
}

/// URL auth's state, on the data disk.
fn url_auth(
    config: &GuestConfig,
    data: &Path,
    names: crate::publish::Names,
) -> Result<crate::urls::Urls, RunError> {
    let owner = TokenHash::from_hex(&config.api.token_sha256)
        .expect("checked by the configuration")
        .bytes();
    let dir = data.join("urls");
    crate::urls::Urls::open(&dir, &config.urls, names, owner).map_err(|e| RunError::DataDir {
        path: dir,
        source: std::io::Error::other(e.to_string()),
    })
}

/// The exec sessions, their ring files on the data disk.
fn exec_sessions(
    config: &GuestConfig,
    data: &Path,
    layout: &CgroupLayout,
    current: &Current,
) -> Result<crate::exec::Sessions, RunError> {
    let dir = data.join("exec");
    crate::exec::Sessions::new(config.exec.clone(), &dir, &layout.inner, current.clone())
        .map_err(|source| RunError::DataDir { path: dir, source })
}

/// As PID 1, once the platform serves: the user's disk, then its
/// checkpoint store (set into `storage` either way). Returns why the disk
/// is refused, if it is, and the views' mount for the container.
async fn bring_up_storage(
    config: &GuestConfig,
    data: &Path,
    as_init: bool,
    disks: &parking_lot::Mutex<Vec<DiskReport>>,
    storage: &crate::storage::Storage,
) -> (Option<String>, Option<PathBuf>) {
    let mut user_disk_error = None;
    if as_init && let Some(report) = user_disk(config).await {
        user_disk_error =
            (report.state == DiskState::Refused).then(|| report.detail.clone().unwrap_or_default());
        disks.lock().push(report);
    }
    // The views' tmpfs is the VM's; a simulated VM shares the machine's
    // /run.
    let views = as_init.then(|| PathBuf::from(crate::storage::views::VIEWS));
    let remote = remote_store(config);
    let mut rebuilt = None;
    if user_disk_error.is_none()
        && let Some(from) = &config.storage.from
    {
        match crate::storage::rebuild::rebuild(&config.user_dir(), from, &config.storage, storage)
            .await
        {
            Ok(done) => rebuilt = done,
            Err(why) => {
                tracing::error!(%why, "the user's disk was not rebuilt; the container stays down");
                user_disk_error = Some(format!(
                    "the rebuild from {}@{} failed (the next start tries again): {why}",
                    from.url, from.checkpoint
                ));
            }
        }
    }
    let opened = if let Some(why) = &user_disk_error {
        Err(format!("the user's disk is not mounted: {why}"))
    } else {
        let (user, base, data) = (
            config.user_dir(),
            config.base_rootfs.clone(),
            data.to_owned(),
        );
        let views = views.clone();
        let uploads = remote.is_some();
        tokio::task::spawn_blocking(move || {
            let store = open_storage(user, base, &data, views, uploads)?;
            if let Some(done) = rebuilt {
                store
                    .import(&done.chain, done.next)
                    .map_err(|e| e.to_string())?;
            }
            Ok(store)
        })
        .await
        .unwrap_or_else(|e| Err(format!("the storage task failed: {e}")))
    };
    if let Err(why) = &opened {
        tracing::info!(%why, "no checkpoints in this VM");
    }
    let views = views.filter(|_| opened.is_ok());
    let scheduled = opened.is_ok() && config.checkpoints.auto_interval_secs > 0;
    let uploading = opened.is_ok();
    storage.set(opened);
    if scheduled {
        schedule_checkpoints(storage.clone(), config.checkpoints);
    }
    if uploading && let Some(remote) = remote {
        crate::storage::upload::spawn(storage.clone(), remote, &config.storage);
    }
    (user_disk_error, views)
}

/// The object store checkpoints go to (`[storage] url`, by default a
/// directory on the user's disk), if uploads are on and it opens.
fn remote_store(config: &GuestConfig) -> Option<crate::storage::remote::Remote> {
    let settings = &config.storage;
    if !settings.upload {
        return None;
    }
    let url = settings
        .url
        .clone()
        .unwrap_or_else(|| format!("file://{}", config.user_dir().join("objects").display()));
    match crate::storage::remote::Remote::open(&url, settings) {
        Ok(remote) => Some(remote),
        Err(err) => {
            tracing::error!(%err, "checkpoints are not uploaded");
            None
        }
    }
}

/// Takes a scheduled checkpoint every `auto_interval_secs`, keeping the
/// last `auto_keep` of them (a failure is logged; the next one is tried on
/// time).
fn schedule_checkpoints(
    storage: crate::storage::Storage,
    settings: crate::storage::checkpoints::Settings,
) {
    tokio::spawn(async move {
        let every = std::time::Duration::from_secs(settings.auto_interval_secs);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let storage = storage.clone();
            let made = tokio::task::spawn_blocking(move || {
                storage.store()?.create_auto(settings.auto_keep)
            })
            .await;
            match made {
                Ok(Ok(c)) => tracing::info!(id = %c.id, "scheduled checkpoint taken"),
                Ok(Err(err)) => tracing::warn!(%err, "the scheduled checkpoint failed"),
                Err(err) => tracing::warn!(%err, "the scheduled checkpoint's task failed"),
            }
        }
    });
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
    crate::faults::install(as_init);
    let (layout, disks) = prepare(&config, as_init).await?;
    let disks = Arc::new(parking_lot::Mutex::new(disks));
    let isolation = crate::container::Isolation::new(&config.container)?;
    let data = data_dir(&config.data_dir)?;
    let names = config.names();
    let urls = url_auth(&config, &data, names.clone())?;
    let handles = Handles::detached(RouteTable::new()).with_access(urls.access().clone());
    let publisher = Publisher::new(handles.clone(), names, config.primary_port);
    // ACME starts on the API's name at once; until the API exists (below)
    // the name goes to the API's loopback listener.
    handles.publish(&config.api_host(), api_backend(&config));
    start_ingress(&config, &handles, &shutdown);

    let logs = Logs::open(&data_dir(&data.join("logs"))?, config.logs)?;
    let current = Current::default();
    let services = Manager::open(&data, logs.clone(), Arc::new(InContainer(current.clone())))?;
    follow_primary(&services, &publisher, config.primary_port);
    let cgroup = layout.inner.clone();
    let api_dir = data_dir(&data.join("api"))?;
    let (netns_tx, netns_rx) = watch::channel(None);
    start_portwatch(cgroup.clone(), netns_rx, publisher.clone());
    let (state_tx, state_rx) = watch::channel(ContainerState::Starting);
    let (control_tx, mut control_rx) = mpsc::channel(4);
    let storage = crate::storage::Storage::default();
    let api = Api::new(api::Parts {
        token: TokenHash::from_hex(&config.api.token_sha256).expect("checked by the configuration"),
        publisher: publisher.clone(),
        services: services.clone(),
        logs: logs.clone(),
        control: control_tx,
        container: state_rx,
        limits: layout.applied.clone(),
        user_dir: config.user_dir(),
        inner_cgroup: layout.inner.clone(),
        disks: disks.clone(),
        storage: storage.clone(),
        acme: config.ingress.acme.is_some().then(|| handles.clone()),
        exec: exec_sessions(&config, &data, &layout, &current)?,
        current: current.clone(),
        dialers: Arc::default(),
        urls,
    });
    serve_api(&config, &api, &api_dir, &handles)?;

    // The platform serves; now the user's disk, then its checkpoints,
    // then the container on it.
    let (user_disk_error, views) =
        bring_up_storage(&config, &data, as_init, &disks, &storage).await;
    let spec = ContainerSpec {
        hostname: config.name.clone(),
        base_rootfs: config.base_rootfs.clone(),
        state_dir: config.user_dir(),
        cgroup: cgroup.clone(),
        api_dir: Some(api_dir.clone()),
        shm_bytes: config.container.shm_mib << 20,
        checkpoints: views,
        isolation,
    };

    let platform = Platform {
        spec,
        egress: config.egress.clone(),
        egress_rules: std::sync::atomic::AtomicBool::new(false),
        egress_link: parking_lot::Mutex::new(None),
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
                Some(Control::Restore(id, reply)) => {
                    tracing::info!(%id, "restoring a checkpoint");
                    let _ = reply.send(platform.restore(&storage, id).await);
                }
                None => break,
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    tracing::info!("stopping: services, then the inner container");
    let mut remains = platform.graveyard.take();
    remains.push(platform.down().await);
    // What the services wrote before they stopped is on the disk.
    if let Err(err) = logs.sync().await {
        tracing::warn!(%err, "the logs could not be synced at stop");
    }
    if let Some(freeing) = free_off_runtime(remains) {
        let _ = tokio::task::spawn_blocking(move || freeing.join()).await;
    }
    if config.egress.enabled {
        egress::tear_down().await;
    }
    Ok(())
}
