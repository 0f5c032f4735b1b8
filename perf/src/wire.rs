//! The TCP side channel, as perftest's "Data ex. method : Ethernet": the client's parameters,
//! each QP's address, and the per-size synchronisation, as text lines.
//!
//! ```text
//! client -> server   PARAMS test=write_bw qps=1 ...      the server follows these
//! client -> server   QP qpn psn rkey vaddr gid           one per QP
//! server -> client   QP qpn psn rkey vaddr gid           one per QP
//! per size:
//! client -> server   RUN size iters duration_ms
//! server -> client   READY                               receives posted, buffers clear
//!   (the test runs; either side may send SENT n, DONE n, TICK or ERR why meanwhile)
//! client -> server   DONE n                              n: iterations the client completed
//! client -> server   WRITTEN q k1 k2 ...                 --check, write_bw: one per QP, the
//!                                                        iteration last written to each slot
//! server -> client   WRITTEN q k1 k2 ...                 (--check, write_bw -b: the server's)
//! server -> client   OK [peak avg rate]                  (bidirectional: the server's BW)
//! client -> server   QUIT;  server -> client  BYE
//! ```
//!
//! The socket is non-blocking, so the test loops can look for a line between polls without a
//! thread; blocking reads are a loop with a deadline.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vrdma_proto::Gid;

use crate::opts::Test;
use crate::report::QpAddress;

/// Why the exchange with the other side failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The other side closed the connection.
    #[error("the other side closed the TCP connection")]
    Closed,
    /// Nothing came in time.
    #[error("nothing from the other side for {} s (waiting for {what})", .waited.as_secs())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// The other side sent something this side does not understand.
    #[error("the other side sent {line:?}, not {expected}")]
    Protocol {
        /// The line.
        line: String,
        /// What was expected.
        expected: String,
    },
    /// The other side reported a failure.
    #[error("the other side failed: {0}")]
    Peer(String),
    /// The server was started with `--check`, the client without.
    #[error("this server was started with --check, but the client runs without it")]
    CheckMismatch,
    /// The two sides were started for different tests.
    #[error("the client runs {client}, but this server was started for {server}")]
    TestMismatch {
        /// The client's test.
        client: &'static str,
        /// This server's.
        server: &'static str,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The line-based control connection.
#[derive(Debug)]
pub struct Control {
    stream: TcpStream,
    pending: Vec<u8>,
    lines: VecDeque<String>,
    /// The other side finished sending: `SENT n`.
    pub peer_sent: Option<u64>,
    /// The client finished: `DONE n`.
    pub peer_done: Option<u64>,
    last_tick: Instant,
    /// The other side closed the connection; the lines before that are still to be read.
    closed: bool,
}

impl Control {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Result<Control> {
        stream
            .set_nonblocking(true)
            .and_then(|()| stream.set_nodelay(true))
            .map_err(io("couldn't set up the TCP connection"))?;
        Ok(Control {
            stream,
            pending: Vec::with_capacity(4096),
            lines: VecDeque::new(),
            peer_sent: None,
            peer_done: None,
            last_tick: Instant::now(),
            closed: false,
        })
    }

    /// Sends one line.
    pub fn send(&mut self, line: &str) -> Result<()> {
        self.send_bytes(line.as_bytes())?;
        self.send_bytes(b"\n")
    }

    fn send_bytes(&mut self, mut data: &[u8]) -> Result<()> {
        let deadline = Instant::now() + crate::WAIT;
        while !data.is_empty() {
            match self.stream.write(data) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("couldn't send to the other side")(e)),
            }
        }
        Ok(())
    }

    /// Sends `line`, the last this side has to say (an `ERR`), and closes only once the other
    /// side has read it: closing with lines of the other side's still unread makes the kernel
    /// reset the connection, and a reset discards the `ERR` before the other side reads it (its
    /// user then sees "connection reset" instead of why). So the write side is shut (the other
    /// side reads the line, then the end) and what still comes is read until the other side
    /// closes too, or `wait` passes.
    pub fn send_last(&mut self, line: &str, wait: Duration) -> Result<()> {
        self.send(line)?;
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + wait;
        while !self.closed && Instant::now() < deadline {
            match self.fill() {
                Ok(true) => {}
                Ok(false) => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Reads what has arrived without waiting; `true` if anything did.
    fn fill(&mut self) -> Result<bool> {
        let mut chunk = [0u8; 1024];
        let mut got = false;
        while !self.closed {
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    got = true;
                    self.pending.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("couldn't read from the other side")(e)),
            }
        }
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.pending[..i]).into_owned();
            self.pending.drain(..=i);
            self.lines.push_back(line);
        }
        if self.closed && self.lines.is_empty() {
            return Err(Error::Closed);
        }
        Ok(got)
    }

    /// Takes the status lines (`SENT`, `DONE`, `TICK`, `ERR`) that have arrived, without
    /// waiting; other lines stay queued for [`Control::recv`]. Called by the test loops while
    /// they wait, so a failure at the other end stops this one at once.
    pub fn check(&mut self) -> Result<()> {
        self.fill()?;
        let mut i = 0;
        while i < self.lines.len() {
            let line = &self.lines[i];
            if let Some(why) = line.strip_prefix("ERR ") {
                return Err(Error::Peer(why.to_owned()));
            }
            let count = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|n| n.trim().parse::<u64>().ok())
            };
            if let Some(n) = count("SENT ") {
                self.peer_sent = Some(n);
            } else if let Some(n) = count("DONE ") {
                self.peer_done = Some(n);
            } else if line != "TICK" {
                i += 1;
                continue;
            }
            self.lines.remove(i);
        }
        if self.closed {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Tells the other side, at most once a second, that this one is still running, so its
    /// wait for the end of a long run does not time out.
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        if now.duration_since(self.last_tick) >= Duration::from_secs(1) {
            self.last_tick = now;
            self.send("TICK")?;
        }
        Ok(())
    }

    /// Waits for the next line other than `TICK` (which restarts the wait) and `SENT`; `ERR`
    /// lines become [`Error::Peer`].
    pub fn recv(&mut self, what: &str, wait: Duration) -> Result<String> {
        let mut deadline = Instant::now() + wait;
        loop {
            while let Some(line) = self.lines.pop_front() {
                if line == "TICK" {
                    deadline = Instant::now() + wait;
                    continue;
                }
                // A `SENT` the test loop did not see before it finished.
                if let Some(n) = line
                    .strip_prefix("SENT ")
                    .and_then(|n| n.trim().parse().ok())
                {
                    self.peer_sent = Some(n);
                    continue;
                }
                if let Some(why) = line.strip_prefix("ERR ") {
                    return Err(Error::Peer(why.to_owned()));
                }
                return Ok(line);
            }
            if !self.fill()? {
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        what: what.to_owned(),
                        waited: wait,
                    });
                }
                self.wait_readable(deadline)?;
            }
        }
    }

    /// Sleeps until the other side sends something, closes, or `until` passes. The
    /// connection stays non-blocking for [`Control::check`], so this blocks only for the
    /// one peek. A server waits here through a whole read_lat run: sleeping 200 µs at a time
    /// instead woke it 3,700 times a second, each time taking the CPU from a client sharing
    /// it (p99 of 30-50 µs against perftest's 5 µs).
    fn wait_readable(&mut self, until: Instant) -> Result<()> {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let stream = &self.stream;
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(left)))
            .map_err(io("couldn't wait on the TCP connection"))?;
        let peeked = stream.peek(&mut [0u8; 1]);
        stream
            .set_nonblocking(true)
            .map_err(io("couldn't set up the TCP connection"))?;
        match peeked {
            // Data or the end of the stream: the caller's next fill takes it.
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(io("couldn't read from the other side")(e)),
        }
    }

    /// Waits for exactly `expected`.
    pub fn expect(&mut self, expected: &str, wait: Duration) -> Result<()> {
        let line = self.recv(expected, wait)?;
        if line == expected {
            Ok(())
        } else {
            Err(Error::Protocol {
                line,
                expected: expected.to_owned(),
            })
        }
    }

    /// Clears the per-size status.
    pub fn reset(&mut self) {
        self.peer_sent = None;
        self.peer_done = None;
    }
}

/// Listens on every address (IPv6 and IPv4 if the host has IPv6), as perftest does.
pub fn listen(port: u16) -> Result<TcpListener> {
    TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .map_err(io(format!("couldn't listen to port {port}")))
}

/// Waits up to `wait` for a client, giving up early when `stop` is set.
pub fn accept(listener: &TcpListener, wait: Duration, stop: &AtomicBool) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(io("couldn't set up the listening socket"))?;
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(io("couldn't set up the TCP connection"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return Err(Error::Closed);
                }
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        what: "a client to connect".into(),
                        waited: wait,
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io("accept() failed")(e)),
        }
    }
}

/// Connects to the server, retrying until `wait` has passed (the server may still be
/// starting).
pub fn connect(host: &str, port: u16, wait: Duration) -> Result<TcpStream> {
    let what = format!("couldn't connect to {host}:{port}");
    let deadline = Instant::now() + wait;
    loop {
        let addrs: Vec<_> = (host, port)
            .to_socket_addrs()
            .map_err(io(what.clone()))?
            .collect();
        let mut last = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| std::io::Error::other("no address"));
        if Instant::now() > deadline {
            return Err(io(what)(e));
        }
        log::debug!("{what}: {e}; retrying");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The run parameters the client sends and the server follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The test.
    pub test: Test,
    /// QPs.
    pub qps: u32,
    /// `-e`.
    pub events: bool,
    /// `-b`.
    pub bidirectional: bool,
    /// Outstanding requests per QP.
    pub tx_depth: u32,
    /// Receives per QP.
    pub rx_depth: u32,
    /// Requests per post call.
    pub post_list: u32,
    /// Signal every N-th.
    pub cq_mod: u32,
    /// Inline bytes.
    pub inline: u32,
    /// The largest message of the run (buffers are sized for it).
    pub max_size: u64,
    /// Path MTU in bytes.
    pub mtu: u32,
    /// `--check`.
    pub check: bool,
}

impl Params {
    /// `PARAMS key=value ...`.
    pub fn encode(&self) -> String {
        format!(
            "PARAMS test={} qps={} events={} bidir={} tx_depth={} rx_depth={} post_list={} cq_mod={} inline={} max_size={} mtu={} check={}",
            self.test.name(),
            self.qps,
            u8::from(self.events),
            u8::from(self.bidirectional),
            self.tx_depth,
            self.rx_depth,
            self.post_list,
            self.cq_mod,
            self.inline,
            self.max_size,
            self.mtu,
            u8::from(self.check)
        )
    }

    /// Parses [`Params::encode`]'s line.
    pub fn decode(line: &str) -> Result<Params> {
        let bad = || Error::Protocol {
            line: line.to_owned(),
            expected: "PARAMS key=value...".into(),
        };
        let mut words = line.split_whitespace();
        if words.next() != Some("PARAMS") {
            return Err(bad());
        }
        let mut p = Params {
            test: Test::WriteBw,
            qps: 0,
            events: false,
            bidirectional: false,
            tx_depth: 0,
            rx_depth: 0,
            post_list: 0,
            cq_mod: 0,
            inline: 0,
            max_size: 0,
            mtu: 0,
            check: false,
        };
        let mut seen = 0;
        for w in words {
            let (k, v) = w.split_once('=').ok_or_else(bad)?;
            let num = || v.parse::<u32>().map_err(|_| bad());
            match k {
                "test" => p.test = Test::from_name(v).ok_or_else(bad)?,
                "qps" => p.qps = num()?,
                "events" => p.events = num()? != 0,
                "bidir" => p.bidirectional = num()? != 0,
                "tx_depth" => p.tx_depth = num()?,
                "rx_depth" => p.rx_depth = num()?,
                "post_list" => p.post_list = num()?,
                "cq_mod" => p.cq_mod = num()?,
                "inline" => p.inline = num()?,
                "max_size" => p.max_size = v.parse().map_err(|_| bad())?,
                "mtu" => p.mtu = num()?,
                // Optional: a client without it does not check.
                "check" => {
                    p.check = num()? != 0;
                    continue;
                }
                // Keys a newer client adds are ignored.
                _ => continue,
            }
            seen += 1;
        }
        let sane = p.qps >= 1
            && p.tx_depth >= 1
            && p.rx_depth >= 1
            && p.post_list >= 1
            && p.cq_mod >= 1
            && p.max_size >= 1
            && p.max_size <= 1 << 31;
        if seen < 11 || !sane {
            return Err(bad());
        }
        Ok(p)
    }
}

/// `WRITTEN q k1 k2 ...`: for QP `q`, the iteration last written to each of its slots (0: none).
pub fn encode_written(q: usize, last: &[u64]) -> String {
    let mut line = format!("WRITTEN {q}");
    for k in last {
        line.push(' ');
        line.push_str(&k.to_string());
    }
    line
}

/// Parses [`encode_written`]'s line for QP `q` with `slots` slots.
pub fn decode_written(line: &str, q: usize, slots: usize) -> Result<Vec<u64>> {
    let bad = || Error::Protocol {
        line: line.to_owned(),
        expected: format!("WRITTEN {q} and {slots} iterations"),
    };
    let mut w = line.split_whitespace();
    if w.next() != Some("WRITTEN") || w.next() != Some(q.to_string().as_str()) {
        return Err(bad());
    }
    let last: Vec<u64> = w
        .map(|k| k.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    if last.len() != slots {
        return Err(bad());
    }
    Ok(last)
}

/// `QP qpn psn rkey vaddr gid` (hex).
pub fn encode_qp(a: &QpAddress) -> String {
    let gid: String = a.gid.0.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "QP {:x} {:x} {:x} {:x} {gid}",
        a.qpn, a.psn, a.rkey, a.vaddr
    )
}

/// Parses [`encode_qp`]'s line.
pub fn decode_qp(line: &str) -> Result<QpAddress> {
    let bad = || Error::Protocol {
        line: line.to_owned(),
        expected: "QP qpn psn rkey vaddr gid".into(),
    };
    let w: Vec<&str> = line.split_whitespace().collect();
    let ["QP", qpn, psn, rkey, vaddr, gid] = w[..] else {
        return Err(bad());
    };
    let hex32 = |s: &str| u32::from_str_radix(s, 16).map_err(|_| bad());
    if gid.len() != 32 {
        return Err(bad());
    }
    let mut raw = [0u8; 16];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(&gid[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(QpAddress {
        qpn: hex32(qpn)?,
        psn: hex32(psn)?,
        rkey: hex32(rkey)?,
        vaddr: u64::from_str_radix(vaddr, 16).map_err(|_| bad())?,
        gid: Gid(raw),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_addresses_round_trip_and_garbage_is_refused() {
        let p = Params {
            test: Test::SendBw,
            qps: 4,
            events: true,
            bidirectional: true,
            tx_depth: 128,
            rx_depth: 512,
            post_list: 8,
            cq_mod: 64,
            inline: 0,
            max_size: 8 << 20,
            mtu: 4096,
            check: true,
        };
        assert_eq!(Params::decode(&p.encode()).unwrap(), p);
        // Without check= (an older client): no checking.
        let old = p.encode().replace(" check=1", "");
        assert_eq!(Params::decode(&old).unwrap(), Params { check: false, ..p });
        assert_eq!(
            decode_written(&encode_written(2, &[7, 0, 5]), 2, 3).unwrap(),
            vec![7, 0, 5]
        );
        assert!(decode_written("WRITTEN 1 7 0 5", 2, 3).is_err());
        assert!(decode_written("WRITTEN 2 7 0", 2, 3).is_err());
        assert!(Params::decode("PARAMS test=send_bw qps=0").is_err());
        assert!(Params::decode("HELLO").is_err());
        let a = QpAddress {
            qpn: 0x10001,
            psn: 0xabcdef,
            rkey: 0x100000,
            vaddr: 0x7f00_1234_5000,
            gid: Gid::from_ipv4([10, 0, 0, 2]),
        };
        assert_eq!(decode_qp(&encode_qp(&a)).unwrap(), a);
        assert!(decode_qp("QP 1 2 3").is_err());
    }
}
