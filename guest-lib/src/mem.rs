//! Memory the device can reach: memfd-backed shared regions and a DMA allocator over them.
//!
//! A vhost-user device reads and writes driver memory through its own mapping of file
//! descriptors the driver hands over, so everything the device touches (virtqueue rings,
//! command buffers, work-queue rings, registered memory regions) must live in a
//! [`SharedMemory`]. The transport announces each region with its guest-physical address
//! equal to the address this process mapped it at, so a pointer in this process *is* the
//! address to put in a descriptor: there is no translation on the driver side.
//!
//! [`DmaAllocator`] carves aligned [`DmaBuf`]s out of one or more regions. It is meant for the
//! control path (rings, command buffers, queue memory), so it is a simple first-fit free list
//! behind a mutex.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use vhost::VhostUserMemoryRegionInfo;

/// The granule of [`DmaAllocator`] allocations: lengths are rounded up to a multiple of it so
/// that two buffers never share a cache line.
pub const DMA_GRANULE: usize = 64;

/// Why shared memory could not be created, allocated or accessed.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// `memfd_create` failed.
    #[error(
        "cannot create shared memory {name:?}: memfd_create failed (the kernel must support \
         memfd, Linux 3.17 or later, and the process must be below its open-file limit)"
    )]
    Create {
        /// The memfd's name.
        name: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// `ftruncate` failed.
    #[error(
        "cannot size shared memory {name:?} to {len} bytes: check the memory cgroup limit and \
         free memory"
    )]
    Resize {
        /// The memfd's name.
        name: String,
        /// The requested size.
        len: usize,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Sealing the memfd's size failed.
    #[error("cannot seal the size of shared memory {name:?}")]
    Seal {
        /// The memfd's name.
        name: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// `mmap` failed.
    #[error(
        "cannot map {len} bytes of shared memory {name:?}: check RLIMIT_AS, vm.max_map_count \
         and free memory"
    )]
    Map {
        /// The memfd's name.
        name: String,
        /// The requested size.
        len: usize,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A length of zero, or one too large to map.
    #[error("invalid shared memory length {len}: it must be non-zero and fit the address space")]
    InvalidLength {
        /// The length asked for.
        len: usize,
    },
    /// An address, length or file offset of a mapping to adopt that is not page-aligned.
    #[error(
        "cannot adopt a mapping whose {what} {value:#x} is not a multiple of the page size {page}"
    )]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size.
        page: usize,
    },
    /// An alignment that is not a power of two.
    #[error("invalid alignment {align}: it must be a power of two")]
    InvalidAlignment {
        /// The alignment asked for.
        align: usize,
    },
    /// No region has a free extent large enough.
    #[error(
        "out of shared DMA memory: no region has {len} free bytes aligned to {align} (largest \
         free extent: {largest_free} bytes); add a region or use a larger memory size"
    )]
    OutOfSpace {
        /// The length asked for.
        len: usize,
        /// The alignment asked for.
        align: usize,
        /// The largest free extent over all regions, ignoring alignment.
        largest_free: usize,
    },
    /// An access outside the region or buffer.
    #[error(
        "access of {len} bytes at {addr:#x} is outside the shared range {base:#x}..{end:#x}",
        end = base.saturating_add(*size as u64)
    )]
    OutOfBounds {
        /// Address of the access.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// Start of the range accessed.
        base: u64,
        /// Length of the range accessed.
        size: usize,
    },
    /// The same region was added to an allocator twice.
    #[error("shared region at {base:#x} is already managed by this allocator")]
    DuplicateRegion {
        /// Base address of the region.
        base: u64,
    },
    /// The allocator does not manage a region at this address.
    #[error("no shared region at {base:#x} is managed by this allocator")]
    NoSuchRegion {
        /// Base address asked for.
        base: u64,
    },
    /// The region still has live allocations.
    #[error(
        "shared region at {base:#x} still has {live} live DMA buffers; free them before \
         removing the region"
    )]
    RegionBusy {
        /// Base address of the region.
        base: u64,
        /// Buffers still allocated from it.
        live: usize,
    },
    /// A mutex was poisoned by a panicking thread.
    #[error("the DMA allocator's lock was poisoned by a thread that panicked while holding it")]
    Poisoned,
}

/// The huge page size [`SharedMemory::hugetlb`] uses.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// The system's base page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(value.checked_add(align - 1)? & !(align - 1))
}

/// A file-backed region mapped `MAP_SHARED` into this process: a memfd it created
/// ([`SharedMemory::create`]), or a mapping of any file someone else made
/// ([`SharedMemory::adopt`]).
///
/// Its guest-physical address, as announced to the device, is its virtual address in this
/// process ([`SharedMemory::addr`]). A mapping the region created is removed when the value is
/// dropped, an adopted one is left to its owner; either way the device keeps its own mapping
/// of the file until the region is unregistered or the connection closes.
pub struct SharedMemory {
    ptr: NonNull<u8>,
    len: usize,
    /// Replaced only by [`SharedMemory::replace_backing`] (a VMM moving the guest onto its
    /// migrated copy); readers take a reference to the current file.
    backing: RwLock<Backing>,
    name: String,
    sealed: bool,
    /// The region made its mapping, so it removes it on drop; `false` for adopted mappings.
    owns_mapping: bool,
}

/// The file behind a region and where in it the region's first byte is.
#[derive(Debug, Clone)]
struct Backing {
    file: Arc<File>,
    offset: u64,
}

// SAFETY: `SharedMemory` owns a MAP_SHARED mapping that lives until `drop`. Its pointer is never
// handed out as a Rust reference; all accesses go through raw-pointer copies (`read`, `write`)
// or through atomics and volatile accesses in the virtqueue code, which are sound from any
// thread because the memory holds plain bytes that another process may change at any time
// anyway.
unsafe impl Send for SharedMemory {}
// SAFETY: see `Send`: shared access only performs raw copies of plain bytes, never creates
// references, so concurrent use from several threads cannot violate Rust aliasing rules.
unsafe impl Sync for SharedMemory {}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("name", &self.name)
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .field("fd", &self.as_raw_fd())
            .field("mmap_offset", &self.mmap_offset())
            .field("sealed", &self.sealed)
            .field("owns_mapping", &self.owns_mapping)
            .finish()
    }
}

impl SharedMemory {
    /// Creates a region of at least `len` bytes (rounded up to the page size), with its size
    /// sealed so that neither side can shrink the file under the other's mapping.
    pub fn new(name: &str, len: usize) -> Result<Self, MemError> {
        Self::create(name, len, true)
    }

    /// Creates a region of at least `len` bytes (rounded up to the page size).
    ///
    /// With `seal`, the memfd is created with `MFD_ALLOW_SEALING` and sealed with
    /// `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` once sized, so a device can check (with
    /// `F_GET_SEALS`) that the file cannot be truncated under its mapping.
    pub fn create(name: &str, len: usize, seal: bool) -> Result<Self, MemError> {
        Self::create_in(name, len, seal, false)
    }

    /// Creates a region of at least `len` bytes (rounded up to [`HUGE_PAGE_SIZE`]) in 2 MiB
    /// huge pages (`MFD_HUGETLB`): each huge page is physically contiguous, which a device
    /// addressed by physical address needs for rings. Fails with [`MemError::Create`] or
    /// [`MemError::Map`] when the system has too few huge pages reserved
    /// (`/proc/sys/vm/nr_hugepages`).
    pub fn hugetlb(name: &str, len: usize) -> Result<Self, MemError> {
        Self::create_in(name, len, false, true)
    }

    fn create_in(name: &str, len: usize, seal: bool, huge: bool) -> Result<Self, MemError> {
        let page = if huge { HUGE_PAGE_SIZE } else { page_size() };
        let len = match len.checked_next_multiple_of(page) {
            Some(l) if l > 0 && l <= isize::MAX as usize => l,
            _ => return Err(MemError::InvalidLength { len }),
        };
        // memfd names may not contain NUL; replace any so the name stays recognisable.
        let cname = CString::new(name.replace('\0', "_")).unwrap_or_default();
        let mut flags = libc::MFD_CLOEXEC;
        if seal {
            flags |= libc::MFD_ALLOW_SEALING;
        }
        if huge {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; memfd_create
        // does not retain the pointer.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            return Err(MemError::Create {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just returned by memfd_create, is valid, and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64)
            .map_err(|source| MemError::Resize {
                name: name.to_owned(),
                len,
                source,
            })?;
        if seal {
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: F_ADD_SEALS takes an integer argument and only changes the file's seal
            // set; `file` is a valid memfd.
            let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            if rc < 0 {
                return Err(MemError::Seal {
                    name: name.to_owned(),
                    source: io::Error::last_os_error(),
                });
            }
        }
        let addr = map_shared(&file, len);
        if addr == libc::MAP_FAILED {
            return Err(MemError::Map {
                name: name.to_owned(),
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| MemError::Map {
            name: name.to_owned(),
            len,
            source: io::Error::other("mmap returned a null address"),
        })?;
        log::debug!("shared memory {name:?}: {len} bytes at {addr:p}, sealed: {seal}");
        Ok(SharedMemory {
            ptr,
            len,
            backing: RwLock::new(Backing {
                file: Arc::new(file),
                offset: 0,
            }),
            name: name.to_owned(),
            sealed: seal,
            owns_mapping: true,
        })
    }

    /// Adopts a mapping this region did not make: `len` bytes at `addr` that someone (the
    /// application) mapped `MAP_SHARED` from `file`, starting `mmap_offset` bytes into it. The
    /// device is given `file` and `mmap_offset`, so it maps the same pages; dropping the
    /// region leaves the mapping alone (only the region's reference to `file` goes).
    ///
    /// `addr`, `len` and `mmap_offset` must be multiples of the page size (of the file's huge
    /// page size for a hugetlbfs file, which the device's `mmap` insists on; this function
    /// only checks the base page size). The region is not sealed: whoever made the file
    /// decides its size.
    ///
    /// # Safety
    ///
    /// For as long as the caller uses the region's accessors ([`SharedMemory::read`],
    /// [`SharedMemory::write`], [`SharedMemory::fill`], [`SharedMemory::replace_backing`]) or
    /// hands it to a [`DmaAllocator`], `addr..addr + len` must stay mapped readable and
    /// writable, and must not be memory Rust references point into. Registering the region
    /// with a device only needs the file, so a caller that never touches the memory through
    /// the region has nothing to uphold.
    pub unsafe fn adopt(
        name: &str,
        file: File,
        mmap_offset: u64,
        addr: u64,
        len: usize,
    ) -> Result<Self, MemError> {
        let page = page_size();
        let unaligned = |what, value: u64| MemError::Unaligned { what, value, page };
        if len == 0 || len > isize::MAX as usize || addr.checked_add(len as u64).is_none() {
            return Err(MemError::InvalidLength { len });
        }
        if len % page != 0 {
            return Err(unaligned("length", len as u64));
        }
        if addr % page as u64 != 0 {
            return Err(unaligned("address", addr));
        }
        if mmap_offset % page as u64 != 0 {
            return Err(unaligned("file offset", mmap_offset));
        }
        let ptr = NonNull::new(addr as *mut u8).ok_or(unaligned("address", addr))?;
        log::debug!(
            "shared memory {name:?}: adopted {len} bytes at {addr:#x}, file offset \
             {mmap_offset:#x}"
        );
        Ok(SharedMemory {
            ptr,
            len,
            backing: RwLock::new(Backing {
                file: Arc::new(file),
                offset: mmap_offset,
            }),
            name: name.to_owned(),
            sealed: false,
            owns_mapping: false,
        })
    }

    /// The region's first address: both its virtual address here and its guest-physical
    /// address for the device.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// A raw pointer to the first byte.
    ///
    /// The memory is shared with the device, which may change it at any time: never turn
    /// (part of) it into a Rust reference.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the file's size is sealed.
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// The file backing the region.
    pub fn file(&self) -> Arc<File> {
        self.backing().file
    }

    /// Where in [`SharedMemory::file`] the region's first byte is: 0 unless the region was
    /// adopted ([`SharedMemory::adopt`]).
    pub fn mmap_offset(&self) -> u64 {
        self.backing().offset
    }

    /// Whether the region made its mapping (and removes it when dropped); `false` for an
    /// adopted one.
    pub fn owns_mapping(&self) -> bool {
        self.owns_mapping
    }

    fn backing(&self) -> Backing {
        self.backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Moves the region onto `file`, as a VMM moves a migrated guest onto the copy of its RAM
    /// on the destination: maps `file` over the region's addresses (`MAP_FIXED`, so the
    /// addresses, and with them the guest-physical addresses, stay), and makes it the file
    /// the region is registered with from now on, at offset 0. `file` must be at least as
    /// long as the region.
    ///
    /// The caller stops every thread that could touch the region meanwhile, as a VMM stops
    /// the vCPUs: an access during the swap may land in either file.
    pub fn replace_backing(&self, file: File) -> Result<(), MemError> {
        let len = file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| MemError::Map {
                name: self.name.clone(),
                len: self.len,
                source,
            })?;
        if len < self.len as u64 {
            return Err(MemError::InvalidLength { len: len as usize });
        }
        let mut current = self.backing.write().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the new mapping covers exactly this region's own mapping (`ptr`, `len`),
        // which `MAP_FIXED` replaces atomically; nothing outside it is touched. The region
        // holds plain bytes that no Rust reference points into, so replacing the pages under
        // it changes only what later raw accesses read.
        let addr = unsafe {
            libc::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemError::Map {
                name: self.name.clone(),
                len: self.len,
                source: io::Error::last_os_error(),
            });
        }
        *current = Backing {
            file: Arc::new(file),
            offset: 0,
        };
        Ok(())
    }

    /// The vhost-user memory-table entry for this region: guest-physical address and
    /// frontend virtual address are both [`SharedMemory::addr`], the file offset is
    /// [`SharedMemory::mmap_offset`].
    ///
    /// The entry borrows the region's file descriptor; it is valid while `self` lives.
    // `..Default::default()` covers the fields the `xen` feature of `vhost` adds, should any
    // crate in the build enable it.
    #[allow(clippy::needless_update)]
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        let backing = self.backing();
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.addr(),
            memory_size: self.len as u64,
            userspace_addr: self.addr(),
            mmap_offset: backing.offset,
            mmap_handle: backing.file.as_raw_fd(),
            ..Default::default()
        }
    }

    /// Whether `addr..addr + len` lies entirely inside this region (`len == 0` asks about
    /// `addr` alone).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        range_in(addr, len, self.addr(), self.len)
    }

    fn check(&self, addr: u64, len: usize) -> Result<usize, MemError> {
        if range_in(addr, len as u64, self.addr(), self.len) {
            Ok((addr - self.addr()) as usize)
        } else {
            Err(MemError::OutOfBounds {
                addr,
                len,
                base: self.addr(),
                size: self.len,
            })
        }
    }

    /// Copies `data` to address `addr` of the region.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let offset = self.check(addr, data.len())?;
        // SAFETY: `check` proved `offset..offset + data.len()` is inside the live mapping, and
        // `data` is ordinary process memory, so the two cannot overlap. The destination is
        // plain bytes with no Rust references to it.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len()) };
        Ok(())
    }

    /// Copies `buf.len()` bytes from address `addr` of the region into `buf`.
    ///
    /// The device may be writing the same bytes concurrently; callers decode the copy, never
    /// the shared bytes.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let offset = self.check(addr, buf.len())?;
        // SAFETY: `check` proved the source range is inside the live mapping; `buf` is
        // ordinary process memory, so the ranges cannot overlap. Any bit pattern is a valid
        // `u8`, so a torn copy of concurrently written bytes is still initialised memory.
        unsafe { ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Sets `len` bytes from address `addr` to `byte`.
    pub fn fill(&self, addr: u64, len: usize, byte: u8) -> Result<(), MemError> {
        let offset = self.check(addr, len)?;
        // SAFETY: `check` proved the range is inside the live mapping, which holds plain bytes
        // no Rust reference points into.
        unsafe { ptr::write_bytes(self.as_ptr().add(offset), byte, len) };
        Ok(())
    }
}

impl AsRawFd for SharedMemory {
    /// The current file's descriptor: valid until the region is dropped or moved onto another
    /// file ([`SharedMemory::replace_backing`]).
    fn as_raw_fd(&self) -> RawFd {
        self.backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .file
            .as_raw_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if !self.owns_mapping {
            // An adopted mapping belongs to whoever made it.
            return;
        }
        // SAFETY: `ptr`/`len` describe exactly the mapping created in `create`, which nothing
        // else unmaps; after drop no accessor can reach it (DmaBufs hold an Arc to `self`).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::warn!(
                "munmap of shared memory {:?} failed: {}",
                self.name,
                io::Error::last_os_error()
            );
        }
    }
}

/// Large regions start on this boundary, so memory registration can describe them with 2 MiB
/// pages (512 times fewer page-list entries than 4 KiB pages), as a VM's huge pages would.
const LARGE_ALIGN: usize = 2 << 20;

/// Maps all `len` bytes of `file` shared, at an address aligned to [`LARGE_ALIGN`] if the
/// region is at least that large. Returns `MAP_FAILED` on failure, as mmap does.
fn map_shared(file: &File, len: usize) -> *mut libc::c_void {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    if len < LARGE_ALIGN {
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL), so it cannot overlap
        // any existing Rust object; `file` is `len` bytes long, so every mapped page is backed.
        return unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
    }
    let Some(span) = len.checked_add(LARGE_ALIGN) else {
        return libc::MAP_FAILED;
    };
    // Reserve address space with room to align in, then map the file over its aligned part.
    // SAFETY: a fresh inaccessible anonymous mapping chosen by the kernel: it overlaps nothing.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return base;
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(LARGE_ALIGN);
    // SAFETY: `aligned..aligned + len` lies inside the reservation just made, which this
    // function owns and nothing else refers to, so MAP_FIXED replaces only that; `file` is
    // `len` bytes long.
    let addr = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    let head = aligned - start;
    let tail = span - head - len;
    // SAFETY: the head and tail are the parts of this function's own reservation outside the
    // file mapping; nothing refers to them. On failure the whole reservation goes.
    unsafe {
        if addr == libc::MAP_FAILED {
            libc::munmap(base, span);
            return addr;
        }
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    addr
}

/// Whether `addr..addr + len` lies inside `base..base + size`; an empty range must still start
/// inside it.
fn range_in(addr: u64, len: u64, base: u64, size: usize) -> bool {
    let limit = base.saturating_add(size as u64);
    match addr.checked_add(len) {
        Some(_) if addr < base => false,
        Some(_) if len == 0 => addr < limit,
        Some(end) => end <= limit,
        None => false,
    }
}

/// A free or allocated byte range of a region, as offsets from its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    off: usize,
    len: usize,
}

#[derive(Debug)]
struct RegionState {
    mem: Arc<SharedMemory>,
    /// Free extents, sorted by offset, never adjacent (they are merged).
    free: Vec<Extent>,
    /// Buffers allocated from this region and not yet freed.
    live: usize,
    /// Bytes from this offset on are known to be zero (never handed out since the region was
    /// created), so allocating them needs no zeroing: zeroing 1 GiB means faulting in every
    /// page, which takes seconds on a virtual machine.
    zero_from: usize,
}

impl RegionState {
    fn release(&mut self, ext: Extent) {
        let pos = self.free.partition_point(|e| e.off < ext.off);
        let mut ext = ext;
        // Merge with the following extent.
        if let Some(next) = self.free.get(pos).copied() {
            if ext.off + ext.len == next.off {
                ext.len += next.len;
                self.free.remove(pos);
            }
        }
        // Merge with the preceding extent.
        if pos > 0 {
            let prev = &mut self.free[pos - 1];
            if prev.off + prev.len == ext.off {
                prev.len += ext.len;
                self.live -= 1;
                return;
            }
        }
        self.free.insert(pos, ext);
        self.live -= 1;
    }
}

#[derive(Debug, Default)]
struct AllocState {
    regions: Vec<RegionState>,
}

/// Hands out aligned [`DmaBuf`]s from a set of [`SharedMemory`] regions.
///
/// Cloning gives another handle to the same allocator. Buffers return to it when dropped (or
/// [`DmaBuf::free`]d) and keep their region mapped while they live.
#[derive(Debug, Clone, Default)]
pub struct DmaAllocator {
    state: Arc<Mutex<AllocState>>,
}

impl DmaAllocator {
    /// An allocator with no regions yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// An allocator over one region.
    pub fn with_region(mem: Arc<SharedMemory>) -> Self {
        let alloc = Self::new();
        // A fresh allocator cannot already hold the region, and its lock is not poisoned.
        let _ = alloc.add_region(mem);
        alloc
    }

    fn lock(&self) -> Result<MutexGuard<'_, AllocState>, MemError> {
        self.state.lock().map_err(|_| MemError::Poisoned)
    }

    /// Adds a region to allocate from; all of it starts free. Buffers from it are zeroed when
    /// allocated.
    pub fn add_region(&self, mem: Arc<SharedMemory>) -> Result<(), MemError> {
        let zero_from = mem.len();
        self.add(mem, zero_from)
    }

    /// Adds a region fresh from [`SharedMemory::create`], whose memory nobody has written:
    /// buffers from it are zeroed only where memory is handed out a second time.
    pub fn add_fresh_region(&self, mem: Arc<SharedMemory>) -> Result<(), MemError> {
        self.add(mem, 0)
    }

    fn add(&self, mem: Arc<SharedMemory>, zero_from: usize) -> Result<(), MemError> {
        let mut state = self.lock()?;
        if state.regions.iter().any(|r| r.mem.addr() == mem.addr()) {
            return Err(MemError::DuplicateRegion { base: mem.addr() });
        }
        let free = vec![Extent {
            off: 0,
            len: mem.len(),
        }];
        state.regions.push(RegionState {
            mem,
            free,
            live: 0,
            zero_from,
        });
        Ok(())
    }

    /// Removes the region starting at `base`, which must have no live buffers, and returns it.
    pub fn remove_region(&self, base: u64) -> Result<Arc<SharedMemory>, MemError> {
        let mut state = self.lock()?;
        let idx = state
            .regions
            .iter()
            .position(|r| r.mem.addr() == base)
            .ok_or(MemError::NoSuchRegion { base })?;
        let live = state.regions[idx].live;
        if live > 0 {
            return Err(MemError::RegionBusy { base, live });
        }
        Ok(state.regions.remove(idx).mem)
    }

    /// The number of live buffers in the region at `base`, or `None` if the allocator does not
    /// manage such a region.
    pub fn live_buffers(&self, base: u64) -> Option<usize> {
        let state = self.lock().ok()?;
        state
            .regions
            .iter()
            .find(|r| r.mem.addr() == base)
            .map(|r| r.live)
    }

    /// The regions this allocator manages.
    pub fn regions(&self) -> Vec<Arc<SharedMemory>> {
        self.lock()
            .map(|s| s.regions.iter().map(|r| r.mem.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether `addr..addr + len` lies inside one of the allocator's regions.
    ///
    /// Memory outside every region is invisible to the device: registering it as an MR or
    /// pointing a work request at it would fail there, so callers check first.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.lock()
            .map(|s| s.regions.iter().any(|r| r.mem.contains(addr, len)))
            .unwrap_or(false)
    }

    /// Free bytes over all regions.
    pub fn free_bytes(&self) -> usize {
        self.lock()
            .map(|s| {
                s.regions
                    .iter()
                    .flat_map(|r| r.free.iter())
                    .map(|e| e.len)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Allocates `len` zeroed bytes aligned to the page size.
    pub fn alloc(&self, len: usize) -> Result<DmaBuf, MemError> {
        self.alloc_aligned(len, page_size())
    }

    /// Allocates `len` zeroed bytes whose address is a multiple of `align` (a power of two).
    ///
    /// First fit over the regions in the order they were added.
    pub fn alloc_aligned(&self, len: usize, align: usize) -> Result<DmaBuf, MemError> {
        if !align.is_power_of_two() {
            return Err(MemError::InvalidAlignment { align });
        }
        let size = match len.checked_next_multiple_of(DMA_GRANULE) {
            Some(s) if len > 0 => s,
            _ => return Err(MemError::InvalidLength { len }),
        };
        let mut state = self.lock()?;
        for region in state.regions.iter_mut() {
            let base = region.mem.addr();
            let found = region.free.iter().enumerate().find_map(|(i, ext)| {
                let start = align_up(base + ext.off as u64, align as u64)? - base;
                let end = start.checked_add(size as u64)?;
                (end <= (ext.off + ext.len) as u64).then_some((i, start as usize))
            });
            let Some((i, start)) = found else {
                continue;
            };
            let ext = region.free[i];
            let before = Extent {
                off: ext.off,
                len: start - ext.off,
            };
            let after = Extent {
                off: start + size,
                len: ext.off + ext.len - (start + size),
            };
            let pieces = [before, after].into_iter().filter(|e| e.len > 0);
            region.free.splice(i..=i, pieces);
            region.live += 1;
            let addr = base + start as u64;
            if start < region.zero_from {
                let dirty = size.min(region.zero_from - start);
                region.mem.fill(addr, dirty, 0)?;
            }
            region.zero_from = region.zero_from.max(start + size);
            return Ok(DmaBuf {
                mem: region.mem.clone(),
                owner: Arc::downgrade(&self.state),
                addr,
                len,
                span: Extent {
                    off: start,
                    len: size,
                },
            });
        }
        let largest_free = state
            .regions
            .iter()
            .flat_map(|r| r.free.iter())
            .map(|e| e.len)
            .max()
            .unwrap_or(0);
        Err(MemError::OutOfSpace {
            len,
            align,
            largest_free,
        })
    }
}

/// A buffer in shared memory the device can reach; returned to its allocator on drop.
pub struct DmaBuf {
    mem: Arc<SharedMemory>,
    owner: Weak<Mutex<AllocState>>,
    addr: u64,
    len: usize,
    span: Extent,
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("region", &self.mem.name())
            .finish()
    }
}

impl DmaBuf {
    /// The buffer's address: virtual here, guest-physical for the device.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The length asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: allocations have at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A raw pointer to the first byte (see [`SharedMemory::as_ptr`] for the rules).
    pub fn as_ptr(&self) -> *mut u8 {
        // `addr` lies inside the live mapping of `mem`, so this is the same provenance.
        self.mem
            .as_ptr()
            .wrapping_add((self.addr - self.mem.addr()) as usize)
    }

    /// The region the buffer lives in.
    pub fn region(&self) -> &Arc<SharedMemory> {
        &self.mem
    }

    fn check(&self, offset: usize, len: usize) -> Result<u64, MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr + offset as u64),
            _ => Err(MemError::OutOfBounds {
                addr: self.addr.saturating_add(offset as u64),
                len,
                base: self.addr,
                size: self.len,
            }),
        }
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), MemError> {
        let addr = self.check(offset, data.len())?;
        self.mem.write(addr, data)
    }

    /// Copies bytes at `offset` of the buffer into `buf`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        let addr = self.check(offset, buf.len())?;
        self.mem.read(addr, buf)
    }

    /// Sets every byte of the buffer to `byte`.
    pub fn fill(&self, byte: u8) -> Result<(), MemError> {
        self.mem.fill(self.addr, self.len, byte)
    }

    /// Returns the buffer to its allocator now (dropping it does the same).
    pub fn free(self) {}
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let Some(state) = self.owner.upgrade() else {
            return;
        };
        let mut state = match state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let base = self.mem.addr();
        if let Some(region) = state.regions.iter_mut().find(|r| r.mem.addr() == base) {
            region.release(self.span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc_with(len: usize) -> (DmaAllocator, Arc<SharedMemory>) {
        let mem = Arc::new(SharedMemory::new("vrdma-test", len).unwrap());
        (DmaAllocator::with_region(mem.clone()), mem)
    }

    #[test]
    fn shared_memory_is_page_rounded_sealed_and_readable() {
        let mem = SharedMemory::new("vrdma-test", 100).unwrap();
        assert_eq!(mem.len(), page_size());
        assert_eq!(mem.addr() % page_size() as u64, 0);
        assert!(mem.is_sealed());
        // SAFETY: F_GET_SEALS only reads the seal set of a valid memfd.
        let seals = unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        );
        assert!(
            mem.file().set_len(0).is_err(),
            "a sealed memfd must not shrink"
        );

        mem.write(mem.addr() + 10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        mem.read(mem.addr() + 10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(
            mem.write(mem.addr() + mem.len() as u64 - 2, b"abc")
                .is_err()
        );
        assert!(mem.read(mem.addr() - 1, &mut buf).is_err());

        let info = mem.region_info();
        assert_eq!(info.guest_phys_addr, mem.addr());
        assert_eq!(info.userspace_addr, mem.addr());
        assert_eq!(info.memory_size, mem.len() as u64);
        assert_eq!(info.mmap_handle, mem.as_raw_fd());
    }

    #[test]
    fn a_second_mapping_of_the_memfd_sees_the_same_bytes() {
        let mem = SharedMemory::create("vrdma-test", 4096, false).unwrap();
        assert!(!mem.is_sealed());
        mem.write(mem.addr(), &[1, 2, 3, 4]).unwrap();
        let file = vm_memory::FileOffset::new(mem.file().try_clone().unwrap(), 0);
        let other = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files([(
            vm_memory::GuestAddress(0),
            4096,
            Some(file),
        )])
        .unwrap();
        let mut buf = [0u8; 4];
        use vm_memory::Bytes;
        other
            .read_slice(&mut buf, vm_memory::GuestAddress(0))
            .unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
    }

    #[test]
    fn an_adopted_mapping_is_described_by_its_offset_and_outlives_the_region() {
        let page = page_size();
        // Someone else's file of three pages, of which they mapped the last two.
        let owner = SharedMemory::create("vrdma-test-owner", 3 * page, false).unwrap();
        owner
            .write(owner.addr() + page as u64, b"second page")
            .unwrap();
        let file = owner.file().try_clone().unwrap();
        let theirs = map_shared_at_offset(&file, 2 * page, page as u64);
        // SAFETY: `theirs` maps the file's pages 1 and 2 read-write and stays mapped until
        // the end of the test, after the last access through `adopted`.
        let adopted = unsafe {
            SharedMemory::adopt("vrdma-test-adopted", file, page as u64, theirs, 2 * page)
        }
        .unwrap();
        assert!(!adopted.owns_mapping());
        assert_eq!(adopted.mmap_offset(), page as u64);
        let info = adopted.region_info();
        assert_eq!(
            (info.guest_phys_addr, info.userspace_addr, info.memory_size),
            (theirs, theirs, 2 * page as u64)
        );
        assert_eq!(info.mmap_offset, page as u64);
        // What the device maps from the entry is what the adopted addresses hold.
        let device_view = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files([(
            vm_memory::GuestAddress(info.guest_phys_addr),
            info.memory_size as usize,
            Some(vm_memory::FileOffset::new(
                adopted.file().try_clone().unwrap(),
                info.mmap_offset,
            )),
        )])
        .unwrap();
        use vm_memory::Bytes;
        let mut buf = [0u8; 11];
        device_view
            .read_slice(&mut buf, vm_memory::GuestAddress(theirs))
            .unwrap();
        assert_eq!(&buf, b"second page");
        device_view
            .write_slice(b"device", vm_memory::GuestAddress(theirs + page as u64))
            .unwrap();
        let mut back = [0u8; 6];
        adopted.read(theirs + page as u64, &mut back).unwrap();
        assert_eq!(&back, b"device");

        drop(adopted);
        // The owner's mapping is still there.
        // SAFETY: `theirs` is still mapped (dropping the adopted region must not unmap it).
        let first = unsafe { ptr::read_volatile(theirs as *const u8) };
        assert_eq!(first, b's');
        // SAFETY: the mapping made above, unmapped once.
        assert_eq!(unsafe { libc::munmap(theirs as *mut _, 2 * page) }, 0);

        // Misaligned values are refused.
        let file = owner.file().try_clone().unwrap();
        // SAFETY: refused before anything could access the memory.
        let err = unsafe { SharedMemory::adopt("x", file, 100, owner.addr(), page) }.unwrap_err();
        assert!(
            matches!(
                err,
                MemError::Unaligned {
                    what: "file offset",
                    ..
                }
            ),
            "{err}"
        );
        let file = owner.file().try_clone().unwrap();
        // SAFETY: as above.
        let err = unsafe { SharedMemory::adopt("x", file, 0, owner.addr() + 8, page) }.unwrap_err();
        assert!(
            matches!(
                err,
                MemError::Unaligned {
                    what: "address",
                    ..
                }
            ),
            "{err}"
        );
        let file = owner.file().try_clone().unwrap();
        // SAFETY: as above.
        let err = unsafe { SharedMemory::adopt("x", file, 0, owner.addr(), 0) }.unwrap_err();
        assert!(matches!(err, MemError::InvalidLength { len: 0 }), "{err}");
    }

    /// Maps `len` bytes of `file` from `offset`, shared, where the kernel likes.
    fn map_shared_at_offset(file: &File, len: usize, offset: u64) -> u64 {
        // SAFETY: a fresh mapping chosen by the kernel overlaps nothing.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        addr as u64
    }

    #[test]
    fn contains_checks_whole_ranges() {
        let (alloc, mem) = alloc_with(8192);
        let base = mem.addr();
        assert!(alloc.contains(base, 8192));
        assert!(alloc.contains(base + 8191, 1));
        assert!(alloc.contains(base, 0));
        assert!(!alloc.contains(base + 8192, 0));
        assert!(!alloc.contains(base + 8191, 2));
        assert!(!alloc.contains(base - 1, 1));
        assert!(!alloc.contains(u64::MAX, 2));
        let stack = 0u64;
        assert!(!alloc.contains(&stack as *const u64 as u64, 8));
    }

    #[test]
    fn allocations_are_aligned_disjoint_and_freed() {
        let page = page_size();
        let (alloc, mem) = alloc_with(16 * page);
        let total = alloc.free_bytes();
        assert_eq!(total, 16 * page);

        let a = alloc.alloc(100).unwrap();
        assert_eq!(a.addr() % page as u64, 0);
        assert_eq!(a.len(), 100);
        let b = alloc.alloc_aligned(10, 64).unwrap();
        assert_eq!(b.addr() % 64, 0);
        assert!(b.addr() >= a.addr() + 100, "buffers must not overlap");
        let c = alloc.alloc_aligned(1, 2 * page).unwrap();
        assert_eq!(c.addr() % (2 * page) as u64, 0);
        assert!(mem.contains(c.addr(), 1));
        assert_eq!(alloc.live_buffers(mem.addr()), Some(3));

        a.write_at(0, &[0xaa; 100]).unwrap();
        assert!(a.write_at(1, &[0; 100]).is_err());
        let mut back = [0u8; 100];
        a.read_at(0, &mut back).unwrap();
        assert_eq!(back, [0xaa; 100]);

        assert!(matches!(
            alloc.alloc_aligned(1, 3),
            Err(MemError::InvalidAlignment { align: 3 })
        ));
        assert!(matches!(
            alloc.alloc(0),
            Err(MemError::InvalidLength { len: 0 })
        ));

        drop(a);
        b.free();
        drop(c);
        assert_eq!(alloc.live_buffers(mem.addr()), Some(0));
        assert_eq!(alloc.free_bytes(), total, "every byte must come back");
        // Coalescing: the whole region is one extent again.
        let all = alloc.alloc(16 * page).unwrap();
        assert_eq!(all.addr(), mem.addr());
    }

    #[test]
    fn fresh_regions_are_zeroed_only_where_reused() {
        let mem = Arc::new(SharedMemory::new("vrdma-test", 4096).unwrap());
        let alloc = DmaAllocator::new();
        alloc.add_fresh_region(mem.clone()).unwrap();
        let a = alloc.alloc(64).unwrap();
        a.fill(0x5a).unwrap();
        drop(a);
        // Reused bytes are zeroed even when the new buffer reaches into untouched memory.
        let b = alloc.alloc(128).unwrap();
        let mut buf = [1u8; 128];
        b.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 128]);
        // A region added without the promise is zeroed on every allocation.
        let used = Arc::new(SharedMemory::new("vrdma-test", 4096).unwrap());
        used.fill(used.addr(), 4096, 0x77).unwrap();
        let alloc = DmaAllocator::new();
        alloc.add_region(used).unwrap();
        let c = alloc.alloc(256).unwrap();
        let mut buf = [1u8; 256];
        c.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 256]);
    }

    #[test]
    fn recycled_memory_is_zeroed() {
        let (alloc, _mem) = alloc_with(4096);
        let a = alloc.alloc(64).unwrap();
        a.fill(0x5a).unwrap();
        let addr = a.addr();
        drop(a);
        let b = alloc.alloc(64).unwrap();
        assert_eq!(b.addr(), addr);
        let mut buf = [1u8; 64];
        b.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 64]);
    }

    #[test]
    fn exhaustion_spills_to_the_next_region_then_fails() {
        let page = page_size();
        let (alloc, first) = alloc_with(page);
        let a = alloc.alloc(page).unwrap();
        let err = alloc.alloc(1).unwrap_err();
        assert!(matches!(err, MemError::OutOfSpace { len: 1, .. }), "{err}");

        let second = Arc::new(SharedMemory::new("vrdma-test-2", page).unwrap());
        alloc.add_region(second.clone()).unwrap();
        assert!(matches!(
            alloc.add_region(second.clone()),
            Err(MemError::DuplicateRegion { .. })
        ));
        let b = alloc.alloc(1).unwrap();
        assert!(second.contains(b.addr(), 1));
        assert!(!first.contains(b.addr(), 1));

        assert!(matches!(
            alloc.remove_region(second.addr()),
            Err(MemError::RegionBusy { live: 1, .. })
        ));
        drop(b);
        let removed = alloc.remove_region(second.addr()).unwrap();
        assert_eq!(removed.addr(), second.addr());
        assert!(!alloc.contains(second.addr(), 1));
        assert!(matches!(
            alloc.remove_region(second.addr()),
            Err(MemError::NoSuchRegion { .. })
        ));
        drop(a);
    }

    #[test]
    fn buffers_outlive_their_allocator() {
        let (alloc, mem) = alloc_with(4096);
        let buf = alloc.alloc(16).unwrap();
        drop(alloc);
        drop(mem);
        // The buffer still holds the region mapped.
        buf.write_at(0, b"still here").unwrap();
        let mut back = [0u8; 10];
        buf.read_at(0, &mut back).unwrap();
        assert_eq!(&back, b"still here");
    }
}
