//! vireo's worker pool: libvirt's `virThreadPool` semantics on a work-stealing design.
//!
//! The event loop does the minimum (reads a whole message) and hands the work to a [`Pool`];
//! when no worker is free the job waits at the end of a queue. Workers are the threads of a
//! crossbeam-deque work-stealing scheduler: jobs from outside enter a shared FIFO
//! [`Injector`](crossbeam_deque::Injector), jobs submitted by running jobs go to the worker's own
//! deque where idle workers steal them, priority jobs have a queue of their own served first by
//! every worker and exclusively by priority workers.
//!
//! | libvirt | vireo |
//! |---|---|
//! | `virThreadPoolNewFull(min, max, prio, ...)` | [`Pool::builder`] ... [`build`](PoolBuilder::build) |
//! | `virThreadPoolSendJob(pool, 0, job)` | [`Pool::submit`], [`Pool::try_submit`] (never blocks) |
//! | `virThreadPoolSendJob(pool, 1, job)` | [`Pool::submit_priority`] |
//! | `virThreadPoolSetParameters` | [`Pool::set_limits`] |
//! | `virThreadPoolGet*` | [`Pool::stats`] |
//! | `virThreadPoolDrain` / `Free` | [`Pool::drain`] / drop |
//! | `virThreadPoolStop` | [`Pool::shutdown_now`] (queued jobs are dropped, never leaked) |
//!
//! Where libvirt's behaviour is a bug, vireo does what it meant: the pool grows while idle
//! workers are *not more than* queued jobs (libvirt's unsigned subtraction only grew when they
//! were equal), and stopping drops queued jobs' state instead of leaking it.
//!
//! The sleep protocol (how idle workers block and how a submit wakes exactly one, without lost
//! wake-ups and without a system call while all are busy) is documented in `src/sleep.rs` and
//! model-checked with loom.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use vireo_pool::Pool;
//!
//! let pool = Pool::builder().min_workers(2).max_workers(4).prio_workers(1).build()?;
//! let done = Arc::new(AtomicUsize::new(0));
//! for _ in 0..100 {
//!     let done = Arc::clone(&done);
//!     pool.submit(move || { done.fetch_add(1, Ordering::SeqCst); }).unwrap();
//! }
//! let urgent = Arc::clone(&done);
//! pool.submit_priority(move || { urgent.fetch_add(1000, Ordering::SeqCst); }).unwrap();
//! pool.drain();
//! assert_eq!(done.load(Ordering::SeqCst), 1100);
//! assert_eq!(pool.stats().completed, 101);
//! # Ok::<(), vireo_pool::BuildError>(())
//! ```
#![deny(missing_docs)]

mod pool;
mod sleep;

use std::{error, fmt, io};

pub use pool::{Job, PanicHook, Pool, PoolBuilder};

/// A snapshot of a pool's state (libvirt's admin fields, and more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Normal workers kept even when idle.
    pub min_workers: usize,
    /// The most normal workers.
    pub max_workers: usize,
    /// Normal workers alive now.
    pub workers: usize,
    /// Normal workers idle now (searching or asleep).
    pub free_workers: usize,
    /// Priority workers alive now.
    pub prio_workers: usize,
    /// The configured number of priority workers.
    pub max_prio_workers: usize,
    /// Normal jobs waiting (shared queue and workers' deques).
    pub queue_depth: usize,
    /// Priority jobs waiting.
    pub prio_queue_depth: usize,
    /// Jobs that returned. Each worker adds its count when it goes idle, exits, or has run
    /// 1024 jobs, so while workers are busy this lags behind by at most that per worker.
    pub completed: u64,
    /// Jobs that panicked (caught; their worker kept serving).
    pub panicked: u64,
    /// Jobs taken from another worker's deque.
    pub stolen: u64,
    /// Jobs dropped without running by [`Pool::shutdown_now`].
    pub dropped: u64,
}

/// Why a pool could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// `max_workers` is 0: run such work inline instead (libvirt's server does).
    NoWorkers,
    /// A queue capacity of 0 would refuse every job.
    ZeroCapacity,
    /// A worker thread could not be started.
    Spawn(io::Error),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoWorkers => f.write_str("max_workers must be at least 1"),
            BuildError::ZeroCapacity => f.write_str("queue capacity must be at least 1"),
            BuildError::Spawn(e) => write!(f, "cannot start a worker thread: {e}"),
        }
    }
}

impl error::Error for BuildError {
    fn source(&self) -> Option<&(dyn error::Error + 'static)> {
        match self {
            BuildError::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

/// Why [`Pool::set_limits`] refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum LimitsError {
    /// The resulting minimum would exceed the resulting maximum.
    MinAboveMax {
        /// The minimum asked for (or kept).
        min: usize,
        /// The maximum asked for (or kept).
        max: usize,
    },
    /// A maximum of 0 workers.
    NoWorkers,
    /// The pool is draining or stopped.
    Closed,
    /// A worker thread could not be started; the limits were stored.
    Spawn(io::Error),
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitsError::MinAboveMax { min, max } => write!(
                f,
                "min_workers ({min}) cannot be larger than max_workers ({max})"
            ),
            LimitsError::NoWorkers => f.write_str("max_workers must be at least 1"),
            LimitsError::Closed => f.write_str("the pool is shutting down"),
            LimitsError::Spawn(e) => write!(f, "cannot start a worker thread: {e}"),
        }
    }
}

impl error::Error for LimitsError {
    fn source(&self) -> Option<&(dyn error::Error + 'static)> {
        match self {
            LimitsError::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

/// A refused job, handed back to the caller.
pub enum SubmitError<T> {
    /// The bounded queue is full ([`Pool::try_submit`] only).
    Full(T),
    /// The pool is draining or stopped.
    Closed(T),
}

impl<T> SubmitError<T> {
    /// The job that was refused.
    pub fn into_inner(self) -> T {
        match self {
            SubmitError::Full(t) | SubmitError::Closed(t) => t,
        }
    }

    /// Whether the queue was full (rather than the pool closed).
    pub fn is_full(&self) -> bool {
        matches!(self, SubmitError::Full(_))
    }
}

impl<T> fmt::Debug for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full(_) => f.write_str("Full(..)"),
            SubmitError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> fmt::Display for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full(_) => f.write_str("the pool's queue is full"),
            SubmitError::Closed(_) => f.write_str("the pool is shutting down"),
        }
    }
}

impl<T> error::Error for SubmitError<T> {}
