//! The daemon's RoCEv2 responder against a scripted peer: the test is the other host, writes
//! each request packet by hand with `vrdma-roce` and checks every answer byte for byte, as a
//! NIC or rxe would see them. This pins down what only a foreign peer can observe: opcodes,
//! PSNs, MSNs, duplicate handling and ICRCs.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use vrdma::{QpType, RecvWr, Sge, WcOpcode, WcStatus};
use vrdma_roce::aeth::{NakCode, Syndrome};
use vrdma_roce::atomic::AtomicEth;
use vrdma_roce::bth::Bth;
use vrdma_roce::icrc::{IPV4_DF, Ip, IpUdp};
use vrdma_roce::imm::ImmDt;
use vrdma_roce::opcode::Opcode as Op;
use vrdma_roce::packet::{self, Extensions, IcrcCheck, Packet};
use vrdma_roce::reth::Reth;
use vrdma_tests::{Endpoint, RcPeer, TestDaemon, pattern, read, scenarios, try_connect_rc};

const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 8, 1);
const VM: Ipv4Addr = Ipv4Addr::new(127, 0, 8, 2);
/// The QPN the scripted peer claims; the VM's QP is connected to it.
const PEER_QPN: u32 = 0x123;

/// One side of the wire: a UDP socket on the peer's address, port 4791.
struct Peer {
    socket: UdpSocket,
    vm_qpn: u32,
}

/// An answer as parsed: opcode, PSN, extension headers, payload.
#[derive(Debug)]
struct Answer {
    op: Op,
    psn: u32,
    dest_qp: u32,
    ext: Extensions,
    payload: Vec<u8>,
}

impl Peer {
    fn headers(from: Ipv4Addr, to: Ipv4Addr) -> IpUdp {
        IpUdp {
            ip: Ip::V4 {
                src: from,
                dst: to,
                id: 0,
                flags_frag: IPV4_DF,
            },
            src_port: 4791,
            dst_port: 4791,
        }
    }

    fn send(&self, op: Op, psn: u32, ack_req: bool, ext: Extensions, payload: &[u8]) {
        self.send_bth(op, psn, ack_req, 0xffff, ext, payload);
    }

    fn send_with_pkey(&self, pkey: u16, op: Op, psn: u32, ext: Extensions, payload: &[u8]) {
        self.send_bth(op, psn, true, pkey, ext, payload);
    }

    fn send_bth(&self, op: Op, psn: u32, ack: bool, pkey: u16, ext: Extensions, payload: &[u8]) {
        let bth = Bth::new(op, self.vm_qpn, psn)
            .unwrap()
            .with_ack_req(ack)
            .with_pkey(pkey);
        let pkt = Packet::new(bth, ext, payload).unwrap();
        let mut buf = vec![0u8; pkt.encoded_len()];
        pkt.encode(&mut buf, &Self::headers(PEER, VM)).unwrap();
        self.socket
            .send_to(&buf, SocketAddr::new(VM.into(), 4791))
            .unwrap();
    }

    /// The next datagram from the VM, its ICRC checked; `None` after 200 ms of silence.
    fn answer(&self) -> Option<Answer> {
        let mut buf = [0u8; 8192];
        let (n, from) = match self.socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => panic!("receive: {e}"),
        };
        assert_eq!(
            from,
            SocketAddr::new(VM.into(), 4791),
            "answers come from the VM's GID"
        );
        let headers = Self::headers(VM, PEER);
        let pkt = packet::parse(&buf[..n], 4096, IcrcCheck::Verify(&headers))
            .expect("the daemon's packet parses with a good ICRC");
        Some(Answer {
            op: pkt.opcode(),
            psn: pkt.bth().psn(),
            dest_qp: pkt.bth().dest_qp(),
            ext: *pkt.ext(),
            payload: pkt.payload().to_vec(),
        })
    }

    fn expect(&self) -> Answer {
        let a = self.answer().expect("an answer within 200 ms");
        assert_eq!(a.dest_qp, PEER_QPN, "answers go to the connected QP");
        a
    }

    fn expect_silence(&self) {
        if let Some(a) = self.answer() {
            panic!("expected no answer, got {a:?}");
        }
    }
}

/// How the VM's QP is connected to the scripted peer at `ip`: MTU 1024, long ACK timeout.
fn connected_to(ip: Ipv4Addr) -> RcPeer {
    RcPeer {
        gid: vrdma_proto::Gid::from_ipv4(ip.octets()),
        qpn: PEER_QPN,
        mtu: vrdma_proto::config::Mtu::Mtu1024,
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
    }
}

fn syndrome(a: &Answer) -> Syndrome {
    a.ext
        .aeth
        .expect("an AETH")
        .syndrome()
        .expect("a defined syndrome")
}

fn msn(a: &Answer) -> u32 {
    a.ext.aeth.expect("an AETH").msn()
}

fn reth(va: u64, rkey: u32, len: u32) -> Extensions {
    Extensions {
        reth: Some(Reth::new(va, rkey, len)),
        ..Extensions::default()
    }
}

#[test]
fn the_responder_answers_a_scripted_peer_as_the_iba_says() {
    let d = TestDaemon::start_with(&[("b", "gid=127.0.8.2")], &["--roce"]);
    let socket = UdpSocket::bind(SocketAddr::new(PEER.into(), 4791)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let ctx = d.open("b");
    let b = Endpoint::new(&ctx, QpType::Rc, 1 << 16, scenarios::cap());
    let peer = connected_to(PEER);
    try_connect_rc(&b.qp, &peer).expect("connect");
    let p = Peer {
        socket,
        vm_qpn: b.qp.qp_num(),
    };
    pattern(&b.buf, 7);
    let (va, rkey) = (b.buf.addr(), b.mr.rkey());

    // A READ of 3000 bytes at MTU 1024: FIRST, MIDDLE, LAST with PSNs 0-2, the AETH (MSN 1)
    // on the first and last.
    p.send(Op::RcReadRequest, 0, true, reth(va, rkey, 3000), &[]);
    let r: Vec<Answer> = (0..3).map(|_| p.expect()).collect();
    let ops: Vec<(Op, u32)> = r.iter().map(|a| (a.op, a.psn)).collect();
    assert_eq!(
        ops,
        [
            (Op::RcReadResponseFirst, 0),
            (Op::RcReadResponseMiddle, 1),
            (Op::RcReadResponseLast, 2)
        ]
    );
    assert_eq!((msn(&r[0]), msn(&r[2])), (1, 1));
    assert!(r[1].ext.aeth.is_none());
    let data: Vec<u8> = r.iter().flat_map(|a| a.payload.clone()).collect();
    assert_eq!(data, read(&b.buf, 0, 3000));

    // The requester lost the last two: it asks again from PSN 1 for the rest, and gets them
    // as MIDDLE and LAST of the original READ, not as a new one.
    p.send(
        Op::RcReadRequest,
        1,
        true,
        reth(va + 1024, rkey, 3000 - 1024),
        &[],
    );
    let again: Vec<(Op, u32)> = (0..2).map(|_| p.expect()).map(|a| (a.op, a.psn)).collect();
    assert_eq!(
        again,
        [(Op::RcReadResponseMiddle, 1), (Op::RcReadResponseLast, 2)]
    );
    // A "duplicate" that asks for something the READ never covered is not served.
    p.send(Op::RcReadRequest, 1, true, reth(va + 5, rkey, 100), &[]);
    p.expect_silence();

    // A WRITE at PSN 3: written, acknowledged with MSN 2.
    let bytes = [0xab_u8; 100];
    p.send(Op::RcWriteOnly, 3, true, reth(va + 8192, rkey, 100), &bytes);
    let ack = p.expect();
    assert_eq!(
        (ack.op, ack.psn, syndrome(&ack), msn(&ack)),
        (Op::RcAcknowledge, 3, ack_syndrome(), 2)
    );
    assert_eq!(read(&b.buf, 8192, 100), bytes);

    // FETCH_ADD at PSN 4 returns the old value; its duplicate returns the same one from the
    // replay cache and is not executed twice.
    b.buf.write_at(16384, &40u64.to_ne_bytes()).unwrap();
    let add = Extensions {
        atomic: Some(AtomicEth::fetch_add(va + 16384, rkey, 2)),
        ..Extensions::default()
    };
    for _ in 0..2 {
        p.send(Op::RcFetchAdd, 4, true, add, &[]);
        let a = p.expect();
        assert_eq!((a.op, a.psn, msn(&a)), (Op::RcAtomicAcknowledge, 4, 3));
        assert_eq!(a.ext.atomic_ack.unwrap().original(), 40);
    }
    assert_eq!(read(&b.buf, 16384, 8), 42u64.to_ne_bytes());

    // A duplicate WRITE, even one that does not ask, is acknowledged with the PSN of the last
    // request that was not a READ, and not applied again.
    b.buf.write_at(8192, &[0u8; 100]).unwrap();
    p.send(
        Op::RcWriteOnly,
        3,
        false,
        reth(va + 8192, rkey, 100),
        &bytes,
    );
    let ack = p.expect();
    assert_eq!((ack.op, ack.psn, msn(&ack)), (Op::RcAcknowledge, 4, 3));
    assert_eq!(read(&b.buf, 8192, 100), [0u8; 100]);

    // A gap: PSN 9 while 5 is expected gets one sequence-error NAK naming 5; the next
    // out-of-order packet gets none.
    p.send(Op::RcWriteOnly, 9, true, reth(va, rkey, 100), &bytes);
    let nak = p.expect();
    assert_eq!(
        (nak.op, nak.psn, syndrome(&nak)),
        (
            Op::RcAcknowledge,
            5,
            Syndrome::Nak(NakCode::PsnSequenceError)
        )
    );
    p.send(Op::RcWriteOnly, 10, true, reth(va, rkey, 100), &bytes);
    p.expect_silence();

    // A zero-length WRITE with immediate and an R_Key that names nothing: no memory is
    // named, so no key is checked (C9-88); it consumes a receive and completes with its data.
    b.recv(&[RecvWr {
        wr_id: 77,
        sg_list: &[] as &[Sge],
    }])
    .unwrap();
    let mut imm = reth(0, 0xdead_0000, 0);
    imm.imm = Some(ImmDt::new(0x0102_0304));
    p.send(Op::RcWriteOnlyWithImm, 5, true, imm, &[]);
    let ack = p.expect();
    assert_eq!((ack.op, ack.psn, msn(&ack)), (Op::RcAcknowledge, 5, 4));
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode, wc.byte_len),
        (77, WcStatus::Success, WcOpcode::RecvRdmaWithImm, 0)
    );
    assert_eq!(wc.imm_data, Some(0x0102_0304));

    // A SEND with no receive posted: RNR NAK with the QP's min_rnr_timer (1), and the PSN is
    // not consumed: the same SEND is accepted once a receive is there.
    p.send(Op::RcSendOnly, 6, true, Extensions::default(), &bytes[..10]);
    let rnr = p.expect();
    assert_eq!(
        (rnr.psn, syndrome(&rnr)),
        (6, Syndrome::RnrNak { timer: 1 })
    );
    let sge = [Sge::new(va + 32768, 64, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 78,
        sg_list: &sge,
    }])
    .unwrap();
    p.send(Op::RcSendOnly, 6, true, Extensions::default(), &bytes[..10]);
    let ack = p.expect();
    assert_eq!((ack.op, ack.psn, msn(&ack)), (Op::RcAcknowledge, 6, 5));
    assert_eq!(
        (b.poll_one().wr_id, read(&b.buf, 32768, 10)),
        (78, bytes[..10].to_vec())
    );

    // A packet of another partition is not for this port: dropped unanswered, unapplied; the
    // default partition's limited members (top bit clear) are.
    p.send_with_pkey(
        0x1234,
        Op::RcWriteOnly,
        7,
        reth(va + 40_000, rkey, 3),
        &[9, 9, 9],
    );
    p.expect_silence();
    assert_eq!(read(&b.buf, 40_000, 3), pattern_at(&b, 40_000, 3));
    let fabric = d.daemon().roce().expect("--roce");
    let counters = &fabric
        .endpoint(&ctx.gid())
        .expect("the VM's address")
        .counters;
    assert_eq!(
        counters.bad_pkey.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    p.send_with_pkey(
        0x7fff,
        Op::RcWriteOnly,
        7,
        reth(va + 40_000, rkey, 3),
        &[9, 9, 9],
    );
    assert_eq!(
        (p.expect().psn, read(&b.buf, 40_000, 3)),
        (7, vec![9, 9, 9])
    );

    // A WRITE MIDDLE with no WRITE FIRST before it is an invalid request: NAK, and the QP
    // goes to the error state.
    p.send(
        Op::RcWriteMiddle,
        8,
        true,
        Extensions::default(),
        &[0u8; 1024],
    );
    let nak = p.expect();
    assert_eq!(
        (nak.psn, syndrome(&nak)),
        (8, Syndrome::Nak(NakCode::InvalidRequest))
    );
    assert_eq!(scenarios::state(&b), vrdma::QpState::Err);
}

/// What `pattern` put at `offset..offset + len` of the endpoint's buffer.
fn pattern_at(e: &Endpoint, offset: usize, len: usize) -> Vec<u8> {
    let probe = e.ctx.alloc(e.buf.len()).unwrap();
    pattern(&probe, 7);
    read(&probe, offset, len)
}

fn ack_syndrome() -> Syndrome {
    Syndrome::Ack {
        credits: vrdma_roce::aeth::NO_CREDITS,
    }
}

/// A tiny deterministic generator, so a failure replays.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Thousands of well-formed but random requests (every RC opcode, PSNs around the expected
/// one, addresses and lengths around and past the MR, good and bad R_Keys), each with a
/// correct ICRC so it gets past the parser: the daemon answers only with packets that parse,
/// never writes outside the registered range, and serves a clean request afterwards.
#[test]
fn random_requests_never_reach_outside_the_registered_range() {
    const PEER2: Ipv4Addr = Ipv4Addr::new(127, 0, 10, 1);
    const VM2: Ipv4Addr = Ipv4Addr::new(127, 0, 10, 2);
    let d = TestDaemon::start_with(&[("b", "gid=127.0.10.2")], &["--roce"]);
    let socket = UdpSocket::bind(SocketAddr::new(PEER2.into(), 4791)).unwrap();
    socket.set_nonblocking(true).unwrap();
    let ctx = d.open("b");
    let b = Endpoint::new(&ctx, QpType::Rc, 1 << 16, scenarios::cap());
    // The MR covers the middle half only; the rest of the buffer is guarded.
    let mr = vrdma::MemoryRegion::register_range(
        &b.pd,
        b.buf.addr() + 16384,
        32768,
        vrdma_tests::all_access(),
    )
    .unwrap();
    pattern(&b.buf, 3);
    let guard_low = read(&b.buf, 0, 16384);
    let guard_high = read(&b.buf, 49152, 16384);
    let peer = connected_to(PEER2);
    let reconnect = |b: &Endpoint| {
        b.qp.modify(
            &vrdma::QpAttr {
                qp_state: vrdma::QpState::Reset,
                ..vrdma::QpAttr::default()
            },
            vrdma::QpAttrMask::STATE,
        )
        .unwrap();
        try_connect_rc(&b.qp, &peer).expect("connect");
        let sge = [Sge::new(b.buf.addr() + 20000, 2000, mr.lkey())];
        let recvs: Vec<RecvWr<'_>> = (0..8)
            .map(|i| RecvWr {
                wr_id: i,
                sg_list: &sge,
            })
            .collect();
        b.recv(&recvs).unwrap();
    };
    reconnect(&b);
    let base = b.buf.addr();
    let send = |op: Op, psn: u32, ack: bool, ext: Extensions, payload: &[u8]| {
        let bth = Bth::new(op, b.qp.qp_num(), psn).unwrap().with_ack_req(ack);
        let pkt = Packet::new(bth, ext, payload).unwrap();
        let mut buf = vec![0u8; pkt.encoded_len()];
        let headers = Peer::headers(PEER2, VM2);
        pkt.encode(&mut buf, &headers).unwrap();
        socket
            .send_to(&buf, SocketAddr::new(VM2.into(), 4791))
            .unwrap();
    };
    let drain = |answers: &mut u32| {
        let mut buf = [0u8; 8192];
        let back = Peer::headers(VM2, PEER2);
        while let Ok(n) = socket.recv(&mut buf) {
            packet::parse(&buf[..n], 4096, IcrcCheck::Verify(&back))
                .expect("every answer parses with a good ICRC");
            *answers += 1;
        }
    };
    let requests = [
        Op::RcSendFirst,
        Op::RcSendMiddle,
        Op::RcSendLast,
        Op::RcSendLastWithImm,
        Op::RcSendOnly,
        Op::RcSendOnlyWithImm,
        Op::RcSendLastWithInvalidate,
        Op::RcSendOnlyWithInvalidate,
        Op::RcWriteFirst,
        Op::RcWriteMiddle,
        Op::RcWriteLast,
        Op::RcWriteLastWithImm,
        Op::RcWriteOnly,
        Op::RcWriteOnlyWithImm,
        Op::RcReadRequest,
        Op::RcCompareSwap,
        Op::RcFetchAdd,
    ];
    let counters = &d
        .daemon()
        .roce()
        .expect("--roce")
        .endpoint(&ctx.gid())
        .expect("b's address")
        .counters;
    // Handled, not just received: the per-datagram counters are bumped after parsing.
    let rx_count = || {
        use std::sync::atomic::Ordering::Relaxed;
        counters.rx.load(Relaxed) as usize
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut answers = 0;
    let mut psn = 0u32;
    for i in 0..3000 {
        if i % 12 == 11 {
            // Everything sent must be handled first: a request arriving between the guest's
            // RTR and RTS could move the QP to ERR in between, as on hardware.
            while rx_count() < i {
                std::thread::yield_now();
            }
            drain(&mut answers);
            reconnect(&b);
            psn = 0;
        }
        // Mostly single-packet requests, which are in sequence wherever they come, so that
        // addresses and keys get checked rather than the opcode sequence.
        let op = if rng.below(3) == 0 {
            requests[rng.below(requests.len() as u64) as usize]
        } else {
            [
                Op::RcWriteOnly,
                Op::RcSendOnly,
                Op::RcReadRequest,
                Op::RcFetchAdd,
            ][rng.below(4) as usize]
        };
        // Mostly the expected PSN, sometimes behind or ahead.
        psn = match rng.below(8) {
            0 => psn.wrapping_sub(rng.below(4) as u32) & 0xff_ffff,
            1 => psn.wrapping_add(rng.below(4) as u32) & 0xff_ffff,
            _ => psn,
        };
        let va = base + rng.below(70_000) - 2000 + if rng.below(2) == 0 { 0 } else { 16384 };
        let rkey = if rng.below(4) == 0 {
            rng.next() as u32
        } else {
            mr.rkey()
        };
        let len = rng.below(5000) as u32;
        let payload_len = match rng.below(3) {
            0 => 1024,
            1 => rng.below(1025) as usize,
            _ => 0,
        };
        let payload: Vec<u8> = (0..payload_len).map(|_| rng.next() as u8).collect();
        let layout = op.layout();
        let mut ext = Extensions::default();
        for h in layout.headers {
            match h {
                vrdma_roce::opcode::Ext::Reth => ext.reth = Some(Reth::new(va, rkey, len)),
                vrdma_roce::opcode::Ext::ImmDt => ext.imm = Some(ImmDt::new(rng.next() as u32)),
                vrdma_roce::opcode::Ext::Ieth => {
                    ext.ieth = Some(vrdma_roce::ieth::Ieth::new(rng.next() as u32));
                }
                vrdma_roce::opcode::Ext::AtomicEth => {
                    ext.atomic = Some(AtomicEth::new(va & !7, rkey, rng.next(), rng.next()));
                }
                _ => {}
            }
        }
        let payload = if layout.payload { &payload[..] } else { &[] };
        send(op, psn, rng.below(2) == 0, ext, payload);
        psn = (psn + 1) & 0xff_ffff;
        if i % 16 == 0 {
            drain(&mut answers);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    drain(&mut answers);
    assert!(answers > 250, "the responder answered ({answers} packets)");
    assert_eq!(
        read(&b.buf, 0, 16384),
        guard_low,
        "nothing written below the MR"
    );
    assert_eq!(
        read(&b.buf, 49152, 16384),
        guard_high,
        "nothing written above the MR"
    );

    // Still serving: a clean WRITE lands and is acknowledged.
    reconnect(&b);
    send(
        Op::RcWriteOnly,
        0,
        true,
        reth(base + 30000, mr.rkey(), 4),
        &[1, 2, 3, 4],
    );
    socket.set_nonblocking(false).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("an ACK");
    let pkt = packet::parse(&buf[..n], 4096, IcrcCheck::Skip).unwrap();
    assert_eq!((pkt.opcode(), pkt.bth().psn()), (Op::RcAcknowledge, 0));
    assert_eq!(read(&b.buf, 30000, 4), [1, 2, 3, 4]);
}
