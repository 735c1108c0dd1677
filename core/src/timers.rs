//! The loop's timers: a slab of timers, a sequential map from ids to slots, and a heap of
//! deadlines with lazy deletion.
//!
//! Ids map to slots through an [`IdMap`] (sequential, cache-friendly). Every
//! [`set`](Timers::set) gives the timer a generation that is unique for the life of the loop;
//! a heap entry is current only while its slot still holds that generation (in `live`, a
//! dense array the heap's compaction scans cheaply).
//!
//! Everything here runs under the state mutex and never calls user code.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::ids::IdMap;
use crate::table::TimerFn;
use crate::{Frequency, TimerId};

struct Timer {
    id: TimerId,
    freq: Frequency,
    /// `None` only while the callback runs.
    cb: Option<Box<TimerFn>>,
}

/// A timer found due at the start of dispatch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Due {
    pub(crate) deadline: Instant,
    pub(crate) id: TimerId,
    slot: usize,
    generation: u64,
}

#[derive(Default)]
pub(crate) struct Timers {
    next_id: u64,
    next_generation: u64,
    slab: Slab<Timer>,
    /// The current generation of the timer in each slot; 0 for a free slot and for a timer
    /// that was removed (its slot is freed at the next purge).
    live: Vec<u64>,
    ids: IdMap,
    /// `(deadline, generation, slot)`; entries whose generation is no longer the slot's are
    /// stale and skipped.
    heap: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    /// Every-iteration timers, by id (the dispatch order among equal deadlines).
    every: BTreeMap<TimerId, usize>,
    /// Slots of removed timers, freed at the next purge.
    removed: Vec<usize>,
}

/// The first deadline after `now` on the grid `deadline + k * period` (k >= 1): the periods
/// missed while the loop was busy coalesce into the firing that is running, and the grid
/// stays where it was (no drift). Computed in 128-bit nanoseconds, so any number of missed
/// periods is exact; `None` when the next deadline is beyond what `Instant` can hold.
pub(crate) fn next_on_grid(deadline: Instant, period: Duration, now: Instant) -> Option<Instant> {
    let next = deadline.checked_add(period)?;
    if next > now {
        return Some(next);
    }
    let period_ns = period.as_nanos();
    let behind = now.duration_since(deadline).as_nanos();
    let ahead = (behind / period_ns + 1) * period_ns;
    let secs = u64::try_from(ahead / 1_000_000_000).ok()?;
    let nanos = (ahead % 1_000_000_000) as u32;
    deadline.checked_add(Duration::new(secs, nanos))
}

impl Timers {
    pub(crate) fn add(&mut self, freq: Frequency, cb: Box<TimerFn>, now: Instant) -> TimerId {
        self.next_id += 1;
        let id = TimerId(self.next_id);
        let slot = self.slab.insert(Timer {
            id,
            freq: Frequency::Disabled,
            cb: Some(cb),
        });
        if self.live.len() <= slot {
            self.live.resize(slot + 1, 0);
        }
        self.ids.insert(id.0, slot);
        self.set(slot, freq, now);
        id
    }

    fn set(&mut self, slot: usize, freq: Frequency, now: Instant) {
        let freq = freq.normalized();
        self.next_generation += 1;
        let generation = self.next_generation;
        self.live[slot] = generation;
        let timer = &mut self.slab[slot];
        let (id, was_every) = (timer.id, timer.freq == Frequency::EveryIteration);
        timer.freq = freq;
        if was_every && freq != Frequency::EveryIteration {
            self.every.remove(&id);
        }
        match freq {
            Frequency::EveryIteration => {
                self.every.insert(id, slot);
            }
            Frequency::Period(p) => {
                // A deadline beyond what `Instant` can hold is never reached: such a timer
                // is scheduled nowhere and never fires.
                if let Some(deadline) = now.checked_add(p) {
                    self.heap.push(Reverse((deadline, generation, slot)));
                }
            }
            Frequency::Disabled => {}
        }
        self.compact_heap();
    }

    /// Updated and removed timers leave stale heap entries behind; once they outnumber the
    /// live ones, drop them all in one linear pass (amortized O(1) per update or removal,
    /// where popping them one by one would cost O(log n) each).
    fn compact_heap(&mut self) {
        if self.heap.len() > 64 && self.heap.len() > 2 * self.live_timers() {
            let live = &self.live;
            self.heap
                .retain(|&Reverse((_, generation, slot))| live[slot] == generation);
        }
    }

    /// Timers not removed (those removed keep their slot until the next purge).
    fn live_timers(&self) -> usize {
        self.slab.len() - self.removed.len()
    }

    /// Returns false for an unknown or removed id.
    pub(crate) fn update(&mut self, id: TimerId, freq: Frequency, now: Instant) -> bool {
        let Some(slot) = self.ids.get(id.0) else {
            return false;
        };
        self.set(slot, freq, now);
        true
    }

    /// Returns false for an unknown or removed id.
    pub(crate) fn remove(&mut self, id: TimerId) -> bool {
        let Some(slot) = self.ids.remove(id.0) else {
            return false;
        };
        self.live[slot] = 0;
        if self.slab[slot].freq == Frequency::EveryIteration {
            self.every.remove(&id);
        }
        self.removed.push(slot);
        self.compact_heap();
        true
    }

    /// Frees the slots of removed timers; their callbacks go to `garbage`.
    pub(crate) fn purge(&mut self, garbage: &mut Vec<Box<TimerFn>>) {
        for slot in self.removed.drain(..) {
            garbage.extend(self.slab.remove(slot).cb);
        }
    }

    /// Everything, for the loop's drop.
    pub(crate) fn clear(&mut self, garbage: &mut Vec<Box<TimerFn>>) {
        garbage.extend(self.slab.drain().filter_map(|t| t.cb));
        self.live.clear();
        self.ids.clear();
        self.heap.clear();
        self.every.clear();
        self.removed.clear();
    }

    /// Whether some timer may be due now or later (the clock need not be read otherwise).
    pub(crate) fn has_any(&self) -> bool {
        !self.heap.is_empty() || !self.every.is_empty()
    }

    /// Whether an every-iteration timer exists (the loop must not block).
    pub(crate) fn has_every(&self) -> bool {
        !self.every.is_empty()
    }

    /// The earliest deadline of a live timer (dropping stale heap entries on the way).
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, generation, slot))) = self.heap.peek() {
            if self.live[slot] == generation {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Moves every timer due at `now` into `due`, sorted by deadline then id.
    pub(crate) fn collect_due(&mut self, now: Instant, due: &mut Vec<Due>) {
        while let Some(&Reverse((deadline, generation, slot))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.live[slot] == generation {
                due.push(Due {
                    deadline,
                    id: self.slab[slot].id,
                    slot,
                    generation,
                });
            }
        }
        for (&id, &slot) in &self.every {
            due.push(Due {
                deadline: now,
                id,
                slot,
                generation: self.live[slot],
            });
        }
        due.sort_unstable_by_key(|d| (d.deadline, d.id));
    }

    /// Puts back due timers that a panic kept from running.
    pub(crate) fn restore_due(&mut self, due: &[Due]) {
        for d in due {
            if self.live[d.slot] == d.generation
                && matches!(self.slab[d.slot].freq, Frequency::Period(_))
            {
                self.heap.push(Reverse((d.deadline, d.generation, d.slot)));
            }
        }
    }

    /// Re-arms a due timer and takes its callback, or returns `None` if it was removed,
    /// disabled or updated since it was found due.
    pub(crate) fn start(&mut self, due: &Due, now: Instant) -> Option<Box<TimerFn>> {
        if self.live.get(due.slot) != Some(&due.generation) {
            return None;
        }
        let timer = &mut self.slab[due.slot];
        if let Frequency::Period(p) = timer.freq {
            if let Some(next) = next_on_grid(due.deadline, p, now) {
                self.heap.push(Reverse((next, due.generation, due.slot)));
            }
        }
        timer.cb.take()
    }

    /// Returns a callback taken by [`start`](Timers::start). The slot still holds the timer
    /// (slots are freed only by purges, which never run during dispatch), removed or not.
    pub(crate) fn put_back(&mut self, due: &Due, cb: Box<TimerFn>) {
        if let Some(t) = self.slab.get_mut(due.slot).filter(|t| t.id == due.id) {
            t.cb = Some(cb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_exact_beyond_two_to_the_32_missed_periods() {
        let start = Instant::now();
        let period = Duration::from_nanos(3);
        let now = start + Duration::from_secs(20); // 6.7e9 periods
        let next = next_on_grid(start, period, now).unwrap();
        assert!(next > now && next <= now + period);
        assert_eq!(next.duration_since(start).as_nanos() % 3, 0);
        assert_eq!(next_on_grid(start, Duration::MAX, now), None);
    }
}
