//! The rest of libibverbs' exported API: verbs vrdma does not support fail as libibverbs
//! fails an unsupported verb (EOPNOTSUPP, or NULL with errno EOPNOTSUPP), and the helpers
//! programs call do what they do there. Every symbol a program may import must be defined
//! here: one left to the real libibverbs would be handed the shim's objects and crash.

use std::ffi::{c_char, c_int, c_void};

use crate::abi::*;
use crate::{null_with, set_errno};

/// `ibv_qp_to_qp_ex`: vrdma QPs have no extended work-request interface (perftest and
/// ibv_rc_pingpong use it only on devices they know, or with -N).
#[unsafe(no_mangle)]
pub extern "C" fn ibv_qp_to_qp_ex(_qp: *mut ibv_qp) -> *mut c_void {
    null_with(libc::EOPNOTSUPP)
}

/// `ibv_attach_mcast`: no multicast.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_attach_mcast(_qp: *mut ibv_qp, _gid: *const ibv_gid, _lid: u16) -> c_int {
    libc::EOPNOTSUPP
}

/// `ibv_detach_mcast`: no multicast.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_detach_mcast(_qp: *mut ibv_qp, _gid: *const ibv_gid, _lid: u16) -> c_int {
    libc::EOPNOTSUPP
}

/// `ibv_rereg_mr`: not supported (deregister and register again); returns
/// IBV_REREG_MR_ERR_INPUT with errno EOPNOTSUPP.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_rereg_mr(
    _mr: *mut ibv_mr,
    _flags: c_int,
    _pd: *mut ibv_pd,
    _addr: *mut c_void,
    _length: usize,
    _access: c_int,
) -> c_int {
    set_errno(libc::EOPNOTSUPP);
    -1
}

/// `ibv_reg_dmabuf_mr`: no dma-buf.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_reg_dmabuf_mr(
    _pd: *mut ibv_pd,
    _offset: u64,
    _length: usize,
    _iova: u64,
    _fd: c_int,
    _access: c_int,
) -> *mut ibv_mr {
    null_with(libc::EOPNOTSUPP)
}

/// `ibv_query_ece`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_query_ece(_qp: *mut ibv_qp, _ece: *mut c_void) -> c_int {
    libc::EOPNOTSUPP
}

/// `ibv_set_ece`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_set_ece(_qp: *mut ibv_qp, _ece: *mut c_void) -> c_int {
    libc::EOPNOTSUPP
}

/// `ibv_query_qp_data_in_order`: 0, no in-order guarantee reported.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_query_qp_data_in_order(_qp: *mut ibv_qp, _op: c_int, _flags: u32) -> c_int {
    0
}

/// `ibv_import_device`: no kernel command fd to import.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_import_device(_cmd_fd: c_int) -> *mut ibv_context {
    null_with(libc::EOPNOTSUPP)
}

/// `ibv_import_pd`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_import_pd(_context: *mut ibv_context, _handle: u32) -> *mut ibv_pd {
    null_with(libc::EOPNOTSUPP)
}

/// `ibv_import_mr`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_import_mr(_pd: *mut ibv_pd, _handle: u32) -> *mut ibv_mr {
    null_with(libc::EOPNOTSUPP)
}

/// `ibv_import_dm`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_import_dm(_context: *mut ibv_context, _handle: u32) -> *mut c_void {
    null_with(libc::EOPNOTSUPP)
}

/// `ibv_unimport_pd`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_unimport_pd(_pd: *mut ibv_pd) {}

/// `ibv_unimport_mr`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_unimport_mr(_mr: *mut ibv_mr) {}

/// `ibv_unimport_dm`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_unimport_dm(_dm: *mut c_void) {}

/// `ibv_resolve_eth_l2_from_gid`: vrdma ports have no Ethernet L2 address.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_resolve_eth_l2_from_gid(
    _context: *mut ibv_context,
    _attr: *mut ibv_ah_attr,
    _eth_mac: *mut u8,
    _vid: *mut u16,
) -> c_int {
    libc::EOPNOTSUPP
}

/// `ibv_register_driver`: providers are not loaded; nothing to register.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_register_driver(_name: *const c_char, _init: *mut c_void) {}

/// `ibv_get_sysfs_path`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_get_sysfs_path() -> *const c_char {
    c"/sys".as_ptr()
}

/// `ibv_is_fork_initialized`: IBV_FORK_ENABLED (1) after `ibv_fork_init` or with
/// RDMAV_FORK_SAFE / IBV_FORK_SAFE set, else IBV_FORK_DISABLED (0).
#[unsafe(no_mangle)]
pub extern "C" fn ibv_is_fork_initialized() -> c_int {
    c_int::from(crate::app_memory::is_fork_safe())
}

fn madvise_range(base: *mut c_void, size: usize, advice: c_int) -> c_int {
    let page = vrdma::mem::page_size();
    let start = (base as usize) & !(page - 1);
    let Some(end) = (base as usize).checked_add(size) else {
        return libc::EINVAL;
    };
    let end = end.div_ceil(page) * page;
    // SAFETY: madvise with DONTFORK/DOFORK only changes how fork treats the pages; a range
    // that is not mapped fails with ENOMEM.
    if unsafe { libc::madvise(start as *mut c_void, end - start, advice) } == 0 {
        0
    } else {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    }
}

/// `ibv_dontfork_range`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_dontfork_range(base: *mut c_void, size: usize) -> c_int {
    // As libibverbs: nothing to do unless fork safety is on.
    if !crate::app_memory::is_fork_safe() {
        return 0;
    }
    madvise_range(base, size, libc::MADV_DONTFORK)
}

/// `ibv_dofork_range`.
#[unsafe(no_mangle)]
pub extern "C" fn ibv_dofork_range(base: *mut c_void, size: usize) -> c_int {
    if !crate::app_memory::is_fork_safe() {
        return 0;
    }
    madvise_range(base, size, libc::MADV_DOFORK)
}

/// `ibv_query_device_ex` (exported for programs that call it directly; verbs.h's inline
/// version falls back to `ibv_query_device` on the shim's contexts): the basic attributes,
/// no extended ones.
///
/// # Safety
///
/// `context` must be open and `attr` writable for `attr_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ibv_query_device_ex(
    context: *mut ibv_context,
    input: *const c_void,
    attr: *mut c_void,
    attr_size: usize,
) -> c_int {
    if !input.is_null() || attr.is_null() || attr_size < size_of::<ibv_device_attr>() {
        return libc::EINVAL;
    }
    // SAFETY: writable for attr_size bytes (the caller's contract); zero the extension.
    unsafe { std::ptr::write_bytes(attr.cast::<u8>(), 0, attr_size) };
    // SAFETY: the caller's contract; orig_attr is at the start of ibv_device_attr_ex.
    unsafe { crate::device::ibv_query_device(context, attr.cast::<ibv_device_attr>()) }
}

/// `_ibv_query_gid_table`: the port's one GID.
///
/// # Safety
///
/// `context` must be open and `entries` writable for `max_entries` entries of `entry_size`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _ibv_query_gid_table(
    context: *mut ibv_context,
    entries: *mut ibv_gid_entry,
    max_entries: usize,
    flags: u32,
    entry_size: usize,
) -> isize {
    if max_entries == 0 {
        return -(libc::EINVAL as isize);
    }
    // SAFETY: the caller's contract, passed on for the first entry.
    match unsafe { crate::device::_ibv_query_gid_ex(context, 1, 0, entries, flags, entry_size) } {
        0 => 1,
        errno => -(errno as isize),
    }
}
