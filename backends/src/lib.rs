//! vireo's operating-system backends, one file each, each behind a cargo feature.
//!
//! | feature | type | platforms | good at | costs |
//! |---|---|---|---|---|
//! | `io-uring` | [`IoUring`] | Linux 5.5+ (best 6.1+) | batching: interest changes, re-arms and the wait in one syscall | one completion plus one re-arm per event; for readiness alone slower than epoll (1.2-1.6x raw epoll in the pipes benchmark, against epoll's 1.1-1.4x), reports re-checked with one poll(2) |
//! | `epoll` (default) | [`Epoll`] | Linux, Android | O(ready) waits, no per-event re-arm; ns timeouts via `epoll_pwait2` | one `epoll_ctl` per interest change |
//! | `portable` | [`Portable`] | Linux, Android, macOS, iOS, the BSDs, illumos, Solaris (via the `polling` crate: epoll, kqueue, event ports) | running where epoll and io_uring do not exist | an extra poll(2) for reports that carry a hangup or an error |
//! | `poll` (default) | [`Poll`] | every POSIX system | simplicity; nothing to set up | O(registered fds) per wait, in the kernel and in the loop |
//! | `scripted` | [`Scripted`] | every POSIX system | tests: kernel errors, readiness and spurious wake-ups on demand ([`scripted`]) | poll's, plus a mutex per call |
//!
//! [`DefaultBackend`] is the best one compiled in, chosen at compile time by one cfg chain:
//! io-uring, else epoll, else portable, else poll. [`AnyBackend`] chooses at run time from
//! `VIREO_BACKEND=poll|epoll|io-uring|portable|auto`. Several backends can be compiled into one
//! program and used side by side (the conformance suite and the benchmarks do exactly that).
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

mod any;
#[cfg(any(feature = "poll", feature = "portable"))]
mod pollflags;
mod timeout;
#[cfg(any(feature = "epoll", feature = "portable"))]
mod unpollable;

pub use any::{AnyBackend, BACKEND_ENV, BackendKind, Choice, backend_info};

#[cfg(all(feature = "io-uring", target_os = "linux"))]
mod uring;
#[cfg(all(feature = "io-uring", target_os = "linux"))]
pub use uring::{IoUring, SetupFlags, UringError, UringInfo};

#[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
mod epoll;
#[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
pub use epoll::Epoll;

#[cfg(feature = "portable")]
mod portable;
#[cfg(feature = "portable")]
pub use portable::Portable;

#[cfg(feature = "poll")]
mod poll;
#[cfg(feature = "poll")]
pub use poll::Poll;

#[cfg(feature = "scripted")]
pub mod scripted;
#[cfg(feature = "scripted")]
pub use scripted::Scripted;

pub use vireo_core::Backend;

#[cfg(all(feature = "io-uring", target_os = "linux"))]
/// The best backend compiled in (io-uring here).
pub type DefaultBackend = IoUring;

#[cfg(all(
    not(all(feature = "io-uring", target_os = "linux")),
    all(feature = "epoll", any(target_os = "linux", target_os = "android"))
))]
/// The best backend compiled in (epoll here).
pub type DefaultBackend = Epoll;

#[cfg(all(
    not(all(feature = "io-uring", target_os = "linux")),
    not(all(feature = "epoll", any(target_os = "linux", target_os = "android"))),
    feature = "portable"
))]
/// The best backend compiled in (portable here).
pub type DefaultBackend = Portable;

#[cfg(all(
    not(all(feature = "io-uring", target_os = "linux")),
    not(all(feature = "epoll", any(target_os = "linux", target_os = "android"))),
    not(feature = "portable"),
    feature = "poll"
))]
/// The best backend compiled in (poll here).
pub type DefaultBackend = Poll;

#[cfg(not(any(
    all(feature = "io-uring", target_os = "linux"),
    all(feature = "epoll", any(target_os = "linux", target_os = "android")),
    feature = "portable",
    feature = "poll"
)))]
compile_error!(
    "vireo-backends: enable at least one backend feature (`poll`, `epoll`, `io-uring` or `portable`)"
);
