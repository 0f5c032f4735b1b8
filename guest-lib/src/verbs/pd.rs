use std::sync::Arc;

use vrdma_proto::cmd::{self, Opcode};

use super::Result;
use super::context::{Context, Inner};

#[derive(Debug)]
pub(crate) struct PdInner {
    pub(crate) ctx: Arc<Inner>,
    pub(crate) pdn: u32,
}

impl Drop for PdInner {
    fn drop(&mut self) {
        self.ctx
            .destroy(Opcode::DeallocPd, self.pdn, "ibv_dealloc_pd");
    }
}

/// A protection domain (`ibv_pd`).
#[derive(Debug, Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl ProtectionDomain {
    /// Allocates a protection domain.
    #[doc(alias = "ibv_alloc_pd")]
    pub fn new(ctx: &Context) -> Result<ProtectionDomain> {
        let resp: cmd::HandleResp = ctx.inner.command_as(Opcode::AllocPd, &[], "ibv_alloc_pd")?;
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                ctx: ctx.inner.clone(),
                pdn: resp.handle.get(),
            }),
        })
    }

    /// The PD number the device gave it.
    pub fn handle(&self) -> u32 {
        self.inner.pdn
    }
}
