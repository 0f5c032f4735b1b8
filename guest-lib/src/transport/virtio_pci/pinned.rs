//! Memory the device reaches by guest-physical address: locked in RAM (`mlock`) and
//! translated page by page through `/proc/self/pagemap`.
//!
//! Pages are not physically contiguous, so every buffer handed to the device here lies within
//! one page (the allocator hands out page-aligned buffers of at most a page). Locked pages are
//! not swapped out; the kernel could still migrate them (compaction), which a later step
//! avoids with hugetlbfs or a kernel-pinned buffer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::VirtioPciError;
use crate::mem::{DmaAllocator, SharedMemory, page_size};

const PAGEMAP: &str = "/proc/self/pagemap";
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_PFN_MASK: u64 = (1 << 55) - 1;

/// A locked region, its allocator and the physical address of each of its pages.
#[derive(Debug)]
pub struct PinnedMemory {
    alloc: DmaAllocator,
    base: u64,
    frames: Vec<u64>,
}

impl PinnedMemory {
    /// Creates, locks and translates `len` bytes (rounded up to pages).
    pub fn new(len: usize) -> Result<PinnedMemory, VirtioPciError> {
        let mem = SharedMemory::new("vrdma-pci", len).map_err(|source| VirtioPciError::Memory {
            what: "creating DMA memory",
            source,
        })?;
        // SAFETY: the range is the live mapping `mem` owns; mlock only pins it.
        if unsafe { libc::mlock(mem.as_ptr().cast(), mem.len()) } != 0 {
            return Err(VirtioPciError::Pin {
                what: "locking DMA memory (mlock; run as root or raise RLIMIT_MEMLOCK)",
                source: std::io::Error::last_os_error(),
            });
        }
        let page = page_size();
        let pagemap = File::open(PAGEMAP).map_err(|source| VirtioPciError::Pin {
            what: "opening /proc/self/pagemap",
            source,
        })?;
        let mut frames = Vec::with_capacity(mem.len() / page);
        for vaddr in (mem.addr()..mem.addr() + mem.len() as u64).step_by(page) {
            let mut entry = [0u8; 8];
            pagemap
                .read_exact_at(&mut entry, vaddr / page as u64 * 8)
                .map_err(|source| VirtioPciError::Pin {
                    what: "reading /proc/self/pagemap",
                    source,
                })?;
            let entry = u64::from_le_bytes(entry);
            let pfn = entry & PAGEMAP_PFN_MASK;
            if entry & PAGEMAP_PRESENT == 0 || pfn == 0 {
                return Err(VirtioPciError::Pin {
                    what: "translating DMA memory: /proc/self/pagemap gave no frame number \
                           (needs CAP_SYS_ADMIN: run as root)",
                    source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                });
            }
            frames.push(pfn * page as u64);
        }
        let base = mem.addr();
        Ok(PinnedMemory {
            alloc: DmaAllocator::with_region(Arc::new(mem)),
            base,
            frames,
        })
    }

    /// The allocator over the locked region (its buffers are page aligned).
    pub fn alloc(&self) -> &DmaAllocator {
        &self.alloc
    }

    /// The guest-physical address of `addr..addr + len` in this region, which must not cross
    /// a page boundary; `None` otherwise.
    pub fn phys(&self, addr: u64, len: u64) -> Option<u64> {
        let page = page_size() as u64;
        let off = addr.checked_sub(self.base)?;
        let index = usize::try_from(off / page).ok()?;
        let in_page = off % page;
        if in_page + len > page {
            return None;
        }
        Some(self.frames.get(index)? + in_page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_translate_within_their_page_only() {
        let pinned = match PinnedMemory::new(3 * page_size()) {
            Ok(p) => p,
            // Without CAP_SYS_ADMIN (or with a low RLIMIT_MEMLOCK) the failure must say so.
            Err(VirtioPciError::Pin { what, .. }) => {
                assert!(what.contains("root"), "{what}");
                return;
            }
            Err(e) => panic!("{e}"),
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
}
