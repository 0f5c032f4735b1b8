//! The vhost-user side of the daemon: one listening socket per VM ([`server`]), the device a
//! frontend talks to ([`device`]: features, config space, the control queue), and the VM's
//! doorbell and event virtqueues ([`queues`], which give the scheduler its doorbells through
//! [`crate::sched::doorbells::Doorbells`] and take the VM's events through
//! [`crate::model::vm::EventSink`]).
//!
//! Files import one way: `queues` is the leaf, `device` builds on it, `server` on both.

pub mod device;
pub mod queues;
pub mod server;
