//! Two daemons talking RoCEv2 over UDP on this host's loopback addresses: every opcode across
//! the inter-host fabric, data verified. Each test uses its own addresses (all of 127.0.0.0/8
//! is local), so the tests run in parallel without sharing a port.

use vrdma_tests::scenarios::Vendor;
use vrdma_tests::{TestDaemon, scenarios};

/// Two daemons, VM "a" on the first at `127.0.X.1` and VM "b" on the second at `127.0.X.2`.
fn two_hosts(x: u8) -> (TestDaemon, TestDaemon) {
    let a = format!("gid=127.0.{x}.1");
    let b = format!("gid=127.0.{x}.2");
    (
        TestDaemon::start_with(&[("a", &a)], &["--roce"]),
        TestDaemon::start_with(&[("b", &b)], &["--roce"]),
    )
}

#[test]
fn the_port_reports_the_roce_mtu_as_active() {
    let h = TestDaemon::start_with(
        &[("a", "gid=127.0.9.11")],
        &["--roce", "--roce-mtu", "2048"],
    );
    let port = h.open("a").query_port(1).expect("query port");
    assert_eq!(
        (port.active_mtu, port.max_mtu),
        (
            vrdma_proto::config::Mtu::Mtu2048.raw(),
            vrdma_proto::config::Mtu::Mtu4096.raw()
        )
    );
}

#[test]
fn rc_opcodes_cross_hosts() {
    let (h1, h2) = two_hosts(1);
    scenarios::rc_send_write_read_and_atomics(&h1.open("a"), &h2.open("b"));
}

#[test]
fn unsignalled_requests_cross_hosts_in_order() {
    let (h1, h2) = two_hosts(2);
    scenarios::unsignalled_requests_complete_silently_and_in_order(&h1.open("a"), &h2.open("b"));
}

#[test]
fn remote_access_errors_cross_hosts_as_naks() {
    let (h1, h2) = two_hosts(5);
    scenarios::remote_key_bounds_and_access_errors_fail_both_sides(
        &h1.open("a"),
        &h2.open("b"),
        Vendor::Unchecked,
    );
}

#[test]
fn a_receive_too_small_is_an_invalid_request_across_hosts() {
    let (h1, h2) = two_hosts(6);
    scenarios::receive_too_small_fails_both_sides(&h1.open("a"), &h2.open("b"), Vendor::Unchecked);
}

#[test]
fn rnr_naks_cross_hosts_with_their_timer_and_retry_count() {
    let (h1, h2) = two_hosts(7);
    scenarios::rnr_retries_run_out_after_the_configured_count(
        &h1.open("a"),
        &h2.open("b"),
        Vendor::Unchecked,
    );
}

#[test]
fn ud_datagrams_cross_hosts() {
    let (h1, h2) = two_hosts(3);
    scenarios::ud_datagrams_carry_grh_source_qp_and_gid(&h1.open("a"), &h2.open("b"));
}

/// Datagrams from the network are untrusted: malformed, wrong-ICRC, unknown-QP, foreign-host
/// and out-of-window packets are dropped or NAKed and counted, touch no memory, and leave the
/// real connection working.
#[test]
fn hostile_datagrams_are_counted_and_change_nothing() {
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::atomic::Ordering;
    use vrdma::{SendWr, Sge, WcStatus};
    use vrdma_roce::bth::Bth;
    use vrdma_roce::icrc::{IPV4_DF, Ip, IpUdp};
    use vrdma_roce::opcode::Opcode as Op;
    use vrdma_roce::packet::{Extensions, Packet, ParseError};
    use vrdma_roce::reth::Reth;
    use vrdma_tests::{pattern, rc_pair, read};

    let (h1, h2) = two_hosts(4);
    let (ca, cb) = (h1.open("a"), h2.open("b"));
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, scenarios::cap());
    pattern(&a.buf, 3);
    let b_before = read(&b.buf, 0, 1 << 16);
    let target: SocketAddr = "127.0.4.2:4791".parse().unwrap();
    // A forger on the peer's own address (RoCE has no authentication: the QP, PSN and R_Key
    // are what protect the responder) and one elsewhere.
    let on_peer = UdpSocket::bind("127.0.4.1:0").unwrap();
    let elsewhere = UdpSocket::bind("127.0.4.9:0").unwrap();
    let forge = |from: &UdpSocket, qpn: u32, psn: u32, rkey: u32, corrupt: bool| {
        let payload = [0xeeu8; 64];
        let ext = Extensions {
            reth: Some(Reth::new(b.buf.addr(), rkey, 64)),
            ..Extensions::default()
        };
        let pkt = Packet::new(Bth::new(Op::RcWriteOnly, qpn, psn).unwrap(), ext, &payload).unwrap();
        let src = from.local_addr().unwrap();
        let headers = IpUdp {
            ip: Ip::V4 {
                src: match src.ip() {
                    std::net::IpAddr::V4(v4) => v4,
                    _ => unreachable!(),
                },
                dst: "127.0.4.2".parse().unwrap(),
                id: 0,
                flags_frag: IPV4_DF,
            },
            src_port: src.port(),
            dst_port: 4791,
        };
        let mut buf = [0u8; 256];
        let n = pkt.encode(&mut buf, &headers).unwrap();
        if corrupt {
            buf[20] ^= 1;
        }
        from.send_to(&buf[..n], target).unwrap();
    };
    let qpn = b.qp.qp_num();
    let rkey = b.mr.rkey();
    on_peer.send_to(&[1, 2, 3], target).unwrap();
    forge(&on_peer, qpn, 0, rkey, true);
    forge(&on_peer, qpn ^ 0x100, 0, rkey, false);
    forge(&elsewhere, qpn, 0, rkey, false);
    forge(&on_peer, qpn, 0x40_0000, rkey, false);

    let counters = &h2
        .daemon()
        .roce()
        .expect("--roce")
        .endpoint(&cb.gid())
        .expect("b's address")
        .counters;
    let malformed = |e: ParseError| counters.malformed[e.index()].load(Ordering::Relaxed);
    // Counted as each datagram is handled: wait until all five are, and until the NAK the
    // out-of-sequence one earns has gone out (the receive thread sends its answers, and
    // counts them, once per batch: after it counted the datagram).
    let handled = || {
        malformed(ParseError::Truncated)
            + malformed(ParseError::BadIcrc)
            + counters.no_qp.load(Ordering::Relaxed)
            + counters.out_of_sequence.load(Ordering::Relaxed)
    };
    let naked = || counters.naks.load(Ordering::Relaxed) >= 1;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while (handled() < 5 || !naked()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(malformed(ParseError::Truncated), 1);
    assert_eq!(malformed(ParseError::BadIcrc), 1);
    assert_eq!(
        counters.no_qp.load(Ordering::Relaxed),
        2,
        "unknown QP, foreign host"
    );
    assert_eq!(counters.out_of_sequence.load(Ordering::Relaxed), 1);
    assert_eq!(
        counters.naks.load(Ordering::Relaxed),
        1,
        "one sequence-error NAK"
    );
    assert_eq!(read(&b.buf, 0, 1 << 16), b_before, "no forged byte landed");

    // The real connection is unharmed.
    let src = [Sge::new(a.buf.addr(), 4000, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(
        1,
        &src,
        b.buf.addr() + 8192,
        b.mr.rkey(),
    )])
    .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(read(&b.buf, 8192, 4000), read(&a.buf, 0, 4000));

    // A forged request with the right PSN but an R_Key the peer never granted: NAKed as a
    // remote access error (the responder QP goes to ERR, as the IBA asks), no byte written.
    let expected_psn = 4; // the WRITE above took PSNs 0-3 (4000 bytes at MTU 1024)
    let before = read(&b.buf, 0, 1 << 16);
    forge(&on_peer, qpn, expected_psn, rkey ^ 0x5a5a_0000, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while counters.naks.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(counters.naks.load(Ordering::Relaxed), 2);
    assert_eq!(read(&b.buf, 0, 1 << 16), before);
}

/// Every path MTU from 256 to 4096 cuts and reassembles messages of several packets the same:
/// SEND, WRITE with immediate and READ of 10 000 bytes, each byte checked.
#[test]
fn every_path_mtu_segments_and_reassembles() {
    use vrdma::{QpType, RecvWr, SendWr, Sge, WcStatus};
    use vrdma_proto::config::Mtu;
    use vrdma_tests::{Endpoint, RcPeer, pattern, read, try_connect_rc};

    let (h1, h2) = two_hosts(8);
    let (ca, cb) = (h1.open("a"), h2.open("b"));
    for mtu in [
        Mtu::Mtu256,
        Mtu::Mtu512,
        Mtu::Mtu1024,
        Mtu::Mtu2048,
        Mtu::Mtu4096,
    ] {
        let a = Endpoint::new(&ca, QpType::Rc, 1 << 16, scenarios::cap());
        let b = Endpoint::new(&cb, QpType::Rc, 1 << 16, scenarios::cap());
        for (e, peer, qpn) in [(&a, &cb, b.qp.qp_num()), (&b, &ca, a.qp.qp_num())] {
            let p = RcPeer {
                gid: peer.gid(),
                qpn,
                mtu,
                timeout: 14,
                retry_cnt: 7,
                rnr_retry: 7,
            };
            try_connect_rc(&e.qp, &p).expect("connect");
        }
        pattern(&a.buf, mtu.raw());
        pattern(&b.buf, mtu.raw() + 100);
        const N: u32 = 10_000;
        let recv = [Sge::new(b.buf.addr() + 40_000, N, b.mr.lkey())];
        b.recv(&[RecvWr {
            wr_id: 1,
            sg_list: &recv,
        }])
        .unwrap();
        b.recv(&[RecvWr {
            wr_id: 2,
            sg_list: &[],
        }])
        .unwrap();
        let src = [Sge::new(a.buf.addr() + 3, N, a.mr.lkey())];
        let dst = [Sge::new(a.buf.addr() + 20_001, N, a.mr.lkey())];
        let b_before = read(&b.buf, 7, N as usize);
        a.send(&[
            SendWr::send(10, &src),
            SendWr::rdma_write(11, &src, b.buf.addr() + 51_000, b.mr.rkey()).with_imm(5),
            SendWr::rdma_read(12, &dst, b.buf.addr() + 7, b.mr.rkey()),
        ])
        .unwrap();
        for id in 10..13 {
            let wc = a.poll_one();
            assert_eq!((wc.wr_id, wc.status), (id, WcStatus::Success), "{mtu:?}");
        }
        let sent = read(&a.buf, 3, N as usize);
        assert_eq!(read(&b.buf, 40_000, N as usize), sent, "SEND at {mtu:?}");
        assert_eq!(read(&b.buf, 51_000, N as usize), sent, "WRITE at {mtu:?}");
        assert_eq!(
            read(&a.buf, 20_001, N as usize),
            b_before,
            "READ at {mtu:?}"
        );
        for id in 1..3 {
            let wc = b.poll_one();
            assert_eq!(
                (wc.wr_id, wc.status, wc.byte_len),
                (id, WcStatus::Success, N)
            );
        }
    }
}
