//! The scheduler polls the doorbell queues while traffic flows (the guest's doorbells are
//! taken without kicks), and stops once it does not (the driver is told to kick again, and
//! the next doorbell comes with a kick): an idle daemon must sleep, not poll.
//!
//! Behaviour only: how much CPU the scheduler uses while busy and once idle depends on the
//! machine's load, and is measured by the bench (section `idle`, docs/performance.md).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use vhost_user_rdma::model::vm::Vm;
use vhost_user_rdma::vhost::queues::DoorbellQueues;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vrdma::QpCap;
use vrdma_tests::{TestDaemon, doorbells_rung, rc_pair, write_one};

/// `VRING_USED_F_NO_NOTIFY`: the device tells the driver not to kick.
const USED_F_NO_NOTIFY: u16 = 1;

/// Whether the daemon tells the driver of VM `vm`, whose doorbell queues are `queues`, not to
/// kick any of them, which it does exactly while the scheduler polls them
/// (`Doorbells::set_kicks`).
fn kicks_off(vm: &Vm, queues: &DoorbellQueues) -> bool {
    let mem = vm.mem.memory();
    queues.vrings().any(|vring| {
        let used = vring.get_ref().get_queue().used_ring();
        mem.load::<u16>(GuestAddress(used), Ordering::Acquire)
            .is_ok_and(|flags| u16::from_le(flags) & USED_F_NO_NOTIFY != 0)
    })
}

#[test]
fn the_scheduler_polls_under_load_and_sleeps_when_idle() {
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ca, &cb, 4096, QpCap::default());
    let port = d.vm("a").expect("a is connected");
    let queues = d.doorbells("a").expect("a is connected");

    // A ping-pong: one write at a time, each waited for, so every doorbell comes a few
    // microseconds after the previous completion, which is when polling pays. The window
    // opens only after the scheduler has seen doorbells end short sleeps, which a loaded
    // machine may delay: keep going (within a generous deadline) until one was polled.
    let (rung0, polled0) = doorbells_rung(&port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut writes = 0u32;
    while writes < 2_000 || doorbells_rung(&port).1 == polled0 {
        assert!(
            Instant::now() < deadline,
            "{writes} writes in a ping-pong, and the scheduler took none of their {} doorbells \
             by polling: it never polled",
            doorbells_rung(&port).0 - rung0
        );
        write_one(&a, &b);
        writes += 1;
    }
    let (rung, polled) = doorbells_rung(&port);
    eprintln!(
        "{writes} writes rang {} doorbells, {} taken by polling",
        rung - rung0,
        polled - polled0
    );

    // Traffic has stopped. Once the polling window has passed the scheduler must stop
    // polling VM a, which it does by telling its driver to kick again; the next doorbell
    // then comes with a kick. A doorbell rung just as polling stops may still be taken by
    // the scheduler as it stops (it takes what came while kicks were off), and a write posted
    // before the scheduler has put the QP back to idle needs no doorbell: so try again until
    // one comes with a kick. A scheduler that kept polling fails either wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probes = 0u32;
    loop {
        while kicks_off(&port, &queues) {
            assert!(
                Instant::now() < deadline,
                "traffic stopped, and the scheduler kept polling VM a: its driver is still told \
                 not to kick"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = doorbells_rung(&port);
        write_one(&a, &b);
        probes += 1;
        let after = doorbells_rung(&port);
        let kicked = (after.0 - after.1) - (before.0 - before.1);
        if kicked > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "traffic stopped, and none of {probes} writes posted after it rang its doorbell with \
             a kick"
        );
    }
    eprintln!("idle: the doorbell of write {probes} after traffic stopped came with a kick");
}
