//! The daemon's model of each VM, as data: its objects in generational handle tables
//! ([`objects`]), the control commands that change them ([`control`]), every QP's data-path
//! state including the RC transport's ([`qp_state`]), the connected VM that every thread
//! shares ([`vm`]), and guest memory with the one path every write into it takes
//! ([`memory`]). Nothing here knows of virtqueues, the scheduler or a fabric; the fabric learns
//! of object changes through [`hooks`].
//!
//! Imports inside the layer go one way: `memory` and `qp_state` are leaves, `objects` builds on
//! both, `hooks` on `objects`, and `control` and `vm` on all of them.

pub mod control;
pub mod hooks;
pub mod memory;
pub mod objects;
pub mod qp_state;
pub mod vm;
