//! The physical limit of an intra-host transfer: one thread copying with memcpy.
//!
//! Each size gets its own source and destination buffers, touched once before timing, then
//! copied over and over for a fixed time. Small sizes therefore stay in cache, as the buffers
//! of vrdma-perf's loop do: both sides of the comparison are cache-hot until the buffers
//! outgrow the caches.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Bytes per second one thread copies `size`-byte buffers at, over about `time`.
pub fn bandwidth(size: usize, time: Duration) -> f64 {
    let src = vec![0x5au8; size.max(1)];
    let mut dst = vec![0u8; size.max(1)];
    // Warm: fault the pages in and load the caches.
    dst.copy_from_slice(&src);
    // Check the clock only every `batch` copies so it costs little next to small copies.
    let batch = (1 << 20) / size.max(1) + 1;
    let start = Instant::now();
    let mut copies: u64 = 0;
    loop {
        for _ in 0..batch {
            // black_box keeps the compiler from merging or dropping the repeated copies.
            black_box(&mut dst).copy_from_slice(black_box(&src));
        }
        copies += batch as u64;
        let elapsed = start.elapsed();
        if elapsed >= time {
            return copies as f64 * size as f64 / elapsed.as_secs_f64();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_at_a_plausible_rate() {
        let small = bandwidth(4096, Duration::from_millis(20));
        // Any machine this runs on copies a cached page faster than 100 MB/s and slower than
        // 10 TB/s; outside that the loop is broken or optimised away.
        assert!(small > 1e8 && small < 1e13, "{small}");
        let large = bandwidth(1 << 20, Duration::from_millis(20));
        assert!(large > 1e8 && large < 1e13, "{large}");
    }
}
