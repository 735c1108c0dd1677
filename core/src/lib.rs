//! The backend-agnostic core of vireo: libvirt's event loop in Rust.
//!
//! An [`EventLoop`] watches file descriptors and runs timers on one thread; a [`LoopHandle`]
//! (cheap to clone, `Send + Sync`) lets any thread, and any callback, add, update and remove
//! *handles* (fd watches) and *timeouts*, run a closure on the loop thread, or stop the loop.
//! The operating system is reached through a [`Backend`] (poll, epoll, ... in the
//! `vireo-backends` crate); the core implements every rule of the event API once so that all
//! backends behave identically.
//!
//! # Example
//!
//! The core is generic over its backend; this example brings a tiny one built on `poll(2)`
//! so that it runs without other crates. Real programs use `vireo::EventLoop`, which picks
//! the best backend compiled in.
//!
//! ```
//! use std::io;
//! use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use rustix::event::{PollFd, PollFlags};
//! use vireo_core::{Backend, EventLoop, Events, Readiness, Token};
//!
//! /// Just enough of a poll(2) backend for the example.
//! struct TinyPoll(Vec<(RawFd, Token, Events)>);
//!
//! impl Backend for TinyPoll {
//!     const NAME: &'static str = "tiny-poll";
//!     fn new() -> io::Result<Self> { Ok(TinyPoll(Vec::new())) }
//!     fn register(&mut self, fd: RawFd, t: Token, i: Events) -> io::Result<()> {
//!         self.0.push((fd, t, i));
//!         Ok(())
//!     }
//!     fn reregister(&mut self, fd: RawFd, t: Token, i: Events) -> io::Result<()> {
//!         self.deregister(fd, t)?;
//!         self.register(fd, t, i)
//!     }
//!     fn deregister(&mut self, fd: RawFd, _: Token) -> io::Result<()> {
//!         self.0.retain(|e| e.0 != fd);
//!         Ok(())
//!     }
//!     fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()> {
//!         let mut fds: Vec<PollFd<'_>> = self.0.iter().map(|&(fd, _, i)| {
//!             let mut f = PollFlags::empty();
//!             if i.contains(Events::READABLE) { f |= PollFlags::IN; }
//!             if i.contains(Events::WRITABLE) { f |= PollFlags::OUT; }
//!             // SAFETY: the example keeps every registered fd open while it is registered.
//!             PollFd::from_borrowed_fd(unsafe { BorrowedFd::borrow_raw(fd) }, f)
//!         }).collect();
//!         let ts = timeout.map(|d| d.try_into().unwrap());
//!         rustix::event::poll(&mut fds, ts.as_ref())?;
//!         for (pfd, &(_, token, _)) in fds.iter().zip(&self.0) {
//!             let r = pfd.revents();
//!             let mut events = Events::empty();
//!             if r.contains(PollFlags::IN) { events |= Events::READABLE; }
//!             if r.contains(PollFlags::OUT) { events |= Events::WRITABLE; }
//!             if r.contains(PollFlags::HUP) { events |= Events::HANGUP; }
//!             if !events.is_empty() { ready.push(Readiness { token, events }); }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> io::Result<()> {
//! let mut event_loop = EventLoop::<TinyPoll>::new()?;
//! let (reader, writer) = rustix::pipe::pipe()?;
//! let received = Arc::new(Mutex::new(Vec::new()));
//! let sink = Arc::clone(&received);
//! event_loop.handle().add_handle(reader.as_raw_fd(), Events::READABLE, move |h, id, fd, ev| {
//!     assert!(ev.contains(Events::READABLE));
//!     // SAFETY: `reader` outlives the watch in this example.
//!     let fd = unsafe { BorrowedFd::borrow_raw(fd) };
//!     let mut buf = [0u8; 16];
//!     let n = rustix::io::read(fd, &mut buf).unwrap();
//!     sink.lock().unwrap().extend_from_slice(&buf[..n]);
//!     h.remove_handle(id).unwrap();
//!     h.quit();
//! })?;
//! rustix::io::write(&writer, b"ping")?;
//! event_loop.run()?;
//! assert_eq!(&received.lock().unwrap()[..], b"ping");
//! # Ok(())
//! # }
//! ```
//!
//! # The rules every backend shares
//!
//! - **Level-triggered**: a condition that still holds fires again on the next iteration.
//! - **Delivery mask**: a watch receives `ready & (its events | ERROR | HANGUP)`, and only when
//!   that is non-empty and its own events are non-empty. An fd whose watches are all empty is
//!   not in the kernel set.
//! - **Several watches per fd**: one kernel registration per fd with the union of interests.
//! - **Ids** start at 1, count watches and timers separately and are never reused.
//! - **Order** within an iteration: due timers by deadline then id, ready watches by id, then
//!   closures from [`LoopHandle::invoke`].
//! - **Deferred removal**: removed entries are skipped at once and their state is dropped on
//!   the loop thread at the next purge point, never inside `remove_*` and never under a lock.
//! - **Timers** never fire early and do not drift.
//! - **Wakeups** from other threads are immediate and cost one eventfd write per sleep; a loop
//!   that does not block (zero timeout) costs them none.
//! - **Registration errors** belong to their fd: when the kernel refuses an interest change,
//!   that fd's watches receive `ERROR` (every iteration, as the change is retried) and every
//!   other fd is served as usual; `run_once` does not fail for it.
//! - **Removal from another thread** waits for an invocation of that watch that is running on
//!   the loop thread, so nothing of the watch runs once `remove_handle` returns
//!   (`remove_handle_nowait` is libvirt's rule instead: no waiting, no new invocation).
//! - **Signals and child processes** ([`signal`]) are watches on pipes and pidfds, so they
//!   follow every rule above on every backend.
//!
//! # File descriptors
//!
//! The same on every backend:
//!
//! - **Invalid fd** (negative, or not open) at add: [`Error::Io`] with `EBADF`.
//! - **Regular files, directories and other files that cannot be polled** are always ready for
//!   the watch's whole interest (poll(2)'s answer; epoll, which refuses them, is emulated).
//! - **A `dup`'d fd** is a separate fd: watches on it and on the original are independent, and
//!   removing one leaves the other working.
//! - **Remove, close, reopen, re-add**: allowed at any time, also within one iteration. The
//!   core compares the file's identity (`st_dev`, `st_ino`) at add and re-registers the new
//!   file, so no event of the old file ever reaches the new watch. Anonymous-inode files
//!   (eventfd, timerfd, signalfd, epoll and io_uring fds) all share one identity, so a watch
//!   added for such an fd after every watch on its number was removed is always registered
//!   afresh (one kernel change more than for a pipe or socket removed and re-added within an
//!   iteration). What remains undetected: two opens of the same FIFO or terminal path share
//!   their identity, so re-opening such a path onto the same number between a remove and a
//!   re-add in one iteration is taken for the same file; let the loop run once in between.
//! - **Closing an fd while it is watched** is a contract violation. vireo neither crashes nor
//!   spins, and removing the stale watch afterwards succeeds and drops its state once. While
//!   the number stays closed the watch gets at most one more report (an io_uring poll in
//!   flight holds the file open until it completes), then stays silent. Once a watch is added
//!   for a file that reused the number, the stale watch leaves the fan-out and is not called
//!   again, on every backend, not even later in the dispatch pass that runs the add (a call
//!   that began on the loop thread while another thread adds may still finish). Between
//!   that reuse and that add, epoll and portable keep the stale watch silent (the kernel
//!   dropped its registration with the file), but poll, io_uring and the scripted backend
//!   wait on numbers, not files, and report the new file's readiness to the stale watch:
//!   telling the files apart would cost an `fstat` per report, more than the whole
//!   dispatch. So remove first, then close. (If another fd still refers
//!   to the same open file, epoll keeps reporting that file while poll reports nothing; which
//!   one you get is unspecified.)
#![deny(missing_docs)]

mod backend;
mod error;
mod event_loop;
mod events;
mod fence;
mod frequency;
mod id;
mod ids;
mod invokes;
mod local;
pub mod signal;
mod table;
mod timers;
mod waker;

pub use backend::{Backend, BackendInfo, Clock, Readiness};
pub use error::Error;
pub use event_loop::{EventLoop, LoopHandle, LoopStats};
pub use events::Events;
pub use frequency::Frequency;
pub use id::{TimerId, Token, WatchId};
pub use local::{LoopLocal, WeakLoopLocal};
pub use signal::{ChildId, SignalId, SignalInfo};
