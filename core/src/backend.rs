//! The seam between the core and the operating system.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Events, Token};

/// One readiness report from a backend: which registration, and which conditions hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The token given to [`Backend::register`] or [`Backend::reregister`].
    pub token: Token,
    /// The conditions that hold, as a subset of `READABLE | WRITABLE | ERROR | HANGUP`.
    pub events: Events,
}

/// What a backend says about itself: its name and a few facts worth logging (setup flags,
/// timeout precision, why a fallback was taken).
///
/// ```
/// use vireo_core::BackendInfo;
///
/// let info = BackendInfo::new("epoll").with("timeouts", "ns");
/// assert_eq!(info.get("timeouts"), Some("ns"));
/// assert_eq!(info.to_string(), "epoll (timeouts=ns)");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// The backend's name, as in [`Backend::NAME`].
    pub name: &'static str,
    /// `(key, value)` facts, in the order the backend gave them.
    pub details: Vec<(&'static str, String)>,
}

impl BackendInfo {
    /// Info with a name and no details.
    pub fn new(name: &'static str) -> BackendInfo {
        BackendInfo {
            name,
            details: Vec::new(),
        }
    }

    /// Adds a fact.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> BackendInfo {
        self.details.push((key, value.into()));
        self
    }

    /// The value of a fact, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.details
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)?;
        for (i, (k, v)) in self.details.iter().enumerate() {
            f.write_str(if i == 0 { " (" } else { ", " })?;
            write!(f, "{k}={v}")?;
        }
        if !self.details.is_empty() {
            f.write_str(")")?;
        }
        Ok(())
    }
}

/// Where a loop reads the time for its timers: the monotonic clock, unless the backend brings
/// its own (a test backend can make time pass without waiting).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    /// A clock that reads `now`; it must never go backwards.
    pub fn new(now: impl Fn() -> Instant + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    /// The time now.
    pub fn now(&self) -> Instant {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}

/// An OS readiness mechanism (poll, epoll, io_uring, ...) that an
/// [`EventLoop`](crate::EventLoop) runs on.
///
/// # The contract
///
/// The core does all of libvirt's bookkeeping (several watches per fd, delivery masks, ids,
/// ordering, deferred removal, timers, cross-thread wakeups), so a backend only has to keep a
/// kernel interest set and wait on it. Every backend must follow these rules; the
/// `vireo-conformance` suite checks each of them.
///
/// 1. **Threads.** Every method is called on the loop thread only, through `&mut self`.
///    Other threads never touch a backend; they change the core's table and wake the loop,
///    which applies the changes before its next wait. A backend may be created on one thread
///    and used on another, so long as it is `Send`.
/// 2. **One registration per fd number.** The core never registers an fd number that is
///    already registered; it calls [`reregister`](Backend::reregister) to change the interest
///    or token and [`deregister`](Backend::deregister) to stop. The core validates every fd
///    with `fstat` before its first registration.
/// 3. **Interest.** The `interest` passed in is a subset of `READABLE | WRITABLE` and may be
///    empty: an empty interest still reports `ERROR` and `HANGUP`.
/// 4. **Level-triggered.** A condition that still holds is reported again by the next
///    [`wait`](Backend::wait); nothing is consumed for the caller and no re-arming is needed
///    from the core. Spurious reports and spurious early returns are allowed; the core
///    re-checks.
/// 5. **Reported conditions.** `READABLE` and `WRITABLE` only when in the interest; `ERROR`
///    and `HANGUP` always. Nothing else (`POLLRDHUP`, `POLLPRI`, `POLLNVAL` are never reported).
/// 6. **Files that cannot be polled** (regular files, directories, `/dev/null`) are always
///    ready for their whole interest, as poll(2) reports them. A backend whose kernel refuses
///    such files (epoll's `EPERM`) emulates this.
/// 7. **An fd closed while registered** is a contract violation by the caller. The backend
///    must not crash, panic or spin, and may report at most one more readiness for it (an
///    io_uring poll already in flight holds its own reference to the file) before it goes
///    silent (poll silences `POLLNVAL`; epoll loses the registration with the last reference
///    to the file; io_uring's re-arm fails with `EBADF`). A later
///    [`deregister`](Backend::deregister) may fail with `EBADF`, `ENOENT` or `EPERM` (the
///    number reused by a file that cannot be polled), which the core ignores. Readiness the
///    backend cannot attribute to a current registration (the kernel kept a registration for
///    a file that was closed and replaced) is reported with
///    [`Token::UNKNOWN`] or its old token, never with a current one.
/// 8. **Timeouts.** `wait(None)` blocks until an event or a wakeup; `wait(Some(d))` returns
///    after at most about `d`, never *before* `d` unless an event arrived (round up, never
///    down); `Some(Duration::ZERO)` does not block. `EINTR` is a normal empty return.
/// 9. **Wakeups.** The core owns an eventfd, registers it as an ordinary readable fd with
///    [`Token::WAKER`] and drains it itself; a backend needs no notifier of its own.
pub trait Backend: Sized {
    /// A short, stable name for tables and logs: `"poll"`, `"epoll"`, ...
    const NAME: &'static str;

    /// The name of the backend in use; differs from [`NAME`](Backend::NAME) only for backends
    /// that choose at run time.
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// What the backend says about itself (see [`BackendInfo`]).
    fn info(&self) -> BackendInfo {
        BackendInfo::new(self.name())
    }

    /// The clock the loop's timers run on; `None` (the default) is [`Instant::now`]. Asked
    /// once, when the loop is created. A clock of its own lets a test backend advance time
    /// instead of sleeping; `wait(Some(d))` must then return once `d` has passed on that clock.
    fn clock(&self) -> Option<Clock> {
        None
    }

    /// Creates the backend's kernel object (an epoll fd, a ring, ...).
    ///
    /// # Errors
    ///
    /// Whatever the kernel says when the mechanism is unavailable.
    fn new() -> io::Result<Self>;

    /// A new, empty instance configured like this one. The loop calls it to start over when
    /// the kernel keeps reporting a registration that cannot be deleted any more (see
    /// [`LoopStats::backend_rebuilds`](crate::LoopStats::backend_rebuilds)); the replacement
    /// must be the same mechanism with the same options, or a loop built on one backend would
    /// silently continue on another. The default is [`Backend::new`]; a backend whose
    /// instances differ (one chosen at run time, one sharing a test's script) overrides it.
    ///
    /// # Errors
    ///
    /// As [`Backend::new`].
    fn fresh(&self) -> io::Result<Self> {
        Self::new()
    }

    /// Starts watching `fd` for `interest`, reporting it with `token`.
    ///
    /// # Errors
    ///
    /// The kernel's error (`EBADF` for an fd closed since the core checked it, `ENOMEM`, ...).
    fn register(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()>;

    /// Replaces the interest and token of a registered fd.
    ///
    /// # Errors
    ///
    /// The kernel's error.
    fn reregister(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()>;

    /// Stops watching a registered fd.
    ///
    /// # Errors
    ///
    /// The kernel's error; `EBADF`, `ENOENT` and `EPERM` (the fd was closed while registered,
    /// and its number may name another file by now) are ignored by the core.
    fn deregister(&mut self, fd: RawFd, token: Token) -> io::Result<()>;

    /// Called after each batch of registration changes, before the loop returns or waits. A
    /// backend that queues changes (io_uring) sends the ones that must reach the kernel now
    /// (removals, whose pending polls keep files open) here. The default does nothing.
    ///
    /// # Errors
    ///
    /// The kernel's error.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Waits for readiness or until `timeout` passes, appending reports to `ready` (which the
    /// core clears first). At most one report per token per call (the core merges duplicates
    /// into one call per watch all the same).
    ///
    /// # Errors
    ///
    /// The kernel's error, other than `EINTR`.
    fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()>;
}
