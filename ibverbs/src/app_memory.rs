//! Application buffers made reachable by the device.
//!
//! Under virtio-user the device (the daemon) reaches only memory this process shared with it
//! as vhost-user memory regions: files it can map, announced with guest-physical address ==
//! virtual address here. A verbs application registers buffers it allocated itself (`malloc`,
//! `memalign`, `posix_memalign`, anonymous `mmap`, a file `mmap`, SysV shared memory), so
//! [`DeviceMemory::pin`] makes the pages under such a buffer shareable before the buffer is
//! registered as an MR:
//!
//! * **Private memory** (heap, anonymous mappings, private file mappings) is moved onto a
//!   memfd at the same address: the whole pages are copied into a new memfd, which is then
//!   mapped over them with `MAP_SHARED | MAP_FIXED` (an atomic replacement), keeping each
//!   page's protection. Whole pages, so heap neighbours and malloc's chunk headers on a
//!   partial page survive. The memfd is registered with the device as one region. When the
//!   last pin over it goes, the region goes from the device and the pages are moved back
//!   onto private anonymous memory the same way (copied, and the copy moved over them with
//!   `mremap`, keeping their protection), wherever the memfd is still mapped: shared memory
//!   would be shared with a forked child, and `MADV_DONTNEED` would keep its contents where
//!   allocators count on getting zeros back (calloc of memory glibc trimmed from an arena,
//!   a jemalloc purge). Pages of a memfd that a piece still holds (the application unmapped
//!   part of a registered buffer, or moved it with `mremap`) are never moved again: they are
//!   shared as that memfd.
//! * **`MAP_SHARED` file mappings** (a file `mmap`, SysV shared memory, shared anonymous
//!   memory, huge-page files) are registered as the file they map, with the mapping's file
//!   offset, and are not moved: replacing them would cut the application off from its file
//!   (or break `shmdt`). The file is opened through `/proc/self/map_files` (which needs
//!   `CAP_CHECKPOINT_RESTORE` or `CAP_SYS_ADMIN`) or, failing that, through the mapping's
//!   path if that still names the mapped file.
//!
//! Each such stretch is a *piece*: page-aligned, one region for each device that pins it. A
//! process-wide registry keeps the pieces, which devices each is registered with and how many
//! pins hold it there, so overlapping and repeated registrations share pieces; a registration
//! over memory of which only part is shared yet gets new pieces for the rest, and one
//! registration can span several pieces (the MR's pages then come from several regions, each
//! page from one). Two devices opened by the process register the same piece each.
//!
//! **Nothing is trusted by address.** The application can free a buffer (`free` of a large
//! chunk unmaps it) and get fresh anonymous memory at the same address. Every pin reads
//! `/proc/self/maps` and checks that each piece it would reuse is still mapped from its file
//! (device, inode and offset; SysV segments, whose inodes are all 0, by path), and makes a new
//! piece where not.
//!
//! **Forked children** get private copies of moved memory that is not marked
//! `MADV_DONTFORK` (see `children.rs`): without fork safety ([`fork_init`]) a child has its
//! own copy of registered memory, as with libibverbs, and it forgets the registry, since it
//! cannot use its parent's devices.
//!
//! **Limitations.**
//! * A write another thread makes to a page between its copy and its replacement is lost,
//!   when memory is moved onto a memfd and when it is moved back (including malloc's own
//!   bookkeeping, if another thread allocates from the same heap page at that moment).
//!   Register buffers before other threads use their pages, as verbs applications do, and
//!   deregister them when no other thread writes their pages; the first move made while the
//!   program runs other threads (the shim's own event threads not counted) is logged
//!   with a warning. Buffers on the calling thread's own stack are refused (the pin itself
//!   writes there), other threads' stacks are not. Likewise, a write another thread of the
//!   parent makes while a forked child copies moved memory can reach the child's copy.
//! * Transparent huge pages are lost (shmem THP is off by default) and each move needs as
//!   much memory again for a moment; `mlock` and `madvise` settings of moved pages are not
//!   carried over either way. Memory moved back stays a mapping of its own (the kernel does
//!   not merge it with its neighbours), so each registered stretch can cost a mapping or two
//!   against `vm.max_map_count` for good.
//! * A moved mapping the application grows with `mremap` while it is registered (glibc's
//!   `realloc` of a large chunk does) has pages past the end of its memfd, and touching
//!   them is `SIGBUS` until its last pin goes (they are zeros then).
//! * Each piece takes one of the device's memory slots (vhost-user-rdma offers 509).
//! * A file that the application truncates under a registered mapping takes pages away from
//!   the device's mapping too.
//! * Memory the device already reaches through the transport's own regions
//!   ([`vrdma::Context::alloc`]) needs no piece; a request that is only partly such memory
//!   fails when the device refuses the overlapping region.
//!
//! **Errors** carry the `errno` libibverbs' `ibv_reg_mr` would set ([`AppMemoryError::errno`]),
//! and every refusal is logged with `log::warn!` saying why and what to do.

mod backing;
mod children;
mod fork;
mod maps;
mod registry;

use std::io;
use std::sync::Arc;

use vrdma::{AccessFlags, Context};

/// Why application memory cannot be made reachable by the device.
#[derive(Debug, thiserror::Error)]
pub enum AppMemoryError {
    /// A length of zero, or a range that wraps around the address space (`EINVAL`).
    #[error(
        "cannot register {len} bytes at {addr:#x}: the length is zero or the range wraps around the address space"
    )]
    InvalidRange {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
    },
    /// Some page of the range is not mapped (`EFAULT`, as the kernel answers).
    #[error(
        "cannot register {len} bytes at {addr:#x}: nothing is mapped at {hole:#x}; the buffer \
         was freed or never allocated, or the length is wrong"
    )]
    Unmapped {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The first unmapped address.
        hole: u64,
    },
    /// A mapping in the range is not readable (`PROT_NONE`, a guard page), or not writable
    /// when the MR asks for write access (`EFAULT`, as the kernel answers).
    #[error(
        "cannot register {len} bytes at {addr:#x}: the mapping {start:#x}..{end:#x} is {}; \
         mprotect it or register other memory",
        if *writable { "not readable and writable, as an MR with write access needs" } else { "not readable (PROT_NONE or a guard page)" }
    )]
    Protection {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The mapping's start.
        start: u64,
        /// The mapping's end.
        end: u64,
        /// Its protection (`PROT_*`).
        prot: i32,
        /// Whether write access was needed.
        writable: bool,
    },
    /// The range lies in one of the kernel's own mappings, such as `[vdso]` (`EFAULT`).
    #[error(
        "cannot register {len} bytes at {addr:#x}: it lies in the kernel's {path} mapping, \
         which is no memory a device can reach; register a buffer the program allocated"
    )]
    KernelMapping {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The mapping's name.
        path: String,
    },
    /// The range maps a device (a character or block device node other than `/dev/zero`):
    /// device memory cannot be pinned by the kernel either (`EFAULT`).
    #[error(
        "cannot register {len} bytes at {addr:#x}: the mapping {start:#x}..{end:#x} is device \
         memory ({path}), which the vrdma device cannot share; register ordinary memory"
    )]
    DeviceMapping {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The device node.
        path: String,
        /// The mapping's start.
        start: u64,
        /// The mapping's end.
        end: u64,
    },
    /// The range reaches past the end of the mapped file, where there is no memory
    /// (`EFAULT`, as the kernel answers).
    #[error(
        "cannot register {len} bytes at {addr:#x}: the range extends past the end of {path} \
         ({size} bytes); extend the file first or register less"
    )]
    PastEndOfFile {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The range is on the calling thread's own stack, which cannot be moved while the thread
    /// runs on it (`EINVAL`).
    #[error(
        "cannot register {len} bytes at {addr:#x}: the buffer is on the calling thread's stack, \
         which cannot be moved onto shared memory while the thread runs on it; allocate it \
         with malloc or mmap"
    )]
    CallerStack {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
    },
    /// Private huge-page memory (`MAP_PRIVATE | MAP_HUGETLB`, a private hugetlbfs mapping),
    /// which cannot be moved onto a memfd of normal pages at the same address (`EINVAL`).
    #[error(
        "cannot register {len} bytes at {addr:#x}: it is private huge-page memory ({path}), \
         which cannot be moved onto shared memory; map it MAP_SHARED (a hugetlbfs file, or \
         SysV shmget with SHM_HUGETLB as perftest --use_hugepages does) so it is shared by its \
         file"
    )]
    PrivateHugePages {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The mapping's name.
        path: String,
    },
    /// The file behind a `MAP_SHARED` mapping cannot be opened read-write (`EACCES` if
    /// permission was denied, `EINVAL` otherwise).
    #[error(
        "cannot register {len} bytes at {addr:#x}: it is a MAP_SHARED mapping of {path}, whose \
         file cannot be opened read-write for the device: /proc/self/map_files needs \
         CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) and the path does not lead to the mapped \
         file; run with that capability, make the file writable, or register private memory"
    )]
    FileUnavailable {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The mapping's path.
        path: String,
        /// Why the last attempt failed.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/maps` cannot be read (its `errno`, or `EIO`).
    #[error("cannot read /proc/self/maps to find what backs the buffer: is /proc mounted?")]
    Maps {
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// Private memory could not be moved onto a memfd (`ENOMEM`).
    #[error(
        "cannot move {len} bytes at {start:#x} onto shared memory: {what} failed; check free \
         memory, the memory cgroup limit, RLIMIT_NOFILE and vm.max_map_count"
    )]
    Swap {
        /// The step that failed.
        what: &'static str,
        /// Start of the pages.
        start: u64,
        /// Their length.
        len: u64,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The region for a piece could not be described (`EINVAL`; a bug if it happens).
    #[error("cannot describe {len} bytes at {addr:#x} as a shared region")]
    Region {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
        /// What was wrong.
        #[source]
        source: vrdma::mem::MemError,
    },
    /// Pages the application unmapped and mapped again are still registered with this device
    /// under their old memory, by an MR not yet deregistered (`EBUSY`).
    #[error(
        "cannot register {len} bytes at {addr:#x}: {start:#x}..{end:#x} was unmapped and mapped \
         again while a memory region over its old pages is still registered on this device \
         (the buffer was freed before ibv_dereg_mr); deregister that MR first"
    )]
    StillRegistered {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The old piece's start.
        start: u64,
        /// The old piece's end.
        end: u64,
    },
    /// The device refused the region (`ENOMEM` when its memory table is full, else the
    /// transport's `errno`).
    #[error("cannot share {len} bytes at {addr:#x} with the device")]
    Device {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The device's or transport's error.
        #[source]
        source: vrdma::Error,
    },
    /// `madvise(MADV_DONTFORK)` failed with fork safety on (its `errno`).
    #[error(
        "cannot mark {len} bytes at {addr:#x} MADV_DONTFORK, as fork safety (ibv_fork_init) needs"
    )]
    Fork {
        /// Start asked for.
        addr: u64,
        /// Length asked for.
        len: u64,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

impl AppMemoryError {
    /// The `errno` `ibv_reg_mr` sets for this failure.
    pub fn errno(&self) -> i32 {
        use AppMemoryError as E;
        match self {
            E::InvalidRange { .. }
            | E::CallerStack { .. }
            | E::PrivateHugePages { .. }
            | E::Region { .. } => libc::EINVAL,
            E::Unmapped { .. }
            | E::Protection { .. }
            | E::KernelMapping { .. }
            | E::DeviceMapping { .. }
            | E::PastEndOfFile { .. } => libc::EFAULT,
            E::FileUnavailable { source, .. } => match source.raw_os_error() {
                Some(libc::EACCES | libc::EPERM | libc::EROFS) => libc::EACCES,
                _ => libc::EINVAL,
            },
            E::Maps { source } => source.raw_os_error().unwrap_or(libc::EIO),
            E::Swap { .. } => libc::ENOMEM,
            E::StillRegistered { .. } => libc::EBUSY,
            E::Device { source, .. } => device_errno(source),
            E::Fork { source, .. } => source.raw_os_error().unwrap_or(libc::EINVAL),
        }
    }
}

/// `ENOMEM` for a full memory table (as the kernel answers when it runs out of resources for
/// an MR), else what the verbs error says.
fn device_errno(err: &vrdma::Error) -> i32 {
    if let vrdma::Error::Transport { source, .. } = err {
        if let Some(vrdma::transport::VirtioUserError::TooManyRegions { .. }) =
            source.downcast_ref::<vrdma::transport::VirtioUserError>()
        {
            return libc::ENOMEM;
        }
    }
    err.errno()
}

/// The application memory of one open device (one vhost-user connection, one `ibv_context`).
///
/// Usable from any thread; all devices of the process share one registry of pieces.
#[derive(Debug)]
pub struct DeviceMemory {
    device: Arc<registry::Device>,
}

impl DeviceMemory {
    /// The application memory of the device `ctx`.
    pub fn new(ctx: Context) -> DeviceMemory {
        let device = registry::lock().new_device(ctx);
        DeviceMemory {
            device: Arc::new(device),
        }
    }

    /// The device.
    pub fn context(&self) -> &Context {
        &self.device.ctx
    }

    /// Makes `len` bytes at `addr` reachable by this device until the returned [`Pinned`] is
    /// dropped; meanwhile `vrdma::MemoryRegion::register_range(pd, addr, len, access)`
    /// succeeds for that range. Pins are counted: overlapping and repeated pins share the
    /// device's regions.
    ///
    /// The pages need only be readable; use [`DeviceMemory::pin_for`] to also refuse
    /// read-only memory for an MR with write access, as the kernel does.
    pub fn pin(&self, addr: u64, len: u64) -> Result<Pinned, AppMemoryError> {
        self.pin_for(addr, len, AccessFlags::empty())
    }

    /// As [`DeviceMemory::pin`], for an MR with `access`: with `LOCAL_WRITE`, `REMOTE_WRITE`
    /// or `REMOTE_ATOMIC` the pages must be writable too (`EFAULT` otherwise, as
    /// `ibv_reg_mr` answers).
    pub fn pin_for(
        &self,
        addr: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<Pinned, AppMemoryError> {
        let writable = access.intersects(
            AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_WRITE | AccessFlags::REMOTE_ATOMIC,
        );
        children::install();
        let held = registry::lock().pin(&self.device, addr, len, writable);
        match held {
            Ok(held) => Ok(Pinned {
                device: self.device.clone(),
                held,
            }),
            Err(e) => {
                log::warn!("{}", vrdma::error_chain(&e));
                Err(e)
            }
        }
    }
}

/// Application memory held reachable by a device. Dropping it releases the pin: a region goes
/// from the device when its last pin on that device does, and the application's mapping
/// stays. Deregister the MRs over the memory first (the device fails transfers through an MR
/// whose memory it no longer reaches).
#[derive(Debug)]
pub struct Pinned {
    device: Arc<registry::Device>,
    held: registry::Held,
}

impl Pinned {
    /// The pages held, as `(start, end)`: the pinned range rounded out to whole pages.
    pub fn pages(&self) -> (u64, u64) {
        (self.held.start, self.held.end)
    }

    /// How many pieces (regions of the device) the pin spans.
    pub fn pieces(&self) -> usize {
        self.held.pieces.len()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        registry::lock().unpin(&self.device, &self.held);
    }
}

/// `ibv_fork_init()`: from now on every pinned page is marked `MADV_DONTFORK` while pinned,
/// and so are the pages pinned already, so a forked child does not share registered memory
/// with its parent (the pages are absent from the child). Setting `RDMAV_FORK_SAFE` or
/// `IBV_FORK_SAFE` in the environment turns it on from the start. Returns 0, or the `errno`
/// of a failed `madvise` (fork safety then stays off).
pub fn fork_init() -> i32 {
    match registry::lock().enable_fork_safety() {
        Ok(()) => 0,
        Err(e) => {
            log::warn!("ibv_fork_init failed: MADV_DONTFORK over registered memory: {e}");
            e.raw_os_error().unwrap_or(libc::EINVAL)
        }
    }
}

/// Whether fork safety is on ([`fork_init`], or the environment), for
/// `ibv_is_fork_initialized`.
pub fn is_fork_safe() -> bool {
    registry::lock().fork_safe()
}
