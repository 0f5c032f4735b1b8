//! The device's virtqueues and what each is for.
//!
//! Work requests do not travel in virtqueues: they sit in rings in guest memory (see
//! [`crate::ring`]) that the driver hands over when it creates a QP or CQ. Virtqueues carry
//! only control commands, events and doorbells, so the number of virtqueues does not grow with
//! the number of QPs (QEMU allows at most 1024 virtqueues per device).

/// Index of the control queue: commands from the driver, answered in the same chain.
pub const CONTROL: u16 = 0;
/// Index of the event queue: the driver posts writable buffers, the device fills them with
/// [`crate::event::Event`]s.
pub const EVENT: u16 = 1;
/// Index of the first doorbell queue; doorbell queue `i` is virtqueue `FIRST_DOORBELL + i`.
pub const FIRST_DOORBELL: u16 = 2;
/// Most doorbell queues a device may offer.
pub const MAX_DOORBELL_QUEUES: u16 = 64;
/// Most descriptors in any of the device's virtqueues.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// What a virtqueue is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Control commands.
    Control,
    /// Asynchronous events and CQ notifications.
    Event,
    /// Doorbells; the payload is the doorbell queue's number (0-based).
    Doorbell(u16),
}

/// The role of virtqueue `index` on a device with `num_doorbell_queues` doorbell queues, or
/// `None` if the device has no such queue.
pub fn role(index: u16, num_doorbell_queues: u16) -> Option<Role> {
    match index {
        CONTROL => Some(Role::Control),
        EVENT => Some(Role::Event),
        i => match i.checked_sub(FIRST_DOORBELL) {
            Some(n) if n < num_doorbell_queues => Some(Role::Doorbell(n)),
            _ => None,
        },
    }
}

/// Total virtqueues of a device with `num_doorbell_queues` doorbell queues.
pub const fn count(num_doorbell_queues: u16) -> u16 {
    FIRST_DOORBELL + num_doorbell_queues
}
