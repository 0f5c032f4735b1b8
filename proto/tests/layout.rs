//! Golden layout tests for every wire struct of protocol version 1.
//!
//! Each table below is derived by hand from the field list of the struct: every integer is a
//! little-endian byte array of alignment 1 (`U16` = 2, `U32` = 4, `U64` = 8 bytes, `Gid` = 16),
//! so fields follow each other with no padding. A field that is reordered, resized, inserted
//! or removed changes an offset or the size and fails here; the wire format is the contract
//! between two independently built programs, so it may only change with the protocol version
//! (or grow at its end under a feature bit, as the SRQ fields of `Config` and `CreateQp` do,
//! where the shorter form stays valid).

use std::mem::offset_of;

use vrdma_proto::cmd;
use vrdma_proto::config;
use vrdma_proto::cqe;
use vrdma_proto::doorbell;
use vrdma_proto::event;
use vrdma_proto::qp;
use vrdma_proto::ring;
use vrdma_proto::wqe;
use vrdma_proto::{Gid, features};
use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32, U64};

/// Checks a struct's size, alignment and the offset and type of each of its fields.
///
/// `field: Type = offset` rows must list every field in declaration order. The macro checks
/// (at compile time) that each field has the type the row names, that the rows tile the
/// struct without gap or overlap (so the hand-written table is self-consistent), and that the
/// compiler put each field at the literal offset.
macro_rules! assert_layout {
    ($ty:ty, size = $size:literal, [$($field:tt : $fty:ty = $off:literal),+ $(,)?]) => {{
        assert_eq!(size_of::<$ty>(), $size, "size of {}", stringify!($ty));
        assert_eq!(align_of::<$ty>(), 1, "alignment of {}", stringify!($ty));
        let mut next = 0usize;
        $(
            {
                // Compile-time check that the field has the type the table names.
                fn field_type(s: &$ty) -> &$fty {
                    &s.$field
                }
                let _ = field_type;
            }
            assert_eq!(
                $off, next,
                "table for {} is not contiguous at field {}",
                stringify!($ty), stringify!($field)
            );
            assert_eq!(
                offset_of!($ty, $field), $off,
                "offset of {}::{}", stringify!($ty), stringify!($field)
            );
            assert_eq!(align_of::<$fty>(), 1, "alignment of {}::{}", stringify!($ty), stringify!($field));
            next += size_of::<$fty>();
        )+
        assert_eq!(next, $size, "the fields of {} do not fill it", stringify!($ty));
    }};
}

#[test]
fn primitive_sizes() {
    // The building blocks the tables below rely on.
    assert_eq!((size_of::<U16>(), align_of::<U16>()), (2, 1));
    assert_eq!((size_of::<U32>(), align_of::<U32>()), (4, 1));
    assert_eq!((size_of::<U64>(), align_of::<U64>()), (8, 1));
}

#[test]
fn gid_layout() {
    assert_layout!(Gid, size = 16, [0: [u8; 16] = 0]);
}

// ---- config space -----------------------------------------------------------------------

#[test]
fn config_device_caps_layout() {
    assert_layout!(config::DeviceCaps, size = 104, [
        node_guid: U64 = 0,
        sys_image_guid: U64 = 8,
        max_mr_size: U64 = 16,
        page_size_cap: U64 = 24,
        max_registered_bytes: U64 = 32,
        vendor_id: U32 = 40,
        vendor_part_id: U32 = 44,
        hw_ver: U32 = 48,
        max_qp: U32 = 52,
        max_qp_wr: U32 = 56,
        max_sge: U32 = 60,
        max_cq: U32 = 64,
        max_cqe: U32 = 68,
        max_mr: U32 = 72,
        max_pd: U32 = 76,
        max_ah: U32 = 80,
        max_qp_rd_atom: U32 = 84,
        max_qp_init_rd_atom: U32 = 88,
        max_inline_data: U32 = 92,
        max_mr_pages: U32 = 96,
        atomic_cap: u8 = 100,
        phys_port_cnt: u8 = 101,
        reserved: [u8; 2] = 102,
    ]);
}

#[test]
fn config_port_attr_layout() {
    assert_layout!(config::PortAttr, size = 24, [
        state: u8 = 0,
        max_mtu: u8 = 1,
        active_mtu: u8 = 2,
        link_layer: u8 = 3,
        gid_tbl_len: U16 = 4,
        pkey_tbl_len: U16 = 6,
        port_cap_flags: U32 = 8,
        max_msg_sz: U32 = 12,
        lid: U16 = 16,
        sm_lid: U16 = 18,
        active_width: u8 = 20,
        active_speed: u8 = 21,
        phys_state: u8 = 22,
        reserved: u8 = 23,
    ]);
}

#[test]
fn config_layout() {
    assert_layout!(config::Config, size = 168, [
        version: U32 = 0,
        num_doorbell_queues: U16 = 4,
        reserved: U16 = 6,
        caps: config::DeviceCaps = 8,
        port: config::PortAttr = 112,
        gid: Gid = 136,
        srq: config::SrqCaps = 152,
    ]);
    assert_eq!(config::BASE_CONFIG_SIZE, 152);
}

#[test]
fn config_srq_caps_layout() {
    assert_layout!(config::SrqCaps, size = 16, [
        max_srq: U32 = 0,
        max_srq_wr: U32 = 4,
        max_srq_sge: U32 = 8,
        reserved: U32 = 12,
    ]);
}

// ---- control commands -------------------------------------------------------------------

#[test]
fn cmd_header_layout() {
    assert_layout!(cmd::Header, size = 8, [
        opcode: U16 = 0,
        flags: U16 = 2,
        reserved: U32 = 4,
    ]);
}

#[test]
fn cmd_resp_header_layout() {
    assert_layout!(cmd::RespHeader, size = 8, [
        status: U16 = 0,
        reserved: U16 = 2,
        detail: U32 = 4,
    ]);
}

#[test]
fn cmd_handle_layout() {
    assert_layout!(cmd::Handle, size = 8, [
        handle: U32 = 0,
        reserved: U32 = 4,
    ]);
    // The response of ALLOC_PD and CREATE_AH is the same struct.
    assert_layout!(cmd::HandleResp, size = 8, [
        handle: U32 = 0,
        reserved: U32 = 4,
    ]);
}

#[test]
fn cmd_query_port_layout() {
    assert_layout!(cmd::QueryPort, size = 8, [
        port_num: u8 = 0,
        reserved: [u8; 7] = 1,
    ]);
}

#[test]
fn cmd_query_gid_layout() {
    assert_layout!(cmd::QueryGid, size = 8, [
        port_num: u8 = 0,
        reserved: [u8; 3] = 1,
        index: U32 = 4,
    ]);
}

#[test]
fn cmd_query_gid_resp_layout() {
    assert_layout!(cmd::QueryGidResp, size = 24, [
        gid: Gid = 0,
        gid_type: u8 = 16,
        reserved: [u8; 7] = 17,
    ]);
}

#[test]
fn cmd_reg_mr_layout() {
    assert_layout!(cmd::RegMr, size = 40, [
        pdn: U32 = 0,
        access: U32 = 4,
        iova: U64 = 8,
        length: U64 = 16,
        first_page_offset: U32 = 24,
        npages: U32 = 28,
        page_shift: u8 = 32,
        reserved: [u8; 7] = 33,
    ]);
}

#[test]
fn cmd_reg_mr_resp_layout() {
    assert_layout!(cmd::RegMrResp, size = 8, [
        lkey: U32 = 0,
        rkey: U32 = 4,
    ]);
}

#[test]
fn cmd_create_cq_layout() {
    assert_layout!(cmd::CreateCq, size = 16, [
        cqe: U32 = 0,
        reserved: U32 = 4,
        ring_addr: U64 = 8,
    ]);
}

#[test]
fn cmd_create_cq_resp_layout() {
    assert_layout!(cmd::CreateCqResp, size = 8, [
        cqn: U32 = 0,
        cqe: U32 = 4,
    ]);
}

#[test]
fn cmd_req_notify_cq_layout() {
    assert_layout!(cmd::ReqNotifyCq, size = 8, [
        cqn: U32 = 0,
        flags: U32 = 4,
    ]);
}

#[test]
fn cmd_req_notify_cq_resp_layout() {
    assert_layout!(cmd::ReqNotifyCqResp, size = 8, [
        pending: U32 = 0,
        reserved: U32 = 4,
    ]);
}

#[test]
fn cmd_create_qp_layout() {
    assert_layout!(cmd::CreateQp, size = 64, [
        pdn: U32 = 0,
        qp_type: u8 = 4,
        sq_sig_all: u8 = 5,
        reserved: U16 = 6,
        send_cqn: U32 = 8,
        recv_cqn: U32 = 12,
        cap: qp::Caps = 16,
        sq_ring_addr: U64 = 40,
        rq_ring_addr: U64 = 48,
        srqn: U32 = 56,
        reserved1: U32 = 60,
    ]);
    assert_eq!(cmd::CREATE_QP_BASE_SIZE, 56);
}

#[test]
fn cmd_srq_layouts() {
    assert_layout!(cmd::CreateSrq, size = 24, [
        pdn: U32 = 0,
        max_wr: U32 = 4,
        max_sge: U32 = 8,
        srq_limit: U32 = 12,
        ring_addr: U64 = 16,
    ]);
    assert_layout!(cmd::CreateSrqResp, size = 16, [
        srqn: U32 = 0,
        max_wr: U32 = 4,
        max_sge: U32 = 8,
        reserved: U32 = 12,
    ]);
    assert_layout!(cmd::ModifySrq, size = 16, [
        srqn: U32 = 0,
        attr_mask: U32 = 4,
        max_wr: U32 = 8,
        srq_limit: U32 = 12,
    ]);
    assert_layout!(cmd::QuerySrqResp, size = 16, [
        max_wr: U32 = 0,
        max_sge: U32 = 4,
        srq_limit: U32 = 8,
        reserved: U32 = 12,
    ]);
}

#[test]
fn cmd_create_qp_resp_layout() {
    assert_layout!(cmd::CreateQpResp, size = 32, [
        qpn: U32 = 0,
        reserved: U32 = 4,
        cap: qp::Caps = 8,
    ]);
}

#[test]
fn cmd_modify_qp_layout() {
    assert_layout!(cmd::ModifyQp, size = 80, [
        qpn: U32 = 0,
        attr_mask: U32 = 4,
        attr: qp::Attr = 8,
    ]);
}

#[test]
fn cmd_query_qp_resp_layout() {
    assert_layout!(cmd::QueryQpResp, size = 112, [
        attr: qp::Attr = 0,
        cap: qp::Caps = 72,
        qp_type: u8 = 96,
        sq_sig_all: u8 = 97,
        reserved: U16 = 98,
        send_cqn: U32 = 100,
        recv_cqn: U32 = 104,
        pdn: U32 = 108,
    ]);
}

#[test]
fn cmd_create_ah_layout() {
    assert_layout!(cmd::CreateAh, size = 40, [
        pdn: U32 = 0,
        reserved: U32 = 4,
        attr: qp::AhAttr = 8,
    ]);
}

// ---- queue pairs ------------------------------------------------------------------------

#[test]
fn qp_caps_layout() {
    assert_layout!(qp::Caps, size = 24, [
        max_send_wr: U32 = 0,
        max_recv_wr: U32 = 4,
        max_send_sge: U32 = 8,
        max_recv_sge: U32 = 12,
        max_inline_data: U32 = 16,
        reserved: U32 = 20,
    ]);
}

#[test]
fn qp_ah_attr_layout() {
    assert_layout!(qp::AhAttr, size = 32, [
        dgid: Gid = 0,
        flow_label: U32 = 16,
        sgid_index: u8 = 20,
        hop_limit: u8 = 21,
        traffic_class: u8 = 22,
        sl: u8 = 23,
        is_global: u8 = 24,
        port_num: u8 = 25,
        dlid: U16 = 26,
        src_path_bits: u8 = 28,
        static_rate: u8 = 29,
        reserved: [u8; 2] = 30,
    ]);
}

#[test]
fn qp_attr_layout() {
    assert_layout!(qp::Attr, size = 72, [
        qp_state: u8 = 0,
        cur_qp_state: u8 = 1,
        path_mtu: u8 = 2,
        path_mig_state: u8 = 3,
        en_sqd_async_notify: u8 = 4,
        sq_draining: u8 = 5,
        max_rd_atomic: u8 = 6,
        max_dest_rd_atomic: u8 = 7,
        qkey: U32 = 8,
        rq_psn: U32 = 12,
        sq_psn: U32 = 16,
        dest_qp_num: U32 = 20,
        qp_access_flags: U32 = 24,
        pkey_index: U16 = 28,
        reserved0: U16 = 30,
        port_num: u8 = 32,
        timeout: u8 = 33,
        retry_cnt: u8 = 34,
        rnr_retry: u8 = 35,
        min_rnr_timer: u8 = 36,
        reserved1: [u8; 3] = 37,
        ah_attr: qp::AhAttr = 40,
    ]);
}

// ---- work requests, completions, rings, doorbells, events --------------------------------

#[test]
fn wqe_send_header_layout() {
    assert_layout!(wqe::SendHeader, size = 64, [
        wr_id: U64 = 0,
        opcode: u8 = 8,
        send_flags: u8 = 9,
        num_sge: U16 = 10,
        imm_data: [u8; 4] = 12,
        inline_len: U32 = 16,
        rkey: U32 = 20,
        remote_addr: U64 = 24,
        compare_add: U64 = 32,
        swap: U64 = 40,
        ah: U32 = 48,
        remote_qpn: U32 = 52,
        remote_qkey: U32 = 56,
        reserved: U32 = 60,
    ]);
    assert_eq!(wqe::SEND_HEADER_SIZE, 64);
    assert_eq!(wqe::SEND_HEADER_SIZE as usize, size_of::<wqe::SendHeader>());
}

#[test]
fn wqe_sge_layout() {
    assert_layout!(wqe::Sge, size = 16, [
        addr: U64 = 0,
        length: U32 = 8,
        lkey: U32 = 12,
    ]);
    assert_eq!(wqe::SGE_SIZE, 16);
    assert_eq!(wqe::SGE_SIZE as usize, size_of::<wqe::Sge>());
}

#[test]
fn wqe_recv_header_layout() {
    assert_layout!(wqe::RecvHeader, size = 16, [
        wr_id: U64 = 0,
        num_sge: U16 = 8,
        reserved: [u8; 6] = 10,
    ]);
    assert_eq!(wqe::RECV_HEADER_SIZE, 16);
    assert_eq!(wqe::RECV_HEADER_SIZE as usize, size_of::<wqe::RecvHeader>());
}

#[test]
fn cqe_layout() {
    assert_layout!(cqe::Cqe, size = 64, [
        wr_id: U64 = 0,
        qp_num: U32 = 8,
        src_qp: U32 = 12,
        byte_len: U32 = 16,
        imm_data: [u8; 4] = 20,
        status: u8 = 24,
        opcode: u8 = 25,
        wc_flags: u8 = 26,
        sl: u8 = 27,
        vendor_err: U32 = 28,
        sgid: Gid = 32,
        pkey_index: U16 = 48,
        slid: U16 = 50,
        reserved: [u8; 12] = 52,
    ]);
    assert_eq!(cqe::SIZE, 64);
    assert_eq!(cqe::SIZE as usize, size_of::<cqe::Cqe>());
}

#[test]
fn ring_header_layout() {
    assert_layout!(ring::Header, size = 128, [
        producer: U32 = 0,
        notify_ack: U32 = 4,
        pad0: [u8; 56] = 8,
        consumer: U32 = 64,
        arm: U32 = 68,
        pad1: [u8; 56] = 72,
    ]);
    assert_eq!(ring::HEADER_SIZE, 128);
    assert_eq!(ring::HEADER_SIZE as usize, size_of::<ring::Header>());
    assert_eq!(
        ring::PRODUCER_OFFSET as usize,
        offset_of!(ring::Header, producer)
    );
    assert_eq!(
        ring::NOTIFY_ACK_OFFSET as usize,
        offset_of!(ring::Header, notify_ack)
    );
    assert_eq!(
        ring::CONSUMER_OFFSET as usize,
        offset_of!(ring::Header, consumer)
    );
    assert_eq!(ring::ARM_OFFSET as usize, offset_of!(ring::Header, arm));
}

#[test]
fn ring_indices_are_in_separate_cache_lines() {
    // The module promises that the producer's and the consumer's words never share a 64-byte
    // line, and that entries start on a ring::ALIGN boundary when the base is aligned.
    let line = |offset: u64| offset / 64;
    assert_eq!(line(ring::PRODUCER_OFFSET), line(ring::NOTIFY_ACK_OFFSET));
    assert_eq!(line(ring::CONSUMER_OFFSET), line(ring::ARM_OFFSET));
    assert_ne!(line(ring::PRODUCER_OFFSET), line(ring::CONSUMER_OFFSET));
    assert_eq!(ring::ALIGN, 64);
    assert_eq!(ring::HEADER_SIZE % ring::ALIGN, 0);
    // Each index is naturally aligned, so both sides can access it atomically.
    for offset in [
        ring::PRODUCER_OFFSET,
        ring::NOTIFY_ACK_OFFSET,
        ring::CONSUMER_OFFSET,
        ring::ARM_OFFSET,
    ] {
        assert_eq!(offset % 4, 0, "offset {offset}");
    }
}

#[test]
fn doorbell_layout() {
    assert_layout!(doorbell::Doorbell, size = 8, [
        kind: u8 = 0,
        reserved: [u8; 3] = 1,
        handle: U32 = 4,
    ]);
    assert_eq!(doorbell::SIZE, 8);
    assert_eq!(doorbell::SIZE, size_of::<doorbell::Doorbell>());
}

#[test]
fn event_layout() {
    assert_layout!(event::Event, size = 8, [
        kind: U16 = 0,
        reserved: U16 = 2,
        handle: U32 = 4,
    ]);
    assert_eq!(event::SIZE, 8);
    assert_eq!(event::SIZE, size_of::<event::Event>());
}

// ---- identity and numbering -------------------------------------------------------------

#[test]
fn device_identity_and_features() {
    assert_eq!(vrdma_proto::VIRTIO_ID_RDMA, 42);
    assert_eq!(vrdma_proto::PROTOCOL_VERSION, 1);
    assert_eq!(features::UD, 0x01);
    assert_eq!(features::ATOMICS, 0x02);
    assert_eq!(features::INLINE_DATA, 0x04);
    assert_eq!(features::MULTI_DOORBELL, 0x08);
    assert_eq!(features::CQ_NOTIFY, 0x10);
    assert_eq!(features::SRQ, 0x20);
    assert_eq!(features::SYNC_RECV, 0x40);
    assert_eq!(features::VERSION_1, 1 << 32);
    assert_eq!(features::ALL_DEVICE, 0x7f);
    // Device-specific feature bits are 0 to 23 in virtio.
    assert_eq!(features::ALL_DEVICE >> 24, 0);
}

#[test]
fn command_opcode_values() {
    use cmd::Opcode as O;
    let expected = [
        (O::QueryDevice, 0x01),
        (O::QueryPort, 0x02),
        (O::QueryGid, 0x03),
        (O::AllocPd, 0x10),
        (O::DeallocPd, 0x11),
        (O::RegMr, 0x20),
        (O::DeregMr, 0x21),
        (O::CreateCq, 0x30),
        (O::DestroyCq, 0x31),
        (O::ReqNotifyCq, 0x32),
        (O::CreateQp, 0x40),
        (O::ModifyQp, 0x41),
        (O::QueryQp, 0x42),
        (O::DestroyQp, 0x43),
        (O::PostRecv, 0x44),
        (O::CreateAh, 0x50),
        (O::DestroyAh, 0x51),
        (O::CreateSrq, 0x60),
        (O::ModifySrq, 0x61),
        (O::QuerySrq, 0x62),
        (O::DestroySrq, 0x63),
        (O::PostSrqRecv, 0x64),
    ];
    assert_eq!(O::ALL.len(), expected.len());
    for (op, raw) in expected {
        assert_eq!(op.raw(), raw, "{op:?}");
    }
}

#[test]
fn command_status_values_and_errno() {
    use cmd::Status as S;
    // (status, wire value, the Linux errno verbs reports for it)
    let expected = [
        (S::Ok, 0, 0),
        (S::Malformed, 1, 22),        // EINVAL
        (S::UnknownOpcode, 2, 95),    // EOPNOTSUPP
        (S::InvalidArgument, 3, 22),  // EINVAL
        (S::InvalidHandle, 4, 22),    // EINVAL
        (S::NoResources, 5, 12),      // ENOMEM
        (S::Busy, 6, 16),             // EBUSY
        (S::InvalidState, 7, 22),     // EINVAL
        (S::PermissionDenied, 8, 13), // EACCES
        (S::BadAddress, 9, 14),       // EFAULT
        (S::NotSupported, 10, 95),    // EOPNOTSUPP
        (S::DeviceError, 11, 5),      // EIO
    ];
    assert_eq!(S::ALL.len(), expected.len());
    for (status, raw, errno) in expected {
        assert_eq!(status.raw(), raw, "{status:?}");
        assert_eq!(status.errno(), errno, "{status:?}");
    }
}

/// Enumerations and flags documented as having the values of libibverbs' `verbs.h`.
#[test]
fn verbs_values() {
    use config::{AtomicCap, LinkLayer, Mtu, PortState};
    // ibv_port_state
    let port_states = [
        (PortState::Nop, 0),
        (PortState::Down, 1),
        (PortState::Init, 2),
        (PortState::Armed, 3),
        (PortState::Active, 4),
        (PortState::ActiveDefer, 5),
    ];
    for (v, raw) in port_states {
        assert_eq!(v.raw(), raw, "{v:?}");
    }
    // ibv_mtu, and the sizes they stand for
    let mtus = [
        (Mtu::Mtu256, 1, 256),
        (Mtu::Mtu512, 2, 512),
        (Mtu::Mtu1024, 3, 1024),
        (Mtu::Mtu2048, 4, 2048),
        (Mtu::Mtu4096, 5, 4096),
    ];
    for (v, raw, bytes) in mtus {
        assert_eq!(v.raw(), raw, "{v:?}");
        assert_eq!(v.bytes(), bytes, "{v:?}");
    }
    // IBV_LINK_LAYER_*
    assert_eq!(LinkLayer::Unspecified.raw(), 0);
    assert_eq!(LinkLayer::Infiniband.raw(), 1);
    assert_eq!(LinkLayer::Ethernet.raw(), 2);
    // ibv_atomic_cap
    assert_eq!(AtomicCap::None.raw(), 0);
    assert_eq!(AtomicCap::Hca.raw(), 1);
    assert_eq!(AtomicCap::Glob.raw(), 2);
    // ibv_qp_type
    assert_eq!(qp::Type::Rc.raw(), 2);
    assert_eq!(qp::Type::Ud.raw(), 4);
    // ibv_qp_state
    let states = [
        (qp::State::Reset, 0),
        (qp::State::Init, 1),
        (qp::State::Rtr, 2),
        (qp::State::Rts, 3),
        (qp::State::Sqd, 4),
        (qp::State::Sqe, 5),
        (qp::State::Err, 6),
    ];
    for (v, raw) in states {
        assert_eq!(v.raw(), raw, "{v:?}");
    }
    // ibv_mig_state
    assert_eq!(qp::MigState::Migrated.raw(), 0);
    assert_eq!(qp::MigState::Rearm.raw(), 1);
    assert_eq!(qp::MigState::Armed.raw(), 2);
    // ibv_wr_opcode
    let wr_opcodes = [
        (wqe::Opcode::RdmaWrite, 0),
        (wqe::Opcode::RdmaWriteWithImm, 1),
        (wqe::Opcode::Send, 2),
        (wqe::Opcode::SendWithImm, 3),
        (wqe::Opcode::RdmaRead, 4),
        (wqe::Opcode::AtomicCmpAndSwp, 5),
        (wqe::Opcode::AtomicFetchAndAdd, 6),
    ];
    for (v, raw) in wr_opcodes {
        assert_eq!(v.raw(), raw, "{v:?}");
    }
    // ibv_wc_opcode
    let wc_opcodes = [
        (cqe::Opcode::Send, 0),
        (cqe::Opcode::RdmaWrite, 1),
        (cqe::Opcode::RdmaRead, 2),
        (cqe::Opcode::CompSwap, 3),
        (cqe::Opcode::FetchAdd, 4),
        (cqe::Opcode::Recv, 128),
        (cqe::Opcode::RecvRdmaWithImm, 129),
    ];
    for (v, raw) in wc_opcodes {
        assert_eq!(v.raw(), raw, "{v:?}");
    }
    // ibv_wc_status: IBV_WC_SUCCESS = 0 ... IBV_WC_GENERAL_ERR = 21, in this order.
    use cqe::Status as W;
    let wc_status = [
        W::Success,
        W::LocLenErr,
        W::LocQpOpErr,
        W::LocEecOpErr,
        W::LocProtErr,
        W::WrFlushErr,
        W::MwBindErr,
        W::BadRespErr,
        W::LocAccessErr,
        W::RemInvReqErr,
        W::RemAccessErr,
        W::RemOpErr,
        W::RetryExcErr,
        W::RnrRetryExcErr,
        W::LocRddViolErr,
        W::RemInvRdReqErr,
        W::RemAbortErr,
        W::InvEecnErr,
        W::InvEecStateErr,
        W::FatalErr,
        W::RespTimeoutErr,
        W::GeneralErr,
    ];
    for (raw, v) in wc_status.into_iter().enumerate() {
        assert_eq!(usize::from(v.raw()), raw, "{v:?}");
    }
    // ibv_event_type
    use event::Kind as E;
    let events = [
        (E::CqErr, 0),
        (E::QpFatal, 1),
        (E::QpReqErr, 2),
        (E::QpAccessErr, 3),
        (E::CommEst, 4),
        (E::SqDrained, 5),
        (E::DeviceFatal, 8),
        (E::PortActive, 9),
        (E::PortErr, 10),
        (E::SrqErr, 14),
        (E::SrqLimitReached, 15),
        (E::QpLastWqeReached, 16),
        (E::CqCompletion, 0x100),
    ];
    for (v, raw) in events {
        assert_eq!(v.raw(), raw, "{v:?}");
    }
}

/// Flag bits documented as having the values of libibverbs' `verbs.h`.
#[test]
fn verbs_flag_bits() {
    use vrdma_proto::mr::Access;
    // ibv_access_flags
    assert_eq!(Access::LOCAL_WRITE.bits(), 1);
    assert_eq!(Access::REMOTE_WRITE.bits(), 2);
    assert_eq!(Access::REMOTE_READ.bits(), 4);
    assert_eq!(Access::REMOTE_ATOMIC.bits(), 8);
    assert_eq!(Access::all().bits(), 0xf);
    // ibv_send_flags
    assert_eq!(wqe::SendFlags::FENCE.bits(), 1);
    assert_eq!(wqe::SendFlags::SIGNALED.bits(), 2);
    assert_eq!(wqe::SendFlags::SOLICITED.bits(), 4);
    assert_eq!(wqe::SendFlags::INLINE.bits(), 8);
    assert_eq!(wqe::SendFlags::all().bits(), 0xf);
    // ibv_wc_flags
    assert_eq!(cqe::Flags::GRH.bits(), 1);
    assert_eq!(cqe::Flags::WITH_IMM.bits(), 2);
    assert_eq!(cqe::Flags::all().bits(), 3);
    // ibv_qp_attr_mask: IBV_QP_STATE = 1 << 0 ... IBV_QP_DEST_QPN = 1 << 20, in this order.
    use qp::AttrMask as M;
    let mask = [
        M::STATE,
        M::CUR_STATE,
        M::EN_SQD_ASYNC_NOTIFY,
        M::ACCESS_FLAGS,
        M::PKEY_INDEX,
        M::PORT,
        M::QKEY,
        M::AV,
        M::PATH_MTU,
        M::TIMEOUT,
        M::RETRY_CNT,
        M::RNR_RETRY,
        M::RQ_PSN,
        M::MAX_QP_RD_ATOMIC,
        M::ALT_PATH,
        M::MIN_RNR_TIMER,
        M::SQ_PSN,
        M::MAX_DEST_RD_ATOMIC,
        M::PATH_MIG_STATE,
        M::CAP,
        M::DEST_QPN,
    ];
    for (bit, m) in mask.into_iter().enumerate() {
        assert_eq!(m.bits(), 1 << bit, "{m:?}");
    }
    assert_eq!(M::all().bits(), (1 << 21) - 1);
    // REQ_NOTIFY_CQ: ibv_req_notify_cq(cq, solicited_only = 1)
    assert_eq!(cmd::NotifyFlags::SOLICITED_ONLY.bits(), 1);
    assert_eq!(cmd::NotifyFlags::all().bits(), 1);
    // ibv_srq_attr_mask
    assert_eq!(cmd::SrqAttrMask::MAX_WR.bits(), 1);
    assert_eq!(cmd::SrqAttrMask::LIMIT.bits(), 2);
    assert_eq!(cmd::SrqAttrMask::all().bits(), 3);
}

#[test]
fn small_enum_values() {
    // The public ibv_gid_type of verbs.h: IB, ROCE_V1, ROCE_V2.
    assert_eq!(config::GidType::Ib.raw(), 0);
    assert_eq!(config::GidType::RoceV1.raw(), 1);
    assert_eq!(config::GidType::RoceV2.raw(), 2);
    assert_eq!(doorbell::Kind::Send.raw(), 1);
    assert_eq!(doorbell::Kind::Recv.raw(), 2);
    assert_eq!(doorbell::Kind::Srq.raw(), 3);
    // Vendor errors are numbered densely from 0 in declaration order.
    for (i, v) in cqe::VendorErr::ALL.iter().enumerate() {
        assert_eq!(v.raw() as usize, i, "{v:?}");
    }
    assert_eq!(cqe::VendorErr::None.raw(), 0);
    assert_eq!(cqe::VendorErr::QkeyMismatch.raw(), 18);
}

#[test]
fn protocol_limits() {
    assert_eq!(wqe::MAX_SGE, 32);
    assert_eq!(wqe::MAX_INLINE, 1024);
    assert_eq!(wqe::ATOMIC_SIZE, 8);
    assert_eq!(cmd::MAX_PAGE_LIST, 1 << 18);
    // 1 GiB of 4 KiB pages.
    assert_eq!(
        u64::from(cmd::MAX_PAGE_LIST) << vrdma_proto::mr::MIN_PAGE_SHIFT,
        1 << 30
    );
    assert_eq!(vrdma_proto::mr::MIN_PAGE_SHIFT, 12);
    assert_eq!(vrdma_proto::mr::MAX_PAGE_SHIFT, 30);
    assert_eq!(ring::MAX_DEPTH, 1 << 20);
    assert_eq!(qp::MAX_PSN, 0x00ff_ffff);
    assert_eq!(qp::MAX_QPN, 0x00ff_ffff);
    assert_eq!(doorbell::MAX_BATCH, 64);
    assert_eq!(vrdma_proto::queue::CONTROL, 0);
    assert_eq!(vrdma_proto::queue::EVENT, 1);
    assert_eq!(vrdma_proto::queue::FIRST_DOORBELL, 2);
    assert_eq!(ring::ARM_SEQ_MASK, 0x7fff_ffff);
    assert_eq!(ring::ARM_SOLICITED_ONLY, 0x8000_0000);
}

// ---- golden bytes -----------------------------------------------------------------------

#[test]
fn golden_command_header() {
    assert_eq!(
        cmd::header(cmd::Opcode::RegMr).as_bytes(),
        &[0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]
    );
    assert_eq!(
        cmd::header(cmd::Opcode::DestroyAh).as_bytes(),
        &[0x51, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]
    );
}

#[test]
fn golden_resp_header() {
    let resp = cmd::RespHeader::new(cmd::Status::InvalidState, 0x0001_0002);
    assert_eq!(
        resp.as_bytes(),
        &[0x07, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01, 0x00]
    );
}

#[test]
fn golden_reg_mr() {
    let body = cmd::RegMr {
        pdn: U32::new(0x0102_0304),
        access: U32::new(0x5),
        iova: U64::new(0x0000_7f00_1234_5010),
        length: U64::new(0x2000),
        first_page_offset: U32::new(0x10),
        npages: U32::new(3),
        page_shift: 12,
        reserved: [0; 7],
    };
    #[rustfmt::skip]
    let expected: [u8; 40] = [
        0x04, 0x03, 0x02, 0x01,                         // pdn
        0x05, 0x00, 0x00, 0x00,                         // access
        0x10, 0x50, 0x34, 0x12, 0x00, 0x7f, 0x00, 0x00, // iova
        0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // length
        0x10, 0x00, 0x00, 0x00,                         // first_page_offset
        0x03, 0x00, 0x00, 0x00,                         // npages
        0x0c,                                           // page_shift
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,       // reserved
    ];
    assert_eq!(body.as_bytes(), &expected);
}

#[test]
fn golden_sge() {
    let sge = wqe::Sge::new(0x1122_3344_5566_7788, 0x99aa_bbcc, 0xddee_ff00);
    assert_eq!(
        sge.as_bytes(),
        &[
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // addr
            0xcc, 0xbb, 0xaa, 0x99, // length
            0x00, 0xff, 0xee, 0xdd, // lkey
        ]
    );
}

#[test]
fn golden_send_wqe() {
    let header = wqe::SendHeader {
        wr_id: U64::new(0x0102_0304_0506_0708),
        opcode: wqe::Opcode::RdmaWrite.raw(),
        send_flags: wqe::SendFlags::SIGNALED.bits(),
        imm_data: [0xde, 0xad, 0xbe, 0xef],
        rkey: U32::new(0xaabb_ccdd),
        remote_addr: U64::new(0x1000),
        ..Default::default()
    };
    let sges = [wqe::Sge::new(0x2000, 0x40, 7)];
    let mut slot = [0xa5u8; 128];
    let n = wqe::encode_send(&mut slot, header, wqe::Data::Sges(&sges)).unwrap();
    assert_eq!(n, 80);
    #[rustfmt::skip]
    let expected: [u8; 80] = [
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // wr_id
        0x00,                                           // opcode RDMA_WRITE
        0x02,                                           // send_flags SIGNALED
        0x01, 0x00,                                     // num_sge
        0xde, 0xad, 0xbe, 0xef,                         // imm_data, as-is
        0x00, 0x00, 0x00, 0x00,                         // inline_len
        0xdd, 0xcc, 0xbb, 0xaa,                         // rkey
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // remote_addr
        0, 0, 0, 0, 0, 0, 0, 0,                         // compare_add
        0, 0, 0, 0, 0, 0, 0, 0,                         // swap
        0, 0, 0, 0,                                     // ah
        0, 0, 0, 0,                                     // remote_qpn
        0, 0, 0, 0,                                     // remote_qkey
        0, 0, 0, 0,                                     // reserved
        0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // sge.addr
        0x40, 0x00, 0x00, 0x00,                         // sge.length
        0x07, 0x00, 0x00, 0x00,                         // sge.lkey
    ];
    assert_eq!(&slot[..80], &expected);
    // Bytes after the entry are not touched.
    assert!(slot[80..].iter().all(|&b| b == 0xa5));
}

#[test]
fn golden_recv_wqe() {
    let mut slot = [0u8; 32];
    let n = wqe::encode_recv(&mut slot, 0x42, &[wqe::Sge::new(0x3000, 0x100, 9)]).unwrap();
    assert_eq!(n, 32);
    #[rustfmt::skip]
    let expected: [u8; 32] = [
        0x42, 0, 0, 0, 0, 0, 0, 0, // wr_id
        0x01, 0x00,                // num_sge
        0, 0, 0, 0, 0, 0,          // reserved
        0x00, 0x30, 0, 0, 0, 0, 0, 0, // sge.addr
        0x00, 0x01, 0x00, 0x00,    // sge.length
        0x09, 0x00, 0x00, 0x00,    // sge.lkey
    ];
    assert_eq!(slot, expected);
}

#[test]
fn golden_doorbell_and_event() {
    assert_eq!(
        doorbell::Doorbell::new(doorbell::Kind::Recv, 0x00ab_cdef).as_bytes(),
        &[0x02, 0x00, 0x00, 0x00, 0xef, 0xcd, 0xab, 0x00]
    );
    assert_eq!(
        event::Event::new(event::Kind::CqCompletion, 0x1234_5678).as_bytes(),
        &[0x00, 0x01, 0x00, 0x00, 0x78, 0x56, 0x34, 0x12]
    );
}

#[test]
fn golden_arm_word() {
    assert_eq!(
        ring::arm_word(5, true).to_le_bytes(),
        [0x05, 0x00, 0x00, 0x80]
    );
    assert_eq!(
        ring::arm_word(5, false).to_le_bytes(),
        [0x05, 0x00, 0x00, 0x00]
    );
}
