//! The daemon's control plane: one thread runs rust-vmm's `event-manager` loop over the
//! signals (SIGINT and SIGTERM stop the daemon, SIGUSR1 logs the counters) and the management
//! socket `vrdmactl` talks to, through which an operator lists the VMs, adds and removes them,
//! changes their weight, caps and quotas, drains them and resets their counters while the
//! daemon serves the rest.
//!
//! The protocol is one JSON object per line each way, one request per connection: a
//! [`Request`] from the client, a [`Response`] from the daemon (docs/operations.md, "The
//! management socket"). The socket is made with mode 0600, so only the daemon's user (root,
//! or whoever runs it) may use it: it can remove any tenant.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use vmm_sys_util::eventfd::EventFd;

use crate::daemon::{self, Daemon};
use crate::vhost::server::VmStatus;

/// Where `vrdmactl` looks for the management socket unless told otherwise, and where the
/// systemd unit has the daemon make it.
pub const DEFAULT_SOCKET: &str = "/run/vrdma/control/vrdmactl.sock";

/// The longest request line the daemon reads; a VM's `--vm` entry is far shorter.
const MAX_REQUEST: usize = 64 * 1024;

/// How long the daemon waits for a client to take its answer before it gives up on it, so a
/// client that stops reading cannot hold the control plane.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Clients served at once: while that many are connected, the next wait in the socket's
/// backlog until one has gone (answered, or let go after [`REQUEST_TIMEOUT`]), so that idle
/// connections cannot use up the daemon's descriptors, which the VMs' connections need.
const MAX_CLIENTS: usize = 16;

/// How long a client may take to send its request before it is let go.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `vrdmactl` waits for the daemon's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the control plane could not start or run, or a client's request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The signal handlers could not be installed.
    #[error("cannot install the signal handlers")]
    Signals(#[source] io::Error),
    /// The event loop could not be made or failed.
    #[error("the control plane's event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// Another daemon answers on the management socket.
    #[error(
        "management socket {0} is in use by another daemon; stop it or give this one another --control-socket"
    )]
    SocketBusy(PathBuf),
    /// The management socket could not be made.
    #[error(
        "cannot make the management socket {path}: check the daemon's user may write to its directory"
    )]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `vrdmactl` could not reach the daemon.
    #[error(
        "cannot reach the daemon's management socket {path}: is vhost-user-rdma running with --control-socket {path}, and may this user open it (it is the daemon user's alone)?"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The conversation with the daemon failed.
    #[error("the daemon's management socket did not answer properly")]
    Exchange(#[source] io::Error),
    /// A message is not what the protocol allows.
    #[error("the management socket's message is not valid")]
    Message(#[source] serde_json::Error),
}

/// A request to the daemon: one JSON object with a `command` field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every VM's state, objects and counters, or VM `vm`'s.
    List {
        /// Only this VM.
        #[serde(default)]
        vm: Option<String>,
    },
    /// Serve a new VM, given as `--vm` gives one.
    Add {
        /// `name=NAME,socket=PATH,...`.
        vm: String,
    },
    /// Stop serving VM `vm`.
    Remove {
        /// The VM.
        vm: String,
    },
    /// Change VM `vm`'s weight, caps or quotas.
    Set {
        /// The VM.
        vm: String,
        /// `key=value,...` (`config::RUN_TIME_KEYS`).
        settings: String,
    },
    /// Start no more of VM `vm`'s send work; what is under way finishes.
    Drain {
        /// The VM.
        vm: String,
    },
    /// End VM `vm`'s drain.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Set VM `vm`'s counters, or every VM's, to zero.
    Reset {
        /// Only this VM.
        #[serde(default)]
        vm: Option<String>,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The VMs (`list`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmStatus>,
}

impl Response {
    fn done(vms: Vec<VmStatus>) -> Self {
        Response {
            ok: true,
            error: None,
            vms,
        }
    }

    fn failed(e: &daemon::Error) -> Self {
        Self::refused(vrdma_proto::ErrorChain(e).to_string())
    }

    fn refused(why: String) -> Self {
        Response {
            ok: false,
            error: Some(why),
            vms: Vec::new(),
        }
    }
}

/// Sends `request` to the daemon listening on `socket` and returns its answer (the client
/// side, for `vrdmactl` and tests).
pub fn request(socket: &Path, request: &Request) -> Result<Response, Error> {
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let mut line = serde_json::to_vec(request).map_err(Error::Message)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(Error::Exchange)?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(Error::Exchange)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(Error::Exchange)?;
    if answer.is_empty() {
        return Err(Error::Exchange(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without an answer",
        )));
    }
    serde_json::from_str(&answer).map_err(Error::Message)
}

/// The signals the control plane handles, each arriving as a byte on a socket of its own that
/// the event loop watches. Installed before the daemon starts its threads, so a signal during
/// start-up is not lost or fatal.
#[derive(Debug)]
pub struct Signals {
    /// Read ends, with the signal each stands for.
    pipes: Vec<(i32, UnixStream)>,
}

impl Signals {
    /// Installs the handlers of SIGINT, SIGTERM and SIGUSR1.
    pub fn install() -> Result<Self, Error> {
        let mut pipes = Vec::new();
        for signal in [SIGINT, SIGTERM, SIGUSR1] {
            let (read, write) = UnixStream::pair().map_err(Error::Signals)?;
            read.set_nonblocking(true).map_err(Error::Signals)?;
            write.set_nonblocking(true).map_err(Error::Signals)?;
            signal_hook::low_level::pipe::register(signal, write).map_err(Error::Signals)?;
            pipes.push((signal, read));
        }
        Ok(Signals { pipes })
    }
}

/// A client of the management socket whose request has not fully arrived.
#[derive(Debug)]
struct Client {
    stream: UnixStream,
    buffer: Vec<u8>,
    /// When it connected: one that has not sent its request after [`REQUEST_TIMEOUT`] goes.
    since: std::time::Instant,
}

/// The control plane: the daemon, its management socket and its signals, as one
/// `event-manager` subscriber. Every fd it watches is identified by the fd itself.
#[derive(Debug)]
struct ControlPlane {
    /// Taken when the loop ends, to be stopped.
    daemon: Option<Daemon>,
    signals: Signals,
    listener: Option<ControlSocket>,
    /// The listener is not watched: [`MAX_CLIENTS`] are connected.
    listener_paused: bool,
    clients: HashMap<RawFd, Client>,
    /// Written to stop a control plane that has no signals ([`spawn`]).
    stop_fd: Option<Arc<EventFd>>,
    /// Set by SIGINT or SIGTERM (their number) or `stop_fd` (0): the loop ends and the
    /// daemon stops.
    stop: Option<i32>,
}

impl ControlPlane {
    fn on_signal(&mut self, signal: i32, pipe: RawFd) {
        // Drain the pipe: several signals may have come together.
        if let Some((_, stream)) = self
            .signals
            .pipes
            .iter_mut()
            .find(|(_, s)| s.as_raw_fd() == pipe)
        {
            let mut bytes = [0u8; 64];
            while matches!(stream.read(&mut bytes), Ok(n) if n > 0) {}
        }
        if signal == SIGUSR1 {
            if let Some(d) = &self.daemon {
                d.log_counters();
            }
        } else {
            self.stop = Some(signal);
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Some(ControlSocket { listener, .. }) = &self.listener else {
            return;
        };
        loop {
            if self.clients.len() >= MAX_CLIENTS {
                // The rest wait in the backlog: the listener is watched again once a client
                // has gone (`resume_listening`).
                if !self.listener_paused {
                    let _ = ops.remove(Events::new(listener, EventSet::IN));
                    self.listener_paused = true;
                }
                return;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("management socket: cannot serve a client: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                        warn!("management socket: cannot watch a client: {e:?}");
                        continue;
                    }
                    self.clients.insert(
                        fd,
                        Client {
                            stream,
                            buffer: Vec::new(),
                            since: std::time::Instant::now(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable, so wait a little
                    // rather than spin on it.
                    warn!("management socket: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
        }
    }

    /// Reads what client `fd` sent; once its line is complete, answers it and lets it go.
    fn on_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let line = loop {
            match client.stream.read(&mut chunk) {
                // A request the client ended by closing its side, without a newline.
                Ok(0) if !client.buffer.is_empty() => {
                    break Some(Ok(std::mem::take(&mut client.buffer)));
                }
                Ok(0) => break None,
                Ok(n) => {
                    client.buffer.extend_from_slice(&chunk[..n]);
                    if let Some(end) = client.buffer.iter().position(|&b| b == b'\n') {
                        client.buffer.truncate(end);
                        break Some(Ok(std::mem::take(&mut client.buffer)));
                    }
                    if client.buffer.len() > MAX_REQUEST {
                        break Some(Err(format!(
                            "request longer than {MAX_REQUEST} bytes without a newline"
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(client) = self.clients.remove(&fd) else {
            return;
        };
        let _ = ops.remove(Events::new(&client.stream, EventSet::IN));
        self.resume_listening(ops);
        let Some(line) = line else {
            return; // Gone before a whole request.
        };
        let response = match line {
            Ok(bytes) => match serde_json::from_slice::<Request>(&bytes) {
                Ok(request) => self.execute(request),
                Err(e) => Response::refused(format!("not a request this daemon knows: {e}")),
            },
            Err(why) => Response::refused(why),
        };
        answer(client.stream, &response);
    }

    /// Lets go of the clients that have not sent their request in time.
    fn expire_clients(&mut self, ops: &mut EventOps) {
        let late: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.since.elapsed() > REQUEST_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            if let Some(client) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::new(&client.stream, EventSet::IN));
            }
        }
        self.resume_listening(ops);
    }

    /// Watches the listener again if it was left alone for want of room for clients.
    fn resume_listening(&mut self, ops: &mut EventOps) {
        if !self.listener_paused || self.clients.len() >= MAX_CLIENTS {
            return;
        }
        if let Some(socket) = &self.listener {
            match ops.add(Events::new(&socket.listener, EventSet::IN)) {
                Ok(()) => self.listener_paused = false,
                Err(e) => warn!("cannot watch the management socket again: {e:?}"),
            }
        }
    }

    fn execute(&mut self, request: Request) -> Response {
        let Some(d) = self.daemon.as_mut() else {
            return Response::refused("the daemon is stopping".into());
        };
        let result = match &request {
            Request::List { vm } => d.status(vm.as_deref()),
            Request::Add { vm } => d.add_vm(vm).map(|()| Vec::new()),
            Request::Remove { vm } => d.remove_vm(vm).map(|()| Vec::new()),
            Request::Set { vm, settings } => d.set_vm(vm, settings).map(|()| Vec::new()),
            Request::Drain { vm } => d.set_draining(vm, true).map(|()| Vec::new()),
            Request::Resume { vm } => d.set_draining(vm, false).map(|()| Vec::new()),
            Request::Reset { vm } => d.reset_counters(vm.as_deref()).map(|()| Vec::new()),
        };
        match result {
            Ok(vms) => Response::done(vms),
            Err(e) => {
                if !matches!(request, Request::List { .. }) {
                    warn!(
                        "management request {request:?} refused: {}",
                        vrdma_proto::ErrorChain(&e)
                    );
                }
                Response::failed(&e)
            }
        }
    }
}

/// Writes `response` to the client, waiting at most [`ANSWER_TIMEOUT`] for it to take it.
fn answer(stream: UnixStream, response: &Response) {
    let mut line = match serde_json::to_vec(response) {
        Ok(l) => l,
        Err(e) => {
            warn!("management socket: cannot encode an answer: {e}");
            return;
        }
    };
    line.push(b'\n');
    let sent = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .and_then(|()| (&stream).write_all(&line));
    if let Err(e) = sent {
        warn!("management socket: a client did not take its answer: {e}");
    }
}

impl MutEventSubscriber for ControlPlane {
    fn init(&mut self, ops: &mut EventOps) {
        for (_, pipe) in &self.signals.pipes {
            if let Err(e) = ops.add(Events::new(pipe, EventSet::IN)) {
                warn!("cannot watch a signal: {e:?}");
            }
        }
        if let Some(stop) = &self.stop_fd {
            if let Err(e) = ops.add(Events::new(stop.as_ref(), EventSet::IN)) {
                warn!("cannot watch the control plane's stop: {e:?}");
            }
        }
        if let Some(socket) = &self.listener {
            if let Err(e) = ops.add(Events::new(&socket.listener, EventSet::IN)) {
                warn!("cannot watch the management socket: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.expire_clients(ops);
        let fd = events.fd();
        if let Some(&(signal, _)) = self.signals.pipes.iter().find(|(_, s)| s.as_raw_fd() == fd) {
            self.on_signal(signal, fd);
        } else if self.stop_fd.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
            self.stop = Some(0);
        } else if self
            .listener
            .as_ref()
            .is_some_and(|s| s.listener.as_raw_fd() == fd)
        {
            self.accept(ops);
        } else {
            self.on_client(fd, ops);
        }
    }
}

/// The management socket, bound: made before the daemon starts, so that a socket in use
/// stops the program before it serves any VM.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Makes the management socket at `path` (its directory too, if missing), mode 0600.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let listener = listen(path)?;
        info!("management socket: listening on {}", path.display());
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn listen(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    if UnixStream::connect(path).is_ok() {
        return Err(Error::SocketBusy(path.to_owned()));
    }
    let listen_error = |source| Error::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(listen_error)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(listen_error)?;
        }
    }
    // Nobody answers there: a socket left by a daemon that did not stop cleanly.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    Ok(listener)
}

/// Runs the control plane of `daemon` on this thread until SIGINT or SIGTERM, serving the
/// management socket `socket` if given; then stops the daemon and removes the socket.
/// Returns the signal that stopped it.
pub fn run(daemon: Daemon, signals: Signals, socket: Option<ControlSocket>) -> Result<i32, Error> {
    run_loop(daemon, Some(signals), socket, None)
}

/// A control plane on a thread of its own, without signals (a daemon embedded in another
/// program, or a test): [`ControlPlaneThread::stop`] ends it and stops the daemon.
#[derive(Debug)]
pub struct ControlPlaneThread {
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<Result<i32, Error>>>,
}

impl ControlPlaneThread {
    /// Stops the control plane and the daemon, and waits for both.
    pub fn stop(mut self) -> Result<(), Error> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.write(1).map_err(Error::Signals)?;
        match thread.join() {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(Error::Signals(io::Error::other(
                "the control plane's thread panicked",
            ))),
        }
    }
}

impl Drop for ControlPlaneThread {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            warn!("control plane: {}", vrdma_proto::ErrorChain(&e));
        }
    }
}

/// Runs the control plane of `daemon`, serving `socket`, on a thread of its own.
pub fn spawn(daemon: Daemon, socket: ControlSocket) -> Result<ControlPlaneThread, Error> {
    let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Signals)?);
    let loop_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("vrdma-control".into())
        .spawn(move || run_loop(daemon, None, Some(socket), Some(loop_stop)))
        .map_err(Error::Signals)?;
    Ok(ControlPlaneThread {
        stop,
        thread: Some(thread),
    })
}

/// The event loop: until a signal or `stop` says to end, then the daemon is stopped. Returns
/// the signal (0 for `stop`).
fn run_loop(
    daemon: Daemon,
    signals: Option<Signals>,
    socket: Option<ControlSocket>,
    stop: Option<Arc<EventFd>>,
) -> Result<i32, Error> {
    let plane = Arc::new(Mutex::new(ControlPlane {
        daemon: Some(daemon),
        signals: signals.unwrap_or(Signals { pipes: Vec::new() }),
        listener: socket,
        listener_paused: false,
        clients: HashMap::new(),
        stop_fd: stop,
        stop: None,
    }));
    let mut events: EventManager<Arc<Mutex<ControlPlane>>> =
        EventManager::new().map_err(Error::EventLoop)?;
    let id = events.add_subscriber(plane.clone());
    let signal = loop {
        // Woken at least every second to let go of clients that never send their request,
        // even when nothing else happens.
        match events.run_with_timeout(1000) {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(Error::EventLoop(e)),
        }
        let mut plane = plane.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = plane.stop {
            break s;
        }
        if let Ok(mut ops) = events.event_ops(id) {
            plane.expire_clients(&mut ops);
        }
    };
    drop(events);
    let mut plane = plane.lock().unwrap_or_else(|p| p.into_inner());
    if signal != 0 {
        info!("signal {signal}: shutting down");
    }
    if let Some(d) = plane.daemon.take() {
        d.stop();
    }
    // Its drop removes the socket.
    plane.listener.take();
    Ok(signal)
}
