//! Scenarios that hold wherever the two VMs are: on one daemon (`tests/opcodes.rs`) or on
//! daemons on different hosts (`tests/roce.rs`). Each moves data with one kind of operation and
//! checks every byte and completion field.

use vrdma::{
    AddressHandle, Context, QpAttr, QpAttrMask, QpCap, QpState, QpType, RecvWr, SendFlags, SendWr,
    Sge, WcOpcode, WcStatus,
};

use crate::{Endpoint, pattern, rc_pair, read};

const LEN: usize = 1 << 20;

/// The queue sizes the scenarios use.
pub fn cap() -> QpCap {
    QpCap {
        max_send_wr: 64,
        max_recv_wr: 64,
        max_send_sge: 4,
        max_recv_sge: 4,
        max_inline_data: 256,
    }
}

/// SEND (scattered, inline, with immediate), a 600 KiB RDMA WRITE to an unaligned address,
/// WRITE with immediate, RDMA READ, and both atomics over RC from `ca` to `cb`, every byte and
/// every completion field checked.
pub fn rc_send_write_read_and_atomics(ca: &Context, cb: &Context) {
    let (a, b) = rc_pair(ca, cb, LEN, cap());
    pattern(&a.buf, 1);
    pattern(&b.buf, 2);
    let (abase, bbase) = (a.buf.addr(), b.buf.addr());

    // SEND with two SGEs into a receive with two SGEs of other sizes.
    let recv_sges = [
        Sge::new(bbase + 4096, 100, b.mr.lkey()),
        Sge::new(bbase + 8192, 1000, b.mr.lkey()),
    ];
    let send_sges = [
        Sge::new(abase, 300, a.mr.lkey()),
        Sge::new(abase + 1000, 500, a.mr.lkey()),
    ];
    b.recv(&[RecvWr {
        wr_id: 77,
        sg_list: &recv_sges,
    }])
    .unwrap();
    a.send(&[SendWr::send(1, &send_sges)]).unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (1, WcStatus::Success, WcOpcode::Send)
    );
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode, wc.byte_len),
        (77, WcStatus::Success, WcOpcode::Recv, 800)
    );
    assert_eq!(wc.imm_data, None);
    assert_eq!(wc.src_qp, a.qp.qp_num());
    let mut expected = read(&a.buf, 0, 300);
    expected.extend(read(&a.buf, 1000, 500));
    let mut got = read(&b.buf, 4096, 100);
    got.extend(read(&b.buf, 8192, 700));
    assert_eq!(got, expected, "SEND scattered wrongly");
    assert_eq!(
        read(&b.buf, 8192 + 700, 300),
        {
            let mut fresh = vec![0u8; 300];
            for (i, v) in fresh.iter_mut().enumerate() {
                *v = ((8192 + 700 + i) as u8).wrapping_mul(31).wrapping_add(2);
            }
            fresh
        },
        "bytes past the message must be untouched"
    );

    // SEND_WITH_IMM, inline.
    let inline_src = [Sge::new(abase + 50, 200, 0)];
    let recv = [Sge::new(bbase + 65536, 4096, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 78,
        sg_list: &recv,
    }])
    .unwrap();
    a.send(&[SendWr::send(2, &inline_src)
        .with_imm(0xdead_beef)
        .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.byte_len, wc.imm_data),
        (78, 200, Some(0xdead_beef))
    );
    assert_eq!(read(&b.buf, 65536, 200), read(&a.buf, 50, 200));

    // RDMA WRITE of 600 KiB (ten scheduler chunks) to an unaligned remote address.
    let big = 600 * 1024;
    let src = [Sge::new(abase + 3, big as u32, a.mr.lkey())];
    a.send(&[SendWr::rdma_write(3, &src, bbase + 100_001, b.mr.rkey())])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.wr_id, wc.status, wc.opcode),
        (3, WcStatus::Success, WcOpcode::RdmaWrite)
    );
    assert_eq!(read(&b.buf, 100_001, big), read(&a.buf, 3, big));
    b.assert_no_completion(std::time::Duration::from_millis(20));

    // RDMA WRITE with immediate consumes a receive and reports the length.
    let none: [Sge; 0] = [];
    let src = [Sge::new(abase + 7, 64, a.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 79,
        sg_list: &none,
    }])
    .unwrap();
    a.send(&[SendWr::rdma_write(4, &src, bbase + 900_000, b.mr.rkey()).with_imm(42)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let wc = b.poll_one();
    assert_eq!(
        (wc.wr_id, wc.opcode, wc.byte_len, wc.imm_data),
        (79, WcOpcode::RecvRdmaWithImm, 64, Some(42))
    );
    assert_eq!(read(&b.buf, 900_000, 64), read(&a.buf, 7, 64));

    // RDMA READ pulls bytes from b into a.
    let dst = [Sge::new(abase + 700_000, 5000, a.mr.lkey())];
    a.send(&[SendWr::rdma_read(5, &dst, bbase + 12_345, b.mr.rkey())])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.opcode, wc.status, wc.byte_len),
        (WcOpcode::RdmaRead, WcStatus::Success, 5000)
    );
    assert_eq!(read(&a.buf, 700_000, 5000), read(&b.buf, 12_345, 5000));

    // Atomics on an 8-byte word of b.
    let target = bbase + 0x1_0000 - 8;
    b.buf.write_at(0x1_0000 - 8, &100u64.to_ne_bytes()).unwrap();
    let old = [Sge::new(abase + 800_000, 8, a.mr.lkey())];
    a.send(&[SendWr::fetch_add(6, &old, target, b.mr.rkey(), 5)])
        .unwrap();
    let wc = a.poll_one();
    assert_eq!(
        (wc.opcode, wc.status, wc.byte_len),
        (WcOpcode::FetchAdd, WcStatus::Success, 8)
    );
    assert_eq!(read(&a.buf, 800_000, 8), 100u64.to_ne_bytes());
    assert_eq!(read(&b.buf, 0x1_0000 - 8, 8), 105u64.to_ne_bytes());
    a.send(&[SendWr::compare_swap(7, &old, target, b.mr.rkey(), 105, 7)])
        .unwrap();
    assert_eq!(a.poll_one().opcode, WcOpcode::CompSwap);
    assert_eq!(read(&a.buf, 800_000, 8), 105u64.to_ne_bytes());
    assert_eq!(read(&b.buf, 0x1_0000 - 8, 8), 7u64.to_ne_bytes());
    a.send(&[SendWr::compare_swap(8, &old, target, b.mr.rkey(), 999, 1)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(
        read(&a.buf, 800_000, 8),
        7u64.to_ne_bytes(),
        "a failed compare returns the current value"
    );
    assert_eq!(
        read(&b.buf, 0x1_0000 - 8, 8),
        7u64.to_ne_bytes(),
        "and leaves it alone"
    );
}

/// Ten RDMA WRITEs of which only the last is signalled: one completion, all data there.
pub fn unsignalled_requests_complete_silently_and_in_order(ca: &Context, cb: &Context) {
    let (a, b) = rc_pair(ca, cb, 1 << 16, cap());
    pattern(&a.buf, 9);
    let src: Vec<[Sge; 1]> = (0..10)
        .map(|i| [Sge::new(a.buf.addr() + i * 100, 100, a.mr.lkey())])
        .collect();
    let wrs: Vec<SendWr<'_>> = (0..10)
        .map(|i| {
            let wr = SendWr::rdma_write(
                i,
                &src[i as usize],
                b.buf.addr() + 20_000 + i * 100,
                b.mr.rkey(),
            );
            if i == 9 {
                wr
            } else {
                wr.with_flags(SendFlags::empty())
            }
        })
        .collect();
    a.send(&wrs).unwrap();
    let wc = a.poll_one();
    assert_eq!(wc.wr_id, 9, "only the signalled request completes");
    a.assert_no_completion(std::time::Duration::from_millis(20));
    assert_eq!(read(&b.buf, 20_000, 1000), read(&a.buf, 0, 1000));
}

/// UD from `ca` to `cb`: GRH, source QP and GID, immediate data, and a wrong Q_Key dropped.
pub fn ud_datagrams_carry_grh_source_qp_and_gid(ca: &Context, cb: &Context) {
    let ud_cap = QpCap {
        max_inline_data: 0,
        ..cap()
    };
    let a = Endpoint::new(ca, QpType::Ud, 1 << 16, ud_cap);
    let b = Endpoint::new(cb, QpType::Ud, 1 << 16, ud_cap);
    const QKEY: u32 = 0x1111;
    for e in [&a, &b] {
        let init = QpAttr {
            qp_state: QpState::Init,
            qkey: QKEY,
            ..QpAttr::default()
        };
        e.qp.modify(
            &init,
            QpAttrMask::STATE | QpAttrMask::PKEY_INDEX | QpAttrMask::PORT | QpAttrMask::QKEY,
        )
        .unwrap();
        e.qp.modify(
            &QpAttr {
                qp_state: QpState::Rtr,
                ..QpAttr::default()
            },
            QpAttrMask::STATE,
        )
        .unwrap();
        e.qp.modify(
            &QpAttr {
                qp_state: QpState::Rts,
                ..QpAttr::default()
            },
            QpAttrMask::STATE | QpAttrMask::SQ_PSN,
        )
        .unwrap();
    }
    pattern(&a.buf, 5);
    let ah = AddressHandle::new(&a.pd, &AddressHandle::attr_for(cb.gid())).unwrap();
    let recv = [Sge::new(b.buf.addr(), 40 + 512, b.mr.lkey())];
    let src = [Sge::new(a.buf.addr() + 10, 512, a.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 5,
        sg_list: &recv,
    }])
    .unwrap();
    a.send(&[SendWr::ud_send(1, &src, &ah, b.qp.qp_num(), QKEY).with_imm(3)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    let wc = b.poll_one();
    assert_eq!(
        (wc.status, wc.byte_len, wc.src_qp, wc.grh),
        (WcStatus::Success, 552, a.qp.qp_num(), true)
    );
    assert_eq!(wc.sgid, ca.gid());
    assert_eq!(wc.imm_data, Some(3));
    assert_eq!(&read(&b.buf, 8, 16), &ca.gid().0, "GRH source GID");
    assert_eq!(&read(&b.buf, 24, 16), &cb.gid().0, "GRH destination GID");
    assert_eq!(read(&b.buf, 40, 512), read(&a.buf, 10, 512));

    // A wrong Q_Key is dropped silently: the sender completes, the receive stays posted.
    a.send(&[SendWr::ud_send(2, &src, &ah, b.qp.qp_num(), QKEY + 1)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    b.assert_no_completion(std::time::Duration::from_millis(30));
    let recv2 = [Sge::new(b.buf.addr() + 4096, 40 + 512, b.mr.lkey())];
    b.recv(&[RecvWr {
        wr_id: 6,
        sg_list: &recv2,
    }])
    .unwrap();
    a.send(&[SendWr::ud_send(3, &src, &ah, b.qp.qp_num(), QKEY)])
        .unwrap();
    assert_eq!(a.poll_one().status, WcStatus::Success);
    assert_eq!(
        b.poll_one().wr_id,
        6,
        "the datagram with the right Q_Key lands in the next receive"
    );
}
