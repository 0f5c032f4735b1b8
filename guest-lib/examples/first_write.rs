//! One RDMA WRITE from one VM's vrdma device to another's: the example of docs/guide.md.
//!
//! With a daemon serving two VMs:
//!
//! ```text
//! vhost-user-rdma --vm name=vm1,socket=/tmp/vm1.sock,gid=10.0.0.1 \
//!                 --vm name=vm2,socket=/tmp/vm2.sock,gid=10.0.0.2 &
//! cargo run -p vrdma --example first_write -- /tmp/vm1.sock /tmp/vm2.sock
//! ```
//!
//! Both devices are opened by this one process, so the QP numbers, GIDs, address and rkey
//! that two real applications would exchange over TCP are simply passed along in variables.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vrdma::mem::DmaBuf;
use vrdma::{
    AccessFlags, AddressHandle, CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpAttr,
    QpAttrMask, QpCap, QpInitAttr, QpState, QpType, QueuePair, SendWr, Sge, WcStatus,
    WorkCompletion,
};

const MESSAGE: &[u8] = b"Hello, vm2! This arrived by RDMA WRITE from vm1.";

/// What each side needs. Fields drop in declaration order: the QP before the CQ and the MR,
/// the MR before the buffer it covers, the device last.
struct Side {
    qp: QueuePair,
    cq: CompletionQueue,
    mr: MemoryRegion,
    buf: DmaBuf,
    _pd: ProtectionDomain,
    ctx: Context,
}

/// Opens the device behind `socket` and creates a PD, a CQ, an RC QP and a registered
/// 4 KiB buffer. `remote` is what the peer may do to the buffer and through the QP.
fn open_side(socket: &str, remote: AccessFlags) -> Result<Side, Box<dyn Error>> {
    let ctx = Context::open(socket)?; // ibv_open_device
    let pd = ProtectionDomain::new(&ctx)?; // ibv_alloc_pd
    let cq = CompletionQueue::new(&ctx, 16)?; // ibv_create_cq
    let qp = QueuePair::new(
        &pd,
        &QpInitAttr {
            send_cq: &cq,
            recv_cq: &cq,
            srq: None,
            cap: QpCap::default(),
            qp_type: QpType::Rc,
            sq_sig_all: false,
        },
    )?; // ibv_create_qp
    // The device can only reach memory shared with it: allocate buffers from the context.
    let buf = ctx.alloc(4096)?;
    let mr = MemoryRegion::register(&pd, &buf, AccessFlags::LOCAL_WRITE | remote)?; // ibv_reg_mr
    // RESET -> INIT, with the rights the peer has through this QP.
    let init = QpAttr {
        qp_state: QpState::Init,
        qp_access_flags: remote,
        ..QpAttr::default()
    };
    qp.modify(&init, QpAttrMask::RC_INIT)?;
    Ok(Side {
        qp,
        cq,
        mr,
        buf,
        _pd: pd,
        ctx,
    })
}

/// INIT -> RTR -> RTS towards the peer's QP, as `ibv_rc_pingpong` does. On RoCE the peer is
/// addressed by its GID (the LID is 0).
fn connect(side: &Side, peer: &Side) -> Result<(), Box<dyn Error>> {
    let rtr = QpAttr {
        qp_state: QpState::Rtr,
        dest_qp_num: peer.qp.qp_num(),
        rq_psn: 0,
        max_dest_rd_atomic: 1,
        min_rnr_timer: 12,
        ah_attr: AddressHandle::attr_for(peer.ctx.gid()),
        ..QpAttr::default()
    };
    side.qp.modify(&rtr, QpAttrMask::RC_RTR)?;
    let rts = QpAttr {
        qp_state: QpState::Rts,
        sq_psn: 0,
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
        max_rd_atomic: 1,
        ..QpAttr::default()
    };
    side.qp.modify(&rts, QpAttrMask::RC_RTS)?;
    Ok(())
}

/// Busy-polls `cq` for one completion (`ibv_poll_cq`), for at most five seconds.
fn poll_one(cq: &CompletionQueue) -> Result<WorkCompletion, Box<dyn Error>> {
    let mut wc = [WorkCompletion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: vrdma::WcOpcode::Send,
        vendor_err: 0,
        byte_len: 0,
        imm_data: None,
        qp_num: 0,
        src_qp: 0,
        grh: false,
        sgid: Default::default(),
    }];
    let deadline = Instant::now() + Duration::from_secs(5);
    while cq.poll(&mut wc)? == 0 {
        if Instant::now() > deadline {
            return Err("no completion within 5 s".into());
        }
        std::thread::yield_now();
    }
    Ok(wc[0])
}

fn run(socket1: &str, socket2: &str) -> Result<(), Box<dyn Error>> {
    // vm1 writes; vm2's buffer is the target, so vm2 grants REMOTE_WRITE.
    let vm1 = open_side(socket1, AccessFlags::empty())?;
    let vm2 = open_side(socket2, AccessFlags::REMOTE_WRITE)?;
    connect(&vm1, &vm2)?;
    connect(&vm2, &vm1)?;

    vm1.buf.write_at(0, MESSAGE)?;
    let sge = [Sge::new(
        vm1.buf.addr(),
        MESSAGE.len() as u32,
        vm1.mr.lkey(),
    )];
    let write = SendWr::rdma_write(1, &sge, vm2.buf.addr(), vm2.mr.rkey());
    // SAFETY: the SGE lies in `vm1.buf`, which lives until the end of this function, after
    // the completion is polled below; nothing writes the buffer until then.
    unsafe { vm1.qp.post_send(&[write]) }?; // ibv_post_send

    let wc = poll_one(&vm1.cq)?;
    if wc.status != WcStatus::Success {
        return Err(format!(
            "the RDMA WRITE failed: status {:?}, vendor_err {}",
            wc.status, wc.vendor_err
        )
        .into());
    }
    let mut landed = vec![0u8; MESSAGE.len()];
    vm2.buf.read_at(0, &mut landed)?;
    if landed != MESSAGE {
        return Err(format!("vm2's buffer holds {landed:?}, not the message").into());
    }
    println!(
        "vm1 (QPN {:#x}) wrote {} bytes into vm2's buffer at {:#x} (rkey {:#x}):",
        vm1.qp.qp_num(),
        landed.len(),
        vm2.buf.addr(),
        vm2.mr.rkey()
    );
    println!("{}", String::from_utf8_lossy(&landed));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket1, socket2] = &args[..] else {
        eprintln!("usage: first_write VM1_SOCKET VM2_SOCKET");
        return ExitCode::from(2);
    };
    match run(socket1, socket2) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("first_write: {}", vrdma::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
