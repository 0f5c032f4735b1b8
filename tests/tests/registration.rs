//! Memory registration is one VM's business: a VM registering and deregistering gigabytes holds
//! its own objects for as long as it takes, and every other VM's traffic goes on meanwhile.
//!
//! The daemon checks a page list page by page under the registering VM's lock. The scheduler
//! serves every VM from one thread, so it must never wait for that lock: it takes a VM's
//! objects only with `try_lock`, its timers take no lock at all, and failing a departed VM's
//! peers waits while their VM is busy (unit tests in vhost-user-rdma/src/sched/mod.rs). The
//! scheduler only has a reason to touch the registering VM while it registers if that VM has
//! traffic of its own, so here it has QPs whose RNR timers keep falling due.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vhost_user_rdma::model::vm::Vm;
use vrdma::transport::Options;
use vrdma::{
    Context, QpAttr, QpAttrMask, QpCap, QpState, QpType, RecvWr, SendFlags, SendWr, Sge, WcStatus,
};
use vrdma_proto::mr::Access;
use vrdma_tests::raw::{Raw, reg_mr_body};
use vrdma_tests::{Endpoint, TestDaemon, connect_rc, rc_pair};

/// 16 KiB pages: the daemon checks every one of them.
const PAGE_SHIFT: u8 = 14;
/// 2^18 pages of 16 KiB, 4 GiB: the longest page list one REG_MR may carry.
const PAGES: u64 = 1 << 18;
/// The neighbour registers until its registrations have taken this long in all (about 50
/// registrations in a debug build, over a thousand in a release build)...
const REGISTERING: Duration = Duration::from_secs(2);
/// ...and the pair has completed at least this many round trips inside them, so that the
/// rates compared below rest on enough of them even on a loaded machine.
const MIN_ROUND_TRIPS: u64 = 1000;
/// Generous deadline for both.
const DEADLINE: Duration = Duration::from_secs(120);
/// Round trips the pair makes before the registrations start.
const WARM_UP: u64 = 200;

/// One round trip of the pair: when it completed, how many commands the registering VM's
/// device had carried out by then (its registrations are told apart by that count), and
/// whether that VM's objects were locked just after.
#[derive(Debug, Clone, Copy)]
struct RoundTrip {
    at: Instant,
    commands: u64,
    neighbour_locked: bool,
}

/// One registration: when the guest sent it, when the answer came, and the device's command
/// count once it was carried out (the count is one less from before it is sent until the
/// device has finished it, lock released).
#[derive(Debug, Clone, Copy)]
struct Registration {
    start: Instant,
    end: Instant,
    commands: u64,
}

/// The pair's 8-byte RDMA WRITE ping-pong (a writes to b, then b writes back to a) until
/// `stop`.
fn ping_pong(
    a: &Endpoint,
    b: &Endpoint,
    neighbour: &Vm,
    stop: &AtomicBool,
    count: &AtomicU64,
) -> Vec<RoundTrip> {
    let mut done = Vec::with_capacity(1 << 20);
    let from_a = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    let from_b = [Sge::new(b.buf.addr(), 8, b.mr.lkey())];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        a.buf.write_at(0, &n.to_le_bytes()).unwrap();
        let ping = SendWr::rdma_write(n, &from_a, b.buf.addr() + 64, b.mr.rkey());
        a.send(&[ping.with_flags(SendFlags::SIGNALED)]).unwrap();
        let wc = a.poll_one();
        assert_eq!((wc.wr_id, wc.status), (n, WcStatus::Success));
        b.buf.write_at(0, &n.to_le_bytes()).unwrap();
        let pong = SendWr::rdma_write(n, &from_b, a.buf.addr() + 64, a.mr.rkey());
        b.send(&[pong.with_flags(SendFlags::SIGNALED)]).unwrap();
        let wc = b.poll_one();
        assert_eq!((wc.wr_id, wc.status), (n, WcStatus::Success));
        let commands = neighbour.counters.commands_ok.load(Ordering::Acquire);
        // Taken, if free, for no longer than the look: a registration waits for it at most
        // that long.
        let neighbour_locked = neighbour.try_lock().is_none();
        done.push(RoundTrip {
            at: Instant::now(),
            commands,
            neighbour_locked,
        });
        n += 1;
        count.store(n, Ordering::Release);
    }
    done
}

/// Round trips that completed inside one registration: in all, and while the registering
/// VM's objects were locked. A round trip completed inside registration `i` if it completed
/// after the guest sent it and before the device had finished it.
#[derive(Debug, Clone, Copy, Default)]
struct Inside {
    all: usize,
    locked: usize,
}

fn place(registrations: &[Registration], done: &[RoundTrip]) -> Vec<Inside> {
    let mut inside = vec![Inside::default(); registrations.len()];
    for rt in done {
        // Registration `commands` is the one under way until the count reaches it.
        let Ok(i) = registrations.binary_search_by_key(&(rt.commands + 1), |r| r.commands) else {
            continue;
        };
        if rt.at < registrations[i].start {
            continue;
        }
        let n = &mut inside[i];
        n.all += 1;
        n.locked += usize::from(rt.neighbour_locked);
    }
    inside
}

/// The RNR timers of the registering VM's QPs (`min_rnr_timer`, IB encoding): 10 µs and
/// 160 µs.
const RNR_TIMERS: [u8; 2] = [1, 8];

/// A QP of `ctx` (whose VM is `vm`) with a SEND outstanding to another QP of `ctx` that has no
/// receive posted and answers RNR with `min_rnr_timer` (IB encoding): the sender retries
/// without end (rnr_retry 7). Returns (sender, receiver) once the first RNR has been answered.
fn refused_send(ctx: &Context, vm: &Vm, min_rnr_timer: u8) -> (Endpoint, Endpoint) {
    let sender = Endpoint::new(ctx, QpType::Rc, 4096, QpCap::default());
    let receiver = Endpoint::new(ctx, QpType::Rc, 4096, QpCap::default());
    connect_rc(&sender.qp, ctx.gid(), receiver.qp.qp_num(), 7, 7);
    connect_rc(&receiver.qp, ctx.gid(), sender.qp.qp_num(), 7, 7);
    let timer = QpAttr {
        qp_state: QpState::Rts,
        min_rnr_timer,
        ..QpAttr::default()
    };
    receiver
        .qp
        .modify(&timer, QpAttrMask::STATE | QpAttrMask::MIN_RNR_TIMER)
        .expect("RTS to RTS with a new min_rnr_timer");
    let src = [Sge::new(sender.buf.addr(), 8, sender.mr.lkey())];
    sender
        .send(&[SendWr::send(1, &src).with_flags(SendFlags::SIGNALED)])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let objects = vm.lock();
        let qp = objects.qps.get(sender.qp.qp_num()).expect("the sender");
        if qp.rt.inflight.wait_until.is_some() {
            break;
        }
        drop(objects);
        assert!(
            Instant::now() < deadline,
            "the SEND was never refused (RNR)"
        );
        std::thread::yield_now();
    }
    (sender, receiver)
}

#[test]
fn a_vm_registering_gigabytes_stalls_no_other_vms_traffic() {
    let d = TestDaemon::start(&[("a", ""), ("b", ""), ("c", "")]);

    // c: 4 GiB of guest memory, and room for its rings and its 2 MiB page list. memfd memory
    // is sparse and registering touches none of it, so the gigabytes cost nothing.
    let region_len = PAGES << PAGE_SHIFT;
    let options = Options {
        memory_size: region_len as usize + (16 << 20),
        ..Options::default()
    };
    let c = Raw::connect(d.socket("c"), options);
    let region =
        c.v.dma()
            .alloc_aligned(region_len as usize, 1 << PAGE_SHIFT)
            .expect("4 GiB of guest memory");
    let pages: Vec<u64> = (0..PAGES)
        .map(|i| region.addr() + (i << PAGE_SHIFT))
        .collect();
    let access = Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ;
    let reg_mr = reg_mr_body(c.alloc_pd(), access, PAGE_SHIFT, &pages);
    drop(pages);

    // c's own traffic: SENDs to QPs of c's with no receive posted, retried without end
    // (rnr_retry 7), so their RNR timers keep falling due while c registers: one every 10 µs,
    // one every 160 µs (see the end of the test for why two).
    let cc = c.context();
    let vm_c = d.vm("c").expect("c is connected");
    let refused: Vec<(Endpoint, Endpoint)> = RNR_TIMERS
        .iter()
        .map(|&timer| refused_send(&cc, &vm_c, timer))
        .collect();

    // a and b: an 8-byte RDMA WRITE ping-pong, on a thread of its own.
    let (ca, cb) = (d.open("a"), d.open("b"));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let pair = {
        let (stop, count, vm_c) = (stop.clone(), count.clone(), vm_c.clone());
        std::thread::spawn(move || {
            let (a, b) = rc_pair(&ca, &cb, 4096, QpCap::default());
            ping_pong(&a, &b, &vm_c, &stop, &count)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::Acquire) < WARM_UP {
        assert!(Instant::now() < deadline, "the ping-pong never got going");
        std::thread::yield_now();
    }

    // c registers and deregisters its 4 GiB, again and again.
    let mut registrations: Vec<Registration> = Vec::new();
    let began = Instant::now();
    let (mut registering, mut round_trips) = (Duration::ZERO, 0);
    while registering < REGISTERING || registrations.len() < 20 || round_trips < MIN_ROUND_TRIPS {
        assert!(
            began.elapsed() < DEADLINE,
            "only {round_trips} round trips during {} registrations in {DEADLINE:?}",
            registrations.len()
        );
        let before = count.load(Ordering::Acquire);
        let start = Instant::now();
        let lkey = c.reg_mr(&reg_mr);
        let end = Instant::now();
        let commands = vm_c.counters.commands_ok.load(Ordering::Acquire);
        round_trips += count.load(Ordering::Acquire) - before;
        c.dereg_mr(lkey);
        registrations.push(Registration {
            start,
            end,
            commands,
        });
        registering += end - start;
    }
    stop.store(true, Ordering::Relaxed);
    let done = pair.join().expect("the ping-pong thread");

    // c's SENDs were refused all along, and go through once receives are posted.
    for (k, (sender, receiver)) in refused.iter().enumerate() {
        sender.assert_no_completion(Duration::from_millis(1));
        let dst = [Sge::new(receiver.buf.addr(), 64, receiver.mr.lkey())];
        let wr_id = k as u64;
        receiver
            .recv(&[RecvWr {
                wr_id,
                sg_list: &dst,
            }])
            .unwrap();
        assert_eq!(sender.poll_one().status, WcStatus::Success);
        assert_eq!(receiver.poll_one().wr_id, wr_id);
    }

    let inside = place(&registrations, &done);
    let mut took: Vec<Duration> = registrations.iter().map(|r| r.end - r.start).collect();
    took.sort();
    let mut all: Vec<usize> = inside.iter().map(|n| n.all).collect();
    all.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "{} registrations of 4 GiB in 2^18 pages: {:.2} ms median ({:.2} to {:.2} ms); \
         round trips completed inside one: {} in all, median {} (from {} to {})",
        took.len(),
        ms(took[took.len() / 2]),
        ms(took[0]),
        ms(took[took.len() - 1]),
        all.iter().sum::<usize>(),
        all[all.len() / 2],
        all[0],
        all[all.len() - 1],
    );
    let all: usize = inside.iter().map(|n| n.all).sum();
    let locked: usize = inside.iter().map(|n| n.locked).sum();
    eprintln!(
        "round trips inside the registrations: {all}, of which {locked} ({:.1}%) completed while \
         c's objects were locked; registrations with such a round trip: {} of {}",
        100.0 * locked as f64 / all.max(1) as f64,
        inside.iter().filter(|n| n.locked > 0).count(),
        inside.len(),
    );

    // The pair must go on while c's objects are locked. The daemon decodes the page list
    // before it takes the lock, and the guest cannot see when it does, so the pair looks at
    // the lock itself after each round trip. The lock is held for most of a registration:
    // 62 to 68% of the round trips inside the registrations complete while it is held (five
    // runs), 47 to 74% under a `cargo build` loop (ten runs). A scheduler that waits for c's
    // lock completes nothing once one of c's timers falls due, at most 10 µs after the lock
    // is taken, and the round trip that completes as the lock is released finds it free: with
    // the scheduler's step made to wait for the lock, 0.1% of them did (six runs). An earlier
    // form of this test compared the rates of the registrations' first quarters and second
    // halves, guessing that the lock is taken half way: load on a two-core machine shifts
    // the rates between the parts by 2x either way, and with the step waiting for the lock it
    // passed in two runs of five.
    assert!(
        locked * 10 >= all,
        "the pair stalled while c registered: of the {all} round trips that completed inside \
         the registrations, only {locked} did while c's objects were locked"
    );
}
