//! Completion-queue entries.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DecodeError, Gid, check_reserved, read_prefix};

/// Size of one [`Cqe`], and so the stride of every completion ring.
pub const SIZE: u32 = 64;

wire_enum! {
    /// Completion status, with the values and meanings of `ibv_wc_status`.
    pub enum Status: u8 as "completion status" {
        /// The work request completed.
        Success = 0,
        /// Local length error: a receive buffer too small, or an SGE list too long for the QP.
        LocLenErr = 1,
        /// Local QP operation error: a malformed work request or one the QP cannot perform.
        LocQpOpErr = 2,
        /// Local EE context operation error (not used).
        LocEecOpErr = 3,
        /// Local protection error: an SGE outside its MR, a bad lkey, or a PD mismatch.
        LocProtErr = 4,
        /// The QP was in, or went into, the error state before this work request ran.
        WrFlushErr = 5,
        /// Memory window bind error (not used).
        MwBindErr = 6,
        /// Bad response from the responder.
        BadRespErr = 7,
        /// Local access error: the local MR lacks the access the operation needs.
        LocAccessErr = 8,
        /// Remote invalid request: the responder found the request malformed (e.g. an
        /// unaligned atomic, a message longer than the responder allows, an opcode its QP type
        /// does not allow).
        RemInvReqErr = 9,
        /// Remote access error: bad rkey, out of the remote MR's bounds, wrong PD, or missing
        /// remote access rights.
        RemAccessErr = 10,
        /// Remote operation error: the responder could not complete the operation (e.g. its
        /// receive buffer was too small).
        RemOpErr = 11,
        /// Transport retries exhausted: the peer did not answer.
        RetryExcErr = 12,
        /// RNR retries exhausted: the peer had no receive posted.
        RnrRetryExcErr = 13,
        /// Local RDD violation (not used).
        LocRddViolErr = 14,
        /// Remote invalid RD request (not used).
        RemInvRdReqErr = 15,
        /// The remote side aborted the operation.
        RemAbortErr = 16,
        /// Invalid EE context number (not used).
        InvEecnErr = 17,
        /// Invalid EE context state (not used).
        InvEecStateErr = 18,
        /// Fatal error.
        FatalErr = 19,
        /// Response timeout.
        RespTimeoutErr = 20,
        /// General error.
        GeneralErr = 21,
    }
}

wire_enum! {
    /// What completed, with the values of `ibv_wc_opcode`.
    pub enum Opcode: u8 as "completion opcode" {
        /// A SEND or SEND_WITH_IMM.
        Send = 0,
        /// An RDMA WRITE (with or without immediate).
        RdmaWrite = 1,
        /// An RDMA READ.
        RdmaRead = 2,
        /// A compare-and-swap.
        CompSwap = 3,
        /// A fetch-and-add.
        FetchAdd = 4,
        /// A receive consumed by a SEND.
        Recv = 128,
        /// A receive consumed by an RDMA WRITE with immediate.
        RecvRdmaWithImm = 129,
    }
}

impl Opcode {
    /// The completion opcode of a send work request's opcode.
    pub const fn of_send(op: crate::wqe::Opcode) -> Self {
        use crate::wqe::Opcode as W;
        match op {
            W::Send | W::SendWithImm => Opcode::Send,
            W::RdmaWrite | W::RdmaWriteWithImm => Opcode::RdmaWrite,
            W::RdmaRead => Opcode::RdmaRead,
            W::AtomicCmpAndSwp => Opcode::CompSwap,
            W::AtomicFetchAndAdd => Opcode::FetchAdd,
        }
    }
}

bitflags::bitflags! {
    /// Completion flags, with the bit values of `ibv_wc_flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Flags: u8 {
        /// A GRH is in the first 40 bytes of the receive buffer (UD).
        const GRH = 1 << 0;
        /// `imm_data` is valid.
        const WITH_IMM = 1 << 1;
    }
}

/// One completion, as `ibv_wc` plus the source GID of a UD receive.
///
/// Fields other than `wr_id`, `status`, `opcode`, `qp_num` and `vendor_err` are valid only
/// when `status` is `Success`, as in verbs.
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
pub struct Cqe {
    /// The work request's `wr_id`.
    pub wr_id: U64,
    /// The local QP.
    pub qp_num: U32,
    /// The sender's QP (UD receives).
    pub src_qp: U32,
    /// Bytes transferred (receives, READs, atomics).
    pub byte_len: U32,
    /// Immediate data when `WITH_IMM`, as sent.
    pub imm_data: [u8; 4],
    /// Raw [`Status`].
    pub status: u8,
    /// Raw [`Opcode`].
    pub opcode: u8,
    /// [`Flags`] bits.
    pub wc_flags: u8,
    /// Service level of the received packet.
    pub sl: u8,
    /// Device-specific detail of an error; see docs/protocol.md for the values vrdma uses.
    pub vendor_err: U32,
    /// The sender's GID (UD receives), the same as in the GRH written to the buffer.
    pub sgid: Gid,
    /// P_Key index; 0.
    pub pkey_index: U16,
    /// Source LID; 0 on RoCE.
    pub slid: U16,
    /// Reserved, zero.
    pub reserved: [u8; 12],
}

/// A completion decoded from a ring slot (the driver's side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The entry as copied.
    pub cqe: Cqe,
    /// Its status.
    pub status: Status,
    /// Its opcode.
    pub opcode: Opcode,
    /// Its flags.
    pub flags: Flags,
}

impl Cqe {
    /// Copies and checks a completion.
    pub fn decode(bytes: &[u8]) -> Result<Completion, DecodeError> {
        let (cqe, _) = read_prefix::<Cqe>(bytes, "completion")?;
        let status = Status::from_raw(cqe.status)?;
        let opcode = Opcode::from_raw(cqe.opcode)?;
        let flags = decode_flags!(Flags, cqe.wc_flags, "completion flags")?;
        check_reserved(&cqe.reserved, "completion reserved")?;
        Ok(Completion {
            cqe,
            status,
            opcode,
            flags,
        })
    }
}

wire_enum! {
    /// vrdma's values for [`Cqe::vendor_err`]: the precise reason behind an error status, so
    /// an operator reading a failed completion knows what the device found.
    pub enum VendorErr: u32 as "vendor error" {
        /// No detail (successful completions, and flushes).
        None = 0,
        /// The work request could not be decoded (unknown opcode, reserved bits, too many SGEs).
        MalformedWqe = 1,
        /// An lkey names no MR of this VM.
        BadLkey = 2,
        /// An SGE reaches outside its MR.
        SgeOutOfBounds = 3,
        /// An MR or AH belongs to another PD than the QP.
        PdMismatch = 4,
        /// An MR lacks the local access the operation needs.
        LocalAccess = 5,
        /// The rkey names no MR of the target VM.
        BadRkey = 6,
        /// The remote range reaches outside the remote MR.
        RemoteOutOfBounds = 7,
        /// The remote MR or QP lacks the remote access the operation needs.
        RemoteAccess = 8,
        /// A guest address is no longer backed by the VM's memory table.
        GuestMemory = 9,
        /// The peer had no receive posted for `rnr_retry` attempts.
        RnrExhausted = 10,
        /// The peer QP is gone or unreachable (transport retries exhausted).
        PeerUnreachable = 11,
        /// The receive buffer is smaller than the message.
        RecvTooSmall = 12,
        /// The opcode is not allowed on this QP type or state.
        BadOpcodeForQp = 13,
        /// The address handle names no AH of this VM.
        BadAh = 14,
        /// An atomic's remote address is not 8-byte aligned, or its length is not 8.
        BadAtomic = 15,
        /// The producer index ran more than the ring's depth ahead.
        RingOverrun = 16,
        /// The message is larger than the port's `max_msg_sz`.
        MessageTooLong = 17,
        /// Q_Key mismatch on a UD receive (the datagram is dropped; reported only in counters).
        QkeyMismatch = 18,
    }
}
