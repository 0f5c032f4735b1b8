//! A driver-side split virtqueue (virtio 1.x, section 2.7) in shared memory.
//!
//! Layout, in one [`DmaBuf`] of the device-visible memory:
//!
//! * the descriptor table, 16 bytes per entry, 16-byte aligned;
//! * the available ring: `flags`, `idx`, `ring[size]`, `used_event` (2 bytes each);
//! * the used ring, 64-byte aligned: `flags`, `idx`, `ring[size]` of `{id: u32, len: u32}`,
//!   `avail_event`.
//!
//! The driver owns the descriptor table and the available ring; the device owns the used ring.
//! Indices the other side reads are published with release stores and indices it writes are
//! read with acquire loads. The driver keeps its own copy of the descriptor links and of which
//! heads are in flight, so a device that scribbles on the descriptor table or returns a bogus
//! used element cannot corrupt the free list: [`SplitQueue::pop_used`] reports it instead.
//!
//! `VIRTIO_F_EVENT_IDX` is not used; notifications are suppressed only through
//! `VRING_USED_F_NO_NOTIFY` (the device's) and `VRING_AVAIL_F_NO_INTERRUPT` (the driver's).

use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering, fence};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};

use crate::mem::{DmaAllocator, DmaBuf, MemError};

/// Largest queue size: the virtio limit for split queues used by vrdma.
pub const MAX_SIZE: u16 = vrdma_proto::queue::MAX_QUEUE_SIZE;

const DESC_SIZE: usize = 16;
const USED_ELEM_SIZE: usize = 8;
const USED_ALIGN: usize = 64;
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const USED_F_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;
const AVAIL_F_NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Why a virtqueue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The size is not a power of two in `1..=1024`.
    #[error("virtqueue size {size} is invalid: it must be a power of two between 1 and {MAX_SIZE}")]
    InvalidSize {
        /// The size asked for.
        size: u16,
    },
    /// The rings could not be allocated.
    #[error("cannot allocate the rings of a {size}-entry virtqueue in shared memory")]
    Alloc {
        /// The queue size.
        size: u16,
        /// The allocator's error.
        #[source]
        source: MemError,
    },
    /// A chain with no buffers.
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    /// More buffers than the queue has descriptors.
    #[error("a chain of {needed} buffers can never fit a {size}-entry virtqueue")]
    ChainTooLong {
        /// Buffers in the chain.
        needed: usize,
        /// The queue size.
        size: u16,
    },
    /// Not enough free descriptors right now.
    #[error(
        "virtqueue is full: the chain needs {needed} descriptors, {free} of {size} are free; \
         wait for the device to return used buffers"
    )]
    Full {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: u16,
        /// The queue size.
        size: u16,
    },
    /// The device returned a used element that names no chain in flight.
    #[error(
        "the device returned used descriptor id {id}, which is not the head of a chain in \
         flight (queue size {size}); the device is misbehaving"
    )]
    BadUsedId {
        /// The id found in the used ring.
        id: u32,
        /// The queue size.
        size: u16,
    },
    /// The device moved the used index further than the chains in flight allow.
    #[error(
        "the device moved the used index from {last_used} to {used_idx} with only {in_flight} \
         chains in flight; the device is misbehaving"
    )]
    UsedIndexJump {
        /// The driver's last-seen used index.
        last_used: u16,
        /// The index the device published.
        used_idx: u16,
        /// Chains the driver had in flight.
        in_flight: u16,
    },
    /// The device, asked where it stopped (`GET_VRING_BASE`), named an available index
    /// outside what the driver has made available and not yet taken back.
    #[error(
        "the device stopped at available index {next_avail}, outside the driver's window \
         {last_used}..={avail_idx} (used index taken back .. available index published); the \
         device is misbehaving"
    )]
    StoppedOutsideRing {
        /// The index the device reported.
        next_avail: u32,
        /// The next used index the driver will consume.
        last_used: u16,
        /// The available index the driver has published.
        avail_idx: u16,
    },
}

/// The guest-physical addresses of a queue's three parts, as `SET_VRING_ADDR` and a
/// device-side queue need them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddresses {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// A driver-side split virtqueue.
///
/// Not internally synchronised: one owner adds chains and pops used elements (wrap it in a
/// mutex to share it).
#[derive(Debug)]
pub struct SplitQueue {
    ring: DmaBuf,
    size: u16,
    avail_off: usize,
    used_off: usize,
    /// Driver-private descriptor links: the free list and in-flight chains.
    next: Vec<u16>,
    /// For each descriptor: the chain length if it is the head of a chain in flight, else 0.
    chain_len: Vec<u16>,
    free_head: u16,
    num_free: u16,
    /// Chains added and not yet returned.
    in_flight: u16,
    /// The driver's shadow of `avail.idx`.
    avail_idx: u16,
    /// The next used index the driver will consume.
    last_used: u16,
}

impl SplitQueue {
    /// Bytes of shared memory a queue of `size` entries occupies.
    pub fn ring_bytes(size: u16) -> usize {
        Self::layout(size).2
    }

    /// (avail offset, used offset, total length) of the rings of a `size`-entry queue.
    fn layout(size: u16) -> (usize, usize, usize) {
        let n = usize::from(size);
        let avail_off = DESC_SIZE * n;
        let avail_len = 4 + 2 * n + 2;
        let used_off = (avail_off + avail_len).next_multiple_of(USED_ALIGN);
        let used_len = 4 + USED_ELEM_SIZE * n + 2;
        (avail_off, used_off, used_off + used_len)
    }

    /// Allocates and initialises a queue of `size` entries (a power of two up to 1024) from
    /// `alloc`, which must be memory the device can reach.
    pub fn new(alloc: &DmaAllocator, size: u16) -> Result<Self, QueueError> {
        if size == 0 || size > MAX_SIZE || !size.is_power_of_two() {
            return Err(QueueError::InvalidSize { size });
        }
        let (avail_off, used_off, total) = Self::layout(size);
        // The allocator zeroes the memory: flags, indices and descriptors all start at 0.
        let ring = alloc
            .alloc(total)
            .map_err(|source| QueueError::Alloc { size, source })?;
        let next = (0..size).map(|i| i.wrapping_add(1) % size).collect();
        Ok(SplitQueue {
            ring,
            size,
            avail_off,
            used_off,
            next,
            chain_len: vec![0; usize::from(size)],
            free_head: 0,
            num_free: size,
            in_flight: 0,
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not in use.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains added and not yet returned by [`SplitQueue::pop_used`].
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> RingAddresses {
        let base = self.ring.addr();
        RingAddresses {
            desc: base,
            avail: base + self.avail_off as u64,
            used: base + self.used_off as u64,
        }
    }

    /// A pointer `off` bytes into the ring memory.
    ///
    /// Offsets come from `layout`, which places every field inside the `total` bytes
    /// allocated, so the result stays inside the live mapping the `DmaBuf` keeps alive.
    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.ring.len());
        self.ring.as_ptr().wrapping_add(off)
    }

    /// The 16-bit index field at `off` as an atomic.
    fn index_at(&self, off: usize) -> &AtomicU16 {
        let p = self.at(off).cast::<u16>();
        debug_assert!(p.is_aligned());
        // SAFETY: `p` is inside the ring allocation (see `at`) and 2-byte aligned (the ring is
        // page aligned and every index field sits at an even offset). The memory lives as long
        // as `self.ring`, which outlives the returned borrow of `self`. Every access this
        // process makes to the field is atomic; the device accesses it from another address
        // space, which Rust's model does not constrain.
        unsafe { AtomicU16::from_ptr(p) }
    }

    fn avail_flags_field(&self) -> &AtomicU16 {
        self.index_at(self.avail_off)
    }

    fn avail_idx_field(&self) -> &AtomicU16 {
        self.index_at(self.avail_off + 2)
    }

    fn used_flags_field(&self) -> &AtomicU16 {
        self.index_at(self.used_off)
    }

    fn used_idx_field(&self) -> &AtomicU16 {
        self.index_at(self.used_off + 2)
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let p = self.at(DESC_SIZE * usize::from(index));
        // SAFETY: `index < size`, so the 16 bytes at `p` are descriptor `index`, inside the
        // ring allocation and 16-byte aligned (the table starts the page-aligned ring), so each
        // field is naturally aligned. The driver owns descriptors not yet made available;
        // volatile writes keep the compiler from eliding or reordering them across the release
        // store that publishes them.
        unsafe {
            ptr::write_volatile(p.cast::<u64>(), addr.to_le());
            ptr::write_volatile(p.add(8).cast::<u32>(), len.to_le());
            ptr::write_volatile(p.add(12).cast::<u16>(), flags.to_le());
            ptr::write_volatile(p.add(14).cast::<u16>(), next.to_le());
        }
    }

    fn write_avail_slot(&self, slot: u16, head: u16) {
        let p = self.at(self.avail_off + 4 + 2 * usize::from(slot));
        // SAFETY: `slot < size`, so this is entry `slot` of the available ring, inside the
        // allocation and 2-byte aligned. The driver owns the available ring.
        unsafe { ptr::write_volatile(p.cast::<u16>(), head.to_le()) };
    }

    fn read_used_elem(&self, slot: u16) -> (u32, u32) {
        let p = self.at(self.used_off + 4 + USED_ELEM_SIZE * usize::from(slot));
        // SAFETY: `slot < size`, so these 8 bytes are entry `slot` of the used ring, inside the
        // allocation and 4-byte aligned (the used ring is 64-byte aligned). The device may
        // write the ring concurrently; volatile reads of plain integers are always initialised
        // and the caller validates the values.
        unsafe {
            let id = ptr::read_volatile(p.cast::<u32>());
            let len = ptr::read_volatile(p.add(4).cast::<u32>());
            (u32::from_le(id), u32::from_le(len))
        }
    }

    /// Adds a chain of device-readable buffers followed by device-writable buffers, each an
    /// `(address, length)` pair in device-visible memory, and makes it available to the device.
    ///
    /// Returns the chain's head descriptor index, which [`SplitQueue::pop_used`] reports when
    /// the device is done with it. The caller decides whether to kick
    /// ([`SplitQueue::needs_kick`]).
    pub fn add_chain(
        &mut self,
        readable: &[(u64, u32)],
        writable: &[(u64, u32)],
    ) -> Result<u16, QueueError> {
        let needed = readable.len() + writable.len();
        if needed == 0 {
            return Err(QueueError::EmptyChain);
        }
        if needed > usize::from(self.size) {
            return Err(QueueError::ChainTooLong {
                needed,
                size: self.size,
            });
        }
        if needed > usize::from(self.num_free) {
            return Err(QueueError::Full {
                needed,
                free: self.num_free,
                size: self.size,
            });
        }
        let buffers = readable
            .iter()
            .map(|&(addr, len)| (addr, len, 0))
            .chain(writable.iter().map(|&(addr, len)| (addr, len, F_WRITE)));
        let head = self.free_head;
        let mut index = head;
        for (n, (addr, len, flags)) in buffers.enumerate() {
            let next = self.next[usize::from(index)];
            if n + 1 == needed {
                self.write_desc(index, addr, len, flags, 0);
            } else {
                self.write_desc(index, addr, len, flags | F_NEXT, next);
                index = next;
            }
        }
        // `needed <= num_free <= size`, so these conversions cannot truncate.
        self.free_head = self.next[usize::from(index)];
        self.num_free -= needed as u16;
        self.chain_len[usize::from(head)] = needed as u16;
        self.in_flight += 1;

        self.write_avail_slot(self.avail_idx % self.size, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors and the ring entry above are visible before the new index.
        fence(Ordering::Release);
        self.avail_idx_field()
            .store(self.avail_idx.to_le(), Ordering::Release);
        Ok(head)
    }

    /// Whether the device asked to be notified of new buffers (it has not set
    /// `VRING_USED_F_NO_NOTIFY`). Call after [`SplitQueue::add_chain`].
    pub fn needs_kick(&self) -> bool {
        // Order the avail index store before the flags load, so that a device that clears
        // NO_NOTIFY and then re-checks the avail index cannot miss the new buffers.
        fence(Ordering::SeqCst);
        let flags = u16::from_le(self.used_flags_field().load(Ordering::Relaxed));
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Asks the device for an interrupt when it returns buffers (`interrupts`), or not
    /// (`VRING_AVAIL_F_NO_INTERRUPT`). A driver that turns interrupts back on must check the
    /// used ring again afterwards: buffers returned before the device saw the flag raise none.
    pub fn set_interrupts(&self, interrupts: bool) {
        let flags = if interrupts { 0 } else { AVAIL_F_NO_INTERRUPT };
        self.avail_flags_field()
            .store(flags.to_le(), Ordering::Relaxed);
        // Order the flag store before the caller's next look at the used ring, pairing with
        // the device's fence between publishing the used index and reading the flags.
        fence(Ordering::SeqCst);
    }

    /// Checks the available index a stopped device reports (`GET_VRING_BASE`; the frontend
    /// gives it back with `SET_VRING_BASE` when the ring starts again) and returns it as a
    /// ring index.
    ///
    /// The device can only have taken chains the driver made available, and it has taken
    /// every chain it returned, so the index lies between the driver's next used index and
    /// its available index. Nothing in the driver's own state changes across a stop and
    /// restart: the available ring, the used ring and their indices stay in shared memory.
    pub fn check_stopped_at(&self, next_avail: u32) -> Result<u16, QueueError> {
        u16::try_from(next_avail)
            .ok()
            // Wrapping distances: the chains not yet taken are some of those in flight
            // (`avail_idx - last_used`).
            .filter(|&index| self.avail_idx.wrapping_sub(index) <= self.in_flight)
            .ok_or(QueueError::StoppedOutsideRing {
                next_avail,
                last_used: self.last_used,
                avail_idx: self.avail_idx,
            })
    }

    /// Whether the device has returned chains that [`SplitQueue::pop_used`] has not consumed.
    pub fn has_used(&self) -> bool {
        u16::from_le(self.used_idx_field().load(Ordering::Acquire)) != self.last_used
    }

    /// Takes the next chain the device returned: its head and the number of bytes the device
    /// wrote into its writable buffers. Its descriptors go back to the free list.
    ///
    /// `Ok(None)` means the device has returned nothing new. An error means the device broke
    /// the protocol; the queue is then unusable.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        // Acquire: the used element is read only after the index that covers it.
        let used_idx = u16::from_le(self.used_idx_field().load(Ordering::Acquire));
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.in_flight {
            return Err(QueueError::UsedIndexJump {
                last_used: self.last_used,
                used_idx,
                in_flight: self.in_flight,
            });
        }
        let (id, len) = self.read_used_elem(self.last_used % self.size);
        let head = match u16::try_from(id) {
            Ok(h) if h < self.size && self.chain_len[usize::from(h)] != 0 => h,
            _ => {
                return Err(QueueError::BadUsedId {
                    id,
                    size: self.size,
                });
            }
        };
        self.free_chain(head);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((head, len)))
    }

    fn free_chain(&mut self, head: u16) {
        let count = std::mem::take(&mut self.chain_len[usize::from(head)]);
        let mut tail = head;
        for _ in 1..count {
            tail = self.next[usize::from(tail)];
        }
        self.next[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += count;
        self.in_flight -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::SharedMemory;
    use std::sync::Arc;

    fn queue(size: u16) -> SplitQueue {
        let mem = Arc::new(SharedMemory::new("vrdma-vq-test", 1 << 16).unwrap());
        SplitQueue::new(&DmaAllocator::with_region(mem), size).unwrap()
    }

    #[test]
    fn sizes_are_checked() {
        let mem = Arc::new(SharedMemory::new("vrdma-vq-test", 1 << 16).unwrap());
        let alloc = DmaAllocator::with_region(mem);
        for bad in [0, 3, 100, 2048] {
            assert!(matches!(
                SplitQueue::new(&alloc, bad),
                Err(QueueError::InvalidSize { size }) if size == bad
            ));
        }
        assert_eq!(SplitQueue::new(&alloc, 1).unwrap().size(), 1);
        let q = SplitQueue::new(&alloc, 1024).unwrap();
        assert_eq!(q.num_free(), 1024);
        let a = q.addresses();
        assert_eq!(a.desc % 16, 0);
        assert_eq!(a.avail, a.desc + 16 * 1024);
        assert_eq!(a.used % 4, 0);
        assert!(a.used >= a.avail + 6 + 2 * 1024);
    }

    #[test]
    fn chains_link_descriptors_and_publish_the_head() {
        let mut q = queue(8);
        let head = q
            .add_chain(&[(0x1000, 10), (0x2000, 20)], &[(0x3000, 30)])
            .unwrap();
        assert_eq!(head, 0);
        assert_eq!(q.num_free(), 5);
        let base = q.addresses().desc;
        let mem = q.ring.region().clone();
        let read = |addr: u64, n: usize| {
            let mut b = vec![0u8; n];
            mem.read(addr, &mut b).unwrap();
            b
        };
        let desc = |i: u64| {
            let b = read(base + 16 * i, 16);
            (
                u64::from_le_bytes(b[0..8].try_into().unwrap()),
                u32::from_le_bytes(b[8..12].try_into().unwrap()),
                u16::from_le_bytes(b[12..14].try_into().unwrap()),
                u16::from_le_bytes(b[14..16].try_into().unwrap()),
            )
        };
        assert_eq!(desc(0), (0x1000, 10, F_NEXT, 1));
        assert_eq!(desc(1), (0x2000, 20, F_NEXT, 2));
        assert_eq!(desc(2), (0x3000, 30, F_WRITE, 0));
        let avail = read(q.addresses().avail, 6);
        assert_eq!(u16::from_le_bytes([avail[2], avail[3]]), 1, "avail idx");
        assert_eq!(u16::from_le_bytes([avail[4], avail[5]]), 0, "avail ring[0]");
        assert!(q.needs_kick());
        assert_eq!(q.pop_used().unwrap(), None);
    }

    #[test]
    fn a_stopped_device_must_stand_between_used_and_available() {
        let mut q = queue(8);
        for _ in 0..3 {
            q.add_chain(&[(0x1000, 8)], &[]).unwrap();
        }
        // Nothing returned yet: the device may have taken none, some or all of the three.
        for taken in 0..=3 {
            assert_eq!(q.check_stopped_at(taken).unwrap(), taken as u16);
        }
        // Beyond what was made available, behind the start, or not a 16-bit index at all.
        for bad in [4, 0xffff, 0x1_0000] {
            assert!(
                matches!(
                    q.check_stopped_at(bad),
                    Err(QueueError::StoppedOutsideRing { next_avail, last_used: 0, avail_idx: 3 })
                        if next_avail == bad
                ),
                "index {bad} was accepted"
            );
        }
    }

    #[test]
    fn empty_and_oversized_chains_are_refused() {
        let mut q = queue(4);
        assert!(matches!(q.add_chain(&[], &[]), Err(QueueError::EmptyChain)));
        let five = [(0x1000u64, 1u32); 5];
        assert!(matches!(
            q.add_chain(&five, &[]),
            Err(QueueError::ChainTooLong { needed: 5, size: 4 })
        ));
        assert_eq!(q.num_free(), 4);
    }
}
