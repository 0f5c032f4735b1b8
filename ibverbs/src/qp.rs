//! Queue pairs: create, modify, query, destroy, and the data path's `post_send` and
//! `post_recv`.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::Ordering;

use vrdma::{
    QpAttr, QpAttrMask, QpCap, QpInitAttr, QpState, QpType, RecvWr, SendFlags, SendWr, Sge,
    WrOpcode,
};
use vrdma_proto::config::Mtu;
use vrdma_proto::mr::Access;

use crate::abi::*;
use crate::context::{Context, Rank};
use crate::cq::Cq;
use crate::resources::{Ah, Pd, ah_attr, ah_attr_to_c};
use crate::srq::Srq;
use crate::{errno_of, guard, null_with};

/// Everything behind an `ibv_qp *`.
#[repr(C)]
pub(crate) struct Qp {
    /// First, so an `ibv_qp *` is a `Qp *`.
    pub(crate) ibv: ibv_qp,
    qp: vrdma::QueuePair,
    sq_sig_all: bool,
}

// ibv_sge and vrdma's wire SGE are the same 16 bytes on a little-endian machine, so the
// program's SGE arrays are used in place.
const _: () = assert!(size_of::<Sge>() == size_of::<ibv_sge>());
#[cfg(not(target_endian = "little"))]
compile_error!("the shim reads ibv_sge arrays as vrdma SGEs, which needs a little-endian target");

/// The program's SGE array as vrdma SGEs.
///
/// # Safety
///
/// `sg_list` must point at `num_sge` readable SGEs (when `num_sge` > 0) that stay unchanged
/// for `'a`.
pub(crate) unsafe fn sges<'a>(sg_list: *const ibv_sge, num_sge: c_int) -> Result<&'a [Sge], c_int> {
    match num_sge {
        0 => Ok(&[]),
        n if n < 0 || sg_list.is_null() => Err(libc::EINVAL),
        // SAFETY: the caller's contract; Sge is 16 bytes of unaligned little-endian fields,
        // the same layout as ibv_sge (checked above), so any bytes are a valid Sge.
        n => Ok(unsafe { std::slice::from_raw_parts(sg_list.cast::<Sge>(), n as usize) }),
    }
}

impl Qp {
    /// # Safety
    ///
    /// `qp` must be a live QP of this shim.
    unsafe fn from_ptr<'a>(qp: *mut ibv_qp) -> Option<&'a Qp> {
        // SAFETY: the caller's contract.
        (!qp.is_null()).then(|| unsafe { &*qp.cast::<Qp>() })
    }

    /// One program work request as vrdma's.
    ///
    /// # Safety
    ///
    /// `wr` must be a valid work request whose SGEs (and, for UD, AH) stay valid for `'a`.
    unsafe fn send_wr<'a>(&self, wr: &'a ibv_send_wr) -> Result<SendWr<'a>, c_int> {
        let opcode = u8::try_from(wr.opcode)
            .ok()
            .and_then(|o| WrOpcode::from_raw(o).ok())
            .ok_or(libc::EINVAL)?;
        let mut flags = u8::try_from(wr.send_flags)
            .ok()
            .and_then(SendFlags::from_bits)
            .ok_or(libc::EINVAL)?;
        if self.sq_sig_all {
            flags |= SendFlags::SIGNALED;
        }
        // SAFETY: the caller's contract.
        let sg_list = unsafe { sges(wr.sg_list, wr.num_sge)? };
        let mut out = SendWr {
            wr_id: wr.wr_id,
            opcode,
            flags,
            sg_list,
            imm_data: u32::from_be(wr.imm_data),
            remote_addr: 0,
            rkey: 0,
            compare_add: 0,
            swap: 0,
            ah: None,
            remote_qpn: 0,
            remote_qkey: 0,
        };
        if self.qp.qp_type() == QpType::Ud {
            // SAFETY: for a UD QP the `ud` member is the one the program filled.
            let ud = unsafe { wr.wr.ud };
            if ud.ah.is_null() {
                return Err(libc::EINVAL);
            }
            // SAFETY: a live AH of this shim (the caller's contract).
            out.ah = Some(unsafe { &(*ud.ah.cast::<Ah>()).ah });
            out.remote_qpn = ud.remote_qpn;
            out.remote_qkey = ud.remote_qkey;
            return Ok(out);
        }
        match opcode {
            WrOpcode::RdmaWrite | WrOpcode::RdmaWriteWithImm | WrOpcode::RdmaRead => {
                // SAFETY: for RDMA opcodes the `rdma` member is the one the program filled.
                let rdma = unsafe { wr.wr.rdma };
                out.remote_addr = rdma.remote_addr;
                out.rkey = rdma.rkey;
            }
            WrOpcode::AtomicCmpAndSwp | WrOpcode::AtomicFetchAndAdd => {
                // SAFETY: for atomics the `atomic` member is the one the program filled.
                let atomic = unsafe { wr.wr.atomic };
                out.remote_addr = atomic.remote_addr;
                out.rkey = atomic.rkey;
                out.compare_add = atomic.compare_add;
                out.swap = atomic.swap;
            }
            WrOpcode::Send | WrOpcode::SendWithImm => {}
        }
        Ok(out)
    }
}

/// A work request in a program's singly linked list.
pub(crate) trait Linked {
    fn next(&self) -> *mut Self;
}

impl Linked for ibv_send_wr {
    fn next(&self) -> *mut Self {
        self.next
    }
}

impl Linked for ibv_recv_wr {
    fn next(&self) -> *mut Self {
        self.next
    }
}

/// Posts a program's list in order with `post`, one request at a time; on the first failure
/// `bad_wr` names that request (the ones before it are posted) and its errno is returned.
///
/// # Safety
///
/// `first` must start a valid list and `bad_wr` be NULL or writable.
pub(crate) unsafe fn post_each<W: Linked>(
    first: *mut W,
    bad_wr: *mut *mut W,
    mut post: impl FnMut(&W) -> Result<(), c_int>,
) -> c_int {
    let mut at = first;
    while !at.is_null() {
        // SAFETY: a valid list (the caller's contract).
        let w = unsafe { &*at };
        if let Err(errno) = post(w) {
            if !bad_wr.is_null() {
                // SAFETY: writable (the caller's contract).
                unsafe { *bad_wr = at };
            }
            return errno;
        }
        at = w.next();
    }
    0
}

/// Posts one program receive request with `post` (a QP's or an SRQ's).
///
/// # Safety
///
/// The request's SGEs must be valid, and its memory until the receive completes.
pub(crate) unsafe fn post_one_recv(
    w: &ibv_recv_wr,
    post: impl FnOnce(&[RecvWr<'_>]) -> vrdma::Result<()>,
) -> Result<(), c_int> {
    // SAFETY: the caller's contract.
    let sg_list = unsafe { sges(w.sg_list, w.num_sge)? };
    post(&[RecvWr {
        wr_id: w.wr_id,
        sg_list,
    }])
    .map_err(|e| {
        log::debug!("{}", vrdma::error_chain(&e));
        e.errno()
    })
}

/// `ibv_context_ops.post_send`: posts the list in order; on failure `bad_wr` is the first
/// request not posted, and the ones before it are posted.
///
/// # Safety
///
/// `qp` must be a live QP and `wr` a valid list, each request's memory valid until its
/// completion (verbs' contract).
pub(crate) unsafe extern "C" fn post_send(
    qp: *mut ibv_qp,
    wr: *mut ibv_send_wr,
    bad_wr: *mut *mut ibv_send_wr,
) -> c_int {
    guard(
        "ibv_post_send",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(q) = (unsafe { Qp::from_ptr(qp) }) else {
                return libc::EINVAL;
            };
            // SAFETY: the caller's contract, passed on.
            unsafe {
                post_each(wr, bad_wr, |w| {
                    let v = q.send_wr(w)?;
                    q.qp.post_send(&[v]).map_err(|e| {
                        log::debug!("{}", vrdma::error_chain(&e));
                        e.errno()
                    })
                })
            }
        },
    )
}

/// `ibv_context_ops.post_recv`.
///
/// # Safety
///
/// As [`post_send`].
pub(crate) unsafe extern "C" fn post_recv(
    qp: *mut ibv_qp,
    wr: *mut ibv_recv_wr,
    bad_wr: *mut *mut ibv_recv_wr,
) -> c_int {
    guard(
        "ibv_post_recv",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(q) = (unsafe { Qp::from_ptr(qp) }) else {
                return libc::EINVAL;
            };
            // SAFETY: the caller's contract, passed on.
            unsafe { post_each(wr, bad_wr, |w| post_one_recv(w, |v| q.qp.post_recv(v))) }
        },
    )
}

/// `ibv_create_qp`: RC and UD QPs. The actual queue sizes are written back to
/// `init_attr->cap`, as libibverbs does.
///
/// # Safety
///
/// `pd` must be a live PD and `init_attr` valid, naming live CQs of the same context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_create_qp(
    pd: *mut ibv_pd,
    init_attr: *mut ibv_qp_init_attr,
) -> *mut ibv_qp {
    guard(
        "ibv_create_qp",
        || null_with(libc::EIO),
        || {
            // SAFETY: the caller's contract.
            let Some((p, ctx)) = (unsafe { Pd::from_ptr(pd) }) else {
                return null_with(libc::EINVAL);
            };
            if init_attr.is_null() {
                return null_with(libc::EINVAL);
            }
            // SAFETY: valid (the caller's contract).
            let init = unsafe { &mut *init_attr };
            let qp_type = match init.qp_type {
                IBV_QPT_RC => QpType::Rc,
                IBV_QPT_UD => QpType::Ud,
                other => {
                    log::warn!(
                        "ibv_create_qp: QP type {other} is not supported by vrdma (RC and UD are)"
                    );
                    return null_with(libc::EOPNOTSUPP);
                }
            };
            // SAFETY: NULL or a live SRQ of this shim (the caller's contract).
            let srq = (!init.srq.is_null()).then(|| unsafe { &*init.srq.cast::<Srq>() });
            if init.send_cq.is_null() || init.recv_cq.is_null() {
                return null_with(libc::EINVAL);
            }
            // SAFETY: live CQs of this shim (the caller's contract).
            let (send_cq, recv_cq) =
                unsafe { (&*init.send_cq.cast::<Cq>(), &*init.recv_cq.cast::<Cq>()) };
            let cap = QpCap {
                max_send_wr: init.cap.max_send_wr.max(1),
                max_recv_wr: init.cap.max_recv_wr.max(1),
                max_send_sge: init.cap.max_send_sge.max(1),
                max_recv_sge: init.cap.max_recv_sge.max(1),
                max_inline_data: init.cap.max_inline_data,
            };
            let attr = QpInitAttr {
                send_cq: &send_cq.cq,
                recv_cq: &recv_cq.cq,
                srq: srq.map(|s| &s.srq),
                cap,
                qp_type,
                sq_sig_all: init.sq_sig_all != 0,
            };
            let vqp = match vrdma::QueuePair::new(&p.pd, &attr) {
                Ok(q) => q,
                Err(e) => return null_with(errno_of(&e)),
            };
            let actual = vqp.cap();
            init.cap = ibv_qp_cap {
                max_send_wr: actual.max_send_wr,
                max_recv_wr: actual.max_recv_wr,
                max_send_sge: actual.max_send_sge,
                max_recv_sge: actual.max_recv_sge,
                max_inline_data: actual.max_inline_data,
            };
            send_cq.users.fetch_add(1, Ordering::AcqRel);
            recv_cq.users.fetch_add(1, Ordering::AcqRel);
            if let Some(srq) = srq {
                srq.users.fetch_add(1, Ordering::AcqRel);
            }
            // SAFETY: a live PD (checked above).
            unsafe { Pd::retain(pd) };
            let qpn = vqp.qp_num();
            let qp = Box::new(Qp {
                ibv: ibv_qp {
                    context: ctx.as_ptr(),
                    qp_context: init.qp_context,
                    pd,
                    send_cq: init.send_cq,
                    recv_cq: init.recv_cq,
                    srq: init.srq,
                    handle: qpn,
                    qp_num: qpn,
                    state: c_int::from(QpState::Reset.raw()),
                    qp_type: init.qp_type,
                    // SAFETY: all-zero is the static initialiser of both on glibc.
                    mutex: unsafe { std::mem::zeroed() },
                    // SAFETY: as above.
                    cond: unsafe { std::mem::zeroed() },
                    events_completed: 0,
                },
                qp: vqp,
                sq_sig_all: init.sq_sig_all != 0,
            });
            let ptr = Box::into_raw(qp);
            ctx.register_qp(qpn, ptr as usize);
            ctx.adopt(ptr.cast(), Rank::Qp, free_qp);
            ptr.cast::<ibv_qp>()
        },
    )
}

/// vrdma's attributes and mask for a program's `ibv_modify_qp`.
fn qp_attr(ctx: &Context, a: &ibv_qp_attr, mask: c_int) -> Result<(QpAttr, QpAttrMask), c_int> {
    let Some(mask) = QpAttrMask::from_bits(mask as u32) else {
        log::warn!(
            "ibv_modify_qp: attribute mask {mask:#x} has bits vrdma does not know (rate limits \
             are not supported)"
        );
        return Err(libc::EINVAL);
    };
    let state = |s: c_int| {
        u8::try_from(s)
            .ok()
            .and_then(|s| QpState::from_raw(s).ok())
            .ok_or(libc::EINVAL)
    };
    let mut out = QpAttr::default();
    if mask.contains(QpAttrMask::STATE) {
        out.qp_state = state(a.qp_state)?;
    }
    if mask.contains(QpAttrMask::CUR_STATE) {
        out.cur_qp_state = state(a.cur_qp_state)?;
    }
    if mask.contains(QpAttrMask::PATH_MTU) {
        out.path_mtu = u8::try_from(a.path_mtu)
            .ok()
            .and_then(|m| Mtu::from_raw(m).ok())
            .ok_or(libc::EINVAL)?;
    }
    if mask.contains(QpAttrMask::ACCESS_FLAGS) {
        out.qp_access_flags = Access::from_bits(a.qp_access_flags).ok_or(libc::EINVAL)?;
    }
    if mask.contains(QpAttrMask::AV) {
        out.ah_attr = ah_attr(ctx, &a.ah_attr, "ibv_modify_qp")?;
    }
    out.qkey = a.qkey;
    out.rq_psn = a.rq_psn;
    out.sq_psn = a.sq_psn;
    out.dest_qp_num = a.dest_qp_num;
    out.pkey_index = a.pkey_index;
    out.port_num = a.port_num;
    out.timeout = a.timeout;
    out.retry_cnt = a.retry_cnt;
    out.rnr_retry = a.rnr_retry;
    out.min_rnr_timer = a.min_rnr_timer;
    out.max_rd_atomic = a.max_rd_atomic;
    out.max_dest_rd_atomic = a.max_dest_rd_atomic;
    out.en_sqd_async_notify = a.en_sqd_async_notify != 0;
    Ok((out, mask))
}

/// `ibv_modify_qp`.
///
/// # Safety
///
/// `qp` must be a live QP and `attr` readable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_modify_qp(
    qp: *mut ibv_qp,
    attr: *mut ibv_qp_attr,
    attr_mask: c_int,
) -> c_int {
    guard(
        "ibv_modify_qp",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(q) = (unsafe { Qp::from_ptr(qp) }) else {
                return libc::EINVAL;
            };
            // SAFETY: a QP's context outlives it.
            let Some(ctx) = (unsafe { Context::from_ptr(q.ibv.context) }) else {
                return libc::EINVAL;
            };
            if attr.is_null() {
                return libc::EINVAL;
            }
            // SAFETY: readable (the caller's contract).
            let (a, mask) = match qp_attr(ctx, unsafe { &*attr }, attr_mask) {
                Ok(v) => v,
                Err(errno) => return errno,
            };
            match q.qp.modify(&a, mask) {
                Ok(()) => {
                    if mask.contains(QpAttrMask::STATE) {
                        // As libibverbs: the program may read qp->state.
                        // SAFETY: a live QP; programs do not write it concurrently with modify.
                        unsafe { (*qp).state = c_int::from(a.qp_state.raw()) };
                    }
                    0
                }
                Err(e) => errno_of(&e),
            }
        },
    )
}

/// `ibv_query_qp`: fills every attribute whatever the mask.
///
/// # Safety
///
/// `qp` must be a live QP; `attr` and `init_attr` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_qp(
    qp: *mut ibv_qp,
    attr: *mut ibv_qp_attr,
    _attr_mask: c_int,
    init_attr: *mut ibv_qp_init_attr,
) -> c_int {
    guard(
        "ibv_query_qp",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(q) = (unsafe { Qp::from_ptr(qp) }) else {
                return libc::EINVAL;
            };
            if attr.is_null() || init_attr.is_null() {
                return libc::EINVAL;
            }
            let (a, cap) = match q.qp.query() {
                Ok(v) => v,
                Err(e) => return errno_of(&e),
            };
            let c_cap = ibv_qp_cap {
                max_send_wr: cap.max_send_wr,
                max_recv_wr: cap.max_recv_wr,
                max_send_sge: cap.max_send_sge,
                max_recv_sge: cap.max_recv_sge,
                max_inline_data: cap.max_inline_data,
            };
            let out = ibv_qp_attr {
                qp_state: c_int::from(a.qp_state.raw()),
                cur_qp_state: c_int::from(a.qp_state.raw()),
                path_mtu: c_int::from(a.path_mtu.raw()),
                path_mig_state: 2, // IBV_MIG_MIGRATED: no alternate path
                qkey: a.qkey,
                rq_psn: a.rq_psn,
                sq_psn: a.sq_psn,
                dest_qp_num: a.dest_qp_num,
                qp_access_flags: a.qp_access_flags.bits() as c_uint,
                cap: c_cap,
                ah_attr: ah_attr_to_c(&a.ah_attr),
                alt_ah_attr: ibv_ah_attr::default(),
                pkey_index: a.pkey_index,
                alt_pkey_index: 0,
                en_sqd_async_notify: u8::from(a.en_sqd_async_notify),
                sq_draining: 0,
                max_rd_atomic: a.max_rd_atomic,
                max_dest_rd_atomic: a.max_dest_rd_atomic,
                min_rnr_timer: a.min_rnr_timer,
                port_num: a.port_num,
                timeout: a.timeout,
                retry_cnt: a.retry_cnt,
                rnr_retry: a.rnr_retry,
                alt_port_num: 0,
                alt_timeout: 0,
                rate_limit: 0,
            };
            // SAFETY: writable (the caller's contract); `qp` is live. As libibverbs, the
            // query refreshes `qp->state` (the QP may have moved to ERR on its own).
            unsafe {
                attr.write(out);
                (*qp).state = out.qp_state;
                let init = &mut *init_attr;
                init.qp_context = (*qp).qp_context;
                init.send_cq = (*qp).send_cq;
                init.recv_cq = (*qp).recv_cq;
                init.srq = (*qp).srq;
                init.cap = c_cap;
                init.qp_type = (*qp).qp_type;
                init.sq_sig_all = c_int::from(q.sq_sig_all);
            }
            0
        },
    )
}

/// Frees a QP.
///
/// # Safety
///
/// `qp` must be a live QP, not used afterwards.
unsafe fn free_qp(qp: *mut c_void) {
    // SAFETY: made by Box::into_raw in ibv_create_qp (the caller's contract); a QP's context,
    // PD, CQs and SRQ outlive it.
    unsafe {
        let q = Box::from_raw(qp.cast::<Qp>());
        if let Some(ctx) = Context::from_ptr(q.ibv.context) {
            ctx.unregister_qp(q.ibv.qp_num);
        }
        (*q.ibv.send_cq.cast::<Cq>())
            .users
            .fetch_sub(1, Ordering::AcqRel);
        (*q.ibv.recv_cq.cast::<Cq>())
            .users
            .fetch_sub(1, Ordering::AcqRel);
        if !q.ibv.srq.is_null() {
            (*q.ibv.srq.cast::<Srq>())
                .users
                .fetch_sub(1, Ordering::AcqRel);
        }
        Pd::release(q.ibv.pd);
        drop(q);
    }
}

/// `ibv_destroy_qp`.
///
/// # Safety
///
/// `qp` must be a live QP, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_destroy_qp(qp: *mut ibv_qp) -> c_int {
    guard(
        "ibv_destroy_qp",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some(q) = (unsafe { Qp::from_ptr(qp) }) else {
                return libc::EINVAL;
            };
            // SAFETY: a QP's context outlives it.
            if unsafe { Context::foreign(q.ibv.context) } {
                return libc::EIO;
            }
            // SAFETY: as above.
            if let Some(ctx) = unsafe { Context::from_ptr(q.ibv.context) } {
                ctx.disown(qp.cast());
            }
            // SAFETY: a live QP the caller gives up.
            unsafe { free_qp(qp.cast()) };
            0
        },
    )
}
