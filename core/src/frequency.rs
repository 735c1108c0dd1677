//! How often a timer fires.

use std::time::Duration;

/// How often a timer fires (libvirt's `frequency` argument, with nanosecond precision).
///
/// ```
/// use std::time::Duration;
/// use vireo_core::Frequency;
///
/// assert_eq!(Frequency::from_millis(-1), Frequency::Disabled);
/// assert_eq!(Frequency::from_millis(0), Frequency::EveryIteration);
/// assert_eq!(Frequency::from_millis(250), Frequency::Period(Duration::from_millis(250)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Frequency {
    /// Never fires; the timer stays registered and can be re-enabled with
    /// [`update_timeout`](crate::LoopHandle::update_timeout).
    Disabled,
    /// Fires on every loop iteration, and the loop does not block while such a timer exists
    /// (file-descriptor events are still polled and dispatched).
    EveryIteration,
    /// Fires every period, measured from when it was added or last updated. Never early; no
    /// cumulative drift (each deadline is the previous deadline plus the period); periods missed
    /// while the loop was busy coalesce into a single firing. A zero period behaves as
    /// [`EveryIteration`](Frequency::EveryIteration).
    Period(Duration),
}

impl Frequency {
    /// libvirt's millisecond encoding: negative is disabled, 0 is every iteration, a positive
    /// value is a period in milliseconds.
    pub fn from_millis(ms: i32) -> Frequency {
        match ms {
            i32::MIN..=-1 => Frequency::Disabled,
            0 => Frequency::EveryIteration,
            ms => Frequency::Period(Duration::from_millis(ms as u64)),
        }
    }

    /// A periodic frequency; a zero period means every iteration.
    pub fn period(period: Duration) -> Frequency {
        if period.is_zero() {
            Frequency::EveryIteration
        } else {
            Frequency::Period(period)
        }
    }

    pub(crate) fn normalized(self) -> Frequency {
        match self {
            Frequency::Period(p) => Frequency::period(p),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_millisecond_encoding_covers_the_whole_range() {
        assert_eq!(Frequency::from_millis(i32::MIN), Frequency::Disabled);
        assert_eq!(
            Frequency::from_millis(1),
            Frequency::Period(Duration::from_millis(1))
        );
        assert_eq!(
            Frequency::from_millis(i32::MAX),
            Frequency::Period(Duration::from_millis(i32::MAX as u64))
        );
        assert_eq!(Frequency::period(Duration::ZERO), Frequency::EveryIteration);
        assert_eq!(
            Frequency::Period(Duration::ZERO).normalized(),
            Frequency::EveryIteration
        );
    }
}
