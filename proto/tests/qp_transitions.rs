//! `qp::check_transition` and `qp::Attr::validate` against the verbs QP state machine.
//!
//! The expected table below is written out independently of `src/qp.rs`, from the InfiniBand
//! specification's QP state diagram as Linux encodes it in `qp_state_table`
//! (drivers/infiniband/core/verbs.c), which `ib_modify_qp_is_ok` checks:
//!
//! * a transition is legal iff the table has an entry for `cur → next`;
//! * every `req_param` bit of the QP type must be in the mask;
//! * no bit outside `req_param | opt_param | IB_QP_STATE` may be in the mask;
//! * `IB_QP_CUR_STATE` is refused unless the current state is RTR, RTS, SQD or SQE;
//! * without `IB_QP_STATE` the "next" state is the current one.
//!
//! vrdma knows the QP's real state, so it additionally refuses a `cur_qp_state` that differs
//! from it (`TransitionError::CurrentStateMismatch`), and it reports which check failed through
//! distinct error variants where the kernel returns a bare `false`.

use vrdma_proto::DecodeError;
use vrdma_proto::qp::{self, AhAttr, Attr, AttrMask, State, TransitionError, Type};
use vrdma_proto::{Gid, config::Mtu, mr::Access};

/// Builds an [`AttrMask`] from bit names: `m!(PKEY_INDEX | PORT)`.
macro_rules! m {
    () => { AttrMask::empty() };
    ($($bit:ident)|+) => { AttrMask::empty() $(| AttrMask::$bit)+ };
}

const TYPES: [Type; 2] = [Type::Rc, Type::Ud];
const STATES: [State; 7] = [
    State::Reset,
    State::Init,
    State::Rtr,
    State::Rts,
    State::Sqd,
    State::Sqe,
    State::Err,
];

/// Every attribute bit `ibv_qp_attr_mask` defines up to `IBV_QP_DEST_QPN`, by name, so a test
/// cannot silently skip one.
const ALL_BITS: [AttrMask; 21] = [
    AttrMask::STATE,
    AttrMask::CUR_STATE,
    AttrMask::EN_SQD_ASYNC_NOTIFY,
    AttrMask::ACCESS_FLAGS,
    AttrMask::PKEY_INDEX,
    AttrMask::PORT,
    AttrMask::QKEY,
    AttrMask::AV,
    AttrMask::PATH_MTU,
    AttrMask::TIMEOUT,
    AttrMask::RETRY_CNT,
    AttrMask::RNR_RETRY,
    AttrMask::RQ_PSN,
    AttrMask::MAX_QP_RD_ATOMIC,
    AttrMask::ALT_PATH,
    AttrMask::MIN_RNR_TIMER,
    AttrMask::SQ_PSN,
    AttrMask::MAX_DEST_RD_ATOMIC,
    AttrMask::PATH_MIG_STATE,
    AttrMask::CAP,
    AttrMask::DEST_QPN,
];

/// One legal transition of the kernel table with its RC and UD parameters.
struct Entry {
    from: State,
    to: State,
    rc_req: AttrMask,
    rc_opt: AttrMask,
    ud_req: AttrMask,
    ud_opt: AttrMask,
}

/// The kernel's `qp_state_table`, rows in its order, restricted to `IB_QPT_RC` and
/// `IB_QPT_UD`. Pairs not listed are invalid.
fn kernel_table() -> Vec<Entry> {
    use State::*;
    let e = |from, to, rc_req, rc_opt, ud_req, ud_opt| Entry {
        from,
        to,
        rc_req,
        rc_opt,
        ud_req,
        ud_opt,
    };
    // { .valid = 1 } with no parameters for any type.
    let bare = |from, to| e(from, to, m!(), m!(), m!(), m!());
    vec![
        // [IB_QPS_RESET]
        bare(Reset, Reset),
        e(
            Reset,
            Init,
            m!(PKEY_INDEX | PORT | ACCESS_FLAGS),
            m!(),
            m!(PKEY_INDEX | PORT | QKEY),
            m!(),
        ),
        // [IB_QPS_INIT]
        bare(Init, Reset),
        bare(Init, Err),
        e(
            Init,
            Init,
            m!(),
            m!(PKEY_INDEX | PORT | ACCESS_FLAGS),
            m!(),
            m!(PKEY_INDEX | PORT | QKEY),
        ),
        e(
            Init,
            Rtr,
            m!(AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC | MIN_RNR_TIMER),
            m!(ALT_PATH | ACCESS_FLAGS | PKEY_INDEX),
            m!(),
            m!(PKEY_INDEX | QKEY),
        ),
        // [IB_QPS_RTR]
        bare(Rtr, Reset),
        bare(Rtr, Err),
        e(
            Rtr,
            Rts,
            m!(TIMEOUT | RETRY_CNT | RNR_RETRY | SQ_PSN | MAX_QP_RD_ATOMIC),
            m!(CUR_STATE | ALT_PATH | ACCESS_FLAGS | MIN_RNR_TIMER | PATH_MIG_STATE),
            m!(SQ_PSN),
            m!(CUR_STATE | QKEY),
        ),
        // [IB_QPS_RTS]
        bare(Rts, Reset),
        bare(Rts, Err),
        e(
            Rts,
            Rts,
            m!(),
            m!(CUR_STATE | ACCESS_FLAGS | ALT_PATH | PATH_MIG_STATE | MIN_RNR_TIMER),
            m!(),
            m!(CUR_STATE | QKEY),
        ),
        e(
            Rts,
            Sqd,
            m!(),
            m!(EN_SQD_ASYNC_NOTIFY),
            m!(),
            m!(EN_SQD_ASYNC_NOTIFY),
        ),
        // [IB_QPS_SQD]
        bare(Sqd, Reset),
        bare(Sqd, Err),
        e(
            Sqd,
            Rts,
            m!(),
            m!(CUR_STATE | ALT_PATH | ACCESS_FLAGS | MIN_RNR_TIMER | PATH_MIG_STATE),
            m!(),
            m!(CUR_STATE | QKEY),
        ),
        e(
            Sqd,
            Sqd,
            m!(),
            m!(PORT
                | AV
                | TIMEOUT
                | RETRY_CNT
                | RNR_RETRY
                | MAX_QP_RD_ATOMIC
                | MAX_DEST_RD_ATOMIC
                | ALT_PATH
                | ACCESS_FLAGS
                | PKEY_INDEX
                | MIN_RNR_TIMER
                | PATH_MIG_STATE),
            m!(),
            m!(PKEY_INDEX | QKEY),
        ),
        // [IB_QPS_SQE]: `.valid = 1` for every type; only UD (and UC, SMI, GSI) get optional
        // parameters, so for RC the kernel accepts exactly IB_QP_STATE.
        bare(Sqe, Reset),
        bare(Sqe, Err),
        e(Sqe, Rts, m!(), m!(), m!(), m!(CUR_STATE | QKEY)),
        // [IB_QPS_ERR]
        bare(Err, Reset),
        bare(Err, Err),
    ]
}

/// `(required, optional)` for `from → to` on `qp_type` per the kernel table, or `None`.
fn kernel_rule(qp_type: Type, from: State, to: State) -> Option<(AttrMask, AttrMask)> {
    kernel_table()
        .into_iter()
        .find(|e| e.from == from && e.to == to)
        .map(|e| match qp_type {
            Type::Rc => (e.rc_req, e.rc_opt),
            Type::Ud => (e.ud_req, e.ud_opt),
        })
}

/// Where vrdma deliberately refuses what the kernel table accepts.
///
/// RC SQE → RTS: the kernel's `valid` flag is not per QP type, so its table accepts this pair
/// for RC with an empty parameter set, but the InfiniBand specification has only UC, UD and RD
/// QPs enter SQE (an RC send error takes the QP to ERR), and vrdma never puts an RC QP in SQE.
/// The pair is therefore unreachable, and vrdma calls it illegal.
fn vrdma_deviates(qp_type: Type, from: State, to: State) -> bool {
    qp_type == Type::Rc && from == State::Sqe && to == State::Rts
}

/// The rule vrdma is expected to apply.
fn expected_rule(qp_type: Type, from: State, to: State) -> Option<(AttrMask, AttrMask)> {
    if vrdma_deviates(qp_type, from, to) {
        None
    } else {
        kernel_rule(qp_type, from, to)
    }
}

/// States out of which verbs accepts `IB_QP_CUR_STATE`.
fn cur_state_allowed(state: State) -> bool {
    matches!(state, State::Rtr | State::Rts | State::Sqd | State::Sqe)
}

/// An attribute block naming `to` as the next state and `from` as the current one, with every
/// other field holding a value `Attr::validate` accepts.
fn attr(from: State, to: State) -> Attr {
    Attr {
        qp_state: to.raw(),
        cur_qp_state: from.raw(),
        path_mtu: Mtu::Mtu1024.raw(),
        path_mig_state: qp::MigState::Migrated.raw(),
        en_sqd_async_notify: 1,
        max_rd_atomic: 1,
        max_dest_rd_atomic: 1,
        qkey: 0x1111_1111.into(),
        rq_psn: 0x12_3456.into(),
        sq_psn: 0x65_4321.into(),
        dest_qp_num: 0x00_0102.into(),
        qp_access_flags: (Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ)
            .bits()
            .into(),
        pkey_index: 0.into(),
        port_num: 1,
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
        min_rnr_timer: 12,
        ah_attr: good_ah(),
        ..Attr::default()
    }
}

fn good_ah() -> AhAttr {
    AhAttr {
        dgid: Gid::from_ipv4([192, 0, 2, 7]),
        sgid_index: 1,
        hop_limit: 64,
        is_global: 1,
        port_num: 1,
        ..AhAttr::default()
    }
}

fn check(
    qp_type: Type,
    actual: State,
    mask: AttrMask,
    attr: &Attr,
) -> Result<State, TransitionError> {
    qp::check_transition(qp_type, actual, mask, attr)
}

/// The transition table itself: sanity of the transcription, so the big test below checks
/// against what the kernel says rather than against a typo.
#[test]
fn kernel_table_shape() {
    let table = kernel_table();
    // 22 legal pairs, none listed twice.
    assert_eq!(table.len(), 22);
    for (i, a) in table.iter().enumerate() {
        for b in &table[i + 1..] {
            assert!(
                !(a.from == b.from && a.to == b.to),
                "{:?} -> {:?} listed twice",
                a.from,
                a.to
            );
        }
        // Required and optional never overlap, and IB_QP_STATE is in neither.
        for (req, opt) in [(a.rc_req, a.rc_opt), (a.ud_req, a.ud_opt)] {
            assert!(req.intersection(opt).is_empty());
            assert!(!req.union(opt).contains(AttrMask::STATE));
        }
    }
    // Nothing enters SQE by MODIFY_QP, and RESET -> ERR is not a verbs transition.
    for from in STATES {
        assert!(kernel_rule(Type::Rc, from, State::Sqe).is_none());
        assert!(kernel_rule(Type::Ud, from, State::Sqe).is_none());
    }
    assert!(kernel_rule(Type::Rc, State::Reset, State::Err).is_none());
}

/// Every `(type, from, to)` with `IB_QP_STATE` set: legality, exact required mask, each
/// required bit removed, each foreign bit added, each optional bit added.
#[test]
fn every_pair_against_the_kernel_table() {
    let mut legal = [0usize; 2];
    for (ti, qp_type) in TYPES.into_iter().enumerate() {
        for from in STATES {
            for to in STATES {
                let a = attr(from, to);
                let state = AttrMask::STATE;
                let Some((req, opt)) = expected_rule(qp_type, from, to) else {
                    let err = TransitionError::Illegal { qp_type, from, to };
                    assert_eq!(
                        check(qp_type, from, state, &a),
                        Err(err),
                        "{qp_type:?} {from:?} -> {to:?} should be illegal"
                    );
                    // Legality is decided before the mask is looked at.
                    let everything = AttrMask::all() - AttrMask::CUR_STATE;
                    assert_eq!(check(qp_type, from, everything, &a), Err(err));
                    assert_eq!(err.offending_bits(), AttrMask::STATE);
                    continue;
                };
                legal[ti] += 1;
                let ctx = format!("{qp_type:?} {from:?} -> {to:?}");

                // Exactly the required attributes.
                assert_eq!(
                    check(qp_type, from, req | state, &a),
                    Ok(to),
                    "{ctx}: required"
                );

                // Each required attribute left out.
                for bit in ALL_BITS.into_iter().filter(|b| req.contains(*b)) {
                    let err = check(qp_type, from, (req - bit) | state, &a);
                    assert_eq!(
                        err,
                        Err(TransitionError::Missing {
                            qp_type,
                            from,
                            to,
                            missing: bit
                        }),
                        "{ctx}: without {bit:?}"
                    );
                    assert_eq!(err.unwrap_err().offending_bits(), bit);
                }

                // Each attribute outside required | optional added.
                for bit in ALL_BITS
                    .into_iter()
                    .filter(|b| !(req | opt | state).contains(*b))
                {
                    let got = check(qp_type, from, req | state | bit, &a);
                    let want = if bit == AttrMask::CUR_STATE && !cur_state_allowed(from) {
                        // The kernel's first check: CUR_STATE out of RESET, INIT or ERR.
                        TransitionError::CurrentStateMismatch {
                            claimed: from,
                            actual: from,
                        }
                    } else {
                        TransitionError::NotAllowed {
                            qp_type,
                            from,
                            to,
                            extra: bit,
                        }
                    };
                    assert_eq!(got, Err(want), "{ctx}: with {bit:?}");
                    assert_eq!(want.offending_bits(), bit);
                }

                // Bits ibv_qp_attr_mask does not define (or vrdma does not know) are foreign too.
                for shift in 21..32 {
                    let bit = AttrMask::from_bits_retain(1 << shift);
                    assert_eq!(
                        check(qp_type, from, req | state | bit, &a),
                        Err(TransitionError::NotAllowed {
                            qp_type,
                            from,
                            to,
                            extra: bit
                        }),
                        "{ctx}: with undefined bit {shift}"
                    );
                }

                // Each optional attribute added, then all of them.
                for bit in ALL_BITS.into_iter().filter(|b| opt.contains(*b)) {
                    assert_eq!(
                        check(qp_type, from, req | state | bit, &a),
                        Ok(to),
                        "{ctx}: with optional {bit:?}"
                    );
                }
                assert_eq!(
                    check(qp_type, from, req | opt | state, &a),
                    Ok(to),
                    "{ctx}: all"
                );
            }
        }
    }
    // RC: the kernel's 22 minus the documented SQE -> RTS deviation; UD: all 22.
    assert_eq!(legal, [21, 22]);
}

/// The one place vrdma is stricter than the kernel table, pinned so that changing either side
/// is a conscious decision.
#[test]
fn rc_sqe_to_rts_is_refused_although_the_kernel_table_has_it() {
    assert_eq!(
        kernel_rule(Type::Rc, State::Sqe, State::Rts),
        Some((AttrMask::empty(), AttrMask::empty()))
    );
    let a = attr(State::Sqe, State::Rts);
    assert_eq!(
        check(Type::Rc, State::Sqe, AttrMask::STATE, &a),
        Err(TransitionError::Illegal {
            qp_type: Type::Rc,
            from: State::Sqe,
            to: State::Rts
        })
    );
    // The only deviation.
    let mut deviations = 0;
    for qp_type in TYPES {
        for from in STATES {
            for to in STATES {
                if kernel_rule(qp_type, from, to).is_some()
                    != check(qp_type, from, AttrMask::STATE, &attr(from, to))
                        .map_or_else(|e| !matches!(e, TransitionError::Illegal { .. }), |_| true)
                {
                    deviations += 1;
                    assert!(vrdma_deviates(qp_type, from, to));
                }
            }
        }
    }
    assert_eq!(deviations, 1);
}

/// Without `STATE` the QP stays where it is, which is legal only where the table has
/// `cur → cur`: RESET, INIT, RTS, SQD and ERR, not RTR or SQE.
#[test]
fn modify_without_state_stays_put() {
    for qp_type in TYPES {
        for s in STATES {
            // qp_state names another state to prove it is ignored without the STATE bit.
            let other = if s == State::Rts {
                State::Init
            } else {
                State::Rts
            };
            let a = attr(s, other);
            let got = check(qp_type, s, AttrMask::empty(), &a);
            match s {
                State::Reset | State::Init | State::Rts | State::Sqd | State::Err => {
                    assert_eq!(got, Ok(s), "{qp_type:?} {s:?}")
                }
                State::Rtr | State::Sqe => assert_eq!(
                    got,
                    Err(TransitionError::Illegal {
                        qp_type,
                        from: s,
                        to: s
                    }),
                    "{qp_type:?} {s:?}"
                ),
            }
        }
    }
    // Attribute-only modifies that verbs allows.
    let init = attr(State::Init, State::Init);
    assert_eq!(
        check(Type::Ud, State::Init, m!(QKEY), &init),
        Ok(State::Init)
    );
    assert_eq!(
        check(Type::Rc, State::Init, m!(ACCESS_FLAGS | PORT), &init),
        Ok(State::Init)
    );
    let rts = attr(State::Rts, State::Rts);
    assert_eq!(
        check(Type::Rc, State::Rts, m!(MIN_RNR_TIMER | ACCESS_FLAGS), &rts),
        Ok(State::Rts)
    );
    // ... and one it does not: QKEY is UD-only in RTS -> RTS.
    assert_eq!(
        check(Type::Rc, State::Rts, m!(QKEY), &rts),
        Err(TransitionError::NotAllowed {
            qp_type: Type::Rc,
            from: State::Rts,
            to: State::Rts,
            extra: m!(QKEY)
        })
    );
    // RTR stays illegal even with attributes RTR -> RTS would accept.
    let rtr = attr(State::Rtr, State::Rtr);
    assert_eq!(
        check(Type::Rc, State::Rtr, m!(MIN_RNR_TIMER), &rtr),
        Err(TransitionError::Illegal {
            qp_type: Type::Rc,
            from: State::Rtr,
            to: State::Rtr
        })
    );
}

#[test]
fn cur_state_matching_the_qp_is_accepted_where_verbs_allows_it() {
    let cases = [
        (
            Type::Rc,
            State::Rtr,
            State::Rts,
            m!(TIMEOUT | RETRY_CNT | RNR_RETRY | SQ_PSN | MAX_QP_RD_ATOMIC),
        ),
        (Type::Ud, State::Rtr, State::Rts, m!(SQ_PSN)),
        (Type::Rc, State::Rts, State::Rts, m!()),
        (Type::Ud, State::Rts, State::Rts, m!()),
        (Type::Rc, State::Sqd, State::Rts, m!()),
        (Type::Ud, State::Sqd, State::Rts, m!()),
        (Type::Ud, State::Sqe, State::Rts, m!()),
    ];
    for (qp_type, from, to, req) in cases {
        let a = attr(from, to);
        assert_eq!(
            check(qp_type, from, req | m!(STATE | CUR_STATE), &a),
            Ok(to),
            "{qp_type:?} {from:?} -> {to:?}"
        );
    }
    // Without STATE: RTS stays RTS.
    let a = attr(State::Rts, State::Rts);
    assert_eq!(
        check(Type::Ud, State::Rts, m!(CUR_STATE), &a),
        Ok(State::Rts)
    );
}

#[test]
fn cur_state_not_matching_the_qp_is_refused() {
    // The claim would make a legal transition (SQD -> SQD) were it believed.
    let mut a = attr(State::Sqd, State::Sqd);
    let err = check(Type::Rc, State::Rts, m!(STATE | CUR_STATE), &a).unwrap_err();
    assert_eq!(
        err,
        TransitionError::CurrentStateMismatch {
            claimed: State::Sqd,
            actual: State::Rts
        }
    );
    assert_eq!(err.offending_bits(), AttrMask::CUR_STATE);

    // Every wrong claim from every state, for both types.
    for qp_type in TYPES {
        for actual in STATES {
            for claimed in STATES.into_iter().filter(|c| *c != actual) {
                a = attr(claimed, State::Err);
                assert_eq!(
                    check(qp_type, actual, m!(STATE | CUR_STATE), &a),
                    Err(TransitionError::CurrentStateMismatch { claimed, actual }),
                    "{qp_type:?}: claimed {claimed:?}, actual {actual:?}"
                );
            }
        }
    }

    // A cur_qp_state that is no state at all.
    a = attr(State::Rts, State::Rts);
    a.cur_qp_state = 7;
    let err = check(Type::Ud, State::Rts, m!(STATE | CUR_STATE), &a).unwrap_err();
    assert!(
        matches!(
            err,
            TransitionError::CurrentStateMismatch {
                actual: State::Rts,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.offending_bits(), AttrMask::CUR_STATE);

    // Without the CUR_STATE bit the field is ignored.
    a.cur_qp_state = State::Reset.raw();
    assert_eq!(check(Type::Ud, State::Rts, m!(STATE), &a), Ok(State::Rts));
}

/// `IB_QP_CUR_STATE` out of RESET, INIT or ERR is refused even when the claim is true.
#[test]
fn cur_state_from_a_state_where_verbs_refuses_it() {
    let cases = [
        (
            State::Reset,
            State::Init,
            m!(PKEY_INDEX | PORT | ACCESS_FLAGS),
        ),
        (State::Reset, State::Reset, m!()),
        (
            State::Init,
            State::Rtr,
            m!(AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC | MIN_RNR_TIMER),
        ),
        (State::Init, State::Init, m!()),
        (State::Init, State::Err, m!()),
        (State::Err, State::Reset, m!()),
        (State::Err, State::Err, m!()),
    ];
    for (from, to, req) in cases {
        let a = attr(from, to);
        // The same mask without CUR_STATE is fine...
        assert_eq!(check(Type::Rc, from, req | m!(STATE), &a), Ok(to));
        // ... and with it refused.
        assert_eq!(
            check(Type::Rc, from, req | m!(STATE | CUR_STATE), &a),
            Err(TransitionError::CurrentStateMismatch {
                claimed: from,
                actual: from
            }),
            "{from:?} -> {to:?}"
        );
    }
    // Allowed out of RTR in general, but RTR -> ERR has no optional attributes.
    let a = attr(State::Rtr, State::Err);
    assert_eq!(
        check(Type::Ud, State::Rtr, m!(STATE | CUR_STATE), &a),
        Err(TransitionError::NotAllowed {
            qp_type: Type::Ud,
            from: State::Rtr,
            to: State::Err,
            extra: m!(CUR_STATE)
        })
    );
}

#[test]
fn reset_to_err_is_illegal() {
    for qp_type in TYPES {
        let a = attr(State::Reset, State::Err);
        let err = check(qp_type, State::Reset, m!(STATE), &a).unwrap_err();
        assert_eq!(
            err,
            TransitionError::Illegal {
                qp_type,
                from: State::Reset,
                to: State::Err
            }
        );
        assert_eq!(err.offending_bits(), AttrMask::STATE);
    }
}

#[test]
fn every_other_state_can_be_forced_to_err_and_reset() {
    for qp_type in TYPES {
        for from in STATES {
            let a = attr(from, State::Reset);
            assert_eq!(check(qp_type, from, m!(STATE), &a), Ok(State::Reset));
            if from == State::Reset {
                continue;
            }
            let a = attr(from, State::Err);
            assert_eq!(
                check(qp_type, from, m!(STATE), &a),
                Ok(State::Err),
                "{qp_type:?} {from:?} -> Err"
            );
            // No attribute may come along.
            assert_eq!(
                check(qp_type, from, m!(STATE | QKEY), &a),
                Err(TransitionError::NotAllowed {
                    qp_type,
                    from,
                    to: State::Err,
                    extra: m!(QKEY)
                })
            );
        }
    }
}

#[test]
fn ud_sqe_to_rts() {
    let a = attr(State::Sqe, State::Rts);
    for mask in [
        m!(STATE),
        m!(STATE | QKEY),
        m!(STATE | CUR_STATE),
        m!(STATE | CUR_STATE | QKEY),
    ] {
        assert_eq!(
            check(Type::Ud, State::Sqe, mask, &a),
            Ok(State::Rts),
            "{mask:?}"
        );
    }
    assert_eq!(
        check(Type::Ud, State::Sqe, m!(STATE | SQ_PSN), &a),
        Err(TransitionError::NotAllowed {
            qp_type: Type::Ud,
            from: State::Sqe,
            to: State::Rts,
            extra: m!(SQ_PSN)
        })
    );
    // SQE -> SQD is not a transition.
    let a = attr(State::Sqe, State::Sqd);
    assert_eq!(
        check(Type::Ud, State::Sqe, m!(STATE), &a),
        Err(TransitionError::Illegal {
            qp_type: Type::Ud,
            from: State::Sqe,
            to: State::Sqd
        })
    );
}

#[test]
fn unknown_target_state_is_illegal() {
    let mut a = attr(State::Init, State::Rtr);
    a.qp_state = 7;
    let err = check(Type::Ud, State::Init, m!(STATE), &a).unwrap_err();
    assert!(
        matches!(
            err,
            TransitionError::Illegal {
                qp_type: Type::Ud,
                from: State::Init,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.offending_bits(), AttrMask::STATE);
}

#[test]
fn offending_bits_name_every_bit_at_fault() {
    // All six RC INIT -> RTR requirements missing at once.
    let a = attr(State::Init, State::Rtr);
    let err = check(Type::Rc, State::Init, m!(STATE), &a).unwrap_err();
    let six = m!(AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC | MIN_RNR_TIMER);
    assert_eq!(
        err,
        TransitionError::Missing {
            qp_type: Type::Rc,
            from: State::Init,
            to: State::Rtr,
            missing: six
        }
    );
    assert_eq!(err.offending_bits(), six);
    // Two foreign bits at once.
    let a = attr(State::Reset, State::Init);
    let extra = m!(QKEY | SQ_PSN);
    let err = check(
        Type::Rc,
        State::Reset,
        m!(STATE | PKEY_INDEX | PORT | ACCESS_FLAGS) | extra,
        &a,
    )
    .unwrap_err();
    assert_eq!(
        err,
        TransitionError::NotAllowed {
            qp_type: Type::Rc,
            from: State::Reset,
            to: State::Init,
            extra
        }
    );
    assert_eq!(err.offending_bits(), extra);
    // Missing and foreign together: vrdma reports the missing ones first.
    let err = check(Type::Ud, State::Reset, m!(STATE | PORT | SQ_PSN), &a).unwrap_err();
    assert_eq!(err.offending_bits(), m!(PKEY_INDEX | QKEY));
    assert!(matches!(err, TransitionError::Missing { .. }), "{err:?}");
}

/// Runs one step of a connection sequence: the mask is legal, the values valid, and the QP
/// ends in `to`.
fn step(qp_type: Type, from: State, mask: AttrMask, a: &Attr) -> State {
    assert_eq!(a.validate(mask), Ok(()), "{qp_type:?} {from:?}: {mask:?}");
    check(qp_type, from, mask, a).unwrap_or_else(|e| panic!("{qp_type:?} {from:?}: {e}"))
}

#[test]
fn rc_connection_sequence() {
    let to_init = m!(STATE | PKEY_INDEX | PORT | ACCESS_FLAGS);
    let to_rtr = m!(STATE | AV | PATH_MTU | DEST_QPN | RQ_PSN | MAX_DEST_RD_ATOMIC | MIN_RNR_TIMER);
    let to_rts = m!(STATE | TIMEOUT | RETRY_CNT | RNR_RETRY | SQ_PSN | MAX_QP_RD_ATOMIC);
    // The textbook masks are exactly the kernel's required sets.
    for (from, to, mask) in [
        (State::Reset, State::Init, to_init),
        (State::Init, State::Rtr, to_rtr),
        (State::Rtr, State::Rts, to_rts),
    ] {
        let (req, _) = kernel_rule(Type::Rc, from, to).unwrap();
        assert_eq!(req | AttrMask::STATE, mask);
    }

    let mut s = State::Reset;
    s = step(Type::Rc, s, to_init, &attr(s, State::Init));
    assert_eq!(s, State::Init);
    s = step(Type::Rc, s, to_rtr, &attr(s, State::Rtr));
    assert_eq!(s, State::Rtr);
    s = step(Type::Rc, s, to_rts, &attr(s, State::Rts));
    assert_eq!(s, State::Rts);
    // Drain, adjust a path attribute in SQD, resume, then tear down.
    s = step(
        Type::Rc,
        s,
        m!(STATE | EN_SQD_ASYNC_NOTIFY),
        &attr(s, State::Sqd),
    );
    assert_eq!(s, State::Sqd);
    s = step(
        Type::Rc,
        s,
        m!(STATE | TIMEOUT | RETRY_CNT),
        &attr(s, State::Sqd),
    );
    assert_eq!(s, State::Sqd);
    s = step(Type::Rc, s, m!(STATE | CUR_STATE), &attr(s, State::Rts));
    assert_eq!(s, State::Rts);
    s = step(Type::Rc, s, m!(STATE), &attr(s, State::Err));
    assert_eq!(s, State::Err);
    s = step(Type::Rc, s, m!(STATE), &attr(s, State::Reset));
    assert_eq!(s, State::Reset);

    // UD-style masks are wrong for RC.
    let a = attr(State::Reset, State::Init);
    assert_eq!(
        check(
            Type::Rc,
            State::Reset,
            m!(STATE | PKEY_INDEX | PORT | QKEY),
            &a
        ),
        Err(TransitionError::Missing {
            qp_type: Type::Rc,
            from: State::Reset,
            to: State::Init,
            missing: m!(ACCESS_FLAGS)
        })
    );
    let a = attr(State::Rtr, State::Rts);
    assert_eq!(
        check(Type::Rc, State::Rtr, m!(STATE | SQ_PSN), &a),
        Err(TransitionError::Missing {
            qp_type: Type::Rc,
            from: State::Rtr,
            to: State::Rts,
            missing: m!(TIMEOUT | RETRY_CNT | RNR_RETRY | MAX_QP_RD_ATOMIC)
        })
    );
}

#[test]
fn ud_connection_sequence() {
    let to_init = m!(STATE | PKEY_INDEX | PORT | QKEY);
    let to_rtr = m!(STATE);
    let to_rts = m!(STATE | SQ_PSN);
    for (from, to, mask) in [
        (State::Reset, State::Init, to_init),
        (State::Init, State::Rtr, to_rtr),
        (State::Rtr, State::Rts, to_rts),
    ] {
        let (req, _) = kernel_rule(Type::Ud, from, to).unwrap();
        assert_eq!(req | AttrMask::STATE, mask);
    }

    let mut s = State::Reset;
    s = step(Type::Ud, s, to_init, &attr(s, State::Init));
    assert_eq!(s, State::Init);
    s = step(Type::Ud, s, to_rtr, &attr(s, State::Rtr));
    assert_eq!(s, State::Rtr);
    s = step(Type::Ud, s, to_rts, &attr(s, State::Rts));
    assert_eq!(s, State::Rts);
    s = step(Type::Ud, s, m!(QKEY), &attr(s, State::Rts));
    assert_eq!(s, State::Rts);

    // RC attributes are foreign to UD.
    let a = attr(State::Init, State::Rtr);
    assert_eq!(
        check(Type::Ud, State::Init, m!(STATE | AV | DEST_QPN), &a),
        Err(TransitionError::NotAllowed {
            qp_type: Type::Ud,
            from: State::Init,
            to: State::Rtr,
            extra: m!(AV | DEST_QPN)
        })
    );
    let a = attr(State::Reset, State::Init);
    assert_eq!(
        check(
            Type::Ud,
            State::Reset,
            m!(STATE | PKEY_INDEX | PORT | ACCESS_FLAGS),
            &a
        ),
        Err(TransitionError::Missing {
            qp_type: Type::Ud,
            from: State::Reset,
            to: State::Init,
            missing: m!(QKEY)
        })
    );
}

// ---- Attr::validate ----

/// Every defined attribute bit.
fn full_mask() -> AttrMask {
    ALL_BITS.into_iter().fold(AttrMask::empty(), |m, b| m | b)
}

#[test]
fn validate_accepts_good_values_under_every_bit() {
    assert_eq!(full_mask(), AttrMask::all());
    let a = attr(State::Rtr, State::Rts);
    assert_eq!(a.validate(full_mask()), Ok(()));
    for bit in ALL_BITS {
        assert_eq!(a.validate(bit), Ok(()), "{bit:?}");
    }
    // Boundary values are in range.
    let mut b = a;
    b.rq_psn = qp::MAX_PSN.into();
    b.sq_psn = qp::MAX_PSN.into();
    b.dest_qp_num = qp::MAX_QPN.into();
    b.timeout = 31;
    b.min_rnr_timer = 31;
    b.retry_cnt = 7;
    b.rnr_retry = 7;
    b.path_mtu = Mtu::Mtu4096.raw();
    b.en_sqd_async_notify = 0;
    assert_eq!(b.validate(full_mask()), Ok(()));
}

/// One bad field per case: the error names it when its bit is in the mask, and nothing is
/// said when the bit is absent (even with every other bit present).
#[test]
fn validate_checks_only_fields_in_the_mask() {
    type Case = (AttrMask, fn(&mut Attr), DecodeError);
    let psn = |field| DecodeError::TooLarge {
        field,
        value: 1 << 24,
        max: u64::from(qp::MAX_PSN),
    };
    let cases: Vec<Case> = vec![
        (
            m!(RQ_PSN),
            |a| a.rq_psn = (1 << 24).into(),
            psn("qp_attr.rq_psn"),
        ),
        (
            m!(SQ_PSN),
            |a| a.sq_psn = (1 << 24).into(),
            psn("qp_attr.sq_psn"),
        ),
        (
            m!(DEST_QPN),
            |a| a.dest_qp_num = (1 << 24).into(),
            psn("qp_attr.dest_qp_num"),
        ),
        (
            m!(TIMEOUT),
            |a| a.timeout = 32,
            DecodeError::TooLarge {
                field: "qp_attr.timeout",
                value: 32,
                max: 31,
            },
        ),
        (
            m!(RETRY_CNT),
            |a| a.retry_cnt = 8,
            DecodeError::TooLarge {
                field: "qp_attr.retry_cnt",
                value: 8,
                max: 7,
            },
        ),
        (
            m!(RNR_RETRY),
            |a| a.rnr_retry = 8,
            DecodeError::TooLarge {
                field: "qp_attr.rnr_retry",
                value: 8,
                max: 7,
            },
        ),
        (
            m!(MIN_RNR_TIMER),
            |a| a.min_rnr_timer = 32,
            DecodeError::TooLarge {
                field: "qp_attr.min_rnr_timer",
                value: 32,
                max: 31,
            },
        ),
        (
            m!(PKEY_INDEX),
            |a| a.pkey_index = 1.into(),
            DecodeError::TooLarge {
                field: "qp_attr.pkey_index",
                value: 1,
                max: 0,
            },
        ),
        (
            m!(PORT),
            |a| a.port_num = 2,
            DecodeError::UnknownValue {
                field: "qp_attr.port_num",
                value: 2,
            },
        ),
        (
            m!(PORT),
            |a| a.port_num = 0,
            DecodeError::UnknownValue {
                field: "qp_attr.port_num",
                value: 0,
            },
        ),
        (
            m!(PATH_MTU),
            |a| a.path_mtu = 0,
            DecodeError::UnknownValue {
                field: "mtu",
                value: 0,
            },
        ),
        (
            m!(PATH_MTU),
            |a| a.path_mtu = 6,
            DecodeError::UnknownValue {
                field: "mtu",
                value: 6,
            },
        ),
        (
            m!(STATE),
            |a| a.qp_state = 7,
            DecodeError::UnknownValue {
                field: "qp state",
                value: 7,
            },
        ),
        (
            m!(CUR_STATE),
            |a| a.cur_qp_state = 0xff,
            DecodeError::UnknownValue {
                field: "qp state",
                value: 0xff,
            },
        ),
        (
            m!(PATH_MIG_STATE),
            |a| a.path_mig_state = 3,
            DecodeError::UnknownValue {
                field: "path migration state",
                value: 3,
            },
        ),
        (
            m!(EN_SQD_ASYNC_NOTIFY),
            |a| a.en_sqd_async_notify = 2,
            DecodeError::UnknownValue {
                field: "qp_attr.en_sqd_async_notify",
                value: 2,
            },
        ),
        (
            m!(ACCESS_FLAGS),
            |a| a.qp_access_flags = (Access::LOCAL_WRITE.bits() | 1 << 4).into(),
            DecodeError::ReservedBits {
                field: "qp_attr.qp_access_flags",
                bits: 1 << 4,
            },
        ),
        (
            m!(AV),
            |a| a.ah_attr.is_global = 0,
            DecodeError::Inconsistent {
                field: "ah_attr.is_global",
                reason: "RoCE addresses must carry a GRH (is_global = 1)",
            },
        ),
        (
            m!(AV),
            |a| a.ah_attr.port_num = 2,
            DecodeError::UnknownValue {
                field: "ah_attr.port_num",
                value: 2,
            },
        ),
        (
            m!(AV),
            |a| a.ah_attr.sl = 16,
            DecodeError::TooLarge {
                field: "ah_attr.sl",
                value: 16,
                max: 15,
            },
        ),
        (
            m!(AV),
            |a| a.ah_attr.flow_label = (1 << 20).into(),
            DecodeError::TooLarge {
                field: "ah_attr.flow_label",
                value: 1 << 20,
                max: (1 << 20) - 1,
            },
        ),
    ];
    for (bit, spoil, want) in cases {
        let mut a = attr(State::Init, State::Rtr);
        spoil(&mut a);
        assert_eq!(a.validate(bit), Err(want), "{bit:?} alone");
        assert_eq!(
            a.validate(bit | AttrMask::STATE),
            Err(want),
            "{bit:?} with STATE"
        );
        let others = full_mask() - bit;
        assert_eq!(a.validate(others), Ok(()), "everything but {bit:?}");
        assert_eq!(a.validate(AttrMask::empty()), Ok(()), "{bit:?}: empty mask");
    }
}

#[test]
fn validate_ignores_garbage_outside_the_mask() {
    // Every checked field out of range at once; only reserved fields are zero.
    let a = Attr {
        qp_state: 0xee,
        cur_qp_state: 0xee,
        path_mtu: 0xee,
        path_mig_state: 0xee,
        en_sqd_async_notify: 0xee,
        rq_psn: u32::MAX.into(),
        sq_psn: u32::MAX.into(),
        dest_qp_num: u32::MAX.into(),
        qp_access_flags: u32::MAX.into(),
        pkey_index: u16::MAX.into(),
        port_num: 0xee,
        timeout: 0xee,
        retry_cnt: 0xee,
        rnr_retry: 0xee,
        min_rnr_timer: 0xee,
        ..Attr::default()
    };
    // ah_attr is all zero: is_global = 0.
    assert_eq!(a.validate(AttrMask::empty()), Ok(()));
    // Each bit whose value vrdma checks finds its field bad.
    let checked = [
        AttrMask::STATE,
        AttrMask::CUR_STATE,
        AttrMask::EN_SQD_ASYNC_NOTIFY,
        AttrMask::ACCESS_FLAGS,
        AttrMask::PKEY_INDEX,
        AttrMask::PORT,
        AttrMask::AV,
        AttrMask::PATH_MTU,
        AttrMask::TIMEOUT,
        AttrMask::RETRY_CNT,
        AttrMask::RNR_RETRY,
        AttrMask::RQ_PSN,
        AttrMask::MIN_RNR_TIMER,
        AttrMask::SQ_PSN,
        AttrMask::PATH_MIG_STATE,
        AttrMask::DEST_QPN,
    ];
    for bit in checked {
        assert!(a.validate(bit).is_err(), "{bit:?}");
    }
}

#[test]
fn validate_requires_zero_reserved_fields_whatever_the_mask() {
    let mut a = attr(State::Reset, State::Init);
    a.reserved0 = 1.into();
    assert_eq!(
        a.validate(AttrMask::empty()),
        Err(DecodeError::ReservedNonZero {
            field: "qp_attr.reserved0"
        })
    );
    let mut a = attr(State::Reset, State::Init);
    a.reserved1 = [0, 0, 1];
    assert_eq!(
        a.validate(AttrMask::STATE),
        Err(DecodeError::ReservedNonZero {
            field: "qp_attr.reserved1"
        })
    );
}

#[test]
fn the_rc_connect_masks_are_exactly_what_each_step_requires() {
    let steps = [
        (State::Reset, State::Init, AttrMask::RC_INIT),
        (State::Init, State::Rtr, AttrMask::RC_RTR),
        (State::Rtr, State::Rts, AttrMask::RC_RTS),
    ];
    for (from, to, mask) in steps {
        let a = attr(from, to);
        assert_eq!(
            qp::check_transition(Type::Rc, from, mask, &a),
            Ok(to),
            "{from:?} -> {to:?}"
        );
        // Nothing in the mask is optional: without any one bit the step is refused.
        for bit in (mask - AttrMask::STATE).iter() {
            assert!(
                matches!(
                    qp::check_transition(Type::Rc, from, mask - bit, &a),
                    Err(TransitionError::Missing { .. })
                ),
                "{from:?} -> {to:?} without {bit:?}"
            );
        }
    }
}
