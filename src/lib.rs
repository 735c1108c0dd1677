//! vireo: a libvirt-style event framework.
//!
//! One dependency line gives the event loop on the best backend compiled in
//! ([`EventLoop`]), the handle that every thread and callback uses to add, update and remove
//! fd watches and timers ([`LoopHandle`]), every backend for side-by-side use
//! ([`backends`]), and the worker pool the loop hands work to ([`pool`]). The rules every backend shares are in [`core`]'s documentation.
//!
//! # Example: a socketpair echo
//!
//! ```
//! use std::os::fd::{AsRawFd, BorrowedFd};
//! use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
//! use vireo::{EventLoop, Events};
//!
//! # fn main() -> std::io::Result<()> {
//! let mut event_loop = EventLoop::new()?;
//! let handle = event_loop.handle().clone();
//! let (server, client) = socketpair(
//!     AddressFamily::UNIX, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None,
//! )?;
//!
//! // The server side echoes whatever arrives.
//! handle.add_handle(server.as_raw_fd(), Events::READABLE, |_, _, fd, events| {
//!     // SAFETY: `server` outlives the loop in this example.
//!     let fd = unsafe { BorrowedFd::borrow_raw(fd) };
//!     let mut buf = [0u8; 64];
//!     if events.contains(Events::READABLE) {
//!         if let Ok(n) = rustix::io::read(fd, &mut buf) {
//!             rustix::io::write(fd, &buf[..n]).unwrap();
//!         }
//!     }
//! })?;
//!
//! // The client side stops the loop when the echo comes back.
//! handle.add_handle(client.as_raw_fd(), Events::READABLE, |h, id, fd, _| {
//!     // SAFETY: as above.
//!     let fd = unsafe { BorrowedFd::borrow_raw(fd) };
//!     let mut buf = [0u8; 64];
//!     let n = rustix::io::read(fd, &mut buf).unwrap();
//!     assert_eq!(&buf[..n], b"hello");
//!     h.remove_handle(id).unwrap();
//!     h.quit();
//! })?;
//!
//! rustix::io::write(&client, b"hello")?;
//! event_loop.run()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Cargo features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `epoll` | yes | [`backends::Epoll`], the default backend on Linux |
//! | `poll` | yes | [`backends::Poll`], portable poll(2) |
#![deny(missing_docs)]

pub use vireo_backends as backends;
pub use vireo_core as core;
pub use vireo_pool as pool;

pub use vireo_backends::DefaultBackend;
pub use vireo_core::{
    Backend, ChildId, Error, Events, Frequency, LoopHandle, LoopLocal, LoopStats, Readiness,
    SignalId, SignalInfo, TimerId, Token, WatchId, WeakLoopLocal,
};

/// The event loop on [`DefaultBackend`], the best backend compiled in.
///
/// For another backend name it explicitly: `vireo::core::EventLoop::<vireo::backends::Poll>`.
pub type EventLoop = vireo_core::EventLoop<DefaultBackend>;

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
