//! The inter-host fabric: RoCEv2 over UDP, as Linux Soft-RoCE (rxe) and RoCE NICs speak it.
//!
//! Each VM's GID is an address of this host; with `--roce` the daemon binds UDP port 4791 on
//! it, so a GID resolves to a host the way RoCEv2 resolves it: by IP. A QP whose peer GID
//! belongs to no VM of this daemon sends its work as RoCEv2 packets to that address; packets
//! arriving on a VM's address are answered by its QPs.
//!
//! Division of labour: the scheduler thread is the requester's transmitter (work requests into
//! packets, go-back-N retransmission, timers); one receive thread per VM address parses
//! datagrams and runs the responder (requests into guest memory, ACKs, READ responses) and the
//! requester's completer (ACKs, NAKs, READ and atomic responses into completions). Both work on
//! a QP only under its VM's lock, so a QP's transport state has one writer at a time.
//!
//! Packets from the network are as untrusted as guests: [`vrdma_roce::packet::parse`] checks
//! form and ICRC, and every field that names guest memory goes through the same checks as a
//! local request (the responder is the local fabric's, [`crate::engine::respond`]).

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vrdma_proto::config::Mtu;
use vrdma_proto::cqe::{self, Status, VendorErr};
use vrdma_proto::mr::Access;
use vrdma_proto::wqe::{self, Opcode, Payload, SendFlags};
use vrdma_proto::{Gid, event, qp};
use vrdma_roce::aeth::{Aeth, NakCode, Syndrome};
use vrdma_roce::atomic::{AtomicAckEth, AtomicEth};
use vrdma_roce::bth::Bth;
use vrdma_roce::deth::Deth;
use vrdma_roce::icrc::{IPV4_DF, Ip, IpUdp};
use vrdma_roce::imm::ImmDt;
use vrdma_roce::opcode::Opcode as Op;
use vrdma_roce::packet::{self, Extensions, IcrcCheck, Packet, ParseError};
use vrdma_roce::reth::Reth;

use crate::completion::{self, Completion, load_producer, publish_consumer};
use crate::engine::{self, Chunk, MAX_SEND_SLOT, Resp, Step, WR_COST};
use crate::port::VmPort;
use crate::vm::{GuestMem, Vm};
use crate::xfer::{self, Runs};
use zerocopy::FromBytes;

/// Work requests a QP may have on the wire unacknowledged.
pub const WINDOW: usize = 32;
/// Packets a QP may have on the wire unacknowledged: more only fills socket buffers, and a
/// loss then costs a longer go-back-N.
pub const MAX_UNACKED: u32 = 256;
/// The smallest window a lossy path shrinks a QP's to.
const MIN_WINDOW: u32 = 8;
/// A long message asks for an ACK at least this often, so the requester's window moves before
/// the message ends.
const ACK_EVERY: u32 = 64;
/// The largest UDP payload the fabric builds: a 4096-byte MTU and the longest header stack.
const MAX_PACKET: usize = 4096 + 64;
/// READs a responder remembers, as many as a requester may have outstanding.
const READ_HISTORY: usize = crate::limits::MAX_RD_ATOM as usize;
/// Atomic results kept per QP to answer a retransmitted atomic without executing it twice: one
/// per atomic a requester may have outstanding (`max_dest_rd_atomic`, at most
/// [`crate::limits::MAX_RD_ATOM`]).
const ATOMIC_REPLAY: usize = crate::limits::MAX_RD_ATOM as usize;
/// The requester's ACK timeout when the QP's `timeout` is 0 (infinite on hardware): a peer that
/// vanished must not hold a work request forever in a daemon serving many tenants.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// The shortest ACK timeout: a software transport's round trip includes scheduling delays of
/// milliseconds, and a shorter timer only retransmits what is still on its way (rxe's timer
/// has the same floor, one kernel tick).
const MIN_TIMEOUT: Duration = Duration::from_millis(4);
/// Bytes of socket buffer per VM address, each way.
const SOCKET_BUFFER: usize = 8 << 20;
/// How long a receive thread keeps polling its socket after the last datagram before it
/// sleeps in it again.
const RX_POLL_WINDOW: Duration = Duration::from_micros(50);
/// How often a receive thread checks whether the daemon is stopping.
const RX_POLL: Duration = Duration::from_millis(200);
/// PSNs are 24 bits.
const PSN_MASK: u32 = vrdma_roce::MAX_24;
/// The `a_id` a request from the network carries into the responder: no local VM has it.
const REMOTE_PORT_ID: u64 = u64::MAX;

/// Why the inter-host fabric could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM's GID is not an address this host can bind.
    #[error(
        "cannot bind UDP {addr} for VM {vm:?}'s GID: with --roce each gid= must be an address of this host (ip addr add ...), and the port free"
    )]
    Bind {
        /// The VM.
        vm: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A receive thread could not be started.
    #[error("cannot start the RoCEv2 receive thread for {0}")]
    Thread(SocketAddr, #[source] io::Error),
}

/// How the fabric is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The UDP port of every daemon in the fabric (4791 in RoCEv2).
    pub port: u16,
    /// Check the ICRC of IPv4 packets assuming IP Identification 0, as Linux sends with an
    /// unconnected socket and DF set. Peers that vary it (rxe) need this off; see
    /// docs/fabric.md.
    pub ipv4_icrc: bool,
}

/// Counters of one VM address, for operators.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received and handled.
    pub rx: AtomicU64,
    /// Datagrams sent.
    pub tx: AtomicU64,
    /// Datagrams that failed to send.
    pub tx_errors: AtomicU64,
    /// Datagrams dropped because the socket's send buffer was full (resent like any loss).
    pub tx_dropped: AtomicU64,
    /// Datagrams dropped by the parser, by [`ParseError::index`].
    pub malformed: [AtomicU64; ParseError::ALL.len()],
    /// Packets for no QP, a QP in the wrong state or type, or from a host that is not the
    /// QP's peer.
    pub no_qp: AtomicU64,
    /// Requests ahead of the expected PSN (answered with one sequence-error NAK).
    pub out_of_sequence: AtomicU64,
    /// Duplicate requests (answered again, never executed twice).
    pub duplicates: AtomicU64,
    /// Packets retransmitted by go-back-N.
    pub retransmitted: AtomicU64,
    /// NAKs and RNR NAKs sent.
    pub naks: AtomicU64,
    /// Responses that matched nothing outstanding.
    pub stray_responses: AtomicU64,
}

/// A VM's address on the network: its socket and who answers there.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    socket: UdpSocket,
    vm: RwLock<Option<Arc<VmPort>>>,
    /// What passed through it.
    pub counters: Counters,
}

/// The inter-host fabric of one daemon.
#[derive(Debug)]
pub struct Fabric {
    settings: Settings,
    endpoints: HashMap<Gid, Arc<Endpoint>>,
    scheduler: OnceLock<Thread>,
    stop: AtomicBool,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// An IP address for a GID: IPv4-mapped GIDs are IPv4 addresses, the rest IPv6.
pub fn ip_of(gid: Gid) -> IpAddr {
    match gid.to_ipv4() {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(std::net::Ipv6Addr::from(gid.0)),
    }
}

fn gid_of(ip: IpAddr) -> Gid {
    match ip {
        IpAddr::V4(v4) => Gid::from_ipv4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Gid::from_ipv4(v4.octets()),
            None => Gid(v6.octets()),
        },
    }
}

impl Fabric {
    /// Binds every VM's GID address and starts the receive threads.
    pub fn start(settings: Settings, vms: &[(String, Gid)]) -> Result<Arc<Fabric>, Error> {
        let mut endpoints = HashMap::new();
        for (name, gid) in vms {
            let addr = SocketAddr::new(ip_of(*gid), settings.port);
            let socket = UdpSocket::bind(addr).map_err(|source| Error::Bind {
                vm: name.clone(),
                addr,
                source,
            })?;
            socket
                .set_read_timeout(Some(RX_POLL))
                .map_err(|source| Error::Bind {
                    vm: name.clone(),
                    addr,
                    source,
                })?;
            size_buffers(&socket, addr);
            endpoints.insert(
                *gid,
                Arc::new(Endpoint {
                    addr,
                    socket,
                    vm: RwLock::new(None),
                    counters: Counters::default(),
                }),
            );
        }
        let fabric = Arc::new(Fabric {
            settings,
            endpoints,
            scheduler: OnceLock::new(),
            stop: AtomicBool::new(false),
            threads: std::sync::Mutex::new(Vec::new()),
        });
        for ep in fabric.endpoints.values() {
            let (f, e) = (fabric.clone(), ep.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vrdma-roce-{}", ep.addr.ip()))
                .spawn(move || receive_loop(&f, &e))
                .map_err(|source| Error::Thread(ep.addr, source))?;
            fabric
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(handle);
            info!("RoCEv2: listening on {}", ep.addr);
        }
        Ok(fabric)
    }

    /// Tells the fabric which thread to wake when acknowledgements free a QP's window.
    pub fn set_scheduler(&self, thread: Thread) {
        let _ = self.scheduler.set(thread);
    }

    /// Stops the receive threads.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        self.log_counters();
    }

    /// Logs each address's counters, one line each.
    pub fn log_counters(&self) {
        for ep in self.endpoints.values() {
            let c = &ep.counters;
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let malformed: Vec<String> = ParseError::ALL
                .iter()
                .filter(|e| load(&c.malformed[e.index()]) > 0)
                .map(|e| format!("{e}: {}", load(&c.malformed[e.index()])))
                .collect();
            info!(
                "RoCEv2 {}: rx {} tx {} tx-errors {} tx-dropped {} no-qp {} out-of-sequence {} duplicates {} retransmitted {} naks {} stray-responses {} malformed {} [{}]",
                ep.addr,
                load(&c.rx),
                load(&c.tx),
                load(&c.tx_errors),
                load(&c.tx_dropped),
                load(&c.no_qp),
                load(&c.out_of_sequence),
                load(&c.duplicates),
                load(&c.retransmitted),
                load(&c.naks),
                load(&c.stray_responses),
                c.malformed.iter().map(load).sum::<u64>(),
                malformed.join(", "),
            );
        }
    }

    /// The endpoint of a VM's GID, if the fabric serves it.
    pub fn endpoint(&self, gid: &Gid) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(gid)
    }

    /// Makes `port` the VM answering on its GID's address (`None` when it goes away).
    pub fn attach(&self, gid: &Gid, port: Option<Arc<VmPort>>) {
        if let Some(ep) = self.endpoints.get(gid) {
            *ep.vm.write().unwrap_or_else(|p| p.into_inner()) = port;
        }
    }

    fn wake_scheduler(&self) {
        if let Some(t) = self.scheduler.get() {
            t.unpark();
        }
    }

    /// Seals `pkt` for `peer`'s address into `batch`, which sends it from `ep` with the
    /// packets around it.
    fn send(&self, ep: &Arc<Endpoint>, peer: Gid, pkt: &Packet<'_>, batch: &mut Batch) {
        let dst = SocketAddr::new(ip_of(peer), self.settings.port);
        batch.push(ep, dst, pkt);
    }
}

/// Packets per `sendmmsg`: one system call for a step's packets or a receive batch's answers.
const TX_BATCH: usize = 32;
/// Datagrams per `recvmmsg`.
const RX_BATCH: usize = 32;
/// Room per received datagram: a RoCEv2 packet of the largest MTU fits; longer datagrams are
/// truncated and fail the parser.
const RX_SLOT: usize = 8192;

/// Packets sealed and waiting to leave in one `sendmmsg`, all from one endpoint. Sized once,
/// so sending allocates nothing.
pub struct Batch {
    bufs: Box<[u8]>,
    lens: [usize; TX_BATCH],
    dsts: [Option<SockaddrStorage>; TX_BATCH],
    n: usize,
    ep: Option<Arc<Endpoint>>,
    headers: MultiHeaders<SockaddrStorage>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            bufs: vec![0; TX_BATCH * MAX_PACKET].into_boxed_slice(),
            lens: [0; TX_BATCH],
            dsts: [None; TX_BATCH],
            n: 0,
            ep: None,
            headers: MultiHeaders::preallocate(TX_BATCH, None),
        }
    }
}

impl Batch {
    fn push(&mut self, ep: &Arc<Endpoint>, dst: SocketAddr, pkt: &Packet<'_>) {
        if self.n == TX_BATCH || self.ep.as_ref().is_some_and(|e| !Arc::ptr_eq(e, ep)) {
            self.flush();
        }
        let slot = &mut self.bufs[self.n * MAX_PACKET..(self.n + 1) * MAX_PACKET];
        let Ok(len) = pkt.encode(slot, &ip_udp(ep.addr, dst)) else {
            ep.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.lens[self.n] = len;
        self.dsts[self.n] = Some(SockaddrStorage::from(dst));
        self.n += 1;
        if self.ep.is_none() {
            self.ep = Some(ep.clone());
        }
    }

    /// Sends what is waiting. A datagram the kernel refuses (too long for the path, no route)
    /// is counted and skipped; the rest still go.
    pub fn flush(&mut self) {
        let Some(ep) = self.ep.take() else {
            return;
        };
        let n = std::mem::take(&mut self.n);
        let Batch {
            bufs,
            lens,
            dsts,
            headers,
            ..
        } = self;
        let iovs: [[IoSlice<'_>; 1]; TX_BATCH] = std::array::from_fn(|i| {
            [IoSlice::new(
                &bufs[i * MAX_PACKET..i * MAX_PACKET + lens[i]],
            )]
        });
        let no_cmsgs: [ControlMessage<'_>; 0] = [];
        let mut done = 0;
        while done < n {
            let result = sendmmsg(
                ep.socket.as_raw_fd(),
                headers,
                &iovs[done..n],
                &dsts[done..n],
                no_cmsgs,
                // A full socket buffer is a congested link: the packet is lost and resent,
                // and the scheduler never waits for one VM's traffic.
                MsgFlags::MSG_DONTWAIT,
            );
            match result {
                Ok(sent) => {
                    let k = sent.count();
                    if k == 0 {
                        break;
                    }
                    ep.counters.tx.fetch_add(k as u64, Ordering::Relaxed);
                    done += k;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    ep.counters
                        .tx_dropped
                        .fetch_add((n - done) as u64, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    if ep.counters.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!("RoCEv2 {}: cannot send a packet: {e}", ep.addr);
                    }
                    done += 1;
                }
            }
        }
    }
}

/// Gives the socket room for a window of packets of every busy QP: the default (about 200
/// KiB, some 90 datagrams) drops bursts, and each drop costs a go-back-N. A daemon with
/// CAP_NET_ADMIN gets [`SOCKET_BUFFER`] whatever `net.core.rmem_max` says; one without gets
/// what that allows.
fn size_buffers(socket: &UdpSocket, addr: SocketAddr) {
    use nix::sys::socket::{setsockopt, sockopt};
    let forced = setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_ok()
        && setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_ok();
    if !forced {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
        warn!(
            "RoCEv2 {addr}: socket buffers limited by net.core.rmem_max/wmem_max (no CAP_NET_ADMIN); raise them to {SOCKET_BUFFER} to avoid drops under load"
        );
    }
}

/// The IP and UDP headers a datagram from `src` to `dst` travels with, as the ICRC sees them:
/// Linux sends UDP over IPv4 with DF and, on an unconnected socket, Identification 0.
fn ip_udp(src: SocketAddr, dst: SocketAddr) -> IpUdp {
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ip::V4 {
            src: s,
            dst: d,
            id: 0,
            flags_frag: IPV4_DF,
        },
        (s, d) => Ip::V6 {
            src: to_v6(s),
            dst: to_v6(d),
        },
    };
    IpUdp {
        ip,
        src_port: src.port(),
        dst_port: dst.port(),
    }
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// PSN `a + n`, modulo 2^24.
fn psn_add(a: u32, n: u32) -> u32 {
    a.wrapping_add(n) & PSN_MASK
}

/// `a - b` as a signed distance in PSN space (the IBA's half-window comparison).
fn psn_diff(a: u32, b: u32) -> i32 {
    let d = a.wrapping_sub(b) & PSN_MASK;
    if d >= 1 << 23 {
        d as i32 - (1 << 24)
    } else {
        d as i32
    }
}

/// The PSNs a QP carries across a migration: where each direction stands.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Psns {
    /// Next PSN the requester sends.
    pub next: u32,
    /// Oldest PSN the requester has not had acknowledged.
    pub una: u32,
    /// PSN the responder expects next.
    pub expected: u32,
    /// Messages the responder has completed (the AETH's MSN).
    pub msn: u32,
}

/// A work request on the wire, kept until it is acknowledged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    first_psn: u32,
    last_psn: u32,
    wr_id: u64,
    opcode: u8,
    signaled: bool,
    len: u32,
}

/// The message a responder is in the middle of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RxMsg {
    /// Between messages.
    #[default]
    Idle,
    /// A SEND: bytes so far.
    Send {
        /// Bytes so far.
        done: u32,
    },
    /// An RDMA WRITE, from its first packet's RETH.
    Write {
        /// Target address.
        va: u64,
        /// R_Key.
        rkey: u32,
        /// Message length.
        len: u32,
        /// Bytes so far.
        done: u32,
    },
}

/// A QP's transport state on the inter-host fabric.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transport {
    /// The requester has taken its retry counters from the QP's attributes.
    started: bool,
    /// Ring index of the work request being transmitted (if `inflight.active`) or next to be.
    sq_next: u32,
    /// Ring index after the last work request ever begun: `[sq_head, sq_max)` have records in
    /// `sent`. A go-back-N moves `sq_next` back; this stays.
    sq_max: u32,
    /// PSN after the last packet ever sent: acknowledgements up to it are valid even while a
    /// go-back-N resends from further back.
    psn_max: u32,
    /// Work requests `[sq_head, sq_max)` on the wire, by ring index modulo [`WINDOW`].
    sent: [Sent; WINDOW],
    /// When the oldest unacknowledged packet times out.
    deadline: Option<Instant>,
    retries_left: u8,
    rnr_left: u8,
    /// An RNR NAK asked to wait until then.
    rnr_until: Option<Instant>,
    /// Go back to the oldest unacknowledged PSN before sending more.
    rewind: bool,
    /// The PSN the last go-back-N resent from.
    rewound: Option<u32>,
    /// Packets the requester may have unacknowledged now, at most [`MAX_UNACKED`].
    cwnd: u32,
    /// When the scheduler's timer for this QP fires, if one is pending.
    timer_at: Option<Instant>,
    /// The responder's message in progress.
    rx: RxMsg,
    /// A sequence-error NAK was sent for the current gap; one per gap, as the IBA asks.
    nak_sent: bool,
    /// READs executed as responder, for duplicates.
    reads: [ReadRecord; READ_HISTORY],
    read_next: u8,
    /// PSN of the last SEND, WRITE or atomic the responder accepted: what a duplicate's ACK
    /// names.
    acked: Option<u32>,
    /// Recent atomics' PSNs and results, for duplicates.
    atomics: [(u32, u64, bool); ATOMIC_REPLAY],
    atomic_next: u8,
}

impl Transport {
    /// Whether the requester has sent on the wire since the QP was last reset.
    pub fn is_started(&self) -> bool {
        self.started
    }
}

/// The requester's buffers, owned by the scheduler so sending allocates nothing.
#[derive(Debug)]
pub struct TxBuffers {
    payload: Box<[u8]>,
    /// Packets waiting to be sent; the scheduler flushes them after each step.
    pub batch: Batch,
}

impl Default for TxBuffers {
    fn default() -> Self {
        TxBuffers {
            payload: vec![0; 4096].into_boxed_slice(),
            batch: Batch::default(),
        }
    }
}

fn mtu_of(qp: &crate::vm::Qp) -> u32 {
    Mtu::from_raw(qp.attr.path_mtu)
        .map(Mtu::bytes)
        .unwrap_or(1024)
}

fn timeout_of(qp: &crate::vm::Qp) -> Duration {
    qp::ack_timeout_micros(qp.attr.timeout)
        .map(Duration::from_micros)
        .unwrap_or(DEFAULT_TIMEOUT)
        .max(MIN_TIMEOUT)
}

/// PSNs a work request takes: one per packet, and a READ one per response packet.
fn psns_for(opcode: Opcode, len: u32, mtu: u32) -> u32 {
    if opcode.is_atomic() {
        1
    } else {
        len.div_ceil(mtu).max(1)
    }
}

/// What a step of a remote QP asks of the scheduler besides its result.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// What the step achieved.
    pub step: Step,
    /// Look at the QP again then (its ACK timeout or RNR wait).
    pub timer: Option<Instant>,
}

/// The scheduler's step for an RC QP whose peer is on another host: retransmits if the oldest
/// packet timed out or a NAK asked for it, then sends new packets within the window and
/// `budget`.
#[allow(clippy::too_many_arguments)]
pub fn step_rc(
    fabric: &Fabric,
    bufs: &mut TxBuffers,
    a: &VmPort,
    av: &mut Vm,
    mem: &GuestMem,
    qpn: u32,
    budget: u32,
) -> StepOutcome {
    let idle = StepOutcome {
        step: Step::Idle,
        timer: None,
    };
    let Some(ep) = fabric.endpoint(&a.gid) else {
        return idle;
    };
    let Some(qp) = av.qps.get_mut(qpn) else {
        return idle;
    };
    let now = Instant::now();
    let (retry_cnt, rnr_retry, timeout) = (qp.attr.retry_cnt, qp.attr.rnr_retry, timeout_of(qp));
    let sqd = qp.state() == qp::State::Sqd;
    let (sq_head, una, next) = (qp.rt.sq_head, qp.rt.psns.una, qp.rt.psns.next);
    let t = &mut qp.rt.wire;
    if !t.started {
        t.started = true;
        t.cwnd = MAX_UNACKED;
        t.retries_left = retry_cnt;
        t.rnr_left = rnr_retry;
        t.sq_next = sq_head;
        t.sq_max = sq_head;
        t.psn_max = next;
    }
    let outstanding = una != t.psn_max;
    if t.timer_at.is_some_and(|at| at <= now) {
        t.timer_at = None;
    }
    if let Some(until) = t.rnr_until {
        if now < until {
            let timer = t.timer_at.is_none_or(|p| p > until).then_some(until);
            if timer.is_some() {
                t.timer_at = timer;
            }
            return StepOutcome {
                step: Step::Idle,
                timer,
            };
        }
        t.rnr_until = None;
        t.rewind = true;
    }
    if outstanding && t.deadline.is_some_and(|d| now >= d) {
        if t.retries_left == 0 {
            debug!(
                "vm {}: QP {qpn:#x}: no answer after {retry_cnt} retries; RETRY_EXC_ERR",
                a.name
            );
            fail_oldest(
                av,
                a,
                mem,
                qpn,
                Status::RetryExcErr,
                VendorErr::PeerUnreachable,
            );
            return StepOutcome {
                step: Step::Progress {
                    cost: WR_COST,
                    more: false,
                },
                timer: None,
            };
        }
        t.retries_left -= 1;
        t.rewind = true;
        t.deadline = None;
    }
    if t.rewind {
        t.rewind = false;
        if !go_back(av, a, mem, qpn, &ep.counters) {
            return idle;
        }
    }
    let mut cost = 0u32;
    let mut more = false;
    loop {
        if cost >= budget {
            more = true;
            break;
        }
        let Some(qp) = av.qps.get(qpn) else {
            return idle;
        };
        if !qp.rt.inflight.active {
            if sqd {
                break;
            }
            match begin_wr(av, a, mem, qpn) {
                Begin::Started => cost += WR_COST,
                Begin::Full | Begin::Empty | Begin::Wait => break,
                Begin::Failed => {
                    cost += WR_COST;
                    more = true;
                    break;
                }
            }
        }
        match send_next(fabric, ep, bufs, a, av, mem, qpn) {
            Sent1::Sent(n) => cost += n.max(1),
            Sent1::WindowFull => break,
            Sent1::Failed => {
                cost += WR_COST;
                break;
            }
        }
    }
    let Some(qp) = av.qps.get_mut(qpn) else {
        return idle;
    };
    let outstanding = qp.rt.psns.una != qp.rt.wire.psn_max;
    let t = &mut qp.rt.wire;
    if outstanding && t.deadline.is_none() {
        t.deadline = Some(Instant::now() + timeout);
    }
    if !outstanding {
        t.deadline = None;
    }
    let drained = sqd && !outstanding && !qp.rt.inflight.active && qp.rt.sq_head == t.sq_max;
    if drained && qp.attr.en_sqd_async_notify == 1 && !qp.rt.sqd_notified {
        qp.rt.sqd_notified = true;
        a.push_event(event::Kind::SqDrained, qpn);
    }
    // One timer in the scheduler's heap per QP at a time: a deadline that moved later is
    // re-armed when the earlier timer fires.
    let t = &mut qp.rt.wire;
    if t.timer_at.is_some_and(|at| at <= now) {
        t.timer_at = None;
    }
    let want = match (t.deadline, t.rnr_until) {
        (Some(d), Some(r)) => Some(d.min(r)),
        (d, r) => d.or(r),
    };
    let mut timer = None;
    if let Some(at) = want {
        if t.timer_at.is_none_or(|pending| pending > at) {
            t.timer_at = Some(at);
            timer = Some(at);
        }
    }
    StepOutcome {
        step: if cost > 0 {
            Step::Progress { cost, more }
        } else {
            Step::Idle
        },
        timer,
    }
}

enum Begin {
    Started,
    Empty,
    Full,
    /// The next work request cannot start until those before it complete.
    Wait,
    Failed,
}

/// Copies the work request at `sq_next` into `inflight` and records it as sent.
fn begin_wr(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32) -> Begin {
    let Some(qp) = av.qps.get(qpn) else {
        return Begin::Empty;
    };
    let t = &qp.rt.wire;
    if t.sq_next.wrapping_sub(qp.rt.sq_head) as usize >= WINDOW {
        return Begin::Full;
    }
    let Some(geometry) = qp.sq_geometry() else {
        return Begin::Empty;
    };
    let Some(producer) = load_producer(mem, qp.sq_ring_addr) else {
        engine::ring_fatal(av, a, mem, qpn, VendorErr::GuestMemory);
        return Begin::Failed;
    };
    match geometry.occupancy(producer, qp.rt.sq_head) {
        Ok(n) if n > t.sq_next.wrapping_sub(qp.rt.sq_head) => {}
        Ok(_) => return Begin::Empty,
        Err(_) => {
            engine::ring_fatal(av, a, mem, qpn, VendorErr::RingOverrun);
            return Begin::Failed;
        }
    }
    let index = t.sq_next;
    let at_head = index == qp.rt.sq_head;
    let mut slot = [0u8; MAX_SEND_SLOT];
    if !read_slot(qp, mem, index, &mut slot) {
        engine::ring_fatal(av, a, mem, qpn, VendorErr::GuestMemory);
        return Begin::Failed;
    }
    let (pdn, mtu, next_psn) = (qp.pdn, mtu_of(qp), qp.rt.psns.next);
    // READs and atomics outstanding are limited by max_rd_atomic, as on an RNIC: the
    // responder keeps only that many atomic results for replays.
    let reads_out = (0..index.wrapping_sub(qp.rt.sq_head))
        .map(|k| qp.rt.sq_head.wrapping_add(k))
        .filter(|&i| {
            Opcode::from_raw(t.sent[i as usize % WINDOW].opcode)
                .is_ok_and(|o| o == Opcode::RdmaRead || o.is_atomic())
        })
        .count();
    let read_like = wqe::SendHeader::read_from_prefix(&slot)
        .ok()
        .and_then(|(h, _)| Opcode::from_raw(h.opcode).ok())
        .is_some_and(|o| o == Opcode::RdmaRead || o.is_atomic());
    if read_like && reads_out >= usize::from(qp.attr.max_rd_atomic.max(1)) {
        return Begin::Wait;
    }
    let checked = match wqe::decode_send(&slot, qp.send_limits()) {
        Err(_) => Err((Status::LocQpOpErr, VendorErr::MalformedWqe)),
        Ok(wr) => engine::check_wr(av, pdn, qp::Type::Rc, &wr).map(|()| {
            let signaled = qp.sq_sig_all || wr.flags.contains(SendFlags::SIGNALED);
            Sent {
                first_psn: next_psn,
                last_psn: psn_add(next_psn, psns_for(wr.opcode, wr.byte_len, mtu) - 1),
                wr_id: wr.header.wr_id.get(),
                opcode: wr.opcode.raw(),
                signaled,
                len: wr.byte_len,
            }
        }),
    };
    let sent = match checked {
        Ok(s) => s,
        Err((status, vendor)) => {
            // Completions are in order: a bad request fails once all before it have completed.
            if !at_head {
                return Begin::Wait;
            }
            let Some(qp) = av.qps.get_mut(qpn) else {
                return Begin::Empty;
            };
            qp.rt.inflight.slot = slot;
            qp.rt.inflight.active = true;
            engine::fail_wr(av, a, mem, qpn, status, vendor);
            return Begin::Failed;
        }
    };
    let Some(qp) = av.qps.get_mut(qpn) else {
        return Begin::Empty;
    };
    qp.rt.inflight.slot = slot;
    qp.rt.inflight.active = true;
    let t = &mut qp.rt.wire;
    t.sent[index as usize % WINDOW] = sent;
    if index == t.sq_max {
        t.sq_max = index.wrapping_add(1);
    }
    Begin::Started
}

/// Reads send ring entry `index` of `qp` into `slot`.
fn read_slot(
    qp: &crate::vm::Qp,
    mem: &GuestMem,
    index: u32,
    slot: &mut [u8; MAX_SEND_SLOT],
) -> bool {
    let Some(geometry) = qp.sq_geometry() else {
        return false;
    };
    let stride = geometry.stride() as usize;
    let at = GuestAddress(qp.sq_ring_addr + geometry.entry_offset(index));
    stride <= MAX_SEND_SLOT && mem.read_slice(&mut slot[..stride], at).is_ok()
}

enum Sent1 {
    /// A packet went out carrying this many payload bytes.
    Sent(u32),
    WindowFull,
    Failed,
}

/// Sends the next packet of the work request in `inflight`.
fn send_next(
    fabric: &Fabric,
    ep: &Arc<Endpoint>,
    bufs: &mut TxBuffers,
    a: &VmPort,
    av: &mut Vm,
    mem: &GuestMem,
    qpn: u32,
) -> Sent1 {
    let Some(qp) = av.qps.get(qpn) else {
        return Sent1::Failed;
    };
    let psns = qp.rt.psns;
    if psn_diff(psns.next, psns.una) as u32 >= qp.rt.wire.cwnd {
        return Sent1::WindowFull;
    }
    let t = &qp.rt.wire;
    let index = t.sq_next;
    let sent = t.sent[index as usize % WINDOW];
    let slot = qp.rt.inflight.slot;
    let Ok(wr) = wqe::decode_send(&slot, qp.send_limits()) else {
        // Decoded when it started; a retransmission re-reads the ring, which the guest may
        // have overwritten under its own request.
        fail_oldest(av, a, mem, qpn, Status::LocQpOpErr, VendorErr::MalformedWqe);
        return Sent1::Failed;
    };
    let mtu = mtu_of(qp);
    let k = psn_diff(psns.next, sent.first_psn).max(0) as u32;
    let npsn = psn_diff(sent.last_psn, sent.first_psn) as u32 + 1;
    let (dest, peer) = (qp.attr.dest_qp_num.get(), qp.attr.ah_attr.dgid);
    let psn = psns.next;
    let first = k == 0;
    let last = k + 1 >= npsn;
    let off = k.saturating_mul(mtu);
    let header = &wr.header;
    let mut ext = Extensions::default();
    let mut n = 0u32;
    let (op, advance) = match wr.opcode {
        Opcode::RdmaRead => {
            let rest = wr.byte_len.saturating_sub(off);
            ext.reth = Some(Reth::new(
                header.remote_addr.get().wrapping_add(u64::from(off)),
                header.rkey.get(),
                rest,
            ));
            (Op::RcReadRequest, npsn - k)
        }
        Opcode::AtomicCmpAndSwp => {
            ext.atomic = Some(AtomicEth::compare_swap(
                header.remote_addr.get(),
                header.rkey.get(),
                header.compare_add.get(),
                header.swap.get(),
            ));
            (Op::RcCompareSwap, 1)
        }
        Opcode::AtomicFetchAndAdd => {
            ext.atomic = Some(AtomicEth::fetch_add(
                header.remote_addr.get(),
                header.rkey.get(),
                header.compare_add.get(),
            ));
            (Op::RcFetchAdd, 1)
        }
        Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => {
            n = wr.byte_len.saturating_sub(off).min(mtu);
            let payload = &mut bufs.payload[..n as usize];
            let read = match wr.payload {
                Payload::Inline(bytes) => bytes
                    .get(off as usize..(off + n) as usize)
                    .map(|b| payload.copy_from_slice(b))
                    .ok_or(VendorErr::MalformedWqe),
                Payload::Sges(sges) => {
                    let mut runs = Runs::default();
                    xfer::sge_runs(&av.mrs, sges, off, n, &mut runs)
                        .and_then(|()| xfer::read_runs(mem, runs.as_slice(), payload))
                }
            };
            if let Err(v) = read {
                // The guest changed its memory table under its own request.
                return fail_local(av, a, mem, qpn, index, v);
            }
            let imm = wr.opcode.has_imm() && last;
            if imm {
                ext.imm = Some(ImmDt::from_bytes(header.imm_data));
            }
            let write = matches!(wr.opcode, Opcode::RdmaWrite | Opcode::RdmaWriteWithImm);
            if write && first {
                ext.reth = Some(Reth::new(
                    header.remote_addr.get(),
                    header.rkey.get(),
                    wr.byte_len,
                ));
            }
            let op = match (write, first, last, imm) {
                (false, true, true, false) => Op::RcSendOnly,
                (false, true, true, true) => Op::RcSendOnlyWithImm,
                (false, true, false, _) => Op::RcSendFirst,
                (false, false, false, _) => Op::RcSendMiddle,
                (false, false, true, false) => Op::RcSendLast,
                (false, false, true, true) => Op::RcSendLastWithImm,
                (true, true, true, false) => Op::RcWriteOnly,
                (true, true, true, true) => Op::RcWriteOnlyWithImm,
                (true, true, false, _) => Op::RcWriteFirst,
                (true, false, false, _) => Op::RcWriteMiddle,
                (true, false, true, false) => Op::RcWriteLast,
                (true, false, true, true) => Op::RcWriteLastWithImm,
            };
            (op, 1)
        }
    };
    // As rxe: SE only where the responder completes a receive, AckReq on every READ and
    // atomic request.
    let solicited = last
        && wr.flags.contains(SendFlags::SOLICITED)
        && matches!(
            wr.opcode,
            Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWriteWithImm
        );
    // The window moves only on acknowledgements: ask for one at least twice per window.
    let in_flight = psn_diff(psn, psns.una) as u32 + 1;
    let half_window = (qp.rt.wire.cwnd / 2).clamp(1, ACK_EVERY);
    let ack_req = last || advance > 1 || in_flight % half_window == 0;
    let payload = &bufs.payload[..n as usize];
    let pkt = Bth::new(op, dest, psn).ok().and_then(|bth| {
        let bth = bth.with_ack_req(ack_req).with_solicited(solicited);
        Packet::new(bth, ext, payload).ok()
    });
    let Some(pkt) = pkt else {
        fail_oldest(av, a, mem, qpn, Status::LocQpOpErr, VendorErr::MalformedWqe);
        return Sent1::Failed;
    };
    fabric.send(ep, peer, &pkt, &mut bufs.batch);
    let Some(qp) = av.qps.get_mut(qpn) else {
        return Sent1::Failed;
    };
    qp.rt.psns.next = psn_add(psn, advance);
    if psn_diff(qp.rt.psns.next, qp.rt.wire.psn_max) > 0 {
        qp.rt.wire.psn_max = qp.rt.psns.next;
    }
    if k + advance >= npsn {
        qp.rt.inflight.active = false;
        qp.rt.wire.sq_next = index.wrapping_add(1);
    }
    Sent1::Sent(n)
}

/// The requester's own memory failed while building a packet of work request `index`: it
/// completes with a local protection error once it is the oldest; until then nothing more is
/// sent.
fn fail_local(
    av: &mut Vm,
    a: &VmPort,
    mem: &GuestMem,
    qpn: u32,
    index: u32,
    v: VendorErr,
) -> Sent1 {
    let Some(qp) = av.qps.get(qpn) else {
        return Sent1::Failed;
    };
    if index != qp.rt.sq_head {
        return Sent1::WindowFull;
    }
    fail_oldest(av, a, mem, qpn, Status::LocProtErr, v);
    Sent1::Failed
}

/// Go-back-N: makes the oldest unacknowledged PSN the next to send again. Returns false if the
/// work request it belongs to can no longer be read (the QP has failed).
fn go_back(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32, counters: &Counters) -> bool {
    let Some(qp) = av.qps.get(qpn) else {
        return false;
    };
    let una = qp.rt.psns.una;
    if una == qp.rt.wire.psn_max {
        return true;
    }
    let (head, end) = (qp.rt.sq_head, qp.rt.wire.sq_max);
    let mut i = head;
    let mut found = None;
    while i != end {
        let s = qp.rt.wire.sent[i as usize % WINDOW];
        if psn_diff(una, s.first_psn) >= 0 && psn_diff(una, s.last_psn) <= 0 {
            found = Some(i);
            break;
        }
        i = i.wrapping_add(1);
    }
    let Some(index) = found else {
        return true;
    };
    let resent = psn_diff(qp.rt.wire.psn_max, una).max(0) as u64;
    let mut slot = [0u8; MAX_SEND_SLOT];
    if !read_slot(qp, mem, index, &mut slot) {
        engine::ring_fatal(av, a, mem, qpn, VendorErr::GuestMemory);
        return false;
    }
    counters.retransmitted.fetch_add(resent, Ordering::Relaxed);
    let Some(qp) = av.qps.get_mut(qpn) else {
        return false;
    };
    qp.rt.inflight.slot = slot;
    qp.rt.inflight.active = true;
    qp.rt.wire.sq_next = index;
    qp.rt.wire.rewound = Some(una);
    // Each go-back resends everything after the gap: a path that loses or reorders packets
    // gets a smaller window, and earns it back one packet per acknowledgement.
    qp.rt.wire.cwnd = (qp.rt.wire.cwnd / 2).max(MIN_WINDOW);
    qp.rt.psns.next = una;
    debug!(
        "vm {}: QP {qpn:#x}: going back to PSN {una:#x} ({resent} packets)",
        a.name
    );
    true
}

/// Completes the oldest work request on the wire with `status` and takes the QP to ERR,
/// flushing the rest.
fn fail_oldest(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32, status: Status, v: VendorErr) {
    if let Some(qp) = av.qps.get(qpn) {
        let head = qp.rt.sq_head;
        if head != qp.rt.wire.sq_max {
            complete_oldest(av, a, mem, qpn, status, v);
        }
    }
    if let Some(qp) = av.qps.get_mut(qpn) {
        qp.rt.inflight.active = false;
        qp.rt.wire = Transport::default();
        qp.rt.psns.una = qp.rt.psns.next;
    }
    engine::set_error(av, a, qpn);
    completion::flush(av, a, mem, qpn, true, true);
}

/// Completes the work request at the send queue's head from its record, and consumes it.
fn complete_oldest(
    av: &mut Vm,
    a: &VmPort,
    mem: &GuestMem,
    qpn: u32,
    status: Status,
    v: VendorErr,
) {
    let Some(qp) = av.qps.get_mut(qpn) else {
        return;
    };
    let s = qp.rt.wire.sent[qp.rt.sq_head as usize % WINDOW];
    if qp.rt.sq_head == qp.rt.wire.sq_next {
        // It was still being transmitted.
        qp.rt.inflight.active = false;
        qp.rt.wire.sq_next = qp.rt.sq_head.wrapping_add(1);
    }
    qp.rt.sq_head = qp.rt.sq_head.wrapping_add(1);
    let (cqn, ring_addr, head) = (qp.send_cqn, qp.sq_ring_addr, qp.rt.sq_head);
    publish_consumer(mem, ring_addr, head);
    a.counters.wrs.fetch_add(1, Ordering::Relaxed);
    let opcode = Opcode::from_raw(s.opcode).unwrap_or(Opcode::Send);
    if status == Status::Success {
        a.counters
            .bytes
            .fetch_add(u64::from(s.len), Ordering::Relaxed);
    }
    if s.signaled || status != Status::Success {
        let mut c = Completion::new(s.wr_id, qpn, status, cqe::Opcode::of_send(opcode), v);
        if status == Status::Success {
            c.cqe.byte_len = if opcode.is_atomic() {
                wqe::ATOMIC_SIZE
            } else {
                s.len
            }
            .into();
        }
        if !completion::post(av, a, mem, cqn, &c) {
            engine::set_error(av, a, qpn);
        }
    }
}

/// The receive thread of one VM address: takes datagrams in batches, answers them, and sends
/// the answers (ACKs coalesced per QP) once per batch.
fn receive_loop(fabric: &Fabric, ep: &Arc<Endpoint>) {
    let mut storage = vec![0u8; RX_BATCH * RX_SLOT];
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(RX_BATCH, None);
    let mut rx = RxBuffers::default();
    let mut got = [(0usize, None::<SocketAddr>); RX_BATCH];
    // When the last datagram came: while traffic flows, the thread polls the socket instead of
    // sleeping in it, as the scheduler polls doorbells (a wake-up costs more than a packet).
    let mut last_traffic: Option<Instant> = None;
    while !fabric.stop.load(Ordering::Relaxed) {
        let mut n = 0;
        let polling = last_traffic.is_some_and(|t| t.elapsed() < RX_POLL_WINDOW);
        {
            let mut slots = storage.chunks_mut(RX_SLOT);
            let mut iovs: [[IoSliceMut<'_>; 1]; RX_BATCH] =
                std::array::from_fn(|_| [IoSliceMut::new(slots.next().unwrap_or_default())]);
            let flags = if polling {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::MSG_WAITFORONE
            };
            match recvmmsg(
                ep.socket.as_raw_fd(),
                &mut headers,
                iovs.iter_mut(),
                flags,
                None,
            ) {
                Ok(msgs) => {
                    for (slot, msg) in got.iter_mut().zip(msgs) {
                        *slot = (msg.bytes, msg.address.and_then(|a| to_std(&a)));
                        n += 1;
                    }
                }
                Err(Errno::EAGAIN) if polling => {
                    std::thread::yield_now();
                    continue;
                }
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => {
                    warn!("RoCEv2 {}: receive failed: {e}", ep.addr);
                    std::thread::sleep(RX_POLL);
                    continue;
                }
            }
        }
        if n > 0 {
            last_traffic = Some(Instant::now());
        }
        for (i, &(len, from)) in got[..n].iter().enumerate() {
            let Some(from) = from else { continue };
            let datagram = &storage[i * RX_SLOT..i * RX_SLOT + len.min(RX_SLOT)];
            handle_datagram(fabric, ep, &mut rx, datagram, from);
        }
        rx.send_acks(fabric, ep);
        rx.batch.flush();
        // Counted once handled, so a count that has reached N means N datagrams were acted on.
        ep.counters.rx.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// An ACK the receive thread owes, sent once its batch is done: a later one for the same QP
/// replaces it, which is ACK coalescing.
#[derive(Debug, Clone, Copy)]
struct OwedAck {
    peer: Gid,
    dest: u32,
    psn: u32,
    msn: u32,
}

/// The receive thread's buffers for what it sends back.
#[derive(Debug)]
struct RxBuffers {
    payload: Box<[u8]>,
    batch: Batch,
    acks: [Option<OwedAck>; RX_BATCH],
}

impl Default for RxBuffers {
    fn default() -> Self {
        RxBuffers {
            payload: vec![0; 4096].into_boxed_slice(),
            batch: Batch::default(),
            acks: [None; RX_BATCH],
        }
    }
}

impl RxBuffers {
    /// Owes `ack`, replacing an older one to the same QP.
    fn owe(&mut self, ack: OwedAck) {
        let same = |a: &OwedAck| a.peer == ack.peer && a.dest == ack.dest;
        if let Some(slot) = self.acks.iter_mut().flatten().find(|a| same(a)) {
            *slot = ack;
        } else if let Some(free) = self.acks.iter_mut().find(|a| a.is_none()) {
            *free = Some(ack);
        }
    }

    fn send_acks(&mut self, fabric: &Fabric, ep: &Arc<Endpoint>) {
        for owed in self.acks.iter_mut() {
            let Some(a) = owed.take() else { continue };
            let reply = Reply {
                fabric,
                ep,
                peer: a.peer,
                dest: a.dest,
            };
            reply.aeth(&mut self.batch, a.psn, ACK, a.msn);
        }
    }
}

/// Parses one datagram and gives it to the responder or the requester of its QP.
fn handle_datagram(
    fabric: &Fabric,
    ep: &Arc<Endpoint>,
    rx: &mut RxBuffers,
    datagram: &[u8],
    from: SocketAddr,
) {
    let headers = ip_udp(from, ep.addr);
    let check = match headers.ip {
        Ip::V4 { .. } if !fabric.settings.ipv4_icrc => IcrcCheck::Skip,
        _ => IcrcCheck::Verify(&headers),
    };
    let pkt = match packet::parse(datagram, Mtu::Mtu4096.bytes() as usize, check) {
        Ok(p) => p,
        Err(e) => {
            ep.counters.malformed[e.index()].fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let Some(port) = ep.vm.read().unwrap_or_else(|p| p.into_inner()).clone() else {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let peer = gid_of(from.ip());
    let mem = port.mem.memory();
    let mut vm = port.lock();
    let op = pkt.opcode();
    if op.is_ud() {
        on_ud(ep, &port, &mut vm, &mem, &pkt, peer);
    } else if op.is_response() {
        if on_response(fabric, ep, &port, &mut vm, &mem, &pkt, peer) {
            drop(vm);
            port.enqueue(pkt.bth().dest_qp());
            fabric.wake_scheduler();
            port.deliver_events();
            return;
        }
    } else {
        let read = on_request(fabric, ep, rx, &port, &mut vm, &mem, &pkt, peer);
        // A responder error queued the QP for its flush; the scheduler may be asleep.
        if port.has_work.load(Ordering::Acquire) {
            fabric.wake_scheduler();
        }
        if let Some(job) = read {
            drop(vm);
            port.deliver_events();
            run_read(fabric, ep, rx, &port, &job);
            return;
        }
    }
    drop(vm);
    port.deliver_events();
}

/// A UD datagram: delivered whole, or dropped (and counted) as an unreliable network would.
fn on_ud(ep: &Endpoint, b: &VmPort, bv: &mut Vm, mem: &GuestMem, pkt: &Packet<'_>, peer: Gid) {
    let Some(deth) = pkt.ext().deth else {
        return;
    };
    let dest_qpn = pkt.bth().dest_qp();
    if bv
        .qps
        .get(dest_qpn)
        .is_none_or(|q| q.qp_type() != qp::Type::Ud)
    {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        b.counters.ud_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut header = wqe::SendHeader::default();
    let opcode = match pkt.ext().imm {
        Some(imm) => {
            header.imm_data = imm.bytes();
            Opcode::SendWithImm
        }
        None => Opcode::Send,
    };
    let payload = pkt.payload();
    let no_runs = Runs::default();
    let c = Chunk {
        a_id: REMOTE_PORT_ID,
        a_gid: peer,
        a_qpn: deth.src_qp(),
        qp_type: qp::Type::Ud,
        opcode,
        header: &header,
        solicited: pkt.bth().solicited(),
        len: payload.len() as u32,
        done: 0,
        n: payload.len() as u32,
        last: true,
        qkey: deth.qkey(),
        a_runs: &no_runs,
        inline: payload,
        is_inline: true,
        a_mem: mem,
        b_mem: mem,
    };
    let mut unused = 0u64;
    let _ = engine::respond(bv, b, dest_qpn, &c, &mut unused);
}

/// An RC request: checked against the expected PSN, executed once, acknowledged. A READ
/// returns the response packets to send once the VM's lock is released.
#[allow(clippy::too_many_arguments)]
fn on_request(
    fabric: &Fabric,
    ep: &Arc<Endpoint>,
    rx: &mut RxBuffers,
    b: &VmPort,
    bv: &mut Vm,
    mem: &GuestMem,
    pkt: &Packet<'_>,
    peer: Gid,
) -> Option<ReadJob> {
    let qpn = pkt.bth().dest_qp();
    let Some(qp) = bv.qps.get(qpn) else {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let ready = matches!(qp.state(), qp::State::Rtr | qp::State::Rts | qp::State::Sqd);
    if qp.qp_type() != qp::Type::Rc || !ready || qp.attr.ah_attr.dgid != peer {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let psn = pkt.bth().psn();
    let expected = qp.rt.psns.expected;
    let d = psn_diff(psn, expected);
    let reply = Reply {
        fabric,
        ep,
        peer,
        dest: qp.attr.dest_qp_num.get(),
    };
    if d > 0 {
        ep.counters.out_of_sequence.fetch_add(1, Ordering::Relaxed);
        let msn = qp.rt.psns.msn;
        if let Some(qp) = bv.qps.get_mut(qpn) {
            if !qp.rt.wire.nak_sent {
                qp.rt.wire.nak_sent = true;
                reply.aeth(
                    &mut rx.batch,
                    expected,
                    Syndrome::Nak(NakCode::PsnSequenceError),
                    msn,
                );
            }
        }
        return None;
    }
    if d < 0 {
        ep.counters.duplicates.fetch_add(1, Ordering::Relaxed);
        return on_duplicate(&reply, rx, b, bv, mem, qpn, pkt);
    }
    if let Some(qp) = bv.qps.get_mut(qpn) {
        qp.rt.wire.nak_sent = false;
    }
    match pkt.opcode() {
        Op::RcReadRequest => {
            let reth = pkt.ext().reth?;
            return serve_read(&reply, rx, b, bv, mem, qpn, psn, reth, true);
        }
        Op::RcCompareSwap | Op::RcFetchAdd => serve_atomic(&reply, rx, b, bv, mem, qpn, pkt),
        _ => serve_data(&reply, rx, b, bv, mem, qpn, pkt),
    }
    None
}

/// Where answers to one request go.
struct Reply<'a> {
    fabric: &'a Fabric,
    ep: &'a Arc<Endpoint>,
    peer: Gid,
    dest: u32,
}

impl Reply<'_> {
    /// Owes an ACK for `psn`, sent with the receive batch's other answers.
    fn ack_later(&self, rx: &mut RxBuffers, psn: u32, msn: u32) {
        rx.owe(OwedAck {
            peer: self.peer,
            dest: self.dest,
            psn,
            msn,
        });
    }

    /// Sends an ACKNOWLEDGE (or NAK) for `psn`.
    fn aeth(&self, batch: &mut Batch, psn: u32, syndrome: Syndrome, msn: u32) {
        if !matches!(syndrome, Syndrome::Ack { .. }) {
            self.ep.counters.naks.fetch_add(1, Ordering::Relaxed);
        }
        let (Ok(bth), Ok(aeth)) = (
            Bth::new(Op::RcAcknowledge, self.dest, psn),
            Aeth::new(syndrome, msn & PSN_MASK),
        ) else {
            return;
        };
        let ext = Extensions {
            aeth: Some(aeth),
            ..Extensions::default()
        };
        if let Ok(pkt) = Packet::new(bth, ext, &[]) {
            self.fabric.send(self.ep, self.peer, &pkt, batch);
        }
    }

    fn send(&self, batch: &mut Batch, op: Op, psn: u32, ext: Extensions, payload: &[u8]) {
        let Ok(bth) = Bth::new(op, self.dest, psn) else {
            return;
        };
        if let Ok(pkt) = Packet::new(bth, ext, payload) {
            self.fabric.send(self.ep, self.peer, &pkt, batch);
        }
    }
}

const ACK: Syndrome = Syndrome::Ack {
    credits: vrdma_roce::aeth::NO_CREDITS,
};

/// A request already executed: answered again, never executed twice.
fn on_duplicate(
    reply: &Reply<'_>,
    rx: &mut RxBuffers,
    b: &VmPort,
    bv: &mut Vm,
    mem: &GuestMem,
    qpn: u32,
    pkt: &Packet<'_>,
) -> Option<ReadJob> {
    let qp = bv.qps.get(qpn)?;
    let psn = pkt.bth().psn();
    let (expected, msn) = (qp.rt.psns.expected, qp.rt.psns.msn);
    match pkt.opcode() {
        // Reading again changes nothing, and the requester may ask for only the part it lacks.
        Op::RcReadRequest => {
            let reth = pkt.ext().reth?;
            return serve_read(reply, rx, b, bv, mem, qpn, psn, reth, false);
        }
        Op::RcCompareSwap | Op::RcFetchAdd => {
            let hit = qp
                .rt
                .wire
                .atomics
                .iter()
                .find(|(p, _, valid)| *valid && *p == psn);
            if let Some(&(_, orig, _)) = hit {
                atomic_ack(reply, rx, psn, msn, orig);
            }
        }
        // Acknowledged again whether or not it asks (IBA C9-105, as rxe does): a requester
        // resends because the first acknowledgement never reached it. The PSN is that of the
        // last SEND, WRITE or atomic: an ACK must not name a READ's PSN, or the requester
        // would take the READ as answered.
        _ => {
            let acked = qp.rt.wire.acked.unwrap_or(psn_add(expected, PSN_MASK));
            reply.ack_later(rx, acked, msn);
        }
    }
    None
}

fn atomic_ack(reply: &Reply<'_>, rx: &mut RxBuffers, psn: u32, msn: u32, orig: u64) {
    let Ok(aeth) = Aeth::new(ACK, msn & PSN_MASK) else {
        return;
    };
    let ext = Extensions {
        aeth: Some(aeth),
        atomic_ack: Some(AtomicAckEth::new(orig)),
        ..Extensions::default()
    };
    reply.send(&mut rx.batch, Op::RcAtomicAcknowledge, psn, ext, &[]);
}

/// Maps what the responder did to the NAK code the requester is told.
fn nak_code(status: Status) -> NakCode {
    match status {
        Status::RemAccessErr => NakCode::RemoteAccessError,
        Status::RemInvReqErr => NakCode::InvalidRequest,
        _ => NakCode::RemoteOperationalError,
    }
}

/// The NAK for a request the responder cannot make sense of; the QP goes to ERR as the IBA
/// asks of an invalid request.
fn invalid_request(
    reply: &Reply<'_>,
    rx: &mut RxBuffers,
    b: &VmPort,
    bv: &mut Vm,
    mem: &GuestMem,
    qpn: u32,
    psn: u32,
) {
    let msn = bv.qps.get(qpn).map_or(0, |q| q.rt.psns.msn);
    engine::responder_error(bv, b, mem, qpn, None, VendorErr::MalformedWqe);
    b.push_event(event::Kind::QpReqErr, qpn);
    reply.aeth(
        &mut rx.batch,
        psn,
        Syndrome::Nak(NakCode::InvalidRequest),
        msn,
    );
}

/// SEND and RDMA WRITE packets, through the local fabric's responder.
fn serve_data(
    reply: &Reply<'_>,
    rx: &mut RxBuffers,
    b: &VmPort,
    bv: &mut Vm,
    mem: &GuestMem,
    qpn: u32,
    pkt: &Packet<'_>,
) {
    let Some(qp) = bv.qps.get(qpn) else { return };
    let psn = pkt.bth().psn();
    let op = pkt.opcode();
    let mtu = mtu_of(qp);
    let payload = pkt.payload();
    let n = payload.len() as u32;
    let state = qp.rt.wire.rx;
    let a_qpn = qp.attr.dest_qp_num.get();
    use Op::*;
    let is_send = matches!(
        op,
        RcSendFirst
            | RcSendMiddle
            | RcSendLast
            | RcSendLastWithImm
            | RcSendOnly
            | RcSendOnlyWithImm
            | RcSendLastWithInvalidate
            | RcSendOnlyWithInvalidate
    );
    let starts = matches!(
        op,
        RcSendFirst
            | RcSendOnly
            | RcSendOnlyWithImm
            | RcSendOnlyWithInvalidate
            | RcWriteFirst
            | RcWriteOnly
            | RcWriteOnlyWithImm
    );
    let ends = !matches!(
        op,
        RcSendFirst | RcSendMiddle | RcWriteFirst | RcWriteMiddle
    );
    // The opcode sequence and the packet sizes the IBA requires (9.7.5.1.1): a message in
    // progress continues with a middle or last packet of its own kind; all but the last carry
    // exactly one path MTU.
    let in_order = match state {
        RxMsg::Idle => starts,
        RxMsg::Send { .. } => is_send && !starts,
        RxMsg::Write { .. } => !is_send && !starts,
    };
    if !in_order || (!ends && n != mtu) || n > mtu {
        invalid_request(reply, rx, b, bv, mem, qpn, psn);
        return;
    }
    if matches!(op, RcSendLastWithInvalidate | RcSendOnlyWithInvalidate) {
        // vrdma has no memory windows or fast-registered MRs to invalidate.
        invalid_request(reply, rx, b, bv, mem, qpn, psn);
        return;
    }
    let mut header = wqe::SendHeader::default();
    if let Some(imm) = pkt.ext().imm {
        header.imm_data = imm.bytes();
    }
    let with_imm = pkt.ext().imm.is_some();
    let (opcode, len, done) = if is_send {
        let done = match state {
            RxMsg::Send { done } => done,
            _ => 0,
        };
        let total = done.saturating_add(n);
        let opcode = if with_imm {
            Opcode::SendWithImm
        } else {
            Opcode::Send
        };
        (opcode, total, done)
    } else {
        let (va, rkey, len, done) = match (state, pkt.ext().reth) {
            (
                RxMsg::Write {
                    va,
                    rkey,
                    len,
                    done,
                },
                _,
            ) => (va, rkey, len, done),
            (_, Some(reth)) => (reth.va(), reth.rkey(), reth.dma_len(), 0),
            _ => {
                invalid_request(reply, rx, b, bv, mem, qpn, psn);
                return;
            }
        };
        let end = done.checked_add(n);
        if end.is_none_or(|e| e > len || (ends && e != len)) {
            invalid_request(reply, rx, b, bv, mem, qpn, psn);
            return;
        }
        header.remote_addr = va.into();
        header.rkey = rkey.into();
        let opcode = if with_imm {
            Opcode::RdmaWriteWithImm
        } else {
            Opcode::RdmaWrite
        };
        (opcode, len, done)
    };
    let no_runs = Runs::default();
    let c = Chunk {
        a_id: REMOTE_PORT_ID,
        a_gid: reply.peer,
        a_qpn,
        qp_type: qp::Type::Rc,
        opcode,
        header: &header,
        solicited: pkt.bth().solicited(),
        len,
        done,
        n,
        last: ends,
        qkey: 0,
        a_runs: &no_runs,
        inline: payload,
        is_inline: true,
        a_mem: mem,
        b_mem: mem,
    };
    let mut unused = 0u64;
    let resp = engine::respond(bv, b, qpn, &c, &mut unused);
    let Some(qp) = bv.qps.get_mut(qpn) else {
        return;
    };
    let min_rnr = qp.attr.min_rnr_timer;
    match resp {
        Resp::Done => {
            qp.rt.psns.expected = psn_add(psn, 1);
            qp.rt.wire.acked = Some(psn);
            qp.rt.wire.rx = match (ends, is_send) {
                (true, _) => RxMsg::Idle,
                (false, true) => RxMsg::Send { done: done + n },
                (false, false) => RxMsg::Write {
                    va: header.remote_addr.get(),
                    rkey: header.rkey.get(),
                    len,
                    done: done + n,
                },
            };
            if ends {
                qp.rt.psns.msn = psn_add(qp.rt.psns.msn, 1);
            }
            if pkt.bth().ack_req() {
                let msn = qp.rt.psns.msn;
                reply.ack_later(rx, psn, msn);
            }
        }
        Resp::Rnr(_) => {
            let msn = qp.rt.psns.msn;
            reply.aeth(
                &mut rx.batch,
                psn,
                Syndrome::RnrNak {
                    timer: min_rnr & 31,
                },
                msn,
            );
        }
        Resp::Nak(status, _) => {
            let msn = qp.rt.psns.msn;
            qp.rt.wire.rx = RxMsg::Idle;
            reply.aeth(&mut rx.batch, psn, Syndrome::Nak(nak_code(status)), msn);
        }
        Resp::NoResponder | Resp::Busy | Resp::Dropped | Resp::LocalFault(_) => {}
    }
}

/// READ response packets a receive thread sends with the VM's lock taken at most this many
/// at a time, so a large READ never holds the VM's other QPs, its control path or its
/// scheduler steps for long.
const READ_BURST: u32 = 16;

/// A READ the responder has executed, kept to answer a retransmitted request for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadRecord {
    first_psn: u32,
    npkts: u32,
    va: u64,
    rkey: u32,
    len: u32,
    msn: u32,
}

/// Response packets to send for one READ: `[from, npkts)` of `read`.
#[derive(Debug, Clone, Copy)]
pub struct ReadJob {
    qpn: u32,
    peer: Gid,
    dest: u32,
    mtu: u32,
    read: ReadRecord,
    from: u32,
}

/// An RDMA READ request, checked. A new one moves the expected PSN past all its response
/// packets and is recorded; a duplicate is answered from its record, from the packet it asks
/// for on, as MIDDLE..LAST (a requester that already has the first responses expects no new
/// FIRST, rxe's for one), and only if it asks for what the record says (IBA 9.7.5.1.3). The
/// packets go out afterwards, from [`run_read`].
#[allow(clippy::too_many_arguments)]
fn serve_read(
    reply: &Reply<'_>,
    rx: &mut RxBuffers,
    b: &VmPort,
    bv: &mut Vm,
    mem: &GuestMem,
    qpn: u32,
    psn: u32,
    reth: Reth,
    new: bool,
) -> Option<ReadJob> {
    let qp = bv.qps.get(qpn)?;
    let mtu = mtu_of(qp);
    let job = |read: ReadRecord, from: u32| ReadJob {
        qpn,
        peer: reply.peer,
        dest: reply.dest,
        mtu,
        read,
        from,
    };
    if !new {
        let hit = qp.rt.wire.reads.iter().find(|r| {
            let k = psn_diff(psn, r.first_psn);
            k >= 0 && (k as u32) < r.npkts
        })?;
        let k = psn_diff(psn, hit.first_psn) as u32;
        let off = k * mtu;
        let same = reth.rkey() == hit.rkey
            && reth.va() == hit.va.wrapping_add(u64::from(off))
            && reth.dma_len() == hit.len - off.min(hit.len);
        return same.then(|| job(*hit, k));
    }
    let (va, rkey, len) = (reth.va(), reth.rkey(), reth.dma_len());
    // A message is at most 2^31 bytes (IBA C9-94), which also keeps a READ's PSNs within the
    // half of PSN space that tells old from new.
    if qp.rt.wire.rx != RxMsg::Idle || len > 1 << 31 {
        invalid_request(reply, rx, b, bv, mem, qpn, psn);
        return None;
    }
    let access = Access::from_bits_truncate(qp.attr.qp_access_flags.get());
    let pdn = qp.pdn;
    let msn = psn_add(qp.rt.psns.msn, 1);
    let checked = if len == 0 {
        // A zero-length READ names no memory (IBA C9-88).
        Ok(())
    } else {
        bv.mrs.get(rkey).ok_or(VendorErr::BadRkey).and_then(|mr| {
            if mr.pdn != pdn {
                Err(VendorErr::PdMismatch)
            } else if !mr.access().contains(Access::REMOTE_READ)
                || !access.contains(Access::REMOTE_READ)
            {
                Err(VendorErr::RemoteAccess)
            } else if !mr.contains(va, len.into()) {
                Err(VendorErr::RemoteOutOfBounds)
            } else {
                Ok(())
            }
        })
    };
    if let Err(v) = checked {
        let msn = qp.rt.psns.msn;
        engine::responder_error(bv, b, mem, qpn, None, v);
        b.push_event(event::Kind::QpAccessErr, qpn);
        reply.aeth(
            &mut rx.batch,
            psn,
            Syndrome::Nak(NakCode::RemoteAccessError),
            msn,
        );
        return None;
    }
    let read = ReadRecord {
        first_psn: psn,
        npkts: len.div_ceil(mtu).max(1),
        va,
        rkey,
        len,
        msn,
    };
    let qp = bv.qps.get_mut(qpn)?;
    qp.rt.psns.expected = psn_add(psn, read.npkts);
    qp.rt.psns.msn = msn;
    let w = &mut qp.rt.wire;
    w.reads[usize::from(w.read_next) % READ_HISTORY] = read;
    w.read_next = w.read_next.wrapping_add(1);
    Some(job(read, 0))
}

/// Sends a READ's response packets, taking the VM's lock for [`READ_BURST`] at a time and
/// checking each time that the QP still answers and the MR still grants the range: a guest
/// may destroy either meanwhile, and then the rest is not sent (its requester times out, as
/// with a responder that went away).
fn run_read(fabric: &Fabric, ep: &Arc<Endpoint>, rx: &mut RxBuffers, port: &VmPort, job: &ReadJob) {
    let mem = port.mem.memory();
    let r = job.read;
    let reply = Reply {
        fabric,
        ep,
        peer: job.peer,
        dest: job.dest,
    };
    let Ok(aeth) = Aeth::new(ACK, r.msn & PSN_MASK) else {
        return;
    };
    let mut k = job.from;
    while k < r.npkts {
        let vm = port.lock();
        let ready = vm
            .qps
            .get(job.qpn)
            .is_some_and(|q| matches!(q.state(), qp::State::Rtr | qp::State::Rts | qp::State::Sqd));
        let mr = vm
            .mrs
            .get(r.rkey)
            .filter(|mr| mr.contains(r.va, r.len.into()));
        if !ready || (r.len > 0 && mr.is_none()) {
            return;
        }
        let end = (k + READ_BURST).min(r.npkts);
        while k < end {
            let off = k * job.mtu;
            let n = r.len.saturating_sub(off).min(job.mtu);
            let payload = &mut rx.payload[..n as usize];
            if let Some(mr) = mr {
                let mut runs = Runs::default();
                let read = xfer::mr_runs(mr, r.va + u64::from(off), n, &mut runs)
                    .and_then(|()| xfer::read_runs(&mem, runs.as_slice(), payload));
                if read.is_err() {
                    return;
                }
            }
            let (op, with_aeth) = match (k == 0, k + 1 == r.npkts) {
                (true, true) => (Op::RcReadResponseOnly, true),
                (true, false) => (Op::RcReadResponseFirst, true),
                (false, false) => (Op::RcReadResponseMiddle, false),
                (false, true) => (Op::RcReadResponseLast, true),
            };
            let ext = Extensions {
                aeth: with_aeth.then_some(aeth),
                ..Extensions::default()
            };
            reply.send(
                &mut rx.batch,
                op,
                psn_add(r.first_psn, k),
                ext,
                &rx.payload[..n as usize],
            );
            k += 1;
        }
    }
}

/// An atomic: executed once; its result kept to answer a retransmission.
fn serve_atomic(
    reply: &Reply<'_>,
    rx: &mut RxBuffers,
    b: &VmPort,
    bv: &mut Vm,
    mem: &GuestMem,
    qpn: u32,
    pkt: &Packet<'_>,
) {
    let Some(qp) = bv.qps.get(qpn) else { return };
    let psn = pkt.bth().psn();
    let Some(eth) = pkt.ext().atomic else { return };
    if qp.rt.wire.rx != RxMsg::Idle {
        invalid_request(reply, rx, b, bv, mem, qpn, psn);
        return;
    }
    let (compare_add, swap, opcode) = if pkt.opcode() == Op::RcCompareSwap {
        (eth.compare(), eth.swap_add(), Opcode::AtomicCmpAndSwp)
    } else {
        (eth.swap_add(), 0, Opcode::AtomicFetchAndAdd)
    };
    let header = wqe::SendHeader {
        remote_addr: eth.va().into(),
        rkey: eth.rkey().into(),
        compare_add: compare_add.into(),
        swap: swap.into(),
        ..wqe::SendHeader::default()
    };
    let no_runs = Runs::default();
    let c = Chunk {
        a_id: REMOTE_PORT_ID,
        a_gid: reply.peer,
        a_qpn: qp.attr.dest_qp_num.get(),
        qp_type: qp::Type::Rc,
        opcode,
        header: &header,
        solicited: false,
        len: wqe::ATOMIC_SIZE,
        done: 0,
        n: wqe::ATOMIC_SIZE,
        last: true,
        qkey: 0,
        a_runs: &no_runs,
        inline: &[],
        is_inline: true,
        a_mem: mem,
        b_mem: mem,
    };
    let mut orig = 0u64;
    let resp = engine::respond(bv, b, qpn, &c, &mut orig);
    let Some(qp) = bv.qps.get_mut(qpn) else {
        return;
    };
    match resp {
        Resp::Done => {
            qp.rt.psns.expected = psn_add(psn, 1);
            qp.rt.wire.acked = Some(psn);
            qp.rt.psns.msn = psn_add(qp.rt.psns.msn, 1);
            let w = &mut qp.rt.wire;
            w.atomics[usize::from(w.atomic_next) % ATOMIC_REPLAY] = (psn, orig, true);
            w.atomic_next = w.atomic_next.wrapping_add(1);
            let msn = qp.rt.psns.msn;
            atomic_ack(reply, rx, psn, msn, orig);
        }
        Resp::Nak(status, _) => {
            let msn = qp.rt.psns.msn;
            reply.aeth(&mut rx.batch, psn, Syndrome::Nak(nak_code(status)), msn);
        }
        _ => {}
    }
}

/// A response to this VM's requester: ACK, NAK, READ response or atomic ACK. Returns whether
/// the QP's window moved (the scheduler should send more).
#[allow(clippy::too_many_arguments)]
fn on_response(
    fabric: &Fabric,
    ep: &Endpoint,
    a: &VmPort,
    av: &mut Vm,
    mem: &GuestMem,
    pkt: &Packet<'_>,
    peer: Gid,
) -> bool {
    let _ = fabric;
    let qpn = pkt.bth().dest_qp();
    let Some(qp) = av.qps.get(qpn) else {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    let ready = matches!(qp.state(), qp::State::Rts | qp::State::Sqd);
    if qp.qp_type() != qp::Type::Rc || !ready || qp.attr.ah_attr.dgid != peer {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let psn = pkt.bth().psn();
    let una = qp.rt.psns.una;
    // Only PSNs on the wire can be answered.
    if psn_diff(psn, una) < -1 || psn_diff(psn, qp.rt.wire.psn_max) >= 0 {
        ep.counters.stray_responses.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let syndrome = pkt.ext().aeth.map(|a| a.syndrome());
    match pkt.opcode() {
        Op::RcAcknowledge => match syndrome {
            Some(Ok(Syndrome::Ack { .. })) => {
                ack_through(av, a, mem, qpn, psn) || wants_rewind(av, qpn)
            }
            Some(Ok(Syndrome::Nak(NakCode::PsnSequenceError))) => {
                ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
                rewind(av, qpn);
                true
            }
            Some(Ok(Syndrome::RnrNak { timer })) => {
                ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
                if !head_holds(av, qpn, psn) {
                    // It names a request after a READ or atomic still unanswered: those
                    // responses were lost, so go back for them first (as rxe does).
                    rewind(av, qpn);
                    return true;
                }
                let Some(qp) = av.qps.get_mut(qpn) else {
                    return false;
                };
                let infinite = qp.attr.rnr_retry == qp::RNR_RETRY_INFINITE;
                if !infinite && qp.rt.wire.rnr_left == 0 {
                    fail_oldest(
                        av,
                        a,
                        mem,
                        qpn,
                        Status::RnrRetryExcErr,
                        VendorErr::RnrExhausted,
                    );
                    return false;
                }
                if !infinite {
                    qp.rt.wire.rnr_left -= 1;
                }
                let wait = Duration::from_micros(qp::rnr_timer_micros(timer).into());
                qp.rt.wire.rnr_until = Some(Instant::now() + wait);
                qp.rt.wire.deadline = None;
                true
            }
            Some(Ok(Syndrome::Nak(code))) => {
                ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
                if !head_holds(av, qpn, psn) {
                    rewind(av, qpn);
                    return true;
                }
                let status = match code {
                    NakCode::InvalidRequest | NakCode::InvalidRdRequest => Status::RemInvReqErr,
                    NakCode::RemoteAccessError => Status::RemAccessErr,
                    _ => Status::RemOpErr,
                };
                fail_oldest(av, a, mem, qpn, status, VendorErr::None);
                false
            }
            _ => false,
        },
        Op::RcReadResponseFirst
        | Op::RcReadResponseMiddle
        | Op::RcReadResponseLast
        | Op::RcReadResponseOnly => read_response(av, a, mem, qpn, pkt),
        Op::RcAtomicAcknowledge => atomic_response(av, a, mem, qpn, pkt),
        _ => false,
    }
}

/// Whether a go-back-N is waiting for the scheduler.
fn wants_rewind(av: &Vm, qpn: u32) -> bool {
    av.qps.get(qpn).is_some_and(|q| q.rt.wire.rewind)
}

/// Whether the oldest work request on the wire is the one packet `psn` belongs to: a NAK
/// fails only that one.
fn head_holds(av: &Vm, qpn: u32, psn: u32) -> bool {
    av.qps.get(qpn).is_some_and(|q| {
        let s = q.rt.wire.sent[q.rt.sq_head as usize % WINDOW];
        q.rt.sq_head != q.rt.wire.sq_max
            && psn_diff(psn, s.first_psn) >= 0
            && psn_diff(psn, s.last_psn) <= 0
    })
}

/// Asks the transmitter to go back to the oldest unacknowledged PSN.
fn rewind(av: &mut Vm, qpn: u32) {
    if let Some(qp) = av.qps.get_mut(qpn) {
        ask_rewind(qp);
    }
}

/// Asks for a go-back-N unless one from the same PSN is already under way: every packet after
/// a gap reports it, and answering each would resend the window again and again. The ACK
/// timer still catches a resent packet that was itself lost.
fn ask_rewind(qp: &mut crate::vm::Qp) {
    let una = qp.rt.psns.una;
    if qp.rt.wire.rewound != Some(una) {
        qp.rt.wire.rewind = true;
    }
}

/// Completes the SENDs and WRITEs whose packets up to `psn` are acknowledged. A READ or atomic
/// among them whose response has not arrived means the response was lost: go back for it
/// (IBA 9.7.4.1.3, implied NAK).
fn ack_through(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32, psn: u32) -> bool {
    let mut moved = false;
    loop {
        let Some(qp) = av.qps.get_mut(qpn) else {
            return moved;
        };
        let una = qp.rt.psns.una;
        if psn_diff(psn, una) < 0 {
            break;
        }
        let head = qp.rt.sq_head;
        if head == qp.rt.wire.sq_max {
            break;
        }
        let s = qp.rt.wire.sent[head as usize % WINDOW];
        let opcode = Opcode::from_raw(s.opcode).unwrap_or(Opcode::Send);
        if matches!(opcode, Opcode::RdmaRead) || opcode.is_atomic() {
            // Its own responses acknowledge it. Only an acknowledgement of a later request
            // means they were lost (IBA 9.7.4.1.3, implied NAK).
            if psn_diff(psn, s.last_psn) >= 0 {
                ask_rewind(qp);
            }
            break;
        }
        if psn_diff(psn, s.last_psn) < 0 {
            // Part of a long message.
            qp.rt.psns.una = psn_add(psn, 1);
            progress(qp);
            moved = true;
            break;
        }
        // Every PSN up to `psn` was sent at least once (responses beyond `psn_max` are
        // refused), so the whole request has arrived even if a go-back-N is resending it.
        qp.rt.psns.una = psn_add(s.last_psn, 1);
        progress(qp);
        complete_oldest(av, a, mem, qpn, Status::Success, VendorErr::None);
        moved = true;
    }
    moved
}

/// Forward progress: the retry budget is whole again and the timer restarts. A go-back-N
/// that is resending what has now been acknowledged skips ahead.
fn progress(qp: &mut crate::vm::Qp) {
    if psn_diff(qp.rt.psns.una, qp.rt.psns.next) > 0 {
        qp.rt.psns.next = qp.rt.psns.una;
    }
    let (retry, rnr) = (qp.attr.retry_cnt, qp.attr.rnr_retry);
    let w = &mut qp.rt.wire;
    w.retries_left = retry;
    w.rnr_left = rnr;
    w.deadline = None;
    w.cwnd = (w.cwnd + 1).min(MAX_UNACKED);
}

/// The work request at the head, if it is a READ or atomic whose PSNs include `psn` and
/// everything before it has been acknowledged by this response (responses come in order).
fn responded(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32, psn: u32) -> Option<Sent> {
    // A response implies every request before it was received.
    ack_through(av, a, mem, qpn, psn_add(psn, PSN_MASK));
    let qp = av.qps.get_mut(qpn)?;
    let head = qp.rt.sq_head;
    if head == qp.rt.wire.sq_max {
        return None;
    }
    let s = qp.rt.wire.sent[head as usize % WINDOW];
    let in_range = psn_diff(psn, s.first_psn) >= 0 && psn_diff(psn, s.last_psn) <= 0;
    (in_range && psn == qp.rt.psns.una).then_some(s)
}

/// A READ response packet: its payload goes where the READ's SGEs say.
fn read_response(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32, pkt: &Packet<'_>) -> bool {
    let psn = pkt.bth().psn();
    let Some(s) = responded(av, a, mem, qpn, psn) else {
        if let Some(qp) = av.qps.get_mut(qpn) {
            // A response after a gap: the packets between were lost.
            if psn_diff(psn, qp.rt.psns.una) > 0 {
                ask_rewind(qp);
            }
        }
        return wants_rewind(av, qpn);
    };
    if Opcode::from_raw(s.opcode).ok() != Some(Opcode::RdmaRead) {
        return false;
    }
    let Some(qp) = av.qps.get(qpn) else {
        return false;
    };
    let mtu = mtu_of(qp);
    let k = psn_diff(psn, s.first_psn) as u32;
    let off = k * mtu;
    let payload = pkt.payload();
    let n = payload.len() as u32;
    let last = psn == s.last_psn;
    let op = pkt.opcode();
    // A READ retried from its middle is answered FIRST, MIDDLE..., LAST from where it resumed,
    // so only the sizes are fixed: a full MTU until the last, which ends the message.
    let ends = matches!(op, Op::RcReadResponseOnly | Op::RcReadResponseLast);
    let shape_ok = ends == last && if last { off + n == s.len } else { n == mtu };
    if !shape_ok {
        // Not what was asked: treat as lost and ask again.
        rewind(av, qpn);
        return true;
    }
    let mut slot = [0u8; MAX_SEND_SLOT];
    let head = qp.rt.sq_head;
    let placed = read_slot(qp, mem, head, &mut slot)
        .then(|| wqe::decode_send(&slot, qp.send_limits()).ok())
        .flatten()
        .filter(|wr| wr.opcode == Opcode::RdmaRead && wr.header.wr_id.get() == s.wr_id)
        .map(|wr| match wr.payload {
            Payload::Sges(sges) => {
                let mut runs = Runs::default();
                xfer::sge_runs(&av.mrs, sges, off, n, &mut runs)
                    .and_then(|()| xfer::write_runs(payload, mem, runs.as_slice()))
            }
            Payload::Inline(_) => Err(VendorErr::MalformedWqe),
        });
    match placed {
        Some(Ok(())) => {}
        _ => {
            fail_oldest(av, a, mem, qpn, Status::LocProtErr, VendorErr::GuestMemory);
            return false;
        }
    }
    let Some(qp) = av.qps.get_mut(qpn) else {
        return false;
    };
    qp.rt.psns.una = psn_add(psn, 1);
    progress(qp);
    if last {
        complete_oldest(av, a, mem, qpn, Status::Success, VendorErr::None);
    }
    true
}

/// An atomic's acknowledgement: the value before goes into the request's SGE.
fn atomic_response(av: &mut Vm, a: &VmPort, mem: &GuestMem, qpn: u32, pkt: &Packet<'_>) -> bool {
    let psn = pkt.bth().psn();
    let Some(s) = responded(av, a, mem, qpn, psn) else {
        if let Some(qp) = av.qps.get_mut(qpn) {
            // An answer after a gap: what was before it was lost.
            if psn_diff(psn, qp.rt.psns.una) > 0 {
                ask_rewind(qp);
            }
        }
        return wants_rewind(av, qpn);
    };
    let Some(ack) = pkt.ext().atomic_ack else {
        return false;
    };
    if !Opcode::from_raw(s.opcode).is_ok_and(Opcode::is_atomic) {
        return false;
    }
    let Some(qp) = av.qps.get(qpn) else {
        return false;
    };
    let mut slot = [0u8; MAX_SEND_SLOT];
    let placed = read_slot(qp, mem, qp.rt.sq_head, &mut slot)
        .then(|| wqe::decode_send(&slot, qp.send_limits()).ok())
        .flatten()
        .filter(|wr| wr.opcode.is_atomic() && wr.header.wr_id.get() == s.wr_id)
        .map(|wr| match wr.payload {
            Payload::Sges(sges) => {
                let mut runs = Runs::default();
                xfer::sge_runs(&av.mrs, sges, 0, wqe::ATOMIC_SIZE, &mut runs).and_then(|()| {
                    xfer::write_runs(&ack.original().to_ne_bytes(), mem, runs.as_slice())
                })
            }
            Payload::Inline(_) => Err(VendorErr::MalformedWqe),
        });
    if !matches!(placed, Some(Ok(()))) {
        fail_oldest(av, a, mem, qpn, Status::LocProtErr, VendorErr::GuestMemory);
        return false;
    }
    let Some(qp) = av.qps.get_mut(qpn) else {
        return false;
    };
    qp.rt.psns.una = psn_add(psn, 1);
    progress(qp);
    complete_oldest(av, a, mem, qpn, Status::Success, VendorErr::None);
    true
}

/// Sends a UD work request as one datagram; it completes as soon as it is sent, as on an RNIC.
#[allow(clippy::too_many_arguments)]
pub fn send_ud(
    fabric: &Fabric,
    bufs: &mut TxBuffers,
    a: &VmPort,
    av: &Vm,
    mem: &GuestMem,
    wr: &wqe::SendWr<'_>,
    dgid: Gid,
    dest_qpn: u32,
    qkey: u32,
    src_qpn: u32,
) -> Result<(), VendorErr> {
    let Some(ep) = fabric.endpoint(&a.gid) else {
        return Ok(());
    };
    let n = wr.byte_len;
    let payload = bufs
        .payload
        .get_mut(..n as usize)
        .ok_or(VendorErr::MessageTooLong)?;
    match wr.payload {
        Payload::Inline(bytes) => payload.copy_from_slice(bytes),
        Payload::Sges(sges) => {
            let mut runs = Runs::default();
            xfer::sge_runs(&av.mrs, sges, 0, n, &mut runs)?;
            xfer::read_runs(mem, runs.as_slice(), payload)?;
        }
    }
    let (op, imm) = if wr.opcode.has_imm() {
        (
            Op::UdSendOnlyWithImm,
            Some(ImmDt::from_bytes(wr.header.imm_data)),
        )
    } else {
        (Op::UdSendOnly, None)
    };
    let deth = Deth::new(qkey, src_qpn).map_err(|_| VendorErr::BadAh)?;
    let bth = Bth::new(op, dest_qpn, 0)
        .map_err(|_| VendorErr::BadAh)?
        .with_solicited(wr.flags.contains(SendFlags::SOLICITED));
    let ext = Extensions {
        deth: Some(deth),
        imm,
        ..Extensions::default()
    };
    let pkt = Packet::new(bth, ext, &bufs.payload[..n as usize])
        .map_err(|_| VendorErr::MessageTooLong)?;
    fabric.send(ep, dgid, &pkt, &mut bufs.batch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psn_arithmetic_wraps_at_24_bits() {
        assert_eq!(psn_add(PSN_MASK, 1), 0);
        assert_eq!(psn_add(5, PSN_MASK), 4);
        assert_eq!(psn_diff(0, PSN_MASK), 1);
        assert_eq!(psn_diff(PSN_MASK, 0), -1);
        assert_eq!(psn_diff(10, 3), 7);
        assert_eq!(psn_diff(3, 10), -7);
    }

    #[test]
    fn a_work_request_takes_one_psn_per_packet_and_a_read_one_per_response() {
        assert_eq!(psns_for(Opcode::Send, 0, 1024), 1);
        assert_eq!(psns_for(Opcode::Send, 1024, 1024), 1);
        assert_eq!(psns_for(Opcode::RdmaWrite, 1025, 1024), 2);
        assert_eq!(psns_for(Opcode::RdmaRead, 65536, 4096), 16);
        assert_eq!(psns_for(Opcode::AtomicFetchAndAdd, 8, 256), 1);
    }

    #[test]
    fn gids_and_addresses_map_both_ways() {
        let v4 = Gid::from_ipv4([10, 1, 2, 3]);
        assert_eq!(ip_of(v4), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(gid_of(ip_of(v4)), v4);
        let v6 = Gid([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(gid_of(ip_of(v6)), v6);
        // A dual-stack socket reports IPv4 peers as mapped IPv6.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert_eq!(gid_of(mapped), v4);
    }
}
