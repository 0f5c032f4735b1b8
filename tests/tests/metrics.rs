//! `--metrics`: a daemon serving Prometheus metrics, scraped with a real HTTP client while two
//! VMs run traffic. The counters of the sending VM move between scrapes, the connected gauge
//! follows the guest, the counters outlive the guest's connection, and a path other than
//! `/metrics` is not found.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vhost_user_rdma::config::{Args, Config};
use vhost_user_rdma::daemon::Daemon;
use vrdma::{QpCap, SendFlags, SendWr, Sge, WcStatus};
use vrdma_tests::{Endpoint, TestDaemon, rc_pair};

/// Bytes per RDMA WRITE.
const MSG: u32 = 4096;

/// Scrapes `/metrics` and returns every sample, keyed by its name and labels as written.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut response = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .expect("the metrics endpoint answers");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let body = response.body_mut().read_to_string().expect("a text body");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("a sample is `name value`");
            (key.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} among {:?}", samples.keys()))
}

/// Writes from `a` to `b` until `stop`, waiting for each.
fn write_until(a: &Endpoint, b: &Endpoint, stop: &AtomicBool) -> u64 {
    let src = [Sge::new(a.buf.addr(), MSG, a.mr.lkey())];
    let wr =
        [SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey()).with_flags(SendFlags::SIGNALED)];
    let mut writes = 0;
    while !stop.load(Ordering::Relaxed) {
        a.send(&wr).expect("post write");
        assert_eq!(a.poll_one().status, WcStatus::Success);
        writes += 1;
    }
    writes
}

#[test]
fn counters_move_between_scrapes_while_traffic_runs() {
    let d = TestDaemon::start_with(&[("a", ""), ("b", "")], &["--metrics", "127.0.0.1:0"]);
    let addr = d.daemon().metrics_addr().expect("--metrics was given");
    assert_ne!(addr.port(), 0, "the bound port, not the one asked for");

    let idle = scrape(addr);
    assert_eq!(sample(&idle, r#"vrdma_vm_guest_connected{vm="a"}"#), 0.0);
    assert_eq!(
        sample(&idle, r#"vrdma_vm_work_requests_total{vm="a"}"#),
        0.0
    );

    let (ca, cb) = (d.open("a"), d.open("b"));
    let (a, b) = rc_pair(&ca, &cb, MSG as usize, QpCap::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (wrs_before, wrs_after, bytes_before, bytes_after) = std::thread::scope(|s| {
        let traffic = s.spawn(|| write_until(&a, &b, &stop));
        // Scrape until the traffic shows: the first scrape may come before any write.
        let deadline = Instant::now() + Duration::from_secs(30);
        let wrs = r#"vrdma_vm_work_requests_total{vm="a"}"#;
        let bytes = r#"vrdma_vm_payload_bytes_total{vm="a"}"#;
        let first = scrape(addr);
        let mut second = scrape(addr);
        while sample(&second, wrs) <= sample(&first, wrs) {
            assert!(Instant::now() < deadline, "no work request counted in 30 s");
            std::thread::sleep(Duration::from_millis(20));
            second = scrape(addr);
        }
        assert_eq!(sample(&second, r#"vrdma_vm_guest_connected{vm="a"}"#), 1.0);
        assert_eq!(sample(&second, r#"vrdma_vm_guest_connected{vm="b"}"#), 1.0);
        stop.store(true, Ordering::Relaxed);
        let writes = traffic.join().expect("the traffic thread");
        assert!(writes > 0);
        (
            sample(&first, wrs),
            sample(&second, wrs),
            sample(&first, bytes),
            sample(&second, bytes),
        )
    });
    assert!(wrs_after > wrs_before, "{wrs_before} -> {wrs_after}");
    assert!(
        bytes_after > bytes_before,
        "{bytes_before} -> {bytes_after}"
    );
    assert!(bytes_after >= wrs_after * f64::from(MSG) - f64::from(MSG));

    // The scheduler's loop and the receiving VM show too.
    let busy = scrape(addr);
    assert!(sample(&busy, "vrdma_scheduler_passes_total") > 0.0);
    assert!(sample(&busy, "vrdma_scheduler_busy_rounds_total") > 0.0);
    assert_eq!(
        sample(&busy, r#"vrdma_vm_work_requests_total{vm="b"}"#),
        0.0
    );
    assert!(sample(&busy, r#"vrdma_vm_commands_total{vm="b",result="ok"}"#) > 0.0);
    let rung = sample(&busy, r#"vrdma_vm_doorbells_total{vm="a",taken="kicked"}"#)
        + sample(&busy, r#"vrdma_vm_doorbells_total{vm="a",taken="polled"}"#);
    // Not one per write: a driver skips the doorbell while the device still polls its send
    // ring (docs/protocol.md §11), which on a busy host it often does.
    assert!(rung >= 1.0, "{rung} doorbells for {wrs_after} writes");

    // The guest goes: the gauge drops and the counters stay, for the next guest to add to.
    drop((a, b, ca, cb));
    d.wait_released("a", 1);
    let gone = scrape(addr);
    assert_eq!(sample(&gone, r#"vrdma_vm_guest_connected{vm="a"}"#), 0.0);
    let wrs = r#"vrdma_vm_work_requests_total{vm="a"}"#;
    assert!(sample(&gone, wrs) >= wrs_after);

    // Anything but /metrics is not there.
    match ureq::get(&format!("http://{addr}/")).call() {
        Err(ureq::Error::StatusCode(404)) => {}
        other => panic!("GET / answered {other:?}, expected 404"),
    }
}

#[test]
fn a_port_in_use_is_refused_as_a_configuration_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let argv = [
        "vhost-user-rdma",
        "--vm",
        "name=a,socket=/nonexistent/a.sock",
        "--metrics",
        addr.as_str(),
    ];
    let args = <Args as clap::Parser>::parse_from(argv);
    let config = Config::from_args(&args).expect("a valid command line");
    // The metrics port is bound after the VM's socket: give the VM one that works.
    let dir = std::env::temp_dir().join(format!("vrdma-metrics-busy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = config;
    config.vms[0].socket = dir.join("a.sock");
    let err = Daemon::start(&config).expect_err("the port is taken");
    assert!(err.is_configuration(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&addr) && message.contains("choose another"),
        "{message}"
    );
    // Nothing of the refused daemon is left listening.
    assert!(!dir.join("a.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn roce_addresses_and_errors_by_status_are_scraped() {
    let a = TestDaemon::start_with(
        &[("a", "gid=127.0.93.1")],
        &["--roce", "--metrics", "127.0.0.1:0"],
    );
    let b = TestDaemon::start_with(&[("b", "gid=127.0.93.2")], &["--roce"]);
    let addr = a.daemon().metrics_addr().expect("--metrics was given");
    let (ca, cb) = (a.open("a"), b.open("b"));
    let (ea, eb) = rc_pair(&ca, &cb, MSG as usize, QpCap::default());
    let sent = r#"vrdma_roce_tx_datagrams_total{addr="127.0.93.1"}"#;
    let before = sample(&scrape(addr), sent);
    let src = [Sge::new(ea.buf.addr(), MSG, ea.mr.lkey())];
    let write =
        |rkey| [SendWr::rdma_write(1, &src, eb.buf.addr(), rkey).with_flags(SendFlags::SIGNALED)];
    for _ in 0..10 {
        ea.send(&write(eb.mr.rkey())).expect("post write");
        assert_eq!(ea.poll_one().status, WcStatus::Success);
    }
    // A write with a key the peer never gave fails with a remote access error.
    ea.send(&write(eb.mr.rkey() ^ 0x100)).expect("post write");
    assert_eq!(ea.poll_one().status, WcStatus::RemAccessErr);

    let after = scrape(addr);
    assert!(sample(&after, sent) >= before + 10.0);
    assert!(
        sample(
            &after,
            r#"vrdma_roce_rx_datagrams_total{addr="127.0.93.1"}"#
        ) > 0.0
    );
    assert_eq!(
        sample(&after, r#"vrdma_roce_address_bound{addr="127.0.93.1"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"vrdma_roce_malformed_total{addr="127.0.93.1",reason="BadIcrc"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(&after, r#"vrdma_vm_error_completions_total{vm="a"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"vrdma_vm_error_completions_by_status_total{vm="a",status="RemAccessErr"}"#
        ),
        1.0
    );
}
