//! A hostile driver that writes the rings itself: malformed work requests, a producer index
//! run past the ring, doorbells for QPs it does not own, garbage doorbell batches. Each gets
//! the error completion or event a hardware RNIC would give, and nothing reaches another VM.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vrdma::transport::{Options, Transport};
use vrdma_proto::cmd::{Opcode, Status};
use vrdma_proto::cqe::{self, Cqe, VendorErr};
use vrdma_proto::doorbell::Doorbell;
use vrdma_proto::{event, qp, ring, wqe};
use vrdma_tests::raw::{Raw, set_producer, word};
use vrdma_tests::{TestDaemon, rc_pair, read};
use zerocopy::IntoBytes;

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn malformed_work_requests_and_overruns_fail_only_the_offending_qp() {
    let d = TestDaemon::start(&[("evil", ""), ("v1", ""), ("v2", "")]);
    let evil = Raw::connect(d.socket("evil"), Options::default());

    // An undefined opcode in a send WQE: LOC_QP_OP_ERR with the request's wr_id, QP to ERR.
    let (qpn, sq, cq) = evil.qp();
    let bad = wqe::SendHeader {
        wr_id: 0xfeed.into(),
        opcode: 99,
        send_flags: 2,
        ..wqe::SendHeader::default()
    };
    sq.write_at(ring::HEADER_SIZE as usize, bad.as_bytes())
        .unwrap();
    set_producer(&sq, 1);
    evil.doorbell(qpn);
    wait("the error completion", || {
        word(&cq, ring::PRODUCER_OFFSET) == 1
    });
    let c = Cqe::decode(&read(&cq, ring::HEADER_SIZE as usize, cqe::SIZE as usize)).unwrap();
    assert_eq!(
        (c.cqe.wr_id.get(), c.status),
        (0xfeed, cqe::Status::LocQpOpErr)
    );
    assert_eq!(c.cqe.vendor_err.get(), VendorErr::MalformedWqe.raw());
    assert_eq!(evil.state(qpn), qp::State::Err);
    assert_eq!(word(&sq, ring::CONSUMER_OFFSET), 1, "the slot is consumed");

    // A producer index past the end of the ring: QP_FATAL, QP to ERR, no completion.
    let (qpn2, sq2, cq2) = evil.qp();
    set_producer(&sq2, 4 + 5);
    evil.doorbell(qpn2);
    let mut fatal = false;
    wait("the QP_FATAL event", || {
        fatal |= evil
            .v
            .drain_events()
            .unwrap()
            .iter()
            .any(|e| e.kind == event::Kind::QpFatal && e.handle == qpn2);
        fatal
    });
    assert_eq!(evil.state(qpn2), qp::State::Err);
    // Another doorbell makes the device look at the QP in ERR, where it flushes what is
    // queued; a dead ring is not flushed, so its garbage never becomes completions.
    evil.doorbell(qpn2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        word(&cq2, ring::PRODUCER_OFFSET),
        0,
        "nothing in an overrun ring is executed"
    );

    // Doorbells for QPs that do not exist, or exist in other VMs, and a garbage batch.
    let (v1, v2) = (d.open("v1"), d.open("v2"));
    let (a, b) = rc_pair(&v1, &v2, 1 << 16, vrdma::QpCap::default());
    for qpn in [0, 1, 0xff_ffff, a.qp.qp_num(), b.qp.qp_num()] {
        evil.doorbell(qpn);
    }
    let garbage = Doorbell {
        kind: 9,
        reserved: [0; 3],
        handle: a.qp.qp_num().into(),
    };
    evil.v
        .ring_doorbells(0, &[garbage])
        .expect("doorbell queue accepts the descriptor");
    let port = d.vm("evil").expect("evil connected");
    wait("the garbage batch to be counted", || {
        port.counters.doorbells_malformed.load(Ordering::Relaxed) == 1
    });
    assert_eq!(
        evil.command(Opcode::QueryDevice, &[]).0,
        Status::Ok,
        "the device still answers"
    );

    // The victims are untouched and still work.
    a.buf.write_at(0, b"unharmed").unwrap();
    let src = [vrdma::Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[vrdma::SendWr::rdma_write(
        1,
        &src,
        b.buf.addr(),
        b.mr.rkey(),
    )])
    .unwrap();
    assert_eq!(a.poll_one().status, vrdma::WcStatus::Success);
    assert_eq!(read(&b.buf, 0, 8), b"unharmed");
    a.assert_no_completion(Duration::from_millis(20));
    b.assert_no_completion(Duration::from_millis(20));
}

#[test]
fn a_third_vm_cannot_inject_into_an_established_connection() {
    use vrdma::{QpCap, QpType, RecvWr, SendWr, Sge, WcStatus};
    use vrdma_tests::{Endpoint, connect_rc};
    let d = TestDaemon::start(&[("a", ""), ("b", ""), ("c", "")]);
    let (ca, cb, cc) = (d.open("a"), d.open("b"), d.open("c"));
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, QpCap::default());
    let recv = [Sge::new(b.buf.addr(), 64, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 1,
        sg_list: &recv,
    }])
    .unwrap();
    // c aims a QP at b's QP, which is connected to a; two retries, then it must give up.
    let intruder = Endpoint::new(&cc, QpType::Rc, 1 << 16, QpCap::default());
    connect_rc(&intruder.qp, cb.gid(), b.qp.qp_num(), 7, 2);
    intruder.buf.write_at(0, b"forged!!").unwrap();
    let src = [Sge::new(intruder.buf.addr(), 8, intruder.mr.lkey())];
    intruder.send(&[SendWr::send(9, &src)]).unwrap();
    let wc = intruder.poll_one();
    assert_eq!((wc.wr_id, wc.status), (9, WcStatus::RetryExcErr), "{wc:?}");
    b.assert_no_completion(Duration::from_millis(20));
    // The rkey is no help either: a WRITE from c to b's MR finds no responder.
    let intruder2 = Endpoint::new(&cc, QpType::Rc, 1 << 16, QpCap::default());
    connect_rc(&intruder2.qp, cb.gid(), b.qp.qp_num(), 7, 1);
    let src2 = [Sge::new(intruder2.buf.addr(), 8, intruder2.mr.lkey())];
    intruder2
        .send(&[SendWr::rdma_write(10, &src2, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_eq!(intruder2.poll_one().status, WcStatus::RetryExcErr);
    assert_eq!(read(&b.buf, 0, 8), vec![0u8; 8], "nothing was written");
    // The real peer's message still lands in b's receive.
    a.buf.write_at(0, b"genuine!").unwrap();
    let good = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[SendWr::send(2, &good)]).unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(b.poll_one().wr_id, 1);
    assert_eq!(read(&b.buf, 0, 8), b"genuine!");
}
