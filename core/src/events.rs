//! The readiness flags shared by watches, callbacks and backends.

use bitflags::bitflags;

bitflags! {
    /// A set of readiness conditions on a file descriptor.
    ///
    /// The values are libvirt's (`VIR_EVENT_HANDLE_*`), so a number logged by vireo means the
    /// same as one logged by libvirt.
    ///
    /// As an *interest* (given to [`LoopHandle::add_handle`](crate::LoopHandle::add_handle) and
    /// [`LoopHandle::update_handle`](crate::LoopHandle::update_handle)) only
    /// [`READABLE`](Events::READABLE) and [`WRITABLE`](Events::WRITABLE) select what the
    /// kernel watches; [`ERROR`](Events::ERROR) and [`HANGUP`](Events::HANGUP) are always
    /// reported to a watch whose interest is not empty.
    ///
    /// ```
    /// use vireo_core::Events;
    ///
    /// let interest = Events::READABLE | Events::WRITABLE;
    /// assert!(interest.contains(Events::READABLE));
    /// assert_eq!(Events::HANGUP.bits(), 8);
    /// ```
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Events: u32 {
        /// Data can be read without blocking (`POLLIN`), or the peer closed with data pending.
        const READABLE = 1 << 0;
        /// Data can be written without blocking (`POLLOUT`).
        const WRITABLE = 1 << 1;
        /// An error condition (`POLLERR`), e.g. writing to a pipe whose reader is gone.
        const ERROR = 1 << 2;
        /// The peer hung up (`POLLHUP`).
        const HANGUP = 1 << 3;
    }
}

impl Events {
    /// The conditions a watch may select: `READABLE | WRITABLE`.
    pub const INTEREST: Events = Events::READABLE.union(Events::WRITABLE);
    /// The conditions every active watch receives whether or not it asked: `ERROR | HANGUP`.
    pub const ALWAYS: Events = Events::ERROR.union(Events::HANGUP);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_libvirts() {
        assert_eq!(Events::READABLE.bits(), 1);
        assert_eq!(Events::WRITABLE.bits(), 2);
        assert_eq!(Events::ERROR.bits(), 4);
        assert_eq!(Events::HANGUP.bits(), 8);
        assert_eq!(Events::INTEREST | Events::ALWAYS, Events::all());
    }
}
