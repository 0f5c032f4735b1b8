//! The scheduler shares the fabric by weight: two VMs saturating it at weights 3:1 get
//! throughput near 3:1, and at equal weights near 1:1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vrdma_tests::{SHARE_LOAD, TestDaemon, measure, saturate};

/// Bytes each of "x" and "y" moved in a steady window while both saturate the fabric.
fn share(weights: (u32, u32)) -> (u64, u64) {
    let d = TestDaemon::start(&[
        ("x", &format!("weight={}", weights.0)),
        ("y", &format!("weight={}", weights.1)),
        ("sink", ""),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let sink = d.open("sink");
    let load = SHARE_LOAD;
    let tx = saturate(&d, "x", &sink, load, stop.clone());
    let ty = saturate(&d, "y", &sink, load, stop.clone());
    let moved = measure(&d, &["x", "y"], Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    tx.join().expect("x thread");
    ty.join().expect("y thread");
    (moved[0].0, moved[1].0)
}

/// One test, so the two measurements never run at the same time on this two-core machine.
#[test]
fn weights_share_the_fabric_in_proportion() {
    let (x, y) = share((1, 1));
    let even = x as f64 / y as f64;
    eprintln!("weights 1:1 -> bytes {x} : {y} = {even:.2}");
    let (x, y) = share((3, 1));
    let skewed = x as f64 / y as f64;
    eprintln!("weights 3:1 -> bytes {x} : {y} = {skewed:.2}");
    assert!(
        (0.8..=1.25).contains(&even),
        "equal weights gave {even:.2}, not near 1"
    );
    assert!(
        (2.4..=3.6).contains(&skewed),
        "weights 3:1 gave {skewed:.2}, not near 3"
    );
}
