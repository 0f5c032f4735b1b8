//! The rules of an RDMA NIC that every fabric shares: how a requester takes, checks, retires
//! and fails send work requests ([`requester`]), how a responder checks and applies requests
//! and consumes receives ([`responder`]), and how completions, flushes and the error state
//! work ([`completion`]). A fabric decides how bytes travel; these decide what a guest sees,
//! so every fabric shows the same verbs semantics.
//!
//! `completion` is the leaf; `requester` and `responder` build on it and not on each other.

pub mod completion;
pub mod requester;
pub mod responder;
