//! End-to-end scenarios: interrupt-driven completions, many VMs and QPs at once, a shared CQ,
//! guests SIGKILLed over and over against a daemon running as its own process, a daemon that
//! goes away under a guest, the file descriptors of departed guests (and 5,000 of them against
//! a daemon limited to 256 descriptors), and a daemon that is busy or stopped.
//!
//! The daemon runs in-process (`TestDaemon`) where only the guests matter, and as a real
//! process (`vrdma-demo daemon`, exactly the `vhost-user-rdma` binary's code) where its own
//! memory, signals or death are the subject. Guests that must die by SIGKILL are this test
//! binary run again as a child, as in `disconnect.rs`. Every wait has a deadline, and a
//! watchdog kills the children and aborts if a test hangs anyway.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vrdma::mem::DmaBuf;
use vrdma::transport::Options;
use vrdma::{
    CompletionChannel, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpAttr,
    QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, RecvWr, SendFlags, SendWr, Sge,
    WcOpcode, WcStatus, WorkCompletion,
};
use vrdma_proto::Gid;
use vrdma_proto::cqe::VendorErr;
use vrdma_proto::event;
use vrdma_tests::{Endpoint, TestDaemon, all_access, connect_rc, empty_wc, rc_pair, read};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

fn cap(depth: u32) -> QpCap {
    QpCap {
        max_send_wr: depth,
        max_recv_wr: depth,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 0,
    }
}

/// Fills `buf` with pseudo-random bytes from `seed` (xorshift64*), so that no two messages
/// carry the same bytes and a misplaced or stale byte shows.
fn fill_random(buf: &DmaBuf, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(buf.len() + 8);
    while bytes.len() < buf.len() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        bytes.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    bytes.truncate(buf.len());
    buf.write_at(0, &bytes).expect("fill buffer");
}

/// Polls exactly one completion from `cq` without waiting: after a completion event the
/// completion must already be in the ring.
fn poll_now(cq: &CompletionQueue) -> WorkCompletion {
    let mut wc = [empty_wc(); 2];
    let n = cq.poll(&mut wc).expect("poll");
    assert_eq!(
        n,
        1,
        "after its event CQ {:#x} must hold exactly one completion at once",
        cq.handle()
    );
    wc[0]
}

/// Asserts two byte strings are equal, naming the first difference (not printing both).
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: byte {i} of {} is {:#04x}, expected {:#04x}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

fn assert_cq_empty(cq: &CompletionQueue) {
    let mut wc = [empty_wc(); 1];
    let n = cq.poll(&mut wc).expect("poll");
    assert_eq!(
        n,
        0,
        "unexpected completion on CQ {:#x}: {:?}",
        cq.handle(),
        wc[0]
    );
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A private directory for sockets, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "vrdma-e2e-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills every registered process and aborts the test binary if the test is still running
/// after its time limit: a hang must not leave a daemon or guest behind, nor block CI.
struct Watchdog {
    pids: Arc<Mutex<Vec<u32>>>,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(test: &'static str, limit: Duration) -> Watchdog {
        let pids = Arc::new(Mutex::new(Vec::<u32>::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (p, d) = (pids.clone(), done.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if d.load(Ordering::SeqCst) {
                return;
            }
            let pids = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
            eprintln!("{test}: still running after {limit:?}; killing {pids:?} and aborting");
            for pid in pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            std::process::abort();
        });
        Watchdog { pids, done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// A child process whose output lines (stdout or stderr) are read by a thread, so waiting for
/// a line has a deadline. Killed with SIGKILL on drop unless it has exited.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Recent lines, for failure messages.
    tail: VecDeque<String>,
    pids: Arc<Mutex<Vec<u32>>>,
    exited: bool,
}

impl Proc {
    /// Spawns `cmd`, reading its stdout (`stderr` false) or stderr lines.
    fn spawn(name: &str, cmd: &mut Command, stderr: bool, dog: &Watchdog) -> Proc {
        if stderr {
            cmd.stderr(Stdio::piped()).stdout(Stdio::null());
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        }
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("spawn");
        dog.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        let out: Box<dyn Read + Send> = if stderr {
            Box::new(child.stderr.take().expect("stderr"))
        } else {
            Box::new(child.stdout.take().expect("stdout"))
        };
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            tail: VecDeque::new(),
            pids: dog.pids.clone(),
            exited: false,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a line containing `needle`; returns it from `needle` on.
    fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(needle) {
                        return line[at..].to_owned();
                    }
                    if self.tail.len() == 40 {
                        self.tail.pop_front();
                    }
                    self.tail.push_back(line);
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no line with {needle:?} within {timeout:?}; last lines:\n{}",
                    self.name,
                    Vec::from(self.tail.clone()).join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited ({:?}) before printing {needle:?}; last lines:\n{}",
                    self.name,
                    self.child.try_wait(),
                    Vec::from(self.tail.clone()).join("\n")
                ),
            }
        }
    }

    fn write_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to child");
        stdin.flush().expect("flush child stdin");
    }

    /// Sends `signal` (a name for kill(1), e.g. "TERM").
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits until every thread of the process has stopped (after SIGSTOP): `kill` returns
    /// once the signal is queued, and a thread acts on it only when it next runs, so a thread
    /// woken at that moment could still answer a request sent right after `kill`.
    fn wait_stopped(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let tasks = format!("/proc/{}/task", self.pid());
        loop {
            let all_stopped = std::fs::read_dir(&tasks)
                .expect("list the daemon's threads")
                .flatten()
                .all(|t| {
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    // The state follows the parenthesised command name.
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
                });
            if all_stopped {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon {} did not stop within {timeout:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = true;
                self.unregister();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
            self.unregister();
        }
    }

    fn unregister(&self) {
        let pid = self.child.id();
        self.pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&p| p != pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `vrdma-demo daemon` (the real daemon) serving `vms` (name, socket, gid), started and
/// listening on every socket when this returns.
fn spawn_daemon(vms: &[(&str, &Path, &str)], dog: &Watchdog) -> Proc {
    spawn_daemon_with(vms, dog, |_| {})
}

/// [`spawn_daemon`], with `configure` applied to the command first (for process limits).
fn spawn_daemon_with(
    vms: &[(&str, &Path, &str)],
    dog: &Watchdog,
    configure: impl FnOnce(&mut Command),
) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vrdma-demo"));
    configure(&mut cmd);
    cmd.arg("daemon");
    for (name, socket, gid) in vms {
        cmd.arg("--vm")
            .arg(format!("name={name},socket={},gid={gid}", socket.display()));
    }
    cmd.args(["--log-level", "info"]).env("RUST_LOG", "info");
    let mut daemon = Proc::spawn("daemon", &mut cmd, true, dog);
    daemon.expect_line(
        &format!("serving {} VM(s)", vms.len()),
        Duration::from_secs(20),
    );
    daemon
}

/// What /proc says about a process's memory, threads and file descriptors.
#[derive(Debug, Clone, Copy)]
struct ProcStats {
    vm_rss_kib: u64,
    rss_anon_kib: u64,
    rss_shmem_kib: u64,
    threads: u64,
    fds: usize,
}

impl ProcStats {
    fn describe(&self) -> String {
        format!(
            "VmRSS {} KiB (RssAnon {} KiB, RssShmem {} KiB), {} threads, {} fds",
            self.vm_rss_kib, self.rss_anon_kib, self.rss_shmem_kib, self.threads, self.fds
        )
    }
}

fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status"))
    };
    ProcStats {
        vm_rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        rss_shmem_kib: field("RssShmem:"),
        threads: field("Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("/proc fd")
            .count(),
    }
}

/// Waits up to `timeout` for the process to have `threads` threads, and returns its stats then
/// (or when the time is up). A thread the daemon has joined can still count for a moment:
/// `pthread_join` returns when the kernel clears the thread's ID, a little before the kernel
/// removes it from the process. A thread that leaks never goes, and the caller's assertion
/// fails.
fn stats_once_threads_are(pid: u32, threads: u64, timeout: Duration) -> ProcStats {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = proc_stats(pid);
        if stats.threads == threads || Instant::now() >= deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How many of a process's memory mappings are of a memfd (the memory guests share with the
/// daemon).
fn memfd_mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("/proc maps")
        .lines()
        .filter(|l| l.contains("/memfd:"))
        .count()
}

/// What a process's file descriptors are, counted by kind ("socket", "anon_inode:[eventfd]",
/// "/memfd:vrdma-dma (deleted)"...), for a leak's failure message.
fn fd_kinds(pid: u32) -> Vec<(String, usize)> {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc fd") {
        let Ok(entry) = entry else { continue };
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_else(|e| format!("? {e}"));
        let kind = match target.split_once(':') {
            Some((k @ ("socket" | "pipe"), _)) => k.to_owned(),
            _ => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Completion channel (interrupt) mode
// ---------------------------------------------------------------------------------------------

const SLOT: usize = 4096;

fn msg_len(m: usize) -> u32 {
    1 + (m * 613 % (SLOT - 1)) as u32
}

#[test]
fn completion_channel_delivers_one_event_per_arm_for_the_right_cq() {
    let _dog = Watchdog::start("completion_channel", Duration::from_secs(120));
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let channel = CompletionChannel::new(&cb).expect("completion channel");
    // Two pairs, so b has two CQs and an event must name the one that completed.
    let pairs = [
        rc_pair(&ca, &cb, 1 << 20, cap(16)),
        rc_pair(&ca, &cb, 1 << 20, cap(16)),
    ];
    fill_random(&pairs[0].0.buf, 11);
    fill_random(&pairs[1].0.buf, 12);
    assert_ne!(pairs[0].1.cq.handle(), pairs[1].1.cq.handle());
    let mut next_msg = [0usize; 2];

    // Sends message `m` of pair `p` (slot m+1 on both sides) as SEND or WRITE_WITH_IMM with
    // a receive posted for it.
    let post = |p: usize, m: usize, imm: Option<u32>, flags: SendFlags| {
        let (a, b) = &pairs[p];
        let off = ((m + 1) * SLOT) as u64;
        let len = msg_len(m);
        let rsge = [Sge::new(b.buf.addr() + off, SLOT as u32, b.mr.lkey())];
        b.recv(&[RecvWr {
            wr_id: m as u64,
            sg_list: if imm.is_some() { &[] } else { &rsge },
        }])
        .expect("post recv");
        let src = [Sge::new(a.buf.addr() + off, len, a.mr.lkey())];
        let wr = match imm {
            None => SendWr::send(m as u64, &src),
            Some(imm) => {
                SendWr::rdma_write(m as u64, &src, b.buf.addr() + off, b.mr.rkey()).with_imm(imm)
            }
        };
        a.send(&[wr.with_flags(flags)]).expect("post send");
    };
    // Checks the receiver's completion of message `m` and the bytes it delivered, and the
    // sender's completion.
    let check = |p: usize, m: usize, wc: WorkCompletion, imm: Option<u32>| {
        let (a, b) = &pairs[p];
        let len = msg_len(m);
        let opcode = if imm.is_some() {
            WcOpcode::RecvRdmaWithImm
        } else {
            WcOpcode::Recv
        };
        assert_eq!(
            (wc.wr_id, wc.status, wc.opcode, wc.byte_len, wc.imm_data),
            (m as u64, WcStatus::Success, opcode, len, imm),
            "{wc:?}"
        );
        assert_eq!((wc.qp_num, wc.src_qp), (b.qp.qp_num(), a.qp.qp_num()));
        let off = (m + 1) * SLOT;
        same(
            &read(&b.buf, off, len as usize),
            &read(&a.buf, off, len as usize),
            &format!("message {m} of pair {p}"),
        );
        let wc = a.poll_one();
        assert_eq!((wc.wr_id, wc.status), (m as u64, WcStatus::Success));
    };

    // Not armed: the completion arrives, no event does.
    let m = next_msg[0];
    next_msg[0] += 1;
    post(0, m, None, SendFlags::SIGNALED);
    let wc = pairs[0].1.poll_one();
    check(0, m, wc, None);
    assert_eq!(
        channel
            .get_cq_event(Some(Duration::from_millis(50)))
            .unwrap(),
        None,
        "an event without req_notify"
    );

    // 100 rounds: arm, post, wait for the event, then poll.
    let started = Instant::now();
    for round in 0..100usize {
        let p = round % 2;
        let (b, other) = (&pairs[p].1, &pairs[1 - p].1);
        other.cq.req_notify(false).unwrap();
        for imm in [None, Some(0x5000_0000 | round as u32)] {
            b.cq.req_notify(false).unwrap();
            let m = next_msg[p];
            next_msg[p] += 1;
            post(p, m, imm, SendFlags::SIGNALED);
            let cqn = channel
                .get_cq_event(Some(Duration::from_secs(10)))
                .expect("get_cq_event")
                .unwrap_or_else(|| panic!("round {round}: no event within 10 s"));
            assert_eq!(cqn, b.cq.handle(), "round {round}: event for the wrong CQ");
            let wc = poll_now(&b.cq);
            check(p, m, wc, imm);
            assert_cq_empty(&other.cq);
        }
    }
    let rounds = started.elapsed();

    // The last arm of pair 1's CQ was used by round 99: traffic raises no event until re-armed.
    let m = next_msg[1];
    next_msg[1] += 1;
    post(1, m, None, SendFlags::SIGNALED);
    let wc = pairs[1].1.poll_one();
    check(1, m, wc, None);
    assert_eq!(
        channel
            .get_cq_event(Some(Duration::from_millis(50)))
            .unwrap(),
        None,
        "an armed CQ raised a second event for one arm"
    );

    // The channel's fd works with epoll: readable only when an armed CQ completed.
    let ep = Epoll::new().expect("epoll");
    ep.ctl(
        ControlOperation::Add,
        channel.fd(),
        EpollEvent::new(EventSet::IN, 7),
    )
    .expect("watch channel fd");
    let mut evs = [EpollEvent::default(); 4];
    assert_eq!(
        ep.wait(50, &mut evs).expect("epoll_wait"),
        0,
        "fd ready unarmed"
    );
    for _ in 0..10 {
        let b = &pairs[1].1;
        b.cq.req_notify(false).unwrap();
        let m = next_msg[1];
        next_msg[1] += 1;
        post(1, m, None, SendFlags::SIGNALED);
        let n = ep.wait(10_000, &mut evs).expect("epoll_wait");
        assert_eq!(n, 1, "epoll did not report the channel fd within 10 s");
        assert_eq!(evs[0].data(), 7);
        assert!(evs[0].event_set().contains(EventSet::IN));
        assert_eq!(
            channel.get_cq_event(Some(Duration::ZERO)).unwrap(),
            Some(b.cq.handle())
        );
        assert_eq!(
            ep.wait(0, &mut evs).expect("epoll_wait"),
            0,
            "fd still ready"
        );
        let wc = poll_now(&b.cq);
        check(1, m, wc, None);
    }

    // Solicited only: unsolicited completions are ignored, the arm stays...
    let (a0, b0) = &pairs[0];
    b0.cq.req_notify(true).unwrap();
    for imm in [None, Some(77)] {
        let m = next_msg[0];
        next_msg[0] += 1;
        post(0, m, imm, SendFlags::SIGNALED);
        let wc = b0.poll_one();
        check(0, m, wc, imm);
        assert_eq!(
            channel
                .get_cq_event(Some(Duration::from_millis(50)))
                .unwrap(),
            None,
            "an unsolicited {imm:?} completion woke a solicited-only arm"
        );
    }
    // ...and a solicited SEND (and a solicited WRITE_WITH_IMM) wakes it.
    for imm in [None, Some(78)] {
        let m = next_msg[0];
        next_msg[0] += 1;
        post(0, m, imm, SendFlags::SIGNALED | SendFlags::SOLICITED);
        let cqn = channel.get_cq_event(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(
            cqn,
            Some(b0.cq.handle()),
            "solicited {imm:?} raised no event"
        );
        let wc = poll_now(&b0.cq);
        check(0, m, wc, imm);
        b0.cq.req_notify(true).unwrap();
    }
    // An error completion wakes a solicited-only arm: a WRITE with a bad rkey takes b0's QP to
    // ERR, which flushes its posted receive.
    let rsge = [Sge::new(b0.buf.addr(), 64, b0.mr.lkey())];
    b0.recv(&[RecvWr {
        wr_id: 999,
        sg_list: &rsge,
    }])
    .unwrap();
    let src = [Sge::new(a0.buf.addr(), 64, a0.mr.lkey())];
    a0.send(&[SendWr::rdma_write(
        998,
        &src,
        b0.buf.addr(),
        b0.mr.rkey() ^ 0x0010_0000,
    )])
    .unwrap();
    let wc = a0.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status),
        (998, WcStatus::RemAccessErr),
        "{wc:?}"
    );
    let cqn = channel.get_cq_event(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(
        cqn,
        Some(b0.cq.handle()),
        "an error completion raised no event"
    );
    let wc = poll_now(&b0.cq);
    assert_eq!((wc.wr_id, wc.status), (999, WcStatus::WrFlushErr), "{wc:?}");
    let async_events = channel.take_async_events().unwrap();
    assert!(
        async_events.contains(&(event::Kind::QpAccessErr, b0.qp.qp_num())),
        "{async_events:?}"
    );
    eprintln!("completion channel: 200 armed round trips in {rounds:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Eight VMs at once, several QPs each
// ---------------------------------------------------------------------------------------------

const VMS: usize = 8;
const QPS_PER_VM: usize = 4;
const WRITES: usize = 200;
const SENDS: usize = 50;
const MSGS: usize = WRITES + SENDS;
const MSG_SLOT: usize = 2048;

/// Message `k` of QP `j` of VM `i`: every fifth a SEND, the rest RDMA WRITEs; lengths vary.
fn msg_is_send(k: usize) -> bool {
    k % 5 == 4
}

fn msg_bytes(i: usize, j: usize, k: usize) -> u32 {
    64 + ((k * 397 + i * 31 + j * 7) % (MSG_SLOT - 63)) as u32
}

struct Active {
    vm: usize,
    j: usize,
    ep: Endpoint,
    peer_addr: u64,
    peer_rkey: u32,
    posted: usize,
    completed: usize,
}

struct Passive {
    ep: Endpoint,
    /// The requester's QPN.
    src_qp: u32,
    /// Which (vm, j) sends to it.
    from: (usize, usize),
    received: usize,
}

#[test]
fn eight_vms_with_four_qps_each_move_every_byte_concurrently() {
    let _dog = Watchdog::start("eight_vms", Duration::from_secs(180));
    let names: Vec<String> = (0..VMS).map(|i| format!("v{i}")).collect();
    let specs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "")).collect();
    let d = TestDaemon::start(&specs);
    let ctxs: Vec<Context> = names.iter().map(|n| d.open(n)).collect();
    let len = MSGS * MSG_SLOT;

    let mut actives: Vec<Vec<Active>> = (0..VMS).map(|_| Vec::new()).collect();
    let mut passives: Vec<Vec<Passive>> = (0..VMS).map(|_| Vec::new()).collect();
    for i in 0..VMS {
        for j in 0..QPS_PER_VM {
            let peer = if j % 2 == 0 {
                (i + 1) % VMS
            } else {
                (i + VMS - 1) % VMS
            };
            let (a, b) = rc_pair(&ctxs[i], &ctxs[peer], len, cap(64));
            fill_random(&a.buf, (i * QPS_PER_VM + j) as u64 + 100);
            // Receives for the SENDs, in message order.
            for k in (0..MSGS).filter(|&k| msg_is_send(k)) {
                let sge = [Sge::new(
                    b.buf.addr() + (k * MSG_SLOT) as u64,
                    MSG_SLOT as u32,
                    b.mr.lkey(),
                )];
                b.recv(&[RecvWr {
                    wr_id: k as u64,
                    sg_list: &sge,
                }])
                .expect("post recv");
            }
            passives[peer].push(Passive {
                src_qp: a.qp.qp_num(),
                from: (i, j),
                received: 0,
                ep: b,
            });
            let (peer_addr, peer_rkey) = {
                let p = &passives[peer].last().unwrap().ep;
                (p.buf.addr(), p.mr.rkey())
            };
            actives[i].push(Active {
                vm: i,
                j,
                ep: a,
                peer_addr,
                peer_rkey,
                posted: 0,
                completed: 0,
            });
        }
    }
    for (i, p) in passives.iter().enumerate() {
        assert_eq!(p.len(), QPS_PER_VM, "VM {i} hosts the peers of four QPs");
    }

    let barrier = Arc::new(Barrier::new(VMS));
    let started = Instant::now();
    let handles: Vec<_> = actives
        .into_iter()
        .zip(passives)
        .map(|(mut act, mut pas)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                drive_vm(&mut act, &mut pas);
                (act, pas)
            })
        })
        .collect();
    let results: Vec<(Vec<Active>, Vec<Passive>)> = handles
        .into_iter()
        .map(|h| h.join().expect("VM thread"))
        .collect();
    let elapsed = started.elapsed();

    // Every byte of every message, and nothing outside them.
    let mut checked = 0usize;
    for (act, _) in &results {
        for a in act {
            let (peer_vm, idx) = results
                .iter()
                .enumerate()
                .find_map(|(v, (_, pas))| {
                    pas.iter()
                        .position(|p| p.from == (a.vm, a.j))
                        .map(|x| (v, x))
                })
                .expect("peer");
            let p = &results[peer_vm].1[idx];
            let src = read(&a.ep.buf, 0, len);
            let dst = read(&p.ep.buf, 0, len);
            for k in 0..MSGS {
                let n = msg_bytes(a.vm, a.j, k) as usize;
                let at = k * MSG_SLOT;
                assert!(
                    dst[at..at + n] == src[at..at + n],
                    "VM {} QP {} message {k} ({n} bytes) arrived wrong",
                    a.vm,
                    a.j
                );
                assert!(
                    dst[at + n..at + MSG_SLOT].iter().all(|&b| b == 0),
                    "VM {} QP {} message {k}: bytes past its end were written",
                    a.vm,
                    a.j
                );
                checked += n;
            }
        }
    }
    eprintln!(
        "8 VMs x 4 QPs: {} messages, {checked} bytes verified, traffic took {elapsed:?}",
        VMS * QPS_PER_VM * MSGS
    );
}

/// One VM's thread: keeps each of its QPs' send queues busy until all 250 messages completed,
/// and polls the receives of the QPs it hosts for its neighbours.
fn drive_vm(act: &mut [Active], pas: &mut [Passive]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut wc = [empty_wc(); 32];
    loop {
        let mut progress = false;
        for a in act.iter_mut() {
            let mut wrs = Vec::new();
            let sges: Vec<[Sge; 1]> = (a.posted..MSGS)
                .take(64 - (a.posted - a.completed))
                .take(16)
                .map(|k| {
                    let n = msg_bytes(a.vm, a.j, k);
                    [Sge::new(
                        a.ep.buf.addr() + (k * MSG_SLOT) as u64,
                        n,
                        a.ep.mr.lkey(),
                    )]
                })
                .collect();
            for (x, sge) in sges.iter().enumerate() {
                let k = a.posted + x;
                wrs.push(if msg_is_send(k) {
                    SendWr::send(k as u64, sge)
                } else {
                    SendWr::rdma_write(
                        k as u64,
                        sge,
                        a.peer_addr + (k * MSG_SLOT) as u64,
                        a.peer_rkey,
                    )
                });
            }
            if !wrs.is_empty() {
                a.ep.send(&wrs).expect("post sends");
                a.posted += wrs.len();
                progress = true;
            }
            let n = a.ep.cq.poll(&mut wc).expect("poll");
            for w in &wc[..n] {
                let k = a.completed;
                let opcode = if msg_is_send(k) {
                    WcOpcode::Send
                } else {
                    WcOpcode::RdmaWrite
                };
                assert_eq!(
                    (w.wr_id, w.status, w.opcode, w.qp_num),
                    (k as u64, WcStatus::Success, opcode, a.ep.qp.qp_num()),
                    "VM {} QP {}",
                    a.vm,
                    a.j
                );
                a.completed += 1;
            }
            progress |= n > 0;
        }
        for p in pas.iter_mut() {
            let n = p.ep.cq.poll(&mut wc).expect("poll");
            for w in &wc[..n] {
                let k = (0..MSGS)
                    .filter(|&k| msg_is_send(k))
                    .nth(p.received)
                    .expect("no more receives were posted");
                let (i, j) = p.from;
                assert_eq!(
                    (w.wr_id, w.status, w.opcode, w.byte_len, w.src_qp),
                    (
                        k as u64,
                        WcStatus::Success,
                        WcOpcode::Recv,
                        msg_bytes(i, j, k),
                        p.src_qp
                    ),
                    "receive of VM {i} QP {j}'s message {k}"
                );
                p.received += 1;
            }
            progress |= n > 0;
        }
        if act.iter().all(|a| a.completed == MSGS) && pas.iter().all(|p| p.received == SENDS) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stuck: sent {:?}, received {:?}",
            act.iter().map(|a| a.completed).collect::<Vec<_>>(),
            pas.iter().map(|p| p.received).collect::<Vec<_>>()
        );
        if !progress {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Many QPs sharing one CQ
// ---------------------------------------------------------------------------------------------

/// An endpoint whose QP uses `cq` for both queues, with a buffer of its own.
fn shared_cq_endpoint(
    ctx: &Context,
    pd: &ProtectionDomain,
    cq: &CompletionQueue,
    len: usize,
) -> Endpoint {
    let qp = QueuePair::new(
        pd,
        &QpInitAttr {
            send_cq: cq,
            recv_cq: cq,
            srq: None,
            cap: cap(16),
            qp_type: QpType::Rc,
            sq_sig_all: false,
        },
    )
    .expect("create qp");
    let buf = ctx.alloc(len).expect("alloc");
    let mr = MemoryRegion::register(pd, &buf, all_access()).expect("reg mr");
    Endpoint {
        ctx: ctx.clone(),
        pd: pd.clone(),
        cq: cq.clone(),
        qp,
        buf,
        mr,
    }
}

const SHARED_QPS: usize = 64;
/// Requests each a-side QP posts (alternately RDMA WRITE and SEND).
const A_OPS: u64 = 8;
/// SENDs each b-side QP posts back.
const B_SENDS: u64 = 4;
const KIND_SEND: u64 = 1;
const KIND_RECV: u64 = 2;

fn wr_id(kind: u64, qp: usize, seq: u64) -> u64 {
    (kind << 48) | ((qp as u64) << 32) | seq
}

/// Polls `cq` until `total` completions, checking each names one of `qps` and that, per QP
/// and kind, sequence numbers come exactly in order. Returns the count per (QP, kind).
fn drain_shared_cq(cq: &CompletionQueue, qps: &[u32], total: usize) -> Vec<[u64; 3]> {
    let mut next = vec![[0u64; 3]; qps.len()];
    let mut got = 0;
    let mut wc = [empty_wc(); 64];
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < total {
        let n = cq.poll(&mut wc).expect("poll");
        for w in &wc[..n] {
            assert_eq!(w.status, WcStatus::Success, "{w:?}");
            let idx = qps
                .iter()
                .position(|&q| q == w.qp_num)
                .unwrap_or_else(|| panic!("completion for QP {:#x}, not one of ours", w.qp_num));
            let (kind, qp, seq) = (
                w.wr_id >> 48,
                (w.wr_id >> 32) & 0xffff,
                w.wr_id & 0xffff_ffff,
            );
            assert_eq!(
                qp as usize, idx,
                "QP {:#x} got another QP's completion {w:?}",
                w.qp_num
            );
            assert!(kind == KIND_SEND || kind == KIND_RECV, "{w:?}");
            assert_eq!(
                seq, next[idx][kind as usize],
                "QP {idx}: completions out of order {w:?}"
            );
            next[idx][kind as usize] += 1;
        }
        got += n;
        assert!(
            Instant::now() < deadline,
            "only {got} of {total} completions within 30 s"
        );
        if n == 0 {
            std::thread::yield_now();
        }
    }
    // Nothing beyond what was posted.
    std::thread::sleep(Duration::from_millis(20));
    assert_cq_empty(cq);
    next
}

#[test]
fn sixty_four_qps_share_one_cq_and_each_gets_its_own_completions_in_order() {
    let _dog = Watchdog::start("shared_cq", Duration::from_secs(120));
    let d = TestDaemon::start(&[("a", ""), ("b", "")]);
    let (ca, cb) = (d.open("a"), d.open("b"));
    let (pda, pdb) = (
        ProtectionDomain::new(&ca).unwrap(),
        ProtectionDomain::new(&cb).unwrap(),
    );
    let (cqa, cqb) = (
        CompletionQueue::new(&ca, 4096).unwrap(),
        CompletionQueue::new(&cb, 4096).unwrap(),
    );
    const LEN: usize = 64 * 1024;
    const MSG: u32 = 1000;
    let mut pairs = Vec::new();
    for q in 0..SHARED_QPS {
        let a = shared_cq_endpoint(&ca, &pda, &cqa, LEN);
        let b = shared_cq_endpoint(&cb, &pdb, &cqb, LEN);
        connect_rc(&a.qp, cb.gid(), b.qp.qp_num(), 7, 7);
        connect_rc(&b.qp, ca.gid(), a.qp.qp_num(), 7, 7);
        fill_random(&a.buf, 1000 + q as u64);
        fill_random(&b.buf, 2000 + q as u64);
        pairs.push((a, b));
    }
    let qps_a: Vec<u32> = pairs.iter().map(|(a, _)| a.qp.qp_num()).collect();
    let qps_b: Vec<u32> = pairs.iter().map(|(_, b)| b.qp.qp_num()).collect();

    // Receives: b for a's SENDs (into its upper half), a for b's SENDs.
    for (q, (a, b)) in pairs.iter().enumerate() {
        for s in 0..A_OPS / 2 {
            let off = LEN as u64 / 2 + s * u64::from(MSG);
            let sge = [Sge::new(b.buf.addr() + off, MSG, b.mr.lkey())];
            b.recv(&[RecvWr {
                wr_id: wr_id(KIND_RECV, q, s),
                sg_list: &sge,
            }])
            .unwrap();
        }
        for s in 0..B_SENDS {
            let off = LEN as u64 / 2 + s * u64::from(MSG);
            let sge = [Sge::new(a.buf.addr() + off, MSG, a.mr.lkey())];
            a.recv(&[RecvWr {
                wr_id: wr_id(KIND_RECV, q, s),
                sg_list: &sge,
            }])
            .unwrap();
        }
    }
    // Round robin over the QPs, so the shared CQs see them interleaved.
    for s in 0..A_OPS {
        for (q, (a, b)) in pairs.iter().enumerate() {
            let src = [Sge::new(
                a.buf.addr() + s * u64::from(MSG),
                MSG,
                a.mr.lkey(),
            )];
            let id = wr_id(KIND_SEND, q, s);
            let wr = if s % 2 == 0 {
                SendWr::rdma_write(id, &src, b.buf.addr() + s * u64::from(MSG), b.mr.rkey())
            } else {
                SendWr::send(id, &src)
            };
            a.send(&[wr]).unwrap();
            if s < B_SENDS {
                // From b's second quarter: a's WRITEs land in its first.
                let src = [Sge::new(
                    b.buf.addr() + (LEN / 4) as u64 + s * u64::from(MSG),
                    MSG,
                    b.mr.lkey(),
                )];
                b.send(&[SendWr::send(wr_id(KIND_SEND, q, s), &src)])
                    .unwrap();
            }
        }
    }
    let per_qp = SHARED_QPS as u64;
    let counts_a = drain_shared_cq(&cqa, &qps_a, (per_qp * (A_OPS + B_SENDS)) as usize);
    let counts_b = drain_shared_cq(&cqb, &qps_b, (per_qp * (B_SENDS + A_OPS / 2)) as usize);
    for q in 0..SHARED_QPS {
        assert_eq!(counts_a[q][KIND_SEND as usize], A_OPS, "a QP {q} sends");
        assert_eq!(
            counts_a[q][KIND_RECV as usize], B_SENDS,
            "a QP {q} receives"
        );
        assert_eq!(counts_b[q][KIND_SEND as usize], B_SENDS, "b QP {q} sends");
        assert_eq!(
            counts_b[q][KIND_RECV as usize],
            A_OPS / 2,
            "b QP {q} receives"
        );
    }
    // The bytes: a's WRITEs land at the same offset of b, a's SENDs at b's receive buffers (in
    // order), and b's SENDs at a's.
    for (q, (a, b)) in pairs.iter().enumerate() {
        let m = MSG as usize;
        for s in 0..A_OPS as usize {
            let got = if s % 2 == 0 {
                read(&b.buf, s * m, m)
            } else {
                read(&b.buf, LEN / 2 + (s / 2) * m, m)
            };
            same(
                &got,
                &read(&a.buf, s * m, m),
                &format!("QP {q}: a's message {s}"),
            );
        }
        for s in 0..B_SENDS as usize {
            same(
                &read(&a.buf, LEN / 2 + s * m, m),
                &read(&b.buf, LEN / 4 + s * m, m),
                &format!("QP {q}: b's message {s}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. SIGKILLed guests, over and over: the daemon does not grow
// ---------------------------------------------------------------------------------------------

const CHILD_SOCKET: &str = "VRDMA_E2E_CHILD_SOCKET";
const CHILD_PEER: &str = "VRDMA_E2E_CHILD_PEER";
/// The child's MR.
const CHILD_MR: usize = 4 << 20;
/// What the parent writes into each child (and reads back): 256 KiB the daemon must touch in
/// the child's memory, so a leaked mapping of a dead guest's memory shows in the daemon's RSS.
const PARENT_WRITE: usize = 256 << 10;
/// Parent buffer: [0, 1 MiB) is the child's target, then the source, then the read-back area.
const PARENT_BUF: usize = 2 << 20;
const SRC_OFF: usize = 1 << 20;
const BACK_OFF: usize = SRC_OFF + PARENT_WRITE;

/// The child guest of `sigkilled_guests_do_not_grow_the_daemon`: opens VM b, creates a PD, a
/// CQ, an RC QP and a 4 MiB MR, connects to the parent's QP, prints READY, waits for GO, then
/// writes into the parent's buffer for ever (until it is killed). Does nothing as an ordinary
/// test.
#[test]
#[ignore = "run by sigkilled_guests_do_not_grow_the_daemon as a child process"]
fn cycle_child_guest() {
    let Ok(socket) = std::env::var(CHILD_SOCKET) else {
        return;
    };
    let peer = std::env::var(CHILD_PEER).expect("peer");
    let f: Vec<u64> = peer
        .split_whitespace()
        .map(|x| x.parse().expect("number"))
        .collect();
    let (qpn, rkey, addr) = (f[0] as u32, f[1] as u32, f[2]);
    let options = Options {
        memory_size: CHILD_MR + (2 << 20),
        ..Options::default()
    };
    let ctx = Context::open_with(&socket, options).expect("child connects");
    let e = Endpoint::new(&ctx, QpType::Rc, CHILD_MR, cap(16));
    connect_rc(&e.qp, Gid::from_ipv4([10, 0, 0, 1]), qpn, 7, 7);
    println!("READY {} {} {}", e.qp.qp_num(), e.mr.rkey(), e.buf.addr());
    // The parent says GO once its QP is connected; if it goes away, so does the child.
    let (go_tx, go_rx) = channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l == "GO" => {
                    let _ = go_tx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        std::process::exit(0);
    });
    go_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("GO from the parent");
    let src = [Sge::new(e.buf.addr(), 4096, e.mr.lkey())];
    let (mut posted, mut done, mut announced) = (0u64, 0u64, false);
    let mut wc = [empty_wc(); 16];
    loop {
        while posted - done < 8 {
            let to = addr + (posted % 256) * 4096;
            e.send(&[SendWr::rdma_write(posted, &src, to, rkey)])
                .expect("child posts");
            posted += 1;
        }
        let n = e.cq.poll(&mut wc).expect("child polls");
        for w in &wc[..n] {
            assert_eq!(w.status, WcStatus::Success, "child: {w:?}");
        }
        done += n as u64;
        if !announced && done > 0 {
            println!("TRAFFIC {done}");
            announced = true;
        }
        if n == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn fresh_qp(pd: &ProtectionDomain, cq: &CompletionQueue) -> QueuePair {
    QueuePair::new(
        pd,
        &QpInitAttr {
            send_cq: cq,
            recv_cq: cq,
            srq: None,
            cap: cap(16),
            qp_type: QpType::Rc,
            sq_sig_all: false,
        },
    )
    .expect("create qp")
}

#[test]
fn sigkilled_guests_do_not_grow_the_daemon() {
    const CYCLES: usize = 200;
    const WARMUP: usize = 20;
    let dog = Watchdog::start("sigkill_cycles", Duration::from_secs(300));
    let dir = TempDir::new();
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let mut daemon = spawn_daemon(
        &[("a", &sock_a, "10.0.0.1"), ("b", &sock_b, "10.0.0.2")],
        &dog,
    );
    let ca = Context::open(&sock_a).expect("parent opens VM a");
    let mut a = Endpoint::new(&ca, QpType::Rc, PARENT_BUF, cap(16));
    fill_random(&a.buf, 4242);
    let exe = std::env::current_exe().expect("test binary");
    let gid_b = Gid::from_ipv4([10, 0, 0, 2]);

    let started = Instant::now();
    let mut warm: Option<ProcStats> = None;
    let mut connected: Option<ProcStats> = None;
    let mut retry_exc = 0usize;
    for cycle in 1..=CYCLES {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--exact",
            "cycle_child_guest",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SOCKET, &sock_b)
        .env(
            CHILD_PEER,
            format!("{} {} {}", a.qp.qp_num(), a.mr.rkey(), a.buf.addr()),
        );
        let mut child = Proc::spawn(&format!("child {cycle}"), &mut cmd, false, &dog);
        let ready = child.expect_line("READY", Duration::from_secs(20));
        let f: Vec<u64> = ready
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().expect("number"))
            .collect();
        let (b_qpn, b_rkey, b_addr) = (f[0] as u32, f[1] as u32, f[2]);
        connect_rc(&a.qp, gid_b, b_qpn, 7, 7);
        child.write_line("GO");

        // The parent's writes into the child, read back and compared.
        let at = (cycle * PARENT_WRITE) % (CHILD_MR - PARENT_WRITE);
        let chunk = PARENT_WRITE / 4;
        let srcs: Vec<[Sge; 1]> = (0..4)
            .map(|i| {
                [Sge::new(
                    a.buf.addr() + (SRC_OFF + i * chunk) as u64,
                    chunk as u32,
                    a.mr.lkey(),
                )]
            })
            .collect();
        let writes: Vec<SendWr<'_>> = srcs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                SendWr::rdma_write(i as u64, s, b_addr + (at + i * chunk) as u64, b_rkey)
                    .with_flags(SendFlags::empty())
            })
            .collect();
        a.send(&writes).expect("parent writes");
        // Last cycle's read-back holds the same bytes: clear it, so only this READ can pass.
        a.buf
            .write_at(BACK_OFF, &vec![0u8; PARENT_WRITE])
            .expect("clear read-back area");
        let back = [Sge::new(
            a.buf.addr() + BACK_OFF as u64,
            PARENT_WRITE as u32,
            a.mr.lkey(),
        )];
        a.send(&[SendWr::rdma_read(10, &back, b_addr + at as u64, b_rkey)])
            .expect("parent reads back");
        let wc = a.poll_one();
        assert_eq!(
            (wc.wr_id, wc.status, wc.byte_len),
            (10, WcStatus::Success, PARENT_WRITE as u32),
            "cycle {cycle}: {wc:?}"
        );
        same(
            &read(&a.buf, BACK_OFF, PARENT_WRITE),
            &read(&a.buf, SRC_OFF, PARENT_WRITE),
            &format!("cycle {cycle}: what the parent wrote into the child, read back"),
        );
        child.expect_line("TRAFFIC", Duration::from_secs(10));
        if cycle == WARMUP {
            connected = Some(proc_stats(daemon.pid()));
        }

        // Work in progress when the child dies: SENDs it never posts receives for.
        let small = [Sge::new(a.buf.addr() + SRC_OFF as u64, 64, a.mr.lkey())];
        a.send(&[SendWr::send(100, &small), SendWr::send(101, &small)])
            .expect("parent sends");
        std::thread::sleep(Duration::from_millis(2));
        child.kill();

        let wc = a.poll_one();
        assert_eq!(wc.wr_id, 100, "cycle {cycle}: {wc:?}");
        match wc.status {
            WcStatus::RetryExcErr => {
                assert_eq!(wc.vendor_err, VendorErr::PeerUnreachable.raw());
                retry_exc += 1;
            }
            // The scheduler had not started the SEND yet: it is flushed like the rest.
            WcStatus::WrFlushErr => {}
            other => panic!("cycle {cycle}: SEND completed with {other:?}"),
        }
        let wc = a.poll_one();
        assert_eq!(
            (wc.wr_id, wc.status),
            (101, WcStatus::WrFlushErr),
            "cycle {cycle}"
        );
        assert_eq!(
            a.qp.query().expect("query qp").0.qp_state,
            QpState::Err,
            "cycle {cycle}"
        );
        daemon.expect_line("vm b: resources released", Duration::from_secs(10));
        // Nothing of the child's connection is left in the daemon now.
        daemon.expect_line("vm b: waiting for a frontend", Duration::from_secs(10));
        assert_cq_empty(&a.cq);
        // A fresh QP for the next child (the old one is destroyed).
        a.qp = fresh_qp(&a.pd, &a.cq);

        if cycle == WARMUP {
            warm = Some(proc_stats(daemon.pid()));
        }
    }
    let elapsed = started.elapsed();
    let warm = warm.expect("warm-up sample");
    let end = stats_once_threads_are(daemon.pid(), warm.threads, Duration::from_secs(10));
    let connected = connected.expect("sample with a child connected");
    eprintln!(
        "{CYCLES} SIGKILL cycles in {elapsed:?} ({retry_exc} saw RETRY_EXC_ERR first)\n\
         daemon with child {WARMUP} connected: {}\n\
         daemon after cycle {WARMUP}: {}\ndaemon after cycle {CYCLES}: {}",
        connected.describe(),
        warm.describe(),
        end.describe()
    );
    // Bound: 10 MiB over 180 cycles. What a dead guest leaves behind if it leaks: its memory
    // mapping, of which the daemon touched at least the 256 KiB the parent wrote and read
    // back plus its rings (180 x 256 KiB = 45 MiB), or its tables and buffers on the heap.
    // Anything of 57 KiB or more per cycle exceeds the bound; allocator fragmentation and
    // tables that grow to their high-water mark after warm-up stay well below it.
    // The measure can see such a leak: while a child is connected, the pages the daemon touched
    // in its memory count in the daemon's RSS, and they leave with it.
    assert!(
        connected.rss_shmem_kib >= warm.rss_shmem_kib + (PARENT_WRITE / 1024) as u64,
        "a connected child's memory does not show in the daemon's RSS: connected {}; after \
         release {}",
        connected.describe(),
        warm.describe()
    );
    let growth_kib = end.vm_rss_kib.saturating_sub(warm.vm_rss_kib);
    assert!(
        growth_kib < 10 * 1024,
        "the daemon's RSS grew by {growth_kib} KiB over {} cycles: {warm:?} -> {end:?}",
        CYCLES - WARMUP
    );
    // Threads are exact: each connection's vring worker and vhost-user thread must be gone.
    // (File descriptors have a test of their own, `a_departed_guest_leaves_no_fd_behind`.)
    assert_eq!(end.threads, warm.threads, "daemon threads leaked");

    // VM b still takes a guest, and traffic works.
    let cb = Context::open(&sock_b).expect("VM b accepts a new guest");
    let (x, y) = rc_pair(&ca, &cb, 1 << 16, cap(16));
    fill_random(&x.buf, 77);
    let src = [Sge::new(x.buf.addr(), 60_000, x.mr.lkey())];
    x.send(&[SendWr::rdma_write(1, &src, y.buf.addr() + 10, y.mr.rkey())])
        .unwrap();
    assert_eq!(x.poll_one().status, WcStatus::Success);
    same(
        &read(&y.buf, 10, 60_000),
        &read(&x.buf, 0, 60_000),
        "VM b after the cycles",
    );
    drop((x, y, cb, a, ca));
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon did not exit cleanly on SIGTERM: {status:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The daemon goes away: guests get a clear error, not a hang
// ---------------------------------------------------------------------------------------------

/// Runs `f`, which must fail within `limit`; returns the error chain.
fn fails_quickly<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> Result<T, String>,
) -> String {
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    let err = match r {
        Ok(v) => panic!("{what} did not fail after the daemon died: {v:?}"),
        Err(e) => e,
    };
    assert!(took < limit, "{what} took {took:?} to fail: {err}");
    eprintln!("{what}: failed in {took:?}: {err}");
    err
}

fn chain(e: &vrdma::Error) -> String {
    vrdma::error_chain(e)
}

#[test]
fn guests_get_a_clear_error_when_the_daemon_dies_and_reconnect_after_a_restart() {
    let dog = Watchdog::start("daemon_restart", Duration::from_secs(120));
    let dir = TempDir::new();
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let vms = [
        ("a", sock_a.as_path(), "10.0.0.1"),
        ("b", sock_b.as_path(), "10.0.0.2"),
    ];
    let mut daemon = spawn_daemon(&vms, &dog);
    let options = Options {
        timeout: Duration::from_secs(1),
        ..Options::default()
    };
    let ca = Context::open_with(&sock_a, options.clone()).expect("open a");
    let cb = Context::open_with(&sock_b, options.clone()).expect("open b");
    let (a, b) = rc_pair(&ca, &cb, 1 << 16, cap(16));
    let comp = CompletionChannel::new(&ca).unwrap();
    let src = [Sge::new(a.buf.addr(), 4096, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(1, &src, b.buf.addr(), b.mr.rkey())])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success, "traffic before");

    let limit = Duration::from_secs(2);
    let socket = sock_a.display().to_string();
    let clear = |e: &str| {
        assert!(
            e.contains(&socket) || e.contains("gone"),
            "the error neither names {socket} nor says the device is gone: {e}"
        );
    };
    // A thread blocked in get_cq_event (armed CQ, long timeout) when the daemon dies.
    a.cq.req_notify(false).unwrap();
    let (waiter_tx, waiter_rx) = channel();
    std::thread::scope(|scope| {
        let comp = &comp;
        scope.spawn(move || {
            let r = comp.get_cq_event(Some(Duration::from_secs(20)));
            let _ = waiter_tx.send((Instant::now(), r.map_err(|e| chain(&e))));
        });
        // Let it block first.
        std::thread::sleep(Duration::from_millis(50));
        daemon.signal("TERM");
        let status = daemon.wait_exit(Duration::from_secs(15));
        let died = Instant::now();
        assert!(
            status.is_some_and(|s| s.success()),
            "daemon did not exit cleanly on SIGTERM: {status:?}"
        );
        let (woke, r) = waiter_rx
            .recv_timeout(Duration::from_secs(25))
            .expect("the blocked get_cq_event returned");
        let after = woke.saturating_duration_since(died);
        let err = match r {
            Ok(v) => panic!("a blocked get_cq_event returned {v:?} after the daemon died"),
            Err(e) => e,
        };
        assert!(
            after < limit,
            "a blocked get_cq_event woke {after:?} after the daemon died"
        );
        eprintln!("blocked get_cq_event: failed {after:?} after the daemon exited: {err}");
        clear(&err);
    });
    assert!(!sock_a.exists(), "the daemon left its socket behind");
    clear(&fails_quickly("query_device", limit, || {
        ca.query_device().map_err(|e| chain(&e))
    }));
    clear(&fails_quickly("post_send + poll", limit, || {
        a.send(&[SendWr::rdma_write(2, &src, b.buf.addr(), b.mr.rkey())])
            .map_err(|e| chain(&e))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut wc = [empty_wc(); 1];
        loop {
            match a.cq.poll(&mut wc) {
                Err(e) => return Err(chain(&e)),
                Ok(1) => return Ok(format!("post_send succeeded, then completion {:?}", wc[0])),
                Ok(_) if Instant::now() > deadline => {
                    return Ok("post_send succeeded, then poll found nothing for 3 s".into());
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }));
    clear(&fails_quickly("create_cq", limit, || {
        CompletionQueue::new(&ca, 16).map_err(|e| chain(&e))
    }));
    clear(&fails_quickly("modify_qp", limit, || {
        a.qp.modify(
            &QpAttr {
                qp_state: QpState::Err,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .map_err(|e| chain(&e))
    }));
    a.cq.req_notify(false).unwrap();
    clear(&fails_quickly("get_cq_event", limit, || {
        comp.get_cq_event(Some(Duration::from_secs(3)))
            .map_err(|e| chain(&e))
    }));
    // Opening the dead socket fails at once and names it.
    let err = fails_quickly("Context::open", Duration::from_millis(500), || {
        Context::open_with(&sock_a, options.clone()).map_err(|e| chain(&e))
    });
    assert!(err.contains(&socket), "{err}");

    // A new daemon on the same sockets serves new guests.
    let mut daemon = spawn_daemon(&vms, &dog);
    let ca2 = Context::open_with(&sock_a, options.clone()).expect("open a again");
    let cb2 = Context::open_with(&sock_b, options).expect("open b again");
    let (x, y) = rc_pair(&ca2, &cb2, 1 << 16, cap(16));
    fill_random(&x.buf, 5);
    let src = [Sge::new(x.buf.addr(), 5000, x.mr.lkey())];
    x.send(&[SendWr::rdma_write(1, &src, y.buf.addr(), y.mr.rkey())])
        .unwrap();
    assert_eq!(x.poll_one().status, WcStatus::Success);
    same(
        &read(&y.buf, 0, 5000),
        &read(&x.buf, 0, 5000),
        "after the restart",
    );
    ca2.query_device().expect("query_device on the new daemon");
    // The old objects are dropped against a dead connection without hanging.
    let t = Instant::now();
    drop((a, b, comp, ca, cb));
    assert!(
        t.elapsed() < limit,
        "dropping dead objects took {:?}",
        t.elapsed()
    );
    drop((x, y, ca2, cb2));
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// 6. Resources of departed guests: file descriptors
// ---------------------------------------------------------------------------------------------

/// Every guest connection's file descriptors (the vhost-user socket, the kick and call eventfds
/// the frontend sent, the memfds of its memory, the vring worker's epoll and eventfds) are
/// closed when it goes. A daemon that leaks even one per connection runs out after about a
/// thousand VM reboots under the usual soft limit of 1024 descriptors. (vhost-user-backend
/// 0.24 leaked the exit eventfd of every connection; the workspace patches it, see
/// third_party/vhost-user-backend/VRDMA-PATCH.md.)
#[test]
fn a_departed_guest_leaves_no_fd_behind() {
    const WARMUP: usize = 5;
    const CONNECTIONS: usize = 40;
    let dog = Watchdog::start("fd_leak", Duration::from_secs(120));
    let dir = TempDir::new();
    let sock = dir.path("a.sock");
    let mut daemon = spawn_daemon(&[("a", &sock, "10.0.0.1")], &dog);
    let mut warm = None;
    for i in 1..=CONNECTIONS {
        let ctx = Context::open(&sock).expect("open");
        let e = Endpoint::new(&ctx, QpType::Rc, 1 << 16, cap(16));
        drop((e, ctx));
        daemon.expect_line("vm a: resources released", Duration::from_secs(10));
        // The daemon has dropped everything of this connection and made what the next one
        // needs: until a guest connects, its descriptors are the same after every connection.
        daemon.expect_line("vm a: waiting for a frontend", Duration::from_secs(10));
        if i == WARMUP {
            warm = Some((proc_stats(daemon.pid()), fd_kinds(daemon.pid())));
        }
    }
    let (warm, warm_kinds) = warm.expect("warm-up sample");
    let end = stats_once_threads_are(daemon.pid(), warm.threads, Duration::from_secs(10));
    eprintln!(
        "after connection {WARMUP}: {}\nafter connection {CONNECTIONS}: {}",
        warm.describe(),
        end.describe()
    );
    assert_eq!(end.threads, warm.threads, "daemon threads leaked");
    assert_eq!(
        end.fds,
        warm.fds,
        "{} guest connections left {} file descriptors open in the daemon; before: {:?}, \
         after: {:?}",
        CONNECTIONS - WARMUP,
        end.fds as i64 - warm.fds as i64,
        warm_kinds,
        fd_kinds(daemon.pid())
    );
    assert_eq!(
        memfd_mappings(daemon.pid()),
        0,
        "the memory of departed guests is still mapped in the daemon"
    );
}

/// The daemon's descriptor limit for `five_thousand_guests_in_a_256_fd_daemon`: a quarter of
/// the usual 1024, so a leak of one descriptor per connection exhausts it within about 230
/// connections.
const SMALL_NOFILE: libc::rlim_t = 256;

/// Limits the process `cmd` starts to `SMALL_NOFILE` open descriptors.
fn limit_fds(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let set_limit = || {
        let limit = libc::rlimit {
            rlim_cur: SMALL_NOFILE,
            rlim_max: SMALL_NOFILE,
        };
        // SAFETY: `limit` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
    // functions may be called: it makes one system call (setrlimit) and builds an OS error
    // from errno, without allocating or taking locks.
    unsafe {
        cmd.pre_exec(set_limit);
    }
}

/// What a VM that reboots for ever does to the daemon: 5,000 guests connect (the whole
/// vhost-user handshake, memory table and virtqueues included) and leave, one after another,
/// against a daemon process limited to 256 descriptors. Its descriptors must stay exactly what
/// they were after the warm-up, and at the end it still serves a guest. With the one
/// descriptor per connection vhost-user-backend 0.24 leaked, the daemon stopped answering
/// after about 225 guests.
#[test]
fn five_thousand_guests_in_a_256_fd_daemon() {
    const CYCLES: usize = 5000;
    const WARMUP: usize = 10;
    let dog = Watchdog::start("fd_limit", Duration::from_secs(600));
    let dir = TempDir::new();
    let (sock_a, sock_b) = (dir.path("a.sock"), dir.path("b.sock"));
    let mut daemon = spawn_daemon_with(
        &[("a", &sock_a, "10.0.0.1"), ("b", &sock_b, "10.0.0.2")],
        &dog,
        limit_fds,
    );
    let pid = daemon.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc limits");
    let nofile: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .expect("open files limit")
        .split_whitespace()
        .collect();
    assert_eq!(
        nofile[..2],
        [SMALL_NOFILE.to_string(), SMALL_NOFILE.to_string()],
        "the daemon's descriptor limit"
    );

    let started = Instant::now();
    let mut warm: Option<ProcStats> = None;
    for cycle in 1..=CYCLES {
        let ctx = Context::open(&sock_a)
            .unwrap_or_else(|e| panic!("cycle {cycle}: the daemon refused a guest: {}", chain(&e)));
        drop(ctx);
        daemon.expect_line("vm a: resources released", Duration::from_secs(10));
        // Nothing of the last connection is left and the next one's objects exist: the
        // daemon's descriptors are the same at this point of every cycle.
        daemon.expect_line("vm a: waiting for a frontend", Duration::from_secs(10));
        let now = proc_stats(pid);
        match &warm {
            None if cycle == WARMUP => warm = Some(now),
            None => {}
            Some(warm) => assert_eq!(
                now.fds,
                warm.fds,
                "cycle {cycle}: the daemon has {} descriptors, {} after cycle {WARMUP}; now: \
                 {:?}",
                now.fds,
                warm.fds,
                fd_kinds(pid)
            ),
        }
    }
    let elapsed = started.elapsed();
    let warm = warm.expect("warm-up sample");
    let end = stats_once_threads_are(pid, warm.threads, Duration::from_secs(10));
    eprintln!(
        "{CYCLES} connections in {elapsed:?} ({:?} each)\nafter cycle {WARMUP}: {}\n\
         after cycle {CYCLES}: {}",
        elapsed / CYCLES as u32,
        warm.describe(),
        end.describe()
    );
    assert_eq!(end.threads, warm.threads, "daemon threads leaked");
    assert_eq!(
        memfd_mappings(pid),
        0,
        "the memory of departed guests is still mapped in the daemon"
    );

    // VM a still takes a guest, and it works: an RDMA WRITE to VM b lands.
    let ca = Context::open(&sock_a).expect("VM a accepts a guest after the cycles");
    let cb = Context::open(&sock_b).expect("VM b accepts a guest");
    // The check above can see a guest's memory: two guests' memfds are mapped now.
    assert!(
        memfd_mappings(pid) >= 2,
        "connected guests' memory does not show in the daemon's mappings"
    );
    let (x, y) = rc_pair(&ca, &cb, 1 << 16, cap(16));
    fill_random(&x.buf, 5000);
    let src = [Sge::new(x.buf.addr(), 60_000, x.mr.lkey())];
    x.send(&[SendWr::rdma_write(1, &src, y.buf.addr() + 10, y.mr.rkey())])
        .expect("post the write");
    assert_eq!(x.poll_one().status, WcStatus::Success);
    same(
        &read(&y.buf, 10, 60_000),
        &read(&x.buf, 0, 60_000),
        "VM a's guest after the cycles",
    );
    drop((x, y, ca, cb));
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. A daemon that does not answer: timeouts, not hangs
// ---------------------------------------------------------------------------------------------

/// `Context::open_with` in a thread, bounded: returns how long it took and its error, or fails
/// the test if it has not returned within `limit`.
fn open_fails_within(socket: &Path, options: &Options, limit: Duration) -> (Duration, String) {
    let (tx, rx) = channel();
    let (socket, options) = (socket.to_owned(), options.clone());
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = Context::open_with(&socket, options).map(|_| ());
        let _ = tx.send((t.elapsed(), r.map_err(|e| chain(&e))));
    });
    match rx.recv_timeout(limit) {
        Ok((took, Err(e))) => (took, e),
        Ok((took, Ok(()))) => panic!("Context::open succeeded after {took:?}"),
        Err(_) => panic!("Context::open neither succeeded nor failed within {limit:?}"),
    }
}

#[test]
fn a_busy_or_stopped_daemon_gives_timeouts_not_hangs() {
    let dog = Watchdog::start("stopped_daemon", Duration::from_secs(120));
    let dir = TempDir::new();
    let sock = dir.path("a.sock");
    let mut daemon = spawn_daemon(&[("a", &sock, "10.0.0.1")], &dog);
    let options = Options {
        timeout: Duration::from_secs(1),
        ..Options::default()
    };
    let socket = sock.display().to_string();
    let ctx = Context::open_with(&sock, options.clone()).expect("open");
    let pd = ProtectionDomain::new(&ctx).expect("pd");

    // The daemon serves one frontend per socket: a second guest gets an error in time.
    let (took, err) = open_fails_within(&sock, &options, Duration::from_secs(5));
    eprintln!("second guest on a busy socket: failed in {took:?}: {err}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(err.contains(&socket), "{err}");
    // The first guest is undisturbed.
    ctx.query_device().expect("the first guest still works");

    // A stopped daemon: control commands and opens time out, naming the socket.
    daemon.signal("STOP");
    daemon.wait_stopped(Duration::from_secs(5));
    let t = Instant::now();
    let err = chain(
        &ctx.query_device()
            .expect_err("query_device on a stopped daemon"),
    );
    let took = t.elapsed();
    eprintln!("query_device on a stopped daemon: failed in {took:?}: {err}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(err.contains(&socket), "{err}");
    let (took, err) = open_fails_within(&sock, &options, Duration::from_secs(5));
    eprintln!("Context::open on a stopped daemon: failed in {took:?}: {err}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(err.contains(&socket), "{err}");

    // Once it runs again and the first guest has gone, the socket serves a new guest.
    daemon.signal("CONT");
    drop((pd, ctx));
    let deadline = Instant::now() + Duration::from_secs(10);
    let ctx = loop {
        match Context::open_with(&sock, options.clone()) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reopening: {}", chain(&e));
            }
            Err(e) => panic!("the socket never served a new guest: {}", chain(&e)),
        }
    };
    ctx.query_device().expect("a new guest works");
    drop(ctx);
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
