//! Guest memory as the daemon touches it: the one path every write into a guest takes, the
//! words of the vrdma rings, and the runs of guest-physical memory a transfer moves through.
//!
//! Every store, copy and atomic the daemon makes into a guest's memory goes through a function
//! of this module and names its [`WriteKind`]: message payloads, READ responses, atomics,
//! completion entries, ring indices, arm and polling words, events and control responses. Live
//! migration depends on it, so no other module may call a writing method of `vm-memory` on
//! guest memory. (The virtqueues' own used rings are written by `virtio-queue` through the
//! same memory, so they are logged the same way.)
//!
//! Dirty pages are logged by the memory type itself: each region carries vhost-user-backend's
//! [`BitmapMmapRegion`], which the frontend's `SET_LOG_BASE` points at its shared log, and
//! every `vm-memory` method that writes (`write_slice`, `store`, `copy_from`,
//! `copy_to_volatile_slice`) marks the pages it covered. The one write that does not go
//! through such a method, an atomic operated on in place, is marked in [`with_atomic`].
//!
//! Nothing here allocates: runs go into fixed arrays sized for one scheduler chunk.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    VolatileMemory, VolatileSlice,
};
use vrdma_proto::cqe::VendorErr;
use vrdma_proto::ring;

/// The guest memory type the daemon works on: each region logs the pages written through it
/// once the frontend has given a dirty log.
pub type GuestMem = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;
/// Guest memory as the vhost-user library keeps it: replaced whole on every memory-table
/// change, so holding a snapshot never outlives the table it came from by more than one chunk.
pub type GuestMemAtomic = vm_memory::GuestMemoryAtomic<GuestMem>;

/// Bytes the scheduler moves at most in one step for one QP, so a bulk transfer cannot hold
/// the fabric for long.
pub const CHUNK: u32 = 64 * 1024;
/// Runs one chunk can need: its pages (4 KiB at the least) plus one partial page per SGE.
pub const MAX_RUNS: usize = (CHUNK as usize / 4096) + 2 * vrdma_proto::wqe::MAX_SGE as usize + 2;

/// What a write into guest memory is for. Every write names one, so the writes of each kind
/// can be found (and, for migration, logged) in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// Message data: SEND and WRITE payloads, READ responses, a UD receive's GRH.
    Payload,
    /// An atomic: the responder's target word, or the original value the requester receives.
    Atomic,
    /// A completion queue entry.
    Cqe,
    /// A ring index the device owns: a CQ's producer, a send or receive ring's consumer.
    RingIndex,
    /// A word the device and the driver use to hand over notification: a CQ's arm and
    /// notify-ack words, a send ring's polling word.
    ControlWord,
    /// An asynchronous event in a buffer of the event queue.
    Event,
    /// The response to a control command.
    Response,
}

/// Every write passes here once it is made, with the guest-physical range it covered.
fn wrote(kind: WriteKind, gpa: u64, len: usize) {
    #[cfg(test)]
    recorder::record(kind, gpa, len);
    #[cfg(not(test))]
    let _ = (kind, gpa, len);
}

/// Writes `bytes` at `gpa`.
pub fn write_bytes(
    mem: &GuestMem,
    gpa: u64,
    bytes: &[u8],
    kind: WriteKind,
) -> Result<(), VendorErr> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|_| VendorErr::GuestMemory)?;
    wrote(kind, gpa, bytes.len());
    Ok(())
}

/// Stores the 32-bit word at `gpa` atomically with `order`.
pub fn store_u32(
    mem: &GuestMem,
    gpa: u64,
    value: u32,
    order: Ordering,
    kind: WriteKind,
) -> Result<(), VendorErr> {
    mem.store(value, GuestAddress(gpa), order)
        .map_err(|_| VendorErr::GuestMemory)?;
    wrote(kind, gpa, 4);
    Ok(())
}

/// Loads the 32-bit word at `gpa` atomically with `order`.
pub fn load_u32(mem: &GuestMem, gpa: u64, order: Ordering) -> Option<u32> {
    mem.load::<u32>(GuestAddress(gpa), order).ok()
}

/// The address of the word at `offset` in the ring header at `base`; an address past the end
/// of the address space names no memory, so it cannot wrap onto a low page.
pub fn ring_word(base: u64, offset: u64) -> u64 {
    base.saturating_add(offset)
}

/// Loads a ring's producer index.
pub fn load_producer(mem: &GuestMem, ring_addr: u64) -> Option<u32> {
    load_u32(
        mem,
        ring_word(ring_addr, ring::PRODUCER_OFFSET),
        Ordering::Acquire,
    )
}

/// Publishes a ring's consumer index to the driver.
pub fn publish_consumer(mem: &GuestMem, ring_addr: u64, index: u32) {
    // If the ring's memory is gone the driver has torn it down; nothing to tell.
    let _ = store_u32(
        mem,
        ring_word(ring_addr, ring::CONSUMER_OFFSET),
        index,
        Ordering::Release,
        WriteKind::RingIndex,
    );
}

/// A stretch of guest-physical memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub len: u32,
}

/// Runs for one chunk, in order.
#[derive(Debug, Clone, Copy)]
pub struct Runs {
    runs: [Run; MAX_RUNS],
    n: usize,
}

impl Default for Runs {
    fn default() -> Self {
        Runs::EMPTY
    }
}

impl Runs {
    /// No runs: the requester's side of a chunk whose bytes come from elsewhere.
    pub const EMPTY: Runs = Runs {
        runs: [Run { gpa: 0, len: 0 }; MAX_RUNS],
        n: 0,
    };

    /// The runs.
    pub fn as_slice(&self) -> &[Run] {
        &self.runs[..self.n]
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(|r| u64::from(r.len)).sum()
    }

    /// Appends `len` bytes at `gpa`, merged with the last run if they continue it.
    pub fn push(&mut self, gpa: u64, len: u32) -> Result<(), VendorErr> {
        if len == 0 {
            return Ok(());
        }
        if let Some(last) = self.runs[..self.n].last_mut() {
            if last.gpa.checked_add(u64::from(last.len)) == Some(gpa) {
                if let Some(l) = last.len.checked_add(len) {
                    last.len = l;
                    return Ok(());
                }
            }
        }
        let slot = self.runs.get_mut(self.n).ok_or(VendorErr::SgeOutOfBounds)?;
        *slot = Run { gpa, len };
        self.n += 1;
        Ok(())
    }
}

/// The longest slice of guest memory at `gpa`, up to `max` bytes, within one memory slot.
fn slice_at(mem: &GuestMem, gpa: u64, max: u64) -> Option<VolatileSlice<'_, BitmapMmapRegion>> {
    let region = mem.find_region(GuestAddress(gpa))?;
    let offset = gpa - region.start_addr().raw_value();
    let n = max.min(region.len() - offset);
    region
        .get_slice(MemoryRegionAddress(offset), n as usize)
        .ok()
}

/// Which side of a copy found its memory gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Where the bytes came from.
    Source,
    /// Where they were going.
    Destination,
}

/// A long copy's chance to end early: after every `every` bytes (and only while bytes remain)
/// it asks `stop`, and ends there when it says so. The scheduler gives one to a step of a
/// lower priority class, so that a higher class's message that arrives during a 64 KiB copy
/// waits for one piece of it, not the whole (issue 17's "about 1 µs of someone else's
/// copying"); a few loads per question, so a piece of a microsecond's copying pays for it.
#[derive(Clone, Copy)]
pub struct CopyCut<'a> {
    /// Bytes copied between two questions (at least 1).
    pub every: u32,
    /// Whether to end the copy now.
    pub stop: &'a dyn Fn() -> bool,
}

impl std::fmt::Debug for CopyCut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyCut")
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// What a copy moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Bytes copied, from the first.
    pub bytes: u64,
    /// Its [`CopyCut`] ended it before the runs did (after at least one byte).
    pub cut: bool,
}

/// Copies message data from `src` runs in `src_mem` to `dst` runs in `dst_mem`, as many bytes
/// as the shorter covers, or fewer if `cut` ends it early. Fails, naming the side, if a run is
/// no longer backed by guest memory (the table changed): the error completion belongs to
/// whoever's memory it was.
pub fn copy_runs(
    src_mem: &GuestMem,
    src: &[Run],
    dst_mem: &GuestMem,
    dst: &[Run],
    cut: Option<CopyCut<'_>>,
) -> Result<Copied, (Side, VendorErr)> {
    let (mut si, mut so, mut di, mut dof) = (0usize, 0u64, 0usize, 0u64);
    let mut copied = 0u64;
    // Bytes until the next question; a copy with no cut never gets there.
    let every = cut.map_or(u64::MAX, |c| u64::from(c.every.max(1)));
    let mut until_asked = every;
    while si < src.len() && di < dst.len() {
        let (s, d) = (src[si], dst[di]);
        // The rest of each run, as far as its memory region goes, looked up once: the pieces
        // between questions are cut from these.
        let from = slice_at(src_mem, s.gpa + so, u64::from(s.len) - so)
            .filter(|f| !f.is_empty())
            .ok_or((Side::Source, VendorErr::GuestMemory))?;
        let to = slice_at(dst_mem, d.gpa + dof, u64::from(d.len) - dof)
            .filter(|t| !t.is_empty())
            .ok_or((Side::Destination, VendorErr::GuestMemory))?;
        let span = from.len().min(to.len());
        let mut done = 0usize;
        while done < span {
            let n = (span - done).min(usize::try_from(until_asked).unwrap_or(usize::MAX));
            // Within both slices by construction; an error here would be a bug, reported as
            // the guest memory it could not reach rather than a panic.
            let piece_from = from
                .subslice(done, n)
                .map_err(|_| (Side::Source, VendorErr::GuestMemory))?;
            let piece_to = to
                .subslice(done, n)
                .map_err(|_| (Side::Destination, VendorErr::GuestMemory))?;
            piece_from.copy_to_volatile_slice(piece_to);
            wrote(WriteKind::Payload, d.gpa + dof + done as u64, n);
            done += n;
            until_asked -= n as u64;
            if until_asked == 0 {
                until_asked = every;
                let (src_left, dst_left) = (
                    so + (span as u64) < u64::from(s.len) || si + 1 < src.len(),
                    dof + (span as u64) < u64::from(d.len) || di + 1 < dst.len(),
                );
                let more = done < span || (src_left && dst_left);
                if more && cut.is_some_and(|c| (c.stop)()) {
                    return Ok(Copied {
                        bytes: copied + done as u64,
                        cut: true,
                    });
                }
            }
        }
        let n = span as u64;
        copied += n;
        so += n;
        dof += n;
        if so == u64::from(s.len) {
            si += 1;
            so = 0;
        }
        if dof == u64::from(d.len) {
            di += 1;
            dof = 0;
        }
    }
    Ok(Copied {
        bytes: copied,
        cut: false,
    })
}

/// Writes `bytes` into `dst` runs in `dst_mem`.
pub fn write_runs(
    bytes: &[u8],
    dst_mem: &GuestMem,
    dst: &[Run],
    kind: WriteKind,
) -> Result<(), VendorErr> {
    let mut done = 0usize;
    for run in dst {
        let mut off = 0u64;
        while off < u64::from(run.len) && done < bytes.len() {
            let to = slice_at(dst_mem, run.gpa + off, u64::from(run.len) - off)
                .ok_or(VendorErr::GuestMemory)?;
            let n = to.len().min(bytes.len() - done);
            if n == 0 {
                return Err(VendorErr::GuestMemory);
            }
            to.copy_from(&bytes[done..done + n]);
            wrote(kind, run.gpa + off, n);
            done += n;
            off += n as u64;
        }
    }
    if done == bytes.len() {
        Ok(())
    } else {
        Err(VendorErr::SgeOutOfBounds)
    }
}

/// Reads `src` runs of `src_mem` into `out`, which must be exactly as long as the runs cover:
/// a packet's payload is built from guest memory this way.
pub fn read_runs(src_mem: &GuestMem, src: &[Run], out: &mut [u8]) -> Result<(), VendorErr> {
    let mut done = 0usize;
    for run in src {
        let mut off = 0u64;
        while off < u64::from(run.len) {
            let from = slice_at(src_mem, run.gpa + off, u64::from(run.len) - off)
                .filter(|f| !f.is_empty())
                .ok_or(VendorErr::GuestMemory)?;
            let n = from.len();
            let dst = out
                .get_mut(done..done + n)
                .ok_or(VendorErr::SgeOutOfBounds)?;
            from.copy_to(dst);
            done += n;
            off += n as u64;
        }
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(VendorErr::SgeOutOfBounds)
    }
}

/// Runs `op` on the 8-byte atomic at `gpa`, which is shared with every other VM and with the
/// guest's own CPUs, and returns its result. `op` may change the word.
pub fn with_atomic<R>(
    mem: &GuestMem,
    gpa: u64,
    op: impl FnOnce(&AtomicU64) -> R,
) -> Result<R, VendorErr> {
    let slice = slice_at(mem, gpa, 8)
        .filter(|s| s.len() == 8)
        .ok_or(VendorErr::GuestMemory)?;
    let atomic = slice
        .get_atomic_ref::<AtomicU64>(0)
        .map_err(|_| VendorErr::BadAtomic)?;
    let result = op(atomic);
    // An atomic reference is the one access `vm-memory` does not log: the word may have
    // changed, so its page is dirty.
    slice.bitmap().mark_dirty(0, 8);
    wrote(WriteKind::Atomic, gpa, 8);
    Ok(result)
}

/// A 16-bit word of guest memory the daemon reads often and never writes, such as a
/// virtqueue's available index: its address is translated once, and each [`WatchedWord::load`]
/// is one load, with no table lookup or lock. It holds the memory table it was found in, so
/// its mapping stays in place however the frontend changes the table meanwhile; the word is
/// then the old table's, and whoever watches it compares [`WatchedWord::is_in`] with the
/// current table to look it up again.
#[derive(Debug)]
pub struct WatchedWord {
    mem: std::sync::Arc<GuestMem>,
    gpa: u64,
    word: std::ptr::NonNull<AtomicU16>,
}

// SAFETY: `word` points into the mapping of `mem`, which the struct owns a reference to, and
// is only ever read atomically: sending or sharing it is as safe as sharing `&AtomicU16`.
unsafe impl Send for WatchedWord {}
// SAFETY: as for `Send`.
unsafe impl Sync for WatchedWord {}

impl WatchedWord {
    /// The word at `gpa` in `mem`, or `None` if it is not all in one memory slot, not
    /// aligned, or (Xen) in a region mapped per access, which has no lasting address.
    pub fn new(mem: std::sync::Arc<GuestMem>, gpa: u64) -> Option<Self> {
        #[cfg(feature = "xen")]
        {
            let region = mem.find_region(GuestAddress(gpa))?;
            let flags = vm_memory::MmapXenFlags::from_bits_truncate(region.xen_mmap_flags());
            if !flags.mmap_in_advance() {
                return None;
            }
        }
        let word = {
            let slice = slice_at(&mem, gpa, 2).filter(|s| s.len() == 2)?;
            let atomic = slice.get_atomic_ref::<AtomicU16>(0).ok()?;
            std::ptr::NonNull::from(atomic)
        };
        Some(WatchedWord { mem, gpa, word })
    }

    /// Its value now (little-endian in guest memory, as virtio's fields are).
    pub fn load(&self, order: Ordering) -> u16 {
        // SAFETY: `word` came from an aligned atomic reference into `self.mem`'s mapping,
        // which lives as long as `self` holds `mem`: guest memory is mapped for the table's
        // life and unmapped only when the last reference to it goes. The guest may write the
        // word at any time; an atomic load is the access for that.
        let word = unsafe { self.word.as_ref() };
        u16::from_le(word.load(order))
    }

    /// Its guest-physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Whether it was found in `mem` (the same table, not an equal one).
    pub fn is_in(&self, mem: &GuestMem) -> bool {
        std::ptr::eq(&*self.mem, mem)
    }
}

/// Compare-and-swap: the value before.
pub fn compare_swap(a: &AtomicU64, compare: u64, swap: u64) -> u64 {
    match a.compare_exchange(compare, swap, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(v) | Err(v) => v,
    }
}

/// Guest memory of Xen guests (the `xen` feature; docs/xen.md).
///
/// With the feature, vm-memory maps each region as the frontend's Xen flags say: a foreign
/// mapping (`/dev/xen/privcmd`) or a grant mapping made in advance (`/dev/xen/gntdev`) maps the
/// whole region when the table arrives, and every function of this module works on it as on
/// any mmap. A grant mapping flagged `NO_ADVANCE_MAP` is mapped only for the length of each
/// access, and vm-memory leaves the region's base address null: its volatile-slice copies
/// (`copy_runs`) and its atomics (`with_atomic`, `load_u32`, `store_u32`, and the
/// virtqueues' own indices) use that address directly instead of mapping, so they would touch
/// the daemon's own address space. Such a table is refused before any of them can run.
#[cfg(feature = "xen")]
pub mod xen {
    use std::sync::PoisonError;

    use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion, MmapXenFlags};

    use super::{GuestMem, GuestMemAtomic};

    /// Why the daemon cannot serve a Xen guest's memory table.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// A region is mapped per access, which the daemon's copies and atomics cannot use.
        #[error(
            "guest memory at {gpa:#x} ({len} bytes) is a Xen grant mapping made per access \
             (Xen mmap flags {flags:#x}); the daemon needs each region mapped whole: run \
             xen-vhost-frontend with --foreign-mapping and give the guest's virtio device \
             grant_usage=0 (docs/xen.md)"
        )]
        MappedPerAccess {
            /// Guest address where the region starts.
            gpa: u64,
            /// Bytes in the region.
            len: u64,
            /// The Xen mmap flags the frontend gave it.
            flags: u32,
        },
    }

    /// Checks that every region of `mem` was mapped whole when the table arrived.
    pub fn check_mapped_whole(mem: &GuestMem) -> Result<(), Error> {
        for region in mem.iter() {
            let flags = region.xen_mmap_flags();
            if !MmapXenFlags::from_bits_truncate(flags).mmap_in_advance() {
                return Err(Error::MappedPerAccess {
                    gpa: region.start_addr().0,
                    len: region.len(),
                    flags,
                });
            }
        }
        Ok(())
    }

    /// Refuses the table the library has just put in `mem` if a region of it is mapped per
    /// access, and leaves `mem` empty then: the library installs a table before the device
    /// sees it, so without this a kick after the refusal would still reach the refused table.
    pub fn refuse_mapped_per_access(mem: &GuestMemAtomic) -> Result<(), Error> {
        let checked = check_mapped_whole(&mem.memory());
        if checked.is_err() {
            mem.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .replace(GuestMem::default());
        }
        checked
    }

    #[cfg(test)]
    mod tests {
        use std::fs::File;

        use vhost_user_backend::bitmap::BitmapMmapRegion;
        use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRange, MmapRegion};

        use super::*;

        const GRANT_PER_ACCESS: u32 =
            MmapXenFlags::GRANT.bits() | MmapXenFlags::NO_ADVANCE_MAP.bits();
        /// The guest's Xen domain, which a Xen region carries as its mmap data.
        const GUEST_DOMID: u32 = 7;

        /// A region as vm-memory builds it from a Xen frontend's message. A grant region
        /// mapped per access opens its file but maps nothing (no `/dev/xen/gntdev` needed);
        /// foreign and in-advance grant regions would need the Xen devices, so the whole-region
        /// case is the plain mmap the `xen` build also makes for `MmapXenFlags::UNIX`.
        fn region(gpa: u64, len: usize, xen_flags: u32) -> GuestRegionMmap<BitmapMmapRegion> {
            let range = if xen_flags == MmapXenFlags::UNIX.bits() {
                MmapRange::new_unix(len, None, GuestAddress(gpa))
            } else {
                let file = File::open("/dev/null").unwrap();
                MmapRange::new(
                    len,
                    Some(FileOffset::new(file, 0)),
                    GuestAddress(gpa),
                    xen_flags,
                    GUEST_DOMID,
                )
            };
            GuestRegionMmap::new(MmapRegion::from_range(range).unwrap(), GuestAddress(gpa)).unwrap()
        }

        #[test]
        fn regions_mapped_whole_are_served() {
            let mem = GuestMem::from_regions(vec![
                region(0x10_0000, 0x4000, MmapXenFlags::UNIX.bits()),
                region(0x20_0000, 0x4000, MmapXenFlags::UNIX.bits()),
            ])
            .unwrap();
            check_mapped_whole(&mem).unwrap();
            let atomic = GuestMemAtomic::new(mem);
            refuse_mapped_per_access(&atomic).unwrap();
            assert_eq!(atomic.memory().num_regions(), 2, "the table stays");
        }

        #[test]
        fn a_grant_region_mapped_per_access_is_refused_and_the_table_taken_away() {
            let mem = GuestMem::from_regions(vec![
                region(0x10_0000, 0x4000, MmapXenFlags::UNIX.bits()),
                region(1 << 63, 0x8000, GRANT_PER_ACCESS),
            ])
            .unwrap();
            // vm-memory leaves such a region's base null: what the daemon must never copy from.
            assert!(mem.iter().nth(1).unwrap().as_ptr().is_null());
            let atomic = GuestMemAtomic::new(mem);
            let err = refuse_mapped_per_access(&atomic).unwrap_err();
            let Error::MappedPerAccess { gpa, len, flags } = &err;
            assert_eq!((*gpa, *len, *flags), (1 << 63, 0x8000, GRANT_PER_ACCESS));
            let message = err.to_string();
            assert!(message.contains("0x8000000000000000"), "{message}");
            assert!(message.contains("--foreign-mapping"), "{message}");
            assert_eq!(
                atomic.memory().num_regions(),
                0,
                "nothing can reach it any more"
            );
        }
    }
}

/// Records, on the test's own thread, every write made through this module, so a test can
/// show that each kind of write goes through it and that nothing else changed guest memory.
#[cfg(test)]
pub(crate) mod recorder {
    use std::cell::RefCell;

    use super::{GuestMem, WriteKind};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    /// One write: its kind and the guest-physical range it covered.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Write {
        pub kind: WriteKind,
        pub gpa: u64,
        pub len: usize,
    }

    thread_local! {
        static WRITES: RefCell<Option<Vec<Write>>> = const { RefCell::new(None) };
    }

    pub(super) fn record(kind: WriteKind, gpa: u64, len: usize) {
        WRITES.with(|w| {
            if let Some(writes) = w.borrow_mut().as_mut() {
                writes.push(Write { kind, gpa, len });
            }
        });
    }

    /// Starts recording this thread's writes.
    pub fn start() {
        WRITES.with(|w| *w.borrow_mut() = Some(Vec::new()));
    }

    /// Stops recording and returns what was written since [`start`].
    pub fn take() -> Vec<Write> {
        WRITES.with(|w| w.borrow_mut().take().unwrap_or_default())
    }

    /// Every byte of every region of `mem`, in address order.
    pub fn snapshot(mem: &GuestMem) -> Vec<(u64, Vec<u8>)> {
        mem.iter()
            .map(|r| {
                let start = r.start_addr().0;
                let mut bytes = vec![0u8; r.len() as usize];
                mem.read_slice(&mut bytes, GuestAddress(start))
                    .expect("a region reads whole");
                (start, bytes)
            })
            .collect()
    }

    /// Panics unless every byte that differs between `before` and `after` lies in one of
    /// `writes`: a write that bypassed the one path would show here.
    pub fn assert_covered(before: &[(u64, Vec<u8>)], after: &[(u64, Vec<u8>)], writes: &[Write]) {
        assert_covered_except(before, after, writes, &[]);
    }

    /// As [`assert_covered`], ignoring the ranges `[start, end)` in `exempt`: a virtqueue's own
    /// rings, which `virtio-queue` writes.
    pub fn assert_covered_except(
        before: &[(u64, Vec<u8>)],
        after: &[(u64, Vec<u8>)],
        writes: &[Write],
        exempt: &[(u64, u64)],
    ) {
        for ((start, old), (_, new)) in before.iter().zip(after) {
            for (i, (o, n)) in old.iter().zip(new).enumerate() {
                let gpa = start + i as u64;
                if o == n || exempt.iter().any(|&(s, e)| gpa >= s && gpa < e) {
                    continue;
                }
                assert!(
                    writes
                        .iter()
                        .any(|w| gpa >= w.gpa && gpa < w.gpa + w.len as u64),
                    "guest byte {gpa:#x} changed without a recorded write"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    use super::*;
    use crate::testing::TestVm;

    /// A 64 KiB copy from three runs apart to two that do not line up with them, with a cut
    /// asked every 4 KiB that says stop at its `stop_at_ask`th question. Returns the bytes the
    /// copy should move (the source runs' in order), what landed at the destination, what
    /// the copy said and how often the cut was asked.
    fn copy_with_cut(stop_at_ask: Option<u32>) -> (Vec<u8>, Vec<u8>, Copied, u32) {
        let mut vm = TestVm::new(3, 1);
        let (src, dst) = (vm.alloc(80 << 10), vm.alloc(64 << 10));
        let pattern: Vec<u8> = (0..80u32 << 10).map(|i| (i % 251) as u8 + 1).collect();
        vm.mem().write_slice(&pattern, GuestAddress(src)).unwrap();
        let mut from = Runs::default();
        let mut expected = Vec::new();
        for (at, len) in [(0u64, 10_000u32), (12_000, 30_000), (44_000, 25_536)] {
            from.push(src + at, len).unwrap();
            expected.extend_from_slice(&pattern[at as usize..at as usize + len as usize]);
        }
        assert_eq!(from.as_slice().len(), 3, "the runs stay apart");
        let mut to = Runs::default();
        to.push(dst, 40_000).unwrap();
        to.push(dst + 40_000 + 4096, 25_536).unwrap();
        let asks = Cell::new(0u32);
        let stop = || {
            asks.set(asks.get() + 1);
            Some(asks.get()) == stop_at_ask
        };
        let cut = CopyCut {
            every: 4096,
            stop: &stop,
        };
        let mem = vm.vm.mem.memory();
        let copied = copy_runs(&mem, from.as_slice(), &mem, to.as_slice(), Some(cut)).unwrap();
        let mut landed = vm.read(dst, 40_000);
        landed.extend(vm.read(dst + 40_000 + 4096, 25_536));
        (expected, landed, copied, asks.get())
    }

    /// A cut that says stop ends the copy after the piece in progress, with exactly the bytes
    /// before it copied, whatever the runs' boundaries.
    #[test]
    fn a_cut_ends_a_copy_after_the_piece_it_was_asked_at() {
        let (expected, landed, copied, asks) = copy_with_cut(Some(3));
        assert_eq!(
            copied,
            Copied {
                bytes: 3 * 4096,
                cut: true
            }
        );
        assert_eq!(asks, 3);
        assert_eq!(landed[..3 * 4096], expected[..3 * 4096]);
        assert!(
            landed[3 * 4096..].iter().all(|&b| b == 0),
            "nothing past the cut"
        );
    }

    /// A cut that never says stop is asked between pieces only (not after the last), and
    /// the whole copy is made.
    #[test]
    fn a_cut_that_never_stops_copies_everything() {
        let (expected, landed, copied, asks) = copy_with_cut(None);
        assert_eq!(
            copied,
            Copied {
                bytes: 64 << 10,
                cut: false
            }
        );
        assert_eq!(asks, 15, "asked between the 16 pieces");
        assert_eq!(landed, expected);
    }

    /// A watched word follows what the guest writes, knows its table, and is refused where it
    /// cannot be read atomically.
    #[test]
    fn a_watched_word_reads_the_guest_without_translating_again() {
        let mut vm = TestVm::new(4, 1);
        let at = vm.alloc(4096);
        let mem = vm.vm.mem.memory().into_inner();
        let word = WatchedWord::new(mem.clone(), at + 2).expect("an aligned word in memory");
        assert_eq!(word.gpa(), at + 2);
        assert_eq!(word.load(Ordering::Acquire), 0);
        mem.write_obj(0xbeefu16.to_le(), GuestAddress(at + 2))
            .unwrap();
        assert_eq!(word.load(Ordering::Acquire), 0xbeef);
        assert!(word.is_in(&mem));
        assert!(!word.is_in(&GuestMem::default()), "another table");
        assert!(WatchedWord::new(mem.clone(), at + 1).is_none(), "unaligned");
        assert!(
            WatchedWord::new(mem, u64::MAX - 1).is_none(),
            "not guest memory"
        );
    }
}
