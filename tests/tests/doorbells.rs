//! The send-ring polling word: while the scheduler has work on a QP, the driver posts without
//! doorbells, and nothing posted is ever missed when the QP goes idle.

use std::sync::atomic::Ordering;

use vrdma::{QpCap, SendFlags, SendWr, Sge, WcStatus};
use vrdma_tests::{TestDaemon, empty_wc, rc_pair};

#[test]
fn a_busy_qp_takes_work_without_doorbells_and_loses_none() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let depth = 64u32;
    let cap = QpCap {
        max_send_wr: depth,
        ..QpCap::default()
    };
    let (a, b) = rc_pair(&ca, &cb, 1 << 20, cap);
    let port = d.vm("a").expect("a is connected");
    let before = port.counters.doorbells.load(Ordering::Relaxed);

    // One request per post_send, as perftest posts by default, keeping the queue full: the
    // scheduler is busy with the QP most of the time, so most posts need no doorbell.
    let total = 20_000u64;
    let src = [Sge::new(a.buf.addr(), 4096, a.mr.lkey())];
    let wr = |id: u64| {
        [SendWr::rdma_write(id, &src, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)]
    };
    let (mut posted, mut done) = (0u64, 0u64);
    let mut wc = [empty_wc(); 32];
    while done < total {
        while posted < total && posted - done < u64::from(depth) {
            a.send(&wr(posted)).expect("post write");
            posted += 1;
        }
        let n = a.cq.poll(&mut wc).expect("poll");
        for w in &wc[..n] {
            assert_eq!(w.status, WcStatus::Success, "{w:?}");
            // In order, none lost, none twice.
            assert_eq!(w.wr_id, done, "completions out of order or missing");
            done += 1;
        }
    }
    let doorbells = port.counters.doorbells.load(Ordering::Relaxed) - before;
    eprintln!("{total} single-request posts rang {doorbells} doorbells");
    assert!(
        doorbells < total / 2,
        "{doorbells} doorbells for {total} posts: the driver rang although the device polled"
    );

    // Idle between posts: each post finds the QP idle (word clear) and must ring, or it
    // would never complete.
    for id in 0..200u64 {
        a.send(&wr(total + id)).expect("post write");
        let w = a.poll_one();
        assert_eq!((w.wr_id, w.status), (total + id, WcStatus::Success));
    }
}
