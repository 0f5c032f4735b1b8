//! The verbs-like library guest applications link: the driver side of the vrdma device.
//!
//! **Start with the developer guide**, `docs/guide.md` in the repository
//! ([open it](../../../docs/guide.md) from documentation built in the repository's `target/`):
//! it maps each `ibv_*` call to its vrdma equivalent, walks through a first RDMA WRITE, and
//! shows how to run existing verbs programs over vrdma.
//!
//! * [`verbs`] (re-exported at the top): the API, named and shaped after libibverbs.
//!   [`device_list`] and [`Context::open`] open a device; [`ProtectionDomain`],
//!   [`MemoryRegion`] (with [`AccessFlags`]), [`CompletionQueue`], [`QueuePair`] (with
//!   [`QpAttrMask`] and [`SendFlags`]), [`SharedReceiveQueue`] and [`AddressHandle`] follow.
//! * [`mem`]: memfd-backed [`mem::SharedMemory`] the device can map, and a
//!   [`mem::DmaAllocator`] over it. Addresses are the same in the process and on the device
//!   (guest-physical address == virtual address).
//! * [`virtio`]: a driver-side split virtqueue in that memory.
//! * [`transport`]: the [`transport::Transport`] seam and its implementations:
//!   [`transport::VirtioUser`], which makes the process its own vhost-user frontend (as DPDK's
//!   virtio-user does; integration tests use it as a fake VMM), and [`transport::VirtioPci`],
//!   which drives the VM's vrdma PCI function from user space inside a QEMU VM.

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
