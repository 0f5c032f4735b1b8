//! Child processes (the daemon, vrdma-perf, qperf) held in guards that end them on every exit
//! path, and what /proc says about the daemon's CPU time and memory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Why a child process could not be run or measured.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program is not where it should be.
    #[error("{0} not found: build it with bench/run (cargo build --release -p {1})")]
    Missing(PathBuf, &'static str),
    /// Spawning failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A log or output file could not be created.
    #[error("cannot create {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The program did not finish within its time.
    #[error("{program} did not finish within {secs} s and was killed; see {log}")]
    Timeout {
        /// The program.
        program: String,
        /// Its time.
        secs: u64,
        /// Its log.
        log: String,
    },
    /// The program failed.
    #[error("{program} failed ({status}); see {log}: {tail}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its log.
        log: String,
        /// The last lines of its log.
        tail: String,
    },
    /// The daemon did not create its sockets.
    #[error("vhost-user-rdma did not create {socket} within 10 s; see {log}: {tail}")]
    NoSocket {
        /// The socket.
        socket: PathBuf,
        /// The daemon's log.
        log: String,
        /// The last lines of its log.
        tail: String,
    },
    /// taskset refused to move the bench to its CPUs.
    #[error("cannot pin the bench to CPUs {0} with taskset; run with --no-pin")]
    Placement(String),
    /// The run was interrupted (Ctrl-C or SIGTERM).
    #[error("interrupted")]
    Interrupted,
    /// /proc could not be read.
    #[error("cannot read {path}: {reason}")]
    Proc {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Installs SIGINT and SIGTERM handlers that set a flag every wait checks, so the guards
/// unwind and end the children; a second signal exits at once.
pub fn install_signal_flag() -> std::io::Result<()> {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag before the second handler sets it: the first
        // signal only sets the flag, the second one exits.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Fails with [`Error::Interrupted`] once a signal arrived.
pub fn check_interrupt() -> Result<(), Error> {
    if interrupted() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps `d` in small steps, returning early with an error on a signal.
pub fn sleep(d: Duration) -> Result<(), Error> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// A program installed next to this one (the release build puts all binaries together).
pub fn sibling(name: &str, package: &'static str) -> Result<PathBuf, Error> {
    let me = std::env::current_exe().map_err(|e| Error::Spawn {
        program: "vrdma-bench".into(),
        source: e,
    })?;
    let path = me.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing(path, package))
    }
}

/// A running child; dropping the guard ends it (SIGTERM, then SIGKILL after a grace period).
#[derive(Debug)]
pub struct Guard {
    child: Option<Child>,
    name: String,
    log: PathBuf,
}

impl Guard {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> Result<Guard, Error> {
        let out = File::create(log).map_err(|source| Error::File {
            path: log.to_owned(),
            source,
        })?;
        let err = out.try_clone().map_err(|source| Error::File {
            path: log.to_owned(),
            source,
        })?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::Spawn {
                program: name.to_owned(),
                source,
            })?;
        Ok(Guard {
            child: Some(child),
            name: name.to_owned(),
            log: log.to_owned(),
        })
    }

    /// The child's process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the child has exited already.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits at most `limit` for the child to exit successfully; a signal ends the wait.
    pub fn wait(self, limit: Duration) -> Result<(), Error> {
        self.wait_for(limit, true)
    }

    /// As [`Guard::wait`], but a signal does not end it: for the short steps that write the
    /// partial results after Ctrl-C (the plots).
    pub fn wait_through_signals(self, limit: Duration) -> Result<(), Error> {
        self.wait_for(limit, false)
    }

    fn wait_for(mut self, limit: Duration, interruptible: bool) -> Result<(), Error> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return if status.success() {
                    Ok(())
                } else {
                    Err(Error::Failed {
                        program: self.name.clone(),
                        status,
                        log: self.log.display().to_string(),
                        tail: log_tail(&self.log),
                    })
                };
            }
            if interruptible {
                check_interrupt()?;
            }
            if Instant::now() > end {
                return Err(Error::Timeout {
                    program: self.name.clone(),
                    secs: limit.as_secs(),
                    log: self.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ends the child: SIGTERM so the daemon removes its sockets, SIGKILL after 5 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SIGTERM, so the daemon removes its sockets; kill(1) keeps this crate free of unsafe.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::warn!("{} ignored SIGTERM for 5 s; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log file, joined by " | ".
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

/// The daemon as a child process serving VMs on sockets in its own directory.
#[derive(Debug)]
pub struct Daemon {
    guard: Guard,
    dir: PathBuf,
}

/// One VM the daemon serves: its name and extra `key=value` options (weight, quotas).
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Its name (and socket file name).
    pub name: String,
    /// Extra options, comma-separated, or empty.
    pub extra: String,
}

impl VmSpec {
    /// A VM with default options.
    pub fn new(name: impl Into<String>) -> VmSpec {
        VmSpec {
            name: name.into(),
            extra: String::new(),
        }
    }

    /// A VM with extra options such as `weight=3`.
    pub fn with(name: impl Into<String>, extra: impl Into<String>) -> VmSpec {
        VmSpec {
            name: name.into(),
            extra: extra.into(),
        }
    }

    /// The daemon's `--vm` argument for this VM, the `index`th, serving `socket`: its GID is
    /// the `gid=` of its extra options if they name one, else 10.0.(i/250).(i%250+1), which
    /// keeps GIDs distinct for any VM count the bench uses.
    pub fn arg(&self, index: usize, socket: &Path) -> String {
        let mut spec = format!("name={},socket={}", self.name, socket.display());
        if !self.extra.split(',').any(|kv| kv.starts_with("gid=")) {
            spec.push_str(&format!(",gid=10.0.{}.{}", index / 250, index % 250 + 1));
        }
        if !self.extra.is_empty() {
            spec.push(',');
            spec.push_str(&self.extra);
        }
        spec
    }
}

/// Where a daemon runs beyond its VMs: a network namespace (a simulated host) and options
/// such as `--roce`. The default is this namespace and no options.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The namespace (`ip netns exec NS`), or this one.
    pub netns: Option<String>,
    /// More options after `--log-level warn` and the `--vm`s.
    pub args: Vec<String>,
}

impl Daemon {
    /// Starts `vhost-user-rdma` for `vms` with sockets under `dir` and its log at `log`, where
    /// and as `launch` says, and waits until every socket exists.
    pub fn start(
        binary: &Path,
        dir: &Path,
        log: &Path,
        vms: &[VmSpec],
        launch: &Launch,
    ) -> Result<Daemon, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::File {
            path: dir.to_owned(),
            source,
        })?;
        // `ip netns exec` execs the daemon, so the child's PID (for /proc, SIGTERM) stays its.
        let mut cmd = command(binary, Role::Daemon, launch.netns.as_deref());
        cmd.arg("--log-level").arg("warn");
        for (i, vm) in vms.iter().enumerate() {
            let socket = dir.join(format!("{}.sock", vm.name));
            // A stale socket from a killed run would make the daemon refuse to start.
            let _ = std::fs::remove_file(&socket);
            cmd.arg("--vm").arg(vm.arg(i, &socket));
        }
        cmd.args(&launch.args);
        let mut guard = Guard::spawn(cmd, "vhost-user-rdma", log)?;
        let end = Instant::now() + Duration::from_secs(10);
        for vm in vms {
            let socket = dir.join(format!("{}.sock", vm.name));
            while !socket.exists() {
                check_interrupt()?;
                if guard.exited().is_some() || Instant::now() > end {
                    return Err(Error::NoSocket {
                        socket,
                        log: log.display().to_string(),
                        tail: guard.log_tail(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(Daemon {
            guard,
            dir: dir.to_owned(),
        })
    }

    /// The socket of VM `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Fails if the daemon has died (a crash would otherwise look like slow guests).
    pub fn check_alive(&mut self) -> Result<(), Error> {
        match self.guard.exited() {
            None => Ok(()),
            Some(status) => Err(Error::Failed {
                program: "vhost-user-rdma".into(),
                status,
                log: self.guard.log().display().to_string(),
                tail: self.guard.log_tail(),
            }),
        }
    }

    /// CPU time the daemon has used so far.
    pub fn cpu(&self) -> Result<Duration, Error> {
        cpu_time(self.pid())
    }

    /// Its memory now.
    pub fn memory(&self) -> Result<Memory, Error> {
        memory(self.pid())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.guard.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Which CPUs the daemon gets to itself, as an operator would dedicate host cores to it; the
/// bench and its guests (vrdma-perf, in-process guests, memcpy) run on the others, and qperf
/// on all of them (TCP needs no daemon). Set once at start; unset means no pinning.
#[derive(Debug, Clone)]
pub struct Placement {
    /// `taskset -c` list for the daemon.
    pub daemon: String,
    /// `taskset -c` list for everything else of vrdma's.
    pub guests: String,
    /// Every CPU.
    pub all: String,
    /// `taskset -c` lists for the server and the client of a two-process pair (section
    /// shim): a guest CPU each when there are two, else both the guests' CPUs.
    pub ends: [String; 2],
}

static PLACEMENT: OnceLock<Placement> = OnceLock::new();

impl Placement {
    /// The last CPU for the daemon and the rest for the guests, given `cpus` online CPUs;
    /// none on a single CPU.
    pub fn last_cpu(cpus: usize) -> Option<Placement> {
        (cpus >= 2).then(|| {
            let guests = if cpus == 2 {
                "0".to_owned()
            } else {
                format!("0-{}", cpus - 2)
            };
            Placement {
                daemon: (cpus - 1).to_string(),
                ends: if cpus >= 3 {
                    ["0".into(), "1".into()]
                } else {
                    [guests.clone(), guests.clone()]
                },
                guests,
                all: format!("0-{}", cpus - 1),
            }
        })
    }

    /// Whether the two ends of a pair share their CPUs.
    pub fn ends_share(&self) -> bool {
        self.ends[0] == self.ends[1]
    }

    /// Moves this process (all its threads, and so every child it starts later) to the
    /// guests' CPUs and remembers the placement for [`command`].
    pub fn apply(self) -> Result<(), Error> {
        let status = Command::new("taskset")
            .args([
                "-a",
                "-p",
                "-c",
                &self.guests,
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status()
            .map_err(|source| Error::Spawn {
                program: "taskset".into(),
                source,
            })?;
        if !status.success() {
            return Err(Error::Placement(self.guests.clone()));
        }
        let _ = PLACEMENT.set(self);
        Ok(())
    }

    /// The placement in force, if any.
    pub fn current() -> Option<&'static Placement> {
        PLACEMENT.get()
    }
}

/// Who a command is for, to place it on its CPUs.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// The daemon: its dedicated CPUs.
    Daemon,
    /// A program that does not use vrdma (qperf): every CPU.
    Baseline,
    /// The server of a two-process pair (section shim).
    Server,
    /// The client of a two-process pair.
    Client,
}

/// `Command::new(program)`, run under `taskset` on the CPUs of `role` when the bench pins,
/// and inside network namespace `netns` (`ip netns exec`) if one is given.
pub fn command(program: impl AsRef<std::ffi::OsStr>, role: Role, netns: Option<&str>) -> Command {
    let cpus = Placement::current().map(|p| match role {
        Role::Daemon => p.daemon.as_str(),
        Role::Baseline => p.all.as_str(),
        Role::Server => p.ends[0].as_str(),
        Role::Client => p.ends[1].as_str(),
    });
    wrapped(program.as_ref(), cpus, netns)
}

/// `[taskset -c CPUS] [ip netns exec NETNS] PROGRAM`. taskset and `ip netns exec` both exec
/// what follows, so the child's PID is the program's.
fn wrapped(program: &std::ffi::OsStr, cpus: Option<&str>, netns: Option<&str>) -> Command {
    let mut prefix: Vec<&str> = Vec::new();
    if let Some(cpus) = cpus {
        prefix.extend(["taskset", "-c", cpus]);
    }
    if let Some(ns) = netns {
        prefix.extend(["ip", "netns", "exec", ns]);
    }
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Clock ticks per second, the unit of utime and stime in /proc/PID/stat (`getconf CLK_TCK`;
/// 100 on every Linux this runs on if getconf is missing).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// utime + stime of process `pid` (all its threads, including those that have exited).
pub fn cpu_time(pid: u32) -> Result<Duration, Error> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Proc {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let ticks = parse_stat_cpu_ticks(&text).ok_or_else(|| Error::Proc {
        path,
        reason: "no utime/stime fields".into(),
    })?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()))
}

/// utime + stime (fields 14 and 15) from the text of /proc/PID/stat. The command name (field
/// 2) may hold spaces and parentheses, so the fields are counted after its last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, index 11 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A process's memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set (VmRSS): includes guest memory pages the daemon has touched.
    pub rss: u64,
    /// Anonymous resident memory (RssAnon): the daemon's own heap and stacks.
    pub anon: u64,
}

/// VmRSS and RssAnon of process `pid`.
pub fn memory(pid: u32) -> Result<Memory, Error> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Proc {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    parse_status_memory(&text).ok_or(Error::Proc {
        path,
        reason: "no VmRSS/RssAnon lines".into(),
    })
}

/// The values after `key` (such as "VmRSS:") on its line of /proc/PID/status.
fn status_values<'a>(status: &'a str, key: &str) -> Option<std::str::SplitWhitespace<'a>> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    Some(line[key.len()..].split_whitespace())
}

/// VmRSS and RssAnon (in kB in the file) from the text of /proc/PID/status.
pub fn parse_status_memory(status: &str) -> Option<Memory> {
    let field = |key: &str| -> Option<u64> {
        let kb: u64 = status_values(status, key)?.next()?.parse().ok()?;
        Some(kb * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
    })
}

/// The effective user ID from the text of /proc/PID/status ("Uid:" real, effective, saved,
/// filesystem).
pub fn parse_status_euid(status: &str) -> Option<u32> {
    status_values(status, "Uid:")?.nth(1)?.parse().ok()
}

/// Whether this process runs as root (effective UID 0), as creating network namespaces needs.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status_euid(&s))
        == Some(0)
}

/// Percent of one core used over an interval.
pub fn percent(cpu: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        0.0
    } else {
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_daemon_gets_the_last_cpu_and_the_guests_the_rest() {
        assert!(Placement::last_cpu(1).is_none(), "one CPU cannot be split");
        let two = Placement::last_cpu(2).unwrap();
        assert_eq!(
            (two.daemon.as_str(), two.guests.as_str(), two.all.as_str()),
            ("1", "0", "0-1")
        );
        assert!(two.ends_share(), "one guest CPU for both ends");
        assert_eq!(two.ends, ["0", "0"]);
        let three = Placement::last_cpu(3).unwrap();
        assert!(!three.ends_share());
        assert_eq!(three.ends, ["0", "1"]);
        let eight = Placement::last_cpu(8).unwrap();
        assert_eq!(
            (
                eight.daemon.as_str(),
                eight.guests.as_str(),
                eight.all.as_str()
            ),
            ("7", "0-6", "0-7")
        );
    }

    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a ')' must not shift the fields.
        let stat = "4242 (vhost (user) rdma) S 1 4242 4242 0 -1 4194560 1021 0 0 0 \
                    37 12 0 0 20 0 6 0 123456 1234567 890 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(49));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_memory_is_read_in_bytes() {
        let status = "Name:\tvhost-user-rdma\nVmPeak:\t  900000 kB\nVmRSS:\t    6144 kB\n\
                      RssAnon:\t    2048 kB\nRssFile:\t    4096 kB\n";
        assert_eq!(
            parse_status_memory(status),
            Some(Memory {
                rss: 6144 * 1024,
                anon: 2048 * 1024
            })
        );
        assert_eq!(parse_status_memory("VmRSS: 1 kB\n"), None);
    }

    #[test]
    fn the_effective_uid_is_the_second_uid() {
        let status =
            "Name:\tsudo\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_status_euid(status), Some(0));
        assert_eq!(parse_status_euid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(parse_status_euid("Gid:\t0\t0\t0\t0\n"), None);
        assert_eq!(parse_status_euid("Uid:\t0\n"), None);
    }

    #[test]
    fn vm_arguments_keep_a_given_gid() {
        let sock = Path::new("/s/a.sock");
        assert_eq!(
            VmSpec::new("a").arg(0, sock),
            "name=a,socket=/s/a.sock,gid=10.0.0.1"
        );
        assert_eq!(
            VmSpec::with("w", "weight=3").arg(251, sock),
            "name=w,socket=/s/a.sock,gid=10.0.1.2,weight=3"
        );
        assert_eq!(
            VmSpec::with("h", "weight=2,gid=10.66.0.2").arg(0, sock),
            "name=h,socket=/s/a.sock,weight=2,gid=10.66.0.2"
        );
        // A key that merely ends in "gid" is not a GID.
        assert_eq!(
            VmSpec::with("x", "notgid=1").arg(1, sock),
            "name=x,socket=/s/a.sock,gid=10.0.0.2,notgid=1"
        );
    }

    #[test]
    fn commands_are_pinned_then_moved_into_their_namespace() {
        let words = |c: &Command| {
            std::iter::once(c.get_program())
                .chain(c.get_args())
                .map(|w| w.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let prog = std::ffi::OsStr::new("/b/vhost-user-rdma");
        assert_eq!(words(&wrapped(prog, None, None)), "/b/vhost-user-rdma");
        assert_eq!(
            words(&wrapped(prog, Some("1"), Some("ns-a"))),
            "taskset -c 1 ip netns exec ns-a /b/vhost-user-rdma"
        );
        assert_eq!(
            words(&wrapped(prog, None, Some("ns-b"))),
            "ip netns exec ns-b /b/vhost-user-rdma"
        );
        assert_eq!(
            words(&wrapped(prog, Some("0-1"), None)),
            "taskset -c 0-1 /b/vhost-user-rdma"
        );
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(memory(me).unwrap().rss > 0);
        cpu_time(me).unwrap();
        assert_eq!(
            percent(Duration::from_millis(250), Duration::from_secs(1)),
            25.0
        );
    }
}
