//! Daemons on different hosts: each in its own network namespace (its UDP sockets live there),
//! joined by veth, by a bridge, or by the user-space chaos relay; VMs on each. Needs root (CI
//! runs as root); elsewhere the tests say why they skip.

use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use vrdma::{Context, QpCap, RecvWr, SendFlags, SendWr, Sge, WcOpcode, WcStatus};
use vrdma_tests::chaos::{ChaosLink, ChaosOptions, Impairments};
use vrdma_tests::netns::{self, Netns, in_netns, veth};
use vrdma_tests::{Endpoint, TestDaemon, empty_wc, pattern, read, scenarios};

/// A daemon with `--roce` whose sockets live in `ns`.
fn daemon_in(ns: &Netns, vms: &[(&str, &str)]) -> TestDaemon {
    in_netns(ns, || TestDaemon::start_with(vms, &["--roce"]))
}

#[test]
fn two_hosts_over_veth_every_opcode_beside_a_local_pair() {
    if !netns::can_run_or_skip("two_hosts_over_veth_every_opcode_beside_a_local_pair") {
        return;
    }
    let (ha, hb) = (Netns::new("vra").unwrap(), Netns::new("vrb").unwrap());
    veth(
        &ha,
        &["10.77.0.1/24", "10.77.0.3/24"],
        &hb,
        &["10.77.0.2/24"],
        9000,
    )
    .unwrap();
    let da = daemon_in(&ha, &[("a1", "gid=10.77.0.1"), ("a2", "gid=10.77.0.3")]);
    let db = daemon_in(&hb, &[("b1", "gid=10.77.0.2")]);
    let (a1, a2, b1) = (da.open("a1"), da.open("a2"), db.open("b1"));
    // a1 talks to b1 across the veth and to a2 on its own daemon (one copy, no packets).
    std::thread::scope(|s| {
        s.spawn(|| scenarios::rc_send_write_read_and_atomics(&a1, &b1));
        s.spawn(|| scenarios::rc_send_write_read_and_atomics(&a2, &a1));
    });
    scenarios::ud_datagrams_carry_grh_source_qp_and_gid(&b1, &a1);
    scenarios::unsignalled_requests_complete_silently_and_in_order(&b1, &a2);
    let counters = |d: &TestDaemon, c: &Context| {
        let f = d.daemon().roce().expect("--roce");
        let ep = f.endpoint(&c.gid()).expect("served address");
        (
            ep.counters.tx.load(std::sync::atomic::Ordering::Relaxed),
            ep.counters.rx.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let (a1_tx, a1_rx) = counters(&da, &a1);
    assert!(
        a1_tx > 600 && a1_rx > 0,
        "a1 to b1 went over the wire: {a1_tx} {a1_rx}"
    );
    let (a2_tx, _) = counters(&da, &a2);
    assert!(a2_tx > 0, "a2 to b1 went over the wire");
}

#[test]
fn two_hosts_over_ipv6() {
    if !netns::can_run_or_skip("two_hosts_over_ipv6") {
        return;
    }
    let (ha, hb) = (Netns::new("v6a").unwrap(), Netns::new("v6b").unwrap());
    // No duplicate address detection: the addresses are usable at once.
    for ns in [&ha, &hb] {
        ns.sysctl("net/ipv6/conf/default/accept_dad", "0").unwrap();
    }
    veth(&ha, &["fd00:77::1/64"], &hb, &["fd00:77::2/64"], 9000).unwrap();
    wait_reachable(&ha, "fd00:77::1", &hb, "fd00:77::2");
    let da = daemon_in(&ha, &[("a", "gid=fd00:77::1")]);
    let db = daemon_in(&hb, &[("b", "gid=fd00:77::2")]);
    let (a, b) = (da.open("a"), db.open("b"));
    scenarios::rc_send_write_read_and_atomics(&a, &b);
    scenarios::ud_datagrams_carry_grh_source_qp_and_gid(&b, &a);
}

/// Waits until a datagram from `a_ip` in `a` reaches `b_ip` in `b`. A fresh IPv6 link needs
/// its link-local address and neighbour discovery first, which take longer than the tests'
/// whole retry budget; an operator's long-lived link has them.
fn wait_reachable(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str) {
    let rx = in_netns(b, || UdpSocket::bind((b_ip, 0)).unwrap());
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let to = rx.local_addr().unwrap();
    let tx = in_netns(a, || UdpSocket::bind((a_ip, 0)).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 8];
    loop {
        tx.send_to(b"ping", to).unwrap();
        if rx.recv_from(&mut buf).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{b_ip} unreachable from {a_ip}");
    }
}

#[test]
fn three_hosts_on_a_bridge_talk_in_a_ring() {
    if !netns::can_run_or_skip("three_hosts_on_a_bridge_talk_in_a_ring") {
        return;
    }
    let sw = Netns::new("vrsw").unwrap();
    sw.run(&["link", "add", "br0", "type", "bridge"]).unwrap();
    sw.run(&["link", "set", "br0", "up"]).unwrap();
    let hosts: Vec<Netns> = (0..3).map(|_| Netns::new("vrh").unwrap()).collect();
    for (i, h) in hosts.iter().enumerate() {
        let addr = format!("10.79.0.{}/24", i + 1);
        let (_, port) = veth(h, &[&addr], &sw, &[], 9000).unwrap();
        sw.run(&["link", "set", &port, "master", "br0"]).unwrap();
    }
    let daemons: Vec<TestDaemon> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| daemon_in(h, &[("vm", &format!("gid=10.79.0.{}", i + 1))]))
        .collect();
    let guests: Vec<Context> = daemons.iter().map(|d| d.open("vm")).collect();
    // Each host is requester towards the next and responder for the one before, at once.
    std::thread::scope(|s| {
        for i in 0..3 {
            let (from, to) = (&guests[i], &guests[(i + 1) % 3]);
            s.spawn(move || scenarios::rc_send_write_read_and_atomics(from, to));
        }
    });
    scenarios::ud_datagrams_carry_grh_source_qp_and_gid(&guests[2], &guests[0]);
}

/// An RC pair with more send and receive slots than the scenarios use.
fn deep_pair(
    a: &Context,
    b: &Context,
    len: usize,
    timeout: u8,
    retry_cnt: u8,
) -> (Endpoint, Endpoint) {
    let cap = QpCap {
        max_send_wr: 256,
        max_recv_wr: 256,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    };
    let ea = Endpoint::new(a, vrdma::QpType::Rc, len, cap);
    let eb = Endpoint::new(b, vrdma::QpType::Rc, len, cap);
    for (e, peer, qpn) in [(&ea, b, eb.qp.qp_num()), (&eb, a, ea.qp.qp_num())] {
        let p = vrdma_tests::RcPeer {
            gid: peer.gid(),
            qpn,
            mtu: vrdma_proto::config::Mtu::Mtu1024,
            timeout,
            retry_cnt,
            rnr_retry: 7,
        };
        vrdma_tests::try_connect_rc(&e.qp, &p).expect("connect");
    }
    (ea, eb)
}

/// Two hosts joined by the chaos relay, VM "a" on one and VM "b" on the other.
struct ChaosHosts {
    link: ChaosLink,
    da: TestDaemon,
    db: TestDaemon,
    _ns: (Netns, Netns),
}

fn chaos_hosts(opts: &ChaosOptions) -> ChaosHosts {
    let (ha, hb) = (Netns::new("vca").unwrap(), Netns::new("vcb").unwrap());
    let relay = Path::new(env!("CARGO_BIN_EXE_vrdma-chaos"));
    let link = ChaosLink::start(relay, &ha, &["10.78.1.1/24"], &hb, &["10.78.2.1/24"], opts)
        .expect("chaos relay starts");
    let da = daemon_in(&ha, &[("a", "gid=10.78.1.1")]);
    let db = daemon_in(&hb, &[("b", "gid=10.78.2.1")]);
    ChaosHosts {
        link,
        da,
        db,
        _ns: (ha, hb),
    }
}

/// Bytes of the region of work request `i`: its source or target at `i * REGION` in the lower
/// half of each buffer; READ results and receives go to the upper half.
const REGION: usize = 16 * 1024;
/// Where the upper halves start.
const UPPER: usize = 8 << 20;

fn region_len(i: usize) -> usize {
    // 1 byte to 16 KiB: single packets, exact MTU multiples and long multi-packet messages.
    [1, 1024, 3000, 8192, 16 * 1024, 777][i % 6]
}

/// `n` signalled work requests, WRITE, SEND and READ in turn, at most `depth` outstanding;
/// returns the completions in the order they came.
fn run_mixed(a: &Endpoint, b: &Endpoint, n: usize, depth: usize) -> Vec<vrdma::WorkCompletion> {
    let (abase, bbase) = (a.buf.addr(), b.buf.addr());
    let sends = (0..n).filter(|i| i % 3 == 1).count();
    let recv_sges: Vec<[Sge; 1]> = (0..sends)
        .map(|k| {
            [Sge::new(
                bbase + (UPPER + k * REGION) as u64,
                REGION as u32,
                b.mr.lkey(),
            )]
        })
        .collect();
    let recvs: Vec<RecvWr<'_>> = recv_sges
        .iter()
        .enumerate()
        .map(|(k, s)| RecvWr {
            wr_id: 10_000 + k as u64,
            sg_list: s,
        })
        .collect();
    for chunk in recvs.chunks(128) {
        b.recv(chunk).unwrap();
    }
    let sges: Vec<[Sge; 1]> = (0..n)
        .map(|i| {
            let len = region_len(i) as u32;
            let off = (i * REGION) as u64;
            match i % 3 {
                // READ lands in a's upper half.
                2 => [Sge::new(abase + UPPER as u64 + off, len, a.mr.lkey())],
                _ => [Sge::new(abase + off, len, a.mr.lkey())],
            }
        })
        .collect();
    let mut done = Vec::with_capacity(n);
    let mut posted = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut wc = [empty_wc(); 16];
    while done.len() < n {
        while posted < n && posted - done.len() < depth {
            let i = posted;
            let off = (i * REGION) as u64;
            let wr = match i % 3 {
                0 => SendWr::rdma_write(i as u64, &sges[i], bbase + off, b.mr.rkey()),
                1 => SendWr::send(i as u64, &sges[i]),
                _ => SendWr::rdma_read(i as u64, &sges[i], bbase + off, b.mr.rkey()),
            };
            a.send(&[wr.with_flags(SendFlags::SIGNALED)]).unwrap();
            posted += 1;
        }
        let got = a.cq.poll(&mut wc).unwrap();
        done.extend_from_slice(&wc[..got]);
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completed",
            done.len()
        );
        if got == 0 {
            std::thread::yield_now();
        }
    }
    done
}

#[test]
fn lossy_duplicating_reordering_link_loses_and_repeats_nothing() {
    if !netns::can_run_or_skip("lossy_duplicating_reordering_link_loses_and_repeats_nothing") {
        return;
    }
    for (seed, loss) in [(11u64, 0.01), (12, 0.10)] {
        let bad = Impairments {
            loss,
            duplicate: 0.02,
            reorder: 0.02,
            delay: Duration::from_micros(200),
            jitter: Duration::from_micros(300),
            ..Impairments::default()
        };
        let opts = ChaosOptions {
            seed,
            ..ChaosOptions::both(bad)
        };
        let h = chaos_hosts(&opts);
        let (ca, cb) = (h.da.open("a"), h.db.open("b"));
        // ACK timeout 4.096 µs × 2^12 ≈ 17 ms, 7 retries: enough for 10% loss.
        let (a, b) = deep_pair(&ca, &cb, 2 * UPPER, 12, 7);
        pattern(&a.buf, 21);
        pattern(&b.buf, 22);
        let b_orig = read(&b.buf, 0, 300 * REGION);
        const N: usize = 300;
        let done = run_mixed(&a, &b, N, 24);
        let ids: Vec<u64> = done.iter().map(|w| w.wr_id).collect();
        assert_eq!(
            ids,
            (0..N as u64).collect::<Vec<_>>(),
            "each exactly once, in order"
        );
        for w in &done {
            assert_eq!(w.status, WcStatus::Success, "{w:?}");
            let i = w.wr_id as usize;
            let opcode = [WcOpcode::RdmaWrite, WcOpcode::Send, WcOpcode::RdmaRead][i % 3];
            assert_eq!(w.opcode, opcode);
        }
        // Each region belongs to one work request.
        for i in 0..N {
            let len = region_len(i);
            let off = i * REGION;
            match i % 3 {
                0 => assert_eq!(read(&b.buf, off, len), read(&a.buf, off, len), "WRITE {i}"),
                2 => assert_eq!(
                    read(&a.buf, UPPER + off, len),
                    b_orig[off..off + len].to_vec(),
                    "READ {i}"
                ),
                _ => {}
            }
        }
        let mut rwc = [empty_wc(); 1];
        for (k, i) in (0..N).filter(|i| i % 3 == 1).enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while b.cq.poll(&mut rwc).unwrap() == 0 {
                assert!(Instant::now() < deadline, "receive {k} missing");
            }
            let w = rwc[0];
            assert_eq!(
                (w.wr_id, w.status, w.byte_len),
                (10_000 + k as u64, WcStatus::Success, region_len(i) as u32),
                "receives complete once each, in order"
            );
            let off = i * REGION;
            assert_eq!(
                read(&b.buf, UPPER + k * REGION, region_len(i)),
                read(&a.buf, off, region_len(i)),
                "SEND {i}"
            );
        }
        b.assert_no_completion(Duration::from_millis(50));
        fetch_adds_run_exactly_once(&a, &b);
        let stats = h.link.stats().unwrap();
        println!("loss {loss}: relay {stats:?}");
        assert!(
            stats.a_to_b.dropped > 0 && stats.b_to_a.dropped > 0,
            "{stats:?}"
        );
        assert!(stats.a_to_b.duplicated > 0, "{stats:?}");
    }
}

/// FETCH_ADD 1, 200 times on one word, through the same lossy link: a retransmitted atomic is
/// answered from the responder's replay cache, never executed again, so the word ends at
/// exactly 200 and the k-th request saw k.
fn fetch_adds_run_exactly_once(a: &Endpoint, b: &Endpoint) {
    const N: u64 = 200;
    let word = UPPER as u64 + (4 << 20);
    b.buf.write_at(word as usize, &0u64.to_ne_bytes()).unwrap();
    let olds: Vec<[Sge; 1]> = (0..N)
        .map(|k| [Sge::new(a.buf.addr() + word + 8 * k, 8, a.mr.lkey())])
        .collect();
    let mut wc = [empty_wc(); 16];
    let (mut posted, mut done) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < N {
        while posted < N && posted - done < 8 {
            let wr = SendWr::fetch_add(
                posted,
                &olds[posted as usize],
                b.buf.addr() + word,
                b.mr.rkey(),
                1,
            );
            a.send(&[wr.with_flags(SendFlags::SIGNALED)]).unwrap();
            posted += 1;
        }
        let got = a.cq.poll(&mut wc).unwrap();
        for w in &wc[..got] {
            assert_eq!(
                (w.wr_id, w.status),
                (done, WcStatus::Success),
                "in order, once"
            );
            done += 1;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {N} atomics completed"
        );
    }
    assert_eq!(
        read(&b.buf, word as usize, 8),
        N.to_ne_bytes(),
        "each executed once"
    );
    for k in 0..N {
        let seen = read(&a.buf, (word + 8 * k) as usize, 8);
        assert_eq!(
            seen,
            k.to_ne_bytes(),
            "FETCH_ADD {k} returned the value before it"
        );
    }
}

/// The RoCEv2 counters of the only address of daemon `d`.
fn roce_counters(d: &TestDaemon) -> &vhost_user_rdma::fabric::roce::endpoint::Counters {
    let net = d.daemon().roce().expect("--roce");
    &net.endpoints()[0].counters
}

/// Packets are ECN-capable; a switch that marks them congested (the relay, here, marking a
/// third of a's) is echoed by the responder (BECN in its answers) and halves the requester's
/// window, and nothing is lost or repeated.
#[test]
fn congestion_marks_are_echoed_and_slow_the_sender() {
    if !netns::can_run_or_skip("congestion_marks_are_echoed_and_slow_the_sender") {
        return;
    }
    let marking = Impairments {
        mark: 0.3,
        ..Impairments::default()
    };
    let opts = ChaosOptions {
        seed: 31,
        a_to_b: marking,
        ..ChaosOptions::default()
    };
    let h = chaos_hosts(&opts);
    let (ca, cb) = (h.da.open("a"), h.db.open("b"));
    let (a, b) = deep_pair(&ca, &cb, 2 * UPPER, 14, 7);
    pattern(&a.buf, 41);
    const N: usize = 120;
    let done = run_mixed(&a, &b, N, 24);
    let ids: Vec<u64> = done.iter().map(|w| w.wr_id).collect();
    assert_eq!(
        ids,
        (0..N as u64).collect::<Vec<_>>(),
        "each once, in order"
    );
    assert!(done.iter().all(|w| w.status == WcStatus::Success));
    for i in (0..N).filter(|i| i % 3 == 0) {
        let (off, len) = (i * REGION, region_len(i));
        assert_eq!(read(&b.buf, off, len), read(&a.buf, off, len), "WRITE {i}");
    }
    let stats = h.link.stats().expect("relay stats");
    assert!(stats.a_to_b.marked > 0, "the relay marked a's packets");
    let (ra, rb) = (roce_counters(&h.da), roce_counters(&h.db));
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (marked, becn, cuts) = (load(&rb.ecn_marked), load(&ra.becn), load(&ra.window_cuts));
    eprintln!(
        "relay marked {}, b saw {marked} marked, a got {becn} BECNs and cut its window {cuts} times",
        stats.a_to_b.marked
    );
    // A marked packet b's socket had no room for is lost like any other, and resent.
    assert!(
        marked > 0 && marked <= stats.a_to_b.marked,
        "b counts the marked packets it receives"
    );
    assert!(becn > 0, "b echoes the marks");
    assert!(
        cuts > 0 && cuts <= becn,
        "a slows down, at most once per echo"
    );
    // Nothing marked b's packets, so a saw none marked.
    assert_eq!(load(&ra.ecn_marked), 0);
}

#[test]
fn a_cut_longer_than_the_retries_gives_retry_exceeded_then_flush() {
    if !netns::can_run_or_skip("a_cut_longer_than_the_retries_gives_retry_exceeded_then_flush") {
        return;
    }
    let h = chaos_hosts(&ChaosOptions::default());
    let (ca, cb) = (h.da.open("a"), h.db.open("b"));
    // 4.096 µs × 2^13 ≈ 34 ms, 3 retries: gives up after about 135 ms.
    let (a, b) = deep_pair(&ca, &cb, 1 << 20, 13, 3);
    let src = [Sge::new(a.buf.addr(), 5000, a.mr.lkey())];
    a.send(&[
        SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)
    ])
    .unwrap();
    assert_eq!(
        a.poll_one().status,
        WcStatus::Success,
        "the link works first"
    );
    h.link.cut().unwrap();
    let started = Instant::now();
    let wrs: Vec<SendWr<'_>> = (2..6)
        .map(|i| {
            SendWr::rdma_write(i, &src, b.buf.addr() + 8192, b.mr.rkey())
                .with_flags(SendFlags::SIGNALED)
        })
        .collect();
    a.send(&wrs).unwrap();
    let first = a.poll_one();
    let waited = started.elapsed();
    assert_eq!((first.wr_id, first.status), (2, WcStatus::RetryExcErr));
    assert!(
        waited >= Duration::from_millis(100),
        "gave up after {waited:?}, before timeout × (retry_cnt + 1)"
    );
    for id in 3..6 {
        let w = a.poll_one();
        assert_eq!((w.wr_id, w.status), (id, WcStatus::WrFlushErr));
    }
    assert_eq!(
        a.qp.query().expect("query").0.qp_state,
        vrdma::QpState::Err,
        "the QP is in the error state, as on hardware"
    );
    h.link.restore().unwrap();
}

#[test]
fn tshark_decodes_the_traffic_on_the_veth() {
    if !netns::can_run_or_skip("tshark_decodes_the_traffic_on_the_veth") {
        return;
    }
    let (ha, hb) = (Netns::new("vta").unwrap(), Netns::new("vtb").unwrap());
    let (dev, _) = veth(&ha, &["10.76.0.1/24"], &hb, &["10.76.0.2/24"], 9000).unwrap();
    // a's VM in the latency class (DSCP 46 by default), its QPs' own traffic classes let
    // choose; b's normal with its DSCP set to 10, its QPs' not. On both, QPs on service level
    // 1 are in the bulk class (DSCP 8 by default).
    let da = in_netns(&ha, || {
        TestDaemon::start_with(
            &[("a", "gid=10.76.0.1,class=latency,sl.1=bulk")],
            &["--roce", "--guest-dscp"],
        )
    });
    let db = in_netns(&hb, || {
        TestDaemon::start_with(
            &[("b", "gid=10.76.0.2,sl.1=bulk")],
            &["--roce", "--dscp", "normal=10"],
        )
    });
    let (ca, cb) = (da.open("a"), db.open("b"));
    let (a, b) = deep_pair(&ca, &cb, 1 << 20, 14, 7);
    // A second pair whose requester's address gives traffic class 136 (DSCP 34), which its
    // packets carry instead of its VM's class's, as on a RoCE NIC; the responder's address
    // gives 136 too, which its daemon ignores.
    // A third pair on service level 1, whose packets carry the bulk class's DSCP both ways.
    let pair_by = |traffic_class: u8, sl: u8| {
        let cap = QpCap::default();
        let ea = Endpoint::new(&ca, vrdma::QpType::Rc, 4096, cap);
        let eb = Endpoint::new(&cb, vrdma::QpType::Rc, 4096, cap);
        let peer = |gid, qpn| vrdma_tests::RcPeer {
            gid,
            qpn,
            mtu: vrdma_proto::config::Mtu::Mtu1024,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
        };
        let mut ah = vrdma::AddressHandle::attr_for(cb.gid());
        ah.traffic_class = traffic_class;
        ah.sl = sl;
        vrdma_tests::try_connect_rc_via(&ea.qp, &peer(cb.gid(), eb.qp.qp_num()), ah).unwrap();
        let mut back = vrdma::AddressHandle::attr_for(ca.gid());
        back.traffic_class = traffic_class;
        back.sl = sl;
        vrdma_tests::try_connect_rc_via(&eb.qp, &peer(ca.gid(), ea.qp.qp_num()), back).unwrap();
        (ea, eb)
    };
    let (a2, b2) = pair_by(34 << 2, 0);
    let (a3, b3) = pair_by(0, 1);
    let pcap = std::env::temp_dir().join(format!("vrdma-veth-{}.pcap", std::process::id()));
    let mut tshark = ha
        .command("tshark")
        .args(["-n", "-i", &dev, "-f", "udp port 4791", "-w"])
        .arg(&pcap)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tshark runs (apt-get install tshark)");
    // tshark says "Capture started" once packets are being written (its "Capturing on" comes
    // before the capture is open).
    let mut stderr = std::io::BufReader::new(tshark.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Capture started") {
        line.clear();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
            panic!("tshark stopped before capturing");
        }
    }
    pattern(&a.buf, 1);
    // A 3000-byte WRITE (FIRST, MIDDLE, LAST at MTU 1024), a READ of 2048 (two responses) and a
    // FETCH_ADD, one after the other.
    let src = [Sge::new(a.buf.addr(), 3000, a.mr.lkey())];
    a.send(&[
        SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)
    ])
    .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let dst = [Sge::new(a.buf.addr() + 65536, 2048, a.mr.lkey())];
    a.send(
        &[SendWr::rdma_read(2, &dst, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)],
    )
    .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let old = [Sge::new(a.buf.addr() + 131072, 8, a.mr.lkey())];
    a.send(&[
        SendWr::fetch_add(3, &old, b.buf.addr() + 4096, b.mr.rkey(), 1)
            .with_flags(SendFlags::SIGNALED),
    ])
    .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let small = [Sge::new(a2.buf.addr(), 64, a2.mr.lkey())];
    a2.send(&[
        SendWr::rdma_write(4, &small, b2.buf.addr(), b2.mr.rkey()).with_flags(SendFlags::SIGNALED)
    ])
    .unwrap();
    assert_eq!(a2.poll_one().status, WcStatus::Success);
    let small = [Sge::new(a3.buf.addr(), 64, a3.mr.lkey())];
    a3.send(&[
        SendWr::rdma_write(5, &small, b3.buf.addr(), b3.mr.rkey()).with_flags(SendFlags::SIGNALED)
    ])
    .unwrap();
    assert_eq!(a3.poll_one().status, WcStatus::Success);
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::process::Command::new("kill")
        .args(["-INT", &tshark.id().to_string()])
        .status();
    tshark.wait().unwrap();
    let out = std::process::Command::new("tshark")
        .args(["-n", "-r"])
        .arg(&pcap)
        .args(["-T", "fields", "-E", "separator=|"])
        .args([
            "-e",
            "ip.src",
            "-e",
            "infiniband.bth.opcode",
            "-e",
            "infiniband.bth.psn",
        ])
        .args([
            "-e",
            "infiniband.bth.destqp",
            "-e",
            "infiniband.invariant.crc",
            "-e",
            "ip.dsfield.dscp",
            "-e",
            "ip.dsfield.ecn",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&pcap);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    let (aq, bq) = (a.qp.qp_num(), b.qp.qp_num());
    let (aq2, bq2) = (a2.qp.qp_num(), b2.qp.qp_num());
    let (aq3, bq3) = (a3.qp.qp_num(), b3.qp.qp_num());
    // The DSCP of each packet: its QP's class's (its VM's, or its service level's), or its
    // QP's traffic class's.
    for r in &rows {
        let expect = match (r[0], parse(r[3])) {
            ("10.76.0.1", q) if q == bq2 => 34,
            (_, q) if q == bq3 || q == aq3 => 8,
            ("10.76.0.1", _) => 46,
            _ => 10,
        };
        assert_eq!(parse(r[5]), expect, "DSCP of {r:?}");
        assert_eq!(parse(r[6]), 2, "every packet is ECN-capable, ECT(0): {r:?}");
    }
    assert!(
        rows.iter().any(|r| parse(r[3]) == bq2),
        "the second pair's request"
    );
    assert!(
        rows.iter().any(|r| parse(r[3]) == aq2),
        "the second pair's ACK"
    );
    assert!(
        rows.iter().any(|r| parse(r[3]) == bq3) && rows.iter().any(|r| parse(r[3]) == aq3),
        "the third pair's request and ACK"
    );
    let rows: Vec<Vec<&str>> = rows
        .into_iter()
        .filter(|r| ![aq2, bq2, aq3, bq3].contains(&parse(r[3])))
        .collect();
    let from_a: Vec<(u32, u32)> = rows
        .iter()
        .filter(|r| r[0] == "10.76.0.1")
        .map(|r| (parse(r[1]), parse(r[2])))
        .collect();
    let from_b: Vec<(u32, u32)> = rows
        .iter()
        .filter(|r| r[0] == "10.76.0.2")
        .map(|r| (parse(r[1]), parse(r[2])))
        .collect();
    // Requests: WRITE FIRST/MIDDLE/LAST with PSNs 0-2, READ request 3 (its responses take 3
    // and 4), FETCH_ADD 5.
    assert_eq!(
        from_a,
        vec![(0x06, 0), (0x07, 1), (0x08, 2), (0x0c, 3), (0x14, 5)],
        "requests as tshark decodes them"
    );
    // Answers: an ACK for the WRITE, READ RESPONSE FIRST and LAST, ATOMIC ACKNOWLEDGE.
    assert_eq!(from_b, vec![(0x11, 2), (0x0d, 3), (0x0f, 4), (0x12, 5)]);
    for r in &rows {
        let dest = parse(r[3]);
        let expect = if r[0] == "10.76.0.1" { bq } else { aq };
        assert_eq!(dest, expect, "destination QP in {r:?}");
        assert!(!r[4].is_empty(), "tshark found the ICRC in {r:?}");
    }
}

fn parse(field: &str) -> u32 {
    match field.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).unwrap(),
        None => field.parse().unwrap_or_else(|_| panic!("field {field:?}")),
    }
}
