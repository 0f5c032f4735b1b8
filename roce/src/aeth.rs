//! The ACK Extended Transport Header (IBA 9.3.3.5): the syndrome and MSN a responder returns
//! in ACKNOWLEDGE, ATOMIC ACKNOWLEDGE and the first and last READ responses.
//!
//! ```text
//! byte 0     Syndrome: resv (bit 7) | kind (bits 6-5) | value (bits 4-0)
//! bytes 1-3  MSN (24 bits)
//! ```
//!
//! The syndrome kinds (IBA 9.7.5.1.1): `00` ACK with a 5-bit credit count, `01` RNR NAK with a
//! 5-bit RNR timer code, `11` NAK with an error code; `10` and a set bit 7 are reserved.

use zerocopy::network_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{MAX_24, OutOfRange, check_range};

/// Size of [`Aeth`] on the wire.
pub const LEN: usize = 4;

/// The credit count of an ACK that carries no credits: the responder does not do end-to-end
/// flow control (IBA 9.7.7.2.4, "invalid" credit count).
pub const NO_CREDITS: u8 = 0x1f;

const KIND_SHIFT: u32 = 5;
const KIND_ACK: u8 = 0b00;
const KIND_RNR_NAK: u8 = 0b01;
const KIND_NAK: u8 = 0b11;
const VALUE_MASK: u8 = 0x1f;

/// An ACK Extended Transport Header, in wire layout. The syndrome is kept raw so that a
/// header with a reserved syndrome still round-trips; [`Aeth::syndrome`] decodes it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Aeth {
    /// Syndrome in the top byte, MSN below.
    word: U32,
}

impl Aeth {
    /// A header with `syndrome` and message sequence number `msn`; refuses a 5-bit syndrome
    /// value above 31 or an MSN above 24 bits.
    pub fn new(syndrome: Syndrome, msn: u32) -> Result<Self, OutOfRange> {
        let raw = syndrome.raw()?;
        let msn = check_range("MSN", msn, MAX_24)?;
        Ok(Aeth {
            word: U32::new((u32::from(raw) << 24) | msn),
        })
    }

    /// The syndrome byte as received.
    pub fn raw_syndrome(&self) -> u8 {
        (self.word.get() >> 24) as u8
    }

    /// The decoded syndrome; a reserved encoding is returned as the error, raw.
    pub fn syndrome(&self) -> Result<Syndrome, ReservedSyndrome> {
        Syndrome::from_raw(self.raw_syndrome())
    }

    /// The message sequence number (24 bits).
    pub fn msn(&self) -> u32 {
        self.word.get() & MAX_24
    }
}

/// A decoded AETH syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Syndrome {
    /// Positive acknowledgement, with the responder's credit count (0-30, or [`NO_CREDITS`]).
    Ack {
        /// The 5-bit credit count code.
        credits: u8,
    },
    /// Receiver not ready: retry after the time the 5-bit RNR timer code stands for
    /// (IBA table 45: 0 means 655.36 ms, 1 means 0.01 ms, ... 31 means 491.52 ms).
    RnrNak {
        /// The 5-bit RNR timer code.
        timer: u8,
    },
    /// Negative acknowledgement.
    Nak(NakCode),
}

impl Syndrome {
    /// The syndrome byte; refuses a credit count or timer code above 5 bits.
    pub fn raw(self) -> Result<u8, OutOfRange> {
        let (kind, value) = match self {
            Syndrome::Ack { credits } => (KIND_ACK, credits),
            Syndrome::RnrNak { timer } => (KIND_RNR_NAK, timer),
            Syndrome::Nak(code) => (KIND_NAK, code as u8),
        };
        let field = match self {
            Syndrome::Ack { .. } => "AETH credit count",
            _ => "AETH RNR timer",
        };
        let value = check_range(field, u32::from(value), u32::from(VALUE_MASK))? as u8;
        Ok((kind << KIND_SHIFT) | value)
    }

    /// Decodes a syndrome byte, refusing the reserved encodings (bit 7 set, kind `10`, NAK
    /// codes above 4).
    pub fn from_raw(raw: u8) -> Result<Self, ReservedSyndrome> {
        let value = raw & VALUE_MASK;
        match raw >> KIND_SHIFT {
            k if k == KIND_ACK => Ok(Syndrome::Ack { credits: value }),
            k if k == KIND_RNR_NAK => Ok(Syndrome::RnrNak { timer: value }),
            k if k == KIND_NAK => NakCode::from_raw(value)
                .map(Syndrome::Nak)
                .ok_or(ReservedSyndrome(raw)),
            _ => Err(ReservedSyndrome(raw)),
        }
    }
}

/// The error codes of a NAK syndrome (IBA table 44).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NakCode {
    /// The PSN is ahead of the one expected; the requester resends from the expected PSN.
    PsnSequenceError = 0,
    /// Malformed or unsupported request (bad opcode sequence, length, ...).
    InvalidRequest = 1,
    /// R_Key, address or access rights did not allow the operation.
    RemoteAccessError = 2,
    /// The responder failed for a reason of its own.
    RemoteOperationalError = 3,
    /// Reliable-datagram specific; never sent on RC, decoded for completeness.
    InvalidRdRequest = 4,
}

impl NakCode {
    /// Every defined code, in value order.
    pub const ALL: [NakCode; 5] = [
        NakCode::PsnSequenceError,
        NakCode::InvalidRequest,
        NakCode::RemoteAccessError,
        NakCode::RemoteOperationalError,
        NakCode::InvalidRdRequest,
    ];

    /// The code with the 5-bit value `raw`, if defined.
    pub fn from_raw(raw: u8) -> Option<Self> {
        NakCode::ALL.iter().copied().find(|c| *c as u8 == raw)
    }
}

/// A syndrome byte with a reserved encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("reserved AETH syndrome {0:#04x}")]
pub struct ReservedSyndrome(pub u8);
