//! Control-queue commands: `cmd::decode` on arbitrary bytes, then everything the device does
//! with a decoded request before it touches its object tables.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vrdma_proto::cmd::{self, Request};
use vrdma_proto::qp::{AttrMask, State, TransitionError, Type};
use vrdma_proto::{cqe, mr, ring, wqe};
use zerocopy::IntoBytes;

fuzz_target!(|data: &[u8]| {
    // The response header is decoded by the driver from device-written bytes; same input.
    if let Ok((header, status)) = cmd::RespHeader::decode(data) {
        assert_eq!(header.status.get(), status.raw());
        assert_eq!(header.as_bytes(), &data[..header.as_bytes().len()]);
    }

    let request = match cmd::decode(data) {
        Ok(request) => request,
        Err(err) => {
            // Every error has a message and maps to a failure status: `UnknownOpcode` only for
            // an opcode this protocol does not define, `Malformed` otherwise.
            let _ = err.to_string();
            let opcode_known = data.len() >= 2
                && cmd::Opcode::from_raw(u16::from_le_bytes([data[0], data[1]])).is_ok();
            match cmd::Status::from(err) {
                cmd::Status::Malformed => {}
                cmd::Status::UnknownOpcode => assert!(!opcode_known, "{err:?}"),
                other => panic!("decode error {err:?} mapped to {other:?}"),
            }
            return;
        }
    };

    // The opcode the request reports is the one in the header.
    let raw_opcode = u16::from_le_bytes([data[0], data[1]]);
    assert_eq!(request.opcode().raw(), raw_opcode);
    // The response a success needs room for is bounded by the largest response body.
    assert!(request.opcode().response_len() <= 256);
    let _ = format!("{request:?}");

    match request {
        Request::RegMr { cmd, access, pages } => check_reg_mr(&cmd, access, pages),
        Request::ModifyQp { cmd, mask } => check_modify_qp(&cmd, mask),
        Request::CreateQp { cmd, qp_type } => {
            assert_eq!(cmd.qp_type, qp_type.raw());
            let cap = &cmd.cap;
            assert!(cap.max_send_sge.get() <= wqe::MAX_SGE);
            assert!(cap.max_recv_sge.get() <= wqe::MAX_SGE);
            assert!(cap.max_inline_data.get() <= wqe::MAX_INLINE);
            let send_stride = wqe::send_stride(cap.max_send_sge.get(), cap.max_inline_data.get());
            let recv_stride = wqe::recv_stride(cap.max_recv_sge.get());
            assert!(send_stride >= wqe::SEND_HEADER_SIZE + cap.max_send_sge.get() * wqe::SGE_SIZE);
            assert!(send_stride >= wqe::SEND_HEADER_SIZE + cap.max_inline_data.get());
            assert!(recv_stride >= wqe::RECV_HEADER_SIZE + cap.max_recv_sge.get() * wqe::SGE_SIZE);
            assert_eq!(cmd.reserved1.get(), 0);
            // A decoded CREATE_QP always describes rings the device can lay out: a send ring,
            // and a receive ring unless an SRQ takes its place (and then nothing of one).
            let sq = ring::Geometry::new(cap.max_send_wr.get(), send_stride)
                .expect("decoded send ring geometry");
            let mut rings = vec![(sq, cmd.sq_ring_addr.get())];
            if cmd.srqn.get() == 0 {
                let rq = ring::Geometry::new(cap.max_recv_wr.get(), recv_stride)
                    .expect("decoded receive ring geometry");
                rings.push((rq, cmd.rq_ring_addr.get()));
            } else {
                assert_eq!(cap.max_recv_wr.get(), 0);
                assert_eq!(cap.max_recv_sge.get(), 0);
                assert_eq!(cmd.rq_ring_addr.get(), 0);
            }
            for (geometry, base) in rings {
                assert_eq!(base % ring::ALIGN, 0);
                assert_ne!(base, 0);
                let last = geometry.entry_offset(geometry.depth() - 1);
                assert!(last + u64::from(geometry.stride()) == geometry.byte_len());
            }
        }
        Request::CreateSrq(c) => {
            assert!(c.max_sge.get() <= wqe::MAX_SGE);
            assert!(c.srq_limit.get() <= c.max_wr.get());
            let geometry = ring::Geometry::new(c.max_wr.get(), wqe::recv_stride(c.max_sge.get()))
                .expect("decoded SRQ ring geometry");
            assert!(geometry.byte_len() > ring::HEADER_SIZE);
            assert_eq!(c.ring_addr.get() % ring::ALIGN, 0);
            assert_ne!(c.ring_addr.get(), 0);
        }
        Request::ModifySrq { cmd, mask } => {
            assert_eq!(mask.bits(), cmd.attr_mask.get());
            assert_eq!(mask - cmd::SrqAttrMask::all(), cmd::SrqAttrMask::empty());
        }
        Request::CreateCq(c) => {
            let geometry =
                ring::Geometry::new(c.cqe.get(), cqe::SIZE).expect("decoded CQ ring geometry");
            assert_eq!(
                geometry.byte_len(),
                ring::HEADER_SIZE + u64::from(c.cqe.get()) * u64::from(cqe::SIZE)
            );
            assert_eq!(c.ring_addr.get() % ring::ALIGN, 0);
        }
        Request::CreateAh(c) => {
            assert_eq!(c.attr.is_global, 1);
            assert!(!c.attr.dgid.is_zero());
            let _ = c.attr.dgid.to_string();
        }
        Request::ReqNotifyCq { flags, .. } => {
            assert_eq!(flags - cmd::NotifyFlags::all(), cmd::NotifyFlags::empty());
        }
        Request::QueryDevice
        | Request::QueryPort(_)
        | Request::QueryGid(_)
        | Request::AllocPd
        | Request::DeallocPd(_)
        | Request::DeregMr(_)
        | Request::DestroyCq(_)
        | Request::QueryQp(_)
        | Request::DestroyQp(_)
        | Request::PostRecv(_)
        | Request::DestroyAh(_)
        | Request::QuerySrq(_)
        | Request::DestroySrq(_)
        | Request::PostSrqRecv(_) => {}
    }
});

fn check_reg_mr(cmd: &cmd::RegMr, access: mr::Access, pages: cmd::PageList<'_>) {
    assert!(access.is_consistent());
    assert_eq!(access.bits(), cmd.access.get());
    let shift = pages.page_shift();
    assert_eq!(shift, cmd.page_shift);
    assert!((mr::MIN_PAGE_SHIFT..=mr::MAX_PAGE_SHIFT).contains(&shift));
    let page_size = 1u64 << shift;
    let length = cmd.length.get();
    let offset = u64::from(cmd.first_page_offset.get());
    assert!(length > 0 && offset < page_size);
    assert!(!pages.is_empty());
    assert_eq!(pages.len(), cmd.npages.get() as usize);
    assert!(pages.len() <= cmd::MAX_PAGE_LIST as usize);
    // The pages cover the region exactly: the last byte is in the last page.
    assert_eq!((offset + length - 1) >> shift, pages.len() as u64 - 1);
    let mut n = 0usize;
    for page in pages.iter() {
        assert_eq!(page % page_size, 0, "page {page:#x} misaligned");
        assert!(page.checked_add(page_size - 1).is_some());
        n += 1;
    }
    assert_eq!(n, pages.len());
    assert_eq!(pages.iter().len(), pages.len());
    // Every iova in the region maps to a page of the list without overflow.
    let iova = cmd.iova.get();
    assert!(iova.checked_add(length - 1).is_some());
}

fn check_modify_qp(cmd: &cmd::ModifyQp, mask: AttrMask) {
    assert_eq!(mask.bits(), cmd.attr_mask.get());
    // decode already validated the values in the mask.
    assert_eq!(cmd.attr.validate(mask), Ok(()));
    for qp_type in Type::ALL.iter().copied() {
        for actual in State::ALL.iter().copied() {
            match vrdma_proto::qp::check_transition(qp_type, actual, mask, &cmd.attr) {
                Ok(to) => {
                    if mask.contains(AttrMask::STATE) {
                        assert_eq!(to.raw(), cmd.attr.qp_state);
                    } else {
                        assert_eq!(to, actual);
                    }
                    if mask.contains(AttrMask::CUR_STATE) {
                        assert_eq!(cmd.attr.cur_qp_state, actual.raw());
                        assert!(matches!(
                            actual,
                            State::Rtr | State::Rts | State::Sqd | State::Sqe
                        ));
                    }
                    // Verbs never moves into SQE by MODIFY_QP, nor from RESET to ERR.
                    assert_ne!(to, State::Sqe);
                    assert!(!(actual == State::Reset && to == State::Err));
                    // A legal modify stays legal when repeated with the same mask from the
                    // same state: the check has no hidden state.
                    assert_eq!(
                        vrdma_proto::qp::check_transition(qp_type, actual, mask, &cmd.attr),
                        Ok(to)
                    );
                }
                Err(err) => {
                    let bits = err.offending_bits();
                    assert!(!bits.is_empty());
                    // The `detail` the device reports fits the wire field.
                    let _detail: u32 = bits.bits();
                    let _ = err.to_string();
                    match err {
                        TransitionError::Illegal {
                            qp_type: t, from, ..
                        } => {
                            assert_eq!(t, qp_type);
                            assert_eq!(from, actual);
                            assert_eq!(bits, AttrMask::STATE);
                        }
                        TransitionError::Missing {
                            qp_type: t,
                            from,
                            missing,
                            ..
                        } => {
                            assert_eq!((t, from), (qp_type, actual));
                            assert!(missing.intersection(mask).is_empty());
                            // Adding what was missing gets past that check.
                            let fixed = vrdma_proto::qp::check_transition(
                                qp_type,
                                actual,
                                mask | missing,
                                &cmd.attr,
                            );
                            assert!(
                                !matches!(fixed, Err(TransitionError::Missing { .. })),
                                "{fixed:?}"
                            );
                        }
                        TransitionError::NotAllowed {
                            qp_type: t,
                            from,
                            extra,
                            ..
                        } => {
                            assert_eq!((t, from), (qp_type, actual));
                            assert!(mask.contains(extra));
                            assert!(!extra.contains(AttrMask::STATE));
                            // Dropping the extra bits makes the modify legal.
                            let fixed = vrdma_proto::qp::check_transition(
                                qp_type,
                                actual,
                                mask - extra,
                                &cmd.attr,
                            );
                            assert!(fixed.is_ok(), "{fixed:?}");
                        }
                        TransitionError::CurrentStateMismatch { actual: a, .. } => {
                            assert_eq!(a, actual);
                            assert!(mask.contains(AttrMask::CUR_STATE));
                        }
                    }
                }
            }
        }
    }
}
