//! Live migration's dirty-page log (vhost-user `SET_LOG_BASE` with `LOG_SHMFD`): a guest's
//! transport turns it on and off with the messages QEMU sends, another VM RDMA WRITEs into
//! the guest's memory, and the test reads the log as the VMM would. Turning the log on and
//! off must not disturb the rings the device is completing work on meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, ScopedJoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::unistd::{Whence, lseek};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vrdma::mem::SharedMemory;
use vrdma::{CompletionChannel, MemoryRegion, QpCap, SendFlags, SendWr, Sge, WcStatus};
use vrdma_tests::{Endpoint, TestDaemon, all_access, empty_wc, rc_pair};

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
const LOG_PAGE: u64 = 4096;
/// Guest-physical addresses are the guest process's virtual addresses, which stay below
/// 2^48 (2^47 on x86-64) unless a mapping asks for more.
const ADDRESS_BITS: u32 = 48;

/// A VMM's dirty log over every address a guest of this process can have: a sparse memfd
/// (8 GiB for 48 bits, of which only the pages the device marks are allocated).
struct DirtyLog {
    file: File,
    size: u64,
}

impl DirtyLog {
    fn new() -> DirtyLog {
        let size = (1u64 << ADDRESS_BITS) / LOG_PAGE / 8;
        let file = File::from(memfd_create("vrdma-dirty-log", MFdFlags::MFD_CLOEXEC).unwrap());
        file.set_len(size).unwrap();
        DirtyLog { file, size }
    }

    /// The pages whose bits are set: the allocated stretches of the memfd (`SEEK_DATA`,
    /// `SEEK_HOLE`), bit by bit, so nothing set anywhere is missed.
    fn marked_pages(&self) -> BTreeSet<u64> {
        let mut pages = BTreeSet::new();
        let mut at = 0;
        loop {
            let data = match lseek(self.file.as_fd(), at, Whence::SeekData) {
                Ok(data) => data,
                Err(Errno::ENXIO) => return pages,
                Err(e) => panic!("SEEK_DATA in the dirty log: {e}"),
            };
            let hole = lseek(self.file.as_fd(), data, Whence::SeekHole).unwrap();
            let mut bytes = vec![0u8; (hole - data) as usize];
            self.file.read_exact_at(&mut bytes, data as u64).unwrap();
            for (i, byte) in bytes.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        pages.insert((data as u64 + i as u64) * 8 + bit);
                    }
                }
            }
            at = hole;
        }
    }

    /// Clears every bit, as a VMM does once it has copied the pages they name.
    fn clear(&self) {
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        fallocate(self.file.as_fd(), flags, 0, self.size as i64).unwrap();
        assert_eq!(self.marked_pages(), BTreeSet::new());
    }
}

/// The log pages `len` bytes at guest-physical `gpa` cover.
fn pages(gpa: u64, len: u64) -> BTreeSet<u64> {
    (gpa / LOG_PAGE..=(gpa + len - 1) / LOG_PAGE).collect()
}

fn cap() -> QpCap {
    QpCap {
        max_send_wr: 16,
        max_recv_wr: 16,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    }
}

/// RDMA WRITEs `len` bytes of a recognisable pattern from `a`'s buffer to `gpa` under `rkey`,
/// waits for its completion and checks the bytes arrived (`check` reads them back).
fn write(a: &Endpoint, gpa: u64, rkey: u32, len: u32, seed: u8, check: impl Fn(&mut [u8])) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
    a.buf.write_at(0, &data).unwrap();
    let src = [Sge::new(a.buf.addr(), len, a.mr.lkey())];
    a.send(&[
        SendWr::rdma_write(u64::from(seed), &src, gpa, rkey).with_flags(vrdma::SendFlags::SIGNALED)
    ])
    .unwrap();
    let wc = a.poll_one();
    assert_eq!((wc.wr_id, wc.status), (u64::from(seed), WcStatus::Success));
    let mut got = vec![0u8; len as usize];
    check(&mut got);
    assert_eq!(got, data, "the WRITE at {gpa:#x} did not land");
}

/// Guest `b` is the migrating VM: `a` writes into memory `b` had before the log was set and
/// into memory `b` added while logging, then after logging stopped.
#[test]
fn the_log_marks_the_pages_the_device_writes_until_logging_stops() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let ca = d.open("a");
    let (cb, dev_b) = d.open_shared("b");
    // b only answers WRITEs: it rings no doorbell and gets no completion, so the device
    // writes nothing else into its memory and the log shows just the pages written.
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap());
    let log = DirtyLog::new();
    dev_b.start_dirty_log(log.file.as_fd(), log.size).unwrap();

    // (a) Memory from before SET_LOG_BASE: exactly the pages the WRITE covered, across a
    // page boundary, are marked.
    log.clear();
    let target = b.buf.addr() + LOG_PAGE + 3000;
    write(&a, target, b.mr.rkey(), 2000, 1, |got| {
        b.buf
            .read_at((target - b.buf.addr()) as usize, got)
            .unwrap()
    });
    assert_eq!(pages(target, 2000).len(), 2);
    assert_eq!(log.marked_pages(), pages(target, 2000));

    // (b) Memory added (ADD_MEM_REG) after SET_LOG_BASE is logged too.
    let extra = Arc::new(SharedMemory::new("extra", 1 << 20).unwrap());
    cb.add_memory(extra.clone()).unwrap();
    let mr = MemoryRegion::register_range(&b.pd, extra.addr(), 1 << 20, all_access()).unwrap();
    log.clear();
    let target = extra.addr() + 5 * LOG_PAGE + 100;
    write(&a, target, mr.rkey(), 64, 2, |got| {
        extra.read(target, got).unwrap()
    });
    assert_eq!(
        log.marked_pages(),
        pages(target, 64),
        "a WRITE into memory added while logging must be logged"
    );

    // Removing other memory (REM_MEM_REG rebuilds the table) leaves the rest logged.
    let other = Arc::new(SharedMemory::new("other", 1 << 16).unwrap());
    cb.add_memory(other.clone()).unwrap();
    cb.remove_memory(other.addr()).unwrap();
    log.clear();
    write(&a, target, mr.rkey(), 64, 3, |got| {
        extra.read(target, got).unwrap()
    });
    assert_eq!(log.marked_pages(), pages(target, 64));

    // (c) After SET_FEATURES without LOG_ALL nothing is marked, in either memory.
    dev_b.stop_dirty_log().unwrap();
    log.clear();
    let first = b.buf.addr() + 100;
    write(&a, first, b.mr.rkey(), 64, 4, |got| {
        b.buf.read_at(100, got).unwrap()
    });
    write(&a, target, mr.rkey(), 64, 5, |got| {
        extra.read(target, got).unwrap()
    });
    assert_eq!(
        log.marked_pages(),
        BTreeSet::new(),
        "the device still logs after logging was turned off"
    );
}

/// Times the log is turned on and off again while the VM's rings run.
const LOG_CYCLES: u32 = 200;
/// Bytes of the WRITEs of one event round, one per QP, each QP with a CQ of its own: sizes
/// far apart, so that their completions, and the CQ events they raise, reach the event queue
/// at different moments of a `start_dirty_log` or `stop_dirty_log`.
const EVENT_WRITES: [u32; 4] = [4 << 10, 64 << 10, 256 << 10, 1 << 20];
/// How long a completion, event or command may take before the test calls it lost. Each takes
/// micro- to milliseconds; one whose used entry was overwritten never comes, so this only
/// bounds the failure.
const HANG: Duration = Duration::from_secs(10);

/// Stops the traffic threads when dropped, so that a failing main thread does not leave them
/// running for ever (the scope would wait for them).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Posts a signalled RDMA WRITE of `len` bytes from `from`'s buffer into `to`'s.
fn post_write(from: &Endpoint, to: &Endpoint, id: u64, len: u32) {
    let src = [Sge::new(from.buf.addr(), len, from.mr.lkey())];
    let wr = [
        SendWr::rdma_write(id, &src, to.buf.addr(), to.mr.rkey()).with_flags(SendFlags::SIGNALED)
    ];
    from.send(&wr)
        .unwrap_or_else(|e| panic!("posting WRITE {id}: {}", vrdma::error_chain(&e)));
}

/// Takes the completion of WRITE `id` from `ep`'s CQ, which must be the only one there.
fn expect_completion(ep: &Endpoint, id: u64) {
    let mut wc = [empty_wc(); 1];
    let deadline = Instant::now() + HANG;
    while ep.cq.poll(&mut wc).expect("poll") == 0 {
        assert!(
            Instant::now() < deadline,
            "WRITE {id} did not complete within {HANG:?}"
        );
        thread::yield_now();
    }
    assert_eq!(
        (wc[0].wr_id, wc[0].status),
        (id, WcStatus::Success),
        "the completion of WRITE {id}: {:?}",
        wc[0]
    );
    assert_eq!(
        ep.cq.poll(&mut wc).expect("poll"),
        0,
        "a completion after that of WRITE {id}: {:?}",
        wc[0]
    );
}

/// One WRITE per pair, each on an armed CQ of its own: the round must raise exactly one CQ
/// event per CQ (for each, the device returns an event buffer on the event queue) and one
/// completion per WRITE. An event whose used entry was overwritten leaves the round waiting.
fn event_round(pairs: &[(Endpoint, Endpoint)], channel: &CompletionChannel, round: u64) {
    let mut waiting = BTreeMap::new();
    for (i, ((b, a), len)) in pairs.iter().zip(EVENT_WRITES).enumerate() {
        // Armed before the WRITE is posted, so that its completion raises an event for sure.
        b.cq.req_notify(false).expect("arm the CQ");
        let id = round * 16 + i as u64;
        post_write(b, a, id, len);
        waiting.insert(b.cq.handle(), id);
    }
    let deadline = Instant::now() + HANG;
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match channel.get_cq_event(Some(left)) {
            Ok(Some(cqn)) => assert!(
                waiting.remove(&cqn).is_some(),
                "round {round}: a second event for CQ {cqn:#x}, or one for a CQ never armed"
            ),
            Ok(None) => panic!(
                "round {round}: no event within {HANG:?} for the WRITE(s) {:?}: an event the \
                 device put on the event queue was lost",
                waiting.values().collect::<Vec<_>>()
            ),
            Err(e) => panic!("round {round}: {}", vrdma::error_chain(&e)),
        }
    }
    for (i, (b, _)) in pairs.iter().enumerate() {
        expect_completion(b, round * 16 + i as u64);
    }
}

/// A small WRITE on an idle QP: it rings a doorbell, whose descriptor the device returns on
/// the doorbell queue.
fn doorbelled_write((b, a): &(Endpoint, Endpoint), id: u64) {
    post_write(b, a, id, 64);
    expect_completion(b, id);
}

/// A QUERY_DEVICE on the control queue, which must be answered with its own descriptor (the
/// transport checks the head) and the attributes `expected`.
fn query_device(ctx: &vrdma::Context, expected: &vrdma::DeviceAttr, n: u64) {
    let attr = ctx
        .query_device()
        .unwrap_or_else(|e| panic!("QUERY_DEVICE {n}: {}", vrdma::error_chain(&e)));
    assert_eq!(&attr, expected, "QUERY_DEVICE {n} answered something else");
}

/// Runs `step(1)`, `step(2)`... until `stop`, counting them in `done`.
fn repeat(stop: &AtomicBool, done: &AtomicU64, mut step: impl FnMut(u64)) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        step(n);
        done.store(n, Ordering::Relaxed);
    }
}

/// Waits until each counter has counted two more steps than it had on entry, so that at least
/// one step ran wholly after whatever came before the call. Returns false as soon as a traffic
/// thread has ended (it failed: joining it shows why); fails the test if a counter does not
/// get there within twice [`HANG`] (longer than the threads' own waits, which say more).
fn wait_for_progress(
    counters: &[(&str, &AtomicU64)],
    threads: &[ScopedJoinHandle<'_, ()>],
    when: &str,
) -> bool {
    let targets: Vec<u64> = counters
        .iter()
        .map(|(_, c)| c.load(Ordering::Relaxed) + 2)
        .collect();
    let deadline = Instant::now() + 2 * HANG;
    for ((what, counter), target) in counters.iter().zip(targets) {
        while counter.load(Ordering::Relaxed) < target {
            if threads.iter().any(ScopedJoinHandle::is_finished) {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "{when}: no {what} completed within {:?}",
                2 * HANG
            );
            thread::yield_now();
        }
    }
    true
}

/// QEMU turns the log on and off with `SET_VRING_ADDR` on rings that keep running, so the
/// device may return descriptors on them while it handles the message. Were the ring's next
/// used index reloaded from guest memory then, a used entry added between the load and the
/// store would be overwritten by the next one: a lost CQ event, doorbell descriptor or command
/// answer. VM b's guest keeps work in flight on every kind of ring while its log is turned on
/// and off: WRITEs completing on armed CQs (event queue), WRITEs on an idle QP (doorbell
/// queue) and QUERY_DEVICE (control queue). The driver holds its queue locks while it turns
/// the log on or off, so the entries racing the messages are the device's: the events of
/// WRITEs already posted, and doorbells it had not taken yet.
///
/// The race window is the few instructions between that load and that store, so without the
/// fix the test fails in only some runs (7 of 20 on a two-core machine, each time with a lost
/// event), in whichever check meets the damage first.
#[test]
fn turning_the_log_on_and_off_loses_nothing_the_device_completes_meanwhile() {
    let d = TestDaemon::start(&[("a", ""), ("b", "doorbells=2")]);
    let ca = d.open("a");
    let (cb, dev_b) = d.open_shared("b");
    let cap = QpCap {
        max_send_wr: 16,
        max_recv_wr: 1,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let len = *EVENT_WRITES.iter().max().unwrap() as usize;
    let event_pairs: Vec<_> = EVENT_WRITES
        .iter()
        .map(|_| rc_pair(&cb, &ca, len, cap))
        .collect();
    let write_pair = rc_pair(&cb, &ca, 4096, cap);
    let channel = CompletionChannel::new(&cb).expect("completion channel");
    let attr = cb.query_device().expect("QUERY_DEVICE");
    let log = DirtyLog::new();

    let stop = AtomicBool::new(false);
    let (rounds, writes, commands) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let counters = [
        ("event round", &rounds),
        ("doorbelled WRITE", &writes),
        ("command", &commands),
    ];
    thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let threads = [
            s.spawn(|| repeat(&stop, &rounds, |n| event_round(&event_pairs, &channel, n))),
            s.spawn(|| repeat(&stop, &writes, |n| doorbelled_write(&write_pair, n))),
            s.spawn(|| repeat(&stop, &commands, |n| query_device(&cb, &attr, n))),
        ];
        // A used index set back by a message loses an entry only when the next one is added,
        // and a later reload from memory would set it right again: traffic runs after every
        // message before the next one is sent.
        let progress = |when: String| wait_for_progress(&counters, &threads, &when);
        if progress("before logging".into()) {
            for cycle in 1..=LOG_CYCLES {
                dev_b
                    .start_dirty_log(log.file.as_fd(), log.size)
                    .unwrap_or_else(|e| panic!("cycle {cycle}: {}", vrdma::error_chain(&e)));
                if !progress(format!("cycle {cycle}, logging")) {
                    break;
                }
                dev_b
                    .stop_dirty_log()
                    .unwrap_or_else(|e| panic!("cycle {cycle}: {}", vrdma::error_chain(&e)));
                if !progress(format!("cycle {cycle}, after logging")) {
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            if let Err(panic) = t.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let [rounds, writes, commands] = [rounds, writes, commands].map(AtomicU64::into_inner);
    eprintln!(
        "{rounds} event rounds, {writes} doorbelled WRITEs and {commands} commands over \
         {LOG_CYCLES} cycles"
    );

    // A doorbell descriptor whose used entry was overwritten leaves the driver one slot short,
    // which nothing above notices: the device must have returned every descriptor it took.
    let doorbells = d.doorbells("b").expect("b is connected");
    for (i, vring) in doorbells.vrings().enumerate() {
        let deadline = Instant::now() + HANG;
        loop {
            let (taken, returned) = {
                let state = vring.get_ref();
                let queue = state.get_queue();
                (queue.next_avail(), queue.next_used())
            };
            if taken == returned {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "doorbell queue {i}: the device took {taken} descriptors but returned {returned}"
            );
            thread::yield_now();
        }
    }
}
