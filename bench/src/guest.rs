//! In-process guests for the fairness, isolation, registering, many-VM and scale scenarios:
//! each is a thread of this process that opens a VM's device through the `vrdma` library
//! (virtio-user, as the tests and vrdma-perf do) and keeps RDMA WRITEs outstanding, or
//! registers memory over and over.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vrdma::mem::DmaBuf;
use vrdma::transport::{Options, Transport, VirtioUser};
use vrdma::{
    AccessFlags, AddressHandle, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpAttr,
    QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, RecvWr, SendFlags, SendWr, Sge,
    WcStatus, WorkCompletion,
};
use vrdma_proto::cmd::{self, Opcode, RespHeader, Status};
use vrdma_proto::mr;
use zerocopy::IntoBytes;

/// Why an in-process guest failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A verb failed.
    #[error("{what}: {}", vrdma::error_chain(.source))]
    Verb {
        /// What the guest was doing.
        what: String,
        /// The library's error.
        source: vrdma::Error,
    },
    /// A work request completed with an error.
    #[error(
        "an RDMA WRITE completed with {status:?} (vendor_err {vendor_err}); see the daemon's log"
    )]
    Completion {
        /// Its status.
        status: WcStatus,
        /// vrdma's detail.
        vendor_err: u32,
    },
    /// Nothing completed for a long time.
    #[error(
        "{outstanding} RDMA WRITEs did not complete within 10 s; the daemon may be stuck or overloaded"
    )]
    Stalled {
        /// Writes in flight.
        outstanding: usize,
    },
    /// The traffic never started.
    #[error("traffic of {who} never started within 10 s")]
    NoTraffic {
        /// Which guest.
        who: String,
    },
    /// A guest thread panicked.
    #[error("a guest thread panicked")]
    Panicked,
    /// Interrupted by a signal.
    #[error("interrupted")]
    Interrupted,
    /// Shared memory could not be had.
    #[error("{what}: {source}")]
    Memory {
        /// What the guest was doing.
        what: String,
        /// Why.
        source: vrdma::mem::MemError,
    },
    /// A raw control command could not be sent or answered.
    #[error("{what}: {source}")]
    Transport {
        /// What the guest was doing.
        what: String,
        /// The transport's error.
        source: vrdma::transport::VirtioUserError,
    },
    /// The device refused a raw control command.
    #[error("{what}: the device answered {status:?}")]
    Refused {
        /// What the guest was doing.
        what: String,
        /// Its answer.
        status: vrdma_proto::cmd::Status,
    },
}

fn verb(what: impl Into<String>) -> impl FnOnce(vrdma::Error) -> Error {
    let what = what.into();
    move |source| Error::Verb { what, source }
}

/// Opens VM `socket`'s device with room for large buffers.
pub fn open(socket: &Path) -> Result<Context, Error> {
    Context::open(socket).map_err(verb(format!("opening {}", socket.display())))
}

/// Where a [`Side`]'s receives complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receives {
    /// On the CQ its sends complete on.
    OnSendCq,
    /// On a CQ of their own (`Side::recv_cq`), as perftest and vrdma-perf set up their QPs:
    /// a thread that sleeps on the receive CQ's channel is then not woken by its own send
    /// completions.
    OnOwnCq,
}

/// One VM's side of the traffic: QPs on one CQ (or, for event mode, one for sends and one for
/// receives), and one registered buffer. Fields drop in declaration order: the QPs before the
/// CQs and the MR, the MR before its buffer.
#[derive(Debug)]
pub struct Side {
    /// The QPs.
    pub qps: Vec<QueuePair>,
    /// Their send CQ, and their receive CQ unless `recv_cq` is set.
    pub cq: CompletionQueue,
    /// Their receive CQ, when it is not `cq` ([`Receives::OnOwnCq`]).
    pub recv_cq: Option<CompletionQueue>,
    /// The buffer's registration.
    pub mr: MemoryRegion,
    /// Source of this side's writes (first half) and target of the peer's (second half).
    pub buf: DmaBuf,
    /// Send-queue depth of each QP.
    pub sq_depth: u32,
    _pd: ProtectionDomain,
    /// The device.
    pub ctx: Context,
}

impl Side {
    /// `nqp` RC QPs of send depth `sq_depth` on one CQ of `cq_depth`, and a registered buffer
    /// for `msg`-byte messages: the first half is what this side sends, the second half is
    /// where the peer writes, so no byte is both read and written by the device.
    pub fn new(
        ctx: &Context,
        nqp: usize,
        sq_depth: u32,
        cq_depth: u32,
        msg: u32,
    ) -> Result<Side, Error> {
        Side::with_receives(ctx, nqp, sq_depth, cq_depth, msg, Receives::OnSendCq)
    }

    /// As [`Side::new`], the receives completing where `receives` says.
    pub fn with_receives(
        ctx: &Context,
        nqp: usize,
        sq_depth: u32,
        cq_depth: u32,
        msg: u32,
        receives: Receives,
    ) -> Result<Side, Error> {
        let buf_len = 2 * (msg as usize).max(4096);
        let pd = ProtectionDomain::new(ctx).map_err(verb("ibv_alloc_pd"))?;
        let cq = CompletionQueue::new(ctx, cq_depth).map_err(verb("ibv_create_cq"))?;
        let recv_cq = if receives == Receives::OnOwnCq {
            Some(CompletionQueue::new(ctx, cq_depth).map_err(verb("ibv_create_cq (receives)"))?)
        } else {
            None
        };
        let cap = QpCap {
            max_send_wr: sq_depth,
            max_recv_wr: 1,
            ..QpCap::default()
        };
        let mut qps = Vec::with_capacity(nqp);
        for i in 0..nqp {
            let qp = QueuePair::new(
                &pd,
                &QpInitAttr {
                    send_cq: &cq,
                    recv_cq: recv_cq.as_ref().unwrap_or(&cq),
                    srq: None,
                    cap,
                    qp_type: QpType::Rc,
                    sq_sig_all: false,
                },
            )
            .map_err(verb(format!("ibv_create_qp (QP {i} of {nqp})")))?;
            qps.push(qp);
        }
        let buf = ctx.alloc(buf_len).map_err(verb("allocating the buffer"))?;
        let mr = MemoryRegion::register(&pd, &buf, access()).map_err(verb("ibv_reg_mr"))?;
        let sq_depth = qps.first().map_or(sq_depth, |q| q.cap().max_send_wr);
        Ok(Side {
            qps,
            cq,
            recv_cq,
            mr,
            buf,
            sq_depth,
            _pd: pd,
            ctx: ctx.clone(),
        })
    }

    /// Where the peer writes: this side's buffer.
    pub fn target(&self) -> Target {
        Target {
            addr: self.buf.addr() + self.buf.len() as u64 / 2,
            rkey: self.mr.rkey(),
        }
    }
}

/// All rights, as perftest registers its buffers.
fn access() -> AccessFlags {
    AccessFlags::LOCAL_WRITE
        | AccessFlags::REMOTE_WRITE
        | AccessFlags::REMOTE_READ
        | AccessFlags::REMOTE_ATOMIC
}

/// Connects QP i of `a` with QP i of `b`, for every i.
pub fn connect(a: &Side, b: &Side) -> Result<(), Error> {
    connect_on(a, b, 0)
}

/// As [`connect`], by paths of service level `sl` (perftest's `-S`).
pub fn connect_on(a: &Side, b: &Side, sl: u8) -> Result<(), Error> {
    for (qa, qb) in a.qps.iter().zip(&b.qps) {
        connect_qp(qa, b.ctx.gid(), qb.qp_num(), sl)?;
        connect_qp(qb, a.ctx.gid(), qa.qp_num(), sl)?;
    }
    Ok(())
}

/// RESET -> INIT -> RTR -> RTS towards `remote_qpn` at `remote_gid` by a path of service level
/// `sl`, as perftest does.
fn connect_qp(
    qp: &QueuePair,
    remote_gid: vrdma_proto::Gid,
    remote_qpn: u32,
    sl: u8,
) -> Result<(), Error> {
    let init = QpAttr {
        qp_state: QpState::Init,
        qp_access_flags: access(),
        ..QpAttr::default()
    };
    qp.modify(&init, QpAttrMask::RC_INIT)
        .map_err(verb("ibv_modify_qp to INIT"))?;
    let rtr = QpAttr {
        qp_state: QpState::Rtr,
        dest_qp_num: remote_qpn,
        max_dest_rd_atomic: 1,
        min_rnr_timer: 1,
        ah_attr: vrdma_proto::qp::AhAttr {
            sl,
            ..AddressHandle::attr_for(remote_gid)
        },
        ..QpAttr::default()
    };
    qp.modify(&rtr, QpAttrMask::RC_RTR)
        .map_err(verb("ibv_modify_qp to RTR"))?;
    let rts = QpAttr {
        qp_state: QpState::Rts,
        ..QpAttr::default()
    };
    qp.modify(&rts, QpAttrMask::RC_RTS)
        .map_err(verb("ibv_modify_qp to RTS"))?;
    Ok(())
}

/// The remote buffer a side writes into.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its address.
    pub addr: u64,
    /// Its rkey.
    pub rkey: u32,
}

/// What a guest does while it has nothing to poll.
#[derive(Debug, Clone, Copy)]
pub enum Idle {
    /// Yield the CPU and poll again: for message-rate runs, where sleeping would be the limit.
    Yield,
    /// Sleep: for bulk runs, leaving the cores to the daemon on a small machine.
    Sleep(Duration),
}

/// How a guest loads the fabric.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Bytes per RDMA WRITE.
    pub msg: u32,
    /// Writes kept outstanding over all QPs.
    pub depth: u32,
    /// Writes posted per doorbell.
    pub batch: u32,
    /// What to do when the CQ is empty.
    pub idle: Idle,
}

/// Keeps `load.depth` signalled RDMA WRITEs of `load.msg` bytes outstanding from `side` to
/// `target`, round-robin over its QPs, until `stop`; counts completions in `done`. Drains
/// what is in flight before returning.
pub fn drive(
    side: &Side,
    target: Target,
    load: Load,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> Result<(), Error> {
    let nqp = side.qps.len();
    let cap = side.sq_depth as usize;
    let batch = (load.batch.max(1) as usize).min(cap);
    let depth = (load.depth as usize).max(batch).min(cap * nqp);
    let sge = [Sge::new(side.buf.addr(), load.msg, side.mr.lkey())];
    let mut outstanding = vec![0usize; nqp];
    let mut total = 0usize;
    let mut next = 0usize;
    let mut wc = [WorkCompletion::default(); 64];
    let mut last_progress = Instant::now();
    let mut wrs: Vec<SendWr<'_>> = Vec::with_capacity(batch);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while !stopping && depth - total >= batch {
            // The next QP, in turn, with room for a whole batch.
            let Some(q) = (0..nqp)
                .map(|i| (next + i) % nqp)
                .find(|&q| outstanding[q] + batch <= cap)
            else {
                break;
            };
            wrs.clear();
            wrs.extend((0..batch).map(|_| {
                SendWr::rdma_write(q as u64, &sge, target.addr, target.rkey)
                    .with_flags(SendFlags::SIGNALED)
            }));
            // SAFETY: the SGE lies in `side.buf`, which the caller's `side` keeps alive for
            // the whole call; this function drains every write before it returns, and nothing
            // writes the buffer meanwhile (the bench never touches its bytes).
            unsafe { side.qps[q].post_send(&wrs) }.map_err(verb("ibv_post_send"))?;
            outstanding[q] += batch;
            total += batch;
            next = q + 1;
        }
        if stopping && total == 0 {
            return Ok(());
        }
        let n = side.cq.poll(&mut wc).map_err(verb("ibv_poll_cq"))?;
        for w in &wc[..n] {
            if w.status != WcStatus::Success {
                return Err(Error::Completion {
                    status: w.status,
                    vendor_err: w.vendor_err,
                });
            }
            let q = w.wr_id as usize;
            outstanding[q] = outstanding[q].saturating_sub(1);
            total = total.saturating_sub(1);
        }
        if n > 0 {
            done.fetch_add(n as u64, Ordering::Relaxed);
            last_progress = Instant::now();
            continue;
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            return Err(Error::Stalled { outstanding: total });
        }
        match load.idle {
            Idle::Yield => std::thread::yield_now(),
            Idle::Sleep(d) => std::thread::sleep(d),
        }
    }
}

/// Writers running in threads; stopped and joined on drop, so no thread outlives a failing
/// scenario.
#[derive(Debug)]
pub struct Writers {
    stop: std::sync::Arc<AtomicBool>,
    counters: Vec<std::sync::Arc<AtomicU64>>,
    names: Vec<String>,
    threads: Vec<std::thread::JoinHandle<(Result<(), Error>, Side)>>,
    /// Sides kept until every writer is joined: targets, and the writers' own sides.
    passive: Vec<Side>,
}

impl Default for Writers {
    fn default() -> Self {
        Writers {
            stop: std::sync::Arc::new(AtomicBool::new(false)),
            counters: Vec::new(),
            names: Vec::new(),
            threads: Vec::new(),
            passive: Vec::new(),
        }
    }
}

impl Writers {
    /// Starts a thread driving `side` towards `target`; returns its index.
    pub fn start(&mut self, name: &str, side: Side, target: Target, load: Load) -> usize {
        let done = std::sync::Arc::new(AtomicU64::new(0));
        let (stop, counter) = (self.stop.clone(), done.clone());
        self.threads.push(std::thread::spawn(move || {
            let r = drive(&side, target, load, &stop, &counter);
            if r.is_err() {
                // One failing writer ends the scenario: the others stop too.
                stop.store(true, Ordering::Relaxed);
            }
            // The side goes back to be dropped after every writer has stopped: its QPs are
            // the responders of a peer's writes, which may still be draining.
            (r, side)
        }));
        self.counters.push(done);
        self.names.push(name.to_owned());
        self.counters.len() - 1
    }

    /// Keeps `side`, the target of some writer, alive until the writers are joined.
    pub fn keep(&mut self, side: Side) {
        self.passive.push(side);
    }

    /// Completions of every writer so far.
    pub fn counts(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every writer has completed something, then `warmup`, then counts
    /// completions over `window`. Returns (completions per writer, the exact window).
    pub fn measure(
        &mut self,
        warmup: Duration,
        window: Duration,
    ) -> Result<(Vec<u64>, Duration), Error> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.check()?;
            let counts = self.counts();
            match counts.iter().position(|&c| c == 0) {
                None => break,
                Some(i) if Instant::now() > deadline => {
                    return Err(Error::NoTraffic {
                        who: self.names[i].clone(),
                    });
                }
                Some(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        self.pause(warmup)?;
        let (before, t0) = (self.counts(), Instant::now());
        self.pause(window)?;
        let (after, t1) = (self.counts(), Instant::now());
        self.check()?;
        let diff = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        Ok((diff, t1 - t0))
    }

    fn pause(&mut self, d: Duration) -> Result<(), Error> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check()?;
            std::thread::sleep(Duration::from_millis(10).min(end - Instant::now()));
        }
        Ok(())
    }

    /// Fails if a writer failed or a signal arrived.
    fn check(&mut self) -> Result<(), Error> {
        if crate::procs::interrupted() {
            return Err(Error::Interrupted);
        }
        if self.stop.load(Ordering::Relaxed) {
            return self.finish();
        }
        Ok(())
    }

    /// Stops every writer, joins them, and returns the first failure.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = match t.join() {
                Ok((r, side)) => {
                    self.passive.push(side);
                    r
                }
                Err(_) => Err(Error::Panicked),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A VM that registers and deregisters one large MR over and over, with raw control commands
/// (the library would pick the largest page size the buffer allows; this one names every
/// page), and has a SEND of its own refused for want of a receive while it does, retried
/// without end, so the daemon's scheduler has a timer of this VM falling due every 10 µs.
#[derive(Debug)]
pub struct Registrar {
    /// The connection, shared with `_ctx`.
    v: Arc<VirtioUser>,
    /// The REG_MR command (header, body, page list), made once.
    request: Arc<Vec<u8>>,
    /// Sends to `receiver`, which posts no receive until the SEND may go through.
    sender: Side,
    receiver: Side,
    /// The MR's PD.
    _pd: ProtectionDomain,
    /// The memory the MR covers, kept for as long as it is registered.
    _region: DmaBuf,
    _ctx: Context,
}

/// A registrar's loop running on its own thread.
#[derive(Debug)]
pub struct Registering {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<Vec<Duration>, Error>>>,
}

impl Registrar {
    /// Opens VM `socket`'s device with `pages` pages of `1 << page_shift` bytes of memory on
    /// top of what the connection needs (memfd memory is sparse: registering touches none of
    /// it), and sets up its QPs.
    pub fn open(socket: &Path, pages: u64, page_shift: u8) -> Result<Registrar, Error> {
        let len = pages << page_shift;
        let options = Options {
            memory_size: len as usize + (16 << 20),
            ..Options::default()
        };
        let v = VirtioUser::connect(socket, options).map_err(|source| Error::Transport {
            what: format!("opening {}", socket.display()),
            source,
        })?;
        let v = Arc::new(v);
        let ctx = Context::from_transport(v.clone());
        let region = v
            .dma()
            .alloc_aligned(len as usize, 1 << page_shift)
            .map_err(|source| Error::Memory {
                what: "allocating the memory to register".into(),
                source,
            })?;
        let pd = ProtectionDomain::new(&ctx).map_err(verb("ibv_alloc_pd"))?;
        let head = cmd::RegMr {
            pdn: pd.handle().into(),
            access: (mr::Access::LOCAL_WRITE | mr::Access::REMOTE_WRITE)
                .bits()
                .into(),
            iova: region.addr().into(),
            length: len.into(),
            first_page_offset: 0.into(),
            npages: u32::try_from(pages).unwrap_or(u32::MAX).into(),
            page_shift,
            reserved: [0; 7],
        };
        let mut request = Vec::with_capacity(64 + pages as usize * 8);
        request.extend_from_slice(cmd::header(Opcode::RegMr).as_bytes());
        request.extend_from_slice(head.as_bytes());
        for i in 0..pages {
            request.extend_from_slice(&(region.addr() + (i << page_shift)).to_le_bytes());
        }
        let sender = Side::new(&ctx, 1, 1, 4, 64)?;
        let receiver = Side::new(&ctx, 1, 1, 4, 64)?;
        connect(&sender, &receiver)?;
        Ok(Registrar {
            v,
            request: Arc::new(request),
            sender,
            receiver,
            _pd: pd,
            _region: region,
            _ctx: ctx,
        })
    }

    /// Posts the SEND that will be refused until [`Registrar::quiet`], and starts sending the
    /// REG_MR on a thread of its own until [`Registering::finish`]: registering and
    /// deregistering, or (`refused`) naming a PD that does not exist, so that the daemon
    /// decodes the page list and refuses the command as soon as it holds the VM's objects, a
    /// neighbour as busy on the daemon's CPU that holds no lock for long. Returns once the
    /// first command is done.
    pub fn start(&self, refused: bool) -> Result<Registering, Error> {
        let sge = [Sge::new(self.sender.buf.addr(), 8, self.sender.mr.lkey())];
        let send = SendWr::send(1, &sge).with_flags(SendFlags::SIGNALED);
        // SAFETY: the SGE lies in the sender's buffer, which the registrar keeps, and nothing
        // writes it.
        unsafe { self.sender.qps[0].post_send(&[send]) }
            .map_err(verb("ibv_post_send (the refused SEND)"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (v, mut request) = (self.v.clone(), self.request.clone());
        if refused {
            let mut r = (*request).clone();
            let pdn = size_of::<cmd::Header>();
            r[pdn..pdn + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            request = Arc::new(r);
        }
        let (stop2, count2) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut took = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let (status, lkey) = raw(&v, &request, "REG_MR")?;
                took.push(t0.elapsed());
                match (refused, status) {
                    (false, Status::Ok) => {
                        let mut dereg = cmd::header(Opcode::DeregMr).as_bytes().to_vec();
                        dereg.extend_from_slice(&lkey.to_le_bytes());
                        dereg.extend_from_slice(&0u32.to_le_bytes());
                        match raw(&v, &dereg, "DEREG_MR")? {
                            (Status::Ok, _) => {}
                            (status, _) => {
                                let what = "DEREG_MR".into();
                                return Err(Error::Refused { what, status });
                            }
                        }
                    }
                    (true, Status::InvalidHandle) => {}
                    (_, status) => {
                        let what = "REG_MR".into();
                        return Err(Error::Refused { what, status });
                    }
                }
                count2.fetch_add(1, Ordering::Relaxed);
            }
            Ok(took)
        });
        let mut r = Registering {
            stop,
            count,
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.count.load(Ordering::Relaxed) == 0 {
            if r.thread.as_ref().is_some_and(|t| t.is_finished()) || Instant::now() > deadline {
                r.finish()?;
                return Err(Error::NoTraffic {
                    who: "the registering VM".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(r)
    }

    /// Posts the receive the SEND was waiting for and checks that both complete: the SEND
    /// was refused and retried the whole time. The VM is idle again.
    pub fn quiet(&self) -> Result<(), Error> {
        let sge = [Sge::new(
            self.receiver.buf.addr(),
            64,
            self.receiver.mr.lkey(),
        )];
        let wr = RecvWr {
            wr_id: 2,
            sg_list: &sge,
        };
        // SAFETY: the SGE lies in the receiver's buffer, which the registrar keeps; it is
        // read by nobody.
        unsafe { self.receiver.qps[0].post_recv(&[wr]) }
            .map_err(verb("ibv_post_recv (for the refused SEND)"))?;
        for side in [&self.sender, &self.receiver] {
            let mut wc = [WorkCompletion::default(); 1];
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if side.cq.poll(&mut wc).map_err(verb("ibv_poll_cq"))? == 1 {
                    if wc[0].status != WcStatus::Success {
                        return Err(Error::Completion {
                            status: wc[0].status,
                            vendor_err: wc[0].vendor_err,
                        });
                    }
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Stalled { outstanding: 1 });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

impl Registering {
    /// Stops the loop after the registration under way; how long each registration took.
    pub fn finish(&mut self) -> Result<Vec<Duration>, Error> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Panicked),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for Registering {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Sends `request` (header and body) on `v`: the device's status, and the first word of the
/// answer's body (the lkey of a REG_MR).
fn raw(v: &VirtioUser, request: &[u8], what: &str) -> Result<(Status, u32), Error> {
    let mut resp = [0u8; 64];
    let n = v
        .control(request, &mut resp)
        .map_err(|source| Error::Transport {
            what: what.into(),
            source,
        })?;
    let status = RespHeader::decode(&resp[..n]).map_or(Status::Malformed, |(_, s)| s);
    let at = size_of::<RespHeader>();
    let word = resp.get(at..at + 4).filter(|_| n >= at + 4);
    let word = word.map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    Ok((status, word))
}

/// One-way times of an 8-byte ping-pong in event mode between QP 0 of `a` and QP 0 of `b`,
/// `rounds` round trips, each half a round trip: each side posts a receive, sends an RDMA
/// WRITE WITH IMMEDIATE (as vrdma-perf's write_lat does in event mode) and sleeps on its
/// completion channel until the other's arrives. `a` waits `gap` before each ping.
///
/// Sides made with [`Receives::OnOwnCq`] sleep on their receive CQ only, as perftest and
/// vrdma-perf do, and take each send's completion before the next send (it is there by then:
/// the peer's answer came after it). On a shared CQ a side's own send completion wakes it
/// too, a second wake-up per round trip that is the application's, not the device's.
pub fn event_ping_pong(
    a: &Side,
    b: &Side,
    rounds: usize,
    gap: Duration,
) -> Result<Vec<Duration>, Error> {
    let channel =
        |s: &Side| vrdma::CompletionChannel::new(&s.ctx).map_err(verb("ibv_create_comp_channel"));
    let (ca, cb) = (channel(a)?, channel(b)?);
    ping_pong(a, b, rounds, gap, [Some(&ca), Some(&cb)])
}

/// As [`event_ping_pong`], back to back, each side polling its receive CQ instead of sleeping
/// (and yielding its CPU now and then, as vrdma-perf does): the same messages without the
/// wake-ups, so that what event mode adds can be told from what the message costs anyway.
pub fn polling_ping_pong(a: &Side, b: &Side, rounds: usize) -> Result<Vec<Duration>, Error> {
    ping_pong(a, b, rounds, Duration::ZERO, [None, None])
}

/// The ping-pong of [`event_ping_pong`], each side sleeping on its channel if it has one and
/// polling if not.
fn ping_pong(
    a: &Side,
    b: &Side,
    rounds: usize,
    gap: Duration,
    [ca, cb]: [Option<&vrdma::CompletionChannel>; 2],
) -> Result<Vec<Duration>, Error> {
    let (to_a, to_b) = (a.target(), b.target());
    // Each receive is posted before the message that consumes it can come, and none is left
    // posted at the end.
    post_recv(b)?;
    std::thread::scope(|scope| {
        let pong = scope.spawn(|| -> Result<(), Error> {
            for k in 0..rounds {
                await_message(b, cb)?;
                if k + 1 < rounds {
                    post_recv(b)?;
                }
                if k > 0 {
                    take_send_completion(b)?;
                }
                write_imm(b, to_a)?;
            }
            Ok(())
        });
        let mut one_way = Vec::with_capacity(rounds);
        let ping = (|| -> Result<(), Error> {
            for k in 0..rounds {
                if !gap.is_zero() {
                    std::thread::sleep(gap);
                }
                post_recv(a)?;
                if k > 0 {
                    take_send_completion(a)?;
                }
                let start = Instant::now();
                write_imm(a, to_b)?;
                await_message(a, ca)?;
                one_way.push(start.elapsed() / 2);
            }
            Ok(())
        })();
        let pong = pong.join().map_err(|_| Error::Panicked)?;
        ping.and(pong).map(|()| one_way)
    })
}

/// Posts one receive on `side`'s QP 0 (a WRITE WITH IMMEDIATE consumes one).
fn post_recv(side: &Side) -> Result<(), Error> {
    let wr = [RecvWr {
        wr_id: 0,
        sg_list: &[],
    }];
    // SAFETY: the receive has no SGE: nothing is written into memory for it.
    unsafe { side.qps[0].post_recv(&wr) }.map_err(verb("ibv_post_recv"))
}

/// Sends 8 bytes from `side`'s buffer to `to` with an immediate, signalled.
fn write_imm(side: &Side, to: Target) -> Result<(), Error> {
    let sge = [Sge::new(side.buf.addr(), 8, side.mr.lkey())];
    let wr = [SendWr::rdma_write(1, &sge, to.addr, to.rkey)
        .with_imm(0)
        .with_flags(SendFlags::SIGNALED)];
    // SAFETY: the SGE lies in `side.buf`, which belongs to `side` and so lives as long as its
    // QP, to which the work request belongs; nothing writes the buffer meanwhile.
    unsafe { side.qps[0].post_send(&wr) }.map_err(verb("ibv_post_send"))
}

/// With a receive CQ of its own, waits (polling: it is already there or about to be) for the
/// completion of `side`'s last send; on a shared CQ [`await_message`] took it.
fn take_send_completion(side: &Side) -> Result<(), Error> {
    if side.recv_cq.is_none() {
        return Ok(());
    }
    let mut wc = [WorkCompletion::default(); 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if side.cq.poll(&mut wc).map_err(verb("ibv_poll_cq"))? == 1 {
            return match wc[0].status {
                WcStatus::Success => Ok(()),
                status => Err(Error::Completion {
                    status,
                    vendor_err: wc[0].vendor_err,
                }),
            };
        }
        if Instant::now() > deadline {
            return Err(Error::Stalled { outstanding: 1 });
        }
        std::hint::spin_loop();
    }
}

/// Polls `side`'s receive CQ until the peer's message arrives, sleeping on `channel` between
/// polls (armed first, then polled again, as verbs applications do) or, without one, spinning
/// and yielding the CPU now and then; on a shared CQ send completions are taken on the way.
fn await_message(side: &Side, channel: Option<&vrdma::CompletionChannel>) -> Result<(), Error> {
    let cq = side.recv_cq.as_ref().unwrap_or(&side.cq);
    let mut wc = [WorkCompletion::default(); 4];
    let mut armed = false;
    let mut empty = 0u32;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = cq.poll(&mut wc).map_err(verb("ibv_poll_cq"))?;
        let mut arrived = false;
        for w in &wc[..n] {
            if w.status != WcStatus::Success {
                return Err(Error::Completion {
                    status: w.status,
                    vendor_err: w.vendor_err,
                });
            }
            arrived |= w.opcode == vrdma::WcOpcode::RecvRdmaWithImm;
        }
        if arrived {
            return Ok(());
        }
        if n > 0 {
            continue;
        }
        let Some(channel) = channel else {
            // The clock only now and then: a poll is far cheaper than reading it.
            if vrdma::pacing::yields_after(empty) {
                if Instant::now() > deadline {
                    return Err(Error::Stalled { outstanding: 1 });
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            empty = empty.wrapping_add(1);
            continue;
        };
        if !armed {
            cq.req_notify(false).map_err(verb("ibv_req_notify_cq"))?;
            armed = true;
            continue;
        }
        if Instant::now() > deadline {
            return Err(Error::Stalled { outstanding: 1 });
        }
        channel
            .get_cq_event(Some(Duration::from_millis(100)))
            .map_err(verb("ibv_get_cq_event"))?;
        armed = false;
    }
}
