//! What the scheduler needs of a VM's doorbell queues. The vhost layer implements it over the
//! VM's virtqueues; the scheduler never holds a virtqueue itself.

/// A VM's doorbell queues, as the scheduler polls them.
pub trait Doorbells: Send + Sync {
    /// Takes the doorbells the driver has made available, putting their QPs on the VM's ready
    /// list. Returns whether there were any. An idle take costs each queue's lock and a
    /// translated load or two.
    fn take(&self) -> bool;

    /// Whether the driver may have made doorbells available since the last take looked: a load
    /// per queue, no lock, nothing taken; it stays yes until the next `take`. Asked between
    /// the pieces of a lower class's copy, so it must be far cheaper than [`Doorbells::take`].
    /// It may be wrong for a moment after a queue starts or moves, or the memory table changes
    /// (until the next `take`): a wrong yes costs a step cut short, a wrong no a wait for the
    /// step's end.
    fn arrived(&self) -> bool {
        false
    }

    /// Whether a [`Doorbells::take`] could find anything: [`Doorbells::arrived`], or the
    /// queues are not all watched (so only a take can tell). The scheduler asks it before
    /// taking a polled VM's doorbells on its busy passes and between a lower class's steps,
    /// where a take finds nothing nearly every time.
    fn worth_taking(&self) -> bool {
        true
    }

    /// The same after a kick: the doorbells count as kicked, not polled.
    fn take_kicked(&self) -> bool {
        self.take()
    }

    /// Tells the driver to kick again (`on`) or to stop kicking because the scheduler polls
    /// (`!on`). The state holds for queues that start (or restart) later too. When kicks come
    /// back on, returns whether doorbells arrived while they were off (nobody announced them,
    /// so the caller takes them).
    fn set_kicks(&self, on: bool) -> bool;

    /// Stops (`true`) or resumes waking the scheduler with this VM's kicks: a VM whose kicks
    /// bring no doorbells is muted, and the scheduler looks at its queues on a timer instead
    /// (see `KICK_STORM`). The state holds for queues that start (or restart) later too.
    fn mute_kicks(&self, _muted: bool) {}
}

/// A VM with no doorbell queues: tests that put QPs on the ready list themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDoorbells;

impl Doorbells for NoDoorbells {
    fn take(&self) -> bool {
        false
    }

    fn set_kicks(&self, _on: bool) -> bool {
        false
    }
}
