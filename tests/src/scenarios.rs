//! Scenarios that hold wherever the two VMs are: on one daemon (`tests/opcodes.rs`) or on
//! daemons on different hosts (`tests/roce.rs`). Each moves data with one kind of operation and
//! checks every byte and completion field.

use vrdma::{
    AddressHandle, Context, QpAttr, QpAttrMask, QpCap, QpState, QpType, RecvWr, SendFlags, SendWr,
    Sge, WcOpcode, WcStatus,
};

use std::time::Duration;

use vrdma::{AccessFlags, MemoryRegion};
use vrdma_proto::cqe::VendorErr;

use crate::{Endpoint, connect_rc, pattern, rc_pair, read};

const LEN: usize = 1 << 20;

/// The queue sizes the scenarios use.
pub fn cap() -> QpCap {
    QpCap {
        max_send_wr: 64,
        max_recv_wr: 64,
        max_send_sge: 4,
        max_recv_sge: 4,
        max_inline_data: 256,
    }
}

/// SEND (scattered, inline, with immediate), a 600 KiB RDMA WRITE to an unaligned address,
/// WRITE with immediate, RDMA READ, and both atomics over RC from `ca` to `cb`, every byte and
/// every completion field checked.
pub fn rc_send_write_read_and_atomics(ca: &Context, cb: &Context) {
    let (a, b) = rc_pair(ca, cb, LEN, cap());
    pattern(&a.buf, 1);
    pattern(&b.buf, 2);
    let (abase, bbase) = (a.buf.addr(), b.buf.addr());

    // SEND with two SGEs into a receive with two SGEs of other sizes.
    let recv_sges = [
        Sge::new(bbase + 4096, 100, b.mr.lkey()),
        Sge::new(bbase + 8192, 1000, b.mr.lkey()),
    ];
    let send_sges = [
        Sge::new(abase, 300, a.mr.lkey()),
        Sge::new(abase + 1000, 500, a.mr.lkey()),
    ];
    b.recv(&[RecvWr {
        wr_id: 77,
        sg_list: &recv_sges,
    }])
    .unwrap();
    a.send(&[SendWr::send(1, &send_sges)]).unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (1, WcStatus::Success, WcOpcode::Send)
    );
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode, wc.byte_len),
        (77, WcStatus::Success, WcOpcode::Recv, 800)
    );
    assert_eq!(wc.imm_data, None);
    assert_eq!(wc.src_qp, a.qp.qp_num());
    let mut expected = read(&a.buf, 0, 300);
    expected.extend(read(&a.buf, 1000, 500));
    let mut got = read(&b.buf, 4096, 100);
    got.extend(read(&b.buf, 8192, 700));
    assert_eq!(got, expected, "SEND scattered wrongly");
    assert_eq!(
        read(&b.buf, 8192 + 700, 300),
        {
            let mut fresh = vec![0u8; 300];
            for (i, v) in fresh.iter_mut().enumerate() {
                *v = ((8192 + 700 + i) as u8).wrapping_mul(31).wrapping_add(2);
            }
            fresh
        },
        "bytes past the message must be untouched"
    );

    // SEND_WITH_IMM, inline.
    let inline_src = [Sge::new(abase + 50, 200, 0)];
    let recv = [Sge::new(bbase + 65536, 4096, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 78,
        sg_list: &recv,
    }])
    .unwrap();
    a.send(&[SendWr::send(2, &inline_src)
        .with_imm(0xdead_beef)
        .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.byte_len, wc.imm_data),
        (78, 200, Some(0xdead_beef))
    );
    assert_eq!(read(&b.buf, 65536, 200), read(&a.buf, 50, 200));

    // RDMA WRITE of 600 KiB (ten scheduler chunks) to an unaligned remote address.
    let big = 600 * 1024;
    let src = [Sge::new(abase + 3, big as u32, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(3, &src, bbase + 100_001, b.mr.rkey())])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (3, WcStatus::Success, WcOpcode::RdmaWrite)
    );
    assert_eq!(read(&b.buf, 100_001, big), read(&a.buf, 3, big));
    b.assert_no_completion(std::time::Duration::from_millis(20));

    // RDMA WRITE with immediate consumes a receive and reports the length.
    let none: [Sge; 0] = [];
    let src = [Sge::new(abase + 7, 64, a.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 79,
        sg_list: &none,
    }])
    .unwrap();
    a.send(&[SendWr::rdma_write(4, &src, bbase + 900_000, b.mr.rkey()).with_imm(42)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.opcode, wc.byte_len, wc.imm_data),
        (79, WcOpcode::RecvRdmaWithImm, 64, Some(42))
    );
    assert_eq!(read(&b.buf, 900_000, 64), read(&a.buf, 7, 64));

    // RDMA READ pulls bytes from b into a.
    let dst = [Sge::new(abase + 700_000, 5000, a.mr.lkey())];
    a.send(&[SendWr::rdma_read(5, &dst, bbase + 12_345, b.mr.rkey())])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.opcode, wc.status, wc.byte_len),
        (WcOpcode::RdmaRead, WcStatus::Success, 5000)
    );
    assert_eq!(read(&a.buf, 700_000, 5000), read(&b.buf, 12_345, 5000));

    // Atomics on an 8-byte word of b.
    let target = bbase + 0x1_0000 - 8;
    b.buf.write_at(0x1_0000 - 8, &100u64.to_ne_bytes()).unwrap();
    let old = [Sge::new(abase + 800_000, 8, a.mr.lkey())];
    a.send(&[SendWr::fetch_add(6, &old, target, b.mr.rkey(), 5)])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.opcode, wc.status, wc.byte_len),
        (WcOpcode::FetchAdd, WcStatus::Success, 8)
    );
    assert_eq!(read(&a.buf, 800_000, 8), 100u64.to_ne_bytes());
    assert_eq!(read(&b.buf, 0x1_0000 - 8, 8), 105u64.to_ne_bytes());
    a.send(&[SendWr::compare_swap(7, &old, target, b.mr.rkey(), 105, 7)])
        .unwrap();
    assert_eq!(a.poll_one().opcode, WcOpcode::CompSwap);
    assert_eq!(read(&a.buf, 800_000, 8), 105u64.to_ne_bytes());
    assert_eq!(read(&b.buf, 0x1_0000 - 8, 8), 7u64.to_ne_bytes());
    a.send(&[SendWr::compare_swap(8, &old, target, b.mr.rkey(), 999, 1)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(
        read(&a.buf, 800_000, 8),
        7u64.to_ne_bytes(),
        "a failed compare returns the current value"
    );
    assert_eq!(
        read(&b.buf, 0x1_0000 - 8, 8),
        7u64.to_ne_bytes(),
        "and leaves it alone"
    );
}

/// Ten RDMA WRITEs of which only the last is signalled: one completion, all data there.
pub fn unsignalled_requests_complete_silently_and_in_order(ca: &Context, cb: &Context) {
    let (a, b) = rc_pair(ca, cb, 1 << 16, cap());
    pattern(&a.buf, 9);
    let src: Vec<[Sge; 1]> = (0..10)
        .map(|i| [Sge::new(a.buf.addr() + i * 100, 100, a.mr.lkey())])
        .collect();
    let wrs: Vec<SendWr<'_>> = (0..10)
        .map(|i| {
            let wr = SendWr::rdma_write(
                i,
                &src[i as usize],
                b.buf.addr() + 20_000 + i * 100,
                b.mr.rkey(),
            );
            if i == 9 {
                wr
            } else {
                wr.with_flags(SendFlags::empty())
            }
        })
        .collect();
    a.send(&wrs).unwrap();
    let wc = a.poll_one();
    assert_eq!(wc.wr_id, 9, "only the signalled request completes");
    a.assert_no_completion(std::time::Duration::from_millis(20));
    assert_eq!(read(&b.buf, 20_000, 1000), read(&a.buf, 0, 1000));
}

/// UD from `ca` to `cb`: GRH, source QP and GID, immediate data, and a wrong Q_Key dropped.
pub fn ud_datagrams_carry_grh_source_qp_and_gid(ca: &Context, cb: &Context) {
    let ud_cap = QpCap {
        max_inline_data: 0,
        ..cap()
    };
    let a = Endpoint::new(ca, QpType::Ud, 1 << 16, ud_cap);
    let b = Endpoint::new(cb, QpType::Ud, 1 << 16, ud_cap);
    const QKEY: u32 = 0x1111;
    for e in [&a, &b] {
        let init = QpAttr {
            qp_state: QpState::Init,
            qkey: QKEY,
            ..QpAttr::default()
        };
        e.qp.modify(
            &init,
            QpAttrMask::STATE | QpAttrMask::PKEY_INDEX | QpAttrMask::PORT | QpAttrMask::QKEY,
        )
        .unwrap();
        e.qp.modify(
            &QpAttr {
                qp_state: QpState::Rtr,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .unwrap();
        e.qp.modify(
            &QpAttr {
                qp_state: QpState::Rts,
                ..QpAttr::default()
            },
            QpAttrMask::STATE | QpAttrMask::SQ_PSN,
        )
        .unwrap();
    }
    pattern(&a.buf, 5);
    let ah = AddressHandle::new(&a.pd, &AddressHandle::attr_for(cb.gid())).unwrap();
    let recv = [Sge::new(b.buf.addr(), 40 + 512, b.mr.lkey())];
    let src = [Sge::new(a.buf.addr() + 10, 512, a.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 5,
        sg_list: &recv,
    }])
    .unwrap();
    a.send(&[SendWr::ud_send(1, &src, &ah, b.qp.qp_num(), QKEY).with_imm(3)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let wc = b.poll_one();
    assert_eq!(
        (wc.status, wc.byte_len, wc.src_qp, wc.grh),
        (WcStatus::Success, 552, a.qp.qp_num(), true)
    );
    assert_eq!(wc.sgid, ca.gid());
    assert_eq!(wc.imm_data, Some(3));
    assert_eq!(&read(&b.buf, 8, 16), &ca.gid().0, "GRH source GID");
    assert_eq!(&read(&b.buf, 24, 16), &cb.gid().0, "GRH destination GID");
    assert_eq!(read(&b.buf, 40, 512), read(&a.buf, 10, 512));

    // A wrong Q_Key is dropped silently: the sender completes, the receive stays posted.
    a.send(&[SendWr::ud_send(2, &src, &ah, b.qp.qp_num(), QKEY + 1)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    b.assert_no_completion(std::time::Duration::from_millis(30));
    let recv2 = [Sge::new(b.buf.addr() + 4096, 40 + 512, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 6,
        sg_list: &recv2,
    }])
    .unwrap();
    a.send(&[SendWr::ud_send(3, &src, &ah, b.qp.qp_num(), QKEY)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(
        b.poll_one().wr_id,
        6,
        "the datagram with the right Q_Key lands in the next receive"
    );
}

/// Whether a scenario checks the vendor error code of failed completions: a requester on
/// another host learns only the NAK's code, not the responder's detailed reason (on an RNIC
/// too, `vendor_err` is the local device's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// Check it (both VMs on one daemon).
    Checked,
    /// Do not (the failure was reported across the network).
    Unchecked,
}

impl Vendor {
    /// `v` if checked.
    pub fn expect(self, v: VendorErr) -> Option<VendorErr> {
        (self == Vendor::Checked).then_some(v)
    }
}

fn error_cap() -> QpCap {
    QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 2,
        max_recv_sge: 2,
        max_inline_data: 64,
    }
}

/// The QP's state, as the guest queries it.
pub fn state(e: &Endpoint) -> QpState {
    e.qp.query().expect("query qp").0.qp_state
}

/// Checks the failed request's completion, then that the QP went to ERR and that the next
/// request is flushed.
pub fn assert_fails_then_flushes(
    e: &Endpoint,
    wr_id: u64,
    status: WcStatus,
    vendor: Option<VendorErr>,
) {
    let wc = e.poll_one();
    assert_eq!((wc.wr_id, wc.status), (wr_id, status), "{wc:?}");
    if let Some(v) = vendor {
        assert_eq!(wc.vendor_err, v.raw(), "{wc:?}");
    }
    assert_eq!(state(e), QpState::Err);
    let sge = [Sge::new(e.buf.addr(), 8, e.mr.lkey())];
    e.send(&[SendWr::send(wr_id + 1000, &sge)]).unwrap();
    let wc = e.poll_one();
    assert_eq!((wc.wr_id, wc.status), (wr_id + 1000, WcStatus::WrFlushErr));
}

/// A bad R_Key, a range past the remote MR, an MR without REMOTE_WRITE and an unaligned
/// atomic: the requester fails with the remote error, the responder's QP goes to ERR.
pub fn remote_key_bounds_and_access_errors_fail_both_sides(
    ca: &Context,
    cb: &Context,
    vendor: Vendor,
) {
    let src_of = |e: &Endpoint| [Sge::new(e.buf.addr(), 64, e.mr.lkey())];

    // A bad rkey.
    let (a, b) = rc_pair(ca, cb, 1 << 16, error_cap());
    let src = src_of(&a);
    a.send(&[SendWr::rdma_write(
        1,
        &src,
        b.buf.addr(),
        b.mr.rkey() ^ 0x0020_0000,
    )])
    .unwrap();
    assert_fails_then_flushes(
        &a,
        1,
        WcStatus::RemAccessErr,
        vendor.expect(VendorErr::BadRkey),
    );
    assert_eq!(state(&b), QpState::Err, "the responder goes to ERR as well");

    // Out of the remote MR's bounds.
    let (a, b) = rc_pair(ca, cb, 1 << 16, error_cap());
    let src = src_of(&a);
    a.send(&[SendWr::rdma_write(
        2,
        &src,
        b.buf.addr() + (1 << 16) - 10,
        b.mr.rkey(),
    )])
    .unwrap();
    assert_fails_then_flushes(
        &a,
        2,
        WcStatus::RemAccessErr,
        vendor.expect(VendorErr::RemoteOutOfBounds),
    );

    // A remote MR without REMOTE_WRITE; the responder's posted receive is flushed.
    let (a, b) = rc_pair(ca, cb, 1 << 16, error_cap());
    let read_only = MemoryRegion::register(
        &b.pd,
        &b.buf,
        AccessFlags::LOCAL_WRITE | AccessFlags::REMOTE_READ,
    )
    .unwrap();
    let recv = [Sge::new(b.buf.addr(), 64, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 50,
        sg_list: &recv,
    }])
    .unwrap();
    let before = read(&b.buf, 0, 64);
    let src = src_of(&a);
    a.send(&[SendWr::rdma_write(3, &src, b.buf.addr(), read_only.rkey())])
        .unwrap();
    assert_fails_then_flushes(
        &a,
        3,
        WcStatus::RemAccessErr,
        vendor.expect(VendorErr::RemoteAccess),
    );
    let wc = b.poll_one();
    assert_eq!((wc.wr_id, wc.status), (50, WcStatus::WrFlushErr));
    assert_eq!(read(&b.buf, 0, 64), before, "nothing was written");

    // An atomic on an unaligned address.
    let (a, b) = rc_pair(ca, cb, 1 << 16, error_cap());
    let old = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[SendWr::fetch_add(4, &old, b.buf.addr() + 4, b.mr.rkey(), 1)])
        .unwrap();
    assert_fails_then_flushes(
        &a,
        4,
        WcStatus::RemInvReqErr,
        vendor.expect(VendorErr::BadAtomic),
    );
}

/// A SEND larger than the posted receive fails on both sides.
pub fn receive_too_small_fails_both_sides(ca: &Context, cb: &Context, vendor: Vendor) {
    let (a, b) = rc_pair(ca, cb, 1 << 16, error_cap());
    let small = [Sge::new(b.buf.addr(), 16, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 9,
        sg_list: &small,
    }])
    .unwrap();
    let src = [Sge::new(a.buf.addr(), 100, a.mr.lkey())];
    a.send(&[SendWr::send(1, &src)]).unwrap();
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (9, WcStatus::LocLenErr, WcOpcode::Recv)
    );
    assert_fails_then_flushes(
        &a,
        1,
        WcStatus::RemInvReqErr,
        vendor.expect(VendorErr::RecvTooSmall),
    );
}

/// RNR retries run out after `rnr_retry`; with 7 (infinite) the SEND waits for a receive.
pub fn rnr_retries_run_out_after_the_configured_count(ca: &Context, cb: &Context, vendor: Vendor) {
    let a = Endpoint::new(ca, QpType::Rc, 1 << 16, error_cap());
    let b = Endpoint::new(cb, QpType::Rc, 1 << 16, error_cap());
    // b's min_rnr_timer is encoding 1 (10 µs); a gives up after 3 RNR retries.
    connect_rc(&a.qp, cb.gid(), b.qp.qp_num(), 3, 7);
    connect_rc(&b.qp, ca.gid(), a.qp.qp_num(), 3, 7);
    let src = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[SendWr::send(1, &src)]).unwrap();
    assert_fails_then_flushes(
        &a,
        1,
        WcStatus::RnrRetryExcErr,
        vendor.expect(VendorErr::RnrExhausted),
    );

    // With infinite RNR retries the send waits for a receive instead.
    let a = Endpoint::new(ca, QpType::Rc, 1 << 16, error_cap());
    let b = Endpoint::new(cb, QpType::Rc, 1 << 16, error_cap());
    connect_rc(&a.qp, cb.gid(), b.qp.qp_num(), 7, 7);
    connect_rc(&b.qp, ca.gid(), a.qp.qp_num(), 7, 7);
    a.send(&[SendWr::send(2, &[Sge::new(a.buf.addr(), 8, a.mr.lkey())])])
        .unwrap();
    a.assert_no_completion(Duration::from_millis(50));
    let recv = [Sge::new(b.buf.addr(), 8, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 3,
        sg_list: &recv,
    }])
    .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(b.poll_one().wr_id, 3);
}
