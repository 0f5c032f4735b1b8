//! C programs compiled with `cc ... -libverbs` against the system's verbs.h and run with the
//! shim preloaded over two VMs of one daemon: the example of docs/guide.md, and a program that
//! checks verbs semantics as a C application sees them (through verbs.h's inline functions).

mod common;

use std::path::Path;
use std::process::Command;

use common::{Pair, spawn_with_devices};

/// Compiles `source` (relative to the crate) and runs it over two VMs; returns its stdout.
fn compile_and_run(source: &str) -> String {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(source);
    let name = source
        .file_stem()
        .expect("a file name")
        .to_string_lossy()
        .into_owned();
    let dir = std::env::temp_dir().join(format!("vrdma-c-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let exe = dir.join(&name);
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&source)
        .arg("-libverbs")
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc {} failed (it needs libibverbs-dev, which tests/run installs):\n{}",
        source.display(),
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
    assert!(out.success, "{out}");
    out.stdout
}

#[test]
fn the_c_example_builds_against_verbs_h_and_runs_over_vrdma() {
    assert_eq!(compile_and_run("examples/rdma_write.c"), "rdma_write: ok\n");
}

/// errno conventions, completion channels (poll, EAGAIN, EINTR), asynchronous events, EBUSY,
/// bad_wr and address handles from a UD completion: see the program's checks.
#[test]
fn verbs_semantics_hold_as_a_c_program_sees_them() {
    assert_eq!(
        compile_and_run("tests/c/verbs_semantics.c"),
        "verbs_semantics: ok\n"
    );
}
