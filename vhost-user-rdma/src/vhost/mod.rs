//! The vhost-user side of the daemon: one listening socket per VM ([`server`]), the device a
//! frontend talks to ([`device`]: features, config space, the control queue), and the VM's
//! doorbell and event virtqueues ([`queues`], which give the scheduler its doorbells through
//! [`crate::sched::doorbells::Doorbells`] and take the VM's events through
//! [`crate::model::vm::EventSink`]).
//!
//! The VMs' sockets are watched by one `event-manager` loop ([`listen`]), which wakes a VM's
//! thread when a frontend waits.
//!
//! Files import one way: `queues` and `listen` are leaves, `device` builds on `queues`,
//! `server` on all three.

pub mod device;
pub mod listen;
pub mod queues;
pub mod server;
