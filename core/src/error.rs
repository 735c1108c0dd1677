//! The error type of the loop handle's operations.

use std::{error, fmt, io};

use crate::{TimerId, WatchId};

/// Why an operation on a [`LoopHandle`](crate::LoopHandle) failed.
///
/// Converts into [`io::Error`] (`?` works in functions returning `io::Result`), and an
/// `io::Error` converts into [`Error::Io`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused: for example `EBADF` for an fd that is not open.
    Io(io::Error),
    /// No watch with this id is registered (never was, or already removed).
    UnknownWatch(WatchId),
    /// No timer with this id is registered (never was, or already removed).
    UnknownTimer(TimerId),
    /// The [`EventLoop`](crate::EventLoop) this handle belongs to has been dropped.
    Closed,
    /// A [`LoopLocal`](crate::LoopLocal) was reached from outside an iteration of its loop on
    /// the loop thread (another thread, no iteration running, or another loop's
    /// [`with_local`](crate::EventLoop::with_local)).
    NotLoopThread,
    /// A [`LoopLocal`](crate::LoopLocal) was reached from inside a `with` of the same value.
    Borrowed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::UnknownWatch(id) => write!(f, "{id} is not registered"),
            Error::UnknownTimer(id) => write!(f, "{id} is not registered"),
            Error::Closed => f.write_str("the event loop has been dropped"),
            Error::NotLoopThread => {
                f.write_str("loop-local state reached outside an iteration of its loop")
            }
            Error::Borrowed => f.write_str("loop-local state is already borrowed"),
        }
    }
}

impl error::Error for Error {
    fn source(&self) -> Option<&(dyn error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            Error::UnknownWatch(_) | Error::UnknownTimer(_) => {
                io::Error::new(io::ErrorKind::NotFound, e)
            }
            Error::Closed => io::Error::new(io::ErrorKind::BrokenPipe, e),
            Error::NotLoopThread | Error::Borrowed => io::Error::other(e),
        }
    }
}
