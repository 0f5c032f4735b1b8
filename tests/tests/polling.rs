//! The scheduler polls the doorbell queues while traffic flows (guests stop kicking), and
//! stops polling once it does not: an idle daemon must cost no CPU.
//!
//! One test in its own binary, so the only `vrdma-scheduler` thread in the process is this
//! daemon's.

use std::time::{Duration, Instant};

use vrdma::{QpCap, SendFlags, SendWr, Sge, WcStatus};
use vrdma_tests::{TestDaemon, rc_pair};

/// CPU time the process's `vrdma-scheduler` thread has used.
fn scheduler_cpu() -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task").expect("list threads");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "vrdma-scheduler" {
            continue;
        }
        // The first field of schedstat is the time the thread spent on a CPU, in ns.
        let stat = std::fs::read_to_string(task.path().join("schedstat")).expect("schedstat");
        let ns = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .expect("schedstat format");
        return Duration::from_nanos(ns);
    }
    panic!("no vrdma-scheduler thread in this process");
}

#[test]
fn the_scheduler_polls_under_load_and_sleeps_when_idle() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ca, &cb, 4096, QpCap::default());
    let src = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    let wr =
        [SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)];

    // One write at a time, each waited for: doorbells come a few microseconds after the
    // previous completion, which is when polling pays.
    let cpu_before = scheduler_cpu();
    let started = Instant::now();
    for _ in 0..20_000 {
        a.send(&wr).expect("post write");
        assert_eq!(a.poll_one().status, WcStatus::Success);
    }
    let busy = started.elapsed();
    let busy_cpu = scheduler_cpu() - cpu_before;
    eprintln!("20000 writes in {busy:?}; scheduler CPU {busy_cpu:?}");
    // Polling means the scheduler stayed on its CPU between doorbells rather than sleeping:
    // its CPU time is a large part of the wall time (sleeping, it would be a small one).
    assert!(
        busy_cpu * 2 > busy,
        "the scheduler used {busy_cpu:?} of CPU in {busy:?}: it did not poll"
    );

    // Idle: after the polling window (at most 200 µs) it must sleep.
    std::thread::sleep(Duration::from_millis(20));
    let idle_before = scheduler_cpu();
    std::thread::sleep(Duration::from_millis(500));
    let idle_cpu = scheduler_cpu() - idle_before;
    eprintln!("idle for 500 ms: scheduler CPU {idle_cpu:?}");
    assert!(
        idle_cpu <= Duration::from_millis(20),
        "the idle scheduler used {idle_cpu:?} of CPU in 500 ms: it kept polling"
    );
}
