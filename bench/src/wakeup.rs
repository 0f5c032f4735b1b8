//! Section `wakeup`: what one message costs in event mode against what a thread wake-up costs.
//!
//! In event mode the receiving guest's thread sleeps until its message arrives, so one wake-up
//! per message is the floor, and qperf's `tcp_lat` pays the same wake-up plus the TCP stack.
//! This section measures the floor itself (a byte back and forth through pipes with `cat` on
//! the daemon's CPUs, each side sleeping in `read`), then an 8-byte ping-pong between two VMs in
//! event mode, back to back (the daemon's scheduler stays awake and polls) and 1 ms apart (the
//! scheduler sleeps between messages and each guest kicks: a message then wakes the scheduler
//! and the receiving guest, two threads). The same ping-pong with both sides polling gives what
//! a message costs without any wake-up, so that event mode's cost above it can be set against
//! the wake-up measured here.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::guest::{self, Receives::OnOwnCq, Side};
use crate::procs::{self, Role, VmSpec};
use crate::report::Results;
use crate::sections::{Env, Error};

/// The section's results.
pub const SECTION: &str = "wakeup";
/// Series: one thread wake-up, one way.
pub const FLOOR: &str = "thread wake-up (pipe ping-pong with the daemon's CPUs)";
/// Series: vrdma event mode, messages back to back.
pub const BACK_TO_BACK: &str = "vrdma event, back to back";
/// Series: vrdma event mode, messages 1 ms apart.
pub const APART: &str = "vrdma event, 1 ms apart";
/// Series: the same ping-pong with both sides polling: what a message costs without wake-ups.
pub const POLLING: &str = "vrdma polling, back to back";

/// Runs the section.
pub fn wakeup(env: &mut Env, r: &mut Results) -> Result<(), Error> {
    let rounds: usize = if env.quick { 2_000 } else { 20_000 };
    // A wake-up's cost changes with what ran just before (docs/performance.md): the best of
    // three, as for tcp_lat.
    let mut floor = f64::INFINITY;
    for _ in 0..3 {
        procs::check_interrupt()?;
        floor = floor.min(pipe_ping_pong(rounds)?);
    }
    eprintln!("  one thread wake-up: {floor:.2} us one way");
    r.add(SECTION, FLOOR, Some(8), "latency", floor, "us");

    let vms = [VmSpec::new("a"), VmSpec::new("b")];
    let daemon = env.daemon(SECTION, &vms)?;
    let side =
        |vm| Side::with_receives(&guest::open(&daemon.socket(vm))?, 1, 16, 64, 4096, OnOwnCq);
    let (a, b) = (side("a")?, side("b")?);
    guest::connect(&a, &b)?;
    let apart_rounds = if env.quick { 200 } else { 2_000 };
    for (series, rounds, gap) in [
        (POLLING, rounds, None),
        (BACK_TO_BACK, rounds, Some(Duration::ZERO)),
        (APART, apart_rounds, Some(Duration::from_millis(1))),
    ] {
        procs::check_interrupt()?;
        let mut one_way = match gap {
            None => guest::polling_ping_pong(&a, &b, rounds)?,
            Some(gap) => guest::event_ping_pong(&a, &b, rounds, gap)?,
        };
        one_way.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let median = us(one_way[one_way.len() / 2]);
        let p99 = us(one_way[one_way.len() * 99 / 100]);
        eprintln!("  {series}: {median:.2} us one way (median), p99 {p99:.2} us");
        r.add(SECTION, series, Some(8), "t_typical", median, "us");
        r.add(SECTION, series, Some(8), "p99", p99, "us");
    }
    Ok(())
}

/// One way of a ping-pong with `cat`, run where the daemon runs, in microseconds: this side
/// writes a byte into its pipe and sleeps reading the byte `cat` writes back, and `cat` sleeps
/// reading the next. A message between a guest and the daemon crosses the same CPUs, so this
/// is what one wake-up costs each way there, with no RDMA and no TCP.
fn pipe_ping_pong(rounds: usize) -> Result<f64, Error> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| Error::Io { what, source }
    };
    let mut cat = procs::command("cat", Role::Daemon, None)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io("starting cat"))?;
    let (Some(mut to_cat), Some(mut from_cat)) = (cat.stdin.take(), cat.stdout.take()) else {
        let _ = cat.kill();
        return Err(Error::Failed("cat has no pipes".into()));
    };
    let mut byte = [0u8; 1];
    let mut exchange = || -> std::io::Result<()> {
        to_cat.write_all(&byte)?;
        from_cat.read_exact(&mut byte)
    };
    // The first exchanges start cat; they are not timed.
    let timed = (0..100).try_for_each(|_| exchange()).and_then(|()| {
        let start = Instant::now();
        (0..rounds).try_for_each(|_| exchange())?;
        Ok(start.elapsed())
    });
    // Whatever happened, cat goes: its stdin closes when `to_cat` drops, or it is killed.
    drop(to_cat);
    if timed.is_err() {
        let _ = cat.kill();
    }
    let _ = cat.wait();
    let elapsed = timed.map_err(io("the pipe ping-pong with cat"))?;
    Ok(elapsed.as_secs_f64() * 1e6 / (2 * rounds) as f64)
}
