//! Version 1 of the saved device state: the types, and their encoding.
//!
//! These types are the format, kept apart from the live objects on purpose: the live structs
//! may change freely, and a later daemon keeps this file to read version 1 (converting it to
//! whatever it then runs on). Protocol structs (`qp::Caps`, `qp::Attr`, `qp::AhAttr`, events)
//! are saved as their wire bytes, whose layout docs/protocol.md fixes.
//!
//! Decoding checks only the shape (counts, flags, lengths); what the values mean is checked
//! when the state is restored (`super::restore`).
//!
//! Version 2 (`super::v2`) is this layout followed by a section of its own, so the encoder and
//! decoder of the whole layout are also offered without their framing
//! ([`VmState::encode_into`], [`VmState::decode_from`]).

use super::codec::{Error, Reader, Writer};
use crate::limits;

/// Bytes of a saved send ring slot at most.
pub const MAX_SLOT: usize = crate::model::qp_state::MAX_SEND_SLOT;
/// Work requests on the wire an RC QP remembers.
pub const RC_WINDOW: usize = crate::model::qp_state::RC_WINDOW;
/// READs a responder remembers.
pub const READ_HISTORY: usize = crate::model::qp_state::READ_HISTORY;
/// Atomics a responder remembers.
pub const ATOMIC_REPLAY: usize = crate::model::qp_state::ATOMIC_REPLAY;
/// Counters saved, in the order of [`Counters`] fields as `Vm::counters` lists them.
pub const COUNTERS: usize = 12;
/// Events a VM may have waiting.
pub const MAX_EVENTS: usize = crate::model::vm::MAX_PENDING_EVENTS;

/// One VM's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    /// The port's GID, raw.
    pub gid: [u8; 16],
    /// The port's active MTU, raw.
    pub active_mtu: u8,
    /// Whether the VM ran with the inter-host fabric.
    pub roce: bool,
    /// Protection domains.
    pub pds: Table<Pd>,
    /// Memory regions.
    pub mrs: Table<Mr>,
    /// Completion queues.
    pub cqs: Table<Cq>,
    /// Queue pairs.
    pub qps: Table<Qp>,
    /// Address handles.
    pub ahs: Table<Ah>,
    /// Bytes registered.
    pub registered_bytes: u64,
    /// The VM's counters.
    pub counters: [u64; COUNTERS],
    /// Asynchronous events not yet delivered, oldest first, as wire bytes.
    pub events: Vec<[u8; 8]>,
}

/// A handle table: each slot's generation and object, and the free slots in reuse order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table<T> {
    /// Index bits of its handles.
    pub index_bits: u8,
    /// Generation bits of its handles.
    pub generation_bits: u8,
    /// Slots in order.
    pub slots: Vec<(u32, Option<T>)>,
    /// Free slots, next reused last.
    pub free: Vec<u32>,
}

/// A protection domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pd {
    /// Objects in it.
    pub users: u32,
}

/// A memory region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mr {
    /// PD.
    pub pdn: u32,
    /// Access bits.
    pub access: u32,
    /// First address.
    pub iova: u64,
    /// Bytes.
    pub length: u64,
    /// Offset in the first page.
    pub first_page_offset: u64,
    /// log2 page size.
    pub page_shift: u8,
    /// Guest-physical pages.
    pub pages: Vec<u64>,
}

/// A completion queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cq {
    /// Entries.
    pub depth: u32,
    /// Ring address.
    pub ring_addr: u64,
    /// QPs using it.
    pub users: u32,
    /// Producer index.
    pub producer: u32,
    /// Arm sequence last answered.
    pub notify_ack: u32,
    /// Overflowed.
    pub overflowed: bool,
}

/// A queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qp {
    /// Type, raw.
    pub qp_type: u8,
    /// PD.
    pub pdn: u32,
    /// Send CQ.
    pub send_cqn: u32,
    /// Receive CQ.
    pub recv_cqn: u32,
    /// Signal every send.
    pub sq_sig_all: bool,
    /// `qp::Caps` wire bytes.
    pub caps: Vec<u8>,
    /// Send ring.
    pub sq_ring_addr: u64,
    /// Receive ring.
    pub rq_ring_addr: u64,
    /// `qp::Attr` wire bytes.
    pub attr: Vec<u8>,
    /// Data-path state.
    pub rt: QpRuntime,
}

/// A QP's data-path state. Times are saved as what was left of them when the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpRuntime {
    /// Oldest send not completed.
    pub sq_head: u32,
    /// Receives completed.
    pub rq_done: u32,
    /// SQD drained raised.
    pub sqd_notified: bool,
    /// Send ring overrun.
    pub sq_dead: bool,
    /// Polling word set.
    pub sq_polling: bool,
    /// The work request in progress: its slot bytes, bytes done, and wait left (µs).
    pub inflight: Option<Inflight>,
    /// Transport retries left.
    pub retries_transport: u8,
    /// RNR retries left.
    pub retries_rnr: u8,
    /// Next PSN sent, oldest unacknowledged, expected, MSN.
    pub psns: [u32; 4],
    /// The RC transport on the inter-host fabric.
    pub rc: Rc,
}

/// A work request in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    /// Its ring slot as copied when it started.
    pub slot: Vec<u8>,
    /// Bytes done.
    pub done: u32,
    /// Microseconds it still had to wait before its next try.
    pub wait_us: Option<u64>,
}

/// An RC QP's transport state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rc {
    /// Retry counters taken.
    pub started: bool,
    /// Ring index being transmitted.
    pub sq_next: u32,
    /// Ring index after the last begun.
    pub sq_max: u32,
    /// PSN after the last sent.
    pub psn_max: u32,
    /// The records, if the QP has them.
    pub records: Option<Records>,
    /// Microseconds left on the ACK timeout.
    pub deadline_us: Option<u64>,
    /// Microseconds left of an RNR wait.
    pub rnr_until_us: Option<u64>,
    /// Go back before sending more.
    pub rewind: bool,
    /// Last go-back-N start.
    pub rewound: Option<u32>,
    /// Congestion window.
    pub cwnd: u32,
    /// Responder message in progress: kind (0 idle, 1 send, 2 write), va, rkey, len, done.
    pub rx: (u8, u64, u32, u32, u32),
    /// NAK sent for the current gap.
    pub nak_sent: bool,
    /// Next READ record slot.
    pub read_next: u8,
    /// PSN last accepted.
    pub acked: Option<u32>,
    /// Next atomic record slot.
    pub atomic_next: u8,
}

/// Records of an RC QP's traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    /// Work requests on the wire: first PSN, last PSN, wr_id, opcode, signaled, length.
    pub sent: Vec<(u32, u32, u64, u8, bool, u32)>,
    /// READs answered: first PSN, packets, va, rkey, length, MSN.
    pub reads: Vec<(u32, u32, u64, u32, u32, u32)>,
    /// Atomics answered: PSN, original value, valid.
    pub atomics: Vec<(u32, u64, bool)>,
}

/// An address handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ah {
    /// PD.
    pub pdn: u32,
    /// `qp::AhAttr` wire bytes.
    pub attr: Vec<u8>,
}

/// Smallest encoded size of a table slot: its generation and presence flag.
const MIN_SLOT: usize = 5;

impl VmState {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode_into(&mut w);
        w.into_bytes()
    }

    /// Writes the fields into `w`, as the start of a longer payload.
    pub fn encode_into(&self, w: &mut Writer) {
        for b in self.gid {
            w.u8(b);
        }
        w.u8(self.active_mtu);
        w.bool(self.roce);
        encode_table(w, &self.pds, |w, pd| w.u32(pd.users));
        encode_table(w, &self.mrs, encode_mr);
        encode_table(w, &self.cqs, encode_cq);
        encode_table(w, &self.qps, encode_qp);
        encode_table(w, &self.ahs, |w, ah| {
            w.u32(ah.pdn);
            w.bytes(&ah.attr);
        });
        w.u64(self.registered_bytes);
        w.count(COUNTERS);
        for c in self.counters {
            w.u64(c);
        }
        w.count(self.events.len());
        for e in &self.events {
            for b in e {
                w.u8(*b);
            }
        }
    }

    /// Reads a payload written by [`VmState::encode`].
    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let state = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(state)
    }

    /// Reads the fields [`VmState::encode_into`] wrote, leaving `r` after them.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<Self, Error> {
        let mut gid = [0u8; 16];
        for b in &mut gid {
            *b = r.u8("GID")?;
        }
        let active_mtu = r.u8("active MTU")?;
        let roce = r.bool("RoCE flag")?;
        let pds = decode_table(r, "PD", limits::MAX_PD, |r| {
            Ok(Pd {
                users: r.u32("PD users")?,
            })
        })?;
        let mrs = decode_table(r, "MR", limits::MAX_MR, decode_mr)?;
        let cqs = decode_table(r, "CQ", limits::MAX_CQ, decode_cq)?;
        let qps = decode_table(r, "QP", limits::MAX_QP, decode_qp)?;
        let ahs = decode_table(r, "AH", limits::MAX_AH, |r| {
            Ok(Ah {
                pdn: r.u32("AH PD")?,
                attr: r.bytes("AH attributes", 256)?.to_vec(),
            })
        })?;
        let registered_bytes = r.u64("registered bytes")?;
        let n = r.count("counters", COUNTERS, 8)?;
        if n != COUNTERS {
            return Err(Error::Field("counter count"));
        }
        let mut counters = [0u64; COUNTERS];
        for c in &mut counters {
            *c = r.u64("counter")?;
        }
        let n = r.count("events", MAX_EVENTS, 8)?;
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let mut e = [0u8; 8];
            for b in &mut e {
                *b = r.u8("event")?;
            }
            events.push(e);
        }
        Ok(VmState {
            gid,
            active_mtu,
            roce,
            pds,
            mrs,
            cqs,
            qps,
            ahs,
            registered_bytes,
            counters,
            events,
        })
    }
}

/// Writes a handle table, each object with `item`.
pub fn encode_table<T>(w: &mut Writer, t: &Table<T>, item: impl Fn(&mut Writer, &T)) {
    w.u8(t.index_bits);
    w.u8(t.generation_bits);
    w.count(t.slots.len());
    for (generation, value) in &t.slots {
        w.u32(*generation);
        w.bool(value.is_some());
        if let Some(v) = value {
            item(w, v);
        }
    }
    w.count(t.free.len());
    for f in &t.free {
        w.u32(*f);
    }
}

/// Reads a handle table of at most `max` slots, each object with `item`.
pub fn decode_table<T>(
    r: &mut Reader<'_>,
    what: &'static str,
    max: u32,
    item: impl Fn(&mut Reader<'_>) -> Result<T, Error>,
) -> Result<Table<T>, Error> {
    let index_bits = r.u8(what)?;
    let generation_bits = r.u8(what)?;
    let n = r.count(what, max as usize, MIN_SLOT)?;
    let mut slots = Vec::with_capacity(n);
    for _ in 0..n {
        let generation = r.u32(what)?;
        let value = if r.bool(what)? { Some(item(r)?) } else { None };
        slots.push((generation, value));
    }
    let n = r.count(what, max as usize, 4)?;
    let mut free = Vec::with_capacity(n);
    for _ in 0..n {
        free.push(r.u32(what)?);
    }
    Ok(Table {
        index_bits,
        generation_bits,
        slots,
        free,
    })
}

fn encode_mr(w: &mut Writer, mr: &Mr) {
    w.u32(mr.pdn);
    w.u32(mr.access);
    w.u64(mr.iova);
    w.u64(mr.length);
    w.u64(mr.first_page_offset);
    w.u8(mr.page_shift);
    w.count(mr.pages.len());
    for p in &mr.pages {
        w.u64(*p);
    }
}

fn decode_mr(r: &mut Reader<'_>) -> Result<Mr, Error> {
    let pdn = r.u32("MR PD")?;
    let access = r.u32("MR access")?;
    let iova = r.u64("MR iova")?;
    let length = r.u64("MR length")?;
    let first_page_offset = r.u64("MR first page offset")?;
    let page_shift = r.u8("MR page shift")?;
    let n = r.count("MR pages", vrdma_proto::cmd::MAX_PAGE_LIST as usize, 8)?;
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        pages.push(r.u64("MR page")?);
    }
    Ok(Mr {
        pdn,
        access,
        iova,
        length,
        first_page_offset,
        page_shift,
        pages,
    })
}

fn encode_cq(w: &mut Writer, cq: &Cq) {
    w.u32(cq.depth);
    w.u64(cq.ring_addr);
    w.u32(cq.users);
    w.u32(cq.producer);
    w.u32(cq.notify_ack);
    w.bool(cq.overflowed);
}

fn decode_cq(r: &mut Reader<'_>) -> Result<Cq, Error> {
    Ok(Cq {
        depth: r.u32("CQ depth")?,
        ring_addr: r.u64("CQ ring")?,
        users: r.u32("CQ users")?,
        producer: r.u32("CQ producer")?,
        notify_ack: r.u32("CQ notify ack")?,
        overflowed: r.bool("CQ overflow flag")?,
    })
}

fn encode_qp(w: &mut Writer, qp: &Qp) {
    w.u8(qp.qp_type);
    w.u32(qp.pdn);
    w.u32(qp.send_cqn);
    w.u32(qp.recv_cqn);
    w.bool(qp.sq_sig_all);
    w.bytes(&qp.caps);
    w.u64(qp.sq_ring_addr);
    w.u64(qp.rq_ring_addr);
    w.bytes(&qp.attr);
    let rt = &qp.rt;
    w.u32(rt.sq_head);
    w.u32(rt.rq_done);
    w.bool(rt.sqd_notified);
    w.bool(rt.sq_dead);
    w.bool(rt.sq_polling);
    w.bool(rt.inflight.is_some());
    if let Some(i) = &rt.inflight {
        w.bytes(&i.slot);
        w.u32(i.done);
        w.opt_u64(i.wait_us);
    }
    w.u8(rt.retries_transport);
    w.u8(rt.retries_rnr);
    for p in rt.psns {
        w.u32(p);
    }
    let rc = &rt.rc;
    w.bool(rc.started);
    w.u32(rc.sq_next);
    w.u32(rc.sq_max);
    w.u32(rc.psn_max);
    w.bool(rc.records.is_some());
    if let Some(rec) = &rc.records {
        w.count(rec.sent.len());
        for &(first, last, wr_id, opcode, signaled, len) in &rec.sent {
            w.u32(first);
            w.u32(last);
            w.u64(wr_id);
            w.u8(opcode);
            w.bool(signaled);
            w.u32(len);
        }
        w.count(rec.reads.len());
        for &(first, npkts, va, rkey, len, msn) in &rec.reads {
            w.u32(first);
            w.u32(npkts);
            w.u64(va);
            w.u32(rkey);
            w.u32(len);
            w.u32(msn);
        }
        w.count(rec.atomics.len());
        for &(psn, value, valid) in &rec.atomics {
            w.u32(psn);
            w.u64(value);
            w.bool(valid);
        }
    }
    w.opt_u64(rc.deadline_us);
    w.opt_u64(rc.rnr_until_us);
    w.bool(rc.rewind);
    w.opt_u32(rc.rewound);
    w.u32(rc.cwnd);
    let (kind, va, rkey, len, done) = rc.rx;
    w.u8(kind);
    w.u64(va);
    w.u32(rkey);
    w.u32(len);
    w.u32(done);
    w.bool(rc.nak_sent);
    w.u8(rc.read_next);
    w.opt_u32(rc.acked);
    w.u8(rc.atomic_next);
}

fn decode_qp(r: &mut Reader<'_>) -> Result<Qp, Error> {
    let qp_type = r.u8("QP type")?;
    let pdn = r.u32("QP PD")?;
    let send_cqn = r.u32("QP send CQ")?;
    let recv_cqn = r.u32("QP receive CQ")?;
    let sq_sig_all = r.bool("QP sq_sig_all")?;
    let caps = r.bytes("QP caps", 256)?.to_vec();
    let sq_ring_addr = r.u64("QP send ring")?;
    let rq_ring_addr = r.u64("QP receive ring")?;
    let attr = r.bytes("QP attributes", 1024)?.to_vec();
    let sq_head = r.u32("QP send head")?;
    let rq_done = r.u32("QP receives done")?;
    let sqd_notified = r.bool("QP SQD flag")?;
    let sq_dead = r.bool("QP overrun flag")?;
    let sq_polling = r.bool("QP polling flag")?;
    let inflight = if r.bool("QP work in progress")? {
        Some(Inflight {
            slot: r.bytes("QP work request slot", MAX_SLOT)?.to_vec(),
            done: r.u32("QP bytes done")?,
            wait_us: r.opt_u64("QP wait")?,
        })
    } else {
        None
    };
    let retries_transport = r.u8("QP retries")?;
    let retries_rnr = r.u8("QP RNR retries")?;
    let mut psns = [0u32; 4];
    for p in &mut psns {
        *p = r.u32("QP PSN")?;
    }
    let started = r.bool("RC started")?;
    let sq_next = r.u32("RC next")?;
    let sq_max = r.u32("RC max")?;
    let psn_max = r.u32("RC PSN max")?;
    let records = if r.bool("RC records")? {
        let n = r.count("RC sent records", RC_WINDOW, 22)?;
        let mut sent = Vec::with_capacity(n);
        for _ in 0..n {
            sent.push((
                r.u32("sent record")?,
                r.u32("sent record")?,
                r.u64("sent record")?,
                r.u8("sent record")?,
                r.bool("sent record")?,
                r.u32("sent record")?,
            ));
        }
        let n = r.count("RC READ records", READ_HISTORY, 28)?;
        let mut reads = Vec::with_capacity(n);
        for _ in 0..n {
            reads.push((
                r.u32("READ record")?,
                r.u32("READ record")?,
                r.u64("READ record")?,
                r.u32("READ record")?,
                r.u32("READ record")?,
                r.u32("READ record")?,
            ));
        }
        let n = r.count("RC atomic records", ATOMIC_REPLAY, 13)?;
        let mut atomics = Vec::with_capacity(n);
        for _ in 0..n {
            atomics.push((
                r.u32("atomic record")?,
                r.u64("atomic record")?,
                r.bool("atomic record")?,
            ));
        }
        Some(Records {
            sent,
            reads,
            atomics,
        })
    } else {
        None
    };
    let deadline_us = r.opt_u64("RC timeout")?;
    let rnr_until_us = r.opt_u64("RC RNR wait")?;
    let rewind = r.bool("RC rewind")?;
    let rewound = r.opt_u32("RC rewound")?;
    let cwnd = r.u32("RC window")?;
    let rx = (
        r.u8("RC receive")?,
        r.u64("RC receive")?,
        r.u32("RC receive")?,
        r.u32("RC receive")?,
        r.u32("RC receive")?,
    );
    let nak_sent = r.bool("RC NAK flag")?;
    let read_next = r.u8("RC READ slot")?;
    let acked = r.opt_u32("RC acked")?;
    let atomic_next = r.u8("RC atomic slot")?;
    Ok(Qp {
        qp_type,
        pdn,
        send_cqn,
        recv_cqn,
        sq_sig_all,
        caps,
        sq_ring_addr,
        rq_ring_addr,
        attr,
        rt: QpRuntime {
            sq_head,
            rq_done,
            sqd_notified,
            sq_dead,
            sq_polling,
            inflight,
            retries_transport,
            retries_rnr,
            psns,
            rc: Rc {
                started,
                sq_next,
                sq_max,
                psn_max,
                records,
                deadline_us,
                rnr_until_us,
                rewind,
                rewound,
                cwnd,
                rx,
                nak_sent,
                read_next,
                acked,
                atomic_next,
            },
        },
    })
}
