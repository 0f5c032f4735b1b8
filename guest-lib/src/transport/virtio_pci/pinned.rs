//! Memory the device reaches by guest-physical address: locked in RAM (`mlock`) and
//! translated page by page through `/proc/self/pagemap`.
//!
//! Base pages are not physically contiguous, so a buffer the device must see as one stretch
//! (a ring, a control buffer) lies within one page, or within one huge page of memory from
//! [`SharedMemory::hugetlb`], which is. Locked base pages are not swapped out, but the kernel
//! may still migrate them when it compacts memory unless `vm.compact_unevictable_allowed` is 0
//! (docs/qemu.md); huge pages stay where they are.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::VirtioPciError;
use crate::mem::{DmaAllocator, SharedMemory, page_size};

const PAGEMAP: &str = "/proc/self/pagemap";
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_PFN_MASK: u64 = (1 << 55) - 1;

/// A region of shared memory, locked, with the physical address of each of its base pages.
#[derive(Debug)]
pub struct Pinned {
    mem: Arc<SharedMemory>,
    frames: Vec<u64>,
}

impl Pinned {
    /// Locks `mem` in RAM and translates each of its pages.
    pub fn pin(mem: Arc<SharedMemory>) -> Result<Pinned, VirtioPciError> {
        // SAFETY: the range is the live mapping `mem` owns (kept alive by the Arc this value
        // holds); mlock only faults it in and pins it.
        if unsafe { libc::mlock(mem.as_ptr().cast(), mem.len()) } != 0 {
            return Err(VirtioPciError::Pin {
                what: "locking memory for the device (mlock; run as root or raise \
                       RLIMIT_MEMLOCK)",
                source: std::io::Error::last_os_error(),
            });
        }
        let page = page_size();
        let pagemap = File::open(PAGEMAP).map_err(|source| VirtioPciError::Pin {
            what: "opening /proc/self/pagemap",
            source,
        })?;
        let mut entries = vec![0u8; mem.len() / page * 8];
        pagemap
            .read_exact_at(&mut entries, mem.addr() / page as u64 * 8)
            .map_err(|source| VirtioPciError::Pin {
                what: "reading /proc/self/pagemap",
                source,
            })?;
        let mut frames = Vec::with_capacity(mem.len() / page);
        for entry in entries.chunks_exact(8) {
            let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            let pfn = entry & PAGEMAP_PFN_MASK;
            if entry & PAGEMAP_PRESENT == 0 || pfn == 0 {
                return Err(VirtioPciError::Pin {
                    what: "translating memory for the device: /proc/self/pagemap gave no frame \
                           number (needs CAP_SYS_ADMIN: run as root)",
                    source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                });
            }
            frames.push(pfn * page as u64);
        }
        Ok(Pinned { mem, frames })
    }

    /// The memory.
    pub fn memory(&self) -> &Arc<SharedMemory> {
        &self.mem
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.mem.addr()
    }

    /// Bytes.
    pub fn len(&self) -> u64 {
        self.mem.len() as u64
    }

    /// Whether `addr` lies in the region.
    pub fn holds(&self, addr: u64) -> bool {
        addr >= self.base() && addr - self.base() < self.len()
    }

    /// The guest-physical address of `addr..addr + len` (`len > 0`), if the range lies in
    /// this region and its pages are physically contiguous; `None` otherwise.
    pub fn phys(&self, addr: u64, len: u64) -> Option<u64> {
        let page = page_size() as u64;
        let off = addr.checked_sub(self.base())?;
        let end = off.checked_add(len.max(1))?;
        if end > self.len() {
            return None;
        }
        let first = usize::try_from(off / page).ok()?;
        let last = usize::try_from((end - 1) / page).ok()?;
        let frames = self.frames.get(first..=last)?;
        let contiguous = frames.windows(2).all(|w| w[0] + page == w[1]);
        contiguous.then(|| frames[0] + off % page)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: the mapping is still alive (`mem` is dropped after this); munlock only
        // unpins it.
        unsafe { libc::munlock(self.mem.as_ptr().cast(), self.mem.len()) };
    }
}

/// A locked region of base pages and its allocator, for the transport's own queues and
/// buffers, each of which the allocator keeps within one page (page-aligned, at most a page).
#[derive(Debug)]
pub struct PinnedMemory {
    alloc: DmaAllocator,
    pinned: Pinned,
}

impl PinnedMemory {
    /// Creates, locks and translates `len` bytes (rounded up to pages).
    pub fn new(len: usize) -> Result<PinnedMemory, VirtioPciError> {
        let mem = SharedMemory::new("vrdma-pci", len).map_err(|source| VirtioPciError::Memory {
            what: "creating DMA memory",
            source,
        })?;
        let pinned = Pinned::pin(Arc::new(mem))?;
        Ok(PinnedMemory {
            alloc: DmaAllocator::with_region(pinned.memory().clone()),
            pinned,
        })
    }

    /// The allocator over the locked region (its buffers are page aligned).
    pub fn alloc(&self) -> &DmaAllocator {
        &self.alloc
    }

    /// The guest-physical address of `addr..addr + len`, which must lie within one page of the
    /// region; `None` otherwise.
    pub fn phys(&self, addr: u64, len: u64) -> Option<u64> {
        let page = page_size() as u64;
        let in_page = addr.checked_sub(self.pinned.base())? % page;
        if in_page + len > page {
            return None;
        }
        self.pinned.phys(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pinned memory, or `None` where the test cannot pin: without CAP_SYS_ADMIN (or with
    /// a low RLIMIT_MEMLOCK), where the failure must say what to do.
    fn pinned_or_skip<T>(result: Result<T, VirtioPciError>) -> Option<T> {
        match result {
            Ok(p) => Some(p),
            Err(VirtioPciError::Pin { what, .. }) => {
                assert!(what.contains("root"), "{what}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn buffers_translate_within_their_page_only() {
        let Some(pinned) = pinned_or_skip(PinnedMemory::new(3 * page_size())) else {
            return;
        };
        let page = page_size() as u64;
        let buf = pinned.alloc().alloc(page as usize).expect("alloc");
        let phys = pinned
            .phys(buf.addr(), page)
            .expect("a whole page translates");
        assert_eq!(phys % page, 0);
        assert_eq!(pinned.phys(buf.addr() + 100, 8), Some(phys + 100));
        assert_eq!(pinned.phys(buf.addr() + 1, page), None, "crosses a page");
        assert_eq!(pinned.phys(buf.addr() - 1, 1), None, "before the region");
        assert_eq!(
            pinned.phys(buf.addr() + 3 * page, 1),
            None,
            "after the region"
        );
    }

    #[test]
    fn a_range_translates_only_where_its_frames_are_contiguous() {
        let mem = Arc::new(SharedMemory::new("vrdma-pin-test", 4 * page_size()).unwrap());
        let Some(pinned) = pinned_or_skip(Pinned::pin(mem)) else {
            return;
        };
        let page = page_size() as u64;
        let base = pinned.base();
        for i in 0..4u64 {
            let frame = pinned
                .phys(base + i * page, page)
                .expect("each page translates");
            // Two pages are one stretch exactly when their frames follow each other.
            if i < 3 {
                let next = pinned.phys(base + (i + 1) * page, 1).unwrap();
                assert_eq!(
                    pinned.phys(base + i * page, 2 * page),
                    (next == frame + page).then_some(frame)
                );
            }
        }
        assert_eq!(pinned.phys(base + 4 * page, 1), None, "past the end");
        assert!(pinned.holds(base) && !pinned.holds(base + 4 * page));
    }
}
