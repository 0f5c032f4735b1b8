//! The verbs-like library guest applications link.
//!
//! This crate is the driver side of the vrdma device. Today it holds the transport: how an
//! application process reaches the device.
//!
//! * [`mem`]: memfd-backed [`mem::SharedMemory`] the device can map, and a
//!   [`mem::DmaAllocator`] over it. Addresses are the same in the process and on the device
//!   (guest-physical address == virtual address).
//! * [`virtio`]: a driver-side split virtqueue in that memory.
//! * [`transport`]: the [`transport::Transport`] seam and its virtio-user implementation,
//!   [`transport::VirtioUser`], which makes the process its own vhost-user frontend (as DPDK's
//!   virtio-user does). Integration tests use it as a fake VMM.

pub mod mem;
pub mod transport;
pub mod verbs;
pub mod virtio;

pub use verbs::*;

/// Formats an error with all of its causes, `outer: inner: innermost`, for logs and messages
/// to operators.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    vrdma_proto::ErrorChain(err).to_string()
}
