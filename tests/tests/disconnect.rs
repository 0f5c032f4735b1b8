//! A guest that dies mid-traffic: its peer's QP with work outstanding goes to ERR with that
//! work completed in error, a peer QP with nothing outstanding notices only when it sends, the
//! daemon releases the dead VM's objects, and other VMs keep working.
//!
//! The dying guest is a real process (this test binary run again as a child), killed with
//! SIGKILL, so its socket is closed by the kernel and nothing is torn down politely.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use vrdma::{QpCap, QpState, QpType, RecvWr, SendWr, Sge, WcStatus};
use vrdma_proto::Gid;
use vrdma_proto::cqe::VendorErr;
use vrdma_tests::{Endpoint, TestDaemon, connect_rc, rc_pair, read};

const CHILD_SOCKET: &str = "VRDMA_TEST_CHILD_SOCKET";
const CHILD_PEER: &str = "VRDMA_TEST_CHILD_PEER";

fn cap() -> QpCap {
    QpCap {
        max_send_wr: 64,
        max_recv_wr: 64,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    }
}

/// The child's side: connect to the peer named in the environment, report the QPN, rkey and
/// address, then wait to be killed. Does nothing when run as an ordinary test.
#[test]
#[ignore = "run by killed_guest_errors_its_peer_and_spares_others as a child process"]
fn child_guest() {
    let Ok(socket) = std::env::var(CHILD_SOCKET) else {
        return;
    };
    let peer = std::env::var(CHILD_PEER).expect("peer");
    let (gid, qpn) = peer.split_once('/').expect("gid/qpn");
    let gid: std::net::Ipv4Addr = gid.parse().expect("ipv4");
    let ctx = vrdma::Context::open(&socket).expect("child connects");
    let e = Endpoint::new(&ctx, QpType::Rc, 1 << 20, cap());
    connect_rc(
        &e.qp,
        Gid::from_ipv4(gid.octets()),
        qpn.parse().expect("qpn"),
        7,
        7,
    );
    println!("READY {} {} {}", e.qp.qp_num(), e.mr.rkey(), e.buf.addr());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn killed_guest_errors_its_peer_and_spares_others() {
    let d = TestDaemon::start(&[("a", ""), ("b", ""), ("c", "")]);
    let (ca, cc) = (d.open("a"), d.open("c"));
    let a = Endpoint::new(&ca, QpType::Rc, 1 << 20, cap());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_guest",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SOCKET, d.socket("b"))
        .env(CHILD_PEER, format!("10.0.0.1/{}", a.qp.qp_num()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child guest");
    // If anything below hangs, the child must not outlive the test.
    let pid = child.id();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // The test harness prints "test child_guest ... " before the child's own output, on the
    // same line.
    let ready = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child guest exited before connecting"
        );
        if let Some(at) = line.find("READY") {
            break line[at..].to_owned();
        }
    };
    let fields: Vec<u64> = ready
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    let (b_qpn, b_rkey, b_addr) = (fields[0] as u32, fields[1] as u32, fields[2]);
    connect_rc(&a.qp, Gid::from_ipv4([10, 0, 0, 2]), b_qpn, 7, 7);

    // Traffic to the child: writes that succeed, then sends that wait for receives it never
    // posts (infinite RNR retries), so work is outstanding when it dies.
    let src = [Sge::new(a.buf.addr(), 4096, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(1, &src, b_addr, b_rkey)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let sends: Vec<_> = (10..14).map(|i| SendWr::send(i, &src)).collect();
    a.send(&sends).unwrap();
    a.assert_no_completion(Duration::from_millis(30));
    // A second QP towards the child with only a receive posted: nothing of it is outstanding
    // at the child, so, as on hardware, it does not notice the death until it sends.
    let quiet = Endpoint::new(&ca, QpType::Rc, 1 << 16, cap());
    connect_rc(&quiet.qp, Gid::from_ipv4([10, 0, 0, 2]), b_qpn, 7, 1);
    let recv = [Sge::new(quiet.buf.addr(), 64, quiet.mr.lkey())];
    quiet
        .recv(&[RecvWr {
            wr_id: 50,
            sg_list: &recv,
        }])
        .unwrap();

    child.kill().unwrap();
    child.wait().unwrap();

    let wc = a.poll_one();
    assert_eq!((wc.wr_id, wc.status), (10, WcStatus::RetryExcErr), "{wc:?}");
    assert_eq!(wc.vendor_err, VendorErr::PeerUnreachable.raw());
    for id in 11..14 {
        let wc = a.poll_one();
        assert_eq!((wc.wr_id, wc.status), (id, WcStatus::WrFlushErr));
    }
    assert_eq!(a.qp.query().unwrap().0.qp_state, QpState::Err);
    d.wait_connected("b", false);
    quiet.assert_no_completion(Duration::from_millis(30));
    assert_eq!(quiet.qp.query().unwrap().0.qp_state, QpState::Rts);
    let probe = [Sge::new(quiet.buf.addr(), 8, quiet.mr.lkey())];
    quiet.send(&[SendWr::send(51, &probe)]).unwrap();
    let wc = quiet.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status),
        (51, WcStatus::RetryExcErr),
        "its next send"
    );
    assert_eq!(
        (quiet.poll_one().wr_id, quiet.qp.query().unwrap().0.qp_state),
        (50, QpState::Err)
    );

    // a and c are unaffected.
    let (a2, c) = rc_pair(&ca, &cc, 1 << 16, cap());
    a2.buf.write_at(0, b"still here").unwrap();
    let src = [Sge::new(a2.buf.addr(), 10, a2.mr.lkey())];
    a2.send(&[SendWr::rdma_write(1, &src, c.buf.addr(), c.mr.rkey())])
        .unwrap();
    assert_eq!(a2.poll_one().status, WcStatus::Success);
    assert_eq!(read(&c.buf, 0, 10), b"still here");

    // b's socket accepts a new guest, with all of b's quota available again.
    let cb = d.open("b");
    let (b2, _a3) = rc_pair(&cb, &ca, 1 << 16, cap());
    assert_ne!(b2.qp.qp_num(), 0);
}
