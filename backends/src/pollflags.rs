//! poll(2)'s flags and vireo's [`Events`], both ways: for the poll backend and for the exact
//! view the portable backend takes of an fd that reported a hangup or an error.

use rustix::event::PollFlags;
use vireo_core::Events;

/// The `events` of a `pollfd` for `interest` (errors and hangups need no bit: poll(2) always
/// reports them).
pub(crate) fn poll_flags(interest: Events) -> PollFlags {
    let mut flags = PollFlags::empty();
    if interest.contains(Events::READABLE) {
        flags |= PollFlags::IN;
    }
    if interest.contains(Events::WRITABLE) {
        flags |= PollFlags::OUT;
    }
    flags
}

/// What a `pollfd`'s `revents` report, in vireo's terms (`POLLNVAL` and the bits vireo does
/// not use map to nothing).
pub(crate) fn events_of(revents: PollFlags) -> Events {
    let mut events = Events::empty();
    if revents.contains(PollFlags::IN) {
        events |= Events::READABLE;
    }
    if revents.contains(PollFlags::OUT) {
        events |= Events::WRITABLE;
    }
    if revents.contains(PollFlags::ERR) {
        events |= Events::ERROR;
    }
    if revents.contains(PollFlags::HUP) {
        events |= Events::HANGUP;
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interest_and_reports_map_bit_for_bit() {
        assert_eq!(poll_flags(Events::empty()), PollFlags::empty());
        assert_eq!(
            poll_flags(Events::READABLE | Events::WRITABLE | Events::ERROR),
            PollFlags::IN | PollFlags::OUT
        );
        assert_eq!(events_of(PollFlags::IN), Events::READABLE);
        assert_eq!(events_of(PollFlags::OUT), Events::WRITABLE);
        assert_eq!(
            events_of(PollFlags::ERR | PollFlags::HUP),
            Events::ERROR | Events::HANGUP
        );
        assert_eq!(events_of(PollFlags::NVAL | PollFlags::PRI), Events::empty());
    }
}
