//! A VM's address on the network: its UDP socket, the VM that answers there, and what passed
//! through it; and the IP and UDP headers a datagram travels with, as the ICRC sees them.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use log::warn;
use vrdma_proto::Gid;
use vrdma_roce::icrc::{IPV4_DF, Ip, IpUdp};
use vrdma_roce::packet::ParseError;

use crate::config::{Dscp, ip_of};
use crate::model::objects::Qp;
use crate::model::vm::Vm;

/// Bytes of socket buffer per VM address, each way.
const SOCKET_BUFFER: usize = 8 << 20;

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
    /// Looks at an expired ACK timer that found datagrams from before its deadline still
    /// unread (the host was late running the receive thread), each followed by another a
    /// millisecond later instead of a retry.
    pub timer_deferred: AtomicU64,
    /// Packets that arrived marked CE: a switch on the way was congested.
    pub ecn_marked: AtomicU64,
    /// Responses that came back with BECN, each a peer's echo of a congestion mark on this
    /// address's requests.
    pub becn: AtomicU64,
    /// Times a QP's window was halved for a congestion mark (at most once a window).
    pub window_cuts: AtomicU64,
}

/// A VM's address on the network: its socket and who answers there.
#[derive(Debug)]
pub struct Endpoint {
    /// The VM's address.
    pub addr: SocketAddr,
    /// The DSCP of each priority class's packets (`--dscp`).
    pub dscp: Dscp,
    /// The socket bound to it while [`Endpoint::bound`]; otherwise an unbound socket that
    /// receives nothing. The descriptor stays for the endpoint's life and the socket behind
    /// it is replaced (`dup2`), so the receive thread and the senders never take a lock for
    /// it: a VM that migrates away releases its address, and one that arrives claims it.
    pub socket: UdpSocket,
    /// The address is bound here.
    pub bound: AtomicBool,
    /// A VM here wants the address: the receive thread binds it as soon as it is free.
    pub wanted: AtomicBool,
    /// Serialises binding and releasing.
    pub claim: std::sync::Mutex<()>,
    /// The receive thread, woken when the address is bound: until then it sleeps.
    pub receiver: std::sync::OnceLock<std::thread::Thread>,
    /// The UDP port of every daemon in the fabric, where packets to peers go.
    pub peer_port: u16,
    /// The VM answering on this address, if one is attached.
    pub vm: RwLock<Option<Arc<Vm>>>,
    /// The VM's traffic is paused (migration): datagrams to it are dropped, and its peers
    /// retransmit them later as after a loss.
    pub paused: AtomicBool,
    /// What passed through it.
    pub counters: Counters,
    /// How far the receive thread has got with what arrived: see [`Endpoint::caught_up`].
    pub rx_progress: RxProgress,
}

/// How far an endpoint's receive thread has got with the datagrams that reached its socket,
/// so that the requester tells a peer that did not answer from an answer that arrived but
/// waits, unread, for a receive thread the host has not run yet.
#[derive(Debug)]
pub struct RxProgress {
    /// What [`RxProgress::drained_at`] counts from.
    epoch: Instant,
    /// Nanoseconds after `epoch` (plus one; 0 is never) before which every datagram that
    /// reached the socket has been handled: the start of the last receive that found the
    /// socket empty, recorded once the datagrams it took are handled.
    drained_at: AtomicU64,
    /// The receive thread holds no datagram: it waits for the socket to become readable, or
    /// has no socket to read. Cleared before it takes datagrams, set after it handled them.
    idle: AtomicBool,
}

impl Default for RxProgress {
    fn default() -> Self {
        RxProgress {
            epoch: Instant::now(),
            drained_at: AtomicU64::new(0),
            idle: AtomicBool::new(true),
        }
    }
}

impl RxProgress {
    /// The receive thread is about to take datagrams from the socket.
    pub fn taking(&self) {
        self.idle.store(false, Ordering::SeqCst);
    }

    /// The receive thread has handled every datagram it took, and the receive that began at
    /// `started` found the socket empty.
    pub fn drained(&self, started: Instant) {
        let at = started.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        self.drained_at.fetch_max(at, Ordering::SeqCst);
    }

    /// The receive thread holds no datagram and waits for more.
    pub fn waiting(&self) {
        self.idle.store(true, Ordering::SeqCst);
    }

    /// The receive thread has stopped: nothing will be read any more, so nothing is waited
    /// for.
    pub fn stopped(&self) {
        self.drained_at.store(u64::MAX, Ordering::SeqCst);
    }

    fn drained_since(&self, t: Instant) -> bool {
        // Stored plus one, so never (0) is before every `t`.
        self.drained_at.load(Ordering::SeqCst)
            > t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

impl Endpoint {
    /// An endpoint for `addr` on `socket` (bound to it if `bound`), sending to peers at
    /// `peer_port`, with no VM yet.
    pub fn new(addr: SocketAddr, socket: UdpSocket, bound: bool, peer_port: u16) -> Self {
        Endpoint {
            addr,
            dscp: Dscp::default(),
            socket,
            bound: AtomicBool::new(bound),
            wanted: AtomicBool::new(false),
            claim: std::sync::Mutex::new(()),
            receiver: std::sync::OnceLock::new(),
            peer_port,
            vm: RwLock::new(None),
            paused: AtomicBool::new(false),
            counters: Counters::default(),
            rx_progress: RxProgress::default(),
        }
    }

    /// The same endpoint, its packets marked with `dscp`.
    pub fn with_dscp(mut self, dscp: Dscp) -> Self {
        self.dscp = dscp;
        self
    }

    /// The IP TOS byte of a packet of RC QP `qp` of VM `vm`: its class is its VM's, or lower
    /// by its path's service level (`SlClasses`), and its path gives the traffic class (see
    /// `Dscp::tos`).
    pub fn tos(&self, vm: &Vm, qp: &Qp) -> u8 {
        let path = &qp.attr.ah_attr;
        let class = vm.share.qp_class(qp.qp_type(), path.sl);
        self.dscp.tos(class, path.traffic_class)
    }

    /// The IP TOS byte of a datagram of VM `vm` to an address that gives `traffic_class`: UD
    /// QPs are in their VM's class.
    pub fn datagram_tos(&self, vm: &Vm, traffic_class: u8) -> u8 {
        self.dscp.tos(vm.share.class(), traffic_class)
    }

    /// Where packets for the port of GID `peer` go.
    pub fn peer_addr(&self, peer: Gid) -> SocketAddr {
        SocketAddr::new(ip_of(peer), self.peer_port)
    }

    /// Whether every datagram that reached the socket before `t` has been handled (given to
    /// the responder or the requester's completer). An answer that arrived before an ACK
    /// timeout but is still unread says nothing about the peer: the host has not yet run the
    /// receive thread.
    pub fn caught_up(&self, t: Instant) -> bool {
        let rx = &self.rx_progress;
        if rx.drained_since(t) {
            return true;
        }
        // The socket first, then the thread: a datagram the socket held when asked was taken
        // only after the thread said it was taking, so a thread still idle afterwards holds
        // nothing that arrived before.
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int, the size of the next datagram, through the
        // pointer, which points to one; the descriptor is the endpoint's open socket.
        let rc = unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::FIONREAD, &mut queued) };
        rc != 0 || (queued == 0 && rx.idle.load(Ordering::SeqCst))
    }
}

/// Gives the socket room for a window of packets of every busy QP: the default (about 200
/// KiB, some 90 datagrams) drops bursts, and each drop costs a go-back-N. A daemon with
/// CAP_NET_ADMIN gets [`SOCKET_BUFFER`] whatever `net.core.rmem_max` says; one without gets
/// what that allows.
pub fn size_buffers(socket: &UdpSocket, addr: SocketAddr) {
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
pub fn ip_udp(src: SocketAddr, dst: SocketAddr) -> IpUdp {
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
