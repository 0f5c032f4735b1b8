//! `vrdma-demo` without a subcommand: starts the daemon and two guests as separate processes
//! (this same binary, re-executed), relays the client's tables, and cleans everything up.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

/// How long the daemon has to accept connections on both sockets.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon has to stop after SIGTERM (it gives each VM up to 5 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(12);
/// How long the server guest has to exit once the client is done.
const SERVER_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Message sizes the client measures (3 + 3 + 4 + 3).
const SIZES: u32 = 13;

type Res<T> = Result<T, String>;

/// Runs the whole demo.
pub fn run(ms_per_size: u64) -> ExitCode {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // A second signal while cleaning up ends the demo at once.
        let registered =
            signal_hook::flag::register_conditional_shutdown(sig, 130, interrupted.clone())
                .and_then(|_| signal_hook::flag::register(sig, interrupted.clone()));
        if let Err(e) = registered {
            eprintln!("vrdma-demo: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    }
    let started = Instant::now();
    match demo(ms_per_size, &interrupted) {
        Ok(()) => {
            say(&format!(
                "done in {:.1} s: every test passed with its data verified; daemon stopped, \
                 sockets and temporary directory removed",
                started.elapsed().as_secs_f64()
            ));
            ExitCode::SUCCESS
        }
        Err(_) if interrupted.load(Ordering::SeqCst) => {
            eprintln!("vrdma-demo: interrupted; stopped every process and cleaned up");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("vrdma-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "vrdma-demo: {line}");
    let _ = out.flush();
}

fn demo(ms_per_size: u64, interrupted: &AtomicBool) -> Res<()> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this program's own path to start the daemon: {e}"))?;
    // Dropped last: guests first, then the daemon, then the directory.
    let dir = TempDir::new()?;
    let sockets = [dir.path().join("vm1.sock"), dir.path().join("vm2.sock")];
    if sockets[0].as_os_str().len() > 100 {
        return Err(format!(
            "the temporary directory {} is too long a path for a Unix socket; set TMPDIR to a \
             shorter directory such as /tmp",
            dir.path().display()
        ));
    }
    // A free port for the guests' TCP exchange, as perftest uses one.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free TCP port on 127.0.0.1: {e}"))?
        .port();

    let log_path = dir.path().join("daemon.log");
    let log = File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let mut daemon_cmd = Command::new(&exe);
    daemon_cmd
        .arg("daemon")
        .arg("--vm")
        .arg(format!(
            "name=vm1,socket={},gid=10.0.0.1",
            sockets[0].display()
        ))
        .arg("--vm")
        .arg(format!(
            "name=vm2,socket={},gid=10.0.0.2",
            sockets[1].display()
        ))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let mut daemon = Proc::spawn("daemon", &mut daemon_cmd, libc::SIGTERM)?;
    wait_for_sockets(&mut daemon, &sockets, &log_path, interrupted)?;
    say(&format!(
        "daemon (pid {}) serves vm1 (GID 10.0.0.1) on {} and vm2 (GID 10.0.0.2) on {}",
        daemon.id(),
        sockets[0].display(),
        sockets[1].display()
    ));

    let mut server_cmd = Command::new(&exe);
    server_cmd
        .arg("guest")
        .arg("--socket")
        .arg(&sockets[1])
        .arg("--server")
        .arg("--port")
        .arg(port.to_string())
        .stdin(Stdio::null());
    let mut server = Proc::spawn("server guest", &mut server_cmd, libc::SIGKILL)?;
    let mut client_cmd = Command::new(&exe);
    client_cmd
        .arg("guest")
        .arg("--socket")
        .arg(&sockets[0])
        .arg("--connect")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ms-per-size")
        .arg(ms_per_size.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut client = Proc::spawn("client guest", &mut client_cmd, libc::SIGKILL)?;
    say(&format!(
        "guests: server on vm2 (pid {}), client on vm1 (pid {}); they exchange QP numbers, GIDs, \
         addresses and rkeys over TCP 127.0.0.1:{port}",
        server.id(),
        client.id()
    ));
    let relay = client.relay_stdout();

    // Everything inside is bounded by the time per size; this only catches a hang.
    let deadline = Duration::from_secs(30) + Duration::from_millis(3 * ms_per_size) * SIZES;
    let result = wait_for_guests(&mut client, &mut server, deadline, interrupted);
    if result.is_err() {
        client.kill();
        server.kill();
    }
    if let Some(relay) = relay {
        let _ = relay.join();
    }
    result?;

    daemon.terminate(STOP_TIMEOUT, &log_path)?;
    report_daemon_warnings(&log_path);
    dir.remove()
}

/// Waits until both sockets accept a connection, or the daemon exits, or time runs out.
fn wait_for_sockets(
    daemon: &mut Proc,
    sockets: &[PathBuf],
    log: &Path,
    interrupted: &AtomicBool,
) -> Res<()> {
    let start = Instant::now();
    let mut ready = vec![false; sockets.len()];
    loop {
        if let Some(status) = daemon.try_wait()? {
            return Err(format!(
                "the daemon failed to start ({status}): {}",
                daemon_error(log)
            ));
        }
        for (socket, ready) in sockets.iter().zip(ready.iter_mut()) {
            if !*ready && UnixStream::connect(socket).is_ok() {
                *ready = true;
            }
        }
        if ready.iter().all(|r| *r) {
            return Ok(());
        }
        if interrupted.load(Ordering::SeqCst) {
            return Err("signal received while starting the daemon".into());
        }
        if start.elapsed() > SOCKET_TIMEOUT {
            let missing: Vec<String> = sockets
                .iter()
                .zip(&ready)
                .filter(|(_, r)| !**r)
                .map(|(s, _)| s.display().to_string())
                .collect();
            return Err(format!(
                "the daemon did not accept connections on {} within {} s; last log line: {}",
                missing.join(" and "),
                SOCKET_TIMEOUT.as_secs(),
                daemon_error(log)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the client to finish, then for the server; fails at the first guest that fails.
fn wait_for_guests(
    client: &mut Proc,
    server: &mut Proc,
    timeout: Duration,
    interrupted: &AtomicBool,
) -> Res<()> {
    let start = Instant::now();
    let mut client_done = None;
    loop {
        if client_done.is_none() {
            if let Some(status) = client.try_wait()? {
                if !status.success() {
                    return Err(guest_failed("client", status));
                }
                client_done = Some(Instant::now());
            }
        }
        if let Some(status) = server.try_wait()? {
            if !status.success() {
                return Err(guest_failed("server", status));
            }
            if client_done.is_some() {
                return Ok(());
            }
        }
        if interrupted.load(Ordering::SeqCst) {
            return Err("signal received while the guests were running".into());
        }
        if let Some(at) = client_done {
            if at.elapsed() > SERVER_EXIT_TIMEOUT {
                return Err(format!(
                    "the server guest did not exit within {} s after the client finished; \
                     killed it",
                    SERVER_EXIT_TIMEOUT.as_secs()
                ));
            }
        } else if start.elapsed() > timeout {
            return Err(format!(
                "the guests did not finish within {} s; killed them (is the machine \
                 overloaded? try --ms-per-size 300)",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn guest_failed(which: &str, status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(sig) => format!(
            "the {which} guest was killed by signal {sig}; stopped the other processes (run the \
             demo again; if it recurs, check for an out-of-memory kill)"
        ),
        None => format!(
            "the {which} guest failed ({status}); its message is above. Stopped the other \
             processes"
        ),
    }
}

/// The line of the daemon's log that best says why it stopped.
fn daemon_error(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("vhost-user-rdma:") || l.starts_with("error:"))
        .or_else(|| lines.iter().rev().find(|l| l.contains("ERROR")))
        .or(lines.last())
        .map_or_else(
            || "(the daemon logged nothing)".to_owned(),
            |l| l.to_string(),
        )
}

/// Shows the warnings and errors the daemon logged during a successful run.
fn report_daemon_warnings(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if !bad.is_empty() {
        say(&format!("the daemon logged {} warning(s):", bad.len()));
        for line in bad.iter().take(20) {
            say(&format!("  {line}"));
        }
    }
}

/// A child process that is killed (or, for the daemon, terminated) if still running when
/// dropped, so no error path leaves one behind.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
    /// Signal to stop it with on drop.
    stop_signal: i32,
    reaped: bool,
}

impl Proc {
    /// Spawns `cmd`; the child gets `death_signal` if this process dies first.
    fn spawn(name: &'static str, cmd: &mut Command, death_signal: i32) -> Res<Proc> {
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid), allocating nothing.
        #[cfg(target_os = "linux")]
        unsafe {
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The parent already died; do not run as an orphan.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the {name} process: {e}"))?;
        Ok(Proc {
            name,
            child,
            stop_signal: death_signal,
            reaped: false,
        })
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    fn try_wait(&mut self) -> Res<Option<ExitStatus>> {
        let status = self
            .child
            .try_wait()
            .map_err(|e| format!("cannot check on the {} process: {e}", self.name))?;
        if status.is_some() {
            self.reaped = true;
        }
        Ok(status)
    }

    fn signal(&self, sig: i32) {
        if self.reaped {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child,
            // which has not been reaped, so it cannot name another process.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Kills the process and reaps it.
    fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    /// Sends SIGTERM and waits for a clean exit; kills it after `timeout`.
    fn terminate(&mut self, timeout: Duration, log: &Path) -> Res<()> {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "the {} did not stop cleanly after SIGTERM ({status}): {}",
                        self.name,
                        daemon_error(log)
                    ))
                };
            }
            if start.elapsed() > timeout {
                self.kill();
                return Err(format!(
                    "the {} did not stop within {} s after SIGTERM; killed it. Last log line: {}",
                    self.name,
                    timeout.as_secs(),
                    daemon_error(log)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Copies the child's standard output to ours, line by line, on a thread.
    fn relay_stdout(&mut self) -> Option<std::thread::JoinHandle<()>> {
        let out = self.child.stdout.take()?;
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let mut stdout = std::io::stdout().lock();
                    let _ = writeln!(stdout, "{line}");
                    let _ = stdout.flush();
                }
            })
            .ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if self.stop_signal != libc::SIGKILL {
            self.signal(self.stop_signal);
            let start = Instant::now();
            while start.elapsed() < STOP_TIMEOUT {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    self.reaped = true;
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }
}

/// A private directory for the sockets and the daemon's log, removed on drop.
#[derive(Debug)]
struct TempDir {
    path: PathBuf,
    removed: bool,
}

impl TempDir {
    fn new() -> Res<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("vrdma-demo-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| {
                format!(
                    "cannot create the temporary directory {}: {e} (set TMPDIR to a writable \
                     directory)",
                    path.display()
                )
            })?;
        Ok(TempDir {
            path,
            removed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn remove(mut self) -> Res<()> {
        self.removed = true;
        std::fs::remove_dir_all(&self.path).map_err(|e| {
            format!(
                "everything passed, but the temporary directory {} could not be removed: {e}",
                self.path.display()
            )
        })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
