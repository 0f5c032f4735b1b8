//! The device side of a test: one side's PD, CQs, QPs and buffers, the connection to the
//! other side's QPs, and perftest's loops.
//!
//! Each QP has one registered buffer of two halves of `half` bytes (the largest message,
//! rounded up to a page):
//!
//! ```text
//! [0, half)        TARGET: the other side's WRITEs and SENDs land here; READs and atomics
//!                  read it. Its address and rkey are what the other side is told.
//! [half, 2 half)   SOURCE: what this side writes or sends; READ and atomic results land here.
//! ```
//!
//! With `--check` (see [`crate::check`]) the bw tests give each request in flight a slot of
//! its own, `stride` bytes apart in both halves: request `k` of a QP uses SOURCE slot
//! `(k - 1) % tx_slots` and, for WRITE and READ, the same slot of the other side's TARGET;
//! send_bw's receives take TARGET's slots in turn. `half` is then the slots, rounded up to a
//! page. The sender fills each message with the pattern of its QP and iteration before
//! posting it (a READ's destination is cleared instead, the other side's TARGET holding the
//! patterns); the receiver checks each message it receives, and write_bw's receiver checks
//! each slot's last message when the sender has said which it was.
//!
//! The loops allocate nothing: work requests and receive lists are built before the clock
//! starts and only their `wr_id` and flags change, completions are polled into a fixed array,
//! and the timestamps go into vectors sized beforehand.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{Ordering, compiler_fence};
use std::time::{Duration, Instant};

use vrdma::mem::DmaBuf;
use vrdma::pacing;
use vrdma::{
    AccessFlags, AddressHandle, CompletionChannel, CompletionQueue, Context, MemoryRegion,
    ProtectionDomain, QpAttr, QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, RecvWr,
    SendFlags, SendWr, Sge, WcOpcode, WcStatus, WorkCompletion,
};
use vrdma_proto::config::Mtu;

use crate::WAIT;
use crate::check::{self, Mismatch, Verified};
use crate::opts::Test;
use crate::report::QpAddress;
use crate::stats::{BwRecorder, BwStats, LatRecorder, LatStats};
use crate::wire::{self, Control, Params};

/// Why a test failed on the device side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A verb failed.
    #[error("{what}")]
    Verbs {
        /// What was being done, in perftest's words.
        what: String,
        /// The library's error.
        #[source]
        source: vrdma::Error,
    },
    /// A work request completed with an error.
    #[error(
        "Completion with error: {what} failed with status {status:?} ({}), vendor_err {vendor_err}, wr_id {wr_id:#x}, QPN {qpn:#x}",
        status.raw()
    )]
    Completion {
        /// The operation.
        what: &'static str,
        /// Its status.
        status: WcStatus,
        /// vrdma's detail (`vrdma_proto::cqe::VendorErr`).
        vendor_err: u32,
        /// The request.
        wr_id: u64,
        /// The QP.
        qpn: u32,
    },
    /// A completion that does not fit the test.
    #[error("unexpected completion: {0}")]
    Unexpected(String),
    /// Nothing happened for [`WAIT`].
    #[error("{what}: nothing for {} s; is the other side still running?", WAIT.as_secs())]
    Stalled {
        /// What was awaited.
        what: String,
    },
    /// The run asks for more than the device offers.
    #[error("{0}")]
    Limit(String),
    /// A copy into or out of a buffer failed.
    #[error("{what}: {source}")]
    Mem {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: vrdma::mem::MemError,
    },
    /// `--check` found a message that is not the one sent.
    #[error(
        "payload check failed: {test} iteration {iteration} (QP {qp}), byte {offset} of {size}: expected {expected:#04x}, found {found:#04x}"
    )]
    Payload {
        /// The test.
        test: &'static str,
        /// The message's iteration (counted from 1, per QP).
        iteration: u64,
        /// The QP.
        qp: usize,
        /// The message size.
        size: usize,
        /// The first wrong byte's offset in the message.
        offset: usize,
        /// What it should be.
        expected: u8,
        /// What it is.
        found: u8,
    },
    /// The exchange with the other side failed.
    #[error(transparent)]
    Wire(#[from] wire::Error),
}

type Result<T> = std::result::Result<T, Error>;

fn verbs<T>(r: vrdma::Result<T>, what: impl Into<String>) -> Result<T> {
    r.map_err(|source| Error::Verbs {
        what: what.into(),
        source,
    })
}

/// Opens the device behind `socket`.
pub fn open(device: &vrdma::Device) -> Result<Context> {
    verbs(
        device.open(),
        format!(
            "Couldn't get context for the device {}",
            device.path.display()
        ),
    )
}

/// Checks the run against the device's limits and fills in what depends on the device (the
/// MTU, the inline size), so both sides use the same values.
pub fn params_for(ctx: &Context, s: &crate::opts::Settings) -> Result<Params> {
    let caps = ctx.device_attr();
    let port = verbs(ctx.query_port(1), "Unable to query port 1 attributes")?;
    let max_inline = caps.max_inline_data.get();
    let inline = match s.inline_size {
        _ if s.test.is_read() => 0,
        Some(i) if i > max_inline => {
            return Err(Error::Limit(format!(
                "inline size {i} exceeds the device's max_inline_data {max_inline}"
            )));
        }
        Some(i) => i,
        None if !s.test.is_bw() => crate::opts::DEF_INLINE_LAT.min(max_inline),
        None => 0,
    };
    let max_size = s.sizes.iter().copied().max().unwrap_or(1) as u64;
    let max_msg = u64::from(port.max_msg_sz.get());
    if max_size > max_msg {
        return Err(Error::Limit(format!(
            "message size {max_size} exceeds the device's max_msg_sz {max_msg}"
        )));
    }
    let limits = [
        ("TX depth", s.tx_depth, caps.max_qp_wr.get()),
        ("RX depth", s.rx_depth, caps.max_qp_wr.get()),
        ("number of QPs", s.qps, caps.max_qp.get()),
        (
            "CQ size (TX depth x QPs)",
            s.tx_depth.saturating_mul(s.qps),
            caps.max_cqe.get(),
        ),
    ];
    for (name, value, max) in limits {
        if value > max {
            return Err(Error::Limit(format!(
                "{name} {value} exceeds the device's limit {max}"
            )));
        }
    }
    let mtu = s
        .mtu
        .or_else(|| Mtu::from_raw(port.active_mtu).ok())
        .unwrap_or(Mtu::Mtu1024);
    Ok(Params {
        test: s.test,
        qps: s.qps,
        events: s.events,
        bidirectional: s.bidirectional,
        tx_depth: s.tx_depth,
        rx_depth: s.rx_depth,
        post_list: s.post_list,
        cq_mod: s.cq_mod,
        inline,
        max_size,
        mtu: mtu.bytes(),
        check: s.check,
    })
}

fn mtu_from_bytes(bytes: u32) -> Mtu {
    match bytes {
        256 => Mtu::Mtu256,
        512 => Mtu::Mtu512,
        2048 => Mtu::Mtu2048,
        4096 => Mtu::Mtu4096,
        _ => Mtu::Mtu1024,
    }
}

/// The tag of latency iteration `k`: never 0 (a cleared buffer), never the previous one.
fn tag(k: u64) -> u8 {
    (k % 255) as u8 + 1
}

/// How long a failed check of a polled write_lat message is repeated before it counts: the
/// device's copy need not store the bytes in address order (x86 fast-string stores may land
/// out of order), so the polled last byte may be seen a moment before the others.
const SETTLE: Duration = Duration::from_millis(10);

/// A message `--check` expects somewhere in a QP's buffer.
#[derive(Debug, Clone, Copy)]
struct Expect {
    /// The QP.
    q: usize,
    /// Where in its buffer.
    offset: usize,
    /// Bytes.
    size: usize,
    /// The iteration whose pattern it holds.
    pattern: u64,
    /// The iteration an error names (READs: the pattern is the slot's, see `prepare`).
    iteration: u64,
    /// Its last byte is write_lat's [`tag`] rather than the pattern's.
    tagged: bool,
}

/// The source and target slots per QP (module documentation): one without `--check`.
fn slots(p: &Params) -> (usize, usize) {
    if !p.check {
        return (1, 1);
    }
    let (tx, rx) = (p.tx_depth as usize, p.rx_depth as usize);
    match p.test {
        Test::WriteBw | Test::ReadBw => (tx, tx),
        Test::SendBw => (tx, rx),
        _ => (1, 1),
    }
}

const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// Completions taken per poll.
const POLL_BATCH: usize = 32;
/// How long one sleep on the completion channel lasts before the loop looks at the TCP
/// connection and its deadline again.
const EVENT_SLICE: Duration = Duration::from_millis(20);

fn check_wc(wc: &WorkCompletion, what: &'static str) -> Result<()> {
    if wc.status == WcStatus::Success {
        Ok(())
    } else {
        Err(Error::Completion {
            what,
            status: wc.status,
            vendor_err: wc.vendor_err,
            wr_id: wc.wr_id,
            qpn: wc.qp_num,
        })
    }
}

/// One side's objects. Fields drop in order: the QPs before the CQs and MRs, the MRs before
/// the buffers they cover, the device last.
#[derive(Debug)]
pub struct Side {
    qps: Vec<QueuePair>,
    mrs: Vec<MemoryRegion>,
    scq: CompletionQueue,
    rcq: CompletionQueue,
    channel: Option<CompletionChannel>,
    _pd: ProtectionDomain,
    bufs: Vec<DmaBuf>,
    ctx: Context,
    params: Params,
    half: usize,
    psns: Vec<u32>,
    peer: Vec<QpAddress>,
    rq_posted: Vec<u32>,
    out_reads: u32,
    /// Send completions polled while waiting for something else (write_lat).
    stashed_sends: u32,
    /// `--check`: the distance between slots, the SOURCE slots and the TARGET slots per QP.
    stride: usize,
    tx_slots: usize,
    target_slots: usize,
    /// The next TARGET slot a receive takes, per QP.
    rq_next_slot: Vec<usize>,
    /// Where `--check` fills and reads messages (`stride` bytes; empty without it).
    scratch: Vec<u8>,
    /// What `--check` verified so far.
    verified: Verified,
    /// Requests posted per QP in the last bw run (write_bw's `WRITTEN` lines).
    last_sent: Vec<u64>,
}

impl Side {
    /// Creates the PD, CQs, QPs (in INIT) and buffers for `params`.
    pub fn new(ctx: Context, params: Params) -> Result<Side> {
        let caps = ctx.device_attr();
        let channel = if params.events {
            Some(verbs(
                CompletionChannel::new(&ctx),
                "Couldn't create completion channel",
            )?)
        } else {
            None
        };
        let pd = verbs(ProtectionDomain::new(&ctx), "Couldn't allocate PD")?;
        let scq = verbs(
            CompletionQueue::new(&ctx, params.tx_depth * params.qps),
            "Couldn't create send CQ",
        )?;
        let recv_depth = if needs_receives(&params) {
            params.rx_depth
        } else {
            1
        };
        let rcq = verbs(
            CompletionQueue::new(&ctx, recv_depth * params.qps),
            "Couldn't create receive CQ",
        )?;
        let stride = check::stride(usize::try_from(params.max_size).unwrap_or(usize::MAX));
        let (tx_slots, target_slots) = slots(&params);
        let half = stride
            .saturating_mul(tx_slots.max(target_slots))
            .next_multiple_of(4096);
        let access = AccessFlags::LOCAL_WRITE
            | AccessFlags::REMOTE_WRITE
            | AccessFlags::REMOTE_READ
            | AccessFlags::REMOTE_ATOMIC;
        let out_reads = caps
            .max_qp_rd_atom
            .get()
            .min(caps.max_qp_init_rd_atom.get())
            .clamp(1, 255);
        let (mut qps, mut mrs, mut bufs, mut psns) = (vec![], vec![], vec![], vec![]);
        for i in 0..params.qps {
            let buf = verbs(
                ctx.alloc(2 * half),
                format!("Couldn't allocate work buf of {} bytes", 2 * half),
            )?;
            let mr = verbs(
                MemoryRegion::register(&pd, &buf, access),
                "Couldn't allocate MR",
            )?;
            let qp = verbs(
                QueuePair::new(
                    &pd,
                    &QpInitAttr {
                        send_cq: &scq,
                        recv_cq: &rcq,
                        srq: None,
                        cap: QpCap {
                            max_send_wr: params.tx_depth,
                            max_recv_wr: recv_depth,
                            max_send_sge: 1,
                            max_recv_sge: 1,
                            max_inline_data: params.inline,
                        },
                        qp_type: QpType::Rc,
                        sq_sig_all: false,
                    },
                ),
                format!("Couldn't create QP {i}"),
            )?;
            let init = QpAttr {
                qp_state: QpState::Init,
                qp_access_flags: access,
                ..QpAttr::default()
            };
            verbs(
                qp.modify(&init, QpAttrMask::RC_INIT),
                "Failed to modify QP to INIT",
            )?;
            psns.push((RandomState::new().build_hasher().finish() & 0xff_ffff) as u32);
            qps.push(qp);
            mrs.push(mr);
            bufs.push(buf);
        }
        Ok(Side {
            rq_posted: vec![0; qps.len()],
            qps,
            mrs,
            scq,
            rcq,
            channel,
            _pd: pd,
            bufs,
            ctx,
            params,
            half,
            psns,
            peer: Vec::new(),
            out_reads,
            stashed_sends: 0,
            stride,
            tx_slots,
            target_slots,
            rq_next_slot: vec![0; params.qps as usize],
            scratch: if params.check {
                vec![0; stride]
            } else {
                Vec::new()
            },
            verified: Verified::default(),
            last_sent: Vec::new(),
        })
    }

    /// The QPs.
    pub fn qp_count(&self) -> usize {
        self.qps.len()
    }

    /// The TARGET slots per QP (`WRITTEN` lines have one iteration per slot).
    pub fn target_slots(&self) -> usize {
        self.target_slots
    }

    /// What `--check` verified on this side, over every size so far.
    pub fn verified(&self) -> Verified {
        self.verified
    }

    /// `--check`, write_bw: the `WRITTEN` lines of the last run, one per QP, telling the other
    /// side which iteration each of its TARGET slots should hold.
    pub fn written_lines(&self) -> Vec<String> {
        self.last_sent
            .iter()
            .enumerate()
            .map(|(q, &sent)| wire::encode_written(q, &last_per_slot(sent, self.tx_slots)))
            .collect()
    }

    /// `--check`, write_bw: checks that each TARGET slot of QP `q` holds the iteration the
    /// other side's `WRITTEN` line says it wrote there last (`last`; 0: none).
    pub fn verify_written(&mut self, q: usize, last: &[u64], size: usize) -> Result<()> {
        let n = self.target_slots as u64;
        for (j, &k) in last.iter().enumerate() {
            if k == 0 {
                continue;
            }
            if (k - 1) % n != j as u64 {
                return Err(Error::Unexpected(format!(
                    "the other side says it wrote iteration {k} to slot {j} of QP {q}, which takes every {n}-th"
                )));
            }
            self.check_message(
                Expect {
                    q,
                    offset: j * self.stride,
                    size,
                    pattern: k,
                    iteration: k,
                    tagged: false,
                },
                false,
            )?;
        }
        Ok(())
    }

    /// `--check`: writes message `k` of QP `q` into its SOURCE slot `slot` (with write_lat's
    /// [`tag`] last if `tagged`).
    fn put_message(
        &mut self,
        q: usize,
        slot: usize,
        k: u64,
        size: usize,
        tagged: bool,
    ) -> Result<()> {
        let msg = &mut self.scratch[..size];
        check::fill(msg, q as u32, k);
        if tagged {
            msg[size - 1] = tag(k);
        }
        self.bufs[q]
            .write_at(self.half + slot * self.stride, msg)
            .map_err(|source| Error::Mem {
                what: "couldn't write the message",
                source,
            })
    }

    /// `--check`: clears SOURCE slot `slot` of QP `q` before a READ lands there, so a READ
    /// that does not land fails the check (no pattern byte is 0).
    fn clear_source(&self, q: usize, slot: usize, size: usize) -> Result<()> {
        let buf = &self.bufs[q];
        buf.region()
            .fill(
                buf.addr() + (self.half + slot * self.stride) as u64,
                size,
                0,
            )
            .map_err(|source| Error::Mem {
                what: "couldn't clear the buffer",
                source,
            })
    }

    /// Reads the message `e` describes and compares it with its pattern.
    fn read_and_verify(&mut self, e: Expect) -> Result<std::result::Result<(), Mismatch>> {
        let msg = &mut self.scratch[..e.size];
        self.bufs[e.q]
            .read_at(e.offset, msg)
            .map_err(|source| Error::Mem {
                what: "couldn't read the buffer",
                source,
            })?;
        let body = if e.tagged { e.size - 1 } else { e.size };
        if let Err(m) = check::verify(&msg[..body], e.q as u32, e.pattern) {
            return Ok(Err(m));
        }
        if e.tagged && msg[body] != tag(e.pattern) {
            return Ok(Err(Mismatch {
                offset: body,
                expected: tag(e.pattern),
                found: msg[body],
            }));
        }
        Ok(Ok(()))
    }

    /// `--check`: checks the message `e` describes and counts it; with `settle`, a mismatch
    /// is looked at again for up to [`SETTLE`] before it fails the run.
    fn check_message(&mut self, e: Expect, settle: bool) -> Result<()> {
        let mut r = self.read_and_verify(e)?;
        if settle && r.is_err() {
            let t0 = Instant::now();
            while r.is_err() && t0.elapsed() < SETTLE {
                std::hint::spin_loop();
                compiler_fence(Ordering::Acquire);
                r = self.read_and_verify(e)?;
            }
        }
        match r {
            Ok(()) => {
                self.verified.add(e.size);
                Ok(())
            }
            Err(m) => Err(Error::Payload {
                test: self.params.test.name(),
                iteration: e.iteration,
                qp: e.q,
                size: e.size,
                offset: m.offset,
                expected: m.expected,
                found: m.found,
            }),
        }
    }

    /// This side's QPs, as the other side needs them.
    pub fn addresses(&self) -> Vec<QpAddress> {
        (0..self.qps.len())
            .map(|i| QpAddress {
                qpn: self.qps[i].qp_num(),
                psn: self.psns[i],
                rkey: self.mrs[i].rkey(),
                vaddr: self.bufs[i].addr(),
                gid: self.ctx.gid(),
            })
            .collect()
    }

    /// Outstanding READs/atomics per QP.
    pub fn out_reads(&self) -> u32 {
        self.out_reads
    }

    /// INIT -> RTR -> RTS towards the other side's QPs, with perftest's attributes.
    pub fn connect(&mut self, peer: &[QpAddress]) -> Result<()> {
        if peer.len() != self.qps.len() {
            return Err(Error::Unexpected(format!(
                "the other side has {} QPs, this side {}",
                peer.len(),
                self.qps.len()
            )));
        }
        let mtu = mtu_from_bytes(self.params.mtu);
        let rd = self.out_reads as u8;
        for (i, (qp, dest)) in self.qps.iter().zip(peer).enumerate() {
            let rtr = QpAttr {
                qp_state: QpState::Rtr,
                path_mtu: mtu,
                dest_qp_num: dest.qpn,
                rq_psn: dest.psn,
                max_dest_rd_atomic: rd,
                min_rnr_timer: 12,
                ah_attr: AddressHandle::attr_for(dest.gid),
                ..QpAttr::default()
            };
            verbs(
                qp.modify(&rtr, QpAttrMask::RC_RTR),
                "Failed to modify QP to RTR",
            )?;
            let rts = QpAttr {
                qp_state: QpState::Rts,
                sq_psn: self.psns[i],
                timeout: 14,
                retry_cnt: 7,
                rnr_retry: 7,
                max_rd_atomic: rd,
                ..rtr
            };
            verbs(
                qp.modify(&rts, QpAttrMask::RC_RTS),
                "Failed to modify QP to RTS",
            )?;
        }
        self.peer = peer.to_vec();
        Ok(())
    }

    /// Gets ready for a run of `size`-byte messages: the polled byte cleared, every QP's
    /// receives posted.
    pub fn prepare(&mut self, size: usize) -> Result<()> {
        if size > self.half {
            return Err(Error::Limit(format!(
                "message size {size} exceeds the buffers ({} bytes)",
                self.half
            )));
        }
        if self.params.test == Test::WriteLat {
            for buf in &self.bufs {
                buf.write_at(0, &vec![0u8; size])
                    .map_err(|source| Error::Mem {
                        what: "couldn't clear the buffer",
                        source,
                    })?;
            }
        }
        if self.params.check {
            for q in 0..self.qps.len() {
                if self.params.test.is_read() {
                    // The other side READs TARGET slot j: it holds the pattern of iteration
                    // j + 1, and the reader clears its destination before each READ.
                    for j in 0..self.target_slots {
                        let msg = &mut self.scratch[..size];
                        check::fill(msg, q as u32, j as u64 + 1);
                        self.bufs[q]
                            .write_at(j * self.stride, msg)
                            .map_err(|source| Error::Mem {
                                what: "couldn't write the buffer",
                                source,
                            })?;
                    }
                } else {
                    // A message that never lands fails its check (no pattern byte is 0),
                    // rather than passing on what an earlier size left.
                    let buf = &self.bufs[q];
                    buf.region()
                        .fill(buf.addr(), self.target_slots * self.stride, 0)
                        .map_err(|source| Error::Mem {
                            what: "couldn't clear the buffer",
                            source,
                        })?;
                }
            }
        }
        if needs_receives(&self.params) {
            for q in 0..self.qps.len() {
                let n = self.params.rx_depth - self.rq_posted[q];
                self.post_receives(q, n)?;
            }
        }
        self.stashed_sends = 0;
        Ok(())
    }

    /// Posts `n` receives on QP `q`, each covering its whole TARGET half, or with `--check`
    /// (send_bw) each the next of its TARGET slots. A receive's `wr_id` is `q | slot << 32`.
    fn post_receives(&mut self, q: usize, n: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (addr, lkey) = (self.bufs[q].addr(), self.mrs[q].lkey());
        let slotted = self.target_slots > 1;
        let len = if slotted { self.stride } else { self.half } as u32;
        // Fixed batches, built on the stack as often as needed: reposting must not allocate.
        const BATCH: usize = 64;
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(BATCH);
            let mut sges = [[Sge::default()]; BATCH];
            let mut ids = [0u64; BATCH];
            for i in 0..k {
                let slot = self.rq_next_slot[q];
                sges[i] = [Sge::new(addr + (slot * self.stride) as u64, len, lkey)];
                ids[i] = q as u64 | (slot as u64) << 32;
                if slotted {
                    self.rq_next_slot[q] = (slot + 1) % self.target_slots;
                }
            }
            let mut wrs = [RecvWr {
                wr_id: 0,
                sg_list: &[],
            }; BATCH];
            for i in 0..k {
                wrs[i] = RecvWr {
                    wr_id: ids[i],
                    sg_list: &sges[i],
                };
            }
            // SAFETY: each SGE is in QP q's TARGET half of `self.bufs[q]`, which outlives the
            // QP (the QPs are dropped first). Without --check every receive names the same
            // bytes, as perftest's do: this side never reads or writes TARGET while receives
            // are posted except to clear it before a run (`prepare`), when the other side is
            // not sending, and with --check to read a message of a ping-pong, which the other
            // side does not follow before this side answers. With --check, send_bw's receives
            // take the slots in turn, at most one receive per slot (the RX depth is the
            // slots), and this side reads a slot only after its receive completed and before
            // it posts it again.
            let posted = unsafe { self.qps[q].post_recv(&wrs[..k]) };
            verbs(posted, "Couldn't post receive")?;
            left -= k;
        }
        self.rq_posted[q] += n;
        Ok(())
    }

    fn post(&self, q: usize, wrs: &[SendWr<'_>], what: &'static str) -> Result<()> {
        // SAFETY: for every caller, each SGE lies in QP q's SOURCE half of `self.bufs[q]`,
        // which outlives the QP (the QPs are dropped first). This side writes SOURCE only
        // in write_lat, its last byte, after the previous request's completion has been
        // polled (with INLINE the bytes are copied during the call anyway); it never reads
        // SOURCE (READ and atomic results). With --check it writes (or clears) a request's
        // slot before posting it, and reads a READ's slot, only once the completion of the
        // slot's previous request has been polled. So the device has the bytes to itself
        // until the completions are polled.
        let posted = unsafe { self.qps[q].post_send(wrs) };
        verbs(posted, what)
    }

    /// One run of a latency test. The client returns the statistics.
    pub fn run_lat(
        &mut self,
        ctl: &mut Control,
        size: usize,
        iters: u64,
        duration: Option<Duration>,
        client: bool,
    ) -> Result<Option<LatStats>> {
        let test = self.params.test;
        match test {
            Test::WriteLat | Test::SendLat => self.ping_pong(ctl, size, iters, duration, client),
            Test::ReadLat | Test::AtomicLat if client => {
                self.one_way_lat(ctl, size, iters, duration).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// write_lat and send_lat: the client sends, the server answers each message; a sample
    /// is half the round trip.
    fn ping_pong(
        &mut self,
        ctl: &mut Control,
        size: usize,
        iters: u64,
        duration: Option<Duration>,
        client: bool,
    ) -> Result<Option<LatStats>> {
        let test = self.params.test;
        // write_lat polls the last byte of its TARGET, as perftest does; with events it uses
        // WRITE WITH IMMEDIATE so that the receiver has a completion to sleep on.
        let by_memory = test == Test::WriteLat && !self.params.events;
        // --check: each side sends message k with its pattern (write_lat's tag last when
        // polled) and checks the one it receives in full, at TARGET's start.
        let check = self.params.check;
        let sge = [Sge::new(
            self.bufs[0].addr() + self.half as u64,
            size as u32,
            self.mrs[0].lkey(),
        )];
        let mut flags = SendFlags::SIGNALED;
        if size <= self.params.inline as usize {
            flags |= SendFlags::INLINE;
        }
        let peer = self.peer[0];
        let mut wr = match test {
            Test::SendLat => SendWr::send(0, &sge),
            _ if by_memory => SendWr::rdma_write(0, &sge, peer.vaddr, peer.rkey),
            _ => SendWr::rdma_write(0, &sge, peer.vaddr, peer.rkey).with_imm(0),
        }
        .with_flags(flags);
        // The server keeps no samples.
        let mut rec = LatRecorder::new(if client {
            duration.is_none().then_some(iters)
        } else {
            Some(0)
        });
        let end = duration.map(|d| Instant::now() + d);
        let mut sent_unpolled = false;
        let mut k = 0u64;
        loop {
            k += 1;
            let more = match (client, end) {
                (true, Some(end)) => Instant::now() < end,
                (_, None) => k <= iters,
                (false, Some(_)) => true,
            };
            if !more {
                break;
            }
            if !client && !self.arrival(ctl, k, size, by_memory, false)? {
                // The client stopped (duration mode) after k - 1.
                break;
            }
            if check && !client {
                // Before answering: the answer lets the client write the next message here.
                self.check_message(ping_pong_message(k, size, by_memory), by_memory)?;
            }
            if sent_unpolled {
                self.wait_send(ctl, k - 1)?;
            }
            if check {
                self.put_message(0, 0, k, size, by_memory)?;
            } else if by_memory {
                self.bufs[0]
                    .write_at(self.half + size - 1, &[tag(k)])
                    .map_err(|source| Error::Mem {
                        what: "couldn't write the message",
                        source,
                    })?;
            }
            wr.wr_id = k;
            wr.imm_data = k as u32;
            let t0 = Instant::now();
            self.post(0, &[wr], "Couldn't post send")?;
            sent_unpolled = true;
            if client {
                self.arrival(ctl, k, size, by_memory, true)?;
                let now = Instant::now();
                rec.record(now.duration_since(t0).as_nanos() as u64);
                if check {
                    self.check_message(ping_pong_message(k, size, by_memory), by_memory)?;
                }
                ctl.tick(now)?;
            }
        }
        if sent_unpolled {
            self.wait_send(ctl, k)?;
        }
        Ok(client.then(|| rec.stats(2.0)))
    }

    /// Waits for message `k` from the other side: its last byte in TARGET (`by_memory`) or a
    /// receive completion. `false` if the client said it stopped before `k` (server only).
    fn arrival(
        &mut self,
        ctl: &mut Control,
        k: u64,
        size: usize,
        by_memory: bool,
        client: bool,
    ) -> Result<bool> {
        let mut waiter = Waiter::new();
        let what = || format!("waiting for message {k} from the other side");
        if by_memory {
            let mut byte = [0u8];
            loop {
                self.bufs[0]
                    .read_at(size - 1, &mut byte)
                    .map_err(|source| Error::Mem {
                        what: "couldn't read the buffer",
                        source,
                    })?;
                // The device writes these bytes from another process: make the compiler load
                // them again on every round.
                compiler_fence(Ordering::Acquire);
                if byte[0] == tag(k) {
                    return Ok(true);
                }
                if !client && ctl.peer_done.is_some_and(|n| k > n) {
                    return Ok(false);
                }
                if waiter.rounds % 256 == 255 {
                    // A failed WRITE never lands: look for its error completion.
                    self.stash_sends()?;
                }
                waiter.idle(self, &[], ctl, &what)?;
            }
        }
        let mut wc = [WorkCompletion::default()];
        loop {
            if verbs(self.rcq.poll(&mut wc), "poll CQ failed")? == 1 {
                let wc = wc[0];
                check_wc(&wc, "receive")?;
                let expected = if self.params.test == Test::SendLat {
                    WcOpcode::Recv
                } else {
                    WcOpcode::RecvRdmaWithImm
                };
                if wc.opcode != expected
                    || (wc.opcode == WcOpcode::Recv && wc.byte_len as usize != size)
                {
                    return Err(Error::Unexpected(format!(
                        "{:?} of {} bytes where a {expected:?} of {size} was due",
                        wc.opcode, wc.byte_len
                    )));
                }
                if let Some(imm) = wc.imm_data.filter(|&i| i != k as u32) {
                    return Err(Error::Unexpected(format!(
                        "immediate {imm} where {} was due",
                        k as u32
                    )));
                }
                self.rq_posted[0] -= 1;
                self.post_receives(0, 1)?;
                return Ok(true);
            }
            if !client && ctl.peer_done.is_some_and(|n| k > n) {
                return Ok(false);
            }
            let rcq = self.rcq.clone();
            waiter.idle(self, &[&rcq], ctl, &what)?;
        }
    }

    /// Polls the send CQ once, keeping what it finds for [`Side::wait_send`].
    fn stash_sends(&mut self) -> Result<()> {
        let mut wc = [WorkCompletion::default()];
        if verbs(self.scq.poll(&mut wc), "poll CQ failed")? == 1 {
            check_wc(&wc[0], "send")?;
            self.stashed_sends += 1;
        }
        Ok(())
    }

    /// Waits for the completion of send `k` (one outstanding).
    fn wait_send(&mut self, ctl: &mut Control, k: u64) -> Result<()> {
        if self.stashed_sends > 0 {
            self.stashed_sends -= 1;
            return Ok(());
        }
        let mut waiter = Waiter::new();
        let mut wc = [WorkCompletion::default()];
        loop {
            if verbs(self.scq.poll(&mut wc), "poll CQ failed")? == 1 {
                return check_wc(&wc[0], op_name(self.params.test));
            }
            let scq = self.scq.clone();
            waiter.idle(self, &[&scq], ctl, &|| {
                format!("waiting for the completion of request {k}")
            })?;
        }
    }

    /// read_lat and atomic_lat: a sample is one whole operation.
    fn one_way_lat(
        &mut self,
        ctl: &mut Control,
        size: usize,
        iters: u64,
        duration: Option<Duration>,
    ) -> Result<LatStats> {
        let sge = [Sge::new(
            self.bufs[0].addr() + self.half as u64,
            size as u32,
            self.mrs[0].lkey(),
        )];
        let peer = self.peer[0];
        let mut wr = if self.params.test == Test::AtomicLat {
            SendWr::fetch_add(0, &sge, peer.vaddr, peer.rkey, 1)
        } else {
            SendWr::rdma_read(0, &sge, peer.vaddr, peer.rkey)
        };
        let mut rec = LatRecorder::new(duration.is_none().then_some(iters));
        let end = duration.map(|d| Instant::now() + d);
        let check = self.params.check && self.params.test == Test::ReadLat;
        let mut k = 0u64;
        loop {
            k += 1;
            let more = match end {
                Some(end) => Instant::now() < end,
                None => k <= iters,
            };
            if !more {
                break;
            }
            wr.wr_id = k;
            if check {
                self.clear_source(0, 0, size)?;
            }
            let t0 = Instant::now();
            self.post(0, &[wr], "Couldn't post send")?;
            self.wait_send(ctl, k)?;
            let now = Instant::now();
            rec.record(now.duration_since(t0).as_nanos() as u64);
            if check {
                // The other side's TARGET holds iteration 1's pattern (`prepare`).
                self.check_message(
                    Expect {
                        q: 0,
                        offset: self.half,
                        size,
                        pattern: 1,
                        iteration: k,
                        tagged: false,
                    },
                    false,
                )?;
            }
            ctl.tick(now)?;
        }
        Ok(rec.stats(1.0))
    }

    /// One run of a bw test: this side streams requests (`sending`), takes SENDs from the
    /// other side (`receiving`), or both (`-b`). Returns what it sent, if it sent.
    pub fn run_bw(
        &mut self,
        ctl: &mut Control,
        size: usize,
        iters: u64,
        duration: Option<Duration>,
        sending: bool,
        receiving: bool,
    ) -> Result<Option<BwStats>> {
        let p = self.params;
        let nq = self.qps.len();
        let list = p.post_list as usize;
        let (tx_depth, cq_mod, l) = (
            u64::from(p.tx_depth),
            u64::from(p.cq_mod),
            u64::from(p.post_list),
        );
        // Work requests, built before the clock starts; the loop only sets wr_id and flags
        // (and with --check the slot: its SGE and remote address).
        let check = p.check;
        let stride = self.stride;
        let sges: Vec<Vec<[Sge; 1]>> = (0..nq)
            .map(|q| {
                (0..self.tx_slots)
                    .map(|slot| {
                        [Sge::new(
                            self.bufs[q].addr() + (self.half + slot * stride) as u64,
                            size as u32,
                            self.mrs[q].lkey(),
                        )]
                    })
                    .collect()
            })
            .collect();
        let remote: Vec<u64> = (0..nq)
            .map(|q| self.peer.get(q).map_or(0, |a| a.vaddr))
            .collect();
        let tx_slots = self.tx_slots as u64;
        // Messages received per QP (send_bw): the iteration of the next one is one more.
        let mut recv_seq = vec![0u64; nq];
        let mut base = SendFlags::empty();
        if p.test != Test::ReadBw && size <= p.inline as usize {
            base |= SendFlags::INLINE;
        }
        let mut wrs: Vec<Vec<SendWr<'_>>> = (0..nq)
            .map(|q| {
                let (addr, rkey) = self.peer.get(q).map_or((0, 0), |a| (a.vaddr, a.rkey));
                let wr = match p.test {
                    Test::SendBw => SendWr::send(0, &sges[q][0]),
                    Test::ReadBw => SendWr::rdma_read(0, &sges[q][0], addr, rkey),
                    _ => SendWr::rdma_write(0, &sges[q][0], addr, rkey),
                };
                vec![wr.with_flags(base); list]
            })
            .collect();
        let mut scnt = vec![0u64; nq];
        let mut ccnt = vec![0u64; nq];
        let mut target = vec![
            if sending && duration.is_none() {
                iters
            } else {
                0
            };
            nq
        ];
        if sending && duration.is_some() {
            target.fill(u64::MAX);
        }
        let total = iters.saturating_mul(nq as u64);
        let mut rec = if duration.is_none() && sending {
            BwRecorder::new(
                nq * (iters.div_ceil(l) as usize + 1),
                nq * ((iters / cq_mod) as usize + 2),
            )
        } else {
            BwRecorder::new(0, 0)
        };
        let mut expected_recv = (receiving && duration.is_none()).then_some(total);
        let mut received = 0u64;
        let rx_refill = (p.rx_depth / 8).max(1);
        let mut wcs = [WorkCompletion::default(); POLL_BATCH];
        let (mut posted, mut completed) = (0u64, 0u64);
        let mut sent_reported = !sending;
        let mut stopping = duration.is_none();
        let (scq, rcq) = (self.scq.clone(), self.rcq.clone());
        let mut waiter = Waiter::new();
        let start = Instant::now();
        let end = duration.map(|d| start + d);
        loop {
            let mut progress = false;
            if sending {
                for q in 0..nq {
                    while scnt[q] + l <= target[q] && scnt[q] - ccnt[q] + l <= tx_depth {
                        for (i, wr) in wrs[q].iter_mut().enumerate() {
                            let seq = scnt[q] + i as u64 + 1;
                            wr.wr_id = ((q as u64) << SEQ_BITS) | seq;
                            wr.flags = if seq % cq_mod == 0 || seq == target[q] {
                                base | SendFlags::SIGNALED
                            } else {
                                base
                            };
                            if check {
                                // The slot's previous request (seq - tx_slots) has completed:
                                // no more than tx_depth = tx_slots are in flight.
                                let slot = ((seq - 1) % tx_slots) as usize;
                                wr.sg_list = &sges[q][slot];
                                wr.remote_addr = remote[q] + (slot * stride) as u64;
                                if p.test == Test::ReadBw {
                                    self.clear_source(q, slot, size)?;
                                } else {
                                    self.put_message(q, slot, seq, size, false)?;
                                }
                            }
                        }
                        let ns = start.elapsed().as_nanos() as u64;
                        self.post(q, &wrs[q], "Couldn't post send")?;
                        rec.post(posted, ns);
                        scnt[q] += l;
                        posted += l;
                    }
                }
                let n = verbs(scq.poll(&mut wcs), "poll CQ failed")?;
                if n > 0 {
                    progress = true;
                    let now = Instant::now();
                    for wc in &wcs[..n] {
                        check_wc(wc, op_name(p.test))?;
                        let (q, seq) = ((wc.wr_id >> SEQ_BITS) as usize, wc.wr_id & SEQ_MASK);
                        if q >= nq || seq <= ccnt[q] || seq > scnt[q] {
                            return Err(Error::Unexpected(format!(
                                "completion for request {seq} of QP {q} out of order"
                            )));
                        }
                        if check && p.test == Test::ReadBw {
                            // Every READ up to this one has landed in its slot; the other
                            // side's TARGET slot j holds iteration j + 1's pattern.
                            for k in ccnt[q] + 1..=seq {
                                let slot = ((k - 1) % tx_slots) as usize;
                                self.check_message(
                                    Expect {
                                        q,
                                        offset: self.half + slot * stride,
                                        size,
                                        pattern: slot as u64 + 1,
                                        iteration: k,
                                        tagged: false,
                                    },
                                    false,
                                )?;
                            }
                        }
                        completed += seq - ccnt[q];
                        ccnt[q] = seq;
                    }
                    rec.complete(completed, now.duration_since(start).as_nanos() as u64);
                    ctl.tick(now)?;
                }
                if !stopping && end.is_some_and(|e| Instant::now() >= e) {
                    // Stop posting; a last signalled request reports the unsignalled tail.
                    stopping = true;
                    for q in 0..nq {
                        target[q] = if scnt[q] % cq_mod == 0 {
                            scnt[q]
                        } else {
                            scnt[q] + l
                        };
                    }
                }
                if !sent_reported && stopping && (0..nq).all(|q| ccnt[q] == target[q]) {
                    sent_reported = true;
                    if p.test == Test::SendBw {
                        ctl.send(&format!("SENT {posted}"))?;
                    }
                }
            }
            if receiving {
                let n = verbs(rcq.poll(&mut wcs), "poll CQ failed")?;
                if n > 0 {
                    progress = true;
                    for wc in &wcs[..n] {
                        check_wc(wc, "receive")?;
                        if wc.byte_len as usize != size {
                            return Err(Error::Unexpected(format!(
                                "a receive of {} bytes where {size} were sent",
                                wc.byte_len
                            )));
                        }
                        let (q, slot) = ((wc.wr_id & 0xffff_ffff) as usize, wc.wr_id >> 32);
                        if q >= nq {
                            return Err(Error::Unexpected(format!(
                                "a receive completion with wr_id {:#x}",
                                wc.wr_id
                            )));
                        }
                        self.rq_posted[q] -= 1;
                        recv_seq[q] += 1;
                        if check {
                            self.check_message(
                                Expect {
                                    q,
                                    offset: slot as usize * stride,
                                    size,
                                    pattern: recv_seq[q],
                                    iteration: recv_seq[q],
                                    tagged: false,
                                },
                                false,
                            )?;
                        }
                    }
                    received += n as u64;
                    for q in 0..nq {
                        let missing = p.rx_depth - self.rq_posted[q];
                        if missing >= rx_refill {
                            self.post_receives(q, missing)?;
                        }
                    }
                }
                if expected_recv.is_none() {
                    expected_recv = ctl.peer_sent;
                }
            }
            let recv_done = !receiving || expected_recv.is_some_and(|n| received >= n);
            if sent_reported && recv_done {
                break;
            }
            if progress {
                waiter.progress();
            } else {
                let cqs: &[&CompletionQueue] = match (sending, receiving) {
                    (true, true) => &[&scq, &rcq],
                    (true, false) => &[&scq],
                    _ => &[&rcq],
                };
                waiter.idle(self, cqs, ctl, &|| {
                    format!(
                        "{completed} of {posted} requests completed, {received} messages received"
                    )
                })?;
            }
        }
        if let Some(n) = expected_recv.filter(|&n| received != n) {
            return Err(Error::Unexpected(format!(
                "{received} messages received, {n} sent"
            )));
        }
        if !sending {
            return Ok(None);
        }
        self.last_sent = scnt;
        let shown = if duration.is_some() { completed } else { iters };
        Ok(Some(rec.stats(size, shown)))
    }
}

/// The iteration last written to each of `slots` slots when requests 1..=`sent` took them in
/// turn (request k: slot `(k - 1) % slots`); 0 for a slot never written.
fn last_per_slot(sent: u64, slots: usize) -> Vec<u64> {
    let n = slots as u64;
    (0..n)
        .map(|j| {
            if sent > j {
                j + 1 + (sent - 1 - j) / n * n
            } else {
                0
            }
        })
        .collect()
}

/// The ping-pong's message `k`, at the start of TARGET; polled (`tagged`), it ends with [`tag`].
fn ping_pong_message(k: u64, size: usize, tagged: bool) -> Expect {
    Expect {
        q: 0,
        offset: 0,
        size,
        pattern: k,
        iteration: k,
        tagged,
    }
}

/// Whether the receiver needs posted receives: SEND tests, and write_lat's event mode
/// (WRITE WITH IMMEDIATE consumes one).
fn needs_receives(p: &Params) -> bool {
    p.test.is_send() || (p.test == Test::WriteLat && p.events)
}

fn op_name(test: Test) -> &'static str {
    match test {
        Test::WriteBw | Test::WriteLat => "RDMA_WRITE",
        Test::ReadBw | Test::ReadLat => "RDMA_READ",
        Test::SendBw | Test::SendLat => "SEND",
        Test::AtomicLat => "FETCH_AND_ADD",
    }
}

/// Waiting between polls: spins, then yields the CPU now and then ([`vrdma::pacing`]); with `-e`, arms the CQs, polls once more
/// (a completion may have come before the arming) and then sleeps on the channel. Every
/// so often it reads the TCP connection (a failure at the other end stops this one) and
/// gives up after [`WAIT`] without progress.
#[derive(Debug)]
struct Waiter {
    since: Instant,
    last_check: Instant,
    rounds: u32,
    armed: bool,
}

impl Waiter {
    fn new() -> Waiter {
        let now = Instant::now();
        Waiter {
            since: now,
            last_check: now,
            rounds: 0,
            armed: false,
        }
    }

    fn progress(&mut self) {
        self.since = Instant::now();
        self.rounds = 0;
        self.armed = false;
    }

    fn idle(
        &mut self,
        side: &Side,
        cqs: &[&CompletionQueue],
        ctl: &mut Control,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        self.rounds = self.rounds.wrapping_add(1);
        match (&side.channel, cqs.is_empty()) {
            (Some(channel), false) => {
                if !self.armed {
                    for cq in cqs {
                        verbs(cq.req_notify(false), "Couldn't request CQ notification")?;
                    }
                    // The caller polls again before this sleeps.
                    self.armed = true;
                    return Ok(());
                }
                self.armed = false;
                verbs(
                    channel.get_cq_event(Some(EVENT_SLICE)),
                    "Failed to get cq_event",
                )?;
            }
            // As the libibverbs shim paces perftest's polls, so the bench compares like with
            // like.
            _ if !pacing::yields_after(self.rounds.wrapping_sub(1)) => {
                std::hint::spin_loop();
                return Ok(());
            }
            _ => std::thread::yield_now(),
        }
        // Only after a sleep on the channel or a yield, both far dearer than reading the clock.
        let now = Instant::now();
        if now.duration_since(self.last_check) >= Duration::from_millis(1) {
            self.last_check = now;
            ctl.check()?;
        }
        if now.duration_since(self.since) > WAIT {
            return Err(Error::Stalled { what: what() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_s_last_iteration_follows_the_turns() {
        assert_eq!(last_per_slot(0, 3), vec![0, 0, 0]);
        assert_eq!(last_per_slot(2, 3), vec![1, 2, 0]);
        assert_eq!(last_per_slot(3, 3), vec![1, 2, 3]);
        assert_eq!(last_per_slot(10, 4), vec![9, 10, 7, 8]);
        assert_eq!(last_per_slot(7, 1), vec![7]);
        for (sent, slots) in [(10u64, 4usize), (128, 128), (129, 128), (5000, 64)] {
            for (j, &k) in last_per_slot(sent, slots).iter().enumerate() {
                assert!(k <= sent && k + slots as u64 > sent, "{sent} {slots}: {k}");
                assert_eq!((k - 1) % slots as u64, j as u64);
            }
        }
    }

    #[test]
    fn a_payload_mismatch_names_the_test_iteration_offset_and_both_bytes() {
        let e = Error::Payload {
            test: "write_lat",
            iteration: 17,
            qp: 0,
            size: 64,
            offset: 5,
            expected: 0x3b,
            found: 0,
        };
        assert_eq!(
            e.to_string(),
            "payload check failed: write_lat iteration 17 (QP 0), byte 5 of 64: expected 0x3b, found 0x00"
        );
    }
}
