//! One VM's RDMA objects: PDs, MRs, CQs, QPs, AHs and SRQs in generational handle tables, with the
//! identity and limits the guest sees, and the translation of the addresses work requests name
//! into guest-physical runs.
//!
//! Guest addresses are checked against the VM's memory table when an object is made but never
//! cached as host pointers: the data path translates them again on every access.

use vrdma_proto::cmd::{self, Status};
use vrdma_proto::config::{self, DeviceCaps, Mtu, PortAttr, SrqCaps};
use vrdma_proto::cqe::VendorErr;
use vrdma_proto::mr::Access;
use vrdma_proto::wqe::{Sge, SgeList};
use vrdma_proto::{Gid, mr, qp, ring, wqe};

use super::memory::Runs;
use super::qp_state::QpRuntime;
use crate::config::VmConfig;
use crate::handle::Table;
use crate::limits;

/// A protection domain.
#[derive(Debug, Clone, Default)]
pub struct Pd {
    /// MRs, QPs and AHs in this PD; it cannot be freed while any exist.
    pub users: u32,
}

/// A memory region.
#[derive(Debug, Clone)]
pub struct Mr {
    /// Its PD.
    pub pdn: u32,
    /// Access rights.
    pub access: u32,
    /// Address of the first byte as work requests name it.
    pub iova: u64,
    /// Bytes.
    pub length: u64,
    /// Offset of the first byte in the first page.
    pub first_page_offset: u64,
    /// log2 of the page size.
    pub page_shift: u8,
    /// Guest-physical page addresses.
    pub pages: Vec<u64>,
    /// Whether each page follows the one before it in guest-physical memory, so that any
    /// range of the region is one run: the data path then skips the walk page by page.
    contiguous: bool,
}

impl Mr {
    /// A region of `pages` (each `1 << page_shift` bytes) whose first byte, at
    /// `first_page_offset` in the first page, work requests name `iova`.
    pub fn new(
        pdn: u32,
        access: u32,
        iova: u64,
        length: u64,
        first_page_offset: u64,
        page_shift: u8,
        pages: Vec<u64>,
    ) -> Mr {
        let page_size = 1u64.checked_shl(page_shift.into());
        let contiguous = page_size.is_some_and(|size| {
            pages
                .windows(2)
                .all(|w| w[0].checked_add(size) == Some(w[1]))
        });
        Mr {
            pdn,
            access,
            iova,
            length,
            first_page_offset,
            page_shift,
            pages,
            contiguous,
        }
    }

    /// Whether the region's pages are back to back in guest-physical memory.
    pub fn is_contiguous(&self) -> bool {
        self.contiguous || self.pages.len() <= 1
    }

    /// The access rights.
    pub fn access(&self) -> mr::Access {
        mr::Access::from_bits_truncate(self.access)
    }

    /// Whether `[addr, addr + len)` lies within the region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.iova
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.iova.saturating_add(self.length))
    }

    /// Appends the guest-physical runs behind `[addr, addr + len)`, which the caller has
    /// checked lies within the region.
    pub fn runs(&self, addr: u64, len: u32, out: &mut Runs) -> Result<(), VendorErr> {
        let shift = u32::from(self.page_shift);
        let page_size = 1u64 << shift;
        let mut pos = self.first_page_offset + (addr - self.iova);
        let mut remaining = u64::from(len);
        if self.contiguous && len > 0 {
            let end = pos.checked_add(remaining);
            let covered = u64::try_from(self.pages.len())
                .ok()
                .and_then(|n| n.checked_shl(shift));
            let first = self.pages.first();
            return match (first, end, covered) {
                (Some(&base), Some(end), Some(covered)) if end <= covered => {
                    out.push(base + pos, len)
                }
                _ => Err(VendorErr::SgeOutOfBounds),
            };
        }
        while remaining > 0 {
            let page = usize::try_from(pos >> shift).map_err(|_| VendorErr::SgeOutOfBounds)?;
            let within = pos & (page_size - 1);
            let n = remaining.min(page_size - within);
            let base = *self.pages.get(page).ok_or(VendorErr::SgeOutOfBounds)?;
            out.push(base + within, n as u32)?;
            pos += n;
            remaining -= n;
        }
        Ok(())
    }
}

/// Why a local SGE was refused: verbs reports access errors and protection errors with
/// different statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SgeFault {
    /// The MR does not grant the access (LOC_ACCESS_ERR).
    Access(VendorErr),
    /// The lkey, PD or bounds are wrong (LOC_PROT_ERR).
    Protection(VendorErr),
}

impl SgeFault {
    /// The vendor error either way.
    pub fn vendor(self) -> VendorErr {
        match self {
            SgeFault::Access(v) | SgeFault::Protection(v) => v,
        }
    }
}

/// Checks one local SGE: the MR exists, is in `pdn`, grants `need`, and contains the range.
pub fn check_local(mrs: &Table<Mr>, pdn: u32, sge: &Sge, need: Access) -> Result<(), SgeFault> {
    let len = sge.length.get();
    if len == 0 {
        return Ok(());
    }
    let mr = mrs
        .get(sge.lkey.get())
        .ok_or(SgeFault::Protection(VendorErr::BadLkey))?;
    if mr.pdn != pdn {
        return Err(SgeFault::Protection(VendorErr::PdMismatch));
    }
    if !mr.contains(sge.addr.get(), len.into()) {
        return Err(SgeFault::Protection(VendorErr::SgeOutOfBounds));
    }
    if !mr.access().contains(need) {
        return Err(SgeFault::Access(VendorErr::LocalAccess));
    }
    Ok(())
}

/// Appends the runs for bytes `[offset, offset + len)` of the message an SGE list describes.
pub fn sge_runs(
    mrs: &Table<Mr>,
    sges: SgeList<'_>,
    offset: u32,
    len: u32,
    out: &mut Runs,
) -> Result<(), VendorErr> {
    sge_iter_runs(mrs, sges.iter(), offset, len, out)
}

/// As [`sge_runs`], for SGEs already copied out.
pub fn sge_iter_runs(
    mrs: &Table<Mr>,
    sges: impl Iterator<Item = Sge>,
    offset: u32,
    len: u32,
    out: &mut Runs,
) -> Result<(), VendorErr> {
    let (mut skip, mut want) = (offset, len);
    for sge in sges {
        if want == 0 {
            break;
        }
        let sl = sge.length.get();
        if skip >= sl {
            skip -= sl;
            continue;
        }
        let n = (sl - skip).min(want);
        let mr = mrs.get(sge.lkey.get()).ok_or(VendorErr::BadLkey)?;
        let addr = sge.addr.get() + u64::from(skip);
        if !mr.contains(addr, n.into()) {
            return Err(VendorErr::SgeOutOfBounds);
        }
        mr.runs(addr, n, out)?;
        skip = 0;
        want -= n;
    }
    if want == 0 {
        Ok(())
    } else {
        Err(VendorErr::SgeOutOfBounds)
    }
}

/// A completion queue.
#[derive(Debug, Clone)]
pub struct Cq {
    /// Ring entries.
    pub depth: u32,
    /// Guest-physical address of the ring.
    pub ring_addr: u64,
    /// QPs that complete into this CQ.
    pub users: u32,
    /// The device's producer index (the ring's copy is only ever written from this).
    pub producer: u32,
    /// The arm sequence the device last raised an event for.
    pub notify_ack: u32,
    /// The ring overflowed: the CQ is unusable, as on hardware.
    pub overflowed: bool,
}

/// A shared receive queue: a receive ring any number of the VM's QPs take their receives
/// from.
///
/// Its consumer side is shared by every QP attached to it, which the soft fabric and the
/// RoCEv2 receive threads serve on different threads; like a CQ's producer side it is kept
/// here, so the VM's object lock, which every responder path holds while it takes a receive,
/// is what serialises them. Nothing wider than the VM is locked.
#[derive(Debug, Clone)]
pub struct Srq {
    /// Its PD: the lkeys of its work requests are checked against it.
    pub pdn: u32,
    /// Ring entries.
    pub depth: u32,
    /// Most SGEs in one work request.
    pub max_sge: u32,
    /// Guest-physical address of the ring.
    pub ring_addr: u64,
    /// The armed limit, 0 if not armed: when a receive taken leaves fewer than this many in
    /// the ring, the device raises SRQ_LIMIT_REACHED and disarms.
    pub limit: u32,
    /// The device's consumer index (the ring's copy is only ever written from this).
    pub consumer: u32,
    /// QPs attached; it cannot be destroyed while any are.
    pub users: u32,
    /// Why the ring became unusable (overrun, or its memory gone), if it did: the SRQ is then
    /// in error for good, as on hardware.
    pub fault: Option<VendorErr>,
}

impl Srq {
    /// The ring's geometry.
    pub fn geometry(&self) -> Option<ring::Geometry> {
        ring::Geometry::new(self.depth, wqe::recv_stride(self.max_sge)).ok()
    }
}

/// A queue pair's control-path view.
#[derive(Debug, Clone)]
pub struct Qp {
    /// RC or UD, raw.
    pub qp_type: u8,
    /// Its PD.
    pub pdn: u32,
    /// CQ for send completions.
    pub send_cqn: u32,
    /// CQ for receive completions.
    pub recv_cqn: u32,
    /// Every send completes with a CQE.
    pub sq_sig_all: bool,
    /// Queue sizes.
    pub caps: qp::Caps,
    /// Send ring address.
    pub sq_ring_addr: u64,
    /// Receive ring address (0 with an SRQ).
    pub rq_ring_addr: u64,
    /// The SRQ the QP takes its receives from, or 0 if it has its own receive ring.
    pub srqn: u32,
    /// Attributes set so far; `qp_state` is the current state.
    pub attr: qp::Attr,
    /// Data-path progress.
    pub rt: QpRuntime,
}

impl Qp {
    /// The QP type.
    pub fn qp_type(&self) -> qp::Type {
        qp::Type::from_raw(self.qp_type).unwrap_or(qp::Type::Rc)
    }

    /// The current state.
    pub fn state(&self) -> qp::State {
        qp::State::from_raw(self.attr.qp_state).unwrap_or(qp::State::Err)
    }

    /// Whether the QP answers requests as a responder: RTR, RTS and SQD consume receives and
    /// accept RDMA (a UD QP in SQE too, §16.1 of docs/protocol.md).
    pub fn responds(&self) -> bool {
        match self.state() {
            qp::State::Rtr | qp::State::Rts | qp::State::Sqd => true,
            qp::State::Sqe => self.qp_type() == qp::Type::Ud,
            _ => false,
        }
    }

    /// The remote operations the QP accepts as a responder.
    pub fn remote_access(&self) -> Access {
        Access::from_bits_truncate(self.attr.qp_access_flags.get())
    }

    /// Whether the QP's requester may have work on the wire (RTS and SQD).
    pub fn sends(&self) -> bool {
        matches!(self.state(), qp::State::Rts | qp::State::Sqd)
    }

    /// What one send work request of this QP may carry.
    pub fn send_limits(&self) -> wqe::Limits {
        wqe::Limits {
            max_sge: self.caps.max_send_sge.get(),
            max_inline: self.caps.max_inline_data.get(),
        }
    }

    /// The send ring's geometry.
    pub fn sq_geometry(&self) -> Option<ring::Geometry> {
        let stride = wqe::send_stride(
            self.caps.max_send_sge.get(),
            self.caps.max_inline_data.get(),
        );
        ring::Geometry::new(self.caps.max_send_wr.get(), stride).ok()
    }

    /// Whether the QP takes its receives from an SRQ rather than a ring of its own.
    pub fn has_srq(&self) -> bool {
        self.srqn != 0
    }

    /// The receive ring's geometry (none for a QP with an SRQ, which has no receive ring).
    pub fn rq_geometry(&self) -> Option<ring::Geometry> {
        ring::Geometry::new(
            self.caps.max_recv_wr.get(),
            wqe::recv_stride(self.caps.max_recv_sge.get()),
        )
        .ok()
    }
}

/// An address handle.
#[derive(Debug, Clone)]
pub struct Ah {
    /// Its PD.
    pub pdn: u32,
    /// The address.
    pub attr: qp::AhAttr,
}

/// A failed command: the status the guest gets and, for `MODIFY_QP`, the attribute bits at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Status for the response header.
    pub status: Status,
    /// `RespHeader::detail`.
    pub detail: u32,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure { status, detail: 0 }
    }
}

/// One VM's objects, limits and identity.
#[derive(Debug, Clone)]
pub struct VmObjects {
    /// Name, for logs.
    pub name: String,
    /// The port's GID.
    pub gid: Gid,
    /// Capabilities the guest sees.
    pub caps: DeviceCaps,
    /// SRQ limits the guest sees.
    pub srq_caps: SrqCaps,
    /// Whether the daemon runs the inter-host fabric: RC QPs then carry transport records.
    pub roce: bool,
    /// QP numbers are chosen by the NIC of the verbs fabric (`VmConfig::nic_qpns`).
    pub nic_qpns: bool,
    /// The port's active MTU, raw [`Mtu`].
    pub active_mtu: u8,
    /// PDs.
    pub pds: Table<Pd>,
    /// MRs, by lkey.
    pub mrs: Table<Mr>,
    /// CQs.
    pub cqs: Table<Cq>,
    /// QPs, by QPN.
    pub qps: Table<Qp>,
    /// AHs.
    pub ahs: Table<Ah>,
    /// SRQs.
    pub srqs: Table<Srq>,
    /// Bytes registered across all MRs.
    pub registered_bytes: u64,
    /// Quota on `registered_bytes`.
    pub max_registered_bytes: u64,
    /// QPs a control command gave work to (a transition to ERR needs its flush, to RTS may
    /// release queued sends); the device hands them to the scheduler after the command.
    pub wake: Vec<u32>,
    /// Asynchronous events a control command raised (a NIC fabric's SRQ that could not take
    /// a receive); the VM delivers them after the command.
    pub raised: Vec<(vrdma_proto::event::Kind, u32)>,
}

/// The port every vrdma device has: RoCE, active, up to 4096-byte MTU; `active_mtu` is what
/// its link carries (docs/fabric.md).
pub fn port_attr(active_mtu: Mtu) -> PortAttr {
    PortAttr {
        state: config::PortState::Active.raw(),
        max_mtu: Mtu::Mtu4096.raw(),
        active_mtu: active_mtu.raw(),
        link_layer: config::LinkLayer::Ethernet.raw(),
        gid_tbl_len: 1.into(),
        pkey_tbl_len: 1.into(),
        port_cap_flags: 0.into(),
        max_msg_sz: limits::MAX_MSG_SIZE.into(),
        lid: 0.into(),
        sm_lid: 0.into(),
        active_width: 2,  // 4x
        active_speed: 32, // EDR-class, 25 Gb/s per lane
        phys_state: 5,    // LinkUp
        reserved: 0,
    }
}

impl VmObjects {
    /// Applies new object quotas (an operator changed them while the VM runs): creations
    /// are checked against them from now on. The device's capabilities stay as the driver
    /// read them (docs/protocol.md §5: constant until a reset), so a creation may fail below
    /// `caps`' maximum, as on a NIC whose resources run out. Objects beyond a lowered quota
    /// stay until the guest destroys them.
    pub fn set_quotas(&mut self, q: &crate::config::Quotas) {
        self.pds.set_capacity(q.max_pd);
        self.mrs.set_capacity(q.max_mr);
        self.cqs.set_capacity(q.max_cq);
        self.qps.set_capacity(q.max_qp);
        self.ahs.set_capacity(q.max_ah);
        self.srqs.set_capacity(q.max_srq);
        self.max_registered_bytes = q.max_mr_bytes;
    }

    /// Objects in use, with the quota of each kind: (kind, in use, quota).
    pub fn usage(&self) -> [(&'static str, u64, u64); 7] {
        let t = |n: u32| u64::from(n);
        [
            ("qp", t(self.qps.len()), t(self.qps.capacity())),
            ("cq", t(self.cqs.len()), t(self.cqs.capacity())),
            ("mr", t(self.mrs.len()), t(self.mrs.capacity())),
            ("pd", t(self.pds.len()), t(self.pds.capacity())),
            ("ah", t(self.ahs.len()), t(self.ahs.capacity())),
            ("srq", t(self.srqs.len()), t(self.srqs.capacity())),
            ("mr_bytes", self.registered_bytes, self.max_registered_bytes),
        ]
    }

    /// Send work requests the soft fabric has under way: started and not completed, or on
    /// the wire and not acknowledged. A draining VM is drained when this is 0 (and the NIC,
    /// on the verbs fabric, has none of its sends either).
    pub fn sends_under_way(&self) -> u64 {
        self.qps
            .iter()
            .map(|(_, qp)| {
                let on_wire = qp.rt.rc.sq_max.wrapping_sub(qp.rt.sq_head);
                let started = u32::from(qp.rt.inflight.active);
                u64::from(if qp.rt.rc.is_started() {
                    on_wire.max(started)
                } else {
                    started
                })
            })
            .sum()
    }

    /// A VM with no objects yet.
    pub fn new(cfg: &VmConfig, node_guid: u64) -> Self {
        let q = &cfg.quotas;
        let caps = DeviceCaps {
            node_guid: node_guid.into(),
            sys_image_guid: node_guid.into(),
            max_mr_size: limits::MAX_MR_SIZE.min(q.max_mr_bytes).into(),
            page_size_cap: ((1u64 << (mr::MAX_PAGE_SHIFT + 1)) - (1u64 << mr::MIN_PAGE_SHIFT))
                .into(),
            max_registered_bytes: q.max_mr_bytes.into(),
            vendor_id: 0x1af4.into(), // the virtio vendor ID
            vendor_part_id: vrdma_proto::VIRTIO_ID_RDMA.into(),
            hw_ver: vrdma_proto::PROTOCOL_VERSION.into(),
            max_qp: q.max_qp.into(),
            max_qp_wr: limits::MAX_QP_WR.into(),
            max_sge: limits::MAX_SGE.into(),
            max_cq: q.max_cq.into(),
            max_cqe: limits::MAX_CQE.into(),
            max_mr: q.max_mr.into(),
            max_pd: q.max_pd.into(),
            max_ah: q.max_ah.into(),
            max_qp_rd_atom: limits::MAX_RD_ATOM.into(),
            max_qp_init_rd_atom: limits::MAX_RD_ATOM.into(),
            max_inline_data: limits::MAX_INLINE.into(),
            max_mr_pages: cmd::MAX_PAGE_LIST.into(),
            atomic_cap: config::AtomicCap::Glob.raw(),
            phys_port_cnt: 1,
            reserved: [0; 2],
        };
        let srq_caps = SrqCaps {
            max_srq: q.max_srq.into(),
            max_srq_wr: limits::MAX_SRQ_WR.into(),
            max_srq_sge: limits::MAX_SRQ_SGE.into(),
            reserved: 0.into(),
        };
        use crate::limits::*;
        VmObjects {
            name: cfg.name.clone(),
            gid: cfg.gid,
            caps,
            srq_caps,
            active_mtu: cfg.active_mtu.raw(),
            roce: cfg.roce,
            nic_qpns: cfg.nic_qpns,
            pds: Table::new(q.max_pd, HANDLE_INDEX_BITS, HANDLE_GENERATION_BITS),
            mrs: Table::new(q.max_mr, KEY_INDEX_BITS, KEY_GENERATION_BITS),
            cqs: Table::new(q.max_cq, HANDLE_INDEX_BITS, HANDLE_GENERATION_BITS),
            qps: Table::new(q.max_qp, QPN_INDEX_BITS, QPN_GENERATION_BITS),
            ahs: Table::new(q.max_ah, HANDLE_INDEX_BITS, HANDLE_GENERATION_BITS),
            srqs: Table::new(q.max_srq, HANDLE_INDEX_BITS, HANDLE_GENERATION_BITS),
            registered_bytes: 0,
            max_registered_bytes: q.max_mr_bytes,
            wake: Vec::new(),
            raised: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::memory::Run;

    fn runs_of(mr: &Mr, addr: u64, len: u32) -> Result<Vec<Run>, VendorErr> {
        let mut out = Runs::EMPTY;
        mr.runs(addr, len, &mut out)?;
        Ok(out.as_slice().to_vec())
    }

    #[test]
    fn a_contiguous_region_gives_one_run_like_the_page_walk() {
        // Four 4 KiB pages back to back from 0x10000, the region starting 0x100 into the first.
        let pages: Vec<u64> = (0..4).map(|i| 0x10000 + i * 0x1000).collect();
        let mr = Mr::new(1, 0, 0x5000_0100, 4 * 0x1000 - 0x100, 0x100, 12, pages);
        assert!(mr.contiguous);
        assert_eq!(
            runs_of(&mr, 0x5000_0100, 0x3f00).unwrap(),
            [Run {
                gpa: 0x10100,
                len: 0x3f00
            }]
        );
        assert_eq!(
            runs_of(&mr, 0x5000_2000, 0x10).unwrap(),
            [Run {
                gpa: 0x12000,
                len: 0x10
            }]
        );
        // Past the pages: refused, however the caller got here.
        assert_eq!(
            runs_of(&mr, 0x5000_2000, 0x3000),
            Err(VendorErr::SgeOutOfBounds)
        );
    }

    #[test]
    fn a_scattered_region_is_walked_page_by_page() {
        // Pages 0 and 1 adjacent, page 2 elsewhere: two runs across the gap.
        let pages = vec![0x10000, 0x11000, 0x40000];
        let mr = Mr::new(1, 0, 0x9000, 3 * 0x1000, 0, 12, pages);
        assert!(!mr.contiguous);
        assert_eq!(
            runs_of(&mr, 0x9800, 0x2000).unwrap(),
            [
                Run {
                    gpa: 0x10800,
                    len: 0x1800
                },
                Run {
                    gpa: 0x40000,
                    len: 0x800
                }
            ]
        );
    }
}
