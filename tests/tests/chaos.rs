//! The chaos relay and the namespace helpers, exercised with plain UDP sockets made inside the
//! namespaces: what the relay claims to do to packets is checked against what arrives.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use vrdma_tests::chaos::{Change, ChaosLink, ChaosOptions, Impairments, Which};
use vrdma_tests::netns::{self, Netns, in_netns, veth};

const A_CIDR: &str = "10.201.1.1/24";
const B_CIDR: &str = "10.201.2.1/24";
const A_ADDR: &str = "10.201.1.1:5001";
const B_ADDR: &str = "10.201.2.1:4791";
const PAYLOAD: usize = 200;

fn relay() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vrdma-chaos"))
}

/// Two namespaces joined by a relay; `None` when the test must be skipped (not root).
fn chaos_pair(test: &str, opts: &ChaosOptions) -> Option<(Netns, Netns, ChaosLink)> {
    if !netns::can_run_or_skip(test) {
        return None;
    }
    let a = Netns::new("chaos-a").expect("create namespace A");
    let b = Netns::new("chaos-b").expect("create namespace B");
    let link = ChaosLink::start(relay(), &a, &[A_CIDR], &b, &[B_CIDR], opts).expect("start relay");
    Some((a, b, link))
}

/// A UDP socket bound to `addr` inside `ns`, with a receive buffer deep enough that the test's
/// bursts are never dropped by the receiving socket (which would be blamed on the relay).
fn udp_in(ns: &Netns, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().expect("test address");
    let sock = in_netns(ns, || UdpSocket::bind(addr)).expect("bind in namespace");
    setsockopt(&sock, sockopt::RcvBufForce, &(8 << 20)).expect("enlarge receive buffer");
    sock
}

/// Datagram `seq`: its number, then bytes derived from it so any corruption shows.
fn datagram(seq: u32) -> Vec<u8> {
    let mut d = seq.to_be_bytes().to_vec();
    d.extend((0..PAYLOAD as u32).map(|i| (i.wrapping_mul(7) ^ seq) as u8));
    d
}

/// Sends datagrams `0..n` to `to`, in bursts small enough for the TUN queue, so that the only
/// losses are the ones the relay is told to cause.
fn send_paced(sock: &UdpSocket, to: &str, n: u32) {
    for seq in 0..n {
        sock.send_to(&datagram(seq), to).expect("send");
        if seq % 50 == 49 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Everything that arrives at `sock` until `quiet` passes without a datagram, after `stop` is
/// set (so a slow start is not mistaken for the end).
fn receive_until_quiet(
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    quiet: Duration,
) -> std::thread::JoinHandle<Vec<(SocketAddr, Vec<u8>)>> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(quiet)).expect("timeout");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            match sock.recv_from(&mut buf) {
                Ok((len, from)) => got.push((from, buf[..len].to_vec())),
                Err(_) if stop.load(Ordering::Relaxed) => return got,
                Err(_) => {}
            }
        }
    })
}

/// Sends `n` datagrams A→B and returns what B received, in arrival order.
fn transfer(a: &Netns, b: &Netns, n: u32) -> Vec<(SocketAddr, Vec<u8>)> {
    let rx = udp_in(b, B_ADDR);
    let tx = udp_in(a, A_ADDR);
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = receive_until_quiet(rx, Arc::clone(&stop), Duration::from_millis(300));
    send_paced(&tx, B_ADDR, n);
    stop.store(true, Ordering::Relaxed);
    receiver.join().expect("receiver")
}

/// The sequence numbers of `got`, checking that each datagram is intact and came from A.
fn sequence_numbers(got: &[(SocketAddr, Vec<u8>)]) -> Vec<u32> {
    let from_a: SocketAddr = A_ADDR.parse().unwrap();
    got.iter()
        .map(|(from, d)| {
            assert_eq!(*from, from_a, "source address or port rewritten");
            let seq = u32::from_be_bytes(d[..4].try_into().unwrap());
            assert_eq!(*d, datagram(seq), "datagram {seq} corrupted");
            seq
        })
        .collect()
}

#[test]
fn unimpaired_link_delivers_everything_in_order_from_the_real_source() {
    let Some((a, b, link)) = chaos_pair("unimpaired", &ChaosOptions::default()) else {
        return;
    };
    let (tun_a, _) = link.tun_names();
    let v6 = a
        .run(&["-6", "addr", "show", "dev", tun_a])
        .expect("ip addr");
    assert!(
        v6.trim().is_empty(),
        "IPv6 would put noise on the link: {v6}"
    );
    let rp_filter = a
        .command("cat")
        .arg(format!("/proc/sys/net/ipv4/conf/{tun_a}/rp_filter"))
        .output()
        .expect("read rp_filter");
    assert_eq!(String::from_utf8_lossy(&rp_filter.stdout).trim(), "0");

    let n = 2000;
    let got = transfer(&a, &b, n);
    assert_eq!(sequence_numbers(&got), (0..n).collect::<Vec<_>>());
    let stats = link.stats().expect("stats");
    assert_eq!(stats.a_to_b.received, u64::from(n));
    assert_eq!(stats.a_to_b.forwarded, u64::from(n));
    assert_eq!(stats.a_to_b.dropped, 0);
}

fn lossy(seed: u64) -> ChaosOptions {
    ChaosOptions {
        seed,
        a_to_b: Impairments {
            loss: 0.1,
            ..Impairments::default()
        },
        ..ChaosOptions::default()
    }
}

#[test]
fn seeded_loss_drops_about_the_set_share_and_the_counts_match_arrivals() {
    let Some((a, b, link)) = chaos_pair("loss", &lossy(42)) else {
        return;
    };
    let n = 2000u32;
    let got = transfer(&a, &b, n);
    let seqs = sequence_numbers(&got);
    let stats = link.stats().expect("stats").a_to_b;
    assert_eq!(
        stats.received,
        u64::from(n),
        "packets were lost before the relay read them (TUN queue overflow?)"
    );
    assert_eq!(
        stats.forwarded,
        seqs.len() as u64,
        "relay and receiver disagree"
    );
    assert_eq!(stats.forwarded + stats.dropped, stats.received);
    // 10% of 2000 is 200 with a standard deviation of about 13.
    assert!(
        (140..=260).contains(&stats.dropped),
        "{} of {n} dropped at 10% loss",
        stats.dropped
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "loss alone reordered");
}

#[test]
fn the_same_seed_loses_the_same_datagrams() {
    let lost = |seed: u64| -> BTreeSet<u32> {
        let (a, b, _link) = chaos_pair("seed", &lossy(seed)).expect("root checked by caller");
        let arrived: BTreeSet<u32> = sequence_numbers(&transfer(&a, &b, 500))
            .into_iter()
            .collect();
        (0..500).filter(|s| !arrived.contains(s)).collect()
    };
    if !netns::can_run_or_skip("seed") {
        return;
    }
    let first = lost(7);
    assert!(!first.is_empty(), "nothing lost at 10%");
    assert_eq!(first, lost(7), "same seed, different losses");
    assert_ne!(first, lost(8), "the seed has no effect");
}

#[test]
fn duplicates_arrive_twice_and_are_counted() {
    let opts = ChaosOptions {
        a_to_b: Impairments {
            duplicate: 0.1,
            ..Impairments::default()
        },
        ..ChaosOptions::default()
    };
    let Some((a, b, link)) = chaos_pair("duplicate", &opts) else {
        return;
    };
    let n = 1000;
    let seqs = sequence_numbers(&transfer(&a, &b, n));
    let mut copies: HashMap<u32, u32> = HashMap::new();
    for s in &seqs {
        *copies.entry(*s).or_default() += 1;
    }
    assert_eq!(copies.len(), n as usize, "duplication lost datagrams");
    assert!(copies.values().all(|&c| c <= 2), "more than two copies");
    let extra = (seqs.len() - n as usize) as u64;
    assert_eq!(extra, link.stats().expect("stats").a_to_b.duplicated);
    assert!((50..=150).contains(&extra), "{extra} duplicates at 10%");
}

#[test]
fn reordered_datagrams_arrive_late_and_are_counted() {
    let opts = ChaosOptions {
        a_to_b: Impairments {
            reorder: 0.1,
            reorder_gap: 3,
            ..Impairments::default()
        },
        ..ChaosOptions::default()
    };
    let Some((a, b, link)) = chaos_pair("reorder", &opts) else {
        return;
    };
    let n = 1000;
    let seqs = sequence_numbers(&transfer(&a, &b, n));
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..n).collect::<Vec<_>>(),
        "reordering lost or added datagrams"
    );
    let mut highest = None;
    let mut late = 0u64;
    for &s in &seqs {
        if highest.is_some_and(|h| s < h) {
            late += 1;
        }
        highest = highest.max(Some(s));
    }
    assert_eq!(late, link.stats().expect("stats").a_to_b.reordered);
    assert!((50..=150).contains(&late), "{late} late datagrams at 10%");
}

#[test]
fn delay_holds_each_datagram_for_at_least_the_set_time() {
    let delay = Duration::from_millis(40);
    let opts = ChaosOptions {
        a_to_b: Impairments {
            delay,
            ..Impairments::default()
        },
        ..ChaosOptions::default()
    };
    let Some((a, b, _link)) = chaos_pair("delay", &opts) else {
        return;
    };
    let rx = udp_in(&b, B_ADDR);
    let tx = udp_in(&a, A_ADDR);
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 1024];
    for seq in 0..5 {
        let sent = Instant::now();
        tx.send_to(&datagram(seq), B_ADDR).expect("send");
        let (len, _) = rx.recv_from(&mut buf).expect("delayed datagram arrives");
        let transit = sent.elapsed();
        assert_eq!(buf[..len], datagram(seq));
        assert!(transit >= delay, "datagram {seq} took only {transit:?}");
        assert!(transit < delay * 10, "datagram {seq} took {transit:?}");
    }
}

/// Whether a datagram sent from `tx` to `to` reaches `rx` within a short wait.
fn gets_through(tx: &UdpSocket, rx: &UdpSocket, to: &str) -> bool {
    tx.send_to(b"probe", to).expect("send");
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    rx.recv_from(&mut buf).is_ok()
}

#[test]
fn a_cut_drops_everything_until_restored() {
    let Some((a, b, link)) = chaos_pair("cut", &ChaosOptions::default()) else {
        return;
    };
    let (on_a, on_b) = (udp_in(&a, A_ADDR), udp_in(&b, B_ADDR));
    assert!(
        gets_through(&on_a, &on_b, B_ADDR),
        "link down before any cut"
    );

    link.cut().expect("cut");
    let before = link.stats().expect("stats");
    for _ in 0..3 {
        assert!(!gets_through(&on_a, &on_b, B_ADDR), "A→B crossed a cut");
        assert!(!gets_through(&on_b, &on_a, A_ADDR), "B→A crossed a cut");
    }
    let during = link.stats().expect("stats");
    assert_eq!(during.a_to_b.dropped - before.a_to_b.dropped, 3);
    assert_eq!(during.b_to_a.dropped - before.b_to_a.dropped, 3);

    link.restore().expect("restore");
    assert!(gets_through(&on_a, &on_b, B_ADDR), "A→B still cut");
    assert!(gets_through(&on_b, &on_a, A_ADDR), "B→A still cut");

    link.set(Which::AToB, Change::Cut).expect("cut one way");
    assert!(
        !gets_through(&on_a, &on_b, B_ADDR),
        "A→B crossed a one-way cut"
    );
    assert!(
        gets_through(&on_b, &on_a, A_ADDR),
        "a one-way cut blocked B→A"
    );
}

#[test]
fn loss_can_be_changed_while_running() {
    let Some((a, b, link)) = chaos_pair("set-loss", &ChaosOptions::default()) else {
        return;
    };
    link.set_loss(1.0).expect("set loss");
    assert!(
        transfer(&a, &b, 100).is_empty(),
        "datagrams crossed at 100% loss"
    );
    link.set_loss(0.0).expect("set loss");
    assert_eq!(transfer(&a, &b, 100).len(), 100);
    let stats = link.stop().expect("final stats");
    assert_eq!((stats.a_to_b.dropped, stats.a_to_b.forwarded), (100, 100));
}

#[test]
fn veth_joins_two_namespaces() {
    if !netns::can_run_or_skip("veth") {
        return;
    }
    let a = Netns::new("veth-a").expect("create namespace A");
    let b = Netns::new("veth-b").expect("create namespace B");
    let (dev_a, dev_b) = veth(&a, &["10.202.0.1/24"], &b, &["10.202.0.2/24"], 4000).expect("veth");
    assert!(dev_a.len() <= 15 && dev_b.len() <= 15);
    let link = a.run(&["link", "show", "dev", &dev_a]).expect("ip link");
    assert!(link.contains("mtu 4000"), "MTU not applied: {link}");

    // A socket made inside A cannot use B's address: in_netns really entered A.
    let wrong = in_netns(&a, || UdpSocket::bind("10.202.0.2:0"));
    assert!(wrong.is_err(), "bound B's address from inside A");

    let rx = udp_in(&b, "10.202.0.2:4791");
    let tx = udp_in(&a, "10.202.0.1:5001");
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let big = vec![0x5a; 3500];
    tx.send_to(&big, "10.202.0.2:4791").expect("send");
    let mut buf = vec![0u8; 8192];
    let (len, from) = rx.recv_from(&mut buf).expect("datagram crosses the veth");
    assert_eq!(buf[..len], big[..]);
    assert_eq!(from, "10.202.0.1:5001".parse::<SocketAddr>().unwrap());
}

#[test]
fn namespaces_are_deleted_on_drop() {
    if !netns::can_run_or_skip("netns-drop") {
        return;
    }
    let ns = Netns::new("drop").expect("create namespace");
    let name = ns.name().to_owned();
    assert!(Path::new("/run/netns").join(&name).exists());
    drop(ns);
    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "{name} left behind"
    );
}

#[test]
fn the_relay_carries_tens_of_thousands_of_datagrams_per_second() {
    let Some((a, b, link)) = chaos_pair("throughput", &ChaosOptions::default()) else {
        return;
    };
    let (rx, tx) = (udp_in(&b, B_ADDR), udp_in(&a, A_ADDR));
    let n = 20_000u64;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let receiver = std::thread::spawn(move || {
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 1024];
        while counter.load(Ordering::Relaxed) < n && rx.recv_from(&mut buf).is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs(20);
    let d = datagram(0);
    for sent in 0..n {
        // A window rather than a rate, so the test measures the relay, not a guessed pace,
        // and never overflows the TUN queue.
        while sent - received.load(Ordering::Relaxed) > 1000 {
            assert!(Instant::now() < deadline, "stalled with {sent} sent");
            std::thread::yield_now();
        }
        tx.send_to(&d, B_ADDR).expect("send");
    }
    receiver.join().expect("receiver");
    let elapsed = start.elapsed();
    let got = received.load(Ordering::Relaxed);
    assert_eq!(got, n, "lost {} of {n}: {:?}", n - got, link.stats());
    let rate = got as f64 / elapsed.as_secs_f64();
    // About 75 000/s unoptimized on two loaded cores; the floor leaves room for a slow CI.
    assert!(rate > 10_000.0, "only {rate:.0} datagrams/s");
}
