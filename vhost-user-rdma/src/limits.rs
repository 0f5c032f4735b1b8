//! Device-wide limits: the most any VM can be given, whatever its quotas.

/// QPs per VM. QPNs carry 16 index bits and 8 generation bits: 24 bits, as on the wire.
pub const MAX_QP: u32 = 1 << 16;
/// CQs per VM.
pub const MAX_CQ: u32 = 1 << 16;
/// MRs per VM. Keys carry 20 index bits and 12 generation bits.
pub const MAX_MR: u32 = 1 << 20;
/// PDs per VM.
pub const MAX_PD: u32 = 1 << 16;
/// AHs per VM.
pub const MAX_AH: u32 = 1 << 16;
/// SRQs per VM.
pub const MAX_SRQ: u32 = 1 << 16;
/// Work requests per send or receive queue.
pub const MAX_QP_WR: u32 = 16 * 1024;
/// Work requests per shared receive queue.
pub const MAX_SRQ_WR: u32 = MAX_QP_WR;
/// Entries per CQ.
pub const MAX_CQE: u32 = 64 * 1024;
/// SGEs per work request.
pub const MAX_SGE: u32 = 16;
/// SGEs per shared receive queue work request (they share the receive path's copy).
pub const MAX_SRQ_SGE: u32 = MAX_SGE;
/// Inline bytes per send work request.
pub const MAX_INLINE: u32 = 512;
/// Outstanding RDMA READ/atomic requests per QP, either direction.
pub const MAX_RD_ATOM: u32 = 16;
/// Bytes in one MR.
pub const MAX_MR_SIZE: u64 = 1 << 40;
/// Largest message (the IB limit).
pub const MAX_MSG_SIZE: u32 = 1 << 31;
/// Index bits of QP numbers.
pub const QPN_INDEX_BITS: u32 = 16;
/// Generation bits of QP numbers.
pub const QPN_GENERATION_BITS: u32 = 8;
/// Index bits of MR keys.
pub const KEY_INDEX_BITS: u32 = 20;
/// Generation bits of MR keys.
pub const KEY_GENERATION_BITS: u32 = 12;
/// Index bits of PD, CQ, AH and SRQ handles.
pub const HANDLE_INDEX_BITS: u32 = 16;
/// Generation bits of PD, CQ, AH and SRQ handles.
pub const HANDLE_GENERATION_BITS: u32 = 16;
