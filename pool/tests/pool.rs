//! The pool's behaviour: order, priority, growth and limits, bounded queues, shutdown, panics,
//! stealing, volume.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vireo_pool::{BuildError, LimitsError, Pool, SubmitError};

/// Generous bound for things that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds or [`PATIENCE`] passes (for states with no signal to wait on,
/// such as a worker thread having exited).
#[track_caller]
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// A job that blocks its worker until the returned sender is dropped or sent to, and tells
/// `started` when it begins.
fn blocker(started: &Sender<()>) -> (impl FnOnce() + Send + 'static, Sender<()>) {
    let (release, wait): (Sender<()>, Receiver<()>) = mpsc::channel();
    let started = started.clone();
    let job = move || {
        started.send(()).unwrap();
        let _ = wait.recv_timeout(PATIENCE);
    };
    (job, release)
}

/// Occupies one worker of `pool` with a blocking job and returns once it runs; the job ends
/// when the returned sender is used or dropped.
fn occupy(pool: &Pool) -> Sender<()> {
    let (started_tx, started) = mpsc::channel();
    let (block, release) = blocker(&started_tx);
    pool.submit(block).unwrap();
    started.recv_timeout(PATIENCE).unwrap();
    release
}

/// Counts runs and drops of the jobs it makes.
#[derive(Clone, Default)]
struct Probe {
    runs: Arc<AtomicUsize>,
    drops: Arc<AtomicUsize>,
}

struct Token(Arc<AtomicUsize>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

impl Probe {
    fn job(&self) -> impl FnOnce() + Send + 'static {
        let runs = Arc::clone(&self.runs);
        let token = Token(Arc::clone(&self.drops));
        move || {
            let _token = token;
            runs.fetch_add(1, SeqCst);
        }
    }
}

#[test]
fn fifo_order_with_one_worker() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .build()
        .unwrap();
    let release = occupy(&pool);
    let order = Arc::new(Mutex::new(Vec::new()));
    for i in 0..100 {
        let order = Arc::clone(&order);
        pool.submit(move || order.lock().unwrap().push(i)).unwrap();
    }
    assert_eq!(pool.stats().queue_depth, 100);
    release.send(()).unwrap();
    pool.drain();
    assert_eq!(*order.lock().unwrap(), (0..100).collect::<Vec<_>>());
}

#[test]
fn priority_worker_runs_priority_job_while_normal_jobs_wait() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .prio_workers(1)
        .name("t")
        .build()
        .unwrap();
    let release = occupy(&pool);
    let normal = Probe::default();
    for _ in 0..10 {
        pool.submit(normal.job()).unwrap();
    }
    let (done_tx, done) = mpsc::channel();
    pool.submit_priority(move || {
        done_tx
            .send(thread::current().name().unwrap().to_string())
            .unwrap();
    })
    .unwrap();
    // The priority job completes while the only normal worker is still blocked...
    let ran_on = done.recv_timeout(PATIENCE).unwrap();
    assert_eq!(ran_on, "prio-t-1");
    // ...and the priority worker never touched the normal jobs queued before it.
    assert_eq!(normal.runs.load(SeqCst), 0);
    assert_eq!(pool.stats().queue_depth, 10);
    release.send(()).unwrap();
    pool.drain();
    assert_eq!(normal.runs.load(SeqCst), 10);
}

#[test]
fn priority_lane_overtakes_queued_normal_jobs_without_priority_workers() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .build()
        .unwrap();
    let release = occupy(&pool);
    let order = Arc::new(Mutex::new(Vec::new()));
    for i in 0..5 {
        let order = Arc::clone(&order);
        pool.submit(move || order.lock().unwrap().push(i)).unwrap();
    }
    let o = Arc::clone(&order);
    pool.submit_priority(move || o.lock().unwrap().push(100))
        .unwrap();
    release.send(()).unwrap();
    pool.drain();
    assert_eq!(*order.lock().unwrap(), vec![100, 0, 1, 2, 3, 4]);
}

#[test]
fn grows_one_worker_at_a_time_up_to_max() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(4)
        .build()
        .unwrap();
    assert_eq!(pool.stats().workers, 1);
    // Growth compares idle workers with queued jobs: start from a settled, idle pool.
    eventually("the first worker to be idle", || {
        pool.stats().free_workers == 1
    });
    let (started_tx, started) = mpsc::channel();
    let mut releases = Vec::new();
    for n in 1..=6 {
        let (block, release) = blocker(&started_tx);
        releases.push(release);
        pool.submit(block).unwrap();
        if n <= 4 {
            // Every worker is busy when the next job comes, so the pool grows for it.
            started.recv_timeout(PATIENCE).unwrap();
            assert_eq!(pool.stats().workers, n);
        }
    }
    let stats = pool.stats();
    assert_eq!(stats.workers, 4, "grew past max");
    assert_eq!(stats.queue_depth, 2);
    drop(releases);
    pool.drain();
}

#[test]
fn set_limits_validates_starts_and_retires_workers() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(2)
        .prio_workers(0)
        .build()
        .unwrap();
    assert!(matches!(
        pool.set_limits(Some(3), None, None),
        Err(LimitsError::MinAboveMax { min: 3, max: 2 })
    ));
    assert!(matches!(
        pool.set_limits(None, Some(0), None),
        Err(LimitsError::NoWorkers)
    ));
    assert_eq!(
        pool.set_limits(Some(5), Some(2), None)
            .unwrap_err()
            .to_string(),
        "min_workers (5) cannot be larger than max_workers (2)"
    );
    // Raising min and prio starts workers at once.
    pool.set_limits(Some(4), Some(6), Some(2)).unwrap();
    let stats = pool.stats();
    assert_eq!((stats.workers, stats.prio_workers), (4, 2));
    assert_eq!((stats.min_workers, stats.max_workers), (4, 6));
    // Lowering max and prio retires the surplus: idle ones at once, busy ones after their job.
    let release = occupy(&pool);
    pool.set_limits(Some(1), Some(1), Some(0)).unwrap();
    eventually("idle surplus to exit", || {
        let s = pool.stats();
        s.workers == 1 && s.prio_workers == 0
    });
    release.send(()).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let d = Arc::clone(&done);
    pool.submit(move || {
        d.fetch_add(1, SeqCst);
    })
    .unwrap();
    pool.drain();
    assert_eq!(done.load(SeqCst), 1);
}

#[test]
fn idle_workers_above_min_retire_after_the_timeout() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(3)
        .idle_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let (started_tx, started) = mpsc::channel();
    let mut releases = Vec::new();
    for _ in 0..3 {
        let (block, release) = blocker(&started_tx);
        releases.push(release);
        pool.submit(block).unwrap();
        started.recv_timeout(PATIENCE).unwrap();
    }
    assert_eq!(pool.stats().workers, 3);
    drop(releases);
    eventually("workers above min to retire", || pool.stats().workers == 1);
    // The one left still serves.
    let (tx, rx) = mpsc::channel();
    pool.submit(move || tx.send(()).unwrap()).unwrap();
    rx.recv_timeout(PATIENCE).unwrap();
}

#[test]
fn bounded_queue_says_full_and_hands_the_job_back() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .queue_capacity(2)
        .build()
        .unwrap();
    let release = occupy(&pool);
    let probe = Probe::default();
    pool.try_submit(probe.job()).unwrap();
    pool.try_submit(probe.job()).unwrap();
    let refused = match pool.try_submit(probe.job()) {
        Err(e @ SubmitError::Full(_)) => {
            assert!(e.is_full());
            e.into_inner()
        }
        other => panic!("expected Full, got {other:?}"),
    };
    // Priority jobs are not refused for space.
    pool.submit_priority(probe.job()).unwrap();
    // The refused job is intact: run it here.
    refused();
    assert_eq!(probe.runs.load(SeqCst), 1);

    // A blocking submit from outside waits for room.
    let pool = Arc::new(pool);
    let submitted = Arc::new(AtomicUsize::new(0));
    let submitter = {
        let (pool, submitted, job) = (Arc::clone(&pool), Arc::clone(&submitted), probe.job());
        thread::spawn(move || {
            pool.submit(job).unwrap();
            submitted.store(1, SeqCst);
        })
    };
    thread::sleep(Duration::from_millis(50));
    assert_eq!(submitted.load(SeqCst), 0, "submit did not wait for room");
    release.send(()).unwrap();
    submitter.join().unwrap();
    pool.drain();
    assert_eq!(probe.runs.load(SeqCst), 5);
    assert_eq!(probe.drops.load(SeqCst), 5);
}

#[test]
fn drain_runs_every_queued_job() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .build()
        .unwrap();
    let release = occupy(&pool);
    let probe = Probe::default();
    for _ in 0..100 {
        pool.submit(probe.job()).unwrap();
    }
    release.send(()).unwrap();
    pool.drain();
    assert_eq!(probe.runs.load(SeqCst), 100);
    assert_eq!(probe.drops.load(SeqCst), 100);
    assert_eq!(pool.stats().dropped, 0);
    assert!(matches!(pool.submit(|| {}), Err(SubmitError::Closed(_))));
    assert!(matches!(
        pool.try_submit(|| {}),
        Err(SubmitError::Closed(_))
    ));
    assert!(matches!(
        pool.submit_priority(|| {}),
        Err(SubmitError::Closed(_))
    ));
    assert!(matches!(
        pool.set_limits(None, None, None),
        Err(LimitsError::Closed)
    ));
    assert_eq!(pool.stats().workers, 0);
}

#[test]
fn shutdown_now_drops_queued_jobs_and_waits_for_running_ones() {
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .prio_workers(1)
        .build()
        .unwrap();
    let (started_tx, started) = mpsc::channel();
    let (block, release) = blocker(&started_tx);
    let finished = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&finished);
    pool.submit(move || {
        block();
        f.fetch_add(1, SeqCst);
    })
    .unwrap();
    started.recv_timeout(PATIENCE).unwrap();
    let probe = Probe::default();
    for _ in 0..100 {
        pool.submit(probe.job()).unwrap();
    }
    let pool = Arc::new(pool);
    let stopper = {
        let pool = Arc::clone(&pool);
        thread::spawn(move || pool.shutdown_now())
    };
    eventually("the shutdown to begin", || pool.is_closed());
    assert!(matches!(
        pool.try_submit(|| {}),
        Err(SubmitError::Closed(_))
    ));
    release.send(()).unwrap();
    stopper.join().unwrap();
    assert_eq!(finished.load(SeqCst), 1, "the running job must finish");
    assert_eq!(probe.runs.load(SeqCst), 0);
    assert_eq!(
        probe.drops.load(SeqCst),
        100,
        "queued jobs must be dropped, not leaked"
    );
    let stats = pool.stats();
    assert_eq!(
        (stats.dropped, stats.queue_depth, stats.workers),
        (100, 0, 0)
    );
}

#[test]
fn dropping_the_pool_drains_it() {
    let probe = Probe::default();
    {
        let pool = Pool::builder()
            .min_workers(2)
            .max_workers(2)
            .build()
            .unwrap();
        for _ in 0..1000 {
            pool.submit(probe.job()).unwrap();
        }
    }
    assert_eq!(probe.runs.load(SeqCst), 1000);
    assert_eq!(probe.drops.load(SeqCst), 1000);
}

#[test]
fn panicking_job_is_counted_reported_and_its_worker_survives() {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reports);
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .name("p")
        .panic_hook(move |payload| {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .unwrap_or_default();
            sink.lock().unwrap().push(text);
        })
        .build()
        .unwrap();
    pool.submit(|| panic!("deliberate panic in a pool test"))
        .unwrap();
    let (tx, rx) = mpsc::channel();
    pool.submit(move || {
        tx.send(thread::current().name().unwrap().to_string())
            .unwrap()
    })
    .unwrap();
    assert_eq!(
        rx.recv_timeout(PATIENCE).unwrap(),
        "p-0",
        "a new worker replaced the first"
    );
    pool.drain();
    let stats = pool.stats();
    assert_eq!((stats.panicked, stats.completed), (1, 1));
    assert_eq!(
        *reports.lock().unwrap(),
        vec!["deliberate panic in a pool test"]
    );
}

#[test]
fn a_million_tiny_jobs_each_run_exactly_once() {
    const N: usize = 1_000_000;
    let pool = Pool::builder()
        .min_workers(2)
        .max_workers(2)
        .build()
        .unwrap();
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..N).map(|_| AtomicU8::new(0)).collect());
    for i in 0..N {
        let seen = Arc::clone(&seen);
        pool.submit(move || {
            seen[i].fetch_add(1, SeqCst);
        })
        .unwrap();
    }
    pool.drain();
    let wrong = seen.iter().filter(|c| c.load(SeqCst) != 1).count();
    assert_eq!(wrong, 0, "{wrong} jobs did not run exactly once");
    assert_eq!(pool.stats().completed, N as u64);
}

#[test]
fn jobs_spawned_by_a_job_are_stolen_by_the_other_worker() {
    let pool = Arc::new(
        Pool::builder()
            .min_workers(2)
            .max_workers(2)
            .build()
            .unwrap(),
    );
    let ran_on = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done) = mpsc::channel();
    let parent = {
        let (pool, ran_on) = (Arc::clone(&pool), Arc::clone(&ran_on));
        move || {
            let me = thread::current().id();
            let left = Arc::new(AtomicUsize::new(100));
            for _ in 0..100 {
                let (ran_on, left, done_tx) =
                    (Arc::clone(&ran_on), Arc::clone(&left), done_tx.clone());
                // From inside a job: onto this worker's own deque.
                pool.submit(move || {
                    ran_on.lock().unwrap().push(thread::current().id());
                    if left.fetch_sub(1, SeqCst) == 1 {
                        done_tx.send(()).unwrap();
                    }
                })
                .unwrap();
            }
            // Keep this worker busy until the children are done: only stealing can run them.
            done.recv_timeout(PATIENCE)
                .expect("children were not stolen");
            assert!(ran_on.lock().unwrap().iter().all(|t| *t != me));
        }
    };
    let (finished_tx, finished) = mpsc::channel();
    pool.submit(move || {
        parent();
        finished_tx.send(()).unwrap();
    })
    .unwrap();
    finished.recv_timeout(PATIENCE).unwrap();
    assert_eq!(ran_on.lock().unwrap().len(), 100);
    assert!(pool.stats().stolen >= 1);
    pool.drain();
}

#[test]
fn draining_accepts_jobs_submitted_by_running_jobs() {
    let pool = Arc::new(
        Pool::builder()
            .min_workers(1)
            .max_workers(1)
            .build()
            .unwrap(),
    );
    let (started_tx, started) = mpsc::channel();
    let (go_tx, go) = mpsc::channel::<()>();
    let child_ran = Arc::new(AtomicUsize::new(0));
    {
        let (pool, child_ran) = (Arc::clone(&pool), Arc::clone(&child_ran));
        pool.clone()
            .submit(move || {
                started_tx.send(()).unwrap();
                go.recv_timeout(PATIENCE).unwrap();
                let c = Arc::clone(&child_ran);
                pool.submit(move || {
                    c.fetch_add(1, SeqCst);
                })
                .expect("a running job may still submit while draining");
            })
            .unwrap();
    }
    started.recv_timeout(PATIENCE).unwrap();
    let drainer = {
        let pool = Arc::clone(&pool);
        thread::spawn(move || pool.drain())
    };
    eventually("the drain to begin", || pool.is_closed());
    assert!(matches!(pool.submit(|| {}), Err(SubmitError::Closed(_))));
    go_tx.send(()).unwrap();
    drainer.join().unwrap();
    assert_eq!(child_ran.load(SeqCst), 1);
}

#[test]
fn builder_validates_and_names_threads() {
    assert!(matches!(
        Pool::builder().max_workers(0).build(),
        Err(BuildError::NoWorkers)
    ));
    assert!(matches!(
        Pool::builder().queue_capacity(0).build(),
        Err(BuildError::ZeroCapacity)
    ));
    // min above max is clamped, as libvirt does at creation.
    let pool = Pool::builder()
        .min_workers(5)
        .max_workers(2)
        .prio_workers(1)
        .name("nm")
        .build()
        .unwrap();
    let s = pool.stats();
    assert_eq!((s.min_workers, s.workers, s.prio_workers), (2, 2, 1));
    let (started_tx, started) = mpsc::channel();
    let mut releases = Vec::new();
    let names = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..2 {
        let (block, release) = blocker(&started_tx);
        releases.push(release);
        let names = Arc::clone(&names);
        pool.submit(move || {
            names
                .lock()
                .unwrap()
                .push(thread::current().name().unwrap().to_string());
            block();
        })
        .unwrap();
    }
    started.recv_timeout(PATIENCE).unwrap();
    started.recv_timeout(PATIENCE).unwrap();
    let (tx, rx) = mpsc::channel();
    pool.submit_priority(move || {
        tx.send(thread::current().name().unwrap().to_string())
            .unwrap()
    })
    .unwrap();
    // Both normal workers are blocked: the priority worker runs it.
    assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), "prio-nm-2");
    drop(releases);
    pool.drain();
    let mut names = names.lock().unwrap().clone();
    names.sort();
    assert_eq!(names, vec!["nm-0", "nm-1"]);
}

/// Runs `f` on a thread of its own and reports whether it returned within [`PATIENCE`] (a
/// deadlock leaves the thread behind and fails the test).
fn returns_in_time(f: impl FnOnce() + Send + 'static) -> bool {
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    finished.recv_timeout(PATIENCE).is_ok()
}

#[test]
fn drain_and_dropping_the_last_arc_from_a_priority_job_do_not_deadlock() {
    for drop_it in [false, true] {
        assert!(
            returns_in_time(move || {
                let pool = Arc::new(
                    Pool::builder()
                        .min_workers(1)
                        .prio_workers(1)
                        .build()
                        .unwrap(),
                );
                let (ran, seen) = mpsc::channel();
                let inner = Arc::clone(&pool);
                let occupied = occupy(&pool);
                pool.submit_priority(move || {
                    if drop_it {
                        drop(inner);
                    } else {
                        inner.drain();
                    }
                    ran.send(()).unwrap();
                })
                .unwrap();
                seen.recv_timeout(PATIENCE)
                    .expect("the priority job finishes");
                drop(occupied);
                // The drain the job started completes from here.
                pool.drain();
            }),
            "drop_it={drop_it}"
        );
    }
}

#[test]
fn a_priority_job_submits_while_draining_and_past_a_full_queue() {
    let pool = Arc::new(
        Pool::builder()
            .min_workers(1)
            .max_workers(1)
            .prio_workers(1)
            .queue_capacity(1)
            .build()
            .unwrap(),
    );
    let occupied = occupy(&pool);
    pool.submit(|| {}).unwrap(); // the queue is full now
    let (result, got) = mpsc::channel();
    let inner = Arc::clone(&pool);
    pool.submit_priority(move || {
        let r = inner.submit(|| {});
        result.send(r.is_ok()).unwrap();
    })
    .unwrap();
    assert_eq!(got.recv_timeout(PATIENCE), Ok(true), "full queue");

    // While draining, a priority job's submit belongs to the work being finished.
    let (result, got) = mpsc::channel();
    let inner = Arc::clone(&pool);
    let (go, wait) = mpsc::channel::<()>();
    pool.submit_priority(move || {
        wait.recv_timeout(PATIENCE).unwrap();
        result.send(inner.try_submit(|| {}).is_ok()).unwrap();
    })
    .unwrap();
    let drainer = {
        let pool = Arc::clone(&pool);
        thread::spawn(move || pool.drain())
    };
    eventually("the drain to begin", || pool.is_closed());
    go.send(()).unwrap();
    assert_eq!(got.recv_timeout(PATIENCE), Ok(true), "draining");
    drop(occupied);
    drainer.join().unwrap();
}

#[test]
fn submit_priority_grows_a_pool_without_priority_workers() {
    let pool = Pool::builder()
        .min_workers(0)
        .max_workers(2)
        .build()
        .unwrap();
    assert_eq!(pool.stats().workers, 0);
    let (ran, seen) = mpsc::channel();
    pool.submit_priority(move || ran.send(()).unwrap()).unwrap();
    seen.recv_timeout(PATIENCE).expect("the priority job runs");

    // And drain finishes a priority job queued in a pool whose workers all retired.
    let pool = Pool::builder()
        .min_workers(0)
        .max_workers(1)
        .idle_timeout(Duration::from_millis(1))
        .build()
        .unwrap();
    let probe = Probe::default();
    pool.submit(probe.job()).unwrap();
    eventually("the worker to retire", || pool.stats().workers == 0);
    pool.submit_priority(probe.job()).unwrap();
    pool.drain();
    assert_eq!(probe.runs.load(SeqCst), 2);
}

#[test]
fn idle_retirement_never_strands_a_job() {
    let pool = Pool::builder()
        .min_workers(0)
        .max_workers(1)
        .idle_timeout(Duration::from_micros(300))
        .build()
        .unwrap();
    let (ran, seen) = mpsc::channel();
    for i in 0..3000u64 {
        // Gaps around the idle timeout, so that submits race the worker's retirement.
        if i % 3 != 0 {
            thread::sleep(Duration::from_micros(100 * (i % 7)));
        }
        let ran = ran.clone();
        pool.submit(move || ran.send(i).unwrap()).unwrap();
        assert_eq!(
            seen.recv_timeout(PATIENCE),
            Ok(i),
            "job {i} waited with no worker to run it"
        );
    }
}

#[test]
fn a_submit_racing_the_worker_on_its_way_to_sleep_always_wakes_it() {
    // An idle worker spins, then yields, then announces that it will sleep and searches once
    // more; a submit to the shared queue makes no fence of its own there (the queue's SeqCst
    // push pairs with the worker's fence). Gaps from none to a few hundred microseconds spread
    // the submits over that path; each job is awaited before the next submit, so a lost
    // wake-up strands it. A stress test: whether a submit lands in the narrowest window
    // depends on timing; a unit test in src/pool.rs pauses the worker there and puts one in
    // every time. One worker: with a second one asleep, every submit would wake that one.
    let pool = Pool::builder()
        .min_workers(1)
        .max_workers(1)
        .build()
        .unwrap();
    let (ran, seen) = mpsc::channel();
    for i in 0..20_000u64 {
        // Spread at nanosecond steps over the worker's few microseconds of spinning and
        // yielding (and, every fourth round, well past them): the window between its last
        // search and its announcement is well under a microsecond wide.
        let span = match i % 4 {
            0 => 10_000,
            1 | 2 => 40_000,
            _ => 400_000,
        };
        let gap = Duration::from_nanos((i * 7_919) % span);
        let start = Instant::now();
        while start.elapsed() < gap {
            std::hint::spin_loop();
        }
        let ran = ran.clone();
        pool.submit(move || {
            let _ = ran.send(i);
        })
        .unwrap();
        assert_eq!(
            seen.recv_timeout(PATIENCE),
            Ok(i),
            "job {i} was queued and no worker woke for it"
        );
    }
}

#[test]
fn a_blocked_submit_wakes_when_room_appears_not_when_a_job_ends() {
    let pool = Arc::new(
        Pool::builder()
            .min_workers(1)
            .max_workers(1)
            .queue_capacity(1)
            .build()
            .unwrap(),
    );
    let first = occupy(&pool);
    let (started_tx, started) = mpsc::channel();
    let (second, second_release) = blocker(&started_tx);
    pool.submit(second).unwrap(); // queued: the queue is full
    let (submitted_tx, submitted) = mpsc::channel();
    let submitter = {
        let pool = Arc::clone(&pool);
        thread::spawn(move || {
            pool.submit(|| {}).unwrap();
            submitted_tx.send(()).unwrap();
        })
    };
    // A second worker takes the queued job (which keeps running): room appears while no
    // job has ended.
    pool.set_limits(Some(2), Some(2), None).unwrap();
    started.recv_timeout(PATIENCE).unwrap();
    // (Both blocked jobs give up after PATIENCE; half of it tells the two cases apart.)
    assert!(
        submitted.recv_timeout(PATIENCE / 2).is_ok(),
        "the blocked submit was not woken when the queue gained room"
    );
    drop((first, second_release));
    submitter.join().unwrap();
}
