//! A VM's bandwidth and message-rate limits (`max-bw=`, `max-msg-rate=`), as token buckets.

use std::time::{Duration, Instant};

use crate::model::memory::CHUNK;

/// A VM's token buckets. Each holds at most 10 ms of its rate (but never less than one chunk
/// or one message), so a limited VM cannot save up a burst that would hold back the others.
#[derive(Debug, Clone, Copy)]
pub struct Buckets {
    max_bw: Option<u64>,
    max_msg_rate: Option<u64>,
    bytes: f64,
    msgs: f64,
    last: Instant,
}

impl Buckets {
    /// Empty buckets for a VM limited to `max_bw` payload bytes and `max_msg_rate` work
    /// requests per second (`None`: unlimited).
    pub fn new(max_bw: Option<u64>, max_msg_rate: Option<u64>) -> Self {
        Buckets {
            max_bw,
            max_msg_rate,
            bytes: 0.0,
            msgs: 0.0,
            last: Instant::now(),
        }
    }

    /// Whether any limit applies.
    pub fn limited(&self) -> bool {
        self.max_bw.is_some() || self.max_msg_rate.is_some()
    }

    fn byte_cap(bw: u64) -> f64 {
        (bw as f64 / 100.0).max(f64::from(CHUNK))
    }

    fn msg_cap(rate: u64) -> f64 {
        (rate as f64 / 100.0).max(1.0)
    }

    /// Adds what the rates earned since the last refill.
    pub fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if let Some(bw) = self.max_bw {
            self.bytes = (self.bytes + bw as f64 * dt).min(Self::byte_cap(bw));
        }
        if let Some(rate) = self.max_msg_rate {
            self.msgs = (self.msgs + rate as f64 * dt).min(Self::msg_cap(rate));
        }
    }

    /// How long until the VM may move again, or `None` if it may now.
    pub fn wait(&self) -> Option<Duration> {
        let mut wait: Option<f64> = None;
        if let Some(bw) = self.max_bw.filter(|_| self.bytes <= 0.0) {
            wait = Some((-self.bytes + 1.0) / bw as f64);
        }
        if let Some(rate) = self.max_msg_rate.filter(|_| self.msgs < 1.0) {
            let w = (1.0 - self.msgs) / rate as f64;
            wait = Some(wait.map_or(w, |x| x.max(w)));
        }
        wait.map(Duration::from_secs_f64)
    }

    /// The most payload bytes the VM may move in its next step.
    pub fn byte_budget(&self) -> u32 {
        match self.max_bw {
            Some(_) => self.bytes.clamp(1.0, f64::from(CHUNK)) as u32,
            None => CHUNK,
        }
    }

    /// Takes what one step moved.
    pub fn charge(&mut self, bytes: u64, msgs: u64) {
        self.bytes -= bytes as f64;
        self.msgs -= msgs as f64;
    }

    /// Payload bytes the VM may still move before it must wait (negative: owed).
    pub fn bytes_left(&self) -> f64 {
        self.bytes
    }

    /// Work requests the VM may still carry out before it must wait (negative: owed).
    pub fn msgs_left(&self) -> f64 {
        self.msgs
    }
}
