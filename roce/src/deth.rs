//! The Datagram Extended Transport Header (IBA 9.3.2): Q_Key and source QP of a UD packet.
//!
//! ```text
//! bytes 0-3  Q_Key
//! byte 4     reserved (resv8)
//! bytes 5-7  SrcQP (24 bits)
//! ```

use zerocopy::network_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{MAX_24, OutOfRange, check_range};

/// Size of [`Deth`] on the wire.
pub const LEN: usize = 8;

/// A Datagram Extended Transport Header, in wire layout. The reserved byte is kept as received.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Deth {
    qkey: U32,
    /// resv8 in the top byte, SrcQP below.
    src_qp: U32,
}

impl Deth {
    /// A header from `src_qp` with `qkey`; refuses a QPN above 24 bits.
    pub fn new(qkey: u32, src_qp: u32) -> Result<Self, OutOfRange> {
        Ok(Deth {
            qkey: U32::new(qkey),
            src_qp: U32::new(check_range("SrcQP", src_qp, MAX_24)?),
        })
    }

    /// The queue key the receiving QP must hold.
    pub fn qkey(&self) -> u32 {
        self.qkey.get()
    }

    /// The sending queue pair (24 bits).
    pub fn src_qp(&self) -> u32 {
        self.src_qp.get() & MAX_24
    }

    /// The reserved byte, as received.
    pub fn resv8(&self) -> u8 {
        (self.src_qp.get() >> 24) as u8
    }
}
