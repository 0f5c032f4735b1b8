//! The libibverbs ABI: the C structs and constants of rdma-core's `<infiniband/verbs.h>` (v44,
//! Debian 12) that verbs programs share with the library, as `#[repr(C)]` Rust types.
//!
//! A program compiled against verbs.h reads and writes these structs itself (the inline
//! `ibv_post_send` reads `ctx->ops.post_send`, perftest reads `mr->lkey`), so every size and
//! offset must match the header exactly. The `layout!` block at the end checks each one at
//! compile time against the numbers `layout/layout.c` prints from the system header (the
//! test `layout_matches_the_system_verbs_header` reruns it where the header is installed), so
//! a layout mistake does not build.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::mem::{offset_of, size_of};

/// `pthread_mutex_t` on x86-64 glibc: opaque, 40 bytes, initialised with
/// `pthread_mutex_init` (programs never touch it; libibverbs' own functions would).
pub type pthread_mutex_t = libc::pthread_mutex_t;
/// `pthread_cond_t`: opaque, 48 bytes.
pub type pthread_cond_t = libc::pthread_cond_t;

/// `union ibv_gid`: 16 bytes, network order, 8-aligned (its other member is two `__be64`).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ibv_gid {
    /// The GID's bytes.
    pub raw: [u8; 16],
}

/// `struct _ibv_device_ops`: two unused pointers.
#[repr(C)]
#[derive(Debug)]
pub struct _ibv_device_ops {
    pub _dummy1: *mut c_void,
    pub _dummy2: *mut c_void,
}

/// `IBV_SYSFS_NAME_MAX`.
pub const IBV_SYSFS_NAME_MAX: usize = 64;
/// `IBV_SYSFS_PATH_MAX`.
pub const IBV_SYSFS_PATH_MAX: usize = 256;

/// `struct ibv_device`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_device {
    pub _ops: _ibv_device_ops,
    pub node_type: c_int,
    pub transport_type: c_int,
    pub name: [c_char; IBV_SYSFS_NAME_MAX],
    pub dev_name: [c_char; IBV_SYSFS_NAME_MAX],
    pub dev_path: [c_char; IBV_SYSFS_PATH_MAX],
    pub ibdev_path: [c_char; IBV_SYSFS_PATH_MAX],
}

/// An operation the shim does not provide: programs compiled against verbs.h never call these
/// slots (they are the old ABI's), so they stay NULL.
pub type unused_op = Option<unsafe extern "C" fn()>;

/// `ibv_context_ops.poll_cq`.
pub type poll_cq_fn = unsafe extern "C" fn(*mut ibv_cq, c_int, *mut ibv_wc) -> c_int;
/// `ibv_context_ops.req_notify_cq`.
pub type req_notify_cq_fn = unsafe extern "C" fn(*mut ibv_cq, c_int) -> c_int;
/// `ibv_context_ops.post_srq_recv`.
pub type post_srq_recv_fn =
    unsafe extern "C" fn(*mut ibv_srq, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int;
/// `ibv_context_ops.post_send`.
pub type post_send_fn =
    unsafe extern "C" fn(*mut ibv_qp, *mut ibv_send_wr, *mut *mut ibv_send_wr) -> c_int;
/// `ibv_context_ops.post_recv`.
pub type post_recv_fn =
    unsafe extern "C" fn(*mut ibv_qp, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int;
/// `ibv_context_ops.alloc_mw`: `ibv_alloc_mw` checks it for NULL and fails with EOPNOTSUPP.
pub type alloc_mw_fn = unsafe extern "C" fn(*mut ibv_pd, c_int) -> *mut c_void;

/// `struct ibv_context_ops`: the data path, called inline by programs.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_context_ops {
    pub _compat_query_device: unused_op,
    pub _compat_query_port: unused_op,
    pub _compat_alloc_pd: unused_op,
    pub _compat_dealloc_pd: unused_op,
    pub _compat_reg_mr: unused_op,
    pub _compat_rereg_mr: unused_op,
    pub _compat_dereg_mr: unused_op,
    pub alloc_mw: Option<alloc_mw_fn>,
    pub bind_mw: unused_op,
    pub dealloc_mw: unused_op,
    pub _compat_create_cq: unused_op,
    pub poll_cq: Option<poll_cq_fn>,
    pub req_notify_cq: Option<req_notify_cq_fn>,
    pub _compat_cq_event: unused_op,
    pub _compat_resize_cq: unused_op,
    pub _compat_destroy_cq: unused_op,
    pub _compat_create_srq: unused_op,
    pub _compat_modify_srq: unused_op,
    pub _compat_query_srq: unused_op,
    pub _compat_destroy_srq: unused_op,
    pub post_srq_recv: Option<post_srq_recv_fn>,
    pub _compat_create_qp: unused_op,
    pub _compat_query_qp: unused_op,
    pub _compat_modify_qp: unused_op,
    pub _compat_destroy_qp: unused_op,
    pub post_send: Option<post_send_fn>,
    pub post_recv: Option<post_recv_fn>,
    pub _compat_create_ah: unused_op,
    pub _compat_destroy_ah: unused_op,
    pub _compat_attach_mcast: unused_op,
    pub _compat_detach_mcast: unused_op,
    pub _compat_async_event: unused_op,
}

/// `struct ibv_context`. The shim's contexts are plain ones (`abi_compat` NULL, no
/// `verbs_context` around them), so verbs.h's extended inline functions fall back to the
/// exported functions the shim defines.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_context {
    pub device: *mut ibv_device,
    pub ops: ibv_context_ops,
    pub cmd_fd: c_int,
    pub async_fd: c_int,
    pub num_comp_vectors: c_int,
    pub mutex: pthread_mutex_t,
    pub abi_compat: *mut c_void,
}

/// `struct ibv_pd`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_pd {
    pub context: *mut ibv_context,
    pub handle: u32,
}

/// `struct ibv_mr`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_mr {
    pub context: *mut ibv_context,
    pub pd: *mut ibv_pd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// `struct ibv_comp_channel`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_comp_channel {
    pub context: *mut ibv_context,
    pub fd: c_int,
    pub refcnt: c_int,
}

/// `struct ibv_cq`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_cq {
    pub context: *mut ibv_context,
    pub channel: *mut ibv_comp_channel,
    pub cq_context: *mut c_void,
    pub handle: u32,
    pub cqe: c_int,
    pub mutex: pthread_mutex_t,
    pub cond: pthread_cond_t,
    pub comp_events_completed: u32,
    pub async_events_completed: u32,
}

/// `struct ibv_qp`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_qp {
    pub context: *mut ibv_context,
    pub qp_context: *mut c_void,
    pub pd: *mut ibv_pd,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut ibv_srq,
    pub handle: u32,
    pub qp_num: u32,
    pub state: c_int,
    pub qp_type: c_int,
    pub mutex: pthread_mutex_t,
    pub cond: pthread_cond_t,
    pub events_completed: u32,
}

/// `struct ibv_srq`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_srq {
    pub context: *mut ibv_context,
    pub srq_context: *mut c_void,
    pub pd: *mut ibv_pd,
    pub handle: u32,
    pub mutex: pthread_mutex_t,
    pub cond: pthread_cond_t,
    pub events_completed: u32,
}

/// `struct ibv_ah`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_ah {
    pub context: *mut ibv_context,
    pub pd: *mut ibv_pd,
    pub handle: u32,
}

/// `struct ibv_wc`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_wc {
    pub wr_id: u64,
    pub status: c_int,
    pub opcode: c_int,
    pub vendor_err: u32,
    pub byte_len: u32,
    /// Network order, with `IBV_WC_WITH_IMM` (a union with `invalidated_rkey` in C).
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: c_uint,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `ibv_send_wr.wr.rdma`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_rdma {
    pub remote_addr: u64,
    pub rkey: u32,
}

/// `ibv_send_wr.wr.atomic`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_atomic {
    pub remote_addr: u64,
    pub compare_add: u64,
    pub swap: u64,
    pub rkey: u32,
}

/// `ibv_send_wr.wr.ud`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_send_wr_ud {
    pub ah: *mut ibv_ah,
    pub remote_qpn: u32,
    pub remote_qkey: u32,
}

/// `ibv_send_wr.wr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ibv_send_wr_wr {
    pub rdma: ibv_send_wr_rdma,
    pub atomic: ibv_send_wr_atomic,
    pub ud: ibv_send_wr_ud,
}

/// `struct ibv_send_wr`.
#[repr(C)]
pub struct ibv_send_wr {
    pub wr_id: u64,
    pub next: *mut ibv_send_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
    pub opcode: c_int,
    pub send_flags: c_uint,
    /// Network order (a union with `invalidate_rkey` in C).
    pub imm_data: u32,
    pub wr: ibv_send_wr_wr,
    /// `qp_type.xrc.remote_srqn`.
    pub qp_type: u32,
    /// `bind_mw` / `tso`: memory windows and TSO, which the shim does not support.
    pub bind_mw: [u64; 6],
}

impl std::fmt::Debug for ibv_send_wr_wr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ibv_send_wr_wr { .. }")
    }
}

impl std::fmt::Debug for ibv_send_wr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ibv_send_wr")
            .field("wr_id", &self.wr_id)
            .field("opcode", &self.opcode)
            .field("num_sge", &self.num_sge)
            .field("send_flags", &self.send_flags)
            .finish_non_exhaustive()
    }
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_recv_wr {
    pub wr_id: u64,
    pub next: *mut ibv_recv_wr,
    pub sg_list: *mut ibv_sge,
    pub num_sge: c_int,
}

/// `struct ibv_device_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ibv_device_attr {
    pub fw_ver: [c_char; 64],
    /// Network order.
    pub node_guid: u64,
    /// Network order.
    pub sys_image_guid: u64,
    pub max_mr_size: u64,
    pub page_size_cap: u64,
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    pub hw_ver: u32,
    pub max_qp: c_int,
    pub max_qp_wr: c_int,
    pub device_cap_flags: c_uint,
    pub max_sge: c_int,
    pub max_sge_rd: c_int,
    pub max_cq: c_int,
    pub max_cqe: c_int,
    pub max_mr: c_int,
    pub max_pd: c_int,
    pub max_qp_rd_atom: c_int,
    pub max_ee_rd_atom: c_int,
    pub max_res_rd_atom: c_int,
    pub max_qp_init_rd_atom: c_int,
    pub max_ee_init_rd_atom: c_int,
    pub atomic_cap: c_int,
    pub max_ee: c_int,
    pub max_rdd: c_int,
    pub max_mw: c_int,
    pub max_raw_ipv6_qp: c_int,
    pub max_raw_ethy_qp: c_int,
    pub max_mcast_grp: c_int,
    pub max_mcast_qp_attach: c_int,
    pub max_total_mcast_qp_attach: c_int,
    pub max_ah: c_int,
    pub max_fmr: c_int,
    pub max_map_per_fmr: c_int,
    pub max_srq: c_int,
    pub max_srq_wr: c_int,
    pub max_srq_sge: c_int,
    pub max_pkeys: u16,
    pub local_ca_ack_delay: u8,
    pub phys_port_cnt: u8,
}

/// `struct ibv_port_attr` (52 bytes). The exported `ibv_query_port` writes only the first 48
/// (`_compat_ibv_port_attr`): binaries built against older headers pass that size, and
/// verbs.h's inline wrapper zeroes the rest itself.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_port_attr {
    pub state: c_int,
    pub max_mtu: c_int,
    pub active_mtu: c_int,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
}

/// The bytes of [`ibv_port_attr`] every caller of `ibv_query_port` owns.
pub const COMPAT_PORT_ATTR_SIZE: usize = 48;

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_global_route {
    pub dgid: ibv_gid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_ah_attr {
    pub grh: ibv_global_route,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_qp_cap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_qp_init_attr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut ibv_cq,
    pub recv_cq: *mut ibv_cq,
    pub srq: *mut ibv_srq,
    pub cap: ibv_qp_cap,
    pub qp_type: c_int,
    pub sq_sig_all: c_int,
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_qp_attr {
    pub qp_state: c_int,
    pub cur_qp_state: c_int,
    pub path_mtu: c_int,
    pub path_mig_state: c_int,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: c_uint,
    pub cap: ibv_qp_cap,
    pub ah_attr: ibv_ah_attr,
    pub alt_ah_attr: ibv_ah_attr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

/// `struct ibv_srq_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_srq_attr {
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

/// `struct ibv_srq_init_attr`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_srq_init_attr {
    pub srq_context: *mut c_void,
    pub attr: ibv_srq_attr,
}

/// `struct ibv_async_event`: `element` is a union of the object pointers and `port_num`.
#[repr(C)]
#[derive(Debug)]
pub struct ibv_async_event {
    pub element: *mut c_void,
    pub event_type: c_int,
}

/// `struct ibv_gid_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ibv_gid_entry {
    pub gid: ibv_gid,
    pub gid_index: u32,
    pub port_num: u32,
    pub gid_type: u32,
    pub ndev_ifindex: u32,
}

// enum ibv_node_type / ibv_transport_type
pub const IBV_NODE_CA: c_int = 1;
pub const IBV_TRANSPORT_IB: c_int = 0;

// enum ibv_port_state
pub const IBV_PORT_DOWN: c_int = 1;
pub const IBV_PORT_ACTIVE: c_int = 4;

// link layers
pub const IBV_LINK_LAYER_INFINIBAND: u8 = 1;
pub const IBV_LINK_LAYER_ETHERNET: u8 = 2;

// enum ibv_atomic_cap
pub const IBV_ATOMIC_NONE: c_int = 0;
pub const IBV_ATOMIC_HCA: c_int = 1;

// enum ibv_qp_type
pub const IBV_QPT_RC: c_int = 2;
pub const IBV_QPT_UC: c_int = 3;
pub const IBV_QPT_UD: c_int = 4;

// enum ibv_wr_opcode
pub const IBV_WR_RDMA_WRITE: c_int = 0;
pub const IBV_WR_RDMA_WRITE_WITH_IMM: c_int = 1;
pub const IBV_WR_SEND: c_int = 2;
pub const IBV_WR_SEND_WITH_IMM: c_int = 3;
pub const IBV_WR_RDMA_READ: c_int = 4;
pub const IBV_WR_ATOMIC_CMP_AND_SWP: c_int = 5;
pub const IBV_WR_ATOMIC_FETCH_AND_ADD: c_int = 6;

// enum ibv_send_flags
pub const IBV_SEND_FENCE: c_uint = 1;
pub const IBV_SEND_SIGNALED: c_uint = 2;
pub const IBV_SEND_SOLICITED: c_uint = 4;
pub const IBV_SEND_INLINE: c_uint = 8;

// enum ibv_wc_flags
pub const IBV_WC_GRH: c_uint = 1;
pub const IBV_WC_WITH_IMM: c_uint = 2;

// enum ibv_event_type
pub const IBV_EVENT_CQ_ERR: c_int = 0;
pub const IBV_EVENT_QP_FATAL: c_int = 1;
pub const IBV_EVENT_QP_REQ_ERR: c_int = 2;
pub const IBV_EVENT_QP_ACCESS_ERR: c_int = 3;
pub const IBV_EVENT_COMM_EST: c_int = 4;
pub const IBV_EVENT_SQ_DRAINED: c_int = 5;
pub const IBV_EVENT_DEVICE_FATAL: c_int = 8;
pub const IBV_EVENT_PORT_ACTIVE: c_int = 9;
pub const IBV_EVENT_PORT_ERR: c_int = 10;
pub const IBV_EVENT_SRQ_ERR: c_int = 14;
pub const IBV_EVENT_SRQ_LIMIT_REACHED: c_int = 15;
pub const IBV_EVENT_QP_LAST_WQE_REACHED: c_int = 16;

// enum ibv_qp_attr_mask: the same bits as vrdma_proto::qp::AttrMask (checked in qp.rs).
pub const IBV_QP_STATE: c_int = 1 << 0;
pub const IBV_QP_CUR_STATE: c_int = 1 << 1;
pub const IBV_QP_EN_SQD_ASYNC_NOTIFY: c_int = 1 << 2;
pub const IBV_QP_ACCESS_FLAGS: c_int = 1 << 3;
pub const IBV_QP_PKEY_INDEX: c_int = 1 << 4;
pub const IBV_QP_PORT: c_int = 1 << 5;
pub const IBV_QP_QKEY: c_int = 1 << 6;
pub const IBV_QP_AV: c_int = 1 << 7;
pub const IBV_QP_PATH_MTU: c_int = 1 << 8;
pub const IBV_QP_TIMEOUT: c_int = 1 << 9;
pub const IBV_QP_RETRY_CNT: c_int = 1 << 10;
pub const IBV_QP_RNR_RETRY: c_int = 1 << 11;
pub const IBV_QP_RQ_PSN: c_int = 1 << 12;
pub const IBV_QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub const IBV_QP_ALT_PATH: c_int = 1 << 14;
pub const IBV_QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub const IBV_QP_SQ_PSN: c_int = 1 << 16;
pub const IBV_QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub const IBV_QP_PATH_MIG_STATE: c_int = 1 << 18;
pub const IBV_QP_CAP: c_int = 1 << 19;
pub const IBV_QP_DEST_QPN: c_int = 1 << 20;
pub const IBV_QP_RATE_LIMIT: c_int = 1 << 25;

// enum ibv_srq_attr_mask
pub const IBV_SRQ_MAX_WR: c_int = 1 << 0;
pub const IBV_SRQ_LIMIT: c_int = 1 << 1;

// enum ibv_access_flags: the bits vrdma implements, and the optional range programs may add
// (perftest passes IBV_ACCESS_RELAXED_ORDERING) that a device may ignore.
pub const IBV_ACCESS_OPTIONAL_RANGE: c_uint = 0x3ff0_0000;

// enum ibv_gid_type (ibv_query_gid_type) and ibv_gid_type (_ibv_query_gid_ex)
pub const IBV_GID_TYPE_IB: u32 = 0;
pub const IBV_GID_TYPE_ROCE_V2: u32 = 2;

/// Checks the size of each struct and the offset of each field against the numbers
/// `layout/layout.c` printed from rdma-core v44's verbs.h (x86-64).
macro_rules! layout {
    ($($ty:ident $(. $field:ident @ $off:literal)? $(: size $size:literal)?;)*) => {
        $(
            $(const _: () = assert!(offset_of!($ty, $field) == $off, concat!("offset of ", stringify!($ty), ".", stringify!($field)));)?
            $(const _: () = assert!(size_of::<$ty>() == $size, concat!("size of ", stringify!($ty)));)?
        )*
        /// Every checked (struct, field, offset); `None` field is the struct's size.
        #[cfg(test)]
        pub(crate) const CHECKED: &[(&str, Option<&str>, usize)] = &[
            $(
                $((stringify!($ty), Some(stringify!($field)), $off),)?
                $((stringify!($ty), None, $size),)?
            )*
        ];
    };
}

#[cfg(target_pointer_width = "64")]
layout! {
    ibv_device: size 664;
    ibv_device._ops @ 0;
    ibv_device.node_type @ 16;
    ibv_device.transport_type @ 20;
    ibv_device.name @ 24;
    ibv_device.dev_name @ 88;
    ibv_device.dev_path @ 152;
    ibv_device.ibdev_path @ 408;
    ibv_context_ops: size 256;
    ibv_context_ops._compat_query_device @ 0;
    ibv_context_ops._compat_query_port @ 8;
    ibv_context_ops._compat_alloc_pd @ 16;
    ibv_context_ops._compat_dealloc_pd @ 24;
    ibv_context_ops._compat_reg_mr @ 32;
    ibv_context_ops._compat_rereg_mr @ 40;
    ibv_context_ops._compat_dereg_mr @ 48;
    ibv_context_ops.alloc_mw @ 56;
    ibv_context_ops.bind_mw @ 64;
    ibv_context_ops.dealloc_mw @ 72;
    ibv_context_ops._compat_create_cq @ 80;
    ibv_context_ops.poll_cq @ 88;
    ibv_context_ops.req_notify_cq @ 96;
    ibv_context_ops._compat_cq_event @ 104;
    ibv_context_ops._compat_resize_cq @ 112;
    ibv_context_ops._compat_destroy_cq @ 120;
    ibv_context_ops._compat_create_srq @ 128;
    ibv_context_ops._compat_modify_srq @ 136;
    ibv_context_ops._compat_query_srq @ 144;
    ibv_context_ops._compat_destroy_srq @ 152;
    ibv_context_ops.post_srq_recv @ 160;
    ibv_context_ops._compat_create_qp @ 168;
    ibv_context_ops._compat_query_qp @ 176;
    ibv_context_ops._compat_modify_qp @ 184;
    ibv_context_ops._compat_destroy_qp @ 192;
    ibv_context_ops.post_send @ 200;
    ibv_context_ops.post_recv @ 208;
    ibv_context_ops._compat_create_ah @ 216;
    ibv_context_ops._compat_destroy_ah @ 224;
    ibv_context_ops._compat_attach_mcast @ 232;
    ibv_context_ops._compat_detach_mcast @ 240;
    ibv_context_ops._compat_async_event @ 248;
    ibv_context: size 328;
    ibv_context.device @ 0;
    ibv_context.ops @ 8;
    ibv_context.cmd_fd @ 264;
    ibv_context.async_fd @ 268;
    ibv_context.num_comp_vectors @ 272;
    ibv_context.mutex @ 280;
    ibv_context.abi_compat @ 320;
    ibv_pd: size 16;
    ibv_pd.context @ 0;
    ibv_pd.handle @ 8;
    ibv_mr: size 48;
    ibv_mr.context @ 0;
    ibv_mr.pd @ 8;
    ibv_mr.addr @ 16;
    ibv_mr.length @ 24;
    ibv_mr.handle @ 32;
    ibv_mr.lkey @ 36;
    ibv_mr.rkey @ 40;
    ibv_comp_channel: size 16;
    ibv_comp_channel.context @ 0;
    ibv_comp_channel.fd @ 8;
    ibv_comp_channel.refcnt @ 12;
    ibv_cq: size 128;
    ibv_cq.context @ 0;
    ibv_cq.channel @ 8;
    ibv_cq.cq_context @ 16;
    ibv_cq.handle @ 24;
    ibv_cq.cqe @ 28;
    ibv_cq.mutex @ 32;
    ibv_cq.cond @ 72;
    ibv_cq.comp_events_completed @ 120;
    ibv_cq.async_events_completed @ 124;
    ibv_qp: size 160;
    ibv_qp.context @ 0;
    ibv_qp.qp_context @ 8;
    ibv_qp.pd @ 16;
    ibv_qp.send_cq @ 24;
    ibv_qp.recv_cq @ 32;
    ibv_qp.srq @ 40;
    ibv_qp.handle @ 48;
    ibv_qp.qp_num @ 52;
    ibv_qp.state @ 56;
    ibv_qp.qp_type @ 60;
    ibv_qp.mutex @ 64;
    ibv_qp.cond @ 104;
    ibv_qp.events_completed @ 152;
    ibv_srq: size 128;
    ibv_srq.context @ 0;
    ibv_srq.srq_context @ 8;
    ibv_srq.pd @ 16;
    ibv_srq.handle @ 24;
    ibv_srq.mutex @ 32;
    ibv_srq.cond @ 72;
    ibv_srq.events_completed @ 120;
    ibv_ah: size 24;
    ibv_ah.context @ 0;
    ibv_ah.pd @ 8;
    ibv_ah.handle @ 16;
    ibv_wc: size 48;
    ibv_wc.wr_id @ 0;
    ibv_wc.status @ 8;
    ibv_wc.opcode @ 12;
    ibv_wc.vendor_err @ 16;
    ibv_wc.byte_len @ 20;
    ibv_wc.qp_num @ 28;
    ibv_wc.src_qp @ 32;
    ibv_wc.wc_flags @ 36;
    ibv_wc.pkey_index @ 40;
    ibv_wc.slid @ 42;
    ibv_wc.sl @ 44;
    ibv_wc.dlid_path_bits @ 45;
    ibv_sge: size 16;
    ibv_sge.addr @ 0;
    ibv_sge.length @ 8;
    ibv_sge.lkey @ 12;
    ibv_send_wr: size 128;
    ibv_send_wr.wr_id @ 0;
    ibv_send_wr.next @ 8;
    ibv_send_wr.sg_list @ 16;
    ibv_send_wr.num_sge @ 24;
    ibv_send_wr.opcode @ 28;
    ibv_send_wr.send_flags @ 32;
    ibv_send_wr.wr @ 40;
    ibv_send_wr.qp_type @ 72;
    ibv_recv_wr: size 32;
    ibv_recv_wr.wr_id @ 0;
    ibv_recv_wr.next @ 8;
    ibv_recv_wr.sg_list @ 16;
    ibv_recv_wr.num_sge @ 24;
    ibv_device_attr: size 232;
    ibv_device_attr.fw_ver @ 0;
    ibv_device_attr.node_guid @ 64;
    ibv_device_attr.sys_image_guid @ 72;
    ibv_device_attr.max_mr_size @ 80;
    ibv_device_attr.page_size_cap @ 88;
    ibv_device_attr.vendor_id @ 96;
    ibv_device_attr.vendor_part_id @ 100;
    ibv_device_attr.hw_ver @ 104;
    ibv_device_attr.max_qp @ 108;
    ibv_device_attr.max_qp_wr @ 112;
    ibv_device_attr.device_cap_flags @ 116;
    ibv_device_attr.max_sge @ 120;
    ibv_device_attr.max_sge_rd @ 124;
    ibv_device_attr.max_cq @ 128;
    ibv_device_attr.max_cqe @ 132;
    ibv_device_attr.max_mr @ 136;
    ibv_device_attr.max_pd @ 140;
    ibv_device_attr.max_qp_rd_atom @ 144;
    ibv_device_attr.max_ee_rd_atom @ 148;
    ibv_device_attr.max_res_rd_atom @ 152;
    ibv_device_attr.max_qp_init_rd_atom @ 156;
    ibv_device_attr.max_ee_init_rd_atom @ 160;
    ibv_device_attr.atomic_cap @ 164;
    ibv_device_attr.max_ee @ 168;
    ibv_device_attr.max_rdd @ 172;
    ibv_device_attr.max_mw @ 176;
    ibv_device_attr.max_raw_ipv6_qp @ 180;
    ibv_device_attr.max_raw_ethy_qp @ 184;
    ibv_device_attr.max_mcast_grp @ 188;
    ibv_device_attr.max_mcast_qp_attach @ 192;
    ibv_device_attr.max_total_mcast_qp_attach @ 196;
    ibv_device_attr.max_ah @ 200;
    ibv_device_attr.max_fmr @ 204;
    ibv_device_attr.max_map_per_fmr @ 208;
    ibv_device_attr.max_srq @ 212;
    ibv_device_attr.max_srq_wr @ 216;
    ibv_device_attr.max_srq_sge @ 220;
    ibv_device_attr.max_pkeys @ 224;
    ibv_device_attr.local_ca_ack_delay @ 226;
    ibv_device_attr.phys_port_cnt @ 227;
    ibv_port_attr: size 52;
    ibv_port_attr.state @ 0;
    ibv_port_attr.max_mtu @ 4;
    ibv_port_attr.active_mtu @ 8;
    ibv_port_attr.gid_tbl_len @ 12;
    ibv_port_attr.port_cap_flags @ 16;
    ibv_port_attr.max_msg_sz @ 20;
    ibv_port_attr.bad_pkey_cntr @ 24;
    ibv_port_attr.qkey_viol_cntr @ 28;
    ibv_port_attr.pkey_tbl_len @ 32;
    ibv_port_attr.lid @ 34;
    ibv_port_attr.sm_lid @ 36;
    ibv_port_attr.lmc @ 38;
    ibv_port_attr.max_vl_num @ 39;
    ibv_port_attr.sm_sl @ 40;
    ibv_port_attr.subnet_timeout @ 41;
    ibv_port_attr.init_type_reply @ 42;
    ibv_port_attr.active_width @ 43;
    ibv_port_attr.active_speed @ 44;
    ibv_port_attr.phys_state @ 45;
    ibv_port_attr.link_layer @ 46;
    ibv_port_attr.flags @ 47;
    ibv_port_attr.port_cap_flags2 @ 48;
    ibv_global_route: size 24;
    ibv_global_route.dgid @ 0;
    ibv_global_route.flow_label @ 16;
    ibv_global_route.sgid_index @ 20;
    ibv_global_route.hop_limit @ 21;
    ibv_global_route.traffic_class @ 22;
    ibv_ah_attr: size 32;
    ibv_ah_attr.grh @ 0;
    ibv_ah_attr.dlid @ 24;
    ibv_ah_attr.sl @ 26;
    ibv_ah_attr.src_path_bits @ 27;
    ibv_ah_attr.static_rate @ 28;
    ibv_ah_attr.is_global @ 29;
    ibv_ah_attr.port_num @ 30;
    ibv_qp_cap: size 20;
    ibv_qp_cap.max_send_wr @ 0;
    ibv_qp_cap.max_recv_wr @ 4;
    ibv_qp_cap.max_send_sge @ 8;
    ibv_qp_cap.max_recv_sge @ 12;
    ibv_qp_cap.max_inline_data @ 16;
    ibv_qp_init_attr: size 64;
    ibv_qp_init_attr.qp_context @ 0;
    ibv_qp_init_attr.send_cq @ 8;
    ibv_qp_init_attr.recv_cq @ 16;
    ibv_qp_init_attr.srq @ 24;
    ibv_qp_init_attr.cap @ 32;
    ibv_qp_init_attr.qp_type @ 52;
    ibv_qp_init_attr.sq_sig_all @ 56;
    ibv_qp_attr: size 144;
    ibv_qp_attr.qp_state @ 0;
    ibv_qp_attr.cur_qp_state @ 4;
    ibv_qp_attr.path_mtu @ 8;
    ibv_qp_attr.path_mig_state @ 12;
    ibv_qp_attr.qkey @ 16;
    ibv_qp_attr.rq_psn @ 20;
    ibv_qp_attr.sq_psn @ 24;
    ibv_qp_attr.dest_qp_num @ 28;
    ibv_qp_attr.qp_access_flags @ 32;
    ibv_qp_attr.cap @ 36;
    ibv_qp_attr.ah_attr @ 56;
    ibv_qp_attr.alt_ah_attr @ 88;
    ibv_qp_attr.pkey_index @ 120;
    ibv_qp_attr.alt_pkey_index @ 122;
    ibv_qp_attr.en_sqd_async_notify @ 124;
    ibv_qp_attr.sq_draining @ 125;
    ibv_qp_attr.max_rd_atomic @ 126;
    ibv_qp_attr.max_dest_rd_atomic @ 127;
    ibv_qp_attr.min_rnr_timer @ 128;
    ibv_qp_attr.port_num @ 129;
    ibv_qp_attr.timeout @ 130;
    ibv_qp_attr.retry_cnt @ 131;
    ibv_qp_attr.rnr_retry @ 132;
    ibv_qp_attr.alt_port_num @ 133;
    ibv_qp_attr.alt_timeout @ 134;
    ibv_qp_attr.rate_limit @ 136;
    ibv_srq_attr: size 12;
    ibv_srq_attr.max_wr @ 0;
    ibv_srq_attr.max_sge @ 4;
    ibv_srq_attr.srq_limit @ 8;
    ibv_srq_init_attr: size 24;
    ibv_srq_init_attr.srq_context @ 0;
    ibv_srq_init_attr.attr @ 8;
    ibv_async_event: size 16;
    ibv_async_event.element @ 0;
    ibv_async_event.event_type @ 8;
    ibv_gid_entry: size 32;
    ibv_gid_entry.gid @ 0;
    ibv_gid_entry.gid_index @ 16;
    ibv_gid_entry.port_num @ 20;
    ibv_gid_entry.gid_type @ 24;
    ibv_gid_entry.ndev_ifindex @ 28;
    ibv_wc.imm_data @ 24;
    ibv_send_wr.imm_data @ 36;
    ibv_send_wr.bind_mw @ 80;
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("the libibverbs shim's struct layouts are checked for x86-64 Linux only");

#[cfg(test)]
mod tests {
    use super::CHECKED;
    use std::collections::HashMap;
    use std::path::Path;
    use std::process::Command;

    /// Recompiles `layout/layout.c` against the installed `<infiniband/verbs.h>` and checks that
    /// every size and offset it prints is the one this module asserts (and the reverse), so the
    /// asserted numbers cannot drift from the header they came from.
    #[test]
    fn layout_matches_the_system_verbs_header() {
        assert!(
            Path::new("/usr/include/infiniband/verbs.h").exists(),
            "this test needs <infiniband/verbs.h>: apt-get install libibverbs-dev (tests/run \
             installs it)"
        );
        let dir = std::env::temp_dir().join(format!("vrdma-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("layout");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("layout/layout.c");
        let status = Command::new("cc")
            .arg("-o")
            .arg(&exe)
            .arg(&source)
            .status()
            .expect("run cc");
        assert!(status.success(), "cc {} failed", source.display());
        let out = Command::new(&exe).output().expect("run the layout program");
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8(out.stdout).unwrap();
        let mut header: HashMap<(String, Option<String>), usize> = HashMap::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["size", ty, n] => {
                    header.insert((ty.to_string(), None), n.parse().unwrap());
                }
                ["off", ty, field, n] => {
                    header.insert(
                        (ty.to_string(), Some(field.to_string())),
                        n.parse().unwrap(),
                    );
                }
                _ => panic!("unexpected line from the layout program: {line:?}"),
            }
        }
        assert_eq!(
            header.len(),
            CHECKED.len(),
            "the header program and the asserts list different items"
        );
        for &(ty, field, value) in CHECKED {
            let key = (ty.to_string(), field.map(str::to_string));
            assert_eq!(header.get(&key), Some(&value), "{ty}.{field:?}");
        }
    }
}
