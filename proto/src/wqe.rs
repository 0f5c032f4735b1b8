//! Work-queue entries: send and receive work requests as they sit in a QP's rings.
//!
//! A send entry is a 64-byte [`SendHeader`] followed either by `num_sge` [`Sge`]s or by
//! `inline_len` bytes of inline data; a receive entry is a 16-byte [`RecvHeader`] followed by
//! `num_sge` [`Sge`]s. Entry sizes (ring strides) follow from the QP's capabilities through
//! [`send_stride`] and [`recv_stride`], so driver and device agree on them without a field.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DecodeError, check_reserved, qp, read_prefix};

wire_enum! {
    /// Send work-request opcode, with the values of `ibv_wr_opcode`.
    pub enum Opcode: u8 as "send opcode" {
        /// Write local data into a remote MR.
        RdmaWrite = 0,
        /// RDMA WRITE that also consumes a remote receive and delivers immediate data.
        RdmaWriteWithImm = 1,
        /// Send to the next remote receive.
        Send = 2,
        /// SEND with immediate data.
        SendWithImm = 3,
        /// Read from a remote MR into local buffers.
        RdmaRead = 4,
        /// 8-byte compare-and-swap on a remote MR.
        AtomicCmpAndSwp = 5,
        /// 8-byte fetch-and-add on a remote MR.
        AtomicFetchAndAdd = 6,
    }
}

impl Opcode {
    /// Whether the opcode carries immediate data.
    pub const fn has_imm(self) -> bool {
        matches!(self, Opcode::RdmaWriteWithImm | Opcode::SendWithImm)
    }

    /// Whether the opcode addresses a remote MR by `remote_addr` and `rkey`.
    pub const fn is_rdma(self) -> bool {
        !matches!(self, Opcode::Send | Opcode::SendWithImm)
    }

    /// Whether the opcode is an atomic.
    pub const fn is_atomic(self) -> bool {
        matches!(self, Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd)
    }

    /// Whether the opcode moves data into local buffers (so its SGEs need local write).
    pub const fn writes_local(self) -> bool {
        matches!(
            self,
            Opcode::RdmaRead | Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd
        )
    }

    /// Whether UD QPs may post this opcode (only SEND and SEND_WITH_IMM).
    pub const fn allowed_on_ud(self) -> bool {
        matches!(self, Opcode::Send | Opcode::SendWithImm)
    }
}

bitflags::bitflags! {
    /// Send flags, with the bit values of `ibv_send_flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct SendFlags: u8 {
        /// Wait for earlier RDMA READs and atomics to complete first.
        const FENCE = 1 << 0;
        /// Generate a completion (always, if the QP was created with `sq_sig_all`).
        const SIGNALED = 1 << 1;
        /// Ask the receiver's CQ to raise a solicited event.
        const SOLICITED = 1 << 2;
        /// The payload is inline in the entry instead of in SGEs.
        const INLINE = 1 << 3;
    }
}

/// Size of [`SendHeader`].
pub const SEND_HEADER_SIZE: u32 = 64;
/// Size of [`RecvHeader`].
pub const RECV_HEADER_SIZE: u32 = 16;
/// Size of [`Sge`].
pub const SGE_SIZE: u32 = 16;
/// The most SGEs a work request can carry in this protocol.
pub const MAX_SGE: u32 = 32;
/// The most inline bytes a send work request can carry in this protocol.
pub const MAX_INLINE: u32 = 1024;
/// Size of the payload of an atomic operation.
pub const ATOMIC_SIZE: u32 = 8;

/// The fixed part of a send work request.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct SendHeader {
    /// Returned in the completion.
    pub wr_id: U64,
    /// Raw [`Opcode`].
    pub opcode: u8,
    /// [`SendFlags`] bits.
    pub send_flags: u8,
    /// SGEs after the header; 0 for inline.
    pub num_sge: U16,
    /// Immediate data, the four bytes verbs' `imm_data` holds (network order), carried as-is.
    pub imm_data: [u8; 4],
    /// Inline bytes after the header; 0 unless `INLINE`.
    pub inline_len: U32,
    /// Remote key (RDMA and atomics).
    pub rkey: U32,
    /// Remote address (RDMA and atomics).
    pub remote_addr: U64,
    /// Compare value (compare-and-swap) or addend (fetch-and-add).
    pub compare_add: U64,
    /// Swap value (compare-and-swap).
    pub swap: U64,
    /// Address handle (UD).
    pub ah: U32,
    /// Destination QPN (UD).
    pub remote_qpn: U32,
    /// Q_Key (UD).
    pub remote_qkey: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// A scatter/gather entry: `length` bytes at `addr` in the MR `lkey` names.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Sge {
    /// Address in the MR's iova space.
    pub addr: U64,
    /// Bytes.
    pub length: U32,
    /// The MR's lkey.
    pub lkey: U32,
}

impl Sge {
    /// An SGE of `length` bytes at `addr` in MR `lkey`.
    pub fn new(addr: u64, length: u32, lkey: u32) -> Self {
        Sge {
            addr: addr.into(),
            length: length.into(),
            lkey: lkey.into(),
        }
    }
}

/// The fixed part of a receive work request.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct RecvHeader {
    /// Returned in the completion.
    pub wr_id: U64,
    /// SGEs after the header.
    pub num_sge: U16,
    /// Reserved, zero.
    pub reserved: [u8; 6],
}

const fn round_up_pow2(n: u32) -> u32 {
    n.next_power_of_two()
}

/// The send-ring stride for a QP with these limits: room for the header and the larger of its
/// SGEs and its inline data, rounded up to a power of two.
pub const fn send_stride(max_send_sge: u32, max_inline_data: u32) -> u32 {
    let sges = max_send_sge * SGE_SIZE;
    let inline = max_inline_data.div_ceil(SGE_SIZE) * SGE_SIZE;
    let body = if sges > inline { sges } else { inline };
    round_up_pow2(SEND_HEADER_SIZE + body)
}

/// The receive-ring stride for a QP with this limit.
pub const fn recv_stride(max_recv_sge: u32) -> u32 {
    round_up_pow2(RECV_HEADER_SIZE + max_recv_sge * SGE_SIZE)
}

/// Checks the SGE and inline limits of a `CREATE_QP` against this protocol's bounds.
pub fn check_queue_shape(cap: &qp::Caps) -> Result<(), DecodeError> {
    let limits = [
        ("max_send_sge", cap.max_send_sge.get(), MAX_SGE),
        ("max_recv_sge", cap.max_recv_sge.get(), MAX_SGE),
        ("max_inline_data", cap.max_inline_data.get(), MAX_INLINE),
    ];
    for (field, value, max) in limits {
        if value > max {
            return Err(DecodeError::TooLarge {
                field,
                value: value.into(),
                max: max.into(),
            });
        }
    }
    Ok(())
}

/// What a QP allows in one work request, fixed when it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most SGEs.
    pub max_sge: u32,
    /// Most inline bytes (send queues).
    pub max_inline: u32,
}

/// The SGEs of a decoded work request, still as bytes copied from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgeList<'a> {
    bytes: &'a [u8],
}

impl<'a> SgeList<'a> {
    /// Number of SGEs.
    pub fn len(&self) -> usize {
        self.bytes.len() / SGE_SIZE as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes the SGEs cover together; a sum past 32 bits is an error, as a message cannot be
    /// longer.
    pub fn total_len(&self) -> Result<u32, DecodeError> {
        self.iter().try_fold(0u32, |total, sge| {
            total
                .checked_add(sge.length.get())
                .ok_or(DecodeError::Overflow {
                    field: "SGE lengths",
                })
        })
    }

    /// The SGEs.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Sge> + 'a {
        self.bytes.chunks_exact(SGE_SIZE as usize).map(|c| {
            // chunks_exact yields exactly SGE_SIZE bytes, which is Sge's size.
            Sge::read_from_bytes(c).unwrap_or_default()
        })
    }
}

/// Where a send work request's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// In the MRs the SGEs name.
    Sges(SgeList<'a>),
    /// Inline, copied into the entry.
    Inline(&'a [u8]),
}

/// A send work request decoded from a ring slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWr<'a> {
    /// The header as copied, for the fields below the decoded ones.
    pub header: SendHeader,
    /// Decoded opcode.
    pub opcode: Opcode,
    /// Decoded flags.
    pub flags: SendFlags,
    /// The payload.
    pub payload: Payload<'a>,
    /// Payload bytes in total (SGE lengths summed, or the inline length).
    pub byte_len: u32,
}

/// Decodes the send work request in `slot` (bytes already copied out of the ring).
///
/// Checks form only: opcode, flags, reserved fields, SGE count and inline length against the
/// QP's limits, and that the payload length fits in 32 bits. Keys, addresses and access
/// rights are the device's to check against the VM's MRs.
pub fn decode_send(slot: &[u8], limits: Limits) -> Result<SendWr<'_>, DecodeError> {
    let (header, body) = read_prefix::<SendHeader>(slot, "send work request")?;
    let opcode = Opcode::from_raw(header.opcode)?;
    let flags = decode_flags!(SendFlags, header.send_flags, "send flags")?;
    check_reserved(header.reserved.as_bytes(), "send work request reserved")?;
    let num_sge = u32::from(header.num_sge.get());
    let inline_len = header.inline_len.get();
    let (payload, byte_len) = if flags.contains(SendFlags::INLINE) {
        if opcode.writes_local() {
            return Err(DecodeError::Inconsistent {
                field: "send flags",
                reason: "INLINE is only for SEND and RDMA WRITE",
            });
        }
        if num_sge != 0 {
            return Err(DecodeError::Inconsistent {
                field: "num_sge",
                reason: "an inline work request has no SGEs",
            });
        }
        if inline_len > limits.max_inline {
            return Err(DecodeError::TooLarge {
                field: "inline_len",
                value: inline_len.into(),
                max: limits.max_inline.into(),
            });
        }
        let data = body
            .get(..inline_len as usize)
            .ok_or(DecodeError::Truncated {
                what: "inline data",
                need: inline_len as usize,
                got: body.len(),
            })?;
        (Payload::Inline(data), inline_len)
    } else {
        if inline_len != 0 {
            return Err(DecodeError::Inconsistent {
                field: "inline_len",
                reason: "set without the INLINE flag",
            });
        }
        let sges = sge_list(body, num_sge, limits.max_sge)?;
        let total = sges.total_len()?;
        (Payload::Sges(sges), total)
    };
    Ok(SendWr {
        header,
        opcode,
        flags,
        payload,
        byte_len,
    })
}

/// A receive work request decoded from a ring slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvWr<'a> {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Where received data goes.
    pub sges: SgeList<'a>,
    /// Room in bytes, the SGE lengths summed.
    pub byte_len: u32,
}

/// Decodes the receive work request in `slot`.
pub fn decode_recv(slot: &[u8], max_sge: u32) -> Result<RecvWr<'_>, DecodeError> {
    let (header, body) = read_prefix::<RecvHeader>(slot, "receive work request")?;
    check_reserved(&header.reserved, "receive work request reserved")?;
    let sges = sge_list(body, header.num_sge.get().into(), max_sge)?;
    let total = sges.total_len()?;
    Ok(RecvWr {
        wr_id: header.wr_id.get(),
        sges,
        byte_len: total,
    })
}

fn sge_list(body: &[u8], num_sge: u32, max_sge: u32) -> Result<SgeList<'_>, DecodeError> {
    if num_sge > max_sge {
        return Err(DecodeError::TooLarge {
            field: "num_sge",
            value: num_sge.into(),
            max: max_sge.into(),
        });
    }
    let len = num_sge as usize * SGE_SIZE as usize;
    let bytes = body.get(..len).ok_or(DecodeError::Truncated {
        what: "SGE list",
        need: len,
        got: body.len(),
    })?;
    Ok(SgeList { bytes })
}

/// What to put after a send header when encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data<'a> {
    /// Scatter/gather entries.
    Sges(&'a [Sge]),
    /// Inline bytes.
    Inline(&'a [u8]),
}

/// Writes a send work request into `slot` (the driver's side), setting `num_sge`,
/// `inline_len` and the `INLINE` flag from `data` so they cannot disagree. Returns the bytes
/// written.
pub fn encode_send(
    slot: &mut [u8],
    mut header: SendHeader,
    data: Data<'_>,
) -> Result<usize, DecodeError> {
    let body: &[u8] = match data {
        Data::Sges(sges) => {
            let n = u16::try_from(sges.len()).map_err(|_| DecodeError::TooLarge {
                field: "num_sge",
                value: sges.len() as u64,
                max: MAX_SGE.into(),
            })?;
            header.num_sge = n.into();
            header.inline_len = 0.into();
            header.send_flags &= !SendFlags::INLINE.bits();
            sges.as_bytes()
        }
        Data::Inline(bytes) => {
            let n = u32::try_from(bytes.len()).map_err(|_| DecodeError::TooLarge {
                field: "inline_len",
                value: bytes.len() as u64,
                max: MAX_INLINE.into(),
            })?;
            header.num_sge = 0.into();
            header.inline_len = n.into();
            header.send_flags |= SendFlags::INLINE.bits();
            bytes
        }
    };
    write_entry(slot, header.as_bytes(), body, "send work request")
}

/// Writes a receive work request into `slot`. Returns the bytes written.
pub fn encode_recv(slot: &mut [u8], wr_id: u64, sges: &[Sge]) -> Result<usize, DecodeError> {
    let n = u16::try_from(sges.len()).map_err(|_| DecodeError::TooLarge {
        field: "num_sge",
        value: sges.len() as u64,
        max: MAX_SGE.into(),
    })?;
    let header = RecvHeader {
        wr_id: wr_id.into(),
        num_sge: n.into(),
        reserved: [0; 6],
    };
    write_entry(
        slot,
        header.as_bytes(),
        sges.as_bytes(),
        "receive work request",
    )
}

fn write_entry(
    slot: &mut [u8],
    head: &[u8],
    body: &[u8],
    what: &'static str,
) -> Result<usize, DecodeError> {
    let total = head.len() + body.len();
    let got = slot.len();
    let dst = slot.get_mut(..total).ok_or(DecodeError::Truncated {
        what,
        need: total,
        got,
    })?;
    dst[..head.len()].copy_from_slice(head);
    dst[head.len()..].copy_from_slice(body);
    Ok(total)
}
