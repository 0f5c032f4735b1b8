//! Live migration of a virtio-user guest, driven the way QEMU drives a vhost-user device
//! (QEMU 9.x to 11.x; docs/migration.md lists the sequence and where it comes from).
//!
//! A [`Migration`] is the VMM's hand on the device while it moves the VM: it holds every
//! virtqueue of the transport, as stopped vCPUs leave the driver's queues alone, and sends
//! each step's messages on the source's connection or on the destination's. Guest memory is
//! the VMM's business: it copies the regions ([`Migration::regions`]) into the destination's
//! memory during pre-copy, reads the dirty log the device keeps, and moves the guest onto the
//! copy ([`crate::mem::SharedMemory::replace_backing`]) before [`Migration::switch_over`].

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserHeaderFlag,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::epoll::ControlOperation;
use vrdma_proto::queue;

use super::{
    Handshake, Held, Result, StoppedRing, VirtioUser, VirtioUserError, Vq, event_err, logged,
    read_config, set_log_base, set_logging, watch_hangup,
};
use crate::mem::SharedMemory;

/// The device's side of a VM being migrated: every virtqueue held, the source's connection
/// and, once made, the destination's.
pub struct Migration<'a> {
    vu: &'a VirtioUser,
    held: Held<'a>,
    /// The dirty log is on at the source.
    logging: bool,
    /// Where the source stopped each ring (`GET_VRING_BASE`), once stopped.
    stopped: Option<Vec<StoppedRing>>,
    destination: Option<(PathBuf, Frontend)>,
}

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("socket", &self.vu.socket_path())
            .field("logging", &self.logging)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// A pipe, as QEMU makes one for the device state: (read end, write end).
fn pipe() -> std::io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; nothing else is touched.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(read), File::from(write)))
}

impl VirtioUser {
    /// Starts migrating this guest: holds every virtqueue until the returned [`Migration`]
    /// ends with [`Migration::switch_over`] or [`Migration::cancel`]. Other threads' commands,
    /// doorbells and event draining wait meanwhile, as they would on a VM whose vCPUs are
    /// stopped; the caller must not use this transport itself until then.
    pub fn begin_migration(&self) -> Result<Migration<'_>> {
        let held = self.hold()?;
        for needed in [
            (VhostUserProtocolFeatures::LOG_SHMFD, "LOG_SHMFD"),
            (VhostUserProtocolFeatures::DEVICE_STATE, "DEVICE_STATE"),
        ] {
            if !self.protocol.contains(needed.0) {
                return Err(VirtioUserError::MissingProtocolFeature {
                    socket: self.socket_path(),
                    feature: needed.1,
                    offered: self.protocol.bits(),
                });
            }
        }
        Ok(Migration {
            vu: self,
            held,
            logging: false,
            stopped: None,
            destination: None,
        })
    }
}

impl Migration<'_> {
    fn vqs(&self) -> Vec<&Vq> {
        self.held.vqs()
    }

    /// The source's socket and connection.
    fn source(&self) -> (PathBuf, Frontend) {
        (self.vu.socket_path(), self.held.memory.frontend.clone())
    }

    /// The regions of guest memory the device can reach: what the VMM copies.
    pub fn regions(&self) -> &[Arc<SharedMemory>] {
        &self.held.memory.regions
    }

    /// Turns on the device's dirty log at the source, as QEMU's `vhost_migration_log(true)`:
    /// `SET_LOG_BASE` (`log`, `size` bytes from offset 0), `SET_FEATURES` with `LOG_ALL`, and
    /// `SET_VRING_ADDR` with `VHOST_VRING_F_LOG` for every ring. The rings keep running.
    /// Page `gpa / 4096` is bit `page % 8` of byte `page / 8` of `log`.
    pub fn start_dirty_log(&mut self, log: BorrowedFd<'_>, size: u64) -> Result<()> {
        let (socket, frontend) = self.source();
        let hs = Handshake {
            socket: &socket,
            frontend,
        };
        set_logging(&hs, &self.vqs(), self.vu.features, Some((log, size)))?;
        self.logging = true;
        Ok(())
    }

    /// Stops the device at the source, as QEMU's `vhost_dev_stop` at switch-over:
    /// `SET_VRING_ENABLE 0` for every ring, then `GET_VRING_BASE` for each. Once it returns
    /// the device writes nothing more into guest memory.
    pub fn stop_rings(&mut self) -> Result<&[StoppedRing]> {
        let (socket, frontend) = self.source();
        let mut hs = Handshake {
            socket: &socket,
            frontend,
        };
        for vq in self.vqs() {
            let r = hs.frontend.set_vring_enable(usize::from(vq.index), false);
            hs.step(format!("SET_VRING_ENABLE 0 (queue {})", vq.index), r)?;
        }
        let stopped = self
            .vqs()
            .iter()
            .map(|vq| hs.stop_vring(vq))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.stopped.insert(stopped))
    }

    /// Saves the device's state at the source, as QEMU's `vhost_save_backend_state`: a pipe's
    /// write end with `SET_DEVICE_STATE_FD(SAVE, STOPPED)`, everything read from the other
    /// end until the device closes it, then `CHECK_DEVICE_STATE`.
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        let (socket, frontend) = self.source();
        let hs = Handshake {
            socket: &socket,
            frontend,
        };
        let (mut read, write) = pipe().map_err(event_err("creating the device-state pipe"))?;
        let r = hs.frontend.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(write),
        );
        if let Some(other) = hs.step("SET_DEVICE_STATE_FD (SAVE)", r)? {
            read = other;
        }
        let mut blob = Vec::new();
        read.read_to_end(&mut blob)
            .map_err(event_err("reading the device state"))?;
        let r = hs.frontend.check_device_state();
        hs.step("CHECK_DEVICE_STATE (SAVE)", r)?;
        Ok(blob)
    }

    /// Connects to the destination daemon's socket and sets the device up as QEMU's
    /// `-incoming` does when it realizes it: `SET_OWNER`, `GET_FEATURES`,
    /// `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM`,
    /// `GET_MAX_MEM_SLOTS`, `SET_VRING_CALL` for every ring, `GET_CONFIG`. No memory table
    /// yet: the destination has none until the VM starts.
    pub fn connect_destination(&mut self, socket: impl AsRef<Path>) -> Result<()> {
        let socket = socket.as_ref().to_path_buf();
        let stream = UnixStream::connect(&socket).map_err(|source| VirtioUserError::Connect {
            socket: socket.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(self.vu.timeout))
            .map_err(event_err("setting the vhost-user socket timeout"))?;
        let max_queues = u64::from(queue::count(queue::MAX_DOORBELL_QUEUES));
        let mut hs = Handshake {
            socket: &socket,
            frontend: Frontend::from_stream(stream, max_queues),
        };
        hs.step("SET_OWNER", hs.frontend.set_owner())?;
        let offered = hs.step("GET_FEATURES", hs.frontend.get_features())?;
        if offered & self.vu.features != self.vu.features {
            return Err(VirtioUserError::MissingFeature {
                socket,
                feature: "the features the source negotiated",
                offered,
            });
        }
        let r = hs.frontend.get_protocol_features();
        let protocol = hs.step("GET_PROTOCOL_FEATURES", r)?;
        if !protocol.contains(self.vu.protocol) {
            return Err(VirtioUserError::MissingProtocolFeature {
                socket,
                feature: "the protocol features the source negotiated",
                offered: protocol.bits(),
            });
        }
        let r = hs.frontend.set_protocol_features(self.vu.protocol);
        hs.step("SET_PROTOCOL_FEATURES", r)?;
        if self
            .vu
            .protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            hs.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if self.vu.protocol.contains(VhostUserProtocolFeatures::MQ) {
            let r = hs.frontend.get_queue_num();
            hs.step("GET_QUEUE_NUM", r)?;
        }
        if self.held.memory.slots {
            let r = hs.frontend.get_max_mem_slots();
            hs.step("GET_MAX_MEM_SLOTS", r)?;
        }
        for vq in self.vqs() {
            let r = hs.frontend.set_vring_call(usize::from(vq.index), &vq.call);
            hs.step(format!("SET_VRING_CALL (queue {})", vq.index), r)?;
        }
        let config = read_config(hs.socket, &mut hs.frontend)?;
        if config.num_doorbell_queues != self.vu.config.num_doorbell_queues {
            return Err(VirtioUserError::InvalidOption {
                option: "destination",
                reason: format!(
                    "{} has {} doorbell queues where the source has {}: configure the VM alike on both daemons",
                    socket.display(),
                    config.num_doorbell_queues.get(),
                    self.vu.config.num_doorbell_queues.get()
                ),
            });
        }
        let frontend = hs.frontend;
        self.destination = Some((socket, frontend));
        Ok(())
    }

    /// The destination's socket and connection.
    fn destination(&self) -> Result<(PathBuf, Frontend)> {
        self.destination
            .clone()
            .ok_or_else(|| VirtioUserError::InvalidOption {
                option: "destination",
                reason: "connect_destination was not called".into(),
            })
    }

    /// Loads `blob` into the destination, as QEMU's `vhost_load_backend_state`: a pipe's read
    /// end with `SET_DEVICE_STATE_FD(LOAD, STOPPED)`, the blob written to the other end and
    /// the end closed, then `CHECK_DEVICE_STATE`, which fails if the destination refused it.
    pub fn load_state(&mut self, blob: &[u8]) -> Result<()> {
        let (socket, frontend) = self.destination()?;
        let hs = Handshake {
            socket: &socket,
            frontend,
        };
        let (read, mut write) = pipe().map_err(event_err("creating the device-state pipe"))?;
        let r = hs.frontend.set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            OwnedFd::from(read),
        );
        if let Some(other) = hs.step("SET_DEVICE_STATE_FD (LOAD)", r)? {
            write = other;
        }
        // A destination that fails early closes its end: the check below says why.
        let written = write.write_all(blob);
        drop(write);
        let r = hs.frontend.check_device_state();
        hs.step("CHECK_DEVICE_STATE (LOAD)", r)?;
        written.map_err(event_err("writing the device state"))?;
        Ok(())
    }

    /// Starts the destination and moves the guest onto it, as QEMU's `vhost_dev_start` on the
    /// destination: `SET_FEATURES`, the memory table (`ADD_MEM_REG` for every region, or
    /// `SET_MEM_TABLE`), then for every ring `SET_VRING_NUM`, `SET_VRING_BASE` (where the
    /// source stopped), `SET_VRING_ADDR`, `SET_VRING_KICK`, `SET_VRING_CALL`, and
    /// `SET_VRING_ENABLE 1` for every ring. The source's connection is closed after, as the
    /// source QEMU exits. The caller has moved every region onto the destination's copy.
    pub fn switch_over(mut self) -> Result<()> {
        let stopped = self
            .stopped
            .clone()
            .ok_or_else(|| VirtioUserError::InvalidOption {
                option: "switch_over",
                reason: "the source's rings were not stopped".into(),
            })?;
        let (socket, frontend) = self.destination()?;
        let mut hs = Handshake {
            socket: &socket,
            frontend,
        };
        let r = hs.frontend.set_features(self.vu.features);
        hs.step(format!("SET_FEATURES ({:#x})", self.vu.features), r)?;
        let table: Vec<VhostUserMemoryRegionInfo> = self
            .held
            .memory
            .regions
            .iter()
            .map(|r| r.region_info())
            .collect();
        if self.held.memory.slots {
            for region in &table {
                let r = hs.frontend.add_mem_region(region);
                hs.step(format!("ADD_MEM_REG ({:#x})", region.guest_phys_addr), r)?;
            }
        } else {
            let r = hs.frontend.set_mem_table(&table);
            hs.step("SET_MEM_TABLE", r)?;
        }
        self.start_rings(&mut hs, &stopped, None)?;
        let (socket, frontend) =
            self.destination
                .take()
                .ok_or_else(|| VirtioUserError::InvalidOption {
                    option: "switch_over",
                    reason: "connect_destination was not called".into(),
                })?;
        // The guest's own waits notice the new daemon going away, not the old one.
        let old_fd = self.vu.socket_fd.load(Ordering::Relaxed);
        let new_fd = frontend.as_raw_fd();
        for epoll in [&self.vu.hangup, &self.held.control.waiter] {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                old_fd,
                vmm_sys_util::epoll::EpollEvent::default(),
            );
            watch_hangup(epoll, new_fd)?;
        }
        self.vu.socket_fd.store(new_fd, Ordering::Relaxed);
        *self.vu.socket.write().unwrap_or_else(|p| p.into_inner()) = socket;
        // Dropping the source's frontend closes its connection.
        self.held.memory.frontend = frontend;
        Ok(())
    }

    /// Gives the VM back to the source (the migration failed or was cancelled before the
    /// switch-over), as QEMU does: if the rings were stopped, `vhost_dev_start` on the source
    /// (`SET_FEATURES` with `LOG_ALL` while the log is on, then every ring restarted where it
    /// stopped, `SET_LOG_BASE` again, `SET_VRING_ENABLE 1`); then, with the log on,
    /// `vhost_migration_log(false)`: `SET_FEATURES` without `LOG_ALL` and `SET_VRING_ADDR`
    /// without the log flag. `log` is the log given to [`Migration::start_dirty_log`], which
    /// QEMU hands the device again when it restarts it with logging on. The destination's
    /// connection is closed.
    pub fn cancel(mut self, log: Option<(BorrowedFd<'_>, u64)>) -> Result<()> {
        self.destination = None;
        let (socket, frontend) = self.source();
        let mut hs = Handshake {
            socket: &socket,
            frontend,
        };
        if let Some(stopped) = self.stopped.take() {
            let mut features = self.vu.features;
            if self.logging {
                features |= VhostUserVirtioFeatures::LOG_ALL.bits();
            }
            let r = hs.frontend.set_features(features);
            hs.step(format!("SET_FEATURES ({features:#x})"), r)?;
            self.start_rings(&mut hs, &stopped, log.filter(|_| self.logging))?;
        }
        if self.logging {
            set_logging(&hs, &self.vqs(), self.vu.features, None)?;
            self.logging = false;
        }
        Ok(())
    }

    /// `vhost_virtqueue_start` for every ring (with the log flag while logging), then, with
    /// `log`, `SET_LOG_BASE` again, then `SET_VRING_ENABLE 1` for every ring.
    fn start_rings(
        &self,
        hs: &mut Handshake<'_>,
        stopped: &[StoppedRing],
        log: Option<(BorrowedFd<'_>, u64)>,
    ) -> Result<()> {
        for vq in self.vqs() {
            let (i, q) = (usize::from(vq.index), vq.index);
            let base = stopped
                .iter()
                .find(|s| s.queue == q)
                .map_or(0, |s| s.next_avail);
            let size = vq.queue.size();
            let r = hs.frontend.set_vring_num(i, size);
            hs.step(format!("SET_VRING_NUM (queue {q}, size {size})"), r)?;
            let r = hs.frontend.set_vring_base(i, base);
            hs.step(format!("SET_VRING_BASE (queue {q}, {base})"), r)?;
            let r = hs.frontend.set_vring_addr(i, &logged(vq, log.is_some()));
            hs.step(format!("SET_VRING_ADDR (queue {q})"), r)?;
            let r = hs.frontend.set_vring_kick(i, &vq.kick);
            hs.step(format!("SET_VRING_KICK (queue {q})"), r)?;
            let r = hs.frontend.set_vring_call(i, &vq.call);
            hs.step(format!("SET_VRING_CALL (queue {q})"), r)?;
        }
        if let Some(log) = log {
            set_log_base(hs, log)?;
        }
        for vq in self.vqs() {
            let r = hs.frontend.set_vring_enable(usize::from(vq.index), true);
            hs.step(format!("SET_VRING_ENABLE 1 (queue {})", vq.index), r)?;
        }
        Ok(())
    }
}
