use std::sync::Arc;

use vrdma_proto::cmd::{self, Opcode};
use zerocopy::IntoBytes;

use super::pd::{PdInner, ProtectionDomain};
use super::{Error, Result};
use crate::mem::DmaBuf;

/// Memory-region access flags (`ibv_access_flags`).
// A re-export, not a type alias: rustdoc shows an alias of a bitflags type without its
// flag constants, which are the point of the page.
#[doc(inline)]
pub use vrdma_proto::mr::Access as AccessFlags;

/// Page size used for page lists: the smallest the device accepts, so any mapping works.
const PAGE_SHIFT: u8 = vrdma_proto::mr::MIN_PAGE_SHIFT;

/// A registered memory region (`ibv_mr`).
#[derive(Debug)]
pub struct MemoryRegion {
    pd: Arc<PdInner>,
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: u64,
}

impl MemoryRegion {
    /// Registers `buf` with `access` rights.
    #[doc(alias = "ibv_reg_mr")]
    pub fn register(
        pd: &ProtectionDomain,
        buf: &DmaBuf,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        // SAFETY-free: the DmaBuf is shared memory that lives at least as long as the caller
        // keeps it; the MR only records its address.
        Self::register_range(pd, buf.addr(), buf.len() as u64, access)
    }

    /// Registers `len` bytes at `addr`, which must lie in memory the device can reach: from
    /// [`super::Context::alloc`], or added with [`super::Context::add_memory`]. The range may
    /// span several adjacent regions; each page of the page list then lies in one of them.
    #[doc(alias = "ibv_reg_mr")]
    pub fn register_range(
        pd: &ProtectionDomain,
        addr: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        Self::register_iova(pd, addr, len, addr, access)
    }

    /// As [`MemoryRegion::register_range`], with the region's first byte at `iova` in the
    /// addresses work requests use for it (its local SGEs and remote peers' RDMA).
    #[doc(alias = "ibv_reg_mr_iova2")]
    pub fn register_iova(
        pd: &ProtectionDomain,
        addr: u64,
        len: u64,
        iova: u64,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        const VERB: &str = "ibv_reg_mr";
        if len == 0 {
            return Err(Error::invalid(VERB, "length is zero"));
        }
        if !access.is_consistent() {
            return Err(Error::invalid(
                VERB,
                "remote write or atomic access needs local write",
            ));
        }
        let regions = covering_regions(addr, len, |a| pd.inner.ctx.shared_region(a))
            .ok_or(Error::NotShareable { addr, len })?;
        let ctx = &pd.inner.ctx;
        let (shift, pages) =
            device_pages(addr, len, page_shift_for(addr, len, &regions), |a, n| {
                ctx.device_addr(a, n)
            })
            .ok_or(Error::NotShareable { addr, len })?;
        let page = 1u64 << shift;
        let first = addr & !(page - 1);
        let offset = addr - first;
        let npages = pages.len() as u64;
        let body = cmd::RegMr {
            pdn: pd.inner.pdn.into(),
            access: access.bits().into(),
            iova: iova.into(),
            length: len.into(),
            first_page_offset: (offset as u32).into(),
            npages: (npages as u32).into(),
            page_shift: shift,
            reserved: [0; 7],
        };
        let mut request = Vec::with_capacity(size_of::<cmd::RegMr>() + pages.len() * 8);
        request.extend_from_slice(body.as_bytes());
        for device_page in pages {
            request.extend_from_slice(&device_page.to_le_bytes());
        }
        let resp: cmd::RegMrResp = pd.inner.ctx.command_as(Opcode::RegMr, &request, VERB)?;
        Ok(MemoryRegion {
            pd: pd.inner.clone(),
            lkey: resp.lkey.get(),
            rkey: resp.rkey.get(),
            addr: iova,
            len,
        })
    }

    /// The local key.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The remote key (0 without remote access).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Start address, in the region's iova space (the process address unless registered
    /// with [`MemoryRegion::register_iova`]).
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never: registration refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MemoryRegion {
    #[doc(alias = "ibv_dereg_mr")]
    fn drop(&mut self) {
        self.pd
            .ctx
            .destroy(Opcode::DeregMr, self.lkey, "ibv_dereg_mr");
    }
}

/// The shared regions, as `(start, end)`, that hold `addr..addr + len` one after the other
/// without a gap; `None` if some byte of the range is not shared.
fn covering_regions(
    addr: u64,
    len: u64,
    shared_region: impl Fn(u64) -> Option<(u64, u64)>,
) -> Option<Vec<(u64, u64)>> {
    let end = addr.checked_add(len)?;
    let mut regions = Vec::new();
    let mut at = addr;
    while at < end {
        let (base, size) = shared_region(at)?;
        let region_end = base.checked_add(size)?;
        if base > at || region_end <= at {
            return None;
        }
        regions.push((base, region_end));
        at = region_end;
    }
    Some(regions)
}

/// The page list of `addr..addr + len` in the device's addresses (`device_addr`), with the
/// page size `1 << shift` for the largest `shift`, up to `largest`, at which every page is one
/// contiguous stretch for the device starting on a multiple of the page size (the device
/// checks that alignment). Under virtio-user the first try succeeds; under virtio-pci,
/// memory that is contiguous to the process but not physically falls back to smaller pages,
/// down to the base page. `None` if even base pages are out of the device's reach.
fn device_pages(
    addr: u64,
    len: u64,
    largest: u8,
    device_addr: impl Fn(u64, u64) -> Option<u64>,
) -> Option<(u8, Vec<u64>)> {
    let mut shift = largest;
    loop {
        let page = 1u64 << shift;
        let first = addr & !(page - 1);
        let npages = (addr - first).checked_add(len)?.div_ceil(page);
        let pages: Option<Vec<u64>> = (0..npages)
            .map(|i| device_addr(first + i * page, page).filter(|d| d % page == 0))
            .collect();
        match pages {
            Some(pages) => return Some((shift, pages)),
            None if shift > PAGE_SHIFT => shift -= 1,
            None => return None,
        }
    }
}

/// The largest page size (up to 1 GiB) whose pages, covering `addr..addr + len`, each lie in
/// one of `regions` (the adjacent regions [`covering_regions`] found), as Linux's
/// `ib_umem_find_best_pgsz` picks the largest page size a mapping allows: 1 GiB of 2 MiB pages
/// is a 4 KiB page list, not 2 MiB. Under virtio-user guest-physical memory is contiguous
/// within a region, so only the regions' bounds limit it: the first and last page must not
/// reach outside them, and no page may straddle the boundary between two of them (the device
/// maps each page from one region).
fn page_shift_for(addr: u64, len: u64, regions: &[(u64, u64)]) -> u8 {
    let (Some(&(start, _)), Some(&(_, end))) = (regions.first(), regions.last()) else {
        return PAGE_SHIFT;
    };
    let mut shift = vrdma_proto::mr::MAX_PAGE_SHIFT;
    while shift > PAGE_SHIFT {
        let page = 1u64 << shift;
        let first = addr & !(page - 1);
        let last_end = addr
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(page));
        let inner_bounds_aligned = regions.windows(2).all(|w| w[0].1 % page == 0);
        if first >= start && last_end.is_some_and(|e| e <= end) && inner_bounds_aligned {
            return shift;
        }
        shift -= 1;
    }
    PAGE_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device view of 0x20_0000..0x20_4000 as four scattered 4 KiB frames, pages 0 and 1
    /// adjacent at an odd frame, 2 and 3 adjacent elsewhere.
    fn scattered(addr: u64, len: u64) -> Option<u64> {
        let frames = [0x9000u64, 0xa000, 0x3000, 0x4000];
        let index = usize::try_from(addr.checked_sub(0x20_0000)? / 0x1000).ok()?;
        let start = frames.get(index)? + addr % 0x1000;
        let last = usize::try_from((addr + len - 1 - 0x20_0000) / 0x1000).ok()?;
        let contiguous = (index..last).all(|i| {
            matches!((frames.get(i), frames.get(i + 1)), (Some(a), Some(b)) if a + 0x1000 == *b)
        });
        (contiguous && last < frames.len()).then_some(start)
    }

    #[test]
    fn device_pages_shrink_until_each_is_contiguous_and_aligned_for_the_device() {
        // Under virtio-user the device's addresses are the process's: the largest size holds.
        let identity = |a: u64, _| Some(a);
        assert_eq!(
            device_pages(0x20_0100, 0x3f00, 14, identity),
            Some((14, vec![0x20_0000]))
        );
        // 16 KiB pages are not contiguous; 8 KiB ones are, for pages 0-1 and 2-3, but the
        // first starts at 0x9000, which is not 8 KiB aligned: base pages it is.
        assert_eq!(
            device_pages(0x20_0100, 0x3f00, 14, scattered),
            Some((12, vec![0x9000, 0xa000, 0x3000, 0x4000]))
        );
        // Only the second half: 8 KiB pages at 0x3000 are not aligned either; at 4 KiB fine.
        assert_eq!(
            device_pages(0x20_2000, 0x2000, 13, scattered),
            Some((12, vec![0x3000, 0x4000]))
        );
        // A byte past the device's reach fails at every size.
        assert_eq!(device_pages(0x20_3000, 0x1001, 13, scattered), None);
    }

    #[test]
    fn the_page_size_is_the_largest_the_shared_region_allows() {
        // A region of 8 MiB starting 2 MiB-aligned but not 4 MiB-aligned.
        let (base, size) = (0x7f00_0020_0000u64, 8u64 << 20);
        let one = [(base, base + size)];
        // The whole region: 2 MiB pages fit, 4 MiB pages would start before it.
        assert_eq!(page_shift_for(base, size, &one), 21);
        // A 4 KiB buffer in the region's middle 4 MiB: one 4 MiB page covers it.
        assert_eq!(page_shift_for(base + (3 << 20) + 4096, 4096, &one), 22);
        // A buffer at the region's last page: 2 MiB pages still fit (the region ends on one).
        assert_eq!(page_shift_for(base + size - 4096, 4096, &one), 21);
        // Nothing larger than a base page fits a one-page region at an odd address.
        assert_eq!(
            page_shift_for(0x1000, 0x1000, &[(0x1000, 0x2000)]),
            PAGE_SHIFT
        );
        // A length that would overflow falls back to base pages rather than wrapping.
        assert_eq!(
            page_shift_for(u64::MAX - 10, 5, &[(0, u64::MAX)]),
            PAGE_SHIFT
        );
    }

    #[test]
    fn pages_never_straddle_two_regions() {
        // Two adjacent regions of 4 MiB each, meeting at a 4 MiB (not 8 MiB) boundary.
        let mid = 0x7f00_0040_0000u64;
        let two = [(mid - (4 << 20), mid), (mid, mid + (4 << 20))];
        // All of both: 4 MiB pages, one per region.
        assert_eq!(page_shift_for(mid - (4 << 20), 8 << 20, &two), 22);
        // Two pieces meeting at an odd page: only base pages keep each page in one region.
        let odd = 0x7f00_0000_3000u64;
        let pieces = [(odd - 0x3000, odd), (odd, odd + 0x5000)];
        assert_eq!(page_shift_for(odd - 0x100, 0x200, &pieces), PAGE_SHIFT);
        // A buffer inside the second piece alone is limited by that piece's bounds only:
        // 16 KiB pages (0x...4000..0x...8000) fit it, 32 KiB ones would start before it.
        assert_eq!(page_shift_for(odd + 0x1000, 0x100, &pieces[1..]), 14);
    }

    #[test]
    fn regions_must_cover_the_range_without_gaps() {
        let table = [(0x1000u64, 0x2000u64), (0x3000, 0x1000), (0x5000, 0x1000)];
        let lookup = |a: u64| table.iter().copied().find(|&(b, l)| a >= b && a < b + l);
        assert_eq!(
            covering_regions(0x1800, 0x2000, lookup),
            Some(vec![(0x1000, 0x3000), (0x3000, 0x4000)])
        );
        assert_eq!(
            covering_regions(0x1000, 0x1000, lookup),
            Some(vec![(0x1000, 0x3000)])
        );
        // 0x4000..0x5000 is a hole.
        assert_eq!(covering_regions(0x3800, 0x1000, lookup), None);
        assert_eq!(covering_regions(0x800, 0x1000, lookup), None);
        assert_eq!(
            covering_regions(u64::MAX - 1, 2, |_| Some((0, u64::MAX))),
            None
        );
    }
}
