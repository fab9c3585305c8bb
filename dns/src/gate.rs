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
//! queues for its next batch. The others stand by (a condition variable
//! with a 1 ms tick) and take batches of their own when
//! - the owner took a full batch: requests arrive faster than one thread
//!   answers them, so one helper is woken, and it keeps taking batches
//!   without waiting (and waking the next helper) while they come full;
//! - the owner answered nothing for a whole tick: either it waits for
//!   requests (the node is quiet) or it is descheduled. Either way the
//!   helper waits in the kernel too: a queue the owner left behind is
//!   taken at once, a quiet socket costs no more ticks, and the next request
//!   wakes one of the waiting threads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::udp::BATCH;

/// How long a helper stands by between looks at the owner's progress: the
/// longest a descheduled owner's queue waits for a helper.
pub const TICK: Duration = Duration::from_millis(1);

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
    /// Wait in the kernel beside the owner (it answered nothing for a
    /// tick), and answer what comes.
    Wait,
    /// Nothing to do yet: ask again.
    Pass,
}

/// One helper's standing-by state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Standby {
    /// The last batch this thread helped with was full: take the next one
    /// without standing by.
    behind: bool,
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
    /// while the last batch it took was full, or stand by (at most one
    /// tick) for a reason to help.
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
                .wait_timeout(wanted, TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if std::mem::take(&mut *wanted) {
            return Turn::Help;
        }
        drop(wanted);
        if self.answered.load(Ordering::Acquire) != before {
            Turn::Pass
        } else {
            Turn::Wait
        }
    }

    /// After a batch of `n` requests was taken, by its owner or a helper: a
    /// full batch means a backlog, so one more helper is woken.
    pub fn took(&self, n: usize, me: &mut Standby, turn: Turn) {
        if turn != Turn::Own {
            me.behind = n >= BATCH;
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
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let helper = std::thread::spawn(move || {
            let mut me = Standby::default();
            let mut turns = Vec::new();
            started_tx.send(()).unwrap();
            // Standing by until woken: the owner keeps answering.
            let first = loop {
                match g.turn(&mut me) {
                    Turn::Pass | Turn::Wait => continue,
                    t => break t,
                }
            };
            turns.push(first);
            g.took(BATCH, &mut me, first);
            let second = g.turn(&mut me);
            turns.push(second);
            g.took(3, &mut me, second);
            (turns, me.behind)
        });
        started_rx.recv().unwrap();
        // The owner answers a few batches, then takes a full one.
        for _ in 0..5 {
            gate.answered.fetch_add(1, Ordering::Release);
            std::thread::sleep(Duration::from_micros(300));
        }
        gate.took(BATCH, &mut owner, Turn::Own);
        let (turns, behind) = helper.join().unwrap();
        assert_eq!(turns, vec![Turn::Help, Turn::Help]);
        assert!(!behind);
    }

    #[test]
    fn a_silent_owner_gets_company_in_the_kernel_and_a_busy_one_does_not() {
        let gate = Gate::new(2);
        let mut owner = Standby::default();
        let mut helper = Standby::default();
        assert_eq!(gate.turn(&mut owner), Turn::Own);
        // The owner answers nothing for a tick: wait in the kernel too.
        assert_eq!(gate.turn(&mut helper), Turn::Wait);
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
