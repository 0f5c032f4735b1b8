//! The tools as a user runs them: `vrdma-devinfo`, and the `rc_pingpong` and `first_write`
//! examples, as separate processes against a daemon running in this test process.
//!
//! `vrdma-devinfo` is a binary of this package, so cargo builds it for these tests and gives
//! its path. Examples get no such variable: `cargo test -p vrdma` and `cargo test --workspace`
//! build them (into `target/<profile>/examples/`, next to this test's `deps/` directory)
//! before any test runs, but a run limited to `--test tools` does not. The tests then fail
//! and say so, rather than run a missing or stale binary (see [`example`]).

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use vhost_user_rdma::config::{Args, Config};
use vhost_user_rdma::daemon::Daemon;
use vmm_sys_util::tempdir::TempDir;

/// How long any tool may take before the test gives up on it.
const TIMEOUT: Duration = Duration::from_secs(90);

/// An in-process daemon serving VMs on sockets in a private directory; stopped on drop.
struct TestDaemon {
    daemon: Option<Daemon>,
    dir: TempDir,
}

impl TestDaemon {
    /// One VM per entry: its name and extra `key=value` options.
    fn start(vms: &[(&str, &str)]) -> TestDaemon {
        Self::start_with(vms, &[])
    }

    /// As [`TestDaemon::start`], with more daemon options.
    fn start_with(vms: &[(&str, &str)], options: &[&str]) -> TestDaemon {
        let dir = TempDir::new_with_prefix("/tmp/vrdma-tools-").expect("temp dir");
        let mut argv = vec!["vhost-user-rdma".to_owned()];
        for (name, extra) in vms {
            let mut spec = format!(
                "name={name},socket={}",
                dir.as_path().join(format!("{name}.sock")).display()
            );
            if !extra.is_empty() {
                spec.push(',');
                spec.push_str(extra);
            }
            argv.extend(["--vm".to_owned(), spec]);
        }
        argv.extend(options.iter().map(|o| (*o).to_owned()));
        let config = Config::from_args(&Args::parse_from(argv)).expect("valid configuration");
        let daemon = Daemon::start(&config).expect("daemon starts");
        TestDaemon {
            daemon: Some(daemon),
            dir,
        }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.as_path().join(format!("{name}.sock"))
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop();
        }
    }
}

/// What a finished process printed.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Collects a pipe's text on a thread, so a full pipe never blocks the child.
fn drain(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(pipe).read_to_string(&mut s);
        s
    })
}

/// Waits for `child` (ours), killing it after `TIMEOUT`.
fn wait(mut child: Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn(program: &Path, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

/// Runs `program` to completion.
fn run(program: &Path, args: &[&str]) -> Run {
    let mut child = spawn(program, args);
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let status = wait(child, &program.display().to_string());
    Run {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn devinfo() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vrdma-devinfo"))
}

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
}

/// The example binary `name` that cargo built next to this test, checked to be at least as
/// new as its source and the library's.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/tools-HASH -> target/<profile>/examples/NAME
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let bin = profile_dir.join("examples").join(name);
    let rebuild = "build the examples first: `cargo test -p vrdma` or `cargo test --workspace` \
                   build them before running tests (a run limited with `--test tools` does not), \
                   as does `cargo build -p vrdma --examples`";
    assert!(bin.is_file(), "{} does not exist; {rebuild}", bin.display());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = vec![manifest.join("examples").join(format!("{name}.rs"))];
    files(&manifest.join("src"), &mut sources);
    files(&manifest.join("../proto/src"), &mut sources);
    let built = modified(&bin);
    for src in &sources {
        assert!(
            modified(src) <= built,
            "{} is older than {}; {rebuild}",
            bin.display(),
            src.display()
        );
    }
    bin
}

/// A TCP port nothing listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

#[test]
fn devinfo_prints_the_device_the_daemon_configured() {
    let d = TestDaemon::start(&[("vm1", "gid=10.0.0.7,max-qp=77,max-cq=33,max-srq=5")]);
    let socket = d.socket("vm1");
    let socket = socket.to_str().expect("utf-8 path");

    let r = run(&devinfo(), &["--socket", socket]);
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "", "{r:?}");
    for line in [
        "hca_id:\tvrdma0\n",
        "\ttransport:\t\t\tInfiniBand (0)\n",
        "\tfw_ver:\t\t\t\t0.0.0\n",
        "\tnode_guid:\t\t\t0256:5244:0a00:0007\n",
        "\tsys_image_guid:\t\t\t0256:5244:0a00:0007\n",
        "\tvendor_id:\t\t\t0x1af4\n",
        "\tvendor_part_id:\t\t\t42\n",
        "\thw_ver:\t\t\t\t0x1\n",
        "\tphys_port_cnt:\t\t\t1\n",
        "\t\tport:\t1\n",
        "\t\t\tstate:\t\t\tPORT_ACTIVE (4)\n",
        "\t\t\tmax_mtu:\t\t4096 (5)\n",
        "\t\t\tactive_mtu:\t\t4096 (5)\n",
        "\t\t\tport_lid:\t\t0\n",
        "\t\t\tport_lmc:\t\t0x00\n",
        "\t\t\tlink_layer:\t\tEthernet\n",
    ] {
        assert!(r.stdout.contains(line), "no {line:?} in\n{}", r.stdout);
    }
    assert!(!r.stdout.contains("max_qp"), "{}", r.stdout);
    assert!(!r.stdout.contains("GID["), "{}", r.stdout);

    let v = run(&devinfo(), &["--socket", socket, "-v"]);
    assert!(v.status.success(), "{v:?}");
    assert_eq!(v.stderr, "", "{v:?}");
    for line in [
        "\tmax_qp:\t\t\t\t77\n",
        "\tmax_cq:\t\t\t\t33\n",
        "\tmax_qp_wr:\t\t\t16384\n",
        "\tmax_srq:\t\t\t5\n",
        "\tmax_srq_wr:\t\t\t16384\n",
        "\tmax_srq_sge:\t\t\t16\n",
        "\tatomic_cap:\t\t\tATOMIC_GLOB (2)\n",
        "\t\t\tgid_tbl_len:\t\t1\n",
        "\t\t\tphys_state:\t\tLINK_UP (5)\n",
        "\t\t\tGID[  0]:\t\t::ffff:10.0.0.7, RoCE v2\n",
    ] {
        assert!(v.stdout.contains(line), "no {line:?} in\n{}", v.stdout);
    }
    // The verbose output is the plain one with lines added.
    let plain: Vec<&str> = r.stdout.lines().collect();
    let verbose: Vec<&str> = v.stdout.lines().collect();
    let mut rest = verbose.iter();
    for line in &plain {
        assert!(
            rest.any(|l| l == line),
            "{line:?} is missing or out of order in the verbose output"
        );
    }
}

#[test]
fn devinfo_without_a_daemon_says_what_to_do_in_one_line() {
    let dir = TempDir::new_with_prefix("/tmp/vrdma-tools-").expect("temp dir");
    let missing = dir.as_path().join("vm1.sock");
    let missing = missing.to_str().expect("utf-8 path");
    // A socket file nobody listens on, as a killed daemon leaves behind.
    let stale = dir.as_path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let stale = stale.to_str().expect("utf-8 path");

    for (socket, why) in [(missing, "no such socket"), (stale, "nobody is listening")] {
        let r = run(&devinfo(), &["--socket", socket]);
        assert_eq!(r.status.code(), Some(1), "{r:?}");
        assert_eq!(r.stdout, "", "{r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
        assert!(r.stderr.contains(why), "{r:?}");
        assert!(
            r.stderr.contains(&format!(
                "is vhost-user-rdma running with --vm ...,socket={socket}?"
            )),
            "{r:?}"
        );
    }

    let r = run(&devinfo(), &[]);
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("--socket"), "{r:?}");
}

/// One `rc_pingpong` summary: its four lines, parsed.
#[derive(Debug)]
struct Summary {
    local: (String, String, String),
    remote: (String, String, String),
}

/// Checks `out` is exactly the original's four lines and returns the addresses (QPN, PSN,
/// GID of each side).
fn summary(out: &str, size: u64, iters: u64) -> Summary {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "four lines expected:\n{out}");
    let address = |line: &str, prefix: &str| {
        let rest = line
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
        let fields: Vec<&str> = rest.split(", ").collect();
        let [lid, qpn, psn, gid] = fields[..] else {
            panic!("{line:?}: not LID, QPN, PSN, GID");
        };
        assert_eq!(lid, "LID 0x0000", "{line:?}");
        let hex6 = |f: &str, name: &str| {
            let v = f
                .strip_prefix(name)
                .unwrap_or_else(|| panic!("{line:?}: no {name}"));
            assert!(
                v.len() == 8 && v.starts_with("0x") && u32::from_str_radix(&v[2..], 16).is_ok(),
                "{line:?}: {name} is not 0x and six hex digits"
            );
            v.to_owned()
        };
        let gid = gid
            .strip_prefix("GID ")
            .unwrap_or_else(|| panic!("{line:?}: no GID"));
        (hex6(qpn, "QPN "), hex6(psn, "PSN "), gid.to_owned())
    };
    let local = address(lines[0], "  local address:  ");
    let remote = address(lines[1], "  remote address: ");
    let rate = |line: &str, head: &str, unit: &str| {
        let rest = line
            .strip_prefix(head)
            .unwrap_or_else(|| panic!("{line:?} does not start with {head:?}"));
        let (secs, rest) = rest
            .split_once(" seconds = ")
            .unwrap_or_else(|| panic!("{line:?}: no seconds"));
        let value = rest
            .strip_suffix(unit)
            .unwrap_or_else(|| panic!("{line:?} does not end with {unit:?}"));
        for number in [secs, value] {
            let (whole, frac) = number
                .split_once('.')
                .unwrap_or_else(|| panic!("{line:?}: {number} has no decimals"));
            assert!(
                frac.len() == 2
                    && whole.parse::<u64>().is_ok()
                    && frac.bytes().all(|b| b.is_ascii_digit()),
                "{line:?}: {number} is not printed with %.2f"
            );
        }
    };
    rate(
        lines[2],
        &format!("{} bytes in ", size * iters * 2),
        " Mbit/sec",
    );
    rate(lines[3], &format!("{iters} iters in "), " usec/iter");
    Summary { local, remote }
}

/// Runs an `rc_pingpong` server on vm1 and a client on vm2 with `opts`, checks both succeed
/// and agree on each other's addresses.
fn pingpong(opts: &[&str], size: u64, iters: u64) {
    let d = TestDaemon::start(&[("vm1", "gid=10.0.0.1"), ("vm2", "gid=10.0.0.2")]);
    pingpong_between((&d, "10.0.0.1"), (&d, "10.0.0.2"), opts, size, iters);
}

/// [`pingpong`] with the server on `server_vm.0`'s vm1 at GID `server_vm.1` and the client on
/// `client_vm.0`'s vm2 at `client_vm.1`.
fn pingpong_between(
    server_vm: (&TestDaemon, &str),
    client_vm: (&TestDaemon, &str),
    opts: &[&str],
    size: u64,
    iters: u64,
) {
    let bin = example("rc_pingpong");
    let port = free_port().to_string();
    let (s1, s2) = (server_vm.0.socket("vm1"), client_vm.0.socket("vm2"));
    let mut server_args = vec!["--socket", s1.to_str().expect("utf-8"), "-p", &port];
    server_args.extend(opts);
    let mut server = spawn(&bin, &server_args);
    let server_err = drain(server.stderr.take().expect("stderr"));
    // The server prints its address once it listens: then the client may connect.
    let (tx, rx) = mpsc::channel();
    let stdout = server.stdout.take().expect("stdout");
    let server_out = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            let _ = tx.send(());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = server.kill();
        let _ = server.wait();
        panic!(
            "the server printed nothing within 30 s: {}",
            server_err.join().unwrap_or_default()
        );
    }

    let mut client_args = vec!["--socket", s2.to_str().expect("utf-8"), "-p", &port];
    client_args.extend(opts);
    client_args.push("127.0.0.1");
    let client = run(&bin, &client_args);
    let server_status = wait(server, "the rc_pingpong server");
    let server_out = server_out.join().expect("server stdout");
    let server_err = server_err.join().expect("server stderr");
    assert!(
        client.status.success() && server_status.success(),
        "client: {client:?}\nserver: {server_status:?}\n{server_out}{server_err}"
    );
    assert_eq!(client.stderr, "");
    assert_eq!(server_err, "");
    let c = summary(&client.stdout, size, iters);
    let s = summary(&server_out, size, iters);
    assert_eq!(s.local.2, format!("::ffff:{}", server_vm.1));
    assert_eq!(c.local.2, format!("::ffff:{}", client_vm.1));
    assert_eq!(
        c.remote, s.local,
        "the client got the server's address wrong"
    );
    assert_eq!(
        s.remote, c.local,
        "the server got the client's address wrong"
    );
}

#[test]
fn rc_pingpong_ping_pongs_between_two_vms() {
    pingpong(&["-n", "300"], 4096, 300);
}

#[test]
fn rc_pingpong_between_two_daemons_over_roce() {
    // Two hosts' daemons on loopback addresses, talking RoCEv2: the tool needs nothing new.
    let d1 = TestDaemon::start_with(&[("vm1", "gid=127.0.12.1")], &["--roce"]);
    let d2 = TestDaemon::start_with(&[("vm2", "gid=127.0.12.2")], &["--roce"]);
    pingpong_between(
        (&d1, "127.0.12.1"),
        (&d2, "127.0.12.2"),
        &["-n", "300", "-m", "1024"],
        4096,
        300,
    );
}

#[test]
fn rc_pingpong_with_events_and_odd_sizes() {
    pingpong(
        &["-e", "-s", "1000", "-n", "100", "-r", "3", "-m", "4096"],
        1000,
        100,
    );
}

#[test]
fn rc_pingpong_client_without_server_fails() {
    let d = TestDaemon::start(&[("vm1", "")]);
    let socket = d.socket("vm1");
    let port = free_port().to_string();
    let r = run(
        &example("rc_pingpong"),
        &[
            "--socket",
            socket.to_str().expect("utf-8"),
            "-p",
            &port,
            "127.0.0.1",
        ],
    );
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("couldn't connect to 127.0.0.1:{port}")),
        "{r:?}"
    );
}

#[test]
fn first_write_writes_between_two_vms() {
    let d = TestDaemon::start(&[("vm1", ""), ("vm2", "")]);
    let bin = example("first_write");
    let (s1, s2) = (d.socket("vm1"), d.socket("vm2"));
    let r = run(
        &bin,
        &[s1.to_str().expect("utf-8"), s2.to_str().expect("utf-8")],
    );
    assert!(r.status.success(), "{r:?}");
    assert_eq!(r.stderr, "");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{r:?}");
    assert!(
        lines[0].starts_with("vm1 (QPN 0x") && lines[0].contains("wrote 48 bytes"),
        "{r:?}"
    );
    assert_eq!(lines[1], "Hello, vm2! This arrived by RDMA WRITE from vm1.");

    let usage = run(&bin, &[s1.to_str().expect("utf-8")]);
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
}

/// docs/guide.md shows examples/first_write.rs in full; they must not drift apart.
#[test]
fn the_guide_shows_first_write_as_it_is() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(manifest.join("../docs/guide.md")).expect("guide");
    let file = std::fs::read_to_string(manifest.join("examples/first_write.rs")).expect("example");
    let marker = "guest-lib/examples/first_write.rs";
    let at = guide
        .find(&format!("<!-- {marker} -->"))
        .expect("the guide marks where the example starts");
    let block = &guide[at..];
    let start = block
        .find("```rust\n")
        .expect("a rust block after the marker")
        + 8;
    let end = block[start..].find("\n```\n").expect("the block ends") + start + 1;
    assert!(
        block[start..end] == file,
        "docs/guide.md's copy of {marker} differs from the file: copy the file into the guide"
    );
}
