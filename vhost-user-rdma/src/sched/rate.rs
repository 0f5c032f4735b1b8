//! A VM's bandwidth and message-rate limits (`max-bw=`, `max-msg-rate=`), as token buckets.

use std::time::{Duration, Instant};

use crate::model::memory::CHUNK;

/// A VM's token buckets. Each holds at most 10 ms of its rate (but never less than one chunk
/// or one message), so a limited VM cannot save up a burst that would hold back the others.
///
/// That bound is for a VM that had nothing to do. A VM the limit held back, with work
/// waiting, earns its rate for however long the scheduler took to come back to it (up to a
/// second): on a busy host an idle scheduler wakes late, and a VM waiting for its tokens must
/// not lose what its cap grants because of that.
#[derive(Debug, Clone, Copy)]
pub struct Buckets {
    max_bw: Option<u64>,
    max_msg_rate: Option<u64>,
    bytes: f64,
    msgs: f64,
    last: Instant,
    held: bool,
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
            held: false,
        }
    }

    /// Applies new caps (an operator changed them), keeping what the buckets hold up to
    /// what the new caps allow: a lower cap holds at once, a higher one does not hand out a
    /// burst.
    pub fn set_caps(&mut self, max_bw: Option<u64>, max_msg_rate: Option<u64>) {
        self.max_bw = max_bw;
        self.max_msg_rate = max_msg_rate;
        self.bytes = match max_bw {
            Some(bw) => self.bytes.min(Self::byte_cap(bw, false)),
            None => 0.0,
        };
        self.msgs = match max_msg_rate {
            Some(rate) => self.msgs.min(Self::msg_cap(rate, false)),
            None => 0.0,
        };
    }

    /// Whether any limit applies.
    pub fn limited(&self) -> bool {
        self.max_bw.is_some() || self.max_msg_rate.is_some()
    }

    fn byte_cap(bw: u64, held: bool) -> f64 {
        let window = if held { 1.0 } else { 100.0 };
        (bw as f64 / window).max(f64::from(CHUNK))
    }

    fn msg_cap(rate: u64, held: bool) -> f64 {
        let window = if held { 1.0 } else { 100.0 };
        (rate as f64 / window).max(1.0)
    }

    /// Adds what the rates earned since the last refill.
    pub fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let held = std::mem::take(&mut self.held);
        if let Some(bw) = self.max_bw {
            self.bytes = (self.bytes + bw as f64 * dt).min(Self::byte_cap(bw, held));
        }
        if let Some(rate) = self.max_msg_rate {
            self.msgs = (self.msgs + rate as f64 * dt).min(Self::msg_cap(rate, held));
        }
    }

    /// The limit held the VM back with work waiting: the next refill credits all the time
    /// until then.
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// The VM has nothing to do: from now on it earns at most the small burst again.
    pub fn unhold(&mut self) {
        self.held = false;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM the limit held back earns its rate for all the time the scheduler took to come
    /// back (here 50 ms late), while one that was idle earns at most 10 ms of it.
    #[test]
    fn a_held_vm_keeps_what_a_late_scheduler_owes_it_and_an_idle_one_does_not() {
        let t0 = Instant::now();
        // Both start at t0, not whenever `new` reads the clock (on a loaded host, later).
        let mut held = Buckets {
            last: t0,
            ..Buckets::new(Some(100 << 20), Some(10_000))
        };
        let mut idle = held;
        held.charge(1 << 20, 100);
        idle.charge(1 << 20, 100);
        held.hold();
        let late = t0 + Duration::from_millis(60);
        held.refill(late);
        idle.refill(late);
        // 60 ms of 100 MiB/s is 6 MiB, less the 1 MiB owed: 5 MiB, and 600 messages less 100;
        // the idle one stops at 10 ms' worth: 1 MiB and 100 messages.
        let mib = f64::from(1u32 << 20);
        assert!(
            (held.bytes_left() - 5.0 * mib).abs() < 1e3,
            "{}",
            held.bytes_left()
        );
        assert!(
            (held.msgs_left() - 500.0).abs() < 0.1,
            "{}",
            held.msgs_left()
        );
        assert_eq!((idle.bytes_left(), idle.msgs_left()), (mib, 100.0));
        // Once refilled the hold is spent: the next late refill is bounded again.
        held.refill(late + Duration::from_millis(500));
        assert_eq!((held.bytes_left(), held.msgs_left()), (mib, 100.0));
    }

    /// Caps an operator changes at run time: a lower one holds at once (the tokens saved
    /// under the old one are cut to the new burst), a lifted one stops limiting.
    #[test]
    fn changed_caps_apply_at_once() {
        let t0 = Instant::now();
        let mut b = Buckets {
            last: t0,
            ..Buckets::new(Some(1 << 30), None)
        };
        b.refill(t0 + Duration::from_millis(50));
        let burst_before = b.bytes_left();
        b.set_caps(Some(10 << 20), Some(1000));
        assert!(b.limited());
        assert!(b.bytes_left() < burst_before);
        // 10 ms of the new cap.
        assert_eq!(b.bytes_left(), f64::from(10u32 << 20) / 100.0);
        b.charge(b.bytes_left() as u64 + 1, 20);
        assert!(b.wait().is_some(), "over the new cap: it must wait");
        b.set_caps(None, None);
        assert!(!b.limited());
        assert_eq!(b.wait(), None);
        assert_eq!(b.byte_budget(), CHUNK);
    }
}
