//! Memory-region access rights.

bitflags::bitflags! {
    /// Access rights of a memory region or of a QP's responder, with the bit values of
    /// `ibv_access_flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Access: u32 {
        /// The device may write into the region for this VM's own receives and READ responses.
        const LOCAL_WRITE = 1 << 0;
        /// Peers may RDMA WRITE into the region.
        const REMOTE_WRITE = 1 << 1;
        /// Peers may RDMA READ from the region.
        const REMOTE_READ = 1 << 2;
        /// Peers may perform atomics on the region.
        const REMOTE_ATOMIC = 1 << 3;
    }
}

impl Access {
    /// Remote write and remote atomic need local write as well, as in verbs
    /// (`ibv_reg_mr` fails with EINVAL otherwise).
    pub fn is_consistent(self) -> bool {
        !self.intersects(Access::REMOTE_WRITE | Access::REMOTE_ATOMIC)
            || self.contains(Access::LOCAL_WRITE)
    }
}

/// The smallest page a page list may name (4 KiB).
pub const MIN_PAGE_SHIFT: u8 = 12;
/// The largest page a page list may name (1 GiB).
pub const MAX_PAGE_SHIFT: u8 = 30;
