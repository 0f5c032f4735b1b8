//! The send-ring polling word: while the scheduler has work on a QP, the driver posts without
//! doorbells, and nothing posted is ever missed when the QP goes idle.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    // scheduler is busy with the QP most of the time, so posts made while it is need no
    // doorbell. How many that is depends on how the machine schedules the two threads (the
    // bench measures it); what must hold is that posts do go without doorbells, and that
    // none of them is lost. Keep posting (within a generous deadline) until some have.
    let least = 20_000u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let src = [Sge::new(a.buf.addr(), 4096, a.mr.lkey())];
    let wr = |id: u64| {
        [SendWr::rdma_write(id, &src, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)]
    };
    let doorbells = || port.counters.doorbells.load(Ordering::Relaxed) - before;
    let (mut posted, mut done) = (0u64, 0u64);
    let mut wc = [empty_wc(); 32];
    // Every doorbell of a completed post has been counted or is about to be; fewer doorbells
    // than completed posts means some posts went without one.
    while done < least || doorbells() >= done {
        assert!(
            Instant::now() < deadline,
            "{posted} single-request posts rang {} doorbells: every post rang although the \
             device polled the send ring",
            doorbells()
        );
        while posted - done < u64::from(depth) {
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
    // Drain what is still outstanding, then the queue is idle.
    while done < posted {
        let n = a.cq.poll(&mut wc).expect("poll");
        for w in &wc[..n] {
            assert_eq!(w.status, WcStatus::Success, "{w:?}");
            assert_eq!(w.wr_id, done, "completions out of order or missing");
            done += 1;
        }
    }
    let rung = doorbells();
    eprintln!("{posted} single-request posts rang {rung} doorbells");
    assert!(rung < posted, "some posts went without a doorbell");
    let total = posted;

    // Idle between posts: each post finds the QP idle (word clear) and must ring, or it
    // would never complete.
    for id in 0..200u64 {
        a.send(&wr(total + id)).expect("post write");
        let w = a.poll_one();
        assert_eq!((w.wr_id, w.status), (total + id, WcStatus::Success));
    }
}
