//! Control-queue commands and their responses.
//!
//! A command is one descriptor chain on the control queue. Its device-readable part is a
//! [`Header`] followed by the command's body (for `REG_MR`, followed by the page list); its
//! device-writable part receives a [`RespHeader`] followed by the response body. Bodies have
//! exactly the sizes given here: a shorter or longer one is `Status::Malformed`.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DecodeError, check_reserved, mr, qp, read_exact, read_prefix};

wire_enum! {
    /// Command opcodes.
    pub enum Opcode: u16 as "command opcode" {
        /// Device attributes; no body; answered with `config::DeviceCaps`.
        QueryDevice = 0x01,
        /// Port attributes; [`QueryPort`]; answered with `config::PortAttr`.
        QueryPort = 0x02,
        /// One GID table entry; [`QueryGid`]; answered with [`QueryGidResp`].
        QueryGid = 0x03,
        /// Allocate a protection domain; no body; answered with [`HandleResp`].
        AllocPd = 0x10,
        /// Free a protection domain; [`Handle`].
        DeallocPd = 0x11,
        /// Register a memory region; [`RegMr`] and its page list; answered with [`RegMrResp`].
        RegMr = 0x20,
        /// Deregister a memory region; [`Handle`] holding its lkey.
        DeregMr = 0x21,
        /// Create a completion queue; [`CreateCq`]; answered with [`CreateCqResp`].
        CreateCq = 0x30,
        /// Destroy a completion queue; [`Handle`].
        DestroyCq = 0x31,
        /// Arm a completion queue; [`ReqNotifyCq`]; answered with [`ReqNotifyCqResp`].
        ReqNotifyCq = 0x32,
        /// Create a queue pair; [`CreateQp`]; answered with [`CreateQpResp`].
        CreateQp = 0x40,
        /// Modify a queue pair; [`ModifyQp`].
        ModifyQp = 0x41,
        /// Query a queue pair; [`Handle`]; answered with [`QueryQpResp`].
        QueryQp = 0x42,
        /// Destroy a queue pair; [`Handle`].
        DestroyQp = 0x43,
        /// Post the receives published on a QP's receive ring to the fabric (with
        /// `features::SYNC_RECV`); [`Handle`].
        PostRecv = 0x44,
        /// Create an address handle; [`CreateAh`]; answered with [`HandleResp`].
        CreateAh = 0x50,
        /// Destroy an address handle; [`Handle`].
        DestroyAh = 0x51,
        /// Create a shared receive queue; [`CreateSrq`]; answered with [`CreateSrqResp`].
        CreateSrq = 0x60,
        /// Modify a shared receive queue; [`ModifySrq`].
        ModifySrq = 0x61,
        /// Query a shared receive queue; [`Handle`]; answered with [`QuerySrqResp`].
        QuerySrq = 0x62,
        /// Destroy a shared receive queue; [`Handle`].
        DestroySrq = 0x63,
        /// Post the receives published on an SRQ's ring to the fabric (with
        /// `features::SYNC_RECV`); [`Handle`] holding the SRQ number.
        PostSrqRecv = 0x64,
    }
}

impl Opcode {
    /// Bytes of the response body that follows [`RespHeader`] on success. The device checks
    /// that the chain's writable part has room for header and body before it executes the
    /// command, so a command is never carried out without its answer reaching the driver.
    pub const fn response_len(self) -> usize {
        use core::mem::size_of;
        match self {
            Opcode::QueryDevice => size_of::<crate::config::DeviceCaps>(),
            Opcode::QueryPort => size_of::<crate::config::PortAttr>(),
            Opcode::QueryGid => size_of::<QueryGidResp>(),
            Opcode::AllocPd | Opcode::CreateAh => size_of::<HandleResp>(),
            Opcode::RegMr => size_of::<RegMrResp>(),
            Opcode::CreateCq => size_of::<CreateCqResp>(),
            Opcode::ReqNotifyCq => size_of::<ReqNotifyCqResp>(),
            Opcode::CreateQp => size_of::<CreateQpResp>(),
            Opcode::QueryQp => size_of::<QueryQpResp>(),
            Opcode::CreateSrq => size_of::<CreateSrqResp>(),
            Opcode::QuerySrq => size_of::<QuerySrqResp>(),
            Opcode::DeallocPd
            | Opcode::DeregMr
            | Opcode::DestroyCq
            | Opcode::ModifyQp
            | Opcode::DestroyQp
            | Opcode::PostRecv
            | Opcode::DestroyAh
            | Opcode::ModifySrq
            | Opcode::DestroySrq
            | Opcode::PostSrqRecv => 0,
        }
    }
}

wire_enum! {
    /// Command completion status. Each maps to the errno verbs would return (see
    /// [`Status::errno`]), so the driver can report a failure as a hardware driver would.
    pub enum Status: u16 as "command status" {
        /// Done.
        Ok = 0,
        /// The chain or body could not be decoded (truncated, trailing bytes, reserved bits or
        /// fields set, unknown enumeration value).
        Malformed = 1,
        /// The opcode is not one this device knows.
        UnknownOpcode = 2,
        /// A field's value is outside what the device or the object allows.
        InvalidArgument = 3,
        /// A handle does not name a live object of this VM (never existed, destroyed, or from an
        /// earlier generation).
        InvalidHandle = 4,
        /// A quota or device limit would be exceeded.
        NoResources = 5,
        /// The object is still in use (a PD with MRs, a CQ or SRQ with QPs).
        Busy = 6,
        /// The QP state machine does not allow this transition or attribute mask.
        InvalidState = 7,
        /// The access rights asked for are inconsistent or not allowed.
        PermissionDenied = 8,
        /// A guest address is not backed by the VM's memory table, or a range crosses the end
        /// of a memory slot.
        BadAddress = 9,
        /// The operation is valid but this device does not implement it.
        NotSupported = 10,
        /// The device failed for a reason of its own; its log says why.
        DeviceError = 11,
    }
}

impl Status {
    /// The errno a verbs call reports for this status.
    pub const fn errno(self) -> i32 {
        // Values from Linux's errno-base.h, which every verbs provider returns.
        match self {
            Status::Ok => 0,
            Status::Malformed | Status::InvalidArgument | Status::InvalidState => 22, // EINVAL
            Status::UnknownOpcode | Status::NotSupported => 95,                       // EOPNOTSUPP
            Status::InvalidHandle => 22,                                              // EINVAL
            Status::NoResources => 12,                                                // ENOMEM
            Status::Busy => 16,                                                       // EBUSY
            Status::PermissionDenied => 13,                                           // EACCES
            Status::BadAddress => 14,                                                 // EFAULT
            Status::DeviceError => 5,                                                 // EIO
        }
    }
}

/// The status a command that fails to decode is answered with: `UnknownOpcode` when the
/// opcode is not one this protocol defines, `Malformed` for every other decoding failure.
impl From<DecodeError> for Status {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::UnknownValue {
                field: "command opcode",
                ..
            } => Status::UnknownOpcode,
            _ => Status::Malformed,
        }
    }
}

/// The header at the start of every command.
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
pub struct Header {
    /// Raw [`Opcode`].
    pub opcode: U16,
    /// Reserved, zero.
    pub flags: U16,
    /// Reserved, zero.
    pub reserved: U32,
}

/// The header at the start of every response.
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
pub struct RespHeader {
    /// Raw [`Status`].
    pub status: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// More about a failure: for `MODIFY_QP` the `qp::AttrMask` bits at fault, for `MODIFY_SRQ`
    /// the `SrqAttrMask` bits at fault; otherwise 0.
    pub detail: U32,
}

impl RespHeader {
    /// A response header with `status` and `detail`.
    pub fn new(status: Status, detail: u32) -> Self {
        RespHeader {
            status: status.raw().into(),
            reserved: 0.into(),
            detail: detail.into(),
        }
    }

    /// Copies and checks a response header (the driver's side).
    pub fn decode(bytes: &[u8]) -> Result<(Self, Status), DecodeError> {
        let (header, _) = read_prefix::<Self>(bytes, "response header")?;
        let status = Status::from_raw(header.status.get())?;
        check_reserved(header.reserved.as_bytes(), "response header reserved")?;
        Ok((header, status))
    }
}

/// Body of commands that name one object: `DEALLOC_PD`, `DEREG_MR` (the lkey), `DESTROY_CQ`,
/// `QUERY_QP`, `DESTROY_QP`, `POST_RECV`, `DESTROY_AH`, `QUERY_SRQ`, `DESTROY_SRQ` and
/// `POST_SRQ_RECV`.
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
pub struct Handle {
    /// The object's handle.
    pub handle: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// Response of commands that create an object named by one handle: `ALLOC_PD`, `CREATE_AH`.
pub type HandleResp = Handle;

/// Body of `QUERY_PORT`.
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
pub struct QueryPort {
    /// Port number; 1.
    pub port_num: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

/// Body of `QUERY_GID`.
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
pub struct QueryGid {
    /// Port number; 1.
    pub port_num: u8,
    /// Reserved, zero.
    pub reserved: [u8; 3],
    /// Index in the GID table.
    pub index: U32,
}

/// Response of `QUERY_GID`.
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
pub struct QueryGidResp {
    /// The GID.
    pub gid: crate::Gid,
    /// Raw `config::GidType`.
    pub gid_type: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

/// Body of `REG_MR`, followed in the chain by `npages` little-endian `u64` guest-physical page
/// addresses.
///
/// The region covers `length` bytes starting `first_page_offset` bytes into the first page.
/// Work requests address it by `iova` (usually the application's virtual address): byte
/// `iova + i` lives at `pages[(first_page_offset + i) >> page_shift]` plus the remainder.
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
pub struct RegMr {
    /// Protection domain.
    pub pdn: U32,
    /// [`mr::Access`] bits.
    pub access: U32,
    /// The address work requests use for the first byte.
    pub iova: U64,
    /// Length in bytes; at least 1.
    pub length: U64,
    /// Offset of the first byte in the first page; less than the page size.
    pub first_page_offset: U32,
    /// Pages in the list: exactly `ceil((first_page_offset + length) / page_size)`.
    pub npages: U32,
    /// log2 of the page size, from `mr::MIN_PAGE_SHIFT` to `mr::MAX_PAGE_SHIFT`.
    pub page_shift: u8,
    /// Reserved, zero.
    pub reserved: [u8; 7],
}

/// Response of `REG_MR`.
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
pub struct RegMrResp {
    /// Key for local access, also the handle for `DEREG_MR`.
    pub lkey: U32,
    /// Key peers use; valid only if remote access was granted.
    pub rkey: U32,
}

/// Body of `CREATE_CQ`.
///
/// The ring (see [`crate::ring`]) must lie in one guest memory slot: `ring::HEADER_SIZE +
/// cqe * cqe::SIZE` bytes at `ring_addr`, which is aligned to 64 bytes.
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
pub struct CreateCq {
    /// Ring entries; a power of two, at most the device's `max_cqe`.
    pub cqe: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Guest-physical address of the ring.
    pub ring_addr: U64,
}

/// Response of `CREATE_CQ`.
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
pub struct CreateCqResp {
    /// CQ number.
    pub cqn: U32,
    /// Entries, as created.
    pub cqe: U32,
}

bitflags::bitflags! {
    /// Flags of `REQ_NOTIFY_CQ` and of a CQ ring's arm word.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct NotifyFlags: u32 {
        /// Notify only for a solicited or error completion (`ibv_req_notify_cq(cq, 1)`).
        const SOLICITED_ONLY = 1 << 0;
    }
}

/// Body of `REQ_NOTIFY_CQ`.
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
pub struct ReqNotifyCq {
    /// CQ number.
    pub cqn: U32,
    /// [`NotifyFlags`] bits.
    pub flags: U32,
}

/// Response of `REQ_NOTIFY_CQ`.
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
pub struct ReqNotifyCqResp {
    /// Completions already in the ring and not yet consumed when the CQ was armed (the driver
    /// must poll them: they will not raise an event).
    pub pending: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// Body of `CREATE_QP`.
///
/// The send ring holds `cap.max_send_wr` slots of `wqe::send_stride(max_send_sge,
/// max_inline_data)` bytes and the receive ring `cap.max_recv_wr` slots of
/// `wqe::recv_stride(max_recv_sge)` bytes, each after a `ring::HEADER_SIZE` header.
///
/// A QP attached to a shared receive queue (`srqn` ≠ 0) has no receive ring of its own:
/// `cap.max_recv_wr`, `cap.max_recv_sge` and `rq_ring_addr` are 0. A driver that attaches no
/// SRQ may send only the first [`CREATE_QP_BASE_SIZE`] bytes (the body before `srqn`), which
/// the device reads as `srqn = 0`, so it works with devices that predate SRQs.
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
pub struct CreateQp {
    /// Protection domain.
    pub pdn: U32,
    /// Raw [`qp::Type`].
    pub qp_type: u8,
    /// 1 if every send WR completes with a CQE, as `ibv_qp_init_attr::sq_sig_all`.
    pub sq_sig_all: u8,
    /// Reserved, zero.
    pub reserved: U16,
    /// CQ for send completions.
    pub send_cqn: U32,
    /// CQ for receive completions (may equal `send_cqn`).
    pub recv_cqn: U32,
    /// Queue sizes.
    pub cap: qp::Caps,
    /// Guest-physical address of the send ring, 64-byte aligned.
    pub sq_ring_addr: U64,
    /// Guest-physical address of the receive ring, 64-byte aligned; 0 with an SRQ.
    pub rq_ring_addr: U64,
    /// The shared receive queue the QP takes its receives from, or 0 for its own receive ring.
    pub srqn: U32,
    /// Reserved, zero.
    pub reserved1: U32,
}

/// Bytes of a `CREATE_QP` body without an SRQ: everything before [`CreateQp::srqn`].
pub const CREATE_QP_BASE_SIZE: usize = core::mem::offset_of!(CreateQp, srqn);

/// Response of `CREATE_QP`.
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
pub struct CreateQpResp {
    /// QP number (24 bits; never 0 or 1, which verbs reserves for the SMI and GSI QPs).
    pub qpn: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// Queue sizes as created.
    pub cap: qp::Caps,
}

/// Body of `MODIFY_QP`.
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
pub struct ModifyQp {
    /// QP number.
    pub qpn: U32,
    /// [`qp::AttrMask`] bits.
    pub attr_mask: U32,
    /// The attributes; only those in the mask are looked at.
    pub attr: qp::Attr,
}

/// Response of `QUERY_QP`.
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
pub struct QueryQpResp {
    /// Current attributes; `qp_state` and `cur_qp_state` both hold the state.
    pub attr: qp::Attr,
    /// Queue sizes.
    pub cap: qp::Caps,
    /// Raw [`qp::Type`].
    pub qp_type: u8,
    /// As created.
    pub sq_sig_all: u8,
    /// Reserved, zero.
    pub reserved: U16,
    /// Send CQ.
    pub send_cqn: U32,
    /// Receive CQ.
    pub recv_cqn: U32,
    /// Protection domain.
    pub pdn: U32,
}

/// Body of `CREATE_AH`.
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
pub struct CreateAh {
    /// Protection domain.
    pub pdn: U32,
    /// Reserved, zero.
    pub reserved: U32,
    /// The address.
    pub attr: qp::AhAttr,
}

/// Body of `CREATE_SRQ`.
///
/// The ring (see [`crate::ring`]) holds `max_wr` receive entries of
/// `wqe::recv_stride(max_sge)` bytes after a `ring::HEADER_SIZE` header, and must lie in one
/// guest memory slot at `ring_addr`, which is aligned to 64 bytes.
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
pub struct CreateSrq {
    /// Protection domain; the lkeys of the SRQ's work requests are checked against it.
    pub pdn: U32,
    /// Ring entries; a power of two, at most the device's `max_srq_wr`.
    pub max_wr: U32,
    /// Most SGEs in one work request, at most the device's `max_srq_sge`.
    pub max_sge: U32,
    /// The limit the SRQ is armed with (0: not armed); at most `max_wr`.
    pub srq_limit: U32,
    /// Guest-physical address of the ring.
    pub ring_addr: U64,
}

/// Response of `CREATE_SRQ`.
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
pub struct CreateSrqResp {
    /// SRQ number.
    pub srqn: U32,
    /// Ring entries, as created.
    pub max_wr: U32,
    /// SGEs per work request, as created.
    pub max_sge: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

bitflags::bitflags! {
    /// Which attributes a `MODIFY_SRQ` sets, with the bit values of `ibv_srq_attr_mask`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct SrqAttrMask: u32 {
        /// `max_wr` (resizing); vrdma does not support it and the device answers
        /// `NotSupported`.
        const MAX_WR = 1 << 0;
        /// `srq_limit`: arm the SRQ limit event (0 disarms it).
        const LIMIT = 1 << 1;
    }
}

/// Body of `MODIFY_SRQ`.
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
pub struct ModifySrq {
    /// SRQ number.
    pub srqn: U32,
    /// [`SrqAttrMask`] bits.
    pub attr_mask: U32,
    /// New ring depth (with `MAX_WR`).
    pub max_wr: U32,
    /// New limit (with `LIMIT`).
    pub srq_limit: U32,
}

/// Response of `QUERY_SRQ`, as `ibv_srq_attr`.
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
pub struct QuerySrqResp {
    /// Ring entries.
    pub max_wr: U32,
    /// SGEs per work request.
    pub max_sge: U32,
    /// The armed limit, or 0 if the SRQ is not armed (a limit event disarms it).
    pub srq_limit: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// A `REG_MR` page list: guest-physical addresses of the pages that back the region, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageList<'a> {
    bytes: &'a [u8],
    page_shift: u8,
}

impl<'a> PageList<'a> {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.bytes.len() / 8
    }

    /// Whether the list is empty (never, for a decoded `REG_MR`).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// log2 of the page size.
    pub fn page_shift(&self) -> u8 {
        self.page_shift
    }

    /// The page addresses, each checked for alignment when the command was decoded.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.bytes.chunks_exact(8).map(|c| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(c);
            u64::from_le_bytes(raw)
        })
    }
}

/// A command decoded and checked for form (not yet against the VM's objects and limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `QUERY_DEVICE`.
    QueryDevice,
    /// `QUERY_PORT`.
    QueryPort(QueryPort),
    /// `QUERY_GID`.
    QueryGid(QueryGid),
    /// `ALLOC_PD`.
    AllocPd,
    /// `DEALLOC_PD` of a PD number.
    DeallocPd(u32),
    /// `REG_MR` with its access rights and page list.
    RegMr {
        /// The body as sent.
        cmd: RegMr,
        /// The decoded access rights.
        access: mr::Access,
        /// The pages.
        pages: PageList<'a>,
    },
    /// `DEREG_MR` of an lkey.
    DeregMr(u32),
    /// `CREATE_CQ`.
    CreateCq(CreateCq),
    /// `DESTROY_CQ` of a CQ number.
    DestroyCq(u32),
    /// `REQ_NOTIFY_CQ`.
    ReqNotifyCq {
        /// CQ number.
        cqn: u32,
        /// Decoded flags.
        flags: NotifyFlags,
    },
    /// `CREATE_QP` with its decoded type.
    CreateQp {
        /// The body as sent.
        cmd: CreateQp,
        /// Its QP type.
        qp_type: qp::Type,
    },
    /// `MODIFY_QP` with its decoded mask.
    ModifyQp {
        /// The body as sent.
        cmd: ModifyQp,
        /// Its attribute mask.
        mask: qp::AttrMask,
    },
    /// `QUERY_QP` of a QP number.
    QueryQp(u32),
    /// `DESTROY_QP` of a QP number.
    DestroyQp(u32),
    /// `POST_RECV` of a QP number.
    PostRecv(u32),
    /// `CREATE_AH`.
    CreateAh(CreateAh),
    /// `DESTROY_AH` of an AH handle.
    DestroyAh(u32),
    /// `CREATE_SRQ`.
    CreateSrq(CreateSrq),
    /// `MODIFY_SRQ` with its decoded mask.
    ModifySrq {
        /// The body as sent.
        cmd: ModifySrq,
        /// Its attribute mask.
        mask: SrqAttrMask,
    },
    /// `QUERY_SRQ` of an SRQ number.
    QuerySrq(u32),
    /// `DESTROY_SRQ` of an SRQ number.
    DestroySrq(u32),
    /// `POST_SRQ_RECV` of an SRQ number.
    PostSrqRecv(u32),
}

impl Request<'_> {
    /// The opcode this request was decoded from.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::QueryDevice => Opcode::QueryDevice,
            Request::QueryPort(_) => Opcode::QueryPort,
            Request::QueryGid(_) => Opcode::QueryGid,
            Request::AllocPd => Opcode::AllocPd,
            Request::DeallocPd(_) => Opcode::DeallocPd,
            Request::RegMr { .. } => Opcode::RegMr,
            Request::DeregMr(_) => Opcode::DeregMr,
            Request::CreateCq(_) => Opcode::CreateCq,
            Request::DestroyCq(_) => Opcode::DestroyCq,
            Request::ReqNotifyCq { .. } => Opcode::ReqNotifyCq,
            Request::CreateQp { .. } => Opcode::CreateQp,
            Request::ModifyQp { .. } => Opcode::ModifyQp,
            Request::QueryQp(_) => Opcode::QueryQp,
            Request::DestroyQp(_) => Opcode::DestroyQp,
            Request::PostRecv(_) => Opcode::PostRecv,
            Request::CreateAh(_) => Opcode::CreateAh,
            Request::DestroyAh(_) => Opcode::DestroyAh,
            Request::CreateSrq(_) => Opcode::CreateSrq,
            Request::ModifySrq { .. } => Opcode::ModifySrq,
            Request::QuerySrq(_) => Opcode::QuerySrq,
            Request::DestroySrq(_) => Opcode::DestroySrq,
            Request::PostSrqRecv(_) => Opcode::PostSrqRecv,
        }
    }
}

/// The most pages one `REG_MR` can carry: 1 GiB of 4 KiB pages.
///
/// A device may advertise less in `config::DeviceCaps::max_mr_pages`; this bound exists so a
/// decoder never has to consider a larger list.
pub const MAX_PAGE_LIST: u32 = 1 << 18;

/// Decodes the device-readable bytes of a control chain: header, body and any page list.
///
/// Fails for anything that is not well formed on its own; whether handles exist and values fit
/// the VM's limits is for the device to check next.
pub fn decode(bytes: &[u8]) -> Result<Request<'_>, DecodeError> {
    let (header, body) = read_prefix::<Header>(bytes, "command header")?;
    check_reserved(header.flags.as_bytes(), "command header flags")?;
    check_reserved(header.reserved.as_bytes(), "command header reserved")?;
    let opcode = Opcode::from_raw(header.opcode.get())?;
    let empty = |what| {
        if body.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                what,
                extra: body.len(),
            })
        }
    };
    let handle = |what| -> Result<u32, DecodeError> {
        let h = read_exact::<Handle>(body, what)?;
        check_reserved(h.reserved.as_bytes(), "handle reserved")?;
        Ok(h.handle.get())
    };
    Ok(match opcode {
        Opcode::QueryDevice => {
            empty("QUERY_DEVICE")?;
            Request::QueryDevice
        }
        Opcode::QueryPort => {
            let q = read_exact::<QueryPort>(body, "QUERY_PORT")?;
            check_reserved(&q.reserved, "QUERY_PORT reserved")?;
            Request::QueryPort(q)
        }
        Opcode::QueryGid => {
            let q = read_exact::<QueryGid>(body, "QUERY_GID")?;
            check_reserved(&q.reserved, "QUERY_GID reserved")?;
            Request::QueryGid(q)
        }
        Opcode::AllocPd => {
            empty("ALLOC_PD")?;
            Request::AllocPd
        }
        Opcode::DeallocPd => Request::DeallocPd(handle("DEALLOC_PD")?),
        Opcode::RegMr => decode_reg_mr(body)?,
        Opcode::DeregMr => Request::DeregMr(handle("DEREG_MR")?),
        Opcode::CreateCq => {
            let c = read_exact::<CreateCq>(body, "CREATE_CQ")?;
            check_reserved(c.reserved.as_bytes(), "CREATE_CQ reserved")?;
            crate::ring::check_depth(c.cqe.get(), "CREATE_CQ cqe")?;
            crate::ring::check_base(c.ring_addr.get(), "CREATE_CQ ring_addr")?;
            Request::CreateCq(c)
        }
        Opcode::DestroyCq => Request::DestroyCq(handle("DESTROY_CQ")?),
        Opcode::ReqNotifyCq => {
            let r = read_exact::<ReqNotifyCq>(body, "REQ_NOTIFY_CQ")?;
            let flags = decode_flags!(NotifyFlags, r.flags.get(), "REQ_NOTIFY_CQ flags")?;
            Request::ReqNotifyCq {
                cqn: r.cqn.get(),
                flags,
            }
        }
        Opcode::CreateQp => decode_create_qp(body)?,
        Opcode::ModifyQp => {
            let m = read_exact::<ModifyQp>(body, "MODIFY_QP")?;
            let mask = decode_flags!(qp::AttrMask, m.attr_mask.get(), "MODIFY_QP attr_mask")?;
            m.attr.validate(mask)?;
            Request::ModifyQp { cmd: m, mask }
        }
        Opcode::QueryQp => Request::QueryQp(handle("QUERY_QP")?),
        Opcode::DestroyQp => Request::DestroyQp(handle("DESTROY_QP")?),
        Opcode::PostRecv => Request::PostRecv(handle("POST_RECV")?),
        Opcode::CreateAh => {
            let c = read_exact::<CreateAh>(body, "CREATE_AH")?;
            check_reserved(c.reserved.as_bytes(), "CREATE_AH reserved")?;
            c.attr.validate()?;
            Request::CreateAh(c)
        }
        Opcode::DestroyAh => Request::DestroyAh(handle("DESTROY_AH")?),
        Opcode::CreateSrq => {
            let c = read_exact::<CreateSrq>(body, "CREATE_SRQ")?;
            crate::ring::check_depth(c.max_wr.get(), "CREATE_SRQ max_wr")?;
            if c.max_sge.get() > crate::wqe::MAX_SGE {
                return Err(DecodeError::TooLarge {
                    field: "CREATE_SRQ max_sge",
                    value: c.max_sge.get().into(),
                    max: crate::wqe::MAX_SGE.into(),
                });
            }
            if c.srq_limit.get() > c.max_wr.get() {
                return Err(DecodeError::Inconsistent {
                    field: "CREATE_SRQ srq_limit",
                    reason: "is larger than max_wr",
                });
            }
            crate::ring::check_base(c.ring_addr.get(), "CREATE_SRQ ring_addr")?;
            Request::CreateSrq(c)
        }
        Opcode::ModifySrq => {
            let m = read_exact::<ModifySrq>(body, "MODIFY_SRQ")?;
            let mask = decode_flags!(SrqAttrMask, m.attr_mask.get(), "MODIFY_SRQ attr_mask")?;
            Request::ModifySrq { cmd: m, mask }
        }
        Opcode::QuerySrq => Request::QuerySrq(handle("QUERY_SRQ")?),
        Opcode::DestroySrq => Request::DestroySrq(handle("DESTROY_SRQ")?),
        Opcode::PostSrqRecv => Request::PostSrqRecv(handle("POST_SRQ_RECV")?),
    })
}

/// `CREATE_QP`, in its full form or its [`CREATE_QP_BASE_SIZE`]-byte form without `srqn`.
fn decode_create_qp(body: &[u8]) -> Result<Request<'_>, DecodeError> {
    let c = if body.len() == CREATE_QP_BASE_SIZE {
        let mut whole = [0u8; core::mem::size_of::<CreateQp>()];
        whole[..CREATE_QP_BASE_SIZE].copy_from_slice(body);
        read_exact::<CreateQp>(&whole, "CREATE_QP")?
    } else {
        read_exact::<CreateQp>(body, "CREATE_QP")?
    };
    check_reserved(c.reserved.as_bytes(), "CREATE_QP reserved")?;
    check_reserved(c.reserved1.as_bytes(), "CREATE_QP reserved1")?;
    check_reserved(c.cap.reserved.as_bytes(), "CREATE_QP cap.reserved")?;
    let qp_type = qp::Type::from_raw(c.qp_type)?;
    if c.sq_sig_all > 1 {
        return Err(DecodeError::UnknownValue {
            field: "CREATE_QP sq_sig_all",
            value: c.sq_sig_all.into(),
        });
    }
    crate::ring::check_depth(c.cap.max_send_wr.get(), "CREATE_QP max_send_wr")?;
    crate::ring::check_base(c.sq_ring_addr.get(), "CREATE_QP sq_ring_addr")?;
    if c.srqn.get() == 0 {
        crate::ring::check_depth(c.cap.max_recv_wr.get(), "CREATE_QP max_recv_wr")?;
        crate::ring::check_base(c.rq_ring_addr.get(), "CREATE_QP rq_ring_addr")?;
    } else if c.cap.max_recv_wr.get() != 0
        || c.cap.max_recv_sge.get() != 0
        || c.rq_ring_addr.get() != 0
    {
        return Err(DecodeError::Inconsistent {
            field: "CREATE_QP srqn",
            reason: "a QP with an SRQ has no receive ring: max_recv_wr, max_recv_sge and rq_ring_addr must be 0",
        });
    }
    crate::wqe::check_queue_shape(&c.cap)?;
    Ok(Request::CreateQp { cmd: c, qp_type })
}

fn decode_reg_mr(body: &[u8]) -> Result<Request<'_>, DecodeError> {
    let (cmd, list) = read_prefix::<RegMr>(body, "REG_MR")?;
    check_reserved(&cmd.reserved, "REG_MR reserved")?;
    let access = decode_flags!(mr::Access, cmd.access.get(), "REG_MR access")?;
    if !access.is_consistent() {
        return Err(DecodeError::Inconsistent {
            field: "REG_MR access",
            reason: "remote write or atomic access needs local write",
        });
    }
    let shift = cmd.page_shift;
    if !(mr::MIN_PAGE_SHIFT..=mr::MAX_PAGE_SHIFT).contains(&shift) {
        return Err(DecodeError::UnknownValue {
            field: "REG_MR page_shift",
            value: shift.into(),
        });
    }
    let page_size = 1u64 << shift;
    let length = cmd.length.get();
    if length == 0 {
        return Err(DecodeError::Inconsistent {
            field: "REG_MR length",
            reason: "is zero",
        });
    }
    let offset = u64::from(cmd.first_page_offset.get());
    if offset >= page_size {
        return Err(DecodeError::TooLarge {
            field: "REG_MR first_page_offset",
            value: offset,
            max: page_size - 1,
        });
    }
    cmd.iova
        .get()
        .checked_add(length - 1)
        .ok_or(DecodeError::Overflow {
            field: "REG_MR iova",
        })?;
    let span = offset.checked_add(length).ok_or(DecodeError::Overflow {
        field: "REG_MR length",
    })?;
    let needed = span.div_ceil(page_size);
    let npages = u64::from(cmd.npages.get());
    if npages != needed {
        return Err(DecodeError::Inconsistent {
            field: "REG_MR npages",
            reason: "does not equal ceil((first_page_offset + length) / page size)",
        });
    }
    if npages > u64::from(MAX_PAGE_LIST) {
        return Err(DecodeError::TooLarge {
            field: "REG_MR npages",
            value: npages,
            max: MAX_PAGE_LIST.into(),
        });
    }
    // npages <= MAX_PAGE_LIST, so the product cannot overflow.
    let list_len = npages as usize * 8;
    if list.len() < list_len {
        return Err(DecodeError::Truncated {
            what: "REG_MR page list",
            need: list_len,
            got: list.len(),
        });
    }
    if list.len() > list_len {
        return Err(DecodeError::Trailing {
            what: "REG_MR page list",
            extra: list.len() - list_len,
        });
    }
    let pages = PageList {
        bytes: list,
        page_shift: shift,
    };
    for page in pages.iter() {
        if page & (page_size - 1) != 0 {
            return Err(DecodeError::Misaligned {
                field: "REG_MR page",
                value: page,
                align: page_size,
            });
        }
        page.checked_add(page_size - 1)
            .ok_or(DecodeError::Overflow {
                field: "REG_MR page",
            })?;
    }
    Ok(Request::RegMr { cmd, access, pages })
}

/// Encodes a command header for `opcode` (the driver's side).
pub fn header(opcode: Opcode) -> Header {
    Header {
        opcode: opcode.raw().into(),
        flags: 0.into(),
        reserved: 0.into(),
    }
}
