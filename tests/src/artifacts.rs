//! Programs and libraries the tests run but `cargo test` does not build: a cdylib (the
//! libibverbs shim) or a binary with other features (the daemon with `verbs`).
//!
//! Each is built by `cargo build` into a target directory of its own next to the test's (no
//! waiting on the lock of the build that runs the tests), once per test binary; cargo's own
//! freshness check makes later builds instant.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds with `cargo build --quiet ARGS --manifest-path MANIFEST` into `target/<dir>` and
/// returns `debug/<artifact>` there. Panics with cargo's output if the build fails.
pub fn build(manifest: &Path, args: &[&str], dir: &str, artifact: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/TEST-HASH -> target/
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test runs from target/<profile>/deps")
        .join(dir);
    let out = Command::new(env!("CARGO"))
        .args(["build", "--quiet"])
        .args(args)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target)
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build of {} failed:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let built = target.join("debug").join(artifact);
    assert!(built.is_file(), "cargo built no {}", built.display());
    built
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
}

/// The libibverbs shim, `libvrdma_ibverbs.so`.
pub fn shim() -> PathBuf {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        build(
            &workspace().join("ibverbs/Cargo.toml"),
            &["--lib"],
            "shim-for-tests",
            "libvrdma_ibverbs.so",
        )
    })
    .clone()
}

/// The daemon built with the `verbs` feature (libibverbs-dev and libclang-dev installed).
pub fn verbs_daemon() -> PathBuf {
    static DAEMON: OnceLock<PathBuf> = OnceLock::new();
    DAEMON
        .get_or_init(|| {
            build(
                &workspace().join("vhost-user-rdma/Cargo.toml"),
                &["--bin", "vhost-user-rdma", "--features", "verbs"],
                "verbs-for-tests",
                "vhost-user-rdma",
            )
        })
        .clone()
}
