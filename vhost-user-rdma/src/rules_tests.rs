//! The layers together, in process and without sockets: VMs in memory, the soft fabric, and
//! the scheduler run by hand. These show the RNIC rules (what a guest sees complete, fail and
//! flush) and that every write into a guest's memory takes the one path.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vrdma_proto::cmd::{self, Opcode, Status as CmdStatus};
use vrdma_proto::cqe::Status;
use vrdma_proto::doorbell;
use vrdma_proto::mr::Access;
use vrdma_proto::qp::{self, AttrMask};
use vrdma_proto::wqe::{self, Data, SendFlags, Sge};
use vrdma_proto::{Gid, event};
use zerocopy::IntoBytes;

use crate::config::PriorityClass;
use crate::fabric::soft::SoftFabric;
use crate::model::hooks::ObjectHooks;
use crate::model::memory::{WriteKind, recorder};
use crate::model::objects::{Mr, Qp};
use crate::sched::ManualScheduler;
use crate::testing::{TestMr, TestQp, TestVm, send_header};
use crate::vhost::queues::DoorbellQueues;
use crate::vhost::queues::tests::vring_at;

/// Two VMs, `a` and `b`, each with an RC QP connected to the other's, a buffer registered
/// for everything, and a scheduler on the soft fabric serving both.
struct Pair {
    a: TestVm,
    b: TestVm,
    qa: TestQp,
    qb: TestQp,
    ma: TestMr,
    mb: TestMr,
    sched: ManualScheduler,
}

const ALL: Access = Access::LOCAL_WRITE
    .union(Access::REMOTE_READ)
    .union(Access::REMOTE_WRITE)
    .union(Access::REMOTE_ATOMIC);

/// A pair whose QPs have `retry_cnt`, `rnr_retry` and `min_rnr_timer` as `retries`.
fn pair(retries: (u8, u8, u8), cq_depth: u32) -> Pair {
    let (mut a, mut b) = (TestVm::new(1, 1), TestVm::new(2, 1));
    let (pa, pb) = (a.pd(), b.pd());
    let qa = a.qp(pa, qp::Type::Rc, 16, cq_depth);
    let qb = b.qp(pb, qp::Type::Rc, 16, cq_depth);
    a.connect(qa.qpn, b.gid(), qb.qpn, retries);
    b.connect(qb.qpn, a.gid(), qa.qpn, retries);
    let ma = a.mr(pa, 64 << 10, ALL);
    let mb = b.mr(pb, 64 << 10, ALL);
    let mut sched = ManualScheduler::new(Box::new(SoftFabric::new(None)));
    sched.attach(&a.vm);
    sched.attach(&b.vm);
    Pair {
        a,
        b,
        qa,
        qb,
        ma,
        mb,
        sched,
    }
}

fn statuses(vm: &TestVm, qp: &TestQp) -> Vec<(u64, u8)> {
    vm.completions(qp.cq_ring, 64)
        .iter()
        .map(|c| (c.wr_id.get(), c.status))
        .collect()
}

fn state(vm: &TestVm, qpn: u32) -> Option<qp::State> {
    vm.vm.lock().qps.get(qpn).map(|q| q.state())
}

fn rdma(opcode: wqe::Opcode, wr_id: u64, remote: u64, rkey: u32) -> wqe::SendHeader {
    let mut h = send_header(opcode, wr_id, SendFlags::SIGNALED);
    h.remote_addr = remote.into();
    h.rkey = rkey.into();
    h
}

/// Payloads, READ responses, atomics, completions, ring indices, arm, notify-ack and polling
/// words: each kind of write the data path and the control path make goes through
/// `model::memory`, and nothing else in either guest's memory changes.
#[test]
fn every_write_into_guest_memory_goes_through_the_one_path() {
    let mut p = pair((7, 7, 1), 64);
    let (a, b, qa, qb, ma, mb) = (&p.a, &p.b, p.qa, p.qb, p.ma, p.mb);
    a.fill(ma.addr, 4096, 0xa1);
    b.fill(mb.addr, 4096, 0xb2);
    b.post_recv(&qb, 100, &[Sge::new(mb.addr + 8192, 256, mb.lkey)]);
    let src = [Sge::new(ma.addr, 512, ma.lkey)];
    a.post_send(
        &qa,
        rdma(wqe::Opcode::RdmaWrite, 1, mb.addr + 4096, mb.rkey),
        Data::Sges(&src),
    );
    let send = [Sge::new(ma.addr, 64, ma.lkey)];
    a.post_send(
        &qa,
        send_header(wqe::Opcode::Send, 2, SendFlags::SIGNALED),
        Data::Sges(&send),
    );
    let into = [Sge::new(ma.addr + 16384, 1024, ma.lkey)];
    a.post_send(
        &qa,
        rdma(wqe::Opcode::RdmaRead, 3, mb.addr, mb.rkey),
        Data::Sges(&into),
    );
    let result = [Sge::new(ma.addr + 32768, 8, ma.lkey)];
    let mut faa = rdma(wqe::Opcode::AtomicFetchAndAdd, 4, mb.addr + 12288, mb.rkey);
    faa.compare_add = 5.into();
    a.post_send(&qa, faa, Data::Sges(&result));

    let (a_before, b_before) = (recorder::snapshot(&a.mem()), recorder::snapshot(&b.mem()));
    recorder::start();
    // b arms its CQ (the control path's arm word), then the traffic runs.
    let arm = cmd::ReqNotifyCq {
        cqn: qb.cqn.into(),
        flags: 0.into(),
    };
    b.exec(Opcode::ReqNotifyCq, arm.as_bytes());
    p.sched.run_until("a's four requests completing", || {
        p.a.completions(qa.cq_ring, 64).len() == 4
    });
    let writes = recorder::take();
    let (a_after, b_after) = (recorder::snapshot(&a.mem()), recorder::snapshot(&b.mem()));
    recorder::assert_covered(&a_before, &a_after, &writes);
    recorder::assert_covered(&b_before, &b_after, &writes);

    let kinds: HashSet<WriteKind> = writes.iter().map(|w| w.kind).collect();
    for kind in [
        WriteKind::Payload,
        WriteKind::Atomic,
        WriteKind::Cqe,
        WriteKind::RingIndex,
        WriteKind::ControlWord,
    ] {
        assert!(
            kinds.contains(&kind),
            "no {kind:?} write recorded: {kinds:?}"
        );
    }
    // The writes did what they say.
    assert_eq!(b.read(mb.addr + 4096, 512), vec![0xa1; 512], "WRITE");
    assert_eq!(b.read(mb.addr + 8192, 64), vec![0xa1; 64], "SEND");
    assert_eq!(a.read(ma.addr + 16384, 1024), vec![0xb2; 1024], "READ");
    let word = u64::from_ne_bytes(b.read(mb.addr + 12288, 8).try_into().unwrap());
    let old = u64::from_ne_bytes(a.read(ma.addr + 32768, 8).try_into().unwrap());
    assert_eq!(word, old + 5, "FETCH_ADD");
    assert_eq!(
        statuses(a, &qa),
        vec![(1, 0), (2, 0), (3, 0), (4, 0)],
        "all four succeeded, in order"
    );
    assert_eq!(
        b.events.kinds(),
        vec![(event::Kind::CqCompletion.raw(), qb.cqn)],
        "b's armed CQ raised its event for the SEND"
    );
}

/// A step whose copy is cut short (a higher class's work arrived) moves its first piece and
/// no more, and the work request goes on from there at the next step: every operation that
/// copies arrives whole and completes once, with the receive consumed once and at the end.
#[test]
fn a_work_request_cut_at_every_piece_arrives_whole_and_completes_once() {
    const LEN: u32 = 30_000;
    const PIECE: u32 = 4096;
    let mut p = pair((7, 7, 1), 64);
    let (qa, qb, ma, mb) = (p.qa, p.qb, p.ma, p.mb);
    let pattern: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8 + 1).collect();
    vm_memory::Bytes::write_slice(&*p.a.mem(), &pattern, vm_memory::GuestAddress(ma.addr)).unwrap();
    let src = [Sge::new(ma.addr, LEN, ma.lkey)];
    b_recv_and_send(&p, &src);
    let mut imm = rdma(wqe::Opcode::RdmaWriteWithImm, 2, mb.addr, mb.rkey);
    imm.imm_data = [1, 2, 3, 4];
    p.a.post_send(&qa, imm, Data::Sges(&src));
    p.a.post_send(
        &qa,
        rdma(wqe::Opcode::RdmaRead, 3, mb.addr, mb.rkey),
        Data::Sges(&[Sge::new(ma.addr + LEN as u64, LEN, ma.lkey)]),
    );
    let mut steps = Vec::new();
    for _ in 0..100 {
        let outcome = p.sched.step_cut_at_every_piece(&p.a.vm, qa.qpn, PIECE);
        if outcome.bytes == 0 && p.a.completions(qa.cq_ring, 64).len() == 3 {
            break;
        }
        steps.push(outcome.bytes);
    }
    let pieces = LEN.div_ceil(PIECE) as usize;
    let expected: Vec<u32> = (0..3)
        .flat_map(|_| (0..pieces as u32).map(|k| (LEN - k * PIECE).min(PIECE)))
        .collect();
    assert_eq!(steps, expected, "a piece a step, for each of the three");
    assert_eq!(
        statuses(&p.a, &qa),
        vec![(1, 0), (2, 0), (3, 0)],
        "each completed once"
    );
    let recvs = p.b.completions(qb.cq_ring, 64);
    let got: Vec<(u64, u32, [u8; 4])> = recvs
        .iter()
        .map(|c| (c.wr_id.get(), c.byte_len.get(), c.imm_data))
        .collect();
    assert_eq!(
        got,
        vec![(100, LEN, [0; 4]), (101, LEN, [1, 2, 3, 4])],
        "one receive per message, at its end"
    );
    assert_eq!(
        p.b.read(mb.addr + 32 * 1024, LEN as usize)[..],
        pattern[..],
        "SEND"
    );
    assert_eq!(p.b.read(mb.addr, LEN as usize)[..], pattern[..], "WRITE");
    assert_eq!(
        p.a.read(ma.addr + LEN as u64, LEN as usize)[..],
        pattern[..],
        "READ back"
    );
}

/// A latency VM's doorbell, made available in its polled doorbell ring (no kick), cuts a bulk
/// VM's copy at the next piece: the copy's question reads the ring's available index through
/// the watched word. The next pass takes the doorbell and, strict priority, holds the bulk VM
/// back; the one after carries the message, and the bulk WRITE goes on from where it was cut.
#[test]
fn a_polled_latency_doorbell_cuts_a_bulk_copy_at_the_next_piece() {
    const BULK: u32 = 48 << 10;
    const PIECE: u32 = 4096;
    let mut p = pair((7, 7, 1), 64);
    let (qa, mb) = (p.qa, p.mb);
    // Both VMs of the pair in bulk: only l is above them.
    p.a.vm.share.set_class(PriorityClass::Bulk);
    p.b.vm.share.set_class(PriorityClass::Bulk);
    let mut l = TestVm::new(3, 1);
    l.vm.share.set_class(PriorityClass::Latency);
    let (pl, pb) = (l.pd(), p.b.pd());
    let ql = l.qp(pl, qp::Type::Rc, 16, 64);
    let qb2 = p.b.qp(pb, qp::Type::Rc, 16, 64);
    l.connect(ql.qpn, p.b.gid(), qb2.qpn, (7, 7, 1));
    p.b.connect(qb2.qpn, l.gid(), ql.qpn, (7, 7, 1));
    let ml = l.mr(pl, 4096, ALL);
    l.fill(ml.addr, 8, 0x5a);
    let mb2 = p.b.mr(pb, 4096, ALL);
    // l's doorbell ring, known to its queues (as the ring's start makes it), polled.
    let ring = l.alloc(16 << 10);
    let batch = l.alloc(4096);
    let bell = doorbell::Doorbell::new(doorbell::Kind::Send, ql.qpn);
    vm_memory::Bytes::write_slice(&*l.mem(), bell.as_bytes(), GuestAddress(batch)).unwrap();
    let vring = vring_at(&l, ring, 16);
    let queues = Arc::new(DoorbellQueues::new(l.vm.clone()));
    queues.kicked(0, &vring);
    p.sched.attach_polled(&l.vm, queues.clone());
    // l's WRITE is in its send queue; only its doorbell will say so.
    let target = mb2.addr;
    let message = [Sge::new(ml.addr, 8, ml.lkey)];
    l.post_send(
        &ql,
        rdma(wqe::Opcode::RdmaWrite, 9, target, mb2.rkey),
        Data::Sges(&message),
    );
    // Nothing on any ready list (connecting put the QPs there): only the doorbell will tell.
    for vm in [&l.vm, &p.a.vm, &p.b.vm] {
        while vm.pop_ready().is_some() {}
    }
    // a's bulk WRITE starts; l's driver makes its doorbell available meanwhile.
    p.a.fill(p.ma.addr, BULK as usize, 0xb7);
    let bulk = [Sge::new(p.ma.addr, BULK, p.ma.lkey)];
    p.a.post_send(
        &qa,
        rdma(wqe::Opcode::RdmaWrite, 1, mb.addr, mb.rkey),
        Data::Sges(&bulk),
    );
    let chain = [RawDescriptor::from(SplitDescriptor::new(batch, 8, 0, 0))];
    MockSplitQueue::create(&*l.mem(), GuestAddress(ring), 16)
        .add_desc_chains(&chain, 0)
        .unwrap();
    let first = p.sched.step_below_a_higher_class(&p.a.vm, qa.qpn, PIECE);
    assert_eq!(first.bytes, PIECE, "cut after the first piece");
    // `pass` runs a round without the loop's poll of the polled VMs before it: the doorbell
    // is taken by the round's check before the bulk class's pass.
    assert!(p.sched.pass(), "the doorbell taken: the next round is due");
    let polled = l.vm.counters.doorbells_polled.load(Ordering::Relaxed);
    assert_eq!(polled, 1, "taken by polling, no kick");
    assert_eq!(p.b.read(mb.addr + u64::from(PIECE), 8), [0; 8], "a waited");
    assert_eq!(p.b.read(target, 8), [0; 8]);
    assert!(p.sched.pass());
    assert_eq!(p.b.read(target, 8), [0x5a; 8], "l's message");
    assert_eq!(statuses(&l, &ql), [(9, 0)]);
    p.sched
        .run_until("a's WRITE completes", || statuses(&p.a, &qa) == [(1, 0)]);
    assert_eq!(
        p.b.read(mb.addr, BULK as usize),
        vec![0xb7; BULK as usize],
        "a's WRITE whole"
    );
}

/// b posts two receives; a sends `src`.
fn b_recv_and_send(p: &Pair, src: &[Sge]) {
    let len = src[0].length.get();
    p.b.post_recv(
        &p.qb,
        100,
        &[Sge::new(p.mb.addr + 32 * 1024, len, p.mb.lkey)],
    );
    p.b.post_recv(&p.qb, 101, &[Sge::new(p.mb.addr + 32 * 1024, 0, p.mb.lkey)]);
    p.a.post_send(
        &p.qa,
        send_header(wqe::Opcode::Send, 1, SendFlags::SIGNALED),
        Data::Sges(src),
    );
}

#[test]
fn rnr_retries_run_out_with_rnr_retry_exc_err() {
    // One RNR retry, 10 µs apart; b never posts a receive.
    let mut p = pair((7, 1, 1), 64);
    let src = [Sge::new(p.ma.addr, 8, p.ma.lkey)];
    p.a.post_send(
        &p.qa,
        send_header(wqe::Opcode::Send, 9, SendFlags::SIGNALED),
        Data::Sges(&src),
    );
    let (a, qa) = (&p.a, p.qa);
    p.sched.run_until("the SEND failing", || {
        !a.completions(qa.cq_ring, 64).is_empty()
    });
    assert_eq!(
        statuses(&p.a, &p.qa),
        vec![(9, Status::RnrRetryExcErr.raw())]
    );
    assert_eq!(state(&p.a, p.qa.qpn), Some(qp::State::Err));
    assert_eq!(state(&p.b, p.qb.qpn), Some(qp::State::Rts), "b is unharmed");
}

#[test]
fn a_forged_rkey_fails_both_sides_as_on_hardware() {
    let mut p = pair((7, 7, 1), 64);
    let src = [Sge::new(p.ma.addr, 8, p.ma.lkey)];
    p.a.post_send(
        &p.qa,
        rdma(wqe::Opcode::RdmaWrite, 5, p.mb.addr, p.mb.rkey ^ 0x100),
        Data::Sges(&src),
    );
    let (a, qa) = (&p.a, p.qa);
    p.sched.run_until("the WRITE failing", || {
        !a.completions(qa.cq_ring, 64).is_empty()
    });
    assert_eq!(statuses(&p.a, &p.qa), vec![(5, Status::RemAccessErr.raw())]);
    assert_eq!(state(&p.b, p.qb.qpn), Some(qp::State::Err));
    assert!(
        p.b.events
            .kinds()
            .contains(&(event::Kind::QpAccessErr.raw(), p.qb.qpn)),
        "{:?}",
        p.b.events.kinds()
    );
}

#[test]
fn a_requester_with_no_responder_retries_then_fails_with_retry_exc_err() {
    let mut a = TestVm::new(1, 1);
    let pd = a.pd();
    let qa = a.qp(pd, qp::Type::Rc, 16, 64);
    // Nobody has 10.0.0.9; one retry.
    a.connect(qa.qpn, Gid::from_ipv4([10, 0, 0, 9]), 1, (1, 7, 1));
    let m = a.mr(pd, 4096, ALL);
    let src = [Sge::new(m.addr, 8, m.lkey)];
    let mut sched = ManualScheduler::new(Box::new(SoftFabric::new(None)));
    sched.attach(&a.vm);
    a.post_send(
        &qa,
        rdma(wqe::Opcode::RdmaWrite, 6, 0x1000, 1),
        Data::Sges(&src),
    );
    a.post_send(
        &qa,
        rdma(wqe::Opcode::RdmaWrite, 7, 0x1000, 1),
        Data::Sges(&src),
    );
    sched.run_until("both requests completing", || {
        a.completions(qa.cq_ring, 64).len() == 2
    });
    assert_eq!(
        statuses(&a, &qa),
        vec![
            (6, Status::RetryExcErr.raw()),
            (7, Status::WrFlushErr.raw())
        ],
        "the one in progress fails, the next is flushed"
    );
    assert_eq!(state(&a, qa.qpn), Some(qp::State::Err));
}

#[test]
fn a_full_cq_takes_its_qp_to_the_error_state() {
    // Two entries, never consumed; three signalled WRITEs.
    let mut p = pair((7, 7, 1), 2);
    let src = [Sge::new(p.ma.addr, 8, p.ma.lkey)];
    for id in 0..3 {
        p.a.post_send(
            &p.qa,
            rdma(wqe::Opcode::RdmaWrite, id, p.mb.addr, p.mb.rkey),
            Data::Sges(&src),
        );
    }
    let (a, qa) = (&p.a, p.qa);
    p.sched
        .run_until("a's QP in ERR", || state(a, qa.qpn) == Some(qp::State::Err));
    assert_eq!(
        statuses(&p.a, &p.qa),
        vec![(0, 0), (1, 0)],
        "two completions fit"
    );
    assert!(
        p.a.events
            .kinds()
            .contains(&(event::Kind::CqErr.raw(), p.qa.cqn)),
        "{:?}",
        p.a.events.kinds()
    );
}

/// docs/protocol.md §16.1: every MODIFY_QP into SQD is an entry, SQD → SQD included, and each
/// entry raises its own SqDrained once the send queue is drained.
#[test]
fn every_entry_into_sqd_raises_sq_drained() {
    let mut p = pair((7, 7, 1), 64);
    let into_sqd = qp::Attr {
        qp_state: qp::State::Sqd.raw(),
        en_sqd_async_notify: 1,
        ..qp::Attr::default()
    };
    p.a.modify(p.qa.qpn, AttrMask::EN_SQD_ASYNC_NOTIFY, into_sqd)
        .expect("RTS -> SQD");
    let drained = |vm: &TestVm, qpn: u32| {
        vm.events
            .kinds()
            .iter()
            .filter(|&&k| k == (event::Kind::SqDrained.raw(), qpn))
            .count()
    };
    let (a, qpn) = (&p.a, p.qa.qpn);
    p.sched
        .run_until("the first SqDrained", || drained(a, qpn) == 1);
    // SQD -> SQD, changing the ACK timeout: a second entry.
    let again = qp::Attr {
        qp_state: qp::State::Sqd.raw(),
        timeout: 14,
        ..qp::Attr::default()
    };
    p.a.modify(p.qa.qpn, AttrMask::TIMEOUT, again)
        .expect("SQD -> SQD");
    p.sched
        .run_until("the second SqDrained", || drained(a, qpn) == 2);
    for _ in 0..20 {
        p.sched.pass();
    }
    assert_eq!(drained(&p.a, p.qa.qpn), 2, "once per entry, not more");
}

/// What a NIC fabric would see: every MR and QP change, and a refusal of its own that
/// fails the command with nothing changed.
#[derive(Debug, Default)]
struct RecordingHooks {
    calls: std::sync::Mutex<Vec<&'static str>>,
    refuse_mr: bool,
}

impl ObjectHooks for RecordingHooks {
    fn register_mr(
        &self,
        _vm: u64,
        _lkey: u32,
        _mr: &Mr,
        _mem: &crate::model::memory::GuestMem,
    ) -> Result<Option<u32>, CmdStatus> {
        self.calls.lock().unwrap().push("register_mr");
        if self.refuse_mr {
            Err(CmdStatus::NoResources)
        } else {
            Ok(None)
        }
    }
    fn deregister_mr(&self, _vm: u64, _lkey: u32, _mr: &Mr) {
        self.calls.lock().unwrap().push("deregister_mr");
    }
    fn create_qp(
        &self,
        _vm: u64,
        _qp: &Qp,
        _mem: &crate::model::memory::GuestMem,
        _fits: &dyn Fn(u32) -> bool,
    ) -> Result<Option<u32>, CmdStatus> {
        self.calls.lock().unwrap().push("create_qp");
        Ok(None)
    }
    fn modify_qp(
        &self,
        _vm: u64,
        _qpn: u32,
        _before: &Qp,
        _mask: qp::AttrMask,
        _attr: &qp::Attr,
        _next: qp::State,
    ) -> Result<(), CmdStatus> {
        self.calls.lock().unwrap().push("modify_qp");
        Ok(())
    }
    fn destroy_qp(&self, _vm: u64, _qpn: u32, _qp: &Qp) {
        self.calls.lock().unwrap().push("destroy_qp");
    }
}

#[test]
fn the_fabric_hears_of_every_mr_and_qp_and_may_refuse_an_mr() {
    let mut vm = TestVm::new(3, 1);
    let pd = vm.pd();
    let buf = vm.alloc(8192);
    let body = TestVm::reg_mr_body(pd, buf, 8192, Access::LOCAL_WRITE);
    let refusing = RecordingHooks {
        refuse_mr: true,
        ..RecordingHooks::default()
    };
    let refused = vm.exec_with(cmd::Opcode::RegMr, &body, &refusing);
    assert_eq!(refused.unwrap_err().status, CmdStatus::NoResources);
    {
        let objects = vm.vm.lock();
        assert_eq!((objects.mrs.len(), objects.registered_bytes), (0, 0));
        assert_eq!(objects.pds.get(pd).map(|p| p.users), Some(0));
    }
    let hooks = RecordingHooks::default();
    let keys = <cmd::RegMrResp as zerocopy::FromBytes>::read_from_bytes(
        &vm.exec_with(cmd::Opcode::RegMr, &body, &hooks).unwrap(),
    )
    .unwrap();
    let qp = vm.qp(pd, qp::Type::Rc, 4, 16);
    // The QP came from `exec` (no hooks); tell these hooks of its changes from here on.
    let init = qp::Attr {
        qp_state: qp::State::Init.raw(),
        port_num: 1,
        ..qp::Attr::default()
    };
    let mask = AttrMask::PKEY_INDEX | AttrMask::PORT | AttrMask::ACCESS_FLAGS;
    vm.modify_with(qp.qpn, mask, init, &hooks).unwrap();
    let handle = |h: u32| {
        cmd::Handle {
            handle: h.into(),
            reserved: 0.into(),
        }
        .as_bytes()
        .to_vec()
    };
    vm.exec_with(cmd::Opcode::DestroyQp, &handle(qp.qpn), &hooks)
        .unwrap();
    vm.exec_with(cmd::Opcode::DeregMr, &handle(keys.lkey.get()), &hooks)
        .unwrap();
    assert_eq!(
        *hooks.calls.lock().unwrap(),
        vec!["register_mr", "modify_qp", "destroy_qp", "deregister_mr"]
    );
}

/// A fabric that posts receives ahead of arrival: records each `post_receives`, and with
/// `fail` takes the QP to ERR itself, as the verbs fabric does with a receive it cannot post.
#[derive(Debug, Default)]
struct PostingHooks {
    posted: std::sync::Mutex<Vec<u32>>,
    fail: bool,
}

impl ObjectHooks for PostingHooks {
    fn post_receives(
        &self,
        _vm: u64,
        objects: &mut crate::model::objects::VmObjects,
        _mem: &crate::model::memory::GuestMem,
        qpn: u32,
    ) {
        self.posted.lock().unwrap().push(qpn);
        if self.fail {
            if let Some(qp) = objects.qps.get_mut(qpn) {
                qp.attr.qp_state = qp::State::Err.raw();
            }
            objects.wake.push(qpn);
        }
    }
}

fn handle_body(h: u32) -> Vec<u8> {
    cmd::Handle {
        handle: h.into(),
        reserved: 0.into(),
    }
    .as_bytes()
    .to_vec()
}

fn ready(vm: &TestVm) -> Vec<u32> {
    std::iter::from_fn(|| vm.vm.pop_ready()).collect()
}

/// `POST_RECV` hands the QP to the fabric's `post_receives` and succeeds with an empty
/// response; an unknown QP is `InvalidHandle` and reaches no fabric. A QP in ERR, or one the
/// fabric failed, is handed to the scheduler once, for the flush of its new receives.
#[test]
fn post_recv_hands_the_qp_to_the_fabric_and_a_qp_in_err_to_the_scheduler() {
    let mut vm = TestVm::new(4, 1);
    let pd = vm.pd();
    let qp = vm.qp(pd, qp::Type::Rc, 4, 16);
    let hooks = PostingHooks::default();
    let unknown = vm.exec_with(Opcode::PostRecv, &handle_body(qp.qpn ^ 0x40), &hooks);
    assert_eq!(unknown.unwrap_err().status, CmdStatus::InvalidHandle);
    assert!(hooks.posted.lock().unwrap().is_empty());

    let init = qp::Attr {
        qp_state: qp::State::Init.raw(),
        port_num: 1,
        ..qp::Attr::default()
    };
    let mask = AttrMask::PKEY_INDEX | AttrMask::PORT | AttrMask::ACCESS_FLAGS;
    vm.modify(qp.qpn, mask, init).unwrap();
    ready(&vm);
    let resp = vm.exec_with(Opcode::PostRecv, &handle_body(qp.qpn), &hooks);
    assert_eq!(resp.unwrap(), Vec::<u8>::new());
    assert_eq!(*hooks.posted.lock().unwrap(), vec![qp.qpn]);
    assert_eq!(
        ready(&vm),
        Vec::<u32>::new(),
        "a QP in INIT has nothing to flush"
    );

    let failing = PostingHooks {
        fail: true,
        ..PostingHooks::default()
    };
    vm.exec_with(Opcode::PostRecv, &handle_body(qp.qpn), &failing)
        .unwrap();
    assert_eq!(
        ready(&vm),
        vec![qp.qpn],
        "failed by the fabric, queued once"
    );

    vm.exec_with(Opcode::PostRecv, &handle_body(qp.qpn), &hooks)
        .unwrap();
    assert_eq!(ready(&vm), vec![qp.qpn], "in ERR, queued for the flush");
}

/// `POST_SRQ_RECV` checks the SRQ and does nothing else: no fabric carries SRQs ahead of
/// arrival yet.
#[test]
fn post_srq_recv_checks_the_srq() {
    let mut vm = TestVm::new(5, 1);
    let pd = vm.pd();
    let srq = vm.srq(pd, 8, 1, 0);
    let hooks = PostingHooks::default();
    let unknown = vm.exec_with(Opcode::PostSrqRecv, &handle_body(srq.srqn ^ 0x40), &hooks);
    assert_eq!(unknown.unwrap_err().status, CmdStatus::InvalidHandle);
    let resp = vm.exec_with(Opcode::PostSrqRecv, &handle_body(srq.srqn), &hooks);
    assert_eq!(resp.unwrap(), Vec::<u8>::new());
    assert!(hooks.posted.lock().unwrap().is_empty());
}

/// A drain (`vrdmactl drain`) lets the work request under way finish and starts no other;
/// those posted before or during it start when it ends, none lost.
#[test]
fn a_drain_finishes_the_request_under_way_and_starts_no_other() {
    let (mut a, mut b) = (TestVm::new(1, 1), TestVm::new(2, 1));
    let (pa, pb) = (a.pd(), b.pd());
    let qa = a.qp(pa, qp::Type::Rc, 16, 64);
    let qb = b.qp(pb, qp::Type::Rc, 16, 64);
    a.connect(qa.qpn, b.gid(), qb.qpn, (7, 7, 1));
    b.connect(qb.qpn, a.gid(), qa.qpn, (7, 7, 1));
    const LEN: u64 = 1 << 20;
    let ma = a.mr(pa, LEN, ALL);
    let mb = b.mr(pb, 2 * LEN, ALL);
    let mut sched = ManualScheduler::new(Box::new(SoftFabric::new(None)));
    sched.attach(&a.vm);
    sched.attach(&b.vm);
    a.fill(ma.addr, LEN as usize, 0x5a);
    let src = [Sge::new(ma.addr, LEN as u32, ma.lkey)];
    for (id, at) in [(1, mb.addr), (2, mb.addr + LEN)] {
        a.post_send(
            &qa,
            rdma(wqe::Opcode::RdmaWrite, id, at, mb.rkey),
            Data::Sges(&src),
        );
    }
    // One round moves one quantum: the first write (16 of them long) is under way.
    sched.pass();
    assert!(statuses(&a, &qa).is_empty());
    assert_eq!(a.vm.lock().sends_under_way(), 1);

    a.vm.share.set_draining(true);
    sched.run_until("the write under way completes", || {
        !statuses(&a, &qa).is_empty()
    });
    for _ in 0..64 {
        sched.pass();
    }
    assert_eq!(statuses(&a, &qa), [(1, Status::Success.raw())]);
    assert_eq!(a.vm.lock().sends_under_way(), 0, "drained");
    assert_eq!(b.read(mb.addr, LEN as usize), vec![0x5a; LEN as usize]);
    assert_eq!(
        b.read(mb.addr + LEN, 4096),
        vec![0; 4096],
        "the second write must not start while the VM drains"
    );

    a.vm.share.set_draining(false);
    a.vm.wake_all();
    sched.run_until("the second write completes", || {
        statuses(&a, &qa).len() == 2
    });
    assert_eq!(statuses(&a, &qa)[1], (2, Status::Success.raw()));
    assert_eq!(
        b.read(mb.addr + LEN, LEN as usize),
        vec![0x5a; LEN as usize]
    );
}

/// Quotas an operator raises while the VM runs: QPs in the slots beyond the old quota get
/// their own places on the ready list (it grew), so none hides another's doorbell.
#[test]
fn a_raised_qp_quota_grows_the_ready_list() {
    let quotas = crate::config::Quotas {
        max_qp: 2,
        ..crate::config::Quotas::default()
    };
    let mut a = TestVm::with_quotas(1, quotas);
    let pd = a.pd();
    let first: Vec<TestQp> = (0..2).map(|_| a.qp(pd, qp::Type::Rc, 4, 8)).collect();
    a.vm.set_quotas(&crate::config::Quotas {
        max_qp: 8,
        ..quotas
    });
    let more: Vec<TestQp> = (0..6).map(|_| a.qp(pd, qp::Type::Rc, 4, 8)).collect();
    let all: Vec<u32> = first.iter().chain(&more).map(|q| q.qpn).collect();
    for &qpn in &all {
        a.vm.enqueue(qpn);
    }
    let popped: HashSet<u32> = std::iter::from_fn(|| a.vm.pop_ready()).collect();
    assert_eq!(
        popped,
        all.iter().copied().collect(),
        "every QP queued once"
    );
}
