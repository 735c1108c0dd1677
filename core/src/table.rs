//! The loop's shared table: watches, the per-fd aggregation, timers, queued closures.
//!
//! Everything here runs under the state mutex and never calls user code.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Instant;

use slab::Slab;
use smallvec::SmallVec;

use crate::ids::IdMap;
use crate::timers::Timers;
use crate::{Backend, Events, LoopHandle, TimerId, Token, WatchId};

pub(crate) type WatchFn = dyn FnMut(&LoopHandle, WatchId, RawFd, Events) + Send;
pub(crate) type TimerFn = dyn FnMut(&LoopHandle, TimerId) + Send;

/// A hasher for the table's integer keys (ids and fd numbers): one multiply, no DoS concern
/// because the keys are chosen by the loop or the kernel, not by a remote peer.
#[derive(Default)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_i32(&mut self, n: i32) {
        self.write_u64(n as u32 as u64);
    }
}

pub(crate) type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// What identifies the file behind an fd number: `st_dev` and `st_ino` from `fstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileIdent {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    /// False for anonymous-inode files (eventfd, timerfd, signalfd, epoll, ...): they all
    /// share one inode, so the pair cannot tell one from another.
    pub(crate) provable: bool,
}

/// A watch's callback and what the dispatch pass reads without the lock, in one allocation:
/// the loop touches one cache line per ready watch beyond its fd's entry.
///
/// The cell stays in place from the watch's addition until the purge after its removal (on
/// the loop thread, never during a dispatch pass); only the loop thread reaches `cb`, and
/// other threads reach only the two atomics, through [`CellRef`]'s field projections, never
/// through a reference to the whole cell.
pub(crate) struct WatchCell<F: ?Sized = WatchFn> {
    /// The watch's events (with [`DETACHED`] once its file is gone), or [`REMOVED`]: written
    /// under the lock by every change, read by the dispatch pass with one atomic load just
    /// before the callback would run.
    flags: AtomicU32,
    /// The number of the dispatch pass that took the watch (odd), or 0: written by the loop
    /// under the lock, read by changers under the lock (see [`State::in_pass`]).
    pass: AtomicU64,
    cb: F,
}

impl<F> WatchCell<F> {
    /// A cell for a callback, with no events yet (the table sets them when it adds it).
    pub(crate) fn new(cb: F) -> Self {
        WatchCell {
            flags: AtomicU32::new(0),
            pass: AtomicU64::new(0),
            cb,
        }
    }
}

/// A watch's cell, owned by its entry in [`State::watches`] (and then by [`Garbage`]); frees
/// the cell and drops the callback's state when dropped.
pub(crate) struct OwnedCell(NonNull<WatchCell>);

// SAFETY: the cell is owned uniquely; the callback is `Send`, the atomics may be reached from
// any thread.
unsafe impl Send for OwnedCell {}

impl OwnedCell {
    fn new(cell: Box<WatchCell>) -> Self {
        OwnedCell(NonNull::from(Box::leak(cell)))
    }

    fn share(&self) -> CellRef {
        CellRef(self.0)
    }

    fn flags(&self) -> &AtomicU32 {
        // SAFETY: the cell lives as long as its owner; only the atomic field is borrowed.
        unsafe { self.share().flags() }
    }

    fn pass(&self) -> &AtomicU64 {
        // SAFETY: as in `flags`.
        unsafe { self.share().pass() }
    }
}

impl Drop for OwnedCell {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `Box::leak` and is dropped once, by its one owner;
        // every `CellRef` to it is gone (the watch left its fd's list when it was removed, and
        // dispatch passes clear their `Taken` lists before any purge).
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// A borrowed pointer to a live watch's cell: on its fd's list, and in the dispatch pass's
/// [`Taken`] list.
#[derive(Clone, Copy)]
pub(crate) struct CellRef(NonNull<WatchCell>);

// SAFETY: only the atomics are reached through a `CellRef` from other threads; the callback
// only by the loop thread (see `callback`).
unsafe impl Send for CellRef {}

impl CellRef {
    /// # Safety
    ///
    /// The cell must still be alive (not purged).
    pub(crate) unsafe fn flags<'a>(self) -> &'a AtomicU32 {
        // SAFETY: alive per the caller; the projection borrows the atomic field alone.
        unsafe { &*ptr::addr_of!((*self.0.as_ptr()).flags) }
    }

    /// # Safety
    ///
    /// As [`flags`](CellRef::flags).
    unsafe fn pass<'a>(self) -> &'a AtomicU64 {
        // SAFETY: as in `flags`.
        unsafe { &*ptr::addr_of!((*self.0.as_ptr()).pass) }
    }

    /// The callback, for the dispatch pass.
    ///
    /// # Safety
    ///
    /// The cell must be alive, and the caller must be the loop thread inside its dispatch
    /// pass, with no other borrow of this callback (callbacks cannot run the loop, so a
    /// callback is never called from inside itself).
    pub(crate) unsafe fn callback<'a>(self) -> &'a mut WatchFn {
        // SAFETY: alive per the caller; only the loop thread borrows `cb`, one call at a
        // time, and other threads never borrow the field (only the atomics beside it).
        unsafe { &mut *ptr::addr_of_mut!((*self.0.as_ptr()).cb) }
    }
}

pub(crate) struct Watch {
    fd_slot: usize,
    /// Left behind by a file that was closed while watched: its number now names another
    /// file, so the watch is out of its fd's fan-out (silent) until it is removed.
    detached: bool,
    pub(crate) events: Events,
    pub(crate) removed: bool,
    cell: OwnedCell,
}

/// A watch on its fd's list: what dispatch needs, without a visit to [`State::watches`].
#[derive(Clone, Copy)]
struct WatchRef {
    id: WatchId,
    slot: usize,
    cell: CellRef,
}

/// A ready watch, taken for one dispatch pass (its callback stays in its cell).
pub(crate) struct Taken {
    pub(crate) id: WatchId,
    pub(crate) fd: RawFd,
    pub(crate) ready: Events,
    pub(crate) cell: CellRef,
}

/// The bit of a watch's flags that says the watch was removed (the low bits are its events).
pub(crate) const REMOVED: u32 = 1 << 31;

/// The bit of a watch's flags that says the watch is out of its fd's fan-out: a watch was
/// added for another file on its number (its own file was closed while watched). The
/// dispatch pass skips it, also when the pass had already taken it.
pub(crate) const DETACHED: u32 = 1 << 30;

/// One kernel registration, shared by every watch on the same fd number.
///
/// The fields dispatch reads come first (`repr(C)`), so that the token check and the first
/// watch share a cache line.
#[repr(C)]
struct FdEntry {
    token: Token,
    /// Live (not removed) watches, ascending id order; one fits in the entry itself.
    watches: SmallVec<[WatchRef; 1]>,
    fd: RawFd,
    ident: FileIdent,
    /// The interest the backend has now; `None` when not registered.
    kernel: Option<Events>,
    dirty: bool,
    /// A different file now has this number: re-register from scratch with a new token.
    reopened: bool,
}

/// Callback state to drop outside the lock.
#[derive(Default)]
pub(crate) struct Garbage {
    watches: Vec<OwnedCell>,
    timers: Vec<Box<TimerFn>>,
}

/// When the loop must wake up at the latest, whatever becomes ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Only readiness or a change wakes it.
    Never,
    /// At once: an every-iteration timer, or a refused registration to report.
    Now,
    /// At the earliest timer deadline.
    At(Instant),
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) closed: bool,
    next_watch: u64,
    next_generation: u32,
    /// Watches by slot; a removed watch keeps its slot until the next purge (never during a
    /// dispatch pass), so a slot found in this iteration names the same watch all through it.
    pub(crate) watches: Slab<Watch>,
    watch_ids: IdMap,
    fds: Slab<FdEntry>,
    fd_index: IntMap<RawFd, usize>,
    dirty: Vec<usize>,
    pub(crate) timers: Timers,
    /// Slots of removed watches, freed at the next purge.
    removed_watches: Vec<usize>,
    pub(crate) kernel_changes: u64,
    /// Tokens of the fds whose interest change the backend refused since the last dispatch:
    /// their watches get `ERROR` in the next one, and the change is retried in the next
    /// iteration.
    pub(crate) failed: Vec<Token>,
}

/// Errors that mean the fd number no longer names the file the kernel registered: closed
/// (`EBADF`), reused by another file (`ENOENT`), or reused by a file that cannot be polled at
/// all (`EPERM`: epoll refuses every operation on a directory or a procfs file, also `DEL`).
/// A program may close an fd as soon as `remove_handle` returns, before the loop applies the
/// removal, and any thread may open a file under that number in between.
fn ignorable_deregister_error(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::BADF | rustix::io::Errno::NOENT | rustix::io::Errno::PERM)
    )
}

impl State {
    fn generation(&mut self) -> u32 {
        self.next_generation = self.next_generation.wrapping_add(1);
        self.next_generation
    }

    fn mark_dirty(&mut self, slot: usize) {
        let entry = &mut self.fds[slot];
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push(slot);
        }
    }

    pub(crate) fn add_watch(
        &mut self,
        fd: RawFd,
        ident: FileIdent,
        events: Events,
        cell: Box<WatchCell>,
    ) -> WatchId {
        self.next_watch += 1;
        let id = WatchId(self.next_watch);
        let slot = match self.fd_index.get(&fd) {
            Some(&slot) => {
                let entry = &mut self.fds[slot];
                let other_file = entry.ident != ident;
                // Two anonymous-inode files look the same: after every watch of the old one
                // was removed, a new watch may be for another file on the same number (an
                // eventfd replaced with dup2), so it gets a registration of its own.
                let unprovable = !ident.provable && entry.watches.is_empty();
                if other_file || unprovable {
                    // The number was closed and reused (after its watches were removed, or in
                    // violation of the contract): the kernel registration, if any, is not for
                    // this file.
                    entry.ident = ident;
                    entry.reopened = true;
                    if other_file {
                        // Watches still here belong to the closed file: they must never
                        // receive the new file's events.
                        for stale in std::mem::take(&mut entry.watches) {
                            let watch = &mut self.watches[stale.slot];
                            watch.detached = true;
                            // Seen by a dispatch pass that already took it (this add may
                            // come from a callback that runs before it).
                            watch
                                .cell
                                .flags()
                                .store(watch.events.bits() | DETACHED, SeqCst);
                        }
                    }
                    self.mark_dirty(slot);
                }
                slot
            }
            None => {
                let generation = self.generation();
                let entry = self.fds.vacant_entry();
                let slot = entry.key();
                entry.insert(FdEntry {
                    fd,
                    ident,
                    watches: SmallVec::new(),
                    kernel: None,
                    token: Token::new(slot, generation),
                    dirty: false,
                    reopened: false,
                });
                self.fd_index.insert(fd, slot);
                // An entry with no watch after sync is freed; make sure sync sees it.
                self.mark_dirty(slot);
                slot
            }
        };
        cell.flags.store(events.bits(), Relaxed);
        let cell = OwnedCell::new(cell);
        let shared = cell.share();
        let watch_slot = self.watches.insert(Watch {
            fd_slot: slot,
            detached: false,
            events,
            removed: false,
            cell,
        });
        self.watch_ids.insert(id.0, watch_slot);
        self.fds[slot].watches.push(WatchRef {
            id,
            slot: watch_slot,
            cell: shared,
        });
        if !events.is_empty() {
            self.mark_dirty(slot);
        }
        id
    }

    /// Whether the watch with this cell was taken by the dispatch pass that is running now:
    /// only then can its callback be running, or about to run, on the loop thread. `pass` is
    /// the loop's [`pass`](crate::event_loop) counter, read under the lock: odd while a pass
    /// runs. (The loop writes the cell's mark and an odd count under the lock; the even count
    /// that ends the pass needs no lock: a changer that still reads the odd one only checks
    /// more than it needs to.)
    fn in_pass(cell: &OwnedCell, pass: u64) -> bool {
        pass & 1 == 1 && cell.pass().load(Relaxed) == pass
    }

    /// Returns `None` for an unknown or removed id, else whether the watch was taken by the
    /// dispatch pass running now (see [`in_pass`](State::in_pass)).
    pub(crate) fn update_watch(&mut self, id: WatchId, events: Events, pass: u64) -> Option<bool> {
        let watch = self
            .watch_ids
            .get(id.0)
            .map(|slot| &mut self.watches[slot])?;
        let taken = Self::in_pass(&watch.cell, pass);
        if watch.events != events {
            watch.events = events;
            let detached = if watch.detached { DETACHED } else { 0 };
            watch.cell.flags().store(events.bits() | detached, SeqCst);
            if !watch.detached {
                let slot = watch.fd_slot;
                self.mark_dirty(slot);
            }
        }
        Some(taken)
    }

    /// As [`update_watch`](State::update_watch).
    pub(crate) fn remove_watch(&mut self, id: WatchId, pass: u64) -> Option<bool> {
        let watch_slot = self.watch_ids.remove(id.0)?;
        let watch = &mut self.watches[watch_slot];
        watch.removed = true;
        watch.cell.flags().store(REMOVED, SeqCst);
        let taken = Self::in_pass(&watch.cell, pass);
        if !watch.detached {
            let slot = watch.fd_slot;
            self.fds[slot].watches.retain(|w| w.id != id);
            self.mark_dirty(slot);
        }
        self.removed_watches.push(watch_slot);
        Some(taken)
    }

    /// Takes the state of removed watches and timers out of the table, to be dropped by the
    /// caller once the lock is released.
    pub(crate) fn purge(&mut self, garbage: &mut Garbage) {
        for slot in self.removed_watches.drain(..) {
            garbage.watches.push(self.watches.remove(slot).cell);
        }
        self.timers.purge(&mut garbage.timers);
    }

    /// Everything, for the loop's drop.
    pub(crate) fn clear(&mut self, garbage: &mut Garbage) {
        self.closed = true;
        garbage.watches.extend(self.watches.drain().map(|w| w.cell));
        self.watch_ids.clear();
        self.removed_watches.clear();
        self.timers.clear(&mut garbage.timers);
        self.fds.clear();
        self.fd_index.clear();
        self.dirty.clear();
    }

    /// Applies the net change of every dirty fd to the backend.
    ///
    /// A change the backend refuses belongs to that fd alone: the fd stays dirty (retried in
    /// the next iteration), keeps the registration it had (backends change nothing when they
    /// fail), and its token goes to `failed`, so its watches hear `ERROR`. Every other fd is
    /// synced as usual. Only the backend's `flush` error is returned.
    pub(crate) fn sync<B: Backend>(&mut self, backend: &mut B) -> io::Result<()> {
        let mut first_error = None;
        let changes_before = self.kernel_changes;
        let dirty = std::mem::take(&mut self.dirty);
        let mut retry = Vec::new();
        for &slot in &dirty {
            let entry = &mut self.fds[slot];
            entry.dirty = false;
            let fd = entry.fd;
            let mut want: Option<Events> = None;
            for w in &entry.watches {
                let events = self.watches[w.slot].events;
                if !events.is_empty() {
                    *want.get_or_insert(Events::empty()) |= events & Events::INTEREST;
                }
            }
            if entry.reopened {
                entry.reopened = false;
                if entry.kernel.take().is_some() {
                    self.kernel_changes += 1;
                    // The number now names another file: this fails or removes a registration
                    // the kernel kept for the old file under the same (file, fd) key.
                    let _ = backend.deregister(fd, entry.token);
                }
                self.next_generation = self.next_generation.wrapping_add(1);
                entry.token = Token::new(slot, self.next_generation);
            }
            let result = match (entry.kernel, want) {
                (old, new) if old == new => Ok(()),
                (None, Some(new)) => {
                    self.kernel_changes += 1;
                    backend.register(fd, entry.token, new)
                }
                (Some(_), Some(new)) => {
                    self.kernel_changes += 1;
                    backend.reregister(fd, entry.token, new)
                }
                (Some(_), None) => {
                    self.kernel_changes += 1;
                    backend.deregister(fd, entry.token).or_else(|e| {
                        if ignorable_deregister_error(&e) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                }
                (None, None) => unreachable!("covered by the equality arm"),
            };
            match result {
                Ok(()) => entry.kernel = want,
                // The fd was closed after the watch was added (a contract violation): it stays
                // silent, as a closed fd does on every backend.
                Err(e) if want.is_some() && ignorable_deregister_error(&e) => entry.kernel = want,
                Err(_) => {
                    if want.is_some() {
                        self.failed.push(entry.token);
                    }
                    retry.push(slot);
                    continue;
                }
            }
            if entry.watches.is_empty() && entry.kernel.is_none() {
                self.fd_index.remove(&fd);
                self.fds.remove(slot);
            }
        }
        let mut dirty = dirty;
        dirty.clear();
        self.dirty = dirty;
        for slot in retry {
            self.mark_dirty(slot);
        }
        if self.kernel_changes != changes_before {
            if let Err(e) = backend.flush() {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// When the loop must wake up at the latest, whatever is ready.
    pub(crate) fn next_wake(&mut self) -> Wake {
        if self.timers.has_every() || !self.failed.is_empty() {
            return Wake::Now;
        }
        if !self.timers.has_any() {
            return Wake::Never;
        }
        self.timers.next_deadline().map_or(Wake::Never, Wake::At)
    }

    /// Whether no fd waits for a change to reach the backend.
    pub(crate) fn is_synced(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Takes the watches on the fd behind `token` for dispatch pass `pass` (odd), each with
    /// `events`; a watch already taken in this pass (its token was reported twice, or a
    /// refused registration's `ERROR` came beside a report) gets `events` added instead, so
    /// that it runs once. Returns false when no fd has `token`.
    #[inline]
    pub(crate) fn take_ready(
        &mut self,
        token: Token,
        events: Events,
        pass: u64,
        out: &mut Vec<Taken>,
    ) -> bool {
        let Some(entry) = self.fds.get(token.slot()).filter(|e| e.token == token) else {
            return false;
        };
        for w in &entry.watches {
            // SAFETY: a cell on its fd's list is alive: the watch leaves the list when it is
            // removed, before a later purge frees the cell.
            let mark = unsafe { w.cell.pass() };
            if mark.load(Relaxed) == pass {
                if let Some(t) = out.iter_mut().rev().find(|t| t.id == w.id) {
                    t.ready |= events;
                }
            } else {
                mark.store(pass, Relaxed);
                out.push(Taken {
                    id: w.id,
                    fd: entry.fd,
                    ready: events,
                    cell: w.cell,
                });
            }
        }
        true
    }

    /// Marks every fd as unregistered and dirty, for a fresh backend instance.
    pub(crate) fn forget_kernel(&mut self) {
        for (slot, entry) in self.fds.iter_mut() {
            entry.kernel = None;
            entry.reopened = false;
            if !entry.dirty {
                entry.dirty = true;
                self.dirty.push(slot);
            }
        }
    }
}
