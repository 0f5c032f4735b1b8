//! The Base Transport Header (IBA 9.2), the 12 bytes every RoCEv2 packet starts with.
//!
//! ```text
//! byte 0      OpCode
//! byte 1      SE (bit 7) | M (bit 6) | PadCnt (bits 5-4) | TVer (bits 3-0)
//! bytes 2-3   P_Key
//! byte 4      FECN (bit 7) | BECN (bit 6) | resv6a (bits 5-0)
//! bytes 5-7   DestQP (24 bits)
//! byte 8      A (bit 7) | resv7 (bits 6-0)
//! bytes 9-11  PSN (24 bits)
//! ```
//!
//! Byte 4 was a single reserved byte (resv8a) before the congestion-control annex gave two of
//! its bits to FECN/BECN; switches may rewrite it, so the ICRC covers it as all ones.

use core::fmt;

use zerocopy::network_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::opcode::Opcode;
use crate::{MAX_24, OutOfRange, check_range};

/// Size of [`Bth`] on the wire.
pub const LEN: usize = 12;

/// The transport header version this crate speaks (the only one the IBA defines).
pub const TVER: u8 = 0;

/// The default partition key: full member of the default partition, what RoCE uses unless
/// partitions are configured.
pub const DEFAULT_PKEY: u16 = 0xffff;

const SE: u8 = 1 << 7;
const MIG_REQ: u8 = 1 << 6;
const PAD_SHIFT: u32 = 4;
const PAD_MASK: u8 = 0b11 << PAD_SHIFT;
const TVER_MASK: u8 = 0x0f;
const FECN: u32 = 1 << 31;
const BECN: u32 = 1 << 30;
const ACK_REQ: u32 = 1 << 31;

/// A Base Transport Header, in wire layout.
///
/// Accessors mask out the bit fields; builders (`with_*`) refuse values that do not fit.
/// Reserved bits are kept as received, so a header copied out of a datagram re-encodes to the
/// same bytes; [`Bth::new`] zeroes them, as a sender must.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Bth {
    opcode: u8,
    flags: u8,
    pkey: U16,
    /// FECN, BECN and resv6a in the top byte, DestQP below.
    qpn: U32,
    /// AckReq and resv7 in the top byte, PSN below.
    psn: U32,
}

impl Bth {
    /// A header for `opcode` to `dest_qp` with sequence number `psn`, the default P_Key, version
    /// 0 and every flag clear. Refuses a QPN or PSN above 24 bits.
    pub fn new(opcode: Opcode, dest_qp: u32, psn: u32) -> Result<Self, OutOfRange> {
        Ok(Bth {
            opcode: opcode.raw(),
            flags: TVER,
            pkey: U16::new(DEFAULT_PKEY),
            qpn: U32::new(check_range("DestQP", dest_qp, MAX_24)?),
            psn: U32::new(check_range("PSN", psn, MAX_24)?),
        })
    }

    /// The raw opcode byte (see [`Opcode::from_raw`]).
    pub fn opcode(&self) -> u8 {
        self.opcode
    }

    /// The header with another opcode; the extension headers must then change to match.
    pub fn with_opcode(mut self, opcode: Opcode) -> Self {
        self.opcode = opcode.raw();
        self
    }

    /// SE: the responder should raise a solicited event for this message.
    pub fn solicited(&self) -> bool {
        self.flags & SE != 0
    }

    /// The header with SE set or cleared.
    pub fn with_solicited(mut self, on: bool) -> Self {
        self.flags = set_bit(self.flags, SE, on);
        self
    }

    /// M: the migration state of the sender (automatic path migration).
    pub fn mig_req(&self) -> bool {
        self.flags & MIG_REQ != 0
    }

    /// The header with M set or cleared.
    pub fn with_mig_req(mut self, on: bool) -> Self {
        self.flags = set_bit(self.flags, MIG_REQ, on);
        self
    }

    /// PadCnt: how many pad bytes (0-3) follow the payload to align it to 4 bytes.
    pub fn pad_count(&self) -> u8 {
        (self.flags & PAD_MASK) >> PAD_SHIFT
    }

    /// The header with another pad count; refuses more than 3. [`crate::packet::Packet::new`]
    /// sets it from the payload length, so senders need not.
    pub fn with_pad_count(mut self, pad: u8) -> Result<Self, OutOfRange> {
        let pad = check_range("PadCnt", u32::from(pad), 3)? as u8;
        self.flags = (self.flags & !PAD_MASK) | (pad << PAD_SHIFT);
        Ok(self)
    }

    /// TVer: the transport header version; 0 is the only one defined.
    pub fn tver(&self) -> u8 {
        self.flags & TVER_MASK
    }

    /// The header with another version number (only useful to test receivers); refuses more
    /// than 4 bits.
    pub fn with_tver(mut self, tver: u8) -> Result<Self, OutOfRange> {
        let tver = check_range("TVer", u32::from(tver), u32::from(TVER_MASK))? as u8;
        self.flags = (self.flags & !TVER_MASK) | tver;
        Ok(self)
    }

    /// P_Key: the partition key.
    pub fn pkey(&self) -> u16 {
        self.pkey.get()
    }

    /// The header with another partition key.
    pub fn with_pkey(mut self, pkey: u16) -> Self {
        self.pkey = U16::new(pkey);
        self
    }

    /// FECN: forward explicit congestion notification (set by the network).
    pub fn fecn(&self) -> bool {
        self.qpn.get() & FECN != 0
    }

    /// The header with FECN set or cleared.
    pub fn with_fecn(mut self, on: bool) -> Self {
        self.qpn = U32::new(set_bit(self.qpn.get(), FECN, on));
        self
    }

    /// BECN: backward explicit congestion notification (returned by the receiver of a FECN).
    pub fn becn(&self) -> bool {
        self.qpn.get() & BECN != 0
    }

    /// The header with BECN set or cleared.
    pub fn with_becn(mut self, on: bool) -> Self {
        self.qpn = U32::new(set_bit(self.qpn.get(), BECN, on));
        self
    }

    /// DestQP: the destination queue pair number (24 bits).
    pub fn dest_qp(&self) -> u32 {
        self.qpn.get() & MAX_24
    }

    /// The header with another destination QP; refuses more than 24 bits.
    pub fn with_dest_qp(mut self, qpn: u32) -> Result<Self, OutOfRange> {
        let qpn = check_range("DestQP", qpn, MAX_24)?;
        self.qpn = U32::new((self.qpn.get() & !MAX_24) | qpn);
        Ok(self)
    }

    /// A: the requester asks for an acknowledgement of this packet.
    pub fn ack_req(&self) -> bool {
        self.psn.get() & ACK_REQ != 0
    }

    /// The header with A set or cleared.
    pub fn with_ack_req(mut self, on: bool) -> Self {
        self.psn = U32::new(set_bit(self.psn.get(), ACK_REQ, on));
        self
    }

    /// PSN: the packet sequence number (24 bits).
    pub fn psn(&self) -> u32 {
        self.psn.get() & MAX_24
    }

    /// The header with another PSN; refuses more than 24 bits.
    pub fn with_psn(mut self, psn: u32) -> Result<Self, OutOfRange> {
        let psn = check_range("PSN", psn, MAX_24)?;
        self.psn = U32::new((self.psn.get() & !MAX_24) | psn);
        Ok(self)
    }

    /// The reserved bits resv6a (byte 4, bits 5-0), as received.
    pub fn resv6a(&self) -> u8 {
        ((self.qpn.get() >> 24) & 0x3f) as u8
    }

    /// The reserved bits resv7 (byte 8, bits 6-0), as received.
    pub fn resv7(&self) -> u8 {
        ((self.psn.get() >> 24) & 0x7f) as u8
    }
}

impl fmt::Debug for Bth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bth")
            .field("opcode", &format_args!("{:#04x}", self.opcode))
            .field("se", &self.solicited())
            .field("m", &self.mig_req())
            .field("pad", &self.pad_count())
            .field("tver", &self.tver())
            .field("pkey", &format_args!("{:#06x}", self.pkey()))
            .field("fecn", &self.fecn())
            .field("becn", &self.becn())
            .field("resv6a", &self.resv6a())
            .field("dest_qp", &format_args!("{:#08x}", self.dest_qp()))
            .field("ack_req", &self.ack_req())
            .field("resv7", &self.resv7())
            .field("psn", &format_args!("{:#08x}", self.psn()))
            .finish()
    }
}

/// `value` with the bits of `mask` set or cleared.
fn set_bit<T>(value: T, mask: T, on: bool) -> T
where
    T: core::ops::BitOr<Output = T> + core::ops::BitAnd<Output = T> + core::ops::Not<Output = T>,
{
    if on { value | mask } else { value & !mask }
}
