//! The atomic extended transport headers: AtomicETH (IBA 9.3.3.4), the request of a
//! COMPARE_SWAP or FETCH_ADD, and AtomicAckETH (IBA 9.3.3.6), the value the responder found.
//!
//! ```text
//! AtomicETH    bytes 0-7 VA | 8-11 R_Key | 12-19 Swap (or Add) Data | 20-27 Compare Data
//! AtomicAckETH bytes 0-7 Original Remote Data
//! ```
//!
//! FETCH_ADD ignores Compare Data; the IBA still sends the field, so the header is 28 bytes
//! for both opcodes.

use zerocopy::network_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of [`AtomicEth`] on the wire.
pub const ETH_LEN: usize = 28;

/// Size of [`AtomicAckEth`] on the wire.
pub const ACK_ETH_LEN: usize = 8;

/// An Atomic Extended Transport Header, in wire layout.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct AtomicEth {
    va: U64,
    rkey: U32,
    swap_add: U64,
    compare: U64,
}

impl AtomicEth {
    /// A COMPARE_SWAP request: if the 8 bytes at `va` equal `compare`, replace them by `swap`.
    pub fn compare_swap(va: u64, rkey: u32, compare: u64, swap: u64) -> Self {
        Self::new(va, rkey, swap, compare)
    }

    /// A FETCH_ADD request: add `add` to the 8 bytes at `va` (Compare Data is sent as 0).
    pub fn fetch_add(va: u64, rkey: u32, add: u64) -> Self {
        Self::new(va, rkey, add, 0)
    }

    /// A header with every field given, in wire order.
    pub fn new(va: u64, rkey: u32, swap_add: u64, compare: u64) -> Self {
        AtomicEth {
            va: U64::new(va),
            rkey: U32::new(rkey),
            swap_add: U64::new(swap_add),
            compare: U64::new(compare),
        }
    }

    /// The address of the 8-byte target (must be 8-byte aligned; the responder checks).
    pub fn va(&self) -> u64 {
        self.va.get()
    }

    /// The remote key of the memory region.
    pub fn rkey(&self) -> u32 {
        self.rkey.get()
    }

    /// Swap Data of a COMPARE_SWAP, Add Data of a FETCH_ADD.
    pub fn swap_add(&self) -> u64 {
        self.swap_add.get()
    }

    /// Compare Data of a COMPARE_SWAP.
    pub fn compare(&self) -> u64 {
        self.compare.get()
    }
}

/// An Atomic Acknowledge Extended Transport Header, in wire layout.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct AtomicAckEth {
    orig: U64,
}

impl AtomicAckEth {
    /// A header returning `original`, the target's value before the operation.
    pub fn new(original: u64) -> Self {
        AtomicAckEth {
            orig: U64::new(original),
        }
    }

    /// The target's value before the operation.
    pub fn original(&self) -> u64 {
        self.orig.get()
    }
}
