//! vrdma-perf against an in-process daemon: the library entry point for the loopback mode,
//! the binary for two processes over TCP and for the exit codes.

use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use vrdma_perf::{Args, JsonReport};
use vrdma_tests::TestDaemon;

const BIN: &str = env!("CARGO_BIN_EXE_vrdma-perf");

/// Runs `vrdma-perf ARGS` in this process; returns the report and what it printed.
fn run(argv: &[&str]) -> Result<(JsonReport, String), vrdma_perf::Error> {
    let mut full = vec!["vrdma-perf"];
    full.extend_from_slice(argv);
    let args = Args::try_parse_from(full).expect("valid arguments");
    let mut out = Vec::new();
    let report = vrdma_perf::run(&args, &mut out)?.expect("the client reports");
    Ok((report, String::from_utf8(out).expect("UTF-8 output")))
}

fn loopback(d: &TestDaemon, test: &str, extra: &[&str]) -> (JsonReport, String) {
    let (a, b) = (d.socket("a"), d.socket("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let mut argv = vec![test, "-d", a, "--loopback", b];
    argv.extend_from_slice(extra);
    run(&argv).unwrap_or_else(|e| panic!("{test} {extra:?}: {}", vrdma::error_chain(&e)))
}

fn two_vms() -> TestDaemon {
    TestDaemon::start(&[("a", ""), ("b", "")])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts `vrdma-perf TEST` as a server on VM b with `args`, its stderr piped and its stdout
/// piped if `keep_stdout` (else discarded).
fn spawn_server(
    d: &TestDaemon,
    test: &str,
    args: &[&str],
    keep_stdout: bool,
) -> std::process::Child {
    let stdout = if keep_stdout {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    };
    Command::new(BIN)
        .args([test, "-d"])
        .arg(d.socket("b"))
        .args(args)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the server")
}

/// Runs `vrdma-perf TEST` as a client on VM a with `args` (the server's host among them) and
/// returns its output.
fn run_client(d: &TestDaemon, test: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args([test, "-d"])
        .arg(d.socket("a"))
        .args(args)
        .output()
        .expect("run the client")
}

#[test]
fn write_bw_moves_exactly_iters_times_size_per_qp_through_the_daemon() {
    let d = two_vms();
    let (iters, size, qps) = (600u64, 4096u64, 3u64);
    let port = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            loopback(
                &d,
                "write_bw",
                &[
                    "-n", "600", "-s", "4096", "-q", "3", "-l", "2", "-t", "32", "-Q", "8",
                ],
            )
        });
        // Hold the VM (and its counters) while the guest is connected.
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(p) = d.vm("a") {
                break p;
            }
            assert!(Instant::now() < deadline, "the client never connected");
            std::thread::sleep(Duration::from_millis(1));
        };
        let (report, out) = runner.join().expect("no panic");
        assert_eq!(report.bw.len(), 1);
        assert_eq!(report.bw[0].iterations, iters);
        assert!(report.bw[0].bw_avg_mib > 0.0 && report.bw[0].msg_rate_mpps > 0.0);
        assert!(report.bw[0].bw_peak_mib >= report.bw[0].bw_avg_mib);
        assert_eq!((report.qps, report.post_list, report.tx_depth), (3, 2, 32));
        // Three local and three remote address lines.
        assert_eq!(out.matches("local address: LID 0000 QPN 0x").count(), 3);
        assert_eq!(out.matches("remote address: LID 0000 QPN 0x").count(), 3);
        port
    });
    assert_eq!(
        port.counters.bytes.load(Ordering::Relaxed),
        iters * size * qps,
        "bytes the daemon moved for the client's VM"
    );
}

#[test]
fn the_json_report_has_the_contract_fields_and_ordered_latency_statistics() {
    let d = two_vms();
    let file = std::env::temp_dir().join(format!("vrdma-perf-{}.json", std::process::id()));
    let path = file.to_str().unwrap();
    let (report, out) = loopback(
        &d,
        "write_lat",
        &["-n", "300", "-s", "64", "--out_json_file", path],
    );
    let text = std::fs::read_to_string(&file).expect("the JSON file was written");
    let _ = std::fs::remove_file(&file);
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = [
        "test",
        "events",
        "qps",
        "tx_depth",
        "post_list",
        "cq_mod",
        "inline_size",
        "bw",
        "lat",
    ];
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(v["test"], "write_lat");
    assert_eq!(v["events"], false);
    assert_eq!(v["bw"].as_array().unwrap().len(), 0);
    let lat = &v["lat"][0];
    for k in [
        "bytes",
        "iterations",
        "t_min_us",
        "t_max_us",
        "t_typical_us",
        "t_avg_us",
        "t_stdev_us",
        "p99_us",
        "p999_us",
    ] {
        assert!(lat[k].is_number(), "{k} missing from {lat}");
    }
    assert_eq!(
        (lat["bytes"].as_u64(), lat["iterations"].as_u64()),
        (Some(64), Some(300))
    );
    let f = |k: &str| lat[k].as_f64().unwrap();
    assert!(f("t_min_us") > 0.0);
    assert!(f("t_min_us") <= f("t_typical_us"), "{lat}");
    assert!(f("t_typical_us") <= f("p99_us"), "{lat}");
    assert!(
        f("p99_us") <= f("p999_us") && f("p999_us") <= f("t_max_us"),
        "{lat}"
    );
    assert!(
        f("t_min_us") <= f("t_avg_us") && f("t_avg_us") <= f("t_max_us"),
        "{lat}"
    );
    // The file and the returned report agree, and the table shows the same row.
    let parsed: JsonReport = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (parsed.test.as_str(), parsed.inline_size),
        ("write_lat", report.inline_size)
    );
    assert!((parsed.lat[0].t_avg_us - report.lat[0].t_avg_us).abs() < 1e-9);
    assert!(out.contains(vrdma_perf::report::RESULT_FMT_LAT), "{out}");
    assert!(
        out.contains(&format!(" 64      300          {:.2}", f("t_min_us"))),
        "{out}"
    );
}

#[test]
fn all_sizes_run_and_each_gets_a_row() {
    let d = two_vms();
    let (report, out) = loopback(&d, "send_bw", &["-a", "-n", "10"]);
    let sizes: Vec<u64> = report.bw.iter().map(|e| e.bytes).collect();
    assert_eq!(sizes, (1..=23).map(|p| 1u64 << p).collect::<Vec<_>>());
    assert!(
        report
            .bw
            .iter()
            .all(|e| e.iterations == 10 && e.bw_avg_mib > 0.0)
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with(" 8388608 ")).count(),
        1
    );
}

#[test]
fn event_mode_sleeps_on_the_channel_and_write_lat_says_it_uses_immediates() {
    let d = two_vms();
    let (report, out) = loopback(&d, "write_lat", &["-e", "-n", "200"]);
    assert!(report.events);
    assert_eq!(report.lat[0].iterations, 200);
    assert!(out.contains("RDMA_WRITE_WITH_IMM"), "{out}");
    let (report, _) = loopback(&d, "send_bw", &["-e", "-n", "400", "-q", "2"]);
    assert_eq!(report.bw[0].iterations, 400);
    assert!(report.bw[0].bw_avg_mib > 0.0);
}

#[test]
fn read_and_atomic_latency_and_duration_mode() {
    let d = two_vms();
    for test in ["read_lat", "atomic_lat"] {
        let (report, _) = loopback(&d, test, &["-n", "100"]);
        let l = &report.lat[0];
        assert_eq!(l.iterations, 100, "{test}");
        assert!(
            l.t_min_us <= l.t_typical_us && l.t_typical_us <= l.p99_us && l.p99_us <= l.t_max_us
        );
    }
    let (report, out) = loopback(&d, "read_bw", &["-D", "1", "-s", "1024"]);
    assert!(
        report.bw[0].iterations > 0 && report.bw[0].bw_avg_mib > 0.0,
        "{out}"
    );
    assert!(out.contains(" Duration        : 1[sec]"));
}

#[test]
fn client_and_server_as_two_processes_over_tcp_agree() {
    let d = two_vms();
    let port = free_port().to_string();
    let server = spawn_server(&d, "send_lat", &["-p", &port], true);
    let client = run_client(
        &d,
        "send_lat",
        &["-p", &port, "-n", "200", "-s", "256", "127.0.0.1"],
    );
    let server = server.wait_with_output().expect("the server ends");
    assert!(client.status.success(), "client: {}", stderr(&client));
    assert!(server.status.success(), "server: {}", stderr(&server));
    let (c, s) = (
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&server.stdout),
    );
    // Each side's local address is the other's remote address.
    let addr = |out: &str, side: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!(" {side} address:")))
            .map(|l| l.split_once("LID").unwrap().1.to_owned())
            .unwrap_or_else(|| panic!("no {side} address in {out}"))
    };
    assert_eq!(addr(&c, "local"), addr(&s, "remote"));
    assert_eq!(addr(&c, "remote"), addr(&s, "local"));
    assert!(c.lines().any(|l| l.starts_with(" 256     200 ")), "{c}");
}

#[test]
fn bad_devices_sizes_and_options_fail_with_one_line_and_the_right_exit_code() {
    let d = TestDaemon::start(&[("a", "max-mr-bytes=1M"), ("b", "")]);
    let (a, b) = (d.socket("a"), d.socket("b"));
    let perf = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("VRDMA_SOCKETS", "")
            .output()
            .expect("runs")
    };
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let cases: [(&[&str], i32, &str); 5] = [
        (
            &["write_bw", "-d", "vrdma7", "--loopback", b],
            1,
            "IB device vrdma7 not found",
        ),
        (
            &["write_bw", "-d", "/nonexistent/x.sock", "--loopback", b],
            1,
            "/nonexistent/x.sock",
        ),
        // 2 MiB buffers do not fit the VM's 1 MiB of registrations.
        (
            &["write_bw", "-d", a, "--loopback", b, "-s", "1048576"],
            1,
            "Couldn't allocate MR",
        ),
        (
            &["write_bw", "-d", a, "--loopback", b, "-s", "0"],
            2,
            "--size",
        ),
        (
            &["write_lat", "-d", a, "--loopback", b, "-q", "2"],
            2,
            "one QP",
        ),
    ];
    for (args, code, needle) in cases {
        let t0 = Instant::now();
        let o = perf(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            t0.elapsed()
        );
        if code == 1 {
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("vrdma-perf: "), "{err}");
        }
    }
}

#[test]
fn a_server_started_for_another_test_stops_the_client_at_once() {
    let d = two_vms();
    let port = free_port().to_string();
    let server = spawn_server(&d, "read_bw", &["-p", &port], false);
    let t0 = Instant::now();
    let client = run_client(&d, "write_bw", &["-p", &port, "127.0.0.1"]);
    let server = server.wait_with_output().expect("the server ends");
    assert_eq!(client.status.code(), Some(1));
    assert_eq!(server.status.code(), Some(1));
    assert!(
        stderr(&client)
            .contains("the client runs write_bw, but this server was started for read_bw"),
        "{}",
        stderr(&client)
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// The `--check` line's message count, from one run's output.
fn verified(out: &str) -> Option<(u64, u64)> {
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(vrdma_perf::check::VERIFIED_PREFIX))
        .collect();
    assert!(lines.len() <= 1, "more than one verified line: {out}");
    let rest = lines
        .first()?
        .strip_prefix(vrdma_perf::check::VERIFIED_PREFIX)?;
    let (m, b) = rest.split_once(" messages, ")?;
    Some((m.parse().ok()?, b.strip_suffix(" bytes")?.parse().ok()?))
}

/// Runs `vrdma-perf TEST --check` as a server on VM b and a client on VM a, two processes
/// over TCP; returns both outputs.
fn checked_over_tcp(d: &TestDaemon, test: &str, extra: &[&str]) -> (String, String) {
    let port = free_port().to_string();
    let server = spawn_server(d, test, &["-p", &port, "--check"], true);
    let mut args = vec!["-p", port.as_str(), "--check", "127.0.0.1"];
    args.extend_from_slice(extra);
    let client = run_client(d, test, &args);
    let server = server.wait_with_output().expect("the server ends");
    assert!(client.status.success(), "client: {}", stderr(&client));
    assert!(server.status.success(), "server: {}", stderr(&server));
    (
        String::from_utf8_lossy(&client.stdout).into_owned(),
        String::from_utf8_lossy(&server.stdout).into_owned(),
    )
}

#[test]
fn checked_write_bw_and_write_lat_between_two_processes_print_what_they_verified() {
    let d = two_vms();
    // write_bw: the server checks each of the 128 slots (the TX depth) for the iteration
    // the client last wrote there; the client, which receives nothing, prints no line.
    let (c, s) = checked_over_tcp(&d, "write_bw", &["-n", "200", "-s", "4096"]);
    assert_eq!(verified(&s), Some((128, 128 * 4096)), "{s}");
    assert_eq!(verified(&c), None, "{c}");
    // write_lat: each side checks every message it polled, in full.
    let (c, s) = checked_over_tcp(&d, "write_lat", &["-n", "100", "-s", "300"]);
    assert_eq!(verified(&c), Some((100, 100 * 300)), "{c}");
    assert_eq!(verified(&s), Some((100, 100 * 300)), "{s}");
}

#[test]
fn checked_runs_in_loopback_print_one_line_for_both_ends() {
    let d = two_vms();
    let cases: [(&str, &[&str], u64, u64); 7] = [
        // 2 QPs x 64 slots of 64 KiB (the TX depth --check leaves), 2 directions.
        ("write_bw", &["-n", "100", "-q", "2", "-b"], 256, 65536),
        ("write_lat", &["-n", "50", "-s", "1000"], 100, 1000),
        ("write_lat", &["-n", "50", "-s", "8", "-e"], 100, 8),
        (
            "send_bw",
            &["-n", "150", "-s", "1000", "-q", "2"],
            300,
            1000,
        ),
        ("send_lat", &["-n", "50", "-s", "4000"], 100, 4000),
        (
            "read_bw",
            &["-n", "100", "-s", "2000", "-t", "16", "-Q", "4"],
            100,
            2000,
        ),
        ("read_lat", &["-n", "50", "-s", "1"], 50, 1),
    ];
    for (test, extra, messages, size) in cases {
        let mut argv = extra.to_vec();
        argv.push("--check");
        let (_, out) = loopback(&d, test, &argv);
        assert_eq!(
            verified(&out),
            Some((messages, messages * size)),
            "{test} {extra:?}: {out}"
        );
    }
    // Unchecked runs print no such line.
    let (_, out) = loopback(&d, "send_bw", &["-n", "20"]);
    assert_eq!(verified(&out), None, "{out}");
}

#[test]
fn a_server_started_with_check_refuses_a_client_without_it() {
    let d = two_vms();
    let port = free_port().to_string();
    let server = spawn_server(&d, "write_bw", &["-p", &port, "--check"], false);
    let client = run_client(&d, "write_bw", &["-p", &port, "-n", "10", "127.0.0.1"]);
    let server = server.wait_with_output().expect("the server ends");
    assert_eq!(client.status.code(), Some(1));
    assert_eq!(server.status.code(), Some(1));
    assert!(
        stderr(&client).contains("started with --check"),
        "{}",
        stderr(&client)
    );
}
