//! How a thread that waits for a completion by polling shares its core.
//!
//! A poller that never yields is right on a core of its own and wrong when what it waits
//! for needs that core: the other end of a ping-pong on the same CPU, or a daemon sharing
//! it. Then each completion waits for the scheduler to end the spinner's time slice,
//! milliseconds (with both ends on one CPU, perftest's send_lat took 0.3-0.5 ms per message
//! and its write_lat 4 ms, against 4-5 µs with this pacing). So a poller that has found
//! nothing [`SPIN_POLLS`] times in a row (about 1 µs) yields, and then every
//! [`YIELD_EVERY`]th empty poll. On a core of its own a yield is one system call, about
//! 0.5 µs on this project's virtual machine against 20 ns for an empty poll, and a
//! completion that lands during one is seen that much later: yielding on every empty poll
//! cost a lone poller (perftest's read_lat) 0.4 µs a message, every 16th nothing
//! measurable there.
//!
//! The libibverbs shim paces `ibv_poll_cq` and vrdma-perf its waiting loops with this one
//! rule, so that the bench's comparison of the two measures the shim, not two pacings.

/// Empty polls in a row before a poller starts yielding its CPU.
pub const SPIN_POLLS: u32 = 64;
/// Past [`SPIN_POLLS`], every this many empty polls yield once.
pub const YIELD_EVERY: u32 = 16;

/// Whether a poller whose poll found nothing, after `empty_before` empty polls in a row,
/// should now yield its CPU.
pub fn yields_after(empty_before: u32) -> bool {
    empty_before >= SPIN_POLLS && (empty_before - SPIN_POLLS) % YIELD_EVERY == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poller_spins_then_yields_every_so_often() {
        let yields: Vec<u32> = (0..SPIN_POLLS + 2 * YIELD_EVERY + 1)
            .filter(|&n| yields_after(n))
            .collect();
        assert_eq!(
            yields,
            [
                SPIN_POLLS,
                SPIN_POLLS + YIELD_EVERY,
                SPIN_POLLS + 2 * YIELD_EVERY
            ],
            "no yield while spinning, then one every YIELD_EVERY empty polls"
        );
        assert!(!yields_after(u32::MAX), "the largest count is no yield");
    }
}
