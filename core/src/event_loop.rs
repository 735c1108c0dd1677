//! [`EventLoop`] (owned by the thread that runs it) and [`LoopHandle`] (shared with everyone).

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::fence;
use crate::invokes::{Batch, Invokes};
use crate::local::{LoopLocal, WeakLoopLocal, thread_mark};
use crate::table::{DETACHED, FileIdent, Garbage, REMOVED, State, Taken, TimerFn, Wake, WatchCell};
use crate::timers::Due;
use crate::waker::Waker;
use crate::{Backend, Clock, Error, Events, Frequency, Readiness, TimerId, Token, WatchId};

pub(crate) struct Shared {
    state: Mutex<State>,
    /// [`thread_mark`] of the thread inside an iteration of this loop (or inside the loop's
    /// drop, or inside [`EventLoop::with_local`]), 0 when none. Only that thread stores it,
    /// so a thread that reads its own mark here is that thread.
    runner: AtomicU64,
    /// Closures from [`LoopHandle::invoke`]: a lock-free queue, so a worker handing a result
    /// back never contends with the loop for `state`, and the loop takes all of them with
    /// one atomic swap.
    invokes: Invokes<LoopHandle>,
    /// The id of the watch whose callback runs now on the loop thread, 0 when none. The loop
    /// stores it, fences ([`fence::light`]), then reads the watch's flags; a remover stores
    /// the flags, fences ([`fence::heavy`]), then reads this: one of them sees the other (a
    /// Dekker pair whose full fence is paid by the rare remover, see [`crate::fence`]).
    running: AtomicU64,
    /// The dispatch pass counter: odd while a pass runs (the number every watch it took
    /// carries in its cell), even otherwise. The loop stores the odd number under the state
    /// lock when it takes the ready watches, and the next even one, without the lock, once
    /// the last callback of the pass returned; changers read it under the lock to learn
    /// whether the watch they change may be running (see `State::in_pass`).
    pass: AtomicU64,
    /// Whether removers make the handshake's full fence for the loop ([`fence::asymmetric`]).
    asymmetric: bool,
    /// Removers from other threads waiting for `running` to change.
    waiters: AtomicUsize,
    /// Held by a waiting remover around its check of `running`, and by the loop to notify.
    wait_lock: Mutex<()>,
    /// Signalled when `running` changes while a remover waits.
    finished: Condvar,
    waker: Waker,
    quit: AtomicBool,
    /// The backend's clock, or `None` for [`Instant::now`].
    clock: Option<Clock>,
}

impl Shared {
    /// Whether the calling thread is inside an iteration of this loop.
    pub(crate) fn runs_on_this_thread(&self) -> bool {
        self.runner.load(Ordering::Acquire) == thread_mark()
    }

    fn now(&self) -> Instant {
        self.clock.as_ref().map_or_else(Instant::now, Clock::now)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No user code runs under this lock, so a poisoned lock only means a panic inside the
        // table itself; its data is still consistent enough to drop.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called after watch `id` was removed or paused while it was taken by the running
    /// dispatch pass (a watch the pass did not take is not running and will not run in this
    /// pass), with the lock released: from another thread, waits
    /// until an invocation of it that had already started returns, so that nothing of it
    /// runs once the caller returns. The loop thread never waits (the invocation is its own
    /// caller).
    fn wait_for_invocation(&self, on_loop_thread: bool, id: WatchId) {
        if on_loop_thread {
            return;
        }
        // Between the flags stored by the caller and the read of `running`.
        fence::heavy(self.asymmetric);
        if self.running.load(SeqCst) != id.0 {
            return;
        }
        let mut guard = self
            .wait_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_add(1, SeqCst);
        // Between the count and the read of `running`: the loop, which reads the count after
        // it stored `running`, either sees this waiter or has its store seen here.
        fence::heavy(self.asymmetric);
        while self.running.load(SeqCst) == id.0 {
            guard = self
                .finished
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.waiters.fetch_sub(1, SeqCst);
    }

    /// Loop thread: says the watch that was running (if any) has returned and `next` (0 for
    /// none) runs now, and wakes removers waiting for the one that returned.
    #[inline]
    fn set_running(&self, next: u64) {
        // Release: a remover that reads the new value sees everything the returned callback
        // did. The fence orders the store before the reads that follow (the waiters here, the
        // next watch's flags in the caller).
        self.running.store(next, Ordering::Release);
        fence::light(self.asymmetric);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            let _guard = self
                .wait_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.finished.notify_all();
        }
    }
}

/// Marks the calling thread as the loop's runner until dropped (also when a callback
/// unwinds).
struct Runner<'a>(&'a Shared);

impl<'a> Runner<'a> {
    fn enter(shared: &'a Shared) -> Self {
        shared.runner.store(thread_mark(), Ordering::Release);
        Runner(shared)
    }
}

impl Drop for Runner<'_> {
    fn drop(&mut self) {
        self.0.runner.store(0, Ordering::Release);
    }
}

/// A cheap, cloneable, thread-safe handle to an [`EventLoop`]: libvirt's event API.
///
/// Every method may be called from any thread and from inside any callback of the loop,
/// including the callback of the watch or timer it changes. A change made from another thread
/// while the loop is blocked wakes it at once; changes made on the loop thread cost no wakeup.
///
/// Callbacks run on the loop thread, one at a time, with no lock held.
#[derive(Clone)]
pub struct LoopHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LoopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopHandle").finish_non_exhaustive()
    }
}

/// Checks that `fd` is open and returns what file it names.
fn file_ident(fd: RawFd) -> io::Result<FileIdent> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(
            rustix::io::Errno::BADF.raw_os_error(),
        ));
    }
    // SAFETY: `fd` is non-negative, so it is a valid `BorrowedFd` value, and the borrow lives
    // only for this one `fstat`. If the number is not open the kernel answers EBADF, which is
    // reported to the caller; no memory is touched through the fd.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let stat = rustix::fs::fstat(borrowed)?;
    Ok(FileIdent {
        dev: stat.st_dev,
        ino: stat.st_ino,
        // Anonymous inodes have no file type bits (`S_IFMT`).
        provable: stat.st_mode & 0o170_000 != 0,
    })
}

impl LoopHandle {
    /// Watches `fd` for `events` and calls `callback` on the loop thread whenever some hold
    /// (libvirt's `virEventAddHandle`).
    ///
    /// The callback gets the handle, the watch id, the fd and the conditions that hold,
    /// restricted to `events | ERROR | HANGUP`. It is called once per loop iteration while
    /// they hold (level-triggered): data left unread makes it fire again. A watch whose
    /// `events` is empty is registered but never fires. Several watches on one fd are allowed;
    /// each gets only its own bits. The callback's captured state is dropped, exactly once and
    /// on the loop thread, after the watch is removed (libvirt's free function).
    ///
    /// vireo never closes `fd`. Remove every watch on an fd before closing it: closing a
    /// watched fd is a contract violation, after which what the stale watch hears depends on
    /// the backend and on whether the number is reused (see the crate docs, *File
    /// descriptors*).
    ///
    /// Each add checks `fd` with one `fstat` (is it open, and which file is it) and allocates
    /// the callback. To stop and restart a watch that stays on the same file, pause and
    /// resume it with [`update_handle`](LoopHandle::update_handle) instead of removing it
    /// and adding a new one: that costs neither.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with `EBADF` when `fd` is not an open file descriptor (the same error on
    /// every backend), [`Error::Closed`] when the loop was dropped. A new watch is not
    /// dispatched in the iteration that is running when it is added.
    pub fn add_handle<F>(&self, fd: RawFd, events: Events, callback: F) -> Result<WatchId, Error>
    where
        F: FnMut(&LoopHandle, WatchId, RawFd, Events) + Send + 'static,
    {
        let ident = file_ident(fd)?;
        let cell: Box<WatchCell> = Box::new(WatchCell::new(callback));
        let id = {
            let mut state = self.shared.lock();
            if state.closed {
                drop(state);
                drop(cell);
                return Err(Error::Closed);
            }
            state.add_watch(fd, ident, events, cell)
        };
        self.shared.waker.changed();
        Ok(id)
    }

    /// Replaces the set of conditions a watch waits for (libvirt's `virEventUpdateHandle`).
    ///
    /// An empty set pauses the watch without removing it; like
    /// [`remove_handle`](LoopHandle::remove_handle), a pause from another thread returns only
    /// once an invocation of the watch that already started has returned, and the watch is
    /// not called again until it is resumed. Updating a watch to its current set
    /// costs nothing; pausing and resuming within one iteration costs no system call.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWatch`] when the id was never returned by this loop or was removed;
    /// [`Error::Closed`] when the loop was dropped.
    pub fn update_handle(&self, id: WatchId, events: Events) -> Result<(), Error> {
        self.update(id, events, true)
    }

    /// Like [`update_handle`](LoopHandle::update_handle), but a pause never waits: an
    /// invocation of the watch that began before this call (on the loop thread, while this
    /// runs on another) may still be running when it returns; none begins after it returns.
    ///
    /// This is the rule of libvirt's own loops, for callers that may hold a lock the running
    /// callback is waiting for (libvirt's client pauses its socket's watch while it holds
    /// the connection's lock): a waiting pause would deadlock there.
    ///
    /// # Errors
    ///
    /// As [`update_handle`](LoopHandle::update_handle).
    pub fn update_handle_nowait(&self, id: WatchId, events: Events) -> Result<(), Error> {
        self.update(id, events, false)
    }

    fn update(&self, id: WatchId, events: Events, wait: bool) -> Result<(), Error> {
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            let pass = self.shared.pass.load(Ordering::Acquire);
            let Some(in_pass) = state.update_watch(id, events, pass) else {
                return Err(Error::UnknownWatch(id));
            };
            drop(state);
            if wait && in_pass && events.is_empty() {
                let on_loop_thread = self.shared.runs_on_this_thread();
                self.shared.wait_for_invocation(on_loop_thread, id);
            }
        }
        self.shared.waker.changed();
        Ok(())
    }

    /// Removes a watch (libvirt's `virEventRemoveHandle`). The fd is not closed.
    ///
    /// From the moment this returns the watch's callback is not running and never runs again,
    /// even if its event was already in the batch being dispatched: called from another thread
    /// while the loop thread is inside that very callback, this waits until the callback
    /// returns (so the callback must not wait for the thread that removes it, or both wait
    /// forever; from the loop thread, including from the callback itself, it never waits).
    /// Its callback's state is dropped later on the loop thread (at the end of the running
    /// iteration, or at the start of the next one), never inside this call. The fd may be
    /// closed as soon as this returns.
    ///
    /// Where the kernel allows `membarrier(2)`'s expedited command (Linux 4.14 on), this
    /// check costs the loop nothing per callback: a remover on another thread whose watch is
    /// in the batch being dispatched pays one `membarrier` system call instead, and removing
    /// any other watch pays nothing. Elsewhere the loop makes one full fence per callback.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWatch`] when the id is unknown or already removed; [`Error::Closed`]
    /// when the loop was dropped.
    pub fn remove_handle(&self, id: WatchId) -> Result<(), Error> {
        self.remove(id, true)
    }

    /// Like [`remove_handle`](LoopHandle::remove_handle), but never waits: an invocation of
    /// the watch that began before this call (on the loop thread, while this runs on
    /// another) may still be running when it returns; none begins after it returns. The
    /// callback's state is still dropped on the loop thread, after that invocation returned
    /// and after this call returned.
    ///
    /// libvirt's rule (its client removes watches while holding locks its callbacks take);
    /// the fd may be closed only once a running invocation is known to be over, which is
    /// what the drop of the callback's state tells (libvirt's free callback).
    ///
    /// # Errors
    ///
    /// As [`remove_handle`](LoopHandle::remove_handle).
    pub fn remove_handle_nowait(&self, id: WatchId) -> Result<(), Error> {
        self.remove(id, false)
    }

    fn remove(&self, id: WatchId, wait: bool) -> Result<(), Error> {
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            let pass = self.shared.pass.load(Ordering::Acquire);
            let Some(in_pass) = state.remove_watch(id, pass) else {
                return Err(Error::UnknownWatch(id));
            };
            drop(state);
            if wait && in_pass {
                let on_loop_thread = self.shared.runs_on_this_thread();
                self.shared.wait_for_invocation(on_loop_thread, id);
            }
        }
        self.shared.waker.changed();
        Ok(())
    }

    /// Whether the caller runs on this loop's thread, inside one of its iterations (a
    /// callback, or the drop of a callback's state), or inside
    /// [`EventLoop::with_local`]: where [`LoopLocal::with`] succeeds.
    pub fn is_loop_thread(&self) -> bool {
        self.shared.runs_on_this_thread()
    }

    /// Adds a timer that calls `callback` on the loop thread at `frequency`
    /// (libvirt's `virEventAddTimeout`).
    ///
    /// A periodic timer's first deadline is one period from now. A timer added during an
    /// iteration is first considered in the next one.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] when the loop was dropped.
    pub fn add_timeout<F>(&self, frequency: Frequency, callback: F) -> Result<TimerId, Error>
    where
        F: FnMut(&LoopHandle, TimerId) + Send + 'static,
    {
        let callback: Box<TimerFn> = Box::new(callback);
        let id = {
            let mut state = self.shared.lock();
            if state.closed {
                drop(state);
                drop(callback);
                return Err(Error::Closed);
            }
            let now = self.shared.now();
            state.timers.add(frequency, callback, now)
        };
        self.shared.waker.changed();
        Ok(id)
    }

    /// Changes a timer's frequency (libvirt's `virEventUpdateTimeout`). A period restarts from
    /// now, also when it is unchanged. Works from inside the timer's own callback.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTimer`] when the id is unknown or removed; [`Error::Closed`] when the
    /// loop was dropped.
    pub fn update_timeout(&self, id: TimerId, frequency: Frequency) -> Result<(), Error> {
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            let now = self.shared.now();
            if !state.timers.update(id, frequency, now) {
                return Err(Error::UnknownTimer(id));
            }
        }
        self.shared.waker.changed();
        Ok(())
    }

    /// Removes a timer (libvirt's `virEventRemoveTimeout`). It never fires again, even if it
    /// was due in the running iteration; its callback's state is dropped later on the loop
    /// thread, never inside this call.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTimer`] when the id is unknown or already removed; [`Error::Closed`]
    /// when the loop was dropped.
    pub fn remove_timeout(&self, id: TimerId) -> Result<(), Error> {
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Error::Closed);
            }
            if !state.timers.remove(id) {
                return Err(Error::UnknownTimer(id));
            }
        }
        self.shared.waker.changed();
        Ok(())
    }

    /// Runs `f` once on the loop thread, in the order of the `invoke` calls. This is how a
    /// worker thread hands a result back to the loop.
    ///
    /// Queued closures run at the end of an iteration, after its timers and watches: a closure
    /// queued before that phase begins runs in it, one queued during it (by another closure)
    /// runs in the next iteration. The loop does not block while closures are queued.
    ///
    /// Closures still queued when the loop is dropped are dropped without running.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] when the loop was dropped (`f` is dropped).
    pub fn invoke<F>(&self, f: F) -> Result<(), Error>
    where
        F: FnOnce(&LoopHandle) + Send + 'static,
    {
        // Fails once the loop was dropped; the closure comes back and is dropped here.
        if let Err(f) = self.shared.invokes.push(f) {
            drop(f);
            return Err(Error::Closed);
        }
        self.shared.waker.changed();
        Ok(())
    }

    /// Asks [`EventLoop::run`] to return after its current iteration; wakes it if it is
    /// blocked. A quit requested while `run` is not running makes the next `run` return after
    /// at most one iteration.
    pub fn quit(&self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        self.shared.waker.changed();
    }

    /// Wraps `value` as state that only this loop's thread reaches, through
    /// [`LoopLocal::with`] from inside the loop's callbacks, and through
    /// [`EventLoop::with_local`] between iterations. No lock is ever taken for it.
    pub fn local<T: Send>(&self, value: T) -> LoopLocal<T> {
        LoopLocal::new(Arc::clone(&self.shared), value)
    }

    /// Like [`local`](LoopHandle::local), for a value that refers to itself: `value` gets a
    /// [`WeakLoopLocal`] to the value being made (which `upgrade`s to `None` until this
    /// returns), as `Arc::new_cyclic` does. A value that keeps a weak reference to itself
    /// can hand strong clones to the callbacks it adds, without keeping itself alive.
    pub fn local_cyclic<T: Send>(
        &self,
        value: impl FnOnce(&WeakLoopLocal<T>) -> T,
    ) -> LoopLocal<T> {
        LoopLocal::new_cyclic(Arc::clone(&self.shared), value)
    }
}

/// Counters describing what a loop has done, for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LoopStats {
    /// Completed calls to the backend's wait.
    pub iterations: u64,
    /// Callbacks run (watches, timers and invoked closures).
    pub dispatched: u64,
    /// Registrations, modifications and deregistrations sent to the backend.
    pub kernel_changes: u64,
    /// Writes to the wakeup eventfd (only made while the loop was asleep).
    pub wake_writes: u64,
    /// Times the backend was replaced by a fresh instance because the kernel kept reporting
    /// a registration of a file that was closed and replaced (see the crate docs).
    pub backend_rebuilds: u64,
}

/// The watches taken for one dispatch pass; ends the pass when dropped (normally after its
/// last callback, or when a callback or anything after the taking panics), so that changers
/// stop waiting for its callbacks and the next pass starts from an empty list.
struct RunningWatches<'a> {
    shared: &'a Shared,
    taken: &'a mut Vec<Taken>,
    /// The pass's (odd) number.
    pass: u64,
}

impl Drop for RunningWatches<'_> {
    fn drop(&mut self) {
        if self.taken.is_empty() {
            return;
        }
        // The last callback has returned (or unwound): waiting removers may go on.
        self.shared.set_running(0);
        self.shared.pass.store(self.pass + 1, Ordering::Release);
        // The cells may be freed by the next purge: no pointer to them may survive the pass.
        self.taken.clear();
    }
}

/// The same for a timer callback.
struct RunningTimer<'a> {
    shared: &'a Shared,
    due: Due,
    cb: Option<Box<TimerFn>>,
}

impl Drop for RunningTimer<'_> {
    fn drop(&mut self) {
        if let Some(cb) = self.cb.take() {
            self.shared.lock().timers.put_back(&self.due, cb);
        }
    }
}

/// An event loop on backend `B` (libvirt's `virEventRunDefaultImpl` and the state behind it).
///
/// The loop is driven by the thread that owns it, through [`run_once`](EventLoop::run_once)
/// or [`run`](EventLoop::run); every other interaction goes through a [`LoopHandle`].
///
/// # One iteration
///
/// 1. Drop the state of watches and timers removed since the last purge.
/// 2. Send the net interest change of every changed fd to the backend (nothing for an fd
///    whose watches were removed and re-added, or paused and resumed, in between).
/// 3. Wait until an fd is ready, the earliest timer is due, or another thread changes
///    something. The wait does not block while an every-iteration timer exists or
///    closures are queued.
/// 4. Dispatch, in this order: due timers by deadline then id; ready watches in ascending id
///    order; queued closures in FIFO order. Only what existed when dispatch began is
///    considered; anything removed meanwhile is skipped.
/// 5. Purge again.
///
/// A callback that panics unwinds out of `run_once`; the loop stays consistent and usable
/// (the watch or timer stays registered, other ready watches fire in the next iteration,
/// timers that were due but had not run yet stay due).
///
/// Dropping the loop drops every remaining callback on the dropping thread; handles then
/// return [`Error::Closed`].
pub struct EventLoop<B: Backend> {
    backend: B,
    handle: LoopHandle,
    ready: Vec<Readiness>,
    /// The watches of the dispatch pass (empty between passes, kept for its capacity).
    taken: Vec<Taken>,
    /// The number of the next dispatch pass (odd): a pass that takes no watch keeps it.
    pass: u64,
    /// Closures taken from [`Shared::invokes`] that have not run yet: empty between
    /// iterations unless a closure panicked, in which case the rest run first in the next
    /// iteration.
    invoked: Batch<LoopHandle>,
    due: Vec<Due>,
    /// Index into `due` of the next timer to dispatch; `due[due_next..]` survive a panic.
    due_next: usize,
    /// Set by an iteration that ended with nothing left to purge or sync: the change counter
    /// then and when the next wait must end. While the counter has not moved, the next
    /// iteration needs no lock before its wait.
    clean: Option<(u64, Wake)>,
    iterations: u64,
    dispatched: u64,
    rebuilds: u64,
}

impl<B: Backend> std::fmt::Debug for EventLoop<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("backend", &self.backend.name())
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> EventLoop<B> {
    /// Creates a loop on a new instance of backend `B`.
    ///
    /// # Errors
    ///
    /// The backend's creation error, or the eventfd's.
    pub fn new() -> io::Result<Self> {
        Self::with_backend(B::new()?)
    }

    /// Creates a loop on an existing backend instance.
    ///
    /// # Errors
    ///
    /// When the backend refuses to register the loop's wakeup eventfd.
    pub fn with_backend(mut backend: B) -> io::Result<Self> {
        let waker = Waker::new()?;
        backend.register(waker.raw_fd(), Token::WAKER, Events::READABLE)?;
        let clock = backend.clock();
        Ok(EventLoop {
            backend,
            handle: LoopHandle {
                shared: Arc::new(Shared {
                    state: Mutex::new(State::default()),
                    runner: AtomicU64::new(0),
                    invokes: Invokes::new(),
                    running: AtomicU64::new(0),
                    pass: AtomicU64::new(0),
                    asymmetric: fence::asymmetric(),
                    waiters: AtomicUsize::new(0),
                    wait_lock: Mutex::new(()),
                    finished: Condvar::new(),
                    waker,
                    quit: AtomicBool::new(false),
                    clock,
                }),
            },
            ready: Vec::with_capacity(256),
            taken: Vec::with_capacity(256),
            pass: 1,
            invoked: Batch::default(),
            due: Vec::new(),
            due_next: 0,
            clean: None,
            iterations: 0,
            dispatched: 0,
            rebuilds: 0,
        })
    }

    /// The loop's handle; clone it freely and send it to other threads.
    pub fn handle(&self) -> &LoopHandle {
        &self.handle
    }

    /// The backend's name (`"poll"`, `"epoll"`, `"io-uring"`, ...).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// What the backend says about itself: name, setup flags, timeout precision, ...
    pub fn backend_info(&self) -> crate::BackendInfo {
        self.backend.info()
    }

    /// The backend, for inspection.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// What the loop has done so far.
    pub fn stats(&self) -> LoopStats {
        let kernel_changes = self.handle.shared.lock().kernel_changes;
        LoopStats {
            iterations: self.iterations,
            dispatched: self.dispatched,
            kernel_changes,
            wake_writes: self.handle.shared.waker.writes(),
            backend_rebuilds: self.rebuilds,
        }
    }

    /// Calls `f` with the value of `local`, from the thread that owns the loop, between
    /// iterations (the `&mut self` proves that no iteration runs on any thread). Inside `f`,
    /// this thread counts as the loop thread: other `LoopLocal`s of this loop are reachable
    /// too.
    ///
    /// # Errors
    ///
    /// [`Error::NotLoopThread`] when `local` was made by another loop's handle;
    /// [`Error::Borrowed`] when called from inside a [`LoopLocal::with`] of the same value.
    ///
    /// # Panics
    ///
    /// Unwinds with `f`'s panic; the value stays usable.
    pub fn with_local<T: Send, R>(
        &mut self,
        local: &LoopLocal<T>,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, Error> {
        if !local.belongs_to(&self.handle.shared) {
            return Err(Error::NotLoopThread);
        }
        let _runner = Runner::enter(&self.handle.shared);
        local.with(f)
    }

    /// Runs one iteration, blocking as long as needed (forever if nothing is registered and no
    /// other thread ever wakes the loop). Returns the number of callbacks run, which may be 0
    /// after a wakeup.
    ///
    /// An interest change that the backend refuses (`ENOMEM`, `ENOSPC`, ...) is not an error
    /// of the loop: it belongs to that fd, whose watches (those with a non-empty interest)
    /// receive [`Events::ERROR`] in this iteration, while every other fd is served as usual.
    /// The change is retried in every following iteration, with `ERROR` delivered each time
    /// it fails, until it lands or the watches are removed or paused.
    ///
    /// # Errors
    ///
    /// The backend's error from waiting or from sending queued changes to the kernel
    /// (io_uring's submit). The loop stays usable.
    ///
    /// # Panics
    ///
    /// Unwinds with the panic of a callback (see the type's docs).
    pub fn run_once(&mut self) -> io::Result<usize> {
        self.iterate(None)
    }

    /// Runs one iteration, blocking at most `max_wait`. Returns the number of callbacks run.
    ///
    /// # Errors
    ///
    /// As [`run_once`](EventLoop::run_once).
    ///
    /// # Panics
    ///
    /// Unwinds with the panic of a callback.
    pub fn run_once_timeout(&mut self, max_wait: Duration) -> io::Result<usize> {
        self.iterate(Some(max_wait))
    }

    /// Runs iterations until [`LoopHandle::quit`] is called, then returns.
    ///
    /// # Errors
    ///
    /// The first error of [`run_once`](EventLoop::run_once).
    ///
    /// # Panics
    ///
    /// Unwinds with the panic of a callback.
    pub fn run(&mut self) -> io::Result<()> {
        loop {
            if self.handle.shared.quit.swap(false, Ordering::SeqCst) {
                return Ok(());
            }
            self.iterate(None)?;
        }
    }

    fn iterate(&mut self, max_wait: Option<Duration>) -> io::Result<usize> {
        // Borrowed, not cloned: no reference-count traffic per iteration.
        let shared: &Shared = &self.handle.shared;
        let _runner = Runner::enter(shared);
        // Every change up to `seen` was made (under the lock) before it was counted, so the
        // table read below holds it; a later one shows up in the wait's check of the counter.
        let seen = shared.waker.seq();
        let clean = self.clean.take().filter(|&(seq, _)| {
            // Nothing changed since the last iteration purged and synced, and no timer of a
            // panicked pass waits to be restored: the table needs no visit.
            seq == seen && self.due_next == self.due.len()
        });
        // When the wait must end, and whether every fd's interest reached the backend.
        let (wake, synced) = match clean {
            Some((_, wake)) => {
                self.due.clear();
                self.due_next = 0;
                (wake, true)
            }
            None => {
                // Callback state removed since the last purge: dropped here, on this thread,
                // with no lock held (declared before the lock guard, so also dropped after it
                // on error).
                let mut garbage = Garbage::default();
                let mut state = shared.lock();
                if self.due_next < self.due.len() {
                    // A timer callback panicked in the previous iteration.
                    state.timers.restore_due(&self.due[self.due_next..]);
                }
                self.due.clear();
                self.due_next = 0;
                state.purge(&mut garbage);
                state.sync(&mut self.backend)?;
                let table = (state.next_wake(), state.is_synced());
                drop(state);
                drop(garbage);
                table
            }
        };
        let mut timeout = match wake {
            Wake::Never => None,
            Wake::Now => Some(Duration::ZERO),
            Wake::At(deadline) => Some(deadline.saturating_duration_since(shared.now())),
        };
        if shared.quit.load(Ordering::SeqCst) {
            timeout = Some(Duration::ZERO);
        }
        // Checked after `seen` was read: a closure queued later bumps the sequence, so the
        // wait below either sees the bump or is woken by the eventfd.
        let timeout = if self.invoked.is_empty() && shared.invokes.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let timeout = match (timeout, max_wait) {
            (Some(t), Some(m)) => Some(t.min(m)),
            (t, m) => t.or(m),
        };
        // A wait that does not block is not asleep: changes from other threads meanwhile
        // cost them no eventfd write (the next iteration sees them anyway).
        let marked_asleep = timeout != Some(Duration::ZERO);
        let timeout = if !marked_asleep || shared.waker.sleep(seen) {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        self.ready.clear();
        let waited = self.backend.wait(&mut self.ready, timeout);
        if marked_asleep {
            shared.waker.awake();
        }
        waited?;
        self.iterations += 1;

        // One lock for everything dispatch needs from the table: the due timers and the ready
        // watches, taken in one pass over the reports (their callbacks stay in their cells;
        // the pass's number in a cell tells changers that the callback may be running).
        // Whether a watch was removed or paused since is read from its cell, without the
        // lock, just before it runs.
        let mut now = None;
        // Ends the pass also when anything from here on panics (a callback, a queued
        // closure, the backend while it is replaced).
        let running = RunningWatches {
            shared,
            taken: &mut self.taken,
            pass: self.pass,
        };
        // Whether this iteration must visit the table again at its end, whatever changed.
        let mut revisit = !synced;
        {
            let mut state = shared.lock();
            let mut stale = false;
            let pass = running.pass;
            for r in &self.ready {
                if r.token == Token::WAKER {
                    shared.waker.drain();
                } else {
                    stale |= !state.take_ready(r.token, r.events, pass, running.taken);
                }
            }
            // A registration the backend refused is that fd's error, reported to its watches
            // (a token gone since then has nobody left to tell).
            if !state.failed.is_empty() {
                revisit = true;
                for token in std::mem::take(&mut state.failed) {
                    state.take_ready(token, Events::ERROR, pass, running.taken);
                }
            }
            if !running.taken.is_empty() {
                // Changers learn under this lock that the taken watches may be running.
                shared.pass.store(pass, Ordering::Relaxed);
                self.pass = pass + 2;
            }
            if stale {
                // Without a fresh instance (out of fds, say) the loop goes on with this one:
                // the stale reports are dropped as they come, and the next one tries again.
                revisit = true;
                drop(state);
                let _ = replace_backend(&mut self.backend, shared, &mut self.rebuilds);
                state = shared.lock();
            }
            // Ascending id order, whatever order the backend reported in.
            if !running.taken.is_sorted_by_key(|t| t.id) {
                running.taken.sort_unstable_by_key(|t| t.id);
            }
            // The clock is read only when a timer may be due.
            if state.timers.has_any() {
                let t = shared.now();
                state.timers.collect_due(t, &mut self.due);
                now = Some(t);
            }
        }

        let mut count = 0;
        if let Some(now) = now {
            while self.due_next < self.due.len() {
                let due = self.due[self.due_next];
                self.due_next += 1;
                let Some(cb) = shared.lock().timers.start(&due, now) else {
                    continue;
                };
                let mut timer = RunningTimer {
                    shared,
                    due,
                    cb: Some(cb),
                };
                count += 1;
                self.dispatched += 1;
                if let Some(cb) = timer.cb.as_mut() {
                    cb(&self.handle, due.id);
                }
                drop(timer);
            }
        }

        for t in running.taken.iter() {
            // The previous callback has returned; this one may start (a remover from another
            // thread either sees it running or this load sees the removal).
            shared.set_running(t.id.0);
            // SAFETY: the cell is alive: cells are freed only by purges, which run on this
            // thread before and after the pass, never inside it (callbacks reach the table
            // only through the handle, which never purges, and `clear` needs the loop).
            let flags = unsafe { t.cell.flags() }.load(Ordering::Acquire);
            if flags & (REMOVED | DETACHED) != 0 {
                continue;
            }
            let events = Events::from_bits_truncate(flags);
            if events.is_empty() {
                continue;
            }
            let deliver = t.ready & (events | Events::ALWAYS);
            if deliver.is_empty() {
                continue;
            }
            count += 1;
            self.dispatched += 1;
            // SAFETY: alive as above; this is the loop thread inside its pass, and no other
            // borrow of the callback exists (the previous one's call has returned).
            let cb = unsafe { t.cell.callback() };
            cb(&self.handle, t.id, t.fd, deliver);
        }
        // The last watch callback has returned: waiting removers may go on.
        drop(running);

        // Closures queued before this phase began run in it; those they queue wait for the
        // next iteration.
        // (Left over from a panicked phase first: they were queued earlier.)
        self.invoked.append(shared.invokes.take());
        while let Some(f) = self.invoked.pop() {
            count += 1;
            self.dispatched += 1;
            f.run(&self.handle);
        }

        if !revisit && self.due.is_empty() && shared.waker.seq() == seen {
            // Nothing changed since this iteration read the table, and it was synced then:
            // nothing to purge or sync, and the wake-up deadline stands.
            self.clean = Some((seen, wake));
            return Ok(count);
        }
        let mut garbage = Garbage::default();
        {
            let mut state = shared.lock();
            state.purge(&mut garbage);
            // Apply this iteration's removals and changes now rather than at the next
            // iteration: a backend whose pending polls hold file references (io_uring) then
            // lets the caller's close take effect (the peer sees EOF) as soon as run_once
            // returns. An error here leaves the fd dirty; the next iteration retries it and
            // reports the error.
            let synced = state.sync(&mut self.backend).is_ok() && state.is_synced();
            self.clean = synced.then(|| (shared.waker.seq(), state.next_wake()));
        }
        drop(garbage);
        Ok(count)
    }
}

/// Starts over with a fresh backend instance when the kernel reported a registration that
/// the core no longer has. epoll keys registrations by open file, not fd number: when a
/// watched number was closed and reused while another fd kept the old file open, the old
/// registration can no longer be deleted and would report the old file forever. Only a new
/// epoll instance drops it. poll never gets here (it rebuilds its array from the table).
fn replace_backend<B: Backend>(
    current: &mut B,
    shared: &Shared,
    rebuilds: &mut u64,
) -> io::Result<()> {
    let mut backend = current.fresh()?;
    backend.register(shared.waker.raw_fd(), Token::WAKER, Events::READABLE)?;
    *current = backend;
    *rebuilds += 1;
    let mut state = shared.lock();
    state.forget_kernel();
    state.sync(current)
}

impl<B: Backend> Drop for EventLoop<B> {
    fn drop(&mut self) {
        let mut garbage = Garbage::default();
        let shared = Arc::clone(&self.handle.shared);
        shared.lock().clear(&mut garbage);
        // The callbacks' state may reach its `LoopLocal`s as it drops, as on the loop thread.
        let runner = Runner::enter(&shared);
        drop(garbage);
        // Queued closures are dropped without running, here on this thread; the queue is
        // closed first, so one whose drop calls `invoke` gets `Error::Closed` instead of
        // queueing forever.
        let mut queued = shared.invokes.close();
        queued.append(std::mem::take(&mut self.invoked));
        drop(queued);
        drop(runner);
    }
}
