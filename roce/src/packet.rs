//! Whole RoCEv2 datagrams: [`parse`] checks an untrusted UDP payload and copies its headers
//! out, [`Packet::encode`] writes one into a caller-supplied buffer.
//!
//! A datagram is, in order: the [`Bth`], the extension headers of its opcode
//! ([`Opcode::layout`]), the payload, `PadCnt` pad bytes bringing payload plus pad to a
//! multiple of 4, and the 4-byte ICRC ([`icrc`]). Every header is a multiple of 4 bytes, so a
//! well-formed datagram is too.
//!
//! The parser checks what the packet layer can check on its own (framing, version, opcode,
//! pad, MTU, ICRC) and nothing that needs queue-pair state: PSN windows, opcode sequences,
//! R_Keys, P_Key and Q_Key matching, that FIRST and MIDDLE packets carry exactly one MTU, and
//! AETH syndromes (kept raw, see [`Aeth::syndrome`]) are the transport's business. Reserved
//! bits are not checked (the IBA has receivers ignore them) and are carried through a parse
//! and re-encode unchanged. Pad bytes are ignored on receive and written as zeros.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::aeth::Aeth;
use crate::atomic::{AtomicAckEth, AtomicEth};
use crate::bth::{self, Bth};
use crate::deth::Deth;
use crate::icrc::{self, IpUdp};
use crate::ieth::Ieth;
use crate::imm::ImmDt;
use crate::opcode::{Ext, Opcode};
use crate::reth::Reth;

/// The longest datagram this crate parses or builds: the largest UDP payload an IPv4 header
/// can describe (65535 - 20 - 8). IPv6 could carry 20 bytes more, but no RoCE MTU comes near
/// either and one limit keeps parse and encode symmetric.
pub const MAX_DATAGRAM: usize = u16::MAX as usize - icrc::IPV4_HEADER_LEN - icrc::UDP_HEADER_LEN;

/// The shortest datagram: a BTH and the ICRC.
pub const MIN_DATAGRAM: usize = bth::LEN + icrc::LEN;

/// Whether [`parse`] checks the ICRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IcrcCheck<'a> {
    /// Check it against these IP and UDP headers.
    Verify(&'a IpUdp),
    /// Do not check it (the 4 bytes are still required and stripped): for IPv4 packets whose
    /// Identification the receiver cannot know (see [`icrc`]).
    Skip,
}

/// The extension headers of a packet; exactly those its opcode's layout lists are `Some`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Extensions {
    /// RDMA WRITE FIRST/ONLY and READ request.
    pub reth: Option<Reth>,
    /// READ response FIRST/LAST/ONLY, ACKNOWLEDGE, ATOMIC ACKNOWLEDGE.
    pub aeth: Option<Aeth>,
    /// UD SENDs.
    pub deth: Option<Deth>,
    /// The "with immediate" opcodes.
    pub imm: Option<ImmDt>,
    /// SEND with invalidate.
    pub ieth: Option<Ieth>,
    /// COMPARE_SWAP and FETCH_ADD.
    pub atomic: Option<AtomicEth>,
    /// ATOMIC ACKNOWLEDGE.
    pub atomic_ack: Option<AtomicAckEth>,
}

impl Extensions {
    /// Whether the header `ext` is present.
    pub fn has(&self, ext: Ext) -> bool {
        match ext {
            Ext::Reth => self.reth.is_some(),
            Ext::Aeth => self.aeth.is_some(),
            Ext::Deth => self.deth.is_some(),
            Ext::ImmDt => self.imm.is_some(),
            Ext::Ieth => self.ieth.is_some(),
            Ext::AtomicEth => self.atomic.is_some(),
            Ext::AtomicAckEth => self.atomic_ack.is_some(),
        }
    }

    /// The wire bytes of the header `ext`, if present.
    fn bytes(&self, ext: Ext) -> Option<&[u8]> {
        match ext {
            Ext::Reth => self.reth.as_ref().map(IntoBytes::as_bytes),
            Ext::Aeth => self.aeth.as_ref().map(IntoBytes::as_bytes),
            Ext::Deth => self.deth.as_ref().map(IntoBytes::as_bytes),
            Ext::ImmDt => self.imm.as_ref().map(IntoBytes::as_bytes),
            Ext::Ieth => self.ieth.as_ref().map(IntoBytes::as_bytes),
            Ext::AtomicEth => self.atomic.as_ref().map(IntoBytes::as_bytes),
            Ext::AtomicAckEth => self.atomic_ack.as_ref().map(IntoBytes::as_bytes),
        }
    }

    /// Copies the header `ext` off the front of `rest`.
    fn read(&mut self, ext: Ext, rest: &mut &[u8]) -> Result<(), ParseError> {
        match ext {
            Ext::Reth => self.reth = Some(take(rest)?),
            Ext::Aeth => self.aeth = Some(take(rest)?),
            Ext::Deth => self.deth = Some(take(rest)?),
            Ext::ImmDt => self.imm = Some(take(rest)?),
            Ext::Ieth => self.ieth = Some(take(rest)?),
            Ext::AtomicEth => self.atomic = Some(take(rest)?),
            Ext::AtomicAckEth => self.atomic_ack = Some(take(rest)?),
        }
        Ok(())
    }
}

/// Copies a `T` off the front of `rest` and advances it.
fn take<T: FromBytes + KnownLayout + Immutable>(rest: &mut &[u8]) -> Result<T, ParseError> {
    let (value, tail) = T::read_from_prefix(rest).map_err(|_| ParseError::Truncated)?;
    *rest = tail;
    Ok(value)
}

/// A well-formed packet: a BTH with a known opcode and version 0, exactly the extension
/// headers the opcode calls for, and a payload only where one is allowed. [`parse`] and
/// [`Packet::new`] are the only ways to make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Packet<'a> {
    bth: Bth,
    opcode: Opcode,
    ext: Extensions,
    payload: &'a [u8],
}

/// Why [`parse`] dropped a datagram. Fieldless so that the fabric can keep one counter per
/// reason ([`ParseError::index`]); the datagram itself tells the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// Shorter than a BTH and ICRC, or than the extension headers the opcode calls for.
    #[error("datagram truncated")]
    Truncated,
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram longer than any UDP datagram")]
    Oversized,
    /// The ICRC does not match the datagram and its IP/UDP headers.
    #[error("bad ICRC")]
    BadIcrc,
    /// TVer is not 0.
    #[error("unsupported BTH transport header version")]
    BadVersion,
    /// An opcode this crate does not know (UC, RD, XRC, CNP, reserved, vendor).
    #[error("unknown BTH opcode")]
    UnknownOpcode,
    /// Bytes after the headers of an opcode that carries no payload.
    #[error("payload in a packet whose opcode allows none")]
    PayloadNotAllowed,
    /// Payload plus pad is not a multiple of 4, the pad count exceeds it, or a packet without
    /// payload has a non-zero pad count.
    #[error("pad count inconsistent with the packet length")]
    BadPad,
    /// The payload is longer than the path MTU.
    #[error("payload longer than the path MTU")]
    PayloadTooLong,
}

impl ParseError {
    /// Every reason, in [`ParseError::index`] order.
    pub const ALL: [ParseError; 8] = [
        ParseError::Truncated,
        ParseError::Oversized,
        ParseError::BadIcrc,
        ParseError::BadVersion,
        ParseError::UnknownOpcode,
        ParseError::PayloadNotAllowed,
        ParseError::BadPad,
        ParseError::PayloadTooLong,
    ];

    /// A dense index (`0..ALL.len()`) for per-reason drop counters.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Why [`Packet::new`] refused to build a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BuildError {
    /// The BTH's opcode is not one this crate knows.
    #[error("unknown BTH opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The BTH's TVer is not 0.
    #[error("BTH transport header version {0} is not 0")]
    BadVersion(u8),
    /// The opcode calls for this extension header and it is absent.
    #[error("opcode requires the {0:?} header")]
    MissingHeader(Ext),
    /// The opcode does not carry this extension header and it is present.
    #[error("opcode does not carry the {0:?} header")]
    UnexpectedHeader(Ext),
    /// A non-empty payload for an opcode that carries none.
    #[error("payload for an opcode that allows none")]
    PayloadNotAllowed,
    /// The datagram would be longer than [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes is longer than any UDP datagram")]
    Oversized(usize),
}

/// The buffer given to [`Packet::encode`] cannot hold the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("buffer of {available} bytes cannot hold a {needed}-byte datagram")]
pub struct BufferTooSmall {
    /// [`Packet::encoded_len`].
    pub needed: usize,
    /// The buffer's length.
    pub available: usize,
}

/// Parses an untrusted RoCEv2 UDP payload.
///
/// `mtu` is the path MTU in payload bytes (256 to 4096 for RoCE). Checks run in this order, so
/// that a corrupted datagram counts as corrupted rather than as whatever its corruption
/// looks like: length ([`ParseError::Truncated`], [`ParseError::Oversized`]), ICRC, version,
/// opcode, extension headers, payload and pad, MTU. The headers are copied out; the payload is
/// borrowed from `datagram`.
pub fn parse<'a>(
    datagram: &'a [u8],
    mtu: usize,
    icrc: IcrcCheck<'_>,
) -> Result<Packet<'a>, ParseError> {
    if datagram.len() < MIN_DATAGRAM {
        return Err(ParseError::Truncated);
    }
    if datagram.len() > MAX_DATAGRAM {
        return Err(ParseError::Oversized);
    }
    let (mut rest, stored) = datagram
        .split_last_chunk::<{ icrc::LEN }>()
        .ok_or(ParseError::Truncated)?;
    if let IcrcCheck::Verify(headers) = icrc {
        if icrc::compute(headers, rest) != u32::from_le_bytes(*stored) {
            return Err(ParseError::BadIcrc);
        }
    }

    let bth: Bth = take(&mut rest)?;
    if bth.tver() != bth::TVER {
        return Err(ParseError::BadVersion);
    }
    let opcode = Opcode::from_raw(bth.opcode()).ok_or(ParseError::UnknownOpcode)?;
    let layout = opcode.layout();
    let mut ext = Extensions::default();
    for &header in layout.headers {
        ext.read(header, &mut rest)?;
    }

    // `rest` is now payload and pad.
    let pad = usize::from(bth.pad_count());
    if !layout.payload {
        if !rest.is_empty() {
            return Err(ParseError::PayloadNotAllowed);
        }
        if pad != 0 {
            return Err(ParseError::BadPad);
        }
    }
    if rest.len() % 4 != 0 {
        return Err(ParseError::BadPad);
    }
    let payload = rest
        .len()
        .checked_sub(pad)
        .and_then(|len| rest.get(..len))
        .ok_or(ParseError::BadPad)?;
    if payload.len() > mtu {
        return Err(ParseError::PayloadTooLong);
    }
    Ok(Packet {
        bth,
        opcode,
        ext,
        payload,
    })
}

impl<'a> Packet<'a> {
    /// Checks that `bth`, `ext` and `payload` make a well-formed packet, and sets the BTH's pad
    /// count from the payload length. Everything else in `bth` (reserved bits included) is
    /// sent as given.
    pub fn new(bth: Bth, ext: Extensions, payload: &'a [u8]) -> Result<Self, BuildError> {
        let opcode =
            Opcode::from_raw(bth.opcode()).ok_or(BuildError::UnknownOpcode(bth.opcode()))?;
        if bth.tver() != bth::TVER {
            return Err(BuildError::BadVersion(bth.tver()));
        }
        let layout = opcode.layout();
        for ext_kind in [
            Ext::Reth,
            Ext::Aeth,
            Ext::Deth,
            Ext::ImmDt,
            Ext::Ieth,
            Ext::AtomicEth,
            Ext::AtomicAckEth,
        ] {
            match (layout.headers.contains(&ext_kind), ext.has(ext_kind)) {
                (true, false) => return Err(BuildError::MissingHeader(ext_kind)),
                (false, true) => return Err(BuildError::UnexpectedHeader(ext_kind)),
                _ => {}
            }
        }
        if !layout.payload && !payload.is_empty() {
            return Err(BuildError::PayloadNotAllowed);
        }
        let pad = pad_for(payload.len());
        let len = layout.header_len() + payload.len() + pad + icrc::LEN;
        if len > MAX_DATAGRAM {
            return Err(BuildError::Oversized(len));
        }
        let bth = bth
            .with_pad_count(pad as u8)
            .map_err(|_| BuildError::Oversized(len))?;
        Ok(Packet {
            bth,
            opcode,
            ext,
            payload,
        })
    }

    /// The BTH, with the pad count this packet has.
    pub fn bth(&self) -> &Bth {
        &self.bth
    }

    /// The opcode (the BTH's, decoded).
    pub fn opcode(&self) -> Opcode {
        self.opcode
    }

    /// The extension headers.
    pub fn ext(&self) -> &Extensions {
        &self.ext
    }

    /// The payload, without pad.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The number of pad bytes after the payload.
    pub fn pad_len(&self) -> usize {
        usize::from(self.bth.pad_count())
    }

    /// The length of the encoded datagram (the UDP payload): headers, payload, pad, ICRC.
    pub fn encoded_len(&self) -> usize {
        self.opcode.layout().header_len() + self.payload.len() + self.pad_len() + icrc::LEN
    }

    /// Writes the datagram into the front of `buf`, with zero pad bytes and the ICRC for
    /// `headers`, and returns its length ([`Packet::encoded_len`]). Nothing is allocated.
    pub fn encode(&self, buf: &mut [u8], headers: &IpUdp) -> Result<usize, BufferTooSmall> {
        let needed = self.encoded_len();
        let too_small = BufferTooSmall {
            needed,
            available: buf.len(),
        };
        let datagram = buf.get_mut(..needed).ok_or(too_small)?;
        let mut out = Writer(&mut *datagram);
        out.put(self.bth.as_bytes()).ok_or(too_small)?;
        for &header in self.opcode.layout().headers {
            // `Packet::new` and `parse` guarantee every listed header is present.
            out.put(self.ext.bytes(header).unwrap_or_default())
                .ok_or(too_small)?;
        }
        out.put(self.payload).ok_or(too_small)?;
        out.put(&[0; 3][..self.pad_len().min(3)]).ok_or(too_small)?;
        icrc::seal(headers, datagram);
        Ok(needed)
    }
}

/// The pad that brings `len` to a multiple of 4.
fn pad_for(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Appends to a byte slice without indexing.
struct Writer<'b>(&'b mut [u8]);

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let rest = core::mem::take(&mut self.0);
        let (head, tail) = rest.split_at_mut_checked(bytes.len())?;
        head.copy_from_slice(bytes);
        self.0 = tail;
        Some(())
    }
}
