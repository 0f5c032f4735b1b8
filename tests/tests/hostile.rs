//! A hostile driver that writes the rings itself: malformed work requests, a producer index
//! run past the ring, doorbells for QPs it does not own, garbage doorbell batches. Each gets
//! the error completion or event a hardware RNIC would give, and nothing reaches another VM.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vrdma::mem::DmaBuf;
use vrdma::transport::{Options, Transport, VirtioUser};
use vrdma_proto::cmd::{self, Opcode, RespHeader, Status};
use vrdma_proto::cqe::{self, Cqe, VendorErr};
use vrdma_proto::doorbell::{self, Doorbell};
use vrdma_proto::{event, qp, ring, wqe};
use vrdma_tests::{TestDaemon, rc_pair, read};
use zerocopy::{FromBytes, IntoBytes};

struct Raw {
    v: VirtioUser,
}

impl Raw {
    fn command(&self, op: Opcode, body: &[u8]) -> (Status, Vec<u8>) {
        let mut req = cmd::header(op).as_bytes().to_vec();
        req.extend_from_slice(body);
        let mut resp = vec![0u8; 8 + op.response_len()];
        let n = self.v.control(&req, &mut resp).expect("control");
        let (_, status) = RespHeader::decode(&resp[..n]).expect("response header");
        (status, resp[8..n].to_vec())
    }

    fn ok(&self, op: Opcode, body: &[u8]) -> Vec<u8> {
        let (status, resp) = self.command(op, body);
        assert_eq!(status, Status::Ok, "{op:?}");
        resp
    }

    fn ring(&self, depth: u32, stride: u32) -> DmaBuf {
        let g = ring::Geometry::new(depth, stride).unwrap();
        self.v
            .dma()
            .alloc_aligned(g.byte_len() as usize, 64)
            .expect("ring memory")
    }

    /// A PD, a 16-entry CQ and an RC QP of depth 4 in RTS towards a GID nobody has.
    fn qp(&self) -> (u32, DmaBuf, DmaBuf) {
        let pdn = cmd::Handle::read_from_bytes(&self.ok(Opcode::AllocPd, &[]))
            .unwrap()
            .handle;
        let cq_ring = self.ring(16, cqe::SIZE);
        let cq = cmd::CreateCq {
            cqe: 16.into(),
            reserved: 0.into(),
            ring_addr: cq_ring.addr().into(),
        };
        let cqn = cmd::CreateCqResp::read_from_bytes(&self.ok(Opcode::CreateCq, cq.as_bytes()))
            .unwrap()
            .cqn;
        let sq_ring = self.ring(4, wqe::send_stride(1, 0));
        let rq_ring = self.ring(4, wqe::recv_stride(1));
        let create = cmd::CreateQp {
            pdn,
            qp_type: qp::Type::Rc.raw(),
            sq_sig_all: 1,
            reserved: 0.into(),
            send_cqn: cqn,
            recv_cqn: cqn,
            cap: qp::Caps {
                max_send_wr: 4.into(),
                max_recv_wr: 4.into(),
                max_send_sge: 1.into(),
                max_recv_sge: 1.into(),
                max_inline_data: 0.into(),
                reserved: 0.into(),
            },
            sq_ring_addr: sq_ring.addr().into(),
            rq_ring_addr: rq_ring.addr().into(),
        };
        let qpn = cmd::CreateQpResp::read_from_bytes(&self.ok(Opcode::CreateQp, create.as_bytes()))
            .unwrap()
            .qpn
            .get();
        let steps: [(qp::State, qp::AttrMask); 3] = [
            (
                qp::State::Init,
                qp::AttrMask::PKEY_INDEX | qp::AttrMask::PORT | qp::AttrMask::ACCESS_FLAGS,
            ),
            (
                qp::State::Rtr,
                qp::AttrMask::AV
                    | qp::AttrMask::PATH_MTU
                    | qp::AttrMask::DEST_QPN
                    | qp::AttrMask::RQ_PSN
                    | qp::AttrMask::MAX_DEST_RD_ATOMIC
                    | qp::AttrMask::MIN_RNR_TIMER,
            ),
            (
                qp::State::Rts,
                qp::AttrMask::TIMEOUT
                    | qp::AttrMask::RETRY_CNT
                    | qp::AttrMask::RNR_RETRY
                    | qp::AttrMask::SQ_PSN
                    | qp::AttrMask::MAX_QP_RD_ATOMIC,
            ),
        ];
        for (state, mask) in steps {
            let mut attr = qp::Attr {
                qp_state: state.raw(),
                path_mtu: vrdma_proto::config::Mtu::Mtu1024.raw(),
                port_num: 1,
                max_rd_atomic: 1,
                max_dest_rd_atomic: 1,
                dest_qp_num: 2.into(),
                ..qp::Attr::default()
            };
            attr.ah_attr = qp::AhAttr {
                dgid: vrdma_proto::Gid::from_ipv4([10, 9, 9, 9]),
                is_global: 1,
                port_num: 1,
                ..qp::AhAttr::default()
            };
            let body = cmd::ModifyQp {
                qpn: qpn.into(),
                attr_mask: (mask | qp::AttrMask::STATE).bits().into(),
                attr,
            };
            self.ok(Opcode::ModifyQp, body.as_bytes());
        }
        (qpn, sq_ring, cq_ring)
    }

    fn state(&self, qpn: u32) -> qp::State {
        let body = cmd::Handle {
            handle: qpn.into(),
            reserved: 0.into(),
        };
        let resp =
            cmd::QueryQpResp::read_from_bytes(&self.ok(Opcode::QueryQp, body.as_bytes())).unwrap();
        qp::State::from_raw(resp.attr.qp_state).unwrap()
    }

    fn doorbell(&self, qpn: u32) {
        self.v
            .ring_doorbells(0, &[Doorbell::new(doorbell::Kind::Send, qpn)])
            .expect("doorbell");
    }
}

fn set_producer(ring: &DmaBuf, value: u32) {
    ring.write_at(ring::PRODUCER_OFFSET as usize, &value.to_le_bytes())
        .unwrap();
}

fn word(ring: &DmaBuf, offset: u64) -> u32 {
    u32::from_le_bytes(read(ring, offset as usize, 4).try_into().unwrap())
}

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn malformed_work_requests_and_overruns_fail_only_the_offending_qp() {
    let d = TestDaemon::start(&[("evil", ""), ("v1", ""), ("v2", "")]);
    let evil = Raw {
        v: VirtioUser::connect(d.socket("evil"), Options::default()).expect("connect"),
    };

    // An undefined opcode in a send WQE: LOC_QP_OP_ERR with the request's wr_id, QP to ERR.
    let (qpn, sq, cq) = evil.qp();
    let bad = wqe::SendHeader {
        wr_id: 0xfeed.into(),
        opcode: 99,
        send_flags: 2,
        ..wqe::SendHeader::default()
    };
    sq.write_at(ring::HEADER_SIZE as usize, bad.as_bytes())
        .unwrap();
    set_producer(&sq, 1);
    evil.doorbell(qpn);
    wait("the error completion", || {
        word(&cq, ring::PRODUCER_OFFSET) == 1
    });
    let c = Cqe::decode(&read(&cq, ring::HEADER_SIZE as usize, cqe::SIZE as usize)).unwrap();
    assert_eq!(
        (c.cqe.wr_id.get(), c.status),
        (0xfeed, cqe::Status::LocQpOpErr)
    );
    assert_eq!(c.cqe.vendor_err.get(), VendorErr::MalformedWqe.raw());
    assert_eq!(evil.state(qpn), qp::State::Err);
    assert_eq!(word(&sq, ring::CONSUMER_OFFSET), 1, "the slot is consumed");

    // A producer index past the end of the ring: QP_FATAL, QP to ERR, no completion.
    let (qpn2, sq2, cq2) = evil.qp();
    set_producer(&sq2, 4 + 5);
    evil.doorbell(qpn2);
    let mut fatal = false;
    wait("the QP_FATAL event", || {
        fatal |= evil
            .v
            .drain_events()
            .unwrap()
            .iter()
            .any(|e| e.kind == event::Kind::QpFatal && e.handle == qpn2);
        fatal
    });
    assert_eq!(evil.state(qpn2), qp::State::Err);
    // Another doorbell makes the device look at the QP in ERR, where it flushes what is
    // queued; a dead ring is not flushed, so its garbage never becomes completions.
    evil.doorbell(qpn2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        word(&cq2, ring::PRODUCER_OFFSET),
        0,
        "nothing in an overrun ring is executed"
    );

    // Doorbells for QPs that do not exist, or exist in other VMs, and a garbage batch.
    let (v1, v2) = (d.open("v1"), d.open("v2"));
    let (a, b) = rc_pair(&v1, &v2, 1 << 16, vrdma::QpCap::default());
    for qpn in [0, 1, 0xff_ffff, a.qp.qp_num(), b.qp.qp_num()] {
        evil.doorbell(qpn);
    }
    let garbage = Doorbell {
        kind: 9,
        reserved: [0; 3],
        handle: a.qp.qp_num().into(),
    };
    evil.v
        .ring_doorbells(0, &[garbage])
        .expect("doorbell queue accepts the descriptor");
    let port = d.vm("evil").expect("evil connected");
    wait("the garbage batch to be counted", || {
        port.counters.doorbells_malformed.load(Ordering::Relaxed) == 1
    });
    assert_eq!(
        evil.command(Opcode::QueryDevice, &[]).0,
        Status::Ok,
        "the device still answers"
    );

    // The victims are untouched and still work.
    a.buf.write_at(0, b"unharmed").unwrap();
    let src = [vrdma::Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[vrdma::SendWr::rdma_write(
        1,
        &src,
        b.buf.addr(),
        b.mr.rkey(),
    )])
    .unwrap();
    assert_eq!(a.poll_one().status, vrdma::WcStatus::Success);
    assert_eq!(read(&b.buf, 0, 8), b"unharmed");
    a.assert_no_completion(Duration::from_millis(20));
    b.assert_no_completion(Duration::from_millis(20));
}

#[test]
fn a_third_vm_cannot_inject_into_an_established_connection() {
    use vrdma::{QpCap, QpType, RecvWr, SendWr, Sge, WcStatus};
    use vrdma_tests::{Endpoint, connect_rc};
    let d = TestDaemon::start(&[("a", ""), ("b", ""), ("c", "")]);
    let (ca, cb, cc) = (d.open("a"), d.open("b"), d.open("c"));
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, QpCap::default());
    let recv = [Sge::new(b.buf.addr(), 64, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 1,
        sg_list: &recv,
    }])
    .unwrap();
    // c aims a QP at b's QP, which is connected to a; two retries, then it must give up.
    let intruder = Endpoint::new(&cc, QpType::Rc, 1 << 16, QpCap::default());
    connect_rc(&intruder.qp, cb.gid(), b.qp.qp_num(), 7, 2);
    intruder.buf.write_at(0, b"forged!!").unwrap();
    let src = [Sge::new(intruder.buf.addr(), 8, intruder.mr.lkey())];
    intruder.send(&[SendWr::send(9, &src)]).unwrap();
    let wc = intruder.poll_one();
    assert_eq!((wc.wr_id, wc.status), (9, WcStatus::RetryExcErr), "{wc:?}");
    b.assert_no_completion(Duration::from_millis(20));
    // The rkey is no help either: a WRITE from c to b's MR finds no responder.
    let intruder2 = Endpoint::new(&cc, QpType::Rc, 1 << 16, QpCap::default());
    connect_rc(&intruder2.qp, cb.gid(), b.qp.qp_num(), 7, 1);
    let src2 = [Sge::new(intruder2.buf.addr(), 8, intruder2.mr.lkey())];
    intruder2
        .send(&[SendWr::rdma_write(10, &src2, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_eq!(intruder2.poll_one().status, WcStatus::RetryExcErr);
    assert_eq!(read(&b.buf, 0, 8), vec![0u8; 8], "nothing was written");
    // The real peer's message still lands in b's receive.
    a.buf.write_at(0, b"genuine!").unwrap();
    let good = [Sge::new(a.buf.addr(), 8, a.mr.lkey())];
    a.send(&[SendWr::send(2, &good)]).unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(b.poll_one().wr_id, 1);
    assert_eq!(read(&b.buf, 0, 8), b"genuine!");
}
