//! Encode/decode round trips and rejection of malformed input for every decoder of the
//! protocol, plus a property test that no decoder panics on arbitrary bytes.
//!
//! Expected values are derived from the protocol's definitions (field layouts, limits, the
//! formulas documented in the modules), never copied from a run of the code.

use std::fmt::Debug;

use vrdma_proto::cmd::{self, Opcode, Request};
use vrdma_proto::config::{self, Mtu};
use vrdma_proto::cqe::{self, Cqe};
use vrdma_proto::doorbell;
use vrdma_proto::event;
use vrdma_proto::mr::{self, Access};
use vrdma_proto::qp::{self, AttrMask};
use vrdma_proto::queue::{self, Role};
use vrdma_proto::ring::{self, Geometry};
use vrdma_proto::wqe::{self, Data, Limits, Payload, SendFlags, SendHeader, Sge};
use vrdma_proto::{DecodeError, Gid};
use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32, U64};

/// Asserts that `$res` is an `Err` matching `$pat`, printing what it was otherwise.
macro_rules! assert_err {
    ($res:expr, $pat:pat $(if $guard:expr)? $(,)?) => {
        match $res {
            Err($pat) $(if $guard)? => {}
            other => panic!(
                "expected Err({}), got {:?} at {}:{}",
                stringify!($pat),
                other,
                file!(),
                line!()
            ),
        }
    };
}

/// The error of a result that must have failed.
fn error<T: Debug>(res: Result<T, DecodeError>) -> DecodeError {
    match res {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

// ======================================================================================
// Control commands
// ======================================================================================

/// Header for `op` followed by `body`.
fn command(op: Opcode, body: &[u8]) -> Vec<u8> {
    let mut bytes = cmd::header(op).as_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// A `REG_MR` command followed by its page list.
fn reg_mr_command(body: &cmd::RegMr, pages: &[u64]) -> Vec<u8> {
    let mut bytes = command(Opcode::RegMr, body.as_bytes());
    for page in pages {
        bytes.extend_from_slice(&page.to_le_bytes());
    }
    bytes
}

/// A well-formed `REG_MR` body: 0x2000 bytes starting 0x10 into the first 4 KiB page, so
/// `ceil((0x10 + 0x2000) / 0x1000) = 3` pages.
fn reg_mr_body() -> cmd::RegMr {
    cmd::RegMr {
        pdn: U32::new(7),
        access: U32::new((Access::LOCAL_WRITE | Access::REMOTE_READ).bits()),
        iova: U64::new(0x7f00_0000_1010),
        length: U64::new(0x2000),
        first_page_offset: U32::new(0x10),
        npages: U32::new(3),
        page_shift: 12,
        reserved: [0; 7],
    }
}

const REG_MR_PAGES: [u64; 3] = [0x1_0000_0000, 0x5000, 0x7_ffff_f000];

fn caps() -> qp::Caps {
    qp::Caps {
        max_send_wr: U32::new(64),
        max_recv_wr: U32::new(128),
        max_send_sge: U32::new(4),
        max_recv_sge: U32::new(2),
        max_inline_data: U32::new(64),
        reserved: U32::new(0),
    }
}

fn create_qp_body() -> cmd::CreateQp {
    cmd::CreateQp {
        pdn: U32::new(1),
        qp_type: qp::Type::Rc.raw(),
        sq_sig_all: 0,
        reserved: U16::new(0),
        send_cqn: U32::new(3),
        recv_cqn: U32::new(4),
        cap: caps(),
        sq_ring_addr: U64::new(0x1_0000),
        rq_ring_addr: U64::new(0x2_0040),
        srqn: U32::new(0),
        reserved1: U32::new(0),
    }
}

fn create_srq_body() -> cmd::CreateSrq {
    cmd::CreateSrq {
        pdn: U32::new(1),
        max_wr: U32::new(256),
        max_sge: U32::new(4),
        srq_limit: U32::new(16),
        ring_addr: U64::new(0x3_0000),
    }
}

fn ah_attr() -> qp::AhAttr {
    qp::AhAttr {
        dgid: Gid::from_ipv4([10, 0, 0, 2]),
        flow_label: U32::new(0x1234),
        sgid_index: 0,
        hop_limit: 64,
        traffic_class: 0,
        sl: 3,
        is_global: 1,
        port_num: 1,
        dlid: U16::new(0),
        src_path_bits: 0,
        static_rate: 0,
        reserved: [0; 2],
    }
}

fn create_ah_body() -> cmd::CreateAh {
    cmd::CreateAh {
        pdn: U32::new(2),
        reserved: U32::new(0),
        attr: ah_attr(),
    }
}

/// Attributes valid for every field `qp::Attr::validate` looks at, whatever the mask: an RC
/// INIT → RTR with a full set of values.
fn qp_attr() -> qp::Attr {
    qp::Attr {
        qp_state: qp::State::Rtr.raw(),
        cur_qp_state: qp::State::Init.raw(),
        path_mtu: Mtu::Mtu1024.raw(),
        path_mig_state: qp::MigState::Migrated.raw(),
        en_sqd_async_notify: 1,
        sq_draining: 0,
        max_rd_atomic: 4,
        max_dest_rd_atomic: 4,
        qkey: U32::new(0x1111_1111),
        rq_psn: U32::new(qp::MAX_PSN),
        sq_psn: U32::new(0),
        dest_qp_num: U32::new(0x12),
        qp_access_flags: U32::new(Access::all().bits()),
        pkey_index: U16::new(0),
        reserved0: U16::new(0),
        port_num: 1,
        timeout: 14,
        retry_cnt: 7,
        rnr_retry: 7,
        min_rnr_timer: 31,
        reserved1: [0; 3],
        ah_attr: ah_attr(),
    }
}

fn modify_qp(mask: AttrMask, attr: qp::Attr) -> Vec<u8> {
    let body = cmd::ModifyQp {
        qpn: U32::new(0x42),
        attr_mask: U32::new(mask.bits()),
        attr,
    };
    command(Opcode::ModifyQp, body.as_bytes())
}

/// Body sizes of the commands with a fixed-size body, and the name their decoder reports.
const FIXED_BODIES: [(Opcode, usize, &str); 19] = [
    (Opcode::QueryPort, 8, "QUERY_PORT"),
    (Opcode::QueryGid, 8, "QUERY_GID"),
    (Opcode::DeallocPd, 8, "DEALLOC_PD"),
    (Opcode::DeregMr, 8, "DEREG_MR"),
    (Opcode::CreateCq, 16, "CREATE_CQ"),
    (Opcode::DestroyCq, 8, "DESTROY_CQ"),
    (Opcode::ReqNotifyCq, 8, "REQ_NOTIFY_CQ"),
    (Opcode::CreateQp, 64, "CREATE_QP"),
    (Opcode::ModifyQp, 80, "MODIFY_QP"),
    (Opcode::QueryQp, 8, "QUERY_QP"),
    (Opcode::DestroyQp, 8, "DESTROY_QP"),
    (Opcode::PostRecv, 8, "POST_RECV"),
    (Opcode::CreateAh, 40, "CREATE_AH"),
    (Opcode::DestroyAh, 8, "DESTROY_AH"),
    (Opcode::CreateSrq, 24, "CREATE_SRQ"),
    (Opcode::ModifySrq, 16, "MODIFY_SRQ"),
    (Opcode::QuerySrq, 8, "QUERY_SRQ"),
    (Opcode::DestroySrq, 8, "DESTROY_SRQ"),
    (Opcode::PostSrqRecv, 8, "POST_SRQ_RECV"),
];

/// Commands whose body is a `cmd::Handle`, with the request they decode to.
type HandleRequest = fn(u32) -> Request<'static>;

const HANDLE_COMMANDS: [(Opcode, HandleRequest); 10] = [
    (Opcode::DeallocPd, Request::DeallocPd),
    (Opcode::DeregMr, Request::DeregMr),
    (Opcode::DestroyCq, Request::DestroyCq),
    (Opcode::QueryQp, Request::QueryQp),
    (Opcode::DestroyQp, Request::DestroyQp),
    (Opcode::PostRecv, Request::PostRecv),
    (Opcode::DestroyAh, Request::DestroyAh),
    (Opcode::QuerySrq, Request::QuerySrq),
    (Opcode::DestroySrq, Request::DestroySrq),
    (Opcode::PostSrqRecv, Request::PostSrqRecv),
];

#[test]
fn cmd_no_body_commands() {
    assert_eq!(
        cmd::decode(&command(Opcode::QueryDevice, &[])),
        Ok(Request::QueryDevice)
    );
    assert_eq!(
        cmd::decode(&command(Opcode::AllocPd, &[])),
        Ok(Request::AllocPd)
    );
    assert_eq!(
        cmd::decode(&command(Opcode::QueryDevice, &[0])),
        Err(DecodeError::Trailing {
            what: "QUERY_DEVICE",
            extra: 1
        })
    );
    assert_eq!(
        cmd::decode(&command(Opcode::AllocPd, &[0; 8])),
        Err(DecodeError::Trailing {
            what: "ALLOC_PD",
            extra: 8
        })
    );
}

#[test]
fn cmd_query_port_and_gid() {
    let q = cmd::QueryPort {
        port_num: 1,
        reserved: [0; 7],
    };
    let bytes = command(Opcode::QueryPort, q.as_bytes());
    let req = cmd::decode(&bytes).unwrap();
    assert_eq!(req, Request::QueryPort(q));
    assert_eq!(req.opcode(), Opcode::QueryPort);

    let g = cmd::QueryGid {
        port_num: 1,
        reserved: [0; 3],
        index: U32::new(5),
    };
    let bytes = command(Opcode::QueryGid, g.as_bytes());
    let req = cmd::decode(&bytes).unwrap();
    match req {
        Request::QueryGid(got) => {
            assert_eq!(got.port_num, 1);
            assert_eq!(got.index.get(), 5);
        }
        other => panic!("decoded as {other:?}"),
    }

    for i in 0..7 {
        let mut bad = q;
        bad.reserved[i] = 1;
        assert_eq!(
            cmd::decode(&command(Opcode::QueryPort, bad.as_bytes())),
            Err(DecodeError::ReservedNonZero {
                field: "QUERY_PORT reserved"
            })
        );
    }
    for i in 0..3 {
        let mut bad = g;
        bad.reserved[i] = 0x80;
        assert_eq!(
            cmd::decode(&command(Opcode::QueryGid, bad.as_bytes())),
            Err(DecodeError::ReservedNonZero {
                field: "QUERY_GID reserved"
            })
        );
    }
}

#[test]
fn cmd_handle_commands() {
    for (op, request) in HANDLE_COMMANDS {
        let body = cmd::Handle {
            handle: U32::new(0xdead_beef),
            reserved: U32::new(0),
        };
        let bytes = command(op, body.as_bytes());
        let req = cmd::decode(&bytes).unwrap();
        assert_eq!(req, request(0xdead_beef), "{op:?}");
        assert_eq!(req.opcode(), op);

        let bad = cmd::Handle {
            handle: U32::new(1),
            reserved: U32::new(1 << 31),
        };
        assert_eq!(
            cmd::decode(&command(op, bad.as_bytes())),
            Err(DecodeError::ReservedNonZero {
                field: "handle reserved"
            }),
            "{op:?}"
        );
    }
}

#[test]
fn cmd_reg_mr_with_page_list() {
    let body = reg_mr_body();
    let bytes = reg_mr_command(&body, &REG_MR_PAGES);
    let req = cmd::decode(&bytes).unwrap();
    assert_eq!(req.opcode(), Opcode::RegMr);
    let Request::RegMr { cmd, access, pages } = req else {
        panic!("decoded as {req:?}");
    };
    assert_eq!(cmd, body);
    assert_eq!(access, Access::LOCAL_WRITE | Access::REMOTE_READ);
    assert_eq!(pages.len(), 3);
    assert!(!pages.is_empty());
    assert_eq!(pages.page_shift(), 12);
    assert_eq!(pages.iter().len(), 3);
    assert_eq!(pages.iter().collect::<Vec<_>>(), REG_MR_PAGES);
}

#[test]
fn cmd_reg_mr_page_size_boundaries() {
    // The smallest and largest page sizes, each with a one-byte region.
    for shift in [mr::MIN_PAGE_SHIFT, mr::MAX_PAGE_SHIFT] {
        let page_size = 1u64 << shift;
        let body = cmd::RegMr {
            length: U64::new(1),
            first_page_offset: U32::new((page_size - 1) as u32),
            npages: U32::new(1),
            page_shift: shift,
            ..reg_mr_body()
        };
        let bytes = reg_mr_command(&body, &[page_size * 3]);
        let Ok(Request::RegMr { pages, .. }) = cmd::decode(&bytes) else {
            panic!("shift {shift} rejected: {:?}", cmd::decode(&bytes));
        };
        assert_eq!(pages.page_shift(), shift);
        assert_eq!(pages.iter().collect::<Vec<_>>(), [page_size * 3]);
    }
    // A region that ends exactly on a page boundary needs no extra page:
    // offset 0x800 + length 0x1800 = 0x2000 = 2 pages.
    let body = cmd::RegMr {
        length: U64::new(0x1800),
        first_page_offset: U32::new(0x800),
        npages: U32::new(2),
        ..reg_mr_body()
    };
    assert!(cmd::decode(&reg_mr_command(&body, &[0x1000, 0x2000])).is_ok());
    // The region may end at the very top of the iova space.
    let body = cmd::RegMr {
        iova: U64::new(u64::MAX - 0xfff),
        length: U64::new(0x1000),
        first_page_offset: U32::new(0),
        npages: U32::new(1),
        ..reg_mr_body()
    };
    assert!(cmd::decode(&reg_mr_command(&body, &[0x1000])).is_ok());
    // No access at all, or remote read alone, needs no local write.
    for access in [Access::empty(), Access::REMOTE_READ, Access::all()] {
        let body = cmd::RegMr {
            access: U32::new(access.bits()),
            ..reg_mr_body()
        };
        let Ok(Request::RegMr { access: got, .. }) =
            cmd::decode(&reg_mr_command(&body, &REG_MR_PAGES))
        else {
            panic!("access {access:?} rejected");
        };
        assert_eq!(got, access);
    }
}

#[test]
fn cmd_reg_mr_max_page_list() {
    // Exactly MAX_PAGE_LIST 4 KiB pages is allowed...
    let n = cmd::MAX_PAGE_LIST;
    let body = cmd::RegMr {
        iova: U64::new(0),
        length: U64::new(u64::from(n) << 12),
        first_page_offset: U32::new(0),
        npages: U32::new(n),
        page_shift: 12,
        ..reg_mr_body()
    };
    let pages: Vec<u64> = (0..u64::from(n)).map(|i| i << 12).collect();
    let bytes = reg_mr_command(&body, &pages);
    let Ok(Request::RegMr { pages: list, .. }) = cmd::decode(&bytes) else {
        panic!("MAX_PAGE_LIST pages rejected");
    };
    assert_eq!(list.len(), n as usize);
    assert!(list.iter().eq(pages.iter().copied()));

    // ...one more is not, whatever follows (the decoder must not look at the list first).
    let body = cmd::RegMr {
        length: U64::new(u64::from(n + 1) << 12),
        npages: U32::new(n + 1),
        ..body
    };
    assert_eq!(
        cmd::decode(&reg_mr_command(&body, &[])),
        Err(DecodeError::TooLarge {
            field: "REG_MR npages",
            value: u64::from(n) + 1,
            max: u64::from(n),
        })
    );
}

#[test]
fn cmd_reg_mr_rejections() {
    let ok = reg_mr_body();
    let decode = |body: cmd::RegMr, pages: &[u64]| {
        let bytes = reg_mr_command(&body, pages);
        cmd::decode(&bytes).map(|r| r.opcode())
    };
    assert_eq!(decode(ok, &REG_MR_PAGES), Ok(Opcode::RegMr));

    // Reserved bytes.
    for i in 0..7 {
        let mut body = ok;
        body.reserved[i] = 1;
        assert_eq!(
            decode(body, &REG_MR_PAGES),
            Err(DecodeError::ReservedNonZero {
                field: "REG_MR reserved"
            })
        );
    }
    // Undefined access bits.
    for bits in [1u32 << 4, 1 << 31, 0xffff_fff0] {
        let body = cmd::RegMr {
            access: U32::new(Access::LOCAL_WRITE.bits() | bits),
            ..ok
        };
        assert_eq!(
            decode(body, &REG_MR_PAGES),
            Err(DecodeError::ReservedBits {
                field: "REG_MR access",
                bits: bits.into()
            })
        );
    }
    // Remote write or atomic without local write.
    for access in [
        Access::REMOTE_WRITE,
        Access::REMOTE_ATOMIC,
        Access::REMOTE_WRITE | Access::REMOTE_READ,
        Access::REMOTE_ATOMIC | Access::REMOTE_WRITE | Access::REMOTE_READ,
    ] {
        let body = cmd::RegMr {
            access: U32::new(access.bits()),
            ..ok
        };
        assert_err!(
            decode(body, &REG_MR_PAGES),
            DecodeError::Inconsistent {
                field: "REG_MR access",
                ..
            }
        );
    }
    // Page shift outside 12..=30.
    for shift in [0u8, 11, 31, 63, 64, 255] {
        let body = cmd::RegMr {
            page_shift: shift,
            ..ok
        };
        assert_eq!(
            decode(body, &REG_MR_PAGES),
            Err(DecodeError::UnknownValue {
                field: "REG_MR page_shift",
                value: shift.into()
            })
        );
    }
    // Zero length.
    let body = cmd::RegMr {
        length: U64::new(0),
        npages: U32::new(0),
        ..ok
    };
    assert_err!(
        decode(body, &[]),
        DecodeError::Inconsistent {
            field: "REG_MR length",
            ..
        }
    );
    // First page offset of a whole page or more.
    for offset in [0x1000u32, 0x1001, u32::MAX] {
        let body = cmd::RegMr {
            first_page_offset: U32::new(offset),
            ..ok
        };
        assert_eq!(
            decode(body, &REG_MR_PAGES),
            Err(DecodeError::TooLarge {
                field: "REG_MR first_page_offset",
                value: offset.into(),
                max: 0xfff
            })
        );
    }
    // npages must be exactly ceil((0x10 + 0x2000) / 0x1000) = 3.
    for (npages, list) in [
        (2u32, &REG_MR_PAGES[..2]),
        (4, &[0u64, 0x1000, 0x2000, 0x3000][..]),
    ] {
        let body = cmd::RegMr {
            npages: U32::new(npages),
            ..ok
        };
        assert_err!(
            decode(body, list),
            DecodeError::Inconsistent {
                field: "REG_MR npages",
                ..
            }
        );
    }
    // A page not aligned to the page size, anywhere in the list.
    for i in 0..3 {
        let mut pages = REG_MR_PAGES;
        pages[i] += 0x800;
        assert_eq!(
            decode(ok, &pages),
            Err(DecodeError::Misaligned {
                field: "REG_MR page",
                value: REG_MR_PAGES[i] + 0x800,
                align: 0x1000
            })
        );
    }
    // 4 KiB aligned is not enough for 2 MiB pages.
    let body = cmd::RegMr {
        page_shift: 21,
        npages: U32::new(1),
        ..ok
    };
    assert_eq!(
        decode(body, &[0x20_1000]),
        Err(DecodeError::Misaligned {
            field: "REG_MR page",
            value: 0x20_1000,
            align: 1 << 21
        })
    );
    // The last byte, iova + length - 1, must not wrap.
    let body = cmd::RegMr {
        iova: U64::new(u64::MAX - 0xfff),
        length: U64::new(0x1001),
        first_page_offset: U32::new(0),
        npages: U32::new(2),
        ..ok
    };
    assert_eq!(
        decode(body, &[0x1000, 0x2000]),
        Err(DecodeError::Overflow {
            field: "REG_MR iova"
        })
    );
    // first_page_offset + length must not wrap either.
    let body = cmd::RegMr {
        iova: U64::new(0),
        length: U64::new(u64::MAX),
        first_page_offset: U32::new(1),
        ..ok
    };
    assert_eq!(
        decode(body, &[]),
        Err(DecodeError::Overflow {
            field: "REG_MR length"
        })
    );
    // Page list one entry short, half an entry short, and one entry too long.
    assert_eq!(
        decode(ok, &REG_MR_PAGES[..2]),
        Err(DecodeError::Truncated {
            what: "REG_MR page list",
            need: 24,
            got: 16
        })
    );
    let mut bytes = reg_mr_command(&ok, &REG_MR_PAGES);
    bytes.truncate(bytes.len() - 4);
    assert_eq!(
        cmd::decode(&bytes),
        Err(DecodeError::Truncated {
            what: "REG_MR page list",
            need: 24,
            got: 20
        })
    );
    assert_eq!(
        decode(ok, &[0x1000, 0x2000, 0x3000, 0x4000]),
        Err(DecodeError::Trailing {
            what: "REG_MR page list",
            extra: 8
        })
    );
    let mut bytes = reg_mr_command(&ok, &REG_MR_PAGES);
    bytes.push(0);
    assert_eq!(
        cmd::decode(&bytes),
        Err(DecodeError::Trailing {
            what: "REG_MR page list",
            extra: 1
        })
    );
    // The fixed body itself truncated.
    assert_eq!(
        cmd::decode(&command(Opcode::RegMr, &ok.as_bytes()[..39])),
        Err(DecodeError::Truncated {
            what: "REG_MR",
            need: 40,
            got: 39
        })
    );
}

#[test]
fn cmd_create_cq() {
    let body = cmd::CreateCq {
        cqe: U32::new(256),
        reserved: U32::new(0),
        ring_addr: U64::new(0x8000_0040),
    };
    let bytes = command(Opcode::CreateCq, body.as_bytes());
    let req = cmd::decode(&bytes).unwrap();
    assert_eq!(req, Request::CreateCq(body));

    // Depths: powers of two from 1 to MAX_DEPTH.
    for depth in [1u32, 2, 64, ring::MAX_DEPTH] {
        let body = cmd::CreateCq {
            cqe: U32::new(depth),
            ..body
        };
        assert!(
            cmd::decode(&command(Opcode::CreateCq, body.as_bytes())).is_ok(),
            "{depth}"
        );
    }
    for depth in [0u32, 3, 100, (1 << 20) + 1, u32::MAX] {
        let body = cmd::CreateCq {
            cqe: U32::new(depth),
            ..body
        };
        assert_err!(
            cmd::decode(&command(Opcode::CreateCq, body.as_bytes())),
            DecodeError::Inconsistent {
                field: "CREATE_CQ cqe",
                ..
            }
        );
    }
    for depth in [ring::MAX_DEPTH << 1, 1 << 31] {
        let body = cmd::CreateCq {
            cqe: U32::new(depth),
            ..body
        };
        assert_eq!(
            cmd::decode(&command(Opcode::CreateCq, body.as_bytes())),
            Err(DecodeError::TooLarge {
                field: "CREATE_CQ cqe",
                value: depth.into(),
                max: ring::MAX_DEPTH.into()
            })
        );
    }
    // Ring address: not null, 64-byte aligned.
    let null = cmd::CreateCq {
        ring_addr: U64::new(0),
        ..body
    };
    assert_err!(
        cmd::decode(&command(Opcode::CreateCq, null.as_bytes())),
        DecodeError::Inconsistent {
            field: "CREATE_CQ ring_addr",
            ..
        }
    );
    for addr in [0x8000_0020u64, 0x1, 0x8000_0001, u64::MAX] {
        let bad = cmd::CreateCq {
            ring_addr: U64::new(addr),
            ..body
        };
        assert_eq!(
            cmd::decode(&command(Opcode::CreateCq, bad.as_bytes())),
            Err(DecodeError::Misaligned {
                field: "CREATE_CQ ring_addr",
                value: addr,
                align: 64
            })
        );
    }
    let bad = cmd::CreateCq {
        reserved: U32::new(1),
        ..body
    };
    assert_eq!(
        cmd::decode(&command(Opcode::CreateCq, bad.as_bytes())),
        Err(DecodeError::ReservedNonZero {
            field: "CREATE_CQ reserved"
        })
    );
}

#[test]
fn cmd_req_notify_cq() {
    for (flags, expected) in [
        (0u32, cmd::NotifyFlags::empty()),
        (1, cmd::NotifyFlags::SOLICITED_ONLY),
    ] {
        let body = cmd::ReqNotifyCq {
            cqn: U32::new(9),
            flags: U32::new(flags),
        };
        assert_eq!(
            cmd::decode(&command(Opcode::ReqNotifyCq, body.as_bytes())),
            Ok(Request::ReqNotifyCq {
                cqn: 9,
                flags: expected
            })
        );
    }
    for bits in [2u32, 1 << 31] {
        let body = cmd::ReqNotifyCq {
            cqn: U32::new(9),
            flags: U32::new(1 | bits),
        };
        assert_eq!(
            cmd::decode(&command(Opcode::ReqNotifyCq, body.as_bytes())),
            Err(DecodeError::ReservedBits {
                field: "REQ_NOTIFY_CQ flags",
                bits: bits.into()
            })
        );
    }
}

#[test]
fn cmd_create_qp() {
    let body = create_qp_body();
    let bytes = command(Opcode::CreateQp, body.as_bytes());
    let req = cmd::decode(&bytes).unwrap();
    assert_eq!(
        req,
        Request::CreateQp {
            cmd: body,
            qp_type: qp::Type::Rc
        }
    );
    // UD, sq_sig_all 1, and the protocol's largest SGE and inline limits.
    let ud = cmd::CreateQp {
        qp_type: qp::Type::Ud.raw(),
        sq_sig_all: 1,
        cap: qp::Caps {
            max_send_sge: U32::new(wqe::MAX_SGE),
            max_recv_sge: U32::new(wqe::MAX_SGE),
            max_inline_data: U32::new(wqe::MAX_INLINE),
            max_send_wr: U32::new(1),
            max_recv_wr: U32::new(ring::MAX_DEPTH),
            ..caps()
        },
        ..body
    };
    assert_eq!(
        cmd::decode(&command(Opcode::CreateQp, ud.as_bytes())),
        Ok(Request::CreateQp {
            cmd: ud,
            qp_type: qp::Type::Ud
        })
    );
}

#[test]
fn cmd_create_qp_rejections() {
    let ok = create_qp_body();
    let decode = |body: cmd::CreateQp| {
        cmd::decode(&command(Opcode::CreateQp, body.as_bytes())).map(|r| r.opcode())
    };

    // QP types verbs has but vrdma does not (UC = 3, XRC = 9...), and nonsense.
    for t in [0u8, 1, 3, 9, 10, 0xff] {
        assert_eq!(
            decode(cmd::CreateQp { qp_type: t, ..ok }),
            Err(DecodeError::UnknownValue {
                field: "qp type",
                value: t.into()
            })
        );
    }
    for s in [2u8, 0xff] {
        assert_eq!(
            decode(cmd::CreateQp {
                sq_sig_all: s,
                ..ok
            }),
            Err(DecodeError::UnknownValue {
                field: "CREATE_QP sq_sig_all",
                value: s.into()
            })
        );
    }
    assert_eq!(
        decode(cmd::CreateQp {
            reserved: U16::new(0x100),
            ..ok
        }),
        Err(DecodeError::ReservedNonZero {
            field: "CREATE_QP reserved"
        })
    );
    let mut bad = ok;
    bad.cap.reserved = U32::new(1);
    assert_eq!(
        decode(bad),
        Err(DecodeError::ReservedNonZero {
            field: "CREATE_QP cap.reserved"
        })
    );
    // SGE and inline limits.
    let mut bad = ok;
    bad.cap.max_send_sge = U32::new(wqe::MAX_SGE + 1);
    assert_eq!(
        decode(bad),
        Err(DecodeError::TooLarge {
            field: "max_send_sge",
            value: 33,
            max: 32
        })
    );
    let mut bad = ok;
    bad.cap.max_recv_sge = U32::new(u32::MAX);
    assert_eq!(
        decode(bad),
        Err(DecodeError::TooLarge {
            field: "max_recv_sge",
            value: u32::MAX.into(),
            max: 32
        })
    );
    let mut bad = ok;
    bad.cap.max_inline_data = U32::new(wqe::MAX_INLINE + 1);
    assert_eq!(
        decode(bad),
        Err(DecodeError::TooLarge {
            field: "max_inline_data",
            value: 1025,
            max: 1024
        })
    );
    // Ring depths.
    for depth in [0u32, 3, 96] {
        let mut bad = ok;
        bad.cap.max_send_wr = U32::new(depth);
        assert_err!(
            decode(bad),
            DecodeError::Inconsistent {
                field: "CREATE_QP max_send_wr",
                ..
            }
        );
        let mut bad = ok;
        bad.cap.max_recv_wr = U32::new(depth);
        assert_err!(
            decode(bad),
            DecodeError::Inconsistent {
                field: "CREATE_QP max_recv_wr",
                ..
            }
        );
    }
    let mut bad = ok;
    bad.cap.max_send_wr = U32::new(ring::MAX_DEPTH * 2);
    assert_err!(
        decode(bad),
        DecodeError::TooLarge {
            field: "CREATE_QP max_send_wr",
            ..
        }
    );
    // Ring addresses.
    let bad = cmd::CreateQp {
        sq_ring_addr: U64::new(0),
        ..ok
    };
    assert_err!(
        decode(bad),
        DecodeError::Inconsistent {
            field: "CREATE_QP sq_ring_addr",
            ..
        }
    );
    let bad = cmd::CreateQp {
        rq_ring_addr: U64::new(0x2_0008),
        ..ok
    };
    assert_eq!(
        decode(bad),
        Err(DecodeError::Misaligned {
            field: "CREATE_QP rq_ring_addr",
            value: 0x2_0008,
            align: 64
        })
    );
}

/// A QP attached to an SRQ names it in `srqn` and has no receive ring; a QP without one may
/// send the 56-byte body of devices that predate SRQs.
#[test]
fn cmd_create_qp_with_an_srq_and_the_short_form() {
    let with_srq = cmd::CreateQp {
        srqn: U32::new(0x0001_0003),
        rq_ring_addr: U64::new(0),
        cap: qp::Caps {
            max_recv_wr: U32::new(0),
            max_recv_sge: U32::new(0),
            ..caps()
        },
        ..create_qp_body()
    };
    assert_eq!(
        cmd::decode(&command(Opcode::CreateQp, with_srq.as_bytes())),
        Ok(Request::CreateQp {
            cmd: with_srq,
            qp_type: qp::Type::Rc
        })
    );
    let full = create_qp_body();
    let short = &full.as_bytes()[..cmd::CREATE_QP_BASE_SIZE];
    assert_eq!(short.len(), 56);
    assert_eq!(
        cmd::decode(&command(Opcode::CreateQp, short)),
        Ok(Request::CreateQp {
            cmd: create_qp_body(),
            qp_type: qp::Type::Rc
        }),
        "the short form reads as srqn 0"
    );
    // Between the two forms, or the short form of an SRQ QP (which cannot be written), is
    // truncated.
    assert_eq!(
        cmd::decode(&command(
            Opcode::CreateQp,
            &create_qp_body().as_bytes()[..60]
        )),
        Err(DecodeError::Truncated {
            what: "CREATE_QP",
            need: 64,
            got: 60
        })
    );
    // An SRQ QP with any part of a receive ring of its own.
    let mut rq_depth = with_srq;
    rq_depth.cap.max_recv_wr = U32::new(16);
    let mut rq_sge = with_srq;
    rq_sge.cap.max_recv_sge = U32::new(1);
    let rq_ring = cmd::CreateQp {
        rq_ring_addr: U64::new(0x2_0040),
        ..with_srq
    };
    for bad in [rq_depth, rq_sge, rq_ring] {
        assert_err!(
            cmd::decode(&command(Opcode::CreateQp, bad.as_bytes())),
            DecodeError::Inconsistent {
                field: "CREATE_QP srqn",
                ..
            }
        );
    }
    // Without an SRQ the receive ring is checked as before.
    let no_ring = cmd::CreateQp {
        rq_ring_addr: U64::new(0),
        ..create_qp_body()
    };
    assert_err!(
        cmd::decode(&command(Opcode::CreateQp, no_ring.as_bytes())),
        DecodeError::Inconsistent {
            field: "CREATE_QP rq_ring_addr",
            ..
        }
    );
    let bad = cmd::CreateQp {
        reserved1: U32::new(1),
        ..with_srq
    };
    assert_eq!(
        cmd::decode(&command(Opcode::CreateQp, bad.as_bytes())),
        Err(DecodeError::ReservedNonZero {
            field: "CREATE_QP reserved1"
        })
    );
}

#[test]
fn cmd_create_srq() {
    let body = create_srq_body();
    assert_eq!(
        cmd::decode(&command(Opcode::CreateSrq, body.as_bytes())),
        Ok(Request::CreateSrq(body))
    );
    // The bounds: one entry, no SGE, the protocol's largest depth and SGE count, a limit
    // equal to the depth.
    for (max_wr, max_sge, limit) in [(1, 0, 0), (ring::MAX_DEPTH, wqe::MAX_SGE, ring::MAX_DEPTH)] {
        let edge = cmd::CreateSrq {
            max_wr: U32::new(max_wr),
            max_sge: U32::new(max_sge),
            srq_limit: U32::new(limit),
            ..body
        };
        assert_eq!(
            cmd::decode(&command(Opcode::CreateSrq, edge.as_bytes())),
            Ok(Request::CreateSrq(edge))
        );
    }
}

#[test]
fn cmd_create_srq_rejections() {
    let ok = create_srq_body();
    let decode = |body: cmd::CreateSrq| {
        cmd::decode(&command(Opcode::CreateSrq, body.as_bytes())).map(|r| r.opcode())
    };
    for depth in [0u32, 3, 100] {
        assert_err!(
            decode(cmd::CreateSrq {
                max_wr: U32::new(depth),
                ..ok
            }),
            DecodeError::Inconsistent {
                field: "CREATE_SRQ max_wr",
                ..
            }
        );
    }
    assert_err!(
        decode(cmd::CreateSrq {
            max_wr: U32::new(ring::MAX_DEPTH * 2),
            ..ok
        }),
        DecodeError::TooLarge {
            field: "CREATE_SRQ max_wr",
            ..
        }
    );
    assert_eq!(
        decode(cmd::CreateSrq {
            max_sge: U32::new(wqe::MAX_SGE + 1),
            ..ok
        }),
        Err(DecodeError::TooLarge {
            field: "CREATE_SRQ max_sge",
            value: 33,
            max: 32
        })
    );
    assert_err!(
        decode(cmd::CreateSrq {
            srq_limit: U32::new(257),
            ..ok
        }),
        DecodeError::Inconsistent {
            field: "CREATE_SRQ srq_limit",
            ..
        }
    );
    assert_err!(
        decode(cmd::CreateSrq {
            ring_addr: U64::new(0),
            ..ok
        }),
        DecodeError::Inconsistent {
            field: "CREATE_SRQ ring_addr",
            ..
        }
    );
    assert_eq!(
        decode(cmd::CreateSrq {
            ring_addr: U64::new(0x3_0020),
            ..ok
        }),
        Err(DecodeError::Misaligned {
            field: "CREATE_SRQ ring_addr",
            value: 0x3_0020,
            align: 64
        })
    );
}

#[test]
fn cmd_modify_srq_masks() {
    let body = |mask: u32| cmd::ModifySrq {
        srqn: U32::new(9),
        attr_mask: U32::new(mask),
        max_wr: U32::new(1 << 30),
        srq_limit: U32::new(u32::MAX),
    };
    // Values are the device's to check against the SRQ; decoding looks only at the mask.
    for mask in [
        cmd::SrqAttrMask::empty(),
        cmd::SrqAttrMask::MAX_WR,
        cmd::SrqAttrMask::LIMIT,
        cmd::SrqAttrMask::all(),
    ] {
        let b = body(mask.bits());
        assert_eq!(
            cmd::decode(&command(Opcode::ModifySrq, b.as_bytes())),
            Ok(Request::ModifySrq { cmd: b, mask })
        );
    }
    for bits in [1u32 << 2, 1 << 31, u32::MAX] {
        assert_eq!(
            cmd::decode(&command(Opcode::ModifySrq, body(bits).as_bytes())),
            Err(DecodeError::ReservedBits {
                field: "MODIFY_SRQ attr_mask",
                bits: (bits & !3).into()
            })
        );
    }
}

#[test]
fn cmd_modify_qp() {
    let mask = AttrMask::STATE
        | AttrMask::AV
        | AttrMask::PATH_MTU
        | AttrMask::DEST_QPN
        | AttrMask::RQ_PSN
        | AttrMask::MAX_DEST_RD_ATOMIC
        | AttrMask::MIN_RNR_TIMER;
    let bytes = modify_qp(mask, qp_attr());
    let req = cmd::decode(&bytes).unwrap();
    let Request::ModifyQp { cmd, mask: got } = req else {
        panic!("decoded as {req:?}");
    };
    assert_eq!(got, mask);
    assert_eq!(cmd.qpn.get(), 0x42);
    assert_eq!(cmd.attr, qp_attr());

    // Every defined bit at once, with values valid for all of them.
    assert!(cmd::decode(&modify_qp(AttrMask::all(), qp_attr())).is_ok());
    // An empty mask looks at nothing but the reserved fields.
    let garbage = qp::Attr {
        qp_state: 0xff,
        cur_qp_state: 0xff,
        path_mtu: 0,
        path_mig_state: 9,
        en_sqd_async_notify: 9,
        rq_psn: U32::new(u32::MAX),
        sq_psn: U32::new(u32::MAX),
        dest_qp_num: U32::new(u32::MAX),
        qp_access_flags: U32::new(u32::MAX),
        pkey_index: U16::new(9),
        port_num: 9,
        timeout: 0xff,
        retry_cnt: 0xff,
        rnr_retry: 0xff,
        min_rnr_timer: 0xff,
        ah_attr: qp::AhAttr::default(),
        ..qp_attr()
    };
    assert!(cmd::decode(&modify_qp(AttrMask::empty(), garbage)).is_ok());
}

#[test]
fn cmd_modify_qp_undefined_mask_bits() {
    for bits in [1u32 << 21, 1 << 31, 0xffe0_0000] {
        let raw = AttrMask::STATE.bits() | bits;
        let body = cmd::ModifyQp {
            qpn: U32::new(1),
            attr_mask: U32::new(raw),
            attr: qp_attr(),
        };
        assert_eq!(
            cmd::decode(&command(Opcode::ModifyQp, body.as_bytes())),
            Err(DecodeError::ReservedBits {
                field: "MODIFY_QP attr_mask",
                bits: bits.into()
            })
        );
    }
}

#[test]
fn cmd_modify_qp_reserved_fields_checked_whatever_the_mask() {
    for mask in [AttrMask::empty(), AttrMask::all()] {
        let mut attr = qp_attr();
        attr.reserved0 = U16::new(1);
        assert_eq!(
            cmd::decode(&modify_qp(mask, attr)),
            Err(DecodeError::ReservedNonZero {
                field: "qp_attr.reserved0"
            })
        );
        for i in 0..3 {
            let mut attr = qp_attr();
            attr.reserved1[i] = 1;
            assert_eq!(
                cmd::decode(&modify_qp(mask, attr)),
                Err(DecodeError::ReservedNonZero {
                    field: "qp_attr.reserved1"
                })
            );
        }
    }
}

/// One bad attribute value: rejected when its bit is in the mask, ignored when it is not.
struct BadAttr {
    bit: AttrMask,
    set: fn(&mut qp::Attr),
    check: fn(&DecodeError) -> bool,
}

#[test]
fn cmd_modify_qp_values_checked_only_when_masked() {
    let cases = [
        BadAttr {
            bit: AttrMask::STATE,
            set: |a| a.qp_state = 7,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "qp state",
                    value: 7,
                }
            },
        },
        BadAttr {
            bit: AttrMask::CUR_STATE,
            set: |a| a.cur_qp_state = 0x80,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "qp state",
                    value: 0x80,
                }
            },
        },
        BadAttr {
            bit: AttrMask::PATH_MTU,
            set: |a| a.path_mtu = 0,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "mtu",
                    value: 0,
                }
            },
        },
        BadAttr {
            bit: AttrMask::PATH_MTU,
            set: |a| a.path_mtu = 6,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "mtu",
                    value: 6,
                }
            },
        },
        BadAttr {
            bit: AttrMask::PATH_MIG_STATE,
            set: |a| a.path_mig_state = 3,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "path migration state",
                    value: 3,
                }
            },
        },
        BadAttr {
            bit: AttrMask::EN_SQD_ASYNC_NOTIFY,
            set: |a| a.en_sqd_async_notify = 2,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "qp_attr.en_sqd_async_notify",
                    value: 2,
                }
            },
        },
        BadAttr {
            bit: AttrMask::RQ_PSN,
            set: |a| a.rq_psn = U32::new(1 << 24),
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.rq_psn",
                    value: 1 << 24,
                    max: (1 << 24) - 1,
                }
            },
        },
        BadAttr {
            bit: AttrMask::SQ_PSN,
            set: |a| a.sq_psn = U32::new(u32::MAX),
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.sq_psn",
                    value: u32::MAX.into(),
                    max: (1 << 24) - 1,
                }
            },
        },
        BadAttr {
            bit: AttrMask::DEST_QPN,
            set: |a| a.dest_qp_num = U32::new(0x0100_0000),
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.dest_qp_num",
                    value: 0x0100_0000,
                    max: (1 << 24) - 1,
                }
            },
        },
        BadAttr {
            bit: AttrMask::ACCESS_FLAGS,
            set: |a| a.qp_access_flags = U32::new(0x10),
            check: |e| {
                *e == DecodeError::ReservedBits {
                    field: "qp_attr.qp_access_flags",
                    bits: 0x10,
                }
            },
        },
        BadAttr {
            bit: AttrMask::PKEY_INDEX,
            set: |a| a.pkey_index = U16::new(1),
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.pkey_index",
                    value: 1,
                    max: 0,
                }
            },
        },
        BadAttr {
            bit: AttrMask::PORT,
            set: |a| a.port_num = 2,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "qp_attr.port_num",
                    value: 2,
                }
            },
        },
        BadAttr {
            bit: AttrMask::PORT,
            set: |a| a.port_num = 0,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "qp_attr.port_num",
                    value: 0,
                }
            },
        },
        BadAttr {
            bit: AttrMask::TIMEOUT,
            set: |a| a.timeout = 32,
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.timeout",
                    value: 32,
                    max: 31,
                }
            },
        },
        BadAttr {
            bit: AttrMask::RETRY_CNT,
            set: |a| a.retry_cnt = 8,
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.retry_cnt",
                    value: 8,
                    max: 7,
                }
            },
        },
        BadAttr {
            bit: AttrMask::RNR_RETRY,
            set: |a| a.rnr_retry = 8,
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.rnr_retry",
                    value: 8,
                    max: 7,
                }
            },
        },
        BadAttr {
            bit: AttrMask::MIN_RNR_TIMER,
            set: |a| a.min_rnr_timer = 32,
            check: |e| {
                *e == DecodeError::TooLarge {
                    field: "qp_attr.min_rnr_timer",
                    value: 32,
                    max: 31,
                }
            },
        },
        // Bad address vectors.
        BadAttr {
            bit: AttrMask::AV,
            set: |a| a.ah_attr.is_global = 0,
            check: |e| {
                matches!(
                    e,
                    DecodeError::Inconsistent {
                        field: "ah_attr.is_global",
                        ..
                    }
                )
            },
        },
        BadAttr {
            bit: AttrMask::AV,
            set: |a| a.ah_attr.port_num = 2,
            check: |e| {
                *e == DecodeError::UnknownValue {
                    field: "ah_attr.port_num",
                    value: 2,
                }
            },
        },
        BadAttr {
            bit: AttrMask::AV,
            set: |a| a.ah_attr.dgid = Gid::default(),
            check: |e| {
                matches!(
                    e,
                    DecodeError::Inconsistent {
                        field: "ah_attr.dgid",
                        ..
                    }
                )
            },
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut attr = qp_attr();
        (case.set)(&mut attr);
        // The bit alone, and the bit among every other defined bit.
        for mask in [case.bit, AttrMask::all()] {
            let err = error(cmd::decode(&modify_qp(mask, attr)));
            assert!((case.check)(&err), "case {i}: mask {mask:?} gave {err:?}");
        }
        // Every other bit: the bad value is not looked at.
        let others = AttrMask::all() - case.bit;
        assert!(
            cmd::decode(&modify_qp(others, attr)).is_ok(),
            "case {i}: rejected without {:?}",
            case.bit
        );
        assert!(cmd::decode(&modify_qp(AttrMask::empty(), attr)).is_ok());
    }
}

#[test]
fn cmd_modify_qp_value_boundaries() {
    // The largest legal value of every range-checked field is accepted.
    let mut attr = qp_attr();
    attr.rq_psn = U32::new(qp::MAX_PSN);
    attr.sq_psn = U32::new(qp::MAX_PSN);
    attr.dest_qp_num = U32::new(qp::MAX_QPN);
    attr.timeout = qp::MAX_TIMEOUT;
    attr.min_rnr_timer = qp::MAX_TIMEOUT;
    attr.retry_cnt = qp::MAX_RETRY;
    attr.rnr_retry = qp::RNR_RETRY_INFINITE;
    attr.en_sqd_async_notify = 1;
    attr.ah_attr.flow_label = U32::new((1 << 20) - 1);
    attr.ah_attr.sl = 15;
    assert!(cmd::decode(&modify_qp(AttrMask::all(), attr)).is_ok());
    // Every MTU and every state.
    for mtu in Mtu::ALL {
        let attr = qp::Attr {
            path_mtu: mtu.raw(),
            ..qp_attr()
        };
        assert!(cmd::decode(&modify_qp(AttrMask::PATH_MTU, attr)).is_ok());
    }
    for state in qp::State::ALL {
        let attr = qp::Attr {
            qp_state: state.raw(),
            cur_qp_state: state.raw(),
            ..qp_attr()
        };
        assert!(cmd::decode(&modify_qp(AttrMask::STATE | AttrMask::CUR_STATE, attr)).is_ok());
    }
}

#[test]
fn cmd_create_ah() {
    let body = create_ah_body();
    let bytes = command(Opcode::CreateAh, body.as_bytes());
    let req = cmd::decode(&bytes).unwrap();
    assert_eq!(req, Request::CreateAh(body));
    assert_eq!(req.opcode(), Opcode::CreateAh);

    let decode = |attr: qp::AhAttr| {
        let body = cmd::CreateAh {
            attr,
            ..create_ah_body()
        };
        cmd::decode(&command(Opcode::CreateAh, body.as_bytes())).map(|r| r.opcode())
    };
    assert_err!(
        decode(qp::AhAttr {
            is_global: 0,
            ..ah_attr()
        }),
        DecodeError::Inconsistent {
            field: "ah_attr.is_global",
            ..
        }
    );
    assert_err!(
        decode(qp::AhAttr {
            is_global: 2,
            ..ah_attr()
        }),
        DecodeError::Inconsistent {
            field: "ah_attr.is_global",
            ..
        }
    );
    assert_eq!(
        decode(qp::AhAttr {
            port_num: 0,
            ..ah_attr()
        }),
        Err(DecodeError::UnknownValue {
            field: "ah_attr.port_num",
            value: 0
        })
    );
    assert_err!(
        decode(qp::AhAttr {
            dgid: Gid([0; 16]),
            ..ah_attr()
        }),
        DecodeError::Inconsistent {
            field: "ah_attr.dgid",
            ..
        }
    );
    assert_eq!(
        decode(qp::AhAttr {
            flow_label: U32::new(1 << 20),
            ..ah_attr()
        }),
        Err(DecodeError::TooLarge {
            field: "ah_attr.flow_label",
            value: 1 << 20,
            max: (1 << 20) - 1
        })
    );
    assert_eq!(
        decode(qp::AhAttr {
            sl: 16,
            ..ah_attr()
        }),
        Err(DecodeError::TooLarge {
            field: "ah_attr.sl",
            value: 16,
            max: 15
        })
    );
    for attr in [
        qp::AhAttr {
            dlid: U16::new(1),
            ..ah_attr()
        },
        qp::AhAttr {
            src_path_bits: 1,
            ..ah_attr()
        },
    ] {
        assert_err!(
            decode(attr),
            DecodeError::Inconsistent {
                field: "ah_attr.dlid",
                ..
            }
        );
    }
    for i in 0..2 {
        let mut attr = ah_attr();
        attr.reserved[i] = 1;
        assert_eq!(
            decode(attr),
            Err(DecodeError::ReservedNonZero {
                field: "ah_attr.reserved"
            })
        );
    }
    let bad = cmd::CreateAh {
        reserved: U32::new(1),
        ..create_ah_body()
    };
    assert_eq!(
        cmd::decode(&command(Opcode::CreateAh, bad.as_bytes())),
        Err(DecodeError::ReservedNonZero {
            field: "CREATE_AH reserved"
        })
    );
}

/// A well-formed body for every opcode, so that each can be decoded once.
fn valid_body(op: Opcode) -> Vec<u8> {
    let handle = cmd::Handle {
        handle: U32::new(5),
        reserved: U32::new(0),
    };
    match op {
        Opcode::QueryDevice | Opcode::AllocPd => Vec::new(),
        Opcode::QueryPort => cmd::QueryPort {
            port_num: 1,
            reserved: [0; 7],
        }
        .as_bytes()
        .to_vec(),
        Opcode::QueryGid => cmd::QueryGid {
            port_num: 1,
            reserved: [0; 3],
            index: U32::new(0),
        }
        .as_bytes()
        .to_vec(),
        Opcode::DeallocPd
        | Opcode::DeregMr
        | Opcode::DestroyCq
        | Opcode::QueryQp
        | Opcode::DestroyQp
        | Opcode::PostRecv
        | Opcode::DestroyAh
        | Opcode::QuerySrq
        | Opcode::DestroySrq
        | Opcode::PostSrqRecv => handle.as_bytes().to_vec(),
        Opcode::RegMr => reg_mr_command(&reg_mr_body(), &REG_MR_PAGES)[8..].to_vec(),
        Opcode::CreateCq => cmd::CreateCq {
            cqe: U32::new(16),
            reserved: U32::new(0),
            ring_addr: U64::new(0x4000),
        }
        .as_bytes()
        .to_vec(),
        Opcode::ReqNotifyCq => cmd::ReqNotifyCq {
            cqn: U32::new(1),
            flags: U32::new(0),
        }
        .as_bytes()
        .to_vec(),
        Opcode::CreateQp => create_qp_body().as_bytes().to_vec(),
        Opcode::ModifyQp => modify_qp(AttrMask::STATE, qp_attr())[8..].to_vec(),
        Opcode::CreateAh => create_ah_body().as_bytes().to_vec(),
        Opcode::CreateSrq => create_srq_body().as_bytes().to_vec(),
        Opcode::ModifySrq => cmd::ModifySrq {
            srqn: U32::new(5),
            attr_mask: U32::new(cmd::SrqAttrMask::LIMIT.bits()),
            max_wr: U32::new(0),
            srq_limit: U32::new(8),
        }
        .as_bytes()
        .to_vec(),
    }
}

#[test]
fn cmd_every_opcode_decodes_to_its_request() {
    for &op in Opcode::ALL {
        let bytes = command(op, &valid_body(op));
        let req = cmd::decode(&bytes).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        assert_eq!(req.opcode(), op);
    }
}

#[test]
fn cmd_truncated_header() {
    let full = command(Opcode::QueryDevice, &[]);
    for n in 0..8 {
        assert_eq!(
            cmd::decode(&full[..n]),
            Err(DecodeError::Truncated {
                what: "command header",
                need: 8,
                got: n
            })
        );
    }
}

#[test]
fn cmd_truncated_and_oversized_fixed_bodies() {
    for (op, size, what) in FIXED_BODIES {
        let body = valid_body(op);
        assert_eq!(body.len(), size, "{op:?}");
        for cut in [0, 1, size / 2, size - 1] {
            assert_eq!(
                cmd::decode(&command(op, &body[..cut])),
                Err(DecodeError::Truncated {
                    what,
                    need: size,
                    got: cut
                }),
                "{op:?} cut to {cut}"
            );
        }
        for extra in [1usize, 7, 8, 100] {
            let mut long = body.clone();
            long.resize(size + extra, 0);
            assert_eq!(
                cmd::decode(&command(op, &long)),
                Err(DecodeError::Trailing { what, extra }),
                "{op:?} with {extra} extra"
            );
        }
    }
}

#[test]
fn cmd_unknown_opcodes() {
    let known: Vec<u16> = Opcode::ALL.iter().map(|o| o.raw()).collect();
    let mut rejected = 0;
    for raw in 0..=u16::MAX {
        if known.contains(&raw) {
            continue;
        }
        let header = cmd::Header {
            opcode: U16::new(raw),
            ..Default::default()
        };
        assert_eq!(
            cmd::decode(header.as_bytes()),
            Err(DecodeError::UnknownValue {
                field: "command opcode",
                value: raw.into()
            })
        );
        rejected += 1;
    }
    assert_eq!(rejected, 65536 - 22);
}

#[test]
fn cmd_reserved_header_fields() {
    for op in [Opcode::QueryDevice, Opcode::CreateQp] {
        let body = valid_body(op);
        for bit in 0..16 {
            let header = cmd::Header {
                flags: U16::new(1 << bit),
                ..cmd::header(op)
            };
            let mut bytes = header.as_bytes().to_vec();
            bytes.extend_from_slice(&body);
            assert_eq!(
                cmd::decode(&bytes),
                Err(DecodeError::ReservedNonZero {
                    field: "command header flags"
                })
            );
        }
        for bit in 0..32 {
            let header = cmd::Header {
                reserved: U32::new(1 << bit),
                ..cmd::header(op)
            };
            let mut bytes = header.as_bytes().to_vec();
            bytes.extend_from_slice(&body);
            assert_eq!(
                cmd::decode(&bytes),
                Err(DecodeError::ReservedNonZero {
                    field: "command header reserved"
                })
            );
        }
    }
}

#[test]
fn cmd_resp_header_round_trip() {
    for &status in cmd::Status::ALL {
        let resp = cmd::RespHeader::new(status, 0x8001);
        let (decoded, got) = cmd::RespHeader::decode(resp.as_bytes()).unwrap();
        assert_eq!(got, status);
        assert_eq!(decoded, resp);
        assert_eq!(decoded.detail.get(), 0x8001);
    }
    let bad = cmd::RespHeader {
        status: U16::new(12),
        ..Default::default()
    };
    assert_eq!(
        cmd::RespHeader::decode(bad.as_bytes()),
        Err(DecodeError::UnknownValue {
            field: "command status",
            value: 12
        })
    );
    let bad = cmd::RespHeader {
        reserved: U16::new(1),
        ..Default::default()
    };
    assert_eq!(
        cmd::RespHeader::decode(bad.as_bytes()),
        Err(DecodeError::ReservedNonZero {
            field: "response header reserved"
        })
    );
    assert_err!(
        cmd::RespHeader::decode(&[0; 7]),
        DecodeError::Truncated {
            need: 8,
            got: 7,
            ..
        }
    );
    // Any decode failure is reported to the driver as MALFORMED.
    let status: cmd::Status = DecodeError::ReservedNonZero { field: "x" }.into();
    assert_eq!(status, cmd::Status::Malformed);
}

// ======================================================================================
// Work requests
// ======================================================================================

fn send_header(op: wqe::Opcode, flags: SendFlags) -> SendHeader {
    SendHeader {
        wr_id: U64::new(0x1122_3344_5566_7788),
        opcode: op.raw(),
        send_flags: flags.bits(),
        num_sge: U16::new(0),
        imm_data: [0x01, 0x02, 0x03, 0x04],
        inline_len: U32::new(0),
        rkey: U32::new(0x55),
        remote_addr: U64::new(0x7000_0008),
        compare_add: U64::new(11),
        swap: U64::new(22),
        ah: U32::new(3),
        remote_qpn: U32::new(0x123),
        remote_qkey: U32::new(0x1111_1111),
        reserved: U32::new(0),
    }
}

const SGES: [Sge; 3] = [
    Sge {
        addr: U64::new(0x1000),
        length: U32::new(100),
        lkey: U32::new(1),
    },
    Sge {
        addr: U64::new(0x2_0000_0000),
        length: U32::new(4096),
        lkey: U32::new(2),
    },
    Sge {
        addr: U64::new(u64::MAX - 7),
        length: U32::new(8),
        lkey: U32::new(0xffff_ffff),
    },
];

fn inline_data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// The header fields `decode_send` carries through untouched.
fn assert_same_fields(a: &SendHeader, b: &SendHeader) {
    assert_eq!(a.wr_id, b.wr_id);
    assert_eq!(a.opcode, b.opcode);
    assert_eq!(a.imm_data, b.imm_data);
    assert_eq!(a.rkey, b.rkey);
    assert_eq!(a.remote_addr, b.remote_addr);
    assert_eq!(a.compare_add, b.compare_add);
    assert_eq!(a.swap, b.swap);
    assert_eq!(a.ah, b.ah);
    assert_eq!(a.remote_qpn, b.remote_qpn);
    assert_eq!(a.remote_qkey, b.remote_qkey);
}

#[test]
fn wqe_send_round_trip_with_sges() {
    let stride = wqe::send_stride(3, 0) as usize;
    let limits = Limits {
        max_sge: 3,
        max_inline: 0,
    };
    for &op in wqe::Opcode::ALL {
        for n in 0..=3 {
            let flags = SendFlags::SIGNALED | SendFlags::FENCE;
            let header = send_header(op, flags);
            let mut slot = vec![0u8; stride];
            let written = wqe::encode_send(&mut slot, header, Data::Sges(&SGES[..n])).unwrap();
            assert_eq!(written, 64 + 16 * n);

            let wr = wqe::decode_send(&slot, limits).unwrap();
            assert_eq!(wr.opcode, op);
            assert_eq!(wr.flags, flags);
            assert_same_fields(&wr.header, &header);
            assert_eq!(wr.header.num_sge.get(), n as u16);
            assert_eq!(wr.header.inline_len.get(), 0);
            let Payload::Sges(list) = wr.payload else {
                panic!("{op:?}: payload {:?}", wr.payload);
            };
            assert_eq!(list.len(), n);
            assert_eq!(list.is_empty(), n == 0);
            assert_eq!(list.iter().collect::<Vec<_>>(), &SGES[..n]);
            let sum: u32 = SGES[..n].iter().map(|s| s.length.get()).sum();
            assert_eq!(wr.byte_len, sum);

            // The slot may be exactly the entry's size.
            assert_eq!(wqe::decode_send(&slot[..written], limits), Ok(wr));
        }
    }
}

#[test]
fn wqe_send_round_trip_inline() {
    let stride = wqe::send_stride(0, 256) as usize;
    let limits = Limits {
        max_sge: 0,
        max_inline: 256,
    };
    for &op in wqe::Opcode::ALL {
        for n in [0usize, 1, 15, 16, 100, 256] {
            let data = inline_data(n);
            // A stale num_sge and inline_len in the caller's header are overwritten.
            let header = SendHeader {
                num_sge: U16::new(9),
                inline_len: U32::new(9),
                ..send_header(op, SendFlags::SOLICITED)
            };
            let mut slot = vec![0u8; stride];
            let written = wqe::encode_send(&mut slot, header, Data::Inline(&data)).unwrap();
            assert_eq!(written, 64 + n);
            let decoded = wqe::decode_send(&slot, limits);
            if op.writes_local() {
                // RDMA READ and atomics cannot carry inline data.
                assert_err!(
                    decoded,
                    DecodeError::Inconsistent {
                        field: "send flags",
                        ..
                    }
                );
                continue;
            }
            let wr = decoded.unwrap();
            assert_eq!(wr.opcode, op);
            assert_eq!(wr.flags, SendFlags::SOLICITED | SendFlags::INLINE);
            assert_same_fields(&wr.header, &header);
            assert_eq!(wr.header.num_sge.get(), 0);
            assert_eq!(wr.header.inline_len.get(), n as u32);
            assert_eq!(wr.payload, Payload::Inline(&data));
            assert_eq!(wr.byte_len, n as u32);
        }
    }
}

#[test]
fn wqe_encode_sges_clears_inline() {
    let header = SendHeader {
        inline_len: U32::new(40),
        ..send_header(
            wqe::Opcode::Send,
            SendFlags::INLINE | SendFlags::SIGNALED | SendFlags::FENCE,
        )
    };
    let mut slot = [0u8; 128];
    wqe::encode_send(&mut slot, header, Data::Sges(&SGES[..1])).unwrap();
    let wr = wqe::decode_send(
        &slot,
        Limits {
            max_sge: 1,
            max_inline: 64,
        },
    )
    .unwrap();
    assert_eq!(wr.flags, SendFlags::SIGNALED | SendFlags::FENCE);
    assert_eq!(wr.header.inline_len.get(), 0);
    assert_eq!(wr.header.num_sge.get(), 1);
}

#[test]
fn wqe_encode_into_too_small_slot() {
    let header = send_header(wqe::Opcode::Send, SendFlags::empty());
    let mut slot = [0u8; 79];
    assert_eq!(
        wqe::encode_send(&mut slot, header, Data::Sges(&SGES[..1])),
        Err(DecodeError::Truncated {
            what: "send work request",
            need: 80,
            got: 79
        })
    );
    let mut slot = [0u8; 73];
    assert_err!(
        wqe::encode_send(&mut slot, header, Data::Inline(&[0; 10])),
        DecodeError::Truncated {
            need: 74,
            got: 73,
            ..
        }
    );
    let mut slot = [0u8; 63];
    assert_err!(
        wqe::encode_send(&mut slot, header, Data::Sges(&[])),
        DecodeError::Truncated {
            need: 64,
            got: 63,
            ..
        }
    );
    let mut slot = [0u8; 47];
    assert_eq!(
        wqe::encode_recv(&mut slot, 1, &SGES[..2]),
        Err(DecodeError::Truncated {
            what: "receive work request",
            need: 48,
            got: 47
        })
    );
    let mut slot = [0u8; 15];
    assert_err!(
        wqe::encode_recv(&mut slot, 1, &[]),
        DecodeError::Truncated {
            need: 16,
            got: 15,
            ..
        }
    );
}

/// Encodes `header` with `data` into a 1 KiB slot.
fn encoded_send(header: SendHeader, data: Data<'_>) -> Vec<u8> {
    let mut slot = vec![0u8; 1024];
    wqe::encode_send(&mut slot, header, data).unwrap();
    slot
}

const ROOMY: Limits = Limits {
    max_sge: 32,
    max_inline: 512,
};

#[test]
fn wqe_decode_send_rejections() {
    let send = send_header(wqe::Opcode::Send, SendFlags::SIGNALED);

    // Header truncated.
    let slot = encoded_send(send, Data::Sges(&[]));
    assert_eq!(
        wqe::decode_send(&slot[..63], ROOMY),
        Err(DecodeError::Truncated {
            what: "send work request",
            need: 64,
            got: 63
        })
    );
    // Unknown opcodes.
    for raw in [7u8, 8, 0x80, 0xff] {
        let slot = encoded_send(
            SendHeader {
                opcode: raw,
                ..send
            },
            Data::Sges(&SGES[..1]),
        );
        assert_eq!(
            wqe::decode_send(&slot, ROOMY),
            Err(DecodeError::UnknownValue {
                field: "send opcode",
                value: raw.into()
            })
        );
    }
    // Undefined flag bits.
    for bits in [0x10u8, 0x20, 0x40, 0x80, 0xf0] {
        let slot = encoded_send(
            SendHeader {
                send_flags: SendFlags::SIGNALED.bits() | bits,
                ..send
            },
            Data::Sges(&SGES[..1]),
        );
        assert_eq!(
            wqe::decode_send(&slot, ROOMY),
            Err(DecodeError::ReservedBits {
                field: "send flags",
                bits: bits.into()
            })
        );
    }
    // Reserved field.
    let slot = encoded_send(
        SendHeader {
            reserved: U32::new(0x100),
            ..send
        },
        Data::Sges(&SGES[..1]),
    );
    assert_eq!(
        wqe::decode_send(&slot, ROOMY),
        Err(DecodeError::ReservedNonZero {
            field: "send work request reserved"
        })
    );
    // More SGEs than the QP allows.
    let slot = encoded_send(send, Data::Sges(&SGES));
    assert_eq!(
        wqe::decode_send(
            &slot,
            Limits {
                max_sge: 2,
                max_inline: 0
            }
        ),
        Err(DecodeError::TooLarge {
            field: "num_sge",
            value: 3,
            max: 2
        })
    );
    // SGE list cut off by the end of the slot.
    assert_eq!(
        wqe::decode_send(&slot[..64 + 40], ROOMY),
        Err(DecodeError::Truncated {
            what: "SGE list",
            need: 48,
            got: 40
        })
    );
    // Inline data longer than the QP allows, or than the slot holds.
    let data = inline_data(100);
    let slot = encoded_send(send, Data::Inline(&data));
    assert_eq!(
        wqe::decode_send(
            &slot,
            Limits {
                max_sge: 4,
                max_inline: 99
            }
        ),
        Err(DecodeError::TooLarge {
            field: "inline_len",
            value: 100,
            max: 99
        })
    );
    assert_eq!(
        wqe::decode_send(&slot[..64 + 99], ROOMY),
        Err(DecodeError::Truncated {
            what: "inline data",
            need: 100,
            got: 99
        })
    );
    // INLINE with SGEs: num_sge (offset 10) patched after encoding.
    let mut slot = encoded_send(send, Data::Inline(&data));
    slot[10..12].copy_from_slice(&1u16.to_le_bytes());
    assert_err!(
        wqe::decode_send(&slot, ROOMY),
        DecodeError::Inconsistent {
            field: "num_sge",
            ..
        }
    );
    // inline_len (offset 16) without INLINE.
    let mut slot = encoded_send(send, Data::Sges(&SGES[..1]));
    slot[16..20].copy_from_slice(&4u32.to_le_bytes());
    assert_err!(
        wqe::decode_send(&slot, ROOMY),
        DecodeError::Inconsistent {
            field: "inline_len",
            ..
        }
    );
    // INLINE on operations that write local memory.
    for op in [
        wqe::Opcode::RdmaRead,
        wqe::Opcode::AtomicCmpAndSwp,
        wqe::Opcode::AtomicFetchAndAdd,
    ] {
        for n in [0usize, 8] {
            let slot = encoded_send(
                send_header(op, SendFlags::SIGNALED),
                Data::Inline(&data[..n]),
            );
            assert_err!(
                wqe::decode_send(&slot, ROOMY),
                DecodeError::Inconsistent {
                    field: "send flags",
                    ..
                }
            );
        }
    }
}

#[test]
fn wqe_sge_length_sum() {
    let send = send_header(wqe::Opcode::RdmaWrite, SendFlags::empty());
    // Exactly u32::MAX is fine...
    let fits = [Sge::new(0, u32::MAX - 1, 1), Sge::new(0, 1, 1)];
    let wr_slot = encoded_send(send, Data::Sges(&fits));
    assert_eq!(
        wqe::decode_send(&wr_slot, ROOMY).map(|wr| wr.byte_len),
        Ok(u32::MAX)
    );
    // ...one more overflows, in sends and receives alike.
    let overflow = [Sge::new(0, u32::MAX, 1), Sge::new(0, 1, 1)];
    let slot = encoded_send(send, Data::Sges(&overflow));
    assert_eq!(
        wqe::decode_send(&slot, ROOMY),
        Err(DecodeError::Overflow {
            field: "SGE lengths"
        })
    );
    let mut slot = [0u8; 64];
    wqe::encode_recv(&mut slot, 1, &overflow).unwrap();
    assert_eq!(
        wqe::decode_recv(&slot, 4),
        Err(DecodeError::Overflow {
            field: "SGE lengths"
        })
    );
    let many = [Sge::new(0, 0x8000_0000, 1); 3];
    let mut slot = [0u8; 64];
    wqe::encode_recv(&mut slot, 1, &many).unwrap();
    assert_err!(wqe::decode_recv(&slot, 4), DecodeError::Overflow { .. });
}

#[test]
fn wqe_recv_round_trip() {
    for n in 0..=3 {
        let stride = wqe::recv_stride(3) as usize;
        let mut slot = vec![0xffu8; stride];
        let written = wqe::encode_recv(&mut slot, 0xfeed_f00d_0000_0001, &SGES[..n]).unwrap();
        assert_eq!(written, 16 + 16 * n);
        let wr = wqe::decode_recv(&slot, 3).unwrap();
        assert_eq!(wr.wr_id, 0xfeed_f00d_0000_0001);
        assert_eq!(wr.sges.len(), n);
        assert_eq!(wr.sges.iter().collect::<Vec<_>>(), &SGES[..n]);
        let sum: u32 = SGES[..n].iter().map(|s| s.length.get()).sum();
        assert_eq!(wr.byte_len, sum);
        assert_eq!(wqe::decode_recv(&slot[..written], 3), Ok(wr));
    }
}

#[test]
fn wqe_decode_recv_rejections() {
    let mut slot = [0u8; 64];
    wqe::encode_recv(&mut slot, 7, &SGES[..2]).unwrap();
    assert_eq!(
        wqe::decode_recv(&slot[..15], 2),
        Err(DecodeError::Truncated {
            what: "receive work request",
            need: 16,
            got: 15
        })
    );
    assert_eq!(
        wqe::decode_recv(&slot, 1),
        Err(DecodeError::TooLarge {
            field: "num_sge",
            value: 2,
            max: 1
        })
    );
    assert_eq!(
        wqe::decode_recv(&slot[..16 + 31], 2),
        Err(DecodeError::Truncated {
            what: "SGE list",
            need: 32,
            got: 31
        })
    );
    // Reserved bytes are at offsets 10..16.
    for offset in 10..16 {
        let mut bad = slot;
        bad[offset] = 1;
        assert_eq!(
            wqe::decode_recv(&bad, 2),
            Err(DecodeError::ReservedNonZero {
                field: "receive work request reserved"
            })
        );
    }
}

#[test]
fn wqe_strides() {
    // send_stride = next_pow2(64 + max(16 * sges, round_up(inline, 16)))
    let send = [
        ((0, 0), 64),     // 64
        ((1, 0), 128),    // 64 + 16 = 80
        ((2, 0), 128),    // 96
        ((4, 0), 128),    // 128
        ((5, 0), 256),    // 144
        ((12, 0), 256),   // 256
        ((13, 0), 512),   // 272
        ((32, 0), 1024),  // 576
        ((0, 1), 128),    // 64 + 16
        ((0, 64), 128),   // 128
        ((0, 65), 256),   // 64 + 80 = 144
        ((1, 64), 128),   // max(16, 64)
        ((8, 64), 256),   // max(128, 64) = 128 -> 192
        ((0, 448), 512),  // 512
        ((0, 449), 1024), // 64 + 464 = 528
        ((0, 1024), 2048),
        ((32, 1024), 2048),
    ];
    for ((sge, inline), expected) in send {
        assert_eq!(
            wqe::send_stride(sge, inline),
            expected,
            "send_stride({sge}, {inline})"
        );
    }
    // recv_stride = next_pow2(16 + 16 * sges)
    let recv = [
        (0, 16),
        (1, 32),
        (2, 64),
        (3, 64),
        (4, 128),
        (7, 128),
        (8, 256),
        (32, 1024),
    ];
    for (sge, expected) in recv {
        assert_eq!(wqe::recv_stride(sge), expected, "recv_stride({sge})");
    }
}

#[test]
fn wqe_strides_hold_the_largest_entry() {
    for sge in 0..=wqe::MAX_SGE {
        for inline in 0..=wqe::MAX_INLINE {
            let stride = wqe::send_stride(sge, inline);
            let need = 64 + (16 * sge).max(inline);
            assert!(stride.is_power_of_two(), "send_stride({sge}, {inline})");
            assert!(stride >= need, "send_stride({sge}, {inline})");
            // The smallest such power of two.
            assert!(stride / 2 < need, "send_stride({sge}, {inline})");
        }
        let stride = wqe::recv_stride(sge);
        let need = 16 + 16 * sge;
        assert!(stride.is_power_of_two() && stride >= need && stride / 2 < need);
    }
    // The largest entries really fit: encode and decode them in a slot of exactly the stride.
    let sges = vec![Sge::new(0x1000, 1, 1); wqe::MAX_SGE as usize];
    let limits = Limits {
        max_sge: wqe::MAX_SGE,
        max_inline: wqe::MAX_INLINE,
    };
    let mut slot = vec![0u8; wqe::send_stride(wqe::MAX_SGE, wqe::MAX_INLINE) as usize];
    let header = send_header(wqe::Opcode::Send, SendFlags::empty());
    wqe::encode_send(&mut slot, header, Data::Sges(&sges)).unwrap();
    assert_eq!(wqe::decode_send(&slot, limits).unwrap().byte_len, 32);
    let data = inline_data(wqe::MAX_INLINE as usize);
    wqe::encode_send(&mut slot, header, Data::Inline(&data)).unwrap();
    assert_eq!(wqe::decode_send(&slot, limits).unwrap().byte_len, 1024);
    let mut slot = vec![0u8; wqe::recv_stride(wqe::MAX_SGE) as usize];
    wqe::encode_recv(&mut slot, 1, &sges).unwrap();
    assert_eq!(wqe::decode_recv(&slot, wqe::MAX_SGE).unwrap().byte_len, 32);
}

#[test]
fn wqe_opcode_properties() {
    use wqe::Opcode as O;
    // (opcode, has_imm, is_rdma, is_atomic, writes_local, allowed_on_ud, completion opcode)
    let table = [
        (
            O::RdmaWrite,
            false,
            true,
            false,
            false,
            false,
            cqe::Opcode::RdmaWrite,
        ),
        (
            O::RdmaWriteWithImm,
            true,
            true,
            false,
            false,
            false,
            cqe::Opcode::RdmaWrite,
        ),
        (O::Send, false, false, false, false, true, cqe::Opcode::Send),
        (
            O::SendWithImm,
            true,
            false,
            false,
            false,
            true,
            cqe::Opcode::Send,
        ),
        (
            O::RdmaRead,
            false,
            true,
            false,
            true,
            false,
            cqe::Opcode::RdmaRead,
        ),
        (
            O::AtomicCmpAndSwp,
            false,
            true,
            true,
            true,
            false,
            cqe::Opcode::CompSwap,
        ),
        (
            O::AtomicFetchAndAdd,
            false,
            true,
            true,
            true,
            false,
            cqe::Opcode::FetchAdd,
        ),
    ];
    assert_eq!(table.len(), O::ALL.len());
    for (op, imm, rdma, atomic, local, ud, wc) in table {
        assert_eq!(op.has_imm(), imm, "{op:?}");
        assert_eq!(op.is_rdma(), rdma, "{op:?}");
        assert_eq!(op.is_atomic(), atomic, "{op:?}");
        assert_eq!(op.writes_local(), local, "{op:?}");
        assert_eq!(op.allowed_on_ud(), ud, "{op:?}");
        assert_eq!(cqe::Opcode::of_send(op), wc, "{op:?}");
    }
}

// ======================================================================================
// Rings
// ======================================================================================

#[test]
fn ring_geometry_slots_and_offsets() {
    let g = Geometry::new(8, 64).unwrap();
    assert_eq!((g.depth(), g.stride()), (8, 64));
    for (index, slot) in [(0, 0), (7, 7), (8, 0), (13, 5), (u32::MAX, 7), (1 << 31, 0)] {
        assert_eq!(g.slot(index), slot, "slot({index})");
        assert_eq!(
            g.entry_offset(index),
            128 + u64::from(slot) * 64,
            "entry_offset({index})"
        );
    }
    assert_eq!(g.byte_len(), 128 + 8 * 64);

    let one = Geometry::new(1, 16).unwrap();
    for index in [0, 1, 2, u32::MAX] {
        assert_eq!(one.slot(index), 0);
        assert_eq!(one.entry_offset(index), 128);
    }
    assert_eq!(one.byte_len(), 144);

    // The largest ring with large entries needs more than 32 bits of length.
    let big = Geometry::new(ring::MAX_DEPTH, 4096).unwrap();
    assert_eq!(big.byte_len(), 128 + (1u64 << 32));
    assert_eq!(big.entry_offset(u32::MAX), 128 + ((1u64 << 20) - 1) * 4096);
}

#[test]
fn ring_geometry_occupancy_and_free() {
    let g = Geometry::new(8, 64).unwrap();
    assert_eq!(g.occupancy(5, 5), Ok(0));
    assert_eq!(g.free(5, 5), Ok(8));
    assert_eq!(g.occupancy(8, 0), Ok(8));
    assert_eq!(g.free(8, 0), Ok(0));
    assert_eq!(g.occupancy(3, 1), Ok(2));
    assert_eq!(g.free(3, 1), Ok(6));
    // The producer wrapped past 2^32 and is now numerically below the consumer:
    // 3 - (2^32 - 3) = 6 (mod 2^32).
    let consumer = u32::MAX - 2;
    assert_eq!(g.occupancy(3, consumer), Ok(6));
    assert_eq!(g.free(3, consumer), Ok(2));
    assert_eq!(g.occupancy(5, consumer), Ok(8));
    assert_eq!(g.free(5, consumer), Ok(0));
    assert_eq!(g.occupancy(u32::MAX, u32::MAX - 8), Ok(8));
    assert_eq!(g.occupancy(0, u32::MAX), Ok(1));
    // More than depth ahead, including across the wrap and "behind" the consumer.
    let overrun = |producer: u32, consumer: u32, ahead: u32| ring::Overrun {
        producer,
        consumer,
        ahead,
        depth: 8,
    };
    assert_eq!(g.occupancy(9, 0), Err(overrun(9, 0, 9)));
    assert_eq!(g.free(9, 0), Err(overrun(9, 0, 9)));
    assert_eq!(g.occupancy(6, consumer), Err(overrun(6, consumer, 9)));
    assert_eq!(g.occupancy(0, 1), Err(overrun(0, 1, u32::MAX)));
    assert_eq!(g.free(0, 1), Err(overrun(0, 1, u32::MAX)));
    assert_eq!(g.occupancy(1 << 31, 0), Err(overrun(1 << 31, 0, 1 << 31)));
}

#[test]
fn ring_geometry_rejects_bad_shapes() {
    for depth in [0u32, 3, 6, 100, u32::MAX] {
        assert_err!(
            Geometry::new(depth, 64),
            DecodeError::Inconsistent {
                field: "ring depth",
                ..
            }
        );
    }
    for depth in [ring::MAX_DEPTH << 1, 1 << 31] {
        assert_eq!(
            Geometry::new(depth, 64),
            Err(DecodeError::TooLarge {
                field: "ring depth",
                value: depth.into(),
                max: ring::MAX_DEPTH.into()
            })
        );
    }
    for stride in [0u32, 3, 48, 65, u32::MAX] {
        assert_err!(
            Geometry::new(8, stride),
            DecodeError::Inconsistent {
                field: "ring stride",
                ..
            }
        );
    }
    assert!(Geometry::new(ring::MAX_DEPTH, 1).is_ok());
    assert!(Geometry::new(1, 1 << 31).is_ok());
}

#[test]
fn ring_arm_word() {
    assert_eq!(ring::arm_word(0, false), 0);
    assert_eq!(ring::arm_word(5, false), 5);
    assert_eq!(ring::arm_word(5, true), 0x8000_0005);
    // The sequence is 31 bits; a carry into bit 31 is dropped, not mistaken for the flag.
    assert_eq!(ring::arm_word(0x8000_0001, false), 1);
    assert_eq!(ring::arm_word(u32::MAX, false), 0x7fff_ffff);
    assert_eq!(ring::split_arm_word(0xffff_ffff), (0x7fff_ffff, true));
    assert_eq!(ring::split_arm_word(0x7fff_ffff), (0x7fff_ffff, false));
    for seq in [0u32, 1, 2, 0x1234_5678, 0x7fff_fffe, 0x7fff_ffff] {
        for solicited in [false, true] {
            assert_eq!(
                ring::split_arm_word(ring::arm_word(seq, solicited)),
                (seq, solicited)
            );
        }
    }
}

// ======================================================================================
// Doorbells, events, completions
// ======================================================================================

fn doorbells(list: &[doorbell::Doorbell]) -> Vec<u8> {
    list.iter().flat_map(|d| d.as_bytes().to_vec()).collect()
}

/// The error of a doorbell batch that must have been rejected.
fn batch_error(bytes: &[u8]) -> DecodeError {
    match doorbell::decode_batch(bytes) {
        Ok(it) => panic!("batch accepted: {:?}", it.collect::<Vec<_>>()),
        Err(e) => e,
    }
}

#[test]
fn doorbell_batches() {
    use doorbell::{Doorbell, Kind};
    let list = [
        Doorbell::new(Kind::Send, 5),
        Doorbell::new(Kind::Recv, 5),
        Doorbell::new(Kind::Send, 0x00ff_ffff),
        Doorbell::new(Kind::Send, 0),
        Doorbell::new(Kind::Srq, 0x0001_0002),
    ];
    let bytes = doorbells(&list);
    let got: Vec<_> = doorbell::decode_batch(&bytes).unwrap().collect();
    assert_eq!(
        got,
        [
            (Kind::Send, 5),
            (Kind::Recv, 5),
            (Kind::Send, 0x00ff_ffff),
            (Kind::Send, 0),
            (Kind::Srq, 0x0001_0002)
        ]
    );
    // One, and MAX_BATCH.
    let one = doorbells(&list[..1]);
    assert_eq!(doorbell::decode_batch(&one).unwrap().count(), 1);
    let full: Vec<Doorbell> = (0..doorbell::MAX_BATCH as u32)
        .map(|i| Doorbell::new(Kind::Send, i))
        .collect();
    let got: Vec<_> = doorbell::decode_batch(&doorbells(&full)).unwrap().collect();
    assert_eq!(got.len(), 64);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &d)| d == (Kind::Send, i as u32))
    );
}

#[test]
fn doorbell_batch_rejections() {
    use doorbell::{Doorbell, Kind};
    assert_err!(
        doorbell::decode_batch(&[]).map(|it| it.count()),
        DecodeError::Inconsistent {
            field: "doorbell batch",
            ..
        }
    );
    let bytes = doorbells(&[Doorbell::new(Kind::Send, 1), Doorbell::new(Kind::Send, 2)]);
    for len in [1usize, 7, 9, 15] {
        assert_err!(
            doorbell::decode_batch(&bytes[..len]).map(|it| it.count()),
            DecodeError::Inconsistent {
                field: "doorbell batch",
                ..
            }
        );
    }
    let too_many = vec![Doorbell::new(Kind::Recv, 1); doorbell::MAX_BATCH + 1];
    assert_eq!(
        batch_error(&doorbells(&too_many)),
        DecodeError::TooLarge {
            field: "doorbell batch",
            value: 65,
            max: 64
        }
    );
    // An unknown kind in the middle rejects the whole batch.
    for kind in [0u8, 4, 0xff] {
        let mut list = vec![Doorbell::new(Kind::Send, 1); 5];
        list[2].kind = kind;
        assert_eq!(
            batch_error(&doorbells(&list)),
            DecodeError::UnknownValue {
                field: "doorbell kind",
                value: kind.into()
            }
        );
    }
    // So does a non-zero reserved byte in the last doorbell.
    for i in 0..3 {
        let mut list = vec![Doorbell::new(Kind::Recv, 1); 3];
        list[2].reserved[i] = 1;
        assert_eq!(
            batch_error(&doorbells(&list)),
            DecodeError::ReservedNonZero {
                field: "doorbell reserved"
            }
        );
    }
}

#[test]
fn event_round_trip_and_rejections() {
    for &kind in event::Kind::ALL {
        let ev = event::Event::new(kind, 0xabcd_0123);
        assert_eq!(event::Event::decode(ev.as_bytes()), Ok((kind, 0xabcd_0123)));
        // Event buffers are at least SIZE bytes; a larger one holds the event at its start.
        let mut buf = ev.as_bytes().to_vec();
        buf.extend_from_slice(&[0xff; 8]);
        assert_eq!(event::Event::decode(&buf), Ok((kind, 0xabcd_0123)));
    }
    for raw in [6u16, 7, 11, 13, 17, 0xff, 0x101, 0xffff] {
        let ev = event::Event {
            kind: U16::new(raw),
            ..Default::default()
        };
        assert_eq!(
            event::Event::decode(ev.as_bytes()),
            Err(DecodeError::UnknownValue {
                field: "event kind",
                value: raw.into()
            })
        );
    }
    let ev = event::Event {
        reserved: U16::new(0x8000),
        ..event::Event::new(event::Kind::CqErr, 1)
    };
    assert_eq!(
        event::Event::decode(ev.as_bytes()),
        Err(DecodeError::ReservedNonZero {
            field: "event reserved"
        })
    );
    let ev = event::Event::new(event::Kind::PortActive, 1);
    assert_eq!(
        event::Event::decode(&ev.as_bytes()[..7]),
        Err(DecodeError::Truncated {
            what: "event",
            need: 8,
            got: 7
        })
    );
}

fn cqe() -> Cqe {
    Cqe {
        wr_id: U64::new(0x0123_4567_89ab_cdef),
        qp_num: U32::new(0x12),
        src_qp: U32::new(0x34),
        byte_len: U32::new(4096),
        imm_data: [9, 8, 7, 6],
        status: cqe::Status::Success.raw(),
        opcode: cqe::Opcode::Recv.raw(),
        wc_flags: (cqe::Flags::GRH | cqe::Flags::WITH_IMM).bits(),
        sl: 5,
        vendor_err: U32::new(0),
        sgid: Gid::from_ipv4([192, 168, 0, 1]),
        pkey_index: U16::new(0),
        slid: U16::new(0),
        reserved: [0; 12],
    }
}

#[test]
fn cqe_round_trip() {
    for &status in cqe::Status::ALL {
        for &opcode in cqe::Opcode::ALL {
            let entry = Cqe {
                status: status.raw(),
                opcode: opcode.raw(),
                vendor_err: U32::new(cqe::VendorErr::RingOverrun.raw()),
                ..cqe()
            };
            let c = Cqe::decode(entry.as_bytes()).unwrap();
            assert_eq!(c.cqe, entry);
            assert_eq!(c.status, status);
            assert_eq!(c.opcode, opcode);
            assert_eq!(c.flags, cqe::Flags::GRH | cqe::Flags::WITH_IMM);
        }
    }
    let c = Cqe::decode(
        Cqe {
            wc_flags: 0,
            ..cqe()
        }
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(c.flags, cqe::Flags::empty());
}

#[test]
fn cqe_rejections() {
    for raw in [22u8, 23, 0x80, 0xff] {
        assert_eq!(
            Cqe::decode(
                Cqe {
                    status: raw,
                    ..cqe()
                }
                .as_bytes()
            ),
            Err(DecodeError::UnknownValue {
                field: "completion status",
                value: raw.into()
            })
        );
    }
    for raw in [5u8, 6, 127, 130, 0xff] {
        assert_eq!(
            Cqe::decode(
                Cqe {
                    opcode: raw,
                    ..cqe()
                }
                .as_bytes()
            ),
            Err(DecodeError::UnknownValue {
                field: "completion opcode",
                value: raw.into()
            })
        );
    }
    for bits in [4u8, 0x80, 0xfc] {
        assert_eq!(
            Cqe::decode(
                Cqe {
                    wc_flags: 1 | bits,
                    ..cqe()
                }
                .as_bytes()
            ),
            Err(DecodeError::ReservedBits {
                field: "completion flags",
                bits: bits.into()
            })
        );
    }
    for i in 0..12 {
        let mut entry = cqe();
        entry.reserved[i] = 1;
        assert_eq!(
            Cqe::decode(entry.as_bytes()),
            Err(DecodeError::ReservedNonZero {
                field: "completion reserved"
            })
        );
    }
    assert_eq!(
        Cqe::decode(&cqe().as_bytes()[..63]),
        Err(DecodeError::Truncated {
            what: "completion",
            need: 64,
            got: 63
        })
    );
}

// ======================================================================================
// Configuration space and virtqueues
// ======================================================================================

fn config_space() -> config::Config {
    config::Config {
        version: U32::new(vrdma_proto::PROTOCOL_VERSION),
        num_doorbell_queues: U16::new(2),
        reserved: U16::new(0),
        caps: config::DeviceCaps {
            node_guid: U64::new(0x0002_c903_0000_0001),
            max_mr_size: U64::new(1 << 40),
            page_size_cap: U64::new((1 << 12) | (1 << 21) | (1 << 30)),
            max_qp: U32::new(64),
            max_qp_wr: U32::new(4096),
            max_sge: U32::new(wqe::MAX_SGE),
            max_cqe: U32::new(65536),
            max_inline_data: U32::new(256),
            max_mr_pages: U32::new(cmd::MAX_PAGE_LIST),
            atomic_cap: config::AtomicCap::Hca.raw(),
            phys_port_cnt: 1,
            ..Default::default()
        },
        port: config::PortAttr {
            state: config::PortState::Active.raw(),
            max_mtu: Mtu::Mtu4096.raw(),
            active_mtu: Mtu::Mtu1024.raw(),
            link_layer: config::LinkLayer::Ethernet.raw(),
            gid_tbl_len: U16::new(1),
            pkey_tbl_len: U16::new(1),
            max_msg_sz: U32::new(1 << 31),
            phys_state: 5,
            ..Default::default()
        },
        gid: Gid::from_ipv4([10, 0, 0, 1]),
        srq: config::SrqCaps {
            max_srq: U32::new(1024),
            max_srq_wr: U32::new(16384),
            max_srq_sge: U32::new(16),
            reserved: U32::new(0),
        },
    }
}

#[test]
fn config_decode_valid() {
    let config = config_space();
    assert_eq!(config::Config::decode(config.as_bytes()), Ok(config));
    for n in [1u16, queue::MAX_DOORBELL_QUEUES] {
        let config = config::Config {
            num_doorbell_queues: U16::new(n),
            ..config_space()
        };
        assert_eq!(config::Config::decode(config.as_bytes()), Ok(config));
    }
    assert_eq!(
        config::DeviceCaps::decode(config.caps.as_bytes()),
        Ok(config.caps)
    );
    assert_eq!(
        config::PortAttr::decode(config.port.as_bytes()),
        Ok(config.port)
    );
}

#[test]
fn config_decode_rejections() {
    let decode = |c: config::Config| config::Config::decode(c.as_bytes());
    for version in [0u32, 2, u32::MAX] {
        assert_eq!(
            decode(config::Config {
                version: U32::new(version),
                ..config_space()
            }),
            Err(DecodeError::UnknownValue {
                field: "config version",
                value: version.into()
            })
        );
    }
    assert_err!(
        decode(config::Config {
            num_doorbell_queues: U16::new(0),
            ..config_space()
        }),
        DecodeError::Inconsistent {
            field: "num_doorbell_queues",
            ..
        }
    );
    // More doorbell queues than a device may offer (queue::MAX_DOORBELL_QUEUES).
    for n in [queue::MAX_DOORBELL_QUEUES + 1, u16::MAX] {
        assert_eq!(
            decode(config::Config {
                num_doorbell_queues: U16::new(n),
                ..config_space()
            }),
            Err(DecodeError::TooLarge {
                field: "num_doorbell_queues",
                value: n.into(),
                max: queue::MAX_DOORBELL_QUEUES.into()
            })
        );
    }
    assert_eq!(
        decode(config::Config {
            reserved: U16::new(1),
            ..config_space()
        }),
        Err(DecodeError::ReservedNonZero {
            field: "config reserved"
        })
    );
    let full = config_space();
    for n in [0usize, 8, 151, 153, 167] {
        assert_eq!(
            config::Config::decode(&full.as_bytes()[..n]),
            Err(DecodeError::Truncated {
                what: "config space",
                need: 168,
                got: n
            })
        );
    }
    // The space of a device without SRQs may end before the SRQ limits: they read as zero.
    assert_eq!(
        config::Config::decode(&full.as_bytes()[..config::BASE_CONFIG_SIZE]),
        Ok(config::Config {
            srq: config::SrqCaps::default(),
            ..full
        })
    );

    // SRQ limits.
    let mut c = config_space();
    c.srq.reserved = U32::new(1);
    assert_eq!(
        decode(c),
        Err(DecodeError::ReservedNonZero {
            field: "SRQ capabilities reserved"
        })
    );
    let mut c = config_space();
    c.srq.max_srq_sge = U32::new(wqe::MAX_SGE + 1);
    assert_err!(
        decode(c),
        DecodeError::TooLarge {
            field: "max_srq_sge",
            ..
        }
    );
    let mut c = config_space();
    c.srq.max_srq_wr = U32::new(ring::MAX_DEPTH + 1);
    assert_err!(
        decode(c),
        DecodeError::TooLarge {
            field: "max_srq_wr",
            ..
        }
    );

    // Device attributes.
    let mut c = config_space();
    c.caps.atomic_cap = 3;
    assert_eq!(
        decode(c),
        Err(DecodeError::UnknownValue {
            field: "atomic capability",
            value: 3
        })
    );
    let mut c = config_space();
    c.caps.reserved = [0, 1];
    assert_eq!(
        decode(c),
        Err(DecodeError::ReservedNonZero {
            field: "device capabilities reserved"
        })
    );
    assert_err!(
        config::DeviceCaps::decode(&[0; 103]),
        DecodeError::Truncated {
            need: 104,
            got: 103,
            ..
        }
    );

    // Port attributes.
    let mut c = config_space();
    c.port.state = 6;
    assert_eq!(
        decode(c),
        Err(DecodeError::UnknownValue {
            field: "port state",
            value: 6
        })
    );
    for mtu in [0u8, 6] {
        let mut c = config_space();
        c.port.max_mtu = mtu;
        assert_eq!(
            decode(c),
            Err(DecodeError::UnknownValue {
                field: "mtu",
                value: mtu.into()
            })
        );
        let mut c = config_space();
        c.port.active_mtu = mtu;
        assert_eq!(
            decode(c),
            Err(DecodeError::UnknownValue {
                field: "mtu",
                value: mtu.into()
            })
        );
    }
    let mut c = config_space();
    c.port.link_layer = 3;
    assert_eq!(
        decode(c),
        Err(DecodeError::UnknownValue {
            field: "link layer",
            value: 3
        })
    );
    let mut c = config_space();
    c.port.reserved = 1;
    assert_eq!(
        decode(c),
        Err(DecodeError::ReservedNonZero {
            field: "port attributes reserved"
        })
    );
    assert_err!(
        config::PortAttr::decode(&[0; 23]),
        DecodeError::Truncated {
            need: 24,
            got: 23,
            ..
        }
    );
}

#[test]
fn queue_roles() {
    assert_eq!(queue::role(0, 1), Some(Role::Control));
    assert_eq!(queue::role(1, 1), Some(Role::Event));
    assert_eq!(queue::role(2, 1), Some(Role::Doorbell(0)));
    assert_eq!(queue::role(3, 1), None);
    assert_eq!(queue::role(2, 0), None);
    assert_eq!(queue::role(0, 0), Some(Role::Control));
    assert_eq!(queue::role(1, 0), Some(Role::Event));
    for i in 0..queue::MAX_DOORBELL_QUEUES {
        assert_eq!(
            queue::role(2 + i, queue::MAX_DOORBELL_QUEUES),
            Some(Role::Doorbell(i))
        );
    }
    assert_eq!(queue::role(66, 64), None);
    assert_eq!(queue::role(u16::MAX, 64), None);
    assert_eq!(queue::count(1), 3);
    assert_eq!(queue::count(queue::MAX_DOORBELL_QUEUES), 66);
    // Every index below count() has a role, and count() itself has none.
    for n in [1u16, 2, 7, 64] {
        for i in 0..queue::count(n) {
            assert!(queue::role(i, n).is_some(), "role({i}, {n})");
        }
        assert_eq!(queue::role(queue::count(n), n), None);
    }
    assert!(queue::count(queue::MAX_DOORBELL_QUEUES) <= queue::MAX_QUEUE_SIZE);
}

// ======================================================================================
// Enumerations and GIDs
// ======================================================================================

/// Checks a wire enumeration: `ALL` has the expected length and distinct values, each
/// round-trips through `from_raw(raw())` (and `TryFrom`/`From`), and every value of `$probe`
/// not in `ALL` is rejected with `UnknownValue` naming `$field`.
macro_rules! check_wire_enum {
    ($ty:ty, $repr:ty, $field:literal, $count:literal, $probe:expr) => {{
        let all = <$ty>::ALL;
        assert_eq!(all.len(), $count, "{}::ALL", stringify!($ty));
        for (i, &v) in all.iter().enumerate() {
            assert_eq!(<$ty>::from_raw(v.raw()), Ok(v));
            assert_eq!(<$ty>::try_from(v.raw()), Ok(v));
            assert_eq!(<$repr>::from(v), v.raw());
            assert!(
                all[..i].iter().all(|w| w.raw() != v.raw()),
                "{v:?} repeats a value"
            );
        }
        let mut accepted = 0usize;
        for raw in $probe {
            let raw: $repr = raw;
            let defined = all.iter().any(|v| v.raw() == raw);
            match <$ty>::from_raw(raw) {
                Ok(v) => {
                    assert!(defined, "{} accepted {raw:#x}", stringify!($ty));
                    assert_eq!(v.raw(), raw);
                    accepted += 1;
                }
                Err(e) => {
                    assert!(!defined, "{} rejected {raw:#x}", stringify!($ty));
                    assert_eq!(
                        e,
                        DecodeError::UnknownValue {
                            field: $field,
                            value: raw as u64
                        }
                    );
                }
            }
        }
        assert_eq!(accepted, $count, "{} values accepted", stringify!($ty));
    }};
}

#[test]
fn wire_enums_round_trip_and_reject_unknown_values() {
    check_wire_enum!(config::PortState, u8, "port state", 6, 0..=u8::MAX);
    check_wire_enum!(config::Mtu, u8, "mtu", 5, 0..=u8::MAX);
    check_wire_enum!(config::LinkLayer, u8, "link layer", 3, 0..=u8::MAX);
    check_wire_enum!(config::AtomicCap, u8, "atomic capability", 3, 0..=u8::MAX);
    check_wire_enum!(config::GidType, u8, "gid type", 3, 0..=u8::MAX);
    check_wire_enum!(cmd::Opcode, u16, "command opcode", 22, 0..=u16::MAX);
    check_wire_enum!(cmd::Status, u16, "command status", 12, 0..=u16::MAX);
    check_wire_enum!(qp::Type, u8, "qp type", 2, 0..=u8::MAX);
    check_wire_enum!(qp::State, u8, "qp state", 7, 0..=u8::MAX);
    check_wire_enum!(qp::MigState, u8, "path migration state", 3, 0..=u8::MAX);
    check_wire_enum!(wqe::Opcode, u8, "send opcode", 7, 0..=u8::MAX);
    check_wire_enum!(cqe::Status, u8, "completion status", 22, 0..=u8::MAX);
    check_wire_enum!(cqe::Opcode, u8, "completion opcode", 7, 0..=u8::MAX);
    check_wire_enum!(
        cqe::VendorErr,
        u32,
        "vendor error",
        19,
        (0..=0x1_0000u32).chain([1 << 31, u32::MAX])
    );
    check_wire_enum!(event::Kind, u16, "event kind", 13, 0..=u16::MAX);
    check_wire_enum!(doorbell::Kind, u8, "doorbell kind", 3, 0..=u8::MAX);
}

#[test]
fn node_guids_come_from_the_gid_and_differ_between_ports() {
    let a = Gid::from_ipv4([10, 0, 0, 1]);
    assert_eq!(a.node_guid(), 0x0256_5244_0a00_0001);
    assert_ne!(a.node_guid(), Gid::from_ipv4([10, 0, 0, 2]).node_guid());
    let mut v6 = [0u8; 16];
    v6[0] = 0xfe;
    v6[1] = 0x80;
    v6[8..].copy_from_slice(&[0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55]);
    assert_eq!(Gid(v6).node_guid(), 0x0211_22ff_fe33_4455);
}

#[test]
fn gid_ipv4_mapping_and_display() {
    let gid = Gid::from_ipv4([192, 168, 1, 1]);
    assert_eq!(
        gid.0,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 1]
    );
    assert_eq!(gid.to_ipv4(), Some([192, 168, 1, 1]));
    assert!(!gid.is_zero());
    assert_eq!(gid.to_string(), "0000:0000:0000:0000:0000:ffff:c0a8:0101");
    assert_eq!(format!("{gid:?}"), gid.to_string());

    for addr in [[0, 0, 0, 0], [255, 255, 255, 255], [10, 0, 0, 2]] {
        assert_eq!(Gid::from_ipv4(addr).to_ipv4(), Some(addr));
    }

    // fe80::1 is not IPv4-mapped.
    let mut link_local = [0u8; 16];
    link_local[0] = 0xfe;
    link_local[1] = 0x80;
    link_local[15] = 1;
    let gid = Gid(link_local);
    assert_eq!(gid.to_ipv4(), None);
    assert_eq!(gid.to_string(), "fe80:0000:0000:0000:0000:0000:0000:0001");

    // Almost mapped: a non-zero byte in the prefix, or a broken ffff marker.
    for (i, b) in [(0usize, 1u8), (9, 1), (10, 0xfe), (11, 0)] {
        let mut g = Gid::from_ipv4([1, 2, 3, 4]);
        g.0[i] = b;
        assert_eq!(g.to_ipv4(), None, "byte {i} = {b:#x}");
    }

    let zero = Gid::default();
    assert!(zero.is_zero());
    assert_eq!(zero.to_ipv4(), None);
    assert_eq!(zero.to_string(), "0000:0000:0000:0000:0000:0000:0000:0000");
    let all = Gid([0xff; 16]);
    assert_eq!(all.to_string(), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
    let mut ordered = [0u8; 16];
    for (i, b) in ordered.iter_mut().enumerate() {
        *b = i as u8;
    }
    assert_eq!(
        Gid(ordered).to_string(),
        "0001:0203:0405:0607:0809:0a0b:0c0d:0e0f"
    );
}

// ======================================================================================
// Property test: no decoder panics on arbitrary or mutated input
// ======================================================================================

/// xorshift64: small, deterministic, good enough to spread inputs.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A value that often sits on a boundary.
    fn interesting_u32(&mut self) -> u32 {
        const VALUES: [u32; 12] = [
            0,
            1,
            2,
            3,
            0xff,
            0x1000,
            0x00ff_ffff,
            0x0100_0000,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_fffe,
            0xffff_ffff,
        ];
        if self.next() % 2 == 0 {
            VALUES[self.below(VALUES.len())]
        } else {
            self.next() as u32
        }
    }

    /// `seed` with a few random changes: byte and bit changes, boundary values written over
    /// 1, 2 or 4 bytes, truncation and extension.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut out = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            match self.below(6) {
                0 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] = self.next() as u8;
                }
                1 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] ^= 1 << self.below(8);
                }
                2 if !out.is_empty() => {
                    let v = self.interesting_u32().to_le_bytes();
                    let width = [1usize, 2, 4][self.below(3)];
                    let i = self.below(out.len());
                    let end = (i + width).min(out.len());
                    out[i..end].copy_from_slice(&v[..end - i]);
                }
                3 => {
                    let len = self.below(out.len() + 1);
                    out.truncate(len);
                }
                4 => {
                    let n = 1 + self.below(24);
                    let extra = self.bytes(n);
                    out.extend_from_slice(&extra);
                }
                _ => {}
            }
        }
        out
    }
}

/// Runs `f` on `input`, turning a panic into a failure that shows the input.
fn no_panic<R>(what: &str, input: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(input))) {
        Ok(r) => r,
        Err(_) => panic!("{what} panicked on {input:02x?}"),
    }
}

const CASES: usize = 4000;

#[test]
fn property_cmd_decode_never_panics() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let seeds: Vec<Vec<u8>> = Opcode::ALL
        .iter()
        .map(|&op| command(op, &valid_body(op)))
        .collect();
    let mut accepted = 0;
    for i in 0..CASES * 2 {
        let input = if i % 4 == 0 {
            let len = rng.below(160);
            rng.bytes(len)
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            rng.mutate(seed)
        };
        let result = no_panic("cmd::decode", &input, |b| {
            cmd::decode(b).map(|req| {
                // A decoded request is the opcode it was sent as; a page list is exactly
                // npages aligned pages.
                if let Request::RegMr { cmd, pages, .. } = req {
                    assert_eq!(pages.len(), cmd.npages.get() as usize);
                    let mask = (1u64 << pages.page_shift()) - 1;
                    assert!(pages.iter().all(|p| p & mask == 0));
                }
                req.opcode()
            })
        });
        if let Ok(op) = result {
            assert_eq!(op.raw(), u16::from_le_bytes([input[0], input[1]]));
            accepted += 1;
        }
    }
    // The mutations must leave some inputs valid, or the test explores only the first checks.
    assert!(accepted > 100, "only {accepted} inputs decoded");
}

#[test]
fn property_wqe_decoders_never_panic() {
    let mut rng = XorShift(0x0123_4567_89ab_cdef);
    let mut seeds = Vec::new();
    for &op in wqe::Opcode::ALL {
        seeds.push(encoded_send(
            send_header(op, SendFlags::SIGNALED),
            Data::Sges(&SGES),
        ));
        seeds.push(encoded_send(
            send_header(op, SendFlags::empty()),
            Data::Inline(&inline_data(40)),
        ));
    }
    let mut recv_seeds = Vec::new();
    for n in 0..=SGES.len() {
        let mut slot = vec![0u8; 64];
        wqe::encode_recv(&mut slot, 0x77, &SGES[..n]).unwrap();
        recv_seeds.push(slot);
    }
    let limit_values = [0u32, 1, 2, 3, 32, 1024, u32::MAX];
    let mut accepted_send = 0;
    let mut accepted_recv = 0;
    for i in 0..CASES * 2 {
        let input = if i % 4 == 0 {
            let len = rng.below(300);
            rng.bytes(len)
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            let mut m = rng.mutate(seed);
            m.truncate(64 + 16 * 3 + rng.below(64));
            m
        };
        let limits = Limits {
            max_sge: limit_values[rng.below(limit_values.len())],
            max_inline: limit_values[rng.below(limit_values.len())],
        };
        no_panic("wqe::decode_send", &input, |b| {
            if let Ok(wr) = wqe::decode_send(b, limits) {
                accepted_send += 1;
                // Re-encoding what was decoded gives back the same bytes.
                let mut again = vec![0u8; b.len()];
                let n = match wr.payload {
                    Payload::Sges(list) => {
                        assert!(list.len() as u32 <= limits.max_sge);
                        let sges: Vec<Sge> = list.iter().collect();
                        let sum = sges.iter().map(|s| u64::from(s.length.get())).sum::<u64>();
                        assert_eq!(u64::from(wr.byte_len), sum);
                        wqe::encode_send(&mut again, wr.header, Data::Sges(&sges)).unwrap()
                    }
                    Payload::Inline(data) => {
                        assert!(data.len() as u32 <= limits.max_inline);
                        assert_eq!(wr.byte_len as usize, data.len());
                        wqe::encode_send(&mut again, wr.header, Data::Inline(data)).unwrap()
                    }
                };
                assert_eq!(&again[..n], &b[..n]);
            }
        });
        let input = if i % 4 == 0 {
            let len = rng.below(100);
            rng.bytes(len)
        } else {
            let seed = &recv_seeds[rng.below(recv_seeds.len())];
            rng.mutate(seed)
        };
        no_panic("wqe::decode_recv", &input, |b| {
            if let Ok(wr) = wqe::decode_recv(b, limits.max_sge) {
                accepted_recv += 1;
                let sges: Vec<Sge> = wr.sges.iter().collect();
                assert!(sges.len() as u32 <= limits.max_sge);
                let mut again = vec![0u8; b.len()];
                let n = wqe::encode_recv(&mut again, wr.wr_id, &sges).unwrap();
                // Only the reserved bytes may differ, and they were checked to be zero.
                assert_eq!(&again[..n], &b[..n]);
            }
        });
    }
    assert!(accepted_send > 100, "only {accepted_send} sends decoded");
    assert!(accepted_recv > 100, "only {accepted_recv} receives decoded");
}

#[test]
fn property_doorbell_and_completion_decoders_never_panic() {
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let db_seed = doorbells(&[
        doorbell::Doorbell::new(doorbell::Kind::Send, 1),
        doorbell::Doorbell::new(doorbell::Kind::Recv, 2),
        doorbell::Doorbell::new(doorbell::Kind::Send, 3),
    ]);
    let cqe_seed = cqe().as_bytes().to_vec();
    let event_seed = event::Event::new(event::Kind::CqCompletion, 4)
        .as_bytes()
        .to_vec();
    let config_seed = config_space().as_bytes().to_vec();
    let (mut doorbells_ok, mut cqes_ok, mut events_ok, mut configs_ok) = (0, 0, 0, 0);
    for i in 0..CASES * 2 {
        let random = i % 4 == 0;
        let pick = |rng: &mut XorShift, seed: &[u8]| {
            if random {
                let len = rng.below(seed.len() * 2 + 1);
                rng.bytes(len)
            } else {
                rng.mutate(seed)
            }
        };
        let input = pick(&mut rng, &db_seed);
        no_panic("doorbell::decode_batch", &input, |b| {
            if let Ok(it) = doorbell::decode_batch(b) {
                doorbells_ok += 1;
                assert_eq!(it.count(), b.len() / doorbell::SIZE);
            }
        });
        let input = pick(&mut rng, &cqe_seed);
        no_panic("Cqe::decode", &input, |b| {
            if let Ok(c) = Cqe::decode(b) {
                cqes_ok += 1;
                assert_eq!(c.cqe.as_bytes(), &b[..64]);
                assert_eq!(c.status.raw(), b[24]);
                assert_eq!(c.opcode.raw(), b[25]);
            }
        });
        let input = pick(&mut rng, &event_seed);
        no_panic("Event::decode", &input, |b| {
            if let Ok((kind, handle)) = event::Event::decode(b) {
                events_ok += 1;
                assert_eq!(kind.raw(), u16::from_le_bytes([b[0], b[1]]));
                assert_eq!(handle, u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
            }
        });
        let input = pick(&mut rng, &config_seed);
        no_panic("Config::decode", &input, |b| {
            if config::Config::decode(b).is_ok() {
                configs_ok += 1;
            }
        });
        no_panic("RespHeader::decode", &input, |b| {
            let _ = cmd::RespHeader::decode(b);
        });
    }
    for (what, n) in [
        ("doorbell batches", doorbells_ok),
        ("completions", cqes_ok),
        ("events", events_ok),
        ("configs", configs_ok),
    ] {
        assert!(n > 100, "only {n} {what} decoded");
    }
}
