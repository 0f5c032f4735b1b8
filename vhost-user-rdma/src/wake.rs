//! What the scheduler sleeps on, and what wakes it.
//!
//! A [`Bell`] is an epoll instance holding an eventfd that anyone with work for the scheduler
//! rings (a device, the fabric's receive threads), and the eventfds of the sources the
//! scheduler watches itself: the guests' doorbell kicks. A guest's kick then wakes the
//! scheduler directly, not a thread that would wake it in turn: in event mode, where each
//! message wakes someone, that thread's wake-up was one of three per message.
//!
//! Ringing costs a system call only while the scheduler sleeps, as `Thread::unpark` costs a
//! futex call only for a parked thread: [`Bell::ring`] counts a generation, and the sleeper
//! sleeps only if no ring came since the generation it read before it last looked for work.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

/// The token of the bell's own eventfd in the epoll set.
const RUNG: u64 = u64::MAX;
/// The token of the sleeper's timer.
const TIMER: u64 = u64::MAX - 1;
/// The largest token a watched source may have.
pub const MAX_TOKEN: u64 = TIMER - 1;

/// What the scheduler sleeps on, shared with everyone who wakes it.
#[derive(Debug)]
pub struct Bell {
    epoll: Epoll,
    rung: EventFd,
    /// Rings so far: the sleeper compares it with what it read before looking for work.
    generation: AtomicU64,
    /// The sleeper is in (or about to enter) its wait: a ring must write the eventfd.
    asleep: AtomicBool,
    /// Sources watched now.
    watched: AtomicUsize,
}

impl Bell {
    /// A bell with nothing watched yet.
    pub fn new() -> io::Result<Arc<Bell>> {
        let epoll = Epoll::new()?;
        let rung = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        epoll.ctl(
            ControlOperation::Add,
            rung.as_raw_fd(),
            EpollEvent::new(EventSet::IN, RUNG),
        )?;
        Ok(Arc::new(Bell {
            epoll,
            rung,
            generation: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            watched: AtomicUsize::new(0),
        }))
    }

    /// Wakes the sleeper, or keeps it from sleeping if it has not yet: it looks for work
    /// again. Hot path: without a sleeper, two atomic operations.
    pub fn ring(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) && self.asleep.swap(false, Ordering::SeqCst) {
            // Fails only if the counter would overflow, which needs 2^64 - 1 rings unread.
            let _ = self.rung.write(1);
        }
    }

    /// Rings so far: read before looking for work, and passed to [`Sleeper::sleep`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Watches `fd`, an eventfd that others write: each write ends a [`Sleeper::sleep`] (or
    /// the next) and reports `token` (at most [`MAX_TOKEN`]). Edge-triggered, so the sleeper
    /// never reads `fd` (a guest's kick fd is not the sleeper's to reset) and a write it has
    /// seen does not wake it again. The caller keeps `fd` open until it calls
    /// [`Bell::unwatch`].
    pub fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        if token > MAX_TOKEN {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token),
        )?;
        self.watched.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn unwatch(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
        self.watched.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether any source is watched: if none is, there is nothing to look for.
    pub fn watching(&self) -> bool {
        self.watched.load(Ordering::Relaxed) > 0
    }
}

/// The sleeping side of a [`Bell`]: only the scheduler's thread sleeps.
#[derive(Debug)]
pub struct Sleeper {
    bell: Arc<Bell>,
    timer: TimerFd,
    timer_watched: bool,
    events: Vec<EpollEvent>,
}

impl Sleeper {
    /// The sleeper of `bell`.
    pub fn new(bell: Arc<Bell>) -> io::Result<Sleeper> {
        Ok(Sleeper {
            bell,
            timer: TimerFd::new()?,
            timer_watched: false,
            events: vec![EpollEvent::default(); 64],
        })
    }

    /// The bell this sleeper sleeps on.
    pub fn bell(&self) -> &Arc<Bell> {
        &self.bell
    }

    /// Sleeps until the bell rings, a watched source is readable, or `timeout` passes; not at
    /// all if the bell rang since `generation` was read. Calls `ready` with the token of each
    /// watched source that is readable. Returns whether it slept.
    pub fn sleep(
        &mut self,
        generation: u64,
        timeout: Duration,
        ready: impl FnMut(u64),
    ) -> io::Result<bool> {
        if timeout.is_zero() {
            return Ok(false);
        }
        let bell = &*self.bell;
        // epoll's timeout is in whole milliseconds, rounded up: finer timeouts (a 10 µs RNR
        // timer, a 50 µs retry) go through the timer, armed for this sleep only (if the sleep
        // does not happen, it fires later and ends the next sleep early, once).
        let timeout_ms = if timeout.subsec_nanos() % 1_000_000 == 0 {
            i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX)
        } else {
            if !self.timer_watched {
                bell.epoll.ctl(
                    ControlOperation::Add,
                    self.timer.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TIMER),
                )?;
                self.timer_watched = true;
            }
            self.timer.reset(timeout, None)?;
            -1
        };
        bell.asleep.store(true, Ordering::SeqCst);
        if bell.generation.load(Ordering::SeqCst) != generation {
            bell.asleep.store(false, Ordering::SeqCst);
            return Ok(false);
        }
        let waited = bell.epoll.wait(timeout_ms, &mut self.events);
        bell.asleep.store(false, Ordering::SeqCst);
        self.report(waited, ready)?;
        Ok(true)
    }

    /// Reports, without sleeping, the watched sources written since they were last reported:
    /// the scheduler looks now and then while it is busy, when no sleep would report them.
    pub fn look(&mut self, ready: impl FnMut(u64)) -> io::Result<()> {
        let waited = self.bell.epoll.wait(0, &mut self.events);
        self.report(waited, ready)
    }

    fn report(&mut self, waited: io::Result<usize>, mut ready: impl FnMut(u64)) -> io::Result<()> {
        let bell = &*self.bell;
        let n = match waited {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        for event in &self.events[..n] {
            match event.data() {
                // Reading resets it; a ring that lands after this read wakes the next sleep.
                RUNG => {
                    let _ = bell.rung.read();
                }
                // Armed again (which clears it) before the next sleep that needs it.
                TIMER => {
                    let _ = self.timer.clear();
                }
                token => ready(token),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_ring_before_the_sleep_keeps_it_from_sleeping() {
        let bell = Bell::new().unwrap();
        let mut sleeper = Sleeper::new(bell.clone()).unwrap();
        let seen = bell.generation();
        bell.ring();
        let start = Instant::now();
        let slept = sleeper
            .sleep(seen, Duration::from_secs(10), |_| panic!("nothing watched"))
            .unwrap();
        assert!(!slept);
        assert!(start.elapsed() < Duration::from_secs(5));
        // With the generation read after the ring, it sleeps its timeout.
        let seen = bell.generation();
        let start = Instant::now();
        assert!(
            sleeper
                .sleep(seen, Duration::from_micros(300), |_| {})
                .unwrap()
        );
        assert!(start.elapsed() >= Duration::from_micros(300));
    }

    #[test]
    fn a_ring_from_another_thread_wakes_the_sleeper() {
        let bell = Bell::new().unwrap();
        let mut sleeper = Sleeper::new(bell.clone()).unwrap();
        let seen = bell.generation();
        let ringer = {
            let bell = bell.clone();
            std::thread::spawn(move || {
                // Rings until the sleeper has slept and woken: whenever it rings, the
                // sleeper either has not slept yet (and will not) or is woken.
                while bell.generation() < 1000 {
                    bell.ring();
                    std::thread::yield_now();
                }
            })
        };
        let start = Instant::now();
        sleeper
            .sleep(seen, Duration::from_secs(60), |_| panic!("nothing watched"))
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(30));
        ringer.join().unwrap();
    }

    #[test]
    fn a_watched_source_wakes_the_sleeper_with_its_token() {
        let bell = Bell::new().unwrap();
        let mut sleeper = Sleeper::new(bell.clone()).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        bell.watch(kick.as_raw_fd(), 7).unwrap();
        kick.write(1).unwrap();
        let mut tokens = Vec::new();
        let slept = sleeper
            .sleep(bell.generation(), Duration::from_secs(60), |t| {
                tokens.push(t)
            })
            .unwrap();
        assert!(slept);
        assert_eq!(tokens, [7]);
        assert!(bell.watching());
        // Seen once: a look finds nothing more until the next write, which it reports.
        sleeper.look(|t| panic!("{t} reported twice")).unwrap();
        kick.write(1).unwrap();
        tokens.clear();
        sleeper.look(|t| tokens.push(t)).unwrap();
        assert_eq!(tokens, [7]);
        // Unwatched, it no longer wakes it: the sleep lasts its timeout.
        bell.unwatch(kick.as_raw_fd()).unwrap();
        assert!(!bell.watching());
        let start = Instant::now();
        sleeper
            .sleep(bell.generation(), Duration::from_millis(2), |_| {
                panic!("unwatched")
            })
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(2));
        assert!(bell.watch(kick.as_raw_fd(), MAX_TOKEN + 1).is_err());
    }
}
