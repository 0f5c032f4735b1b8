//! BTH opcodes and what follows the BTH for each (IBA 9.2.1, table 38 "OpCode field", and
//! the header lists of 9.3).
//!
//! The top three bits of an opcode name the transport service (`000` RC, `011` UD), the low
//! five the operation. Only the opcodes the vrdma fabric speaks are defined: all of RC, and
//! SEND ONLY (with immediate) of UD, the only UD operations there are. UC, RD, XRC and CNP
//! packets are [`crate::packet::ParseError::UnknownOpcode`].

use crate::{aeth, atomic, bth, deth, ieth, imm, reth};

/// An extension header that may follow the BTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ext {
    /// [`reth::Reth`], 16 bytes.
    Reth,
    /// [`aeth::Aeth`], 4 bytes.
    Aeth,
    /// [`deth::Deth`], 8 bytes.
    Deth,
    /// [`imm::ImmDt`], 4 bytes.
    ImmDt,
    /// [`ieth::Ieth`], 4 bytes.
    Ieth,
    /// [`atomic::AtomicEth`], 28 bytes.
    AtomicEth,
    /// [`atomic::AtomicAckEth`], 8 bytes.
    AtomicAckEth,
}

impl Ext {
    /// The header's size on the wire.
    pub const fn wire_len(self) -> usize {
        match self {
            Ext::Reth => reth::LEN,
            Ext::Aeth => aeth::LEN,
            Ext::Deth => deth::LEN,
            Ext::ImmDt => imm::LEN,
            Ext::Ieth => ieth::LEN,
            Ext::AtomicEth => atomic::ETH_LEN,
            Ext::AtomicAckEth => atomic::ACK_ETH_LEN,
        }
    }
}

/// What an opcode puts after the BTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The extension headers, in wire order.
    pub headers: &'static [Ext],
    /// Whether a payload may follow the headers (it may still be empty: a zero-length SEND or
    /// WRITE is one packet with no payload bytes).
    pub payload: bool,
}

impl Layout {
    /// BTH plus extension headers, in bytes.
    pub const fn header_len(&self) -> usize {
        // A `while let` over slice patterns: iterators are not available in `const fn`.
        let mut len = bth::LEN;
        let mut rest = self.headers;
        while let [first, tail @ ..] = rest {
            len += first.wire_len();
            rest = tail;
        }
        len
    }
}

macro_rules! opcodes {
    ($(
        $(#[$meta:meta])*
        $name:ident = $value:literal => [$($ext:ident),*], $payload:literal;
    )+) => {
        /// A BTH opcode this crate knows.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Opcode {
            $( $(#[$meta])* $name = $value, )+
        }

        impl Opcode {
            /// Every opcode, in value order.
            pub const ALL: &'static [Opcode] = &[$(Opcode::$name),+];

            /// The opcode with this raw value, if this crate knows it.
            pub const fn from_raw(raw: u8) -> Option<Self> {
                match raw {
                    $( $value => Some(Opcode::$name), )+
                    _ => None,
                }
            }

            /// What follows the BTH for this opcode.
            pub const fn layout(self) -> Layout {
                match self {
                    $( Opcode::$name => Layout {
                        headers: &[$(Ext::$ext),*],
                        payload: $payload,
                    }, )+
                }
            }
        }
    };
}

opcodes! {
    /// RC SEND, first packet of a multi-packet message.
    RcSendFirst = 0x00 => [], true;
    /// RC SEND, middle packet.
    RcSendMiddle = 0x01 => [], true;
    /// RC SEND, last packet.
    RcSendLast = 0x02 => [], true;
    /// RC SEND, last packet, with immediate data.
    RcSendLastWithImm = 0x03 => [ImmDt], true;
    /// RC SEND, single-packet message.
    RcSendOnly = 0x04 => [], true;
    /// RC SEND, single-packet message, with immediate data.
    RcSendOnlyWithImm = 0x05 => [ImmDt], true;
    /// RC RDMA WRITE, first packet (carries the RETH for the whole message).
    RcWriteFirst = 0x06 => [Reth], true;
    /// RC RDMA WRITE, middle packet.
    RcWriteMiddle = 0x07 => [], true;
    /// RC RDMA WRITE, last packet.
    RcWriteLast = 0x08 => [], true;
    /// RC RDMA WRITE, last packet, with immediate data.
    RcWriteLastWithImm = 0x09 => [ImmDt], true;
    /// RC RDMA WRITE, single-packet message.
    RcWriteOnly = 0x0a => [Reth], true;
    /// RC RDMA WRITE, single-packet message, with immediate data.
    RcWriteOnlyWithImm = 0x0b => [Reth, ImmDt], true;
    /// RC RDMA READ request (the RETH says what to read; no payload).
    RcReadRequest = 0x0c => [Reth], false;
    /// RC RDMA READ response, first packet.
    RcReadResponseFirst = 0x0d => [Aeth], true;
    /// RC RDMA READ response, middle packet (no AETH).
    RcReadResponseMiddle = 0x0e => [], true;
    /// RC RDMA READ response, last packet.
    RcReadResponseLast = 0x0f => [Aeth], true;
    /// RC RDMA READ response, single packet.
    RcReadResponseOnly = 0x10 => [Aeth], true;
    /// RC ACKNOWLEDGE (ACK, RNR NAK or NAK, per the AETH syndrome).
    RcAcknowledge = 0x11 => [Aeth], false;
    /// RC ATOMIC ACKNOWLEDGE, the response to an atomic.
    RcAtomicAcknowledge = 0x12 => [Aeth, AtomicAckEth], false;
    /// RC COMPARE_SWAP request.
    RcCompareSwap = 0x13 => [AtomicEth], false;
    /// RC FETCH_ADD request.
    RcFetchAdd = 0x14 => [AtomicEth], false;
    /// RC SEND, last packet, invalidating an R_Key at the responder.
    RcSendLastWithInvalidate = 0x16 => [Ieth], true;
    /// RC SEND, single-packet message, invalidating an R_Key at the responder.
    RcSendOnlyWithInvalidate = 0x17 => [Ieth], true;
    /// UD SEND (UD messages are always a single packet).
    UdSendOnly = 0x64 => [Deth], true;
    /// UD SEND with immediate data.
    UdSendOnlyWithImm = 0x65 => [Deth, ImmDt], true;
}

impl Opcode {
    /// The raw opcode byte.
    pub const fn raw(self) -> u8 {
        self as u8
    }

    /// Whether the opcode belongs to the UD service (else RC).
    pub const fn is_ud(self) -> bool {
        self.raw() >> 5 == 0b011
    }

    /// Whether a responder sends this opcode (READ responses and acknowledgements), as opposed
    /// to a requester.
    pub const fn is_response(self) -> bool {
        matches!(
            self,
            Opcode::RcReadResponseFirst
                | Opcode::RcReadResponseMiddle
                | Opcode::RcReadResponseLast
                | Opcode::RcReadResponseOnly
                | Opcode::RcAcknowledge
                | Opcode::RcAtomicAcknowledge
        )
    }
}
