//! Bindings to io_uring (Linux 5.5+; best on 6.1+).
//!
//! Readiness through `IORING_OP_POLL_ADD`: one **oneshot** poll per registered fd, re-armed
//! after its completion was dispatched. A re-armed poll on an fd whose condition still holds
//! completes at once, which gives the level-triggered semantics of poll and epoll (multishot
//! polls are edge-triggered and would lose a partially read fd). Re-arms, interest changes and
//! the wait go to the kernel in one `io_uring_enter`.
//!
//! - **Timeouts** travel in the same enter call (`IORING_ENTER_EXT_ARG`, 5.11+), with an
//!   `IORING_OP_TIMEOUT` fallback; both have nanosecond precision.
//! - **Removal** reaches the kernel at once (in [`Backend::flush`], right after the batch of
//!   changes it belongs to): a pending poll holds a reference to the file, so until the kernel
//!   sees the removal a closed socket is not really closed (its peer sees no EOF). The core
//!   applies removals at the end of the iteration in which they were made.
//! - **Stale completions** (of polls that were removed or replaced) carry an older generation in
//!   their `user_data` and are dropped.
//! - **Setup flags** are tried from `SINGLE_ISSUER|DEFER_TASKRUN` down to none. A
//!   single-issuer ring only accepts submissions from the thread that created it; when the
//!   loop moves to another thread the backend builds a new ring there and re-arms every fd.
//! - `IORING_FEAT_NODROP` is required, so a full completion queue loses nothing.
//!
//! What to expect: for readiness alone io_uring does more work than level-triggered epoll
//! (one completion plus one re-arm per event, where epoll re-arms nothing), so it is not
//! expected to beat it: in `vireo-bench pipes` (BENCHMARKS.md) this backend has trailed the
//! epoll one by 20-50% with one ready fd per iteration, and by up to 15% with 100 ready at
//! once. Its gain is batching: every interest change, re-arm and the wait cost one system call
//! together.

mod probe;

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::thread::{self, ThreadId};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;
use vireo_core::{Backend, BackendInfo, Events, Readiness, Token};

pub use probe::{SetupFlags, UringError, UringInfo};

const KIND_SHIFT: u32 = 62;
const KIND_WATCH: u64 = 0;
const KIND_IGNORE: u64 = 1;
const KIND_TIMEOUT: u64 = 2;
const GEN_MASK: u64 = (1 << 30) - 1;

fn user_data(kind: u64, generation: u32, slot: usize) -> u64 {
    (kind << KIND_SHIFT) | ((generation as u64 & GEN_MASK) << 32) | (slot as u64 & 0xffff_ffff)
}

fn is_errno(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

struct Slot {
    fd: RawFd,
    token: Token,
    interest: Events,
    generation: u32,
    /// The `user_data` of the poll in flight, if any.
    armed: Option<u64>,
    /// The kernel said EBADF: the fd was closed while registered. Silent until re-registered.
    dead: bool,
}

fn poll_mask(interest: Events) -> u32 {
    let mut mask = 0;
    if interest.contains(Events::READABLE) {
        mask |= libc::POLLIN as u32;
    }
    if interest.contains(Events::WRITABLE) {
        mask |= libc::POLLOUT as u32;
    }
    mask
}

/// The io_uring backend.
///
/// ```no_run
/// use vireo_backends::IoUring;
/// use vireo_core::EventLoop;
///
/// match IoUring::probe() {
///     Ok(info) => println!("io_uring with {} (EXT_ARG: {})", info.flags, info.ext_arg),
///     Err(why) => println!("no io_uring here: {why}"),
/// }
/// let mut event_loop = EventLoop::<IoUring>::new()?;
/// event_loop.run_once_timeout(std::time::Duration::ZERO)?;
/// # std::io::Result::Ok(())
/// ```
pub struct IoUring {
    ring: io_uring::IoUring,
    info: UringInfo,
    owner: ThreadId,
    slots: Slab<Slot>,
    by_fd: HashMap<RawFd, usize>,
    next_generation: u32,
    /// Slots whose poll completed and must be armed again before the next wait.
    rearm: Vec<usize>,
    /// Completions reaped while making room in the submission queue, processed by the next
    /// wait (never dispatched from inside a registration call).
    backlog: Vec<(u64, i32)>,
    /// Scratch for [`verify`], kept between waits: one `pollfd` per report.
    verify_fds: Vec<libc::pollfd>,
    /// The fallback timeout's duration; the kernel reads it when the SQE is submitted.
    timeout_ts: Box<types::Timespec>,
    timeout_armed: Option<u64>,
    timeout_generation: u32,
    /// Removals are queued and must reach the kernel in `flush`.
    flush_pending: bool,
}

impl std::fmt::Debug for IoUring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoUring")
            .field("info", &self.info)
            .field("registered", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl IoUring {
    /// Checks whether io_uring works here and with which setup: creates a ring (flags tried
    /// from the most capable down), requires `IORING_FEAT_NODROP` and the poll opcodes, and runs
    /// one no-op through it. Returns at once; never hangs.
    ///
    /// # Errors
    ///
    /// A [`UringError`] saying why io_uring is unusable.
    pub fn probe() -> Result<UringInfo, UringError> {
        probe::create().map(|(_, info)| info)
    }

    /// A backend on a ring with exactly `flags`, with none of the fallbacks of
    /// [`Backend::new`]: for tests of each setup and for programs that need one.
    ///
    /// # Errors
    ///
    /// The kernel's error for flags it does not know (`EINVAL`), or a [`UringError`] as in
    /// [`probe`](IoUring::probe), as an `io::Error`.
    pub fn with_setup_flags(flags: SetupFlags) -> io::Result<IoUring> {
        let ring = probe::build(flags, probe::SQ_ENTRIES, probe::CQ_ENTRIES)?;
        let params = ring.params();
        let info = UringInfo {
            flags,
            ext_arg: params.is_feature_ext_arg(),
            sq_entries: params.sq_entries(),
            cq_entries: params.cq_entries(),
        };
        if !params.is_feature_nodrop() {
            return Err(UringError::MissingFeature("IORING_FEAT_NODROP (Linux 5.5)").into());
        }
        Ok(IoUring::on_ring(ring, info))
    }

    fn on_ring(ring: io_uring::IoUring, info: UringInfo) -> IoUring {
        IoUring {
            ring,
            info,
            owner: thread::current().id(),
            slots: Slab::new(),
            by_fd: HashMap::new(),
            next_generation: 0,
            rearm: Vec::new(),
            backlog: Vec::new(),
            verify_fds: Vec::new(),
            timeout_ts: Box::new(types::Timespec::new()),
            timeout_armed: None,
            timeout_generation: 0,
            flush_pending: false,
        }
    }

    /// The setup this backend's ring runs with.
    pub fn uring_info(&self) -> UringInfo {
        self.info
    }

    fn generation(&mut self) -> u32 {
        self.next_generation = self.next_generation.wrapping_add(1) & GEN_MASK as u32;
        self.next_generation
    }

    /// A single-issuer ring only takes submissions from the thread that created it: when the
    /// loop runs on another thread, replace the ring and re-arm every registration.
    fn ensure_owner(&mut self) -> io::Result<()> {
        let me = thread::current().id();
        if me == self.owner {
            return Ok(());
        }
        if self.info.flags == SetupFlags::SingleIssuerDeferTaskrun {
            self.ring = probe::build(self.info.flags, self.info.sq_entries, self.info.cq_entries)?;
            self.backlog.clear();
            self.timeout_armed = None;
            self.rearm.clear();
            for (slot, s) in self.slots.iter_mut() {
                s.armed = None;
                self.rearm.push(slot);
            }
        }
        self.owner = me;
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entries this backend builds reference no user memory, except the
            // fallback timeout's `Timespec`, which is boxed in `self` and not changed until
            // after the entry was submitted (the kernel copies it at submission).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Submits what is queued without waiting. `EBUSY`/`EAGAIN` (completion backlog on older
    /// kernels) is answered by reaping into the backlog and retrying.
    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if is_errno(&e, libc::EINTR) => continue,
                Err(e) if is_errno(&e, libc::EBUSY) || is_errno(&e, libc::EAGAIN) => {
                    if self.reap_into_backlog() == 0 {
                        thread::yield_now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits and makes the kernel run deferred work now, so that a removal takes effect (and
    /// the file reference is dropped) before this returns.
    fn flush_now(&mut self) -> io::Result<()> {
        if self.info.ext_arg {
            let ts = types::Timespec::new();
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if is_errno(&e, libc::ETIME) || is_errno(&e, libc::EINTR) => {}
                Err(e) if is_errno(&e, libc::EBUSY) || is_errno(&e, libc::EAGAIN) => {
                    self.reap_into_backlog();
                    self.submit()?;
                }
                Err(e) => return Err(e),
            }
        } else {
            self.submit()?;
        }
        self.reap_into_backlog();
        Ok(())
    }

    fn reap_into_backlog(&mut self) -> usize {
        let before = self.backlog.len();
        let backlog = &mut self.backlog;
        self.ring
            .completion()
            .for_each(|c: cqueue::Entry| backlog.push((c.user_data(), c.result())));
        self.backlog.len() - before
    }

    fn arm(&mut self, slot: usize) -> io::Result<()> {
        let s = &mut self.slots[slot];
        if s.armed.is_some() || s.dead {
            return Ok(());
        }
        let ud = user_data(KIND_WATCH, s.generation, slot);
        let entry = opcode::PollAdd::new(types::Fd(s.fd), poll_mask(s.interest))
            .build()
            .user_data(ud);
        // Marked armed only once the poll is queued: a failed push leaves the slot unarmed.
        self.push(entry)?;
        self.slots[slot].armed = Some(ud);
        Ok(())
    }

    /// Queues the removal of the slot's poll; on failure the slot keeps its poll (armed).
    fn disarm(&mut self, slot: usize) -> io::Result<()> {
        if let Some(ud) = self.slots[slot].armed {
            let entry = opcode::PollRemove::new(ud)
                .build()
                .user_data(user_data(KIND_IGNORE, 0, 0));
            self.push(entry)?;
            self.slots[slot].armed = None;
        }
        Ok(())
    }

    /// Waits with `timeout` (nothing queued in the backlog), submitting everything queued.
    fn enter(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) if self.info.ext_arg => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            Some(t) if t.is_zero() => return self.submit(),
            Some(t) => {
                if let Some(old) = self.timeout_armed.take() {
                    let remove = opcode::TimeoutRemove::new(old).build().user_data(user_data(
                        KIND_IGNORE,
                        0,
                        0,
                    ));
                    self.push(remove)?;
                }
                // Submit before touching the boxed timespec another queued SQE may still
                // point at.
                self.submit()?;
                *self.timeout_ts = types::Timespec::from(t);
                self.timeout_generation = self.timeout_generation.wrapping_add(1);
                let ud = user_data(KIND_TIMEOUT, self.timeout_generation, 0);
                let entry = opcode::Timeout::new(&*self.timeout_ts)
                    .build()
                    .user_data(ud);
                self.push(entry)?;
                self.timeout_armed = Some(ud);
                self.ring.submit_and_wait(1)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_errno(&e, libc::ETIME) || is_errno(&e, libc::EINTR) => Ok(()),
            Err(e) if is_errno(&e, libc::EBUSY) || is_errno(&e, libc::EAGAIN) => {
                self.reap_into_backlog();
                self.submit()
            }
            Err(e) => Err(e),
        }
    }

    fn complete(&mut self, ud: u64, res: i32, ready: &mut Vec<Readiness>) {
        match ud >> KIND_SHIFT {
            KIND_WATCH => {}
            KIND_TIMEOUT => {
                if self.timeout_armed == Some(ud) {
                    self.timeout_armed = None;
                }
                return;
            }
            _ => return,
        }
        let slot = (ud & 0xffff_ffff) as usize;
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.armed != Some(ud) {
            return; // stale: removed or replaced since it was armed
        }
        s.armed = None;
        if res < 0 {
            match -res {
                // Not a removal (that one's completion is stale, above): the kernel cancels
                // the polls of a thread that exits, and a loop may move to another thread. The
                // registration is current: arm it again, on whatever setup flags.
                libc::ECANCELED => self.rearm.push(slot),
                // Closed while registered (a contract violation): silent, as on every backend.
                libc::EBADF => s.dead = true,
                _ => {
                    ready.push(Readiness {
                        token: s.token,
                        events: Events::ERROR,
                    });
                    self.rearm.push(slot);
                }
            }
            return;
        }
        // io_uring always reports ERR, HUP, NVAL and RDHUP; keep what poll(2) would report.
        let res = res as u32;
        let mask = poll_mask(s.interest);
        let mut events = Events::empty();
        if res & mask & libc::POLLIN as u32 != 0 {
            events |= Events::READABLE;
        }
        if res & mask & libc::POLLOUT as u32 != 0 {
            events |= Events::WRITABLE;
        }
        if res & libc::POLLERR as u32 != 0 {
            events |= Events::ERROR;
        }
        if res & libc::POLLHUP as u32 != 0 {
            events |= Events::HANGUP;
        }
        if res & libc::POLLNVAL as u32 != 0 {
            s.dead = true;
            return;
        }
        self.rearm.push(slot);
        if !events.is_empty() {
            ready.push(Readiness {
                token: s.token,
                events,
            });
        }
    }
}

impl Backend for IoUring {
    const NAME: &'static str = "io-uring";

    fn new() -> io::Result<Self> {
        let (ring, info) = probe::create()?;
        Ok(IoUring::on_ring(ring, info))
    }

    /// A ring with the same setup flags and sizes as this one.
    fn fresh(&self) -> io::Result<Self> {
        let ring = probe::build(self.info.flags, self.info.sq_entries, self.info.cq_entries)?;
        Ok(IoUring::on_ring(ring, self.info))
    }

    fn info(&self) -> BackendInfo {
        BackendInfo::new(Self::NAME)
            .with("setup_flags", self.info.flags.as_str())
            .with("ext_arg", self.info.ext_arg.to_string())
            .with("sq_entries", self.info.sq_entries.to_string())
            .with("cq_entries", self.info.cq_entries.to_string())
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        self.ensure_owner()?;
        if self.by_fd.contains_key(&fd) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let generation = self.generation();
        let slot = self.slots.insert(Slot {
            fd,
            token,
            interest,
            generation,
            armed: None,
            dead: false,
        });
        if let Err(e) = self.arm(slot) {
            // Nothing registered: the core's retry registers from scratch.
            self.slots.remove(slot);
            return Err(e);
        }
        self.by_fd.insert(fd, slot);
        Ok(())
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        self.ensure_owner()?;
        let slot = *self
            .by_fd
            .get(&fd)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let was_armed = self.slots[slot].armed.is_some();
        // A failed disarm changes nothing (the old poll stays armed, the old interest holds).
        self.disarm(slot)?;
        let generation = self.generation();
        let s = &mut self.slots[slot];
        s.token = token;
        s.interest = interest;
        s.generation = generation;
        if was_armed && self.arm(slot).is_err() {
            // The change is made; its poll goes out with the next wait.
            self.rearm.push(slot);
        }
        // Otherwise the slot waits in `rearm` for its completion to be dispatched.
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd, _token: Token) -> io::Result<()> {
        self.ensure_owner()?;
        let slot = *self
            .by_fd
            .get(&fd)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let was_armed = self.slots[slot].armed.is_some();
        // A failed disarm leaves the registration as it was, for the core to retry.
        self.disarm(slot)?;
        self.by_fd.remove(&fd);
        self.slots.remove(slot);
        // The poll holds a reference to the file until the kernel sees the removal: it goes
        // out in `flush`, which the core calls right after this batch of changes.
        self.flush_pending |= was_armed;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.flush_pending) {
            self.flush_now()?;
        }
        Ok(())
    }

    fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()> {
        self.ensure_owner()?;
        // Completions that report nothing (cancellations, re-arms, reports that the re-check
        // found stale) end the kernel's wait but are no event: wait again for what is left of
        // the timeout, so that a wait returns only with a report or when its time is up, as
        // epoll's and poll's do (libvirt's eventtest runs one iteration per expected event).
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        let first = ready.len();
        let mut left = timeout;
        loop {
            self.wait_once(ready, left)?;
            if ready.len() > first || left == Some(Duration::ZERO) {
                return Ok(());
            }
            left = match (timeout, deadline) {
                (None, _) => None,
                (Some(_), Some(d)) => Some(d.saturating_duration_since(std::time::Instant::now())),
                // A timeout too long for `Instant` is as good as none.
                (Some(_), None) => None,
            };
        }
    }
}

impl IoUring {
    fn wait_once(
        &mut self,
        ready: &mut Vec<Readiness>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let mut rearm = std::mem::take(&mut self.rearm);
        for (i, &slot) in rearm.iter().enumerate() {
            if self.slots.contains(slot) {
                if let Err(e) = self.arm(slot) {
                    // Keep what is not armed yet for the next wait.
                    rearm.drain(..i);
                    self.rearm.append(&mut rearm);
                    return Err(e);
                }
            }
        }
        let timeout = if self.backlog.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        self.enter(timeout)?;
        // One enter runs a bounded amount of deferred work (the kernel caps it), and NODROP
        // keeps completions that did not fit in an overflow list: enter again while either
        // is pending, up to about one completion queue's worth per wait.
        let cap = self.info.cq_entries as usize;
        loop {
            let reaped = self.reap_into_backlog();
            let sq = self.ring.submission();
            let pending = sq.cq_overflow() || sq.taskrun();
            drop(sq);
            if !pending || self.backlog.len() >= cap {
                break;
            }
            if reaped == 0 && !self.ring.submission().cq_overflow() {
                // Deferred work pending but nothing came of the last round: let it run with
                // the next wait rather than spin here.
                break;
            }
            self.submit()?;
        }
        let mut backlog = std::mem::take(&mut self.backlog);
        let first = ready.len();
        let mut pfds = std::mem::take(&mut self.verify_fds);
        pfds.clear();
        for &(ud, res) in &backlog {
            let before = ready.len();
            self.complete(ud, res, ready);
            if let Some(r) = ready.get(before) {
                let slot = (ud & 0xffff_ffff) as usize;
                let mut events = 0;
                if r.events.contains(Events::READABLE) {
                    events |= libc::POLLIN;
                }
                if r.events.contains(Events::WRITABLE) {
                    events |= libc::POLLOUT;
                }
                pfds.push(libc::pollfd {
                    fd: self.slots.get(slot).map_or(-1, |s| s.fd),
                    events,
                    revents: 0,
                });
            }
        }
        backlog.clear();
        self.backlog = backlog;
        let verified = verify(&mut ready[first..], &mut pfds);
        self.verify_fds = pfds;
        verified?;
        ready.retain(|r| !r.events.is_empty());
        Ok(())
    }
}

/// A poll completion says the fd *was* ready when the kernel woke the poll, which may be long
/// before this wait (the socket's wake-up carries the mask, and io_uring trusts it). Data
/// consumed since (by another thread, or by the program between iterations) would then be
/// reported as ready while epoll and poll(2), which look at the present, report nothing. One
/// poll(2) over the reported fds, without blocking, keeps only what still holds, so every
/// backend reports the same thing (the model tests in vireo-conformance found the difference).
fn verify(reports: &mut [Readiness], pfds: &mut [libc::pollfd]) -> io::Result<()> {
    if reports.is_empty() {
        return Ok(());
    }
    loop {
        // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()` pollfd
        // structures for the duration of the call; poll(2) only writes their `revents`. An fd
        // number that is no longer open is answered with POLLNVAL, not undefined behaviour.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    for (r, p) in reports.iter_mut().zip(pfds.iter()) {
        let now = p.revents;
        if now & libc::POLLNVAL != 0 {
            r.events = Events::empty();
            continue;
        }
        let mut events = r.events & (Events::ERROR | Events::HANGUP);
        if r.events.contains(Events::READABLE) && now & libc::POLLIN != 0 {
            events |= Events::READABLE;
        }
        if r.events.contains(Events::WRITABLE) && now & libc::POLLOUT != 0 {
            events |= Events::WRITABLE;
        }
        if now & libc::POLLHUP != 0 {
            events |= Events::HANGUP;
        }
        if now & libc::POLLERR != 0 {
            events |= Events::ERROR;
        }
        r.events = events;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn user_data_packs_kind_generation_and_slot() {
        let ud = user_data(KIND_TIMEOUT, 0x3fff_ffff, 0xdead_beef);
        assert_eq!(ud >> KIND_SHIFT, KIND_TIMEOUT);
        assert_eq!((ud >> 32) & GEN_MASK, 0x3fff_ffff);
        assert_eq!(ud & 0xffff_ffff, 0xdead_beef);
        assert_eq!(user_data(KIND_WATCH, 1, 7) >> KIND_SHIFT, KIND_WATCH);
    }

    /// The IORING_OP_TIMEOUT fallback (kernels without EXT_ARG) never returns early and
    /// leaves no stale timeout behind.
    #[test]
    fn timeout_op_fallback_waits_the_whole_timeout() {
        let mut uring = match IoUring::new() {
            Ok(uring) => uring,
            Err(e) => {
                let required = std::env::var("VIREO_REQUIRE_BACKENDS")
                    .is_ok_and(|v| v.split(',').any(|b| b.trim() == "io-uring"));
                assert!(!required, "io-uring is required but unavailable: {e}");
                eprintln!("skipped: io_uring is unavailable here: {e}");
                return;
            }
        };
        uring.info.ext_arg = false;
        let mut ready = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            uring
                .wait(&mut ready, Some(Duration::from_micros(1500)))
                .unwrap();
            assert!(
                start.elapsed() >= Duration::from_micros(1500),
                "{:?}",
                start.elapsed()
            );
        }
        assert!(ready.is_empty());
    }
}
