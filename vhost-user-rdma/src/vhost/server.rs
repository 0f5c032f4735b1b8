//! Serving one VM's socket: accept a frontend, serve it, release everything when it goes,
//! accept the next.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use super::device::{SharedDevice, VmDevice};
use super::listen::{Gate, Listeners, Woken};
use super::queues::{DoorbellQueues, EventQueue};
use crate::config::{PriorityClass, RunTime, SlClasses, SocketAccess, VmConfig};
use crate::model::memory::GuestMem;
use crate::model::objects::VmObjects;
use crate::model::vm::{Counters, Share, Vm};
use crate::sched::Scheduler;

/// Servers' numbers for the listeners' loop, never reused.
static NEXT_SERVER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// VM ids are never reused, so a detach cannot hit a later connection of the same VM.
static NEXT_VM_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Why a VM could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process answers on the socket path.
    #[error("socket {0} is in use by another process; stop it or choose another socket= path")]
    SocketBusy(PathBuf),
    /// The socket's directory is missing and could not be made.
    #[error(
        "cannot make the directory {path} for the VM's socket: make it, or let the daemon's user write to its parent"
    )]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The socket could not be created.
    #[error("cannot listen on {path}: check the daemon's user may write to its directory")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The socket's owner or group could not be set (`owner=`, `group=`).
    #[error(
        "cannot give socket {path} owner {owner} and group {group}: a new owner needs the daemon to run as root (or with CAP_CHOWN), a new group that the daemon's user is in it"
    )]
    Chown {
        /// The socket path.
        path: PathBuf,
        /// The uid asked for, or "unchanged".
        owner: String,
        /// The gid asked for, or "unchanged".
        group: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The socket's mode could not be set (`mode=`).
    #[error("cannot set mode {mode:04o} on socket {path}")]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// The mode asked for.
        mode: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The serving thread could not be started.
    #[error("cannot start the thread serving VM {name}")]
    Thread {
        /// The VM.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

struct Shared {
    stopping: AtomicBool,
    /// Times the server has been ready for a frontend with everything of the previous
    /// connection released.
    waiting: std::sync::atomic::AtomicU64,
    connection: Mutex<Option<ShutdownHandle>>,
    device: Mutex<Option<SharedDevice>>,
    /// A guest is connected: readable without a lock (metrics).
    connected: Arc<AtomicBool>,
    /// The configured VM's counters, which every connection's `Vm` counts into.
    counters: Arc<Counters>,
    /// Its weight, caps and drain, which every connection's `Vm` takes and an operator
    /// changes at run time.
    share: Arc<Share>,
    /// The VM's configuration as it stands now (an operator may have changed its weight,
    /// caps and quotas): the next connection starts from it.
    config: Mutex<VmConfig>,
    /// Opened by the listeners' loop when a frontend waits on the socket, closed to stop.
    gate: Arc<Gate>,
}

impl Shared {
    fn new(cfg: &VmConfig) -> Self {
        Shared {
            stopping: AtomicBool::new(false),
            waiting: std::sync::atomic::AtomicU64::new(0),
            connection: Mutex::new(None),
            device: Mutex::new(None),
            connected: Arc::default(),
            counters: Arc::default(),
            share: Arc::new(
                Share::new(cfg.weight, cfg.quotas.max_bw, cfg.quotas.max_msg_rate)
                    .with_class(cfg.class)
                    .with_sl_classes(&cfg.sl_classes),
            ),
            config: Mutex::new(cfg.clone()),
            gate: Arc::default(),
        }
    }

    fn config(&self) -> VmConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stopping", &self.stopping)
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

/// What an operator sees of one VM (`vrdmactl list`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmStatus {
    /// Its name.
    pub name: String,
    /// Its vhost-user socket.
    pub socket: String,
    /// Its port's GID.
    pub gid: String,
    /// Whether a guest is connected.
    pub connected: bool,
    /// The virtio features the guest's driver accepted, once it has.
    pub features: Option<u64>,
    /// Its weight within its class.
    pub weight: u32,
    /// Its priority class.
    pub class: PriorityClass,
    /// The classes its QPs take by service level (`sl.N=`).
    #[serde(default)]
    pub sl_classes: SlClasses,
    /// Payload bytes its QPs moved in each class, by `PriorityClass::index`.
    #[serde(default)]
    pub bytes_by_class: [u64; 3],
    /// Its bandwidth cap, payload bytes per second.
    pub max_bw: Option<u64>,
    /// Its message-rate cap, work requests per second.
    pub max_msg_rate: Option<u64>,
    /// Whether it is draining.
    pub draining: bool,
    /// Send work requests under way (started and not complete); a draining VM with none is
    /// drained.
    pub sends_under_way: u64,
    /// Objects in use against their quotas.
    pub objects: Vec<ObjectUse>,
    /// Its counters (kept across guest connections), by name.
    pub counters: Vec<(String, u64)>,
}

/// Objects of one kind in use, against the quota.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ObjectUse {
    /// qp, cq, mr, pd, ah, srq, or mr_bytes (bytes registered).
    pub kind: std::borrow::Cow<'static, str>,
    /// In use.
    pub in_use: u64,
    /// The quota.
    pub quota: u64,
}

/// One VM's socket and the thread serving it.
#[derive(Debug)]
pub struct VmServer {
    name: String,
    socket: PathBuf,
    shared: Arc<Shared>,
    scheduler: Scheduler,
    listeners: Arc<Listeners>,
    /// Its number for `listeners`.
    server_id: u64,
    thread: Option<JoinHandle<()>>,
}

impl VmServer {
    /// Listens on the VM's socket and serves frontends one after another until [`stop`].
    /// `sync_receives`: the fabric posts receives ahead of arrival, so each device offers
    /// `SYNC_RECV` and refuses a driver that does not accept it. `listeners` watches the
    /// socket and wakes the VM's thread when a frontend waits.
    ///
    /// [`stop`]: VmServer::stop
    pub fn start(
        cfg: VmConfig,
        node_guid: u64,
        scheduler: Scheduler,
        sync_receives: bool,
        listeners: &Arc<Listeners>,
    ) -> Result<Self, Error> {
        if UnixStream::connect(&cfg.socket).is_ok() {
            return Err(Error::SocketBusy(cfg.socket.clone()));
        }
        make_directory(&cfg.socket)?;
        let listen_error = |source| Error::Listen {
            path: cfg.socket.clone(),
            source,
        };
        // Nobody answers there (checked above): a socket file a daemon left behind.
        remove_socket(&cfg.socket);
        let bound = std::os::unix::net::UnixListener::bind(&cfg.socket).map_err(listen_error)?;
        // A second descriptor of the socket, which the listeners' loop watches.
        let watched = match bound.try_clone() {
            Ok(w) => w,
            Err(e) => {
                remove_socket(&cfg.socket);
                return Err(listen_error(e));
            }
        };
        // On an error the socket is removed, so none is left with access the operator did not
        // ask for.
        if let Err(e) = set_access(&cfg.socket, &cfg.socket_access) {
            remove_socket(&cfg.socket);
            return Err(e);
        }
        let mut listener = Listener::from(bound);
        let shared = Arc::new(Shared::new(&cfg));
        let thread_shared = shared.clone();
        let name = cfg.name.clone();
        let socket = cfg.socket.clone();
        let thread_scheduler = scheduler.clone();
        let thread_listeners = listeners.clone();
        let server_id = NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed);
        let thread = std::thread::Builder::new()
            .name(format!("vm-{}", cfg.name))
            .spawn(move || {
                serve(
                    node_guid,
                    (&mut listener, &watched, server_id),
                    &thread_shared,
                    (&thread_scheduler, &thread_listeners),
                    sync_receives,
                )
            })
            .map_err(|source| Error::Thread {
                name: name.clone(),
                source,
            })?;
        info!("vm {name}: listening on {}", socket.display());
        Ok(VmServer {
            name,
            socket,
            shared,
            scheduler,
            listeners: listeners.clone(),
            server_id,
            thread: Some(thread),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device of the frontend connected now, if any.
    pub fn device(&self) -> Option<SharedDevice> {
        self.shared
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a guest is connected now; reads one atomic, so a metrics scrape never waits
    /// for the server.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// The flag [`VmServer::is_connected`] reads, for a reader on another thread (metrics).
    pub fn connected_flag(&self) -> Arc<AtomicBool> {
        self.shared.connected.clone()
    }

    /// The VM's counters, kept across guest connections: every connection's `Vm` counts into
    /// them, and only [`Counters::reset`] sets them back to zero.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.shared.counters
    }

    /// The VM's weight, caps and drain, shared by every guest connection.
    pub fn share(&self) -> &Arc<Share> {
        &self.shared.share
    }

    /// The VM's configuration as it stands now.
    pub fn config(&self) -> VmConfig {
        self.shared.config()
    }

    /// Changes the VM's weight, class, caps and object quotas at once: the scheduler uses the
    /// weight, class and caps from its next look at the VM, the connected guest's new objects
    /// are checked against the quotas (its device reports them from the next connection on, its
    /// attributes being constant while a driver runs), and the next connection
    /// starts from them.
    pub fn set_run_time(&self, run_time: RunTime) {
        let RunTime {
            weight,
            class,
            sl_classes,
            quotas,
        } = run_time;
        let mut config = self.shared.config.lock().unwrap_or_else(|p| p.into_inner());
        config.weight = weight;
        config.class = class;
        config.sl_classes = sl_classes;
        config.quotas = quotas;
        drop(config);
        let share = &self.shared.share;
        share.set_weight(weight);
        share.set_class(class);
        share.set_sl_classes(&sl_classes);
        share.set_caps(quotas.max_bw, quotas.max_msg_rate);
        if let Some(device) = self.device() {
            device.vm().set_quotas(&quotas);
        }
        self.scheduler.wake();
        info!(
            "vm {}: weight {weight}, class {}, service levels in other classes: [{}], max-bw {}, max-msg-rate {}, quotas {quotas:?}",
            self.name,
            class.name(),
            sl_classes.describe(),
            quotas.max_bw.map_or("none".into(), |v| v.to_string()),
            quotas.max_msg_rate.map_or("none".into(), |v| v.to_string()),
        );
    }

    /// Starts (`true`) or ends a drain: while it lasts the fabric starts none of the VM's
    /// send work requests and lets those under way finish (see `Share::is_draining`). Ending
    /// it has the scheduler look at every QP's ring again, where the requests posted
    /// meanwhile wait.
    pub fn set_draining(&self, draining: bool) {
        self.shared.share.set_draining(draining);
        if !draining {
            if let Some(device) = self.device() {
                device.vm().wake_all();
            }
        }
        self.scheduler.wake();
        info!(
            "vm {}: {}",
            self.name,
            if draining {
                "draining: no new send work starts"
            } else {
                "drain ended"
            }
        );
    }

    /// What an operator sees of the VM (`vrdmactl list`): waits for the VM's objects' lock
    /// if a guest is connected, so only the management path calls it.
    pub fn status(&self) -> VmStatus {
        let config = self.config();
        let device = self.device();
        let (max_bw, max_msg_rate) = self.shared.share.caps();
        let mut status = VmStatus {
            name: self.name.clone(),
            socket: self.socket.display().to_string(),
            gid: config.gid.to_string(),
            connected: device.is_some(),
            features: device.as_ref().and_then(|d| d.negotiated_features()),
            weight: self.shared.share.weight(),
            class: self.shared.share.class(),
            sl_classes: self.shared.share.sl_classes(),
            bytes_by_class: self.shared.counters.class_bytes(),
            max_bw,
            max_msg_rate,
            draining: self.shared.share.is_draining(),
            sends_under_way: 0,
            objects: Vec::new(),
            counters: Counters::NAMES
                .iter()
                .zip(self.shared.counters.values())
                .map(|(n, v)| ((*n).to_owned(), v))
                .collect(),
        };
        match &device {
            Some(d) => {
                let vm = d.vm();
                let objects = vm.lock();
                status.sends_under_way = objects.sends_under_way()
                    + u64::from(self.scheduler.hooks().sends_in_flight(vm.id));
                status.objects = Self::object_use(&objects);
            }
            // Without a guest nothing is in use: the quotas a connection would start from.
            None => status.objects = Self::object_use(&VmObjects::new(&config, 0)),
        }
        status
    }

    fn object_use(objects: &VmObjects) -> Vec<ObjectUse> {
        objects
            .usage()
            .iter()
            .map(|&(kind, in_use, quota)| ObjectUse {
                kind: kind.into(),
                in_use,
                quota,
            })
            .collect()
    }

    /// How many times the server has been waiting for a frontend with everything of the
    /// previous one released: one more than the frontends it has served, once the last has
    /// gone. Tests count on it to know a departed guest left nothing behind.
    pub fn times_waiting(&self) -> u64 {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Disconnects the frontend (which sees the device go away), stops accepting, waits up to
    /// `timeout` for the VM's resources to be released, and removes the socket.
    pub fn stop(mut self, timeout: Duration) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(conn) = self
            .shared
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            conn.shutdown();
        }
        // The serving thread may be waiting for a frontend: the gate wakes it to see it is
        // stopping, and the loop stops watching its socket (the gate closed first, so that a
        // watch the thread asks for meanwhile is dropped). A thread that had to accept without
        // the loop is blocked in accept(): a connection that closes at once wakes it.
        self.shared.gate.close();
        self.listeners.unwatch(self.server_id);
        drop(UnixStream::connect(&self.socket));
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + timeout;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                warn!("vm {}: did not stop within {timeout:?}", self.name);
            }
        }
        remove_socket(&self.socket);
    }
}

/// Makes the socket's directory if it is missing, so that a socket under `/run` (a tmpfs,
/// empty at every boot) works without a step before the daemon. Each directory made gets mode
/// 0755 whatever the umask (the systemd unit's is 0077): the VMMs, which may run as other
/// users, must reach the socket through it, and the socket's own mode (`mode=`) says who may
/// connect. Directories that exist are left as they are.
fn make_directory(socket: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.iter().rev() {
        let made = std::fs::create_dir(d)
            .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)));
        match made {
            Ok(()) => {}
            // Made meanwhile by someone else (another daemon starting): theirs to keep.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(Error::Directory {
                    path: d.to_path_buf(),
                    source,
                });
            }
        }
    }
    if !missing.is_empty() {
        info!(
            "made the directory {} for socket {}",
            dir.display(),
            socket.display()
        );
    }
    Ok(())
}

/// Gives the bound socket the owner, group and mode of `owner=`, `group=` and `mode=`. Until
/// this runs the umask decides who may connect (the systemd unit sets `UMask=0077`, so
/// nobody else can in that moment); the owner and group are set before the mode so that a
/// wider mode never applies to the daemon's own group.
fn set_access(socket: &Path, access: &SocketAccess) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    if access.owner.is_some() || access.group.is_some() {
        std::os::unix::fs::chown(socket, access.owner, access.group).map_err(|source| {
            let id = |v: Option<u32>| v.map_or_else(|| "unchanged".to_owned(), |v| v.to_string());
            Error::Chown {
                path: socket.to_owned(),
                owner: id(access.owner),
                group: id(access.group),
                source,
            }
        })?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode)).map_err(
            |source| Error::Chmod {
                path: socket.to_owned(),
                mode,
                source,
            },
        )?;
    }
    Ok(())
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("cannot remove socket {}: {e}", path.display()),
    }
}

fn serve(
    node_guid: u64,
    (listener, watched, server_id): (&mut Listener, &std::os::unix::net::UnixListener, u64),
    shared: &Shared,
    (scheduler, listeners): (&Scheduler, &Listeners),
    sync_receives: bool,
) {
    let name = &shared.config().name;
    while !shared.stopping.load(Ordering::SeqCst) {
        let cfg = &shared.config();
        let memory = GuestMemoryAtomic::new(GuestMem::default());
        let id = NEXT_VM_ID.fetch_add(1, Ordering::Relaxed);
        let events = Arc::new(EventQueue::default());
        let vm = Arc::new(
            Vm::new(
                id,
                VmObjects::new(cfg, node_guid),
                cfg.weight,
                memory.clone(),
                events.clone(),
            )
            .with_share(shared.share.clone())
            .with_counters(shared.counters.clone()),
        );
        let doorbells =
            Arc::new(DoorbellQueues::new(vm.clone()).handing_kicks_to(scheduler.bell().clone()));
        let device = match VmDevice::new(
            cfg,
            vm.clone(),
            doorbells.clone(),
            events,
            scheduler.hooks().clone(),
            scheduler.clone(),
            sync_receives,
        ) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                error!("vm {name}: cannot create the device: {e}");
                return;
            }
        };
        let mut daemon = match VhostUserDaemon::new(format!("vrdma-{name}"), device.clone(), memory)
        {
            Ok(d) => d,
            Err(e) => {
                error!("vm {name}: cannot create the vhost-user daemon: {e}");
                return;
            }
        };
        // One worker thread serves every queue (the device's default `queues_per_thread`).
        if let Some(worker) = daemon.get_epoll_handlers().first() {
            device.set_worker(worker);
        }
        // The loop watches a duplicate of the socket, made now: it belongs to the idle VM's
        // descriptors counted below.
        listeners.watch(server_id, watched, shared.gate.clone());
        // Everything a connection needs exists now and nothing more is made until a frontend
        // connects: from this line on, the daemon's threads and descriptors are what a VM
        // without a guest costs (tests compare them across connections).
        info!("vm {name}: waiting for a frontend");
        shared.waiting.fetch_add(1, Ordering::SeqCst);
        if shared.gate.wait() == Woken::Closed {
            break;
        }
        // A frontend waits: accepting it does not block.
        if let Err(e) = daemon.start(listener) {
            if !shared.stopping.load(Ordering::SeqCst) {
                error!("vm {name}: accepting a frontend failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        scheduler.attach(vm.clone(), doorbells);
        *shared.device.lock().unwrap_or_else(|p| p.into_inner()) = Some(device.clone());
        *shared.connection.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        shared.connected.store(true, Ordering::Relaxed);
        if shared.stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        } else {
            info!("vm {name}: frontend connected");
        }
        // A guest that shuts down or a VMM that quits closes the socket between messages: the
        // library reports that as an error, but for the operator it is the ordinary end of a
        // connection and gets the same one line as a clean one. Anything else is worth a
        // warning with its cause (the daemon goes on and serves the next frontend).
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => info!("vm {name}: frontend disconnected"),
            Err(e) => warn!("vm {name}: connection ended by an error: {e}"),
        }
        shared.connected.store(false, Ordering::Relaxed);
        shared
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        shared
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        device.stop_worker();
        // Detach first: once the scheduler has let go, nothing touches this VM's memory, and
        // its peers' QPs are already in the error state with their work flushed, unless the VM
        // migrated: then they keep their work and reach it where it went.
        if device.migrated_away() {
            scheduler.detach_moved(vm.id);
        } else {
            scheduler.detach(vm.id);
        }
        device.release_all();
        // Drop the connection's last references before saying it is released, so nothing of
        // it outlives the line: the library's handler (which joins the vring worker thread and
        // closes its epoll and the exit, kick and call eventfds), then the device and the VM,
        // and with them the guest's memory (its memfds and their mappings).
        drop(daemon);
        drop(device);
        drop(vm);
        info!("vm {name}: resources released");
    }
}

/// A Xen frontend's memory table over the socket, in the `xen` build: the frontend must
/// negotiate `XEN_MMAP` and sends regions in its extended format; a region mapped whole is
/// served, and a grant region mapped per access is refused without taking the daemon down.
#[cfg(all(test, feature = "xen"))]
mod xen_tests {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    use clap::Parser;
    use vhost::vhost_user::message::{
        VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    };
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend, MmapXenFlags};

    use super::*;
    use crate::config::{Args, Config};
    use crate::fabric::mock::MockFabric;

    /// Where the guest's RAM starts on Xen/Arm (`GUEST_RAM0_BASE`).
    const RAM_BASE: u64 = 0x4000_0000;
    const RAM_SIZE: u64 = 1 << 20;
    /// Grant addresses carry the top bit (Linux's `XEN_GRANT_DMA_ADDR_OFF`).
    const GRANT_BASE: u64 = 1 << 63;
    const GUEST_DOMID: u32 = 7;

    /// A frontend that has negotiated what a Xen frontend does: `XEN_MMAP`, and `REPLY_ACK`
    /// so that it hears whether its table was taken.
    fn xen_frontend(socket: &Path) -> Frontend {
        let mut frontend = Frontend::connect(socket, 3).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        frontend.set_features(features).unwrap();
        let offered = frontend.get_protocol_features().unwrap();
        let wanted = VhostUserProtocolFeatures::XEN_MMAP | VhostUserProtocolFeatures::REPLY_ACK;
        assert!(offered.contains(wanted), "offered {offered:?}");
        frontend.set_protocol_features(wanted).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend
    }

    fn region(gpa: u64, file: &File, xen_flags: MmapXenFlags) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: RAM_SIZE,
            userspace_addr: 0,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
            xen_mmap_flags: xen_flags.bits(),
            xen_mmap_data: GUEST_DOMID,
        }
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_table_mapped_whole_is_served_and_one_mapped_per_access_refused() {
        let dir = std::env::temp_dir().join(format!("vrdma-xen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vm.sock");
        let argv = [
            "vhost-user-rdma".to_owned(),
            "--vm".to_owned(),
            format!("name=xen,socket={},gid=10.0.0.9", socket.display()),
        ];
        let cfg = Config::from_args(&Args::parse_from(argv))
            .unwrap()
            .vms
            .remove(0);
        let scheduler = Scheduler::start(|| Box::new(MockFabric::default())).unwrap();
        let listeners = crate::vhost::listen::Listeners::start().unwrap();
        let server = VmServer::start(cfg, 0x100, scheduler, false, &listeners).unwrap();

        // Guest RAM as a plain file: the whole-region case a Xen build maps with mmap
        // (foreign mappings need /dev/xen/privcmd, which this machine does not have).
        let ram_path = dir.join("ram");
        let ram = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&ram_path)
            .unwrap();
        ram.set_len(RAM_SIZE).unwrap();
        let frontend = xen_frontend(&socket);
        frontend
            .set_mem_table(&[region(RAM_BASE, &ram, MmapXenFlags::UNIX)])
            .unwrap();
        wait_until("the frontend's device exists", || server.device().is_some());
        let device = server.device().unwrap();
        let mem = device.vm().mem.memory();
        assert_eq!(mem.num_regions(), 1);
        assert!(mem.address_in_range(vm_memory::GuestAddress(RAM_BASE + RAM_SIZE - 1)));
        drop((mem, device));

        // Grant regions mapped per access: vm-memory opens /dev/xen/gntdev only on access, so
        // any file stands in for it here.
        let gntdev = File::open("/dev/null").unwrap();
        let per_access = MmapXenFlags::GRANT | MmapXenFlags::NO_ADVANCE_MAP;
        frontend
            .set_mem_table(&[region(GRANT_BASE, &gntdev, per_access)])
            .expect_err("a grant region mapped per access must be refused");
        drop(frontend);
        // The refusal ends that connection; the daemon lives on and serves the next frontend.
        wait_until("the refused frontend's VM is released", || {
            server.times_waiting() == 2
        });
        let frontend = xen_frontend(&socket);
        frontend
            .set_mem_table(&[region(RAM_BASE, &ram, MmapXenFlags::UNIX)])
            .unwrap();
        drop(frontend);

        server.stop(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A frontend on the VM's socket that accepts or declines `SYNC_RECV` where the fabric
/// posts receives ahead of arrival: declining ends that connection at its memory table, and the
/// daemon serves the next frontend. Not in the `xen` build, whose memory tables carry Xen's
/// mapping fields (its own tests above cover them); the refusal does not depend on them.
#[cfg(all(test, not(feature = "xen")))]
mod sync_recv_tests {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    use clap::Parser;
    use vhost::vhost_user::message::{
        VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    };
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
    use vrdma_proto::features;

    use super::*;
    use crate::config::{Args, Config};
    use crate::fabric::mock::MockFabric;

    const RAM_SIZE: u64 = 1 << 20;

    /// Connects, sets the features `accept` picks from those offered, and negotiates
    /// `REPLY_ACK`, so the frontend hears whether its memory table was taken; returns the
    /// frontend and the features offered.
    fn connect(socket: &Path, accept: impl Fn(u64) -> u64) -> (Frontend, u64) {
        let mut frontend = Frontend::connect(socket, 3).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_ne!(offered & protocol, 0);
        frontend.set_features(accept(offered) | protocol).unwrap();
        frontend
            .set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        (frontend, offered)
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_driver_declining_sync_receives_is_refused_where_the_fabric_needs_them() {
        let dir = std::env::temp_dir().join(format!("vrdma-sync-recv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ram = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("ram"))
            .unwrap();
        ram.set_len(RAM_SIZE).unwrap();
        // At guest-physical 0 and file offset 0; the `xen` build's extra fields stay 0 too.
        let region = VhostUserMemoryRegionInfo {
            memory_size: RAM_SIZE,
            userspace_addr: 0x1000_0000,
            mmap_handle: ram.as_raw_fd(),
            ..Default::default()
        };
        let scheduler = Scheduler::start(|| Box::new(MockFabric::default())).unwrap();
        let listeners = crate::vhost::listen::Listeners::start().unwrap();
        let mut servers = Vec::new();
        for (name, sync_receives) in [("soft", false), ("nic", true)] {
            let socket = dir.join(format!("{name}.sock"));
            let argv = [
                "vhost-user-rdma".to_owned(),
                "--vm".to_owned(),
                format!("name={name},socket={},gid=10.0.0.9", socket.display()),
            ];
            let cfg = Config::from_args(&Args::parse_from(argv))
                .unwrap()
                .vms
                .remove(0);
            let server = VmServer::start(cfg, 0x100, scheduler.clone(), sync_receives, &listeners);
            servers.push((socket, server.unwrap()));
        }
        let [(soft_socket, soft), (nic_socket, nic)] = <[_; 2]>::try_from(servers).unwrap();
        let everything = |offered: u64| offered & (features::VERSION_1 | features::ALL_DEVICE);
        let all_but_sync_receives = |offered| everything(offered) & !features::SYNC_RECV;

        // Where receives are read on arrival the bit is not offered, and nobody is asked for it.
        let (frontend, offered) = connect(&soft_socket, all_but_sync_receives);
        assert_eq!(offered & features::SYNC_RECV, 0);
        frontend.set_mem_table(&[region]).unwrap();
        drop(frontend);

        // With them it is offered, and a driver that declines it is refused.
        let (frontend, offered) = connect(&nic_socket, all_but_sync_receives);
        assert_ne!(offered & features::SYNC_RECV, 0);
        frontend
            .set_mem_table(&[region])
            .expect_err("a driver without SYNC_RECV must be refused");
        // The refusal ends that connection; the daemon lives on and serves the next frontend.
        wait_until("the refused frontend's VM is released", || {
            nic.times_waiting() == 2
        });
        drop(frontend);
        let (frontend, _) = connect(&nic_socket, everything);
        frontend.set_mem_table(&[region]).unwrap();
        drop(frontend);

        soft.stop(Duration::from_secs(5));
        nic.stop(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
