//! One guest: opens its VM's vrdma device over virtio-user, connects an RC QP to the other
//! guest's, and runs the tests. The client drives and prints the tables; the server answers.
//!
//! Buffer layout of each guest's one registered buffer:
//!
//! ```text
//! [0, 1 MiB)             TARGET: where the other guest's RDMA WRITEs land
//! [1 MiB, 2 MiB)         SOURCE: what this guest writes or sends from
//! [2 MiB, 2 MiB+64 KiB)  INBOX:  where every posted receive points (perftest style)
//! ```
//!
//! Per size, the client sends `RUN test size iterations seed`, both sides prepare their
//! buffers and the server answers `READY`; both run; the client sends `DONE` once all its
//! completions are in, the server checks what it received and answers `OK` (or `ERR why`).
//! The client first runs a short warm-up of each size, and sizes the measured run from it so
//! every size takes about `--ms-per-size`.
//!
//! Waits busy-poll (memory or a CQ) for 64 rounds, then yield the CPU on every further round,
//! so on a small machine the daemon's threads are not starved by two polling guests.
//! `VRDMA_DEMO_SPIN=N` changes the number of pure spin rounds (a large N never yields).

use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use vrdma::mem::DmaBuf;
use vrdma::{
    CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpCap, QpInitAttr, QpType, QueuePair,
    RecvWr, SendFlags, SendWr, Sge, WcOpcode, WcStatus, WorkCompletion,
};
use vrdma_proto::config::Mtu;

use vrdma_tests::empty_wc;

use super::report::{self, Address, Bandwidth, Latency, Setup};
use super::wire::{Control, Hello};

/// Largest message of any test.
const MAX_MSG: usize = 1 << 20;
/// Largest SEND of any test, and the length of every receive.
const MAX_SEND: usize = 64 << 10;
const TARGET: usize = 0;
const SOURCE: usize = MAX_MSG;
const INBOX: usize = 2 * MAX_MSG;
const BUF_LEN: usize = INBOX + MAX_SEND;
/// Bandwidth tests keep this many sends outstanding...
const TX_DEPTH: u64 = 64;
/// ...and signal every this many.
const CQ_MOD: u64 = 16;
/// Receives kept posted.
const RX_DEPTH: u32 = 512;
/// Latency tests send messages up to this size inline (perftest's default for them).
const MAX_INLINE: u32 = 220;
/// Every wait for the device (a completion, a byte to land) gives up after this.
const WAIT: Duration = Duration::from_secs(10);
/// Every wait for the other guest's message gives up after this.
const TCP_TIMEOUT: Duration = Duration::from_secs(30);
/// Latency warm-up iterations per size.
const LAT_WARMUP: u64 = 200;
/// Fewest measured latency iterations.
const LAT_MIN_ITERS: u64 = 1000;

type Res<T> = Result<T, String>;

/// `vrdma-demo guest` options.
#[derive(Debug, clap::Args)]
pub struct GuestArgs {
    /// The VM's vhost-user socket (the daemon's `--vm ...,socket=PATH`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Be the passive side: wait for the client on 127.0.0.1:PORT and answer its tests.
    #[arg(long, requires = "port", conflicts_with = "connect")]
    pub server: bool,
    /// The TCP port the server listens on.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Be the active side: connect to the server at ADDR (e.g. 127.0.0.1:18515), run every
    /// test and print the results.
    #[arg(long, value_name = "ADDR", required_unless_present = "server")]
    pub connect: Option<SocketAddr>,
    /// Time to spend measuring each message size, in milliseconds (client only).
    #[arg(long, default_value_t = 1000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub ms_per_size: u64,
}

/// Runs `vrdma-demo guest`.
pub fn run(args: &GuestArgs) -> ExitCode {
    let _ = env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .parse_env("RUST_LOG")
        .try_init();
    let role = if args.server { "server" } else { "client" };
    let result = if args.server {
        server(args)
    } else {
        client(args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "vrdma-demo guest ({role} on {}): {e}",
                args.socket.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// The four tests, in the order they run, with their sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    WriteLat,
    SendLat,
    WriteBw,
    SendBw,
}

impl Test {
    const ALL: [(Test, &'static [usize]); 4] = [
        (Test::WriteLat, &[8, 64, 4096]),
        (Test::SendLat, &[8, 64, 4096]),
        (Test::WriteBw, &[64, 4096, 64 << 10, 1 << 20]),
        (Test::SendBw, &[64, 4096, 64 << 10]),
    ];

    fn name(self) -> &'static str {
        match self {
            Test::WriteLat => "write_lat",
            Test::SendLat => "send_lat",
            Test::WriteBw => "write_bw",
            Test::SendBw => "send_bw",
        }
    }

    fn from_name(name: &str) -> Option<Test> {
        Test::ALL.iter().map(|(t, _)| *t).find(|t| t.name() == name)
    }

    fn title(self) -> &'static str {
        match self {
            Test::WriteLat => "RDMA_Write Latency Test",
            Test::SendLat => "Send Latency Test",
            Test::WriteBw => "RDMA_Write BW Test",
            Test::SendBw => "Send BW Test",
        }
    }

    /// How the test measures, for its header.
    fn method(self) -> &'static str {
        match self {
            Test::WriteLat => {
                "ping-pong, each side polls its buffer for the other's write; half the round trip"
            }
            Test::SendLat => "ping-pong, each side polls its receive CQ; half the round trip",
            Test::WriteBw => {
                "client streams writes into one remote buffer, server idles; peak: best tenth of the run"
            }
            Test::SendBw => {
                "client streams sends, server reposts receives; peak: best tenth of the run"
            }
        }
    }

    fn is_latency(self) -> bool {
        matches!(self, Test::WriteLat | Test::SendLat)
    }

    fn is_send(self) -> bool {
        matches!(self, Test::SendLat | Test::SendBw)
    }

    fn max_size(self) -> usize {
        if self.is_send() { MAX_SEND } else { MAX_MSG }
    }
}

/// One run of one size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phase {
    test: Test,
    size: usize,
    iters: u64,
    seed: u8,
}

impl Phase {
    fn encode(&self) -> String {
        format!(
            "RUN {} {} {} {}",
            self.test.name(),
            self.size,
            self.iters,
            self.seed
        )
    }

    fn decode(line: &str) -> Res<Phase> {
        let bad = || format!("the client sent {line:?}, not a test to run");
        let w: Vec<&str> = line.split_whitespace().collect();
        let [run, test, size, iters, seed] = w[..] else {
            return Err(bad());
        };
        if run != "RUN" {
            return Err(bad());
        }
        let test = Test::from_name(test).ok_or_else(bad)?;
        let size: usize = size.parse().map_err(|_| bad())?;
        let iters: u64 = iters.parse().map_err(|_| bad())?;
        let seed: u8 = seed.parse().map_err(|_| bad())?;
        if size == 0 || size > test.max_size() || iters == 0 {
            return Err(bad());
        }
        if !test.is_latency() && iters % CQ_MOD != 0 {
            return Err(bad());
        }
        Ok(Phase {
            test,
            size,
            iters,
            seed,
        })
    }
}

/// The byte that marks iteration `k` of a latency test (never 0, never the previous one's).
fn tag(k: u64) -> u8 {
    (k % 255) as u8 + 1
}

/// The payload of a phase: a pattern that differs with the seed and the position (so a
/// stale or misplaced chunk shows), optionally with its last byte replaced by a tag.
fn payload(seed: u8, size: usize, last: Option<u8>) -> Vec<u8> {
    let mut v: Vec<u8> = (0..size)
        .map(|i| ((i.wrapping_mul(31) ^ (i >> 8).wrapping_mul(7)) as u8).wrapping_add(seed))
        .collect();
    if let (Some(t), Some(b)) = (last, v.last_mut()) {
        *b = t;
    }
    v
}

fn verbs<T>(r: vrdma::Result<T>, what: &str) -> Res<T> {
    r.map_err(|e| format!("{what}: {}", vrdma::error_chain(&e)))
}

fn mem<T>(r: Result<T, vrdma::mem::MemError>, what: &str) -> Res<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Busy-polling with a deadline. After a short spin it yields the CPU on every round: with
/// two guests polling on a two-core machine, the daemon's threads would otherwise wait for a
/// time slice.
#[derive(Debug)]
struct Poller {
    start: Instant,
    rounds: u32,
}

impl Poller {
    fn new() -> Poller {
        Poller {
            start: Instant::now(),
            rounds: 0,
        }
    }

    /// Nothing yet: waits a little; fails once `WAIT` has passed since the last progress.
    fn idle(&mut self, what: impl FnOnce() -> String) -> Res<()> {
        self.rounds = self.rounds.wrapping_add(1);
        if self.rounds % 256 == 0 && self.start.elapsed() > WAIT {
            return Err(format!("{} within {} s", what(), WAIT.as_secs()));
        }
        if self.rounds > spin_rounds() {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// Something arrived: the deadline starts again.
    fn progress(&mut self) {
        self.start = Instant::now();
        self.rounds = 0;
    }
}

fn spin_rounds() -> u32 {
    static ROUNDS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ROUNDS.get_or_init(|| {
        std::env::var("VRDMA_DEMO_SPIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64)
    })
}

/// What a measured phase produced (the client's view).
#[derive(Debug)]
enum Outcome {
    Latency(Vec<Duration>),
    Bandwidth(Bandwidth, Duration),
}

impl Outcome {
    /// Time of the measured loop per iteration.
    fn per_iteration(&self) -> Duration {
        match self {
            Outcome::Latency(rtts) => {
                rtts.iter().sum::<Duration>() / u32::try_from(rtts.len().max(1)).unwrap_or(1)
            }
            Outcome::Bandwidth(bw, elapsed) => {
                *elapsed / u32::try_from(bw.iterations.max(1)).unwrap_or(u32::MAX)
            }
        }
    }
}

/// The device, the QP and the buffer of one guest. Fields drop in order: QP, MR, CQs, PD,
/// buffer, device.
#[derive(Debug)]
struct Guest {
    qp: QueuePair,
    mr: MemoryRegion,
    scq: CompletionQueue,
    rcq: CompletionQueue,
    _pd: ProtectionDomain,
    buf: DmaBuf,
    ctx: Context,
    mtu: Mtu,
    /// Receives posted and not yet completed.
    rq_posted: u32,
    /// The other guest, once known.
    peer: Option<Hello>,
}

impl Guest {
    fn open(socket: &Path) -> Res<Guest> {
        let ctx = verbs(
            Context::open(socket),
            &format!("cannot open the vrdma device at {}", socket.display()),
        )?;
        let port = verbs(ctx.query_port(1), "cannot query port 1")?;
        let mtu = Mtu::from_raw(port.active_mtu).unwrap_or(Mtu::Mtu1024);
        let pd = verbs(ProtectionDomain::new(&ctx), "cannot allocate a PD")?;
        let scq = verbs(CompletionQueue::new(&ctx, 256), "cannot create the send CQ")?;
        let rcq = verbs(
            CompletionQueue::new(&ctx, 2 * RX_DEPTH),
            "cannot create the receive CQ",
        )?;
        let qp = verbs(
            QueuePair::new(
                &pd,
                &QpInitAttr {
                    send_cq: &scq,
                    recv_cq: &rcq,
                    srq: None,
                    cap: QpCap {
                        // Exactly the depths in use, as perftest sizes its queues: a slot is
                        // free as soon as its completion has been polled.
                        max_send_wr: TX_DEPTH as u32,
                        max_recv_wr: RX_DEPTH,
                        max_send_sge: 1,
                        max_recv_sge: 1,
                        max_inline_data: MAX_INLINE,
                    },
                    qp_type: QpType::Rc,
                    sq_sig_all: false,
                },
            ),
            "cannot create the RC QP",
        )?;
        let buf = verbs(ctx.alloc(BUF_LEN), "cannot allocate the buffer")?;
        let mr = verbs(
            MemoryRegion::register(&pd, &buf, vrdma_tests::all_access()),
            "cannot register the buffer",
        )?;
        Ok(Guest {
            qp,
            mr,
            scq,
            rcq,
            _pd: pd,
            buf,
            ctx,
            mtu,
            rq_posted: 0,
            peer: None,
        })
    }

    fn hello(&self) -> Hello {
        Hello {
            qpn: self.qp.qp_num(),
            gid: self.ctx.gid(),
            addr: self.buf.addr(),
            rkey: self.mr.rkey(),
            len: self.buf.len() as u64,
        }
    }

    fn peer(&self) -> Hello {
        self.peer.unwrap_or(Hello {
            qpn: 0,
            gid: vrdma_proto::Gid::default(),
            addr: 0,
            rkey: 0,
            len: 0,
        })
    }

    /// RESET -> INIT -> RTR -> RTS towards the other guest's QP, as `ibv_rc_pingpong` does.
    fn connect(&mut self, peer: Hello) -> Res<()> {
        if peer.len < BUF_LEN as u64 {
            return Err(format!(
                "the other guest's buffer has {} bytes; {BUF_LEN} are needed",
                peer.len
            ));
        }
        let path = vrdma_tests::RcPeer {
            gid: peer.gid,
            qpn: peer.qpn,
            mtu: self.mtu,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
        };
        vrdma_tests::try_connect_rc(&self.qp, &path).map_err(|(state, e)| {
            format!(
                "cannot move the QP to {state:?}: {}",
                vrdma::error_chain(&e)
            )
        })?;
        self.peer = Some(peer);
        Ok(())
    }

    fn addr(&self, offset: usize) -> u64 {
        self.buf.addr() + offset as u64
    }

    fn post_send(&self, wrs: &[SendWr<'_>]) -> Res<()> {
        for sge in wrs.iter().flat_map(|wr| wr.sg_list) {
            let (start, len) = (sge.addr.get(), u64::from(sge.length.get()));
            if start < self.buf.addr() || start + len > self.addr(BUF_LEN) {
                return Err(format!(
                    "internal error: SGE {start:#x}+{len} outside the buffer"
                ));
            }
        }
        // SAFETY: every SGE lies in `self.buf` (checked above), which outlives the QP's use of
        // it: the QP is dropped first. The SOURCE bytes a request names are only rewritten
        // after that request's completion has been polled (latency tests poll each one before
        // changing the tag byte; bandwidth tests never change them during a run), and
        // inline requests copy them during this call.
        verbs(unsafe { self.qp.post_send(wrs) }, "posting sends")
    }

    /// Posts receives until `RX_DEPTH` are outstanding, every one covering the INBOX.
    fn top_up_receives(&mut self) -> Res<()> {
        let n = RX_DEPTH - self.rq_posted;
        if n == 0 {
            return Ok(());
        }
        let sge = [Sge::new(self.addr(INBOX), MAX_SEND as u32, self.mr.lkey())];
        let wrs = vec![
            RecvWr {
                wr_id: 0,
                sg_list: &sge,
            };
            n as usize
        ];
        // SAFETY: the SGE lies in `self.buf`, which outlives the QP. All receives share the
        // INBOX, as perftest's do: the device writes it only while the other guest has a SEND
        // in flight, and this guest reads it (with copying reads) only after polling the
        // receive completion of the last SEND the other guest makes in a run.
        verbs(unsafe { self.qp.post_recv(&wrs) }, "posting receives")?;
        self.rq_posted = RX_DEPTH;
        Ok(())
    }

    /// The byte at `offset`, read atomically: the other guest's RDMA WRITEs land there while
    /// this guest polls.
    fn load_byte(&self, offset: usize) -> u8 {
        assert!(
            offset < self.buf.len(),
            "offset {offset} outside the buffer"
        );
        let p = self.buf.as_ptr().wrapping_add(offset);
        // SAFETY: `p` is inside the live mapping of `self.buf` (checked above), which lives as
        // long as `self`; a u8 needs no alignment. This process touches these bytes only with
        // this atomic load or with `DmaBuf`'s copying reads and writes at times when no write
        // to them is in flight; the device writes them from another process.
        unsafe { AtomicU8::from_ptr(p) }.load(Ordering::Acquire)
    }

    /// Spins until the byte at `offset` is `value`.
    fn wait_byte(&self, offset: usize, value: u8, what: impl Fn() -> String) -> Res<()> {
        let mut poller = Poller::new();
        while self.load_byte(offset) != value {
            poller.idle(|| format!("{} did not arrive", what()))?;
        }
        Ok(())
    }

    /// Spins until one completion arrives on `cq`; it must be a successful `opcode`.
    fn wait_completion(
        &self,
        cq: &CompletionQueue,
        opcode: WcOpcode,
        what: impl Fn() -> String,
    ) -> Res<WorkCompletion> {
        let mut wc = [empty_wc()];
        let mut poller = Poller::new();
        loop {
            if verbs(cq.poll(&mut wc), "polling the CQ")? == 1 {
                check(&wc[0], opcode, &what)?;
                return Ok(wc[0]);
            }
            poller.idle(|| format!("no completion for {}", what()))?;
        }
    }

    fn wait_recv(&mut self, size: usize, what: impl Fn() -> String) -> Res<()> {
        let wc = self.wait_completion(&self.rcq, WcOpcode::Recv, &what)?;
        self.rq_posted -= 1;
        if wc.byte_len as usize != size {
            return Err(format!(
                "{}: received {} bytes, expected {size}",
                what(),
                wc.byte_len
            ));
        }
        Ok(())
    }

    /// Gets the buffer ready for `phase` (nothing of the previous one is in flight).
    fn prepare(&mut self, phase: &Phase) -> Res<()> {
        let zeros = vec![0u8; phase.size];
        let area = if phase.test.is_send() { INBOX } else { TARGET };
        mem(self.buf.write_at(area, &zeros), "cannot clear the buffer")?;
        mem(
            self.buf
                .write_at(SOURCE, &payload(phase.seed, phase.size, None)),
            "cannot fill the buffer",
        )?;
        if phase.test.is_send() {
            self.top_up_receives()?;
        }
        Ok(())
    }

    /// Checks that `area` holds what the other guest sent last in `phase`.
    fn verify(&self, phase: &Phase, last: Option<u8>) -> Res<()> {
        let area = if phase.test.is_send() { INBOX } else { TARGET };
        let expected = payload(phase.seed, phase.size, last);
        let mut got = vec![0u8; phase.size];
        mem(self.buf.read_at(area, &mut got), "cannot read the buffer")?;
        match got.iter().zip(&expected).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(i) => Err(format!(
                "DATA CORRUPTED in {} of {} bytes: byte {i} is {:#04x}, expected {:#04x}",
                phase.test.title(),
                phase.size,
                got[i],
                expected[i]
            )),
        }
    }

    /// Ping-pong with RDMA WRITE: each side writes into the other's TARGET and polls its own
    /// TARGET's last byte for the other's answer (`ib_write_lat`).
    fn write_lat(&self, phase: &Phase, initiator: bool) -> Res<Vec<Duration>> {
        let size = phase.size;
        let last = TARGET + size - 1;
        let peer = self.peer();
        let sge = [Sge::new(self.addr(SOURCE), size as u32, self.mr.lkey())];
        let mut flags = SendFlags::SIGNALED;
        if size <= MAX_INLINE as usize {
            flags |= SendFlags::INLINE;
        }
        let mut rtts = Vec::with_capacity(if initiator { phase.iters as usize } else { 0 });
        for k in 1..=phase.iters {
            let what = || format!("RDMA WRITE {k} of {} ({size} B)", phase.iters);
            if !initiator {
                self.wait_byte(last, tag(k), what)?;
            }
            if k > 1 {
                self.wait_completion(&self.scq, WcOpcode::RdmaWrite, what)?;
            }
            mem(
                self.buf.write_at(SOURCE + size - 1, &[tag(k)]),
                "cannot write the tag",
            )?;
            let start = Instant::now();
            self.post_send(&[
                SendWr::rdma_write(k, &sge, peer.addr + TARGET as u64, peer.rkey).with_flags(flags),
            ])?;
            if initiator {
                self.wait_byte(last, tag(k), || {
                    format!("the answer to RDMA WRITE {k} of {} ({size} B)", phase.iters)
                })?;
                rtts.push(start.elapsed());
            }
        }
        self.wait_completion(&self.scq, WcOpcode::RdmaWrite, || {
            "the last RDMA WRITE".into()
        })?;
        Ok(rtts)
    }

    /// Ping-pong with SEND and receives (`ib_send_lat`).
    fn send_lat(&mut self, phase: &Phase, initiator: bool) -> Res<Vec<Duration>> {
        let size = phase.size;
        let sge = [Sge::new(self.addr(SOURCE), size as u32, self.mr.lkey())];
        let mut flags = SendFlags::SIGNALED;
        if size <= MAX_INLINE as usize {
            flags |= SendFlags::INLINE;
        }
        let mut rtts = Vec::with_capacity(if initiator { phase.iters as usize } else { 0 });
        for k in 1..=phase.iters {
            let what = || format!("SEND {k} of {} ({size} B)", phase.iters);
            if !initiator {
                self.wait_recv(size, what)?;
                self.top_up_receives()?;
            }
            if k > 1 {
                self.wait_completion(&self.scq, WcOpcode::Send, what)?;
            }
            mem(
                self.buf.write_at(SOURCE + size - 1, &[tag(k)]),
                "cannot write the tag",
            )?;
            let start = Instant::now();
            self.post_send(&[SendWr::send(k, &sge).with_flags(flags)])?;
            if initiator {
                self.wait_recv(size, || {
                    format!("the answer to SEND {k} of {} ({size} B)", phase.iters)
                })?;
                rtts.push(start.elapsed());
                self.top_up_receives()?;
            }
        }
        self.wait_completion(&self.scq, WcOpcode::Send, || "the last SEND".into())?;
        // The other guest sends nothing more in this run: the INBOX holds its last message.
        self.verify(phase, Some(tag(phase.iters)))?;
        Ok(rtts)
    }

    /// Streams `phase.iters` RDMA WRITEs or SENDs with `TX_DEPTH` outstanding, every
    /// `CQ_MOD`th signalled (`ib_write_bw`, `ib_send_bw`).
    fn bw_client(&self, phase: &Phase) -> Res<(Bandwidth, Duration)> {
        let size = phase.size;
        let n = phase.iters;
        let peer = self.peer();
        let sge = [Sge::new(self.addr(SOURCE), size as u32, self.mr.lkey())];
        let (opcode, name) = match phase.test {
            Test::SendBw => (WcOpcode::Send, "SEND"),
            _ => (WcOpcode::RdmaWrite, "RDMA WRITE"),
        };
        let mut wrs: Vec<SendWr<'_>> = Vec::with_capacity(TX_DEPTH as usize);
        let mut wcs = [empty_wc(); 16];
        let mut samples = Vec::with_capacity((n / CQ_MOD) as usize + 1);
        let (mut posted, mut completed) = (0u64, 0u64);
        let mut poller = Poller::new();
        let start = Instant::now();
        while completed < n {
            let room = (TX_DEPTH - (posted - completed)).min(n - posted);
            if room > 0 {
                wrs.clear();
                for id in posted + 1..=posted + room {
                    let flags = if id % CQ_MOD == 0 {
                        SendFlags::SIGNALED
                    } else {
                        SendFlags::empty()
                    };
                    let wr = match phase.test {
                        Test::SendBw => SendWr::send(id, &sge),
                        _ => SendWr::rdma_write(id, &sge, peer.addr + TARGET as u64, peer.rkey),
                    };
                    wrs.push(wr.with_flags(flags));
                }
                self.post_send(&wrs)?;
                posted += room;
            }
            let got = verbs(self.scq.poll(&mut wcs), "polling the send CQ")?;
            if got > 0 {
                let now = Instant::now();
                for wc in &wcs[..got] {
                    check(wc, opcode, &|| {
                        format!("{name} {} of {n} ({size} B)", wc.wr_id)
                    })?;
                    if wc.wr_id <= completed || wc.wr_id > posted {
                        return Err(format!(
                            "{name} completion for request {} out of order (had {completed} of {posted})",
                            wc.wr_id
                        ));
                    }
                    completed = wc.wr_id;
                }
                samples.push((now, completed));
                poller.progress();
            } else {
                poller.idle(|| {
                    format!("no {name} completion ({completed} of {n} {size} B messages done)")
                })?;
            }
        }
        let elapsed = samples.last().map_or(Duration::ZERO, |s| s.0 - start);
        Ok((Bandwidth::from_samples(size, start, &samples), elapsed))
    }

    /// Receives `phase.iters` SENDs, reposting receives as they complete.
    fn send_bw_server(&mut self, phase: &Phase) -> Res<()> {
        let n = phase.iters;
        let mut wcs = [empty_wc(); 64];
        let mut received = 0u64;
        let mut poller = Poller::new();
        while received < n {
            let got = verbs(self.rcq.poll(&mut wcs), "polling the receive CQ")?;
            if got > 0 {
                self.rq_posted -= got as u32;
                for wc in &wcs[..got] {
                    received += 1;
                    check(wc, WcOpcode::Recv, &|| {
                        format!("receive {received} of {n} ({} B)", phase.size)
                    })?;
                    if wc.byte_len as usize != phase.size {
                        return Err(format!(
                            "receive {received} of {n}: {} bytes, expected {}",
                            wc.byte_len, phase.size
                        ));
                    }
                }
                self.top_up_receives()?;
                poller.progress();
            } else {
                poller.idle(|| {
                    format!(
                        "no SEND arrived ({received} of {n} {} B messages received)",
                        phase.size
                    )
                })?;
            }
        }
        // Every message carries the same payload, and the client sends nothing more.
        self.verify(phase, None)
    }

    fn setup(&self) -> Setup {
        let me = self.hello();
        let peer = self.peer();
        let address = |h: Hello| Address {
            qpn: h.qpn,
            rkey: h.rkey,
            vaddr: h.addr,
            gid: h.gid,
        };
        Setup {
            mtu: self.mtu.bytes(),
            local: address(me),
            remote: address(peer),
            exchange: String::new(),
        }
    }
}

/// Checks one completion.
fn check(wc: &WorkCompletion, opcode: WcOpcode, what: &dyn Fn() -> String) -> Res<()> {
    if wc.status != WcStatus::Success {
        return Err(format!(
            "{} failed: completion status {:?} (vendor error {})",
            what(),
            wc.status,
            wc.vendor_err
        ));
    }
    if wc.opcode != opcode {
        return Err(format!(
            "{}: completion opcode {:?}, expected {opcode:?}",
            what(),
            wc.opcode
        ));
    }
    Ok(())
}

/// Exchanges QP information with the other guest and connects the QP.
fn handshake(guest: &mut Guest, ctl: &mut Control) -> Res<()> {
    ctl.send(&guest.hello().encode())?;
    let peer = Hello::decode(&ctl.recv()?)?;
    guest.connect(peer)
}

fn server(args: &GuestArgs) -> Res<()> {
    let port = args.port.ok_or("--server needs --port")?;
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    // Listen first, so the client can connect while the device is being opened.
    let listener = TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on TCP {addr}: {e} (is the port in use?)"))?;
    let mut guest = Guest::open(&args.socket)?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set up TCP {addr}: {e}"))?;
    let deadline = Instant::now() + TCP_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(format!(
                    "the client did not connect to TCP {addr} within {} s",
                    TCP_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("accepting on TCP {addr} failed: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(|e| format!("cannot set up TCP {addr}: {e}"))?;
    let mut ctl = Control::new(stream, TCP_TIMEOUT)?;
    handshake(&mut guest, &mut ctl)?;
    loop {
        let line = ctl.recv()?;
        if line == "QUIT" {
            return ctl.send("BYE");
        }
        let phase = Phase::decode(&line)?;
        let result = serve_phase(&mut guest, &mut ctl, &phase);
        if let Err(e) = &result {
            let _ = ctl.send(&format!("ERR {e}"));
        }
        result?;
    }
}

fn serve_phase(guest: &mut Guest, ctl: &mut Control, phase: &Phase) -> Res<()> {
    guest.prepare(phase)?;
    ctl.send("READY")?;
    match phase.test {
        Test::WriteLat => {
            guest.write_lat(phase, false)?;
        }
        Test::SendLat => {
            guest.send_lat(phase, false)?;
        }
        Test::WriteBw => {}
        Test::SendBw => guest.send_bw_server(phase)?,
    }
    ctl.expect("DONE")?;
    // The client has every completion, so its last write is in place.
    match phase.test {
        Test::WriteLat => guest.verify(phase, Some(tag(phase.iters)))?,
        Test::WriteBw => guest.verify(phase, None)?,
        Test::SendLat | Test::SendBw => {}
    }
    ctl.send("OK")
}

fn connect_tcp(addr: SocketAddr) -> Res<TcpStream> {
    let deadline = Instant::now() + TCP_TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                log::debug!("connecting to {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(format!(
                    "cannot connect to the server guest at TCP {addr} within {} s: {e}",
                    TCP_TIMEOUT.as_secs()
                ));
            }
        }
    }
}

/// The client's state across phases.
#[derive(Debug)]
struct Client {
    guest: Guest,
    ctl: Control,
    seed: u8,
}

impl Client {
    fn run_phase(&mut self, test: Test, size: usize, iters: u64) -> Res<Outcome> {
        self.seed = self.seed.wrapping_add(1).max(1);
        let phase = Phase {
            test,
            size,
            iters,
            seed: self.seed,
        };
        self.guest.prepare(&phase)?;
        self.ctl.send(&phase.encode())?;
        self.ctl.expect("READY")?;
        let outcome = match test {
            Test::WriteLat => Outcome::Latency(self.guest.write_lat(&phase, true)?),
            Test::SendLat => Outcome::Latency(self.guest.send_lat(&phase, true)?),
            Test::WriteBw | Test::SendBw => {
                let (bw, elapsed) = self.guest.bw_client(&phase)?;
                Outcome::Bandwidth(bw, elapsed)
            }
        };
        self.ctl.send("DONE")?;
        self.ctl.expect("OK")?;
        if test == Test::WriteLat {
            // The server polled its last completion before answering OK.
            self.guest.verify(&phase, Some(tag(iters)))?;
        }
        Ok(outcome)
    }

    /// Warms up, sizes the measured run to the time budget, and runs it.
    fn measure(&mut self, test: Test, size: usize, budget: Duration) -> Res<Outcome> {
        let warmup = if test.is_latency() {
            LAT_WARMUP
        } else {
            // 16 MiB worth, between 64 and 4096 messages.
            round_up(((16 << 20) / size as u64).clamp(64, 4096))
        };
        let per = self.run_phase(test, size, warmup)?.per_iteration();
        let fit = (budget.as_nanos() / per.as_nanos().max(1)) as u64;
        let iters = if test.is_latency() {
            fit.clamp(LAT_MIN_ITERS, 1_000_000)
        } else {
            round_up(fit.clamp(256, 50_000_000))
        };
        self.run_phase(test, size, iters)
    }
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(CQ_MOD) * CQ_MOD
}

fn client(args: &GuestArgs) -> Res<()> {
    let addr = args.connect.ok_or("give --connect ADDR or --server")?;
    let guest = Guest::open(&args.socket)?;
    let stream = connect_tcp(addr)?;
    let ctl = Control::new(stream, TCP_TIMEOUT)?;
    let mut c = Client {
        guest,
        ctl,
        seed: 0,
    };
    handshake(&mut c.guest, &mut c.ctl)?;
    let mut setup = c.guest.setup();
    setup.exchange = format!("Ethernet (TCP {addr})");
    let budget = Duration::from_millis(args.ms_per_size);
    let mut out = std::io::stdout();
    for (test, sizes) in Test::ALL {
        let (tx_depth, cq_mod, inline) = if test.is_latency() {
            (1, 1, MAX_INLINE)
        } else {
            (TX_DEPTH as u32, CQ_MOD as u32, 0)
        };
        let _ = write!(
            out,
            "{}",
            report::header(
                test.title(),
                test.method(),
                &setup,
                tx_depth,
                cq_mod,
                inline,
                test.is_latency()
            )
        );
        let _ = out.flush();
        for &size in sizes {
            let row = match c.measure(test, size, budget)? {
                Outcome::Latency(rtts) => Latency::from_round_trips(&rtts).row(size),
                Outcome::Bandwidth(bw, _) => bw.row(size),
            };
            let _ = write!(out, "{row}");
            let _ = out.flush();
        }
        let _ = writeln!(out, "{}", report::RULE);
        let _ = out.flush();
    }
    c.ctl.send("QUIT")?;
    c.ctl.expect("BYE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_bad_ones_are_refused() {
        let p = Phase {
            test: Test::SendBw,
            size: 4096,
            iters: 1024,
            seed: 9,
        };
        assert_eq!(Phase::decode(&p.encode()), Ok(p));
        assert!(
            Phase::decode("RUN send_bw 1048576 16 1").is_err(),
            "too big a SEND"
        );
        assert!(
            Phase::decode("RUN write_bw 64 17 1").is_err(),
            "not a multiple of 16"
        );
        assert!(Phase::decode("RUN read_lat 8 1000 1").is_err());
    }

    #[test]
    fn tags_never_repeat_back_to_back_and_are_never_zero() {
        for k in 1..2000 {
            assert_ne!(tag(k), 0);
            assert_ne!(tag(k), tag(k + 1));
        }
    }

    #[test]
    fn payloads_differ_by_seed_and_position() {
        assert_ne!(payload(1, 4096, None), payload(2, 4096, None));
        let p = payload(1, 4096, None);
        assert_ne!(p[..256], p[256..512]);
        assert_eq!(payload(1, 8, Some(7))[7], 7);
    }
}
