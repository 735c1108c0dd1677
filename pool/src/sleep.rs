//! How idle workers go to sleep and how submitters wake them, without lost wake-ups and without
//! a system call when every worker is busy.
//!
//! # The protocol
//!
//! Two counters and one mutex + condition variable per class of worker (normal, priority):
//!
//! - `jobs`: a *jobs event counter*, bumped (SeqCst) by every submitter **after** its job is
//!   visible in a queue;
//! - `sleeping`: how many workers are blocked, or about to block, on the condition variable
//!   and have not been sent a notification yet.
//!
//! An idle worker:
//!
//! 1. searches every queue it may take from; finding nothing,
//! 2. **announces it is sleepy** by reading `jobs` (its *ticket*),
//! 3. **searches once more** (a job pushed before the ticket was read is found here),
//! 4. takes the mutex, increments `sleeping`, and re-reads `jobs`: if it moved since the ticket, a
//!    job was published meanwhile, so it does not block; otherwise it waits on the condition
//!    variable (which releases the mutex atomically).
//!
//! A third counter, `sleepy`, counts workers between step 2 and the end of step 4; step 2
//! increments it and then issues a SeqCst fence.
//!
//! A submitter pushes its job, issues a SeqCst fence and reads `sleepy`: when it is zero it is
//! done, having written nothing shared (the fences pair up: either the submitter sees the worker
//! sleepy, or the worker's second search sees the job). A submit to the shared queue needs no
//! fence of its own: the queue's push is a SeqCst read-modify-write of the index that the
//! worker's search reads after its fence, which pairs the same way (see `Pool::push_normal`).
//! Otherwise it bumps `jobs` and reads `sleeping`: only if that is non-zero does it take the
//! mutex, move one sleeper from `sleeping` to a count of notifications sent (kept under the
//! mutex), and notify. A woken worker takes one notification; a spurious wake-up finds none and
//! waits again. Because the waker, not the woken worker, takes the sleeper off `sleeping`, the
//! submits that follow in the microseconds before the woken worker runs see no sleeper and make
//! no system call (std's `notify_one` always makes one). When all workers are busy one read
//! (and, for a job a worker pushed onto its own deque, the fence) is the whole cost: no lock,
//! no system call.
//!
//! Why nothing is lost: the worker's `sleeping` increment and its re-read of `jobs`, and the
//! submitter's `jobs` bump and its read of `sleeping`, are SeqCst in opposite orders (a Dekker
//! pair), so at least one side sees the other. Either the worker sees the new `jobs` value and
//! searches again, or the submitter sees `sleeping > 0` and takes the mutex, which the worker
//! holds until it is inside the wait, so the notification cannot fall between the worker's check
//! and its wait. Control changes (shrink, shutdown) set their flag first and then notify all
//! waiters under the mutex, with the same argument. Spurious wake-ups only cause a new search.
//!
//! The loom models at the end of this file (`RUSTFLAGS="--cfg loom" cargo test -p vireo-pool
//! --release --lib loom`, with `LOOM_MAX_PREEMPTIONS=3`) explore every interleaving of
//! a submitter and workers through this module and fail on a lost wake-up (a deadlock).

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst, fence};
#[cfg(loom)]
use loom::sync::{Condvar, Mutex};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst, fence};
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// What a worker read before its last search: the jobs event counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

/// Why [`Sleep::sleep`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woke {
    /// A job was published after the ticket, or `stop` held: the worker did not block.
    NotBlocked,
    /// Notified (or spuriously woken).
    Notified,
    /// The timeout passed without a notification.
    TimedOut,
}

/// The sleep state of one class of workers.
#[derive(Debug, Default)]
pub(crate) struct Sleep {
    jobs: AtomicU64,
    /// Workers between `announce` and the end of `sleep` (or `retract`).
    sleepy: AtomicUsize,
    /// Workers blocked (or about to block) that no notification has been sent to yet.
    sleeping: AtomicUsize,
    /// Notifications sent and not yet taken by a waiting worker (see [`Sleep::sleep`]).
    lock: Mutex<usize>,
    cond: Condvar,
}

impl Sleep {
    /// A sleep state with no sleeper.
    pub(crate) fn new() -> Sleep {
        Sleep::default()
    }

    /// Step 2 of the protocol: read the ticket, then search once more before calling
    /// [`sleep`](Sleep::sleep).
    pub(crate) fn announce(&self) -> Ticket {
        self.sleepy.fetch_add(1, SeqCst);
        // Pairs with the fence in `publish`: either that submitter sees this worker sleepy,
        // or this worker's next search sees its job.
        fence(SeqCst);
        Ticket(self.jobs.load(SeqCst))
    }

    /// Withdraws an announcement when the second search found work.
    pub(crate) fn retract(&self) {
        self.sleepy.fetch_sub(1, SeqCst);
    }

    /// Step 4: blocks unless a job was published since `ticket` or `stop()` holds. `stop` is
    /// evaluated under the mutex, so a flag set before [`wake_all`](Sleep::wake_all) is seen.
    pub(crate) fn sleep(
        &self,
        ticket: Ticket,
        timeout: Option<Duration>,
        stop: impl Fn() -> bool,
    ) -> Woke {
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.fetch_add(1, SeqCst);
        // A read-modify-write, not a load: it reads the latest value in `jobs`' modification
        // order, and the submitter's bump is one too, so whichever comes second synchronizes
        // with the first. The argument then holds even under acquire/release alone (which is
        // how loom models SeqCst accesses), not only under a single SeqCst order.
        if self.jobs.fetch_add(0, SeqCst) != ticket.0 || stop() {
            self.sleeping.fetch_sub(1, SeqCst);
            drop(guard);
            self.retract();
            return Woke::NotBlocked;
        }
        // Every worker in the loop below is counted either in `sleeping` or, once a waker has
        // chosen it, in the notifications under the mutex: a waker moves one from the first to
        // the second, and a woken worker takes one notification (whichever waker meant it).
        // So a submit never wakes a worker that another submit already woke, and spurious
        // wake-ups go back to waiting.
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut guard = guard;
        let woke = loop {
            guard = match deadline {
                None => self.cond.wait(guard).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    self.cond
                        .wait_timeout(guard, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            if *guard > 0 {
                *guard -= 1;
                break Woke::Notified;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                self.sleeping.fetch_sub(1, SeqCst);
                break Woke::TimedOut;
            }
        };
        drop(guard);
        self.retract();
        woke
    }

    /// A submitter's side, after its job is visible: bump the counter, wake one sleeper if
    /// there is one. Returns whether a sleeper was notified.
    pub(crate) fn publish(&self) -> bool {
        fence(SeqCst);
        self.publish_fenced()
    }

    /// [`publish`](Sleep::publish) for a submitter that made a `SeqCst` fence after its job
    /// became visible, or made it visible with a `SeqCst` read-modify-write of the queue index
    /// that a searching worker reads after its own fence (one fence serving several checks).
    pub(crate) fn publish_fenced(&self) -> bool {
        // The fast path writes nothing shared: with no worker sleepy, any worker that becomes
        // sleepy later searches again after its announcement and finds the job. SeqCst: when
        // the job was published by a SeqCst read-modify-write rather than a fence, this read
        // and the worker's increment must both be in the single SeqCst order.
        if self.sleepy.load(SeqCst) == 0 {
            return false;
        }
        self.jobs.fetch_add(1, SeqCst);
        if self.sleeping.load(SeqCst) == 0 {
            return false;
        }
        let mut notes = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Re-read under the mutex: another submit may have taken the last sleeper.
        if self.sleeping.load(SeqCst) == 0 {
            return false;
        }
        self.sleeping.fetch_sub(1, SeqCst);
        *notes += 1;
        self.cond.notify_one();
        true
    }

    /// Wakes every sleeper (after a control flag was set).
    pub(crate) fn wake_all(&self) {
        self.jobs.fetch_add(1, SeqCst);
        let mut notes = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        *notes += self.sleeping.swap(0, SeqCst);
        self.cond.notify_all();
    }

    /// How many workers are asleep or about to be.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn sleeping(&self) -> usize {
        self.sleeping.load(SeqCst)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn publish_without_sleepers_takes_no_lock() {
        let sleep = Sleep::new();
        // Holding the lock: a publish that tried to take it would deadlock this test.
        let _held = sleep.lock.lock().unwrap();
        assert!(!sleep.publish());
        assert_eq!(sleep.sleeping(), 0);
    }

    #[test]
    fn a_publish_after_the_ticket_keeps_the_worker_awake() {
        let sleep = Sleep::new();
        let ticket = sleep.announce();
        assert_eq!(sleep.sleepy.load(SeqCst), 1);
        sleep.publish();
        assert_eq!(sleep.sleep(ticket, None, || false), Woke::NotBlocked);
    }

    #[test]
    fn sleeper_is_woken_by_publish() {
        let sleep = Arc::new(Sleep::new());
        let ticket = sleep.announce();
        let worker = {
            let sleep = Arc::clone(&sleep);
            thread::spawn(move || sleep.sleep(ticket, None, || false))
        };
        while sleep.sleeping() == 0 {
            thread::yield_now();
        }
        // The worker counts itself under the mutex and holds it until it waits: once this
        // thread has the mutex, the worker is waiting (a publish before that would find it
        // about to re-check the ticket, and it would not block at all).
        drop(sleep.lock.lock().unwrap());
        assert!(sleep.publish());
        assert_ne!(worker.join().unwrap(), Woke::TimedOut);
    }

    #[test]
    fn a_notified_sleeper_is_not_notified_twice() {
        let sleep = Arc::new(Sleep::new());
        let ticket = sleep.announce();
        let worker = {
            let sleep = Arc::clone(&sleep);
            thread::spawn(move || sleep.sleep(ticket, None, || false))
        };
        while sleep.sleeping() == 0 {
            thread::yield_now();
        }
        // The worker counts itself under the mutex and holds it until it waits: once this
        // thread has the mutex, the worker is waiting (a publish before that would find it
        // about to re-check the ticket, and it would not block at all).
        drop(sleep.lock.lock().unwrap());
        assert!(sleep.publish());
        // Whether or not the worker has run yet, the second submit finds no sleeper left.
        assert!(!sleep.publish());
        assert_eq!(worker.join().unwrap(), Woke::Notified);
    }

    #[test]
    fn idle_timeout_returns_timed_out() {
        let sleep = Sleep::new();
        let ticket = sleep.announce();
        let woke = sleep.sleep(ticket, Some(Duration::from_millis(10)), || false);
        assert_eq!(woke, Woke::TimedOut);
    }
}

/// Loom models: every interleaving of submitters and workers through the protocol. A lost
/// wake-up leaves a worker blocked forever, which loom reports as a deadlock.
#[cfg(all(test, loom))]
mod loom_models {
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicBool;

    use super::*;

    /// A toy queue: the number of jobs published and not yet taken.
    fn take(queue: &AtomicUsize) -> bool {
        let mut n = queue.load(SeqCst);
        while n > 0 {
            match queue.compare_exchange(n, n - 1, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
        false
    }

    /// The worker side of the protocol: search, announce, search again, sleep; until it has
    /// taken `jobs` jobs or `stop` is set.
    fn worker(sleep: &Sleep, queue: &AtomicUsize, stop: &AtomicBool, jobs: usize) {
        let mut taken = 0;
        while taken < jobs && !stop.load(SeqCst) {
            if take(queue) {
                taken += 1;
                continue;
            }
            let ticket = sleep.announce();
            if take(queue) {
                sleep.retract();
                taken += 1;
                continue;
            }
            sleep.sleep(ticket, None, || stop.load(SeqCst));
        }
    }

    #[test]
    fn one_submit_wakes_one_sleeping_worker() {
        loom::model(|| {
            let sleep = Arc::new(Sleep::new());
            let queue = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let w = {
                let (sleep, queue, stop) = (sleep.clone(), queue.clone(), stop.clone());
                loom::thread::spawn(move || worker(&sleep, &queue, &stop, 1))
            };
            queue.fetch_add(1, SeqCst);
            sleep.publish();
            w.join().unwrap();
            assert_eq!(queue.load(SeqCst), 0);
        });
    }

    #[test]
    fn two_jobs_two_sleeping_workers_both_run() {
        loom::model(|| {
            let sleep = Arc::new(Sleep::new());
            let queue = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let (sleep, queue, stop) = (sleep.clone(), queue.clone(), stop.clone());
                    loom::thread::spawn(move || worker(&sleep, &queue, &stop, 1))
                })
                .collect();
            for _ in 0..2 {
                queue.fetch_add(1, SeqCst);
                sleep.publish();
            }
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(queue.load(SeqCst), 0);
        });
    }

    #[test]
    fn stop_flag_then_wake_all_releases_sleepers() {
        loom::model(|| {
            let sleep = Arc::new(Sleep::new());
            let queue = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let w = {
                let (sleep, queue, stop) = (sleep.clone(), queue.clone(), stop.clone());
                loom::thread::spawn(move || worker(&sleep, &queue, &stop, usize::MAX))
            };
            stop.store(true, SeqCst);
            sleep.wake_all();
            w.join().unwrap();
        });
    }

    /// Draining shutdown racing the last submits: the submitter queues jobs, then closes and
    /// wakes everyone. Workers exit only when closed *and* the queue is empty, so every job is
    /// run and both workers exit (a lost wake-up or an early exit would leave a job behind or a
    /// worker blocked forever).
    #[test]
    fn drain_runs_every_queued_job_then_releases_every_worker() {
        loom::model(|| {
            let sleep = Arc::new(Sleep::new());
            let queue = Arc::new(AtomicUsize::new(0));
            let closed = Arc::new(AtomicBool::new(false));
            let ran = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let (sleep, queue, closed, ran) =
                        (sleep.clone(), queue.clone(), closed.clone(), ran.clone());
                    loom::thread::spawn(move || {
                        loop {
                            if take(&queue) {
                                ran.fetch_add(1, SeqCst);
                                continue;
                            }
                            if closed.load(SeqCst) && queue.load(SeqCst) == 0 {
                                return;
                            }
                            let ticket = sleep.announce();
                            if take(&queue) {
                                sleep.retract();
                                ran.fetch_add(1, SeqCst);
                                continue;
                            }
                            sleep.sleep(ticket, None, || {
                                closed.load(SeqCst) && queue.load(SeqCst) == 0
                            });
                        }
                    })
                })
                .collect();
            queue.fetch_add(1, SeqCst);
            sleep.publish();
            closed.store(true, SeqCst);
            sleep.wake_all();
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(ran.load(SeqCst), 1);
        });
    }

    /// Shrinking (set_limits lowering max) racing a submit: one of two workers must retire;
    /// the retiring one is told through the same stop-then-wake path, and the job published
    /// meanwhile is still run by the one that stays.
    #[test]
    fn shrink_racing_a_submit_loses_no_job() {
        loom::model(|| {
            let sleep = Arc::new(Sleep::new());
            let queue = Arc::new(AtomicUsize::new(0));
            let surplus = Arc::new(AtomicUsize::new(0));
            let ran = Arc::new(AtomicUsize::new(0));
            // Retires if a retirement is owed (claimed once, by one worker).
            let retire = |surplus: &AtomicUsize| {
                let mut n = surplus.load(SeqCst);
                while n > 0 {
                    match surplus.compare_exchange(n, n - 1, SeqCst, SeqCst) {
                        Ok(_) => return true,
                        Err(now) => n = now,
                    }
                }
                false
            };
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let (sleep, queue, surplus, ran) =
                        (sleep.clone(), queue.clone(), surplus.clone(), ran.clone());
                    loom::thread::spawn(move || {
                        loop {
                            if retire(&surplus) {
                                return;
                            }
                            if take(&queue) {
                                ran.fetch_add(1, SeqCst);
                                // The test stops after its one job; the other worker, if
                                // still here, is released by the final wake_all.
                                return;
                            }
                            let ticket = sleep.announce();
                            if take(&queue) {
                                sleep.retract();
                                ran.fetch_add(1, SeqCst);
                                return;
                            }
                            sleep.sleep(ticket, None, || {
                                surplus.load(SeqCst) > 0 || ran.load(SeqCst) > 0
                            });
                            if ran.load(SeqCst) > 0 && queue.load(SeqCst) == 0 {
                                return;
                            }
                        }
                    })
                })
                .collect();
            // set_limits: one worker too many; flag first, then wake.
            surplus.fetch_add(1, SeqCst);
            sleep.wake_all();
            // A submit at the same time.
            queue.fetch_add(1, SeqCst);
            sleep.publish();
            // Wait for the job, then release whoever is left (the pool's final shutdown).
            while ran.load(SeqCst) == 0 {
                loom::thread::yield_now();
            }
            sleep.wake_all();
            for w in workers {
                w.join().unwrap();
            }
            assert_eq!(ran.load(SeqCst), 1);
            assert_eq!(queue.load(SeqCst), 0);
        });
    }

    /// An idle-timeout retirement racing a submit (the pool's `Shared::retire` and
    /// `Pool::ensure_a_worker`): the last worker counts itself out under the control lock,
    /// fences and looks at the queue, taking itself back in when a job is there; the submitter
    /// queues, fences and reads the count, starting a worker when it reads zero. Either the
    /// worker sees the job or the submitter sees no worker: the job always runs, exactly once.
    #[test]
    fn idle_retirement_racing_a_submit_strands_no_job() {
        loom::model(|| {
            let queue = Arc::new(AtomicUsize::new(0));
            let control = Arc::new(Mutex::new(1usize));
            let mirror = Arc::new(AtomicUsize::new(1));
            let ran = Arc::new(AtomicUsize::new(0));
            let retiring = {
                let (queue, control, mirror, ran) =
                    (queue.clone(), control.clone(), mirror.clone(), ran.clone());
                loom::thread::spawn(move || {
                    let mut workers = control.lock().unwrap();
                    *workers -= 1;
                    mirror.store(*workers, SeqCst);
                    fence(SeqCst);
                    if queue.load(SeqCst) > 0 {
                        // A job arrived while it timed out: stay.
                        *workers += 1;
                        mirror.store(*workers, SeqCst);
                        drop(workers);
                        if take(&queue) {
                            ran.fetch_add(1, SeqCst);
                        }
                    }
                })
            };
            queue.fetch_add(1, SeqCst);
            fence(SeqCst);
            let mut started = None;
            if mirror.load(SeqCst) == 0 {
                let mut workers = control.lock().unwrap();
                if *workers == 0 {
                    *workers += 1;
                    mirror.store(*workers, SeqCst);
                    let (queue, ran) = (queue.clone(), ran.clone());
                    started = Some(loom::thread::spawn(move || {
                        if take(&queue) {
                            ran.fetch_add(1, SeqCst);
                        }
                    }));
                }
            }
            retiring.join().unwrap();
            if let Some(worker) = started {
                worker.join().unwrap();
            }
            assert_eq!(ran.load(SeqCst), 1, "the job was stranded");
            assert_eq!(queue.load(SeqCst), 0);
        });
    }
}
