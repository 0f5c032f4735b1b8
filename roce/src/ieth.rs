//! The Invalidate Extended Transport Header (IBA 9.3.3.9 in 1.2+): the R_Key a SEND with
//! invalidate asks the responder to invalidate.

use zerocopy::network_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of [`Ieth`] on the wire.
pub const LEN: usize = 4;

/// An Invalidate Extended Transport Header, in wire layout.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Ieth {
    rkey: U32,
}

impl Ieth {
    /// A header invalidating `rkey`.
    pub fn new(rkey: u32) -> Self {
        Ieth {
            rkey: U32::new(rkey),
        }
    }

    /// The remote key to invalidate.
    pub fn rkey(&self) -> u32 {
        self.rkey.get()
    }
}
