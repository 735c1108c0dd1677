//! libvirt's ids: positive `int`s from a counter starting at 1, never reused, mapped to
//! vireo's ids.

use std::collections::HashMap;
use std::ffi::c_int;

/// One counter and its live ids.
#[derive(Debug)]
pub(crate) struct Ids<T> {
    /// The next id to hand out; `None` once `c_int::MAX` was handed out.
    next: Option<c_int>,
    live: HashMap<c_int, T>,
}

impl<T> Default for Ids<T> {
    fn default() -> Self {
        Ids {
            next: Some(1),
            live: HashMap::new(),
        }
    }
}

impl<T: Copy> Ids<T> {
    /// The next id, or `None` when every positive `int` has been handed out.
    pub(crate) fn allocate(&mut self) -> Option<c_int> {
        let id = self.next?;
        self.next = id.checked_add(1);
        Some(id)
    }

    pub(crate) fn insert(&mut self, id: c_int, value: T) {
        self.live.insert(id, value);
    }

    pub(crate) fn get(&self, id: c_int) -> Option<T> {
        self.live.get(&id).copied()
    }

    pub(crate) fn remove(&mut self, id: c_int) -> Option<T> {
        self.live.remove(&id)
    }

    #[cfg(test)]
    fn starting_at(next: c_int) -> Self {
        Ids {
            next: Some(next),
            live: HashMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_count_up() {
        let mut ids = Ids::<u8>::default();
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.allocate(), Some(2));
        ids.insert(2, 7);
        assert_eq!(ids.get(2), Some(7));
        assert_eq!(ids.remove(2), Some(7));
        assert_eq!(ids.remove(2), None);
        assert_eq!(ids.get(2), None);
        // Never reused.
        assert_eq!(ids.allocate(), Some(3));
    }

    #[test]
    fn the_last_positive_int_is_the_last_id() {
        let mut ids = Ids::<u8>::starting_at(c_int::MAX - 1);
        assert_eq!(ids.allocate(), Some(c_int::MAX - 1));
        assert_eq!(ids.allocate(), Some(c_int::MAX));
        // Exhausted: no wrap to a negative id, 0, or 1 (handed out before).
        assert_eq!(ids.allocate(), None);
        assert_eq!(ids.allocate(), None);
    }

    #[test]
    fn non_positive_ids_are_never_live() {
        let ids = Ids::<u8>::default();
        assert_eq!(ids.get(0), None);
        assert_eq!(ids.get(-1), None);
    }
}
