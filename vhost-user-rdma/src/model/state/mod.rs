//! A VM's device state as live migration moves it: saved from the live objects into a
//! versioned blob of vrdma's own format ([`codec`] frames it, [`v1`] lays out the objects of
//! version 1, and [`v2`] adds the shared receive queues after them), and restored from one
//! with every field checked before anything is installed. A daemon writes version 2 and reads
//! both: a version 1 state is one without SRQs.
//!
//! What moves: every object with its handle (and each handle table's generations and free
//! list, so the same handles come next), the rings' indices (an SRQ's consumer index and
//! armed limit too, and the receive each QP holds from its SRQ), each QP's data-path state
//! including the work request in progress and the RC transport's (PSNs, the unacknowledged
//! window, the READ and atomic replay records), the counters and the undelivered events.
//! Timers are saved as what was left of them when the VM stopped, so they resume where they
//! froze. What does not: a responder's claim on a message from a local requester (the
//! requester's identity is this daemon's), which a restored QP takes again on the next chunk.
//!
//! Ring addresses cannot be checked against guest memory here: a destination receives the
//! device state before the memory table (docs/migration.md). [`check_rings`] checks them
//! once the table arrives.

pub mod codec;
pub mod v1;
pub mod v2;

use std::time::{Duration, Instant};

use vrdma_proto::mr::{self as proto_mr, Access};
use vrdma_proto::wqe::Sge;
use vrdma_proto::{Gid, cqe, event, qp, ring, wqe};
use zerocopy::{FromBytes, IntoBytes};

use super::control::in_one_region;
use super::memory::GuestMem;
use super::objects::{Ah, Cq, Mr, Pd, Qp, Srq, VmObjects};
use super::qp_state::{
    self, Inflight, QpRuntime, RcTransport, ReadRecord, Records, RecvCopy, Retries, RxMsg, Sent,
};
use super::vm::Vm;
use crate::config::VmConfig;
use crate::handle::{RestoreError, Table};

/// The format version this daemon writes, and the newest it reads (it reads every older one).
pub const VERSION: u32 = 2;

/// The longest timer a saved QP may carry: far above any verbs timeout (the longest ACK
/// timeout is 4.096 µs × 2^31, about 2.4 hours), so only a corrupt state exceeds it.
const MAX_TIMER: Duration = Duration::from_secs(4 * 3600);

/// Why a saved state could not be restored. Nothing was installed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The blob itself is unreadable.
    #[error("cannot read the device state")]
    Format(#[source] codec::Error),
    /// A handle table is inconsistent or over this VM's quota.
    #[error("the saved {what} table cannot be restored here")]
    Table {
        /// Which table.
        what: &'static str,
        /// Why.
        #[source]
        source: RestoreError,
    },
    /// The saved handles are laid out otherwise than this daemon's.
    #[error(
        "the saved {what} handles use {saved:?} index and generation bits, this daemon {here:?}: the daemons' versions are incompatible"
    )]
    HandleBits {
        /// Which table.
        what: &'static str,
        /// In the state.
        saved: (u8, u8),
        /// Here.
        here: (u32, u32),
    },
    /// The VM's address differs from the one configured here.
    #[error(
        "the VM's GID is {saved}, but this daemon's gid= for VM {vm:?} is {here}: configure the destination with the VM's GID (its address moves with it)"
    )]
    Gid {
        /// The VM.
        vm: String,
        /// In the state.
        saved: Gid,
        /// Configured here.
        here: Gid,
    },
    /// The VM used the inter-host fabric, which this daemon does not run.
    #[error(
        "the VM's QPs use the RoCEv2 fabric, which this daemon does not run: start the destination daemon with --roce"
    )]
    NoRoce,
    /// An object's field is out of range or names something that does not exist.
    #[error("saved {what} {handle:#x} is invalid: {problem}")]
    Object {
        /// Kind of object.
        what: &'static str,
        /// Its handle.
        handle: u32,
        /// What is wrong.
        problem: &'static str,
    },
    /// A VM-wide field is invalid.
    #[error("the saved VM is invalid: {0}")]
    Vm(&'static str),
    /// The VM's QPs and MRs live on the verbs fabric's NIC.
    #[error(
        "the VM has {qps} QP(s) and {mrs} MR(s) on the NIC of the verbs fabric, whose QP numbers \
         and keys another host's NIC cannot take, and whose writes into guest memory bypass the \
         dirty log: live migration of such a VM is not supported; migrate it once its \
         applications have closed their RDMA resources, or run it on --fabric soft"
    )]
    OnNic {
        /// QPs.
        qps: u32,
        /// MRs.
        mrs: u32,
    },
    /// The destination VM already has objects.
    #[error(
        "the VM already has objects here: a device state is loaded only into a VM that has just been connected (QEMU -incoming)"
    )]
    NotEmpty,
}

impl From<codec::Error> for Error {
    fn from(e: codec::Error) -> Self {
        Error::Format(e)
    }
}

/// A VM's objects, counters and events, checked and ready to install.
#[derive(Debug)]
pub struct Restored {
    /// The objects.
    pub objects: VmObjects,
    /// Counter values, in `Counters::values` order.
    pub counters: [u64; v1::COUNTERS],
    /// Undelivered events.
    pub events: Vec<event::Event>,
}

/// Whether a VM whose objects are `objects` can be saved: not while it has QPs or MRs on a
/// NIC (docs/architecture.md, "Handles across the wire on the NIC fabric").
pub fn check_migratable(objects: &VmObjects) -> Result<(), Error> {
    let (qps, mrs) = (objects.qps.len(), objects.mrs.len());
    if objects.nic_qpns && (qps > 0 || mrs > 0) {
        return Err(Error::OnNic { qps, mrs });
    }
    Ok(())
}

/// Saves VM `vm`, whose objects are `objects` (locked by the caller), as of `now`.
pub fn save_vm(vm: &Vm, objects: &VmObjects, now: Instant) -> Vec<u8> {
    save(objects, vm.counters.values(), &vm.pending_events(), now)
}

/// Saves `objects`, with the VM's `counters` and undelivered `events`, as of `now`.
pub fn save(
    objects: &VmObjects,
    counters: [u64; v1::COUNTERS],
    events: &[event::Event],
    now: Instant,
) -> Vec<u8> {
    let base = v1::VmState {
        gid: objects.gid.0,
        active_mtu: objects.active_mtu,
        roce: objects.roce,
        pds: save_table(&objects.pds, |pd| v1::Pd { users: pd.users }),
        mrs: save_table(&objects.mrs, |mr| v1::Mr {
            pdn: mr.pdn,
            access: mr.access,
            iova: mr.iova,
            length: mr.length,
            first_page_offset: mr.first_page_offset,
            page_shift: mr.page_shift,
            pages: mr.pages.clone(),
        }),
        cqs: save_table(&objects.cqs, |cq| v1::Cq {
            depth: cq.depth,
            ring_addr: cq.ring_addr,
            users: cq.users,
            producer: cq.producer,
            notify_ack: cq.notify_ack,
            overflowed: cq.overflowed,
        }),
        qps: save_table(&objects.qps, |qp| save_qp(qp, now)),
        ahs: save_table(&objects.ahs, |ah| v1::Ah {
            pdn: ah.pdn,
            attr: ah.attr.as_bytes().to_vec(),
        }),
        registered_bytes: objects.registered_bytes,
        counters,
        events: events
            .iter()
            .map(|e| {
                let mut b = [0u8; 8];
                b.copy_from_slice(e.as_bytes());
                b
            })
            .collect(),
    };
    let state = v2::VmState {
        base,
        srqs: save_table(&objects.srqs, |srq| v2::Srq {
            pdn: srq.pdn,
            depth: srq.depth,
            max_sge: srq.max_sge,
            ring_addr: srq.ring_addr,
            limit: srq.limit,
            consumer: srq.consumer,
            users: srq.users,
            fault: srq.fault.map_or(0, |v| v.raw()),
        }),
        attached: objects
            .qps
            .iter()
            .filter(|(_, qp)| qp.has_srq())
            .map(|(qpn, qp)| v2::Attached {
                qpn,
                srqn: qp.srqn,
                last_wqe_raised: qp.rt.last_wqe_raised,
                held: qp.rt.srq_recv.map(|r| v2::Held {
                    wr_id: r.wr_id,
                    sges: r.sges[..r.n]
                        .iter()
                        .map(|s| (s.addr.get(), s.length.get(), s.lkey.get()))
                        .collect(),
                    room: r.room,
                }),
            })
            .collect(),
    };
    codec::frame(VERSION, &state.encode())
}

fn save_table<T, S>(table: &Table<T>, save: impl Fn(&T) -> S) -> v1::Table<S> {
    let (index_bits, generation_bits) = table.handle_bits();
    let (slots, free) = table.slots();
    v1::Table {
        index_bits: index_bits as u8,
        generation_bits: generation_bits as u8,
        slots: slots.map(|(g, v)| (g, v.map(&save))).collect(),
        free: free.to_vec(),
    }
}

/// What is left of the timer at `at`, in microseconds.
fn left(at: Option<Instant>, now: Instant) -> Option<u64> {
    at.map(|t| t.saturating_duration_since(now).as_micros() as u64)
}

fn save_qp(qp: &Qp, now: Instant) -> v1::Qp {
    let rt = &qp.rt;
    let stride = qp.sq_geometry().map_or(0, |g| g.stride() as usize);
    let rc = &rt.rc;
    v1::Qp {
        qp_type: qp.qp_type,
        pdn: qp.pdn,
        send_cqn: qp.send_cqn,
        recv_cqn: qp.recv_cqn,
        sq_sig_all: qp.sq_sig_all,
        caps: qp.caps.as_bytes().to_vec(),
        sq_ring_addr: qp.sq_ring_addr,
        rq_ring_addr: qp.rq_ring_addr,
        attr: qp.attr.as_bytes().to_vec(),
        rt: v1::QpRuntime {
            sq_head: rt.sq_head,
            rq_done: rt.rq_done,
            sqd_notified: rt.sqd_notified,
            sq_dead: rt.sq_dead,
            sq_polling: rt.sq_polling,
            inflight: rt.inflight.active.then(|| v1::Inflight {
                slot: rt.inflight.slot[..stride.min(qp_state::MAX_SEND_SLOT)].to_vec(),
                done: rt.inflight.done,
                wait_us: left(rt.inflight.wait_until, now),
            }),
            retries_transport: rt.retries.transport,
            retries_rnr: rt.retries.rnr,
            psns: [rt.psns.next, rt.psns.una, rt.psns.expected, rt.psns.msn],
            rc: v1::Rc {
                started: rc.started,
                sq_next: rc.sq_next,
                sq_max: rc.sq_max,
                psn_max: rc.psn_max,
                records: rc.records.as_ref().map(|r| v1::Records {
                    sent: r
                        .sent
                        .iter()
                        .map(|s| {
                            (
                                s.first_psn,
                                s.last_psn,
                                s.wr_id,
                                s.opcode,
                                s.signaled,
                                s.len,
                            )
                        })
                        .collect(),
                    reads: r
                        .reads
                        .iter()
                        .map(|x| (x.first_psn, x.npkts, x.va, x.rkey, x.len, x.msn))
                        .collect(),
                    atomics: r.atomics.to_vec(),
                }),
                deadline_us: left(rc.deadline, now),
                rnr_until_us: left(rc.rnr_until, now),
                rewind: rc.rewind,
                rewound: rc.rewound,
                cwnd: rc.cwnd,
                rx: match rc.rx {
                    RxMsg::Idle => (0, 0, 0, 0, 0),
                    RxMsg::Send { done } => (1, 0, 0, 0, done),
                    RxMsg::Write {
                        va,
                        rkey,
                        len,
                        done,
                    } => (2, va, rkey, len, done),
                },
                nak_sent: rc.nak_sent,
                read_next: rc.read_next,
                acked: rc.acked,
                atomic_next: rc.atomic_next,
            },
        },
    }
}

/// Decodes and checks a saved state for the VM configured by `cfg` on a daemon whose node
/// GUID is `node_guid`, as of `now`. Everything is checked that can be without guest memory.
pub fn load(blob: &[u8], cfg: &VmConfig, node_guid: u64, now: Instant) -> Result<Restored, Error> {
    let (version, payload) = codec::unframe(blob, VERSION)?;
    let state = if version == 1 {
        // Version 1 predates SRQs: the same objects, none of them an SRQ.
        let (index_bits, generation_bits) = (
            crate::limits::HANDLE_INDEX_BITS as u8,
            crate::limits::HANDLE_GENERATION_BITS as u8,
        );
        v2::VmState {
            base: v1::VmState::decode(payload)?,
            srqs: v1::Table {
                index_bits,
                generation_bits,
                slots: Vec::new(),
                free: Vec::new(),
            },
            attached: Vec::new(),
        }
    } else {
        v2::VmState::decode(payload)?
    };
    restore(state, cfg, node_guid, now)
}

fn restore(
    state: v2::VmState,
    cfg: &VmConfig,
    node_guid: u64,
    now: Instant,
) -> Result<Restored, Error> {
    let v2::VmState {
        base: s,
        srqs,
        attached,
    } = state;
    let mut o = VmObjects::new(cfg, node_guid);
    let saved_gid = Gid(s.gid);
    if saved_gid != o.gid {
        return Err(Error::Gid {
            vm: cfg.name.clone(),
            saved: saved_gid,
            here: o.gid,
        });
    }
    let mtu = vrdma_proto::config::Mtu::from_raw(s.active_mtu)
        .map_err(|_| Error::Vm("the active MTU is not an IB MTU"))?;
    let any_on_wire = s
        .qps
        .slots
        .iter()
        .filter_map(|(_, q)| q.as_ref())
        .any(|q| q.rt.rc.started);
    if any_on_wire && !o.roce {
        return Err(Error::NoRoce);
    }
    o.pds = restore_table("PD", &o.pds, s.pds, |_, pd| Ok(Pd { users: pd.users }))?;
    let caps = o.caps;
    o.mrs = restore_table("MR", &o.mrs, s.mrs, |lkey, mr| restore_mr(lkey, mr, &caps))?;
    o.cqs = restore_table("CQ", &o.cqs, s.cqs, |cqn, cq| restore_cq(cqn, cq, &caps))?;
    let srq_caps = o.srq_caps;
    o.srqs = restore_table("SRQ", &o.srqs, srqs, |srqn, srq| {
        restore_srq(srqn, srq, &srq_caps)
    })?;
    let mut attachments = std::collections::HashMap::with_capacity(attached.len());
    for a in attached {
        let qpn = a.qpn;
        if attachments.insert(qpn, a).is_some() {
            return Err(Error::Object {
                what: "QP",
                handle: qpn,
                problem: "it is attached to an SRQ twice",
            });
        }
    }
    o.qps = restore_table("QP", &o.qps, s.qps, |qpn, qp| {
        restore_qp(qpn, qp, &caps, mtu, now, attachments.remove(&qpn))
    })?;
    if let Some(&qpn) = attachments.keys().next() {
        return Err(Error::Object {
            what: "QP",
            handle: qpn,
            problem: "an SRQ attachment names a QP that does not exist",
        });
    }
    o.ahs = restore_table("AH", &o.ahs, s.ahs, |handle, ah| {
        let attr = qp::AhAttr::read_from_bytes(&ah.attr).map_err(|_| Error::Object {
            what: "AH",
            handle,
            problem: "its address attributes have the wrong size",
        })?;
        if attr.sgid_index != 0 {
            return Err(Error::Object {
                what: "AH",
                handle,
                problem: "its GID index is not 0",
            });
        }
        Ok(Ah { pdn: ah.pdn, attr })
    })?;
    check_references(&o)?;
    let registered: u64 = o.mrs.iter().map(|(_, mr)| mr.length).sum();
    if registered != s.registered_bytes {
        return Err(Error::Vm(
            "the registered byte count differs from its MRs' lengths",
        ));
    }
    if registered > o.max_registered_bytes {
        return Err(Error::Vm(
            "its MRs register more bytes than this VM's quota here (max_mr_bytes)",
        ));
    }
    o.registered_bytes = registered;
    let mut events = Vec::with_capacity(s.events.len());
    for bytes in &s.events {
        let e = event::Event::read_from_bytes(bytes).map_err(|_| Error::Vm("an event"))?;
        if event::Kind::from_raw(e.kind.get()).is_err() {
            return Err(Error::Vm("an event has an unknown kind"));
        }
        events.push(e);
    }
    Ok(Restored {
        objects: o,
        counters: s.counters,
        events,
    })
}

fn restore_table<T, S>(
    what: &'static str,
    here: &Table<T>,
    saved: v1::Table<S>,
    mut restore: impl FnMut(u32, S) -> Result<T, Error>,
) -> Result<Table<T>, Error> {
    let bits = here.handle_bits();
    if (
        u32::from(saved.index_bits),
        u32::from(saved.generation_bits),
    ) != bits
    {
        return Err(Error::HandleBits {
            what,
            saved: (saved.index_bits, saved.generation_bits),
            here: bits,
        });
    }
    let (index_bits, generation_bits) = bits;
    let mut slots = Vec::with_capacity(saved.slots.len());
    for (index, (generation, value)) in saved.slots.into_iter().enumerate() {
        // The handle the object had: what error messages and references name.
        let handle = (generation << index_bits) | index as u32;
        let value = value.map(|v| restore(handle, v)).transpose()?;
        slots.push((generation, value));
    }
    Table::restore(
        here.capacity(),
        index_bits,
        generation_bits,
        slots,
        saved.free,
    )
    .map_err(|source| Error::Table { what, source })
}

fn restore_mr(lkey: u32, mr: v1::Mr, caps: &vrdma_proto::config::DeviceCaps) -> Result<Mr, Error> {
    let bad = |problem| Error::Object {
        what: "MR",
        handle: lkey,
        problem,
    };
    if Access::from_bits(mr.access).is_none() {
        return Err(bad("unknown access bits"));
    }
    if !(proto_mr::MIN_PAGE_SHIFT..=proto_mr::MAX_PAGE_SHIFT).contains(&mr.page_shift) {
        return Err(bad("its page size is not supported"));
    }
    let page = 1u64 << mr.page_shift;
    if mr.length > caps.max_mr_size.get() || mr.iova.checked_add(mr.length).is_none() {
        return Err(bad(
            "its length is over the limit or wraps the address space",
        ));
    }
    if mr.first_page_offset >= page {
        return Err(bad("its first-page offset is not inside a page"));
    }
    let needed = (mr.first_page_offset + mr.length).div_ceil(page);
    if mr.pages.len() as u64 != needed {
        return Err(bad("its page list does not cover its length"));
    }
    if mr.pages.iter().any(|p| p % page != 0) {
        return Err(bad("a page address is not aligned to its page size"));
    }
    Ok(Mr::new(
        mr.pdn,
        mr.access,
        mr.iova,
        mr.length,
        mr.first_page_offset,
        mr.page_shift,
        mr.pages,
    ))
}

fn restore_srq(srqn: u32, srq: v2::Srq, caps: &vrdma_proto::config::SrqCaps) -> Result<Srq, Error> {
    let bad = |problem| Error::Object {
        what: "SRQ",
        handle: srqn,
        problem,
    };
    if srq.depth > caps.max_srq_wr.get() || srq.max_sge > caps.max_srq_sge.get() {
        return Err(bad("its depth or SGE count is over this daemon's limits"));
    }
    if srq.limit > srq.depth {
        return Err(bad("its limit is larger than its depth"));
    }
    let fault = match srq.fault {
        0 => None,
        raw => Some(
            cqe::VendorErr::from_raw(raw).map_err(|_| bad("its fault is not a vendor error"))?,
        ),
    };
    let record = Srq {
        pdn: srq.pdn,
        depth: srq.depth,
        max_sge: srq.max_sge,
        ring_addr: srq.ring_addr,
        limit: srq.limit,
        consumer: srq.consumer,
        users: srq.users,
        fault,
    };
    record
        .geometry()
        .ok_or_else(|| bad("its ring geometry is invalid"))?;
    Ok(record)
}

fn restore_cq(cqn: u32, cq: v1::Cq, caps: &vrdma_proto::config::DeviceCaps) -> Result<Cq, Error> {
    if cq.depth > caps.max_cqe.get() || ring::Geometry::new(cq.depth, cqe::SIZE).is_err() {
        return Err(Error::Object {
            what: "CQ",
            handle: cqn,
            problem: "its depth is not one a CQ can have",
        });
    }
    Ok(Cq {
        depth: cq.depth,
        ring_addr: cq.ring_addr,
        users: cq.users,
        producer: cq.producer,
        notify_ack: cq.notify_ack,
        overflowed: cq.overflowed,
    })
}

/// The instant `us` microseconds after `now`, or an error for a timer no QP can have.
fn timer(
    us: Option<u64>,
    now: Instant,
    bad: &impl Fn(&'static str) -> Error,
) -> Result<Option<Instant>, Error> {
    us.map(|us| {
        let d = Duration::from_micros(us);
        if d > MAX_TIMER {
            return Err(bad("a timer is longer than any verbs timeout"));
        }
        now.checked_add(d)
            .ok_or_else(|| bad("a timer is out of range"))
    })
    .transpose()
}

fn restore_qp(
    qpn: u32,
    s: v1::Qp,
    caps: &vrdma_proto::config::DeviceCaps,
    active_mtu: vrdma_proto::config::Mtu,
    now: Instant,
    attached: Option<v2::Attached>,
) -> Result<Qp, Error> {
    let bad = |problem| Error::Object {
        what: "QP",
        handle: qpn,
        problem,
    };
    let qp_type = qp::Type::from_raw(s.qp_type).map_err(|_| bad("unknown QP type"))?;
    let cap =
        qp::Caps::read_from_bytes(&s.caps).map_err(|_| bad("its caps have the wrong size"))?;
    let attr = qp::Attr::read_from_bytes(&s.attr)
        .map_err(|_| bad("its attributes have the wrong size"))?;
    let within = [
        (cap.max_send_wr.get(), caps.max_qp_wr.get()),
        (cap.max_recv_wr.get(), caps.max_qp_wr.get()),
        (cap.max_send_sge.get(), caps.max_sge.get()),
        (cap.max_recv_sge.get(), caps.max_sge.get()),
        (cap.max_inline_data.get(), caps.max_inline_data.get()),
    ];
    if within.iter().any(|&(v, max)| v > max) {
        return Err(bad("its queue sizes are over this daemon's limits"));
    }
    if qp::State::from_raw(attr.qp_state).is_err() {
        return Err(bad("unknown QP state"));
    }
    if attr.path_mtu > active_mtu.raw() && attr.path_mtu != 0 {
        return Err(bad("its path MTU is larger than the port's"));
    }
    if attr.dest_qp_num.get() > qp::MAX_QPN || attr.ah_attr.sgid_index != 0 {
        return Err(bad("its destination QPN or GID index is out of range"));
    }
    if u32::from(attr.max_rd_atomic) > caps.max_qp_init_rd_atom.get()
        || u32::from(attr.max_dest_rd_atomic) > caps.max_qp_rd_atom.get()
    {
        return Err(bad("its READ/atomic depth is over this daemon's limit"));
    }
    let rt = &s.rt;
    if rt.psns.iter().any(|&p| p > qp::MAX_PSN) {
        return Err(bad("a PSN has more than 24 bits"));
    }
    if rt.retries_transport > 7 || rt.retries_rnr > 7 {
        return Err(bad("a retry count is over 7"));
    }
    let mut record = Qp {
        qp_type: qp_type.raw(),
        pdn: s.pdn,
        send_cqn: s.send_cqn,
        recv_cqn: s.recv_cqn,
        sq_sig_all: s.sq_sig_all,
        caps: cap,
        sq_ring_addr: s.sq_ring_addr,
        rq_ring_addr: s.rq_ring_addr,
        srqn: attached.as_ref().map_or(0, |a| a.srqn),
        attr,
        rt: QpRuntime::at(rt.sq_head, rt.rq_done),
    };
    let sq = record
        .sq_geometry()
        .ok_or_else(|| bad("its send ring geometry is invalid"))?;
    match &attached {
        None => {
            record
                .rq_geometry()
                .ok_or_else(|| bad("its receive ring geometry is invalid"))?;
        }
        Some(a) => {
            if a.srqn == 0 {
                return Err(bad("its SRQ attachment names no SRQ"));
            }
            if cap.max_recv_wr.get() != 0 || cap.max_recv_sge.get() != 0 || s.rq_ring_addr != 0 {
                return Err(bad("it takes receives from an SRQ but has a receive ring"));
            }
            record.rt.last_wqe_raised = a.last_wqe_raised;
            record.rt.srq_recv = a.held.as_ref().map(restore_held).transpose()?;
        }
    }
    record.rt.sqd_notified = rt.sqd_notified;
    record.rt.sq_dead = rt.sq_dead;
    record.rt.sq_polling = rt.sq_polling;
    record.rt.retries = Retries {
        transport: rt.retries_transport,
        rnr: rt.retries_rnr,
    };
    let [next, una, expected, msn] = rt.psns;
    record.rt.psns = qp_state::Psns {
        next,
        una,
        expected,
        msn,
    };
    if let Some(i) = &rt.inflight {
        if i.slot.len() != sq.stride() as usize || i.slot.len() > qp_state::MAX_SEND_SLOT {
            return Err(bad(
                "its work request in progress does not fit its send ring slot",
            ));
        }
        let limits = record.send_limits();
        let wr = wqe::decode_send(&i.slot, limits)
            .map_err(|_| bad("its work request in progress is malformed"))?;
        if i.done > wr.byte_len {
            return Err(bad(
                "its work request in progress has done more than its length",
            ));
        }
        let mut inflight = Inflight {
            active: true,
            done: i.done,
            wait_until: timer(i.wait_us, now, &bad)?,
            ..Inflight::default()
        };
        inflight.slot[..i.slot.len()].copy_from_slice(&i.slot);
        record.rt.inflight = inflight;
    }
    record.rt.rc = restore_rc(&rt.rc, rt.sq_head, now, &bad)?;
    Ok(record)
}

/// The receive a QP held from its SRQ: at most the SGEs any SRQ can have (its own SRQ's limit
/// is checked with the references), its room the sum of their lengths.
fn restore_held(h: &v2::Held) -> Result<RecvCopy, Error> {
    let bad = |problem| Error::Vm(problem);
    let mut copy = RecvCopy {
        wr_id: h.wr_id,
        n: h.sges.len(),
        room: h.room,
        ..RecvCopy::default()
    };
    if h.sges.len() > copy.sges.len() {
        return Err(bad("a held SRQ receive has more SGEs than any SRQ"));
    }
    let mut room = 0u32;
    for (slot, &(addr, length, lkey)) in copy.sges.iter_mut().zip(&h.sges) {
        *slot = Sge::new(addr, length, lkey);
        room = room
            .checked_add(length)
            .ok_or_else(|| bad("a held SRQ receive's length overflows"))?;
    }
    if room != h.room {
        return Err(bad(
            "a held SRQ receive's room differs from its SGEs' lengths",
        ));
    }
    Ok(copy)
}

fn restore_rc(
    s: &v1::Rc,
    sq_head: u32,
    now: Instant,
    bad: &impl Fn(&'static str) -> Error,
) -> Result<RcTransport, Error> {
    // The window means something only once the QP has sent on the wire: a QP that never has
    // (its peer is on the same daemon) starts it from its send ring when it first does.
    let window = qp_state::RC_WINDOW as u32;
    let begun = s.sq_max.wrapping_sub(sq_head);
    if s.started && (begun > window || s.sq_next.wrapping_sub(sq_head) > begun) {
        return Err(bad("its RC window is inconsistent with its send ring"));
    }
    let psn = |p: Option<u32>| p.is_some_and(|p| p > qp::MAX_PSN);
    if s.psn_max > qp::MAX_PSN || psn(s.rewound) || psn(s.acked) {
        return Err(bad("an RC PSN has more than 24 bits"));
    }
    if s.cwnd > qp_state::MAX_UNACKED {
        return Err(bad("its RC window is larger than any the transport opens"));
    }
    if usize::from(s.read_next) >= qp_state::READ_HISTORY
        || usize::from(s.atomic_next) >= qp_state::ATOMIC_REPLAY
    {
        return Err(bad("an RC record index is out of range"));
    }
    let rx = match s.rx {
        (0, 0, 0, 0, 0) => RxMsg::Idle,
        (1, 0, 0, 0, done) => RxMsg::Send { done },
        (2, va, rkey, len, done) if done <= len => RxMsg::Write {
            va,
            rkey,
            len,
            done,
        },
        _ => return Err(bad("its RC message in progress is invalid")),
    };
    let records = match &s.records {
        None => None,
        Some(r) => {
            if r.sent.len() != qp_state::RC_WINDOW
                || r.reads.len() != qp_state::READ_HISTORY
                || r.atomics.len() != qp_state::ATOMIC_REPLAY
            {
                return Err(bad("its RC records have the wrong size"));
            }
            let mut rec = Box::<Records>::default();
            for (slot, &(first_psn, last_psn, wr_id, opcode, signaled, len)) in
                rec.sent.iter_mut().zip(&r.sent)
            {
                *slot = Sent {
                    first_psn,
                    last_psn,
                    wr_id,
                    opcode,
                    signaled,
                    len,
                };
            }
            for (slot, &(first_psn, npkts, va, rkey, len, msn)) in
                rec.reads.iter_mut().zip(&r.reads)
            {
                *slot = ReadRecord {
                    first_psn,
                    npkts,
                    va,
                    rkey,
                    len,
                    msn,
                };
            }
            rec.atomics.copy_from_slice(&r.atomics);
            Some(rec)
        }
    };
    Ok(RcTransport {
        started: s.started,
        sq_next: s.sq_next,
        sq_max: s.sq_max,
        psn_max: s.psn_max,
        records,
        deadline: timer(s.deadline_us, now, bad)?,
        rnr_until: timer(s.rnr_until_us, now, bad)?,
        rewind: s.rewind,
        rewound: s.rewound,
        cwnd: s.cwnd,
        // Not saved: at worst the first congestion mark after the move halves the window
        // once more.
        congestion_cut_at: None,
        // The scheduler's timers are its own: the restored deadlines arm new ones.
        timer_at: None,
        rx,
        nak_sent: s.nak_sent,
        read_next: s.read_next,
        acked: s.acked,
        atomic_next: s.atomic_next,
    })
}

/// Checks that every object's PD and CQs exist and that the saved use counts match the
/// references (a wrong count would let a guest free a PD or CQ still in use).
fn check_references(o: &VmObjects) -> Result<(), Error> {
    let mut pd_users: std::collections::HashMap<u32, u32> = Default::default();
    let mut cq_users: std::collections::HashMap<u32, u32> = Default::default();
    let mut use_pd = |what: &'static str, handle: u32, pdn: u32| {
        if o.pds.get(pdn).is_none() {
            return Err(Error::Object {
                what,
                handle,
                problem: "its PD does not exist",
            });
        }
        *pd_users.entry(pdn).or_default() += 1;
        Ok(())
    };
    for (lkey, mr) in o.mrs.iter() {
        use_pd("MR", lkey, mr.pdn)?;
    }
    for (handle, ah) in o.ahs.iter() {
        use_pd("AH", handle, ah.pdn)?;
    }
    for (srqn, srq) in o.srqs.iter() {
        use_pd("SRQ", srqn, srq.pdn)?;
    }
    let mut srq_users: std::collections::HashMap<u32, u32> = Default::default();
    for (qpn, qp) in o.qps.iter() {
        use_pd("QP", qpn, qp.pdn)?;
        if qp.has_srq() {
            let srq = o.srqs.get(qp.srqn).ok_or(Error::Object {
                what: "QP",
                handle: qpn,
                problem: "its SRQ does not exist",
            })?;
            if qp.rt.srq_recv.is_some_and(|r| r.n > srq.max_sge as usize) {
                return Err(Error::Object {
                    what: "QP",
                    handle: qpn,
                    problem: "the receive it holds has more SGEs than its SRQ allows",
                });
            }
            *srq_users.entry(qp.srqn).or_default() += 1;
        }
        for cqn in [qp.send_cqn, qp.recv_cqn] {
            if o.cqs.get(cqn).is_none() {
                return Err(Error::Object {
                    what: "QP",
                    handle: qpn,
                    problem: "its CQ does not exist",
                });
            }
            *cq_users.entry(cqn).or_default() += 1;
        }
    }
    for (pdn, pd) in o.pds.iter() {
        if pd.users != pd_users.get(&pdn).copied().unwrap_or(0) {
            return Err(Error::Object {
                what: "PD",
                handle: pdn,
                problem: "its use count differs from the objects in it",
            });
        }
    }
    for (cqn, cq) in o.cqs.iter() {
        if cq.users != cq_users.get(&cqn).copied().unwrap_or(0) {
            return Err(Error::Object {
                what: "CQ",
                handle: cqn,
                problem: "its use count differs from the QPs using it",
            });
        }
    }
    for (srqn, srq) in o.srqs.iter() {
        if srq.users != srq_users.get(&srqn).copied().unwrap_or(0) {
            return Err(Error::Object {
                what: "SRQ",
                handle: srqn,
                problem: "its use count differs from the QPs attached to it",
            });
        }
    }
    Ok(())
}

/// Installs restored state into `vm`, which must have no objects yet, and hands every QP to
/// the scheduler so it looks at their rings once the VM runs.
pub fn install(vm: &Vm, restored: Restored) -> Result<(), Error> {
    let mut objects = vm.lock();
    let empty = objects.pds.is_empty()
        && objects.mrs.is_empty()
        && objects.cqs.is_empty()
        && objects.qps.is_empty()
        && objects.ahs.is_empty()
        && objects.srqs.is_empty();
    if !empty {
        return Err(Error::NotEmpty);
    }
    *objects = restored.objects;
    let qpns: Vec<u32> = objects.qps.iter().map(|(qpn, _)| qpn).collect();
    drop(objects);
    vm.counters.set_values(&restored.counters);
    for e in restored.events {
        if let Ok(kind) = event::Kind::from_raw(e.kind.get()) {
            vm.push_event(kind, e.handle.get());
        }
    }
    for qpn in qpns {
        vm.enqueue(qpn);
    }
    Ok(())
}

/// A ring of a restored VM that lies outside its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRing {
    /// A QP's send or receive ring.
    Qp(u32),
    /// A CQ's ring.
    Cq(u32),
    /// An SRQ's ring.
    Srq(u32),
}

/// Checks every ring of `objects` against the memory table that arrived after the state, as
/// creating the object checked it. Returns the objects whose rings are not in guest memory:
/// the caller puts them in error, as a device whose ring vanished would.
pub fn check_rings(objects: &VmObjects, mem: &GuestMem) -> Vec<BadRing> {
    let mut bad = Vec::new();
    for (cqn, cq) in objects.cqs.iter() {
        let len = ring::Geometry::new(cq.depth, cqe::SIZE).map_or(0, |g| g.byte_len());
        if !in_one_region(mem, cq.ring_addr, len) {
            bad.push(BadRing::Cq(cqn));
        }
    }
    for (qpn, qp) in objects.qps.iter() {
        let sq = qp.sq_geometry().map_or(0, |g| g.byte_len());
        // A QP with an SRQ has no receive ring of its own.
        let rq_outside = !qp.has_srq()
            && !in_one_region(
                mem,
                qp.rq_ring_addr,
                qp.rq_geometry().map_or(0, |g| g.byte_len()),
            );
        if !in_one_region(mem, qp.sq_ring_addr, sq) || rq_outside {
            bad.push(BadRing::Qp(qpn));
        }
    }
    for (srqn, srq) in objects.srqs.iter() {
        let len = srq.geometry().map_or(0, |g| g.byte_len());
        if !in_one_region(mem, srq.ring_addr, len) {
            bad.push(BadRing::Srq(srqn));
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use vrdma_proto::cmd::{self, Status};
    use vrdma_proto::config::Mtu;
    use vrdma_proto::{Gid, mr, qp};
    use zerocopy::{FromBytes, IntoBytes};

    use super::*;
    use crate::model::control::{ControlEnv, Outcome};

    fn exec(vm: &mut VmObjects, mem: &GuestMem, bytes: &[u8]) -> Outcome {
        let env = ControlEnv {
            mem,
            hooks: &crate::model::hooks::NoHooks,
            vm: 1,
        };
        vm.execute(cmd::decode(bytes).expect("well-formed"), &env)
    }

    fn command(op: cmd::Opcode, body: &[u8]) -> Vec<u8> {
        let mut out = cmd::header(op).as_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    /// Where the fixture's guest memory starts.
    const BASE: u64 = 0x1_0000;

    /// A VM made through its commands: a PD (and a freed one whose handle is stale), an MR of
    /// two pages, a CQ, and an RC QP in INIT; the config it was made with and its memory.
    struct Made {
        cfg: crate::config::VmConfig,
        mem: GuestMem,
        vm: VmObjects,
        pd: u32,
        stale: u32,
        lkey: u32,
        qpn: u32,
    }

    fn made(roce: bool) -> Made {
        let mem = GuestMem::from_ranges(&[(GuestAddress(BASE), 1 << 20)]).unwrap();
        let cfg = crate::config::VmConfig {
            name: "m".into(),
            socket: "/nonexistent".into(),
            gid: Gid::from_ipv4([10, 0, 0, 2]),
            weight: 1,
            class: crate::config::PriorityClass::Normal,
            sl_classes: crate::config::SlClasses::default(),
            quotas: crate::config::Quotas::default(),
            doorbell_queues: 1,
            active_mtu: Mtu::Mtu4096,
            roce,
            incoming: false,
            nic_qpns: false,
            socket_access: Default::default(),
        };
        let mut vm = VmObjects::new(&cfg, 7);
        let mut run = |op, body: &[u8]| exec(&mut vm, &mem, &command(op, body)).unwrap();
        let handle = |bytes: Vec<u8>| cmd::Handle::read_from_bytes(&bytes).unwrap().handle.get();
        let pd = handle(run(cmd::Opcode::AllocPd, &[]));
        let stale = handle(run(cmd::Opcode::AllocPd, &[]));
        let freed = cmd::Handle {
            handle: stale.into(),
            reserved: 0.into(),
        };
        run(cmd::Opcode::DeallocPd, freed.as_bytes());
        let reg = cmd::RegMr {
            pdn: pd.into(),
            access: (mr::Access::LOCAL_WRITE | mr::Access::REMOTE_WRITE)
                .bits()
                .into(),
            iova: 0x7000_0000.into(),
            length: 8192.into(),
            first_page_offset: 0.into(),
            npages: 2.into(),
            page_shift: 12,
            reserved: [0; 7],
        };
        let mut body = reg.as_bytes().to_vec();
        body.extend_from_slice(&BASE.to_le_bytes());
        body.extend_from_slice(&(BASE + 4096).to_le_bytes());
        let lkey = cmd::RegMrResp::read_from_bytes(&run(cmd::Opcode::RegMr, &body))
            .unwrap()
            .lkey
            .get();
        let cq = cmd::CreateCq {
            cqe: 16.into(),
            reserved: 0.into(),
            ring_addr: (BASE + 0x4000).into(),
        };
        let cqn = cmd::CreateCqResp::read_from_bytes(&run(cmd::Opcode::CreateCq, cq.as_bytes()))
            .unwrap()
            .cqn;
        let create = cmd::CreateQp {
            pdn: pd.into(),
            qp_type: qp::Type::Rc.raw(),
            sq_sig_all: 0,
            reserved: 0.into(),
            send_cqn: cqn,
            recv_cqn: cqn,
            cap: qp::Caps {
                max_send_wr: 4.into(),
                max_recv_wr: 4.into(),
                max_send_sge: 1.into(),
                max_recv_sge: 1.into(),
                max_inline_data: 0.into(),
                reserved: 0.into(),
            },
            sq_ring_addr: (BASE + 0x8000).into(),
            rq_ring_addr: (BASE + 0xc000).into(),
            srqn: 0.into(),
            reserved1: 0.into(),
        };
        let qpn =
            cmd::CreateQpResp::read_from_bytes(&run(cmd::Opcode::CreateQp, create.as_bytes()))
                .unwrap()
                .qpn;
        let init = cmd::ModifyQp {
            qpn,
            attr_mask: (qp::AttrMask::STATE
                | qp::AttrMask::PKEY_INDEX
                | qp::AttrMask::PORT
                | qp::AttrMask::ACCESS_FLAGS)
                .bits()
                .into(),
            attr: qp::Attr {
                qp_state: qp::State::Init.raw(),
                port_num: 1,
                qp_access_flags: mr::Access::REMOTE_WRITE.bits().into(),
                ..qp::Attr::default()
            },
        };
        run(cmd::Opcode::ModifyQp, init.as_bytes());
        Made {
            cfg,
            mem,
            vm,
            pd,
            stale,
            lkey,
            qpn: qpn.get(),
        }
    }

    fn handle_command(op: cmd::Opcode, handle: u32) -> Vec<u8> {
        let body = cmd::Handle {
            handle: handle.into(),
            reserved: 0.into(),
        };
        command(op, body.as_bytes())
    }

    /// A VM whose QPs and MRs are on a NIC is refused, naming what it has there; on the soft
    /// fabric the same objects save.
    #[test]
    fn a_vm_with_objects_on_a_nic_is_not_saved() {
        let Made { mut vm, .. } = made(false);
        assert!(check_migratable(&vm).is_ok(), "soft fabric");
        vm.nic_qpns = true;
        let err = check_migratable(&vm).unwrap_err();
        assert!(matches!(err, Error::OnNic { qps: 1, mrs: 1 }), "{err}");
        assert!(err.to_string().contains("not supported"), "{err}");
        let _ = (vm.qps.drain(), vm.mrs.drain());
        assert!(check_migratable(&vm).is_ok(), "nothing left on the NIC");
    }

    /// Everything a VM owns survives a save and a restore unchanged, which live migration
    /// relies on: the same handles name the same objects afterwards, and stale ones stay stale.
    #[test]
    fn a_vms_objects_survive_a_save_and_restore() {
        let Made {
            cfg,
            mem,
            mut vm,
            pd,
            stale,
            lkey,
            qpn,
        } = made(false);
        let query = handle_command(cmd::Opcode::QueryQp, qpn);
        let before = exec(&mut vm, &mem, &query).unwrap();

        let now = Instant::now();
        let counters = std::array::from_fn(|i| i as u64 * 3 + 1);
        let events = [event::Event::new(event::Kind::QpFatal, qpn)];
        let saved = save(&vm, counters, &events, now);
        let restored = load(&saved, &cfg, 7, now).expect("restore");
        assert_eq!(restored.counters, counters);
        assert_eq!(restored.events, events);
        let mut restored = restored.objects;

        assert_eq!(
            exec(&mut restored, &mem, &query).unwrap(),
            before,
            "same QP, same attributes"
        );
        assert_eq!(
            restored.mrs.get(lkey).map(|m| m.pages.clone()),
            Some(vec![BASE, BASE + 4096])
        );
        assert_eq!(restored.registered_bytes, 8192);
        let dealloc = |restored: &mut VmObjects, pd| {
            exec(restored, &mem, &handle_command(cmd::Opcode::DeallocPd, pd))
                .unwrap_err()
                .status
        };
        assert_eq!(dealloc(&mut restored, stale), Status::InvalidHandle);
        // The PD is still in use by the MR and the QP after the restore.
        assert_eq!(dealloc(&mut restored, pd), Status::Busy);
        // New handles do not collide with the restored ones.
        let fresh = cmd::Handle::read_from_bytes(
            &exec(&mut restored, &mem, &command(cmd::Opcode::AllocPd, &[])).unwrap(),
        )
        .unwrap()
        .handle;
        assert!(fresh != pd && fresh != stale);
    }

    /// A restored VM's rings are checked against the memory table that arrives after the
    /// state: those outside it are named, so the device can put their objects in error.
    #[test]
    fn rings_outside_the_memory_table_are_found() {
        let Made { vm, mem, qpn, .. } = made(false);
        assert_eq!(
            check_rings(&vm, &mem),
            vec![],
            "all rings in the VM's memory"
        );
        // A table that ends before the CQ's ring (at BASE + 0x4000) and the QP's.
        let short = GuestMem::from_ranges(&[(GuestAddress(BASE), 0x4000)]).unwrap();
        let cqn = vm.cqs.iter().map(|(cqn, _)| cqn).next().unwrap();
        assert_eq!(
            check_rings(&vm, &short),
            vec![BadRing::Cq(cqn), BadRing::Qp(qpn)]
        );
    }

    /// The fixture with `--roce`, its QP in RTS mid-transfer on the wire.
    fn sample() -> (crate::config::VmConfig, VmObjects, u32) {
        let Made {
            cfg, mut vm, qpn, ..
        } = made(true);
        let qp = vm.qps.get_mut(qpn).unwrap();
        qp.attr.qp_state = qp::State::Rts.raw();
        qp.attr.path_mtu = Mtu::Mtu1024.raw();
        qp.rt.sq_head = 10;
        qp.rt.psns = qp_state::Psns {
            next: 0xff_fff0,
            una: 0xff_ffe0,
            expected: 77,
            msn: 5,
        };
        qp.rt.rc.started = true;
        qp.rt.rc.sq_next = 12;
        qp.rt.rc.sq_max = 12;
        qp.rt.rc.psn_max = 0xff_fff0;
        qp.rt.rc.cwnd = 64;
        qp.rt.rc.rx = RxMsg::Write {
            va: 0x1000,
            rkey: 0x55,
            len: 9000,
            done: 2048,
        };
        qp.rt.rc.acked = Some(76);
        qp.rt.rc.records().sent[10 % qp_state::RC_WINDOW] = Sent {
            first_psn: 0xff_ffe0,
            last_psn: 0xff_ffe8,
            wr_id: 42,
            opcode: 0,
            signaled: true,
            len: 9000,
        };
        qp.rt.rc.records().atomics[1] = (70, 1234, true);
        (cfg, vm, qpn)
    }

    /// The RC transport's state moves whole, and its timers resume with what was left of them.
    #[test]
    fn a_qps_transport_state_and_timers_survive() {
        let (cfg, mut vm, qpn) = sample();
        let t0 = Instant::now();
        vm.qps.get_mut(qpn).unwrap().rt.rc.deadline = Some(t0 + Duration::from_millis(30));
        let blob = save(&vm, [0; v1::COUNTERS], &[], t0);
        // Loaded 5 s later on the destination: the timeout still has its 30 ms.
        let t1 = t0 + Duration::from_secs(5);
        let restored = load(&blob, &cfg, 7, t1).unwrap().objects;
        let (a, b) = (
            &vm.qps.get(qpn).unwrap().rt,
            &restored.qps.get(qpn).unwrap().rt,
        );
        assert_eq!(
            (a.sq_head, a.psns.next, a.psns.una),
            (b.sq_head, b.psns.next, b.psns.una)
        );
        assert_eq!((a.psns.expected, a.psns.msn), (b.psns.expected, b.psns.msn));
        assert_eq!(
            (a.rc.sq_next, a.rc.sq_max, a.rc.cwnd),
            (b.rc.sq_next, b.rc.sq_max, b.rc.cwnd)
        );
        assert_eq!((a.rc.rx, a.rc.acked), (b.rc.rx, b.rc.acked));
        let (ra, rb) = (
            a.rc.records.as_ref().unwrap(),
            b.rc.records.as_ref().unwrap(),
        );
        assert_eq!(ra.sent[10].wr_id, rb.sent[10].wr_id);
        assert_eq!(ra.sent[10].last_psn, rb.sent[10].last_psn);
        assert_eq!(ra.atomics, rb.atomics);
        assert_eq!(b.rc.deadline, Some(t1 + Duration::from_millis(30)));
        // And the same bytes again: nothing is lost on a second hop.
        assert_eq!(save(&restored, [0; v1::COUNTERS], &[], t1), blob);
    }

    /// Each kind of corruption a frontend or a broken transfer can produce is refused with
    /// its own error, before anything is installed.
    #[test]
    fn corrupt_and_inconsistent_states_are_refused() {
        let (cfg, vm, _) = sample();
        let now = Instant::now();
        let good = save(&vm, [0; v1::COUNTERS], &[], now);
        assert!(load(&good, &cfg, 7, now).is_ok());

        let mut flipped = good.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 4;
        assert!(matches!(
            load(&flipped, &cfg, 7, now),
            Err(Error::Format(codec::Error::Checksum { .. }))
        ));
        let future = codec::frame(VERSION + 1, &good[codec::HEADER_LEN..]);
        assert!(matches!(
            load(&future, &cfg, 7, now),
            Err(Error::Format(codec::Error::Version {
                found,
                supported: VERSION
            })) if found == VERSION + 1
        ));

        // Consistent framing, inconsistent content: re-framed so only validation can catch it.
        let reframe = |change: &dyn Fn(&mut v1::VmState)| {
            let (_, payload) = codec::unframe(&good, VERSION).unwrap();
            let mut state = v2::VmState::decode(payload).unwrap();
            change(&mut state.base);
            load(&codec::frame(VERSION, &state.encode()), &cfg, 7, now)
        };
        let with_qp = |f: &dyn Fn(&mut v1::Qp)| {
            reframe(&|s| {
                f(s.qps
                    .slots
                    .iter_mut()
                    .find_map(|(_, q)| q.as_mut())
                    .unwrap())
            })
        };
        assert!(matches!(
            reframe(&|s| s.pds.slots[0].1.as_mut().unwrap().users = 1),
            Err(Error::Object { what: "PD", .. })
        ));
        assert!(matches!(
            reframe(&|s| s.gid[15] ^= 1),
            Err(Error::Gid { .. })
        ));
        assert!(matches!(
            reframe(&|s| s.registered_bytes += 1),
            Err(Error::Vm(_))
        ));
        assert!(matches!(
            with_qp(&|q| q.send_cqn ^= 0x1_0000),
            Err(Error::Object {
                what: "QP",
                problem: "its CQ does not exist",
                ..
            })
        ));
        assert!(matches!(
            with_qp(&|q| q.attr[0] = 0xee),
            Err(Error::Object { what: "QP", .. })
        ));
        assert!(matches!(
            with_qp(&|q| q.rt.psns[0] = 1 << 24),
            Err(Error::Object { what: "QP", .. })
        ));
        assert!(matches!(
            with_qp(&|q| q.rt.rc.sq_max = q.rt.sq_head.wrapping_add(33)),
            Err(Error::Object { what: "QP", .. })
        ));
        assert!(matches!(
            with_qp(&|q| q.rt.rc.deadline_us = Some(u64::MAX)),
            Err(Error::Object { what: "QP", .. })
        ));
        assert!(matches!(
            with_qp(&|q| q.rt.inflight = Some(v1::Inflight {
                slot: vec![0xff; 3],
                done: 0,
                wait_us: None
            })),
            Err(Error::Object { what: "QP", .. })
        ));
        assert!(matches!(
            reframe(&|s| s.qps.free.push(5)),
            Err(Error::Table { what: "QP", .. })
        ));
        // Over this daemon's quota for the VM.
        let mut small = cfg.clone();
        small.quotas.max_qp = 0;
        assert!(matches!(
            load(&good, &small, 7, now),
            Err(Error::Table {
                what: "QP",
                source: RestoreError::OverCapacity { .. }
            })
        ));
        // A VM whose QPs are on the wire needs --roce here.
        let mut no_roce = cfg.clone();
        no_roce.roce = false;
        assert!(matches!(load(&good, &no_roce, 7, now), Err(Error::NoRoce)));
    }

    /// Where the SRQ fixture's SRQ ring and its QP's send ring are.
    const SRQ_RING: u64 = BASE + 0x10000;
    const SRQ_QP_SQ: u64 = BASE + 0x12000;

    /// The fixture plus an SRQ (8 entries of one SGE, armed with limit 2) and a second RC QP
    /// attached to it, which holds a receive it took (the SRQ's consumer index is past it)
    /// for a message in progress. Returns the SRQ's number and the QP's.
    fn with_srq(m: &mut Made) -> (u32, u32) {
        let (mem, vm) = (&m.mem, &mut m.vm);
        let srq = cmd::CreateSrq {
            pdn: m.pd.into(),
            max_wr: 8.into(),
            max_sge: 1.into(),
            srq_limit: 2.into(),
            ring_addr: SRQ_RING.into(),
        };
        let srqn = cmd::CreateSrqResp::read_from_bytes(
            &exec(vm, mem, &command(cmd::Opcode::CreateSrq, srq.as_bytes())).unwrap(),
        )
        .unwrap()
        .srqn
        .get();
        let cqn = vm.cqs.iter().map(|(cqn, _)| cqn).next().unwrap();
        let create = cmd::CreateQp {
            pdn: m.pd.into(),
            qp_type: qp::Type::Rc.raw(),
            sq_sig_all: 0,
            reserved: 0.into(),
            send_cqn: cqn.into(),
            recv_cqn: cqn.into(),
            cap: qp::Caps {
                max_send_wr: 4.into(),
                max_send_sge: 1.into(),
                ..qp::Caps::default()
            },
            sq_ring_addr: SRQ_QP_SQ.into(),
            rq_ring_addr: 0.into(),
            srqn: srqn.into(),
            reserved1: 0.into(),
        };
        let qpn = cmd::CreateQpResp::read_from_bytes(
            &exec(vm, mem, &command(cmd::Opcode::CreateQp, create.as_bytes())).unwrap(),
        )
        .unwrap()
        .qpn
        .get();
        vm.srqs.get_mut(srqn).unwrap().consumer = 1;
        let qp = vm.qps.get_mut(qpn).unwrap();
        let mut held = RecvCopy {
            wr_id: 9,
            n: 1,
            room: 100,
            ..RecvCopy::default()
        };
        held.sges[0] = Sge::new(0x7000_0000, 100, m.lkey);
        qp.rt.srq_recv = Some(held);
        (srqn, qpn)
    }

    /// An SRQ moves with its handle, ring, indices and armed limit, and a QP attached to it
    /// with the receive it holds: after a restore the SRQ is still in use, and a second hop
    /// changes nothing.
    #[test]
    fn an_srq_and_the_receive_a_qp_holds_survive_a_save_and_restore() {
        let mut m = made(false);
        let (srqn, qpn) = with_srq(&mut m);
        let now = Instant::now();
        let blob = save(&m.vm, [0; v1::COUNTERS], &[], now);
        let mut restored = load(&blob, &m.cfg, 7, now).unwrap().objects;
        let (a, b) = (
            m.vm.srqs.get(srqn).unwrap(),
            restored.srqs.get(srqn).unwrap(),
        );
        assert_eq!(
            (
                a.pdn,
                a.depth,
                a.max_sge,
                a.ring_addr,
                a.limit,
                a.consumer,
                a.users
            ),
            (
                b.pdn,
                b.depth,
                b.max_sge,
                b.ring_addr,
                b.limit,
                b.consumer,
                b.users
            )
        );
        assert_eq!((b.depth, b.limit, b.consumer, b.users), (8, 2, 1, 1));
        let qp = restored.qps.get(qpn).unwrap();
        assert_eq!(qp.srqn, srqn);
        assert_eq!(qp.rt.srq_recv, m.vm.qps.get(qpn).unwrap().rt.srq_recv);
        assert_eq!(qp.rt.srq_recv.map(|r| r.wr_id), Some(9));
        assert_eq!(check_rings(&restored, &m.mem), vec![]);
        let query = handle_command(cmd::Opcode::QuerySrq, srqn);
        assert_eq!(
            exec(&mut restored, &m.mem, &query),
            exec(&mut m.vm, &m.mem, &query)
        );
        assert_eq!(save(&restored, [0; v1::COUNTERS], &[], now), blob);
        let destroy = handle_command(cmd::Opcode::DestroySrq, srqn);
        assert_eq!(
            exec(&mut restored, &m.mem, &destroy).unwrap_err().status,
            Status::Busy
        );
        // The SRQ's ring is checked against the memory table like every other.
        let short = GuestMem::from_ranges(&[(GuestAddress(BASE), 0x10000)]).unwrap();
        assert!(check_rings(&restored, &short).contains(&BadRing::Srq(srqn)));
    }

    /// A state a daemon of format version 1 wrote (before SRQs) still loads.
    #[test]
    fn a_version_1_state_loads_as_one_without_srqs() {
        let Made {
            cfg,
            mem,
            mut vm,
            qpn,
            ..
        } = made(false);
        let now = Instant::now();
        let blob = save(&vm, [3; v1::COUNTERS], &[], now);
        let (_, payload) = codec::unframe(&blob, VERSION).unwrap();
        let v1_blob = codec::frame(1, &v2::VmState::decode(payload).unwrap().base.encode());
        let restored = load(&v1_blob, &cfg, 7, now).expect("a version 1 state");
        assert_eq!(restored.counters, [3; v1::COUNTERS]);
        let mut objects = restored.objects;
        assert!(objects.srqs.is_empty());
        let query = handle_command(cmd::Opcode::QueryQp, qpn);
        assert_eq!(
            exec(&mut objects, &mem, &query),
            exec(&mut vm, &mem, &query)
        );
        // Saved again, it is the version 2 state of the same VM.
        assert_eq!(save(&objects, [3; v1::COUNTERS], &[], now), blob);
    }

    /// Each inconsistency of a saved SRQ or attachment is refused.
    #[test]
    fn corrupt_srq_states_are_refused() {
        let mut m = made(false);
        let (srqn, qpn) = with_srq(&mut m);
        let now = Instant::now();
        let good = save(&m.vm, [0; v1::COUNTERS], &[], now);
        assert!(load(&good, &m.cfg, 7, now).is_ok());
        let reframe = |change: &dyn Fn(&mut v2::VmState)| {
            let (_, payload) = codec::unframe(&good, VERSION).unwrap();
            let mut state = v2::VmState::decode(payload).unwrap();
            change(&mut state);
            load(&codec::frame(VERSION, &state.encode()), &m.cfg, 7, now)
        };
        let srq = |f: &dyn Fn(&mut v2::Srq)| {
            reframe(&|s| {
                f(s.srqs
                    .slots
                    .iter_mut()
                    .find_map(|(_, q)| q.as_mut())
                    .unwrap())
            })
        };
        let object = |r: Result<Restored, Error>| match r {
            Err(Error::Object { what, handle, .. }) => Some((what, handle)),
            _ => None,
        };
        assert_eq!(object(srq(&|q| q.users = 2)), Some(("SRQ", srqn)));
        assert_eq!(object(srq(&|q| q.limit = 9)), Some(("SRQ", srqn)));
        assert_eq!(object(srq(&|q| q.depth = 6)), Some(("SRQ", srqn)));
        assert_eq!(object(srq(&|q| q.max_sge = 17)), Some(("SRQ", srqn)));
        assert_eq!(object(srq(&|q| q.fault = 999)), Some(("SRQ", srqn)));
        assert_eq!(object(srq(&|q| q.pdn ^= 0x1_0000)), Some(("SRQ", srqn)));
        // Attachments: to an SRQ that does not exist, of a QP that does not exist, twice, or
        // missing (the QP then has no receive ring at all).
        assert_eq!(
            object(reframe(&|s| s.attached[0].srqn ^= 0x1_0000)),
            Some(("QP", qpn))
        );
        assert_eq!(
            object(reframe(&|s| {
                let mut stray = s.attached[0].clone();
                stray.qpn = 0x02_0005;
                s.attached.push(stray);
            })),
            Some(("QP", 0x02_0005))
        );
        assert_eq!(
            object(reframe(&|s| {
                let twice = s.attached[0].clone();
                s.attached.push(twice);
            })),
            Some(("QP", qpn))
        );
        assert_eq!(object(reframe(&|s| s.attached.clear())), Some(("QP", qpn)));
        // The held receive: its room must be its SGEs' lengths, and its SGEs fit its SRQ.
        assert!(matches!(
            reframe(&|s| s.attached[0].held.as_mut().unwrap().room = 101),
            Err(Error::Vm(_))
        ));
        assert_eq!(
            object(reframe(&|s| {
                let held = s.attached[0].held.as_mut().unwrap();
                held.sges.push((0x7000_0000, 0, 1));
            })),
            Some(("QP", qpn))
        );
    }

    /// Any single corrupted byte of the payload, re-framed with a valid checksum, is either
    /// refused with an error or loads: never a panic (the fuzz target does this at scale).
    #[test]
    fn every_single_byte_corruption_is_handled() {
        let (cfg, vm, _) = sample();
        let mut with = made(false);
        with_srq(&mut with);
        let now = Instant::now();
        for objects in [&vm, &with.vm] {
            let good = save(objects, [0; v1::COUNTERS], &[], now);
            let payload = &good[codec::HEADER_LEN..];
            for i in 0..payload.len() {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut p = payload.to_vec();
                    p[i] ^= x;
                    let _ = load(&codec::frame(VERSION, &p), &cfg, 7, now);
                }
            }
            for n in 0..payload.len() {
                assert!(load(&codec::frame(VERSION, &payload[..n]), &cfg, 7, now).is_err());
            }
        }
    }

    /// Writes seed inputs for the `state_load` fuzz target (vhost-user-rdma/fuzz/README.md):
    /// saved states of the sample VM, as the target reads them (a mode byte, then a payload
    /// it frames itself, or a whole blob).
    #[test]
    #[ignore = "writes the fuzz corpus seeds; run by hand (see vhost-user-rdma/fuzz/README.md)"]
    fn write_fuzz_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state_load");
        std::fs::create_dir_all(&dir).unwrap();
        let (_, vm, qpn) = sample();
        let now = Instant::now();
        let mut busy = vm.clone();
        let qp = busy.qps.get_mut(qpn).unwrap();
        qp.rt.inflight.active = true;
        qp.rt.rc.deadline = Some(now + Duration::from_millis(3));
        let mut shared = made(false);
        with_srq(&mut shared);
        let events = [event::Event::new(event::Kind::CommEst, qpn)];
        for (name, objects) in [("idle", &vm), ("busy", &busy), ("srq", &shared.vm)] {
            let blob = save(objects, [5; v1::COUNTERS], &events, now);
            let mut framed = vec![3u8];
            framed.extend_from_slice(&blob[codec::HEADER_LEN..]);
            std::fs::write(dir.join(format!("{name}-payload")), framed).unwrap();
            let mut whole = vec![2u8];
            whole.extend_from_slice(&blob);
            std::fs::write(dir.join(format!("{name}-blob")), whole).unwrap();
        }
    }
}
