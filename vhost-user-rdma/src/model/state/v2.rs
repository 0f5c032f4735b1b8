//! Version 2 of the saved device state: version 1's layout unchanged, followed by the VM's
//! shared receive queues and what its QPs hold of them.
//!
//! A version 1 state is a version 2 state with no SRQs, which is how `super::load` reads one.
//! As in version 1, decoding checks only the shape; what the values mean is checked when the
//! state is restored.

use super::codec::{Error, Reader, Writer};
use super::v1::{self, Table, decode_table, encode_table};
use crate::limits;

/// One VM's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    /// Everything version 1 saves, laid out as version 1 lays it out.
    pub base: v1::VmState,
    /// Shared receive queues.
    pub srqs: Table<Srq>,
    /// Every QP attached to an SRQ, in the order of the QP table.
    pub attached: Vec<Attached>,
}

/// A shared receive queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srq {
    /// PD.
    pub pdn: u32,
    /// Ring entries.
    pub depth: u32,
    /// SGEs per work request.
    pub max_sge: u32,
    /// Ring address.
    pub ring_addr: u64,
    /// Armed limit, 0 if not armed.
    pub limit: u32,
    /// The device's consumer index.
    pub consumer: u32,
    /// QPs attached.
    pub users: u32,
    /// Why the SRQ is in error, as a raw `cqe::VendorErr`; 0 if it is not.
    pub fault: u32,
}

/// A QP's attachment to an SRQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The QP.
    pub qpn: u32,
    /// Its SRQ.
    pub srqn: u32,
    /// QP_LAST_WQE_REACHED raised since the QP entered ERR.
    pub last_wqe_raised: bool,
    /// The receive the QP took from the SRQ and holds for its message in progress.
    pub held: Option<Held>,
}

/// A receive taken from an SRQ and not yet completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Its `wr_id`.
    pub wr_id: u64,
    /// Its SGEs: address, length, lkey.
    pub sges: Vec<(u64, u32, u32)>,
    /// Room in bytes.
    pub room: u32,
}

/// Smallest encoded attachment.
const MIN_ATTACHED: usize = 10;

impl VmState {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.base.encode_into(&mut w);
        encode_table(&mut w, &self.srqs, |w, srq| {
            w.u32(srq.pdn);
            w.u32(srq.depth);
            w.u32(srq.max_sge);
            w.u64(srq.ring_addr);
            w.u32(srq.limit);
            w.u32(srq.consumer);
            w.u32(srq.users);
            w.u32(srq.fault);
        });
        w.count(self.attached.len());
        for a in &self.attached {
            w.u32(a.qpn);
            w.u32(a.srqn);
            w.bool(a.last_wqe_raised);
            w.bool(a.held.is_some());
            if let Some(h) = &a.held {
                w.u64(h.wr_id);
                w.count(h.sges.len());
                for &(addr, length, lkey) in &h.sges {
                    w.u64(addr);
                    w.u32(length);
                    w.u32(lkey);
                }
                w.u32(h.room);
            }
        }
        w.into_bytes()
    }

    /// Reads a payload written by [`VmState::encode`].
    pub fn decode(payload: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(payload);
        let base = v1::VmState::decode_from(&mut r)?;
        let srqs = decode_table(&mut r, "SRQ", limits::MAX_SRQ, |r| {
            Ok(Srq {
                pdn: r.u32("SRQ PD")?,
                depth: r.u32("SRQ depth")?,
                max_sge: r.u32("SRQ SGEs")?,
                ring_addr: r.u64("SRQ ring")?,
                limit: r.u32("SRQ limit")?,
                consumer: r.u32("SRQ consumer")?,
                users: r.u32("SRQ users")?,
                fault: r.u32("SRQ fault")?,
            })
        })?;
        let n = r.count("SRQ attachments", limits::MAX_QP as usize, MIN_ATTACHED)?;
        let mut attached = Vec::with_capacity(n);
        for _ in 0..n {
            let qpn = r.u32("SRQ attachment")?;
            let srqn = r.u32("SRQ attachment")?;
            let last_wqe_raised = r.bool("SRQ attachment")?;
            let held = if r.bool("SRQ attachment")? {
                let wr_id = r.u64("held receive")?;
                let n = r.count("held receive SGEs", limits::MAX_SRQ_SGE as usize, 16)?;
                let mut sges = Vec::with_capacity(n);
                for _ in 0..n {
                    sges.push((
                        r.u64("held receive SGE")?,
                        r.u32("held receive SGE")?,
                        r.u32("held receive SGE")?,
                    ));
                }
                let room = r.u32("held receive")?;
                Some(Held { wr_id, sges, room })
            } else {
                None
            };
            attached.push(Attached {
                qpn,
                srqn,
                last_wqe_raised,
                held,
            });
        }
        r.finish()?;
        Ok(VmState {
            base,
            srqs,
            attached,
        })
    }
}
