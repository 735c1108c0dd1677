//! The test kit the cases are written with: fd pairs, recorders, bounded waits, drop probes.
//!
//! Every wait is bounded; a helper that gives up panics with what it was waiting for, at the
//! caller's line (`#[track_caller]`).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::pipe::PipeFlags;
use vireo_core::{Backend, EventLoop, Events, LoopHandle, TimerId, WatchId};

/// How long a helper waits for something that should happen at once. Generous, for loaded
/// CI machines; a passing case never waits this long.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A new loop on backend `B`.
#[track_caller]
pub fn new_loop<B: Backend>() -> EventLoop<B> {
    EventLoop::<B>::new().unwrap_or_else(|e| panic!("creating a {} loop: {e}", B::NAME))
}

/// A non-blocking, close-on-exec pipe: `(reader, writer)`.
#[track_caller]
pub fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).expect("pipe")
}

/// A regular file opened read-only (this test's own executable): a file that cannot be polled.
#[track_caller]
pub fn regular_file() -> OwnedFd {
    rustix::fs::open(
        std::env::current_exe().expect("the test executable's path"),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .expect("open the test executable")
}

/// A non-blocking, close-on-exec AF_UNIX stream socketpair.
#[track_caller]
pub fn socketpair() -> (OwnedFd, OwnedFd) {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair")
}

/// Borrows a raw fd inside a callback.
///
/// The cases keep every fd open for as long as a watch may use it.
pub fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the conformance cases own every fd they watch and keep it open while a watch or
    // callback may use the number.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Writes `bytes` to `fd`, all of it.
#[track_caller]
pub fn write(fd: &OwnedFd, bytes: &[u8]) {
    let n = rustix::io::write(fd, bytes).expect("write");
    assert_eq!(n, bytes.len(), "short write");
}

/// Reads up to `max` bytes from a raw fd; 0 on EOF or when nothing is there.
pub fn read_raw(fd: RawFd, max: usize) -> usize {
    let mut buf = vec![0u8; max];
    rustix::io::read(borrow(fd), &mut buf).unwrap_or(0)
}

/// Reads until the fd would block; returns how many bytes were read.
pub fn drain(fd: RawFd) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = rustix::io::read(borrow(fd), &mut buf) {
        total += n;
    }
    total
}

/// Something that happened during a run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// A watch callback ran with these events.
    Watch(WatchId, Events),
    /// A timer callback ran.
    Timer(TimerId),
    /// A tagged marker (invoked closures, custom callbacks).
    Mark(u32),
}

/// A shared, ordered log of callbacks.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Fired>>>);

impl Recorder {
    /// An empty log.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Appends an entry.
    pub fn push(&self, f: Fired) {
        self.0.lock().unwrap().push(f);
    }

    /// Takes everything logged so far.
    pub fn take(&self) -> Vec<Fired> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// How many entries are logged.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The watch entries for `id`.
    pub fn events_of(&self, id: WatchId) -> Vec<Events> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|f| match f {
                Fired::Watch(w, e) if *w == id => Some(*e),
                _ => None,
            })
            .collect()
    }

    /// A watch callback that logs and does nothing else.
    pub fn watch(&self) -> impl FnMut(&LoopHandle, WatchId, RawFd, Events) + Send + 'static {
        let log = self.clone();
        move |_, id, _, ev| log.push(Fired::Watch(id, ev))
    }

    /// A watch callback that logs and drains the fd.
    pub fn draining_watch(
        &self,
    ) -> impl FnMut(&LoopHandle, WatchId, RawFd, Events) + Send + 'static {
        let log = self.clone();
        move |_, id, fd, ev| {
            log.push(Fired::Watch(id, ev));
            drain(fd);
        }
    }

    /// A watch callback that logs and holds `tracked` (so its drop shows when the callback's
    /// state is dropped).
    pub fn tracked_watch(
        &self,
        tracked: Tracked,
    ) -> impl FnMut(&LoopHandle, WatchId, RawFd, Events) + Send + 'static {
        let log = self.clone();
        move |_, id, _, ev| {
            let _keep = &tracked;
            log.push(Fired::Watch(id, ev));
        }
    }

    /// A timer callback that logs.
    pub fn timer(&self) -> impl FnMut(&LoopHandle, TimerId) + Send + 'static {
        let log = self.clone();
        move |_, id| log.push(Fired::Timer(id))
    }
}

/// A short description of a log for failure messages: the count and the first entries.
pub fn summary(log: &[Fired]) -> String {
    let shown: Vec<String> = log.iter().take(5).map(|f| format!("{f:?}")).collect();
    if log.len() > 5 {
        format!("{} entries: {}, ...", log.len(), shown.join(", "))
    } else {
        format!("{} entries: {}", log.len(), shown.join(", "))
    }
}

/// Runs iterations until `done()` holds, for at most [`PATIENCE`]; panics otherwise.
#[track_caller]
pub fn run_until<B: Backend>(lp: &mut EventLoop<B>, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        lp.run_once_timeout(left.min(Duration::from_millis(100)))
            .expect("run_once");
    }
}

/// Runs iterations, each allowed to block for the whole window, until `window` has passed;
/// returns how many ran. A loop with nothing to do runs about one; a loop that spins on an
/// event it never delivers runs thousands.
pub fn iterations_within<B: Backend>(lp: &mut EventLoop<B>, window: Duration) -> usize {
    let start = Instant::now();
    let mut iterations = 0;
    while start.elapsed() < window {
        lp.run_once_timeout(window).expect("run_once");
        iterations += 1;
    }
    iterations
}

/// Runs `n` iterations that must not block (each with a zero timeout).
#[track_caller]
pub fn run_iterations<B: Backend>(lp: &mut EventLoop<B>, n: usize) {
    for _ in 0..n {
        lp.run_once_timeout(Duration::ZERO).expect("run_once");
    }
}

/// Counts drops of the values it hands out and remembers the thread of the last drop.
#[derive(Debug, Clone, Default)]
pub struct DropProbe {
    drops: Arc<AtomicUsize>,
    thread: Arc<Mutex<Option<ThreadId>>>,
}

/// A value whose drop a [`DropProbe`] counts. Move it into a callback.
#[derive(Debug)]
pub struct Tracked(DropProbe);

impl Drop for Tracked {
    fn drop(&mut self) {
        *self.0.thread.lock().unwrap() = Some(thread::current().id());
        self.0.drops.fetch_add(1, Ordering::SeqCst);
    }
}

impl DropProbe {
    /// A probe with nothing dropped yet.
    pub fn new() -> DropProbe {
        DropProbe::default()
    }

    /// A value to move into a callback.
    pub fn tracked(&self) -> Tracked {
        Tracked(self.clone())
    }

    /// How many tracked values were dropped.
    pub fn drops(&self) -> usize {
        self.drops.load(Ordering::SeqCst)
    }

    /// The thread that dropped the last tracked value.
    pub fn dropped_on(&self) -> Option<ThreadId> {
        *self.thread.lock().unwrap()
    }
}

/// The raw number of an fd.
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// Asserts at compile time that `T` is `Send` and `Sync`.
pub fn assert_send_sync<T: Send + Sync>() {}
