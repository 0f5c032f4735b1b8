//! Running unmodified verbs programs (Debian's perftest, qperf and ibverbs-utils) with the
//! shim preloaded, against VMs of an in-process daemon: one VM per side, each program seeing
//! only its own VM's socket as `vrdma0`.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vrdma_tests::TestDaemon;

/// How long one program may run before the test kills it and fails: far more than any
/// takes, so that only a hang ends it.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The shim, built for these tests (`cargo test` builds a library's rlib but not its cdylib).
pub fn shim() -> PathBuf {
    vrdma_tests::artifacts::shim()
}

/// Fails the test with the package to install when a program is missing.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: apt-get install {package} (tests/run installs it)"
    );
}

/// What a program printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub what: String,
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts a clean run: exit status 0 and no error lines (the shim logs warnings to
    /// stderr; the programs print "Couldn't ...", "Failed ..." or "error" when something
    /// goes wrong).
    pub fn assert_clean(&self) -> &Self {
        assert!(self.success, "{self}");
        for line in self.stdout.lines().chain(self.stderr.lines()) {
            let l = line.to_ascii_lowercase();
            assert!(
                !(l.contains("error")
                    || l.contains("couldn't")
                    || l.contains("failed")
                    || l.contains("warn")
                    || l.contains("unable")),
                "error line {line:?} in {self}"
            );
        }
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (success: {})\n--- stdout\n{}--- stderr\n{}",
            self.what, self.success, self.stdout, self.stderr
        )
    }
}

/// A program started with the shim preloaded and `socket` as its only device.
pub struct Running {
    what: String,
    child: Child,
}

pub fn spawn(socket: &Path, program: &str, args: &[&str]) -> Running {
    spawn_with_devices(&[socket], program, args)
}

/// A program started with the shim preloaded and `sockets` as its devices, `vrdma0` first.
pub fn spawn_with_devices(sockets: &[&Path], program: &str, args: &[&str]) -> Running {
    let child = Command::new(program)
        .args(args)
        .env("LD_PRELOAD", shim())
        .env(
            "VRDMA_SOCKETS",
            std::env::join_paths(sockets).expect("socket paths without ':'"),
        )
        .env_remove("VRDMA_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Running {
        what: format!("{program} {}", args.join(" ")),
        child,
    }
}

impl Running {
    /// Waits for the program to end (killing it after [`RUN_LIMIT`]).
    pub fn wait(mut self) -> Output {
        let deadline = Instant::now() + RUN_LIMIT;
        let mut timed_out = false;
        loop {
            match self.child.try_wait().expect("wait for the program") {
                Some(_) => break,
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    timed_out = true;
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        self.collect(timed_out)
    }

    /// Stops a server that runs until killed (qperf) and returns its output.
    pub fn stop(self) -> Output {
        // SAFETY: sending SIGTERM to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.collect(false)
    }

    fn collect(mut self, timed_out: bool) -> Output {
        let status = self.child.wait().expect("wait for the program");
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut stdout);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        if timed_out {
            stderr.push_str(&format!("(killed after {RUN_LIMIT:?})\n"));
        }
        Output {
            what: self.what,
            success: status.success() && !timed_out,
            stdout,
            stderr,
        }
    }
}

/// Waits until something listens on TCP `port` (read from /proc/net/tcp, so that no probing
/// connection uses up a server that accepts once), or the server has exited.
pub fn wait_listening(server: &mut Running, port: u16) {
    let deadline = Instant::now() + RUN_LIMIT;
    let needle = format!(":{port:04X} ");
    loop {
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3
                        && format!("{} ", &cols[1][cols[1].len() - 5..]) == needle
                        && cols[3] == "0A"
                })
            })
        });
        if listening {
            return;
        }
        if let Ok(Some(_)) = server.child.try_wait() {
            return; // It ended early: its output says why, and the test reports it.
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened on port {port}",
            server.what
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static PAIRS: Mutex<()> = Mutex::new(());
    // A test that failed while holding it poisoned it; the next one can still run.
    PAIRS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Two VMs to run a server and a client on: on one daemon, or on two daemons that reach
/// each other with RoCEv2 over loopback addresses.
pub struct Pair {
    /// One pair at a time: each program busy-polls its CQ, and two pairs' four spinning
    /// processes on a two-CPU machine would make every latency a scheduler time slice.
    _one_at_a_time: MutexGuard<'static, ()>,
    daemons: Vec<TestDaemon>,
    pub server: PathBuf,
    pub client: PathBuf,
}

impl Pair {
    /// Two VMs of one daemon.
    pub fn one_daemon() -> Pair {
        Pair::one_daemon_with("", "")
    }

    /// Two VMs of one daemon, with extra `--vm` keys for each.
    pub fn one_daemon_with(server_keys: &str, client_keys: &str) -> Pair {
        let serial = one_at_a_time();
        let d = TestDaemon::start(&[("server", server_keys), ("client", client_keys)]);
        Pair {
            _one_at_a_time: serial,
            server: d.socket("server"),
            client: d.socket("client"),
            daemons: vec![d],
        }
    }

    /// Two daemons, each with one VM, at `127.0.X.1` and `127.0.X.2` (`x` unique per test).
    pub fn two_daemons(x: u8) -> Pair {
        let serial = one_at_a_time();
        let s = TestDaemon::start_with(&[("server", &format!("gid=127.0.{x}.1"))], &["--roce"]);
        let c = TestDaemon::start_with(&[("client", &format!("gid=127.0.{x}.2"))], &["--roce"]);
        Pair {
            _one_at_a_time: serial,
            server: s.socket("server"),
            client: c.socket("client"),
            daemons: vec![s, c],
        }
    }

    /// The payload bytes VM `name`'s QPs moved in each priority class (latency, normal, bulk),
    /// as its daemon counts them.
    pub fn bytes_by_class(&self, name: &str) -> [u64; 3] {
        let status = self
            .daemons
            .iter()
            .find_map(|d| d.daemon().status(Some(name)).ok())
            .unwrap_or_else(|| panic!("no VM {name}"));
        status[0].bytes_by_class
    }

    /// Runs a server and then its client (which connects to 127.0.0.1 on `port`), and
    /// returns both outputs.
    pub fn run(
        &self,
        port: u16,
        program: &str,
        server_args: &[&str],
        client_args: &[&str],
    ) -> (Output, Output) {
        let mut server = spawn(&self.server, program, server_args);
        wait_listening(&mut server, port);
        let client = spawn(&self.client, program, client_args).wait();
        let server = server.wait();
        (server, client)
    }
}

/// The data rows of a perftest report: the lines of numbers after its `#bytes` header.
pub fn perftest_rows(out: &Output) -> Vec<Vec<f64>> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in out.stdout.lines() {
        let t = line.trim();
        if t.starts_with("#bytes") {
            in_table = true;
            continue;
        }
        if !in_table || t.is_empty() || t.starts_with('-') {
            continue;
        }
        let nums: Option<Vec<f64>> = t.split_whitespace().map(|w| w.parse().ok()).collect();
        if let Some(nums) = nums {
            rows.push(nums);
        }
    }
    rows
}

/// Checks a perftest bandwidth report: `sizes` rows, each with a positive message rate (a
/// few small messages can print a bandwidth of 0.00 MB/s; the rate has more digits).
pub fn assert_bw_report(out: &Output, sizes: usize) {
    let rows = perftest_rows(out);
    assert_eq!(rows.len(), sizes, "{sizes} rows expected in {out}");
    for r in &rows {
        // #bytes #iterations BW-peak BW-average MsgRate
        assert!(
            r.len() >= 5 && r[1] > 0.0 && r[3] >= 0.0 && r[4] > 0.0,
            "row {r:?} in {out}"
        );
    }
}

/// Checks a perftest latency report: `sizes` rows, each with a positive typical latency.
pub fn assert_lat_report(out: &Output, sizes: usize) {
    let rows = perftest_rows(out);
    assert_eq!(rows.len(), sizes, "{sizes} rows expected in {out}");
    for r in &rows {
        // #bytes #iterations t_min t_max t_typical t_avg t_stdev p99 p99.9
        assert!(
            r.len() >= 6 && r[2] > 0.0 && r[4] >= r[2],
            "row {r:?} in {out}"
        );
    }
}
