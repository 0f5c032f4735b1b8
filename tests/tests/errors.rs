//! The data path's error paths, each with the completion status an RNIC gives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vrdma::mem::SharedMemory;
use vrdma::{
    AccessFlags, MemoryRegion, ProtectionDomain, QpAttr, QpAttrMask, QpCap, QpState, QpType,
    RecvWr, SendWr, Sge, WcStatus,
};
use vrdma_proto::cqe::VendorErr;
use vrdma_tests::scenarios::{self, Vendor, assert_fails_then_flushes, state};
use vrdma_tests::{Endpoint, TestDaemon, connect_rc, rc_pair, read};

fn cap() -> QpCap {
    QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 2,
        max_recv_sge: 2,
        max_inline_data: 64,
    }
}

#[test]
fn local_key_bounds_pd_and_access_errors() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));

    // An lkey that names nothing.
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let bad = [Sge::new(a.buf.addr(), 8, a.mr.lkey() ^ 0x0010_0000)];
    a.send(&[SendWr::rdma_write(1, &bad, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_fails_then_flushes(&a, 1, WcStatus::LocProtErr, Some(VendorErr::BadLkey));

    // An SGE running past the end of its MR.
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let small =
        MemoryRegion::register_range(&a.pd, a.buf.addr(), 4096, AccessFlags::LOCAL_WRITE).unwrap();
    let past = [Sge::new(a.buf.addr() + 4092, 8, small.lkey())];
    a.send(&[SendWr::rdma_write(2, &past, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_fails_then_flushes(&a, 2, WcStatus::LocProtErr, Some(VendorErr::SgeOutOfBounds));

    // An MR of another PD.
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let other_pd = ProtectionDomain::new(&ca).unwrap();
    let other_mr = MemoryRegion::register(&other_pd, &a.buf, AccessFlags::LOCAL_WRITE).unwrap();
    let wrong_pd = [Sge::new(a.buf.addr(), 8, other_mr.lkey())];
    a.send(&[SendWr::rdma_write(3, &wrong_pd, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_fails_then_flushes(&a, 3, WcStatus::LocProtErr, Some(VendorErr::PdMismatch));

    // READ into memory registered without local write.
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let ro = MemoryRegion::register(&a.pd, &a.buf, AccessFlags::empty()).unwrap();
    let dst = [Sge::new(a.buf.addr(), 8, ro.lkey())];
    a.send(&[SendWr::rdma_read(4, &dst, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_fails_then_flushes(&a, 4, WcStatus::LocAccessErr, Some(VendorErr::LocalAccess));
}

#[test]
fn remote_key_bounds_and_access_errors_fail_both_sides() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    scenarios::remote_key_bounds_and_access_errors_fail_both_sides(
        &d.open("a"),
        &d.open("b"),
        Vendor::Checked,
    );
}

#[test]
fn receive_too_small_fails_both_sides() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    scenarios::receive_too_small_fails_both_sides(&d.open("a"), &d.open("b"), Vendor::Checked);
}

#[test]
fn rnr_retries_run_out_after_the_configured_count() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    scenarios::rnr_retries_run_out_after_the_configured_count(
        &d.open("a"),
        &d.open("b"),
        Vendor::Checked,
    );
}

#[test]
fn a_missing_responder_exhausts_transport_retries() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let a = Endpoint::new(&ca, QpType::Rc, 1 << 16, cap());
    let b = Endpoint::new(&cb, QpType::Rc, 1 << 16, cap());
    // b's QP stays in RESET, so nobody answers; a retries twice (timeout encoding 8 ≈ 1 ms).
    connect_rc(&a.qp, cb.gid(), b.qp.qp_num(), 7, 2);
    let start = Instant::now();
    let src = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_fails_then_flushes(
        &a,
        1,
        WcStatus::RetryExcErr,
        Some(VendorErr::PeerUnreachable),
    );
    assert!(
        start.elapsed() >= Duration::from_millis(2),
        "two ACK timeouts must pass first"
    );
}

#[test]
fn work_posted_before_rts_runs_once_the_qp_is_ready() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let a = Endpoint::new(&ca, QpType::Rc, 1 << 16, cap());
    let b = Endpoint::new(&cb, QpType::Rc, 1 << 16, cap());
    connect_rc(&b.qp, ca.gid(), a.qp.qp_num(), 7, 7);
    let init = QpAttr {
        qp_state: QpState::Init,
        qp_access_flags: vrdma_tests::all_access(),
        ..QpAttr::default()
    };
    a.qp.modify(
        &init,
        QpAttrMask::STATE | QpAttrMask::PKEY_INDEX | QpAttrMask::PORT | QpAttrMask::ACCESS_FLAGS,
    )
    .unwrap();
    a.buf.write_at(0, b"early bird").unwrap();
    let src = [Sge::new(a.buf.addr(), 10, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    a.assert_no_completion(Duration::from_millis(30));
    assert_eq!(
        read(&b.buf, 0, 10),
        vec![0u8; 10],
        "a QP in INIT sends nothing"
    );
    a.qp.modify(
        &QpAttr {
            qp_state: QpState::Reset,
            ..QpAttr::default()
        },
        QpAttrMask::STATE,
    )
    .unwrap();
    a.assert_no_completion(Duration::from_millis(30));
    // RESET dropped the queued request without a completion; post it again after connecting.
    connect_rc(&a.qp, cb.gid(), b.qp.qp_num(), 7, 7);
    a.send(&[SendWr::rdma_write(2, &src, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_eq!(a.poll_one().wr_id, 2);
    assert_eq!(read(&b.buf, 0, 10), b"early bird");
}

#[test]
fn a_full_send_queue_is_refused_by_the_library() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let a = Endpoint::new(
        &ca,
        QpType::Rc,
        1 << 16,
        QpCap {
            max_send_wr: 4,
            ..cap()
        },
    );
    let _b = Endpoint::new(&cb, QpType::Rc, 1 << 16, cap());
    // In INIT nothing drains the ring, so the fifth request finds it full.
    let init = QpAttr {
        qp_state: QpState::Init,
        qp_access_flags: vrdma_tests::all_access(),
        ..QpAttr::default()
    };
    a.qp.modify(
        &init,
        QpAttrMask::STATE | QpAttrMask::PKEY_INDEX | QpAttrMask::PORT | QpAttrMask::ACCESS_FLAGS,
    )
    .unwrap();
    let src = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    let wrs: Vec<_> = (0..5).map(|i| SendWr::send(i, &src)).collect();
    let err = a.send(&wrs).unwrap_err();
    assert_eq!(err.errno(), libc::ENOMEM, "{err}");
}

#[test]
fn memory_removed_under_an_mr_fails_transfers_instead_of_touching_it() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let extra = Arc::new(SharedMemory::new("extra", 1 << 20).unwrap());
    cb.add_memory(extra.clone()).unwrap();
    let mr = MemoryRegion::register_range(&b.pd, extra.addr(), 1 << 20, vrdma_tests::all_access())
        .unwrap();
    a.buf.write_at(0, b"reachable").unwrap();
    let src = [Sge::new(a.buf.addr(), 9, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(1, &src, extra.addr() + 100, mr.rkey())])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let mut got = [0u8; 9];
    extra.read(extra.addr() + 100, &mut got).unwrap();
    assert_eq!(&got, b"reachable");

    cb.remove_memory(extra.addr()).unwrap();
    a.buf.write_at(0, b"too late!").unwrap();
    a.send(&[SendWr::rdma_write(2, &src, extra.addr() + 100, mr.rkey())])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!((wc.wr_id, wc.status), (2, WcStatus::RemAccessErr));
    assert_eq!(wc.vendor_err, VendorErr::GuestMemory.raw());
    extra.read(extra.addr() + 100, &mut got).unwrap();
    assert_eq!(&got, b"reachable", "the removed memory was not written");
    drop(b);
}

#[test]
fn the_requesters_own_memory_failing_is_its_own_error_not_the_responders() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let extra = Arc::new(SharedMemory::new("source", 1 << 20).unwrap());
    ca.add_memory(extra.clone()).unwrap();
    let mr = MemoryRegion::register_range(&a.pd, extra.addr(), 1 << 20, vrdma_tests::all_access())
        .unwrap();
    ca.remove_memory(extra.addr()).unwrap();
    let recv = [Sge::new(b.buf.addr(), 64, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 7,
        sg_list: &recv,
    }])
    .unwrap();
    let src = [Sge::new(extra.addr(), 64, mr.lkey())];
    // SAFETY: the SGE names memory this test still maps (`extra`); only the device lost it.
    unsafe { a.qp.post_send(&[SendWr::send(1, &src)]).unwrap() };
    let wc = a.poll_one();
    assert_eq!((wc.wr_id, wc.status), (1, WcStatus::LocProtErr), "{wc:?}");
    assert_eq!(wc.vendor_err, VendorErr::GuestMemory.raw());
    assert_eq!(state(&b), QpState::Rts, "the responder did nothing wrong");
    b.assert_no_completion(Duration::from_millis(20));
    // b's receive is still there for a good message from a fresh QP pair on the same VMs.
    let (a2, b2) = rc_pair(&ca, &cb, 1 << 16, cap());
    let recv2 = [Sge::new(b2.buf.addr(), 64, b2.mr.lkey())];
    b2.recv(&[RecvWr {
        wr_id: 8,
        sg_list: &recv2,
    }])
    .unwrap();
    let good = [Sge::new(a2.buf.addr(), 64, a2.mr.lkey())];
    a2.send(&[SendWr::send(2, &good)]).unwrap();
    assert_eq!(a2.poll_one().status, WcStatus::Success);
    assert_eq!(b2.poll_one().wr_id, 8);
}

#[test]
fn requests_before_a_refused_one_in_a_list_are_posted_as_in_verbs() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    a.buf.write_at(0, b"first").unwrap();
    let one = [Sge::new(a.buf.addr(), 5, a.mr.lkey())];
    let three = [one[0], one[0], one[0]];
    let list = [
        SendWr::rdma_write(1, &one, b.buf.addr(), b.mr.rkey()),
        SendWr::rdma_write(2, &three, b.buf.addr() + 64, b.mr.rkey()),
    ];
    let err = a.send(&list).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
    let wc = a.poll_one();
    assert_eq!((wc.wr_id, wc.status), (1, WcStatus::Success));
    assert_eq!(read(&b.buf, 0, 5), b"first");
    a.assert_no_completion(Duration::from_millis(20));
}
