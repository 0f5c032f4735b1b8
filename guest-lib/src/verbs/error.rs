use vrdma_proto::cmd;

/// Why a verbs call failed. Every variant names the verb, as an operator reading a log needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device refused the command.
    #[error("{verb} failed: the device answered {status:?} (errno {errno}){}", detail_text(*.detail))]
    Device {
        /// The verb.
        verb: &'static str,
        /// The device's status.
        status: cmd::Status,
        /// `errno` as verbs would report it.
        errno: i32,
        /// For `ibv_modify_qp`, the attribute-mask bits at fault.
        detail: u32,
    },
    /// The transport to the device failed.
    #[error("{verb} failed: the transport to the device failed")]
    Transport {
        /// The verb.
        verb: &'static str,
        /// What the transport reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An argument is invalid before anything reaches the device.
    #[error("{verb} failed: {reason}")]
    InvalidArgument {
        /// The verb.
        verb: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Memory to register is not in memory the device can reach.
    #[error(
        "ibv_reg_mr failed: {len} bytes at {addr:#x} are not in memory shared with the device; allocate buffers with Context::alloc or share their memory with Context::add_memory"
    )]
    NotShareable {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The transport could not give the device a ring as one contiguous stretch.
    #[error(
        "{verb} failed: the device cannot reach a ring of {len} bytes as one contiguous stretch \
         of memory; inside a VM, reserve huge pages (echo 64 > /proc/sys/vm/nr_hugepages) or \
         ask for fewer entries"
    )]
    RingNotContiguous {
        /// The verb.
        verb: &'static str,
        /// The ring's bytes.
        len: u64,
    },
    /// The work queue has no room (verbs returns ENOMEM).
    #[error("{verb} failed: the queue is full ({depth} entries); poll completions first")]
    QueueFull {
        /// The verb.
        verb: &'static str,
        /// The queue's depth.
        depth: u32,
    },
    /// The device answered with something that does not decode.
    #[error("{verb} failed: the device's answer is malformed")]
    Protocol {
        /// The verb.
        verb: &'static str,
        /// What is wrong with it.
        #[source]
        source: vrdma_proto::DecodeError,
    },
}

fn detail_text(detail: u32) -> String {
    if detail == 0 {
        String::new()
    } else {
        format!(", attributes at fault {detail:#x}")
    }
}

impl Error {
    /// The `errno` verbs would report for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Device { errno, .. } => *errno,
            Error::Transport { .. } => libc::EIO,
            Error::InvalidArgument { .. } | Error::NotShareable { .. } => libc::EINVAL,
            Error::QueueFull { .. } | Error::RingNotContiguous { .. } => libc::ENOMEM,
            Error::Protocol { .. } => libc::EPROTO,
        }
    }

    /// The device status, if the device refused.
    pub fn status(&self) -> Option<cmd::Status> {
        match self {
            Error::Device { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn invalid(verb: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            verb,
            reason: reason.into(),
        }
    }
}
