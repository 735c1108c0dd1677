//! vireo's operating-system backends, one file each, each behind a cargo feature.
//!
//! | feature | type | platforms | notes |
//! |---|---|---|---|
//! | `epoll` (default) | [`Epoll`] | Linux, Android | level-triggered; ns timeouts via `epoll_pwait2` |
//! | `poll` (default) | [`Poll`] | every POSIX system | O(fds) per wait; ns timeouts via `ppoll` |
//!
//! [`DefaultBackend`] is the best one compiled in: epoll, else poll. Several backends can be
//! compiled into one program and used side by side (the conformance suite and the benchmarks
//! do exactly that).
//!
//! ```
//! use vireo_backends::DefaultBackend;
//! use vireo_core::{EventLoop, Frequency};
//!
//! let mut event_loop = EventLoop::<DefaultBackend>::new()?;
//! event_loop.handle().add_timeout(Frequency::from_millis(1), |h, id| {
//!     h.remove_timeout(id).unwrap();
//!     h.quit();
//! })?;
//! event_loop.run()?;
//! # std::io::Result::Ok(())
//! ```
#![deny(missing_docs)]

mod timeout;

#[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
mod epoll;
#[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
pub use epoll::Epoll;

#[cfg(feature = "poll")]
mod poll;
#[cfg(feature = "poll")]
pub use poll::Poll;

pub use vireo_core::Backend;

/// The best backend compiled in: epoll where available, else poll.
#[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
pub type DefaultBackend = Epoll;

/// The best backend compiled in: epoll where available, else poll.
#[cfg(all(
    not(all(feature = "epoll", any(target_os = "linux", target_os = "android"))),
    feature = "poll"
))]
pub type DefaultBackend = Poll;

#[cfg(not(any(
    all(feature = "epoll", any(target_os = "linux", target_os = "android")),
    feature = "poll"
)))]
compile_error!("vireo-backends: enable at least one backend feature (`poll` or `epoll`)");
