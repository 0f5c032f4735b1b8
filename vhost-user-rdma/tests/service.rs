//! The daemon as a service runs it: the systemd unit and its example configuration, per-VM
//! socket owner, group and mode, a socket directory that does not exist yet, and the log lines
//! a guest's connection leaves in the journal.
//!
//! Requires `systemd-analyze` (Debian: `apt-get install systemd`; tests/run installs it);
//! fails if it is missing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use vhost::VhostBackend;
use vhost::vhost_user::Frontend;
use vhost_user_rdma::config::{Args, Config};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-rdma");
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/systemd/vhost-user-rdma.service"
);
const CONF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/systemd/vhost-user-rdma.conf"
);
/// Where the unit runs the daemon from: `cargo install --root /usr/local` puts it there.
const INSTALLED: &str = "/usr/local/bin/vhost-user-rdma";

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vrdma-service-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The daemon binary with its log (stderr, at info level) collected as it is written.
struct Daemon {
    child: Child,
    log: Arc<(Mutex<String>, Condvar)>,
}

impl Daemon {
    fn start(vm: &str) -> Daemon {
        // The systemd unit's umask: directories the daemon makes must not inherit it.
        let mut child = Command::new("sh")
            .args(["-c", "umask 077 && exec \"$0\" \"$@\"", BIN])
            .args(["--vm", vm, "--log-level", "info"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let shared = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (text, grown) = &*shared;
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
                grown.notify_all();
            }
        });
        Daemon { child, log }
    }

    /// Waits until `needle` occurs `times` times in the log; returns the log.
    fn wait_for_log(&self, needle: &str, times: usize) -> String {
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
        text.clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unit passes `systemd-analyze verify` (run on a copy whose ExecStart is the binary just
/// built, as verify insists the program exists), and it runs the daemon from where
/// `cargo install --root /usr/local` puts it.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let exec = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("the unit has an ExecStart");
    assert_eq!(
        exec,
        format!(
            "ExecStart={INSTALLED} --control-socket {} $VRDMA_ARGS",
            vhost_user_rdma::manage::DEFAULT_SOCKET
        ),
        "README.md's install command puts the daemon at {INSTALLED}, and vrdmactl looks for \
         the management socket at manage::DEFAULT_SOCKET"
    );
    let dir = temp_dir("unit");
    let copy = dir.join("vhost-user-rdma.service");
    std::fs::write(&copy, unit.replace(INSTALLED, BIN)).unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("systemd-analyze is not installed; this test needs it (apt-get install systemd)")
        }
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // verify also warns without failing (unknown keys in some versions): the unit has none.
    assert!(
        !said.contains("vhost-user-rdma.service"),
        "systemd-analyze verify has something to say about the unit: {said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The example configuration's VRDMA_ARGS is a command line the daemon takes, once its group
/// exists (`kvm` need not on a test machine).
#[test]
fn the_example_configuration_parses() {
    let conf = std::fs::read_to_string(CONF).unwrap();
    let args = conf
        .lines()
        .find_map(|l| l.strip_prefix("VRDMA_ARGS="))
        .expect("the configuration sets VRDMA_ARGS");
    let gid = nix::unistd::getgid().as_raw().to_string();
    let argv = std::iter::once("vhost-user-rdma".to_owned()).chain(
        args.split_whitespace()
            .map(|a| a.replace("group=kvm", &format!("group={gid}"))),
    );
    let config = Config::from_args(&Args::parse_from(argv)).unwrap();
    assert_eq!(config.vms.len(), 2);
    assert!(config.vms[0].socket.starts_with("/run/vrdma"));
    assert_eq!(config.vms[0].socket_access.mode, Some(0o660));
}

/// owner=, group= and mode= are on the socket as soon as it is listening, and a directory that
/// did not exist is made (0755, less the umask) for it.
#[test]
fn a_socket_gets_its_owner_group_and_mode_in_a_new_directory() {
    let dir = temp_dir("access");
    let socket = dir.join("not/yet/vm.sock");
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let daemon = Daemon::start(&format!(
        "name=a,socket={},owner={uid},group={gid},mode=0600",
        socket.display()
    ));
    daemon.wait_for_log("vm a: listening on", 1);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    // Both directories made are 0755 whatever the umask, so VMMs of other users reach the
    // socket; the one that existed is left alone.
    for made in [dir.join("not"), dir.join("not/yet")] {
        let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{}: {mode:o}", made.display());
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A user, group or mode the host does not have is refused before anything is served, with
/// the value named, and exit code 2 as for any bad option.
#[test]
fn an_unknown_user_or_group_or_a_bad_mode_is_refused_by_name() {
    let dir = temp_dir("refused");
    let socket = dir.join("vm.sock");
    for (key, says) in [
        ("owner=no-such-user-vrdma", "no such user"),
        ("group=no-such-group-vrdma", "no such group"),
        ("mode=0999", "octal"),
        ("mode=4755", "at most 0777"),
    ] {
        let out = Command::new(BIN)
            .args(["--vm", &format!("name=a,socket={},{key}", socket.display())])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        let value = key.split_once('=').unwrap().1;
        assert!(
            stderr.contains(value) && stderr.contains(says),
            "{key}: {stderr:?} should name {value:?} and say {says:?}"
        );
        assert!(!socket.exists(), "{key}: a socket was made");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that goes away between messages leaves one info line, "frontend disconnected",
/// not the library's "failed to handle request"; a frontend that breaks the protocol still
/// has its error logged.
#[test]
fn a_guest_leaving_logs_one_clean_line_and_a_broken_frontend_its_error() {
    let dir = temp_dir("log");
    let socket = dir.join("vm.sock");
    let daemon = Daemon::start(&format!("name=a,socket={}", socket.display()));
    daemon.wait_for_log("vm a: waiting for a frontend", 1);

    let frontend = Frontend::connect(&socket, 3).unwrap();
    frontend.set_owner().unwrap();
    frontend.get_features().unwrap();
    drop(frontend);
    let log = daemon.wait_for_log("vm a: waiting for a frontend", 2);
    let ended = &log[log.find("vm a: frontend connected").expect("connected")..];
    assert_eq!(
        ended.matches("vm a: frontend disconnected").count(),
        1,
        "{log}"
    );
    assert!(!ended.contains("failed to handle request"), "{log}");
    assert!(!ended.contains("WARN") && !ended.contains("ERROR"), "{log}");

    // A message header of a request no vhost-user version defines.
    let mut broken = UnixStream::connect(&socket).unwrap();
    let mut header = Vec::new();
    header.extend_from_slice(&9999u32.to_le_bytes()); // request
    header.extend_from_slice(&1u32.to_le_bytes()); // flags: version 1
    header.extend_from_slice(&0u32.to_le_bytes()); // size
    broken.write_all(&header).unwrap();
    let log = daemon.wait_for_log("vm a: waiting for a frontend", 3);
    assert!(
        log.contains("vm a: connection ended by an error: "),
        "{log}"
    );
    drop(broken);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--print-capabilities` is the JSON object QEMU's schema gives a backend type without
/// features of its own: `type` alone. The type is "rdma", which the schema does not list yet
/// (README.md says why no listed type is printed instead).
#[test]
fn print_capabilities_is_a_type_alone() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps, serde_json::json!({ "type": "rdma" }));
}
