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
use zerocopy::FromBytes;

use crate::completion::{self, Completion, load_producer, publish_consumer};
use crate::engine::{self, Chunk, MAX_SEND_SLOT, Resp, Step, WR_COST};
use crate::port::VmPort;
use crate::vm::{GuestMem, Vm};
use crate::xfer::{self, Runs};

mod batch;
mod requester;
mod responder;

pub use batch::Batch;
use requester::*;
pub use requester::{MAX_UNACKED, StepOutcome, TxBuffers, WINDOW, send_ud, step_rc};
use responder::*;
pub use responder::{ReadJob, ReadRecord, RxMsg};

/// Bytes of socket buffer per VM address, each way.
const SOCKET_BUFFER: usize = 8 << 20;

/// How long a receive thread keeps polling its socket after the last datagram before it
/// sleeps in it again.
const RX_POLL_WINDOW: Duration = Duration::from_micros(50);

/// How often a receive thread checks whether the daemon is stopping.
const RX_POLL: Duration = Duration::from_millis(200);

/// Datagrams per `recvmmsg`.
const RX_BATCH: usize = 32;

/// Room per received datagram: a RoCEv2 packet of the largest MTU fits; longer datagrams are
/// truncated and fail the parser.
const RX_SLOT: usize = 8192;

/// The P_Key bits that name the partition (the top bit is the membership type).
const PKEY_BASE: u16 = 0x7fff;
/// PSNs are 24 bits.
const PSN_MASK: u32 = vrdma_roce::MAX_24;

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
    /// Packets of a partition (P_Key) other than the default, the only one vrdma has.
    pub bad_pkey: AtomicU64,
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
                "RoCEv2 {}: rx {} tx {} tx-errors {} tx-dropped {} no-qp {} bad-pkey {} out-of-sequence {} duplicates {} retransmitted {} naks {} stray-responses {} malformed {} [{}]",
                ep.addr,
                load(&c.rx),
                load(&c.tx),
                load(&c.tx_errors),
                load(&c.tx_dropped),
                load(&c.no_qp),
                load(&c.bad_pkey),
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

/// A QP's transport state on the inter-host fabric.
#[derive(Debug, Clone, Default)]
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
    /// The records of work requests on the wire, READs and atomics answered. Made with the
    /// QP when the daemon runs the inter-host fabric (`--roce`), so that every other QP stays
    /// small.
    records: Option<Box<Records>>,
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
    /// Where the next READ record goes.
    read_next: u8,
    /// PSN of the last SEND, WRITE or atomic the responder accepted: what a duplicate's ACK
    /// names.
    acked: Option<u32>,
    /// Where the next atomic record goes.
    atomic_next: u8,
}

/// What a QP's transport remembers of its traffic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Records {
    /// Work requests `[sq_head, sq_max)` on the wire, by ring index modulo [`WINDOW`].
    sent: [Sent; WINDOW],
    /// READs executed as responder, for duplicates.
    reads: [ReadRecord; READ_HISTORY],
    /// Recent atomics' PSNs and results, for duplicates.
    atomics: [(u32, u64, bool); ATOMIC_REPLAY],
}

impl Transport {
    /// A transport for a QP that may talk across hosts, its records made now (control path).
    pub fn with_records() -> Self {
        Transport {
            records: Some(Box::default()),
            ..Transport::default()
        }
    }

    /// The transport of a QP just reset: everything forgotten, the records (if it has them)
    /// kept for reuse, so a reset allocates nothing.
    pub fn reset(self) -> Self {
        let records = self.records.map(|mut r| {
            *r = Records::default();
            r
        });
        Transport {
            records,
            ..Transport::default()
        }
    }

    /// Whether the requester has sent on the wire since the QP was last reset.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// The record of the work request in send ring slot `index` (a blank one if the QP has no
    /// records).
    fn sent(&self, index: u32) -> Sent {
        self.records
            .as_ref()
            .map_or_else(Sent::default, |r| r.sent[index as usize % WINDOW])
    }

    /// The records, made now only for a QP restored from saved state (its transport is not
    /// saved); a QP created with `--roce` has them from the start.
    fn records(&mut self) -> &mut Records {
        self.records.get_or_insert_with(Box::default)
    }
}

fn mtu_of(qp: &crate::vm::Qp) -> u32 {
    Mtu::from_raw(qp.attr.path_mtu)
        .map(Mtu::bytes)
        .unwrap_or(1024)
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
    // vrdma ports have one partition, the default: a packet of another is not for us (the
    // membership bit is ignored, as a full member accepts limited members' packets).
    if pkt.bth().pkey() & PKEY_BASE != vrdma_roce::bth::DEFAULT_PKEY & PKEY_BASE {
        ep.counters.bad_pkey.fetch_add(1, Ordering::Relaxed);
        return;
    }
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
