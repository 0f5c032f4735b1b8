//! Shared receive queues: create, modify (the limit), query, destroy, and the data path's
//! `post_srq_recv`.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};

use vrdma::{SrqAttr, SrqAttrMask};

use crate::abi::*;
use crate::context::{Context, Rank};
use crate::qp::{post_each, post_one_recv};
use crate::resources::Pd;
use crate::{errno_of, guard, null_with};

/// Everything behind an `ibv_srq *`.
#[repr(C)]
pub(crate) struct Srq {
    /// First, so an `ibv_srq *` is an `Srq *`.
    pub(crate) ibv: ibv_srq,
    pub(crate) srq: vrdma::SharedReceiveQueue,
    /// QPs attached: destroying it fails with EBUSY until they are gone, as in verbs.
    pub(crate) users: AtomicU32,
}

fn to_c(a: &SrqAttr) -> ibv_srq_attr {
    ibv_srq_attr {
        max_wr: a.max_wr,
        max_sge: a.max_sge,
        srq_limit: a.srq_limit,
    }
}

/// `ibv_create_srq`: the actual sizes are written back to `srq_init_attr->attr`.
///
/// # Safety
///
/// `pd` must be a live PD and `srq_init_attr` valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_create_srq(
    pd: *mut ibv_pd,
    srq_init_attr: *mut ibv_srq_init_attr,
) -> *mut ibv_srq {
    guard(
        "ibv_create_srq",
        || null_with(libc::EIO),
        || {
            // SAFETY: the caller's contract.
            let Some((p, ctx)) = (unsafe { Pd::from_ptr(pd) }) else {
                return null_with(libc::EINVAL);
            };
            if srq_init_attr.is_null() {
                return null_with(libc::EINVAL);
            }
            // SAFETY: valid (the caller's contract).
            let init = unsafe { &mut *srq_init_attr };
            let attr = SrqAttr {
                max_wr: init.attr.max_wr.max(1),
                max_sge: init.attr.max_sge.max(1),
                srq_limit: init.attr.srq_limit,
            };
            let vsrq = match vrdma::SharedReceiveQueue::new(&p.pd, &attr) {
                Ok(s) => s,
                Err(e) => return null_with(errno_of(&e)),
            };
            if let Ok(actual) = vsrq.query() {
                init.attr.max_wr = actual.max_wr;
                init.attr.max_sge = actual.max_sge;
            }
            let srqn = vsrq.srq_num();
            let srq = Box::new(Srq {
                ibv: ibv_srq {
                    context: ctx.as_ptr(),
                    srq_context: init.srq_context,
                    pd,
                    handle: srqn,
                    // SAFETY: all-zero is the static initialiser of both on glibc.
                    mutex: unsafe { std::mem::zeroed() },
                    // SAFETY: as above.
                    cond: unsafe { std::mem::zeroed() },
                    events_completed: 0,
                },
                srq: vsrq,
                users: AtomicU32::new(0),
            });
            // SAFETY: a live PD (checked above).
            unsafe { Pd::retain(pd) };
            let ptr = Box::into_raw(srq);
            ctx.register_srq(srqn, ptr as usize);
            ctx.adopt(ptr.cast(), Rank::Srq, free_srq);
            ptr.cast::<ibv_srq>()
        },
    )
}

/// # Safety
///
/// A non-NULL `srq` must be a live SRQ of this shim.
unsafe fn srq_of<'a>(srq: *mut ibv_srq) -> Option<&'a Srq> {
    // SAFETY: the caller's contract.
    (!srq.is_null()).then(|| unsafe { &*srq.cast::<Srq>() })
}

/// `ibv_modify_srq`: arms the limit (`IBV_SRQ_LIMIT`); resizing (`IBV_SRQ_MAX_WR`) is
/// refused, as the device does not advertise IBV_DEVICE_SRQ_RESIZE.
///
/// # Safety
///
/// `srq` must be a live SRQ and `attr` readable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_modify_srq(
    srq: *mut ibv_srq,
    attr: *mut ibv_srq_attr,
    mask: c_int,
) -> c_int {
    guard(
        "ibv_modify_srq",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(s) = (unsafe { srq_of(srq) }) else {
                return libc::EINVAL;
            };
            if attr.is_null() {
                return libc::EINVAL;
            }
            let Some(mask) = SrqAttrMask::from_bits(mask as u32) else {
                return libc::EINVAL;
            };
            // SAFETY: readable (the caller's contract).
            let a = unsafe { &*attr };
            let attr = SrqAttr {
                max_wr: a.max_wr,
                max_sge: a.max_sge,
                srq_limit: a.srq_limit,
            };
            match s.srq.modify(&attr, mask) {
                Ok(()) => 0,
                Err(e) => errno_of(&e),
            }
        },
    )
}

/// `ibv_query_srq`.
///
/// # Safety
///
/// `srq` must be a live SRQ and `attr` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_srq(srq: *mut ibv_srq, attr: *mut ibv_srq_attr) -> c_int {
    guard(
        "ibv_query_srq",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(s) = (unsafe { srq_of(srq) }) else {
                return libc::EINVAL;
            };
            if attr.is_null() {
                return libc::EINVAL;
            }
            match s.srq.query() {
                Ok(a) => {
                    // SAFETY: writable (the caller's contract).
                    unsafe { attr.write(to_c(&a)) };
                    0
                }
                Err(e) => errno_of(&e),
            }
        },
    )
}

/// Frees an SRQ.
///
/// # Safety
///
/// `srq` must be a live SRQ, not used afterwards.
unsafe fn free_srq(srq: *mut c_void) {
    // SAFETY: made by Box::into_raw in ibv_create_srq (the caller's contract); an SRQ's
    // context and PD outlive it.
    unsafe {
        let srq = Box::from_raw(srq.cast::<Srq>());
        if let Some(ctx) = Context::from_ptr(srq.ibv.context) {
            ctx.unregister_srq(srq.ibv.handle);
        }
        Pd::release(srq.ibv.pd);
        drop(srq);
    }
}

/// `ibv_destroy_srq`: EBUSY while QPs are attached.
///
/// # Safety
///
/// `srq` must be a live SRQ, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_destroy_srq(srq: *mut ibv_srq) -> c_int {
    guard(
        "ibv_destroy_srq",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(s) = (unsafe { srq_of(srq) }) else {
                return libc::EINVAL;
            };
            // SAFETY: an SRQ's context outlives it.
            if unsafe { Context::foreign(s.ibv.context) } {
                return libc::EIO;
            }
            if s.users.load(Ordering::Acquire) != 0 {
                return libc::EBUSY;
            }
            // SAFETY: an SRQ's context outlives it.
            if let Some(ctx) = unsafe { Context::from_ptr(s.ibv.context) } {
                ctx.disown(srq.cast());
            }
            // SAFETY: a live SRQ the caller gives up.
            unsafe { free_srq(srq.cast()) };
            0
        },
    )
}

/// `ibv_get_srq_num`: vrdma has no XRC, but the SRQ's number is still its handle.
///
/// # Safety
///
/// `srq` must be a live SRQ and `srq_num` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_get_srq_num(srq: *mut ibv_srq, srq_num: *mut u32) -> c_int {
    // SAFETY: the caller's contract.
    match unsafe { srq_of(srq) } {
        Some(s) if !srq_num.is_null() => {
            // SAFETY: writable (the caller's contract).
            unsafe { srq_num.write(s.srq.srq_num()) };
            0
        }
        _ => libc::EINVAL,
    }
}

/// `ibv_context_ops.post_srq_recv`.
///
/// # Safety
///
/// `srq` must be a live SRQ and `wr` a valid list whose memory stays valid until each
/// receive completes.
pub(crate) unsafe extern "C" fn post_srq_recv(
    srq: *mut ibv_srq,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    guard(
        "ibv_post_srq_recv",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(s) = (unsafe { srq_of(srq) }) else {
                return libc::EINVAL;
            };
            // SAFETY: the caller's contract, passed on.
            unsafe { post_each(wr, bad_wr, |w| post_one_recv(w, |v| s.srq.post_recv(v))) }
        },
    )
}
