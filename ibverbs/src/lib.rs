//! The libibverbs ABI over vrdma.
//!
//! Built as `libvrdma_ibverbs.so`, this library is loaded with `LD_PRELOAD` in front of an
//! unmodified verbs program (perftest, qperf, ibverbs-utils, an application's own code). It
//! defines the `ibv_*` functions such programs import, so the dynamic linker binds them here
//! instead of to libibverbs, and implements them on the `vrdma` crate: the devices are the
//! vrdma devices this process can open (`VRDMA_SOCKETS` or `/run/vrdma`, see
//! [`vrdma::device_list`]).
//!
//! * [`abi`]: verbs.h's structs and constants, with their layout checked at compile time.
//! * [`identity`]: how a vrdma port (a RoCEv2 GID) presents itself to programs written for
//!   InfiniBand: its LID and node GUID.
//! * [`app_memory`]: makes the application's own buffers (malloc, memalign, anonymous or
//!   file mappings) reachable by the device when they are registered.
//! * `device`, `context`, `resources`, `cq`, `qp`, `srq`, `strings`, `unsupported`: the exported
//!   functions, one module per group of verbs.
//!
//! Every exported function checks its arguments, never unwinds into C (a panic becomes the
//! verb's error), and reports failures as libibverbs does: a NULL pointer with `errno` set,
//! or an errno value returned. Logging goes to stderr, at `warn` unless `VRDMA_LOG` says
//! otherwise (for example `VRDMA_LOG=debug`).

pub mod abi;
pub mod app_memory;
mod context;
mod cq;
mod device;
pub mod identity;
mod qp;
mod resources;
mod srq;
mod strings;
mod unsupported;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

/// Sets the calling thread's `errno`.
pub(crate) fn set_errno(errno: i32) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = errno };
}

/// Logs why a `vrdma` call failed and returns the errno verbs report for it.
pub(crate) fn errno_of(e: &vrdma::Error) -> i32 {
    log::warn!("{}", vrdma::error_chain(e));
    e.errno()
}

/// Fails a pointer-returning verb: NULL with `errno` set.
pub(crate) fn null_with<T>(errno: i32) -> *mut T {
    set_errno(errno);
    std::ptr::null_mut()
}

/// Runs an exported function's body, turning a panic (a bug in the shim) into `on_panic`
/// after logging it: unwinding into C is undefined behaviour, and aborting the application
/// would lose its work.
pub(crate) fn guard<R>(verb: &str, on_panic: impl FnOnce() -> R, body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(_) => {
            log::error!(
                "{verb}: internal error in the vrdma libibverbs shim (a panic); failing the call"
            );
            on_panic()
        }
    }
}

/// Starts logging once, on the first verb a program calls (never in a constructor: the
/// library must do nothing in programs that never use verbs, nor before a fork).
pub(crate) fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ =
            env_logger::Builder::from_env(env_logger::Env::new().filter_or("VRDMA_LOG", "warn"))
                .format_timestamp(None)
                .try_init();
    });
}

/// Copies `s` into a fixed C string field, truncating, always NUL-terminated.
pub(crate) fn fill_c_string(field: &mut [std::ffi::c_char], s: &str) {
    field.fill(0);
    let room = field.len().saturating_sub(1);
    for (dst, src) in field.iter_mut().zip(s.bytes().take(room)) {
        *dst = src as std::ffi::c_char;
    }
}

/// The data-path operations every context carries, which verbs.h's inline functions call.
pub(crate) fn ops() -> abi::ibv_context_ops {
    abi::ibv_context_ops {
        _compat_query_device: None,
        _compat_query_port: None,
        _compat_alloc_pd: None,
        _compat_dealloc_pd: None,
        _compat_reg_mr: None,
        _compat_rereg_mr: None,
        _compat_dereg_mr: None,
        // NULL: ibv_alloc_mw fails with EOPNOTSUPP (no memory windows).
        alloc_mw: None,
        bind_mw: None,
        dealloc_mw: None,
        _compat_create_cq: None,
        poll_cq: Some(cq::poll_cq),
        req_notify_cq: Some(cq::req_notify_cq),
        _compat_cq_event: None,
        _compat_resize_cq: None,
        _compat_destroy_cq: None,
        _compat_create_srq: None,
        _compat_modify_srq: None,
        _compat_query_srq: None,
        _compat_destroy_srq: None,
        post_srq_recv: Some(srq::post_srq_recv),
        _compat_create_qp: None,
        _compat_query_qp: None,
        _compat_modify_qp: None,
        _compat_destroy_qp: None,
        post_send: Some(qp::post_send),
        post_recv: Some(qp::post_recv),
        _compat_create_ah: None,
        _compat_destroy_ah: None,
        _compat_attach_mcast: None,
        _compat_detach_mcast: None,
        _compat_async_event: None,
    }
}
