//! A user-space stand-in for netem (the kernel here has none): the `vrdma-chaos` relay copies
//! raw IP packets between a TUN device in namespace A and one in namespace B, losing,
//! duplicating, reordering, delaying or cutting them on the way, and [`ChaosLink`] sets that
//! topology up for a test.
//!
//! Topology, for A holding 10.0.1.1/24 and B holding 10.0.2.1/24 (what [`ChaosLink::start`]
//! runs; by hand it is the same commands):
//!
//! ```text
//! ip -n A tuntap add dev TA mode tun           # persistent TUN, created by the harness
//! ip -n A link set dev TA mtu 9000 txqueuelen 4096
//! (in A) net.ipv4.conf.{all,TA}.rp_filter=0, net.ipv6.conf.TA.disable_ipv6=1 (IPv4 only)
//! (same in B with TB)
//! vrdma-chaos --a-netns A --a-tun TA --b-netns B --b-tun TB ...   # attaches, prints `ready`
//! ip -n A addr add 10.0.1.1/24 dev TA; ip -n A link set dev TA up
//! ip -n A route replace 10.0.2.0/24 dev TA
//! ip -n B addr add 10.0.2.1/24 dev TB; ip -n B link set dev TB up
//! ip -n B route replace 10.0.1.0/24 dev TB
//! ```
//!
//! Whole IP packets are relayed, so addresses and ports arrive as sent: RoCEv2's ICRC covers
//! the IP header and the daemons know their peers by IP address.
//!
//! The relay reads control lines on stdin, each answered by one line on stdout: `ok`,
//! `error: WHY`, or for `stats` one JSON object ([`Stats`]). Grammar ([`Command`]), with an
//! optional leading direction `a2b`, `b2a` or `both` (the default):
//!
//! ```text
//! cut | restore | loss P | duplicate P | mark P | reorder P GAP | delay MS [JITTER_MS] | stats
//! ```
//!
//! EOF on stdin (unless `--ignore-eof`), SIGTERM or SIGINT end it after printing final stats.

use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;
use serde::{Deserialize, Serialize};

use crate::netns::{self, Cidr, Netns, NetnsError};

/// Why the relay or its harness failed.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// Setting up namespaces, devices or addresses failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A control line did not parse.
    #[error("bad command `{line}`: {why}")]
    BadCommand {
        /// The line.
        line: String,
        /// What is wrong with it.
        why: String,
    },
    /// The relay could not attach to a TUN device.
    #[error(
        "cannot attach to TUN device `{tun}` in {where_}: {source}; the relay needs root, \
         and a device that exists must be a TUN (`ip [-n NETNS] tuntap add dev {tun} mode tun`)"
    )]
    Tun {
        /// The device.
        tun: String,
        /// The namespace, described.
        where_: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Reading from, writing to or waiting on a device or stdin failed.
    #[error("relay I/O failed while {doing}: {source}")]
    Io {
        /// What the relay was doing.
        doing: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The relay binary could not be started.
    #[error(
        "cannot start the relay `{path}`: {source}; build it with `cargo build -p vrdma-tests --bin vrdma-chaos`"
    )]
    Spawn {
        /// The binary.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The relay stopped answering or exited.
    #[error("the relay {what}; its last words: {stderr}")]
    RelayGone {
        /// What happened.
        what: String,
        /// The tail of its stderr.
        stderr: String,
    },
    /// The relay rejected a command.
    #[error("the relay refused `{command}`: {reply}")]
    Refused {
        /// The command sent.
        command: String,
        /// Its answer.
        reply: String,
    },
    /// `stats` answered something that is not the stats JSON.
    #[error("cannot read the relay's stats `{reply}`: {source}")]
    BadStats {
        /// The answer.
        reply: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

/// Which way packets travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// From A's TUN to B's.
    AToB,
    /// From B's TUN to A's.
    BToA,
    /// Both ways.
    Both,
}

impl Which {
    /// Indices into `[a→b, b→a]`.
    fn indices(self) -> &'static [usize] {
        match self {
            Which::AToB => &[0],
            Which::BToA => &[1],
            Which::Both => &[0, 1],
        }
    }
}

/// A change to one direction's impairments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Drop every packet, including those already delayed or held.
    Cut,
    /// Undo [`Change::Cut`].
    Restore,
    /// Drop each packet with this probability.
    Loss(f64),
    /// Send each packet twice with this probability.
    Duplicate(f64),
    /// Mark each ECN-capable packet congested (ECN CE), as a switch with a full queue would,
    /// with this probability.
    Mark(f64),
    /// With `probability`, hold a packet back until `gap` later packets have overtaken it (or
    /// the relay's reorder timeout passes, so a held packet is not stuck when traffic stops).
    Reorder {
        /// Chance per packet.
        probability: f64,
        /// How many packets overtake a held one.
        gap: u32,
    },
    /// Delay each packet by `fixed` plus a uniform random part of up to `jitter`; like netem,
    /// jitter larger than the packet spacing reorders.
    Delay {
        /// Always added.
        fixed: Duration,
        /// At most this much more.
        jitter: Duration,
    },
}

/// One control line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    /// Change the impairments of `which` direction(s).
    Set(Which, Change),
    /// Print the counters.
    Stats,
}

/// Parses a probability between 0 and 1.
pub fn parse_probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("`{text}` is not a probability between 0 and 1")),
    }
}

/// Parses milliseconds with up to six decimals (`2`, `0.25`) exactly, without going through
/// floating point, so that a [`Command`] survives printing and parsing unchanged.
pub fn parse_millis(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a number of milliseconds such as 5 or 0.25");
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let frac_nanos: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<u64>().map_err(|_| bad())? * 10u64.pow(6 - frac.len() as u32)
    };
    whole
        .checked_mul(1_000_000)
        .and_then(|n| n.checked_add(frac_nanos))
        .map(Duration::from_nanos)
        .ok_or_else(bad)
}

struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        let (whole, frac) = (nanos / 1_000_000, nanos % 1_000_000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let frac = format!("{frac:06}");
            write!(f, "{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl FromStr for Command {
    type Err = ChaosError;

    fn from_str(line: &str) -> Result<Command, ChaosError> {
        let fail = |why: String| ChaosError::BadCommand {
            line: line.to_owned(),
            why,
        };
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let which = match words.first().copied() {
            Some("a2b") => Some(Which::AToB),
            Some("b2a") => Some(Which::BToA),
            Some("both") => Some(Which::Both),
            _ => None,
        };
        if which.is_some() {
            words.remove(0);
        }
        let arg = |i: usize| -> Result<&str, ChaosError> {
            words
                .get(i)
                .copied()
                .ok_or_else(|| fail(format!("`{}` needs {i} argument(s)", words[0])))
        };
        let expect_args = |n: usize| -> Result<(), ChaosError> {
            if words.len() > n + 1 {
                return Err(fail(format!("`{}` takes {n} argument(s)", words[0])));
            }
            Ok(())
        };
        let change = match words.first().copied() {
            None => return Err(fail("empty command".into())),
            Some("stats") if which.is_none() => {
                expect_args(0)?;
                return Ok(Command::Stats);
            }
            Some("stats") => {
                return Err(fail(
                    "`stats` covers both directions; drop the direction".into(),
                ));
            }
            Some("cut") => {
                expect_args(0)?;
                Change::Cut
            }
            Some("restore") => {
                expect_args(0)?;
                Change::Restore
            }
            Some("loss") => {
                expect_args(1)?;
                Change::Loss(parse_probability(arg(1)?).map_err(fail)?)
            }
            Some("duplicate") => {
                expect_args(1)?;
                Change::Duplicate(parse_probability(arg(1)?).map_err(fail)?)
            }
            Some("mark") => {
                expect_args(1)?;
                Change::Mark(parse_probability(arg(1)?).map_err(fail)?)
            }
            Some("reorder") => {
                expect_args(2)?;
                let probability = parse_probability(arg(1)?).map_err(fail)?;
                let gap = arg(2)?
                    .parse()
                    .map_err(|_| fail("the reorder gap is a count of packets, such as 3".into()))?;
                Change::Reorder { probability, gap }
            }
            Some("delay") => {
                expect_args(2)?;
                let fixed = parse_millis(arg(1)?).map_err(fail)?;
                let jitter = match words.get(2) {
                    Some(j) => parse_millis(j).map_err(fail)?,
                    None => Duration::ZERO,
                };
                Change::Delay { fixed, jitter }
            }
            Some(other) => {
                return Err(fail(format!(
                    "unknown command `{other}`; try cut, restore, loss P, duplicate P, mark P, \
                     reorder P GAP, delay MS [JITTER_MS] or stats, optionally after a2b, b2a \
                     or both"
                )));
            }
        };
        Ok(Command::Set(which.unwrap_or(Which::Both), change))
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (which, change) = match self {
            Command::Stats => return write!(f, "stats"),
            Command::Set(which, change) => (which, change),
        };
        match which {
            Which::AToB => write!(f, "a2b ")?,
            Which::BToA => write!(f, "b2a ")?,
            Which::Both => write!(f, "both ")?,
        }
        match change {
            Change::Cut => write!(f, "cut"),
            Change::Restore => write!(f, "restore"),
            Change::Loss(p) => write!(f, "loss {p}"),
            Change::Duplicate(p) => write!(f, "duplicate {p}"),
            Change::Mark(p) => write!(f, "mark {p}"),
            Change::Reorder { probability, gap } => write!(f, "reorder {probability} {gap}"),
            Change::Delay { fixed, jitter } => {
                write!(f, "delay {} {}", Millis(*fixed), Millis(*jitter))
            }
        }
    }
}

/// What one direction does to its packets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairments {
    /// Everything is dropped.
    pub cut: bool,
    /// Chance of dropping a packet.
    pub loss: f64,
    /// Chance of sending a packet twice.
    pub duplicate: f64,
    /// Chance of marking an ECN-capable packet congested (CE).
    pub mark: f64,
    /// Chance of holding a packet back.
    pub reorder: f64,
    /// How many packets overtake a held one.
    pub reorder_gap: u32,
    /// Added to every packet's transit.
    pub delay: Duration,
    /// Up to this much more, uniformly.
    pub jitter: Duration,
}

impl Default for Impairments {
    fn default() -> Impairments {
        Impairments {
            cut: false,
            loss: 0.0,
            mark: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_gap: 3,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
        }
    }
}

impl Impairments {
    /// Applies `change`.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Cut => self.cut = true,
            Change::Restore => self.cut = false,
            Change::Loss(p) => self.loss = p,
            Change::Duplicate(p) => self.duplicate = p,
            Change::Mark(p) => self.mark = p,
            Change::Reorder { probability, gap } => {
                self.reorder = probability;
                self.reorder_gap = gap;
            }
            Change::Delay { fixed, jitter } => {
                self.delay = fixed;
                self.jitter = jitter;
            }
        }
    }

    /// The changes that turn default settings into these.
    pub fn as_changes(&self) -> Vec<Change> {
        vec![
            if self.cut {
                Change::Cut
            } else {
                Change::Restore
            },
            Change::Loss(self.loss),
            Change::Duplicate(self.duplicate),
            Change::Mark(self.mark),
            Change::Reorder {
                probability: self.reorder,
                gap: self.reorder_gap,
            },
            Change::Delay {
                fixed: self.delay,
                jitter: self.jitter,
            },
        ]
    }
}

/// The counters of one direction. Every packet read is accounted for:
/// `received + duplicated == forwarded + dropped + errors + queued`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    /// Packets read from the source TUN.
    pub received: u64,
    /// Packets written to the destination TUN, copies included.
    pub forwarded: u64,
    /// Packets lost to `loss` or to a cut.
    pub dropped: u64,
    /// Packets sent twice.
    pub duplicated: u64,
    /// ECN-capable packets marked congested (CE).
    pub marked: u64,
    /// Held packets that left after at least one later packet.
    pub reordered: u64,
    /// Packets the destination TUN refused.
    pub errors: u64,
    /// Packets delayed or held right now.
    pub queued: u64,
}

/// The counters of both directions, as `stats` prints them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// From A to B.
    pub a_to_b: DirectionStats,
    /// From B to A.
    pub b_to_a: DirectionStats,
}

/// SplitMix64: a tiny generator with a fixed, documented output sequence, so a seed means the
/// same losses whatever crate versions the workspace resolves.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// An independent stream for one purpose of one direction.
    fn stream(seed: u64, direction: u64, purpose: u64) -> SplitMix64 {
        let mut mixer = SplitMix64(seed ^ ((direction << 8) | purpose).wrapping_mul(0xA24B_AED4));
        SplitMix64(mixer.next_u64())
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, probability: f64) -> bool {
        self.unit() < probability
    }
}

#[derive(Debug)]
struct Delayed {
    due: Instant,
    arrival: u64,
    packet: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.arrival) == (other.due, other.arrival)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    // Reversed, so the max-heap pops the earliest due; arrival order breaks ties so that
    // equal delays keep packets in order.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.arrival).cmp(&(self.due, self.arrival))
    }
}

#[derive(Debug)]
struct Held {
    packet: Vec<u8>,
    departure: u64,
    overtakes_left: u32,
    deadline: Instant,
    overtaken: bool,
}

/// Marks IP packet `packet` congested (ECN CE) if it is ECN-capable (ECT(0) or ECT(1)),
/// keeping an IPv4 header's checksum right; returns whether it did. The RoCEv2 ICRC leaves
/// the ECN field out, so a marked packet stays valid.
pub fn mark_congested(packet: &mut [u8]) -> bool {
    const CE: u8 = 0b11;
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ecn = packet[1] & 0b11;
            if ecn == 0 || ecn == CE {
                return false;
            }
            packet[1] |= CE;
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return false;
            }
            packet[10] = 0;
            packet[11] = 0;
            let checksum = !ones_complement_sum(&packet[..ihl]);
            packet[10..12].copy_from_slice(&checksum.to_be_bytes());
            true
        }
        // The traffic class straddles the first two bytes: its ECN bits are bits 4-5 of
        // byte 1. IPv6 has no header checksum.
        Some(6) if packet.len() >= 40 => {
            let ecn = (packet[1] >> 4) & 0b11;
            if ecn == 0 || ecn == CE {
                return false;
            }
            packet[1] |= CE << 4;
            true
        }
        _ => false,
    }
}

/// The ones'-complement sum of `bytes` as 16-bit big-endian words (an IPv4 header's
/// checksum is its complement; a header with a right checksum sums to 0xffff).
fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// One direction of the relay: takes packets in, lets them out through `egress` once their
/// delay has passed, applying the impairments. Free of I/O so it can be tested on its own.
#[derive(Debug)]
pub struct OneWayLink {
    settings: Impairments,
    reorder_timeout: Duration,
    loss_rng: SplitMix64,
    duplicate_rng: SplitMix64,
    reorder_rng: SplitMix64,
    jitter_rng: SplitMix64,
    mark_rng: SplitMix64,
    in_flight: BinaryHeap<Delayed>,
    held: Vec<Held>,
    arrivals: u64,
    departures: u64,
    stats: DirectionStats,
}

impl OneWayLink {
    /// A direction (0 for a→b, 1 for b→a) whose random choices follow `seed`.
    pub fn new(
        seed: u64,
        direction: u64,
        settings: Impairments,
        reorder_timeout: Duration,
    ) -> OneWayLink {
        OneWayLink {
            settings,
            reorder_timeout,
            loss_rng: SplitMix64::stream(seed, direction, 1),
            duplicate_rng: SplitMix64::stream(seed, direction, 2),
            reorder_rng: SplitMix64::stream(seed, direction, 3),
            jitter_rng: SplitMix64::stream(seed, direction, 4),
            mark_rng: SplitMix64::stream(seed, direction, 5),
            in_flight: BinaryHeap::new(),
            held: Vec::new(),
            arrivals: 0,
            departures: 0,
            stats: DirectionStats::default(),
        }
    }

    /// Changes the impairments from now on.
    pub fn apply(&mut self, change: Change) {
        self.settings.apply(change);
    }

    /// The current impairments.
    pub fn settings(&self) -> &Impairments {
        &self.settings
    }

    /// The counters.
    pub fn stats(&self) -> DirectionStats {
        DirectionStats {
            queued: (self.in_flight.len() + self.held.len()) as u64,
            ..self.stats
        }
    }

    /// Takes in a packet read at `now`.
    pub fn ingress(&mut self, packet: &[u8], now: Instant) {
        self.stats.received += 1;
        // Every stream is drawn for every packet, so which packets one impairment hits depends
        // only on the seed and the packet's position, not on the other settings.
        let lost = self.loss_rng.chance(self.settings.loss);
        let duplicated = self.duplicate_rng.chance(self.settings.duplicate);
        let marked = self.mark_rng.chance(self.settings.mark);
        if self.settings.cut || lost {
            self.stats.dropped += 1;
            return;
        }
        let mut packet = std::borrow::Cow::Borrowed(packet);
        if marked {
            let mut copy = packet.to_vec();
            if mark_congested(&mut copy) {
                self.stats.marked += 1;
                packet = std::borrow::Cow::Owned(copy);
            }
        }
        let copies = if duplicated {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = self.settings.jitter.mul_f64(self.jitter_rng.unit());
            self.in_flight.push(Delayed {
                due: now + self.settings.delay + jitter,
                arrival: self.arrivals,
                packet: packet.to_vec(),
            });
            self.arrivals += 1;
        }
    }

    /// When `egress` next has something to do, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let delayed = self.in_flight.peek().map(|d| d.due);
        let held = self.held.iter().map(|h| h.deadline).min();
        delayed.into_iter().chain(held).min()
    }

    /// Lets out, through `write`, every packet whose time has come by `now`.
    pub fn egress(&mut self, now: Instant, write: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) {
        while self.in_flight.peek().is_some_and(|d| d.due <= now) {
            if let Some(delayed) = self.in_flight.pop() {
                self.depart(delayed.packet, delayed.due, write);
            }
        }
        // `held` is in departure order, so the oldest expired packet leaves first.
        while let Some(i) = self.held.iter().position(|h| h.deadline <= now) {
            let held = self.held.remove(i);
            self.send(held.packet, held.departure, held.overtaken, write);
        }
    }

    fn depart(
        &mut self,
        packet: Vec<u8>,
        due: Instant,
        write: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) {
        let departure = self.departures;
        self.departures += 1;
        let hold = self.reorder_rng.chance(self.settings.reorder);
        if hold && self.settings.reorder_gap > 0 {
            self.held.push(Held {
                packet,
                departure,
                overtakes_left: self.settings.reorder_gap,
                // From when it was due, not when egress happened to run.
                deadline: due + self.reorder_timeout,
                overtaken: false,
            });
            return;
        }
        self.send(packet, departure, false, write);
    }

    /// Writes `packet` and, in turn, every held packet it was the last to overtake.
    fn send(
        &mut self,
        packet: Vec<u8>,
        departure: u64,
        overtaken: bool,
        write: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) {
        let mut ready = VecDeque::from([(packet, departure, overtaken)]);
        while let Some((packet, departure, overtaken)) = ready.pop_front() {
            if self.settings.cut {
                self.stats.dropped += 1;
                continue;
            }
            if let Err(e) = write(&packet) {
                log::debug!(
                    "destination TUN refused a {}-byte packet: {e}",
                    packet.len()
                );
                self.stats.errors += 1;
                continue;
            }
            self.stats.forwarded += 1;
            if overtaken {
                self.stats.reordered += 1;
            }
            let mut i = 0;
            while i < self.held.len() {
                let held = &mut self.held[i];
                if held.departure < departure {
                    held.overtaken = true;
                    held.overtakes_left -= 1;
                    if held.overtakes_left == 0 {
                        let held = self.held.remove(i);
                        ready.push_back((held.packet, held.departure, true));
                        continue;
                    }
                }
                i += 1;
            }
        }
    }
}

/// One side of the relay: a TUN device, in a namespace or in the relay's own.
#[derive(Debug, Clone)]
pub struct TunEnd {
    /// The namespace, as `ip netns` names it; `None` for the relay's own.
    pub netns: Option<String>,
    /// The TUN device to attach to. One that does not exist is created, but lives only as long
    /// as the relay and is left down and without addresses.
    pub tun: String,
}

/// How to run the relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Side A.
    pub a: TunEnd,
    /// Side B.
    pub b: TunEnd,
    /// Seeds every random choice.
    pub seed: u64,
    /// Impairments a→b and b→a before any command.
    pub initial: [Impairments; 2],
    /// How long a reordered packet waits at most for its overtakers.
    pub reorder_timeout: Duration,
    /// Whether EOF on stdin stops the relay.
    pub exit_on_eof: bool,
}

fn open_tun(end: &TunEnd) -> Result<tun_rs::SyncDevice, ChaosError> {
    let open = || {
        // Link state, addresses and routes are the caller's: the relay only moves packets.
        let device = tun_rs::DeviceBuilder::new()
            .name(end.tun.clone())
            .inherit_enable_state()
            .build_sync()?;
        // Non-blocking so one poll wake-up can drain a burst without stalling on the last read.
        device.set_nonblocking(true)?;
        Ok(device)
    };
    let opened = match &end.netns {
        Some(ns) => netns::run_in_named_netns(ns, open)?,
        None => open(),
    };
    opened.map_err(|source| ChaosError::Tun {
        tun: end.tun.clone(),
        where_: match &end.netns {
            Some(ns) => format!("namespace `{ns}`"),
            None => "the relay's namespace".into(),
        },
        source,
    })
}

/// Prints one reply line. A controller that stopped listening is not the relay's problem: it
/// goes on relaying until EOF or a signal.
fn reply(line: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        log::debug!("cannot print `{line}`: {e}");
    }
}

fn stats_line(links: &[OneWayLink; 2]) -> String {
    let stats = Stats {
        a_to_b: links[0].stats(),
        b_to_a: links[1].stats(),
    };
    serde_json::to_string(&stats).unwrap_or_else(|e| format!("error: {e}"))
}

fn execute(line: &str, links: &mut [OneWayLink; 2]) {
    match line.parse::<Command>() {
        Ok(Command::Stats) => reply(&stats_line(links)),
        Ok(Command::Set(which, change)) => {
            for &i in which.indices() {
                links[i].apply(change);
            }
            log::info!("{}", Command::Set(which, change));
            reply("ok");
        }
        Err(e) => {
            log::warn!("{e}");
            reply(&format!("error: {e}"));
        }
    }
}

/// Packets read from one device per wake-up at most, so a flood one way cannot starve the other
/// direction, stdin or the delay timers.
const READ_BATCH: usize = 64;

/// Runs the relay until EOF on stdin (if `exit_on_eof`), SIGTERM or SIGINT, applying
/// `commands` first; prints `ready` once attached, and the final stats when done.
pub fn run_relay(config: &RelayConfig, commands: &[Command]) -> Result<Stats, ChaosError> {
    let io = |doing| move |source| ChaosError::Io { doing, source };
    let tuns = [open_tun(&config.a)?, open_tun(&config.b)?];
    let mut links = [0, 1].map(|d| {
        OneWayLink::new(
            config.seed,
            d,
            config.initial[d as usize],
            config.reorder_timeout,
        )
    });
    for command in commands {
        execute(&command.to_string(), &mut links);
    }
    // Signals arrive as bytes on a socket, so the poll loop sees them like any other input.
    let (signal_rx, signal_tx) = UnixStream::pair().map_err(io("creating a signal pipe"))?;
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let tx = signal_tx
            .try_clone()
            .map_err(io("creating a signal pipe"))?;
        signal_hook::low_level::pipe::register(signal, tx)
            .map_err(io("installing signal handlers"))?;
    }
    reply("ready");
    let stdin = std::io::stdin();
    let mut stdin_open = true;
    let mut pending_input = Vec::new();
    let mut packet = vec![0u8; 65536];
    let mut input = [0u8; 4096];
    loop {
        let now = Instant::now();
        for (from, link) in links.iter_mut().enumerate() {
            let to = &tuns[1 - from];
            link.egress(now, &mut |p| to.send(p).map(drop));
        }
        let timeout = links
            .iter()
            .filter_map(OneWayLink::next_deadline)
            .min()
            .map(|due| TimeSpec::from(due.saturating_duration_since(Instant::now())));
        let mut fds = vec![
            PollFd::new(tuns[0].as_fd(), PollFlags::POLLIN),
            PollFd::new(tuns[1].as_fd(), PollFlags::POLLIN),
            PollFd::new(signal_rx.as_fd(), PollFlags::POLLIN),
        ];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match ppoll(&mut fds, timeout, None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(io("waiting for packets")(e.into())),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[2] {
            log::info!("stopping on a signal");
            break;
        }
        for (from, link) in links.iter_mut().enumerate() {
            if !ready[from] {
                continue;
            }
            for _ in 0..READ_BATCH {
                match tuns[from].recv(&mut packet) {
                    Ok(len) => link.ingress(&packet[..len], Instant::now()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(io("reading a TUN device")(e)),
                }
            }
        }
        if stdin_open && ready[3] {
            match nix::unistd::read(stdin.as_fd(), &mut input) {
                Ok(0) if config.exit_on_eof => {
                    log::info!("stopping at EOF on stdin");
                    break;
                }
                Ok(0) => stdin_open = false,
                Ok(n) => pending_input.extend_from_slice(&input[..n]),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(io("reading commands")(e.into())),
            }
            while let Some(end) = pending_input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending_input.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                if !line.trim().is_empty() {
                    execute(line.trim(), &mut links);
                }
            }
        }
    }
    reply(&stats_line(&links));
    Ok(Stats {
        a_to_b: links[0].stats(),
        b_to_a: links[1].stats(),
    })
}

/// How [`ChaosLink::start`] sets up the link.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Seeds every random choice of the relay.
    pub seed: u64,
    /// Impairments from A to B.
    pub a_to_b: Impairments,
    /// Impairments from B to A.
    pub b_to_a: Impairments,
    /// How long a reordered packet waits at most for its overtakers.
    pub reorder_timeout: Duration,
    /// MTU of both TUN devices. 9000 by default, as RoCE fabrics use, so 4096-byte RoCE MTUs
    /// fit.
    pub mtu: u32,
}

impl Default for ChaosOptions {
    fn default() -> ChaosOptions {
        ChaosOptions {
            seed: 1,
            a_to_b: Impairments::default(),
            b_to_a: Impairments::default(),
            reorder_timeout: Duration::from_millis(50),
            mtu: 9000,
        }
    }
}

impl ChaosOptions {
    /// The same impairments both ways.
    pub fn both(impairments: Impairments) -> ChaosOptions {
        ChaosOptions {
            a_to_b: impairments,
            b_to_a: impairments,
            ..ChaosOptions::default()
        }
    }
}

/// The relay's half of the conversation.
#[derive(Debug)]
struct Control {
    stdin: Option<ChildStdin>,
    replies: mpsc::Receiver<String>,
}

/// How long the relay may take to answer; generous, because a loaded two-core CI machine can
/// stall a process for a while.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of the relay's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// A relayed, impairable link between two namespaces, torn down on drop.
#[derive(Debug)]
pub struct ChaosLink {
    child: Child,
    control: Mutex<Control>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    tun_a: (String, String),
    tun_b: (String, String),
    shut_down: bool,
}

fn prepare_tun(
    ns: &Netns,
    tun: &str,
    addrs: &[Cidr],
    remote: &[Cidr],
    mtu: u32,
) -> Result<(), ChaosError> {
    ns.run(&["tuntap", "add", "dev", tun, "mode", "tun"])?;
    // A deep queue, because the kernel drops (rather than waits) when the relay falls behind
    // a burst, and the tests count every packet.
    ns.run(&[
        "link",
        "set",
        "dev",
        tun,
        "mtu",
        &mtu.to_string(),
        "txqueuelen",
        "4096",
    ])?;
    // The effective rp_filter is the larger of `all` and the device's; namespaces inherit the
    // host's `all`. The routes below already pass a strict check, this only removes a way for
    // a host setting to make the link silently drop.
    ns.sysctl("net/ipv4/conf/all/rp_filter", "0")?;
    ns.sysctl(&format!("net/ipv4/conf/{tun}/rp_filter"), "0")?;
    if !addrs.iter().chain(remote).any(|c| c.addr.is_ipv6()) {
        // Otherwise router solicitations and MLD reports cross the relay and upset its counts.
        match ns.sysctl(&format!("net/ipv6/conf/{tun}/disable_ipv6"), "1") {
            Err(NetnsError::Sysctl { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

fn configure_tun(ns: &Netns, tun: &str, addrs: &[Cidr], remote: &[Cidr]) -> Result<(), ChaosError> {
    netns::add_addresses(ns, tun, addrs)?;
    ns.run(&["link", "set", "dev", tun, "up"])?;
    for cidr in remote {
        // `replace`, because the remote network may be the local one, already routed here.
        ns.run(&["route", "replace", &cidr.network(), "dev", tun])?;
    }
    Ok(())
}

impl ChaosLink {
    /// Connects `a` (holding `a_addrs`, `ADDRESS/PREFIX`) and `b` (holding `b_addrs`) through
    /// the relay binary at `relay` (in integration tests, `env!("CARGO_BIN_EXE_vrdma-chaos")`),
    /// with each side routing the other's networks over its TUN device. Returns once packets
    /// flow.
    pub fn start(
        relay: &Path,
        a: &Netns,
        a_addrs: &[&str],
        b: &Netns,
        b_addrs: &[&str],
        opts: &ChaosOptions,
    ) -> Result<ChaosLink, ChaosError> {
        let parse = |addrs: &[&str]| -> Result<Vec<Cidr>, NetnsError> {
            addrs.iter().map(|a| Cidr::parse(a)).collect()
        };
        let (a_cidrs, b_cidrs) = (parse(a_addrs)?, parse(b_addrs)?);
        let base = netns::unique_name("ch");
        let (tun_a, tun_b) = (format!("{base}a"), format!("{base}b"));
        prepare_tun(a, &tun_a, &a_cidrs, &b_cidrs, opts.mtu)?;
        prepare_tun(b, &tun_b, &b_cidrs, &a_cidrs, opts.mtu)?;

        let mut cmd = std::process::Command::new(relay);
        cmd.args(["--a-netns", a.name(), "--a-tun", &tun_a])
            .args(["--b-netns", b.name(), "--b-tun", &tun_b])
            .args(["--seed", &opts.seed.to_string()])
            .args([
                "--reorder-timeout-ms",
                &Millis(opts.reorder_timeout).to_string(),
            ]);
        for (which, impairments) in [(Which::AToB, &opts.a_to_b), (Which::BToA, &opts.b_to_a)] {
            for change in impairments.as_changes() {
                cmd.args(["--set", &Command::Set(which, change).to_string()]);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ChaosError::Spawn {
                path: relay.display().to_string(),
                source,
            })?;
        let (reply_tx, replies) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if reply_tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    // Echoed so it shows in a failing test's captured output.
                    eprintln!("vrdma-chaos: {line}");
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        // From here on, dropping the link stops the relay and removes the devices.
        let link = ChaosLink {
            control: Mutex::new(Control {
                stdin: child.stdin.take(),
                replies,
            }),
            child,
            stderr_tail,
            tun_a: (a.name().to_owned(), tun_a),
            tun_b: (b.name().to_owned(), tun_b),
            shut_down: false,
        };
        // The relay answers the start-up `--set` commands before `ready`.
        loop {
            let line = link.next_reply("to start")?;
            if line == "ready" {
                break;
            }
            if line != "ok" {
                return Err(ChaosError::Refused {
                    command: "start-up settings".into(),
                    reply: line,
                });
            }
        }
        configure_tun(a, &link.tun_a.1, &a_cidrs, &b_cidrs)?;
        configure_tun(b, &link.tun_b.1, &b_cidrs, &a_cidrs)?;
        Ok(link)
    }

    /// The TUN devices in A and in B.
    pub fn tun_names(&self) -> (&str, &str) {
        (&self.tun_a.1, &self.tun_b.1)
    }

    fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    fn gone(&self, what: String) -> ChaosError {
        // Give the stderr reader a moment to catch the relay's last message.
        std::thread::sleep(Duration::from_millis(50));
        ChaosError::RelayGone {
            what,
            stderr: self.stderr_tail(),
        }
    }

    fn next_reply(&self, waiting_for: &str) -> Result<String, ChaosError> {
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        match control.replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.gone(format!(
                "did not answer within {REPLY_TIMEOUT:?} {waiting_for}"
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.gone(format!("exited while we waited for it {waiting_for}")))
            }
        }
    }

    /// Sends `command` and returns the relay's answer.
    pub fn command(&self, command: &Command) -> Result<String, ChaosError> {
        let text = command.to_string();
        // Held across the round trip, so concurrent callers cannot take each other's answers.
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let sent = match control.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{text}").and_then(|()| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        if let Err(e) = sent {
            return Err(self.gone(format!("cannot be sent `{text}`: {e}")));
        }
        match control.replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(line) => Ok(line),
            Err(e) => Err(self.gone(format!("did not answer `{text}`: {e}"))),
        }
    }

    /// Applies `change` to `which` direction(s).
    pub fn set(&self, which: Which, change: Change) -> Result<(), ChaosError> {
        let command = Command::Set(which, change);
        let reply = self.command(&command)?;
        if reply != "ok" {
            return Err(ChaosError::Refused {
                command: command.to_string(),
                reply,
            });
        }
        Ok(())
    }

    /// Drops everything both ways, in flight included, until [`ChaosLink::restore`].
    pub fn cut(&self) -> Result<(), ChaosError> {
        self.set(Which::Both, Change::Cut)
    }

    /// Ends a cut both ways.
    pub fn restore(&self) -> Result<(), ChaosError> {
        self.set(Which::Both, Change::Restore)
    }

    /// Sets the loss probability both ways.
    pub fn set_loss(&self, probability: f64) -> Result<(), ChaosError> {
        self.set(Which::Both, Change::Loss(probability))
    }

    /// The relay's counters now.
    pub fn stats(&self) -> Result<Stats, ChaosError> {
        let reply = self.command(&Command::Stats)?;
        serde_json::from_str(&reply).map_err(|source| ChaosError::BadStats { reply, source })
    }

    /// Stops the relay and returns its final counters.
    pub fn stop(mut self) -> Result<Stats, ChaosError> {
        let reply = {
            let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
            // EOF is the relay's signal to print its final counters and exit.
            control.stdin = None;
            control.replies.recv_timeout(REPLY_TIMEOUT)
        };
        let reply = reply.map_err(|e| self.gone(format!("printed no final stats: {e}")))?;
        let stats =
            serde_json::from_str(&reply).map_err(|source| ChaosError::BadStats { reply, source });
        self.shut_down();
        stats
    }

    fn shut_down(&mut self) {
        if std::mem::replace(&mut self.shut_down, true) {
            return;
        }
        self.control.lock().unwrap_or_else(|e| e.into_inner()).stdin = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    log::warn!("the relay ignored EOF on stdin; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        for (ns, tun) in [&self.tun_a, &self.tun_b] {
            // The namespace may be gone already, taking the device with it.
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["-n", ns, "link", "delete", "dev", tun]);
            if let Err(e) = netns::run_command(cmd) {
                log::debug!("{e}");
            }
        }
    }
}

impl Drop for ChaosLink {
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A congestion mark keeps an IPv4 header's checksum right and leaves packets that are
    /// not ECN-capable, or already marked, alone; on IPv6 it sets the traffic class's ECN bits.
    #[test]
    fn marking_sets_ce_on_ecn_capable_packets_only() {
        let checksum_ok = |p: &[u8]| ones_complement_sum(&p[..20]) == 0xffff;
        let mut v4 = [0u8; 28];
        v4[0] = 0x45;
        v4[1] = (26 << 2) | 0b10;
        v4[8] = 64;
        v4[9] = 17;
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let checksum = !ones_complement_sum(&v4[..20]);
        v4[10..12].copy_from_slice(&checksum.to_be_bytes());
        assert!(checksum_ok(&v4));
        assert!(mark_congested(&mut v4));
        assert_eq!(v4[1], (26 << 2) | 0b11, "DSCP kept, ECN CE");
        assert!(checksum_ok(&v4), "the checksum follows");
        assert!(!mark_congested(&mut v4), "already marked");
        let mut not_ect = v4;
        not_ect[1] = 26 << 2;
        assert!(!mark_congested(&mut not_ect));
        let mut v6 = [0u8; 48];
        v6[0] = 0x60 | (0x68 >> 4);
        v6[1] = ((0x68 & 0x0f) << 4) | (0b10 << 4);
        assert!(mark_congested(&mut v6));
        assert_eq!((v6[1] >> 4) & 0b11, 0b11);
    }

    fn collect(link: &mut OneWayLink, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        link.egress(now, &mut |p| {
            out.push(p.to_vec());
            Ok(())
        });
        out
    }

    fn link_with(settings: Impairments) -> OneWayLink {
        OneWayLink::new(7, 0, settings, Duration::from_millis(50))
    }

    #[test]
    fn commands_survive_printing_and_parsing() {
        let commands = [
            Command::Stats,
            Command::Set(Which::AToB, Change::Cut),
            Command::Set(Which::BToA, Change::Restore),
            Command::Set(Which::Both, Change::Loss(0.05)),
            Command::Set(Which::AToB, Change::Duplicate(1.0)),
            Command::Set(
                Which::Both,
                Change::Reorder {
                    probability: 0.125,
                    gap: 4,
                },
            ),
            Command::Set(
                Which::BToA,
                Change::Delay {
                    fixed: Duration::from_micros(2500),
                    jitter: Duration::from_nanos(1000),
                },
            ),
        ];
        for command in commands {
            let text = command.to_string();
            assert_eq!(text.parse::<Command>().unwrap(), command, "{text}");
        }
        assert_eq!(
            "loss 0.5".parse::<Command>().unwrap(),
            Command::Set(Which::Both, Change::Loss(0.5))
        );
        assert_eq!(
            "a2b delay 5".parse::<Command>().unwrap(),
            Command::Set(
                Which::AToB,
                Change::Delay {
                    fixed: Duration::from_millis(5),
                    jitter: Duration::ZERO
                }
            )
        );
    }

    #[test]
    fn malformed_commands_are_refused() {
        for bad in [
            "",
            "loss",
            "loss 1.5",
            "loss -0.1",
            "loss x",
            "cut now",
            "reorder 0.1",
            "delay 1.2345678",
            "delay -1",
            "a2b stats",
            "jump",
        ] {
            assert!(bad.parse::<Command>().is_err(), "`{bad}` accepted");
        }
    }

    #[test]
    fn unimpaired_packets_leave_at_once_in_order() {
        let mut link = link_with(Impairments::default());
        let now = Instant::now();
        for i in 0..10u8 {
            link.ingress(&[i], now);
        }
        let out = collect(&mut link, now);
        assert_eq!(out, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
        assert_eq!(link.stats().forwarded, 10);
        assert_eq!(link.next_deadline(), None);
    }

    #[test]
    fn same_seed_loses_the_same_packets() {
        let lost = |seed| {
            let mut link = OneWayLink::new(
                seed,
                0,
                Impairments {
                    loss: 0.3,
                    ..Impairments::default()
                },
                Duration::ZERO,
            );
            let now = Instant::now();
            (0..200u8)
                .filter(|&i| {
                    link.ingress(&[i], now);
                    collect(&mut link, now).is_empty()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(lost(1), lost(1));
        assert_ne!(lost(1), lost(2));
        let n = lost(1).len();
        assert!((30..90).contains(&n), "{n} of 200 lost at 30%");
    }

    #[test]
    fn delay_holds_packets_until_due() {
        let mut link = link_with(Impairments {
            delay: Duration::from_millis(10),
            ..Impairments::default()
        });
        let t0 = Instant::now();
        link.ingress(&[1], t0);
        link.ingress(&[2], t0 + Duration::from_millis(1));
        assert!(collect(&mut link, t0 + Duration::from_millis(9)).is_empty());
        assert_eq!(link.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(
            collect(&mut link, t0 + Duration::from_millis(11)),
            vec![vec![1], vec![2]]
        );
    }

    #[test]
    fn a_held_packet_leaves_after_its_gap_of_overtakers() {
        let mut link = link_with(Impairments {
            reorder: 1.0,
            reorder_gap: 2,
            ..Impairments::default()
        });
        let now = Instant::now();
        link.ingress(&[0], now);
        assert!(collect(&mut link, now).is_empty(), "packet 0 was not held");
        link.apply(Change::Reorder {
            probability: 0.0,
            gap: 2,
        });
        for i in 1..4u8 {
            link.ingress(&[i], now);
        }
        assert_eq!(
            collect(&mut link, now),
            vec![vec![1], vec![2], vec![0], vec![3]]
        );
        assert_eq!(link.stats().reordered, 1);
    }

    #[test]
    fn a_held_packet_without_overtakers_leaves_at_the_timeout_unreordered() {
        let mut link = link_with(Impairments {
            reorder: 1.0,
            reorder_gap: 5,
            ..Impairments::default()
        });
        let now = Instant::now();
        link.ingress(&[0], now);
        assert!(collect(&mut link, now + Duration::from_millis(49)).is_empty());
        assert_eq!(
            collect(&mut link, now + Duration::from_millis(50)),
            vec![vec![0]]
        );
        assert_eq!(link.stats().reordered, 0);
    }

    #[test]
    fn a_cut_drops_packets_already_in_flight() {
        let mut link = link_with(Impairments {
            delay: Duration::from_millis(5),
            ..Impairments::default()
        });
        let now = Instant::now();
        link.ingress(&[1], now);
        link.apply(Change::Cut);
        link.ingress(&[2], now);
        assert!(collect(&mut link, now + Duration::from_millis(5)).is_empty());
        link.apply(Change::Restore);
        link.ingress(&[3], now);
        assert_eq!(
            collect(&mut link, now + Duration::from_millis(10)),
            vec![vec![3]]
        );
        let stats = link.stats();
        assert_eq!((stats.received, stats.dropped, stats.forwarded), (3, 2, 1));
    }

    #[test]
    fn duplicates_are_counted_and_sent_twice() {
        let mut link = link_with(Impairments {
            duplicate: 1.0,
            ..Impairments::default()
        });
        let now = Instant::now();
        link.ingress(&[9], now);
        assert_eq!(collect(&mut link, now), vec![vec![9], vec![9]]);
        let stats = link.stats();
        assert_eq!((stats.duplicated, stats.forwarded), (1, 2));
    }

    #[test]
    fn write_failures_are_counted_not_fatal() {
        let mut link = link_with(Impairments::default());
        let now = Instant::now();
        link.ingress(&[1], now);
        link.egress(now, &mut |_| Err(std::io::ErrorKind::Other.into()));
        let stats = link.stats();
        assert_eq!((stats.errors, stats.forwarded, stats.queued), (1, 0, 0));
    }
}
