//! What a forked child gets of moved memory.
//!
//! Memory moved onto a memfd is `MAP_SHARED`, so a child would share those pages with its
//! parent instead of getting its own copies: heap pages (malloc's chunk headers included)
//! written by either process would change under the other. With libibverbs the child gets
//! copy-on-write copies of registered memory (which the kernel, since Linux 5.9, copies at
//! once for pages pinned for DMA), and with `ibv_fork_init` no copies at all. Pages marked
//! `MADV_DONTFORK` (fork safety, [`super::fork_init`]) are absent from the child here too;
//! for the rest, `pthread_atfork` handlers, installed with the first pin, give the child
//! private copies:
//!
//! * **prepare** (in the parent, before `fork`): takes the registry's lock, and with moved
//!   memory about makes a pipe;
//! * **child**: makes every mapping of one of the memfds private anonymous memory with its
//!   contents ([`Registry::forget_in_child`]), forgets the registry (the child cannot use
//!   its parent's devices), releases the lock and closes the pipe;
//! * **parent**: waits for the child to close the pipe, then releases the lock.
//!
//! **Why the lock is held across `fork`** (as glibc holds malloc's locks) rather than the
//! child trying it and falling back on a lock-free snapshot: a thread holding the lock at
//! the moment of `fork` may be halfway through moving memory (the memfd mapped over part of
//! a buffer, the registry not told yet), which no snapshot shows; and in the child, whose
//! other threads are gone, a lock left held would block its first `ibv_reg_mr` for ever.
//! Held across `fork`, the registry the child inherits is consistent, its lock is the
//! child's own, and nothing is moving. The price: `fork` waits for a pin or unpin another
//! thread is making (one read of `/proc/self/maps` and one round trip to the daemon). A
//! program that forks from a signal handler interrupting its own `ibv_reg_mr` or
//! `ibv_dereg_mr` deadlocks, as it would on malloc's locks.
//!
//! **Why the parent waits**: the child copies the pages after `fork` returns, while the
//! parent runs on. Without the wait the thread that forked would go on writing (allocating
//! from the heap, say) into pages the child has not copied yet, and the child would see
//! those writes. Other threads of the parent are not stopped, so a write of theirs during
//! the copy can still reach the child, as one can reach a child of the kernel's own
//! early copy of pinned pages. The wait lasts as long as the copy: `fork` takes longer with
//! much memory registered, and the child needs as much memory again at once.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::{MutexGuard, Once};

use super::registry::{self, Registry};

/// What the handlers of one `fork` pass on, on the thread that calls it.
struct AcrossFork {
    registry: MutexGuard<'static, Registry>,
    /// The pipe the child closes once it has its copies: read end, write end.
    copied: Option<(RawFd, RawFd)>,
}

thread_local! {
    static ACROSS_FORK: RefCell<Option<AcrossFork>> = const { RefCell::new(None) };
}

/// Installs the `fork` handlers, once per process. Called before the registry is locked:
/// the C library's own lock over its handlers may be held by a thread running them.
pub(crate) fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: the three handlers are functions of this library, which a preloaded shim
        // never unloads (and glibc drops the handlers of a library that is unloaded).
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        if rc != 0 {
            log::warn!(
                "cannot install the fork handlers (pthread_atfork: {}): a forked child will \
                 share registered memory with its parent; call ibv_fork_init to keep it out \
                 of children",
                std::io::Error::from_raw_os_error(rc)
            );
        }
    });
}

/// Before `fork`, in the parent.
extern "C" fn prepare() {
    let registry = registry::lock();
    let copied = registry.holds_moved_memory().then(pipe).flatten();
    let mut across = Some(AcrossFork { registry, copied });
    let _ = ACROSS_FORK.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            if slot.is_none() {
                *slot = across.take();
            }
        }
    });
    // Nowhere to keep it (the thread is exiting): let go.
    release(across);
}

/// After `fork`, in the parent (also when `fork` failed).
extern "C" fn parent() {
    let Some(across) = take() else {
        return;
    };
    if let Some((read_end, write_end)) = across.copied {
        close(write_end);
        let mut byte = 0u8;
        loop {
            // SAFETY: reads at most one byte into `byte`, from the pipe made in `prepare`.
            let n = unsafe { libc::read(read_end, std::ptr::addr_of_mut!(byte).cast(), 1) };
            let interrupted =
                n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if !interrupted {
                break;
            }
        }
        close(read_end);
    }
    drop(across.registry);
}

/// After `fork`, in the child: nothing here allocates until the registry forgets its pieces
/// (see [`Registry::forget_in_child`]), and nothing takes a lock.
extern "C" fn child() {
    let Some(mut across) = take() else {
        return;
    };
    if let Some((read_end, _)) = across.copied {
        close(read_end);
    }
    across.registry.forget_in_child();
    let copied = across.copied;
    drop(across.registry);
    if let Some((_, write_end)) = copied {
        close(write_end);
    }
}

/// What `prepare` kept for this thread.
fn take() -> Option<AcrossFork> {
    ACROSS_FORK
        .try_with(|slot| slot.try_borrow_mut().ok().and_then(|mut s| s.take()))
        .ok()
        .flatten()
}

/// Lets go of what `prepare` could not keep.
fn release(across: Option<AcrossFork>) {
    if let Some(across) = across {
        if let Some((read_end, write_end)) = across.copied {
            close(read_end);
            close(write_end);
        }
    }
}

/// A pipe (`O_CLOEXEC`): read end, write end.
fn pipe() -> Option<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    (unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0).then_some((fds[0], fds[1]))
}

fn close(fd: RawFd) {
    // SAFETY: closes one end of the pipe made in `prepare`, once, in this process.
    unsafe { libc::close(fd) };
}
