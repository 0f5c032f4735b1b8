//! The daemon binary as an operator runs it: argument errors, capabilities, sockets, and a
//! clean shutdown on SIGTERM and SIGINT.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-rdma");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vrdma-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_arguments_give_one_line_and_exit_code_2() {
    for args in [
        vec!["--vm", "name=a"],
        vec!["--vm", "name=a,socket=/tmp/x.sock,weight=0"],
        vec![
            "--vm",
            "name=a,socket=/tmp/x.sock",
            "--fabric",
            "carrier-pigeon",
        ],
        vec![],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(stderr.starts_with("vhost-user-rdma: "), "{stderr:?}");
    }
}

#[test]
fn print_capabilities_is_json_with_a_type() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.trim_start().starts_with('{') && text.trim_end().ends_with('}'),
        "{text}"
    );
    assert!(text.contains("\"type\": \"rdma\""), "{text}");
}

fn serve_and_stop(signal: &str) {
    let dir = temp_dir(signal);
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut child = Command::new(BIN)
        .args(["--vm", &format!("name=a,socket={}", a.display())])
        .args(["--vm", &format!("name=b,socket={}", b.display())])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("both sockets", || {
        UnixStream::connect(&a).is_ok() && UnixStream::connect(&b).is_ok()
    });
    // A second daemon on the same socket is refused instead of stealing it.
    let busy = Command::new(BIN)
        .args(["--vm", &format!("name=x,socket={}", a.display())])
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "{busy:?}"
    );
    assert!(
        UnixStream::connect(&a).is_ok(),
        "the first daemon still serves"
    );

    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not stop on SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        !Path::new(&a).exists() && !Path::new(&b).exists(),
        "sockets must be removed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_sockets() {
    serve_and_stop("TERM");
}

#[test]
fn sigint_stops_cleanly_and_removes_the_sockets() {
    serve_and_stop("INT");
}

#[test]
fn sigusr1_logs_the_counters_and_keeps_serving() {
    let dir = temp_dir("usr1");
    let a = dir.join("a.sock");
    let child = Command::new(BIN)
        .args([
            "--vm",
            &format!("name=a,socket={},gid=127.0.14.1", a.display()),
        ])
        .args(["--roce", "--log-level", "info"])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the socket", || UnixStream::connect(&a).is_ok());
    let kill = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    kill("-USR1");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        UnixStream::connect(&a).is_ok(),
        "still serving after SIGUSR1"
    );
    kill("-TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    // Once for SIGUSR1, once more at shutdown for the fabric.
    let vm_lines = log.matches("vm a: no guest connected").count();
    let fabric_lines = log.matches("RoCEv2 127.0.14.1:4791: rx 0 tx 0").count();
    assert_eq!((vm_lines, fabric_lines), (1, 2), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
