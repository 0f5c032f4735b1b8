//! The driver side of virtio: split virtqueues living in shared memory.

pub mod split;

pub use split::{QueueError, RingAddresses, SplitQueue};
