//! The network side of the RoCEv2 fabric: one UDP socket per VM address, and one receive
//! thread per socket that parses datagrams and runs the responder and the requester's
//! completer on them.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use vm_memory::GuestAddressSpace;
use vrdma_proto::Gid;
use vrdma_proto::config::Mtu;
use vrdma_roce::icrc::Ip;
use vrdma_roce::packet::{self, IcrcCheck, ParseError};

use super::endpoint::{Endpoint, ip_udp, size_buffers};
use super::requester::on_response;
use super::responder::{RxBuffers, on_request, on_ud, run_read};
use crate::config::{ECN_CE, RoceSettings, gid_of, ip_of};
use crate::model::vm::Vm;
use crate::wake::Bell;

/// How long a receive thread keeps polling its socket after the last datagram before it
/// sleeps in it again.
const RX_POLL_WINDOW: Duration = Duration::from_micros(50);

/// How often a receive thread checks whether the daemon is stopping.
const RX_POLL: Duration = Duration::from_millis(200);

/// How often an address a VM arrived for is tried again while another daemon holds it.
const CLAIM_RETRY: Duration = Duration::from_millis(2);

/// How long the shareable bind after the start's exclusive check may wait for the check's
/// socket to be gone (see `shared_after_check`).
const CHECK_SOCKET_GONE: Duration = Duration::from_millis(500);

/// Datagrams per `recvmmsg`.
const RX_BATCH: usize = 32;

/// Room per received datagram: a RoCEv2 packet of the largest MTU fits; longer datagrams are
/// truncated and fail the parser.
const RX_SLOT: usize = 8192;

/// The P_Key bits that name the partition (the top bit is the membership type).
const PKEY_BASE: u16 = 0x7fff;

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

/// The sockets and receive threads of one daemon's VM addresses.
#[derive(Debug)]
pub struct Network {
    settings: RoceSettings,
    endpoints: HashMap<Gid, Arc<Endpoint>>,
    scheduler: OnceLock<Arc<Bell>>,
    stop: AtomicBool,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Network {
    /// Binds every VM's GID address (but those of VMs that arrive by migration, bound when
    /// they do) and starts the receive threads. `vms`: each VM's name, GID and whether it is
    /// `incoming`.
    pub fn start(
        settings: RoceSettings,
        vms: &[(String, Gid, bool)],
    ) -> Result<Arc<Network>, Error> {
        let mut endpoints = HashMap::new();
        for (name, gid, incoming) in vms {
            let addr = SocketAddr::new(ip_of(*gid), settings.port);
            let bind_error = |source| Error::Bind {
                vm: name.clone(),
                addr,
                source,
            };
            let (socket, bound) = if *incoming {
                (unbound_socket(addr).map_err(bind_error)?, false)
            } else {
                // Nobody else may hold the address: a plain bind says so at start. The
                // address is then bound shareable, so the daemon a VM migrates to can take it
                // over without a gap (see `shared_socket`).
                drop(UdpSocket::bind(addr).map_err(bind_error)?);
                let shared = shared_after_check(addr, CHECK_SOCKET_GONE);
                (shared.map_err(bind_error)?, true)
            };
            socket.set_read_timeout(Some(RX_POLL)).map_err(bind_error)?;
            if bound {
                size_buffers(&socket, addr);
            }
            endpoints.insert(
                *gid,
                Arc::new(
                    Endpoint::new(addr, socket, bound, settings.port).with_dscp(settings.dscp),
                ),
            );
        }
        let net = Arc::new(Network {
            settings,
            endpoints,
            scheduler: OnceLock::new(),
            stop: AtomicBool::new(false),
            threads: std::sync::Mutex::new(Vec::new()),
        });
        for ep in net.endpoints.values() {
            let (n, e) = (net.clone(), ep.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vrdma-roce-{}", ep.addr.ip()))
                .spawn(move || {
                    let _ = e.receiver.set(std::thread::current());
                    receive_loop(&n, &e)
                })
                .map_err(|source| Error::Thread(ep.addr, source))?;
            net.threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(handle);
            if ep.bound.load(Ordering::Relaxed) {
                info!("RoCEv2: listening on {}", ep.addr);
            } else {
                info!("RoCEv2: {} is bound when its VM arrives", ep.addr);
            }
        }
        Ok(net)
    }

    /// Tells the network how to wake the scheduler when acknowledgements free a QP's window.
    pub fn set_scheduler(&self, bell: Arc<Bell>) {
        let _ = self.scheduler.set(bell);
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
                "RoCEv2 {}: rx {} tx {} tx-errors {} tx-dropped {} no-qp {} bad-pkey {} out-of-sequence {} duplicates {} retransmitted {} naks {} stray-responses {} timer-deferred {} ecn-marked {} becn {} window-cuts {} malformed {} [{}]",
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
                load(&c.timer_deferred),
                load(&c.ecn_marked),
                load(&c.becn),
                load(&c.window_cuts),
                c.malformed.iter().map(load).sum::<u64>(),
                malformed.join(", "),
            );
        }
    }

    /// Every address the network serves, in address order (metrics read their counters).
    pub fn endpoints(&self) -> Vec<&Arc<Endpoint>> {
        let mut all: Vec<_> = self.endpoints.values().collect();
        all.sort_by_key(|ep| ep.addr);
        all
    }

    /// The endpoint of a VM's GID, if the network serves it.
    pub fn endpoint(&self, gid: &Gid) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(gid)
    }

    /// Makes `vm` the VM answering on its GID's address (`None` when it goes away). A VM
    /// leaving stops the tries for an address not yet bound (a migration to here that failed);
    /// one bound stays bound for the VM's next guest.
    pub fn attach(&self, gid: &Gid, vm: Option<Arc<Vm>>) {
        if let Some(ep) = self.endpoints.get(gid) {
            let leaving = vm.is_none();
            *ep.vm.write().unwrap_or_else(|p| p.into_inner()) = vm;
            if leaving {
                ep.wanted.store(false, Ordering::Release);
            }
        }
    }

    /// The VM on `gid`'s address runs here now (its guest started, or it resumed after
    /// arriving by migration): binds the address if this daemon does not hold it yet. Not on
    /// connection: a destination's VM connects long before the switch-over, and binding then
    /// would take the source's traffic while the VM still runs there.
    pub fn claim(&self, gid: &Gid) {
        if let Some(ep) = self.endpoints.get(gid) {
            ep.wanted.store(true, Ordering::Release);
            claim(ep);
        }
    }

    /// Gives up the address of `gid` (its VM migrated to another daemon, which binds it).
    pub fn release(&self, gid: &Gid) {
        let Some(ep) = self.endpoints.get(gid) else {
            return;
        };
        let _claim = ep.claim.lock().unwrap_or_else(|p| p.into_inner());
        ep.wanted.store(false, Ordering::Release);
        if !ep.bound.load(Ordering::Acquire) {
            return;
        }
        match unbound_socket(ep.addr) {
            Ok(socket) => {
                shun_peers(ep);
                replace_socket(ep, &socket);
                ep.bound.store(false, Ordering::Release);
                info!(
                    "RoCEv2: released {}: its VM moved to another daemon",
                    ep.addr
                );
            }
            Err(e) => warn!(
                "RoCEv2: cannot release {} for the daemon its VM moved to: {e}; that daemon cannot receive its traffic until this one stops",
                ep.addr
            ),
        }
    }

    /// Pauses (or resumes) the traffic of the VM on `gid`'s address.
    pub fn set_paused(&self, gid: &Gid, paused: bool) {
        if let Some(ep) = self.endpoints.get(gid) {
            ep.paused.store(paused, Ordering::Release);
        }
    }

    fn wake_scheduler(&self) {
        if let Some(bell) = self.scheduler.get() {
            bell.ring();
        }
    }
}

/// The receive thread of one VM address: takes datagrams in batches, answers them, and sends
/// the answers (ACKs coalesced per QP) once per batch.
fn receive_loop(net: &Network, ep: &Arc<Endpoint>) {
    let mut storage = vec![0u8; RX_BATCH * RX_SLOT];
    // Room in each message for its TOS (IPv4) or traffic class (IPv6): its ECN field.
    let mut headers =
        MultiHeaders::<SockaddrStorage>::preallocate(RX_BATCH, Some(nix::cmsg_space!(libc::c_int)));
    let mut rx = RxBuffers::default();
    // Each datagram's length, sender, and whether a switch marked it congested (CE).
    let mut got = [(0usize, None::<SocketAddr>, false); RX_BATCH];
    // When the last datagram came: while traffic flows, the thread polls the socket instead of
    // sleeping in it, as the scheduler polls doorbells (a wake-up costs more than a packet).
    let mut last_traffic: Option<Instant> = None;
    let wait = PollTimeout::try_from(RX_POLL).unwrap_or(PollTimeout::MAX);
    while !net.stop.load(Ordering::Relaxed) {
        if !ep.bound.load(Ordering::Acquire) {
            ep.rx_progress.waiting();
            // The address is another daemon's until its VM runs here; once it does, try
            // again until that daemon lets it go. Until then there is nothing to receive.
            let wanted = ep.wanted.load(Ordering::Acquire);
            if wanted {
                claim(ep);
            }
            if !ep.bound.load(Ordering::Acquire) {
                // Woken as soon as the address is bound (`claim`).
                std::thread::park_timeout(if wanted { CLAIM_RETRY } else { RX_POLL });
                continue;
            }
        }
        let mut n = 0;
        let polling = last_traffic.is_some_and(|t| t.elapsed() < RX_POLL_WINDOW);
        if !polling {
            // Sleep until a datagram arrives, holding none: while the thread waits, what it
            // has not read is in the socket, where an ACK timer can see it
            // (`Endpoint::caught_up`), even once the datagram has woken the thread and the
            // host has yet to run it.
            ep.rx_progress.waiting();
            let mut fds = [PollFd::new(ep.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!("RoCEv2 {}: waiting for datagrams failed: {e}", ep.addr);
                    std::thread::sleep(RX_POLL);
                    continue;
                }
            }
        }
        ep.rx_progress.taking();
        let started = Instant::now();
        {
            let mut slots = storage.chunks_mut(RX_SLOT);
            let mut iovs: [[IoSliceMut<'_>; 1]; RX_BATCH] =
                std::array::from_fn(|_| [IoSliceMut::new(slots.next().unwrap_or_default())]);
            match recvmmsg(
                ep.socket.as_raw_fd(),
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(msgs) => {
                    for (slot, msg) in got.iter_mut().zip(msgs) {
                        *slot = (
                            msg.bytes,
                            msg.address.and_then(|a| to_std(&a)),
                            congested(&msg),
                        );
                        n += 1;
                    }
                }
                Err(Errno::EAGAIN) => {
                    ep.rx_progress.drained(started);
                    if polling {
                        std::thread::yield_now();
                    }
                    continue;
                }
                Err(Errno::EINTR) => continue,
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
        for (i, &(len, from, ce)) in got[..n].iter().enumerate() {
            let Some(from) = from else { continue };
            let datagram = &storage[i * RX_SLOT..i * RX_SLOT + len.min(RX_SLOT)];
            handle_datagram(net, ep, &mut rx, datagram, from, ce);
        }
        rx.send_acks(ep);
        rx.batch.flush();
        // Counted once handled, so a count that has reached N means N datagrams were acted on.
        ep.counters.rx.fetch_add(n as u64, Ordering::Relaxed);
        if n < RX_BATCH {
            // The receive stopped short because the socket was empty: everything that had
            // arrived when it began is handled now.
            ep.rx_progress.drained(started);
        }
    }
    ep.rx_progress.stopped();
}

/// Binds `ep`'s address if it is wanted and not yet bound: with `IP_FREEBIND`, since a
/// migrated VM's address may come to this host only at the switch-over. Fails quietly while
/// another process holds it without sharing (the receive thread tries again).
fn claim(ep: &Endpoint) {
    let _claim = ep.claim.lock().unwrap_or_else(|p| p.into_inner());
    if ep.bound.load(Ordering::Acquire) || !ep.wanted.load(Ordering::Acquire) {
        return;
    }
    match shared_socket(ep.addr, true) {
        Ok(socket) => {
            size_buffers(&socket, ep.addr);
            replace_socket(ep, &socket);
            ep.bound.store(true, Ordering::Release);
            if let Some(t) = ep.receiver.get() {
                t.unpark();
            }
            info!("RoCEv2: listening on {} (its VM arrived)", ep.addr);
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => warn!("RoCEv2: cannot bind {}: {e}", ep.addr),
    }
}

/// A UDP socket of `addr`'s family bound to nothing: an endpoint's socket while its address
/// is another daemon's. It receives nothing, and nothing is sent from it.
fn unbound_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socket, sockopt};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(io::Error::from)?;
    // Each datagram comes with its TOS (traffic class), whose ECN field says whether a
    // switch marked it congested.
    if addr.is_ipv4() {
        setsockopt(&fd, sockopt::IpRecvTos, &true).map_err(io::Error::from)?;
    } else {
        setsockopt(&fd, sockopt::Ipv6RecvTClass, &true).map_err(io::Error::from)?;
    }
    Ok(UdpSocket::from(fd))
}

/// Whether datagram `msg` arrived marked CE (its ECN field 11): a switch on the way was
/// congested.
fn congested<S>(msg: &nix::sys::socket::RecvMsg<'_, '_, S>) -> bool {
    use nix::sys::socket::ControlMessageOwned;
    let Ok(cmsgs) = msg.cmsgs() else {
        return false;
    };
    cmsgs.into_iter().any(|c| match c {
        ControlMessageOwned::Ipv4Tos(tos) => tos & 0b11 == ECN_CE,
        ControlMessageOwned::Ipv6TClass(tclass) => tclass & 0b11 == i32::from(ECN_CE),
        _ => false,
    })
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT`, and with `freebind` even if the address
/// is not (yet) this host's. Sharing is what lets a VM move between two daemons on one host
/// without a gap: the destination binds the address when the VM starts there, while the
/// source still holds it for a moment (its VM stopped, so what reaches it is dropped and
/// resent), and the source's socket leaves the group when it lets the VM go. Only sockets
/// that all set the option share, and Linux shares only among one user's sockets.
fn shared_socket(addr: SocketAddr, freebind: bool) -> io::Result<UdpSocket> {
    use nix::sys::socket::{SockaddrStorage, bind, setsockopt, sockopt};
    let socket = unbound_socket(addr)?;
    setsockopt(&socket, sockopt::ReusePort, &true).map_err(io::Error::from)?;
    if freebind {
        setsockopt(&socket, sockopt::IpFreebind, &true).map_err(io::Error::from)?;
    }
    bind(socket.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(io::Error::from)?;
    Ok(socket)
}

/// [`shared_socket`] for `addr` right after a plain bind checked that nobody holds it and
/// closed its socket. A child process forked at that moment by another thread (a test harness
/// runs daemons beside threads that spawn programs) holds a copy of the check's descriptor
/// until it calls exec, which closes it, and until then the address is bound without sharing:
/// the bind is retried for up to `wait` while it says the address is in use. The daemon
/// itself forks nothing, so alone it binds at the first try.
fn shared_after_check(addr: SocketAddr, wait: Duration) -> io::Result<UdpSocket> {
    let deadline = Instant::now() + wait;
    loop {
        match shared_socket(addr, false) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(CLAIM_RETRY);
            }
            bound => return bound,
        }
    }
}

/// Puts `new` behind `ep`'s descriptor: the receive thread, woken out of a receive on the old
/// socket, reads from the new one on its next call; senders use it from their next batch.
fn replace_socket(ep: &Endpoint, new: &UdpSocket) {
    let _ = new.set_read_timeout(Some(RX_POLL));
    let _ = nix::sys::socket::shutdown(ep.socket.as_raw_fd(), nix::sys::socket::Shutdown::Read);
    // SAFETY: both descriptors are open sockets this endpoint owns; dup2 atomically makes
    // `ep.socket`'s descriptor refer to `new`'s socket (closing the old one), which
    // `ep.socket` then owns as before. `new` keeps its own descriptor, closed when dropped.
    let rc = unsafe { libc::dup2(new.as_raw_fd(), ep.socket.as_raw_fd()) };
    if rc < 0 {
        warn!(
            "RoCEv2 {}: cannot switch sockets: {}",
            ep.addr,
            io::Error::last_os_error()
        );
    }
    if let Some(t) = ep.receiver.get() {
        t.unpark();
    }
}

/// Makes `ep`'s socket take no more datagrams from peers before it is let go. A receive in
/// progress keeps a socket open after its descriptor moved on, and an open socket stays in
/// the address's `SO_REUSEPORT` group, where a peer's packet could still land and be lost
/// while the daemon the VM moved to waits for it. Connected to a port nobody sends from, it
/// matches no peer's packet, and Linux then picks the group's unconnected socket, the new
/// owner's, at once, whatever the receive thread is doing.
fn shun_peers(ep: &Endpoint) {
    let nowhere = SockaddrStorage::from(SocketAddr::new(ep.addr.ip(), 1));
    if let Err(e) = nix::sys::socket::connect(ep.socket.as_raw_fd(), &nowhere) {
        warn!(
            "RoCEv2 {}: cannot stop the socket taking peers' packets before releasing it: {e}",
            ep.addr
        );
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
    net: &Network,
    ep: &Arc<Endpoint>,
    rx: &mut RxBuffers,
    datagram: &[u8],
    from: SocketAddr,
    ce: bool,
) {
    let headers = ip_udp(from, ep.addr);
    let check = match headers.ip {
        Ip::V4 { .. } if !net.settings.ipv4_icrc => IcrcCheck::Skip,
        _ => IcrcCheck::Verify(&headers),
    };
    let pkt = match packet::parse(datagram, Mtu::Mtu4096.bytes() as usize, check) {
        Ok(p) => p,
        Err(e) => {
            ep.counters.malformed[e.index()].fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if ce {
        ep.counters.ecn_marked.fetch_add(1, Ordering::Relaxed);
    }
    // vrdma ports have one partition, the default: a packet of another is not for us (the
    // membership bit is ignored, as a full member accepts limited members' packets).
    if pkt.bth().pkey() & PKEY_BASE != vrdma_roce::bth::DEFAULT_PKEY & PKEY_BASE {
        ep.counters.bad_pkey.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // A paused VM's traffic is lost, as on a link that paused: its peers resend it.
    if ep.paused.load(Ordering::Acquire) {
        return;
    }
    let Some(vm) = ep.vm.read().unwrap_or_else(|p| p.into_inner()).clone() else {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let peer = gid_of(from.ip());
    let mem = vm.mem.memory();
    let mut objects = vm.lock();
    // Checked again under the VM's lock: whoever pauses the VM takes that lock once after
    // setting the flag, so once the pause returns no packet writes into the VM's memory.
    if ep.paused.load(Ordering::Acquire) {
        return;
    }
    let op = pkt.opcode();
    if op.is_ud() {
        on_ud(ep, &vm, &mut objects, &mem, &pkt, peer);
    } else if op.is_response() {
        if on_response(ep, &vm, &mut objects, &mem, &pkt, peer) {
            drop(objects);
            vm.enqueue(pkt.bth().dest_qp());
            net.wake_scheduler();
            vm.deliver_events();
            return;
        }
    } else {
        let read = on_request(ep, rx, &vm, &mut objects, &mem, &pkt, peer, ce);
        // A responder error queued the QP for its flush; the scheduler may be asleep.
        if vm.has_work.load(Ordering::Acquire) {
            net.wake_scheduler();
        }
        if let Some(job) = read {
            drop(objects);
            vm.deliver_events();
            run_read(ep, rx, &vm, &job);
            return;
        }
    }
    drop(objects);
    vm.deliver_events();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shareable bind after the start's check waits for a copy of the check's socket
    /// that another process still held (here a duplicate, closed 20 ms later), and binds.
    /// Without the wait it failed: the address was in use without sharing.
    #[test]
    fn the_shared_bind_waits_for_the_check_socket_to_be_gone() {
        let check = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = check.local_addr().unwrap();
        let held_elsewhere = check.try_clone().unwrap();
        drop(check);
        let err = shared_socket(addr, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "the copy holds it");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held_elsewhere);
        });
        let shared = shared_after_check(addr, Duration::from_secs(30)).expect("bound");
        assert_eq!(shared.local_addr().unwrap(), addr);
        release.join().unwrap();
        // Bound shareable: a second shareable socket joins it, as a migration's would.
        shared_socket(addr, false).expect("shared");
        // And nothing held: the first try binds.
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let free = other.local_addr().unwrap();
        drop(other);
        shared_after_check(free, Duration::ZERO).expect("bound at once");
    }
}
