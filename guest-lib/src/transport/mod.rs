//! How the library reaches the device.
//!
//! Everything above this module (verbs objects, rings, completion handling) talks to the
//! device only through [`Transport`]: control commands, doorbells, the configuration space,
//! device events and the registration of memory the device must be able to reach. The one
//! implementation today is [`virtio_user::VirtioUser`], where the process is its own
//! vhost-user frontend; the same seam would take a kernel virtio driver's character device.

pub mod virtio_pci;
pub mod virtio_user;

use std::os::fd::RawFd;
use std::sync::Arc;

use vrdma_proto::config::Config;
use vrdma_proto::doorbell::Doorbell;
use vrdma_proto::event;

use crate::mem::{DmaBuf, SharedMemory};

pub use virtio_pci::{PciOptions, VirtioPci, VirtioPciError};
pub use virtio_user::{Migration, Options, StoppedRing, VirtioUser, VirtioUserError};

/// One event the device delivered on the event queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEvent {
    /// What happened.
    pub kind: event::Kind,
    /// The CQ, QP or port it happened to.
    pub handle: u32,
}

/// The driver's view of a vrdma device.
///
/// Methods take `&self` and are safe to call from several threads: each queue is serialised
/// on its own, so a doorbell does not wait for a control command.
pub trait Transport: Send + Sync {
    /// The transport's error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The configuration space as read when the device was opened.
    fn config(&self) -> &Config;

    /// Reads the configuration space again (the port attributes can change).
    fn read_config(&self) -> Result<Config, Self::Error>;

    /// The virtio feature bits both sides agreed on (device bits of
    /// `vrdma_proto::features` plus `VERSION_1`).
    fn features(&self) -> u64;

    /// The number of doorbell queues in use; [`Transport::ring_doorbells`] takes
    /// `0..num_doorbell_queues()`.
    fn num_doorbell_queues(&self) -> u16;

    /// Sends one control command (`request`: a `cmd::Header` and its body) and waits for the
    /// device's answer, which is written to the front of `response`. Returns the number of
    /// bytes the device wrote.
    fn control(&self, request: &[u8], response: &mut [u8]) -> Result<usize, Self::Error>;

    /// Posts doorbells on doorbell queue `queue` and notifies the device if it asked for it.
    /// Batches longer than `doorbell::MAX_BATCH` are split.
    fn ring_doorbells(&self, queue: u16, doorbells: &[Doorbell]) -> Result<(), Self::Error>;

    /// A file descriptor that becomes readable when the device has delivered events; wait on
    /// it with poll/epoll, then call [`Transport::drain_events`]. Stays owned by the transport.
    fn event_fd(&self) -> RawFd;

    /// A file descriptor that reports `EPOLLRDHUP` (or `EPOLLHUP`) once the device is gone, so
    /// a thread blocked waiting for events can include it and wake; `None` if the transport
    /// cannot tell. Stays owned by the transport.
    fn hangup_fd(&self) -> Option<RawFd> {
        None
    }

    /// Takes every event the device delivered so far, oldest first, and returns their buffers
    /// to the event queue.
    fn drain_events(&self) -> Result<Vec<DeviceEvent>, Self::Error>;

    /// Allocates `len` zeroed bytes aligned to `align` (a power of two) in memory the device
    /// can reach, registering more memory with the device if needed.
    fn alloc_dma(&self, len: usize, align: usize) -> Result<DmaBuf, Self::Error>;

    /// Makes a region of the caller's shared memory reachable by the device (for memory
    /// regions over application buffers allocated as [`SharedMemory`]).
    fn add_memory(&self, mem: Arc<SharedMemory>) -> Result<(), Self::Error>;

    /// Makes the region starting at `base` unreachable again. Regions the transport's own
    /// allocator still has buffers in cannot be removed.
    fn remove_memory(&self, base: u64) -> Result<(), Self::Error>;

    /// Whether every byte of `addr..addr + len` lies in a registered region (one, or several
    /// adjacent ones), i.e. whether the device can reach it. Memory regions and work requests
    /// must only name such ranges.
    fn is_shared(&self, addr: u64, len: u64) -> bool;

    /// The registered region holding `addr`, as its first address and length; `None` if the
    /// device cannot reach `addr`. A memory region over several regions needs their bounds:
    /// the device takes each page of its page list from one region.
    fn shared_region(&self, addr: u64) -> Option<(u64, u64)>;

    /// The address the device knows `addr..addr + len` by (its guest-physical address), if the
    /// device reaches the whole range as one contiguous stretch; `None` otherwise. Commands
    /// carry these addresses: ring bases and memory regions' page lists. Under virtio-user it
    /// is `addr` itself; under virtio-pci, the guest-physical address of pinned memory, which
    /// is contiguous within a page (within a huge page for the transport's own memory).
    fn device_addr(&self, addr: u64, len: u64) -> Option<u64>;
}

/// Whether the regions `shared_region` finds cover `addr..addr + len` without a gap
/// (`len == 0` asks about `addr` alone): [`Transport::is_shared`] for transports that keep
/// regions.
pub fn covered_by_regions(
    addr: u64,
    len: u64,
    shared_region: impl Fn(u64) -> Option<(u64, u64)>,
) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    loop {
        let Some((base, size)) = shared_region(at) else {
            return false;
        };
        let region_end = base.saturating_add(size);
        if region_end >= end {
            return true;
        }
        if region_end <= at {
            // A region that does not hold `at`: a broken transport, not a reachable byte.
            return false;
        }
        at = region_end;
    }
}

/// A shared transport is a transport: one connection can serve a [`crate::Context`] and, say, a
/// test or tool that also sends raw control commands on it.
impl<T: Transport + ?Sized> Transport for Arc<T> {
    type Error = T::Error;

    fn config(&self) -> &Config {
        (**self).config()
    }

    fn read_config(&self) -> Result<Config, Self::Error> {
        (**self).read_config()
    }

    fn features(&self) -> u64 {
        (**self).features()
    }

    fn num_doorbell_queues(&self) -> u16 {
        (**self).num_doorbell_queues()
    }

    fn control(&self, request: &[u8], response: &mut [u8]) -> Result<usize, Self::Error> {
        (**self).control(request, response)
    }

    fn ring_doorbells(&self, queue: u16, doorbells: &[Doorbell]) -> Result<(), Self::Error> {
        (**self).ring_doorbells(queue, doorbells)
    }

    fn event_fd(&self) -> RawFd {
        (**self).event_fd()
    }

    fn hangup_fd(&self) -> Option<RawFd> {
        (**self).hangup_fd()
    }

    fn drain_events(&self) -> Result<Vec<DeviceEvent>, Self::Error> {
        (**self).drain_events()
    }

    fn alloc_dma(&self, len: usize, align: usize) -> Result<DmaBuf, Self::Error> {
        (**self).alloc_dma(len, align)
    }

    fn add_memory(&self, mem: Arc<SharedMemory>) -> Result<(), Self::Error> {
        (**self).add_memory(mem)
    }

    fn remove_memory(&self, base: u64) -> Result<(), Self::Error> {
        (**self).remove_memory(base)
    }

    fn is_shared(&self, addr: u64, len: u64) -> bool {
        (**self).is_shared(addr, len)
    }

    fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        (**self).shared_region(addr)
    }

    fn device_addr(&self, addr: u64, len: u64) -> Option<u64> {
        (**self).device_addr(addr, len)
    }
}
