//! Completion queues: create, destroy, and the data path's `poll_cq` and `req_notify_cq`.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};

use vrdma::WorkCompletion;
use vrdma::pacing;

use crate::abi::*;
use crate::context::{Channel, Context, Rank};
use crate::{errno_of, guard, identity, null_with};

/// Everything behind an `ibv_cq *`.
#[repr(C)]
pub(crate) struct Cq {
    /// First, so an `ibv_cq *` is a `Cq *`.
    pub(crate) ibv: ibv_cq,
    pub(crate) cq: vrdma::CompletionQueue,
    /// QPs using it: destroying it fails with EBUSY until they are gone, as in verbs.
    pub(crate) users: AtomicU32,
    /// Polls in a row that found nothing, to pace the poller's yields ([`after_poll`]).
    empty_polls: AtomicU32,
}

/// Completions converted per call of the vrdma poll: a stack array, so polling allocates
/// nothing.
const POLL_BATCH: usize = 16;

/// The count of empty polls in a row after a poll that took `got` completions, the count
/// before it being `empty`, and whether the poller should now yield its CPU: verbs programs
/// (perftest, qperf) wait for a completion by calling `ibv_poll_cq` in a loop that never
/// yields, so the shim paces them as [`vrdma::pacing`] says.
fn after_poll(empty: u32, got: usize) -> (u32, bool) {
    if got > 0 {
        return (0, false);
    }
    let yields = pacing::yields_after(empty);
    // Wrapping back into the spin after 2^32 empty polls is harmless.
    (empty.wrapping_add(1), yields)
}

fn to_c(wc: &WorkCompletion) -> ibv_wc {
    let mut flags = 0;
    if wc.grh {
        flags |= IBV_WC_GRH;
    }
    if wc.imm_data.is_some() {
        flags |= IBV_WC_WITH_IMM;
    }
    ibv_wc {
        wr_id: wc.wr_id,
        status: c_int::from(wc.status.raw()),
        opcode: c_int::from(wc.opcode.raw()),
        vendor_err: wc.vendor_err,
        byte_len: wc.byte_len,
        imm_data: wc.imm_data.map_or(0, u32::to_be),
        qp_num: wc.qp_num,
        src_qp: wc.src_qp,
        wc_flags: flags,
        pkey_index: 0,
        slid: if wc.grh {
            identity::lid_of(&wc.sgid)
        } else {
            0
        },
        sl: 0,
        dlid_path_bits: 0,
    }
}

/// `ibv_context_ops.poll_cq`.
///
/// # Safety
///
/// `cq` must be a live CQ and `wc` valid for writing `num_entries` completions.
pub(crate) unsafe extern "C" fn poll_cq(
    cq: *mut ibv_cq,
    num_entries: c_int,
    wc: *mut ibv_wc,
) -> c_int {
    guard(
        "ibv_poll_cq",
        || -1,
        || {
            if cq.is_null() || num_entries < 0 || (wc.is_null() && num_entries > 0) {
                return -1;
            }
            // SAFETY: the caller's contract: a live CQ of this shim.
            let cq = unsafe { &*cq.cast::<Cq>() };
            let wanted = num_entries as usize;
            // One completion first: most polls of a program spinning on its CQ find nothing,
            // and then initialise no batch (16 blank completions, 1 KiB of stores, were half
            // the time of an empty poll: 35 -> 18 ns).
            let mut one = [WorkCompletion::default()];
            let mut done = match cq.cq.poll(&mut one[..wanted.min(1)]) {
                Ok(got) => {
                    if got == 1 {
                        // SAFETY: num_entries >= 1, so the caller's array has this entry.
                        unsafe { wc.write(to_c(&one[0])) };
                    }
                    got
                }
                Err(e) => {
                    log::warn!("{}", vrdma::error_chain(&e));
                    return -1;
                }
            };
            if done == 1 && wanted > 1 {
                let mut batch = [WorkCompletion::default(); POLL_BATCH];
                while done < wanted {
                    let n = (wanted - done).min(POLL_BATCH);
                    match cq.cq.poll(&mut batch[..n]) {
                        Ok(got) => {
                            for (i, c) in batch[..got].iter().enumerate() {
                                // SAFETY: done + i < num_entries, within the caller's array.
                                unsafe { wc.add(done + i).write(to_c(c)) };
                            }
                            done += got;
                            if got < n {
                                break;
                            }
                        }
                        Err(e) => {
                            // The completions taken so far are the caller's now.
                            log::warn!("{}", vrdma::error_chain(&e));
                            break;
                        }
                    }
                }
            }
            // Relaxed: the count only paces yields; threads polling one CQ at once may lose
            // an increment, which only delays a yield.
            let empty = cq.empty_polls.load(Ordering::Relaxed);
            let (next, yields) = after_poll(empty, done);
            if next != empty {
                cq.empty_polls.store(next, Ordering::Relaxed);
            }
            if yields {
                std::thread::yield_now();
            }
            done as c_int
        },
    )
}

/// `ibv_context_ops.req_notify_cq`.
///
/// # Safety
///
/// `cq` must be a live CQ.
pub(crate) unsafe extern "C" fn req_notify_cq(cq: *mut ibv_cq, solicited_only: c_int) -> c_int {
    guard(
        "ibv_req_notify_cq",
        || libc::EIO,
        || {
            if cq.is_null() {
                return libc::EINVAL;
            }
            // SAFETY: the caller's contract.
            let cq = unsafe { &*cq.cast::<Cq>() };
            match cq.cq.req_notify(solicited_only != 0) {
                Ok(()) => 0,
                Err(e) => e.errno(),
            }
        },
    )
}

/// `ibv_create_cq`.
///
/// # Safety
///
/// `context` must be open; `channel` NULL or a live channel of it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_create_cq(
    context: *mut ibv_context,
    cqe: c_int,
    cq_context: *mut c_void,
    channel: *mut ibv_comp_channel,
    comp_vector: c_int,
) -> *mut ibv_cq {
    guard(
        "ibv_create_cq",
        || null_with(libc::EIO),
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return null_with(libc::EINVAL);
            };
            if cqe < 1 || comp_vector < 0 || comp_vector >= ctx.ibv.num_comp_vectors {
                return null_with(libc::EINVAL);
            }
            if !channel.is_null() {
                // SAFETY: a live channel (the caller's contract).
                let ch = unsafe { &*channel.cast::<Channel>() };
                if ch.ibv.context != context {
                    return null_with(libc::EINVAL);
                }
            }
            let vcq = match vrdma::CompletionQueue::new(&ctx.vrdma, cqe as u32) {
                Ok(cq) => cq,
                Err(e) => return null_with(errno_of(&e)),
            };
            let cqn = vcq.handle();
            let cq = Box::new(Cq {
                ibv: ibv_cq {
                    context,
                    channel,
                    cq_context,
                    handle: cqn,
                    cqe: vcq.depth().min(i32::MAX as u32) as c_int,
                    // SAFETY: all-zero is the static initialiser of both on glibc.
                    mutex: unsafe { std::mem::zeroed() },
                    // SAFETY: as above.
                    cond: unsafe { std::mem::zeroed() },
                    comp_events_completed: 0,
                    async_events_completed: 0,
                },
                cq: vcq,
                users: AtomicU32::new(0),
                empty_polls: AtomicU32::new(0),
            });
            let ptr = Box::into_raw(cq);
            ctx.register_cq(
                cqn,
                ptr as usize,
                (!channel.is_null()).then_some(channel as usize),
            );
            ctx.adopt(ptr.cast(), Rank::Cq, free_cq);
            ptr.cast::<ibv_cq>()
        },
    )
}

/// Frees a CQ.
///
/// # Safety
///
/// `cq` must be a live CQ, not used afterwards.
unsafe fn free_cq(cq: *mut c_void) {
    // SAFETY: made by Box::into_raw in ibv_create_cq (the caller's contract); a CQ's context
    // outlives it.
    unsafe {
        let cq = Box::from_raw(cq.cast::<Cq>());
        if let Some(ctx) = Context::from_ptr(cq.ibv.context) {
            ctx.unregister_cq(cq.ibv.handle);
        }
        drop(cq);
    }
}

/// `ibv_destroy_cq`: EBUSY while QPs use it.
///
/// # Safety
///
/// `cq` must be a live CQ, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_destroy_cq(cq: *mut ibv_cq) -> c_int {
    guard(
        "ibv_destroy_cq",
        || libc::EIO,
        || {
            if cq.is_null() {
                return libc::EINVAL;
            }
            // SAFETY: the caller's contract: a live CQ, whose context outlives it.
            let (c, ctx) = unsafe {
                let c = &*cq.cast::<Cq>();
                (c, Context::from_ptr(c.ibv.context))
            };
            let Some(ctx) = ctx else {
                return libc::EINVAL;
            };
            if c.users.load(Ordering::Acquire) != 0 {
                return libc::EBUSY;
            }
            ctx.disown(cq.cast());
            // SAFETY: a live CQ the caller gives up.
            unsafe { free_cq(cq.cast()) };
            0
        },
    )
}

/// `ibv_resize_cq`: vrdma CQs cannot be resized (EOPNOTSUPP, as for a provider without
/// the verb); the device does not advertise IBV_DEVICE_RESIZE_MAX_WR.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_resize_cq(_cq: *mut ibv_cq, _cqe: c_int) -> c_int {
    libc::EOPNOTSUPP
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poller_yields_as_vrdma_paces_and_a_completion_starts_the_spin_again() {
        let mut empty = 0;
        for _ in 0..pacing::SPIN_POLLS + pacing::YIELD_EVERY + 1 {
            let (next, y) = after_poll(empty, 0);
            assert_eq!(next, empty + 1);
            assert_eq!(y, pacing::yields_after(empty));
            empty = next;
        }
        assert_eq!(
            after_poll(empty, 3),
            (0, false),
            "a completion starts the spin again"
        );
        assert_eq!(
            after_poll(u32::MAX, 0).0,
            0,
            "the count wraps, never overflows"
        );
    }
}
