//! Bindings to poll(2) (every POSIX system).
//!
//! The `pollfd` array is rebuilt only when a registration changed since the last wait, and is
//! scanned in full by the kernel on every wait: O(registered fds) per iteration, fine up to a
//! few hundred fds. Timeouts have nanosecond precision (`ppoll`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use vireo_core::{Backend, Events, Readiness, Token};

use crate::pollflags::{events_of, poll_flags};
use crate::timeout::timespec;

struct Entry {
    fd: RawFd,
    token: Token,
    interest: Events,
    /// The kernel said `POLLNVAL`: the fd was closed while registered. It is left out of the
    /// array (no busy loop) until it is deregistered.
    silenced: bool,
}

/// The poll(2) backend.
///
/// ```
/// use vireo_backends::Poll;
/// use vireo_core::EventLoop;
///
/// let mut event_loop = EventLoop::<Poll>::new()?;
/// assert_eq!(event_loop.backend_name(), "poll");
/// assert_eq!(event_loop.run_once_timeout(std::time::Duration::ZERO)?, 0);
/// # std::io::Result::Ok(())
/// ```
pub struct Poll {
    entries: Vec<Entry>,
    index: HashMap<RawFd, usize>,
    /// Built from `entries` (minus silenced ones) when `dirty`; `order[i]` is the entry of
    /// `fds[i]`. The fds are borrowed from the caller, who keeps them open while registered.
    fds: Vec<PollFd<'static>>,
    order: Vec<usize>,
    dirty: bool,
}

impl std::fmt::Debug for Poll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poll")
            .field("registered", &self.entries.len())
            .finish_non_exhaustive()
    }
}

fn not_registered() -> io::Error {
    io::Error::from_raw_os_error(rustix::io::Errno::NOENT.raw_os_error())
}

impl Poll {
    fn rebuild(&mut self) {
        self.fds.clear();
        self.order.clear();
        for (i, e) in self.entries.iter().enumerate() {
            if e.silenced {
                continue;
            }
            // SAFETY: `e.fd` is non-negative (the core validated it with fstat before
            // registering it). poll(2) only reads the number: if the caller broke the contract
            // and closed it, the kernel answers POLLNVAL and the entry is silenced; no memory
            // is reached through the fd.
            let fd = unsafe { BorrowedFd::borrow_raw(e.fd) };
            self.fds
                .push(PollFd::from_borrowed_fd(fd, poll_flags(e.interest)));
            self.order.push(i);
        }
        self.dirty = false;
    }
}

impl Backend for Poll {
    const NAME: &'static str = "poll";

    fn new() -> io::Result<Self> {
        Ok(Poll {
            entries: Vec::new(),
            index: HashMap::new(),
            fds: Vec::new(),
            order: Vec::new(),
            dirty: true,
        })
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        if fd < 0 {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::BADF.raw_os_error(),
            ));
        }
        if self.index.contains_key(&fd) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::EXIST.raw_os_error(),
            ));
        }
        self.index.insert(fd, self.entries.len());
        self.entries.push(Entry {
            fd,
            token,
            interest,
            silenced: false,
        });
        self.dirty = true;
        Ok(())
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        let i = *self.index.get(&fd).ok_or_else(not_registered)?;
        let e = &mut self.entries[i];
        e.token = token;
        e.interest = interest;
        self.dirty = true;
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd, _token: Token) -> io::Result<()> {
        let i = self.index.remove(&fd).ok_or_else(not_registered)?;
        self.entries.swap_remove(i);
        if let Some(moved) = self.entries.get(i) {
            self.index.insert(moved.fd, i);
        }
        self.dirty = true;
        Ok(())
    }

    fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()> {
        if self.dirty {
            self.rebuild();
        }
        let timeout = timeout.map(timespec);
        // The number of entries with events: the scan stops at the last of them.
        let mut left = match rustix::event::poll(&mut self.fds, timeout.as_ref()) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for (pfd, &i) in self.fds.iter().zip(&self.order) {
            let revents = pfd.revents();
            if revents.is_empty() {
                continue;
            }
            if revents.contains(PollFlags::NVAL) {
                self.entries[i].silenced = true;
                self.dirty = true;
            } else {
                let events = events_of(revents);
                if !events.is_empty() {
                    ready.push(Readiness {
                        token: self.entries[i].token,
                        events,
                    });
                }
            }
            left -= 1;
            if left == 0 {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    /// The scan stops after the entries poll(2) counted: a ready fd behind a closed one
    /// (`POLLNVAL`, counted too) and behind idle ones is still reported, and so is the last
    /// entry of the array.
    #[test]
    fn ready_entries_behind_closed_and_idle_ones_are_reported() {
        let mut poll = Poll::new().unwrap();
        // A number no test opens: poll(2) answers POLLNVAL for it.
        let closed: RawFd = 1 << 30;
        poll.register(closed, Token(100), Events::READABLE).unwrap();
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..6).map(|_| UnixStream::pair().unwrap()).collect();
        for (i, (a, _)) in pairs.iter().enumerate() {
            poll.register(a.as_raw_fd(), Token(i as u64), Events::READABLE)
                .unwrap();
        }
        for i in [2, 5] {
            rustix::io::write(&pairs[i].1, b"x").unwrap();
        }
        let mut ready = Vec::new();
        poll.wait(&mut ready, Some(Duration::ZERO)).unwrap();
        let mut tokens: Vec<u64> = ready.iter().map(|r| r.token.0).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [2, 5]);
        assert!(ready.iter().all(|r| r.events == Events::READABLE));
        // The closed entry is silenced: the next wait reports the same, without it.
        ready.clear();
        poll.wait(&mut ready, Some(Duration::ZERO)).unwrap();
        assert_eq!(ready.len(), 2);
    }
}
