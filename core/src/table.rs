//! The loop's shared table: watches, the per-fd aggregation, timers, queued closures.
//!
//! Everything here runs under the state mutex and never calls user code.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use slab::Slab;

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

pub(crate) struct Watch {
    pub(crate) id: WatchId,
    pub(crate) fd: RawFd,
    fd_slot: usize,
    /// Left behind by a file that was closed while watched: its number now names another
    /// file, so the watch is out of its fd's fan-out (silent) until it is removed.
    detached: bool,
    pub(crate) events: Events,
    pub(crate) removed: bool,
    /// `events` and `removed` for the dispatch pass, which reads them without the lock:
    /// written under the lock by every change, read with one atomic load per dispatch.
    pub(crate) flags: Arc<AtomicU32>,
    /// `None` only while the callback runs.
    pub(crate) cb: Option<Box<WatchFn>>,
}

/// A watch taken out of the table for one dispatch pass.
pub(crate) struct Taken {
    pub(crate) id: WatchId,
    pub(crate) slot: usize,
    pub(crate) fd: RawFd,
    pub(crate) ready: Events,
    /// The watch's [`Watch::flags`], borrowed for the pass.
    pub(crate) flags: *const AtomicU32,
    pub(crate) cb: Box<WatchFn>,
}

// SAFETY: `flags` is only dereferenced during the pass that created it, on the thread that
// runs the pass; between passes the list of `Taken` is empty, so moving the loop to another
// thread moves no live pointer. The callback is `Send` itself.
unsafe impl Send for Taken {}

/// The bit of [`Watch::flags`] that says the watch was removed (the low bits are its events).
pub(crate) const REMOVED: u32 = 1 << 31;

/// One kernel registration, shared by every watch on the same fd number.
struct FdEntry {
    fd: RawFd,
    ident: FileIdent,
    /// Live (not removed) watches as `(id, slot in State::watches)`, ascending id order.
    watches: Vec<(WatchId, usize)>,
    /// The interest the backend has now; `None` when not registered.
    kernel: Option<Events>,
    token: Token,
    dirty: bool,
    /// A different file now has this number: re-register from scratch with a new token.
    reopened: bool,
}

/// Callback state to drop outside the lock.
#[derive(Default)]
pub(crate) struct Garbage {
    watches: Vec<Box<WatchFn>>,
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
        cb: Box<WatchFn>,
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
                        for (_, stale) in std::mem::take(&mut entry.watches) {
                            self.watches[stale].detached = true;
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
                    watches: Vec::new(),
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
        let watch_slot = self.watches.insert(Watch {
            id,
            fd,
            fd_slot: slot,
            detached: false,
            events,
            removed: false,
            flags: Arc::new(AtomicU32::new(events.bits())),
            cb: Some(cb),
        });
        self.watch_ids.insert(id.0, watch_slot);
        self.fds[slot].watches.push((id, watch_slot));
        if !events.is_empty() {
            self.mark_dirty(slot);
        }
        id
    }

    /// Returns false for an unknown or removed id.
    /// Returns `None` for an unknown or removed id, else whether the watch's callback is out
    /// of the table for the dispatch pass running now (only then can it be running, or about
    /// to run, on the loop thread).
    pub(crate) fn update_watch(&mut self, id: WatchId, events: Events) -> Option<bool> {
        let watch = self
            .watch_ids
            .get(id.0)
            .map(|slot| &mut self.watches[slot])?;
        let taken = watch.cb.is_none();
        if watch.events != events {
            watch.events = events;
            watch.flags.store(events.bits(), SeqCst);
            if !watch.detached {
                let slot = watch.fd_slot;
                self.mark_dirty(slot);
            }
        }
        Some(taken)
    }

    /// As [`update_watch`](State::update_watch).
    pub(crate) fn remove_watch(&mut self, id: WatchId) -> Option<bool> {
        let watch_slot = self.watch_ids.remove(id.0)?;
        let watch = &mut self.watches[watch_slot];
        watch.removed = true;
        watch.flags.store(REMOVED, SeqCst);
        let taken = watch.cb.is_none();
        if !watch.detached {
            let slot = watch.fd_slot;
            self.fds[slot].watches.retain(|w| w.0 != id);
            self.mark_dirty(slot);
        }
        self.removed_watches.push(watch_slot);
        Some(taken)
    }

    /// Takes the state of removed watches and timers out of the table, to be dropped by the
    /// caller once the lock is released.
    pub(crate) fn purge(&mut self, garbage: &mut Garbage) {
        for slot in self.removed_watches.drain(..) {
            garbage.watches.extend(self.watches.remove(slot).cb);
        }
        self.timers.purge(&mut garbage.timers);
    }

    /// Everything, for the loop's drop.
    pub(crate) fn clear(&mut self, garbage: &mut Garbage) {
        self.closed = true;
        garbage
            .watches
            .extend(self.watches.drain().filter_map(|w| w.cb));
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
            for &(_, watch_slot) in &entry.watches {
                let events = self.watches[watch_slot].events;
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

    /// The timeout until the earliest periodic deadline; `Some(ZERO)` when an every-iteration
    /// timer exists or a failed registration has an `ERROR` to deliver;
    /// `None` when nothing is scheduled.
    pub(crate) fn timeout(&mut self, now: impl FnOnce() -> Instant) -> Option<Duration> {
        match self.next_wake() {
            Wake::Never => None,
            Wake::Now => Some(Duration::ZERO),
            Wake::At(deadline) => Some(deadline.saturating_duration_since(now())),
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

    /// Takes the callbacks of the watches on the fd behind `token` out of the table for the
    /// dispatch pass, each with `events`; a watch already taken in this pass (its token was
    /// reported twice, or a refused registration's `ERROR` came beside a report) gets
    /// `events` added instead, so that it runs once. Returns false when no fd has `token`.
    pub(crate) fn take_ready(
        &mut self,
        token: Token,
        events: Events,
        out: &mut Vec<Taken>,
    ) -> bool {
        let Some(entry) = self.fds.get(token.slot()).filter(|e| e.token == token) else {
            return false;
        };
        for &(id, slot) in &entry.watches {
            let Some(w) = self
                .watches
                .get_mut(slot)
                .filter(|w| w.id == id && !w.removed)
            else {
                continue;
            };
            match w.cb.take() {
                Some(cb) => out.push(Taken {
                    id,
                    slot,
                    fd: w.fd,
                    ready: events,
                    flags: Arc::as_ptr(&w.flags),
                    cb,
                }),
                None => {
                    if let Some(t) = out.iter_mut().rev().find(|t| t.id == id) {
                        t.ready |= events;
                    }
                }
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
