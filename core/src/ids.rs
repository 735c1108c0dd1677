//! A map from sequential ids to slab slots, for ids handed out in sequence and never reused.
//!
//! The map is a window over the recent ids (a deque indexed by `id - base`) with a hash map for
//! the few old ids that outlive the window: adding and removing entries in roughly the order
//! they were made (timeouts, connections) touches memory in sequence instead of hashing into a
//! table of a million entries.

use std::collections::VecDeque;

use crate::table::IntMap;

/// A window entry that holds no slot (removed, or kept in [`IdMap::old`]).
const NONE: u32 = u32::MAX;

/// Below this many entries the window is never compacted.
const WINDOW_FLOOR: usize = 1024;

/// Timer id -> slot.
#[derive(Default)]
pub(crate) struct IdMap {
    /// The id of `window[0]`.
    base: u64,
    /// The slots of ids `base..base + window.len()`.
    window: VecDeque<u32>,
    /// Entries of `window` that are not `NONE`.
    in_window: usize,
    /// Ids that left the window while their timer lived on, and slots too large for a `u32`.
    old: IntMap<u64, usize>,
}

impl IdMap {
    /// Maps `id`, which is above every id inserted before.
    pub(crate) fn insert(&mut self, id: u64, slot: usize) {
        if self.window.is_empty() {
            self.base = id;
        }
        while self.base + (self.window.len() as u64) < id {
            self.window.push_back(NONE);
        }
        match u32::try_from(slot) {
            Ok(s) if s != NONE => {
                self.window.push_back(s);
                self.in_window += 1;
            }
            _ => {
                self.window.push_back(NONE);
                self.old.insert(id, slot);
            }
        }
    }

    fn window_index(&self, id: u64) -> Option<usize> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (i < self.window.len()).then_some(i)
    }

    pub(crate) fn get(&self, id: u64) -> Option<usize> {
        match self.window_index(id).map(|i| self.window[i]) {
            Some(s) if s != NONE => Some(s as usize),
            _ => self.old.get(&id).copied(),
        }
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<usize> {
        let Some(i) = self.window_index(id).filter(|&i| self.window[i] != NONE) else {
            return self.old.remove(&id);
        };
        let slot = std::mem::replace(&mut self.window[i], NONE) as usize;
        self.in_window -= 1;
        self.trim_front();
        if self.window.len() > WINDOW_FLOOR && self.window.len() > 4 * self.in_window {
            // Mostly holes: the few survivors of the older half move to `old`, so a
            // long-lived timer does not keep every later id's entry alive.
            let half = self.window.len() / 2;
            for (k, s) in self.window.drain(..half).enumerate() {
                if s != NONE {
                    self.old.insert(self.base + k as u64, s as usize);
                    self.in_window -= 1;
                }
            }
            self.base += half as u64;
            self.trim_front();
        }
        Some(slot)
    }

    fn trim_front(&mut self) {
        while self.window.front() == Some(&NONE) {
            self.window.pop_front();
            self.base += 1;
        }
    }

    pub(crate) fn clear(&mut self) {
        self.window.clear();
        self.in_window = 0;
        self.old.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_map_stays_small_behind_a_long_lived_id() {
        let mut m = IdMap::default();
        m.insert(1, 7);
        for id in 2..100_000u64 {
            m.insert(id, id as usize);
            assert_eq!(m.remove(id), Some(id as usize));
        }
        assert!(m.window.len() <= 2 * WINDOW_FLOOR, "{}", m.window.len());
        assert_eq!(m.get(1), Some(7));
        assert_eq!(m.get(5), None);
        assert_eq!(m.remove(1), Some(7));
        assert_eq!(m.remove(1), None);
        assert!(m.old.is_empty() && m.window.is_empty());
    }

    #[test]
    fn the_id_map_agrees_with_a_hash_map() {
        use std::collections::HashMap;
        let mut m = IdMap::default();
        let mut reference = HashMap::new();
        let mut next = 0u64;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200_000 {
            let r = rand();
            if r % 3 != 0 || reference.is_empty() {
                next += 1 + r % 2;
                // Slots past u32 go to the side map.
                let slot = if r % 97 == 0 {
                    u32::MAX as usize + 5
                } else {
                    (r >> 8) as usize % 5000
                };
                m.insert(next, slot);
                reference.insert(next, slot);
            } else {
                let id = next.saturating_sub(rand() % 4000);
                assert_eq!(m.remove(id), reference.remove(&id), "remove {id}");
            }
            let probe = next.saturating_sub(rand() % 6000);
            assert_eq!(m.get(probe), reference.get(&probe).copied(), "get {probe}");
        }
        for (id, slot) in reference {
            assert_eq!(m.remove(id), Some(slot));
        }
        assert!(m.window.is_empty() && m.old.is_empty() && m.in_window == 0);
    }
}
