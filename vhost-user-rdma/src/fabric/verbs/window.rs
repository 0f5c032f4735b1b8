//! One virtually contiguous host range over a guest MR's pages, for the NIC, which registers a
//! range and not a page list.
//!
//! A guest MR names guest-physical pages that need not be adjacent, nor in one vhost-user
//! region, nor adjacent in the daemon's own mappings of those regions. Each region is a file
//! (the frontend's memory fd) mapped at a file offset, so the window maps each run of the MR's
//! pages from its region's file, back to back, into a range reserved for it: the NIC then
//! sees the guest's MR as one range, the same pages the guest sees, shared with it.

use std::os::fd::AsRawFd;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::model::memory::GuestMem;
use crate::model::objects::Mr;

/// Why an MR's pages cannot be mapped into one range.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A page lies in no region of the VM's memory.
    #[error("page {gpa:#x} of the MR is not in the VM's memory")]
    NotInMemory {
        /// Its guest-physical address.
        gpa: u64,
    },
    /// The region holding a page is not a file the daemon can map again.
    #[error(
        "page {gpa:#x} of the MR lies in memory that is not a mappable file: the VMM must share \
         guest memory as files (memfd or hugetlbfs), as QEMU with a memory backend does"
    )]
    NotAFile {
        /// Its guest-physical address.
        gpa: u64,
    },
    /// A page's offset in its file is not a multiple of the host's page size.
    #[error("page {gpa:#x} of the MR is not aligned to the host's pages in its file")]
    Unaligned {
        /// Its guest-physical address.
        gpa: u64,
    },
    /// mmap failed.
    #[error("cannot map the MR's pages into one range")]
    Map(#[source] std::io::Error),
}

/// Pages of one file that go back to back into the window.
struct Run {
    /// Byte offset in the window.
    at: usize,
    /// Bytes.
    len: usize,
    /// The file.
    fd: std::os::fd::RawFd,
    /// Offset in the file.
    offset: u64,
}

/// The pages of a guest MR, mapped back to back; unmapped when dropped.
#[derive(Debug)]
pub struct Window {
    base: *mut u8,
    len: usize,
}

// SAFETY: the window is a mapping of shared guest memory, usable from any thread; this type
// only holds its address to unmap it.
unsafe impl Send for Window {}
// SAFETY: as above: nothing is accessed through `&Window`.
unsafe impl Sync for Window {}

impl Window {
    /// Maps the pages of `mr`, which lie in `mem`, back to back.
    pub fn map(mr: &Mr, mem: &GuestMem) -> Result<Window, Error> {
        let page = 1usize << mr.page_shift;
        let host_page = host_page_size();
        let len = mr.pages.len() * page;
        // SAFETY: a new private reservation where the kernel chooses; nothing else uses it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::Map(std::io::Error::last_os_error()));
        }
        let window = Window {
            base: base.cast(),
            len,
        };
        // Pages that follow each other in one file go in one mapping: a 4 GiB MR of 16 KiB
        // pages must not cost 2^18 of the process's mappings.
        let mut run: Option<Run> = None;
        for (i, &gpa) in mr.pages.iter().enumerate() {
            let region = mem
                .find_region(GuestAddress(gpa))
                .ok_or(Error::NotInMemory { gpa })?;
            let in_region = GuestAddress(gpa)
                .checked_offset_from(region.start_addr())
                .ok_or(Error::NotInMemory { gpa })?;
            if in_region + page as u64 > region.len() {
                return Err(Error::NotInMemory { gpa });
            }
            let file = region.file_offset().ok_or(Error::NotAFile { gpa })?;
            let offset = file.start() + in_region;
            if offset % host_page as u64 != 0 || page % host_page != 0 {
                return Err(Error::Unaligned { gpa });
            }
            let fd = file.file().as_raw_fd();
            match &mut run {
                Some(r) if r.fd == fd && r.offset + r.len as u64 == offset => r.len += page,
                _ => {
                    if let Some(done) = run.take() {
                        window.map_run(&done)?;
                    }
                    run = Some(Run {
                        at: i * page,
                        len: page,
                        fd,
                        offset,
                    });
                }
            }
        }
        if let Some(done) = run {
            window.map_run(&done)?;
        }
        Ok(window)
    }

    /// Maps `run` over its part of the reservation.
    fn map_run(&self, run: &Run) -> Result<(), Error> {
        // SAFETY: the target lies in the window's own reservation, which nothing else uses,
        // and MAP_FIXED replaces only that part of it; the file is a region's own (its fd is
        // open while `mem` holds the region), so the pages mapped are the guest's.
        let at = unsafe {
            libc::mmap(
                self.base.add(run.at).cast(),
                run.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                run.fd,
                run.offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(Error::Map(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The MR's first byte in the window.
    pub fn start(&self, mr: &Mr) -> *mut u8 {
        // SAFETY: the first page offset lies within the first page of the window.
        unsafe { self.base.add(mr.first_page_offset as usize) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the range is the window's own reservation, with the pages mapped over it;
        // whatever registered it with the NIC was dropped first (NicMr drops its MR first).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}
