//! The verbs fabric (`--fabric verbs:DEV`, cargo feature `verbs`): VMs' work carried by the
//! host's RDMA NIC through libibverbs.
//!
//! Built so far: [`nic`], the NIC behind safe types (device list, port and GID, PD, MR, CQ,
//! RC and UD QPs, posting and polling), and [`check`], the loopback self-test that
//! `--check-fabric` runs. Not built yet: mirroring guests' objects on the NIC and carrying
//! their work (docs/fabric.md says what is planned); until then the daemon opens the NIC to
//! report what it found and refuses to serve VMs over it.

pub mod check;
pub mod nic;
