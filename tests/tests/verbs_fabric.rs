//! The verbs fabric (`--fabric verbs:DEV`) against a NIC made of the libibverbs shim: the
//! daemon under test, built with the `verbs` feature, runs with `libvrdma_ibverbs.so`
//! preloaded, so its "NIC" `vrdma0` is a VM of a second daemon (in this process) on the soft
//! fabric. No RDMA hardware or kernel support needed.

use std::path::Path;
use std::process::{Command, Output};

use vrdma_tests::TestDaemon;
use vrdma_tests::artifacts::{shim, verbs_daemon};

/// Runs the verbs daemon with `args`; with `nic` the shim is preloaded and that socket is
/// its only device, without it libibverbs looks for devices in an empty sysfs.
fn run(nic: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(verbs_daemon());
    cmd.args(args).env_remove("RUST_LOG");
    match nic {
        Some(socket) => cmd.env("LD_PRELOAD", shim()).env("VRDMA_SOCKETS", socket),
        // libibverbs reads the devices from SYSFS_PATH: an empty one is a host without RDMA,
        // whatever this machine has.
        None => cmd.env("SYSFS_PATH", std::env::temp_dir().join("vrdma-no-sysfs")),
    };
    cmd.output().expect("run the verbs daemon")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_fabric_runs_every_opcode_over_the_nic() {
    let outer = TestDaemon::start(&[("nic", "gid=10.0.0.7")]);
    let out = run(
        Some(&outer.socket("nic")),
        &["--fabric", "verbs:vrdma0", "--check-fabric"],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("vrdma0: port 1 active")
            && stdout.contains("GID[0] 0000:0000:0000:0000:0000:ffff:0a00:0007"),
        "the report names the device, port and the VM's GID:\n{stdout}"
    );
    for step in [
        "RDMA WRITE",
        "RDMA READ",
        "SEND with immediate",
        "atomic fetch-and-add",
        "atomic compare-and-swap",
        "UD SEND",
    ] {
        assert!(stdout.contains(step), "{step} missing from:\n{stdout}");
    }
}

#[test]
fn with_no_rdma_device_the_daemon_says_so_and_exits_2() {
    for args in [
        &["--fabric", "verbs:mlx5_0", "--check-fabric"][..],
        &[
            "--fabric",
            "verbs:mlx5_0",
            "--vm",
            "name=a,socket=/nonexistent/vrdma-test/a.sock",
        ],
    ] {
        let out = run(None, args);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("no RDMA device"), "{args:?}: {stderr}");
    }
}

#[test]
fn an_unknown_device_is_refused_with_the_names_found() {
    let outer = TestDaemon::start(&[("nic", "")]);
    let out = run(
        Some(&outer.socket("nic")),
        &["--fabric", "verbs:mlx5_0", "--check-fabric"],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no RDMA device named mlx5_0: this host has vrdma0"),
        "{stderr}"
    );
}

#[test]
fn the_port_and_gid_index_are_chosen_and_checked() {
    let outer = TestDaemon::start(&[("nic", "gid=10.0.0.8")]);
    let nic = outer.socket("nic");
    let out = run(
        Some(&nic),
        &[
            "--fabric",
            "verbs:vrdma0,port=1,gid-index=0",
            "--check-fabric",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("GID[0] 0000:0000:0000:0000:0000:ffff:0a00:0008"),
        "{stdout}"
    );
    // The NIC (a vrdma device) has one port and one GID.
    for (fabric, says) in [
        ("verbs:vrdma0,port=2", "RDMA device vrdma0 has no port 2"),
        (
            "verbs:vrdma0,gid-index=5",
            "port 1 of RDMA device vrdma0 has no GID at index 5",
        ),
    ] {
        let out = run(Some(&nic), &["--fabric", fabric, "--check-fabric"]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{fabric}: {stderr}");
        assert!(stderr.contains(says), "{fabric}: {stderr}");
    }
}

#[test]
fn serving_vms_over_the_nic_is_refused_until_it_is_built() {
    let outer = TestDaemon::start(&[("nic", "")]);
    let dir = std::env::temp_dir().join(format!("vrdma-verbs-refuse-{}", std::process::id()));
    let socket = format!("name=a,socket={}", dir.join("a.sock").display());
    let out = run(
        Some(&outer.socket("nic")),
        &["--fabric", "verbs:vrdma0", "--vm", &socket],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("carrying VMs' work over it is not built yet"),
        "{stderr}"
    );
    assert!(!dir.join("a.sock").exists(), "no VM socket was made");
}
