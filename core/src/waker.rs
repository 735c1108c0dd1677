//! Cross-thread wakeup of a blocked loop, through an eventfd written only while the loop sleeps.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use rustix::event::{EventfdFlags, eventfd};

/// The loop's wakeup channel.
///
/// Protocol (a Dekker pair on two `SeqCst` variables):
/// - a thread that changed the loop's state bumps `seq`, then, if `sleeping` is set, clears it
///   and writes the eventfd: only the first changer after the loop went to sleep pays the
///   syscall, and changes made on the loop thread (while it is not asleep) never do;
/// - the loop notes `seq` before it reads the state (a change is counted only after it was
///   made under the state lock, so every change up to that value is in what it reads; when
///   `seq` has not moved since the previous iteration left the state clean, it reads nothing),
///   sets `sleeping`, then reads `seq` again: a change it did not see either shows up there
///   (it waits with a zero timeout) or finds `sleeping` set and writes the eventfd.
pub(crate) struct Waker {
    fd: OwnedFd,
    sleeping: AtomicBool,
    seq: AtomicU64,
    writes: AtomicU64,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Waker {
            fd,
            sleeping: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Called after every change to the loop's state, from any thread.
    pub(crate) fn changed(&self) {
        self.seq.fetch_add(1, SeqCst);
        if self.sleeping.load(SeqCst) && self.sleeping.swap(false, SeqCst) {
            self.writes.fetch_add(1, SeqCst);
            // EAGAIN means the counter is saturated: the loop is being woken anyway.
            let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
        }
    }

    /// The change counter; read before the loop reads the state it waits on.
    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(SeqCst)
    }

    /// Marks the loop asleep; returns false when a change arrived since `seen` (then the loop
    /// must not block).
    pub(crate) fn sleep(&self, seen: u64) -> bool {
        self.sleeping.store(true, SeqCst);
        self.seq.load(SeqCst) == seen
    }

    pub(crate) fn awake(&self) {
        self.sleeping.store(false, SeqCst);
    }

    /// Empties the eventfd counter (loop thread, when the backend reported it readable).
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(self.fd.as_fd(), &mut buf);
    }

    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(SeqCst)
    }
}
