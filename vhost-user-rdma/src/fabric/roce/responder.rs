//! The responder: requests from the network checked against the expected PSN, executed once
//! through the local fabric's responder, and answered (ACKs coalesced per receive batch, READ
//! responses in bursts outside the VM's lock, atomics replayed from a cache).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::GuestAddressSpace;
use vrdma_proto::cqe::{Status, VendorErr};
use vrdma_proto::mr::Access;
use vrdma_proto::wqe::{self, Opcode};
use vrdma_proto::{Gid, event, qp};
use vrdma_roce::aeth::{Aeth, NakCode, Syndrome};
use vrdma_roce::atomic::AtomicAckEth;
use vrdma_roce::bth::Bth;
use vrdma_roce::opcode::Opcode as Op;
use vrdma_roce::packet::{Extensions, Packet};
use vrdma_roce::reth::Reth;

use super::batch::Batch;
use super::endpoint::Endpoint;
use super::psn::{PSN_MASK, mtu_of, psn_add, psn_diff};
use crate::model::memory::{self, GuestMem, Runs};
use crate::model::objects::VmObjects;
use crate::model::qp_state::{ATOMIC_REPLAY, READ_HISTORY, ReadRecord, RxMsg};
use crate::model::vm::Vm;
use crate::rnic::responder::{Chunk, Resp, check_rkey, respond, responder_error};

/// ACKs one receive batch can owe: one per datagram at most.
const MAX_OWED: usize = 32;

/// The `a_id` a request from the network carries into the responder: no local VM has it.
const REMOTE_PORT_ID: u64 = u64::MAX;

/// An ACK the receive thread owes, sent once its batch is done: a later one for the same QP
/// replaces it, which is ACK coalescing.
#[derive(Debug, Clone, Copy)]
struct OwedAck {
    peer: Gid,
    dest: u32,
    tos: u8,
    /// A request it answers arrived marked CE: the ACK carries BECN.
    becn: bool,
    psn: u32,
    msn: u32,
}

/// The receive thread's buffers for what it sends back.
#[derive(Debug)]
pub struct RxBuffers {
    payload: Box<[u8]>,
    pub batch: Batch,
    acks: [Option<OwedAck>; MAX_OWED],
}

impl Default for RxBuffers {
    fn default() -> Self {
        RxBuffers {
            payload: vec![0; 4096].into_boxed_slice(),
            batch: Batch::default(),
            acks: [None; MAX_OWED],
        }
    }
}

impl RxBuffers {
    /// Owes `ack`, replacing an older one to the same QP.
    fn owe(&mut self, ack: OwedAck) {
        let same = |a: &OwedAck| a.peer == ack.peer && a.dest == ack.dest;
        if let Some(slot) = self.acks.iter_mut().flatten().find(|a| same(a)) {
            // A congestion mark on any request it answers is echoed.
            let becn = slot.becn || ack.becn;
            *slot = OwedAck { becn, ..ack };
        } else if let Some(free) = self.acks.iter_mut().find(|a| a.is_none()) {
            *free = Some(ack);
        }
    }

    pub fn send_acks(&mut self, ep: &Arc<Endpoint>) {
        for owed in self.acks.iter_mut() {
            let Some(a) = owed.take() else { continue };
            let reply = Reply {
                ep,
                peer: a.peer,
                dest: a.dest,
                tos: a.tos,
                becn: a.becn,
            };
            reply.aeth(&mut self.batch, a.psn, ACK, a.msn);
        }
    }
}

/// A UD datagram: delivered whole, or dropped (and counted) as an unreliable network would.
pub fn on_ud(
    ep: &Endpoint,
    b: &Vm,
    bv: &mut VmObjects,
    mem: &GuestMem,
    pkt: &Packet<'_>,
    peer: Gid,
) {
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
    let mut c = from_network(
        peer,
        deth.src_qp(),
        qp::Type::Ud,
        opcode,
        &header,
        payload,
        mem,
    );
    c.solicited = pkt.bth().solicited();
    c.qkey = deth.qkey();
    let mut unused = 0u64;
    let _ = respond(bv, b, dest_qpn, &c, &mut unused);
}

/// A chunk whose bytes are a packet's payload, one whole message: the requester is across the
/// network, so it has no port, runs or memory here.
fn from_network<'a>(
    peer: Gid,
    a_qpn: u32,
    qp_type: qp::Type,
    opcode: Opcode,
    header: &'a wqe::SendHeader,
    payload: &'a [u8],
    mem: &'a GuestMem,
) -> Chunk<'a> {
    let n = payload.len() as u32;
    Chunk {
        a_id: REMOTE_PORT_ID,
        a_gid: peer,
        a_qpn,
        qp_type,
        opcode,
        header,
        solicited: false,
        len: n,
        done: 0,
        n,
        last: true,
        qkey: 0,
        a_runs: &Runs::EMPTY,
        inline: payload,
        is_inline: true,
        a_mem: mem,
        b_mem: mem,
        cut: None,
    }
}

/// An RC request: checked against the expected PSN, executed once, acknowledged. A READ
/// returns the response packets to send once the VM's lock is released.
#[allow(clippy::too_many_arguments)]
pub fn on_request(
    ep: &Arc<Endpoint>,
    rx: &mut RxBuffers,
    b: &Vm,
    bv: &mut VmObjects,
    mem: &GuestMem,
    pkt: &Packet<'_>,
    peer: Gid,
    ce: bool,
) -> Option<ReadJob> {
    let qpn = pkt.bth().dest_qp();
    let Some(qp) = bv.qps.get(qpn) else {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    if qp.qp_type() != qp::Type::Rc || !qp.responds() || qp.attr.ah_attr.dgid != peer {
        ep.counters.no_qp.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let psn = pkt.bth().psn();
    let expected = qp.rt.psns.expected;
    let d = psn_diff(psn, expected);
    let reply = Reply {
        ep,
        peer,
        dest: qp.attr.dest_qp_num.get(),
        tos: ep.tos(b, qp),
        becn: ce,
    };
    if d > 0 {
        ep.counters.out_of_sequence.fetch_add(1, Ordering::Relaxed);
        let msn = qp.rt.psns.msn;
        if let Some(qp) = bv.qps.get_mut(qpn) {
            if !qp.rt.rc.nak_sent {
                qp.rt.rc.nak_sent = true;
                reply.nak(&mut rx.batch, expected, NakCode::PsnSequenceError, msn);
            }
        }
        return None;
    }
    let r = Responder { reply, b, mem, qpn };
    if d < 0 {
        ep.counters.duplicates.fetch_add(1, Ordering::Relaxed);
        return on_duplicate(&r, rx, bv, pkt);
    }
    if let Some(qp) = bv.qps.get_mut(qpn) {
        qp.rt.rc.nak_sent = false;
    }
    match pkt.opcode() {
        Op::RcReadRequest => {
            let reth = pkt.ext().reth?;
            return serve_read(&r, rx, bv, psn, reth, true);
        }
        Op::RcCompareSwap | Op::RcFetchAdd => serve_atomic(&r, rx, bv, pkt),
        _ => serve_data(&r, rx, bv, pkt),
    }
    None
}

/// The QP answering a request: its VM, that VM's memory, its QPN, and where its answers go.
struct Responder<'a> {
    reply: Reply<'a>,
    b: &'a Vm,
    mem: &'a GuestMem,
    qpn: u32,
}

/// Where answers to one request go.
struct Reply<'a> {
    ep: &'a Arc<Endpoint>,
    peer: Gid,
    dest: u32,
    /// Their IP TOS byte: the answering QP's class or traffic class.
    tos: u8,
    /// The request arrived marked CE: they carry BECN, the echo its sender slows down for.
    becn: bool,
}

impl Reply<'_> {
    /// Owes an ACK for `psn`, sent with the receive batch's other answers.
    fn ack_later(&self, rx: &mut RxBuffers, psn: u32, msn: u32) {
        rx.owe(OwedAck {
            peer: self.peer,
            dest: self.dest,
            tos: self.tos,
            becn: self.becn,
            psn,
            msn,
        });
    }

    /// Sends a NAK with `code` for `psn`.
    fn nak(&self, batch: &mut Batch, psn: u32, code: NakCode, msn: u32) {
        self.aeth(batch, psn, Syndrome::Nak(code), msn);
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
        let bth = bth.with_becn(self.becn);
        let ext = Extensions {
            aeth: Some(aeth),
            ..Extensions::default()
        };
        if let Ok(pkt) = Packet::new(bth, ext, &[]) {
            batch.push(self.ep, self.peer, self.tos, &pkt);
        }
    }

    fn send(&self, batch: &mut Batch, op: Op, psn: u32, ext: Extensions, payload: &[u8]) {
        let Ok(bth) = Bth::new(op, self.dest, psn) else {
            return;
        };
        let bth = bth.with_becn(self.becn);
        if let Ok(pkt) = Packet::new(bth, ext, payload) {
            batch.push(self.ep, self.peer, self.tos, &pkt);
        }
    }
}

const ACK: Syndrome = Syndrome::Ack {
    credits: vrdma_roce::aeth::NO_CREDITS,
};

/// A request already executed: answered again, never executed twice.
fn on_duplicate(
    r: &Responder<'_>,
    rx: &mut RxBuffers,
    bv: &mut VmObjects,
    pkt: &Packet<'_>,
) -> Option<ReadJob> {
    let (reply, qpn) = (&r.reply, r.qpn);
    let qp = bv.qps.get(qpn)?;
    let psn = pkt.bth().psn();
    let (expected, msn) = (qp.rt.psns.expected, qp.rt.psns.msn);
    match pkt.opcode() {
        // Reading again changes nothing, and the requester may ask for only the part it lacks.
        Op::RcReadRequest => {
            let reth = pkt.ext().reth?;
            return serve_read(r, rx, bv, psn, reth, false);
        }
        Op::RcCompareSwap | Op::RcFetchAdd => {
            let records = qp.rt.rc.records.as_ref()?;
            let hit = records
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
            let acked = qp.rt.rc.acked.unwrap_or(psn_add(expected, PSN_MASK));
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
    r: &Responder<'_>,
    rx: &mut RxBuffers,
    bv: &mut VmObjects,
    psn: u32,
    why: std::fmt::Arguments<'_>,
) {
    let (reply, b, mem, qpn) = (&r.reply, r.b, r.mem, r.qpn);
    log::debug!(
        "vm {}: QP {qpn:#x}: invalid request at PSN {psn:#x}: {why}",
        b.name
    );
    let msn = bv.qps.get(qpn).map_or(0, |q| q.rt.psns.msn);
    responder_error(bv, b, mem, qpn, None, VendorErr::MalformedWqe);
    b.push_event(event::Kind::QpReqErr, qpn);
    reply.nak(&mut rx.batch, psn, NakCode::InvalidRequest, msn);
}

/// SEND and RDMA WRITE packets, through the local fabric's responder.
fn serve_data(r: &Responder<'_>, rx: &mut RxBuffers, bv: &mut VmObjects, pkt: &Packet<'_>) {
    let (reply, b, mem, qpn) = (&r.reply, r.b, r.mem, r.qpn);
    let Some(qp) = bv.qps.get(qpn) else { return };
    let psn = pkt.bth().psn();
    let op = pkt.opcode();
    let mtu = mtu_of(qp);
    let payload = pkt.payload();
    let n = payload.len() as u32;
    let state = qp.rt.rc.rx;
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
        invalid_request(
            r,
            rx,
            bv,
            psn,
            format_args!("{op:?} of {n} bytes while {state:?} (path MTU {mtu})"),
        );
        return;
    }
    if matches!(op, RcSendLastWithInvalidate | RcSendOnlyWithInvalidate) {
        // vrdma has no memory windows or fast-registered MRs to invalidate.
        invalid_request(
            r,
            rx,
            bv,
            psn,
            format_args!("{op:?} (nothing to invalidate)"),
        );
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
                invalid_request(r, rx, bv, psn, format_args!("{op:?} without a RETH"));
                return;
            }
        };
        let end = done.checked_add(n);
        if end.is_none_or(|e| e > len || (ends && e != len)) {
            invalid_request(
                r,
                rx,
                bv,
                psn,
                format_args!("{op:?} of {n} bytes at {done} of a {len}-byte WRITE"),
            );
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
    let mut c = from_network(
        reply.peer,
        a_qpn,
        qp::Type::Rc,
        opcode,
        &header,
        payload,
        mem,
    );
    c.solicited = pkt.bth().solicited();
    (c.len, c.done, c.last) = (len, done, ends);
    let mut unused = 0u64;
    let resp = respond(bv, b, qpn, &c, &mut unused);
    let Some(qp) = bv.qps.get_mut(qpn) else {
        return;
    };
    let min_rnr = qp.attr.min_rnr_timer;
    match resp {
        Resp::Done => {
            qp.rt.psns.expected = psn_add(psn, 1);
            qp.rt.rc.acked = Some(psn);
            qp.rt.rc.rx = match (ends, is_send) {
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
            // A request marked CE is acknowledged even if it does not ask, so that the
            // echo of the mark reaches its sender now.
            if pkt.bth().ack_req() || reply.becn {
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
            qp.rt.rc.rx = RxMsg::Idle;
            reply.nak(&mut rx.batch, psn, nak_code(status), msn);
        }
        // A packet's chunk has no cut, so `Cut` does not come; were it to, the request would go
        // unanswered and its sender would send it again.
        Resp::NoResponder | Resp::Busy | Resp::Dropped | Resp::LocalFault(_) | Resp::Cut(_) => {}
    }
}

/// READ response packets a receive thread sends with the VM's lock taken at most this many
/// at a time, so a large READ never holds the VM's other QPs, its control path or its
/// scheduler steps for long.
const READ_BURST: u32 = 16;

/// Response packets to send for one READ: `[from, npkts)` of `read`.
#[derive(Debug, Clone, Copy)]
pub struct ReadJob {
    qpn: u32,
    peer: Gid,
    dest: u32,
    tos: u8,
    becn: bool,
    mtu: u32,
    read: ReadRecord,
    from: u32,
}

/// An RDMA READ request, checked. A new one moves the expected PSN past all its response
/// packets and is recorded; a duplicate is answered from its record, from the packet it asks
/// for on, as MIDDLE..LAST (a requester that already has the first responses expects no new
/// FIRST, rxe's for one), and only if it asks for what the record says (IBA 9.7.5.1.3). The
/// packets go out afterwards, from [`run_read`].
fn serve_read(
    r: &Responder<'_>,
    rx: &mut RxBuffers,
    bv: &mut VmObjects,
    psn: u32,
    reth: Reth,
    new: bool,
) -> Option<ReadJob> {
    let (reply, b, mem, qpn) = (&r.reply, r.b, r.mem, r.qpn);
    let qp = bv.qps.get(qpn)?;
    let mtu = mtu_of(qp);
    let job = |read: ReadRecord, from: u32| ReadJob {
        qpn,
        peer: reply.peer,
        dest: reply.dest,
        tos: reply.tos,
        becn: reply.becn,
        mtu,
        read,
        from,
    };
    if !new {
        let hit = qp.rt.rc.records.as_ref()?.reads.iter().find(|r| {
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
    if qp.rt.rc.rx != RxMsg::Idle || len > 1 << 31 {
        let state = qp.rt.rc.rx;
        invalid_request(
            r,
            rx,
            bv,
            psn,
            format_args!("READ of {len} bytes while {state:?}"),
        );
        return None;
    }
    let msn = psn_add(qp.rt.psns.msn, 1);
    let checked = if len == 0 {
        // A zero-length READ names no memory (IBA C9-88).
        Ok(())
    } else {
        let (pdn, access) = (qp.pdn, qp.remote_access());
        check_rkey(
            &bv.mrs,
            pdn,
            access,
            rkey,
            va,
            len.into(),
            Access::REMOTE_READ,
        )
        .map(|_| ())
    };
    if let Err(v) = checked {
        let msn = qp.rt.psns.msn;
        responder_error(bv, b, mem, qpn, None, v);
        b.push_event(event::Kind::QpAccessErr, qpn);
        reply.nak(&mut rx.batch, psn, NakCode::RemoteAccessError, msn);
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
    let w = &mut qp.rt.rc;
    let slot = usize::from(w.read_next) % READ_HISTORY;
    w.records().reads[slot] = read;
    w.read_next = w.read_next.wrapping_add(1);
    Some(job(read, 0))
}

/// Sends a READ's response packets, taking the VM's lock for [`READ_BURST`] at a time and
/// checking each time that the QP still answers and the MR still grants the range: a guest
/// may destroy either meanwhile, and then the rest is not sent (its requester times out, as
/// with a responder that went away).
pub fn run_read(ep: &Arc<Endpoint>, rx: &mut RxBuffers, port: &Vm, job: &ReadJob) {
    let mem = port.mem.memory();
    let r = job.read;
    let reply = Reply {
        ep,
        peer: job.peer,
        dest: job.dest,
        tos: job.tos,
        becn: job.becn,
    };
    let Ok(aeth) = Aeth::new(ACK, r.msn & PSN_MASK) else {
        return;
    };
    let mut k = job.from;
    while k < r.npkts {
        let vm = port.lock();
        let ready = vm.qps.get(job.qpn).is_some_and(|q| q.responds());
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
                let read = mr
                    .runs(r.va + u64::from(off), n, &mut runs)
                    .and_then(|()| memory::read_runs(&mem, runs.as_slice(), payload));
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
fn serve_atomic(r: &Responder<'_>, rx: &mut RxBuffers, bv: &mut VmObjects, pkt: &Packet<'_>) {
    let (reply, b, mem, qpn) = (&r.reply, r.b, r.mem, r.qpn);
    let Some(qp) = bv.qps.get(qpn) else { return };
    let psn = pkt.bth().psn();
    let Some(eth) = pkt.ext().atomic else { return };
    if qp.rt.rc.rx != RxMsg::Idle {
        let state = qp.rt.rc.rx;
        invalid_request(r, rx, bv, psn, format_args!("atomic while {state:?}"));
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
    let a_qpn = qp.attr.dest_qp_num.get();
    let mut c = from_network(reply.peer, a_qpn, qp::Type::Rc, opcode, &header, &[], mem);
    (c.len, c.n) = (wqe::ATOMIC_SIZE, wqe::ATOMIC_SIZE);
    let mut orig = 0u64;
    let resp = respond(bv, b, qpn, &c, &mut orig);
    let Some(qp) = bv.qps.get_mut(qpn) else {
        return;
    };
    match resp {
        Resp::Done => {
            qp.rt.psns.expected = psn_add(psn, 1);
            qp.rt.rc.acked = Some(psn);
            qp.rt.psns.msn = psn_add(qp.rt.psns.msn, 1);
            let w = &mut qp.rt.rc;
            let slot = usize::from(w.atomic_next) % ATOMIC_REPLAY;
            w.records().atomics[slot] = (psn, orig, true);
            w.atomic_next = w.atomic_next.wrapping_add(1);
            let msn = qp.rt.psns.msn;
            atomic_ack(reply, rx, psn, msn, orig);
        }
        Resp::Nak(status, _) => {
            let msn = qp.rt.psns.msn;
            reply.nak(&mut rx.batch, psn, nak_code(status), msn);
        }
        _ => {}
    }
}
