//! `MADV_DONTFORK` over registered memory, as `ibv_fork_init` asks for.
//!
//! With libibverbs, a forked child gets copy-on-write copies of registered memory, and the
//! parent's pinned pages could be copied away from the device on the parent's next write;
//! `ibv_fork_init` answers that by marking registered pages `MADV_DONTFORK`, so they are
//! simply absent from the child. This module does the same: it counts how many pins cover
//! each page, marks pages `MADV_DONTFORK` while fork safety is on, and `MADV_DOFORK` again
//! when their last pin goes. (Without fork safety a child gets private copies of moved
//! memory from the `fork` handlers in `children.rs`.)

use std::collections::BTreeMap;
use std::io;

/// How many pins cover each stretch of pages: disjoint stretches, `start -> (end, count)`,
/// with no stretch of count 0.
#[derive(Debug, Default)]
pub(crate) struct RangeCounts {
    stretches: BTreeMap<u64, (u64, u32)>,
}

impl RangeCounts {
    /// Splits the stretch holding `at`, if any, so that a stretch starts at `at`.
    fn split_at(&mut self, at: u64) {
        let Some((&start, &(end, count))) = self.stretches.range(..at).next_back() else {
            return;
        };
        if end > at {
            self.stretches.insert(start, (at, count));
            self.stretches.insert(at, (end, count));
        }
    }

    /// Counts one more pin over `start..end`.
    pub fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.split_at(start);
        self.split_at(end);
        let mut at = start;
        let inside: Vec<(u64, u64)> = self
            .stretches
            .range(start..end)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
        for (s, e) in inside {
            if at < s {
                self.stretches.insert(at, (s, 1));
            }
            if let Some((_, count)) = self.stretches.get_mut(&s) {
                *count = count.saturating_add(1);
            }
            at = e;
        }
        if at < end {
            self.stretches.insert(at, (end, 1));
        }
    }

    /// Counts one pin fewer over `start..end`; returns the stretches no pin covers any more.
    pub fn remove(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if start >= end {
            return Vec::new();
        }
        self.split_at(start);
        self.split_at(end);
        let inside: Vec<u64> = self.stretches.range(start..end).map(|(&s, _)| s).collect();
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for s in inside {
            let Some(&(e, count)) = self.stretches.get(&s) else {
                continue;
            };
            if count > 1 {
                self.stretches.insert(s, (e, count - 1));
                continue;
            }
            self.stretches.remove(&s);
            match freed.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => freed.push((s, e)),
            }
        }
        freed
    }

    /// Every stretch some pin covers, adjacent stretches merged.
    pub fn covered(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&s, &(e, _)) in &self.stretches {
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// The pin count of the page at `addr` (for tests).
    #[cfg(test)]
    pub fn count_at(&self, addr: u64) -> u32 {
        self.stretches
            .range(..=addr)
            .next_back()
            .filter(|(_, (end, _))| *end > addr)
            .map_or(0, |(_, (_, count))| *count)
    }
}

/// Whether the environment asks for fork safety from the start, as libibverbs reads it:
/// `RDMAV_FORK_SAFE` or `IBV_FORK_SAFE` set to anything.
pub(crate) fn requested_by_environment() -> bool {
    std::env::var_os("RDMAV_FORK_SAFE").is_some() || std::env::var_os("IBV_FORK_SAFE").is_some()
}

/// `madvise(start..end, advice)`.
pub(crate) fn advise(start: u64, end: u64, advice: i32) -> io::Result<()> {
    // SAFETY: MADV_DONTFORK and MADV_DOFORK only change whether a fork copies these pages
    // into the child; they change nothing this process sees, so any range is sound (an
    // unmapped one fails with ENOMEM).
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, (end - start) as usize, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_stretches_free_when_their_last_pin_goes() {
        let mut counts = RangeCounts::default();
        counts.add(0x1000, 0x4000);
        counts.add(0x3000, 0x6000);
        counts.add(0x3000, 0x4000);
        assert_eq!(counts.count_at(0x1000), 1);
        assert_eq!(counts.count_at(0x3000), 3);
        assert_eq!(counts.count_at(0x4000), 1);
        assert_eq!(counts.count_at(0x6000), 0);
        assert_eq!(counts.covered(), vec![(0x1000, 0x6000)]);

        assert_eq!(counts.remove(0x3000, 0x4000), vec![]);
        // The first pin goes: only the pages the second does not cover are free.
        assert_eq!(counts.remove(0x1000, 0x4000), vec![(0x1000, 0x3000)]);
        assert_eq!(counts.covered(), vec![(0x3000, 0x6000)]);
        assert_eq!(counts.remove(0x3000, 0x6000), vec![(0x3000, 0x6000)]);
        assert!(counts.covered().is_empty());
        // Removing what is not there frees nothing and does not underflow.
        assert_eq!(counts.remove(0x1000, 0x2000), vec![]);
    }

    #[test]
    fn disjoint_pins_stay_apart() {
        let mut counts = RangeCounts::default();
        counts.add(0x1000, 0x2000);
        counts.add(0x5000, 0x7000);
        assert_eq!(counts.covered(), vec![(0x1000, 0x2000), (0x5000, 0x7000)]);
        counts.add(0x0, 0x8000);
        assert_eq!(counts.count_at(0x3000), 1);
        assert_eq!(counts.count_at(0x5000), 2);
        assert_eq!(
            counts.remove(0x0, 0x8000),
            vec![(0x0, 0x1000), (0x2000, 0x5000), (0x7000, 0x8000)]
        );
    }
}
