//! Application buffers made reachable by the device (placeholder until the memfd swap lands:
//! only memory already shared with the device can be registered).

/// Why memory could not be made reachable.
#[derive(Debug, thiserror::Error)]
pub enum AppMemoryError {
    /// Not shared memory.
    #[error("{len} bytes at {addr:#x} are not memory the shim can share with the device")]
    NotShareable {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
}

impl AppMemoryError {
    /// The errno `ibv_reg_mr` sets.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// One per open context.
#[derive(Debug)]
pub struct DeviceMemory {
    _ctx: vrdma::Context,
}

/// A pin.
#[derive(Debug)]
pub struct Pinned;

impl DeviceMemory {
    /// For a context.
    pub fn new(ctx: vrdma::Context) -> DeviceMemory {
        DeviceMemory { _ctx: ctx }
    }

    /// Pins.
    pub fn pin(&self, _addr: u64, _len: u64) -> Result<Pinned, AppMemoryError> {
        Ok(Pinned)
    }
}

/// `ibv_fork_init`.
pub fn fork_init() -> i32 {
    0
}
