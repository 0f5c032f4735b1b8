//! perftest's statistics: latency percentiles from the sorted samples, bandwidth average and
//! peak. All buffers are sized before a run, so recording allocates nothing.

/// perftest drops this many of the largest latency samples (`LAT_MEASURE_TAIL`).
const LAT_MEASURE_TAIL: usize = 2;
const MIB: f64 = (1u64 << 20) as f64;

/// Latency statistics of one size, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatStats {
    /// Iterations measured.
    pub iterations: u64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample perftest keeps (it drops the two largest).
    pub max: f64,
    /// The median (perftest's "typical").
    pub typical: f64,
    /// Mean.
    pub avg: f64,
    /// Standard deviation.
    pub stdev: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

/// Latency samples of a run, in nanoseconds: exact when the number of iterations is known,
/// a log-linear histogram (0.2% resolution) in duration mode, where it is not.
#[derive(Debug)]
pub enum LatRecorder {
    /// Every sample (capacity reserved up front).
    Exact(Vec<u64>),
    /// Counts per bucket.
    Histogram(Histogram),
}

impl LatRecorder {
    /// Room for `iters` samples, or a histogram if `None`.
    pub fn new(iters: Option<u64>) -> LatRecorder {
        match iters {
            Some(n) => LatRecorder::Exact(Vec::with_capacity(usize::try_from(n).unwrap_or(0))),
            None => LatRecorder::Histogram(Histogram::new()),
        }
    }

    /// Records one sample.
    pub fn record(&mut self, ns: u64) {
        match self {
            // Within the reserved capacity: never reallocates.
            LatRecorder::Exact(v) => {
                if v.len() < v.capacity() {
                    v.push(ns);
                }
            }
            LatRecorder::Histogram(h) => h.record(ns),
        }
    }

    /// Samples so far.
    pub fn len(&self) -> u64 {
        match self {
            LatRecorder::Exact(v) => v.len() as u64,
            LatRecorder::Histogram(h) => h.count,
        }
    }

    /// No samples yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The statistics, each sample divided by `divisor` (2 for ping-pong round trips).
    pub fn stats(&mut self, divisor: f64) -> LatStats {
        match self {
            LatRecorder::Exact(v) => exact_stats(v, divisor),
            LatRecorder::Histogram(h) => h.stats(divisor),
        }
    }
}

/// As perftest's `print_report_lat`: sort, drop the two largest, median of the rest, the
/// percentiles at `ceil(n * p)` of what is left.
fn exact_stats(v: &mut [u64], divisor: f64) -> LatStats {
    v.sort_unstable();
    let n = v.len();
    let us = |ns: u64| ns as f64 / 1e3 / divisor;
    if n == 0 {
        return LatStats {
            iterations: 0,
            min: 0.0,
            max: 0.0,
            typical: 0.0,
            avg: 0.0,
            stdev: 0.0,
            p99: 0.0,
            p999: 0.0,
        };
    }
    let m = if n > LAT_MEASURE_TAIL {
        n - LAT_MEASURE_TAIL
    } else {
        n
    };
    let kept = &v[..m];
    let typical = if m % 2 == 0 {
        (us(kept[m / 2]) + us(kept[m / 2 - 1])) / 2.0
    } else {
        us(kept[m / 2])
    };
    let avg = kept.iter().map(|&x| us(x)).sum::<f64>() / m as f64;
    let var = kept.iter().map(|&x| (us(x) - avg).powi(2)).sum::<f64>() / m as f64;
    let at = |p: f64| us(v[((m as f64 * p).ceil() as usize).min(n - 1)]);
    LatStats {
        iterations: n as u64,
        min: us(v[0]),
        max: us(v[m.min(n - 1)]),
        typical,
        avg,
        stdev: var.sqrt(),
        p99: at(0.99),
        p999: at(0.999),
    }
}

/// Sub-buckets per power of two: 512 gives 0.2% resolution.
const SUB_BITS: u32 = 9;
const SUB: u64 = 1 << SUB_BITS;

/// Log-linear latency histogram: exact below 512 ns, then 512 buckets per power of two.
#[derive(Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    sum_sq: f64,
    min: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; ((64 - SUB_BITS as usize) + 1) * SUB as usize],
            count: 0,
            sum: 0.0,
            sum_sq: 0.0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros(); // >= SUB_BITS
        let shift = exp - SUB_BITS;
        let mantissa = (ns >> shift) - SUB; // 0..SUB
        ((shift as u64 + 1) * SUB + mantissa) as usize
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> f64 {
        let i = i as u64;
        if i < SUB {
            return i as f64;
        }
        let shift = i / SUB - 1;
        let low = (SUB + i % SUB) << shift;
        low as f64 + ((1u64 << shift) as f64 - 1.0) / 2.0
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.count += 1;
        let x = ns as f64;
        self.sum += x;
        self.sum_sq += x * x;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    fn percentile(&self, p: f64) -> f64 {
        let rank = ((self.count as f64 * p).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).clamp(self.min as f64, self.max as f64);
            }
        }
        self.max as f64
    }

    fn stats(&self, divisor: f64) -> LatStats {
        let us = |ns: f64| ns / 1e3 / divisor;
        if self.count == 0 {
            return exact_stats(&mut [], divisor);
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        LatStats {
            iterations: self.count,
            min: us(self.min as f64),
            max: us(self.max as f64),
            typical: us(self.percentile(0.5)),
            avg: us(mean),
            stdev: us(var.sqrt()),
            p99: us(self.percentile(0.99)),
            p999: us(self.percentile(0.999)),
        }
    }
}

/// Bandwidth of one size.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BwStats {
    /// Iterations (per QP, as perftest prints them; in duration mode, all completed).
    pub iterations: u64,
    /// Peak, MiB/s.
    pub peak_mib: f64,
    /// Average, MiB/s.
    pub avg_mib: f64,
    /// Millions of messages per second.
    pub msg_rate_mpps: f64,
}

impl BwStats {
    /// Adds the other direction of a bidirectional test, as perftest sums both sides.
    pub fn plus(self, other: BwStats) -> BwStats {
        BwStats {
            iterations: self.iterations,
            peak_mib: self.peak_mib + other.peak_mib,
            avg_mib: self.avg_mib + other.avg_mib,
            msg_rate_mpps: self.msg_rate_mpps + other.msg_rate_mpps,
        }
    }
}

/// When requests were posted and when completions were polled during a bw run, in
/// nanoseconds since the run started. Sized before the run; recording never reallocates (in
/// duration mode nothing is kept and the peak is the average).
#[derive(Debug)]
pub struct BwRecorder {
    /// `(index of the first message of the post list, time)`.
    posts: Vec<(u64, u64)>,
    /// `(messages completed so far, time)`.
    completions: Vec<(u64, u64)>,
    first_post: Option<u64>,
    last_completion: u64,
    completed: u64,
}

impl BwRecorder {
    /// Room for `posts` post calls and `completions` signalled completions.
    pub fn new(posts: usize, completions: usize) -> BwRecorder {
        BwRecorder {
            posts: Vec::with_capacity(posts),
            completions: Vec::with_capacity(completions),
            first_post: None,
            last_completion: 0,
            completed: 0,
        }
    }

    /// A post list starting at message `index` went out at `ns`.
    pub fn post(&mut self, index: u64, ns: u64) {
        self.first_post.get_or_insert(ns);
        if self.posts.len() < self.posts.capacity() {
            self.posts.push((index, ns));
        }
    }

    /// `completed` messages in all had completed when a completion was polled at `ns`.
    pub fn complete(&mut self, completed: u64, ns: u64) {
        self.last_completion = ns;
        self.completed = completed;
        if self.completions.len() < self.completions.capacity() {
            self.completions.push((completed, ns));
        }
    }

    /// Nanoseconds from the first post to the last completion.
    pub fn elapsed_ns(&self) -> u64 {
        self.last_completion
            .saturating_sub(self.first_post.unwrap_or(0))
    }

    /// The statistics for `bytes`-byte messages; `iterations` is what the table shows.
    pub fn stats(&self, bytes: usize, iterations: u64) -> BwStats {
        let secs = (self.elapsed_ns() as f64 / 1e9).max(1e-9);
        let avg_mib = self.completed as f64 * bytes as f64 / secs / MIB;
        let peak_mib = self.peak(bytes).map_or(avg_mib, |p| p.max(avg_mib));
        BwStats {
            iterations,
            peak_mib,
            avg_mib,
            msg_rate_mpps: self.completed as f64 / secs / 1e6,
        }
    }

    /// perftest's peak: the least time per message over any stretch from a post to a later
    /// completion. perftest tries every pair; past a few million pairs this tries every
    /// completion against a sample of the posts, evenly spaced.
    fn peak(&self, bytes: usize) -> Option<f64> {
        const MAX_PAIRS: usize = 20_000_000;
        let (p, c) = (&self.posts, &self.completions);
        if p.is_empty() || c.is_empty() {
            return None;
        }
        let stride = (p.len() * c.len()).div_ceil(MAX_PAIRS).max(1);
        let mut best: Option<f64> = None;
        for &(index, t0) in p.iter().step_by(stride) {
            let from = c.partition_point(|&(done, _)| done <= index);
            for &(done, t1) in &c[from..] {
                let per_msg = t1.saturating_sub(t0) as f64 / (done - index) as f64;
                if per_msg > 0.0 && best.is_none_or(|b| per_msg < b) {
                    best = Some(per_msg);
                }
            }
        }
        best.map(|ns| bytes as f64 / (ns / 1e9) / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_drops_the_tail_as_perftest_and_orders_the_statistics() {
        let mut r = LatRecorder::new(Some(1000));
        for us in 1..=1000u64 {
            r.record(us * 2000); // round trips of 2..2000 us
        }
        let s = r.stats(2.0);
        assert_eq!(s.iterations, 1000);
        assert_eq!(s.min, 1.0);
        // The two largest (999, 1000) are dropped; max is the next one, as perftest prints.
        assert_eq!(s.max, 999.0);
        assert_eq!(s.typical, 499.5);
        assert_eq!(s.p99, 990.0);
        assert_eq!(s.p999, 999.0);
        assert!((s.avg - 499.5).abs() < 1e-9);
    }

    #[test]
    fn the_histogram_is_within_its_resolution_of_the_exact_statistics() {
        let (mut exact, mut hist) = (LatRecorder::new(Some(5000)), LatRecorder::new(None));
        for i in 0..5000u64 {
            let ns = 3000 + (i * 7919) % 40_000;
            exact.record(ns);
            hist.record(ns);
        }
        let (e, h) = (exact.stats(1.0), hist.stats(1.0));
        for (a, b) in [
            (e.typical, h.typical),
            (e.p99, h.p99),
            (e.avg, h.avg),
            (e.min, h.min),
        ] {
            assert!((a - b).abs() / a < 0.005, "exact {a} vs histogram {b}");
        }
        assert!(h.min <= h.typical && h.typical <= h.p99 && h.p99 <= h.p999 && h.p999 <= h.max);
    }

    #[test]
    fn bandwidth_is_in_binary_megabytes_and_the_peak_is_the_best_stretch() {
        let mut r = BwRecorder::new(16, 16);
        // 4 messages of 1 MiB posted at 0; two complete at 10 ms, two more at 40 ms.
        r.post(0, 0);
        r.complete(2, 10_000_000);
        r.complete(4, 40_000_000);
        let s = r.stats(1 << 20, 4);
        assert!((s.avg_mib - 100.0).abs() < 1e-6, "{s:?}");
        assert!((s.peak_mib - 200.0).abs() < 1e-6, "{s:?}");
        assert!((s.msg_rate_mpps - 0.0001).abs() < 1e-12, "{s:?}");
    }
}
