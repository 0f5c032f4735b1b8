//! The main job as a user runs it, shortened: the demo binary starts the daemon and two guest
//! processes, runs every latency and bandwidth test with data verification, and cleans up.

use std::process::Command;

#[test]
fn demo_runs_every_test_across_real_processes_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_vrdma-demo"))
        .args(["--ms-per-size", "20"])
        .output()
        .expect("run vrdma-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stdout}\n{stderr}");
    for title in [
        "RDMA_Write Latency Test",
        "Send Latency Test",
        "RDMA_Write BW Test",
        "Send BW Test",
    ] {
        assert!(stdout.contains(title), "missing {title}: {stdout}");
    }
    assert!(
        stdout.contains("every test passed with its data verified")
            || stderr.contains("every test passed with its data verified"),
        "{stdout}\n{stderr}"
    );
    // Numbers were measured: the 8-byte latency row has a positive typical latency.
    let row = stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some("8"))
        .expect("an 8-byte row");
    let typical: f64 = row
        .split_whitespace()
        .nth(4)
        .expect("t_typical column")
        .parse()
        .expect("a number");
    assert!(typical > 0.0, "{row}");
}
