//! The daemon binary as an operator runs it: argument errors, capabilities, sockets, and a
//! clean shutdown on SIGTERM and SIGINT.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-rdma");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vrdma-cli-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The daemon binary with its log (stderr, at info level) collected by a thread as it is
/// written. Tests wait for log lines rather than probing the sockets: a probe connection is a
/// frontend the daemon accepts and serves, and what the daemon then reports (or is doing when
/// a signal arrives) would depend on when it notices the probe close.
struct Daemon {
    child: Child,
    log: Arc<(Mutex<String>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(args: &[String]) -> Daemon {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--log-level", "info"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let shared = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (text, grown) = &*shared;
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
                grown.notify_all();
            }
        });
        Daemon {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// Waits until `needle` occurs `times` times in the log.
    fn wait_for_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (text, grown) = &*self.log;
        let mut text = text.lock().unwrap();
        while text.matches(needle).count() < times {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {needle:?} in the log:\n{text}"
            );
            text = grown.wait_timeout(text, left).unwrap().0;
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the daemon to exit; returns its status and its whole log.
    fn wait(mut self, what: &str) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "daemon did not stop on {what}");
            std::thread::sleep(Duration::from_millis(10));
        };
        // The reader ends at end of file, once the daemon has exited: the log is complete.
        self.reader.take().unwrap().join().unwrap();
        let log = self.log.0.lock().unwrap().clone();
        (status, log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed assertion must not leave a daemon running.
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
    let daemon = Daemon::start(&[
        "--vm".into(),
        format!("name=a,socket={}", a.display()),
        "--vm".into(),
        format!("name=b,socket={}", b.display()),
    ]);
    daemon.wait_for_log("vm a: listening on", 1);
    daemon.wait_for_log("vm b: listening on", 1);
    // A second daemon on the same socket is refused instead of stealing it.
    let busy = Command::new(BIN)
        .args(["--vm", &format!("name=x,socket={}", a.display())])
        .output()
        .unwrap();
    assert_eq!(
        busy.status.code(),
        Some(2),
        "a socket in use is the operator's to fix"
    );
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "{busy:?}"
    );
    assert!(
        UnixStream::connect(&a).is_ok(),
        "the first daemon still serves"
    );

    daemon.signal(signal);
    let (exit, log) = daemon.wait(&format!("SIG{signal}"));
    assert!(exit.success(), "{exit:?}\n{log}");
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
    let daemon = Daemon::start(&[
        "--vm".into(),
        format!("name=a,socket={},gid=127.0.14.1", a.display()),
        "--roce".into(),
    ]);
    // No frontend has ever connected, so the counters line must say so.
    daemon.wait_for_log("vm a: listening on", 1);
    daemon.signal("USR1");
    // The fabric's line comes after every VM's in the same report: once it is there, the
    // whole report is.
    daemon.wait_for_log("RoCEv2 127.0.14.1:4791: rx ", 1);
    assert!(
        UnixStream::connect(&a).is_ok(),
        "still serving after SIGUSR1"
    );
    daemon.signal("TERM");
    let (exit, log) = daemon.wait("SIGTERM");
    assert!(exit.success(), "{exit:?}\n{log}");
    // Once for SIGUSR1, once more at shutdown for the fabric.
    let vm_lines = log.matches("vm a: no guest connected").count();
    let fabric_lines = log.matches("RoCEv2 127.0.14.1:4791: rx 0 tx 0").count();
    assert_eq!((vm_lines, fabric_lines), (1, 2), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

const CTL: &str = env!("CARGO_BIN_EXE_vrdmactl");

/// Runs `vrdmactl --socket SOCKET ARGS`; returns its exit code, stdout and stderr.
fn vrdmactl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(CTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("VRDMACTL_SOCKET")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vrdmactl_lists_adds_changes_drains_and_removes_vms_of_a_running_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("ctl");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    // The management socket's directory does not exist yet: the daemon makes it.
    let control = dir.join("run").join("control.sock");
    let daemon = Daemon::start(&[
        "--vm".into(),
        format!("name=a,socket={}", a.display()),
        "--control-socket".into(),
        control.display().to_string(),
    ]);
    daemon.wait_for_log("vm a: listening on", 1);
    daemon.wait_for_log("management socket: listening on", 1);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the daemon's user may manage it");

    let (code, out, err) = vrdmactl(&control, &["list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("vm a: no guest\n"), "{out}");
    assert!(out.contains("weight 1, max-bw none"), "{out}");

    let (code, _, err) = vrdmactl(
        &control,
        &["add", &format!("name=b,socket={},weight=4", b.display())],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(b.exists(), "b's socket is there when add returns");
    let (code, _, err) = vrdmactl(&control, &["set", "b", "weight=2", "max-bw=1G"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = vrdmactl(&control, &["--json", "list", "b"]);
    assert_eq!(code, Some(0));
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["vms"][0]["name"], "b");
    assert_eq!(answer["vms"][0]["weight"], 2);
    assert_eq!(answer["vms"][0]["max_bw"], 1u64 << 30);

    // Refusals exit 1 with the daemon's reason; an unreachable daemon exits 2.
    let (code, _, err) = vrdmactl(&control, &["set", "nosuch", "weight=2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no VM called \"nosuch\""), "{err}");
    let (code, _, err) = vrdmactl(&control, &["set", "a", "weight=0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("weight=\"0\" is invalid"), "{err}");
    let (code, _, err) = vrdmactl(&control, &["set", "a", "colour=blue"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown key \"colour\""), "{err}");
    // --socket may come after the command too.
    let after = Command::new(CTL)
        .args(["list", "a", "--socket"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(after.status.success(), "{after:?}");
    assert!(String::from_utf8_lossy(&after.stdout).starts_with("vm a: "));
    let (code, _, err) = vrdmactl(&dir.join("nothing.sock"), &["list"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot reach the daemon"), "{err}");

    let (code, out, err) = vrdmactl(&control, &["drain", "a", "--wait"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("vm a: drained\n"), "{out}");
    let (code, _, _) = vrdmactl(&control, &["resume", "a"]);
    assert_eq!(code, Some(0));
    let (code, _, _) = vrdmactl(&control, &["remove", "b"]);
    assert_eq!(code, Some(0));
    assert!(!b.exists(), "b's socket is removed");
    let (code, _, _) = vrdmactl(&control, &["reset"]);
    assert_eq!(code, Some(0));

    // A second daemon on the same management socket is refused before it serves anything.
    let busy = Command::new(BIN)
        .args([
            "--vm",
            &format!("name=x,socket={}", dir.join("x.sock").display()),
        ])
        .arg("--control-socket")
        .arg(&control)
        .output()
        .unwrap();
    assert_eq!(busy.status.code(), Some(2), "{busy:?}");
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use by another daemon"));
    assert!(!dir.join("x.sock").exists());

    daemon.signal("TERM");
    let (exit, log) = daemon.wait("SIGTERM");
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(!control.exists(), "the management socket is removed");
    assert!(!a.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vrdmactl_add_is_refused_with_roce() {
    let dir = temp_dir("ctl-roce");
    let control = dir.join("control.sock");
    let daemon = Daemon::start(&[
        "--vm".into(),
        format!(
            "name=a,socket={},gid=127.0.14.2",
            dir.join("a.sock").display()
        ),
        "--roce".into(),
        "--control-socket".into(),
        control.display().to_string(),
    ]);
    daemon.wait_for_log("management socket: listening on", 1);
    let b = dir.join("b.sock");
    let (code, _, err) = vrdmactl(
        &control,
        &[
            "add",
            &format!("name=b,socket={},gid=127.0.14.3", b.display()),
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("--roce") && err.contains("restart"), "{err}");
    assert!(!b.exists());
    daemon.signal("TERM");
    let (exit, log) = daemon.wait("SIGTERM");
    assert!(exit.success(), "{exit:?}\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
