//! The RDMA Extended Transport Header (IBA 9.3.3.3): where an RDMA WRITE or READ goes.
//!
//! ```text
//! bytes 0-7    VA (virtual address in the responder's memory region)
//! bytes 8-11   R_Key
//! bytes 12-15  DMA Length (of the whole message, not of this packet)
//! ```

use zerocopy::network_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of [`Reth`] on the wire.
pub const LEN: usize = 16;

/// An RDMA Extended Transport Header, in wire layout.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Reth {
    va: U64,
    rkey: U32,
    dma_len: U32,
}

impl Reth {
    /// A header addressing `dma_len` bytes at `va` in the region of `rkey`.
    pub fn new(va: u64, rkey: u32, dma_len: u32) -> Self {
        Reth {
            va: U64::new(va),
            rkey: U32::new(rkey),
            dma_len: U32::new(dma_len),
        }
    }

    /// The virtual address of the first byte of the message.
    pub fn va(&self) -> u64 {
        self.va.get()
    }

    /// The remote key of the memory region.
    pub fn rkey(&self) -> u32 {
        self.rkey.get()
    }

    /// The length in bytes of the whole message.
    pub fn dma_len(&self) -> u32 {
        self.dma_len.get()
    }
}
