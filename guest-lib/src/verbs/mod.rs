//! The verbs-like API: one module per verbs object, named and shaped after libibverbs.
//!
//! ```text
//! Context::open ─┬─ ProtectionDomain ─┬─ MemoryRegion
//!                │                    ├─ QueuePair (with CompletionQueues, maybe an SRQ)
//!                │                    ├─ SharedReceiveQueue
//!                │                    └─ AddressHandle
//!                └─ CompletionQueue, CompletionChannel
//! ```
//!
//! Objects keep what they depend on alive (a QP holds its PD, CQs and SRQ), and destroy
//! themselves on the device when dropped.

mod ah;
mod context;
mod cq;
mod device;
mod error;
mod mr;
pub mod pacing;
mod pd;
mod qp;
mod ring;
mod srq;
#[cfg(test)]
mod sync_recv_tests;

pub use ah::{AddressHandle, AhAttr};
pub use context::{Context, DeviceAttr, PortAttr};
pub use cq::{
    AsyncEventKind, ChannelEvents, CompletionChannel, CompletionQueue, WcOpcode, WcStatus,
    WorkCompletion,
};
pub use device::{DEFAULT_SOCKET_DIR, Device, DeviceKind, device_list};
pub use error::Error;
pub use mr::{AccessFlags, MemoryRegion};
pub use pd::ProtectionDomain;
pub use qp::{
    QpAttr, QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, RecvWr, SendFlags, SendWr,
    Sge, WrOpcode,
};
pub use srq::{SharedReceiveQueue, SrqAttr, SrqAttrMask, SrqCaps};

/// Result of a verbs call.
pub type Result<T> = std::result::Result<T, Error>;
