//! Unix signals and child processes as loop sources.
//!
//! # Signals
//!
//! [`LoopHandle::add_signal`] installs a process-wide `sigaction` handler for each signal it
//! names (the first time any loop asks for that signal) and gives the watch a pipe of its own.
//! The handler, which may run on any thread, counts the delivery for every watch of that
//! signal, notes the sender, and writes one byte to each watch's pipe; the loop watches the
//! read end like any fd, so a signal wakes a blocked loop on every backend, and the callback
//! runs on the loop thread, never inside the handler.
//!
//! What this asks of the rest of the program:
//!
//! - **Signal masks**: vireo changes no thread's mask. A signal blocked in every thread is
//!   never delivered, so never reported; leave it unblocked in at least one thread (any one:
//!   the handler only counts and writes).
//! - **The previous handler** is saved when vireo installs its own and restored when the last
//!   watch of that signal in the process is gone (when the callback's state drops, on the loop
//!   thread, after `remove_signal`). It is not called while vireo's is installed, and a handler
//!   the program installs for that signal in between is replaced by the restore.
//! - **`SIGCHLD`** is installed with `SA_NOCLDSTOP`: stopped and continued children do not
//!   raise it.
//! - Handlers are installed with `SA_RESTART`, so slow system calls on other threads are
//!   restarted rather than failing with `EINTR`.
//! - `SIGKILL` and `SIGSTOP` cannot be caught; `SIGSEGV`, `SIGBUS`, `SIGFPE`, `SIGILL` and
//!   `SIGTRAP` are refused too (they report a fault of the thread that raised them, which must
//!   be handled there, not later on another thread). Numbers outside 1..=64 are refused.
//!
//! **Coalescing**: the callback runs at most once per iteration per signal, with
//! [`SignalInfo::count`] handler runs since its last call. The kernel itself merges a standard
//! signal sent while the same one is still pending into one delivery, so the count is a lower
//! bound of the `kill` calls (real-time signals, 34..=64, are queued and counted one by one).
//! The sender reported is that of the last counted delivery, when the kernel says who sent it
//! (`kill`, `sigqueue`, `tgkill`, and the child of a `SIGCHLD`).
//!
//! At most 128 signal watches and `SIGCHLD`-fallback child watches (below) exist in a
//! process at a time, together; their pipes are kept for reuse after removal, never closed,
//! so that a handler running on another thread never writes into an fd number that was
//! closed and reused.
//!
//! # Child processes
//!
//! [`LoopHandle::add_child`] reports a child's exit status once, on the loop thread, and reaps
//! it. On Linux 5.3 and later it watches a pidfd (`pidfd_open`) like any readable fd; where
//! pidfds are missing it falls back to a `SIGCHLD` watch that calls `waitpid` for exactly that
//! pid (never reaping a child that was not handed over). Removing the watch before the exit
//! means no callback, and the child is left for the program to reap.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{Error, Events, LoopHandle, WatchId};

/// Signal numbers are 1..NSIG.
const NSIG: usize = 65;
/// Signal watches in a process at a time.
const SLOTS: usize = 128;

/// A signal watch (from [`LoopHandle::add_signal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SignalId(pub(crate) WatchId);

/// A child-process watch (from [`LoopHandle::add_child`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChildId(pub(crate) WatchId);

impl std::fmt::Display for SignalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signal watch {}", self.0.0)
    }
}

impl std::fmt::Display for ChildId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "child watch {}", self.0.0)
    }
}

/// What a signal callback is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SignalInfo {
    /// The signal number (`libc::SIGTERM`, ...).
    pub signal: i32,
    /// Deliveries counted since the callback last ran for this signal (at least 1).
    pub count: u32,
    /// The sender's pid, when the kernel reports one (see the module docs).
    pub pid: Option<i32>,
    /// The sender's real uid, when the kernel reports one.
    pub uid: Option<u32>,
}

/// What the handler touches: atomics only (async-signal-safe).
struct Slot {
    /// The pipe's write end, -1 while the slot was never used.
    write_fd: AtomicI32,
    /// Bit `s - 1` set: this watch wants signal `s` (1..=64).
    mask: AtomicU64,
    pending: [AtomicU32; NSIG],
    /// `(pid as u32 as u64) << 32 | uid`, plus 1 << 63 when set; 0 for no sender.
    sender: [AtomicU64; NSIG],
}

#[allow(clippy::declare_interior_mutable_const)]
const SLOT: Slot = Slot {
    write_fd: AtomicI32::new(-1),
    mask: AtomicU64::new(0),
    pending: [const { AtomicU32::new(0) }; NSIG],
    sender: [const { AtomicU64::new(0) }; NSIG],
};

static TABLE: [Slot; SLOTS] = [SLOT; SLOTS];

/// The handler's bookkeeping, never touched by the handler itself.
struct Registry {
    /// Each slot's pipe (created on first use, kept forever) and whether a watch holds it.
    pipes: Vec<(OwnedFd, OwnedFd, bool)>,
    /// Watches per signal.
    users: [usize; NSIG],
    /// The disposition vireo replaced, per signal.
    saved: [Option<libc::sigaction>; NSIG],
}

// SAFETY: `libc::sigaction` is plain data (a handler address, flags and a mask); it is only
// read and written under the registry's mutex.
unsafe impl Send for Registry {}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pipes: Vec::new(),
    users: [0; NSIG],
    saved: [None; NSIG],
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

extern "C" fn handler(sig: c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: `__errno_location` returns this thread's errno; saving and restoring it keeps
    // the interrupted code's errno intact, as a handler must.
    let errno = unsafe { *libc::__errno_location() };
    let Ok(s) = usize::try_from(sig) else { return };
    if s == 0 || s >= NSIG {
        return;
    }
    let mut sender = 0u64;
    if !info.is_null() {
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; si_pid and
        // si_uid are meaningful for the codes checked (user-sent signals and SIGCHLD).
        unsafe {
            let code = (*info).si_code;
            if code <= 0 || sig == libc::SIGCHLD {
                let pid = (*info).si_pid() as u32 as u64;
                let uid = u64::from((*info).si_uid());
                sender = 1 << 63 | (pid & 0x7fff_ffff) << 32 | uid;
            }
        }
    }
    for slot in &TABLE {
        if slot.mask.load(Ordering::Acquire) & bit(s) == 0 {
            continue;
        }
        slot.pending[s].fetch_add(1, Ordering::AcqRel);
        if sender != 0 {
            slot.sender[s].store(sender, Ordering::Release);
        }
        let fd = slot.write_fd.load(Ordering::Acquire);
        if fd >= 0 {
            let byte = 1u8;
            // SAFETY: write(2) is async-signal-safe; `fd` is a pipe's write end that is never
            // closed (slots keep their pipes forever); a full pipe answers EAGAIN, ignored: the
            // loop is being woken anyway.
            let _ = unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn einval(why: &str) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()))
}

fn check_signal(sig: i32) -> Result<usize, Error> {
    let refused = [
        libc::SIGKILL,
        libc::SIGSTOP,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGILL,
        libc::SIGTRAP,
    ];
    match usize::try_from(sig) {
        Ok(s) if (1..NSIG).contains(&s) && !refused.contains(&sig) => Ok(s),
        _ => Err(einval(&format!(
            "signal {sig} cannot be watched (1..=64, not KILL, STOP or a fault signal)"
        ))),
    }
}

fn install(sig: c_int) -> io::Result<libc::sigaction> {
    // SAFETY: a zeroed sigaction is a valid value (no handler, no flags, empty mask); the
    // fields set below make it point at `handler`, whose signature matches SA_SIGINFO.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = handler as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        if sig == libc::SIGCHLD {
            new.sa_flags |= libc::SA_NOCLDSTOP;
        }
        libc::sigemptyset(&mut new.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, &new, &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(old)
    }
}

fn restore(sig: c_int, old: &libc::sigaction) {
    // SAFETY: `old` is the disposition sigaction(2) returned for this signal.
    unsafe {
        libc::sigaction(sig, old, std::ptr::null_mut());
    }
}

/// A slot held by a watch; released (and dispositions restored) on drop, which happens with
/// the watch's callback state, on the loop thread.
struct SlotLease {
    slot: usize,
    mask: u64,
    read: BorrowedFd<'static>,
}

impl SlotLease {
    fn take(signals: &[usize]) -> Result<SlotLease, Error> {
        let mut reg = registry();
        let slot = match reg.pipes.iter().position(|p| !p.2) {
            Some(i) => i,
            None if reg.pipes.len() < SLOTS => {
                let (r, w) = rustix::pipe::pipe_with(
                    rustix::pipe::PipeFlags::NONBLOCK | rustix::pipe::PipeFlags::CLOEXEC,
                )
                .map_err(io::Error::from)?;
                TABLE[reg.pipes.len()]
                    .write_fd
                    .store(w.as_raw_fd(), Ordering::Release);
                reg.pipes.push((r, w, false));
                reg.pipes.len() - 1
            }
            None => {
                return Err(Error::Io(io::Error::other(format!(
                    "more than {SLOTS} signal and child watches in this process"
                ))));
            }
        };
        let mut mask = 0u64;
        for &s in signals {
            mask |= bit(s);
        }
        // Install what is not installed yet; undo on failure.
        let mut installed = Vec::new();
        for &s in signals {
            if reg.users[s] == 0 && reg.saved[s].is_none() && !installed.contains(&s) {
                match install(s as c_int) {
                    Ok(old) => {
                        reg.saved[s] = Some(old);
                        installed.push(s);
                    }
                    Err(e) => {
                        for &u in &installed {
                            if let Some(old) = reg.saved[u].take() {
                                restore(u as c_int, &old);
                            }
                        }
                        return Err(Error::Io(e));
                    }
                }
            }
        }
        let mut counted = 0u64;
        for &s in signals {
            if counted & bit(s) == 0 {
                reg.users[s] += 1;
                counted |= bit(s);
            }
        }
        reg.pipes[slot].2 = true;
        let t = &TABLE[slot];
        drain(reg.pipes[slot].0.as_fd());
        for s in 0..NSIG {
            t.pending[s].store(0, Ordering::Release);
            t.sender[s].store(0, Ordering::Release);
        }
        t.mask.store(mask, Ordering::Release);
        let raw = reg.pipes[slot].0.as_raw_fd();
        // SAFETY: the read end lives in the registry forever (pipes are never closed).
        let read = unsafe { BorrowedFd::borrow_raw(raw) };
        Ok(SlotLease { slot, mask, read })
    }

    /// Makes the next iteration look at this slot even without a signal.
    fn kick(&self) {
        let fd = TABLE[self.slot].write_fd.load(Ordering::Acquire);
        if fd >= 0 {
            // SAFETY: the slot's pipe write end, never closed.
            let w = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = rustix::io::write(w, &[1]);
        }
    }

    /// Empties the pipe, then takes each wanted signal's count and sender.
    fn collect(&self, out: &mut Vec<SignalInfo>) {
        drain(self.read);
        let t = &TABLE[self.slot];
        for s in 1..NSIG {
            if self.mask & bit(s) == 0 {
                continue;
            }
            let count = t.pending[s].swap(0, Ordering::AcqRel);
            if count == 0 {
                continue;
            }
            let sender = t.sender[s].swap(0, Ordering::AcqRel);
            let known = sender & (1 << 63) != 0;
            out.push(SignalInfo {
                signal: s as i32,
                count,
                pid: known.then_some(((sender >> 32) & 0x7fff_ffff) as i32),
                uid: known.then_some(sender as u32),
            });
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut reg = registry();
        TABLE[self.slot].mask.store(0, Ordering::Release);
        reg.pipes[self.slot].2 = false;
        for s in 1..NSIG {
            if self.mask & bit(s) != 0 {
                reg.users[s] -= 1;
                if reg.users[s] == 0 {
                    if let Some(old) = reg.saved[s].take() {
                        restore(s as c_int, &old);
                    }
                }
            }
        }
    }
}

/// Signal `s`'s bit in a mask (signals are 1..=64).
const fn bit(s: usize) -> u64 {
    1 << (s - 1)
}

fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 256];
    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
}

impl LoopHandle {
    /// Calls `callback` on the loop thread when one of `signals` is delivered to the process
    /// (GLib's `g_unix_signal_add`, libvirt's `virNetDaemonAddSignalHandler`).
    ///
    /// The callback runs at most once per iteration for each signal, with the number of
    /// deliveries since its last call and the sender when known; see the [module
    /// docs](crate::signal) for coalescing, for what the mechanism (a `sigaction` handler and a
    /// pipe) asks of the program, and for the limit of 128 watches per process. Several
    /// watches, in one loop or in several, each hear every delivery. The watch is removed with
    /// [`remove_signal`](LoopHandle::remove_signal), also from inside its callback, and its
    /// callback's state is dropped on the loop thread afterwards, as for handles; the previous
    /// disposition of a signal comes back when its last watch's state drops.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an empty list, a number outside 1..=64, `SIGKILL`, `SIGSTOP` or a
    /// fault signal; an `Other` error past 128 watches; `sigaction`'s or `pipe`'s error;
    /// [`Error::Closed`] when the loop was dropped.
    pub fn add_signal<F>(&self, signals: &[i32], mut callback: F) -> Result<SignalId, Error>
    where
        F: FnMut(&LoopHandle, SignalId, &SignalInfo) + Send + 'static,
    {
        if signals.is_empty() {
            return Err(einval("no signal to watch"));
        }
        let nums = signals
            .iter()
            .map(|&s| check_signal(s))
            .collect::<Result<Vec<_>, _>>()?;
        let lease = SlotLease::take(&nums)?;
        let fd = lease.read.as_raw_fd();
        let mut infos = Vec::new();
        let watch = self.add_handle(fd, Events::READABLE, move |h, id, _, _| {
            infos.clear();
            lease.collect(&mut infos);
            for info in &infos {
                callback(h, SignalId(id), info);
            }
        })?;
        Ok(SignalId(watch))
    }

    /// Removes a signal watch: its callback is not called again once this returns (from
    /// another thread this waits for a running invocation, as
    /// [`remove_handle`](LoopHandle::remove_handle) does).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWatch`] for an unknown or removed id; [`Error::Closed`].
    pub fn remove_signal(&self, id: SignalId) -> Result<(), Error> {
        self.remove_handle(id.0)
    }

    /// Calls `callback` once, on the loop thread, with the exit status of child process `pid`
    /// (from [`std::process::Child::id`]), and reaps it (GLib's `g_child_watch_add`, libev's
    /// `ev_child`). A child that exited before the watch was added is reported too (it was a
    /// zombie until now). After the callback the watch is gone.
    ///
    /// vireo reaps the child: do not `wait` for it yourself (a `Child` handed over must not
    /// be waited on; if something else reaps it first, the callback never runs and the watch
    /// removes itself). [`remove_child`](LoopHandle::remove_child) before the exit means no
    /// callback and no reaping. See the [module docs](crate::signal) for the pidfd mechanism
    /// and its `SIGCHLD` fallback.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for pid 0 or a pid above `i32::MAX`; `ECHILD` when `pid` is not a
    /// child of this process that is still to be reaped (a pid that does not exist, one
    /// already reaped, another process's child); the errors of
    /// [`add_signal`](LoopHandle::add_signal) on the fallback; [`Error::Closed`].
    pub fn add_child<F>(&self, pid: u32, callback: F) -> Result<ChildId, Error>
    where
        F: FnOnce(&LoopHandle, ChildId, ExitStatus) + Send + 'static,
    {
        self.child(pid, false, callback)
    }

    /// [`add_child`](LoopHandle::add_child) for a [`std::process::Child`]: vireo reaps it, so
    /// do not `wait` on the `Child` afterwards (its `try_wait` then fails with `ECHILD`).
    ///
    /// # Errors
    ///
    /// As [`add_child`](LoopHandle::add_child).
    pub fn add_child_process<F>(
        &self,
        child: &std::process::Child,
        callback: F,
    ) -> Result<ChildId, Error>
    where
        F: FnOnce(&LoopHandle, ChildId, ExitStatus) + Send + 'static,
    {
        self.add_child(child.id(), callback)
    }

    /// [`add_child`](LoopHandle::add_child) on the `SIGCHLD` fallback even where pidfds
    /// exist: for the conformance suite, which runs both mechanisms on every backend.
    #[doc(hidden)]
    pub fn add_child_by_sigchld<F>(&self, pid: u32, callback: F) -> Result<ChildId, Error>
    where
        F: FnOnce(&LoopHandle, ChildId, ExitStatus) + Send + 'static,
    {
        self.child(pid, true, callback)
    }

    /// Removes a child watch before its callback ran: no callback, and the child is not
    /// reaped.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWatch`] when the id is unknown, removed, or its callback already ran;
    /// [`Error::Closed`].
    pub fn remove_child(&self, id: ChildId) -> Result<(), Error> {
        self.remove_handle(id.0)
    }

    fn child<F>(&self, pid: u32, sigchld: bool, callback: F) -> Result<ChildId, Error>
    where
        F: FnOnce(&LoopHandle, ChildId, ExitStatus) + Send + 'static,
    {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| einval("pid 0 or above i32::MAX"))?;
        // Only a child still to be reaped can be watched (WNOWAIT: nothing is reaped here).
        rustix::process::waitid(
            rustix::process::WaitId::Pid(raw),
            rustix::process::WaitIdOptions::EXITED
                | rustix::process::WaitIdOptions::NOHANG
                | rustix::process::WaitIdOptions::NOWAIT,
        )
        .map_err(io::Error::from)?;
        if !sigchld {
            match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
                Ok(pidfd) => return self.child_pidfd(pidfd, callback),
                Err(rustix::io::Errno::NOSYS) => {}
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
        let mut callback = Some(callback);
        let lease = SlotLease::take(&[libc::SIGCHLD as usize])?;
        // The child may have exited before the handler was installed: look once anyway.
        lease.kick();
        let fd = lease.read.as_raw_fd();
        let mut infos = Vec::new();
        let watch = self.add_handle(fd, Events::READABLE, move |h, id, _, _| {
            infos.clear();
            lease.collect(&mut infos);
            let waited = rustix::process::waitpid(Some(raw), rustix::process::WaitOptions::NOHANG)
                .map(|s| s.map(|(_, status)| ExitStatus::from_raw(status.as_raw())));
            report(h, id, waited, &mut callback);
        })?;
        Ok(ChildId(watch))
    }

    fn child_pidfd<F>(&self, pidfd: OwnedFd, callback: F) -> Result<ChildId, Error>
    where
        F: FnOnce(&LoopHandle, ChildId, ExitStatus) + Send + 'static,
    {
        let fd = pidfd.as_raw_fd();
        let mut callback = Some(callback);
        let watch = self.add_handle(fd, Events::READABLE, move |h, id, _, _| {
            let waited = rustix::process::waitid(
                rustix::process::WaitId::PidFd(pidfd.as_fd()),
                rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
            );
            report(
                h,
                id,
                waited.map(|s| s.as_ref().map(exit_status)),
                &mut callback,
            );
        })?;
        Ok(ChildId(watch))
    }
}

/// What a child watch does with a wait's answer: nothing while the child runs; otherwise the
/// watch goes and, when there is a status (not when someone else reaped the child), the
/// callback runs once with it.
fn report<F>(
    h: &LoopHandle,
    id: WatchId,
    waited: rustix::io::Result<Option<ExitStatus>>,
    callback: &mut Option<F>,
) where
    F: FnOnce(&LoopHandle, ChildId, ExitStatus),
{
    match waited {
        Ok(None) => {}
        Ok(Some(status)) => {
            let _ = h.remove_handle(id);
            if let Some(cb) = callback.take() {
                cb(h, ChildId(id), status);
            }
        }
        Err(_) => {
            let _ = h.remove_handle(id);
        }
    }
}

/// waitid's answer as the wait(2) status `ExitStatus` wraps.
fn exit_status(s: &rustix::process::WaitIdStatus) -> ExitStatus {
    let raw = if let Some(code) = s.exit_status() {
        (code & 0xff) << 8
    } else if let Some(sig) = s.terminating_signal() {
        sig | if s.dumped() { 0x80 } else { 0 }
    } else {
        0
    };
    ExitStatus::from_raw(raw)
}
