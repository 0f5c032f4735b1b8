//! The daemon's model of each VM, as data: its objects in generational handle tables
//! ([`objects`]), the control commands that change them ([`control`]), every QP's data-path
//! state including the RC transport's ([`qp_state`]), the connected VM that every thread
//! shares ([`vm`]), and guest memory with the one path every write into it takes
//! ([`memory`]). Nothing here knows of virtqueues, the scheduler or a fabric; the fabric learns
//! of object changes through [`hooks`].
//!
//! A VM's state as live migration saves and restores it is in [`state`].
//!
//! Imports inside the layer go one way: `memory` and `qp_state` are leaves, `objects` builds on
//! both, `hooks` on `objects`, `control` and `vm` on all of them, and `state` on everything.

pub mod control;
pub mod hooks;
pub mod memory;
pub mod objects;
pub mod qp_state;
pub mod state;
pub mod vm;
