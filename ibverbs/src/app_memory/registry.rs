//! The process-wide registry of application memory made shareable: pieces (page-aligned
//! stretches, each one region for the devices), which devices each is registered with and
//! how many pins hold it there, and the pin counts of pages for fork safety.
//!
//! One mutex guards it all. A pin holds it from reading `/proc/self/maps` to the last region
//! registered, so two threads pinning the same fresh memory cannot both move it; an unpin
//! holds it until the memory it releases is private again.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use vrdma::Context;
use vrdma::mem::page_size;

use super::AppMemoryError;
use super::backing::{self, Identity, MovedFile, Plan, Request, Shareable};
use super::fork::{self, RangeCounts};
use super::maps::{self, Vma};

/// One open device, as the registry knows it.
#[derive(Debug)]
pub(crate) struct Device {
    pub id: u64,
    pub ctx: Context,
}

/// How many [`Device`]s are alive: the shim runs an event thread for each open device,
/// which the warning about moving memory while other threads run leaves out.
static DEVICES_ALIVE: AtomicUsize = AtomicUsize::new(0);

impl Drop for Device {
    fn drop(&mut self) {
        DEVICES_ALIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`backing::warn_if_other_threads`], counting one shim thread for each device.
fn warn_if_other_threads(start: u64, end: u64) {
    backing::warn_if_other_threads(start, end, DEVICES_ALIVE.load(Ordering::Relaxed));
}

/// A stretch of the application's memory made shareable.
#[derive(Debug)]
struct Piece {
    start: u64,
    end: u64,
    shareable: Shareable,
    /// `(device id, pins)` for each device the piece is registered with.
    devices: Vec<(u64, usize)>,
}

impl Piece {
    fn identity(&self) -> &Identity {
        &self.shareable.identity
    }

    /// Whether the piece's file is `other`'s.
    fn same_file(&self, other: &Piece) -> bool {
        self.identity().dev == other.identity().dev
            && self.identity().inode == other.identity().inode
    }

    /// Whether `vmas` (sorted) still map all of the piece from its file, where it was.
    fn still_mapped(&self, vmas: &[Vma]) -> bool {
        let mut at = self.start;
        for vma in vmas.iter().filter(|v| v.overlaps(self.start, self.end)) {
            if vma.start > at || !self.identity().matches(vma, self.start, at) {
                return false;
            }
            at = vma.end;
            if at >= self.end {
                return true;
            }
        }
        false
    }

    fn pins_on(&self, device: u64) -> usize {
        self.devices
            .iter()
            .find(|(d, _)| *d == device)
            .map_or(0, |(_, n)| *n)
    }
}

/// What a successful pin holds.
#[derive(Debug)]
pub(crate) struct Held {
    pub pieces: Vec<u64>,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug)]
pub(crate) struct Registry {
    next_piece: u64,
    next_device: u64,
    pieces: HashMap<u64, Piece>,
    /// Pieces the application's mappings still hold, by first address (non-overlapping). A
    /// piece whose pages were unmapped or replaced leaves this index but stays in `pieces`
    /// until its last pin goes.
    current: BTreeMap<u64, u64>,
    fork_safe: bool,
    pinned: RangeCounts,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    Mutex::new(Registry {
        next_piece: 1,
        next_device: 1,
        pieces: HashMap::new(),
        current: BTreeMap::new(),
        fork_safe: fork::requested_by_environment(),
        pinned: RangeCounts::default(),
    })
});

/// The registry, locked. A thread that panicked holding it left it consistent between
/// statements, so a poisoned lock is taken over.
pub(crate) fn lock() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// A new device's id.
    pub fn new_device(&mut self, ctx: Context) -> Device {
        let id = self.next_device;
        self.next_device += 1;
        DEVICES_ALIVE.fetch_add(1, Ordering::Relaxed);
        Device { id, ctx }
    }

    pub fn fork_safe(&self) -> bool {
        self.fork_safe
    }

    /// Turns fork safety on: every pinned page, and every page pinned from now on, is marked
    /// `MADV_DONTFORK`.
    pub fn enable_fork_safety(&mut self) -> std::io::Result<()> {
        if self.fork_safe {
            return Ok(());
        }
        for (start, end) in self.pinned.covered() {
            fork::advise(start, end, libc::MADV_DONTFORK)?;
        }
        self.fork_safe = true;
        Ok(())
    }

    /// The current piece holding `addr`.
    fn current_holding(&self, addr: u64) -> Option<u64> {
        let (_, &id) = self.current.range(..=addr).next_back()?;
        self.pieces.get(&id).filter(|p| p.end > addr).map(|_| id)
    }

    /// Current pieces overlapping `start..end`.
    fn current_overlapping(&self, start: u64, end: u64) -> Vec<u64> {
        let mut ids: Vec<u64> = self.current_holding(start).into_iter().collect();
        ids.extend(self.current.range(start..end).map(|(_, &id)| id));
        ids.dedup();
        ids
    }

    /// Whether `device` reaches all of `start..end` through regions that are not pieces (the
    /// transport's own memory), so no piece is needed there.
    fn reached_without_pieces(&self, device: &Device, start: u64, end: u64) -> bool {
        let mut at = start;
        while at < end {
            let Some((base, size)) = device.ctx.shared_region(at) else {
                return false;
            };
            let ours = self
                .pieces
                .values()
                .any(|p| p.start == base && p.pins_on(device.id) > 0);
            if ours {
                return false;
            }
            at = base.saturating_add(size);
        }
        true
    }

    /// Makes `len` bytes at `addr` reachable by `device` and holds them there.
    pub fn pin(
        &mut self,
        device: &Device,
        addr: u64,
        len: u64,
        writable: bool,
    ) -> Result<Held, AppMemoryError> {
        let page = page_size() as u64;
        let request = Request { addr, len };
        let (start, end) = addr
            .checked_add(len)
            .filter(|_| len > 0)
            .and_then(|end| Some((addr & !(page - 1), end.checked_next_multiple_of(page)?)))
            .ok_or(AppMemoryError::InvalidRange { addr, len })?;

        // Read the maps over the request and every current piece it touches.
        let touched = self.current_overlapping(start, end);
        let (lo, hi) = touched
            .iter()
            .filter_map(|id| self.pieces.get(id))
            .fold((start, end), |(lo, hi), p| (lo.min(p.start), hi.max(p.end)));
        let vmas = maps::overlapping(lo, hi).map_err(|source| AppMemoryError::Maps { source })?;
        check_accessible(&vmas, start, end, writable, request)?;
        for id in touched {
            let Some(piece) = self.pieces.get(&id) else {
                continue;
            };
            if !piece.still_mapped(&vmas) {
                log::debug!(
                    "{:#x}..{:#x} no longer maps the memory shared earlier (freed and \
                     reused); it will be shared afresh",
                    piece.start,
                    piece.end
                );
                self.current.remove(&piece.start);
            }
        }

        let mut held: Vec<u64> = Vec::new();
        let result = self.pin_pieces(device, start, end, &vmas, request, &mut held);
        let result = result.and_then(|()| {
            self.pinned.add(start, end);
            if self.fork_safe {
                if let Err(source) = fork::advise(start, end, libc::MADV_DONTFORK) {
                    self.pinned.remove(start, end);
                    return Err(AppMemoryError::Fork { addr, len, source });
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(Held {
                pieces: held,
                start,
                end,
            }),
            Err(e) => {
                self.release_pieces(device, &held);
                self.forget_unheld();
                Err(e)
            }
        }
    }

    /// Finds or makes the pieces over `start..end` and registers each with `device`, adding
    /// the ids it holds to `held` as it goes. Whatever would be refused for overlapping a
    /// piece still registered with `device` is refused before any memory is moved.
    fn pin_pieces(
        &mut self,
        device: &Device,
        start: u64,
        end: u64,
        vmas: &[Vma],
        request: Request,
        held: &mut Vec<u64>,
    ) -> Result<(), AppMemoryError> {
        let stack_marker = 0u8;
        let stack = std::ptr::addr_of!(stack_marker) as u64;
        let moved_files = self.moved_files();
        let mut needed: Vec<u64> = Vec::new();
        let mut plans: Vec<Plan> = Vec::new();
        let mut at = start;
        while at < end {
            if let Some(id) = self.current_holding(at) {
                if !needed.contains(&id) {
                    needed.push(id);
                }
                at = self.pieces.get(&id).map_or(end, |p| p.end);
                continue;
            }
            let gap_end = self.current.range(at..end).next().map_or(end, |(&s, _)| s);
            if !self.reached_without_pieces(device, at, gap_end) {
                plans.extend(backing::plan(
                    at,
                    gap_end,
                    vmas,
                    stack,
                    &moved_files,
                    request,
                )?);
            }
            at = gap_end;
        }
        let to_register = needed
            .iter()
            .filter_map(|id| self.pieces.get(id))
            .filter(|p| p.pins_on(device.id) == 0)
            .map(|p| (p.start, p.end));
        for (s, e) in to_register.chain(plans.iter().map(Plan::range)) {
            self.check_not_registered(device, s, e, request)?;
        }
        for plan in plans {
            let (s, e, shareable) = match plan {
                Plan::Swap { start, end, parts } => {
                    warn_if_other_threads(start, end);
                    (start, end, backing::swap(start, end, &parts)?)
                }
                Plan::Adopt {
                    start,
                    end,
                    file,
                    identity,
                    moved,
                } => (
                    start,
                    end,
                    backing::adopt(start, end, file, identity, moved, request)?,
                ),
            };
            log::debug!(
                "application memory {s:#x}..{e:#x} is now shareable ({})",
                if shareable.moved {
                    "on a memfd".to_owned()
                } else {
                    format!("its file {}", shareable.identity.path)
                }
            );
            let id = self.next_piece;
            self.next_piece += 1;
            self.pieces.insert(
                id,
                Piece {
                    start: s,
                    end: e,
                    shareable,
                    devices: Vec::new(),
                },
            );
            self.current.insert(s, id);
            needed.push(id);
        }
        for id in needed {
            self.register(device, id, request)?;
            held.push(id);
        }
        Ok(())
    }

    /// The memfds the pieces hold.
    fn moved_files(&self) -> Vec<MovedFile> {
        self.pieces
            .values()
            .filter(|p| p.shareable.moved)
            .map(|p| MovedFile {
                dev: p.identity().dev,
                inode: p.identity().inode,
                file: p.shareable.file.clone(),
            })
            .collect()
    }

    /// Refuses `start..end` for `device` if a piece registered with it overlaps: the pages
    /// of a piece the application unmapped may still be registered there (its MR is not
    /// deregistered yet), and the device cannot take two regions at one address.
    fn check_not_registered(
        &self,
        device: &Device,
        start: u64,
        end: u64,
        request: Request,
    ) -> Result<(), AppMemoryError> {
        match self
            .pieces
            .values()
            .find(|p| p.pins_on(device.id) > 0 && p.start < end && start < p.end)
        {
            Some(old) => Err(AppMemoryError::StillRegistered {
                addr: request.addr,
                len: request.len,
                start: old.start,
                end: old.end,
            }),
            None => Ok(()),
        }
    }

    /// Counts one more pin of piece `id` on `device`, registering it there on the first.
    fn register(
        &mut self,
        device: &Device,
        id: u64,
        request: Request,
    ) -> Result<(), AppMemoryError> {
        let Some(piece) = self.pieces.get(&id) else {
            return Ok(());
        };
        if piece.pins_on(device.id) == 0 {
            self.check_not_registered(device, piece.start, piece.end, request)?;
            device
                .ctx
                .add_memory(piece.shareable.mem.clone())
                .map_err(|source| AppMemoryError::Device {
                    addr: request.addr,
                    len: request.len,
                    source,
                })?;
        }
        let Some(piece) = self.pieces.get_mut(&id) else {
            return Ok(());
        };
        match piece.devices.iter_mut().find(|(d, _)| *d == device.id) {
            Some((_, n)) => *n += 1,
            None => piece.devices.push((device.id, 1)),
        }
        Ok(())
    }

    /// Releases what a pin held.
    pub fn unpin(&mut self, device: &Device, held: &Held) {
        self.release_pieces(device, &held.pieces);
        self.forget_unheld();
        let freed = self.pinned.remove(held.start, held.end);
        if self.fork_safe {
            for (s, e) in freed {
                // The application may have unmapped them already: nothing to undo then.
                if let Err(err) = fork::advise(s, e, libc::MADV_DOFORK) {
                    log::debug!("MADV_DOFORK of {s:#x}..{e:#x}: {err}");
                }
            }
        }
    }

    /// Counts one pin fewer of each piece on `device`, removing it from the device with its
    /// last.
    fn release_pieces(&mut self, device: &Device, ids: &[u64]) {
        for id in ids {
            let Some(piece) = self.pieces.get_mut(id) else {
                continue;
            };
            let Some(pos) = piece.devices.iter().position(|(d, _)| *d == device.id) else {
                continue;
            };
            piece.devices[pos].1 -= 1;
            if piece.devices[pos].1 > 0 {
                continue;
            }
            piece.devices.remove(pos);
            if let Err(e) = device.ctx.remove_memory(piece.start) {
                log::warn!(
                    "could not unshare application memory {:#x}..{:#x} from the device: {}; \
                     it stays reachable by the device until the device is closed",
                    piece.start,
                    piece.end,
                    vrdma::error_chain(&e)
                );
            }
        }
    }

    /// Drops pieces no device holds. Memory that was moved onto a memfd is made private
    /// anonymous memory again, with its contents and protection, once no piece holds that
    /// memfd: left shared, a forked child would share it (malloc's chunk headers too), and
    /// `MADV_DONTNEED` would keep its contents where allocators count on zeros (calloc of
    /// memory a glibc arena trimmed, a jemalloc purge). The application's own shared files
    /// stay as they are; only the registry's reference to them goes.
    fn forget_unheld(&mut self) {
        let unheld: Vec<u64> = self
            .pieces
            .iter()
            .filter(|(_, p)| p.devices.is_empty())
            .map(|(&id, _)| id)
            .collect();
        let mut moved: Vec<Piece> = Vec::new();
        for id in unheld {
            if let Some(piece) = self.pieces.remove(&id) {
                if self.current.get(&piece.start) == Some(&id) {
                    self.current.remove(&piece.start);
                }
                if piece.shareable.moved {
                    moved.push(piece);
                }
            }
        }
        for (i, piece) in moved.iter().enumerate() {
            let still_held = moved[..i].iter().any(|p| p.same_file(piece))
                || self.pieces.values().any(|p| p.same_file(piece));
            if !still_held {
                make_private(piece);
            }
        }
    }

    /// Whether some piece holds memory moved onto a memfd.
    pub fn holds_moved_memory(&self) -> bool {
        self.pieces.values().any(|p| p.shareable.moved)
    }

    /// In a child just forked (it runs one thread, the one that called `fork`): makes every
    /// mapping of a memfd memory was moved onto private anonymous memory with its current
    /// contents, and forgets every piece, since the child cannot use its parent's devices.
    /// Pages marked `MADV_DONTFORK` are not in the child at all.
    ///
    /// Reads `/proc/self/maps` through a buffer on the stack and moves pages with system
    /// calls alone: no allocation, no lock, no logging. Forgetting the pieces frees their
    /// memory and closes the child's copies of their files, which is safe in a child (the
    /// C library's `fork` leaves `malloc` usable there); a failure to copy leaves that
    /// mapping shared with the parent, and nothing can report it. So does a mapping of a
    /// memfd no piece holds (making it private failed in the parent, which said so).
    pub fn forget_in_child(&mut self) {
        if self.holds_moved_memory() {
            let pieces = &self.pieces;
            let _ = maps::for_each(|vma| {
                if !vma.shared {
                    return;
                }
                let file = pieces
                    .values()
                    .find(|p| {
                        p.shareable.moved
                            && p.identity().dev == vma.dev
                            && p.identity().inode == vma.inode
                    })
                    .map(|p| p.shareable.file.as_raw_fd());
                if let Some(fd) = file {
                    let _ = backing::unswap(vma.start, vma.end, vma.prot(), fd, vma.offset);
                }
            });
        }
        self.pieces.clear();
        self.current.clear();
        self.pinned = RangeCounts::default();
    }
}

/// Makes every mapping of `piece`'s memfd, wherever the application has it now (`mremap`
/// may have moved it), private anonymous memory again.
fn make_private(piece: &Piece) {
    let Identity { dev, inode, .. } = *piece.identity();
    let vmas = match maps::of_file(dev, inode) {
        Ok(vmas) => vmas,
        Err(err) => {
            log::warn!(
                "cannot read /proc/self/maps to make {:#x}..{:#x} private memory again now \
                 that nothing registers it: {err}; it stays shared memory (a forked child \
                 shares it, MADV_DONTNEED keeps its contents)",
                piece.start,
                piece.end
            );
            return;
        }
    };
    for vma in vmas {
        warn_if_other_threads(vma.start, vma.end);
        let fd = piece.shareable.file.as_raw_fd();
        match backing::unswap(vma.start, vma.end, vma.prot(), fd, vma.offset) {
            Ok(()) => log::debug!(
                "application memory {:#x}..{:#x} is private memory again",
                vma.start,
                vma.end
            ),
            Err(err) => log::warn!(
                "cannot make application memory {:#x}..{:#x} private again now that nothing \
                 registers it: {err}; it stays shared memory (a forked child shares it, \
                 MADV_DONTNEED keeps its contents). Check free memory and vm.max_map_count",
                vma.start,
                vma.end
            ),
        }
    }
}

/// Checks that `vmas` map all of `start..end` readable (and writable if `writable`): what
/// the kernel's `ib_umem_get` needs to pin the pages.
fn check_accessible(
    vmas: &[Vma],
    start: u64,
    end: u64,
    writable: bool,
    request: Request,
) -> Result<(), AppMemoryError> {
    let Request { addr, len } = request;
    let mut at = start;
    for vma in vmas.iter().filter(|v| v.overlaps(start, end)) {
        if vma.start > at {
            break;
        }
        if !vma.read || (writable && !vma.write) {
            return Err(AppMemoryError::Protection {
                addr,
                len,
                start: vma.start,
                end: vma.end,
                prot: vma.prot(),
                writable,
            });
        }
        at = vma.end;
        if at >= end {
            return Ok(());
        }
    }
    Err(AppMemoryError::Unmapped {
        addr,
        len,
        hole: at.max(addr),
    })
}
