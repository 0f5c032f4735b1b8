//! The VMs' listening sockets, watched by one `event-manager` loop: a VM's thread sleeps until
//! the loop sees a frontend waiting on its socket, and only then accepts it (through
//! vhost-user-backend, which owns the accept and the connection). Watching is one-shot: the
//! loop stops watching a socket when it wakes its VM, and the VM asks again once it has
//! released its last connection, so a second frontend that connects meanwhile waits in the
//! backlog instead of waking the loop again and again.
//!
//! The loop watches a duplicate of each socket's descriptor, which it owns until the socket
//! is unwatched: the VM's thread may close its own descriptor (the VM stopping) before the
//! loop gets to the change, and a number the loop watched must not be reused under it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::warn;
use vmm_sys_util::eventfd::EventFd;

/// Why the listeners' loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its event loop or wake-up could not be made.
    #[error("cannot make the event loop that watches the VMs' sockets")]
    EventLoop(#[source] io::Error),
    /// Its thread could not be started.
    #[error("cannot start the thread that watches the VMs' sockets")]
    Thread(#[source] io::Error),
}

/// What a VM's thread waits on: a frontend waiting on its socket, or the end.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    pending: bool,
    closed: bool,
}

/// What [`Gate::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// A frontend waits on the socket: accepting it will not block.
    Frontend,
    /// The VM is stopping.
    Closed,
}

impl Gate {
    /// Sleeps until a frontend waits or the gate is closed; takes the frontend's signal.
    pub fn wait(&self) -> Woken {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if state.closed {
                return Woken::Closed;
            }
            if std::mem::take(&mut state.pending) {
                return Woken::Frontend;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).pending = true;
        self.changed.notify_all();
    }

    fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// Wakes the VM's thread for good: it is stopping.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.changed.notify_all();
    }
}

/// A change the loop makes to what it watches, in the order asked, for the VM whose server
/// numbers it.
#[derive(Debug)]
enum Change {
    /// Watch this duplicate of the VM's socket until a frontend waits, then open the gate.
    Watch(u64, OwnedFd, Arc<Gate>),
    /// The VM is stopping.
    Unwatch(u64),
}

#[derive(Debug)]
struct Shared {
    kick: EventFd,
    changes: Mutex<Vec<Change>>,
    stop: AtomicBool,
}

impl Shared {
    fn push(&self, change: Change) {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(change);
        if let Err(e) = self.kick.write(1) {
            warn!("cannot wake the loop watching the VMs' sockets: {e}");
        }
    }
}

/// The loop's subscriber: the wake-up and the sockets it watches now, by descriptor, with
/// their VM's number and gate.
#[derive(Debug)]
struct Watcher {
    shared: Arc<Shared>,
    watched: HashMap<RawFd, (u64, OwnedFd, Arc<Gate>)>,
}

impl Watcher {
    fn apply(&mut self, ops: &mut EventOps) {
        let _ = self.shared.kick.read();
        let changes = std::mem::take(
            &mut *self
                .shared
                .changes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for change in changes {
            match change {
                // Closed first by a stop that came before this watch: nothing to wait for.
                Change::Watch(_, _, gate) if gate.is_closed() => {}
                Change::Watch(id, socket, gate) => {
                    let fd = socket.as_raw_fd();
                    if let Err(e) = ops.add(Events::new(&socket.as_fd(), EventSet::IN)) {
                        // Let the VM's thread accept by itself (blocking; a stop wakes it)
                        // rather than never.
                        warn!(
                            "cannot watch a VM's socket: {e:?}; its thread accepts without the loop"
                        );
                        drop(socket);
                        gate.open();
                        continue;
                    }
                    self.watched.insert(fd, (id, socket, gate));
                }
                Change::Unwatch(id) => {
                    let fds: Vec<RawFd> = self
                        .watched
                        .iter()
                        .filter(|(_, w)| w.0 == id)
                        .map(|(fd, _)| *fd)
                        .collect();
                    for fd in fds {
                        if let Some((_, socket, _)) = self.watched.remove(&fd) {
                            // Still open (the loop owns it): its removal succeeds.
                            let _ = ops.remove(Events::new(&socket.as_fd(), EventSet::IN));
                        }
                    }
                }
            }
        }
    }
}

impl MutEventSubscriber for Watcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.shared.kick, EventSet::IN)) {
            warn!("cannot watch the listeners' wake-up: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.shared.kick.as_raw_fd() {
            self.apply(ops);
        } else if let Some((_, socket, gate)) = self.watched.remove(&fd) {
            let _ = ops.remove(Events::new(&socket.as_fd(), EventSet::IN));
            // Closed before the VM's thread goes on, so that its descriptors at its next wait
            // are those of every wait.
            drop(socket);
            gate.open();
        }
    }
}

/// The loop watching the VMs' sockets, on a thread of its own.
#[derive(Debug)]
pub struct Listeners {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Listeners {
    /// Starts the loop.
    pub fn start() -> Result<Arc<Listeners>, Error> {
        let shared = Arc::new(Shared {
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventLoop)?,
            changes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let mut events: EventManager<Watcher> = EventManager::new()
            .map_err(|e| Error::EventLoop(io::Error::other(format!("{e:?}"))))?;
        events.add_subscriber(Watcher {
            shared: shared.clone(),
            watched: HashMap::new(),
        });
        let loop_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vrdma-listen".into())
            .spawn(move || {
                while !loop_shared.stop.load(Ordering::Acquire) {
                    if let Err(e) = events.run() {
                        if !matches!(&e, event_manager::Error::Epoll(errno) if errno.errno() == libc::EINTR)
                        {
                            warn!("the loop watching the VMs' sockets failed: {e:?}");
                            return;
                        }
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(Arc::new(Listeners {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Watches `socket`, of the VM the server numbered `id`, until a frontend waits on it,
    /// then opens `gate` and stops watching. If the socket cannot be watched (no descriptor
    /// left to duplicate it), opens the gate at once: the VM's thread then accepts by itself.
    pub fn watch(&self, id: u64, socket: &impl AsFd, gate: Arc<Gate>) {
        match socket.as_fd().try_clone_to_owned() {
            Ok(own) => self.shared.push(Change::Watch(id, own, gate)),
            Err(e) => {
                warn!("cannot watch a VM's socket: {e}; its thread accepts without the loop");
                gate.open();
            }
        }
    }

    /// Stops watching the socket of the VM numbered `id` (it is stopping). Close its gate
    /// first, so that a watch its thread asks for meanwhile is dropped.
    pub fn unwatch(&self, id: u64) {
        self.shared.push(Change::Unwatch(id));
    }

    /// Ends the loop and waits for its thread.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Err(e) = self.shared.kick.write(1) {
            warn!("cannot wake the loop watching the VMs' sockets: {e}");
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop();
    }
}
