//! Admission control for a host that migrates many guests: at most N migrations run at once, the
//! others wait their turn, the most urgent first.
//!
//! Why: migrations that share one uplink and two cores all slow down together, and a guest paused
//! for its final pass then competes with every other one still in pre-copy. PBA's fleet simulation
//! (docs/pba.md) puts numbers on it: 1000 guests all at once on a 10 Gbit/s uplink take 23 291 s and
//! 178 of them converge; eight at a time take 5 458 s and all of them converge.
//!
//! [`Admission::wait`] blocks until a slot is free and no waiter is ahead (higher priority first,
//! then first come, first served); the returned [`AdmissionTicket`] holds the slot until dropped.
//! The limit can change at any time; lowering it never stops a running migration, it only holds
//! new ones back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_core::error::Error;
use parking_lot::{Condvar, Mutex};

/// A limit on how many migrations run at once. Cheap to clone; every clone is the same limit.
#[derive(Debug, Clone)]
pub struct Admission(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    max_running: usize,
    running: usize,
    next_ticket: u64,
    /// Waiters in admission order: the most urgent priority first, then the earliest arrival.
    waiting: BTreeSet<Waiter>,
}

type Waiter = (std::cmp::Reverse<u8>, u64);

impl State {
    /// Whether `me` may start now: a slot is free and nobody is ahead of it.
    fn admits(&self, me: &Waiter) -> bool {
        self.running < self.max_running && self.waiting.first() == Some(me)
    }
}

/// A migration's slot; dropping it (when the migration ends) lets the next waiter in.
#[derive(Debug)]
#[must_use = "the slot is given back when the ticket is dropped"]
pub struct AdmissionTicket {
    admission: Admission,
    waited: Duration,
}

impl Admission {
    /// At most `max_running` (at least 1) migrations at once.
    pub fn new(max_running: usize) -> Result<Self, Error> {
        check(max_running)?;
        Ok(Self(Arc::new(Shared {
            state: Mutex::new(State {
                max_running,
                running: 0,
                next_ticket: 0,
                waiting: BTreeSet::new(),
            }),
            changed: Condvar::new(),
        })))
    }

    /// Changes the limit; raising it lets waiters in at once.
    pub fn set_max_running(&self, max_running: usize) -> Result<(), Error> {
        check(max_running)?;
        self.0.state.lock().max_running = max_running;
        self.0.changed.notify_all();
        Ok(())
    }

    /// Waits until the migration may start: a slot is free and no waiter is ahead of it (a higher
    /// `priority`, or the same one and an earlier arrival). Gives up with [`Error::Timeout`] after
    /// `timeout`, leaving the queue as if it had never come.
    pub fn wait(&self, priority: u8, timeout: Duration) -> Result<AdmissionTicket, Error> {
        let started = Instant::now();
        let deadline = started.checked_add(timeout);
        let mut s = self.0.state.lock();
        let me = (std::cmp::Reverse(priority), s.next_ticket);
        s.next_ticket += 1;
        s.waiting.insert(me);
        loop {
            if s.admits(&me) {
                s.waiting.remove(&me);
                s.running += 1;
                drop(s);
                // The next waiter may fit too (the limit was raised by more than one).
                self.0.changed.notify_all();
                return Ok(AdmissionTicket {
                    admission: self.clone(),
                    waited: started.elapsed(),
                });
            }
            let timed_out = match deadline {
                Some(d) => self.0.changed.wait_until(&mut s, d).timed_out(),
                None => {
                    self.0.changed.wait(&mut s);
                    false
                }
            };
            if timed_out && !s.admits(&me) {
                s.waiting.remove(&me);
                let (running, waiting) = (s.running, s.waiting.len());
                drop(s);
                // Whoever was behind this waiter may be first now.
                self.0.changed.notify_all();
                return Err(Error::Timeout(format!(
                    "not admitted within {timeout:?}: {running} migrations running, {waiting} others waiting"
                )));
            }
        }
    }

    /// Migrations running now (holding a ticket).
    pub fn running(&self) -> usize {
        self.0.state.lock().running
    }

    /// Migrations waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.0.state.lock().waiting.len()
    }

    /// The limit.
    pub fn max_running(&self) -> usize {
        self.0.state.lock().max_running
    }
}

impl AdmissionTicket {
    /// How long the migration waited for its slot.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        let shared = &self.admission.0;
        shared.state.lock().running -= 1;
        shared.changed.notify_all();
    }
}

fn check(max_running: usize) -> Result<(), Error> {
    if (1..=1_000_000).contains(&max_running) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "max running migrations {max_running}: it must be at least 1 and at most 1000000"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const LONG: Duration = Duration::from_secs(10);

    /// Starts a waiter on its own thread; its ticket arrives on `tx` tagged with `name`.
    fn waiter(
        a: &Admission,
        name: &'static str,
        priority: u8,
        tx: &mpsc::Sender<(&'static str, AdmissionTicket)>,
    ) -> std::thread::JoinHandle<()> {
        let (a, tx) = (a.clone(), tx.clone());
        std::thread::spawn(move || {
            let t = a.wait(priority, LONG).unwrap();
            tx.send((name, t)).unwrap();
        })
    }

    /// Waits until `n` waiters are queued (so that arrival order is the order of the calls).
    fn queued(a: &Admission, n: usize) {
        let deadline = Instant::now() + LONG;
        while a.waiting() != n {
            assert!(
                Instant::now() < deadline,
                "{} waiting, expected {n}",
                a.waiting()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn slots_are_limited_and_handed_on_most_urgent_first() {
        let a = Admission::new(2).unwrap();
        let first = a.wait(0, LONG).unwrap();
        let second = a.wait(0, LONG).unwrap();
        assert_eq!((a.running(), a.waiting()), (2, 0));
        let (tx, rx) = mpsc::channel();
        let mut threads = vec![waiter(&a, "low", 0, &tx)];
        queued(&a, 1);
        threads.push(waiter(&a, "urgent", 9, &tx));
        queued(&a, 2);
        threads.push(waiter(&a, "low-later", 0, &tx));
        queued(&a, 3);
        assert!(
            rx.try_recv().is_err(),
            "nobody gets in while both slots are held"
        );

        drop(first);
        let (name, urgent) = rx.recv_timeout(LONG).unwrap();
        assert_eq!(name, "urgent", "a higher priority goes first");
        assert!(urgent.waited() > Duration::ZERO);
        drop(second);
        let (name, _low) = rx.recv_timeout(LONG).unwrap();
        assert_eq!(name, "low", "then first come");
        assert!(rx.try_recv().is_err());
        // Raising the limit lets the last one in without anyone leaving.
        a.set_max_running(3).unwrap();
        let (name, _last) = rx.recv_timeout(LONG).unwrap();
        assert_eq!(name, "low-later");
        assert_eq!((a.running(), a.waiting()), (3, 0));
        drop(urgent);
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    #[test]
    fn a_waiter_that_times_out_leaves_the_queue() {
        let a = Admission::new(1).unwrap();
        let held = a.wait(0, LONG).unwrap();
        let err = a.wait(5, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(err.to_string().contains("1 migrations running"), "{err}");
        assert_eq!(a.waiting(), 0);
        drop(held);
        // The slot is free for the next one, not held by the one that gave up.
        let next = a.wait(0, Duration::from_millis(100)).unwrap();
        assert_eq!(a.running(), 1);
        drop(next);
        assert_eq!(a.running(), 0);
    }

    #[test]
    fn absurd_limits_are_refused() {
        assert!(Admission::new(0).is_err());
        assert!(Admission::new(usize::MAX).is_err());
        let a = Admission::new(4).unwrap();
        assert!(a.set_max_running(0).is_err());
        assert_eq!(a.max_running(), 4);
    }

    #[test]
    fn many_threads_never_exceed_the_limit() {
        let a = Admission::new(3).unwrap();
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (a, peak) = (a.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _t = a.wait((i % 3) as u8, LONG).unwrap();
                        peak.fetch_max(a.running(), std::sync::atomic::Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(peak.load(std::sync::atomic::Ordering::Relaxed) <= 3);
        assert_eq!((a.running(), a.waiting()), (0, 0));
    }
}
