//! Conversions of wait timeouts shared by the backends.

use std::time::Duration;

use rustix::time::Timespec;

/// A `Timespec` for `d`, saturating at about 292 billion years.
pub(crate) fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    }
}

/// Clamps `d` to what millisecond-resolution waits accept (`i32::MAX` ms, about 24.8 days).
/// A longer wait returns early, which the core treats as a spurious wakeup.
#[cfg_attr(not(feature = "epoll"), allow(dead_code))]
pub(crate) fn clamp_to_millis_range(d: Duration) -> Duration {
    d.min(Duration::from_millis(i32::MAX as u64 - 1))
}
