//! Shared receive queues end to end (docs/protocol.md §16.8), on the soft fabric and across
//! two daemons over RoCEv2: the scenario of `vrdma_tests::srq`, the limit event, QP_LAST_WQE,
//! and a VM whose SRQ has receives posted moving to another daemon.

use vrdma::{AsyncEventKind, QueuePair, SrqAttr, SrqAttrMask, WcStatus};
use vrdma_proto::cmd::{self, Opcode, Status};
use vrdma_tests::raw::Raw;
use vrdma_tests::srq::*;
use vrdma_tests::vmm::{Plan, migrate};
use vrdma_tests::{TestDaemon, poll_one};
use zerocopy::IntoBytes;

#[test]
fn rc_and_ud_qps_share_an_srq_on_one_daemon() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let raw = Raw::connect(d.socket("b"), vrdma::transport::Options::default());
    let dropped = || ud_dropped(&d, "b");
    let (s, r) = rc_and_ud_qps_share_one_srq(&d.open("a"), &raw.context(), &dropped);
    // The SRQ cannot be destroyed under its QPs (ibv_destroy_srq's EBUSY).
    let busy = cmd::Handle {
        handle: r.srq.srq_num().into(),
        reserved: 0.into(),
    };
    assert_eq!(
        raw.command(Opcode::DestroySrq, busy.as_bytes()).0,
        Status::Busy
    );
    // POST_SRQ_RECV names a live SRQ or none (the soft fabric has nothing to post).
    assert_eq!(
        raw.command(Opcode::PostSrqRecv, busy.as_bytes()).0,
        Status::Ok
    );
    let unknown = cmd::Handle {
        handle: (r.srq.srq_num() ^ 0x40).into(),
        reserved: 0.into(),
    };
    assert_eq!(
        raw.command(Opcode::PostSrqRecv, unknown.as_bytes()).0,
        Status::InvalidHandle
    );
    drop((s, r));
}

#[test]
fn rc_and_ud_qps_share_an_srq_across_hosts() {
    let h1 = TestDaemon::start_with(&[("a", "gid=127.0.61.1")], &["--roce"]);
    let h2 = TestDaemon::start_with(&[("b", "gid=127.0.61.2")], &["--roce"]);
    let dropped = || ud_dropped(&h2, "b");
    rc_and_ud_qps_share_one_srq(&h1.open("a"), &h2.open("b"), &dropped);
}

/// Datagrams VM `name` of `d` has dropped.
fn ud_dropped(d: &TestDaemon, name: &str) -> u64 {
    d.vm(name)
        .expect("a connected VM")
        .counters
        .ud_dropped
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Both guests move to another daemon while the receiver's SRQ has two receives posted and its
/// limit armed: afterwards the next messages take exactly those receives (the SRQ's consumer
/// index moved), the limit fires when they leave none, and the SRQ works on.
#[test]
fn an_srq_with_posted_receives_moves_with_its_vm() {
    let source = TestDaemon::start(&[("a", ""), ("b", "")]);
    let dest = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, dev_a) = source.open_shared("a");
    let (cb, dev_b) = source.open_shared("b");
    let (s, r) = connect(&ca, &cb);
    let rc: Vec<u32> = r.rc.iter().map(QueuePair::qp_num).collect();
    r.post(0..4);
    s.send_rc(0, 100, 0x01);
    r.received(0, rc[0], 100, 0x01, false);
    s.send_rc(1, 200, 0x02);
    r.received(1, rc[1], 200, 0x02, false);
    r.srq
        .modify(
            &SrqAttr {
                srq_limit: 1,
                ..SrqAttr::default()
            },
            SrqAttrMask::LIMIT,
        )
        .expect("arm");

    migrate(
        &[
            (&dev_a, dest.socket("a").as_path()),
            (&dev_b, dest.socket("b").as_path()),
        ],
        &Plan {
            precopy_rounds: 1,
            ..Plan::default()
        },
        |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    source.wait_connected("b", false);
    assert!(dest.vm("b").is_some());

    assert_eq!(
        r.srq.query().expect("query after the move"),
        SrqAttr {
            max_wr: 16,
            max_sge: 2,
            srq_limit: 1
        }
    );
    s.send_rc(2, 300, 0x03);
    r.received(2, rc[2], 300, 0x03, false);
    s.send_rc(0, 400, 0x04);
    r.received(3, rc[0], 400, 0x04, false);
    r.wait_event(AsyncEventKind::SrqLimitReached, r.srq.srq_num());
    // Empty again: the next SEND waits for the receive posted on the destination.
    s.post_rc(1, 500, 0x05);
    nothing_completes(&[&s.rc[1].1, &r.cq]);
    r.post(4..6);
    assert_eq!(poll_one(&s.rc[1].1).status, WcStatus::Success);
    r.received(4, rc[1], 500, 0x05, false);
    s.send_ud(r.ud.qp_num(), 600, 0x06);
    r.received(5, r.ud.qp_num(), 600, 0x06, true);
}
