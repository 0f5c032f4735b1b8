//! virtio-user: the process is its own vhost-user frontend.
//!
//! [`VirtioUser::connect`] opens the daemon's vhost-user socket and does what a VMM would do
//! for a guest: negotiates features, shares memory, reads the configuration space and sets up
//! the virtqueues. The memory it shares is memfd-backed ([`SharedMemory`]) and announced with
//! guest-physical address == virtual address in this process, so buffer addresses go into
//! descriptors and commands untranslated.
//!
//! Handshake, in order: `SET_OWNER`, `GET_FEATURES` (`VIRTIO_F_VERSION_1` and
//! `VHOST_USER_F_PROTOCOL_FEATURES` required), `GET_PROTOCOL_FEATURES`,
//! `SET_PROTOCOL_FEATURES` (`CONFIG` required; `MQ`, `REPLY_ACK`, `CONFIGURE_MEM_SLOTS` and
//! `LOG_SHMFD` when offered), `GET_QUEUE_NUM` (with `MQ`), `SET_FEATURES`, `GET_CONFIG`, then memory through
//! `GET_MAX_MEM_SLOTS` + `ADD_MEM_REG` (or `SET_MEM_TABLE` without `CONFIGURE_MEM_SLOTS`), then
//! for every queue `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE 0`, `SET_VRING_CALL`,
//! `SET_VRING_KICK` and `SET_VRING_ENABLE 1`. With `REPLY_ACK` every request after
//! `SET_PROTOCOL_FEATURES` asks for an acknowledgement, so a refusal is reported at the step
//! that caused it.
//!
//! [`VirtioUser::pause_rings`] stops and restarts every ring as a VMM does when it pauses and
//! resumes a VM, and [`VirtioUser::start_dirty_log`] and [`VirtioUser::stop_dirty_log`] turn
//! the device's dirty-page log on and off as a VMM does around a live migration, so tests can
//! put the device through what QEMU does to it.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    MAX_ATTACHED_FD_ENTRIES, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vrdma_proto::config::Config;
use vrdma_proto::doorbell::{self, Doorbell};
use vrdma_proto::{event, features, queue};
use zerocopy::IntoBytes;

use super::{DeviceEvent, Transport};
mod migrate;

pub use migrate::Migration;

use crate::mem::{DMA_GRANULE, DmaAllocator, DmaBuf, MemError, SharedMemory, page_size};
use crate::virtio::{QueueError, SplitQueue};

/// Bytes of the preallocated control request and response buffers; longer commands get a
/// buffer of their own for the duration of the call.
const CONTROL_BUF_BYTES: usize = 4096;
/// Bytes of one doorbell batch buffer.
const DOORBELL_SLOT_BYTES: usize = doorbell::MAX_BATCH * doorbell::SIZE;
/// Most doorbell batches in flight on one doorbell queue.
const MAX_DOORBELL_SLOTS: u16 = 64;

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// Entries of every virtqueue: a power of two up to 1024 that the daemon accepts.
    pub queue_size: u16,
    /// How long to wait for the daemon: the whole vhost-user handshake when connecting, each
    /// later vhost-user reply, each control command, and room on a full doorbell queue.
    pub timeout: Duration,
    /// Bytes of shared DMA memory to set up at connect time for the library's own use (QP and
    /// CQ rings, command buffers), on top of what the transport's queues need.
    pub memory_size: usize,
    /// When the DMA memory runs out, register another region of at least this many bytes with
    /// the device; 0 never grows it.
    pub grow_size: usize,
    /// Device feature bits (`vrdma_proto::features::*`) to accept if the device offers them.
    pub features: u64,
    /// Seal the size of every memfd (see [`SharedMemory::create`]).
    pub seal_memory: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queue_size: 256,
            timeout: Duration::from_secs(5),
            memory_size: 4 << 20,
            grow_size: 16 << 20,
            features: features::ALL_DEVICE,
            seal_memory: true,
        }
    }
}

/// What to check when the socket cannot be connected. A socket that exists but may not be
/// opened is the daemon's choice of who may connect, not a daemon that is missing: the fix is
/// the VM's `owner=`, `group=` and `mode=`, so that is what the hint names.
fn connect_hint(socket: &Path, source: &io::Error) -> String {
    let socket = socket.display();
    match source.kind() {
        io::ErrorKind::PermissionDenied => format!(
            "this user may not open it: give it access with the daemon's \
             --vm ...,socket={socket},owner=USER,group=GROUP,mode=0660 for this user or a group \
             it is in"
        ),
        _ => format!("is vhost-user-rdma running with --vm ...socket={socket}?"),
    }
}

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioUserError {
    /// The options cannot work.
    #[error("invalid virtio-user option {option}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The socket could not be connected.
    #[error("cannot connect to vhost-user socket {}: {}", socket.display(), connect_hint(socket, source))]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A vhost-user request failed or was refused.
    #[error(
        "vhost-user {step} failed on {}: the daemon refused it, closed the connection or did \
         not answer in time (see the daemon's log)",
        socket.display()
    )]
    Handshake {
        /// The socket path.
        socket: PathBuf,
        /// The request that failed.
        step: String,
        /// The vhost-user error.
        #[source]
        source: vhost::Error,
    },
    /// A required virtio feature is not offered.
    #[error(
        "the vhost-user backend at {} does not offer {feature} (offered features {offered:#x}): \
         it is not a vrdma device or it is too old",
        socket.display()
    )]
    MissingFeature {
        /// The socket path.
        socket: PathBuf,
        /// The missing feature.
        feature: &'static str,
        /// The features offered.
        offered: u64,
    },
    /// A required vhost-user protocol feature is not offered.
    #[error(
        "the vhost-user backend at {} does not offer protocol feature {feature} (offered \
         {offered:#x}): it is not vhost-user-rdma or it is too old",
        socket.display()
    )]
    MissingProtocolFeature {
        /// The socket path.
        socket: PathBuf,
        /// The missing feature.
        feature: &'static str,
        /// The protocol features offered.
        offered: u64,
    },
    /// The configuration space does not decode.
    #[error("the configuration space read from {} is invalid", socket.display())]
    BadConfig {
        /// The socket path.
        socket: PathBuf,
        /// Why it does not decode.
        #[source]
        source: vrdma_proto::DecodeError,
    },
    /// The device announces more doorbell queues than it has vhost-user queues.
    #[error(
        "the device at {} announces {doorbell_queues} doorbell queues ({needed} virtqueues in \
         all) but its backend serves {offered} queues (or more than the protocol maximum of \
         {max_doorbell} doorbell queues); the daemon is misconfigured",
        socket.display(), max_doorbell = queue::MAX_DOORBELL_QUEUES
    )]
    QueueCount {
        /// The socket path.
        socket: PathBuf,
        /// Doorbell queues in the configuration space.
        doorbell_queues: u16,
        /// Virtqueues that needs.
        needed: u16,
        /// Queues `GET_QUEUE_NUM` reported (or the largest number the protocol allows).
        offered: u64,
    },
    /// Shared memory could not be set up or accessed.
    #[error("shared memory error while {what}")]
    Memory {
        /// What the transport was doing.
        what: &'static str,
        /// The memory error.
        #[source]
        source: MemError,
    },
    /// A virtqueue operation failed.
    #[error("virtqueue {queue} ({role}) failed")]
    Queue {
        /// The virtqueue index.
        queue: u16,
        /// What the queue is for.
        role: &'static str,
        /// The queue error.
        #[source]
        source: QueueError,
    },
    /// An eventfd or epoll operation failed.
    #[error("{what} failed")]
    Event {
        /// The operation.
        what: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The device did not complete a control command in time.
    #[error(
        "the device did not answer a control command within {timeout:?}: is vhost-user-rdma \
         serving {} still running? The control queue is unusable until the device is reopened",
        socket.display()
    )]
    DeviceTimeout {
        /// The socket path.
        socket: PathBuf,
        /// How long the transport waited.
        timeout: Duration,
    },
    /// The daemon closed the vhost-user connection: the device is gone.
    #[error(
        "the vrdma device at {} is gone: the daemon closed the vhost-user connection \
         (vhost-user-rdma stopped or restarted); reopen the device",
        socket.display()
    )]
    Disconnected {
        /// The socket path.
        socket: PathBuf,
    },
    /// The daemon accepted the connection but did not complete the handshake in time.
    #[error(
        "the daemon at {} did not complete the vhost-user handshake within {timeout:?}: another \
         guest may be using this VM's device (the daemon serves one frontend per socket at a \
         time), or vhost-user-rdma is stopped or overloaded",
        socket.display()
    )]
    HandshakeTimeout {
        /// The socket path.
        socket: PathBuf,
        /// How long the transport waited.
        timeout: Duration,
    },
    /// An earlier control command failed in a way that leaves the queue in an unknown state.
    #[error(
        "the control queue of {} is unusable after an earlier timeout or device error; reopen \
         the device",
        socket.display()
    )]
    ControlQueueBroken {
        /// The socket path.
        socket: PathBuf,
    },
    /// The device stopped taking doorbells.
    #[error(
        "doorbell queue {queue} of {} stayed full for {timeout:?}: the device stopped \
         consuming doorbells; is vhost-user-rdma still running?",
        socket.display()
    )]
    DoorbellTimeout {
        /// The socket path.
        socket: PathBuf,
        /// The doorbell queue (0-based).
        queue: u16,
        /// How long the transport waited.
        timeout: Duration,
    },
    /// A control command with no bytes.
    #[error("a control command needs at least a header")]
    EmptyRequest,
    /// A buffer longer than a descriptor can describe.
    #[error("a {what} of {len} bytes is longer than a virtqueue descriptor can describe")]
    TooLong {
        /// Which buffer.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// The device claims to have written more than the response buffer holds.
    #[error(
        "the device reported writing {written} bytes into a {capacity}-byte response buffer; \
         the device is misbehaving"
    )]
    ResponseOverrun {
        /// Bytes the device reported.
        written: u32,
        /// The buffer's size.
        capacity: usize,
    },
    /// There is no such doorbell queue.
    #[error("doorbell queue {queue} does not exist: the device has {count} doorbell queues")]
    NoSuchDoorbellQueue {
        /// The queue asked for.
        queue: u16,
        /// Doorbell queues in use.
        count: u16,
    },
    /// The region is already registered.
    #[error("shared memory at {base:#x} is already registered with the device")]
    AlreadyRegistered {
        /// The region's base address.
        base: u64,
    },
    /// The region is not registered.
    #[error("no shared memory at {base:#x} is registered with the device")]
    NotRegistered {
        /// The address asked for.
        base: u64,
    },
    /// The region cannot be removed while the transport's allocator uses it.
    #[error(
        "shared memory at {base:#x} still holds {live} DMA buffers (rings, command buffers or \
         library objects); destroy them before removing the region"
    )]
    RegionInUse {
        /// The region's base address.
        base: u64,
        /// Live buffers in it.
        live: usize,
    },
    /// The device's memory table is full.
    #[error(
        "cannot register more shared memory with {}: the device accepts at most {max} \
         regions; use fewer, larger regions",
        socket.display()
    )]
    TooManyRegions {
        /// The socket path.
        socket: PathBuf,
        /// The limit.
        max: u64,
    },
    /// Registering or unregistering a region failed.
    #[error(
        "the daemon at {} refused to {action} shared memory {base:#x}..{end:#x}",
        socket.display(), end = base.saturating_add(*len)
    )]
    MemoryTable {
        /// The socket path.
        socket: PathBuf,
        /// "register" or "unregister".
        action: &'static str,
        /// The region's base address.
        base: u64,
        /// The region's length.
        len: u64,
        /// The vhost-user error.
        #[source]
        source: vhost::Error,
    },
    /// A thread panicked while holding one of the transport's locks.
    #[error("the {what} lock was poisoned by a thread that panicked while holding it")]
    Poisoned {
        /// Which lock.
        what: &'static str,
    },
}

type Result<T> = std::result::Result<T, VirtioUserError>;

fn lock<'a, T>(mutex: &'a Mutex<T>, what: &'static str) -> Result<MutexGuard<'a, T>> {
    mutex.lock().map_err(|_| VirtioUserError::Poisoned { what })
}

fn event_err(what: &'static str) -> impl FnOnce(io::Error) -> VirtioUserError {
    move |source| VirtioUserError::Event { what, source }
}

fn mem_err(what: &'static str) -> impl FnOnce(MemError) -> VirtioUserError {
    move |source| VirtioUserError::Memory { what, source }
}

/// One virtqueue with its notification eventfds.
#[derive(Debug)]
struct Vq {
    index: u16,
    role: &'static str,
    queue: SplitQueue,
    kick: EventFd,
    call: EventFd,
}

impl Vq {
    fn new(index: u16, role: &'static str, alloc: &DmaAllocator, size: u16) -> Result<Self> {
        let queue = SplitQueue::new(alloc, size).map_err(|source| VirtioUserError::Queue {
            queue: index,
            role,
            source,
        })?;
        let flags = libc::EFD_NONBLOCK | libc::EFD_CLOEXEC;
        Ok(Vq {
            index,
            role,
            queue,
            kick: EventFd::new(flags).map_err(event_err("creating a kick eventfd"))?,
            call: EventFd::new(flags).map_err(event_err("creating a call eventfd"))?,
        })
    }

    fn err(&self, source: QueueError) -> VirtioUserError {
        VirtioUserError::Queue {
            queue: self.index,
            role: self.role,
            source,
        }
    }

    fn add_chain(&mut self, readable: &[(u64, u32)], writable: &[(u64, u32)]) -> Result<u16> {
        self.queue
            .add_chain(readable, writable)
            .map_err(|e| self.err(e))
    }

    fn pop_used(&mut self) -> Result<Option<(u16, u32)>> {
        self.queue.pop_used().map_err(|e| self.err(e))
    }

    fn kick(&self) -> Result<()> {
        match self.kick.write(1) {
            // The counter is saturated: the device has a notification pending anyway.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other.map_err(event_err("kicking a virtqueue")),
        }
    }

    fn kick_if_needed(&self) -> Result<()> {
        if self.queue.needs_kick() {
            self.kick()
        } else {
            Ok(())
        }
    }

    /// Resets the call eventfd's counter.
    fn clear_call(&self) {
        // EAGAIN just means no interrupt was pending.
        let _ = self.call.read();
    }

    /// An epoll instance watching the call eventfd, for blocking waits.
    fn waiter(&self) -> Result<Epoll> {
        let epoll = Epoll::new().map_err(event_err("creating an epoll instance"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, u64::from(self.index)),
            )
            .map_err(event_err("watching a call eventfd"))?;
        Ok(epoll)
    }
}

/// Ends a vhost-user handshake the daemon does not answer. `SO_RCVTIMEO` alone cannot: the
/// vhost crate retries the `EAGAIN` it produces, so a daemon that accepted the connection but
/// never replies (it serves another frontend on this socket, or it is stopped) would block
/// `connect` for ever. At the deadline the socket is shut down, so the pending receive sees
/// end-of-file and the step in progress fails.
struct HandshakeDeadline {
    cancel: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<bool>,
}

impl HandshakeDeadline {
    fn arm(stream: UnixStream, timeout: Duration) -> io::Result<Self> {
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vrdma-handshake".into())
            .spawn(move || match cancelled.recv_timeout(timeout) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    true
                }
                _ => false,
            })?;
        Ok(HandshakeDeadline { cancel, thread })
    }

    /// Stops the clock. Returns whether it had run out (the socket is then shut down).
    fn disarm(self) -> bool {
        let _ = self.cancel.send(());
        self.thread.join().unwrap_or(true)
    }
}

/// Epoll token of the vhost-user socket in the control queue's waiter.
const HANGUP_TOKEN: u64 = u64::MAX;

/// Adds the vhost-user socket `fd` to `epoll`, reporting only the daemon hanging up (not the
/// replies it sends, which are read synchronously elsewhere).
fn watch_hangup(epoll: &Epoll, fd: RawFd) -> Result<()> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::READ_HANG_UP, HANGUP_TOKEN),
        )
        .map_err(event_err("watching the vhost-user socket"))
}

/// Waits until `epoll` reports its fd readable or `deadline` passes; `false` on timeout.
fn wait_until(epoll: &Epoll, deadline: Instant) -> Result<bool> {
    let mut events = [EpollEvent::default(); 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        // Round up so a sub-millisecond remainder still waits instead of spinning.
        let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
        match epoll.wait(ms, &mut events) {
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(event_err("waiting for the device")(e)),
        }
    }
}

#[derive(Debug)]
struct ControlQueue {
    vq: Vq,
    waiter: Epoll,
    request: DmaBuf,
    response: DmaBuf,
    broken: bool,
    /// Buffers of commands that never completed: the device may still write them, so they are
    /// never returned to the allocator.
    quarantine: Vec<DmaBuf>,
}

#[derive(Debug)]
struct EventQueue {
    vq: Vq,
    buffers: DmaBuf,
    slot_of_head: Vec<Option<u16>>,
}

impl EventQueue {
    fn post(&mut self, slot: u16) -> Result<()> {
        let addr = self.buffers.addr() + (usize::from(slot) * event::SIZE) as u64;
        let head = self.vq.add_chain(&[], &[(addr, event::SIZE as u32)])?;
        self.slot_of_head[usize::from(head)] = Some(slot);
        Ok(())
    }
}

/// A doorbell virtqueue. Its interrupts are off (`VRING_AVAIL_F_NO_INTERRUPT`) except while
/// the driver waits for a free slot: batches are reclaimed when the next ones are posted, so
/// an interrupt per batch would only cost the daemon a system call.
#[derive(Debug)]
struct DoorbellQueue {
    vq: Vq,
    waiter: Epoll,
    buffers: DmaBuf,
    free_slots: Vec<u16>,
    slot_of_head: Vec<Option<u16>>,
}

impl DoorbellQueue {
    /// Takes back the batches the device has consumed.
    fn reclaim(&mut self) -> Result<()> {
        while let Some((head, _)) = self.vq.pop_used()? {
            if let Some(slot) = self.slot_of_head[usize::from(head)].take() {
                self.free_slots.push(slot);
            }
        }
        Ok(())
    }
}

/// The regions registered with the device, and the connection used to change them.
struct Memory {
    frontend: Frontend,
    regions: Vec<Arc<SharedMemory>>,
    /// `CONFIGURE_MEM_SLOTS` was negotiated: regions go one by one.
    slots: bool,
    max_slots: u64,
}

impl Memory {
    fn table_err(
        socket: &Path,
        action: &'static str,
        mem: &SharedMemory,
    ) -> impl FnOnce(vhost::Error) -> VirtioUserError {
        let (socket, base, len) = (socket.to_owned(), mem.addr(), mem.len() as u64);
        move |source| VirtioUserError::MemoryTable {
            socket,
            action,
            base,
            len,
            source,
        }
    }

    fn add(&mut self, socket: &Path, mem: Arc<SharedMemory>) -> Result<()> {
        if self.regions.iter().any(|r| r.addr() == mem.addr()) {
            return Err(VirtioUserError::AlreadyRegistered { base: mem.addr() });
        }
        if self.regions.len() as u64 >= self.max_slots {
            return Err(VirtioUserError::TooManyRegions {
                socket: socket.to_owned(),
                max: self.max_slots,
            });
        }
        if self.slots {
            self.frontend
                .add_mem_region(&mem.region_info())
                .map_err(Self::table_err(socket, "register", &mem))?;
        } else {
            let table: Vec<_> = self
                .regions
                .iter()
                .chain(std::iter::once(&mem))
                .map(|r| r.region_info())
                .collect();
            self.frontend
                .set_mem_table(&table)
                .map_err(Self::table_err(socket, "register", &mem))?;
        }
        log::debug!(
            "registered shared memory {:?} ({:#x}, {} bytes) with {}",
            mem.name(),
            mem.addr(),
            mem.len(),
            socket.display()
        );
        self.regions.push(mem);
        Ok(())
    }

    /// The region holding `addr`, as its first address and length.
    fn region_holding(&self, addr: u64) -> Option<(u64, u64)> {
        self.regions
            .iter()
            .find(|r| r.contains(addr, 1))
            .map(|r| (r.addr(), r.len() as u64))
    }

    fn remove(&mut self, socket: &Path, base: u64) -> Result<Arc<SharedMemory>> {
        let idx = self
            .regions
            .iter()
            .position(|r| r.addr() == base)
            .ok_or(VirtioUserError::NotRegistered { base })?;
        let mem = self.regions[idx].clone();
        if self.slots {
            self.frontend
                .remove_mem_region(&mem.region_info())
                .map_err(Self::table_err(socket, "unregister", &mem))?;
        } else {
            let table: Vec<_> = self
                .regions
                .iter()
                .filter(|r| r.addr() != base)
                .map(|r| r.region_info())
                .collect();
            if table.is_empty() {
                // SET_MEM_TABLE cannot express an empty table; the rings keep one region
                // registered while the transport lives, so this is only reachable for a
                // transport without queues.
                return Err(VirtioUserError::RegionInUse { base, live: 0 });
            }
            self.frontend
                .set_mem_table(&table)
                .map_err(Self::table_err(socket, "unregister", &mem))?;
        }
        self.regions.remove(idx);
        log::debug!(
            "unregistered shared memory at {base:#x} from {}",
            socket.display()
        );
        Ok(mem)
    }
}

/// A vrdma device reached over vhost-user from this process.
pub struct VirtioUser {
    /// The socket of the daemon serving the device; changes when the VM migrates.
    socket: RwLock<PathBuf>,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Config,
    timeout: Duration,
    grow_size: usize,
    seal: bool,
    dma: DmaAllocator,
    memory: Mutex<Memory>,
    control: Mutex<ControlQueue>,
    events: Mutex<EventQueue>,
    event_fd: RawFd,
    doorbells: Vec<Mutex<DoorbellQueue>>,
    /// The vhost-user socket (owned by `memory`'s frontend), to notice the daemon going away.
    socket_fd: AtomicI32,
    /// Watches `socket_fd` for a hang-up only.
    hangup: Epoll,
}

impl fmt::Debug for VirtioUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioUser")
            .field("socket", &self.socket)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("doorbell_queues", &self.doorbells.len())
            .finish_non_exhaustive()
    }
}

struct Handshake<'a> {
    socket: &'a Path,
    frontend: Frontend,
}

impl Handshake<'_> {
    fn step<T>(&self, step: impl Into<String>, result: vhost::Result<T>) -> Result<T> {
        result.map_err(|source| VirtioUserError::Handshake {
            socket: self.socket.to_owned(),
            step: step.into(),
            source,
        })
    }
}

/// What `SET_VRING_ADDR` says of `vq`.
fn vring_config(vq: &Vq) -> VringConfigData {
    let size = vq.queue.size();
    let a = vq.queue.addresses();
    VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: 0,
        desc_table_addr: a.desc,
        used_ring_addr: a.used,
        avail_ring_addr: a.avail,
        log_addr: None,
    }
}

impl Handshake<'_> {
    fn setup_vring(&mut self, vq: &Vq) -> Result<()> {
        let (i, q) = (usize::from(vq.index), vq.index);
        let size = vq.queue.size();
        let a = vq.queue.addresses();
        let ring = vring_config(vq);
        let r = self.frontend.set_vring_num(i, size);
        self.step(format!("SET_VRING_NUM (queue {q}, size {size})"), r)?;
        let r = self.frontend.set_vring_addr(i, &ring);
        self.step(format!("SET_VRING_ADDR (queue {q})"), r)?;
        let r = self.frontend.set_vring_base(i, 0);
        self.step(format!("SET_VRING_BASE (queue {q})"), r)?;
        let r = self.frontend.set_vring_call(i, &vq.call);
        self.step(format!("SET_VRING_CALL (queue {q})"), r)?;
        let r = self.frontend.set_vring_kick(i, &vq.kick);
        self.step(format!("SET_VRING_KICK (queue {q})"), r)?;
        let r = self.frontend.set_vring_enable(i, true);
        self.step(format!("SET_VRING_ENABLE (queue {q})"), r)?;
        log::debug!(
            "{}: queue {q} ({}) ready: {size} entries, desc {:#x}, avail {:#x}, used {:#x}",
            self.socket.display(),
            vq.role,
            a.desc,
            a.avail,
            a.used
        );
        Ok(())
    }
}

impl Handshake<'_> {
    /// Stops `vq` (`GET_VRING_BASE`) and checks where the device says it stopped.
    fn stop_vring(&self, vq: &Vq) -> Result<StoppedRing> {
        let q = vq.index;
        let r = self.frontend.get_vring_base(usize::from(q));
        let reported = self.step(format!("GET_VRING_BASE (queue {q})"), r)?;
        let next_avail = vq.queue.check_stopped_at(reported).map_err(|e| vq.err(e))?;
        // Read after the ring stopped: the device changes the flag only on a running ring.
        let no_notify = !vq.queue.needs_kick();
        Ok(StoppedRing {
            queue: q,
            next_avail,
            no_notify,
        })
    }

    /// Starts `vq` again where the device stopped, in the order QEMU's `vhost_dev_start` uses
    /// on resume: `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE`, `SET_VRING_KICK`,
    /// `SET_VRING_CALL`, `SET_VRING_ENABLE`. The backend takes the used index from the used
    /// ring in shared memory (at `SET_VRING_ADDR`) and starts the ring once it has a kick.
    fn restart_vring(&mut self, vq: &Vq, next_avail: u16) -> Result<()> {
        let (i, q) = (usize::from(vq.index), vq.index);
        let size = vq.queue.size();
        let r = self.frontend.set_vring_num(i, size);
        self.step(format!("SET_VRING_NUM (queue {q}, size {size})"), r)?;
        let r = self.frontend.set_vring_addr(i, &vring_config(vq));
        self.step(format!("SET_VRING_ADDR (queue {q})"), r)?;
        let r = self.frontend.set_vring_base(i, next_avail);
        self.step(format!("SET_VRING_BASE (queue {q}, {next_avail})"), r)?;
        let r = self.frontend.set_vring_kick(i, &vq.kick);
        self.step(format!("SET_VRING_KICK (queue {q})"), r)?;
        let r = self.frontend.set_vring_call(i, &vq.call);
        self.step(format!("SET_VRING_CALL (queue {q})"), r)?;
        let r = self.frontend.set_vring_enable(i, true);
        self.step(format!("SET_VRING_ENABLE (queue {q})"), r)?;
        Ok(())
    }
}

/// One virtqueue as [`VirtioUser::pause_rings`] found it when the device stopped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoppedRing {
    /// The virtqueue (`vrdma_proto::queue` numbering).
    pub queue: u16,
    /// The device's next available index (`GET_VRING_BASE`'s answer), given back with
    /// `SET_VRING_BASE` on resume.
    pub next_avail: u16,
    /// The device had set `VRING_USED_F_NO_NOTIFY` (it polled the queue): a driver following
    /// the protocol does not kick it until the device clears the flag.
    pub no_notify: bool,
}

/// Every queue of a transport, held ([`VirtioUser::hold`]).
struct Held<'a> {
    control: MutexGuard<'a, ControlQueue>,
    events: MutexGuard<'a, EventQueue>,
    doorbells: Vec<MutexGuard<'a, DoorbellQueue>>,
    memory: MutexGuard<'a, Memory>,
}

impl Held<'_> {
    /// The virtqueues in index order: control, event, doorbells.
    fn vqs(&self) -> Vec<&Vq> {
        [&self.control.vq, &self.events.vq]
            .into_iter()
            .chain(self.doorbells.iter().map(|dq| &dq.vq))
            .collect()
    }
}

/// `SET_VRING_ADDR`'s description of `vq`, with `VHOST_VRING_F_LOG` and the used ring as its
/// log address when `log`.
fn logged(vq: &Vq, log: bool) -> VringConfigData {
    let mut ring = vring_config(vq);
    if log {
        ring.flags = VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits();
        ring.log_addr = Some(ring.used_ring_addr);
    }
    ring
}

/// `SET_LOG_BASE`: the log is the `size` bytes of `fd` from offset 0.
fn set_log_base(hs: &Handshake<'_>, (fd, size): (BorrowedFd<'_>, u64)) -> Result<()> {
    let region = VhostUserDirtyLogRegion {
        mmap_size: size,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
    };
    let r = hs.frontend.set_log_base(0, Some(region));
    hs.step(format!("SET_LOG_BASE ({size} bytes)"), r)
}

/// Turns the device's dirty log on (`log`) or off, as QEMU's `vhost_migration_log` does on
/// running rings: with a log, `SET_LOG_BASE` (`size` bytes from offset 0); then
/// `SET_FEATURES` (`features`, plus `VHOST_F_LOG_ALL` with a log); then `SET_VRING_ADDR` with
/// or without the log flag for every ring of `vqs`.
fn set_logging(
    hs: &Handshake<'_>,
    vqs: &[&Vq],
    features: u64,
    log: Option<(BorrowedFd<'_>, u64)>,
) -> Result<()> {
    let mut features = features;
    if let Some(log) = log {
        set_log_base(hs, log)?;
        features |= VhostUserVirtioFeatures::LOG_ALL.bits();
    }
    let r = hs.frontend.set_features(features);
    hs.step(format!("SET_FEATURES ({features:#x})"), r)?;
    for vq in vqs {
        let r = hs
            .frontend
            .set_vring_addr(usize::from(vq.index), &logged(vq, log.is_some()));
        hs.step(format!("SET_VRING_ADDR (queue {})", vq.index), r)?;
    }
    Ok(())
}

fn read_config(socket: &Path, frontend: &mut Frontend) -> Result<Config> {
    let size = std::mem::size_of::<Config>();
    let buf = vec![0u8; size];
    let (_, payload) = frontend
        .get_config(0, size as u32, VhostUserConfigFlags::empty(), &buf)
        .map_err(|source| VirtioUserError::Handshake {
            socket: socket.to_owned(),
            step: "GET_CONFIG".into(),
            source,
        })?;
    Config::decode(&payload).map_err(|source| VirtioUserError::BadConfig {
        socket: socket.to_owned(),
        source,
    })
}

impl VirtioUser {
    /// Connects to the vhost-user socket of a vrdma daemon and brings the device up (see the
    /// module documentation for the exact sequence).
    pub fn connect(socket: impl AsRef<Path>, options: Options) -> Result<Self> {
        let socket = socket.as_ref().to_path_buf();
        let size = options.queue_size;
        if size == 0 || size > queue::MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(VirtioUserError::InvalidOption {
                option: "queue_size",
                reason: format!(
                    "{size} is not a power of two between 1 and {}",
                    queue::MAX_QUEUE_SIZE
                ),
            });
        }
        if options.timeout.is_zero() {
            return Err(VirtioUserError::InvalidOption {
                option: "timeout",
                reason: "it must be longer than zero".into(),
            });
        }

        let stream = UnixStream::connect(&socket).map_err(|source| VirtioUserError::Connect {
            socket: socket.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(options.timeout))
            .map_err(event_err("setting the vhost-user socket timeout"))?;
        let clock = stream
            .try_clone()
            .map_err(event_err("cloning the vhost-user socket"))?;
        let deadline = HandshakeDeadline::arm(clock, options.timeout)
            .map_err(event_err("starting the handshake timer"))?;
        let result = Self::bring_up(socket.clone(), &options, stream);
        if deadline.disarm() {
            if let Err(e) = &result {
                log::debug!("handshake with {} cut short: {e}", socket.display());
            }
            return Err(VirtioUserError::HandshakeTimeout {
                socket,
                timeout: options.timeout,
            });
        }
        result
    }

    /// The handshake of [`VirtioUser::connect`] on a connected `stream`.
    fn bring_up(socket: PathBuf, options: &Options, stream: UnixStream) -> Result<Self> {
        let size = options.queue_size;
        let max_queues = u64::from(queue::count(queue::MAX_DOORBELL_QUEUES));
        let mut hs = Handshake {
            socket: &socket,
            frontend: Frontend::from_stream(stream, max_queues),
        };
        log::debug!("connected to vhost-user socket {}", socket.display());

        hs.step("SET_OWNER", hs.frontend.set_owner())?;
        let offered = hs.step("GET_FEATURES", hs.frontend.get_features())?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        for (bit, feature) in [
            (features::VERSION_1, "VIRTIO_F_VERSION_1"),
            (protocol_bit, "VHOST_USER_F_PROTOCOL_FEATURES"),
        ] {
            if offered & bit == 0 {
                return Err(VirtioUserError::MissingFeature {
                    socket,
                    feature,
                    offered,
                });
            }
        }

        let r = hs.frontend.get_protocol_features();
        let protocol_offered = hs.step("GET_PROTOCOL_FEATURES", r)?;
        if !protocol_offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VirtioUserError::MissingProtocolFeature {
                socket,
                feature: "CONFIG",
                offered: protocol_offered.bits(),
            });
        }
        let protocol = protocol_offered
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::DEVICE_STATE);
        let r = hs.frontend.set_protocol_features(protocol);
        hs.step("SET_PROTOCOL_FEATURES", r)?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            hs.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let r = hs.frontend.get_queue_num();
            Some(hs.step("GET_QUEUE_NUM", r)?)
        } else {
            None
        };

        let acked = offered
            & (features::VERSION_1 | protocol_bit | (options.features & features::ALL_DEVICE));
        hs.step("SET_FEATURES", hs.frontend.set_features(acked))?;
        log::debug!(
            "{}: features offered {offered:#x}, acked {acked:#x}; protocol features offered \
             {:#x}, acked {:#x}",
            socket.display(),
            protocol_offered.bits(),
            protocol.bits()
        );

        let config = read_config(&socket, &mut hs.frontend)?;
        let announced = config.num_doorbell_queues.get();
        let mut num_doorbell = announced;
        if num_doorbell > 1 && acked & features::MULTI_DOORBELL == 0 {
            log::warn!(
                "{}: config announces {num_doorbell} doorbell queues but MULTI_DOORBELL was not \
                 negotiated; using one",
                socket.display()
            );
            num_doorbell = 1;
        }
        let num_queues = queue::count(num_doorbell);
        let offered_queues = queue_num.unwrap_or(max_queues);
        if num_doorbell > queue::MAX_DOORBELL_QUEUES || u64::from(num_queues) > offered_queues {
            return Err(VirtioUserError::QueueCount {
                socket,
                doorbell_queues: announced,
                needed: num_queues,
                offered: offered_queues,
            });
        }

        // Memory: the rings and buffers of every queue, plus what the caller asked for.
        let page = page_size();
        let round = |n: usize| n.next_multiple_of(page);
        let ring = round(SplitQueue::ring_bytes(size));
        let doorbell_slots = size.min(MAX_DOORBELL_SLOTS);
        let own = usize::from(num_queues) * ring
            + 2 * round(CONTROL_BUF_BYTES)
            + round(usize::from(size) * event::SIZE)
            + usize::from(num_doorbell) * round(usize::from(doorbell_slots) * DOORBELL_SLOT_BYTES);
        let total = own
            .checked_add(options.memory_size)
            .ok_or(VirtioUserError::InvalidOption {
                option: "memory_size",
                reason: "too large".into(),
            })?;
        let region = SharedMemory::create("vrdma-dma", total, options.seal_memory)
            .map_err(mem_err("creating the initial DMA memory"))?;
        let region = Arc::new(region);
        let dma = DmaAllocator::new();
        dma.add_fresh_region(region.clone())
            .map_err(mem_err("creating the initial DMA memory"))?;

        let slots = protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        let max_slots = if slots {
            let r = hs.frontend.get_max_mem_slots();
            hs.step("GET_MAX_MEM_SLOTS", r)?
        } else {
            MAX_ATTACHED_FD_ENTRIES as u64
        };
        let Handshake { frontend, .. } = hs;
        let mut memory = Memory {
            frontend,
            regions: Vec::new(),
            slots,
            max_slots,
        };
        memory.add(&socket, region)?;

        // Queues.
        let control_vq = Vq::new(queue::CONTROL, "control", &dma, size)?;
        let event_vq = Vq::new(queue::EVENT, "event", &dma, size)?;
        let doorbell_vqs = (0..num_doorbell)
            .map(|n| Vq::new(queue::FIRST_DOORBELL + n, "doorbell", &dma, size))
            .collect::<Result<Vec<_>>>()?;
        let mut hs = Handshake {
            socket: &socket,
            frontend: memory.frontend.clone(),
        };
        for vq in [&control_vq, &event_vq].into_iter().chain(&doorbell_vqs) {
            hs.setup_vring(vq)?;
        }

        let mut events = EventQueue {
            buffers: dma
                .alloc(usize::from(size) * event::SIZE)
                .map_err(mem_err("allocating event buffers"))?,
            slot_of_head: vec![None; usize::from(size)],
            vq: event_vq,
        };
        for slot in 0..size {
            events.post(slot)?;
        }
        events.vq.kick()?;
        let event_fd = events.vq.call.as_raw_fd();

        // The daemon hanging up wakes a command's wait at once instead of at its timeout.
        let socket_fd = memory.frontend.as_raw_fd();
        let hangup = Epoll::new().map_err(event_err("creating an epoll instance"))?;
        watch_hangup(&hangup, socket_fd)?;
        let waiter = control_vq.waiter()?;
        watch_hangup(&waiter, socket_fd)?;
        let control = ControlQueue {
            waiter,
            request: dma
                .alloc(CONTROL_BUF_BYTES)
                .map_err(mem_err("allocating control buffers"))?,
            response: dma
                .alloc(CONTROL_BUF_BYTES)
                .map_err(mem_err("allocating control buffers"))?,
            broken: false,
            quarantine: Vec::new(),
            vq: control_vq,
        };

        let mut doorbells = Vec::with_capacity(usize::from(num_doorbell));
        for vq in doorbell_vqs {
            let buffers = dma
                .alloc(usize::from(doorbell_slots) * DOORBELL_SLOT_BYTES)
                .map_err(mem_err("allocating doorbell buffers"))?;
            vq.queue.set_interrupts(false);
            doorbells.push(Mutex::new(DoorbellQueue {
                waiter: vq.waiter()?,
                buffers,
                free_slots: (0..doorbell_slots).rev().collect(),
                slot_of_head: vec![None; usize::from(size)],
                vq,
            }));
        }

        log::info!(
            "vrdma device at {} is up: {num_doorbell} doorbell queue(s) of {size} entries, \
             {} bytes of shared memory",
            socket.display(),
            total
        );
        Ok(VirtioUser {
            socket: RwLock::new(socket),
            features: acked,
            protocol,
            config,
            timeout: options.timeout,
            grow_size: options.grow_size,
            seal: options.seal_memory,
            dma,
            memory: Mutex::new(memory),
            control: Mutex::new(control),
            events: Mutex::new(events),
            event_fd,
            doorbells,
            socket_fd: AtomicI32::new(socket_fd),
            hangup,
        })
    }

    /// The vhost-user socket this transport is connected to (after a migration, the
    /// destination's).
    pub fn socket(&self) -> PathBuf {
        self.socket_path()
    }

    fn socket_path(&self) -> PathBuf {
        self.socket
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The vhost-user protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// The allocator over the transport's shared memory.
    pub fn dma(&self) -> &DmaAllocator {
        &self.dma
    }

    /// The regions registered with the device.
    pub fn regions(&self) -> Vec<Arc<SharedMemory>> {
        lock(&self.memory, "memory table")
            .map(|m| m.regions.clone())
            .unwrap_or_default()
    }

    /// Pauses and resumes the device as a VMM does when it pauses and resumes a VM (QEMU's
    /// `vhost_dev_stop` and `vhost_dev_start`): stops every virtqueue with `GET_VRING_BASE`,
    /// remembering the next available index the device returns, calls `while_paused` with
    /// what it found, then starts every virtqueue again with `SET_VRING_NUM`,
    /// `SET_VRING_ADDR`, `SET_VRING_BASE` (the remembered index), `SET_VRING_KICK`,
    /// `SET_VRING_CALL` and `SET_VRING_ENABLE`. Queues go in index order both times.
    ///
    /// As with a paused vCPU, the driver touches no virtqueue meanwhile: every queue's lock is
    /// held from the first stop to the last start, so other threads' commands, doorbells and
    /// event draining wait (work requests they post into QP rings do not). `while_paused`
    /// must therefore not use this transport. The driver's ring state is kept, as a guest's
    /// is: each index the device returns is checked against it
    /// ([`SplitQueue::check_stopped_at`]), and an index outside it fails the call with the
    /// rings left stopped, as does a refused request.
    pub fn pause_rings<R>(&self, while_paused: impl FnOnce(&[StoppedRing]) -> R) -> Result<R> {
        let held = self.hold()?;
        let vqs = held.vqs();
        let mut hs = Handshake {
            socket: &self.socket_path(),
            frontend: held.memory.frontend.clone(),
        };
        let stopped = vqs
            .iter()
            .map(|vq| hs.stop_vring(vq))
            .collect::<Result<Vec<_>>>()?;
        let result = while_paused(&stopped);
        for (vq, ring) in vqs.iter().zip(&stopped) {
            hs.restart_vring(vq, ring.next_avail)?;
        }
        Ok(result)
    }

    /// Kicks doorbell queue `queue` with no doorbell on it: what a broken or hostile driver does,
    /// for tests of the device's defences (the daemon mutes a VM whose kicks bring nothing).
    pub fn kick_with_no_doorbell(&self, queue: u16) -> Result<()> {
        let count = self.num_doorbell_queues();
        let dq = self
            .doorbells
            .get(usize::from(queue))
            .ok_or(VirtioUserError::NoSuchDoorbellQueue { queue, count })?;
        lock(dq, "doorbell queue")?.vq.kick()
    }

    /// Turns on the device's dirty-page log, with the messages QEMU sends when a live migration
    /// starts (`vhost_migration_log`): `SET_LOG_BASE` with `log` (`size` bytes from offset
    /// 0), `SET_FEATURES` with the features negotiated at connect time plus
    /// `VHOST_F_LOG_ALL`, then for every virtqueue, in index order, `SET_VRING_ADDR` with
    /// `VHOST_VRING_F_LOG` and the used ring as the log address. From then on the device sets
    /// the bit of every page it writes: page `gpa / 4096` is bit `page % 8` of byte
    /// `page / 8` of `log`. The log must cover every region registered now or later while it
    /// is on (the daemon refuses a region past its end); guest-physical addresses are this
    /// process's virtual addresses, so make `log` a sparse memfd (its pages are allocated as
    /// the device marks them).
    ///
    /// The rings keep running, as a migrating VM's do, and the device may go on returning
    /// descriptors on them (the daemon leaves a started ring's indices alone on
    /// `SET_VRING_ADDR`); the driver's queues are locked meanwhile, as in
    /// [`VirtioUser::pause_rings`]. Needs `LOG_SHMFD`, which `connect` accepts whenever the
    /// daemon offers it.
    pub fn start_dirty_log(&self, log: BorrowedFd<'_>, size: u64) -> Result<()> {
        if !self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(VirtioUserError::MissingProtocolFeature {
                socket: self.socket_path(),
                feature: "LOG_SHMFD",
                offered: self.protocol.bits(),
            });
        }
        self.set_dirty_log(Some((log, size)))
    }

    /// Turns the dirty-page log off again, with the messages QEMU sends when a migration ends
    /// or is cancelled (`vhost_dev_set_log(false)`): `SET_FEATURES` with the negotiated
    /// features (without `VHOST_F_LOG_ALL`), then for every virtqueue `SET_VRING_ADDR`
    /// without `VHOST_VRING_F_LOG`. Once it returns the device marks nothing more in the log
    /// (the caller may then unmap or reuse it). The rings keep running, as for
    /// [`VirtioUser::start_dirty_log`].
    pub fn stop_dirty_log(&self) -> Result<()> {
        self.set_dirty_log(None)
    }

    fn set_dirty_log(&self, log: Option<(BorrowedFd<'_>, u64)>) -> Result<()> {
        let held = self.hold()?;
        let hs = Handshake {
            socket: &self.socket_path(),
            frontend: held.memory.frontend.clone(),
        };
        set_logging(&hs, &held.vqs(), self.features, log)
    }

    /// Holds every queue of the transport, in the order the driver's own paths take their
    /// locks (a command may register memory): other threads' commands, doorbells and event
    /// draining wait until the [`Held`] is dropped, as a VM's do while its vCPUs are stopped.
    fn hold(&self) -> Result<Held<'_>> {
        let control = lock(&self.control, "control queue")?;
        let events = lock(&self.events, "event queue")?;
        let doorbells = self
            .doorbells
            .iter()
            .map(|dq| lock(dq, "doorbell queue"))
            .collect::<Result<Vec<_>>>()?;
        let memory = lock(&self.memory, "memory table")?;
        Ok(Held {
            control,
            events,
            doorbells,
            memory,
        })
    }

    /// Fails with [`VirtioUserError::Disconnected`] if the daemon has closed the connection.
    /// One non-blocking `epoll_wait`.
    fn check_connected(&self) -> Result<()> {
        let mut events = [EpollEvent::default(); 1];
        match self.hangup.wait(0, &mut events) {
            Ok(0) => Ok(()),
            Ok(_) => Err(VirtioUserError::Disconnected {
                socket: self.socket_path(),
            }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(event_err("checking the vhost-user connection")(e)),
        }
    }

    fn quarantine(cq: &mut ControlQueue, bufs: [Option<DmaBuf>; 2]) {
        cq.broken = true;
        cq.quarantine.extend(bufs.into_iter().flatten());
    }
}

impl Transport for VirtioUser {
    type Error = VirtioUserError;

    fn config(&self) -> &Config {
        &self.config
    }

    fn read_config(&self) -> Result<Config> {
        let mut memory = lock(&self.memory, "memory table")?;
        read_config(&self.socket_path(), &mut memory.frontend)
    }

    fn features(&self) -> u64 {
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn num_doorbell_queues(&self) -> u16 {
        // At most MAX_DOORBELL_QUEUES, checked at connect time.
        self.doorbells.len() as u16
    }

    fn control(&self, request: &[u8], response: &mut [u8]) -> Result<usize> {
        if request.is_empty() {
            return Err(VirtioUserError::EmptyRequest);
        }
        let req_len = u32::try_from(request.len()).map_err(|_| VirtioUserError::TooLong {
            what: "control request",
            len: request.len(),
        })?;
        let resp_len = u32::try_from(response.len()).map_err(|_| VirtioUserError::TooLong {
            what: "control response buffer",
            len: response.len(),
        })?;
        let mut cq = lock(&self.control, "control queue")?;
        if cq.broken {
            return Err(VirtioUserError::ControlQueueBroken {
                socket: self.socket_path(),
            });
        }
        self.check_connected()?;
        // Commands larger than the standing buffers (REG_MR page lists) get their own.
        let big_req = if request.len() > cq.request.len() {
            Some(self.alloc_dma(request.len(), DMA_GRANULE)?)
        } else {
            None
        };
        let big_resp = if response.len() > cq.response.len() {
            Some(self.alloc_dma(response.len(), DMA_GRANULE)?)
        } else {
            None
        };
        let req_buf = big_req.as_ref().unwrap_or(&cq.request);
        let resp_buf = big_resp.as_ref().unwrap_or(&cq.response);
        req_buf
            .write_at(0, request)
            .map_err(mem_err("copying a control request"))?;
        let readable = [(req_buf.addr(), req_len)];
        let writable = [(resp_buf.addr(), resp_len)];
        let writable: &[(u64, u32)] = if response.is_empty() { &[] } else { &writable };

        cq.vq.clear_call();
        let head = cq.vq.add_chain(&readable, writable)?;
        cq.vq.kick_if_needed()?;

        let deadline = Instant::now() + self.timeout;
        let used = loop {
            match cq.vq.pop_used() {
                Ok(Some(used)) => break used,
                Ok(None) => {}
                Err(e) => {
                    Self::quarantine(&mut cq, [big_req, big_resp]);
                    return Err(e);
                }
            }
            // The waiter also wakes when the daemon hangs up; no answer will come then.
            if let Err(e) = self.check_connected() {
                Self::quarantine(&mut cq, [big_req, big_resp]);
                return Err(e);
            }
            if !wait_until(&cq.waiter, deadline)? {
                log::error!(
                    "control command (opcode bytes {:02x?}) timed out after {:?} on {}",
                    &request[..request.len().min(2)],
                    self.timeout,
                    self.socket_path().display()
                );
                Self::quarantine(&mut cq, [big_req, big_resp]);
                return Err(VirtioUserError::DeviceTimeout {
                    socket: self.socket_path(),
                    timeout: self.timeout,
                });
            }
            cq.vq.clear_call();
        };
        let (used_head, written) = used;
        if used_head != head {
            // One command is in flight at a time, so any other head is a device bug.
            Self::quarantine(&mut cq, [big_req, big_resp]);
            return Err(cq.vq.err(QueueError::BadUsedId {
                id: used_head.into(),
                size: cq.vq.queue.size(),
            }));
        }
        let len = written as usize;
        if len > response.len() {
            return Err(VirtioUserError::ResponseOverrun {
                written,
                capacity: response.len(),
            });
        }
        let resp_buf = big_resp.as_ref().unwrap_or(&cq.response);
        resp_buf
            .read_at(0, &mut response[..len])
            .map_err(mem_err("copying a control response"))?;
        Ok(len)
    }

    fn ring_doorbells(&self, queue: u16, doorbells: &[Doorbell]) -> Result<()> {
        let count = self.num_doorbell_queues();
        let dq = self
            .doorbells
            .get(usize::from(queue))
            .ok_or(VirtioUserError::NoSuchDoorbellQueue { queue, count })?;
        // A doorbell nobody will ever read must fail now: work posted after the daemon died
        // would otherwise wait for completions for ever.
        self.check_connected()?;
        let mut dq = lock(dq, "doorbell queue")?;
        let mut deadline = None;
        let mut unkicked = false;
        for batch in doorbells.chunks(doorbell::MAX_BATCH) {
            let slot = loop {
                dq.reclaim()?;
                if let Some(slot) = dq.free_slots.pop() {
                    break slot;
                }
                // Full: make sure the device knows about what is queued, then wait for it,
                // with interrupts on just for that wait (see `DoorbellQueue`).
                if unkicked {
                    dq.vq.kick()?;
                    unkicked = false;
                }
                dq.vq.queue.set_interrupts(true);
                dq.reclaim()?;
                if let Some(slot) = dq.free_slots.pop() {
                    dq.vq.queue.set_interrupts(false);
                    break slot;
                }
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.timeout);
                let woken = wait_until(&dq.waiter, deadline);
                dq.vq.queue.set_interrupts(false);
                if !woken? {
                    return Err(VirtioUserError::DoorbellTimeout {
                        socket: self.socket_path(),
                        queue,
                        timeout: self.timeout,
                    });
                }
                dq.vq.clear_call();
            };
            let offset = usize::from(slot) * DOORBELL_SLOT_BYTES;
            let bytes = batch.as_bytes();
            dq.buffers
                .write_at(offset, bytes)
                .map_err(mem_err("copying doorbells"))?;
            let addr = dq.buffers.addr() + offset as u64;
            // A batch is at most MAX_BATCH * 8 = 512 bytes.
            let head = match dq.vq.add_chain(&[(addr, bytes.len() as u32)], &[]) {
                Ok(head) => head,
                Err(e) => {
                    dq.free_slots.push(slot);
                    return Err(e);
                }
            };
            dq.slot_of_head[usize::from(head)] = Some(slot);
            unkicked = true;
        }
        if unkicked {
            dq.vq.kick_if_needed()?;
        }
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        self.event_fd
    }

    fn hangup_fd(&self) -> Option<RawFd> {
        Some(self.socket_fd.load(Ordering::Relaxed))
    }

    fn drain_events(&self) -> Result<Vec<DeviceEvent>> {
        let mut eq = lock(&self.events, "event queue")?;
        // Reset the interrupt first: events used after this point signal it again.
        eq.vq.clear_call();
        let mut out = Vec::new();
        let mut reposted = false;
        while let Some((head, written)) = eq.vq.pop_used()? {
            let Some(slot) = eq.slot_of_head[usize::from(head)].take() else {
                continue;
            };
            let offset = usize::from(slot) * event::SIZE;
            if written as usize >= event::SIZE {
                let mut bytes = [0u8; event::SIZE];
                eq.buffers
                    .read_at(offset, &mut bytes)
                    .map_err(mem_err("copying an event"))?;
                match event::Event::decode(&bytes) {
                    Ok((kind, handle)) => out.push(DeviceEvent { kind, handle }),
                    Err(e) => log::warn!(
                        "ignoring a malformed event from {}: {e}",
                        self.socket_path().display()
                    ),
                }
            } else {
                log::warn!(
                    "ignoring an event buffer the device returned with {written} bytes from {}",
                    self.socket_path().display()
                );
            }
            eq.post(slot)?;
            reposted = true;
        }
        if reposted {
            eq.vq.kick_if_needed()?;
        }
        if out.is_empty() {
            // Events delivered before a hang-up are handed over first.
            self.check_connected()?;
        }
        Ok(out)
    }

    fn alloc_dma(&self, len: usize, align: usize) -> Result<DmaBuf> {
        match self.dma.alloc_aligned(len, align) {
            Err(MemError::OutOfSpace { .. }) if self.grow_size > 0 => {
                let size = len
                    .checked_add(align)
                    .map(|needed| needed.max(self.grow_size))
                    .ok_or(VirtioUserError::Memory {
                        what: "growing the DMA memory",
                        source: MemError::InvalidLength { len },
                    })?;
                let region = SharedMemory::create("vrdma-dma", size, self.seal)
                    .map_err(mem_err("growing the DMA memory"))?;
                let region = Arc::new(region);
                self.add_memory(region.clone())?;
                self.dma
                    .add_fresh_region(region)
                    .map_err(mem_err("growing the DMA memory"))?;
                self.dma
                    .alloc_aligned(len, align)
                    .map_err(mem_err("allocating DMA memory"))
            }
            other => other.map_err(mem_err("allocating DMA memory")),
        }
    }

    fn add_memory(&self, mem: Arc<SharedMemory>) -> Result<()> {
        lock(&self.memory, "memory table")?.add(&self.socket_path(), mem)
    }

    fn remove_memory(&self, base: u64) -> Result<()> {
        let mut memory = lock(&self.memory, "memory table")?;
        if !memory.regions.iter().any(|r| r.addr() == base) {
            return Err(VirtioUserError::NotRegistered { base });
        }
        // Take the region away from the allocator first so nothing is allocated in it while
        // the device forgets it; put it back if the device refuses.
        let managed = match self.dma.remove_region(base) {
            Ok(region) => Some(region),
            Err(MemError::NoSuchRegion { .. }) => None,
            Err(MemError::RegionBusy { live, .. }) => {
                return Err(VirtioUserError::RegionInUse { base, live });
            }
            Err(e) => return Err(mem_err("removing DMA memory")(e)),
        };
        if let Err(e) = memory.remove(&self.socket_path(), base) {
            if let Some(region) = managed {
                let _ = self.dma.add_region(region);
            }
            return Err(e);
        }
        Ok(())
    }

    fn is_shared(&self, addr: u64, len: u64) -> bool {
        let Ok(memory) = lock(&self.memory, "memory table") else {
            return false;
        };
        super::covered_by_regions(addr, len, |at| memory.region_holding(at))
    }

    fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        lock(&self.memory, "memory table")
            .ok()?
            .region_holding(addr)
    }

    /// Guest-physical addresses are this process's addresses: the memory table maps each
    /// region at its own address.
    fn device_addr(&self, addr: u64, len: u64) -> Option<u64> {
        self.is_shared(addr, len).then_some(addr)
    }
}

#[cfg(test)]
mod connect_hint_tests {
    use super::*;

    /// A socket this user may not open points at the daemon's socket access options; a missing
    /// one still asks whether the daemon runs (a test as root cannot be refused by a mode, so
    /// the errors are made here).
    #[test]
    fn permission_denied_names_owner_group_and_mode() {
        let socket = PathBuf::from("/run/vrdma/vm1.sock");
        let denied = VirtioUserError::Connect {
            socket: socket.clone(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        }
        .to_string();
        for needle in ["owner=", "group=", "mode=", "socket=/run/vrdma/vm1.sock"] {
            assert!(denied.contains(needle), "{denied}");
        }
        assert!(!denied.contains("running"), "{denied}");
        let missing = VirtioUserError::Connect {
            socket,
            source: io::Error::from(io::ErrorKind::NotFound),
        }
        .to_string();
        assert!(missing.contains("is vhost-user-rdma running"), "{missing}");
    }
}
