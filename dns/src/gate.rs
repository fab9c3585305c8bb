//! How the UDP threads of one socket take turns on it.
//!
//! All of a server's UDP threads read one socket (`crate::server`). If
//! every idle thread waited in `recvmmsg`, the kernel would wake one for
//! each datagram that arrives while another thread is answering its batch:
//! under load the threads then answer batches of a few queries with a
//! context switch each (two threads under `cargo xtask bench dns`: 4
//! queries per `recvmmsg` and 0.3 context switches per query, against 8
//! and 0.08 for one thread).
//!
//! So one thread at a time owns the socket: it waits in the kernel, takes
//! what is queued, answers it and comes back, and what arrives meanwhile
//! queues for its next batch. The others stand by and take batches of
//! their own, without waiting in the kernel, when
//! - the owner took a full batch: requests arrive faster than one thread
//!   answers them, so one helper is woken, and it keeps taking batches
//!   (and waking the next helper) while they come full;
//! - the owner answered nothing for a whole tick while requests were
//!   queued: it is descheduled, and the others drain its queue rather than
//!   let it grow until the socket's buffer overflows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::udp::BATCH;

/// How long a helper stands by while the owner is answering: the longest
/// a descheduled owner's queue waits for a helper.
pub const BUSY_TICK: Duration = Duration::from_millis(1);
/// How long a helper stands by once the owner answered nothing for a
/// whole tick (idle): ten wake-ups a second per helper on an idle node.
pub const IDLE_TICK: Duration = Duration::from_millis(10);

/// Shared by the UDP threads of one socket.
#[derive(Debug)]
pub struct Gate {
    threads: usize,
    owned: AtomicBool,
    /// Batches answered by owners: whether the owner gets anywhere.
    answered: AtomicU64,
    /// A full batch was taken: a helper is wanted.
    wanted: Mutex<bool>,
    standby: Condvar,
}

/// What a thread does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Owns the socket: wait in the kernel for requests, answer them, then
    /// `Gate::answered`.
    Own,
    /// Take the requests queued now, without waiting, and answer them.
    Help,
    /// Nothing to do yet: ask again.
    Pass,
}

/// One helper's standing-by state.
#[derive(Debug, Clone, Copy)]
pub struct Standby {
    tick: Duration,
    /// The last batch this thread helped with was full: take the next one
    /// without standing by.
    behind: bool,
}

impl Default for Standby {
    fn default() -> Self {
        Standby {
            tick: BUSY_TICK,
            behind: false,
        }
    }
}

impl Gate {
    pub fn new(threads: usize) -> Gate {
        Gate {
            threads: threads.max(1),
            owned: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            wanted: Mutex::new(false),
            standby: Condvar::new(),
        }
    }

    /// This thread's next turn: own the socket if nobody does; else help
    /// while the last helped batch was full, or stand by (at most one tick)
    /// for a reason to help.
    pub fn turn(&self, me: &mut Standby) -> Turn {
        if self
            .owned
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return Turn::Own;
        }
        if me.behind {
            return Turn::Help;
        }
        let before = self.answered.load(Ordering::Acquire);
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if !*wanted {
            wanted = self
                .standby
                .wait_timeout(wanted, me.tick)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if std::mem::take(&mut *wanted) {
            return Turn::Help;
        }
        drop(wanted);
        if self.answered.load(Ordering::Acquire) != before {
            me.tick = BUSY_TICK;
            return Turn::Pass;
        }
        // A whole tick without an answered batch: the owner is idle in the
        // kernel (then the socket is empty and helping finds nothing) or
        // descheduled (then its queue is taken).
        me.tick = IDLE_TICK;
        if self.owned.load(Ordering::Acquire) {
            Turn::Help
        } else {
            Turn::Pass
        }
    }

    /// After a batch of `n` requests was taken, by its owner or a helper: a
    /// full batch means a backlog, so one more helper is woken.
    pub fn took(&self, n: usize, me: &mut Standby, turn: Turn) {
        if turn == Turn::Help {
            me.behind = n >= BATCH;
            if n > 0 {
                me.tick = BUSY_TICK;
            }
        }
        if n >= BATCH && self.threads > 1 {
            *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.standby.notify_one();
        }
    }

    /// The owner answered its batch (or its wait ended without one) and
    /// gives the socket up until its next `turn`.
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Release);
        self.owned.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_always_owns() {
        let gate = Gate::new(1);
        let mut me = Standby::default();
        for _ in 0..3 {
            assert_eq!(gate.turn(&mut me), Turn::Own);
            gate.took(BATCH, &mut me, Turn::Own);
            gate.answered();
        }
    }

    #[test]
    fn a_full_batch_wakes_a_helper_who_keeps_up_while_batches_come_full() {
        let gate = std::sync::Arc::new(Gate::new(2));
        let mut owner = Standby::default();
        assert_eq!(gate.turn(&mut owner), Turn::Own);
        let g = gate.clone();
        let helper = std::thread::spawn(move || {
            let mut me = Standby {
                tick: Duration::from_secs(30),
                behind: false,
            };
            let first = g.turn(&mut me);
            g.took(BATCH, &mut me, first);
            let second = g.turn(&mut me);
            g.took(3, &mut me, second);
            (first, second, me.behind)
        });
        // Woken by the full batch, long before its 30 s tick.
        gate.took(BATCH, &mut owner, Turn::Own);
        let (first, second, behind) = helper.join().unwrap();
        assert_eq!((first, second, behind), (Turn::Help, Turn::Help, false));
    }

    #[test]
    fn a_stalled_owner_is_helped_and_a_busy_one_is_not() {
        let gate = Gate::new(2);
        let mut owner = Standby::default();
        let mut helper = Standby::default();
        assert_eq!(gate.turn(&mut owner), Turn::Own);
        // The owner answers nothing for a tick: help.
        assert_eq!(gate.turn(&mut helper), Turn::Help);
        assert_eq!(helper.tick, IDLE_TICK);
        // Helping found requests: back to short ticks.
        gate.took(2, &mut helper, Turn::Help);
        assert_eq!(helper.tick, BUSY_TICK);
        // The owner answers during the helper's tick: pass.
        std::thread::scope(|s| {
            s.spawn(|| {
                // Batches answered without giving the socket up between them.
                for _ in 0..50 {
                    gate.answered.fetch_add(1, Ordering::Release);
                    std::thread::sleep(Duration::from_micros(100));
                }
            });
            assert_eq!(gate.turn(&mut helper), Turn::Pass);
        });
        // The owner gives the socket up: the next turn owns it.
        gate.answered();
        assert_eq!(gate.turn(&mut helper), Turn::Own);
    }
}
