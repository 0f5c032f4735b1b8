//! Per-VM bandwidth and message-rate limits: a capped VM moves at its cap while an uncapped
//! neighbour takes the rest of the fabric.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vrdma_tests::{Load, TestDaemon, measure, saturate};

const WINDOW: Duration = Duration::from_millis(1000);

#[test]
fn bandwidth_and_message_rate_caps_hold_next_to_an_uncapped_vm() {
    // 200 MiB/s of payload for "capped", 3000 work requests per second for "counted".
    let d = TestDaemon::start(&[
        ("capped", "max-bw=200M"),
        ("counted", "max-msg-rate=3000"),
        ("free", ""),
        ("sink", ""),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let sink = d.open("sink");
    let big = Load {
        msg: 1 << 20,
        depth: 32,
        batch: 8,
    };
    let small = Load {
        msg: 64,
        depth: 256,
        batch: 32,
    };
    let threads = [
        saturate(&d, "capped", &sink, big, stop.clone()),
        saturate(&d, "counted", &sink, small, stop.clone()),
        saturate(&d, "free", &sink, big, stop.clone()),
    ];
    let moved = measure(&d, &["capped", "counted", "free"], WINDOW);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    let secs = WINDOW.as_secs_f64();
    let capped_bw = moved[0].0 as f64 / secs;
    let counted_rate = moved[1].1 as f64 / secs;
    let free_bw = moved[2].0 as f64 / secs;
    eprintln!(
        "capped {:.0} MiB/s (cap 200), counted {counted_rate:.0} WR/s (cap 3000), free {:.0} MiB/s",
        capped_bw / (1 << 20) as f64,
        free_bw / (1 << 20) as f64
    );
    let cap = 200.0 * (1 << 20) as f64;
    assert!(
        (0.85 * cap..=1.1 * cap).contains(&capped_bw),
        "capped VM moved {capped_bw:.0} B/s"
    );
    assert!(
        (0.85 * 3000.0..=1.1 * 3000.0).contains(&counted_rate),
        "counted VM did {counted_rate:.0} WR/s"
    );
    assert!(
        free_bw > 2.0 * cap,
        "the uncapped VM should take the rest of the fabric, got {free_bw:.0} B/s"
    );
}
