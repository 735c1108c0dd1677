//! The always-ready emulation of files the kernel refuses to poll (epoll's `EPERM` for regular
//! files and directories), shared by the backends that need it.

use std::os::fd::{BorrowedFd, RawFd};

use vireo_core::{Events, Token};

/// What identifies the file behind an fd number: `(st_dev, st_ino)`, or `None` when the number
/// is not open.
fn identity(fd: RawFd) -> Option<(u64, u64)> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is non-negative and the borrow lives for one `fstat`; a closed number makes
    // the kernel answer EBADF and touches no memory.
    let stat = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

/// A registration of a file that cannot be polled: always ready for its interest while the fd
/// still names the file it named at registration (backend rule 7: a closed fd goes silent
/// rather than firing forever, and its number reused by another file is not reported).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unpollable {
    pub(crate) fd: RawFd,
    pub(crate) token: Token,
    pub(crate) interest: Events,
    file: Option<(u64, u64)>,
}

impl Unpollable {
    /// A registration of `fd`, whose file is identified now.
    pub(crate) fn new(fd: RawFd, token: Token, interest: Events) -> Unpollable {
        Unpollable {
            fd,
            token,
            interest,
            file: identity(fd),
        }
    }

    /// The readiness to report now: the whole interest, unless the interest is empty or the fd
    /// no longer names the registered file (one `fstat`).
    pub(crate) fn ready(&self) -> Option<Events> {
        let events = self.interest & Events::INTEREST;
        if events.is_empty() || self.file.is_none() || identity(self.fd) != self.file {
            return None;
        }
        Some(events)
    }
}
