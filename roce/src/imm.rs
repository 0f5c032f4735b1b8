//! Immediate data (ImmDt, IBA 9.3.3.8): 4 opaque bytes a SEND or RDMA WRITE with immediate
//! hands to the receiver's completion.

use zerocopy::network_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of [`ImmDt`] on the wire.
pub const LEN: usize = 4;

/// Immediate data, in wire layout.
///
/// The verbs API hands immediate data around as a big-endian `__be32` (`imm_data` of
/// `ibv_send_wr` and `ibv_wc`), i.e. as these 4 bytes in wire order; [`ImmDt::bytes`] is that
/// form, [`ImmDt::get`] the same bytes read as a network-order integer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ImmDt {
    data: U32,
}

impl ImmDt {
    /// Immediate data whose wire bytes are `data` in network order.
    pub fn new(data: u32) -> Self {
        ImmDt {
            data: U32::new(data),
        }
    }

    /// Immediate data with these wire bytes.
    pub fn from_bytes(bytes: [u8; 4]) -> Self {
        ImmDt {
            data: U32::from_bytes(bytes),
        }
    }

    /// The wire bytes read in network order.
    pub fn get(&self) -> u32 {
        self.data.get()
    }

    /// The wire bytes.
    pub fn bytes(&self) -> [u8; 4] {
        self.data.to_bytes()
    }
}
