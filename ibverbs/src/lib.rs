//! The libibverbs ABI over vrdma.
//!
//! Built as `libvrdma_ibverbs.so`, this library is loaded with `LD_PRELOAD` in front of an
//! unmodified verbs program (perftest, qperf, ibverbs-utils, an application's own code). It
//! defines the `ibv_*` functions such programs import, so the dynamic linker binds them here
//! instead of to libibverbs, and implements them on the `vrdma` crate: the devices are the
//! vrdma devices this process can open (`VRDMA_SOCKETS` or `/run/vrdma`).
//!
//! * [`app_memory`]: makes the application's own buffers (malloc, memalign, anonymous or
//!   file mappings) reachable by the device when they are registered.

pub mod app_memory;
