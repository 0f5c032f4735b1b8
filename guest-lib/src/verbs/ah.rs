use std::sync::Arc;

use vrdma_proto::cmd::{self, Opcode};
use vrdma_proto::{Gid, qp};
use zerocopy::IntoBytes;

use super::Result;
use super::pd::{PdInner, ProtectionDomain};

/// An address vector (`ibv_ah_attr` with its GRH).
pub type AhAttr = qp::AhAttr;

/// An address handle (`ibv_ah`), for UD sends.
#[derive(Debug)]
pub struct AddressHandle {
    pd: Arc<PdInner>,
    handle: u32,
}

impl AddressHandle {
    /// Creates an address handle.
    #[doc(alias = "ibv_create_ah")]
    pub fn new(pd: &ProtectionDomain, attr: &AhAttr) -> Result<AddressHandle> {
        let body = cmd::CreateAh {
            pdn: pd.inner.pdn.into(),
            reserved: 0.into(),
            attr: *attr,
        };
        let resp: cmd::HandleResp =
            pd.inner
                .ctx
                .command_as(Opcode::CreateAh, body.as_bytes(), "ibv_create_ah")?;
        Ok(AddressHandle {
            pd: pd.inner.clone(),
            handle: resp.handle.get(),
        })
    }

    /// The address vector to reach port `dgid` (RoCEv2: always global, port 1).
    pub fn attr_for(dgid: Gid) -> AhAttr {
        AhAttr {
            dgid,
            is_global: 1,
            port_num: 1,
            hop_limit: 64,
            ..AhAttr::default()
        }
    }

    /// The handle the device gave it.
    pub fn handle(&self) -> u32 {
        self.handle
    }
}

impl Drop for AddressHandle {
    #[doc(alias = "ibv_destroy_ah")]
    fn drop(&mut self) {
        self.pd
            .ctx
            .destroy(Opcode::DestroyAh, self.handle, "ibv_destroy_ah");
    }
}
