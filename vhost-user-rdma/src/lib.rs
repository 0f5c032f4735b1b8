//! vhost-user-rdma: the host side of the vrdma paravirtual RDMA device.
//!
//! One process serves many VMs, each over its own vhost-user socket ([`server`]). Per VM, a
//! [`device::VmDevice`] speaks the vrdma protocol (`vrdma-proto`) on its virtqueues and keeps
//! that VM's objects in a [`vm::Vm`], named by generational [`handle`]s. All VMs' work meets
//! in the [`engine`], which shares the fabric between them by weight and moves the bytes
//! ([`xfer`]) and completions ([`completion`]).

pub mod cli;
pub mod completion;
pub mod config;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod handle;
pub mod limits;
pub mod port;
pub mod server;
pub mod vm;
pub mod wire;
pub mod xfer;
