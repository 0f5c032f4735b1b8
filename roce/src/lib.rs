//! RoCEv2 packets for the vrdma soft fabric.
//!
//! RoCEv2 carries InfiniBand transport packets in UDP datagrams (destination port
//! [`UDP_PORT`]): the UDP payload is a Base Transport Header ([`bth::Bth`]), the extension
//! headers its opcode calls for ([`opcode::Layout`]), the payload, 0 to 3 pad bytes and the
//! 4-byte invariant CRC ([`icrc`]). This crate is that packet layer and nothing above it: wire
//! types for the headers, the opcode table, the ICRC, a parser for untrusted datagrams
//! ([`packet::parse`]) and an encoder into caller-supplied buffers ([`packet::Packet::encode`]).
//! Queue-pair state (PSN windows, retries, MSN, credits) belongs to the transport above.
//!
//! The layouts follow the InfiniBand Architecture Specification, volume 1, chapter 9
//! ("Transport layer"), and annex A16/A17 (RoCE, RoCEv2); the byte order is network order
//! throughout, except for the ICRC, which is stored the way Ethernet stores its FCS (see
//! [`icrc`]). The output is meant to interoperate with Linux Soft-RoCE (rxe) and RoCE NICs.
//!
//! Every wire type is `#[repr(C)]` over zerocopy's network-endian byte-array integers, so it
//! has alignment 1 and no padding and can be copied out of any byte offset. Headers are copied
//! out of the datagram before they are looked at; nothing here panics on any input.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aeth;
pub mod atomic;
pub mod bth;
pub mod deth;
pub mod icrc;
pub mod ieth;
pub mod imm;
pub mod opcode;
pub mod packet;
pub mod reth;

/// The IANA-assigned UDP destination port of RoCEv2.
pub const UDP_PORT: u16 = 4791;

/// The largest 24-bit value: the largest queue-pair number, PSN or MSN.
pub const MAX_24: u32 = 0x00ff_ffff;

/// A value does not fit the wire field it was meant for (a QPN or PSN above 24 bits, a pad
/// count above 3, ...). Constructors return it instead of silently truncating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{field} {value:#x} is out of range (max {max:#x})")]
pub struct OutOfRange {
    /// The field, as the IBA names it.
    pub field: &'static str,
    /// The value that was refused.
    pub value: u64,
    /// The largest value the field holds.
    pub max: u64,
}

/// Checks `value <= max` for the field `field`.
fn check_range(field: &'static str, value: u32, max: u32) -> Result<u32, OutOfRange> {
    if value <= max {
        Ok(value)
    } else {
        Err(OutOfRange {
            field,
            value: u64::from(value),
            max: u64::from(max),
        })
    }
}
