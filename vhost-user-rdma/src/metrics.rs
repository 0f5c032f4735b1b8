//! `--metrics ADDR:PORT`: the daemon's counters in Prometheus text exposition format (0.0.4)
//! over HTTP, on `GET /metrics`.
//!
//! One thread of its own answers scrapes one at a time with a small HTTP/1.1 responder on
//! `std::net` (a web framework would bring an async runtime for one path). It only reads
//! atomics: the configured VMs' counters (kept across guest connections by their servers),
//! whether a guest is connected, the RoCEv2 addresses' counters and the scheduler's. It takes
//! no VM's lock and never talks to the scheduler, so a scrape cannot slow a VM down, and a
//! slow client holds up only other scrapes (for at most [`CLIENT_TIMEOUT`]).
//!
//! The metrics are documented in docs/operations.md, "Metrics".

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use vrdma_proto::cqe;
use vrdma_roce::packet::ParseError;

use crate::config::PriorityClass;
use crate::fabric::roce::Network;
use crate::model::vm::{Counters, Share};
use crate::sched::SchedulerStats;

/// Longest a client may take to send its request or read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8192;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be bound.
    #[error(
        "--metrics {addr}: cannot listen there (is another program using the port, or is it not \
         an address of this host?); choose another ADDR:PORT"
    )]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The serving thread could not be started.
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

impl Error {
    /// Whether the command line is at fault (an address taken or not ours): the program exits 2
    /// for those, as for a bad option.
    pub fn is_configuration(&self) -> bool {
        matches!(self, Error::Bind { .. })
    }
}

/// One configured VM as the metrics see it.
#[derive(Debug, Clone)]
pub struct VmSource {
    /// Its name, the `vm` label.
    pub name: String,
    /// Its counters, kept across guest connections.
    pub counters: Arc<Counters>,
    /// Whether a guest is connected now.
    pub connected: Arc<AtomicBool>,
    /// Its weight, class, caps and drain, which an operator may change.
    pub share: Arc<Share>,
}

/// Everything a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The VMs served, in the order they were added; the daemon changes the list when an
    /// operator adds or removes a VM.
    pub vms: Arc<Mutex<Vec<VmSource>>>,
    /// The RoCEv2 network between hosts, with `--roce`.
    pub network: Option<Arc<Network>>,
    /// The scheduler's loop.
    pub scheduler: Arc<SchedulerStats>,
}

/// The running endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (port 0: any free port, see [`MetricsServer::local_addr`]) and serves
    /// scrapes of `sources` on a thread of its own until [`MetricsServer::stop`].
    pub fn start(addr: SocketAddr, sources: Sources) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let stopping = Arc::new(AtomicBool::new(false));
        let thread_stopping = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("vrdma-metrics".into())
            .spawn(move || serve(&listener, &sources, &thread_stopping))
            .map_err(Error::Thread)?;
        info!("metrics: serving http://{bound}/metrics");
        Ok(MetricsServer {
            addr: bound,
            stopping,
            thread: Some(thread),
        })
    }

    /// The address the endpoint listens on (the port chosen when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread (at most one scrape's [`CLIENT_TIMEOUT`]).
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // The thread is blocked in accept(); a connection that closes at once wakes it.
        drop(TcpStream::connect_timeout(&self.addr, CLIENT_TIMEOUT));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, sources: &Sources, stopping: &AtomicBool) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(s) => {
                if let Err(e) = answer(s, sources) {
                    log::debug!("metrics: a client went away: {e}");
                }
            }
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request and answers it, then closes the connection.
fn answer(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "");
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(
            &mut stream,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &render(sources),
        ),
        (_, "/metrics") => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n",
        ),
        _ => respond(
            &mut stream,
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        head.push_str("Allow: GET\r\n");
    }
    if !content_type.is_empty() {
        let _ = write!(head, "Content-Type: {content_type}\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

/// A label value as the text format writes it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes one metric family: its `# HELP` and `# TYPE` lines, then a sample per entry of
/// `samples` (labels already written as `name="value",...`, and the value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Per-VM families: metric name, type, help, and the value of a VM's counters.
type VmFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Counters) -> u64,
);

const VM_FAMILIES: &[VmFamily] = &[
    (
        "vrdma_vm_work_requests_total",
        "counter",
        "Send work requests the VM's QPs completed, any status.",
        |c| load(&c.wrs),
    ),
    (
        "vrdma_vm_payload_bytes_total",
        "counter",
        "Payload bytes moved on the VM's behalf as requester (RoCEv2 retransmissions included).",
        |c| load(&c.bytes),
    ),
    (
        "vrdma_vm_completions_total",
        "counter",
        "Completions written into the VM's CQs.",
        |c| load(&c.completions),
    ),
    (
        "vrdma_vm_error_completions_total",
        "counter",
        "Error completions written into the VM's CQs, flushes excluded.",
        |c| load(&c.errors),
    ),
    (
        "vrdma_vm_malformed_doorbells_total",
        "counter",
        "Doorbell descriptors ignored as malformed.",
        |c| load(&c.doorbells_malformed),
    ),
    (
        "vrdma_vm_ud_dropped_total",
        "counter",
        "Datagrams to the VM dropped: no receive posted, Q_Key mismatch, no such QP.",
        |c| load(&c.ud_dropped),
    ),
    (
        "vrdma_vm_events_lost_total",
        "counter",
        "Asynchronous events lost: the driver posted no event buffers and the backlog was full.",
        |c| load(&c.events_lost),
    ),
];

/// The whole exposition: every family, each with its HELP and TYPE lines.
pub fn render(sources: &Sources) -> String {
    let mut out = String::with_capacity(8192);
    let list = sources
        .vms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let vms: Vec<(String, &VmSource)> = list
        .iter()
        .map(|v| (format!("vm=\"{}\"", escape(&v.name)), v))
        .collect();
    let per_vm = |value: &dyn Fn(&VmSource) -> String| -> Vec<(String, String)> {
        vms.iter().map(|(l, v)| (l.clone(), value(v))).collect()
    };

    family(
        &mut out,
        "vrdma_vm_guest_connected",
        "gauge",
        "1 while a guest (its VMM's vhost-user frontend) is connected to the VM's socket, else 0.",
        &per_vm(&|v| u8::from(v.connected.load(Ordering::Relaxed)).to_string()),
    );
    family(
        &mut out,
        "vrdma_vm_weight",
        "gauge",
        "The VM's weight within its priority class (vrdmactl set changes it).",
        &per_vm(&|v| v.share.weight().to_string()),
    );
    let classes: Vec<(String, String)> = vms
        .iter()
        .flat_map(|(l, v)| {
            let now = v.share.class();
            PriorityClass::ALL.into_iter().map(move |c| {
                (
                    format!("{l},class=\"{}\"", c.name()),
                    u8::from(c == now).to_string(),
                )
            })
        })
        .collect();
    family(
        &mut out,
        "vrdma_vm_priority_class",
        "gauge",
        "1 for the VM's priority class (latency, normal or bulk), 0 for the others.",
        &classes,
    );
    family(
        &mut out,
        "vrdma_vm_draining",
        "gauge",
        "1 while the VM is draining (vrdmactl drain): none of its new send work starts.",
        &per_vm(&|v| u8::from(v.share.is_draining()).to_string()),
    );
    for (name, kind, help, value) in VM_FAMILIES {
        family(
            &mut out,
            name,
            kind,
            help,
            &per_vm(&|v| value(&v.counters).to_string()),
        );
    }
    let mut by_status = Vec::new();
    for (labels, v) in &vms {
        for (raw, count) in v.counters.errors_by_status.iter().enumerate() {
            let count = load(count);
            if count == 0 {
                continue;
            }
            let status = u8::try_from(raw)
                .ok()
                .and_then(|r| cqe::Status::from_raw(r).ok())
                .map_or_else(|| raw.to_string(), |s| format!("{s:?}"));
            by_status.push((format!("{labels},status=\"{status}\""), count.to_string()));
        }
    }
    family(
        &mut out,
        "vrdma_vm_error_completions_by_status_total",
        "counter",
        "Error completions by status (since the daemon started, the VM arrived by migration or vrdmactl reset); \
         statuses never seen are left out.",
        &by_status,
    );
    let by_class: Vec<(String, String)> = vms
        .iter()
        .flat_map(|(l, v)| {
            PriorityClass::ALL.into_iter().map(move |c| {
                (
                    format!("{l},class=\"{}\"", c.name()),
                    load(&v.counters.bytes_by_class[c.index()]).to_string(),
                )
            })
        })
        .collect();
    family(
        &mut out,
        "vrdma_vm_class_bytes_total",
        "counter",
        "Payload bytes the VM's QPs moved in each priority class: its own class, or one below it \
         for QPs whose service level gives one (sl.N=).",
        &by_class,
    );
    family(
        &mut out,
        "vrdma_vm_wait_seconds_total",
        "counter",
        "Seconds the VM had work waiting while the scheduler served other VMs.",
        &per_vm(&|v| seconds(load(&v.counters.wait_ns))),
    );
    let mut commands = Vec::new();
    let mut doorbells = Vec::new();
    for (labels, v) in &vms {
        let c = &v.counters;
        commands.push((
            format!("{labels},result=\"ok\""),
            load(&c.commands_ok).to_string(),
        ));
        commands.push((
            format!("{labels},result=\"failed\""),
            load(&c.commands_failed).to_string(),
        ));
        let (all, polled) = (load(&c.doorbells), load(&c.doorbells_polled));
        doorbells.push((
            format!("{labels},taken=\"kicked\""),
            all.saturating_sub(polled).to_string(),
        ));
        doorbells.push((format!("{labels},taken=\"polled\""), polled.to_string()));
    }
    family(
        &mut out,
        "vrdma_vm_commands_total",
        "counter",
        "Control commands executed, by result (ok or failed).",
        &commands,
    );
    family(
        &mut out,
        "vrdma_vm_doorbells_total",
        "counter",
        "Doorbells received, by how the daemon took them: kicked (the guest notified) or polled \
         (the scheduler found them while polling).",
        &doorbells,
    );

    if let Some(network) = &sources.network {
        render_roce(&mut out, network);
    }

    let s = &sources.scheduler;
    let one = |v: String| vec![(String::new(), v)];
    family(
        &mut out,
        "vrdma_scheduler_passes_total",
        "counter",
        "Passes of the scheduler's loop, busy or idle.",
        &one(load(&s.passes).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_busy_rounds_total",
        "counter",
        "Rounds of deficit round robin that moved some VM's work.",
        &one(load(&s.busy_rounds).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_sleeps_total",
        "counter",
        "Times the scheduler slept, waiting for a kick, a timer or 100 ms.",
        &one(load(&s.sleeps).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_preemptions_total",
        "counter",
        "Turns cut short because a VM of a higher priority class had work.",
        &one(load(&s.preemptions).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_alone_quanta_total",
        "counter",
        "Quanta (64 KiB x weight) a VM took without a round because no other VM had work.",
        &one(load(&s.alone_quanta).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_kick_mutes_total",
        "counter",
        "Times a VM's kicks were muted after 64 in a row brought no doorbell (down to 8 after \
         earlier mutes); its doorbell queues are then looked at every millisecond until it rings one.",
        &one(load(&s.kick_mutes).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_muted_vms",
        "gauge",
        "VMs whose kicks are muted now (their doorbell queues looked at every millisecond).",
        &one(load(&s.muted_vms).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_polled_vms",
        "gauge",
        "VMs whose doorbell queues the scheduler polls now (their drivers do not kick).",
        &one(load(&s.polled_vms).to_string()),
    );
    family(
        &mut out,
        "vrdma_scheduler_poll_window_seconds",
        "gauge",
        "The adaptive doorbell polling window now; 0 when the scheduler does not poll.",
        &one(seconds(load(&s.poll_window_ns))),
    );
    out
}

/// Per-address families of the RoCEv2 network: name, help, and the value of an endpoint's
/// counters.
type RoceFamily = (
    &'static str,
    &'static str,
    fn(&crate::fabric::roce::Counters) -> u64,
);

const ROCE_FAMILIES: &[RoceFamily] = &[
    (
        "vrdma_roce_rx_datagrams_total",
        "Datagrams received and handled.",
        |c| load(&c.rx),
    ),
    ("vrdma_roce_tx_datagrams_total", "Datagrams sent.", |c| {
        load(&c.tx)
    }),
    (
        "vrdma_roce_tx_errors_total",
        "Datagrams that failed to send.",
        |c| load(&c.tx_errors),
    ),
    (
        "vrdma_roce_tx_dropped_total",
        "Datagrams dropped because the socket's send buffer was full (resent like any loss).",
        |c| load(&c.tx_dropped),
    ),
    (
        "vrdma_roce_no_qp_total",
        "Packets for no QP, a QP in the wrong state or type, or from a host not the QP's peer.",
        |c| load(&c.no_qp),
    ),
    (
        "vrdma_roce_bad_pkey_total",
        "Packets of a partition (P_Key) other than the default.",
        |c| load(&c.bad_pkey),
    ),
    (
        "vrdma_roce_out_of_sequence_total",
        "Requests ahead of the expected PSN (answered with a sequence-error NAK).",
        |c| load(&c.out_of_sequence),
    ),
    (
        "vrdma_roce_duplicates_total",
        "Duplicate requests (answered again, never executed twice).",
        |c| load(&c.duplicates),
    ),
    (
        "vrdma_roce_retransmitted_total",
        "Packets retransmitted by go-back-N.",
        |c| load(&c.retransmitted),
    ),
    ("vrdma_roce_naks_total", "NAKs and RNR NAKs sent.", |c| {
        load(&c.naks)
    }),
    (
        "vrdma_roce_stray_responses_total",
        "Responses that matched nothing outstanding.",
        |c| load(&c.stray_responses),
    ),
    (
        "vrdma_roce_timer_deferred_total",
        "Expired ACK timers put off because datagrams from before the deadline were still unread.",
        |c| load(&c.timer_deferred),
    ),
    (
        "vrdma_roce_ecn_marked_total",
        "Packets that arrived marked congested (ECN CE) by a switch on the way.",
        |c| load(&c.ecn_marked),
    ),
    (
        "vrdma_roce_becn_total",
        "Responses echoing a congestion mark (BECN) on this address's requests.",
        |c| load(&c.becn),
    ),
    (
        "vrdma_roce_window_cuts_total",
        "Times a QP's window was halved for a congestion mark (at most once a window).",
        |c| load(&c.window_cuts),
    ),
];

fn render_roce(out: &mut String, network: &Network) {
    let endpoints = network.endpoints();
    let labels: Vec<String> = endpoints
        .iter()
        .map(|ep| format!("addr=\"{}\"", escape(&ep.addr.ip().to_string())))
        .collect();
    family(
        out,
        "vrdma_roce_address_bound",
        "gauge",
        "1 while the address's UDP port is bound by this daemon (0: waiting for a VM arriving by migration).",
        &endpoints
            .iter()
            .zip(&labels)
            .map(|(ep, l)| {
                (
                    l.clone(),
                    u8::from(ep.bound.load(Ordering::Relaxed)).to_string(),
                )
            })
            .collect::<Vec<_>>(),
    );
    for (name, help, value) in ROCE_FAMILIES {
        let samples: Vec<_> = endpoints
            .iter()
            .zip(&labels)
            .map(|(ep, l)| (l.clone(), value(&ep.counters).to_string()))
            .collect();
        family(out, name, "counter", help, &samples);
    }
    let mut malformed = Vec::new();
    for (ep, l) in endpoints.iter().zip(&labels) {
        for reason in ParseError::ALL {
            malformed.push((
                format!("{l},reason=\"{reason:?}\""),
                load(&ep.counters.malformed[reason.index()]).to_string(),
            ));
        }
    }
    family(
        out,
        "vrdma_roce_malformed_total",
        "counter",
        "Datagrams the parser dropped, by reason (BadIcrc, Truncated, UnknownOpcode, ...).",
        &malformed,
    );
}

/// Nanoseconds as seconds, in the text format's float.
fn seconds(ns: u64) -> String {
    format!("{}", ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(names: &[&str]) -> Sources {
        Sources {
            vms: Arc::new(Mutex::new(
                names
                    .iter()
                    .map(|n| VmSource {
                        name: (*n).to_owned(),
                        counters: Arc::default(),
                        connected: Arc::default(),
                        share: Arc::default(),
                    })
                    .collect(),
            )),
            network: None,
            scheduler: Arc::default(),
        }
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let s = sources(&["a", "b"]);
        s.vms.lock().unwrap()[0]
            .counters
            .wrs
            .store(7, Ordering::Relaxed);
        s.vms.lock().unwrap()[0]
            .counters
            .count_error(cqe::Status::RetryExcErr.raw());
        s.vms.lock().unwrap()[1]
            .connected
            .store(true, Ordering::Relaxed);
        let text = render(&s);
        let mut declared: Option<(String, String)> = None;
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(!families.contains(&name), "{name} declared twice");
                families.push(name.clone());
                declared = Some((name, String::new()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let d = declared.as_mut().expect("TYPE after HELP");
                assert_eq!(d.0, name);
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                d.1 = kind.to_owned();
            } else {
                let (name, kind) = declared.as_ref().expect("a sample after its HELP");
                assert!(!kind.is_empty(), "TYPE before samples: {line}");
                assert!(line.starts_with(name.as_str()), "{line} outside {name}");
                assert!(name.starts_with("vrdma_"), "{name}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                let value = line.rsplit(' ').next().unwrap();
                value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
            }
        }
        assert!(text.contains("vrdma_vm_work_requests_total{vm=\"a\"} 7\n"));
        assert!(text.contains("vrdma_vm_work_requests_total{vm=\"b\"} 0\n"));
        assert!(text.contains("vrdma_vm_guest_connected{vm=\"b\"} 1\n"));
        assert!(text.contains(
            "vrdma_vm_error_completions_by_status_total{vm=\"a\",status=\"RetryExcErr\"} 1\n"
        ));
        assert!(text.contains("vrdma_vm_error_completions_total{vm=\"a\"} 1\n"));
        assert!(text.contains("vrdma_scheduler_polled_vms 0\n"));
        assert!(text.contains("vrdma_vm_priority_class{vm=\"a\",class=\"normal\"} 1\n"));
        assert!(text.contains("vrdma_vm_priority_class{vm=\"a\",class=\"bulk\"} 0\n"));
        assert!(text.contains("vrdma_vm_doorbells_total{vm=\"a\",taken=\"kicked\"} 0\n"));
    }

    #[test]
    fn quotes_and_backslashes_in_names_are_escaped() {
        let s = sources(&[r#"a"b\c"#]);
        let text = render(&s);
        assert!(
            text.contains(r#"vrdma_vm_guest_connected{vm="a\"b\\c"} 0"#),
            "{text}"
        );
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn scrapes_are_answered_and_other_paths_and_methods_refused() {
        let server =
            MetricsServer::start("127.0.0.1:0".parse().unwrap(), sources(&["vm1"])).unwrap();
        let ask = |request: &str| {
            let mut s = TcpStream::connect(server.local_addr()).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            answer
        };
        let ok = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(
            ok.contains("vrdma_vm_guest_connected{vm=\"vm1\"} 0"),
            "{ok}"
        );
        let missing = ask("GET /other HTTP/1.1\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = ask("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");

        // The port is taken now: a second endpoint on it is refused with a clear error.
        let busy = MetricsServer::start(server.local_addr(), sources(&[])).unwrap_err();
        assert!(busy.is_configuration());
        assert!(busy.to_string().contains("choose another"), "{busy}");
        server.stop();
    }
}
