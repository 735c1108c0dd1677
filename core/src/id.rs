//! Identifiers of watches and timers, and the tokens handed to backends.

use std::fmt;

/// Identifies a file-descriptor watch (libvirt's *watch*).
///
/// Watch ids start at 1, grow by one per [`add_handle`](crate::LoopHandle::add_handle) on a
/// loop, and are never reused, even after the watch is removed. Timers count separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WatchId(pub(crate) u64);

/// Identifies a timer (libvirt's *timeout*).
///
/// Timer ids start at 1, grow by one per [`add_timeout`](crate::LoopHandle::add_timeout) on a
/// loop, and are never reused. Watches count separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId(pub(crate) u64);

impl WatchId {
    /// The numeric value (at least 1).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl TimerId {
    /// The numeric value (at least 1).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for WatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "watch {}", self.0)
    }
}

impl fmt::Display for TimerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timer {}", self.0)
    }
}

/// The opaque value a [`Backend`](crate::Backend) stores with a registration and reports back
/// with each readiness event.
///
/// The core packs a table slot and a generation into it, so an event that was already queued in
/// the kernel when its registration went away is recognised as stale and dropped. Backends treat
/// it as an opaque `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

impl Token {
    /// The token of the loop's own wakeup eventfd.
    pub const WAKER: Token = Token(u64::MAX);

    /// A token no registration ever has. A backend reports it for readiness it cannot
    /// attribute to a current registration (a registration the kernel kept for a file that was
    /// closed and replaced); the core then replaces the backend with a fresh instance, as it
    /// does for any stale token.
    pub const UNKNOWN: Token = Token(u64::MAX - 1);

    pub(crate) fn new(slot: usize, generation: u32) -> Token {
        debug_assert!(slot < u32::MAX as usize);
        Token(((generation as u64) << 32) | slot as u64)
    }

    pub(crate) fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_slot_and_generation() {
        let t = Token::new(12345, 0xdead_beef);
        assert_eq!(t.slot(), 12345);
        assert_eq!(t.0 >> 32, 0xdead_beef);
        assert_ne!(t, Token::WAKER);
    }
}
