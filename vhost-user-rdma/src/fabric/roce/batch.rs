//! Sending: packets sealed into a batch and sent with one `sendmmsg`.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use log::warn;
use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
use vrdma_proto::Gid;
use vrdma_roce::packet::Packet;

use super::endpoint::{Endpoint, ip_udp};

/// The largest UDP payload the fabric builds: a 4096-byte MTU and the longest header stack.
const MAX_PACKET: usize = 4096 + 64;

/// Packets per `sendmmsg`: one system call for a step's packets or a receive batch's answers.
const TX_BATCH: usize = 32;

/// Packets sealed and waiting to leave in one `sendmmsg`, all from one endpoint. Sized once,
/// so sending allocates nothing.
pub struct Batch {
    bufs: Box<[u8]>,
    lens: [usize; TX_BATCH],
    dsts: [Option<SockaddrStorage>; TX_BATCH],
    n: usize,
    ep: Option<Arc<Endpoint>>,
    /// The IP TOS byte (IPv6 traffic class) of every packet waiting: one per `sendmmsg`.
    tos: u8,
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
            tos: 0,
            // Room in each message for its TOS (IPv4, one byte) or traffic class (IPv6, an
            // int), whichever is larger.
            headers: MultiHeaders::preallocate(TX_BATCH, Some(nix::cmsg_space!(libc::c_int))),
        }
    }
}

impl Batch {
    /// Seals `pkt` for the port of GID `peer` and queues it to leave from `ep`, with IP TOS
    /// byte (IPv6 traffic class) `tos`, with the packets around it.
    pub fn push(&mut self, ep: &Arc<Endpoint>, peer: Gid, tos: u8, pkt: &Packet<'_>) {
        let dst = ep.peer_addr(peer);
        let other_ep = self.ep.as_ref().is_some_and(|e| !Arc::ptr_eq(e, ep));
        if self.n == TX_BATCH || other_ep || (self.n > 0 && self.tos != tos) {
            self.flush();
        }
        self.tos = tos;
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
        let tclass = libc::c_int::from(self.tos);
        let tos = [if ep.addr.is_ipv4() {
            ControlMessage::Ipv4Tos(&self.tos)
        } else {
            ControlMessage::Ipv6TClass(&tclass)
        }];
        if !ep.bound.load(Ordering::Acquire) {
            // The address is not (or no longer) this daemon's: a packet from another would
            // be dropped by the peer. Lost like any packet; the transport resends it.
            ep.counters
                .tx_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        let mut done = 0;
        while done < n {
            let result = sendmmsg(
                ep.socket.as_raw_fd(),
                headers,
                &iovs[done..n],
                &dsts[done..n],
                tos,
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
