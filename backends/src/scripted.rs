//! A backend driven by the test: kernel errors, readiness and spurious wake-ups on demand.
//!
//! [`Scripted`] runs over poll(2) (or over nothing at all, [`Scripted::detached`]) and takes
//! orders from a [`Script`] shared with the test: fail the next `register`, `reregister`,
//! `deregister`, `wait` or `fresh` with a chosen errno, fail every registration of one fd
//! ([`Script::break_fd`]), report an fd ready whether or not it is, report a stale token
//! ([`Script::report_token`]), return from the next wait at once with nothing, move the loop's
//! clock forward ([`Script::advance`]). Every call the core makes is recorded. With an empty
//! script it behaves exactly like the poll backend, and the conformance suite runs on it.
//!
//! Use it to check that a program's callbacks cope with what a kernel may do (a spurious
//! readiness, a failed registration, an interrupted wait) without arranging for a kernel to do
//! it:
//!
//! ```
//! use std::os::fd::AsRawFd;
//! use std::sync::{Arc, Mutex};
//! use vireo_backends::scripted::{Op, Script, Scripted};
//! use vireo_core::{EventLoop, Events};
//!
//! let script = Script::new();
//! let mut event_loop = EventLoop::with_backend(Scripted::with_script(script.clone())?)?;
//! let (a, _b) = std::os::unix::net::UnixStream::pair()?;
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let log = Arc::clone(&seen);
//! event_loop.handle().add_handle(a.as_raw_fd(), Events::READABLE, move |_, _, _, ev| {
//!     log.lock().unwrap().push(ev); // a real callback would read and handle EAGAIN here
//! })?;
//!
//! // The first registration fails with ENOMEM: the watch hears ERROR, the loop retries.
//! script.fail_next(Op::Register, rustix::io::Errno::NOMEM);
//! event_loop.run_once_timeout(std::time::Duration::ZERO)?;
//! event_loop.run_once_timeout(std::time::Duration::ZERO)?;
//!
//! // Nothing was written, yet the callback hears READABLE: a spurious report.
//! script.make_ready(a.as_raw_fd(), Events::READABLE);
//! event_loop.run_once_timeout(std::time::Duration::ZERO)?;
//! assert_eq!(*seen.lock().unwrap(), vec![Events::ERROR, Events::READABLE]);
//! # std::io::Result::Ok(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use vireo_core::{Backend, BackendInfo, Clock, Events, Readiness, Token};

use crate::Poll;

/// A backend operation a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Backend::register`].
    Register,
    /// [`Backend::reregister`].
    Reregister,
    /// [`Backend::deregister`].
    Deregister,
    /// [`Backend::wait`]: `EINTR` makes it return at once with nothing (as the contract
    /// allows); any other errno is returned.
    Wait,
    /// [`Backend::fresh`]: the new instance the loop starts over on cannot be made (`EMFILE`,
    /// say).
    Fresh,
}

/// A call the core made, as recorded by [`Script::calls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `register(fd, interest)`.
    Register(RawFd, Events),
    /// `reregister(fd, interest)`.
    Reregister(RawFd, Events),
    /// `deregister(fd)`.
    Deregister(RawFd),
    /// `wait(timeout)`.
    Wait(Option<Duration>),
    /// `fresh()`.
    Fresh,
}

#[derive(Debug, Default)]
struct State {
    /// How far the script's clock is ahead of the monotonic clock.
    ahead: Duration,
    faults: VecDeque<(Op, Errno)>,
    /// fds whose every register and reregister fails, with the errno.
    broken: HashMap<RawFd, Errno>,
    ready: Vec<(RawFd, Events)>,
    /// Reports of tokens as such, registered or not (a kernel's stale registration).
    tokens_ready: Vec<Readiness>,
    wakeups: usize,
    tokens: HashMap<RawFd, Token>,
    calls: Vec<Call>,
}

/// The orders a [`Scripted`] backend follows; `Clone` handles share them.
#[derive(Debug, Clone, Default)]
pub struct Script(Arc<Mutex<State>>);

impl Script {
    /// An empty script: the backend behaves like its base.
    pub fn new() -> Script {
        Script::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next call of `op` fails with `errno` (faults queue up in order; each is used once).
    pub fn fail_next(&self, op: Op, errno: Errno) {
        self.state().faults.push_back((op, errno));
    }

    /// Every `register` and `reregister` of `fd` fails with `errno` until
    /// [`mend_fd`](Script::mend_fd): a persistent registration failure of one fd.
    pub fn break_fd(&self, fd: RawFd, errno: Errno) {
        self.state().broken.insert(fd, errno);
    }

    /// Ends [`break_fd`](Script::break_fd) for `fd`.
    pub fn mend_fd(&self, fd: RawFd) {
        self.state().broken.remove(&fd);
    }

    /// The next wait reports `fd` with `events`, whether or not the fd is ready (nothing is
    /// reported for an fd that is not registered: a kernel has nothing to report for it).
    pub fn make_ready(&self, fd: RawFd, events: Events) {
        self.state().ready.push((fd, events));
    }

    /// The next wait reports `token` with `events`, whatever it is: a registration the kernel
    /// kept for a file the loop no longer has (the loop then starts over on a fresh instance).
    pub fn report_token(&self, token: Token, events: Events) {
        self.state().tokens_ready.push(Readiness { token, events });
    }

    /// The next wait returns at once with nothing to report.
    pub fn wake_spuriously(&self) {
        self.state().wakeups += 1;
    }

    /// Moves the loop's clock forward by `d` at once: timers see the time pass without
    /// anyone waiting for it.
    pub fn advance(&self, d: Duration) {
        self.state().ahead += d;
    }

    /// The time on the loop's clock (the monotonic clock plus every [`advance`](Script::advance)).
    pub fn now(&self) -> Instant {
        Instant::now() + self.state().ahead
    }

    /// Every call the core made so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The calls made so far, forgetting them.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    /// Faults queued and not used yet.
    pub fn pending_faults(&self) -> usize {
        self.state().faults.len()
    }

    /// Takes the first queued fault for `op`, if any.
    fn fault(state: &mut State, op: Op) -> Option<Errno> {
        let i = state.faults.iter().position(|(o, _)| *o == op)?;
        state.faults.remove(i).map(|(_, e)| e)
    }
}

/// A backend that follows a [`Script`]; see the [module docs](self).
pub struct Scripted {
    /// `None` when detached from the kernel.
    base: Option<Poll>,
    script: Script,
}

impl fmt::Debug for Scripted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scripted")
            .field("detached", &self.base.is_none())
            .field("script", &self.script)
            .finish()
    }
}

impl Scripted {
    /// Over poll(2), following `script`.
    ///
    /// # Errors
    ///
    /// Those of the poll backend (none on Linux).
    pub fn with_script(script: Script) -> io::Result<Scripted> {
        Ok(Scripted {
            base: Some(Poll::new()?),
            script,
        })
    }

    /// Over nothing: only what `script` makes ready is reported, and waits never block. A wait
    /// with a timeout advances the script's clock by that timeout instead of sleeping, so
    /// timers fire at once, in order, on virtual time; a wait without one returns at once (a
    /// spurious early return, which the contract allows).
    pub fn detached(script: Script) -> Scripted {
        Scripted { base: None, script }
    }

    /// A handle on this backend's script.
    pub fn script(&self) -> Script {
        self.script.clone()
    }
}

impl Backend for Scripted {
    const NAME: &'static str = "scripted";

    fn new() -> io::Result<Self> {
        Scripted::with_script(Script::new())
    }

    /// Over a fresh poll instance (or nothing, when detached), following the same script;
    /// the script forgets its fds, which the loop registers again.
    fn fresh(&self) -> io::Result<Self> {
        {
            let mut st = self.script.state();
            st.calls.push(Call::Fresh);
            if let Some(errno) = Script::fault(&mut st, Op::Fresh) {
                return Err(errno.into());
            }
        }
        let base = match &self.base {
            Some(base) => Some(base.fresh()?),
            None => None,
        };
        self.script.state().tokens.clear();
        Ok(Scripted {
            base,
            script: self.script.clone(),
        })
    }

    fn clock(&self) -> Option<Clock> {
        let script = self.script.clone();
        Some(Clock::new(move || script.now()))
    }

    fn info(&self) -> BackendInfo {
        BackendInfo::new(Self::NAME).with(
            "over",
            if self.base.is_some() {
                "poll"
            } else {
                "nothing"
            },
        )
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        self.before(Op::Register, Call::Register(fd, interest))?;
        if let Some(base) = &mut self.base {
            base.register(fd, token, interest)?;
        }
        self.script.state().tokens.insert(fd, token);
        Ok(())
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        self.before(Op::Reregister, Call::Reregister(fd, interest))?;
        if let Some(base) = &mut self.base {
            base.reregister(fd, token, interest)?;
        }
        self.script.state().tokens.insert(fd, token);
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        self.before(Op::Deregister, Call::Deregister(fd))?;
        if let Some(base) = &mut self.base {
            base.deregister(fd, token)?;
        }
        self.script.state().tokens.remove(&fd);
        Ok(())
    }

    fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()> {
        let injected = {
            let mut st = self.script.state();
            st.calls.push(Call::Wait(timeout));
            match Script::fault(&mut st, Op::Wait) {
                Some(Errno::INTR) => return Ok(()),
                Some(errno) => return Err(errno.into()),
                None => {}
            }
            if st.wakeups > 0 {
                st.wakeups -= 1;
                return Ok(());
            }
            let mut injected: Vec<Readiness> = std::mem::take(&mut st.ready)
                .into_iter()
                .filter_map(|(fd, events)| {
                    st.tokens.get(&fd).map(|&token| Readiness { token, events })
                })
                .collect();
            injected.append(&mut st.tokens_ready);
            injected
        };
        if let Some(base) = &mut self.base {
            // Something scripted to report: look, but do not block.
            let timeout = if injected.is_empty() {
                timeout
            } else {
                Some(Duration::ZERO)
            };
            base.wait(ready, timeout)?;
        } else if injected.is_empty() {
            // Detached: nothing can become ready, so a wait with a timeout is the timeout
            // passing, which the script's clock does at once (virtual time).
            if let Some(t) = timeout {
                self.script.advance(t);
            }
        }
        ready.extend(injected);
        Ok(())
    }
}

impl Scripted {
    /// Records `call` and fails it if the script says so.
    fn before(&mut self, op: Op, call: Call) -> io::Result<()> {
        let mut st = self.script.state();
        let broken = match call {
            Call::Register(fd, _) | Call::Reregister(fd, _) => st.broken.get(&fd).copied(),
            _ => None,
        };
        st.calls.push(call);
        if let Some(errno) = broken {
            return Err(errno.into());
        }
        match Script::fault(&mut st, op) {
            Some(errno) => Err(errno.into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh instance (what the loop starts over on) follows the same script, detached or not.
    #[test]
    fn a_fresh_instance_keeps_the_script() {
        let script = Script::new();
        for backend in [
            Scripted::with_script(script.clone()).unwrap(),
            Scripted::detached(script.clone()),
        ] {
            let mut fresh = backend.fresh().unwrap();
            assert_eq!(fresh.base.is_some(), backend.base.is_some());
            script.take_calls();
            script.fail_next(Op::Wait, Errno::NOMEM);
            let mut ready = Vec::new();
            assert!(fresh.wait(&mut ready, Some(Duration::ZERO)).is_err());
            assert_eq!(script.take_calls(), [Call::Wait(Some(Duration::ZERO))]);
        }
    }
}
