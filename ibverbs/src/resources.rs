//! Protection domains, memory regions and address handles.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicU32, Ordering};

use vrdma::AccessFlags;

use crate::abi::*;
use crate::app_memory::{self, Pinned};
use crate::context::{Context, Free, Rank};
use crate::{errno_of, guard, null_with};

/// Everything behind an `ibv_pd *`.
#[repr(C)]
pub(crate) struct Pd {
    /// First, so an `ibv_pd *` is a `Pd *`.
    pub(crate) ibv: ibv_pd,
    pub(crate) pd: vrdma::ProtectionDomain,
    /// MRs, QPs, AHs and SRQs made in it: deallocating it fails with EBUSY until they are
    /// gone, as in verbs.
    users: AtomicU32,
}

impl Pd {
    /// Counts an object made in `pd`.
    ///
    /// # Safety
    ///
    /// `pd` must be a live PD of this shim.
    pub(crate) unsafe fn retain(pd: *mut ibv_pd) {
        // SAFETY: the caller's contract.
        unsafe { (*pd.cast::<Pd>()).users.fetch_add(1, Ordering::AcqRel) };
    }

    /// Forgets an object made in `pd`.
    ///
    /// # Safety
    ///
    /// As [`Pd::retain`], for an object it counted.
    pub(crate) unsafe fn release(pd: *mut ibv_pd) {
        // SAFETY: the caller's contract.
        unsafe { (*pd.cast::<Pd>()).users.fetch_sub(1, Ordering::AcqRel) };
    }

    /// # Safety
    ///
    /// A non-NULL `pd` must be a live PD of this shim.
    pub(crate) unsafe fn from_ptr<'a>(pd: *mut ibv_pd) -> Option<(&'a Pd, &'a Context)> {
        if pd.is_null() {
            return None;
        }
        // SAFETY: the caller's contract; a PD's context outlives it.
        unsafe {
            let pd = &*pd.cast::<Pd>();
            Some((pd, Context::from_ptr(pd.ibv.context)?))
        }
    }
}

/// Everything behind an `ibv_mr *`.
#[repr(C)]
struct Mr {
    ibv: ibv_mr,
    _mr: vrdma::MemoryRegion,
    /// Released after the MR: the device stops using the memory before it stops seeing it.
    _pinned: Pinned,
}

/// Everything behind an `ibv_ah *`.
#[repr(C)]
pub(crate) struct Ah {
    ibv: ibv_ah,
    pub(crate) ah: vrdma::AddressHandle,
}

/// `ibv_alloc_pd`.
///
/// # Safety
///
/// `context` must be an open context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_alloc_pd(context: *mut ibv_context) -> *mut ibv_pd {
    guard(
        "ibv_alloc_pd",
        || null_with(libc::EIO),
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return null_with(libc::EINVAL);
            };
            match vrdma::ProtectionDomain::new(&ctx.vrdma) {
                Ok(pd) => {
                    let ptr = Box::into_raw(Box::new(Pd {
                        ibv: ibv_pd {
                            context,
                            handle: pd.handle(),
                        },
                        pd,
                        users: AtomicU32::new(0),
                    }));
                    ctx.adopt(ptr.cast(), Rank::Pd, free_pd);
                    ptr.cast::<ibv_pd>()
                }
                Err(e) => null_with(errno_of(&e)),
            }
        },
    )
}

/// Frees a PD.
///
/// # Safety
///
/// `pd` must be a live PD, not used afterwards.
unsafe fn free_pd(pd: *mut c_void) {
    // SAFETY: made by Box::into_raw in ibv_alloc_pd (the caller's contract).
    drop(unsafe { Box::from_raw(pd.cast::<Pd>()) });
}

/// Frees an MR.
///
/// # Safety
///
/// `mr` must be a live MR, not used afterwards.
unsafe fn free_mr(mr: *mut c_void) {
    // SAFETY: made by Box::into_raw in reg_mr (the caller's contract); its PD outlives it.
    unsafe {
        let mr = Box::from_raw(mr.cast::<Mr>());
        Pd::release(mr.ibv.pd);
        drop(mr);
    }
}

/// Frees an AH.
///
/// # Safety
///
/// `ah` must be a live AH, not used afterwards.
unsafe fn free_ah(ah: *mut c_void) {
    // SAFETY: made by Box::into_raw in ibv_create_ah (the caller's contract); its PD outlives
    // it.
    unsafe {
        let ah = Box::from_raw(ah.cast::<Ah>());
        Pd::release(ah.ibv.pd);
        drop(ah);
    }
}

/// Destroys an object the program made in `pd` of `context`: EIO in a forked child (the
/// parent's objects are left alone), else disowns it and frees it with `free`.
///
/// # Safety
///
/// `object` must be a live object made in `pd` of `context`, freed by `free`, not used
/// afterwards.
unsafe fn destroy_in(
    context: *mut ibv_context,
    pd: *mut ibv_pd,
    object: *mut c_void,
    free: Free,
) -> c_int {
    // SAFETY: the caller's contract: a live context.
    if unsafe { Context::foreign(context) } {
        return libc::EIO;
    }
    // SAFETY: the caller's contract: a live PD, whose context outlives it.
    if let Some((_, ctx)) = unsafe { Pd::from_ptr(pd) } {
        ctx.disown(object);
    }
    // SAFETY: the caller's contract.
    unsafe { free(object) };
    0
}

/// `ibv_dealloc_pd`.
///
/// # Safety
///
/// `pd` must be a live PD, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_dealloc_pd(pd: *mut ibv_pd) -> c_int {
    guard(
        "ibv_dealloc_pd",
        || libc::EIO,
        || {
            // SAFETY: the caller's contract.
            let Some((p, ctx)) = (unsafe { Pd::from_ptr(pd) }) else {
                return libc::EINVAL;
            };
            if p.users.load(Ordering::Acquire) != 0 {
                return libc::EBUSY;
            }
            ctx.disown(pd.cast());
            // SAFETY: a live PD the caller gives up.
            unsafe { free_pd(pd.cast()) };
            0
        },
    )
}

/// The access flags of a registration: vrdma's four, with the optional range dropped (a
/// device may ignore those, and perftest always passes relaxed ordering).
fn access_flags(access: c_int) -> Result<AccessFlags, c_int> {
    let bits = (access as c_uint) & !IBV_ACCESS_OPTIONAL_RANGE;
    AccessFlags::from_bits(bits).ok_or_else(|| {
        log::warn!(
            "ibv_reg_mr: access flags {bits:#x} include some vrdma does not support (it has \
             local write, remote write, remote read and remote atomic; no memory windows, \
             zero-based, on-demand paging or huge-page hints)"
        );
        libc::EINVAL
    })
}

fn reg_mr(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: c_int,
) -> *mut ibv_mr {
    // SAFETY: the exported functions' contract: a live PD.
    let Some((p, ctx)) = (unsafe { Pd::from_ptr(pd) }) else {
        return null_with(libc::EINVAL);
    };
    if length == 0 {
        return null_with(libc::EINVAL);
    }
    let access = match access_flags(access) {
        Ok(a) => a,
        Err(errno) => return null_with(errno),
    };
    let pinned = match ctx.memory.pin_for(addr as u64, length as u64, access) {
        Ok(p) => p,
        // app_memory has logged why.
        Err(e) => return null_with(e.errno()),
    };
    match vrdma::MemoryRegion::register_iova(&p.pd, addr as u64, length as u64, iova, access) {
        Ok(mr) => {
            // SAFETY: a live PD (checked above).
            unsafe { Pd::retain(pd) };
            let ptr = Box::into_raw(Box::new(Mr {
                ibv: ibv_mr {
                    context: ctx.as_ptr(),
                    pd,
                    addr,
                    length,
                    handle: mr.lkey(),
                    lkey: mr.lkey(),
                    rkey: mr.rkey(),
                },
                _mr: mr,
                _pinned: pinned,
            }));
            ctx.adopt(ptr.cast(), Rank::Mr, free_mr);
            ptr.cast::<ibv_mr>()
        }
        Err(e) => null_with(errno_of(&e)),
    }
}

/// `ibv_reg_mr`.
///
/// # Safety
///
/// `pd` must be a live PD; `addr` the start of `length` bytes the program owns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_reg_mr(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    access: c_int,
) -> *mut ibv_mr {
    guard(
        "ibv_reg_mr",
        || null_with(libc::EIO),
        || reg_mr(pd, addr, length, addr as u64, access),
    )
}

/// `ibv_reg_mr_iova2` (verbs.h's `ibv_reg_mr` macro calls it whenever the access flags are
/// not a compile-time constant).
///
/// # Safety
///
/// As [`ibv_reg_mr`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_reg_mr_iova2(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: c_uint,
) -> *mut ibv_mr {
    guard(
        "ibv_reg_mr_iova2",
        || null_with(libc::EIO),
        || reg_mr(pd, addr, length, iova, access as c_int),
    )
}

/// `ibv_reg_mr_iova`.
///
/// # Safety
///
/// As [`ibv_reg_mr`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_reg_mr_iova(
    pd: *mut ibv_pd,
    addr: *mut c_void,
    length: usize,
    iova: u64,
    access: c_int,
) -> *mut ibv_mr {
    guard(
        "ibv_reg_mr_iova",
        || null_with(libc::EIO),
        || reg_mr(pd, addr, length, iova, access),
    )
}

/// `ibv_dereg_mr`.
///
/// # Safety
///
/// `mr` must be a live MR, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_dereg_mr(mr: *mut ibv_mr) -> c_int {
    guard(
        "ibv_dereg_mr",
        || libc::EIO,
        || {
            if mr.is_null() {
                return libc::EINVAL;
            }
            // SAFETY: a live MR the caller gives up; its context and PD outlive it.
            unsafe { destroy_in((*mr).context, (*mr).pd, mr.cast(), free_mr) }
        },
    )
}

/// `ibv_fork_init`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_fork_init() -> c_int {
    guard("ibv_fork_init", || libc::EIO, app_memory::fork_init)
}

/// The vrdma address vector of a program's `ibv_ah_attr`.
pub(crate) fn ah_attr(ctx: &Context, a: &ibv_ah_attr, verb: &str) -> Result<vrdma::AhAttr, c_int> {
    let Some(dgid) = ctx.port.dgid(a) else {
        log::warn!(
            "{verb}: the address vector has no GRH and LID {:#x} names no port (LIDs are the \
             low 16 bits of a port's GID, see the identity notes in docs/guide.md)",
            a.dlid
        );
        return Err(libc::EINVAL);
    };
    let mut attr = vrdma::AddressHandle::attr_for(dgid);
    attr.sl = a.sl;
    attr.static_rate = a.static_rate;
    attr.port_num = if a.port_num == 0 { 1 } else { a.port_num };
    if a.is_global != 0 {
        attr.flow_label = a.grh.flow_label.into();
        attr.sgid_index = a.grh.sgid_index;
        attr.hop_limit = if a.grh.hop_limit == 0 {
            64
        } else {
            a.grh.hop_limit
        };
        attr.traffic_class = a.grh.traffic_class;
    }
    Ok(attr)
}

/// The program's view of a vrdma address vector.
pub(crate) fn ah_attr_to_c(a: &vrdma::AhAttr) -> ibv_ah_attr {
    ibv_ah_attr {
        grh: ibv_global_route {
            dgid: ibv_gid { raw: a.dgid.0 },
            flow_label: a.flow_label.get(),
            sgid_index: a.sgid_index,
            hop_limit: a.hop_limit,
            traffic_class: a.traffic_class,
        },
        dlid: crate::identity::lid_of(&a.dgid),
        sl: a.sl,
        src_path_bits: 0,
        static_rate: a.static_rate,
        is_global: a.is_global,
        port_num: a.port_num,
    }
}

/// `ibv_create_ah`.
///
/// # Safety
///
/// `pd` must be a live PD and `attr` readable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_create_ah(pd: *mut ibv_pd, attr: *mut ibv_ah_attr) -> *mut ibv_ah {
    guard(
        "ibv_create_ah",
        || null_with(libc::EIO),
        || {
            // SAFETY: the caller's contract.
            let Some((p, ctx)) = (unsafe { Pd::from_ptr(pd) }) else {
                return null_with(libc::EINVAL);
            };
            if attr.is_null() {
                return null_with(libc::EINVAL);
            }
            // SAFETY: readable (the caller's contract).
            let a = unsafe { &*attr };
            let av = match ah_attr(ctx, a, "ibv_create_ah") {
                Ok(av) => av,
                Err(errno) => return null_with(errno),
            };
            match vrdma::AddressHandle::new(&p.pd, &av) {
                Ok(ah) => {
                    // SAFETY: a live PD (checked above).
                    unsafe { Pd::retain(pd) };
                    let ptr = Box::into_raw(Box::new(Ah {
                        ibv: ibv_ah {
                            context: ctx.as_ptr(),
                            pd,
                            handle: ah.handle(),
                        },
                        ah,
                    }));
                    ctx.adopt(ptr.cast(), Rank::Ah, free_ah);
                    ptr.cast::<ibv_ah>()
                }
                Err(e) => null_with(errno_of(&e)),
            }
        },
    )
}

/// `ibv_destroy_ah`.
///
/// # Safety
///
/// `ah` must be a live AH, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_destroy_ah(ah: *mut ibv_ah) -> c_int {
    guard(
        "ibv_destroy_ah",
        || libc::EIO,
        || {
            if ah.is_null() {
                return libc::EINVAL;
            }
            // SAFETY: a live AH the caller gives up; its context and PD outlive it.
            unsafe { destroy_in((*ah).context, (*ah).pd, ah.cast(), free_ah) }
        },
    )
}

/// The GRH at the start of a UD receive buffer: the sender's GID is at bytes 8..24.
const GRH_SGID_OFFSET: usize = 8;

/// `ibv_init_ah_from_wc`: the address vector that answers a received UD message.
///
/// # Safety
///
/// `context` must be open; `wc` readable; `grh` readable for 40 bytes when the completion
/// has `IBV_WC_GRH`; `ah_attr` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_init_ah_from_wc(
    context: *mut ibv_context,
    port_num: u8,
    wc: *mut ibv_wc,
    grh: *mut c_void,
    ah_attr: *mut ibv_ah_attr,
) -> c_int {
    guard(
        "ibv_init_ah_from_wc",
        || -1,
        || {
            // SAFETY: the caller's contract.
            let Some(ctx) = (unsafe { Context::from_ptr(context) }) else {
                return -1;
            };
            if wc.is_null() || ah_attr.is_null() {
                return -1;
            }
            // SAFETY: readable (the caller's contract).
            let wc = unsafe { &*wc };
            let mut a = ibv_ah_attr {
                dlid: wc.slid,
                sl: wc.sl,
                port_num: if port_num == 0 { 1 } else { port_num },
                ..ibv_ah_attr::default()
            };
            if wc.wc_flags & IBV_WC_GRH != 0 && !grh.is_null() {
                let mut sgid = [0u8; 16];
                // SAFETY: with IBV_WC_GRH the caller passes the 40-byte GRH.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        grh.cast::<u8>().add(GRH_SGID_OFFSET),
                        sgid.as_mut_ptr(),
                        16,
                    )
                };
                a.is_global = 1;
                a.grh.dgid = ibv_gid { raw: sgid };
                a.grh.hop_limit = 64;
            } else if ctx.port.dgid(&a).is_none() {
                return -1;
            }
            // SAFETY: writable (the caller's contract).
            unsafe { ah_attr.write(a) };
            0
        },
    )
}

/// `ibv_create_ah_from_wc`.
///
/// # Safety
///
/// As [`ibv_init_ah_from_wc`], with a live PD.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_create_ah_from_wc(
    pd: *mut ibv_pd,
    wc: *mut ibv_wc,
    grh: *mut c_void,
    port_num: u8,
) -> *mut ibv_ah {
    guard(
        "ibv_create_ah_from_wc",
        || null_with(libc::EIO),
        || {
            // SAFETY: the caller's contract.
            let Some((_, ctx)) = (unsafe { Pd::from_ptr(pd) }) else {
                return null_with(libc::EINVAL);
            };
            let mut a = ibv_ah_attr::default();
            // SAFETY: the caller's contract, passed on.
            if unsafe { ibv_init_ah_from_wc(ctx.as_ptr(), port_num, wc, grh, &mut a) } != 0 {
                return null_with(libc::EINVAL);
            }
            // SAFETY: a live PD and a local attr.
            unsafe { ibv_create_ah(pd, &mut a) }
        },
    )
}
