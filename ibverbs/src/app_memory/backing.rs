//! What backs a stretch of the application's memory, and how it is made shareable: private
//! memory is copied onto a memfd mapped over it at the same address, a `MAP_SHARED` file
//! mapping is shared as the file it maps. And how moved memory is made private again once
//! nothing registers it ([`unswap`]).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vrdma::mem::{SharedMemory, page_size};

use super::AppMemoryError;
use super::maps::Vma;

/// The name of the memfds private memory is moved onto; `/proc/self/maps` shows it as
/// `/memfd:vrdma-app-buffer (deleted)`.
const MEMFD_NAME: &str = "vrdma-app-buffer";
/// How `/proc/self/maps` names a mapping of one of those memfds.
pub(crate) const OUR_MEMFD_PATH: &str = "/memfd:vrdma-app-buffer";
/// `statfs`'s `f_type` of hugetlbfs.
const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;
/// `/dev/zero`: a private mapping of it is anonymous memory.
const DEV_ZERO: (u32, u32) = (1, 5);

/// The range the caller asked for, for error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub addr: u64,
    pub len: u64,
}

/// Who the pages of a shareable stretch belong to, as `/proc/self/maps` shows them: the file
/// (device and inode, and its path for SysV shared memory, whose inodes are all 0) and the
/// file offset of the stretch's first page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub dev: (u32, u32),
    pub inode: u64,
    pub path: String,
    pub offset: u64,
}

impl Identity {
    /// Whether `vma` maps this file, with `vma_addr` of it at file offset
    /// `self.offset + (vma_addr - first)`.
    pub fn matches(&self, vma: &Vma, first: u64, vma_addr: u64) -> bool {
        vma.shared
            && vma.dev == self.dev
            && vma.inode == self.inode
            && (self.inode != 0 || vma.path == self.path)
            && vma.offset_of(vma_addr) == self.offset + (vma_addr - first)
    }
}

/// A stretch of the application's memory made shareable: its region for the devices.
#[derive(Debug)]
pub(crate) struct Shareable {
    pub mem: Arc<SharedMemory>,
    pub identity: Identity,
    /// The file (the region's own), reachable without the region's lock: the `fork` child
    /// handler reads moved memory through it.
    pub file: Arc<File>,
    /// The file is one of the memfds private memory was moved onto (by this piece or an
    /// earlier one), rather than the application's own shared file: the memory is made
    /// private again when no piece holds the memfd any more.
    pub moved: bool,
}

/// A memfd private memory was moved onto, which a piece in the registry still holds: memory
/// mapping it is shared as that file, never moved again (the device may be using its pages).
#[derive(Debug)]
pub(crate) struct MovedFile {
    pub dev: (u32, u32),
    pub inode: u64,
    pub file: Arc<File>,
}

/// One mapping's part of a stretch of private memory to move, with its protection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part {
    pub start: u64,
    pub end: u64,
    pub prot: i32,
}

/// How one stretch of a gap is made shareable.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Private memory: copied onto a memfd mapped over it, part by part (the parts keep their
    /// protection).
    Swap {
        start: u64,
        end: u64,
        parts: Vec<Part>,
    },
    /// A `MAP_SHARED` file: shared as that file from `offset`.
    Adopt {
        start: u64,
        end: u64,
        file: File,
        identity: Identity,
        /// The file is one of the memfds private memory was moved onto.
        moved: bool,
    },
}

impl Plan {
    /// The pages the plan covers.
    pub fn range(&self) -> (u64, u64) {
        match self {
            Plan::Swap { start, end, .. } | Plan::Adopt { start, end, .. } => (*start, *end),
        }
    }
}

/// How a mapping can be shared.
enum Class {
    Private,
    Shared { file: File, huge_page: Option<u64> },
}

/// What the file behind a mapping is.
struct FileFacts {
    /// The path it was found by (`/proc/self/map_files/...` or the mapping's own path).
    path: PathBuf,
    file_type: std::fs::FileType,
    rdev: (u32, u32),
    size: u64,
    /// The huge page size, for a hugetlbfs file.
    huge_page: Option<u64>,
}

/// Plans `start..end`, a stretch of whole pages no current piece covers, which `vmas` map
/// without a hole and readable (the caller checked). `stack` is an address on the calling
/// thread's stack; `moved_files` are the memfds pieces in the registry hold.
pub(crate) fn plan(
    start: u64,
    end: u64,
    vmas: &[Vma],
    stack: u64,
    moved_files: &[MovedFile],
    request: Request,
) -> Result<Vec<Plan>, AppMemoryError> {
    let mut plans: Vec<Plan> = Vec::new();
    for vma in vmas.iter().filter(|v| v.overlaps(start, end)) {
        let (s, e) = (vma.start.max(start), vma.end.min(end));
        match classify(vma, s, e, stack, moved_files, request)? {
            Class::Private => {
                let part = Part {
                    start: s,
                    end: e,
                    prot: vma.prot(),
                };
                match plans.last_mut() {
                    Some(Plan::Swap { end, parts, .. }) if *end == s => {
                        parts.push(part);
                        *end = e;
                    }
                    _ => plans.push(Plan::Swap {
                        start: s,
                        end: e,
                        parts: vec![part],
                    }),
                }
            }
            Class::Shared { file, huge_page } => {
                // A huge-page file is mapped in whole huge pages; the mapping is aligned so.
                let (s, e) = match huge_page {
                    Some(h) => (
                        (s & !(h - 1)).max(vma.start),
                        e.checked_next_multiple_of(h).unwrap_or(e).min(vma.end),
                    ),
                    None => (s, e),
                };
                let meta = file
                    .metadata()
                    .map_err(|source| unavailable(vma, request, source))?;
                let identity = Identity {
                    dev: dev_pair(meta.dev()),
                    inode: meta.ino(),
                    path: vma.path.clone(),
                    offset: vma.offset_of(s),
                };
                let moved = vma.path.starts_with(OUR_MEMFD_PATH);
                // A mapping split by mprotect is one file stretch: one region.
                if let Some(Plan::Adopt {
                    end,
                    identity: last,
                    start: last_start,
                    ..
                }) = plans.last_mut()
                {
                    if *end == s
                        && last.dev == identity.dev
                        && last.inode == identity.inode
                        && last.path == identity.path
                        && last.offset + (s - *last_start) == identity.offset
                    {
                        *end = e;
                        continue;
                    }
                }
                plans.push(Plan::Adopt {
                    start: s,
                    end: e,
                    file,
                    identity,
                    moved,
                });
            }
        }
    }
    Ok(plans)
}

/// How the pages `s..e` of `vma` can be shared, or why they cannot.
fn classify(
    vma: &Vma,
    s: u64,
    e: u64,
    stack: u64,
    moved_files: &[MovedFile],
    request: Request,
) -> Result<Class, AppMemoryError> {
    let Request { addr, len } = request;
    if vma.shared {
        if let Some(moved) = moved_files
            .iter()
            .find(|m| m.dev == vma.dev && m.inode == vma.inode)
        {
            // Pages of a memfd a piece still holds (the application unmapped part of that
            // piece, or moved it with mremap): the devices that piece is registered with may
            // be using them, so they are shared as that memfd, never moved onto another.
            let size = moved
                .file
                .metadata()
                .map_err(|source| unavailable(vma, request, source))?
                .len();
            // A mapping grown with mremap reaches past the memfd's end, where there is no
            // memory.
            if vma.offset_of(e) > size {
                return Err(AppMemoryError::PastEndOfFile {
                    addr,
                    len,
                    path: vma.path.clone(),
                    size,
                });
            }
            return moved
                .file
                .try_clone()
                .map(|file| Class::Shared {
                    file,
                    huge_page: None,
                })
                .map_err(|source| unavailable(vma, request, source));
        }
    }
    if vma.is_special() {
        return Err(AppMemoryError::KernelMapping {
            addr,
            len,
            path: vma.path.clone(),
        });
    }
    if !vma.shared && vma.contains(stack) {
        return Err(AppMemoryError::CallerStack { addr, len });
    }
    let facts = if vma.is_file() { file_facts(vma) } else { None };
    if let Some(f) = &facts {
        // A private mapping of /dev/zero is anonymous memory; any other device is device
        // memory.
        let anonymous_zero = f.rdev == DEV_ZERO && !vma.shared;
        if f.file_type.is_char_device() && !anonymous_zero {
            return Err(device_mapping(vma, request));
        }
        if !f.file_type.is_file() && !f.file_type.is_char_device() {
            return Err(device_mapping(vma, request));
        }
        if f.file_type.is_file() {
            // Pages past the end of the file have no memory: touching them is SIGBUS.
            let page = f.huge_page.unwrap_or(page_size() as u64);
            let file_pages_end = f.size.checked_next_multiple_of(page).unwrap_or(u64::MAX);
            let mapped_end = vma.offset_of(e);
            if mapped_end > file_pages_end {
                return Err(AppMemoryError::PastEndOfFile {
                    addr,
                    len,
                    path: vma.path.clone(),
                    size: f.size,
                });
            }
        }
    }
    if !vma.shared {
        let huge = facts.as_ref().is_some_and(|f| f.huge_page.is_some())
            || vma.path.starts_with("/anon_hugepage");
        if huge {
            return Err(AppMemoryError::PrivateHugePages {
                addr,
                len,
                path: vma.path.clone(),
            });
        }
        return Ok(Class::Private);
    }
    let opened = facts
        .as_ref()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EACCES))
        .and_then(|f| open_verified(vma, &f.path).map(|file| (file, f.huge_page)));
    match opened {
        Ok((file, huge_page)) => Ok(Class::Shared { file, huge_page }),
        // One of our own memfds that no piece holds (making it private again failed): no
        // device uses it, so it is moved onto a new one like private memory.
        Err(_) if vma.path.starts_with(OUR_MEMFD_PATH) => {
            log::debug!(
                "pages {s:#x}..{e:#x} are on an earlier vrdma memfd that cannot be reopened; \
                 moving them onto a new one"
            );
            Ok(Class::Private)
        }
        Err(source) => Err(unavailable(vma, request, source)),
    }
}

fn device_mapping(vma: &Vma, request: Request) -> AppMemoryError {
    AppMemoryError::DeviceMapping {
        addr: request.addr,
        len: request.len,
        path: vma.path.clone(),
        start: vma.start,
        end: vma.end,
    }
}

fn unavailable(vma: &Vma, request: Request, source: io::Error) -> AppMemoryError {
    AppMemoryError::FileUnavailable {
        addr: request.addr,
        len: request.len,
        path: vma.path.clone(),
        source,
    }
}

/// The file behind `vma`, found through `/proc/self/map_files` (which needs
/// `CAP_CHECKPOINT_RESTORE` or `CAP_SYS_ADMIN`) or, failing that, the mapping's path if the
/// file there is still the one mapped. `None` if neither leads to it.
fn file_facts(vma: &Vma) -> Option<FileFacts> {
    let mut candidates = vec![PathBuf::from(vma.map_files_path())];
    if vma.path.starts_with('/') && !vma.path.ends_with(" (deleted)") {
        candidates.push(PathBuf::from(&vma.path));
    }
    candidates.into_iter().find_map(|path| {
        // `stat`, not `open`: opening a device node can have effects of its own.
        let meta = std::fs::metadata(&path).ok()?;
        if dev_pair(meta.dev()) != vma.dev || meta.ino() != vma.inode {
            return None;
        }
        let huge_page = huge_page_size(&path);
        Some(FileFacts {
            file_type: meta.file_type(),
            rdev: dev_pair(meta.rdev()),
            size: meta.size(),
            huge_page,
            path,
        })
    })
}

/// Opens the regular file at `path` (found by [`file_facts`]) read-write, as the device will
/// map it, and checks it is still `vma`'s file.
fn open_verified(vma: &Vma, path: &Path) -> io::Result<File> {
    // std opens with O_CLOEXEC.
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let meta = file.metadata()?;
    if dev_pair(meta.dev()) != vma.dev || meta.ino() != vma.inode {
        return Err(io::Error::other(format!(
            "{} is no longer the file mapped at {:#x}",
            path.display(),
            vma.start
        )));
    }
    Ok(file)
}

/// The huge page size of the hugetlbfs file at `path`, `None` for any other file.
fn huge_page_size(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `cpath` is NUL-terminated and outlives the call; `st` is a valid, writable
    // statfs the call fills in.
    let rc = unsafe { libc::statfs(cpath.as_ptr(), &mut st) };
    // The magic is a 32-bit value in a field whose width varies by architecture.
    if rc != 0 || st.f_type as u32 != HUGETLBFS_MAGIC {
        return None;
    }
    u64::try_from(st.f_bsize)
        .ok()
        .filter(|b| b.is_power_of_two())
}

/// A device number as `/proc/self/maps` prints it: (major, minor).
pub(crate) fn dev_pair(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// Shares the pages of `file` (a `MAP_SHARED` file the application mapped at
/// `start..end`) as they are.
pub(crate) fn adopt(
    start: u64,
    end: u64,
    file: File,
    identity: Identity,
    moved: bool,
    request: Request,
) -> Result<Shareable, AppMemoryError> {
    let name = format!("vrdma-app-file:{}", identity.path);
    // SAFETY: the region is only ever registered with devices; nothing reads or writes the
    // application's memory through it, so the application may unmap it whenever it likes.
    let mem =
        unsafe { SharedMemory::adopt(&name, file, identity.offset, start, (end - start) as usize) }
            .map_err(|source| AppMemoryError::Region {
                addr: request.addr,
                len: request.len,
                source,
            })?;
    Ok(Shareable {
        file: mem.file(),
        mem: Arc::new(mem),
        identity,
        moved,
    })
}

/// Moves the private pages `start..end` onto a new memfd: creates it, and for each part
/// copies the pages in and maps the memfd over them (`MAP_SHARED | MAP_FIXED`, the part's
/// protection), which replaces the pages atomically at the same address.
///
/// Whole pages are copied, so whatever else lives on them (heap neighbours, malloc chunk
/// headers) survives. A write another thread makes to a page between its copy and its
/// replacement is lost; nothing on this thread writes memory in between (no allocation, no
/// logging), and the caller refused the calling thread's own stack.
pub(crate) fn swap(start: u64, end: u64, parts: &[Part]) -> Result<Shareable, AppMemoryError> {
    let len = (end - start) as usize;
    let fail = |what: &'static str| {
        move |source: io::Error| AppMemoryError::Swap {
            what,
            start,
            len: end - start,
            source,
        }
    };
    let name = CString::new(MEMFD_NAME).expect("the memfd name has no NUL");
    // SAFETY: `name` is NUL-terminated and outlives the call, which does not keep it.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(fail("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(end - start)
        .map_err(fail("sizing the memfd"))?;
    // The devices map the file: sealing its size means no page of theirs can vanish.
    // SAFETY: F_ADD_SEALS takes an integer argument and only changes the memfd's seal set.
    if unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } < 0
    {
        return Err(fail("sealing the memfd")(io::Error::last_os_error()));
    }
    let meta = file.metadata().map_err(fail("fstat of the memfd"))?;
    // SAFETY: a fresh shared mapping chosen by the kernel overlaps nothing; the file is `len`
    // bytes long.
    let staging = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if staging == libc::MAP_FAILED {
        return Err(fail("mapping the memfd")(io::Error::last_os_error()));
    }
    let staging = staging.cast::<u8>();
    // From here until the last part is replaced nothing may write to memory but the copies:
    // no allocation, no logging.
    let mut failure = None;
    let mut moved = 0usize;
    for part in parts {
        let offset = (part.start - start) as usize;
        let n = (part.end - part.start) as usize;
        // SAFETY: the source is `n` bytes of the application's memory the caller found mapped
        // readable (whole pages, plain bytes, which the copy only reads); the destination is
        // inside the staging mapping of `len` bytes (the parts lie in `start..end`). The two
        // cannot overlap: the staging mapping is new.
        unsafe { ptr::copy_nonoverlapping(part.start as *const u8, staging.add(offset), n) };
        // SAFETY: replaces exactly the pages just copied with the same bytes, now the
        // memfd's, at the same address and with the same protection; whatever the process
        // keeps there (heap chunks, the application's buffer) reads the same afterwards.
        let rc = unsafe {
            libc::mmap(
                part.start as *mut libc::c_void,
                n,
                part.prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if rc == libc::MAP_FAILED {
            failure = Some(io::Error::last_os_error());
            break;
        }
        moved += 1;
    }
    // SAFETY: the staging mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(staging.cast(), len) };
    if let Some(source) = failure {
        if moved > 0 {
            log::warn!(
                "{moved} of {} parts of {start:#x}..{end:#x} were moved onto a memfd before \
                 the next failed; they keep their contents",
                parts.len()
            );
        }
        return Err(fail("mapping the memfd over the buffer")(source));
    }
    let identity = Identity {
        dev: dev_pair(meta.dev()),
        inode: meta.ino(),
        path: format!("{OUR_MEMFD_PATH} (deleted)"),
        offset: 0,
    };
    // SAFETY: as in `adopt`: the region is only registered with devices, never accessed.
    let mem =
        unsafe { SharedMemory::adopt(MEMFD_NAME, file, 0, start, len) }.map_err(|source| {
            AppMemoryError::Region {
                addr: start,
                len: end - start,
                source,
            }
        })?;
    Ok(Shareable {
        file: mem.file(),
        mem: Arc::new(mem),
        identity,
        moved: true,
    })
}

/// Makes `start..end`, a mapping of the memfd `fd` (one memory was moved onto) from file
/// offset `offset`, private anonymous memory again with the same contents and protection
/// `prot`: the pages are copied (through a view of the memfd of its own, so the mapping
/// need not be readable) into a new private anonymous mapping elsewhere, which is given
/// `prot` and then moved over `start..end` with `mremap(MREMAP_FIXED)`. That replaces the
/// mapping atomically, as [`swap`] does: a thread reading the memory meanwhile reads the
/// same bytes before and after, but a write another thread makes between the copy and the
/// replacement is lost. Pages past the end of the memfd (the application grew the mapping
/// with `mremap`; touching them was `SIGBUS`) become zeros.
///
/// Allocates nothing, logs nothing and takes no lock: the `fork` child handler calls it.
pub(crate) fn unswap(start: u64, end: u64, prot: i32, fd: RawFd, offset: u64) -> io::Result<()> {
    let len = (end - start) as usize;
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat the call fills in.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    let copied = file_len.saturating_sub(offset).min(len as u64) as usize;
    // SAFETY: a fresh private anonymous mapping where the kernel likes overlaps nothing.
    let copy = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if copy == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let fail = |err: io::Error| {
        // SAFETY: the copy mapped above, not moved; nothing refers to it.
        unsafe { libc::munmap(copy, len) };
        Err(err)
    };
    if copied > 0 {
        // SAFETY: a fresh read-only shared mapping of the memfd where the kernel likes
        // overlaps nothing; it covers only pages inside the file, and is unmapped below.
        let view = unsafe {
            libc::mmap(
                ptr::null_mut(),
                copied,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if view == libc::MAP_FAILED {
            return fail(io::Error::last_os_error());
        }
        // SAFETY: the source is the view just mapped, `copied` bytes of the file (plain
        // bytes, which the copy only reads); the destination is the new mapping of `len >=
        // copied` bytes. Both are new, so they overlap neither each other nor anything else.
        unsafe { ptr::copy_nonoverlapping(view.cast::<u8>(), copy.cast::<u8>(), copied) };
        // SAFETY: the view mapped above; nothing refers to it any more.
        unsafe { libc::munmap(view, copied) };
    }
    // SAFETY: changes the protection of the new mapping only.
    if prot != libc::PROT_READ | libc::PROT_WRITE && unsafe { libc::mprotect(copy, len, prot) } != 0
    {
        return fail(io::Error::last_os_error());
    }
    // SAFETY: replaces exactly `start..end`, which maps the memfd, with the same bytes in
    // private memory, at the same address and with the same protection; whatever the
    // process keeps there reads the same afterwards. The copy mapping moves, so nothing
    // else refers to it.
    let moved = unsafe {
        libc::mremap(
            copy,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        return fail(io::Error::last_os_error());
    }
    Ok(())
}

/// Warns, once per process, when memory is moved between private and shared pages while
/// the program runs other threads: what they write to those pages during the move is lost.
/// `shim_threads` threads at least are the shim's own: it runs one for each open device
/// (`ibverbs/src/context.rs`), which may not have its name yet when it has just started.
pub(crate) fn warn_if_other_threads(start: u64, end: u64, shim_threads: usize) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if WARNED.load(Ordering::Relaxed) {
        return;
    }
    let threads = program_threads(shim_threads);
    if threads > 1 && !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "moving application memory {start:#x}..{end:#x} between private and shared pages \
             while the program runs {threads} threads: a write another thread makes to those \
             pages during the move is lost (malloc's own bookkeeping too, if it allocates from \
             the same page meanwhile). Register buffers before other threads write to their \
             pages, and deregister them when no other thread uses those pages; this warning \
             is shown once"
        );
    }
}

/// The number of threads of the program: those of this process but the shim's own, which
/// never write application buffers: the threads named `vrdma-*`, and at least
/// `shim_threads`. 0 if `/proc/self/task` cannot be read.
fn program_threads(shim_threads: usize) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let (mut all, mut named_shim) = (0usize, 0usize);
    for task in tasks.filter_map(Result::ok) {
        // A thread that ended meanwhile has no name to read: not counted.
        if let Ok(name) = std::fs::read(task.path().join("comm")) {
            all += 1;
            if !is_program_thread(&name) {
                named_shim += 1;
            }
        }
    }
    all.saturating_sub(named_shim.max(shim_threads))
}

/// Whether the thread named `comm` (as `/proc/self/task/*/comm` has it) is the program's,
/// not one of the shim's own (named `vrdma-*`).
fn is_program_thread(comm: &[u8]) -> bool {
    !comm.starts_with(b"vrdma-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_threads_are_counted_and_the_shims_are_not() {
        assert!(is_program_thread(b"perftest\n"));
        assert!(is_program_thread(b"vrdm\n"));
        assert!(!is_program_thread(b"vrdma-events-vr\n"));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        let program = std::thread::spawn(move || {
            let _ = started.send(());
            let _ = stopped.recv();
        });
        running.recv().unwrap();
        // This thread and the one just started, at least.
        assert!(program_threads(0) >= 2, "{}", program_threads(0));
        // However many the shim is said to run, the process runs no more.
        assert_eq!(program_threads(usize::MAX), 0);
        drop(stop);
        program.join().unwrap();
    }
}
