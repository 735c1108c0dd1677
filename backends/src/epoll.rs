//! Bindings to epoll (Linux, Android).
//!
//! Level-triggered (no `EPOLLET`, no `EPOLLONESHOT`), so an undrained fd fires again without any
//! re-arming. Timeouts have nanosecond precision through `epoll_pwait2` (Linux 5.11+; used only
//! when a timeout is not a whole number of milliseconds, `epoll_pwait` being the shorter path); on an
//! older kernel, or where seccomp refuses it, the backend falls back to `epoll_pwait` with the
//! timeout rounded *up* to whole milliseconds, so a timer is never woken early.
//!
//! epoll refuses files that cannot be polled (regular files, directories, `/dev/null`) with
//! `EPERM`; poll(2) reports them as always ready, and so does this backend, while the fd still
//! names the file it named at registration (one `fstat` per such fd per wait; closed or
//! replaced, it goes silent).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::io::Errno;
use vireo_core::{Backend, Events, Readiness, Token};

use crate::timeout::{clamp_to_millis_range, timespec};
use crate::unpollable::Unpollable;

/// The epoll backend.
///
/// ```
/// use vireo_backends::Epoll;
/// use vireo_core::EventLoop;
///
/// let mut event_loop = EventLoop::<Epoll>::new()?;
/// assert_eq!(event_loop.backend_name(), "epoll");
/// assert_eq!(event_loop.run_once_timeout(std::time::Duration::ZERO)?, 0);
/// # std::io::Result::Ok(())
/// ```
pub struct Epoll {
    epoll: OwnedFd,
    events: EventBuffer,
    /// Whether `epoll_pwait2` works here (probed once at creation).
    pwait2: bool,
    /// Registrations the kernel refused with `EPERM`: always ready for their interest.
    always_ready: Vec<Unpollable>,
}

impl std::fmt::Debug for Epoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoll")
            .field("epoll", &self.epoll)
            .field("pwait2", &self.pwait2)
            .finish_non_exhaustive()
    }
}

/// The buffer `epoll_wait` fills.
///
/// rustix's `epoll::Event` can carry a pointer in its data union, which makes it `!Send`;
/// this backend only ever stores tokens (plain `u64`s) there.
struct EventBuffer(Vec<epoll::Event>);

// SAFETY: every `Event` in the buffer holds a `u64` token written by this backend (through the
// kernel); no pointer is stored, so moving the buffer to another thread shares nothing.
unsafe impl Send for EventBuffer {}

impl std::ops::Deref for EventBuffer {
    type Target = Vec<epoll::Event>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for EventBuffer {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

fn flags(interest: Events) -> EventFlags {
    let mut flags = EventFlags::empty();
    if interest.contains(Events::READABLE) {
        flags |= EventFlags::IN;
    }
    if interest.contains(Events::WRITABLE) {
        flags |= EventFlags::OUT;
    }
    flags
}

/// A borrowed fd for an `epoll_ctl` call.
fn borrow(fd: RawFd) -> io::Result<BorrowedFd<'static>> {
    if fd < 0 {
        return Err(Errno::BADF.into());
    }
    // SAFETY: `fd` is non-negative, and epoll_ctl only uses the number for the duration of the
    // call; if the caller closed it, the kernel answers EBADF and nothing else happens.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

impl Epoll {
    /// Whether waits use `epoll_pwait2` (nanosecond timeouts) rather than `epoll_pwait`
    /// (milliseconds, rounded up).
    pub fn has_nanosecond_timeouts(&self) -> bool {
        self.pwait2
    }

    /// `epoll_pwait2` into the spare capacity of `self.events`.
    fn pwait2(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let ts = timeout.map(|d| {
            let t = timespec(d);
            libc::timespec {
                tv_sec: t.tv_sec as libc::time_t,
                tv_nsec: t.tv_nsec as _,
            }
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        let capacity = self.events.capacity().min(i32::MAX as usize) as libc::c_int;
        self.events.clear();
        // SAFETY: the buffer pointer and capacity describe `self.events`' allocation, and
        // `rustix::event::epoll::Event` has the kernel's `struct epoll_event` layout (rustix
        // passes the same type to `epoll_pwait`). `ts_ptr` is null or points at `ts`, alive
        // across the call; the signal mask is null, so its size argument is not read.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.epoll.as_raw_fd() as libc::c_long,
                self.events.as_mut_ptr(),
                capacity as libc::c_long,
                ts_ptr,
                std::ptr::null::<libc::sigset_t>(),
                0 as libc::c_long,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // SAFETY: the kernel initialised the first `n` (≤ capacity) entries.
        unsafe { self.events.set_len(n) };
        Ok(n)
    }
}

impl Backend for Epoll {
    const NAME: &'static str = "epoll";

    fn new() -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let mut this = Epoll {
            epoll,
            events: EventBuffer(Vec::with_capacity(1024)),
            pwait2: true,
            always_ready: Vec::new(),
        };
        // Probe once: ENOSYS on kernels before 5.11, EPERM or ENOSYS under some seccomp
        // policies. A zero timeout on the empty set returns at once.
        if this.pwait2(Some(Duration::ZERO)).is_err() {
            this.pwait2 = false;
        }
        Ok(this)
    }

    fn info(&self) -> vireo_core::BackendInfo {
        vireo_core::BackendInfo::new(Self::NAME).with(
            "timeouts",
            if self.pwait2 {
                "ns (epoll_pwait2)"
            } else {
                "ms rounded up (epoll_pwait)"
            },
        )
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        match epoll::add(
            &self.epoll,
            borrow(fd)?,
            EventData::new_u64(token.0),
            flags(interest),
        ) {
            Ok(()) => Ok(()),
            Err(Errno::PERM) => {
                self.always_ready.push(Unpollable::new(fd, token, interest));
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        if let Some(entry) = self.always_ready.iter_mut().find(|e| e.fd == fd) {
            entry.token = token;
            entry.interest = interest;
            return Ok(());
        }
        epoll::modify(
            &self.epoll,
            borrow(fd)?,
            EventData::new_u64(token.0),
            flags(interest),
        )?;
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd, _token: Token) -> io::Result<()> {
        if let Some(i) = self.always_ready.iter().position(|e| e.fd == fd) {
            self.always_ready.swap_remove(i);
            return Ok(());
        }
        epoll::delete(&self.epoll, borrow(fd)?)?;
        Ok(())
    }

    fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()> {
        let mut timeout = timeout;
        for entry in &self.always_ready {
            if let Some(events) = entry.ready() {
                ready.push(Readiness {
                    token: entry.token,
                    events,
                });
                timeout = Some(Duration::ZERO);
            }
        }
        // epoll_pwait2 only where a timeout needs sub-millisecond precision: a zero, infinite or
        // whole-millisecond timeout is exact with epoll_pwait, the shorter kernel path.
        let needs_ns = timeout.is_some_and(|d| d.subsec_nanos() % 1_000_000 != 0);
        let result = if self.pwait2 && needs_ns {
            self.pwait2(timeout)
        } else {
            self.events.clear();
            let ts = timeout.map(|d| timespec(clamp_to_millis_range(d)));
            epoll::wait(
                self.epoll.as_fd(),
                spare_capacity(&mut self.events.0),
                ts.as_ref(),
            )
            .map_err(io::Error::from)
        };
        match result {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(Errno::INTR.raw_os_error()) => return Ok(()),
            Err(e) => return Err(e),
        }
        for event in self.events.iter() {
            let bits = event.flags;
            let mut events = Events::empty();
            if bits.contains(EventFlags::IN) {
                events |= Events::READABLE;
            }
            if bits.contains(EventFlags::OUT) {
                events |= Events::WRITABLE;
            }
            if bits.contains(EventFlags::ERR) {
                events |= Events::ERROR;
            }
            if bits.contains(EventFlags::HUP) {
                events |= Events::HANGUP;
            }
            if !events.is_empty() {
                ready.push(Readiness {
                    token: Token(event.data.u64()),
                    events,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// The fallback for kernels without `epoll_pwait2` rounds up: a 1.5 ms wait never returns
    /// before 1.5 ms.
    #[test]
    fn millisecond_fallback_never_returns_early() {
        let mut epoll = Epoll::new().unwrap();
        epoll.pwait2 = false;
        let mut ready = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            epoll
                .wait(&mut ready, Some(Duration::from_micros(1500)))
                .unwrap();
            assert!(
                start.elapsed() >= Duration::from_micros(1500),
                "{:?}",
                start.elapsed()
            );
        }
        assert!(ready.is_empty());
    }

    /// Nanosecond waits are available on the kernels vireo is developed on (5.11+).
    #[test]
    fn pwait2_probe_and_wait() {
        let mut epoll = Epoll::new().unwrap();
        let mut ready = Vec::new();
        let start = Instant::now();
        epoll
            .wait(&mut ready, Some(Duration::from_micros(300)))
            .unwrap();
        assert!(start.elapsed() >= Duration::from_micros(300));
        if !epoll.has_nanosecond_timeouts() {
            eprintln!("epoll_pwait2 unavailable here: waits use whole milliseconds");
        }
    }
}
