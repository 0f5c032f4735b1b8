//! A VMM pausing and resuming a VM stops and restarts its virtqueues (QEMU: `GET_VRING_BASE` on
//! every ring, then `SET_VRING_NUM`, `_ADDR`, `_BASE`, `_KICK`, `_CALL` and `_ENABLE`). When
//! that happens while the scheduler polls the VM's doorbell queue, the stopped queue keeps
//! `VRING_USED_F_NO_NOTIFY` in guest memory; if the scheduler stops polling meanwhile and the
//! device does not set the flag to match when the ring starts again, a driver following
//! docs/protocol.md §14.4 never kicks that queue again and its QPs hang. And while its rings
//! are stopped the VM is stopped: nothing it has in flight moves until they start again.
//! Nor may a stop end the VM's vring worker: the VMM can stop a ring while the worker is
//! about to read it, and an error from the worker's handler ends the worker, after which no
//! kick is taken and the QP hangs the same way.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vrdma::{CompletionQueue, QpCap, SendFlags, SendWr, Sge, WcStatus};
use vrdma_proto::queue;
use vrdma_tests::{Endpoint, TestDaemon, empty_wc, rc_pair};

/// Pause/resume cycles at least. Without the device setting the flag when a ring starts, the
/// test hangs in the first that catches the VM polled; the other cycles are for the races
/// around the restart itself.
const CYCLES: u32 = 200;
/// Pauses that must catch the VM polled; cycles go on past [`CYCLES`] until they have, up to
/// [`MAX_CYCLES`]. Whether one does is a race: the VM stops at the first ring the VMM stops,
/// the scheduler stops polling it once its window (10-200 µs) passes, and the doorbell ring
/// stops after the control and event rings. Between 0 and 139 of 200 pauses caught it,
/// varying from run to run, so a fixed 200 sometimes caught none.
const POLLED_PAUSES: u32 = 3;
/// The most cycles the test runs looking for [`POLLED_PAUSES`].
const MAX_CYCLES: u32 = 5000;
/// Small writes between two pauses at least, each waited for before the next is posted: each
/// doorbell comes a few microseconds after the previous completion, which is what makes the
/// scheduler poll (its polling window grows back after the long sleep of the previous pause).
/// They go on until it polls VM a, so that every bulk write starts, and every pause begins,
/// with the scheduler busy-polling: that load on the shared cores is what once caught the VM's
/// vring worker between its check that the control ring ran and its walk of it, as the VMM
/// stopped that ring, and ended the worker (one run in about twenty hung; none did with a
/// fixed count of writes).
const WRITES_PER_CYCLE: u64 = 20;
/// Bytes of the write in flight when the VMM pauses the VM: it keeps the scheduler serving,
/// and so polling, the VM while the rings stop.
const BULK: u32 = 8 << 20;
/// How long anything may take before the test calls it hung. A write takes microseconds (the
/// bulk one milliseconds); one whose doorbell is never taken takes for ever, so this only
/// bounds the failure.
const HANG: Duration = Duration::from_secs(10);

/// Waits until `done()` holds, failing the test with `hung()` after [`HANG`].
#[track_caller]
fn wait_for(mut done: impl FnMut() -> bool, hung: impl Fn() -> String) {
    let deadline = Instant::now() + HANG;
    while !done() {
        assert!(Instant::now() < deadline, "{}", hung());
        // Leave the CPU to the daemon: this machine has two cores.
        std::thread::yield_now();
    }
}

/// Waits for the completion of write `id` on `cq`, which must succeed.
#[track_caller]
fn await_write(cq: &CompletionQueue, id: u64, hung: impl Fn() -> String) {
    let mut wc = [empty_wc(); 1];
    wait_for(|| cq.poll(&mut wc).expect("poll") == 1, hung);
    assert_eq!(
        (wc[0].wr_id, wc[0].status),
        (id, WcStatus::Success),
        "{:?}",
        wc[0]
    );
}

/// Posts an RDMA WRITE of `len` bytes from `a` to `b`, signalled, with id `id`.
fn post_write(a: &Endpoint, b: &Endpoint, id: u64, len: u32) {
    let src = [Sge::new(a.buf.addr(), len, a.mr.lkey())];
    let wr =
        [SendWr::rdma_write(id, &src, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)];
    a.send(&wr).expect("post write");
}

#[test]
fn doorbells_are_taken_after_the_vmm_pauses_and_resumes_a_polled_vm() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, dev_a) = d.open_shared("a");
    let cb = d.open("b");
    let (a, b) = rc_pair(&ca, &cb, BULK as usize, QpCap::default());
    let doorbells_a = d.doorbells("a").expect("a is connected");
    let vm_a = d.vm("a").expect("a is connected");

    let mut id = 0u64;
    // How many pauses stopped the doorbell queue while the scheduler polled it (the flag
    // set): the case the test is for. A run in which none did would prove nothing.
    let mut paused_while_polled = 0u32;
    let mut cycle = 0;
    while cycle < CYCLES || (paused_while_polled < POLLED_PAUSES && cycle < MAX_CYCLES) {
        cycle += 1;
        // Each write is posted on an idle QP, so the driver rings a doorbell, and completes
        // only once the device takes it: from a kick, or by polling the queue. The writes go on
        // until the scheduler polls VM a (see WRITES_PER_CYCLE).
        let deadline = Instant::now() + HANG;
        let mut writes = 0;
        while writes < WRITES_PER_CYCLE || !doorbells_a.kicks_off() {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: {writes} small writes never made the scheduler poll VM a"
            );
            id += 1;
            writes += 1;
            post_write(&a, &b, id, 8);
            await_write(&a.cq, id, || {
                format!(
                    "QP hung after stop/start cycle {}: doorbells not taken",
                    cycle - 1
                )
            });
        }

        id += 1;
        let bulk = id;
        let moved_before = vm_a.counters.bytes.load(Ordering::Relaxed);
        post_write(&a, &b, bulk, BULK);
        // Pause only once the device has taken the write (its doorbell, if it needed one, is
        // off the ring): a doorbell left on a stopped ring waits for the restart. The counter
        // may still be short of the last small write's 8 bytes, so more than 8 must arrive.
        wait_for(
            || vm_a.counters.bytes.load(Ordering::Relaxed) > moved_before + 8,
            || format!("cycle {cycle}: the bulk write never started"),
        );
        let polled = dev_a
            .pause_rings(|rings| {
                let doorbell_ring = rings
                    .iter()
                    .find(|r| r.queue == queue::FIRST_DOORBELL)
                    .expect("the doorbell queue was stopped with the others");
                // The VM stops with its rings (live migration relies on it): the write in
                // flight moves no further until they restart.
                let moved = vm_a.counters.bytes.load(Ordering::Relaxed);
                // With the VM stopped, the scheduler stops polling it within its window.
                // Restart only once it has: the flag a stopped ring kept no longer matches,
                // and the device must set it right when the ring starts.
                wait_for(
                    || !doorbells_a.kicks_off(),
                    || format!("cycle {cycle}: the scheduler kept polling a stopped VM"),
                );
                assert_eq!(
                    vm_a.counters.bytes.load(Ordering::Relaxed),
                    moved,
                    "cycle {cycle}: VM a moved data while the VMM had its rings stopped"
                );
                doorbell_ring.no_notify
            })
            .unwrap_or_else(|e| panic!("stop/start cycle {cycle}: {}", vrdma::error_chain(&e)));
        if polled {
            paused_while_polled += 1;
        }
        await_write(&a.cq, bulk, || {
            format!("cycle {cycle}: the bulk write did not complete once the rings restarted")
        });
        // The QP is idle again, so this write needs its doorbell taken; with the flag left set
        // the driver does not kick, and nothing polls.
        id += 1;
        post_write(&a, &b, id, 8);
        await_write(&a.cq, id, || {
            format!(
                "QP hung after stop/start cycle {cycle}: doorbells not taken (the doorbell \
                 queue was stopped {} VRING_USED_F_NO_NOTIFY; or the VM's vring worker ended, \
                 which takes kicks)",
                if polled { "with" } else { "without" }
            )
        });
    }
    eprintln!("{paused_while_polled} of {cycle} pauses stopped a polled doorbell queue");
    assert!(
        paused_while_polled > 0,
        "no pause found the doorbell queue polled (VRING_USED_F_NO_NOTIFY set): the scheduler \
         never polled VM a, so the test exercised nothing"
    );

    // The control queue came back too.
    ca.query_port(1)
        .expect("the control queue answers after the stop/start cycles");
}
