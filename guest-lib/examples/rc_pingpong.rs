//! `rc_pingpong`: libibverbs' `ibv_rc_pingpong` on a vrdma device.
//!
//! ```text
//! rc_pingpong --socket /run/vrdma/vm1.sock                 # server: waits on TCP port 18515
//! rc_pingpong --socket /run/vrdma/vm2.sock localhost       # client
//! ```
//!
//! It does what the original does, with the same options, TCP exchange and output: each side
//! opens its device, creates a CQ and an RC QP, posts `rx_depth` (500) receives, and the two
//! exchange `LID:QPN:PSN:GID` over TCP (the original's 52-byte message, then the client's
//! `done`). They connect their QPs, and ping-pong `iters` SENDs of `size` bytes: the client
//! sends, the server answers each message with one of its own. Each side prints its local and
//! remote address, then the original's two summary lines.
//!
//! Unlike the original, the payload is checked: the client fills every message with a pattern
//! that changes with the iteration, the server checks each message it receives and sends it
//! back, and the client checks the echo. A wrong byte is an error (exit 1). Send and receive
//! use two halves of one buffer, so an echo cannot pass by reading back what was sent.
//!
//! Differences forced by the device: `-d` becomes `--socket` (one device per vhost-user
//! socket), and the GID is always used (`-g` defaults to 0), since vrdma is RoCE v2 only.
//! `--odp`, `--ts` and `--chk` are not offered (the payload is always checked).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv6Addr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use vrdma::mem::DmaBuf;
use vrdma::{
    AddressHandle, CompletionChannel, CompletionQueue, Context, MemoryRegion, ProtectionDomain,
    QpAttr, QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, RecvWr, SendWr, Sge,
    WcOpcode, WcStatus, WorkCompletion,
};
use vrdma_proto::Gid;
use vrdma_proto::config::Mtu;

const RECV_WRID: u64 = 1;
const SEND_WRID: u64 = 2;
/// The wire message: `LID:QPN:PSN:GID` and a NUL, exactly as the original sizes it.
const MSG_LEN: usize = "0000:000000:000000:00000000000000000000000000000000".len() + 1;
/// How long either side waits for the other (a completion, a TCP message) before giving up.
/// The original waits for ever; a test or a script should not.
const WAIT: Duration = Duration::from_secs(30);

/// Ping-pong SENDs over an RC QP between two vrdma devices, as ibv_rc_pingpong does.
///
/// Without SERVERHOST: be the server, wait for a client on TCP port PORT. With SERVERHOST:
/// connect to the server there and start the ping-pong.
#[derive(Debug, Parser)]
#[command(name = "rc_pingpong", version)]
struct Args {
    /// The VM's vhost-user socket (vhost-user-rdma --vm ...,socket=PATH).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Listen on/connect to TCP port PORT.
    #[arg(short, long, default_value_t = 18515)]
    port: u16,
    /// Use port PORT of the device.
    #[arg(short = 'i', long, default_value_t = 1, value_name = "PORT",
          value_parser = clap::value_parser!(u8).range(1..))]
    ib_port: u8,
    /// Size of message to exchange.
    #[arg(short, long, default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1 << 30))]
    size: u32,
    /// Path MTU.
    #[arg(short, long, default_value = "1024", value_parser = parse_mtu)]
    mtu: Mtu,
    /// Number of receives to post at a time.
    #[arg(short, long, default_value_t = 500, value_name = "DEP",
          value_parser = clap::value_parser!(u32).range(1..))]
    rx_depth: u32,
    /// Number of exchanges.
    #[arg(short = 'n', long, default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Service level value.
    #[arg(short = 'l', long, default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..16))]
    sl: u8,
    /// Sleep on CQ events (default poll).
    #[arg(short, long)]
    events: bool,
    /// Local port GID index.
    #[arg(short, long, default_value_t = 0, value_name = "GID_INDEX")]
    gid_idx: u8,
    /// The server to connect to; without it, be the server.
    #[arg(value_name = "SERVERHOST")]
    servername: Option<String>,
}

fn parse_mtu(s: &str) -> Result<Mtu, String> {
    match s.parse::<u32>() {
        Ok(256) => Ok(Mtu::Mtu256),
        Ok(512) => Ok(Mtu::Mtu512),
        Ok(1024) => Ok(Mtu::Mtu1024),
        Ok(2048) => Ok(Mtu::Mtu2048),
        Ok(4096) => Ok(Mtu::Mtu4096),
        _ => Err("the MTU is one of 256, 512, 1024, 2048, 4096".into()),
    }
}

type Res<T> = Result<T, String>;

fn verbs<T>(r: vrdma::Result<T>, what: &str) -> Res<T> {
    r.map_err(|e| format!("{what}: {}", vrdma::error_chain(&e)))
}

/// One side's address, as exchanged.
#[derive(Debug, Clone, Copy)]
struct Dest {
    lid: u16,
    qpn: u32,
    psn: u32,
    gid: Gid,
}

impl Dest {
    /// `LID:QPN:PSN:GID`, the GID's 16 bytes as 32 hex digits, NUL-padded to `MSG_LEN`.
    fn encode(&self) -> [u8; MSG_LEN] {
        let gid: String = self.gid.0.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!("{:04x}:{:06x}:{:06x}:{gid}", self.lid, self.qpn, self.psn);
        let mut msg = [0u8; MSG_LEN];
        msg[..text.len()].copy_from_slice(text.as_bytes());
        msg
    }

    fn decode(msg: &[u8]) -> Res<Dest> {
        let text = String::from_utf8_lossy(msg);
        let text = text.trim_end_matches('\0');
        let bad = || format!("the other side sent {text:?}, not LID:QPN:PSN:GID");
        let parts: Vec<&str> = text.split(':').collect();
        let [lid, qpn, psn, gid] = parts[..] else {
            return Err(bad());
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).map_err(|_| bad());
        if gid.len() != 32 {
            return Err(bad());
        }
        let mut raw = [0u8; 16];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(&gid[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Dest {
            lid: u16::try_from(hex(lid)?).map_err(|_| bad())?,
            qpn: hex(qpn)?,
            psn: hex(psn)?,
            gid: Gid(raw),
        })
    }

    fn print(&self, which: &str) {
        println!(
            "  {which} LID 0x{:04x}, QPN 0x{:06x}, PSN 0x{:06x}, GID {}",
            self.lid,
            self.qpn,
            self.psn,
            Ipv6Addr::from(self.gid.0)
        );
    }
}

/// Byte `i` of message `k`: differs between neighbouring messages at every position, so a
/// stale, torn or misplaced message shows.
fn pattern(k: u32, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let i = i as u32;
        *b = (i.wrapping_mul(31) ^ (i >> 8).wrapping_mul(7)).wrapping_add(k.wrapping_mul(13)) as u8;
    }
}

/// The device objects, in drop order: the QP goes first, the buffer it names only after it,
/// the device last.
#[derive(Debug)]
struct Pingpong {
    qp: QueuePair,
    mr: MemoryRegion,
    cq: CompletionQueue,
    channel: Option<CompletionChannel>,
    _pd: ProtectionDomain,
    /// `[0, size)`: what this side sends; `[size, 2 size)`: where every receive lands.
    buf: DmaBuf,
    ctx: Context,
    size: u32,
    rx_depth: u32,
}

impl Pingpong {
    fn new(args: &Args) -> Res<Pingpong> {
        let ctx = verbs(
            Context::open(&args.socket),
            "couldn't open the vrdma device",
        )?;
        let channel = if args.events {
            Some(verbs(
                CompletionChannel::new(&ctx),
                "couldn't create completion channel",
            )?)
        } else {
            None
        };
        let pd = verbs(ProtectionDomain::new(&ctx), "couldn't allocate PD")?;
        let buf = verbs(
            ctx.alloc(2 * args.size as usize),
            "couldn't allocate work buf",
        )?;
        buf.fill(0x7b)
            .map_err(|e| format!("couldn't clear work buf: {e}"))?;
        let mr = verbs(
            MemoryRegion::register(&pd, &buf, vrdma::AccessFlags::LOCAL_WRITE),
            "couldn't register MR",
        )?;
        let cq = verbs(
            CompletionQueue::new(&ctx, args.rx_depth + 1),
            "couldn't create CQ",
        )?;
        let qp = verbs(
            QueuePair::new(
                &pd,
                &QpInitAttr {
                    send_cq: &cq,
                    recv_cq: &cq,
                    srq: None,
                    cap: QpCap {
                        max_send_wr: 1,
                        max_recv_wr: args.rx_depth,
                        max_send_sge: 1,
                        max_recv_sge: 1,
                        max_inline_data: 0,
                    },
                    qp_type: QpType::Rc,
                    sq_sig_all: false,
                },
            ),
            "couldn't create QP",
        )?;
        let init = QpAttr {
            qp_state: QpState::Init,
            pkey_index: 0,
            port_num: args.ib_port,
            qp_access_flags: vrdma::AccessFlags::empty(),
            ..QpAttr::default()
        };
        verbs(
            qp.modify(&init, QpAttrMask::RC_INIT),
            "failed to modify QP to INIT",
        )?;
        Ok(Pingpong {
            qp,
            mr,
            cq,
            channel,
            _pd: pd,
            buf,
            ctx,
            size: args.size,
            rx_depth: args.rx_depth,
        })
    }

    /// INIT -> RTR -> RTS towards `dest`, with the original's attributes.
    fn connect(&self, args: &Args, my_psn: u32, dest: &Dest) -> Res<()> {
        let rtr = QpAttr {
            qp_state: QpState::Rtr,
            path_mtu: args.mtu,
            dest_qp_num: dest.qpn,
            rq_psn: dest.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: vrdma::AhAttr {
                hop_limit: 1,
                sgid_index: args.gid_idx,
                sl: args.sl,
                port_num: args.ib_port,
                ..AddressHandle::attr_for(dest.gid)
            },
            ..QpAttr::default()
        };
        verbs(
            self.qp.modify(&rtr, QpAttrMask::RC_RTR),
            "failed to modify QP to RTR",
        )?;
        let rts = QpAttr {
            qp_state: QpState::Rts,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            sq_psn: my_psn,
            max_rd_atomic: 1,
            ..rtr
        };
        verbs(
            self.qp.modify(&rts, QpAttrMask::RC_RTS),
            "failed to modify QP to RTS",
        )
    }

    /// Posts `n` receives into the receive half of the buffer.
    fn post_recv(&self, n: u32) -> Res<()> {
        let sge = [Sge::new(
            self.buf.addr() + u64::from(self.size),
            self.size,
            self.mr.lkey(),
        )];
        let wrs = vec![
            RecvWr {
                wr_id: RECV_WRID,
                sg_list: &sge,
            };
            n as usize
        ];
        // SAFETY: the SGE is the receive half of `self.buf`, which lives until after the QP is
        // destroyed (`qp` is dropped before `buf`). Every receive names the same bytes, as in
        // the original: they are read (copied, never borrowed) only after a receive completion
        // has been polled, and the other side sends its next message only after it has had our
        // answer, which we post after that read, so the device does not write them meanwhile.
        verbs(unsafe { self.qp.post_recv(&wrs) }, "couldn't post receive")
    }

    /// Sends the send half of the buffer.
    fn post_send(&self) -> Res<()> {
        let sge = [Sge::new(self.buf.addr(), self.size, self.mr.lkey())];
        let wr = SendWr::send(SEND_WRID, &sge);
        // SAFETY: the SGE is the send half of `self.buf`, which outlives the QP (see
        // `post_recv`). It is rewritten only before a send is posted, and a send is posted
        // only once the previous send's completion has been polled (`pending` in `run`).
        verbs(unsafe { self.qp.post_send(&[wr]) }, "couldn't post send")
    }
}

/// What the ping-pong loop needs besides the device.
struct Loop<'a> {
    pp: &'a Pingpong,
    client: bool,
    iters: u32,
    scnt: u32,
    rcnt: u32,
    routs: u32,
    pending: u64,
    /// The last message received (the server echoes it).
    rx: Vec<u8>,
    expected: Vec<u8>,
}

impl Loop<'_> {
    /// Fills the send half with the next message and posts it.
    fn send_next(&mut self) -> Res<()> {
        let msg = if self.client {
            pattern(self.scnt, &mut self.expected);
            &self.expected
        } else {
            &self.rx
        };
        self.pp
            .buf
            .write_at(0, msg)
            .map_err(|e| format!("couldn't write the message: {e}"))?;
        self.pp.post_send()?;
        self.pending = RECV_WRID | SEND_WRID;
        Ok(())
    }

    fn completion(&mut self, wc: &WorkCompletion) -> Res<()> {
        if wc.status != WcStatus::Success {
            return Err(format!(
                "Failed status {:?} ({}) for wr_id {} (vendor_err {})",
                wc.status,
                wc.status.raw(),
                wc.wr_id,
                wc.vendor_err
            ));
        }
        match wc.wr_id {
            SEND_WRID => self.scnt += 1,
            RECV_WRID => {
                self.check(wc)?;
                self.routs -= 1;
                if self.routs <= 1 {
                    let n = self.pp.rx_depth - self.routs;
                    self.pp.post_recv(n)?;
                    self.routs += n;
                }
                self.rcnt += 1;
            }
            other => return Err(format!("Completion for unknown wr_id {other}")),
        }
        self.pending &= !wc.wr_id;
        if self.scnt < self.iters && self.pending == 0 {
            self.send_next()?;
        }
        Ok(())
    }

    /// Checks received message `rcnt`: the client's pattern (the server's reply is its echo).
    fn check(&mut self, wc: &WorkCompletion) -> Res<()> {
        let k = self.rcnt;
        if wc.opcode != WcOpcode::Recv || wc.byte_len != self.pp.size {
            return Err(format!(
                "message {k}: a {:?} completion of {} bytes where a receive of {} was due",
                wc.opcode, wc.byte_len, self.pp.size
            ));
        }
        self.pp
            .buf
            .read_at(self.pp.size as usize, &mut self.rx)
            .map_err(|e| format!("couldn't read the message: {e}"))?;
        pattern(k, &mut self.expected);
        if let Some(i) = (0..self.rx.len()).find(|&i| self.rx[i] != self.expected[i]) {
            return Err(format!(
                "message {k} is corrupt: byte {i} is {:#04x}, {:#04x} was sent",
                self.rx[i], self.expected[i]
            ));
        }
        Ok(())
    }
}

fn stuck(l: &Loop<'_>) -> String {
    format!(
        "no completion for {} s after {} sends and {} receives; is the other side still running?",
        WAIT.as_secs(),
        l.scnt,
        l.rcnt
    )
}

/// Busy-polls the CQ (or, with `--events`, sleeps on the completion channel, re-arms and
/// polls) until `iters` sends and receives have completed.
fn run_loop(l: &mut Loop<'_>) -> Res<()> {
    let mut wc = [WorkCompletion::default(); 2];
    let mut last = Instant::now();
    let mut idle = 0u32;
    while l.rcnt < l.iters || l.scnt < l.iters {
        if let Some(channel) = &l.pp.channel {
            let Some(cqn) = verbs(channel.get_cq_event(Some(WAIT)), "failed to get cq_event")?
            else {
                return Err(stuck(l));
            };
            if cqn != l.pp.cq.handle() {
                return Err(format!("CQ event for unknown CQ {cqn:#x}"));
            }
            verbs(
                l.pp.cq.req_notify(false),
                "couldn't request CQ notification",
            )?;
        }
        loop {
            let n = verbs(l.pp.cq.poll(&mut wc), "poll CQ failed")?;
            for w in &wc[..n] {
                l.completion(w)?;
            }
            if n > 0 {
                last = Instant::now();
                idle = 0;
                if n == wc.len() {
                    continue;
                }
            }
            break;
        }
        if l.pp.channel.is_none() {
            idle = idle.wrapping_add(1);
            if idle > 64 {
                // Leave the CPU to the daemon now and then: it may share a small machine.
                std::thread::yield_now();
                if idle % 1024 == 0 && last.elapsed() > WAIT {
                    return Err(stuck(l));
                }
            }
        }
    }
    Ok(())
}

/// The server's half of the exchange: read the client's address, connect, answer with ours,
/// wait for `done`.
fn server_exchange(listener: TcpListener, pp: &Pingpong, args: &Args, my: &Dest) -> Res<Dest> {
    let (mut conn, _) = listener
        .accept()
        .map_err(|e| format!("accept() failed: {e}"))?;
    drop(listener);
    conn.set_read_timeout(Some(WAIT))
        .and_then(|()| conn.set_write_timeout(Some(WAIT)))
        .map_err(|e| format!("couldn't set up the TCP connection: {e}"))?;
    let mut msg = [0u8; MSG_LEN];
    conn.read_exact(&mut msg)
        .map_err(|e| format!("couldn't read remote address: {e}"))?;
    let rem = Dest::decode(&msg)?;
    pp.connect(args, my.psn, &rem)
        .map_err(|e| format!("couldn't connect to remote QP: {e}"))?;
    conn.write_all(&my.encode())
        .and_then(|()| conn.read_exact(&mut [0u8; 5]))
        .map_err(|e| format!("couldn't send/recv local address: {e}"))?;
    Ok(rem)
}

/// The client's half: send our address, read the server's, say `done`.
fn client_exchange(host: &str, port: u16, my: &Dest) -> Res<Dest> {
    let couldnt = |why: String| format!("couldn't connect to {host}:{port}: {why}");
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| couldnt(e.to_string()))?;
    let mut last = String::from("no address");
    let mut conn = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, WAIT) {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut conn = conn.ok_or_else(|| couldnt(last))?;
    conn.set_read_timeout(Some(WAIT))
        .and_then(|()| conn.set_write_timeout(Some(WAIT)))
        .map_err(|e| format!("couldn't set up the TCP connection: {e}"))?;
    let mut msg = [0u8; MSG_LEN];
    conn.write_all(&my.encode())
        .map_err(|e| format!("couldn't send local address: {e}"))?;
    conn.read_exact(&mut msg)
        .and_then(|()| conn.write_all(b"done\0"))
        .map_err(|e| format!("couldn't read/write remote address: {e}"))?;
    Dest::decode(&msg)
}

/// Listens on every address, IPv6 and IPv4 if the host has IPv6, as the original does.
fn listen(port: u16) -> Res<TcpListener> {
    TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .map_err(|e| format!("couldn't listen to port {port}: {e}"))
}

fn run(args: &Args) -> Res<()> {
    let pp = Pingpong::new(args)?;
    pp.post_recv(pp.rx_depth)?;
    if pp.channel.is_some() {
        verbs(pp.cq.req_notify(false), "couldn't request CQ notification")?;
    }
    let port = verbs(pp.ctx.query_port(args.ib_port), "couldn't get port info")?;
    let gid = verbs(
        pp.ctx.query_gid(args.ib_port, u32::from(args.gid_idx)),
        &format!("can't read sgid of index {}", args.gid_idx),
    )?;
    let my = Dest {
        lid: port.lid.get(),
        qpn: pp.qp.qp_num(),
        psn: (RandomState::new().build_hasher().finish() & 0xff_ffff) as u32,
        gid,
    };
    // Listen before announcing ourselves, so a client started once that line is out finds
    // the port open.
    let listener = match args.servername {
        None => Some(listen(args.port)?),
        Some(_) => None,
    };
    my.print("local address: ");
    let rem = match (&args.servername, listener) {
        (Some(host), _) => client_exchange(host, args.port, &my)?,
        (None, Some(listener)) => server_exchange(listener, &pp, args, &my)?,
        (None, None) => unreachable!("the server always listens"),
    };
    rem.print("remote address:");
    if args.servername.is_some() {
        pp.connect(args, my.psn, &rem)?;
    }

    let size = pp.size as usize;
    let mut l = Loop {
        pp: &pp,
        client: args.servername.is_some(),
        iters: args.iters,
        scnt: 0,
        rcnt: 0,
        routs: pp.rx_depth,
        pending: RECV_WRID,
        rx: vec![0; size],
        expected: vec![0; size],
    };
    if l.client {
        l.send_next()?;
    }
    let start = Instant::now();
    run_loop(&mut l)?;
    let usec = start.elapsed().as_secs_f64() * 1e6;
    let bytes = u64::from(pp.size) * u64::from(args.iters) * 2;
    println!(
        "{bytes} bytes in {:.2} seconds = {:.2} Mbit/sec",
        usec / 1e6,
        bytes as f64 * 8.0 / usec
    );
    println!(
        "{} iters in {:.2} seconds = {:.2} usec/iter",
        args.iters,
        usec / 1e6,
        usec / f64::from(args.iters)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rc_pingpong: {e}");
            ExitCode::FAILURE
        }
    }
}
