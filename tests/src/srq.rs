//! The shared-receive-queue scenario (docs/protocol.md §16.8) that `tests/srq.rs` runs on the
//! soft fabric and across daemons, and `tests/verbs_fabric.rs` over the NIC fabric. Shared
//! receive queues end to end (docs/protocol.md §16.8): RC and UD QPs of one guest take
//! their receives from one SRQ, on the soft fabric and across two daemons over RoCEv2, with
//! every payload and completion checked; RNR while the SRQ is empty; the limit event; a QP in
//! ERR raising QP_LAST_WQE_REACHED while the SRQ goes on serving the others; and a VM whose
//! SRQ has receives posted moving to another daemon.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{all_access, connect_rc_both, empty_wc, poll_one, read};
use vrdma::mem::DmaBuf;
use vrdma::{
    AddressHandle, AsyncEventKind, CompletionChannel, CompletionQueue, Context, MemoryRegion,
    ProtectionDomain, QpAttr, QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, RecvWr,
    SendWr, Sge, SharedReceiveQueue, SrqAttr, SrqAttrMask, WcOpcode, WcStatus, WorkCompletion,
};

/// Bytes of each receive buffer: receive `n` is slot `n` of the receiver's buffer.
pub const SLOT: usize = 4096;
/// Receive slots in the receiver's buffer.
pub const SLOTS: usize = 32;
/// RC QPs on each side.
pub const RC_QPS: usize = 3;
pub const QKEY: u32 = 0x5151;
/// ACK timeout exponent of the RC QPs: 4.096 µs × 2^14 ≈ 67 ms, so a migration's switch-over
/// does not use up their transport retries.
pub const TIMEOUT: u8 = 14;

pub fn queue_sizes() -> QpCap {
    QpCap {
        max_send_wr: 16,
        // Ignored with an SRQ: the QP has no receive queue of its own.
        max_recv_wr: 99,
        max_send_sge: 1,
        max_recv_sge: 7,
        max_inline_data: 0,
    }
}

/// Takes a UD QP to RTS with [`QKEY`].
pub fn ud_to_rts(qp: &QueuePair) {
    let init = QpAttr {
        qp_state: QpState::Init,
        qkey: QKEY,
        ..QpAttr::default()
    };
    let steps = [
        (
            init,
            QpAttrMask::PKEY_INDEX | QpAttrMask::PORT | QpAttrMask::QKEY,
        ),
        (
            QpAttr {
                qp_state: QpState::Rtr,
                ..QpAttr::default()
            },
            QpAttrMask::empty(),
        ),
        (
            QpAttr {
                qp_state: QpState::Rts,
                ..QpAttr::default()
            },
            QpAttrMask::SQ_PSN,
        ),
    ];
    for (attr, mask) in steps {
        qp.modify(&attr, QpAttrMask::STATE | mask)
            .expect("UD QP to RTS");
    }
}

/// The receiving guest: RC QPs and a UD QP that all take their receives from one SRQ, their
/// completions in one CQ. Fields drop in order: the QPs before the SRQ and the CQ.
#[derive(Debug)]
pub struct Receiver {
    pub rc: Vec<QueuePair>,
    pub ud: QueuePair,
    pub srq: SharedReceiveQueue,
    pub cq: CompletionQueue,
    pub events: CompletionChannel,
    pub seen: Mutex<Vec<(AsyncEventKind, u32)>>,
    pub mr: MemoryRegion,
    pub buf: DmaBuf,
    pub _pd: ProtectionDomain,
}

/// The sending guest: an RC QP connected to each of the receiver's, and a UD QP, each with a
/// CQ of its own.
#[derive(Debug)]
pub struct Sender {
    pub rc: Vec<(QueuePair, CompletionQueue)>,
    pub ud: (QueuePair, CompletionQueue),
    pub ah: AddressHandle,
    pub mr: MemoryRegion,
    pub buf: DmaBuf,
    pub _pd: ProtectionDomain,
}

/// A sender on `ca` and a receiver on `cb`, connected, the SRQ empty and not armed.
pub fn connect(ca: &Context, cb: &Context) -> (Sender, Receiver) {
    let pb = ProtectionDomain::new(cb).expect("alloc pd");
    let srq = SharedReceiveQueue::new(
        &pb,
        &SrqAttr {
            max_wr: 16,
            max_sge: 2,
            srq_limit: 0,
        },
    )
    .expect("create srq");
    let cq = CompletionQueue::new(cb, 256).expect("create cq");
    let on_srq = |qp_type| {
        QueuePair::new(
            &pb,
            &QpInitAttr {
                send_cq: &cq,
                recv_cq: &cq,
                srq: Some(&srq),
                cap: queue_sizes(),
                qp_type,
                sq_sig_all: false,
            },
        )
        .expect("create qp on the srq")
    };
    let rc: Vec<QueuePair> = (0..RC_QPS).map(|_| on_srq(QpType::Rc)).collect();
    let ud = on_srq(QpType::Ud);
    let buf = cb.alloc(SLOT * SLOTS).expect("buffer");
    let mr = MemoryRegion::register(&pb, &buf, all_access()).expect("reg mr");
    let r = Receiver {
        rc,
        ud,
        srq,
        cq,
        events: CompletionChannel::new(cb).expect("channel"),
        seen: Mutex::new(Vec::new()),
        mr,
        buf,
        _pd: pb,
    };

    let pa = ProtectionDomain::new(ca).expect("alloc pd");
    let own = |qp_type| {
        let cq = CompletionQueue::new(ca, 64).expect("create cq");
        let qp = QueuePair::new(
            &pa,
            &QpInitAttr {
                send_cq: &cq,
                recv_cq: &cq,
                srq: None,
                cap: queue_sizes(),
                qp_type,
                sq_sig_all: false,
            },
        )
        .expect("create qp");
        (qp, cq)
    };
    let rc: Vec<_> = (0..RC_QPS).map(|_| own(QpType::Rc)).collect();
    let ud = own(QpType::Ud);
    let buf = ca.alloc(SLOT * SLOTS).expect("buffer");
    let mr = MemoryRegion::register(&pa, &buf, all_access()).expect("reg mr");
    let ah = AddressHandle::new(&pa, &AddressHandle::attr_for(cb.gid())).expect("ah");
    for ((qa, _), qb) in rc.iter().zip(&r.rc) {
        connect_rc_both(qa, ca.gid(), qb, cb.gid(), TIMEOUT);
    }
    ud_to_rts(&ud.0);
    ud_to_rts(&r.ud);
    let s = Sender {
        rc,
        ud,
        ah,
        mr,
        buf,
        _pd: pa,
    };
    (s, r)
}

impl Receiver {
    /// Posts receives `ids` to the SRQ, receive `n` into slot `n`.
    pub fn post(&self, ids: std::ops::Range<usize>) {
        let sges: Vec<[Sge; 1]> = ids
            .clone()
            .map(|n| {
                [Sge::new(
                    self.buf.addr() + (n * SLOT) as u64,
                    SLOT as u32,
                    self.mr.lkey(),
                )]
            })
            .collect();
        let wrs: Vec<RecvWr<'_>> = ids
            .zip(&sges)
            .map(|(n, sg_list)| RecvWr {
                wr_id: n as u64,
                sg_list,
            })
            .collect();
        // SAFETY: every SGE lies in `self.buf`, registered as `self.mr`, which lives as long as
        // the receiver; the test reads a slot only after its receive has completed.
        unsafe { self.srq.post_recv(&wrs) }.expect("post to the srq");
    }

    /// The next receive completion, checked to be receive `n` on `qpn` of `len` bytes, whose
    /// payload (after the GRH for UD) is `byte` repeated.
    pub fn received(&self, n: usize, qpn: u32, len: u32, byte: u8, ud: bool) {
        let wc = poll_one(&self.cq);
        let grh = if ud { 40 } else { 0 };
        assert_eq!(
            (wc.wr_id, wc.status, wc.opcode, wc.qp_num, wc.byte_len),
            (n as u64, WcStatus::Success, WcOpcode::Recv, qpn, len + grh),
            "receive {n}"
        );
        assert_eq!(wc.grh, ud);
        let at = n * SLOT + grh as usize;
        assert_eq!(
            read(&self.buf, at, len as usize),
            vec![byte; len as usize],
            "the payload of receive {n}"
        );
    }

    /// Waits until the device has raised `kind` about `handle`; how many times it has so far.
    pub fn wait_event(&self, kind: AsyncEventKind, handle: u32) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut seen = self.seen.lock().unwrap();
            seen.extend(self.events.take_async_events().expect("events"));
            let n = seen.iter().filter(|e| **e == (kind, handle)).count();
            if n > 0 {
                return n;
            }
            drop(seen);
            assert!(
                Instant::now() < deadline,
                "no {kind:?} event for {handle:#x}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Sender {
    /// SENDs `len` bytes of `byte` from RC QP `i` and waits for its completion.
    pub fn send_rc(&self, i: usize, len: u32, byte: u8) -> WorkCompletion {
        self.post_rc(i, len, byte);
        poll_one(&self.rc[i].1)
    }

    pub fn post_rc(&self, i: usize, len: u32, byte: u8) {
        self.buf
            .write_at(i * SLOT, &vec![byte; len as usize])
            .expect("fill");
        let sge = [Sge::new(
            self.buf.addr() + (i * SLOT) as u64,
            len,
            self.mr.lkey(),
        )];
        // SAFETY: the SGE lies in `self.buf`, registered as `self.mr`, which outlives the
        // request; the caller polls its completion before it writes the slot again.
        unsafe { self.rc[i].0.post_send(&[SendWr::send(i as u64, &sge)]) }.expect("post send");
    }

    /// Sends a datagram of `len` bytes of `byte` to UD QP `dest` and waits for its completion.
    pub fn send_ud(&self, dest: u32, len: u32, byte: u8) {
        let at = RC_QPS * SLOT;
        self.buf
            .write_at(at, &vec![byte; len as usize])
            .expect("fill");
        let sge = [Sge::new(self.buf.addr() + at as u64, len, self.mr.lkey())];
        let wr = SendWr::ud_send(9, &sge, &self.ah, dest, QKEY);
        // SAFETY: as for `post_rc`.
        unsafe { self.ud.0.post_send(&[wr]) }.expect("post datagram");
        assert_eq!(poll_one(&self.ud.1).status, WcStatus::Success);
    }
}

/// A completion waiting in `cq`, if any.
pub fn poll_one_or_none(cq: &CompletionQueue) -> Option<WorkCompletion> {
    let mut wc = [empty_wc(); 1];
    (cq.poll(&mut wc).expect("poll") == 1).then_some(wc[0])
}

/// Asserts that nothing completes on `cqs` for a while: a request waits for a receive.
pub fn nothing_completes(cqs: &[&CompletionQueue]) {
    let mut wc = [empty_wc(); 1];
    let until = Instant::now() + Duration::from_millis(50);
    while Instant::now() < until {
        for cq in cqs {
            assert_eq!(cq.poll(&mut wc).expect("poll"), 0, "{:?}", wc[0]);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The SRQ shared by three RC QPs and a UD QP of `cb`, fed from `ca`; `dropped` reads the
/// receiving VM's count of dropped datagrams.
pub fn rc_and_ud_qps_share_one_srq(
    ca: &Context,
    cb: &Context,
    dropped: &dyn Fn() -> u64,
) -> (Sender, Receiver) {
    let (s, r) = connect(ca, cb);
    let (rc, ud) = (
        r.rc.iter().map(QueuePair::qp_num).collect::<Vec<_>>(),
        r.ud.qp_num(),
    );

    // A QP attached to an SRQ has no receive queue to post to.
    let sge = [Sge::new(r.buf.addr(), 64, r.mr.lkey())];
    // SAFETY: refused before anything is posted; the SGE lies in the receiver's buffer anyway.
    let refused = unsafe {
        r.rc[0].post_recv(&[RecvWr {
            wr_id: 1,
            sg_list: &sge,
        }])
    };
    assert_eq!(refused.expect_err("posting to an SRQ QP's RQ").errno(), 22);

    // Receives go out in the SRQ's order, to whichever QP a message arrives on.
    r.post(0..4);
    assert_eq!(s.send_rc(1, 100, 0xa1).status, WcStatus::Success);
    r.received(0, rc[1], 100, 0xa1, false);
    s.send_ud(ud, 200, 0xa2);
    r.received(1, ud, 200, 0xa2, true);
    assert_eq!(s.send_rc(0, 3000, 0xa3).status, WcStatus::Success);
    r.received(2, rc[0], 3000, 0xa3, false);
    assert_eq!(s.send_rc(2, 1, 0xa4).status, WcStatus::Success);
    r.received(3, rc[2], 1, 0xa4, false);

    // Empty: an RC SEND waits (RNR, retried for ever) and a datagram is dropped, until a
    // receive is posted.
    s.post_rc(0, 64, 0xb1);
    nothing_completes(&[&s.rc[0].1, &r.cq]);
    r.post(4..5);
    assert_eq!(poll_one(&s.rc[0].1).status, WcStatus::Success);
    r.received(4, rc[0], 64, 0xb1, false);
    let before = dropped();
    s.send_ud(ud, 50, 0xb2);
    // Across hosts the sender's completion does not mean the datagram has arrived: wait
    // until the receiver has dropped it, so it cannot take the receive posted next.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dropped() == before {
        assert!(Instant::now() < deadline, "the datagram was never dropped");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        poll_one_or_none(&r.cq),
        None,
        "a dropped datagram completes nothing"
    );
    r.post(5..6);
    s.send_ud(ud, 60, 0xb3);
    r.received(5, ud, 60, 0xb3, true);

    // The limit: armed at 2 with three posted, it fires when a take leaves one, then reads 0.
    r.srq
        .modify(
            &SrqAttr {
                srq_limit: 2,
                ..SrqAttr::default()
            },
            SrqAttrMask::LIMIT,
        )
        .expect("arm");
    assert_eq!(
        r.srq.query().expect("query"),
        SrqAttr {
            max_wr: 16,
            max_sge: 2,
            srq_limit: 2
        }
    );
    r.post(6..9);
    s.send_rc(2, 10, 0xc1);
    r.received(6, rc[2], 10, 0xc1, false);
    s.send_rc(1, 11, 0xc2);
    r.received(7, rc[1], 11, 0xc2, false);
    let srqn = r.srq.srq_num();
    r.wait_event(AsyncEventKind::SrqLimitReached, srqn);
    assert_eq!(r.srq.query().expect("query").srq_limit, 0, "disarmed");
    s.send_rc(0, 12, 0xc3);
    r.received(8, rc[0], 12, 0xc3, false);

    // A QP in ERR: QP_LAST_WQE_REACHED (it held no receive, so nothing is flushed on it),
    // and the SRQ's receives go on serving the others.
    r.rc[1]
        .modify(
            &QpAttr {
                qp_state: QpState::Err,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .expect("to ERR");
    assert_eq!(r.wait_event(AsyncEventKind::QpLastWqeReached, rc[1]), 1);
    // Events arrive in order: the one above came after any second limit event would have.
    assert_eq!(
        r.wait_event(AsyncEventKind::SrqLimitReached, srqn),
        1,
        "the limit fires once per arm"
    );
    r.post(9..11);
    s.send_rc(2, 13, 0xd1);
    r.received(9, rc[2], 13, 0xd1, false);
    s.send_ud(ud, 14, 0xd2);
    r.received(10, ud, 14, 0xd2, true);
    (s, r)
}
