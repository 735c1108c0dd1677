//! A portable backend on the [`polling`] crate: epoll on Linux and Android, kqueue on macOS,
//! iOS and the BSDs, event ports on illumos and Solaris.
//!
//! It exists so that vireo runs where neither epoll nor io_uring exist (macOS and the BSDs
//! first of all); on Linux it passes the same conformance suite as the native backends, which
//! is how its semantics are kept identical. It is level-triggered (`PollMode::Level`).
//!
//! `polling` folds hangups and errors into "readable"/"writable", so a report carrying a hangup
//! or an error is re-read with one zero-timeout poll(2) of that fd to tell `READABLE|HANGUP`
//! (data or EOF to read) from `HANGUP` alone, exactly as the other backends report it. The
//! common path (plain readiness) costs nothing extra. Files the kernel refuses to watch
//! (regular files under epoll) are always ready, as under poll(2), while the fd still names the
//! file it named at registration.

use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use polling::{Event, PollMode, Poller};
use rustix::event::PollFd;
use vireo_core::{Backend, BackendInfo, Events, Readiness, Token};

use crate::pollflags::{events_of, poll_flags};
use crate::unpollable::Unpollable;

struct Source {
    fd: RawFd,
    token: Token,
    interest: Events,
    /// Refused by the kernel (EPERM): always ready for its interest while the fd names
    /// the same file.
    always_ready: Option<Unpollable>,
}

/// The backend on the `polling` crate.
///
/// ```
/// use vireo_backends::Portable;
/// use vireo_core::EventLoop;
///
/// let mut event_loop = EventLoop::<Portable>::new()?;
/// assert_eq!(event_loop.backend_name(), "portable");
/// event_loop.run_once_timeout(std::time::Duration::ZERO)?;
/// # std::io::Result::Ok(())
/// ```
pub struct Portable {
    poller: Poller,
    events: polling::Events,
    /// By key. Keys are never reused, so a registration the kernel kept for a closed and
    /// replaced file cannot be mistaken for a current one.
    sources: HashMap<usize, Source>,
    by_fd: HashMap<RawFd, usize>,
    next_key: usize,
}

impl std::fmt::Debug for Portable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portable")
            .field("registered", &self.sources.len())
            .finish_non_exhaustive()
    }
}

fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the core registers only fds it validated with fstat (so non-negative) and that
    // the caller keeps open while registered; every use here lasts for one system call. A
    // caller that closes a registered fd anyway gets EBADF or a silent watch, never memory
    // unsafety: the kernel only reads the number.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

fn interest_event(key: usize, interest: Events) -> Event {
    Event::new(
        key,
        interest.contains(Events::READABLE),
        interest.contains(Events::WRITABLE),
    )
}

/// The exact poll(2) view of one fd, for reports that carry a hangup or an error.
fn exact_events(fd: RawFd, interest: Events) -> Events {
    let mut fds = [PollFd::from_borrowed_fd(borrow(fd), poll_flags(interest))];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    if !matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(1..)) {
        return Events::empty();
    }
    events_of(fds[0].revents())
}

impl Backend for Portable {
    const NAME: &'static str = "portable";

    fn new() -> io::Result<Self> {
        Ok(Portable {
            poller: Poller::new()?,
            events: polling::Events::new(),
            sources: HashMap::new(),
            by_fd: HashMap::new(),
            next_key: 0,
        })
    }

    fn info(&self) -> BackendInfo {
        BackendInfo::new(Self::NAME).with("polling", polling_mechanism())
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        if self.by_fd.contains_key(&fd) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::EXIST.raw_os_error(),
            ));
        }
        let key = self.next_key;
        // `usize::MAX` is polling's own notifier key.
        self.next_key = (self.next_key + 1) % (usize::MAX - 1);
        // SAFETY: the core deregisters every fd before the caller may close it (the Backend
        // contract), which is what `add_with_mode` requires.
        let added = unsafe {
            self.poller
                .add_with_mode(fd, interest_event(key, interest), PollMode::Level)
        };
        let always_ready = match added {
            Ok(()) => None,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
                Some(Unpollable::new(fd, token, interest))
            }
            Err(e) => return Err(e),
        };
        self.sources.insert(
            key,
            Source {
                fd,
                token,
                interest,
                always_ready,
            },
        );
        self.by_fd.insert(fd, key);
        Ok(())
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        let key = *self
            .by_fd
            .get(&fd)
            .ok_or_else(|| io::Error::from_raw_os_error(rustix::io::Errno::NOENT.raw_os_error()))?;
        let source = self.sources.get_mut(&key).expect("indexed source");
        source.token = token;
        source.interest = interest;
        if let Some(u) = source.always_ready.as_mut() {
            u.token = token;
            u.interest = interest;
        } else {
            self.poller.modify_with_mode(
                borrow(fd),
                interest_event(key, interest),
                PollMode::Level,
            )?;
        }
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd, _token: Token) -> io::Result<()> {
        let key = self
            .by_fd
            .remove(&fd)
            .ok_or_else(|| io::Error::from_raw_os_error(rustix::io::Errno::NOENT.raw_os_error()))?;
        let source = self.sources.remove(&key).expect("indexed source");
        if source.always_ready.is_none() {
            self.poller.delete(borrow(fd))?;
        }
        Ok(())
    }

    fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()> {
        let mut timeout = timeout;
        for u in self
            .sources
            .values()
            .filter_map(|s| s.always_ready.as_ref())
        {
            if let Some(events) = u.ready() {
                ready.push(Readiness {
                    token: u.token,
                    events,
                });
                timeout = Some(Duration::ZERO);
            }
        }
        self.events.clear();
        match self.poller.wait(&mut self.events, timeout) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for event in self.events.iter() {
            let Some(s) = self.sources.get(&event.key) else {
                // A registration the kernel kept for a closed and replaced file: let the core
                // see it as stale (it replaces the backend).
                ready.push(Readiness {
                    token: Token::UNKNOWN,
                    events: Events::empty(),
                });
                continue;
            };
            let events = if event.is_interrupt() || event.is_err() == Some(true) {
                exact_events(s.fd, s.interest)
            } else {
                let mut events = Events::empty();
                if event.readable {
                    events |= Events::READABLE;
                }
                if event.writable {
                    events |= Events::WRITABLE;
                }
                events & s.interest
            };
            if !events.is_empty() {
                ready.push(Readiness {
                    token: s.token,
                    events,
                });
            }
        }
        Ok(())
    }
}

/// The OS mechanism `polling` uses on this platform.
fn polling_mechanism() -> &'static str {
    if cfg!(any(target_os = "linux", target_os = "android")) {
        "epoll"
    } else if cfg!(any(
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly"
    )) {
        "kqueue"
    } else if cfg!(any(target_os = "illumos", target_os = "solaris")) {
        "event ports"
    } else {
        "poll"
    }
}
