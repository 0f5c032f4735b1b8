use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use vrdma_proto::cmd::{self, Opcode, RespHeader, Status};
use vrdma_proto::config::{self, DeviceCaps};
use vrdma_proto::doorbell::Doorbell;
use vrdma_proto::{DecodeError, Gid, features};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{Error, Result};
use crate::mem::{DmaBuf, SharedMemory};
use crate::transport::{DeviceEvent, Options, Transport, VirtioUser};

/// The transport, with its error type erased so verbs objects need no type parameter and a
/// second transport (virtio-pci) only adds an implementation.
trait DynTransport: Send + Sync + std::fmt::Debug {
    fn control(&self, request: &[u8], response: &mut [u8]) -> std::result::Result<usize, BoxError>;
    fn ring_doorbells(
        &self,
        queue: u16,
        doorbells: &[Doorbell],
    ) -> std::result::Result<(), BoxError>;
    fn event_fd(&self) -> RawFd;
    fn hangup_fd(&self) -> Option<RawFd>;
    fn drain_events(&self) -> std::result::Result<Vec<DeviceEvent>, BoxError>;
    fn alloc_dma(&self, len: usize, align: usize) -> std::result::Result<DmaBuf, BoxError>;
    fn is_shared(&self, addr: u64, len: u64) -> bool;
    fn shared_region(&self, addr: u64) -> Option<(u64, u64)>;
    fn device_addr(&self, addr: u64, len: u64) -> Option<u64>;
    fn add_memory(&self, mem: Arc<SharedMemory>) -> std::result::Result<(), BoxError>;
    fn remove_memory(&self, base: u64) -> std::result::Result<(), BoxError>;
    fn config(&self) -> &config::Config;
    fn num_doorbell_queues(&self) -> u16;
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<T: Transport + std::fmt::Debug> DynTransport for T {
    fn control(&self, request: &[u8], response: &mut [u8]) -> std::result::Result<usize, BoxError> {
        Transport::control(self, request, response).map_err(Into::into)
    }
    fn ring_doorbells(
        &self,
        queue: u16,
        doorbells: &[Doorbell],
    ) -> std::result::Result<(), BoxError> {
        Transport::ring_doorbells(self, queue, doorbells).map_err(Into::into)
    }
    fn event_fd(&self) -> RawFd {
        Transport::event_fd(self)
    }
    fn hangup_fd(&self) -> Option<RawFd> {
        Transport::hangup_fd(self)
    }
    fn drain_events(&self) -> std::result::Result<Vec<DeviceEvent>, BoxError> {
        Transport::drain_events(self).map_err(Into::into)
    }
    fn alloc_dma(&self, len: usize, align: usize) -> std::result::Result<DmaBuf, BoxError> {
        Transport::alloc_dma(self, len, align).map_err(Into::into)
    }
    fn is_shared(&self, addr: u64, len: u64) -> bool {
        Transport::is_shared(self, addr, len)
    }
    fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        Transport::shared_region(self, addr)
    }
    fn device_addr(&self, addr: u64, len: u64) -> Option<u64> {
        Transport::device_addr(self, addr, len)
    }
    fn add_memory(&self, mem: Arc<SharedMemory>) -> std::result::Result<(), BoxError> {
        Transport::add_memory(self, mem).map_err(Into::into)
    }
    fn remove_memory(&self, base: u64) -> std::result::Result<(), BoxError> {
        Transport::remove_memory(self, base).map_err(Into::into)
    }
    fn config(&self) -> &config::Config {
        Transport::config(self)
    }
    fn num_doorbell_queues(&self) -> u16 {
        Transport::num_doorbell_queues(self)
    }
}

/// A ring receives are posted on, as `POST_RECV` and `POST_SRQ_RECV` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReceiveRing {
    /// The receive ring of this QP.
    Qp(u32),
    /// This SRQ's ring.
    Srq(u32),
}

#[derive(Debug)]
pub(crate) struct Inner {
    transport: Box<dyn DynTransport>,
    /// `SYNC_RECV` was negotiated: every post of receives sends `POST_RECV` (or
    /// `POST_SRQ_RECV`). Read once here so a post without it costs no more than a branch.
    sync_receives: bool,
}

/// An open vrdma device (`ibv_context`).
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) inner: Arc<Inner>,
}

/// Device attributes (`ibv_device_attr`).
pub type DeviceAttr = DeviceCaps;
/// Port attributes (`ibv_port_attr`).
pub type PortAttr = config::PortAttr;

impl Context {
    /// Opens the device behind a vhost-user socket, this process being its own frontend
    /// (virtio-user).
    #[doc(alias = "ibv_open_device")]
    pub fn open(socket: impl AsRef<Path>) -> Result<Context> {
        Self::open_with(socket, Options::default())
    }

    /// As [`Context::open`], with transport options.
    pub fn open_with(socket: impl AsRef<Path>, options: Options) -> Result<Context> {
        let transport = VirtioUser::connect(socket, options).map_err(|e| Error::Transport {
            verb: "ibv_open_device",
            source: Box::new(e),
        })?;
        Ok(Self::from_transport(transport))
    }

    /// Opens the VM's virtio-pci function at `function` (its sysfs directory, as
    /// [`crate::device_list`] gives it); needs root inside the VM.
    pub fn open_pci(function: impl AsRef<Path>) -> Result<Context> {
        let options = crate::transport::PciOptions {
            device: Some(function.as_ref().to_path_buf()),
            ..Default::default()
        };
        let transport =
            crate::transport::VirtioPci::open(options).map_err(|e| Error::Transport {
                verb: "ibv_open_device",
                source: Box::new(e),
            })?;
        Ok(Self::from_transport(transport))
    }

    /// A context over any transport.
    pub fn from_transport<T: Transport + std::fmt::Debug + 'static>(transport: T) -> Context {
        let sync_receives = transport.features() & features::SYNC_RECV != 0;
        Context {
            inner: Arc::new(Inner {
                transport: Box::new(transport),
                sync_receives,
            }),
        }
    }

    /// Device attributes as the configuration space gives them.
    pub fn device_attr(&self) -> DeviceAttr {
        self.inner.transport.config().caps
    }

    /// The device's limits on shared receive queues, from the configuration space (they are
    /// not part of [`DeviceAttr`], which is what `QUERY_DEVICE` returns): `max_srq`,
    /// `max_srq_wr` and `max_srq_sge`, all zero if the device offers no SRQs.
    pub fn srq_caps(&self) -> super::SrqCaps {
        self.inner.srq_caps()
    }

    /// The port's GID (index 0).
    pub fn gid(&self) -> Gid {
        self.inner.transport.config().gid
    }

    /// Asks the device for its attributes.
    #[doc(alias = "ibv_query_device")]
    pub fn query_device(&self) -> Result<DeviceAttr> {
        let resp = self
            .inner
            .command(Opcode::QueryDevice, &[], "ibv_query_device")?;
        DeviceCaps::decode(&resp).map_err(|source| Error::Protocol {
            verb: "ibv_query_device",
            source,
        })
    }

    /// Asks the device for port `port`'s attributes.
    #[doc(alias = "ibv_query_port")]
    pub fn query_port(&self, port: u8) -> Result<PortAttr> {
        let body = cmd::QueryPort {
            port_num: port,
            reserved: [0; 7],
        };
        let resp = self
            .inner
            .command(Opcode::QueryPort, body.as_bytes(), "ibv_query_port")?;
        config::PortAttr::decode(&resp).map_err(|source| Error::Protocol {
            verb: "ibv_query_port",
            source,
        })
    }

    /// Asks the device for GID `index` of port `port`.
    #[doc(alias = "ibv_query_gid")]
    pub fn query_gid(&self, port: u8, index: u32) -> Result<Gid> {
        let body = cmd::QueryGid {
            port_num: port,
            reserved: [0; 3],
            index: index.into(),
        };
        let resp: cmd::QueryGidResp =
            self.inner
                .command_as(Opcode::QueryGid, body.as_bytes(), "ibv_query_gid")?;
        Ok(resp.gid)
    }

    /// Allocates `len` zeroed, page-aligned bytes the device can reach: the memory to register
    /// as MRs.
    pub fn alloc(&self, len: usize) -> Result<DmaBuf> {
        self.inner.alloc(len, 4096, "alloc")
    }

    /// Shares memory the application made itself (a memfd, say one backed by huge pages) with
    /// the device, so it can be registered as MRs.
    pub fn add_memory(&self, mem: Arc<SharedMemory>) -> Result<()> {
        self.inner
            .transport
            .add_memory(mem)
            .map_err(|source| Error::Transport {
                verb: "add_memory",
                source,
            })
    }

    /// Stops sharing memory added with [`Context::add_memory`]. MRs over it stay registered
    /// but every transfer through them fails, as the device can no longer reach the memory.
    pub fn remove_memory(&self, base: u64) -> Result<()> {
        self.inner
            .transport
            .remove_memory(base)
            .map_err(|source| Error::Transport {
                verb: "remove_memory",
                source,
            })
    }

    /// Whether the device can reach every byte of `addr..addr + len`: it lies in memory added
    /// with [`Context::add_memory`] or allocated with [`Context::alloc`] (in one region or in
    /// several adjacent ones), so it can be registered as an MR.
    pub fn is_shared(&self, addr: u64, len: u64) -> bool {
        self.inner.is_shared(addr, len)
    }

    /// The region of shared memory holding `addr`, as its first address and length; `None`
    /// if the device cannot reach `addr`.
    pub fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        self.inner.shared_region(addr)
    }

    /// The file descriptor that becomes readable when the device has events (completion
    /// channel events and asynchronous events).
    pub fn event_fd(&self) -> RawFd {
        self.inner.transport.event_fd()
    }

    /// The file descriptor that reports the device going away (for virtio-user, the
    /// vhost-user socket, which hangs up when the daemon closes the connection), or `None`
    /// for a transport without one. Wait for `POLLRDHUP`/`POLLHUP` on it.
    pub fn hangup_fd(&self) -> Option<RawFd> {
        self.inner.transport.hangup_fd()
    }
}

impl Inner {
    /// Sends a command and returns the response body, or the device's refusal.
    pub(crate) fn command(
        &self,
        opcode: Opcode,
        body: &[u8],
        verb: &'static str,
    ) -> Result<Vec<u8>> {
        let mut request = Vec::with_capacity(size_of::<cmd::Header>() + body.len());
        request.extend_from_slice(cmd::header(opcode).as_bytes());
        request.extend_from_slice(body);
        let mut response = vec![0u8; size_of::<RespHeader>() + opcode.response_len()];
        let n = self
            .transport
            .control(&request, &mut response)
            .map_err(|source| Error::Transport { verb, source })?;
        let (header, status) = RespHeader::decode(&response[..n.min(response.len())])
            .map_err(|source| Error::Protocol { verb, source })?;
        if status != Status::Ok {
            return Err(Error::Device {
                verb,
                status,
                errno: status.errno(),
                detail: header.detail.get(),
            });
        }
        response.truncate(n);
        response.drain(..size_of::<RespHeader>());
        Ok(response)
    }

    /// As [`Inner::command`], decoding the response as `T`.
    pub(crate) fn command_as<T: FromBytes + KnownLayout + Immutable>(
        &self,
        opcode: Opcode,
        body: &[u8],
        verb: &'static str,
    ) -> Result<T> {
        let resp = self.command(opcode, body, verb)?;
        T::read_from_prefix(&resp)
            .map(|(v, _)| v)
            .map_err(|_| Error::Protocol {
                verb,
                source: DecodeError::Truncated {
                    what: "response",
                    need: size_of::<T>(),
                    got: resp.len(),
                },
            })
    }

    pub(crate) fn alloc(&self, len: usize, align: usize, verb: &'static str) -> Result<DmaBuf> {
        self.transport
            .alloc_dma(len, align)
            .map_err(|source| Error::Transport { verb, source })
    }

    pub(crate) fn is_shared(&self, addr: u64, len: u64) -> bool {
        self.transport.is_shared(addr, len)
    }

    pub(crate) fn shared_region(&self, addr: u64) -> Option<(u64, u64)> {
        self.transport.shared_region(addr)
    }

    pub(crate) fn device_addr(&self, addr: u64, len: u64) -> Option<u64> {
        self.transport.device_addr(addr, len)
    }

    /// The device's address of a ring the library allocated (`addr..addr + len`): rings are
    /// single allocations, which the transports keep contiguous for the device.
    pub(crate) fn ring_addr(&self, addr: u64, len: u64, verb: &'static str) -> Result<u64> {
        self.device_addr(addr, len)
            .ok_or(Error::RingNotContiguous { verb, len })
    }

    pub(crate) fn ring(
        &self,
        doorbells: &[Doorbell],
        queue: u16,
        verb: &'static str,
    ) -> Result<()> {
        let queue = queue % self.transport.num_doorbell_queues().max(1);
        self.transport
            .ring_doorbells(queue, doorbells)
            .map_err(|source| Error::Transport { verb, source })
    }

    /// Tells the device that receives were published on `ring`, if it posts receives ahead of
    /// arrival (`SYNC_RECV`), and returns once it has posted them: a command, not a doorbell,
    /// since a doorbell is taken asynchronously and a peer answering this post could then
    /// reach the fabric before the receive it needs (a UD datagram would be dropped). Without
    /// `SYNC_RECV` the device reads receive rings when messages arrive, and this does nothing.
    /// The caller has stored the producer index (release) already, so the device sees every
    /// receive of the post.
    pub(crate) fn receives_posted(&self, ring: ReceiveRing, verb: &'static str) -> Result<()> {
        if !self.sync_receives {
            return Ok(());
        }
        let (opcode, handle) = match ring {
            ReceiveRing::Qp(qpn) => (Opcode::PostRecv, qpn),
            ReceiveRing::Srq(srqn) => (Opcode::PostSrqRecv, srqn),
        };
        let body = cmd::Handle {
            handle: handle.into(),
            reserved: 0.into(),
        };
        self.command(opcode, body.as_bytes(), verb).map(drop)
    }

    pub(crate) fn drain_events(&self, verb: &'static str) -> Result<Vec<DeviceEvent>> {
        self.transport
            .drain_events()
            .map_err(|source| Error::Transport { verb, source })
    }

    pub(crate) fn event_fd(&self) -> RawFd {
        self.transport.event_fd()
    }

    pub(crate) fn hangup_fd(&self) -> Option<RawFd> {
        self.transport.hangup_fd()
    }

    pub(crate) fn caps(&self) -> &DeviceCaps {
        &self.transport.config().caps
    }

    pub(crate) fn srq_caps(&self) -> config::SrqCaps {
        self.transport.config().srq
    }

    /// Destroys an object on drop; a failure is logged (drop cannot report it).
    pub(crate) fn destroy(&self, opcode: Opcode, handle: u32, verb: &'static str) {
        let body = cmd::Handle {
            handle: handle.into(),
            reserved: 0.into(),
        };
        if let Err(e) = self.command(opcode, body.as_bytes(), verb) {
            log::warn!("{}", crate::error_chain(&e));
        }
    }
}
