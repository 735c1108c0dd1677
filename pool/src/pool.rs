//! [`Pool`], its builder, submission, limits, stats and shutdown.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use crossbeam_utils::{Backoff, CachePadded};

use crate::sleep::{Sleep, Woke};
use crate::{BuildError, LimitsError, Stats, SubmitError};

/// A job: any closure that can be sent to a worker thread.
///
/// Jobs are boxed closures rather than a typed `Pool<T>` with one handler (libvirt's
/// `jobFunc`): a closure carries its own context (the client a reply goes to, say), so one pool
/// serves every kind of work. A closure that captures nothing boxes without allocating; one that
/// captures data costs one small allocation per job (measured by `vireo-bench pool`).
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Called with the payload of every job that panicked, on the worker that ran it.
pub type PanicHook = Arc<dyn Fn(&(dyn Any + Send)) + Send + Sync + 'static>;

/// Which jobs a worker takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Priority jobs first, then its own deque, the shared queue, other workers' deques.
    Normal,
    /// Priority jobs only.
    Priority,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    /// `drain()`: refuse outside submits, finish every queued job, then exit.
    Draining,
    /// `shutdown_now()`: refuse submits, drop queued jobs, exit after the running ones.
    Stopping,
}

/// Limits and membership, changed under one mutex.
struct Control {
    min: usize,
    max: usize,
    prio_max: usize,
    workers: usize,
    prio_workers: usize,
    mode: Mode,
    handles: Vec<JoinHandle<()>>,
    next_index: usize,
}

struct Shared {
    id: usize,
    name: String,
    idle_timeout: Option<Duration>,
    capacity: Option<usize>,
    panic_hook: Option<PanicHook>,

    injector: Injector<Job>,
    prio_injector: Injector<Job>,
    /// The deques of live normal workers, by slot; `None` for a slot whose worker exited.
    stealers: RwLock<Vec<Option<Stealer<Job>>>>,
    /// Bumped (under the write lock) whenever `stealers` changes, so that searching workers
    /// keep their own copy and take no lock while the set of workers stays the same.
    stealers_version: AtomicUsize,
    sleep: Sleep,
    prio_sleep: Sleep,

    control: Mutex<Control>,
    /// Signalled when a worker exits, for `drain`/`shutdown_now`, and when a bounded queue
    /// gains room, for blocked `submit`s.
    changed: Condvar,
    closed: AtomicBool,

    // Mirrors of `Control` for lock-free checks on hot paths.
    max: AtomicUsize,
    workers: AtomicUsize,
    prio_workers: AtomicUsize,

    free: CachePadded<AtomicUsize>,
    /// Flushed from each worker's own count when it goes idle, exits, or every
    /// [`FLUSH_EVERY`] jobs, so the hot path touches no shared counter for it.
    completed: CachePadded<AtomicU64>,
    panicked: AtomicU64,
    stolen: AtomicU64,
    dropped: AtomicU64,
    blocked_submitters: AtomicUsize,
}

/// How many jobs a worker runs before adding its count to [`Stats::completed`](crate::Stats).
const FLUSH_EVERY: u64 = 1024;

/// A worker's own copy of the other workers' deques to steal from, refreshed when
/// [`Shared::stealers_version`] moves.
struct Victims {
    version: usize,
    stealers: Vec<Stealer<Job>>,
}

impl Victims {
    fn new() -> Victims {
        Victims {
            version: usize::MAX,
            stealers: Vec::new(),
        }
    }

    fn refresh(&mut self, shared: &Shared) -> &[Stealer<Job>] {
        let version = shared.stealers_version.load(SeqCst);
        if version != self.version {
            let all = shared
                .stealers
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            // Read again under the lock: a change that raced the first read is then seen.
            self.version = shared.stealers_version.load(SeqCst);
            self.stealers = all.iter().flatten().cloned().collect();
        }
        &self.stealers
    }
}

/// The worker context of the current thread, if it is a worker of some pool: its own deque
/// for a normal worker, none for a priority worker (which is still one of the pool's own
/// threads: it must not wait for the pool to stop, nor block on a full queue).
struct Local {
    pool: usize,
    deque: Option<Worker<Job>>,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cheap generator for the random victim of a steal (xorshift on a per-thread seed).
fn random_index(n: usize) -> usize {
    thread_local! {
        static SEED: std::cell::Cell<u64> = std::cell::Cell::new({
            let addr = &SEED as *const _ as u64;
            addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
        });
    }
    SEED.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x % n as u64) as usize
    })
}

/// Configures and starts a [`Pool`].
///
/// ```
/// use std::time::Duration;
/// use vireo_pool::Pool;
///
/// let pool = Pool::builder()
///     .min_workers(2)
///     .max_workers(8)
///     .prio_workers(1)
///     .name("rpc")
///     .queue_capacity(10_000)
///     .idle_timeout(Duration::from_secs(30))
///     .build()?;
/// assert_eq!(pool.stats().workers, 2);
/// # Ok::<(), vireo_pool::BuildError>(())
/// ```
#[derive(Clone)]
pub struct PoolBuilder {
    min: usize,
    max: usize,
    prio: usize,
    name: String,
    capacity: Option<usize>,
    idle_timeout: Option<Duration>,
    panic_hook: Option<PanicHook>,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("min", &self.min)
            .field("max", &self.max)
            .field("prio", &self.prio)
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for PoolBuilder {
    fn default() -> Self {
        let cores = thread::available_parallelism().map_or(1, |n| n.get());
        PoolBuilder {
            min: cores,
            max: cores,
            prio: 0,
            name: "vireo-worker".into(),
            capacity: None,
            idle_timeout: None,
            panic_hook: None,
        }
    }
}

impl PoolBuilder {
    /// Normal workers started at once and never retired for idleness (default: the number of
    /// CPUs).
    pub fn min_workers(mut self, n: usize) -> Self {
        self.min = n;
        self
    }

    /// The most normal workers; the pool grows one worker at a time up to it while there are no
    /// more idle workers than queued jobs (default: the number of CPUs; at least 1).
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max = n;
        self
    }

    /// Workers that run only priority jobs, started at once (default 0).
    pub fn prio_workers(mut self, n: usize) -> Self {
        self.prio = n;
        self
    }

    /// The thread name prefix: normal workers are `NAME-N`, priority workers `prio-NAME-N`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Bounds the normal jobs that may wait in the queue: beyond it
    /// [`try_submit`](Pool::try_submit) answers [`SubmitError::Full`] and
    /// [`submit`](Pool::submit) from outside the pool blocks. Priority jobs and jobs submitted
    /// by running jobs are never refused for space.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Workers above `min_workers` exit after being idle this long (default: never).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Called with the payload of every panicking job (the job is counted in
    /// [`Stats::panicked`] either way and its worker keeps serving).
    pub fn panic_hook(mut self, hook: impl Fn(&(dyn Any + Send)) + Send + Sync + 'static) -> Self {
        self.panic_hook = Some(Arc::new(hook));
        self
    }

    /// Starts the pool with `min_workers` normal and `prio_workers` priority workers.
    ///
    /// `min_workers` above `max_workers` is clamped to it, as libvirt does at creation.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoWorkers`] when `max_workers` is 0 (run such work inline instead),
    /// [`BuildError::ZeroCapacity`] for a queue capacity of 0, [`BuildError::Spawn`] when a
    /// thread cannot be started.
    pub fn build(self) -> Result<Pool, BuildError> {
        if self.max == 0 {
            return Err(BuildError::NoWorkers);
        }
        if self.capacity == Some(0) {
            return Err(BuildError::ZeroCapacity);
        }
        static NEXT_POOL: AtomicUsize = AtomicUsize::new(1);
        let min = self.min.min(self.max);
        let shared = Arc::new(Shared {
            id: NEXT_POOL.fetch_add(1, SeqCst),
            name: self.name,
            idle_timeout: self.idle_timeout,
            capacity: self.capacity,
            panic_hook: self.panic_hook,
            injector: Injector::new(),
            prio_injector: Injector::new(),
            stealers: RwLock::new(Vec::new()),
            stealers_version: AtomicUsize::new(0),
            sleep: Sleep::new(),
            prio_sleep: Sleep::new(),
            control: Mutex::new(Control {
                min,
                max: self.max,
                prio_max: self.prio,
                workers: 0,
                prio_workers: 0,
                mode: Mode::Running,
                handles: Vec::new(),
                next_index: 0,
            }),
            changed: Condvar::new(),
            closed: AtomicBool::new(false),
            max: AtomicUsize::new(self.max),
            workers: AtomicUsize::new(0),
            prio_workers: AtomicUsize::new(0),
            free: CachePadded::new(AtomicUsize::new(0)),
            completed: CachePadded::new(AtomicU64::new(0)),
            panicked: AtomicU64::new(0),
            stolen: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            blocked_submitters: AtomicUsize::new(0),
        });
        let pool = Pool { shared };
        {
            let mut control = lock(&pool.shared.control);
            for _ in 0..min {
                spawn(&pool.shared, &mut control, Kind::Normal).map_err(BuildError::Spawn)?;
            }
            for _ in 0..self.prio {
                spawn(&pool.shared, &mut control, Kind::Priority).map_err(BuildError::Spawn)?;
            }
        }
        Ok(pool)
    }
}

/// A worker pool with libvirt's `virThreadPool` semantics on a work-stealing design.
///
/// - Jobs from outside go to a shared FIFO queue; jobs submitted by a running job go to that
///   worker's own deque, where idle workers steal them.
/// - Priority jobs have their own queue, read first by normal workers and exclusively by
///   priority workers, so a queue of slow jobs never delays an urgent one when priority workers
///   exist.
/// - The pool grows one worker at a time, up to `max_workers`, while there are no more idle
///   workers than queued jobs; [`set_limits`](Pool::set_limits) changes the limits at run time.
/// - A job's panic is caught and counted; its worker keeps serving.
/// - Dropping the pool [drains](Pool::drain) it.
///
/// ```
/// use std::sync::mpsc;
/// use vireo_pool::Pool;
///
/// let pool = Pool::builder().min_workers(2).max_workers(2).build()?;
/// let (tx, rx) = mpsc::channel();
/// for i in 0..10 {
///     let tx = tx.clone();
///     pool.submit(move || tx.send(i * i).unwrap()).unwrap();
/// }
/// let mut squares: Vec<i32> = rx.iter().take(10).collect();
/// squares.sort();
/// assert_eq!(squares[9], 81);
/// pool.drain();
/// # Ok::<(), vireo_pool::BuildError>(())
/// ```
pub struct Pool {
    shared: Arc<Shared>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.name)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Starts one worker of `kind`; the caller holds the control lock.
fn spawn(shared: &Arc<Shared>, control: &mut Control, kind: Kind) -> std::io::Result<()> {
    control.handles.retain(|h| !h.is_finished());
    let index = control.next_index;
    control.next_index += 1;
    let (deque, slot) = match kind {
        Kind::Normal => {
            let deque = Worker::new_fifo();
            let mut stealers = shared
                .stealers
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let slot = match stealers.iter().position(Option::is_none) {
                Some(free) => free,
                None => {
                    stealers.push(None);
                    stealers.len() - 1
                }
            };
            stealers[slot] = Some(deque.stealer());
            shared.stealers_version.fetch_add(1, SeqCst);
            (Some(deque), slot)
        }
        Kind::Priority => (None, usize::MAX),
    };
    let name = match kind {
        Kind::Normal => format!("{}-{index}", shared.name),
        Kind::Priority => format!("prio-{}-{index}", shared.name),
    };
    let worker_shared = Arc::clone(shared);
    let handle = thread::Builder::new()
        .name(name)
        .spawn(move || run_worker(worker_shared, kind, deque, slot));
    match handle {
        Ok(handle) => {
            match kind {
                Kind::Normal => {
                    control.workers += 1;
                    shared.workers.store(control.workers, SeqCst);
                }
                Kind::Priority => {
                    control.prio_workers += 1;
                    shared.prio_workers.store(control.prio_workers, SeqCst);
                }
            }
            control.handles.push(handle);
            Ok(())
        }
        Err(e) => {
            if kind == Kind::Normal {
                shared.forget_stealer(slot);
            }
            Err(e)
        }
    }
}

impl Shared {
    fn is_local(&self) -> bool {
        LOCAL.with(|l| l.borrow().as_ref().is_some_and(|l| l.pool == self.id))
    }

    /// Removes the deque of the worker in `slot` from the set others steal from.
    fn forget_stealer(&self, slot: usize) {
        let mut stealers = self
            .stealers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        stealers[slot] = None;
        self.stealers_version.fetch_add(1, SeqCst);
    }

    /// The next job for a worker of `kind`, in crossbeam-deque's `find_task` order.
    fn find_task(
        &self,
        kind: Kind,
        local: Option<&Worker<Job>>,
        victims: &mut Victims,
    ) -> Option<Job> {
        // An emptiness check first: `steal` on an empty injector costs a full fence, and
        // this runs before every job.
        while !self.prio_injector.is_empty() {
            match self.prio_injector.steal() {
                Steal::Success(job) => return Some(job),
                Steal::Retry => continue,
                Steal::Empty => break,
            }
        }
        if kind == Kind::Priority {
            return None;
        }
        let local = local?;
        // Waiting jobs are counted by the queues themselves (`queued_len`): taking one touches
        // no shared counter.
        if let Some(job) = local.pop() {
            return Some(job);
        }
        loop {
            match self.injector.steal_batch_and_pop(local) {
                Steal::Success(job) => {
                    if !local.is_empty() {
                        // The batch moved jobs into this worker's deque, where a worker that
                        // searched a moment ago did not see them: publish, so that a sleeping
                        // worker steals them instead of leaving them behind this job.
                        self.sleep.publish();
                    }
                    return Some(job);
                }
                Steal::Retry => continue,
                Steal::Empty => break,
            }
        }
        let stealers = victims.refresh(self);
        let n = stealers.len();
        if n == 0 {
            return None;
        }
        loop {
            let mut retry = false;
            let start = random_index(n);
            for i in 0..n {
                match stealers[(start + i) % n].steal_batch_and_pop(local) {
                    Steal::Success(job) => {
                        self.stolen.fetch_add(1, SeqCst);
                        if !local.is_empty() {
                            self.sleep.publish();
                        }
                        return Some(job);
                    }
                    Steal::Retry => retry = true,
                    Steal::Empty => {}
                }
            }
            if !retry {
                return None;
            }
        }
    }

    /// Runs a job; returns whether it completed (rather than panicked).
    fn run_job(&self, job: Job) -> bool {
        // Taking the job made room in a bounded queue: wake blocked submitters now, not when
        // the job finishes (it may run for a long time). The pop is a queue operation, not a
        // SeqCst counter: fence so that a submitter that announced itself is seen (or sees
        // the room).
        if self.capacity.is_some() && {
            std::sync::atomic::fence(SeqCst);
            self.blocked_submitters.load(SeqCst) > 0
        } {
            let _control = lock(&self.control);
            self.changed.notify_all();
        }
        match catch_unwind(AssertUnwindSafe(job)) {
            Ok(()) => true,
            Err(payload) => {
                self.panicked.fetch_add(1, SeqCst);
                if let Some(hook) = &self.panic_hook {
                    let _ = catch_unwind(AssertUnwindSafe(|| hook(&*payload)));
                }
                // The payload is dropped here, on the worker, like the job's other state.
                false
            }
        }
    }

    /// Normal jobs waiting: in the shared queue plus in the workers' deques, read from the
    /// queues themselves (a snapshot; a job moving between two queues may be missed for a
    /// moment, which at worst lets a draining worker exit while the one holding it finishes).
    fn queued_len(&self) -> usize {
        let in_deques: usize = self
            .stealers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .map(Stealer::len)
            .sum();
        self.injector.len() + in_deques
    }

    fn nothing_queued(&self) -> bool {
        self.prio_injector.is_empty() && self.queued_len() == 0
    }

    /// Whether a worker of `kind` must exit, given the control state.
    fn must_exit(&self, control: &Control, kind: Kind, idle_timed_out: bool) -> bool {
        let (alive, limit) = match kind {
            Kind::Normal => (control.workers, control.max),
            Kind::Priority => (control.prio_workers, control.prio_max),
        };
        match control.mode {
            Mode::Stopping => true,
            Mode::Draining => self.nothing_queued(),
            Mode::Running => {
                alive > limit || (idle_timed_out && kind == Kind::Normal && alive > control.min)
            }
        }
    }

    /// Whether a worker of `kind` must exit now; if so its count is already decremented.
    fn retire(&self, kind: Kind, idle_timed_out: bool) -> bool {
        let mut control = lock(&self.control);
        if !self.must_exit(&control, kind, idle_timed_out) {
            return false;
        }
        #[cfg(all(test, not(loom)))]
        if idle_timed_out {
            tests::hook(tests::Point::BeforeIdleRetirement, self.id);
        }
        self.count_worker(&mut control, kind, -1);
        if idle_timed_out && control.mode == Mode::Running && !self.nothing_queued() {
            // A job arrived while this worker timed out. The count went down first and the
            // queues are read after it (the fence pairs with `Pool::ensure_a_worker`): either
            // this read sees the job, or the submitter sees the lower count and grows the pool.
            self.count_worker(&mut control, kind, 1);
            return false;
        }
        self.changed.notify_all();
        true
    }

    /// Moves the count of workers of `kind` by `delta` (±1), with its lock-free mirror.
    fn count_worker(&self, control: &mut Control, kind: Kind, delta: isize) {
        let (count, mirror) = match kind {
            Kind::Normal => (&mut control.workers, &self.workers),
            Kind::Priority => (&mut control.prio_workers, &self.prio_workers),
        };
        *count = count.wrapping_add_signed(delta);
        mirror.store(*count, SeqCst);
        std::sync::atomic::fence(SeqCst);
    }

    /// A cheap check before taking the control lock in [`retire`](Shared::retire).
    fn may_retire(&self, kind: Kind) -> bool {
        if self.closed.load(SeqCst) {
            return true;
        }
        match kind {
            Kind::Normal => self.workers.load(SeqCst) > self.max.load(SeqCst),
            Kind::Priority => {
                let control = lock(&self.control);
                control.prio_workers > control.prio_max
            }
        }
    }

    fn sleep_of(&self, kind: Kind) -> &Sleep {
        match kind {
            Kind::Normal => &self.sleep,
            Kind::Priority => &self.prio_sleep,
        }
    }

    fn wake_everyone(&self) {
        self.sleep.wake_all();
        self.prio_sleep.wake_all();
    }
}

fn run_worker(shared: Arc<Shared>, kind: Kind, deque: Option<Worker<Job>>, slot: usize) {
    LOCAL.with(|l| {
        *l.borrow_mut() = Some(Local {
            pool: shared.id,
            deque,
        })
    });
    let mut victims = Victims::new();
    let mut find = |shared: &Shared| {
        LOCAL.with(|l| {
            let l = l.borrow();
            let local = l
                .as_ref()
                .filter(|l| l.pool == shared.id)
                .and_then(|l| l.deque.as_ref());
            shared.find_task(kind, local, &mut victims)
        })
    };
    let sleep = shared.sleep_of(kind);
    let mut timed_out = false;
    let mut completed = 0u64;
    let flush = |completed: &mut u64| {
        if *completed > 0 {
            shared
                .completed
                .fetch_add(std::mem::take(completed), SeqCst);
        }
    };
    loop {
        if (timed_out || shared.may_retire(kind)) && {
            flush(&mut completed);
            shared.retire(kind, timed_out)
        } {
            break;
        }
        timed_out = false;
        if let Some(job) = find(&shared) {
            completed += u64::from(shared.run_job(job));
            if completed >= FLUSH_EVERY {
                flush(&mut completed);
            }
            if shared.closed.load(SeqCst) && shared.nothing_queued() {
                // Draining and this was the last job: let the sleepers see it and exit.
                shared.wake_everyone();
            }
            continue;
        }
        flush(&mut completed);
        if kind == Kind::Normal {
            shared.free.fetch_add(1, SeqCst);
        }
        // Spin, then yield, for a few microseconds before sleeping (rayon's rounds): a job
        // that arrives meanwhile costs its submitter no futex wake and this worker no sleep.
        let backoff = Backoff::new();
        let mut found = None;
        while !backoff.is_completed() {
            backoff.snooze();
            found = find(&shared);
            if found.is_some() || shared.closed.load(SeqCst) {
                break;
            }
        }
        if let Some(job) = found {
            if kind == Kind::Normal {
                shared.free.fetch_sub(1, SeqCst);
            }
            completed += u64::from(shared.run_job(job));
            continue;
        }
        #[cfg(all(test, not(loom)))]
        tests::hook(tests::Point::BeforeAnnounce, shared.id);
        let ticket = sleep.announce();
        let found = find(&shared);
        if found.is_some() {
            sleep.retract();
        } else {
            let stop =
                || shared.may_retire(kind) && shared.must_exit(&lock(&shared.control), kind, false);
            let woke = sleep.sleep(ticket, shared.idle_timeout, stop);
            timed_out = woke == Woke::TimedOut;
        }
        if kind == Kind::Normal {
            shared.free.fetch_sub(1, SeqCst);
        }
        if let Some(job) = found {
            completed += u64::from(shared.run_job(job));
        }
    }
    flush(&mut completed);
    // Exiting: hand back what is left in the local deque (or drop it when stopping).
    let leftover = LOCAL.with(|l| l.borrow_mut().take());
    if kind == Kind::Normal {
        shared.forget_stealer(slot);
    }
    if let Some(deque) = leftover.and_then(|l| l.deque) {
        let stopping = lock(&shared.control).mode == Mode::Stopping;
        let mut moved = false;
        while let Some(job) = deque.pop() {
            if stopping {
                shared.dropped.fetch_add(1, SeqCst);
                drop(job);
            } else {
                shared.injector.push(job);
                moved = true;
            }
        }
        if moved {
            shared.sleep.publish();
        }
    }
    let _control = lock(&shared.control);
    shared.changed.notify_all();
}

impl Pool {
    /// A builder with the defaults (as many workers as CPUs, no priority workers).
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// Grows by one normal worker if there are no more idle workers than queued jobs (checked
    /// before the new job is queued, as libvirt does) and the maximum is not reached.
    fn maybe_grow(&self) {
        let s = &self.shared;
        if s.workers.load(SeqCst) >= s.max.load(SeqCst) {
            return;
        }
        if s.free.load(SeqCst) > s.queued_len() + s.prio_injector.len() {
            return;
        }
        self.grow(|_| true);
    }

    /// Starts one normal worker under the control lock if the pool runs, is below its
    /// maximum and `also` holds.
    fn grow(&self, also: impl FnOnce(&Control) -> bool) {
        let s = &self.shared;
        let mut control = lock(&s.control);
        if control.mode == Mode::Running && control.workers < control.max && also(&control) {
            // A failed spawn leaves the job to the existing workers.
            let _ = spawn(s, &mut control, Kind::Normal);
        }
    }

    /// After a job was queued: if every normal worker retired meanwhile (an idle timeout that
    /// raced this submit), start one, so that no job waits in a pool without workers.
    fn ensure_a_worker(&self) {
        std::sync::atomic::fence(SeqCst);
        self.ensure_a_worker_fenced();
    }

    /// [`ensure_a_worker`](Pool::ensure_a_worker) right after a `SeqCst` fence that followed
    /// the queueing.
    fn ensure_a_worker_fenced(&self) {
        let s = &self.shared;
        // Pairs with the fence in `Shared::count_worker`: a retiring worker lowers the count and
        // then reads the queues; the submitter queued (a SeqCst push or a fence, see
        // `push_normal`) and now reads the count.
        if s.workers.load(SeqCst) == 0 {
            self.grow(|control| control.workers == 0);
        }
    }

    /// Queues a normal job: on this worker's own deque when `local`, else on the injector.
    fn push_normal(&self, job: Job, local: bool) {
        let s = &self.shared;
        self.maybe_grow();
        let job = if local {
            LOCAL.with(|l| {
                match l
                    .borrow()
                    .as_ref()
                    .filter(|l| l.pool == s.id)
                    .and_then(|l| l.deque.as_ref())
                {
                    Some(deque) => {
                        deque.push(job);
                        None
                    }
                    None => Some(job),
                }
            })
        } else {
            Some(job)
        };
        // One fence after the job is visible serves both checks that follow: a sleepy worker
        // to wake, and a pool whose last worker just retired.
        if let Some(job) = job {
            s.injector.push(job);
            // The push was that fence: `Injector::push` claims its slot with a SeqCst
            // read-modify-write of the queue's tail, and the two checks read with SeqCst. The
            // other side of each pair (a worker announcing sleep, a worker retiring) writes,
            // makes a SeqCst fence and then reads that tail. So if a check misses the worker's
            // write, the check came first in the single SeqCst order, the push before it, and
            // the worker's read after its fence sees the push. (crossbeam-channel's senders
            // pair a SeqCst tail update with a SeqCst load the same way.) A fence of our own
            // here cut `vireo-bench pool`'s empty jobs from 33-42 to 6-9 Mj/s on a 2-CPU
            // machine, with workers taking jobs as fast as one submitter queued them.
        } else {
            // A worker's own deque publishes with a release store: fence for real.
            std::sync::atomic::fence(SeqCst);
        }
        s.sleep.publish_fenced();
        self.ensure_a_worker_fenced();
    }

    /// Queues a job. From inside a job of this pool the job goes to the running worker's own
    /// deque (other workers steal it); from outside it goes to the end of the shared queue.
    ///
    /// With a [queue capacity](PoolBuilder::queue_capacity), a submit from outside the pool
    /// blocks while the queue is full; use [`try_submit`](Pool::try_submit) on an event-loop
    /// thread.
    ///
    /// # Errors
    ///
    /// [`SubmitError::Closed`] with the job after [`drain`](Pool::drain) or
    /// [`shutdown_now`](Pool::shutdown_now) began (jobs submitted by running jobs are still
    /// accepted while draining, so that the work they belong to completes).
    pub fn submit<F>(&self, job: F) -> Result<(), SubmitError<Job>>
    where
        F: FnOnce() + Send + 'static,
    {
        let job: Job = Box::new(job);
        let s = &self.shared;
        let local = s.is_local();
        if !local {
            if let Some(cap) = s.capacity {
                // Announce before checking, and workers check after dequeuing (both SeqCst):
                // a worker that frees room either sees this submitter or is seen by it.
                let mut control = lock(&s.control);
                s.blocked_submitters.fetch_add(1, SeqCst);
                while s.queued_len() >= cap && control.mode == Mode::Running {
                    control = s
                        .changed
                        .wait(control)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                s.blocked_submitters.fetch_sub(1, SeqCst);
            }
        }
        if self.refuses(local) {
            return Err(SubmitError::Closed(job));
        }
        self.push_normal(job, local);
        Ok(())
    }

    /// Queues a job without ever blocking: for the event-loop thread.
    ///
    /// # Errors
    ///
    /// [`SubmitError::Full`] with the job when a bounded queue is full (only for submits from
    /// outside the pool), [`SubmitError::Closed`] after shutdown began.
    pub fn try_submit<F>(&self, job: F) -> Result<(), SubmitError<Job>>
    where
        F: FnOnce() + Send + 'static,
    {
        let job: Job = Box::new(job);
        let s = &self.shared;
        let local = s.is_local();
        if self.refuses(local) {
            return Err(SubmitError::Closed(job));
        }
        if let (Some(cap), false) = (s.capacity, local) {
            if s.queued_len() >= cap {
                return Err(SubmitError::Full(job));
            }
        }
        self.push_normal(job, local);
        Ok(())
    }

    /// Queues a priority job: run by a priority worker, or by the first normal worker to look
    /// for work, before any queued normal job. Never refused for space.
    ///
    /// # Errors
    ///
    /// [`SubmitError::Closed`] with the job after shutdown began.
    pub fn submit_priority<F>(&self, job: F) -> Result<(), SubmitError<Job>>
    where
        F: FnOnce() + Send + 'static,
    {
        let job: Job = Box::new(job);
        let s = &self.shared;
        if self.refuses(s.is_local()) {
            return Err(SubmitError::Closed(job));
        }
        if s.prio_workers.load(SeqCst) == 0 {
            // Only normal workers run it: grow as for a normal job.
            self.maybe_grow();
        }
        s.prio_injector.push(job);
        if !s.prio_sleep.publish() {
            s.sleep.publish();
        }
        if s.prio_workers.load(SeqCst) == 0 {
            self.ensure_a_worker();
        }
        Ok(())
    }

    fn refuses(&self, local: bool) -> bool {
        if !self.shared.closed.load(SeqCst) {
            return false;
        }
        // While draining, jobs submitted by running jobs belong to the work being finished.
        !(local && lock(&self.shared.control).mode == Mode::Draining)
    }

    /// Changes the limits at run time, as libvirt's `virThreadPoolSetParameters`: `None` leaves
    /// a limit unchanged.
    ///
    /// Raising `min` or `prio` starts workers at once; lowering `max` or `prio` makes surplus
    /// workers exit (idle ones at once, busy ones after their current job).
    ///
    /// # Errors
    ///
    /// [`LimitsError::MinAboveMax`] when the resulting min exceeds the resulting max,
    /// [`LimitsError::NoWorkers`] for a max of 0, [`LimitsError::Closed`] after shutdown began,
    /// [`LimitsError::Spawn`] when a worker cannot be started (limits already stored stay).
    pub fn set_limits(
        &self,
        min: Option<usize>,
        max: Option<usize>,
        prio: Option<usize>,
    ) -> Result<(), LimitsError> {
        let s = &self.shared;
        let mut control = lock(&s.control);
        if control.mode != Mode::Running {
            return Err(LimitsError::Closed);
        }
        let new_min = min.unwrap_or(control.min);
        let new_max = max.unwrap_or(control.max);
        if new_max == 0 {
            return Err(LimitsError::NoWorkers);
        }
        if new_min > new_max {
            return Err(LimitsError::MinAboveMax {
                min: new_min,
                max: new_max,
            });
        }
        control.min = new_min;
        control.max = new_max;
        s.max.store(new_max, SeqCst);
        if let Some(prio) = prio {
            control.prio_max = prio;
        }
        while control.workers < control.min {
            spawn(s, &mut control, Kind::Normal).map_err(LimitsError::Spawn)?;
        }
        while control.prio_workers < control.prio_max {
            spawn(s, &mut control, Kind::Priority).map_err(LimitsError::Spawn)?;
        }
        drop(control);
        // Surplus workers notice on waking.
        s.wake_everyone();
        Ok(())
    }

    /// Whether [`drain`](Pool::drain) or [`shutdown_now`](Pool::shutdown_now) has begun (submits
    /// from outside are refused).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(SeqCst)
    }

    /// What the pool is doing now.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        let control = lock(&s.control);
        Stats {
            min_workers: control.min,
            max_workers: control.max,
            workers: control.workers,
            free_workers: s.free.load(SeqCst),
            prio_workers: control.prio_workers,
            max_prio_workers: control.prio_max,
            queue_depth: s.queued_len(),
            prio_queue_depth: s.prio_injector.len(),
            completed: s.completed.load(SeqCst),
            panicked: s.panicked.load(SeqCst),
            stolen: s.stolen.load(SeqCst),
            dropped: s.dropped.load(SeqCst),
        }
    }

    /// Runs every queued job (and the jobs they submit), then joins every worker. Submits from
    /// outside are refused from the moment this is called. Idempotent. Called from one of the
    /// pool's own jobs it starts the drain without waiting for it.
    pub fn drain(&self) {
        self.stop(Mode::Draining);
    }

    /// Drops every queued job without running it (each job's captured state is dropped, so
    /// nothing leaks), lets running jobs finish, and joins every worker. Submits are refused
    /// from the moment this is called. Idempotent. Called from one of the pool's own jobs it
    /// stops the pool without waiting.
    pub fn shutdown_now(&self) {
        self.stop(Mode::Stopping);
    }

    fn stop(&self, mode: Mode) {
        let s = &self.shared;
        if s.is_local() {
            // Called by one of the pool's own jobs: it cannot wait for itself. Stop, and let
            // the workers finish on their own.
            let mut control = lock(&s.control);
            if control.mode == Mode::Running || mode == Mode::Stopping {
                control.mode = mode;
            }
            s.closed.store(true, SeqCst);
            drop(control);
            s.wake_everyone();
            return;
        }
        {
            let mut control = lock(&s.control);
            if control.mode == Mode::Running || mode == Mode::Stopping {
                control.mode = mode;
            }
            s.closed.store(true, SeqCst);
            // Draining with no normal worker (all retired, or none started yet): start one.
            // Normal workers run priority jobs too, so queued priority jobs count.
            if control.mode == Mode::Draining && control.workers == 0 && !s.nothing_queued() {
                let _ = spawn(s, &mut control, Kind::Normal);
            }
            s.changed.notify_all();
        }
        s.wake_everyone();
        if mode == Mode::Stopping {
            self.drop_queued();
        }
        let handles = {
            let mut control = lock(&s.control);
            while control.workers > 0 || control.prio_workers > 0 {
                control = s
                    .changed
                    .wait(control)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            std::mem::take(&mut control.handles)
        };
        for handle in handles {
            if handle.thread().id() != thread::current().id() {
                let _ = handle.join();
            }
        }
        // Priority jobs are run by normal workers too; anything a racing submit left behind
        // after the last worker exited is dropped, never leaked.
        self.drop_queued();
    }

    fn drop_queued(&self) {
        let s = &self.shared;
        for queue in [&s.injector, &s.prio_injector] {
            loop {
                match queue.steal() {
                    Steal::Success(job) => {
                        s.dropped.fetch_add(1, SeqCst);
                        drop(job);
                    }
                    Steal::Retry => continue,
                    Steal::Empty => break,
                }
            }
        }
    }
}

impl Drop for Pool {
    /// Drains: every queued job runs, then the workers are joined (when dropped by one of its
    /// own jobs, the pool drains without waiting).
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::mpsc;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// Where a worker runs a test's hook: windows in which a submit sees the worker as
    /// neither sleepy nor gone.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(super) enum Point {
        /// After its last search, before it announces that it will sleep.
        BeforeAnnounce,
        /// Idle-timed-out and about to retire, before it counts itself out (it holds the
        /// control lock, which a submit does not take).
        BeforeIdleRetirement,
    }

    /// A hook: the point, the pool, and what a worker of that pool runs there (once).
    type Hook = (Point, usize, Box<dyn FnOnce() + Send>);
    /// The hooks set by tests running at the same time (each for its own pool).
    static HOOKS: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

    pub(super) fn hook(point: Point, pool: usize) {
        let hook = {
            let mut hooks = lock(&HOOKS);
            let found = hooks
                .iter()
                .position(|&(p, id, _)| p == point && id == pool);
            found.map(|i| hooks.swap_remove(i).2)
        };
        if let Some(f) = hook {
            f();
        }
    }

    /// Sets a hook that pauses a worker of `pool` at `point`; returns the receiver told when
    /// it paused and the sender that lets it go on.
    fn pause_at(point: Point, pool: &Pool) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (paused_tx, paused) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        lock(&HOOKS).push((
            point,
            pool.shared.id,
            Box::new(move || {
                paused_tx.send(()).unwrap();
                let _ = go_rx.recv_timeout(PATIENCE);
            }),
        ));
        (paused, go)
    }

    #[test]
    fn a_job_submitted_between_the_last_search_and_the_announcement_is_run() {
        let pool = Pool::builder()
            .min_workers(1)
            .max_workers(1)
            .build()
            .unwrap();
        let (paused, go) = pause_at(Point::BeforeAnnounce, &pool);
        // The idle worker searched, spun and stopped right before announcing.
        paused.recv_timeout(PATIENCE).unwrap();
        let (ran_tx, ran) = mpsc::channel();
        pool.submit(move || {
            let _ = ran_tx.send(());
        })
        .unwrap();
        // The submit saw no sleepy worker and woke nobody: the worker's search after its
        // announcement must find the job.
        assert_eq!(pool.shared.sleep.sleeping(), 0);
        go.send(()).unwrap();
        assert!(
            ran.recv_timeout(PATIENCE).is_ok(),
            "the job waited with its only worker asleep"
        );
    }

    #[test]
    fn a_job_submitted_while_the_last_worker_retires_is_run() {
        let pool = Pool::builder()
            .min_workers(0)
            .max_workers(1)
            .idle_timeout(Duration::from_millis(1))
            .build()
            .unwrap();
        let (paused, go) = pause_at(Point::BeforeIdleRetirement, &pool);
        // Start the one worker; it runs the job, idles, times out and stops before counting
        // itself out.
        let (ran_tx, ran) = mpsc::channel();
        let first = ran_tx.clone();
        pool.submit(move || {
            let _ = first.send(1);
        })
        .unwrap();
        assert_eq!(ran.recv_timeout(PATIENCE), Ok(1));
        paused.recv_timeout(PATIENCE).unwrap();
        // The submit still counts one worker and starts none (the paused worker holds the
        // control lock, so read the count's lock-free mirror).
        pool.submit(move || {
            let _ = ran_tx.send(2);
        })
        .unwrap();
        assert_eq!(pool.shared.workers.load(SeqCst), 1);
        go.send(()).unwrap();
        assert_eq!(
            ran.recv_timeout(PATIENCE),
            Ok(2),
            "the job was left in a pool whose last worker retired"
        );
    }
}
