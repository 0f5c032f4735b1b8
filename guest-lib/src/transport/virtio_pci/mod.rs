//! virtio-pci: the vrdma device as a PCI function of a real virtual machine, driven from user
//! space in the guest.
//!
//! [`VirtioPci::open`] finds the function (1af4:106a) in sysfs, enables it with bus mastering,
//! maps the modern virtio-pci capabilities (common configuration, notification, ISR, device
//! configuration) from its `resourceN` files, performs the feature handshake (`ACKNOWLEDGE`,
//! `DRIVER`, `FEATURES_OK`), reads the configuration space, sets up the control, event and
//! doorbell virtqueues in locked memory addressed by guest-physical address (see `pinned.rs`)
//! and sets `DRIVER_OK`.
//!
//! Memory: the library's rings and buffers (`alloc_dma`) come from 2 MiB huge pages, each
//! physically contiguous, so a ring of up to 2 MiB is one stretch for the device; without
//! reserved huge pages, base pages, and then only rings of up to a page can be created.
//! Application memory (`add_memory`) is locked and translated page by page; memory regions
//! over it get page lists of guest-physical addresses. Control commands poll the used ring.
//! Device events: when `uio_pci_generic` is loaded the function is bound to it and
//! [`Transport::event_fd`] is `/dev/uioN`, readable when the device raises its interrupt
//! (see `uio.rs`); otherwise it is a timer that fires every millisecond, so event waiters poll.
//! Needs root (sysfs `config`/`resourceN` writes, `mlock`, physical addresses in
//! `/proc/self/pagemap`), and one process at a time per function: opening resets it.

mod pci;
mod pinned;
mod uio;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use vrdma_proto::config::Config;
use vrdma_proto::doorbell::{self, Doorbell};
use vrdma_proto::{event, features, queue};
use zerocopy::IntoBytes;

use super::{DeviceEvent, Transport};
use crate::mem::{DmaAllocator, DmaBuf, HUGE_PAGE_SIZE, MemError, SharedMemory, page_size};
use crate::virtio::{QueueError, SplitQueue};
pub use pci::{DEVICE_ID, SYSFS_PCI_DEVICES, VENDOR_ID, find_devices};
use pci::{PciDevice, Windows};
use pinned::{Pinned, PinnedMemory};
use uio::Uio;

/// Device status bits (virtio 1.x §2.1).
const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

/// The ISR status bit of a configuration change (virtio 1.x §4.1.4.5).
const ISR_CONFIG: u8 = 2;

/// Common configuration offsets (virtio 1.x §4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Entries of the event and doorbell queues: each queue's rings must fit in one page, since
/// pages are not physically contiguous.
const QUEUE_SIZE: u16 = 16;
/// Entries of the control queue: room for a request of [`CONTROL_REQUEST_PAGES`] descriptors
/// and its response.
const CONTROL_QUEUE_SIZE: u16 = 64;
/// Pages of the control request buffer, one descriptor each: a `REG_MR` page list of up to
/// about 16,000 pages (64 MiB of base pages, 32 GiB of huge pages).
const CONTROL_REQUEST_PAGES: usize = 32;
/// Bytes of the control request buffer.
const CONTROL_BUF_BYTES: usize = CONTROL_REQUEST_PAGES * 4096;
/// Bytes of the control response buffer (one page).
const CONTROL_RESPONSE_BYTES: usize = 4096;
/// Bytes of one doorbell batch's buffer.
const DOORBELL_SLOT_BYTES: usize = doorbell::MAX_BATCH * doorbell::SIZE;
/// How often event waiters are woken to poll when the device's interrupt is not available.
const EVENT_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Bytes of locked memory the transport sets up for its queues and buffers: the control
/// queue's rings, request and response; the event queue's rings and buffers; each doorbell
/// queue's rings and batch buffers; a page to spare.
fn pinned_bytes(num_doorbell_queues: u16) -> usize {
    let page = page_size();
    let doorbell_buffers = (usize::from(QUEUE_SIZE) * DOORBELL_SLOT_BYTES).div_ceil(page);
    let pages = 1
        + CONTROL_BUF_BYTES.div_ceil(page)
        + 1
        + 2
        + 1
        + usize::from(num_doorbell_queues) * (1 + doorbell_buffers);
    pages * page
}

/// How to open the device.
#[derive(Debug, Clone)]
pub struct PciOptions {
    /// The function's sysfs directory; `None` takes the first vrdma device.
    pub device: Option<PathBuf>,
    /// How long to wait for a control command or a status change.
    pub timeout: Duration,
    /// Device feature bits (`vrdma_proto::features::*`) to accept if the device offers them.
    pub features: u64,
}

impl Default for PciOptions {
    fn default() -> Self {
        PciOptions {
            device: None,
            timeout: Duration::from_secs(10),
            features: features::ALL_DEVICE,
        }
    }
}

/// Why driving the PCI function failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// No vrdma function is present.
    #[error(
        "no vrdma PCI device ({VENDOR_ID:04x}:{DEVICE_ID:04x}) under {SYSFS_PCI_DEVICES}: start \
         the VM with -device vhost-user-rdma-pci"
    )]
    NoDevice,
    /// A sysfs file could not be used.
    #[error("{what} {}", path.display())]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// What was being done to it.
        what: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The virtio-pci capabilities are missing or malformed.
    #[error("the device's virtio-pci capabilities are unusable: {reason}")]
    BadCapability {
        /// What is wrong.
        reason: String,
    },
    /// The device refused a step of the initialisation.
    #[error("the device {step} (status {status:#x}); see the daemon's log")]
    Refused {
        /// What it refused.
        step: String,
        /// The device status read back.
        status: u8,
    },
    /// A required feature is not offered.
    #[error("the device does not offer {feature} (offered {offered:#x}): it is too old")]
    MissingFeature {
        /// The feature.
        feature: &'static str,
        /// What it offers.
        offered: u64,
    },
    /// The configuration space does not decode.
    #[error("the device's configuration space is invalid")]
    BadConfig(#[source] vrdma_proto::DecodeError),
    /// Memory for the device could not be set up.
    #[error("shared memory error while {what}")]
    Memory {
        /// What the transport was doing.
        what: &'static str,
        /// The memory error.
        #[source]
        source: MemError,
    },
    /// Memory could not be locked or translated.
    #[error("{what}")]
    Pin {
        /// What failed.
        what: &'static str,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A virtqueue operation failed.
    #[error("virtqueue {queue} failed")]
    Queue {
        /// The virtqueue index.
        queue: u16,
        /// The queue error.
        #[source]
        source: QueueError,
    },
    /// The device did not answer a control command in time.
    #[error(
        "the device did not complete a control command within {timeout:?}; the control queue \
         is unusable until the device is reopened (see the daemon's log)"
    )]
    Timeout {
        /// The timeout.
        timeout: Duration,
    },
    /// The device asked to be reset or failed.
    #[error("the device needs a reset (status {status:#x}): reopen it")]
    NeedsReset {
        /// The device status.
        status: u8,
    },
    /// A request or response does not fit the control buffers.
    #[error("a control {what} of {len} bytes exceeds the {CONTROL_BUF_BYTES}-byte buffer")]
    TooLong {
        /// Request or response.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// Waiting for or unmasking the interrupt failed.
    #[error("waiting for the device's interrupt on /dev/uio failed")]
    Interrupt(#[source] io::Error),
    /// Not implemented by this transport yet.
    #[error("{0} is not supported by the virtio-pci transport yet")]
    Unsupported(&'static str),
    /// A kernel driver other than `uio_pci_generic` drives the function.
    #[error(
        "{} is bound to the kernel driver {driver}; unbind it (echo ADDRESS > \
         /sys/bus/pci/drivers/{driver}/unbind) before driving it from user space",
        function.display()
    )]
    BoundElsewhere {
        /// The function's sysfs directory.
        function: PathBuf,
        /// The driver.
        driver: String,
    },
    /// A doorbell queue index out of range.
    #[error("doorbell queue {queue} does not exist (the device has {count})")]
    NoSuchDoorbellQueue {
        /// The index asked for.
        queue: u16,
        /// How many there are.
        count: u16,
    },
    /// The device took no doorbells off a full doorbell queue in time.
    #[error(
        "doorbell queue {queue} stayed full for {timeout:?}: the device is not consuming it \
         (see the daemon's log)"
    )]
    DoorbellTimeout {
        /// The doorbell queue.
        queue: u16,
        /// How long the driver waited.
        timeout: Duration,
    },
    /// `add_memory` of a region already added.
    #[error("memory at {base:#x} is already shared with the device")]
    DuplicateRegion {
        /// Its first address.
        base: u64,
    },
    /// `remove_memory` of a region never added.
    #[error("no memory shared with the device starts at {base:#x}")]
    NotRegistered {
        /// The address given.
        base: u64,
    },
    /// `remove_memory` of a region the transport's allocator still has buffers in.
    #[error("memory at {base:#x} still holds {live} of the library's buffers")]
    RegionInUse {
        /// Its first address.
        base: u64,
        /// Buffers still allocated there.
        live: usize,
    },
    /// The polling timer for device events could not be set up.
    #[error("creating the timer that polls for device events")]
    Timer(#[source] io::Error),
    /// An internal lock was poisoned by a panic.
    #[error("the {0} lock is poisoned by an earlier panic; reopen the device")]
    Poisoned(&'static str),
}

type Result<T, E = VirtioPciError> = std::result::Result<T, E>;

/// One virtqueue the driver owns.
#[derive(Debug)]
struct Vq {
    index: u16,
    queue: SplitQueue,
    /// Byte offset of this queue's doorbell in the notification window.
    notify_at: u64,
}

impl Vq {
    fn err(&self, source: QueueError) -> VirtioPciError {
        VirtioPciError::Queue {
            queue: self.index,
            source,
        }
    }
}

#[derive(Debug)]
struct ControlQueue {
    vq: Vq,
    request: DmaBuf,
    response: DmaBuf,
    /// Set when a command timed out with its buffers still with the device.
    broken: bool,
}

#[derive(Debug)]
struct EventQueue {
    vq: Vq,
    buffers: DmaBuf,
    /// The event slot each descriptor head carries.
    slot_of_head: Vec<Option<u16>>,
}

/// A doorbell virtqueue: batches of doorbells in fixed slots of pinned memory.
#[derive(Debug)]
struct DoorbellQueue {
    vq: Vq,
    buffers: DmaBuf,
    free_slots: Vec<u16>,
    /// The batch slot each descriptor head carries.
    slot_of_head: Vec<Option<u16>>,
}

impl DoorbellQueue {
    /// Takes back the batches the device has consumed.
    fn reclaim(&mut self) -> Result<()> {
        while let Some((head, _)) = self.vq.queue.pop_used().map_err(|e| self.vq.err(e))? {
            if let Some(slot) = self
                .slot_of_head
                .get_mut(usize::from(head))
                .and_then(Option::take)
            {
                self.free_slots.push(slot);
            }
        }
        Ok(())
    }
}

/// What makes [`Transport::event_fd`] readable.
#[derive(Debug)]
enum EventNotifier {
    /// The device's interrupt through `uio_pci_generic`.
    Interrupt(Uio),
    /// A periodic timer (`timerfd`), so waiters poll.
    Timer(OwnedFd),
}

/// A vrdma device driven through virtio-pci from user space.
#[derive(Debug)]
pub struct VirtioPci {
    device: PciDevice,
    windows: Windows,
    memory: PinnedMemory,
    config: Config,
    features: u64,
    timeout: Duration,
    control: Mutex<ControlQueue>,
    events: Mutex<EventQueue>,
    doorbells: Vec<Mutex<DoorbellQueue>>,
    notifier: EventNotifier,
    /// The library's rings and buffers ([`Transport::alloc_dma`]).
    dma: DmaAllocator,
    /// Every region the device reaches besides the transport's own queues: `dma`'s and those
    /// added with [`Transport::add_memory`], in address order.
    regions: RwLock<Vec<Pinned>>,
    /// Set once the lack of huge pages has been reported.
    warned_no_huge_pages: AtomicBool,
}

fn lock<'a, T>(mutex: &'a Mutex<T>, what: &'static str) -> Result<MutexGuard<'a, T>> {
    mutex.lock().map_err(|_| VirtioPciError::Poisoned(what))
}

fn mem_err(what: &'static str) -> impl FnOnce(MemError) -> VirtioPciError {
    move |source| VirtioPciError::Memory { what, source }
}

impl VirtioPci {
    /// Opens the first vrdma device (or `options.device`) and brings it to `DRIVER_OK`.
    pub fn open(options: PciOptions) -> Result<VirtioPci> {
        let path = match options.device.clone() {
            Some(p) => p,
            None => find_devices()?
                .into_iter()
                .next()
                .ok_or(VirtioPciError::NoDevice)?,
        };
        let device = PciDevice::open(&path)?;
        let notifier = match Uio::bind(&path) {
            Some(uio) => EventNotifier::Interrupt(uio),
            None => EventNotifier::Timer(polling_timer()?),
        };
        let windows = device.map_windows()?;
        let common = &windows.common;
        let status = |what: &str| -> Result<u8> {
            let s = common.read8(common::DEVICE_STATUS);
            if s & STATUS_FAILED != 0 {
                return Err(VirtioPciError::Refused {
                    step: format!("failed during {what}"),
                    status: s,
                });
            }
            Ok(s)
        };

        // Reset, then wait for the device to read back 0 (virtio 1.x §4.1.4.3.2).
        common.write8(common::DEVICE_STATUS, 0);
        let deadline = Instant::now() + options.timeout;
        while common.read8(common::DEVICE_STATUS) != 0 {
            if Instant::now() >= deadline {
                return Err(VirtioPciError::Refused {
                    step: "did not complete a reset".into(),
                    status: common.read8(common::DEVICE_STATUS),
                });
            }
            std::thread::yield_now();
        }
        common.write8(common::DEVICE_STATUS, STATUS_ACKNOWLEDGE);
        common.write8(common::DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);

        let mut offered = 0u64;
        for half in 0..2u32 {
            common.write32(common::DEVICE_FEATURE_SELECT, half);
            offered |= u64::from(common.read32(common::DEVICE_FEATURE)) << (32 * half);
        }
        if offered & features::VERSION_1 == 0 {
            return Err(VirtioPciError::MissingFeature {
                feature: "VIRTIO_F_VERSION_1",
                offered,
            });
        }
        let acked = offered & (features::VERSION_1 | (options.features & features::ALL_DEVICE));
        for half in 0..2u32 {
            common.write32(common::DRIVER_FEATURE_SELECT, half);
            common.write32(common::DRIVER_FEATURE, (acked >> (32 * half)) as u32);
        }
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        common.write8(common::DEVICE_STATUS, s);
        if status("feature negotiation")? & STATUS_FEATURES_OK == 0 {
            return Err(VirtioPciError::Refused {
                step: format!("refused the features {acked:#x}"),
                status: common.read8(common::DEVICE_STATUS),
            });
        }
        log::debug!(
            "{}: features offered {offered:#x}, acked {acked:#x}",
            path.display()
        );

        let config = read_config(&windows)?;
        let num_queues = common.read16(common::NUM_QUEUES);
        let needed = queue::count(config.num_doorbell_queues.get());
        if num_queues < needed {
            return Err(VirtioPciError::BadCapability {
                reason: format!(
                    "the device has {num_queues} virtqueues but its configuration needs {needed}"
                ),
            });
        }

        let num_doorbell_queues = config.num_doorbell_queues.get();
        let memory = PinnedMemory::new(pinned_bytes(num_doorbell_queues))?;
        let control_vq = setup_queue(&windows, &memory, queue::CONTROL, CONTROL_QUEUE_SIZE)?;
        let request = memory
            .alloc()
            .alloc(CONTROL_BUF_BYTES)
            .map_err(mem_err("allocating the control buffers"))?;
        let response = memory
            .alloc()
            .alloc(CONTROL_RESPONSE_BYTES)
            .map_err(mem_err("allocating the control buffers"))?;
        let event_vq = setup_queue(&windows, &memory, queue::EVENT, QUEUE_SIZE)?;
        let buffers = memory
            .alloc()
            .alloc(usize::from(QUEUE_SIZE) * event::SIZE)
            .map_err(mem_err("allocating the event buffers"))?;
        let mut events = EventQueue {
            vq: event_vq,
            buffers,
            slot_of_head: vec![None; usize::from(QUEUE_SIZE)],
        };
        for slot in 0..QUEUE_SIZE {
            post_event(&memory, &mut events, slot)?;
        }
        let mut doorbells = Vec::with_capacity(usize::from(num_doorbell_queues));
        for i in 0..num_doorbell_queues {
            let vq = setup_queue(&windows, &memory, queue::FIRST_DOORBELL + i, QUEUE_SIZE)?;
            // The driver reclaims batch buffers when it needs them; no interrupt is wanted.
            vq.queue.set_interrupts(false);
            let buffers = memory
                .alloc()
                .alloc(usize::from(QUEUE_SIZE) * DOORBELL_SLOT_BYTES)
                .map_err(mem_err("allocating doorbell buffers"))?;
            doorbells.push(Mutex::new(DoorbellQueue {
                vq,
                buffers,
                free_slots: (0..QUEUE_SIZE).rev().collect(),
                slot_of_head: vec![None; usize::from(QUEUE_SIZE)],
            }));
        }

        common.write8(common::DEVICE_STATUS, s | STATUS_DRIVER_OK);
        let now = status("DRIVER_OK")?;
        if now & STATUS_DRIVER_OK == 0 || now & STATUS_NEEDS_RESET != 0 {
            return Err(VirtioPciError::Refused {
                step: "did not accept DRIVER_OK".into(),
                status: now,
            });
        }
        log::info!(
            "{}: vrdma device at DRIVER_OK, features {acked:#x}",
            path.display()
        );
        let transport = VirtioPci {
            device,
            windows,
            memory,
            config,
            features: acked,
            timeout: options.timeout,
            control: Mutex::new(ControlQueue {
                vq: control_vq,
                request,
                response,
                broken: false,
            }),
            events: Mutex::new(events),
            doorbells,
            notifier,
            dma: DmaAllocator::new(),
            regions: RwLock::new(Vec::new()),
            warned_no_huge_pages: AtomicBool::new(false),
        };
        // An earlier process may have left the interrupt raised and INTx masked (the kernel
        // masks it when it fires, and only a drain unmasks it): start from a clean line, or no
        // interrupt would ever reach this process's event fd.
        if transport.has_interrupts() {
            transport.windows.isr.read8(0);
            transport.device.unmask_intx()?;
        }
        // The device learns of the event queue from its first notification and delivers no
        // event before it: tell it about the buffers now that it is running.
        transport.notify(&lock(&transport.events, "event queue")?.vq);
        Ok(transport)
    }

    /// The function's sysfs directory.
    pub fn sysfs_path(&self) -> &Path {
        &self.device.path
    }

    fn notify(&self, vq: &Vq) {
        // The ring updates must be visible before the device is told about them.
        fence(Ordering::SeqCst);
        self.windows.notify.write16(vq.notify_at, vq.index);
    }

    /// Takes the notification that made [`Transport::event_fd`] readable and, with
    /// interrupts, acknowledges the device's interrupt (reading the ISR lowers the line) and
    /// unmasks INTx, so the next event raises a new one. Called before the event queue is
    /// read, so an event the device delivers afterwards makes the fd readable again.
    fn acknowledge_notification(&self) -> Result<()> {
        match &self.notifier {
            EventNotifier::Interrupt(uio) => {
                uio.take().map_err(VirtioPciError::Interrupt)?;
                let isr = self.windows.isr.read8(0);
                if isr & ISR_CONFIG != 0 {
                    log::info!(
                        "{}: the device's configuration changed",
                        self.device.path.display()
                    );
                }
                self.device.unmask_intx()
            }
            EventNotifier::Timer(timer) => {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a live 8-byte buffer from the timerfd
                // this value owns; it is non-blocking, so an unexpired timer gives EAGAIN.
                unsafe { libc::read(timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                Ok(())
            }
        }
    }

    /// Whether device events arrive by interrupt (else the event fd is a polling timer).
    pub fn has_interrupts(&self) -> bool {
        matches!(self.notifier, EventNotifier::Interrupt(_))
    }

    /// Adds `size` bytes (at least) of locked memory to the DMA allocator: huge pages if the
    /// system has them reserved, base pages otherwise (then rings are limited to a page).
    fn grow_dma(&self, size: usize) -> Result<()> {
        let size = size.max(HUGE_PAGE_SIZE).next_multiple_of(HUGE_PAGE_SIZE);
        let mem = match SharedMemory::hugetlb("vrdma-pci-dma", size) {
            Ok(mem) => mem,
            Err(e) => {
                if !self.warned_no_huge_pages.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "{}: no huge pages for the device's rings ({}); using base pages, which \
                         limits each ring to {} bytes: reserve huge pages with \
                         `echo 64 > /proc/sys/vm/nr_hugepages`",
                        self.device.path.display(),
                        crate::error_chain(&e),
                        page_size()
                    );
                }
                SharedMemory::new("vrdma-pci-dma", size)
                    .map_err(mem_err("growing the DMA memory"))?
            }
        };
        let pinned = Pinned::pin(Arc::new(mem))?;
        let region = pinned.memory().clone();
        self.insert_region(pinned)?;
        self.dma
            .add_fresh_region(region)
            .map_err(mem_err("growing the DMA memory"))
    }

    fn insert_region(&self, pinned: Pinned) -> Result<()> {
        let mut regions = self
            .regions
            .write()
            .map_err(|_| VirtioPciError::Poisoned("memory table"))?;
        let base = pinned.base();
        let at = regions.partition_point(|r| r.base() < base);
        if regions.get(at).is_some_and(|r| r.base() == base) {
            return Err(VirtioPciError::DuplicateRegion { base });
        }
        regions.insert(at, pinned);
        Ok(())
    }

    /// Runs `f` on the region holding `addr`, if any.
    fn with_region<T>(&self, addr: u64, f: impl FnOnce(&Pinned) -> Option<T>) -> Option<T> {
        let regions = self.regions.read().ok()?;
        let at = regions.partition_point(|r| r.base() <= addr);
        let region = regions.get(at.checked_sub(1)?)?;
        if region.holds(addr) { f(region) } else { None }
    }

    fn check_status(&self) -> Result<()> {
        let status = self.windows.common.read8(common::DEVICE_STATUS);
        if status & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 || status & STATUS_DRIVER_OK == 0 {
            return Err(VirtioPciError::NeedsReset { status });
        }
        Ok(())
    }
}

/// Reads the device configuration, retrying while `config_generation` changes under it.
fn read_config(windows: &Windows) -> Result<Config> {
    let len = size_of::<Config>();
    if windows.device.len() < len {
        return Err(VirtioPciError::BadCapability {
            reason: format!(
                "the device configuration window is {} bytes, fewer than {len}",
                windows.device.len()
            ),
        });
    }
    let mut bytes = vec![0u8; len];
    loop {
        let before = windows.common.read8(common::CONFIG_GENERATION);
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = windows.device.read32(4 * i as u64).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        if windows.common.read8(common::CONFIG_GENERATION) == before {
            break;
        }
    }
    Config::decode(&bytes).map_err(VirtioPciError::BadConfig)
}

/// A timer that fires every [`EVENT_POLL_INTERVAL`], non-blocking, for event waiters to poll.
fn polling_timer() -> Result<OwnedFd> {
    // SAFETY: timerfd_create takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(VirtioPciError::Timer(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by timerfd_create and nothing else owns it.
    let timer = unsafe { OwnedFd::from_raw_fd(fd) };
    let interval = libc::timespec {
        tv_sec: 0,
        tv_nsec: EVENT_POLL_INTERVAL.as_nanos() as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: interval,
        it_value: interval,
    };
    // SAFETY: `spec` is a valid itimerspec for the call's duration; the old value is not
    // asked for (NULL).
    if unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(VirtioPciError::Timer(io::Error::last_os_error()));
    }
    Ok(timer)
}

/// Creates virtqueue `index` of `size` entries in pinned memory and tells the device where
/// it is.
fn setup_queue(windows: &Windows, memory: &PinnedMemory, index: u16, size: u16) -> Result<Vq> {
    let common = &windows.common;
    common.write16(common::QUEUE_SELECT, index);
    let max = common.read16(common::QUEUE_SIZE);
    if max < size {
        return Err(VirtioPciError::BadCapability {
            reason: format!("virtqueue {index} takes at most {max} entries, fewer than {size}"),
        });
    }
    let queue = SplitQueue::new(memory.alloc(), size).map_err(|source| VirtioPciError::Queue {
        queue: index,
        source,
    })?;
    let ring_len = SplitQueue::ring_bytes(size);
    debug_assert!(ring_len <= page_size());
    let addrs = queue.addresses();
    let phys = |addr: u64| {
        // The rings are one page-aligned allocation no larger than a page.
        memory.phys(addr, 1).ok_or(VirtioPciError::BadCapability {
            reason: "a virtqueue's rings are not in pinned memory".into(),
        })
    };
    let write64 = |at: u64, value: u64| {
        common.write32(at, value as u32);
        common.write32(at + 4, (value >> 32) as u32);
    };
    common.write16(common::QUEUE_SIZE, size);
    write64(common::QUEUE_DESC, phys(addrs.desc)?);
    write64(common::QUEUE_DRIVER, phys(addrs.avail)?);
    write64(common::QUEUE_DEVICE, phys(addrs.used)?);
    let notify_off = u64::from(common.read16(common::QUEUE_NOTIFY_OFF));
    let notify_at = notify_off * u64::from(windows.notify_multiplier);
    if notify_at + 2 > windows.notify.len() as u64 {
        return Err(VirtioPciError::BadCapability {
            reason: format!("virtqueue {index}'s doorbell lies outside the notification window"),
        });
    }
    common.write16(common::QUEUE_ENABLE, 1);
    Ok(Vq {
        index,
        queue,
        notify_at,
    })
}

/// Makes event buffer `slot` available to the device.
fn post_event(memory: &PinnedMemory, eq: &mut EventQueue, slot: u16) -> Result<()> {
    let addr = eq.buffers.addr() + u64::from(slot) * event::SIZE as u64;
    let phys = memory
        .phys(addr, event::SIZE as u64)
        .ok_or(VirtioPciError::Unsupported("event buffers across pages"))?;
    let head = eq
        .vq
        .queue
        .add_chain(&[], &[(phys, event::SIZE as u32)])
        .map_err(|e| eq.vq.err(e))?;
    eq.slot_of_head[usize::from(head)] = Some(slot);
    Ok(())
}

impl Transport for VirtioPci {
    type Error = VirtioPciError;

    fn config(&self) -> &Config {
        &self.config
    }

    fn read_config(&self) -> Result<Config> {
        read_config(&self.windows)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn num_doorbell_queues(&self) -> u16 {
        self.doorbells.len() as u16
    }

    fn control(&self, request: &[u8], response: &mut [u8]) -> Result<usize> {
        if request.len() > CONTROL_BUF_BYTES {
            return Err(VirtioPciError::TooLong {
                what: "request",
                len: request.len(),
            });
        }
        let mut cq = lock(&self.control, "control queue")?;
        if cq.broken {
            return Err(VirtioPciError::Timeout {
                timeout: self.timeout,
            });
        }
        self.check_status()?;
        let resp_len = response.len().min(CONTROL_RESPONSE_BYTES);
        cq.request
            .write_at(0, request)
            .map_err(mem_err("copying a control request"))?;
        cq.response
            .fill(0)
            .map_err(mem_err("clearing the control response"))?;
        let unpinned = || VirtioPciError::Unsupported("control buffers outside pinned memory");
        // One descriptor per page of the request: pages are not physically contiguous.
        let page = page_size();
        let mut readable = [(0u64, 0u32); CONTROL_REQUEST_PAGES];
        let mut pieces = 0;
        for (i, chunk) in request.chunks(page).enumerate() {
            let addr = cq.request.addr() + (i * page) as u64;
            let phys = self
                .memory
                .phys(addr, chunk.len() as u64)
                .ok_or_else(unpinned)?;
            readable[i] = (phys, chunk.len() as u32);
            pieces = i + 1;
        }
        let resp_phys = self
            .memory
            .phys(cq.response.addr(), resp_len as u64)
            .ok_or_else(unpinned)?;
        let head = cq
            .vq
            .queue
            .add_chain(&readable[..pieces], &[(resp_phys, resp_len as u32)])
            .map_err(|e| cq.vq.err(e))?;
        if cq.vq.queue.needs_kick() {
            self.notify(&cq.vq);
        }
        // Poll the used ring: the interrupt, when there is one, belongs to the event waiters.
        let deadline = Instant::now() + self.timeout;
        let written = loop {
            if let Some((used_head, written)) = cq.vq.queue.pop_used().map_err(|e| cq.vq.err(e))? {
                if used_head == head {
                    break written;
                }
                continue;
            }
            if Instant::now() >= deadline {
                cq.broken = true;
                return Err(VirtioPciError::Timeout {
                    timeout: self.timeout,
                });
            }
            self.check_status()?;
            std::thread::yield_now();
        };
        let written = (written as usize).min(resp_len);
        cq.response
            .read_at(0, &mut response[..written])
            .map_err(mem_err("copying a control response"))?;
        Ok(written)
    }

    fn ring_doorbells(&self, queue: u16, doorbells: &[Doorbell]) -> Result<()> {
        let count = self.num_doorbell_queues();
        let dq = self
            .doorbells
            .get(usize::from(queue))
            .ok_or(VirtioPciError::NoSuchDoorbellQueue { queue, count })?;
        let mut dq = lock(dq, "doorbell queue")?;
        let mut deadline = None;
        let mut unkicked = false;
        for batch in doorbells.chunks(doorbell::MAX_BATCH) {
            let slot = loop {
                dq.reclaim()?;
                if let Some(slot) = dq.free_slots.pop() {
                    break slot;
                }
                // Full: make sure the device knows about what is queued, then poll for room.
                if unkicked {
                    self.notify(&dq.vq);
                    unkicked = false;
                }
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.timeout);
                if Instant::now() >= deadline {
                    return Err(VirtioPciError::DoorbellTimeout {
                        queue,
                        timeout: self.timeout,
                    });
                }
                std::thread::yield_now();
            };
            let offset = usize::from(slot) * DOORBELL_SLOT_BYTES;
            let bytes = batch.as_bytes();
            let addr = dq.buffers.addr() + offset as u64;
            // A slot is DOORBELL_SLOT_BYTES-aligned within page-aligned buffers: one page.
            let Some(phys) = self.memory.phys(addr, bytes.len() as u64) else {
                dq.free_slots.push(slot);
                return Err(VirtioPciError::Unsupported(
                    "doorbell buffers outside pinned memory",
                ));
            };
            if let Err(e) = dq.buffers.write_at(offset, bytes) {
                dq.free_slots.push(slot);
                return Err(mem_err("copying doorbells")(e));
            }
            let head = match dq.vq.queue.add_chain(&[(phys, bytes.len() as u32)], &[]) {
                Ok(head) => head,
                Err(e) => {
                    dq.free_slots.push(slot);
                    return Err(dq.vq.err(e));
                }
            };
            dq.slot_of_head[usize::from(head)] = Some(slot);
            unkicked = true;
        }
        if unkicked && dq.vq.queue.needs_kick() {
            self.notify(&dq.vq);
        }
        Ok(())
    }

    fn event_fd(&self) -> RawFd {
        match &self.notifier {
            EventNotifier::Interrupt(uio) => uio.fd(),
            EventNotifier::Timer(timer) => timer.as_raw_fd(),
        }
    }

    fn drain_events(&self) -> Result<Vec<DeviceEvent>> {
        let mut eq = lock(&self.events, "event queue")?;
        self.acknowledge_notification()?;
        let mut out = Vec::new();
        let mut reposted = false;
        while let Some((head, written)) = eq.vq.queue.pop_used().map_err(|e| eq.vq.err(e))? {
            let Some(slot) = eq
                .slot_of_head
                .get_mut(usize::from(head))
                .and_then(Option::take)
            else {
                continue;
            };
            if written as usize >= event::SIZE {
                let mut bytes = [0u8; event::SIZE];
                eq.buffers
                    .read_at(usize::from(slot) * event::SIZE, &mut bytes)
                    .map_err(mem_err("copying an event"))?;
                match event::Event::decode(&bytes) {
                    Ok((kind, handle)) => out.push(DeviceEvent { kind, handle }),
                    Err(e) => log::warn!("ignoring a malformed event from the device: {e}"),
                }
            }
            post_event(&self.memory, &mut eq, slot)?;
            reposted = true;
        }
        if reposted && eq.vq.queue.needs_kick() {
            self.notify(&eq.vq);
        }
        Ok(out)
    }

    fn alloc_dma(&self, len: usize, align: usize) -> Result<DmaBuf> {
        match self.dma.alloc_aligned(len, align) {
            Err(MemError::OutOfSpace { .. }) => {
                let size = len.checked_add(align).ok_or(VirtioPciError::Memory {
                    what: "growing the DMA memory",
                    source: MemError::InvalidLength { len },
                })?;
                self.grow_dma(size)?;
                self.dma
                    .alloc_aligned(len, align)
                    .map_err(mem_err("allocating DMA memory"))
            }
            other => other.map_err(mem_err("allocating DMA memory")),
        }
    }

    /// Locks `mem` and translates its pages: the VM's RAM is already the device's, so
    /// nothing is sent to the device; memory regions over `mem` carry its pages' addresses.
    fn add_memory(&self, mem: Arc<SharedMemory>) -> Result<()> {
        self.insert_region(Pinned::pin(mem)?)
    }

    fn remove_memory(&self, base: u64) -> Result<()> {
        let mut regions = self
            .regions
            .write()
            .map_err(|_| VirtioPciError::Poisoned("memory table"))?;
        let at = regions
            .iter()
            .position(|r| r.base() == base)
            .ok_or(VirtioPciError::NotRegistered { base })?;
        match self.dma.remove_region(base) {
            Ok(_) | Err(MemError::NoSuchRegion { .. }) => {}
            Err(MemError::RegionBusy { live, .. }) => {
                return Err(VirtioPciError::RegionInUse { base, live });
            }
            Err(e) => return Err(mem_err("removing DMA memory")(e)),
        }
        // Dropping the region unlocks it.
        regions.remove(at);
        Ok(())
    }

    fn is_shared(&self, addr: u64, len: u64) -> bool {
        super::covered_by_regions(addr, len, |at| self.shared_region(at))
    }

    fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        self.with_region(addr, |r| Some((r.base(), r.len())))
    }

    fn device_addr(&self, addr: u64, len: u64) -> Option<u64> {
        self.with_region(addr, |r| r.phys(addr, len))
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        // Reset, so the device stops using the rings before their memory is freed.
        self.windows.common.write8(common::DEVICE_STATUS, 0);
        let deadline = Instant::now() + self.timeout;
        while self.windows.common.read8(common::DEVICE_STATUS) != 0 && Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
}
