//! The C example, `examples/rdma_write.c`: compiled with `cc ... -libverbs` against the
//! system's verbs.h, run with the shim preloaded over two VMs of one daemon.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Pair, spawn_with_devices};

#[test]
fn the_c_example_builds_against_verbs_h_and_runs_over_vrdma() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/rdma_write.c");
    let dir = std::env::temp_dir().join(format!("vrdma-c-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let exe = dir.join("rdma_write");
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&source)
        .arg("-libverbs")
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc failed (the example needs libibverbs-dev, which tests/run installs):\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let pair = Pair::one_daemon();
    let out = spawn_with_devices(
        &[&pair.server, &pair.client],
        exe.to_str().expect("utf-8 path"),
        &[],
    )
    .wait();
    let _ = std::fs::remove_dir_all(&dir);
    out.assert_clean();
    assert_eq!(out.stdout, "rdma_write: ok\n", "{out}");
}
