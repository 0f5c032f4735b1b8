//! A test VMM that live-migrates virtio-user guests the way QEMU migrates a VM with a
//! vhost-user device (docs/migration.md lists the messages and where they come from).
//!
//! Guest memory moves as a VM's RAM does: the destination gets a copy of every region, in a
//! full pass and then pre-copy rounds that copy only the pages the device's dirty log names,
//! a last round after the device stopped, and the guest then runs on the copy, mapped at the
//! same addresses (so at the same guest-physical addresses) and handed to the destination
//! daemon as its memory table. A page the daemon wrote without logging it is stale in the
//! copy: [`migrate`] compares source and copy byte for byte before the switch-over and fails
//! with the pages that differ.
//!
//! The guest's "vCPUs" are the threads of the test that use its transport. They are stopped
//! from the first step to the last ([`vrdma::transport::Migration`] holds the driver's
//! queues), and the full pass runs after they stopped, so every later change to guest memory
//! is the device's. (QEMU tracks vCPU writes with KVM's dirty log; a process has no such
//! log here: this kernel has no soft-dirty page tracking.) The device meanwhile keeps
//! running: work the guest posted before executes, and its peers' WRITEs, SENDs and atomics
//! land in its memory during the rounds.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};
use vrdma::mem::SharedMemory;
use vrdma::transport::{Migration, VirtioUser, VirtioUserError};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;
/// Guest-physical addresses are the guest process's virtual addresses, below 2^48.
const ADDRESS_BITS: u32 = 48;
/// Bytes copied per read and write in a full pass.
const COPY_CHUNK: usize = 1 << 20;

/// Why a migration did not complete. The source runs the VM again in every case but
/// [`MigrateError::Device`] during the switch-over itself.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A vhost-user step failed (the destination refused the state, a daemon went away).
    #[error("migration step failed: {}", vrdma::error_chain(.0))]
    Device(#[from] VirtioUserError),
    /// The copy differs from the source after the last round: the device wrote pages it did
    /// not log.
    #[error("{} guest pages differ between source and destination after the last round, first at {:#x?}", .0.len(), .0.first())]
    Mismatch(Vec<u64>),
    /// The caller asked for the migration to be cancelled before the switch-over.
    #[error("cancelled before the switch-over")]
    Cancelled,
    /// A file operation of the VMM itself failed.
    #[error("the test VMM failed: {0}")]
    Vmm(#[from] std::io::Error),
}

/// How [`migrate`] runs, including the failures tests inject.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Pre-copy rounds after the full pass, each copying the pages logged since the last.
    pub precopy_rounds: u32,
    /// A negative control: do not copy the pages of the last round's log, so the comparison
    /// must find the pages the device wrote after the last pre-copy round.
    pub ignore_last_log: bool,
    /// Changes the saved state before the destination loads it (a corrupt or future blob).
    pub tamper: Option<fn(&mut Vec<u8>)>,
    /// Cancel after the state was saved, before the destination loads it.
    pub cancel_before_switch: bool,
    /// Skip the byte-for-byte comparison of source and copy, which a VMM does not do and
    /// which lengthens the switch-over (the bench measures without it).
    pub skip_compare: bool,
}

/// What one guest's migration took.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Bytes of device state.
    pub state_bytes: usize,
    /// Pages copied in each round: the full pass, each pre-copy round, the last round.
    pub pages: Vec<usize>,
    /// From the device's stop to its start on the destination.
    pub downtime: Duration,
    /// Saving the device state (SET_DEVICE_STATE_FD to CHECK_DEVICE_STATE).
    pub save: Duration,
    /// Loading it at the destination.
    pub load: Duration,
}

/// A VMM's dirty log over every address a guest of this process can have: a sparse memfd
/// (8 GiB for 48 bits, of which only the pages the device marks are allocated), mapped so its
/// bits can be taken atomically while the device sets others.
pub struct DirtyLog {
    file: File,
    map: NonNull<AtomicU8>,
    size: usize,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for DirtyLog {}
// SAFETY: as for `Send`.
unsafe impl Sync for DirtyLog {}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("size", &self.size)
            .finish()
    }
}

impl DirtyLog {
    /// A log with no bit set.
    pub fn new() -> std::io::Result<DirtyLog> {
        let size = ((1u64 << ADDRESS_BITS) / LOG_PAGE / 8) as usize;
        let file = File::from(memfd_create("vrdma-dirty-log", MFdFlags::MFD_CLOEXEC)?);
        file.set_len(size as u64)?;
        // SAFETY: a fresh shared mapping of the whole file chosen by the kernel; it is only
        // accessed through atomics (the device sets bits in it concurrently) and unmapped on
        // drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let map = NonNull::new(addr.cast::<AtomicU8>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(DirtyLog { file, map, size })
    }

    /// Its size in bytes, as `SET_LOG_BASE` announces it.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Takes (reads and clears) the bits of the pages of `[base, base + len)`, and returns
    /// their offsets from `base`. Bits of other regions' pages sharing a byte are left alone.
    pub fn take(&self, base: u64, len: u64) -> Vec<u64> {
        let mut pages = Vec::new();
        let (first, end) = (base / LOG_PAGE, (base + len).div_ceil(LOG_PAGE));
        let mut page = first;
        while page < end {
            let byte = (page / 8) as usize;
            let lo = page % 8;
            let hi = (end - page + lo).min(8);
            let mask = (((1u16 << hi) - 1) & !((1u16 << lo) - 1)) as u8;
            if byte < self.size {
                // SAFETY: `byte` is inside the mapping.
                let cell = unsafe { &*self.map.as_ptr().add(byte) };
                let bits = cell.fetch_and(!mask, Ordering::AcqRel) & mask;
                for bit in lo..hi {
                    if bits & (1 << bit) != 0 {
                        pages.push((byte as u64 * 8 + bit - first) * LOG_PAGE);
                    }
                }
            }
            page = (page / 8 + 1) * 8;
        }
        pages
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.size) };
    }
}

/// Where a migration stands when [`migrate`] calls its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Pre-copy round `n` (from 1) has been copied; the device still runs.
    Copied(u32),
    /// The source is stopped and its state saved; the destination is about to load it.
    BeforeLoad,
    /// The destination has loaded the state and is about to start: where a VM's network
    /// address moves to the destination host.
    Loaded,
}

/// One region of a guest and its copy at the destination.
struct Copy {
    region: std::sync::Arc<SharedMemory>,
    dest: File,
}

impl Copy {
    fn new(region: &std::sync::Arc<SharedMemory>) -> std::io::Result<Copy> {
        let dest = File::from(memfd_create("vrdma-migrated", MFdFlags::MFD_CLOEXEC)?);
        dest.set_len(region.len() as u64)?;
        Ok(Copy {
            region: region.clone(),
            dest,
        })
    }

    fn copy_all(&self) -> std::io::Result<usize> {
        let src = self.region.file();
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut at = 0u64;
        while at < self.region.len() as u64 {
            let n = COPY_CHUNK.min(self.region.len() - at as usize);
            src.read_exact_at(&mut buf[..n], at)?;
            self.dest.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        Ok(self.region.len() / LOG_PAGE as usize)
    }

    fn copy_pages(&self, offsets: &[u64]) -> std::io::Result<usize> {
        let src = self.region.file();
        let mut page = [0u8; LOG_PAGE as usize];
        for &at in offsets {
            src.read_exact_at(&mut page, at)?;
            self.dest.write_all_at(&page, at)?;
        }
        Ok(offsets.len())
    }

    /// Guest-physical addresses of the pages that differ between source and copy.
    fn differences(&self) -> std::io::Result<Vec<u64>> {
        let src = self.region.file();
        let (mut a, mut b) = (vec![0u8; COPY_CHUNK], vec![0u8; COPY_CHUNK]);
        let mut out = Vec::new();
        let mut at = 0u64;
        while at < self.region.len() as u64 {
            let n = COPY_CHUNK.min(self.region.len() - at as usize);
            src.read_exact_at(&mut a[..n], at)?;
            self.dest.read_exact_at(&mut b[..n], at)?;
            for (i, (pa, pb)) in a[..n]
                .chunks(LOG_PAGE as usize)
                .zip(b[..n].chunks(LOG_PAGE as usize))
                .enumerate()
            {
                if pa != pb {
                    out.push(self.region.addr() + at + (i as u64) * LOG_PAGE);
                }
            }
            at += n as u64;
        }
        Ok(out)
    }
}

/// One guest being moved.
struct Moving<'a> {
    migration: Option<Migration<'a>>,
    copies: Vec<Copy>,
    report: Report,
}

impl<'a> Moving<'a> {
    fn m(&mut self) -> &mut Migration<'a> {
        self.migration.as_mut().expect("the migration is under way")
    }

    fn round(&mut self, log: &DirtyLog, ignore: bool) -> std::io::Result<()> {
        let mut pages = 0;
        for c in &self.copies {
            let dirty = log.take(c.region.addr(), c.region.len() as u64);
            if !ignore {
                pages += c.copy_pages(&dirty)?;
            }
        }
        self.report.pages.push(pages);
        Ok(())
    }
}

/// Migrates each guest `(transport, destination socket)` of `guests` at once, with QEMU's
/// messages (docs/migration.md): the destination is realized; the source logs dirty pages
/// while its memory is copied in a full pass and `plan.precopy_rounds` rounds; the source
/// stops its rings, the last round is copied, the source saves the device state and the copy
/// is compared with the source byte for byte; the destination loads the state, the guests
/// move onto their copies and the destination starts. On any failure before the switch-over
/// every source resumes (QEMU's `vhost_dev_start` and `vhost_migration_log(false)`) and the
/// error is returned. `hook` runs at each [`Step`]: after each pre-copy round, the last one
/// included (so what it makes the device write lands in the next round's log, or the
/// last's), and before the load.
pub fn migrate(
    guests: &[(&VirtioUser, &Path)],
    plan: &Plan,
    mut hook: impl FnMut(Step),
) -> Result<Vec<Report>, MigrateError> {
    let log = DirtyLog::new()?;
    let mut moving = Vec::new();
    for (vu, _) in guests {
        moving.push(Moving {
            migration: Some(vu.begin_migration()?),
            copies: Vec::new(),
            report: Report::default(),
        });
    }
    let outcome = run(guests, plan, &log, &mut moving, &mut hook);
    if let Err(e) = outcome {
        for mv in &mut moving {
            if let Some(m) = mv.migration.take() {
                m.cancel(Some((log.file.as_fd(), log.size())))?;
            }
        }
        return Err(e);
    }
    Ok(moving.into_iter().map(|m| m.report).collect())
}

fn run(
    guests: &[(&VirtioUser, &Path)],
    plan: &Plan,
    log: &DirtyLog,
    moving: &mut [Moving<'_>],
    hook: &mut dyn FnMut(Step),
) -> Result<(), MigrateError> {
    // The destination QEMU is started (-incoming) before the migration begins.
    for (mv, (_, dest)) in moving.iter_mut().zip(guests) {
        mv.m().connect_destination(dest)?;
    }
    for mv in moving.iter_mut() {
        mv.m().start_dirty_log(log.file.as_fd(), log.size())?;
        let regions: Vec<_> = mv.m().regions().to_vec();
        mv.copies = regions.iter().map(Copy::new).collect::<Result<_, _>>()?;
        let mut pages = 0;
        for c in &mv.copies {
            pages += c.copy_all()?;
        }
        mv.report.pages.push(pages);
    }
    for n in 1..=plan.precopy_rounds {
        for mv in moving.iter_mut() {
            mv.round(log, false)?;
        }
        hook(Step::Copied(n));
    }
    let stop = Instant::now();
    for mv in moving.iter_mut() {
        mv.m().stop_rings()?;
    }
    let mut blobs = Vec::new();
    for mv in moving.iter_mut() {
        mv.round(log, plan.ignore_last_log)?;
        let t = Instant::now();
        let blob = mv.m().save_state()?;
        mv.report.save = t.elapsed();
        mv.report.state_bytes = blob.len();
        let mut differ = Vec::new();
        if !plan.skip_compare {
            for c in &mv.copies {
                differ.extend(c.differences()?);
            }
        }
        if !differ.is_empty() {
            return Err(MigrateError::Mismatch(differ));
        }
        blobs.push(blob);
    }
    if plan.cancel_before_switch {
        return Err(MigrateError::Cancelled);
    }
    hook(Step::BeforeLoad);
    for (mv, mut blob) in moving.iter_mut().zip(blobs) {
        if let Some(tamper) = plan.tamper {
            tamper(&mut blob);
        }
        let t = Instant::now();
        mv.m().load_state(&blob)?;
        mv.report.load = t.elapsed();
    }
    hook(Step::Loaded);
    // Switch-over: the guests run on their copies from here.
    for mv in moving.iter_mut() {
        let copies = std::mem::take(&mut mv.copies);
        for c in copies {
            c.region
                .replace_backing(c.dest)
                .map_err(std::io::Error::other)?;
        }
        let m = mv.migration.take().expect("under way");
        m.switch_over()?;
        mv.report.downtime = stop.elapsed();
    }
    Ok(())
}
