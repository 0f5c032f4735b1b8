//! A kick wakes the scheduler itself: a VM's vring worker looks at a doorbell queue as its ring
//! starts and hands the queue's kicks to the scheduler, so a guest that kicks
//! wakes one daemon thread, not two (in event mode, one wake-up less per message). Its tests
//! run in a binary of their own and one at a time (`one_at_a_time`): they count the switches of
//! every thread of the process named `vring_worker`, so no other daemon may run beside them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost_user_rdma::model::vm::Vm;
use vrdma::QpCap;
use vrdma::transport::VirtioUser;
use vrdma_tests::{Endpoint, TestDaemon, doorbells_rung, rc_pair, write_one};

/// Context switches so far of each of this process's threads named `name`, by thread id
/// (in-process daemon: the vhost-user library names each VM's worker thread `vring_worker`).
fn switches_of(name: &str) -> HashMap<String, u64> {
    let mut by_thread = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let dir = task.expect("a task").path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim() != name {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
        by_thread.insert(dir.display().to_string(), switches);
    }
    by_thread
}

/// What the threads of `before` that still run have switched since.
fn switched_since(before: &HashMap<String, u64>, name: &str) -> u64 {
    switches_of(name)
        .iter()
        .filter_map(|(thread, now)| Some(now - before.get(thread)?))
        .sum()
}

/// Writes 2 ms apart: the scheduler sleeps between them and stops polling, so each doorbell
/// comes with a kick. Returns how many came with a kick and how often the vring workers
/// switched meanwhile. Before kicks were handed over, each kick woke a's vring worker, which
/// took the doorbell and woke the scheduler: about one worker context switch per write.
fn sparse_writes(a: &Endpoint, b: &Endpoint, port: &Vm, writes: u64) -> (u64, u64) {
    let workers_before = switches_of("vring_worker");
    let before = doorbells_rung(port);
    for _ in 0..writes {
        std::thread::sleep(Duration::from_millis(2));
        write_one(a, b);
    }
    let after = doorbells_rung(port);
    let workers = switched_since(&workers_before, "vring_worker");
    ((after.0 - after.1) - (before.0 - before.1), workers)
}

/// Held by each test while it runs: another test's daemon would add its vring workers to the
/// threads counted.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding it poisoned it; the next one can still run.
    TESTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// VMs `a` and `b` of one daemon, an RC pair between them that has carried one write, `a`'s
/// transport (to act as its VMM) and its port.
struct Pair {
    d: TestDaemon,
    dev_a: Arc<VirtioUser>,
    a: Endpoint,
    b: Endpoint,
    port: Arc<Vm>,
}

impl Pair {
    fn written_once() -> Pair {
        let d = TestDaemon::start(&[("a", ""), ("b", "")]);
        let (ca, dev_a) = d.open_shared("a");
        let cb = d.open("b");
        let (a, b) = rc_pair(&ca, &cb, 4096, QpCap::default());
        let port = d.vm("a").expect("a is connected");
        write_one(&a, &b);
        Pair {
            d,
            dev_a,
            a,
            b,
            port,
        }
    }
}

#[test]
fn a_kick_wakes_the_scheduler_not_the_vring_worker() {
    let _alone = one_at_a_time();
    const WRITES: u64 = 150;
    // The worker hands each doorbell queue's kicks over as the ring starts; one write first, so
    // that the measurements below begin with the pair connected and idle.
    let Pair {
        d: _d,
        dev_a,
        a,
        b,
        port,
    } = Pair::written_once();
    let first = sparse_writes(&a, &b, &port, WRITES);
    // The VMM stops and restarts the rings (a pause, as for a live migration): the library
    // gives the doorbell queue's kicks back to the worker, which hands them over
    // again.
    dev_a
        .pause_rings(|_| ())
        .expect("pause and resume the rings");
    write_one(&a, &b);
    let again = sparse_writes(&a, &b, &port, WRITES);
    for (when, (kicked, workers)) in [("at first", first), ("after a pause", again)] {
        eprintln!(
            "{when}: {WRITES} writes 2 ms apart, {kicked} doorbells came with a kick; the vring \
             workers switched {workers} times"
        );
        // Most came with a kick (a loaded machine may stretch a sleep past the next write's
        // doorbell now and then, which polling then takes): else this shows nothing.
        assert!(
            kicked >= WRITES / 2,
            "{when}: only {kicked} of {WRITES} writes 2 ms apart rang with a kick"
        );
        // A thread that never runs never switches: what switches there are come from the rare
        // doorbell a worker still sees (none, when kicks were handed over).
        assert!(
            workers <= WRITES / 10,
            "{when}: {kicked} kicked doorbells made the vring workers switch {workers} times: \
             kicks still wake them"
        );
    }
}

/// A guest that kicks its doorbell queue in a loop with no doorbell would keep the shared
/// scheduler awake, a pass per kick: once 64 kicks in a row bring nothing, its kicks are muted
/// and its queue is looked at once a millisecond instead. A write it then makes is carried,
/// found by that look, and its kicks count again.
#[test]
fn kicks_that_bring_no_doorbell_are_muted() {
    let _alone = one_at_a_time();
    let Pair {
        d,
        dev_a,
        a,
        b,
        port,
    } = Pair::written_once();
    let stats = d.daemon().scheduler().stats().clone();
    // Past the polling window: the scheduler sleeps, and only kicks wake it.
    std::thread::sleep(Duration::from_millis(20));
    let passes_before = stats.passes.load(Ordering::Relaxed);
    let storm = Duration::from_millis(300);
    let started = Instant::now();
    let mut kicks = 0u64;
    while started.elapsed() < storm {
        dev_a.kick_with_no_doorbell(0).expect("kick");
        kicks += 1;
    }
    let passes = stats.passes.load(Ordering::Relaxed) - passes_before;
    let mutes = stats.kick_mutes.load(Ordering::Relaxed);
    eprintln!(
        "{kicks} kicks with no doorbell in {storm:?}: {mutes} mute(s), the scheduler made {passes} passes"
    );
    assert!(mutes >= 1, "{kicks} empty kicks never muted a's kicks");
    // Muted, it makes a pass per millisecond, and a few for the kicks before: a few hundred,
    // not one per kick.
    assert!(
        passes < 2000,
        "{kicks} empty kicks made the scheduler pass {passes} times in {storm:?}"
    );
    assert!(
        kicks > 10 * passes,
        "the storm was too slow to show anything: {kicks} kicks"
    );
    write_one(&a, &b);
    assert_eq!(
        stats.muted_vms.load(Ordering::Relaxed),
        0,
        "a's doorbell gave it its kicks back"
    );
    let (kicked, _) = sparse_writes(&a, &b, &port, 20);
    assert!(
        kicked >= 10,
        "after a doorbell, a's kicks should count again: {kicked} of 20 writes came with one"
    );
}
