//! vhost-user-rdma: the host side of the vrdma paravirtual RDMA device.
//!
//! One process serves many VMs, each over its own vhost-user socket. The modules are layers,
//! and each imports only from the layers below it (docs/architecture.md draws them):
//!
//! 1. [`config`], [`limits`], [`handle`], [`wake`]: plain data, the command line, the leaves
//!    (and what the scheduler sleeps on, which devices and fabrics ring);
//! 2. [`model`]: each VM's objects, QP state and guest memory, with the one path every write
//!    into a guest takes;
//! 3. [`rnic`]: the requester, responder and completion rules every fabric shares;
//! 4. [`fabric`]: how work reaches a peer (the [`fabric::Fabric`] trait, the soft fabric, the
//!    RoCEv2 fabric between hosts);
//! 5. [`sched`]: deficit round robin over the VMs, rate limits, timers, doorbell polling;
//! 6. [`vhost`]: the vhost-user backend, one socket and device per VM, its virtqueues;
//! 7. [`daemon`] and [`metrics`] (the Prometheus endpoint the daemon starts, reading the
//!    layers below): everything started and stopped together;
//! 8. [`manage`]: the control plane, an `event-manager` loop over the signals and the
//!    management socket, changing the daemon as an operator asks;
//! 9. [`cli`] and [`ctl`]: the programs, `vhost-user-rdma` and `vrdmactl`.

pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod fabric;
pub mod handle;
pub mod limits;
pub mod manage;
pub mod metrics;
pub mod model;
pub mod rnic;
pub mod sched;
pub mod vhost;
pub mod wake;

#[cfg(test)]
mod rules_tests;
#[cfg(test)]
mod srq_tests;
#[cfg(test)]
mod testing;
