//! Shared receive queues, in process: the commands' checks, and the responder's rules for QPs
//! that take their receives from an SRQ (which QP gets which receive, RNR, the limit event,
//! what an error flushes), with two VMs on the soft fabric and the scheduler run by hand.

use std::sync::atomic::Ordering;

use vm_memory::Bytes;
use vrdma_proto::cmd::{self, Opcode, SrqAttrMask, Status as CmdStatus};
use vrdma_proto::cqe::{self, Status, VendorErr};
use vrdma_proto::mr::Access;
use vrdma_proto::qp::{self, AttrMask};
use vrdma_proto::wqe::{self, Data, SendFlags, Sge};
use vrdma_proto::{event, ring};
use zerocopy::{FromBytes, IntoBytes};

use crate::config::Quotas;
use crate::fabric::soft::SoftFabric;
use crate::model::objects::Failure;
use crate::sched::ManualScheduler;
use crate::testing::{TestMr, TestQp, TestSrq, TestVm, send_header};

const ALL: Access = Access::LOCAL_WRITE
    .union(Access::REMOTE_READ)
    .union(Access::REMOTE_WRITE)
    .union(Access::REMOTE_ATOMIC);

/// Bytes of each receive buffer the tests post.
const SLOT: u64 = 4096;

/// VM `a` sends from two RC QPs; VM `b` receives on two RC QPs attached to one SRQ, each
/// connected to one of `a`'s; the scheduler serves both.
struct Shared {
    a: TestVm,
    b: TestVm,
    qa: [TestQp; 2],
    qb: [TestQp; 2],
    ma: TestMr,
    mb: TestMr,
    pb: u32,
    srq: TestSrq,
    sched: ManualScheduler,
}

/// RC retries: 7 transport, `rnr_retry` RNR, minimum RNR timer 0.01 ms.
fn shared(srq_depth: u32, limit: u32, rnr_retry: u8) -> Shared {
    let (mut a, mut b) = (TestVm::new(1, 1), TestVm::new(2, 1));
    let (pa, pb) = (a.pd(), b.pd());
    let srq = b.srq(pb, srq_depth, 2, limit);
    let qa = [0, 1].map(|_| a.qp(pa, qp::Type::Rc, 16, 64));
    let qb = [0, 1].map(|_| b.qp_on_srq(pb, qp::Type::Rc, 16, 64, srq.srqn));
    for (x, y) in qa.iter().zip(&qb) {
        a.connect(x.qpn, b.gid(), y.qpn, (7, rnr_retry, 1));
        b.connect(y.qpn, a.gid(), x.qpn, (7, rnr_retry, 1));
    }
    let ma = a.mr(pa, 1 << 20, ALL);
    let mb = b.mr(pb, 1 << 20, ALL);
    let mut sched = ManualScheduler::new(Box::new(SoftFabric::new(None)));
    sched.attach(&a.vm);
    sched.attach(&b.vm);
    Shared {
        a,
        b,
        qa,
        qb,
        ma,
        mb,
        pb,
        srq,
        sched,
    }
}

impl Shared {
    /// Posts receive `wr_id` on the SRQ: `SLOT` bytes at slot `wr_id` of b's buffer.
    fn post(&self, wr_id: u64) {
        let sge = [Sge::new(
            self.mb.addr + wr_id * SLOT,
            SLOT as u32,
            self.mb.lkey,
        )];
        self.b.post_srq_recv(&self.srq, wr_id, &sge);
    }

    /// Sends `len` bytes of a's buffer at `offset` (filled with `byte`) from a's QP `i`.
    fn send(&self, i: usize, wr_id: u64, offset: u64, len: u32, byte: u8) {
        self.a.fill(self.ma.addr + offset, len as usize, byte);
        let src = [Sge::new(self.ma.addr + offset, len, self.ma.lkey)];
        self.a.post_send(
            &self.qa[i],
            send_header(wqe::Opcode::Send, wr_id, SendFlags::SIGNALED),
            Data::Sges(&src),
        );
    }

    /// Runs until a's QP `i` has `n` completions; returns them.
    fn sent(&mut self, i: usize, n: usize) -> Vec<cqe::Cqe> {
        completions(&mut self.sched, &self.a, &self.qa[i], n)
    }

    /// Runs until b's QP `i` has `n` completions; returns them.
    fn received(&mut self, i: usize, n: usize) -> Vec<cqe::Cqe> {
        completions(&mut self.sched, &self.b, &self.qb[i], n)
    }

    fn events(&self) -> Vec<(u16, u32)> {
        self.b.vm.deliver_events();
        self.b.events.kinds()
    }

    fn srq_state(&self) -> (u32, u32) {
        let objects = self.b.vm.lock();
        let srq = objects.srqs.get(self.srq.srqn).expect("the SRQ");
        (srq.consumer, srq.limit)
    }
}

/// Runs `sched` until `qp` of `vm` has `n` completions in its CQ; returns them.
fn completions(sched: &mut ManualScheduler, vm: &TestVm, qp: &TestQp, n: usize) -> Vec<cqe::Cqe> {
    sched.run_until("the completions", || {
        vm.completions(qp.cq_ring, 64).len() >= n
    });
    vm.completions(qp.cq_ring, 64)
}

fn wc(c: &cqe::Cqe) -> (u64, u8, u32) {
    (c.wr_id.get(), c.status, c.qp_num.get())
}

fn handle_body(handle: u32) -> cmd::Handle {
    cmd::Handle {
        handle: handle.into(),
        reserved: 0.into(),
    }
}

fn modify_srq(vm: &TestVm, srqn: u32, mask: SrqAttrMask, limit: u32) -> Result<(), Failure> {
    let body = cmd::ModifySrq {
        srqn: srqn.into(),
        attr_mask: mask.bits().into(),
        max_wr: 64.into(),
        srq_limit: limit.into(),
    };
    vm.exec_with(
        Opcode::ModifySrq,
        body.as_bytes(),
        &crate::model::hooks::NoHooks,
    )
    .map(|_| ())
}

fn query_srq(vm: &TestVm, srqn: u32) -> Result<(u32, u32, u32), CmdStatus> {
    let resp = vm
        .exec_with(
            Opcode::QuerySrq,
            handle_body(srqn).as_bytes(),
            &crate::model::hooks::NoHooks,
        )
        .map_err(|f| f.status)?;
    let r = cmd::QuerySrqResp::read_from_bytes(&resp).unwrap();
    Ok((r.max_wr.get(), r.max_sge.get(), r.srq_limit.get()))
}

fn status_of(vm: &TestVm, op: Opcode, body: &[u8]) -> CmdStatus {
    match vm.exec_with(op, body, &crate::model::hooks::NoHooks) {
        Ok(_) => CmdStatus::Ok,
        Err(f) => f.status,
    }
}

/// Every field of the SRQ commands is checked against the VM's objects and limits, a failed
/// command changes nothing, an SRQ in use cannot be destroyed (ibv_destroy_srq's EBUSY), and
/// the quota holds.
#[test]
fn srq_commands_check_every_field_and_the_quota() {
    let quotas = Quotas {
        max_srq: 2,
        ..Quotas::default()
    };
    let mut vm = TestVm::with_quotas(3, quotas);
    let pd = vm.pd();
    let stale_pd = vm.pd();
    vm.exec(Opcode::DeallocPd, handle_body(stale_pd).as_bytes());
    let ring = vm.alloc(64 << 10);
    let create =
        |vm: &TestVm, body: cmd::CreateSrq| status_of(vm, Opcode::CreateSrq, body.as_bytes());

    // PD, limits (the protocol allows 32 SGEs and 2^20 entries, this device fewer), memory.
    assert_eq!(
        create(&vm, TestVm::srq_body(stale_pd, 16, 2, 0, ring)),
        CmdStatus::InvalidHandle
    );
    let too_deep = crate::limits::MAX_SRQ_WR * 2;
    assert_eq!(
        create(&vm, TestVm::srq_body(pd, too_deep, 2, 0, ring)),
        CmdStatus::InvalidArgument
    );
    let too_wide = crate::limits::MAX_SRQ_SGE + 1;
    assert_eq!(
        create(&vm, TestVm::srq_body(pd, 16, too_wide, 0, ring)),
        CmdStatus::InvalidArgument
    );
    let outside = (4u64 << 28) + 0x40;
    assert_eq!(
        create(&vm, TestVm::srq_body(pd, 16, 2, 0, outside)),
        CmdStatus::BadAddress
    );
    assert!(vm.vm.lock().srqs.is_empty(), "no failed create left an SRQ");

    let srq = vm.srq(pd, 16, 2, 5);
    assert_eq!(query_srq(&vm, srq.srqn), Ok((16, 2, 5)));
    // Resizing is refused with the bit at fault; a limit above the depth is invalid; neither
    // changes the SRQ.
    assert_eq!(
        modify_srq(&vm, srq.srqn, SrqAttrMask::MAX_WR, 0),
        Err(Failure {
            status: CmdStatus::NotSupported,
            detail: SrqAttrMask::MAX_WR.bits()
        })
    );
    assert_eq!(
        modify_srq(&vm, srq.srqn, SrqAttrMask::LIMIT, 17),
        Err(Failure {
            status: CmdStatus::InvalidArgument,
            detail: SrqAttrMask::LIMIT.bits()
        })
    );
    assert_eq!(query_srq(&vm, srq.srqn), Ok((16, 2, 5)));
    assert_eq!(modify_srq(&vm, srq.srqn, SrqAttrMask::LIMIT, 16), Ok(()));
    assert_eq!(query_srq(&vm, srq.srqn), Ok((16, 2, 16)));

    // Handles: another generation of the slot, and nonsense.
    for bogus in [srq.srqn + (1 << 16), 0, u32::MAX] {
        assert_eq!(query_srq(&vm, bogus), Err(CmdStatus::InvalidHandle));
        assert_eq!(
            modify_srq(&vm, bogus, SrqAttrMask::LIMIT, 1).map_err(|f| f.status),
            Err(CmdStatus::InvalidHandle)
        );
        assert_eq!(
            status_of(&vm, Opcode::DestroySrq, handle_body(bogus).as_bytes()),
            CmdStatus::InvalidHandle
        );
    }

    // A QP naming no SRQ of this VM is refused and attaches nothing.
    let (cqn, _) = vm.cq(16);
    let sq = vm.alloc(4096);
    let qp_body = |srqn: u32| cmd::CreateQp {
        pdn: pd.into(),
        qp_type: qp::Type::Rc.raw(),
        sq_sig_all: 0,
        reserved: 0.into(),
        send_cqn: cqn.into(),
        recv_cqn: cqn.into(),
        cap: qp::Caps {
            max_send_wr: 4.into(),
            max_send_sge: 1.into(),
            ..qp::Caps::default()
        },
        sq_ring_addr: sq.into(),
        rq_ring_addr: 0.into(),
        srqn: srqn.into(),
        reserved1: 0.into(),
    };
    assert_eq!(
        status_of(
            &vm,
            Opcode::CreateQp,
            qp_body(srq.srqn + (1 << 16)).as_bytes()
        ),
        CmdStatus::InvalidHandle
    );
    assert_eq!(vm.vm.lock().srqs.get(srq.srqn).unwrap().users, 0);

    // In use: neither the SRQ nor its PD can go; once the QP is gone, both can.
    let resp = vm.exec(Opcode::CreateQp, qp_body(srq.srqn).as_bytes());
    let qpn = cmd::CreateQpResp::read_from_bytes(&resp).unwrap().qpn.get();
    assert_eq!(
        status_of(&vm, Opcode::DestroySrq, handle_body(srq.srqn).as_bytes()),
        CmdStatus::Busy
    );
    assert_eq!(
        status_of(&vm, Opcode::DeallocPd, handle_body(pd).as_bytes()),
        CmdStatus::Busy
    );
    vm.exec(Opcode::DestroyQp, handle_body(qpn).as_bytes());

    // The quota: two SRQs, not three; a destroyed one frees its place.
    let second = vm.srq(pd, 4, 0, 0);
    let ring2 = vm.alloc(4096);
    assert_eq!(
        create(&vm, TestVm::srq_body(pd, 4, 0, 0, ring2)),
        CmdStatus::NoResources
    );
    vm.exec(Opcode::DestroySrq, handle_body(second.srqn).as_bytes());
    vm.exec(Opcode::DestroySrq, handle_body(srq.srqn).as_bytes());
    assert_eq!(query_srq(&vm, srq.srqn), Err(CmdStatus::InvalidHandle));
    assert_eq!(
        create(&vm, TestVm::srq_body(pd, 4, 0, 0, ring2)),
        CmdStatus::Ok
    );
    assert_eq!(vm.vm.lock().pds.get(pd).unwrap().users, 1);
}

/// Two QPs take receives from one SRQ in the order the messages arrive, each completion on
/// its own QP's CQ with the data in the receive's buffer; the SRQ's consumer index tells the
/// driver which slots are free.
#[test]
fn qps_sharing_an_srq_take_its_receives_in_arrival_order() {
    let mut s = shared(16, 0, 7);
    for id in 0..4 {
        s.post(id);
    }
    s.send(1, 10, 0, 100, 0xa1);
    assert_eq!(
        s.sent(1, 1).iter().map(wc).collect::<Vec<_>>(),
        [(10, 0, s.qa[1].qpn)]
    );
    s.send(0, 11, 8192, 3000, 0xb2);
    assert_eq!(
        s.sent(0, 1).iter().map(wc).collect::<Vec<_>>(),
        [(11, 0, s.qa[0].qpn)]
    );
    s.send(1, 12, 16384, 1, 0xc3);
    s.sent(1, 2);

    let on_1 = s.received(1, 2);
    assert_eq!(
        on_1.iter().map(wc).collect::<Vec<_>>(),
        [(0, 0, s.qb[1].qpn), (2, 0, s.qb[1].qpn)],
        "the first and third message, with the first and third receive"
    );
    assert_eq!((on_1[0].byte_len.get(), on_1[1].byte_len.get()), (100, 1));
    assert_eq!(on_1[0].src_qp.get(), s.qa[1].qpn);
    let on_0 = s.received(0, 1);
    assert_eq!(
        on_0.iter().map(wc).collect::<Vec<_>>(),
        [(1, 0, s.qb[0].qpn)]
    );
    assert_eq!(on_0[0].byte_len.get(), 3000);
    assert_eq!(s.b.read(s.mb.addr, 100), vec![0xa1; 100]);
    assert_eq!(s.b.read(s.mb.addr + SLOT, 3000), vec![0xb2; 3000]);
    assert_eq!(s.b.read(s.mb.addr + 2 * SLOT, 2), vec![0xc3, 0]);
    assert_eq!(s.srq_state().0, 3);
    assert_eq!(s.b.consumer(s.srq.ring), 3, "three slots handed back");
}

/// An RDMA WRITE with immediate takes a receive from the SRQ to report the write (its data goes
/// to the remote address, not the receive's buffer); a plain WRITE takes none.
#[test]
fn a_write_with_immediate_takes_a_receive_from_the_srq() {
    let mut s = shared(16, 0, 7);
    s.post(0);
    s.post(1);
    s.a.fill(s.ma.addr, 5000, 0x6e);
    let src = [Sge::new(s.ma.addr, 5000, s.ma.lkey)];
    let target = s.mb.addr + (256 << 10);
    let mut write = send_header(wqe::Opcode::RdmaWrite, 1, SendFlags::SIGNALED);
    write.remote_addr = target.into();
    write.rkey = s.mb.rkey.into();
    s.a.post_send(&s.qa[0], write, Data::Sges(&src));
    let mut with_imm = write;
    with_imm.wr_id = 2.into();
    with_imm.opcode = wqe::Opcode::RdmaWriteWithImm.raw();
    with_imm.imm_data = [1, 2, 3, 4];
    s.a.post_send(&s.qa[0], with_imm, Data::Sges(&src));
    s.sent(0, 2);
    let got = s.received(0, 1);
    assert_eq!(got.len(), 1, "the plain WRITE took no receive");
    assert_eq!(
        (got[0].wr_id.get(), got[0].opcode, got[0].byte_len.get()),
        (0, cqe::Opcode::RecvRdmaWithImm.raw(), 5000)
    );
    assert_eq!(got[0].imm_data, [1, 2, 3, 4]);
    assert_eq!(s.b.read(target, 5000), vec![0x6e; 5000]);
    assert_eq!(
        s.b.read(s.mb.addr, 16),
        vec![0; 16],
        "nothing in the receive's buffer"
    );
    assert_eq!(s.srq_state().0, 1);
}

/// An empty SRQ answers RNR as an empty receive ring does: the requester waits and retries,
/// and the message lands once the driver posts a receive.
#[test]
fn an_empty_srq_makes_the_requester_wait_until_a_receive_is_posted() {
    let mut s = shared(8, 0, 7);
    s.send(0, 1, 0, 64, 0x5a);
    for _ in 0..50 {
        s.sched.pass();
    }
    assert!(
        s.a.completions(s.qa[0].cq_ring, 64).is_empty(),
        "still waiting"
    );
    assert!(s.b.completions(s.qb[0].cq_ring, 64).is_empty());
    s.post(7);
    assert_eq!(
        s.sent(0, 1).iter().map(wc).collect::<Vec<_>>(),
        [(1, 0, s.qa[0].qpn)]
    );
    assert_eq!(
        s.received(0, 1).iter().map(wc).collect::<Vec<_>>(),
        [(7, 0, s.qb[0].qpn)]
    );
    assert_eq!(s.b.read(s.mb.addr + 7 * SLOT, 64), vec![0x5a; 64]);

    // With a bounded RNR retry count the requester gives up as with an empty receive ring.
    let mut s = shared(8, 0, 1);
    s.send(0, 2, 0, 64, 0);
    let done = s.sent(0, 1);
    assert_eq!(
        (done[0].status, done[0].vendor_err.get()),
        (Status::RnrRetryExcErr.raw(), VendorErr::RnrExhausted.raw())
    );
}

/// The limit event fires once when a receive taken leaves fewer than the armed limit, then
/// the SRQ is disarmed (QUERY_SRQ reports 0) until MODIFY_SRQ arms it again.
#[test]
fn the_limit_event_fires_once_then_the_srq_is_disarmed() {
    let mut s = shared(16, 3, 7);
    for id in 0..6 {
        s.post(id);
    }
    let limit_events = |s: &Shared| {
        s.events()
            .iter()
            .filter(|e| *e == &(event::Kind::SrqLimitReached.raw(), s.srq.srqn))
            .count()
    };
    // Three taken: three left, not fewer than the limit.
    for n in 0..3 {
        s.send(0, n, 0, 8, 0);
        s.sent(0, n as usize + 1);
    }
    assert_eq!(limit_events(&s), 0);
    assert_eq!(s.srq_state(), (3, 3));
    // The fourth leaves two.
    s.send(0, 3, 0, 8, 0);
    s.sent(0, 4);
    assert_eq!(limit_events(&s), 1);
    assert_eq!(s.srq_state(), (4, 0), "disarmed");
    assert_eq!(query_srq(&s.b, s.srq.srqn), Ok((16, 2, 0)));
    s.send(0, 4, 0, 8, 0);
    s.sent(0, 5);
    assert_eq!(limit_events(&s), 1, "not again while disarmed");
    // Armed again (one left, already below: nothing until the next take), it fires again.
    modify_srq(&s.b, s.srq.srqn, SrqAttrMask::LIMIT, 2).unwrap();
    assert_eq!(limit_events(&s), 1);
    s.send(1, 5, 0, 8, 0);
    s.sent(1, 1);
    assert_eq!(limit_events(&s), 2);
    assert_eq!(s.received(0, 5).len() + s.received(1, 1).len(), 6);
}

/// A QP going to ERR flushes the receive it had taken for the message in progress, on its own
/// CQ, raises QP_LAST_WQE_REACHED once, and leaves the SRQ's other receives to the QPs still
/// working.
#[test]
fn a_qp_in_error_flushes_only_the_receive_it_holds_and_raises_last_wqe_once() {
    let mut s = shared(16, 0, 7);
    // Receive 0 has room for a message of three scheduler chunks; 1 and 2 are ordinary.
    let big = [Sge::new(s.mb.addr + (512 << 10), 256 << 10, s.mb.lkey)];
    s.b.post_srq_recv(&s.srq, 0, &big);
    for id in 1..3 {
        s.post(id);
    }
    // After one pass the responder has placed the first chunk and holds receive 0.
    s.send(0, 1, 0, 192 << 10, 0x11);
    let holds = |b: &TestVm, qpn: u32| {
        b.vm.lock()
            .qps
            .get(qpn)
            .and_then(|q| q.rt.srq_recv)
            .map(|r| r.wr_id)
    };
    let (b, qpn) = (&s.b, s.qb[0].qpn);
    s.sched
        .run_until("the first chunk placed", || holds(b, qpn).is_some());
    assert_eq!(holds(&s.b, qpn), Some(0));
    assert_eq!(s.srq_state().0, 1, "taken from the SRQ at the first chunk");

    let err = qp::Attr {
        qp_state: qp::State::Err.raw(),
        ..qp::Attr::default()
    };
    s.b.modify(s.qb[0].qpn, AttrMask::empty(), err).unwrap();
    let flushed = s.received(0, 1);
    assert_eq!(
        flushed.iter().map(wc).collect::<Vec<_>>(),
        [(0, Status::WrFlushErr.raw(), s.qb[0].qpn)]
    );
    assert_eq!(flushed[0].opcode, cqe::Opcode::Recv.raw());
    for _ in 0..20 {
        s.sched.pass();
    }
    let last_wqe = (event::Kind::QpLastWqeReached.raw(), s.qb[0].qpn);
    assert_eq!(s.events().iter().filter(|e| **e == last_wqe).count(), 1);
    assert_eq!(holds(&s.b, qpn), None);
    assert_eq!(
        s.b.completions(s.qb[0].cq_ring, 64).len(),
        1,
        "nothing else of the SRQ flushed on this QP"
    );

    // The SRQ's other receives still serve the other QP, in order.
    s.send(1, 2, 0, 500, 0x22);
    s.send(1, 3, 0, 500, 0x33);
    s.sent(1, 2);
    assert_eq!(
        s.received(1, 2).iter().map(wc).collect::<Vec<_>>(),
        [(1, 0, s.qb[1].qpn), (2, 0, s.qb[1].qpn)]
    );
    assert_eq!(s.b.read(s.mb.addr + 2 * SLOT, 500), vec![0x33; 500]);
}

/// A receive that fails its checks when taken (more SGEs than the SRQ allows, or an lkey of
/// another PD) fails that message as a bad receive ring entry does — the requester gets
/// REM_OP_ERR, the QP goes to ERR and flushes it — but the SRQ is not harmed: the next
/// receive serves the other QP.
#[test]
fn a_bad_receive_fails_its_message_not_the_srq() {
    let mut s = shared(16, 0, 7);
    // Three SGEs fit a slot of an SRQ of two (the stride is 64 bytes either way), but are
    // more than it allows.
    let three = [Sge::new(s.mb.addr, 16, s.mb.lkey); 3];
    s.b.post_srq_recv(&s.srq, 40, &three);
    // An lkey of another PD.
    let other_pd = s.b.pd();
    let foreign = s.b.mr(other_pd, 4096, ALL);
    s.b.post_srq_recv(&s.srq, 41, &[Sge::new(foreign.addr, 64, foreign.lkey)]);
    s.post(2);

    s.send(0, 1, 0, 64, 0);
    let done = s.sent(0, 1);
    assert_eq!(
        (done[0].status, done[0].vendor_err.get()),
        (Status::RemOpErr.raw(), VendorErr::MalformedWqe.raw())
    );
    s.send(1, 2, 0, 64, 0);
    let done = s.sent(1, 1);
    assert_eq!(
        (done[0].status, done[0].vendor_err.get()),
        (Status::RemOpErr.raw(), VendorErr::PdMismatch.raw())
    );
    for (i, wr_id) in [(0, 40), (1, 41)] {
        assert_eq!(
            s.received(i, 1).iter().map(wc).collect::<Vec<_>>(),
            [(wr_id, Status::WrFlushErr.raw(), s.qb[i].qpn)],
            "the bad receive completes once, flushed on the QP that took it"
        );
    }
    {
        let objects = s.b.vm.lock();
        assert!(objects.srqs.get(s.srq.srqn).unwrap().fault.is_none());
        assert_eq!(objects.srqs.get(s.srq.srqn).unwrap().consumer, 2);
    }

    // A third QP on the SRQ gets the good receive.
    let pa = s.a.vm.lock().qps.get(s.qa[0].qpn).unwrap().pdn;
    let qa = s.a.qp(pa, qp::Type::Rc, 16, 64);
    let qb = s.b.qp_on_srq(s.pb, qp::Type::Rc, 16, 64, s.srq.srqn);
    s.a.connect(qa.qpn, s.b.gid(), qb.qpn, (7, 7, 1));
    s.b.connect(qb.qpn, s.a.gid(), qa.qpn, (7, 7, 1));
    let src = [Sge::new(s.ma.addr, 64, s.ma.lkey)];
    s.a.post_send(
        &qa,
        send_header(wqe::Opcode::Send, 3, SendFlags::SIGNALED),
        Data::Sges(&src),
    );
    let b = &s.b;
    s.sched.run_until("the good receive", || {
        b.completions(qb.cq_ring, 64).len() == 1
    });
    assert_eq!(
        s.b.completions(qb.cq_ring, 64)
            .iter()
            .map(wc)
            .collect::<Vec<_>>(),
        [(2, 0, qb.qpn)]
    );
}

/// A UD QP takes its receives from the SRQ it shares with RC QPs: a datagram lands with its
/// GRH in the next receive; one that finds the SRQ empty is dropped (and counted); a receive
/// that fails its checks completes in error on the UD QP, which goes on working.
#[test]
fn a_ud_qp_shares_the_srq_with_rc_qps() {
    let mut s = shared(16, 0, 7);
    let pa = s.a.vm.lock().qps.get(s.qa[0].qpn).unwrap().pdn;
    let ua = s.a.qp(pa, qp::Type::Ud, 16, 64);
    let ub = s.b.qp_on_srq(s.pb, qp::Type::Ud, 16, 64, s.srq.srqn);
    const QKEY: u32 = 0x1111;
    for (vm, q) in [(&s.a, ua.qpn), (&s.b, ub.qpn)] {
        let init = qp::Attr {
            qp_state: qp::State::Init.raw(),
            port_num: 1,
            qkey: QKEY.into(),
            ..qp::Attr::default()
        };
        vm.modify(
            q,
            AttrMask::PKEY_INDEX | AttrMask::PORT | AttrMask::QKEY,
            init,
        )
        .unwrap();
        let rtr = qp::Attr {
            qp_state: qp::State::Rtr.raw(),
            ..qp::Attr::default()
        };
        vm.modify(q, AttrMask::empty(), rtr).unwrap();
        let rts = qp::Attr {
            qp_state: qp::State::Rts.raw(),
            ..qp::Attr::default()
        };
        vm.modify(q, AttrMask::SQ_PSN, rts).unwrap();
    }
    let ah = cmd::CreateAh {
        pdn: pa.into(),
        reserved: 0.into(),
        attr: qp::AhAttr {
            dgid: s.b.gid(),
            port_num: 1,
            is_global: 1,
            ..qp::AhAttr::default()
        },
    };
    let ah = cmd::Handle::read_from_bytes(&s.a.exec(Opcode::CreateAh, ah.as_bytes()))
        .unwrap()
        .handle
        .get();
    let datagram = |s: &Shared, wr_id: u64, byte: u8| {
        s.a.fill(s.ma.addr, 200, byte);
        let mut h = send_header(wqe::Opcode::Send, wr_id, SendFlags::SIGNALED);
        h.ah = ah.into();
        h.remote_qpn = ub.qpn.into();
        h.remote_qkey = QKEY.into();
        s.a.post_send(&ua, h, Data::Sges(&[Sge::new(s.ma.addr, 200, s.ma.lkey)]));
    };
    let dropped = |s: &Shared| s.b.vm.counters.ud_dropped.load(Ordering::Relaxed);

    // Empty: dropped, the sender completes anyway.
    datagram(&s, 1, 0x01);
    completions(&mut s.sched, &s.a, &ua, 1);
    assert_eq!(dropped(&s), 1);

    // An RC message and a datagram take the next two receives.
    s.post(0);
    s.post(1);
    s.send(0, 2, 4096, 10, 0x77);
    s.sent(0, 1);
    datagram(&s, 3, 0x33);
    let got = completions(&mut s.sched, &s.b, &ub, 1)[0];
    assert_eq!(wc(&got), (1, 0, ub.qpn));
    assert_eq!(got.byte_len.get(), 40 + 200);
    assert_eq!(got.src_qp.get(), ua.qpn);
    assert_eq!(s.b.read(s.mb.addr + SLOT + 40, 200), vec![0x33; 200]);
    assert_eq!(s.received(0, 1)[0].wr_id.get(), 0);

    // A receive with three SGEs: it completes in error on the UD QP, the datagram is lost,
    // and the next receive serves the next datagram.
    let three = [Sge::new(s.mb.addr, 100, s.mb.lkey); 3];
    s.b.post_srq_recv(&s.srq, 50, &three);
    s.post(3);
    datagram(&s, 4, 0x44);
    datagram(&s, 5, 0x55);
    let got = completions(&mut s.sched, &s.b, &ub, 3);
    assert_eq!(
        (got[1].wr_id.get(), got[1].status, got[1].vendor_err.get()),
        (50, Status::LocQpOpErr.raw(), VendorErr::MalformedWqe.raw())
    );
    assert_eq!(wc(&got[2]), (3, 0, ub.qpn));
    assert_eq!(s.b.read(s.mb.addr + 3 * SLOT + 40, 200), vec![0x55; 200]);
    assert_eq!(dropped(&s), 2);
    assert_eq!(
        s.b.vm.lock().qps.get(ub.qpn).unwrap().state(),
        qp::State::Rts
    );
}

/// An SRQ whose producer index runs more than its depth ahead is in error for good: SRQ_ERR
/// once, the message fails as on an overrun receive ring, and no QP can be attached to it.
#[test]
fn an_overrun_srq_is_in_error() {
    let mut s = shared(4, 0, 7);
    s.b.mem()
        .store(
            9u32,
            vm_memory::GuestAddress(s.srq.ring + ring::PRODUCER_OFFSET),
            Ordering::Release,
        )
        .unwrap();
    s.send(0, 1, 0, 8, 0);
    let done = s.sent(0, 1);
    assert_eq!(
        (done[0].status, done[0].vendor_err.get()),
        (Status::RemOpErr.raw(), VendorErr::RingOverrun.raw())
    );
    s.send(1, 2, 0, 8, 0);
    assert_eq!(s.sent(1, 1)[0].status, Status::RemOpErr.raw());
    let srq_err = (event::Kind::SrqErr.raw(), s.srq.srqn);
    assert_eq!(s.events().iter().filter(|e| **e == srq_err).count(), 1);
    let (cqn, _) = s.b.cq(16);
    let sq = s.b.alloc(4096);
    let body = cmd::CreateQp {
        pdn: s.pb.into(),
        qp_type: qp::Type::Rc.raw(),
        sq_sig_all: 0,
        reserved: 0.into(),
        send_cqn: cqn.into(),
        recv_cqn: cqn.into(),
        cap: qp::Caps {
            max_send_wr: 4.into(),
            ..qp::Caps::default()
        },
        sq_ring_addr: sq.into(),
        rq_ring_addr: 0.into(),
        srqn: s.srq.srqn.into(),
        reserved1: 0.into(),
    };
    assert_eq!(
        status_of(&s.b, Opcode::CreateQp, body.as_bytes()),
        CmdStatus::InvalidArgument
    );
}

/// Resetting the device destroys the SRQs with everything else.
#[test]
fn release_destroys_srqs() {
    let s = shared(4, 0, 7);
    s.b.vm
        .lock()
        .release_all(&crate::model::hooks::NoHooks, s.b.vm.id);
    let objects = s.b.vm.lock();
    assert!(objects.srqs.is_empty() && objects.qps.is_empty() && objects.pds.is_empty());
}
