//! The scheduler shares the fabric by weight: two VMs saturating it at weights 3:1 get
//! throughput near 3:1, and at equal weights near 1:1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vrdma::{QpCap, SendFlags, SendWr, Sge};
use vrdma_tests::{TestDaemon, empty_wc, rc_pair};

const MSG: u32 = 1 << 20;
const DEPTH: u32 = 32;
const BATCH: usize = 8;

/// Keeps `DEPTH` 1 MiB writes outstanding from `from` to the sink until `stop`, posting in
/// batches of `BATCH` with one doorbell each, as a saturating application does; the guest's
/// own CPU then cannot be what limits its share on this two-core machine.
fn saturate(
    d: &TestDaemon,
    from: &str,
    sink: &vrdma::Context,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let (cf, ct) = (d.open(from), sink.clone());
    std::thread::spawn(move || {
        let cap = QpCap {
            max_send_wr: DEPTH,
            ..QpCap::default()
        };
        let (a, b) = rc_pair(&cf, &ct, MSG as usize, cap);
        let src = [Sge::new(a.buf.addr(), MSG, a.mr.lkey())];
        let batch: Vec<SendWr<'_>> = (0..BATCH as u64)
            .map(|id| {
                SendWr::rdma_write(id, &src, b.buf.addr(), b.mr.rkey())
                    .with_flags(SendFlags::SIGNALED)
            })
            .collect();
        for _ in 0..DEPTH as usize / BATCH {
            a.send(&batch).expect("post writes");
        }
        let (mut done, mut owed) = (0u64, 0usize);
        let mut wc = [empty_wc(); 32];
        while !stop.load(Ordering::Relaxed) {
            let n = a.cq.poll(&mut wc).expect("poll");
            for w in &wc[..n] {
                assert_eq!(w.status, vrdma::WcStatus::Success);
            }
            done += n as u64;
            owed += n;
            while owed >= BATCH {
                a.send(&batch).expect("post writes");
                owed -= BATCH;
            }
            if n == 0 {
                // Leave the CPU to the daemon: this machine has two cores.
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        done
    })
}

/// Bytes each of "x" and "y" moved in a steady window while both saturate the fabric.
fn share(weights: (u32, u32)) -> (u64, u64) {
    let d = TestDaemon::start(&[
        ("x", &format!("weight={}", weights.0)),
        ("y", &format!("weight={}", weights.1)),
        ("sink", ""),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let sink = d.open("sink");
    let tx = saturate(&d, "x", &sink, stop.clone());
    let ty = saturate(&d, "y", &sink, stop.clone());
    let counter = |name: &str| {
        d.port(name)
            .map(|p| p.counters.bytes.load(Ordering::Relaxed))
            .unwrap_or(0)
    };
    // Both must be moving before the window opens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter("x") == 0 || counter("y") == 0 {
        assert!(Instant::now() < deadline, "traffic never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let (x0, y0) = (counter("x"), counter("y"));
    std::thread::sleep(Duration::from_millis(1500));
    let (x1, y1) = (counter("x"), counter("y"));
    stop.store(true, Ordering::Relaxed);
    tx.join().expect("x thread");
    ty.join().expect("y thread");
    (x1 - x0, y1 - y0)
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
