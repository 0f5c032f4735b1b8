//! virtio-pci: the vrdma device as a PCI function of a real virtual machine, driven from user
//! space in the guest.
//!
//! [`VirtioPci::open`] finds the function (1af4:106a) in sysfs, enables it with bus mastering,
//! maps the modern virtio-pci capabilities (common configuration, notification, ISR, device
//! configuration) from its `resourceN` files, performs the feature handshake (`ACKNOWLEDGE`,
//! `DRIVER`, `FEATURES_OK`), reads the configuration space, sets up the control and event
//! virtqueues in locked memory addressed by guest-physical address (see `pinned.rs`) and sets
//! `DRIVER_OK`. When `uio_pci_generic` is loaded the function is bound to it and control
//! commands wait for the device's interrupt on `/dev/uioN` (see `uio.rs`); otherwise they poll
//! the used ring.
//!
//! This is the first step of the transport: doorbell queues, memory registration
//! (`alloc_dma`, `add_memory`) and event notification through `event_fd` are not there yet,
//! and the methods that need them report [`VirtioPciError::Unsupported`]. What works is
//! everything that only needs the configuration space and control commands (`vrdma-devinfo`).
//! Needs root (sysfs `config`/`resourceN` writes, `mlock`, physical addresses in
//! `/proc/self/pagemap`).

mod pci;
mod pinned;
mod uio;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{Ordering, fence};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vrdma_proto::config::Config;
use vrdma_proto::doorbell::Doorbell;
use vrdma_proto::{event, features, queue};

use super::{DeviceEvent, Transport};
use crate::mem::{DmaBuf, MemError, SharedMemory, page_size};
use crate::virtio::{QueueError, SplitQueue};
pub use pci::{DEVICE_ID, SYSFS_PCI_DEVICES, VENDOR_ID, find_devices};
use pci::{PciDevice, Windows};
use pinned::PinnedMemory;
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

/// Entries of the control and event queues: small enough that each queue's rings fit in one
/// page, since pages are not physically contiguous.
const QUEUE_SIZE: u16 = 16;
/// Bytes of the control request and response buffers (one page each).
const CONTROL_BUF_BYTES: usize = 4096;
/// Bytes of locked memory the transport sets up for its queues and buffers.
const PINNED_BYTES: usize = 64 << 10;

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
    /// Never signalled yet: events are found by polling [`Transport::drain_events`].
    event_fd: EventFd,
    /// Interrupts, when `uio_pci_generic` is loaded; control commands wait on them.
    uio: Option<Uio>,
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
        let uio = Uio::bind(&path);
        let windows = device.map_windows()?;
        let memory = PinnedMemory::new(PINNED_BYTES)?;
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

        let control_vq = setup_queue(&windows, &memory, queue::CONTROL)?;
        let request = memory
            .alloc()
            .alloc(CONTROL_BUF_BYTES)
            .map_err(mem_err("allocating the control buffers"))?;
        let response = memory
            .alloc()
            .alloc(CONTROL_BUF_BYTES)
            .map_err(mem_err("allocating the control buffers"))?;
        let event_vq = setup_queue(&windows, &memory, queue::EVENT)?;
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
        Ok(VirtioPci {
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
            event_fd: EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VirtioPciError::Pin {
                what: "creating the event eventfd",
                source,
            })?,
            uio,
        })
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

    /// Waits for the device's interrupt until `deadline`, or just yields without interrupts.
    fn wait_for_interrupt(&self, deadline: Instant) -> Result<()> {
        let Some(uio) = &self.uio else {
            std::thread::yield_now();
            return Ok(());
        };
        let uio_err = VirtioPciError::Interrupt;
        if uio
            .wait(deadline.saturating_duration_since(Instant::now()))
            .map_err(uio_err)?
        {
            // Reading the ISR lowers the interrupt line before INTx is unmasked again.
            let isr = self.windows.isr.read8(0);
            if isr & ISR_CONFIG != 0 {
                log::info!(
                    "{}: the device's configuration changed",
                    self.device.path.display()
                );
            }
            self.device.unmask_intx()?;
        }
        Ok(())
    }

    /// Whether control commands complete by interrupt (else by polling).
    pub fn has_interrupts(&self) -> bool {
        self.uio.is_some()
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

/// Creates virtqueue `index` in pinned memory and tells the device where it is.
fn setup_queue(windows: &Windows, memory: &PinnedMemory, index: u16) -> Result<Vq> {
    let common = &windows.common;
    common.write16(common::QUEUE_SELECT, index);
    let max = common.read16(common::QUEUE_SIZE);
    if max < QUEUE_SIZE {
        return Err(VirtioPciError::BadCapability {
            reason: format!(
                "virtqueue {index} takes at most {max} entries, fewer than {QUEUE_SIZE}"
            ),
        });
    }
    let queue =
        SplitQueue::new(memory.alloc(), QUEUE_SIZE).map_err(|source| VirtioPciError::Queue {
            queue: index,
            source,
        })?;
    let ring_len = SplitQueue::ring_bytes(QUEUE_SIZE);
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
    common.write16(common::QUEUE_SIZE, QUEUE_SIZE);
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
        // Doorbell queues are not set up yet.
        0
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
        let resp_len = response.len().min(CONTROL_BUF_BYTES);
        cq.request
            .write_at(0, request)
            .map_err(mem_err("copying a control request"))?;
        cq.response
            .fill(0)
            .map_err(mem_err("clearing the control response"))?;
        let unpinned = VirtioPciError::Unsupported("control buffers outside pinned memory");
        let req_phys = self
            .memory
            .phys(cq.request.addr(), request.len() as u64)
            .ok_or(unpinned)?;
        let resp_phys = self
            .memory
            .phys(cq.response.addr(), resp_len as u64)
            .ok_or(VirtioPciError::Unsupported(
                "control buffers outside pinned memory",
            ))?;
        let head = cq
            .vq
            .queue
            .add_chain(
                &[(req_phys, request.len() as u32)],
                &[(resp_phys, resp_len as u32)],
            )
            .map_err(|e| cq.vq.err(e))?;
        if cq.vq.queue.needs_kick() {
            self.notify(&cq.vq);
        }
        // No interrupts yet: poll the used ring.
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
            self.wait_for_interrupt(deadline)?;
        };
        let written = (written as usize).min(resp_len);
        cq.response
            .read_at(0, &mut response[..written])
            .map_err(mem_err("copying a control response"))?;
        Ok(written)
    }

    fn ring_doorbells(&self, _queue: u16, _doorbells: &[Doorbell]) -> Result<()> {
        Err(VirtioPciError::Unsupported("ringing doorbells"))
    }

    fn event_fd(&self) -> RawFd {
        self.event_fd.as_raw_fd()
    }

    fn drain_events(&self) -> Result<Vec<DeviceEvent>> {
        let mut eq = lock(&self.events, "event queue")?;
        // Reading the ISR acknowledges the device's interrupt (no handler is bound yet).
        if self.windows.isr.read8(0) & ISR_CONFIG != 0 {
            log::info!(
                "{}: the device's configuration changed",
                self.device.path.display()
            );
        }
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

    fn alloc_dma(&self, _len: usize, _align: usize) -> Result<DmaBuf> {
        Err(VirtioPciError::Unsupported(
            "allocating DMA memory for rings",
        ))
    }

    fn add_memory(&self, _mem: std::sync::Arc<SharedMemory>) -> Result<()> {
        Err(VirtioPciError::Unsupported("registering memory"))
    }

    fn remove_memory(&self, _base: u64) -> Result<()> {
        Err(VirtioPciError::Unsupported("registering memory"))
    }

    fn is_shared(&self, _addr: u64, _len: u64) -> bool {
        false
    }

    fn shared_region(&self, _addr: u64) -> Option<(u64, u64)> {
        None
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
