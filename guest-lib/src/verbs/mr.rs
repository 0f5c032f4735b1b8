use std::sync::Arc;

use vrdma_proto::cmd::{self, Opcode};
use vrdma_proto::mr::Access;
use zerocopy::IntoBytes;

use super::pd::{PdInner, ProtectionDomain};
use super::{Error, Result};
use crate::mem::DmaBuf;

/// Memory-region access flags (`ibv_access_flags`).
pub type AccessFlags = Access;

/// Page size used for page lists: the smallest the device accepts, so any mapping works.
const PAGE_SHIFT: u8 = vrdma_proto::mr::MIN_PAGE_SHIFT;

/// A registered memory region (`ibv_mr`).
#[derive(Debug)]
pub struct MemoryRegion {
    pd: Arc<PdInner>,
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: u64,
}

impl MemoryRegion {
    /// Registers `buf` with `access` rights.
    #[doc(alias = "ibv_reg_mr")]
    pub fn register(
        pd: &ProtectionDomain,
        buf: &DmaBuf,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        // SAFETY-free: the DmaBuf is shared memory that lives at least as long as the caller
        // keeps it; the MR only records its address.
        Self::register_range(pd, buf.addr(), buf.len() as u64, access)
    }

    /// Registers `len` bytes at `addr`, which must lie in memory from [`super::Context::alloc`]
    /// (the device can only reach shared memory).
    #[doc(alias = "ibv_reg_mr")]
    pub fn register_range(
        pd: &ProtectionDomain,
        addr: u64,
        len: u64,
        access: AccessFlags,
    ) -> Result<MemoryRegion> {
        const VERB: &str = "ibv_reg_mr";
        if len == 0 {
            return Err(Error::invalid(VERB, "length is zero"));
        }
        if !access.is_consistent() {
            return Err(Error::invalid(
                VERB,
                "remote write or atomic access needs local write",
            ));
        }
        if !pd.inner.ctx.is_shared(addr, len) {
            return Err(Error::NotShareable { addr, len });
        }
        let page = 1u64 << PAGE_SHIFT;
        let first = addr & !(page - 1);
        let offset = addr - first;
        let npages = (offset + len).div_ceil(page);
        let body = cmd::RegMr {
            pdn: pd.inner.pdn.into(),
            access: access.bits().into(),
            iova: addr.into(),
            length: len.into(),
            first_page_offset: (offset as u32).into(),
            npages: (npages as u32).into(),
            page_shift: PAGE_SHIFT,
            reserved: [0; 7],
        };
        // Under virtio-user guest-physical addresses are this process's addresses, so the page
        // list is the pages themselves.
        let mut request = Vec::with_capacity(size_of::<cmd::RegMr>() + npages as usize * 8);
        request.extend_from_slice(body.as_bytes());
        for i in 0..npages {
            request.extend_from_slice(&(first + i * page).to_le_bytes());
        }
        let resp: cmd::RegMrResp = pd.inner.ctx.command_as(Opcode::RegMr, &request, VERB)?;
        Ok(MemoryRegion {
            pd: pd.inner.clone(),
            lkey: resp.lkey.get(),
            rkey: resp.rkey.get(),
            addr,
            len,
        })
    }

    /// The local key.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The remote key (0 without remote access).
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty (never: registration refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MemoryRegion {
    #[doc(alias = "ibv_dereg_mr")]
    fn drop(&mut self) {
        self.pd
            .ctx
            .destroy(Opcode::DeregMr, self.lkey, "ibv_dereg_mr");
    }
}
