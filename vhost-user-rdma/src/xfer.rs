//! Moving bytes between guest memories: MR translation into guest-physical runs, and the one
//! copy from a sender's memory straight into a receiver's.
//!
//! Nothing here allocates: runs go into fixed arrays sized for one scheduler chunk.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    VolatileMemory, VolatileSlice,
};
use vrdma_proto::cqe::VendorErr;
use vrdma_proto::mr::Access;
use vrdma_proto::wqe::{Sge, SgeList};

use crate::handle::Table;
use crate::vm::{GuestMem, Mr};

/// Bytes the scheduler moves at most in one step for one QP, so a bulk transfer cannot hold
/// the fabric for long.
pub const CHUNK: u32 = 64 * 1024;
/// Runs one chunk can need: its pages (4 KiB at the least) plus one partial page per SGE.
pub const MAX_RUNS: usize = (CHUNK as usize / 4096) + 2 * vrdma_proto::wqe::MAX_SGE as usize + 2;

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
        Runs {
            runs: [Run::default(); MAX_RUNS],
            n: 0,
        }
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

    fn push(&mut self, gpa: u64, len: u32) -> Result<(), VendorErr> {
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

/// Appends the guest-physical runs behind `[addr, addr + len)` of `mr`, which the caller has
/// checked lies within it.
pub fn mr_runs(mr: &Mr, addr: u64, len: u32, out: &mut Runs) -> Result<(), VendorErr> {
    let shift = u32::from(mr.page_shift);
    let page_size = 1u64 << shift;
    let mut pos = mr.first_page_offset + (addr - mr.iova);
    let mut remaining = u64::from(len);
    while remaining > 0 {
        let page = usize::try_from(pos >> shift).map_err(|_| VendorErr::SgeOutOfBounds)?;
        let within = pos & (page_size - 1);
        let n = remaining.min(page_size - within);
        let base = *mr.pages.get(page).ok_or(VendorErr::SgeOutOfBounds)?;
        out.push(base + within, n as u32)?;
        pos += n;
        remaining -= n;
    }
    Ok(())
}

/// Checks one local SGE: the MR exists, is in `pdn`, grants `need`, and contains the range.
pub fn check_local(
    mrs: &Table<Mr>,
    pdn: u32,
    sge: &Sge,
    need: Access,
) -> Result<(), (bool, VendorErr)> {
    let len = sge.length.get();
    if len == 0 {
        return Ok(());
    }
    // (true, ..) is an access error, (false, ..) a protection error: verbs reports them
    // with different statuses.
    let mr = mrs.get(sge.lkey.get()).ok_or((false, VendorErr::BadLkey))?;
    if mr.pdn != pdn {
        return Err((false, VendorErr::PdMismatch));
    }
    if !mr.contains(sge.addr.get(), len.into()) {
        return Err((false, VendorErr::SgeOutOfBounds));
    }
    if !mr.access().contains(need) {
        return Err((true, VendorErr::LocalAccess));
    }
    Ok(())
}

/// Appends the runs for bytes `[offset, offset + len)` of the message an SGE list describes.
pub fn sge_runs(
    mrs: &Table<Mr>,
    sges: SgeList<'_>,
    offset: u32,
    len: u32,
    out: &mut Runs,
) -> Result<(), VendorErr> {
    sge_iter_runs(mrs, sges.iter(), offset, len, out)
}

/// As [`sge_runs`], for SGEs already copied out.
pub fn sge_iter_runs(
    mrs: &Table<Mr>,
    sges: impl Iterator<Item = Sge>,
    offset: u32,
    len: u32,
    out: &mut Runs,
) -> Result<(), VendorErr> {
    let (mut skip, mut want) = (offset, len);
    for sge in sges {
        if want == 0 {
            break;
        }
        let sl = sge.length.get();
        if skip >= sl {
            skip -= sl;
            continue;
        }
        let n = (sl - skip).min(want);
        let mr = mrs.get(sge.lkey.get()).ok_or(VendorErr::BadLkey)?;
        let addr = sge.addr.get() + u64::from(skip);
        if !mr.contains(addr, n.into()) {
            return Err(VendorErr::SgeOutOfBounds);
        }
        mr_runs(mr, addr, n, out)?;
        skip = 0;
        want -= n;
    }
    if want == 0 {
        Ok(())
    } else {
        Err(VendorErr::SgeOutOfBounds)
    }
}

/// The longest slice of guest memory at `gpa`, up to `max` bytes, within one memory slot.
fn slice_at(mem: &GuestMem, gpa: u64, max: u64) -> Option<VolatileSlice<'_, ()>> {
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

/// Copies from `src` runs in `src_mem` to `dst` runs in `dst_mem`, as many bytes as the shorter
/// covers. Fails, naming the side, if a run is no longer backed by guest memory (the table
/// changed): the error completion belongs to whoever's memory it was.
pub fn copy_runs(
    src_mem: &GuestMem,
    src: &[Run],
    dst_mem: &GuestMem,
    dst: &[Run],
) -> Result<u64, (Side, VendorErr)> {
    let (mut si, mut so, mut di, mut dof) = (0usize, 0u64, 0usize, 0u64);
    let mut copied = 0u64;
    while si < src.len() && di < dst.len() {
        let (s, d) = (src[si], dst[di]);
        let s_rem = u64::from(s.len) - so;
        let d_rem = u64::from(d.len) - dof;
        let from = slice_at(src_mem, s.gpa + so, s_rem)
            .filter(|f| !f.is_empty())
            .ok_or((Side::Source, VendorErr::GuestMemory))?;
        let to = slice_at(dst_mem, d.gpa + dof, d_rem)
            .filter(|t| !t.is_empty())
            .ok_or((Side::Destination, VendorErr::GuestMemory))?;
        let n = from.len().min(to.len()) as u64;
        from.copy_to_volatile_slice(to);
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
    Ok(copied)
}

/// Writes `bytes` into `dst` runs in `dst_mem`.
pub fn write_runs(bytes: &[u8], dst_mem: &GuestMem, dst: &[Run]) -> Result<(), VendorErr> {
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
/// guest's own CPUs, and returns its result.
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
    Ok(op(atomic))
}

/// Compare-and-swap: the value before.
pub fn compare_swap(a: &AtomicU64, compare: u64, swap: u64) -> u64 {
    match a.compare_exchange(compare, swap, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(v) | Err(v) => v,
    }
}
