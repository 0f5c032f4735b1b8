//! Debian's verbs programs, unmodified, over vrdma through the shim: ibverbs-utils, perftest
//! and qperf, between two VMs of one daemon and between two daemons over RoCEv2, with their
//! output checked. Each test has its own TCP port (21000 and up, below the ephemeral range)
//! and, across daemons, its own loopback addresses, so the tests run in parallel.

mod common;

use common::{Pair, assert_bw_report, assert_lat_report, require, spawn};

#[test]
fn ibv_devices_lists_the_device_with_its_guid() {
    require("ibv_devices", "ibverbs-utils");
    let pair = Pair::one_daemon();
    let out = spawn(&pair.server, "ibv_devices", &[]).wait();
    out.assert_clean();
    assert!(out.stdout.contains("vrdma0"), "{out}");
    // 10.0.0.1's GUID: 02:56:52:44 and the IPv4 address.
    assert!(out.stdout.contains("025652440a000001"), "{out}");
}

#[test]
fn ibv_devinfo_describes_the_device_and_its_port() {
    require("ibv_devinfo", "ibverbs-utils");
    let pair = Pair::one_daemon();
    let out = spawn(&pair.server, "ibv_devinfo", &["-v"]).wait();
    out.assert_clean();
    for expected in [
        "hca_id:\tvrdma0",
        "vendor_id:\t\t\t0x1af4",
        "node_guid:\t\t\t0256:5244:0a00:0001",
        "state:\t\t\tPORT_ACTIVE (4)",
        "port_lid:\t\t1",
        "link_layer:\t\tInfiniBand",
        "GID[  0]:\t\t0000:0000:0000:0000:0000:ffff:0a00:0001",
    ] {
        assert!(out.stdout.contains(expected), "no {expected:?} in {out}");
    }
}

/// Runs an ibverbs-utils pingpong both sides with `args` and checks both report the
/// exchange: "N bytes in T seconds" and "N iters".
fn pingpong(pair: &Pair, program: &str, port: u16, args: &[&str]) {
    require(program, "ibverbs-utils");
    let port_s = port.to_string();
    let mut server_args = vec!["-d", "vrdma0", "-p", &port_s];
    server_args.extend_from_slice(args);
    let mut client_args = server_args.clone();
    client_args.push("127.0.0.1");
    let (server, client) = pair.run(port, program, &server_args, &client_args);
    for out in [&server, &client] {
        out.assert_clean();
        assert!(
            out.stdout.contains(" bytes in ") && out.stdout.contains(" iters in "),
            "{out}"
        );
    }
}

#[test]
fn ibv_rc_pingpong_validates_every_buffer() {
    pingpong(
        &Pair::one_daemon(),
        "ibv_rc_pingpong",
        21000,
        &["-c", "-n", "200"],
    );
}

#[test]
fn ibv_rc_pingpong_with_events() {
    pingpong(
        &Pair::one_daemon(),
        "ibv_rc_pingpong",
        21001,
        &["-e", "-c", "-n", "200"],
    );
}

#[test]
fn ibv_rc_pingpong_across_daemons() {
    pingpong(
        &Pair::two_daemons(60),
        "ibv_rc_pingpong",
        21002,
        &["-c", "-n", "200"],
    );
}

#[test]
fn ibv_ud_pingpong() {
    pingpong(
        &Pair::one_daemon(),
        "ibv_ud_pingpong",
        21003,
        &["-n", "200", "-s", "1024"],
    );
}

#[test]
fn ibv_ud_pingpong_across_daemons() {
    pingpong(
        &Pair::two_daemons(61),
        "ibv_ud_pingpong",
        21004,
        &["-n", "200", "-s", "512"],
    );
}

#[test]
fn ibv_srq_pingpong_validates_every_buffer() {
    pingpong(
        &Pair::one_daemon(),
        "ibv_srq_pingpong",
        21005,
        &["-c", "-n", "100"],
    );
}

#[test]
fn ibv_srq_pingpong_with_events_across_daemons() {
    pingpong(
        &Pair::two_daemons(73),
        "ibv_srq_pingpong",
        21006,
        &["-e", "-c", "-n", "100"],
    );
}

/// Runs a perftest program both sides: `-F` (no CPU-frequency warning), the test's port,
/// then `args`.
fn perftest(
    pair: &Pair,
    program: &str,
    port: u16,
    args: &[&str],
) -> (common::Output, common::Output) {
    require(program, "perftest");
    let port_s = port.to_string();
    let mut server_args = vec!["-d", "vrdma0", "-F", "-p", &port_s];
    server_args.extend_from_slice(args);
    let mut client_args = server_args.clone();
    client_args.push("127.0.0.1");
    let (server, client) = pair.run(port, program, &server_args, &client_args);
    server.assert_clean();
    client.assert_clean();
    (server, client)
}

/// perftest `-a`: every size from 2 bytes to 8 MiB.
const ALL_SIZES: usize = 23;

#[test]
fn ib_write_bw_all_sizes() {
    let (_, client) = perftest(
        &Pair::one_daemon(),
        "ib_write_bw",
        21100,
        &["-a", "-n", "10"],
    );
    assert_bw_report(&client, ALL_SIZES);
}

#[test]
fn ib_write_bw_several_qps_bidirectional() {
    let (server, client) = perftest(
        &Pair::one_daemon(),
        "ib_write_bw",
        21101,
        &["-q", "4", "-b", "-n", "200"],
    );
    assert_bw_report(&client, 1);
    assert_bw_report(&server, 1);
}

#[test]
fn ib_write_bw_across_daemons() {
    let (_, client) = perftest(&Pair::two_daemons(62), "ib_write_bw", 21102, &["-n", "200"]);
    assert_bw_report(&client, 1);
}

/// perftest's `-S`: the service level of its QPs' path. The client's VM puts SL 1 in the
/// bulk class, below its own latency class, and its daemon counts the WRITEs there.
#[test]
fn ib_write_bw_on_a_service_level_runs_in_its_class() {
    let pair = Pair::one_daemon_with("", "class=latency,sl.1=bulk");
    let (_, client) = perftest(&pair, "ib_write_bw", 21103, &["-S", "1", "-n", "200"]);
    assert_bw_report(&client, 1);
    let [latency, normal, bulk] = pair.bytes_by_class("client");
    assert_eq!((latency, normal), (0, 0), "nothing in latency or normal");
    assert!(
        bulk >= 200 * 65536,
        "200 WRITEs of 64 KiB in bulk, counted {bulk} bytes"
    );
}

#[test]
fn ib_read_bw() {
    let (_, client) = perftest(&Pair::one_daemon(), "ib_read_bw", 21110, &["-n", "200"]);
    assert_bw_report(&client, 1);
}

#[test]
fn ib_read_bw_with_events() {
    let (_, client) = perftest(
        &Pair::one_daemon(),
        "ib_read_bw",
        21111,
        &["-e", "-n", "200"],
    );
    assert_bw_report(&client, 1);
}

#[test]
fn ib_read_bw_across_daemons() {
    let (_, client) = perftest(&Pair::two_daemons(63), "ib_read_bw", 21112, &["-n", "200"]);
    assert_bw_report(&client, 1);
}

#[test]
fn ib_send_bw_several_sizes() {
    // Not -a: perftest's send test re-posts its receives for every size, so the first sends of
    // each size meet RNR NAKs, as on any RDMA device; with the few iterations a test affords,
    // that start-up is all -a would measure.
    for size in ["64", "4096", "1048576"] {
        let (server, client) = perftest(
            &Pair::one_daemon(),
            "ib_send_bw",
            21120,
            &["-s", size, "-n", "200"],
        );
        assert_bw_report(&client, 1);
        assert_bw_report(&server, 1);
    }
}

#[test]
fn ib_send_bw_bidirectional_with_events() {
    let (server, client) = perftest(
        &Pair::one_daemon(),
        "ib_send_bw",
        21121,
        &["-b", "-e", "-n", "200"],
    );
    assert_bw_report(&client, 1);
    assert_bw_report(&server, 1);
}

#[test]
fn ib_send_bw_with_a_shared_receive_queue() {
    let (server, client) = perftest(
        &Pair::one_daemon(),
        "ib_send_bw",
        21125,
        &["--use-srq", "-q", "2", "-n", "200"],
    );
    assert_bw_report(&client, 1);
    assert_bw_report(&server, 1);
    assert!(server.stdout.contains("Using SRQ      : ON"), "{server}");
}

#[test]
fn ib_send_bw_ud() {
    let (server, client) = perftest(
        &Pair::one_daemon(),
        "ib_send_bw",
        21122,
        &["-c", "UD", "-n", "200"],
    );
    assert_bw_report(&client, 1);
    assert_bw_report(&server, 1);
}

#[test]
fn ib_send_bw_across_daemons() {
    let (_, client) = perftest(&Pair::two_daemons(64), "ib_send_bw", 21123, &["-n", "200"]);
    assert_bw_report(&client, 1);
}

#[test]
fn ib_send_bw_ud_across_daemons() {
    let (_, client) = perftest(
        &Pair::two_daemons(65),
        "ib_send_bw",
        21124,
        &["-c", "UD", "-n", "200"],
    );
    assert_bw_report(&client, 1);
}

#[test]
fn ib_atomic_bw() {
    let (_, client) = perftest(&Pair::one_daemon(), "ib_atomic_bw", 21130, &["-n", "200"]);
    assert_bw_report(&client, 1);
}

#[test]
fn ib_atomic_bw_across_daemons() {
    let (_, client) = perftest(
        &Pair::two_daemons(66),
        "ib_atomic_bw",
        21131,
        &["-n", "200"],
    );
    assert_bw_report(&client, 1);
}

#[test]
fn ib_write_lat_several_sizes() {
    // Not -a: the latency tests spin on memory, not on a verbs call, so on a busy two-CPU
    // machine every iteration waits for the scheduler; a few sizes keep the test short.
    for size in ["2", "4096", "65536"] {
        let (_, client) = perftest(
            &Pair::one_daemon(),
            "ib_write_lat",
            21140,
            &["-s", size, "-n", "100"],
        );
        assert_lat_report(&client, 1);
    }
}

#[test]
fn ib_write_lat_across_daemons() {
    let (_, client) = perftest(
        &Pair::two_daemons(67),
        "ib_write_lat",
        21141,
        &["-n", "200"],
    );
    assert_lat_report(&client, 1);
}

#[test]
fn ib_read_lat() {
    let (_, client) = perftest(&Pair::one_daemon(), "ib_read_lat", 21150, &["-n", "200"]);
    assert_lat_report(&client, 1);
}

#[test]
fn ib_read_lat_across_daemons() {
    let (_, client) = perftest(&Pair::two_daemons(68), "ib_read_lat", 21151, &["-n", "200"]);
    assert_lat_report(&client, 1);
}

#[test]
fn ib_send_lat_with_events() {
    let (_, client) = perftest(
        &Pair::one_daemon(),
        "ib_send_lat",
        21160,
        &["-e", "-n", "200"],
    );
    assert_lat_report(&client, 1);
}

#[test]
fn ib_send_lat_ud() {
    let (_, client) = perftest(
        &Pair::one_daemon(),
        "ib_send_lat",
        21161,
        &["-c", "UD", "-n", "200"],
    );
    assert_lat_report(&client, 1);
}

#[test]
fn ib_send_lat_across_daemons() {
    let (_, client) = perftest(&Pair::two_daemons(69), "ib_send_lat", 21162, &["-n", "200"]);
    assert_lat_report(&client, 1);
}

#[test]
fn ib_send_lat_ud_across_daemons() {
    let (_, client) = perftest(
        &Pair::two_daemons(70),
        "ib_send_lat",
        21163,
        &["-c", "UD", "-n", "200"],
    );
    assert_lat_report(&client, 1);
}

#[test]
fn ib_atomic_lat() {
    let (_, client) = perftest(&Pair::one_daemon(), "ib_atomic_lat", 21170, &["-n", "200"]);
    assert_lat_report(&client, 1);
}

#[test]
fn ib_atomic_lat_across_daemons() {
    let (_, client) = perftest(
        &Pair::two_daemons(71),
        "ib_atomic_lat",
        21171,
        &["-n", "200"],
    );
    assert_lat_report(&client, 1);
}

/// The qperf tests the issue names, all in one client run against one server.
const QPERF_TESTS: &[&str] = &[
    "rc_bw",
    "rc_lat",
    "rc_rdma_write_bw",
    "rc_rdma_read_bw",
    "rc_rdma_write_lat",
    "rc_compare_swap_mr",
    "rc_fetch_add_mr",
    "ud_bw",
    "ud_lat",
];

/// Runs every qperf test against a qperf server on the other VM and checks each reports a
/// positive figure.
fn qperf(pair: &Pair, port: u16) {
    require("qperf", "qperf");
    let port_s = port.to_string();
    let mut server = spawn(&pair.server, "qperf", &["-lp", &port_s]);
    common::wait_listening(&mut server, port);
    let mut args = vec!["127.0.0.1", "-lp", &port_s, "-t", "1"];
    args.extend_from_slice(QPERF_TESTS);
    let client = spawn(&pair.client, "qperf", &args).wait();
    let server = server.stop();
    client.assert_clean();
    assert!(server.stderr.is_empty(), "{server}");
    for test in QPERF_TESTS {
        // "rc_bw:\n    bw  =  1.2 GB/sec" or "rc_lat:\n    latency  =  3.4 us"
        let at = client
            .stdout
            .find(&format!("{test}:\n"))
            .unwrap_or_else(|| panic!("no {test} in {client}"));
        let line = client.stdout[at..].lines().nth(1).unwrap_or_default();
        let value: f64 = line
            .split('=')
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no figure for {test} in {client}"));
        assert!(value > 0.0, "{test}: {line} in {client}");
    }
}

#[test]
fn qperf_rc_and_ud_tests() {
    qperf(&Pair::one_daemon(), 21200);
}

#[test]
fn qperf_across_daemons() {
    qperf(&Pair::two_daemons(72), 21201);
}

/// Names in `objdump -T` output: the undefined ones (imports) or the defined ones.
fn dynamic_symbols(file: &std::path::Path, undefined: bool) -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new("objdump")
        .arg("-T")
        .arg(file)
        .output()
        .expect("run objdump (binutils)");
    assert!(out.status.success(), "objdump -T {}", file.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            if undefined {
                l.contains("*UND*")
            } else {
                !l.contains("*UND*") && l.contains(" DF ")
            }
        })
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect()
}

/// A verbs function the shim does not define would bind to the real libibverbs, which would
/// be handed the shim's objects and crash: every `ibv_*` function the Debian programs import
/// must be the shim's.
#[test]
fn the_shim_defines_every_verbs_function_the_programs_import() {
    let defined = dynamic_symbols(&common::shim(), false);
    let mut checked = 0;
    for program in [
        "ib_write_bw",
        "ib_read_bw",
        "ib_send_bw",
        "ib_atomic_bw",
        "ib_write_lat",
        "ib_read_lat",
        "ib_send_lat",
        "ib_atomic_lat",
        "qperf",
        "ibv_devices",
        "ibv_devinfo",
        "ibv_rc_pingpong",
        "ibv_ud_pingpong",
        "ibv_srq_pingpong",
    ] {
        let Some(path) = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|f| f.is_file())
        }) else {
            panic!(
                "{program} is not installed (tests/run installs perftest, qperf and ibverbs-utils)"
            );
        };
        for symbol in dynamic_symbols(&path, true) {
            if symbol.starts_with("ibv_") || symbol.starts_with("_ibv_") {
                assert!(
                    defined.contains(&symbol),
                    "{program} imports {symbol}, which the shim does not define"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} imports checked");
}
