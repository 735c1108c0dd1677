//! libevent's classic `bench.c`, on every system side by side.
//!
//! N non-blocking AF_UNIX socketpairs; the read end of each is watched for READABLE. Each round
//! first removes and re-adds every watch and runs one non-blocking iteration (timed as `setup`),
//! then writes one byte into A evenly spaced pairs; `dispatch` runs non-blocking iterations until
//! every byte is read, each callback reading one byte and, until W writes were made, writing one
//! byte to the next pair. The first round is a warm-up and is dropped.
//!
//! Systems: vireo on every compiled backend, raw epoll and raw poll loops written directly on
//! rustix (the floor), mio (edge-triggered: its callback reads until `WouldBlock` and writes once
//! per byte read, which moves the same bytes), polling in level mode, calloop, and the C loops
//! libev, libevent and libuv where their libraries are installed (opened at run time).
//! `vireo-epoll-pause` is vireo-epoll re-watching by pause and resume instead of remove and
//! add.

mod cloops;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, epoll};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};
use vireo_backends::{AnyBackend, Backend, BackendKind, Choice};
use vireo_core::{EventLoop, Events, WatchId};

/// The socketpairs: `(read end, write end)`.
pub struct Pipes {
    pairs: Vec<(OwnedFd, OwnedFd)>,
}

impl Pipes {
    /// `n` non-blocking socketpairs.
    ///
    /// # Errors
    ///
    /// When the socketpairs cannot be made (the open-files limit, usually).
    pub fn new(n: usize) -> io::Result<Pipes> {
        let pairs = (0..n)
            .map(|_| {
                rustix::net::socketpair(
                    AddressFamily::UNIX,
                    SocketType::STREAM,
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                    None,
                )
                .map_err(io::Error::from)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Pipes { pairs })
    }

    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn reader(&self, i: usize) -> BorrowedFd<'_> {
        self.pairs[i].0.as_fd()
    }

    fn writer(&self, i: usize) -> BorrowedFd<'_> {
        self.pairs[i].1.as_fd()
    }
}

/// The counters every system's callback updates (relaxed loads and stores: one thread).
#[derive(Debug, Default)]
pub struct Counters {
    count: AtomicU64,
    fired: AtomicU64,
    writes: AtomicU64,
    events: AtomicU64,
}

fn bump(a: &AtomicU64, by: u64) {
    a.store(a.load(Relaxed) + by, Relaxed);
}

/// bench.c's `read_cb`: read one byte; while writes are left, write one byte to the next pair.
/// Returns whether a byte was read.
fn read_cb(pipes: &Pipes, c: &Counters, i: usize) -> bool {
    let mut ch = [0u8; 1];
    let got = matches!(
        rustix::net::recv(pipes.reader(i), &mut ch, RecvFlags::empty()),
        Ok((1, _))
    );
    if got {
        bump(&c.count, 1);
    }
    let writes = c.writes.load(Relaxed);
    if got && writes > 0 {
        let next = (i + 1) % pipes.len();
        let _ = rustix::net::send(pipes.writer(next), b"e", SendFlags::empty());
        c.writes.store(writes - 1, Relaxed);
        bump(&c.fired, 1);
    }
    got
}

/// One system under the benchmark.
pub trait PipeSystem {
    /// Removes every watch and adds it again.
    ///
    /// # Errors
    ///
    /// The system's error.
    fn rewatch(&mut self) -> io::Result<()>;
    /// One non-blocking iteration that runs the callbacks of ready watches.
    ///
    /// # Errors
    ///
    /// The system's error.
    fn turn(&mut self) -> io::Result<()>;

    /// The loop's handle, for systems that are a vireo loop.
    fn vireo_handle(&self) -> Option<vireo_core::LoopHandle> {
        None
    }

    /// What another thread calls as fast as it can in the contention benchmark, talking to
    /// the loop the way this system's users do from other threads (the argument counts the
    /// calls); `None` for systems without such a way here. Closures sent to the loop run in
    /// its `turn`; with `captured` each carries [`REPLY`] bytes, as a worker's reply does,
    /// else it captures nothing (and boxing it allocates nothing).
    ///
    /// # Errors
    ///
    /// The system's error while setting the channel up.
    fn talker(&mut self, captured: bool) -> io::Result<Option<Talker>> {
        let _ = captured;
        Ok(None)
    }
}

/// Bytes a talker's closure carries when it stands for a worker's reply.
pub const REPLY: usize = 32;

/// A talker's closure body for a call numbered `made`: captures [`REPLY`] bytes or nothing.
/// `send` gets the closure to run on the loop.
fn message(captured: bool, made: u64, send: impl FnOnce(Message)) {
    if captured {
        let reply = [made as u8; REPLY];
        send(Box::new(move || {
            std::hint::black_box(&reply);
        }));
    } else {
        send(Box::new(|| {}));
    }
}

/// One talking thread's call (see [`PipeSystem::talker`]).
pub type Talker = Box<dyn FnMut(u64) + Send>;

/// A closure sent to a loop by a talker.
type Message = Box<dyn FnOnce() + Send>;

/// The systems: vireo on each compiled backend that starts here, as the static type a
/// program gets from `vireo::EventLoop` (`vireo-epoll`: `EventLoop<Epoll>`) and as the
/// run-time choice (`vireo-any-epoll`: `EventLoop<AnyBackend>`), then the others.
pub fn systems() -> Vec<String> {
    let vireo = crate::report::systems_with(&[]);
    let any = vireo.iter().map(|v| v.replacen("vireo-", "vireo-any-", 1));
    let mut all: Vec<String> = vireo.clone();
    all.extend(any);
    if vireo.iter().any(|v| v == "vireo-epoll") {
        all.push(PAUSE.to_owned());
    }
    all.extend(
        ["raw-epoll", "raw-poll", "mio", "polling", "calloop"]
            .iter()
            .map(|s| (*s).to_owned()),
    );
    all.extend(cloops::available());
    all
}

/// vireo-epoll re-watching by pausing and resuming each watch (`update_handle` with no events,
/// then with `READABLE`) instead of removing it and adding a new one: the same fd, the way a
/// program re-arms a watch it keeps, beside libev's stop and start.
pub const PAUSE: &str = "vireo-epoll-pause";

fn vireo<B: Backend + 'static>(
    backend: B,
    pipes: &Arc<Pipes>,
    c: &Arc<Counters>,
) -> io::Result<Box<dyn PipeSystem>> {
    vireo_rearmed(backend, pipes, c, false)
}

fn vireo_rearmed<B: Backend + 'static>(
    backend: B,
    pipes: &Arc<Pipes>,
    c: &Arc<Counters>,
    pause: bool,
) -> io::Result<Box<dyn PipeSystem>> {
    Ok(Box::new(Vireo {
        lp: EventLoop::with_backend(backend)?,
        pause,
        watches: Vec::new(),
        idle: None,
        pipes: Arc::clone(pipes),
        c: Arc::clone(c),
    }))
}

/// Starts `name` on `pipes`.
///
/// # Errors
///
/// Unknown names and the system's own errors.
pub fn start(name: &str, pipes: &Arc<Pipes>, c: &Arc<Counters>) -> io::Result<Box<dyn PipeSystem>> {
    let mut sys: Box<dyn PipeSystem> = if name == PAUSE {
        vireo_rearmed(vireo_backends::Epoll::new()?, pipes, c, true)?
    } else if let Some(kind) = name.strip_prefix("vireo-any-") {
        vireo(
            AnyBackend::with_choice(Choice::Only(kind.parse()?))?,
            pipes,
            c,
        )?
    } else if let Some(kind) = name.strip_prefix("vireo-") {
        match kind.parse()? {
            BackendKind::Epoll => vireo(vireo_backends::Epoll::new()?, pipes, c)?,
            BackendKind::Poll => vireo(vireo_backends::Poll::new()?, pipes, c)?,
            BackendKind::IoUring => vireo(vireo_backends::IoUring::new()?, pipes, c)?,
            BackendKind::Portable => vireo(vireo_backends::Portable::new()?, pipes, c)?,
        }
    } else if cloops::is_c_loop(name) {
        cloops::start(name, pipes, c)?
    } else {
        match name {
            "raw-epoll" => Box::new(RawEpoll {
                ep: epoll::create(epoll::CreateFlags::CLOEXEC)?,
                added: false,
                buf: Vec::with_capacity(pipes.len().max(1)),
                pipes: Arc::clone(pipes),
                c: Arc::clone(c),
            }),
            "raw-poll" => Box::new(RawPoll {
                fds: Vec::new(),
                pipes: Arc::clone(pipes),
                c: Arc::clone(c),
            }),
            "mio" => Box::new(Mio {
                poll: mio::Poll::new()?,
                events: mio::Events::with_capacity(pipes.len().max(1)),
                added: false,
                inbox: None,
                pipes: Arc::clone(pipes),
                c: Arc::clone(c),
            }),
            "polling" => Box::new(Polling {
                poller: polling::Poller::new()?,
                events: polling::Events::with_capacity(
                    std::num::NonZeroUsize::new(pipes.len().max(1)).expect("non-zero"),
                ),
                added: false,
                pipes: Arc::clone(pipes),
                c: Arc::clone(c),
            }),
            "calloop" => Box::new(Calloop {
                lp: calloop::EventLoop::try_new().map_err(io::Error::other)?,
                tokens: Vec::new(),
                inbox: None,
                pipes: Arc::clone(pipes),
                c: Arc::clone(c),
            }),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown system {other}"),
                ));
            }
        }
    };
    sys.rewatch()?;
    Ok(sys)
}

struct Vireo<B: Backend> {
    lp: EventLoop<B>,
    /// Re-watch by pausing and resuming each watch (see [`PAUSE`]).
    pause: bool,
    watches: Vec<WatchId>,
    /// A socket the talkers pause and resume (never ready), made for the first talker.
    idle: Option<(
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
        WatchId,
    )>,
    pipes: Arc<Pipes>,
    c: Arc<Counters>,
}

impl<B: Backend> PipeSystem for Vireo<B> {
    fn rewatch(&mut self) -> io::Result<()> {
        let h = self.lp.handle().clone();
        if self.pause && !self.watches.is_empty() {
            for &w in &self.watches {
                h.update_handle(w, Events::empty())?;
                h.update_handle(w, Events::READABLE)?;
            }
            return Ok(());
        }
        for w in self.watches.drain(..) {
            h.remove_handle(w)?;
        }
        for i in 0..self.pipes.len() {
            let (pipes, c) = (Arc::clone(&self.pipes), Arc::clone(&self.c));
            let fd = self.pipes.reader(i).as_raw_fd();
            self.watches
                .push(h.add_handle(fd, Events::READABLE, move |_, _, _, _| {
                    bump(&c.events, 1);
                    read_cb(&pipes, &c, i);
                })?);
        }
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        self.lp.run_once_timeout(Duration::ZERO).map(drop)
    }

    fn vireo_handle(&self) -> Option<vireo_core::LoopHandle> {
        Some(self.lp.handle().clone())
    }

    /// Alternates an `invoke` with a pause or resume of an idle watch.
    fn talker(&mut self, captured: bool) -> io::Result<Option<Talker>> {
        let h = self.lp.handle().clone();
        let target = match &self.idle {
            Some((_, _, id)) => *id,
            None => {
                let (idle, peer) = std::os::unix::net::UnixStream::pair()?;
                let id = h
                    .add_handle(idle.as_raw_fd(), Events::empty(), |_, _, _, _| {})
                    .map_err(io::Error::other)?;
                self.idle = Some((idle, peer, id));
                id
            }
        };
        Ok(Some(Box::new(move |made: u64| {
            if made % 2 == 0 {
                if captured {
                    let reply = [made as u8; REPLY];
                    let _ = h.invoke(move |_| {
                        std::hint::black_box(&reply);
                    });
                } else {
                    let _ = h.invoke(|_| {});
                }
            } else {
                let events = if (made / 2) % 2 == 0 {
                    Events::READABLE
                } else {
                    Events::empty()
                };
                let _ = h.update_handle(target, events);
            }
        })))
    }
}

struct RawEpoll {
    ep: OwnedFd,
    added: bool,
    buf: Vec<epoll::Event>,
    pipes: Arc<Pipes>,
    c: Arc<Counters>,
}

impl PipeSystem for RawEpoll {
    fn rewatch(&mut self) -> io::Result<()> {
        for i in 0..self.pipes.len() {
            if self.added {
                epoll::delete(&self.ep, self.pipes.reader(i))?;
            }
            epoll::add(
                &self.ep,
                self.pipes.reader(i),
                epoll::EventData::new_u64(i as u64),
                epoll::EventFlags::IN,
            )?;
        }
        self.added = true;
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        self.buf.clear();
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        epoll::wait(
            &self.ep,
            rustix::buffer::spare_capacity(&mut self.buf),
            Some(&zero),
        )?;
        for e in &self.buf {
            bump(&self.c.events, 1);
            read_cb(&self.pipes, &self.c, e.data.u64() as usize);
        }
        Ok(())
    }
}

struct RawPoll {
    /// Built once per `rewatch`, as a hand-written poll loop keeps its array.
    fds: Vec<PollFd<'static>>,
    pipes: Arc<Pipes>,
    c: Arc<Counters>,
}

impl PipeSystem for RawPoll {
    fn rewatch(&mut self) -> io::Result<()> {
        self.fds = (0..self.pipes.len())
            .map(|i| {
                // SAFETY: `Pipes` outlives the array: this system holds an Arc to it, and the
                // array is a field declared before it, so it is dropped first.
                let fd = unsafe { BorrowedFd::borrow_raw(self.pipes.reader(i).as_raw_fd()) };
                PollFd::from_borrowed_fd(fd, PollFlags::IN)
            })
            .collect();
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut self.fds, Some(&zero))?;
        for i in 0..self.fds.len() {
            if !self.fds[i].revents().is_empty() {
                bump(&self.c.events, 1);
                read_cb(&self.pipes, &self.c, i);
            }
        }
        Ok(())
    }
}

struct Mio {
    poll: mio::Poll,
    events: mio::Events,
    added: bool,
    /// The talkers' channel, made for the first talker.
    inbox: Option<MioInbox>,
    pipes: Arc<Pipes>,
    c: Arc<Counters>,
}

/// How a mio program takes closures from other threads: a channel plus a `mio::Waker`,
/// woken only by the first sender after the loop last drained it.
struct MioInbox {
    tx: crossbeam_channel::Sender<Message>,
    rx: crossbeam_channel::Receiver<Message>,
    notified: Arc<AtomicBool>,
    waker: Arc<mio::Waker>,
}

/// The waker's token (the pipes use 0..N).
const MIO_WAKE: mio::Token = mio::Token(usize::MAX);

/// Closures a mio talker lets wait in the channel before it holds off.
pub const MIO_BACKLOG: usize = 100_000;

impl PipeSystem for Mio {
    fn rewatch(&mut self) -> io::Result<()> {
        let r = self.poll.registry();
        for i in 0..self.pipes.len() {
            let fd = self.pipes.reader(i).as_raw_fd();
            if self.added {
                r.deregister(&mut mio::unix::SourceFd(&fd))?;
            }
            r.register(
                &mut mio::unix::SourceFd(&fd),
                mio::Token(i),
                mio::Interest::READABLE,
            )?;
        }
        self.added = true;
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        self.poll.poll(&mut self.events, Some(Duration::ZERO))?;
        for e in &self.events {
            if e.token() == MIO_WAKE {
                if let Some(inbox) = &self.inbox {
                    inbox.notified.store(false, SeqCst);
                    // What is queued now, not what keeps arriving: a talker faster than the
                    // loop would keep it here forever.
                    for _ in 0..inbox.rx.len() {
                        let Ok(f) = inbox.rx.try_recv() else { break };
                        f();
                    }
                }
                continue;
            }
            bump(&self.c.events, 1);
            // Edge-triggered: read (and pass on) every byte that is there.
            while read_cb(&self.pipes, &self.c, e.token().0) {}
        }
        Ok(())
    }

    /// Sends a closure; wakes the loop when it is the first since the last drain.
    fn talker(&mut self, captured: bool) -> io::Result<Option<Talker>> {
        if self.inbox.is_none() {
            let (tx, rx) = crossbeam_channel::unbounded();
            self.inbox = Some(MioInbox {
                tx,
                rx,
                notified: Arc::new(AtomicBool::new(false)),
                waker: Arc::new(mio::Waker::new(self.poll.registry(), MIO_WAKE)?),
            });
        }
        let Some(inbox) = &self.inbox else {
            return Ok(None);
        };
        let (tx, notified, waker) = (
            inbox.tx.clone(),
            Arc::clone(&inbox.notified),
            Arc::clone(&inbox.waker),
        );
        Ok(Some(Box::new(move |made| {
            if tx.len() >= MIO_BACKLOG {
                // The loop runs fewer closures per second than the talkers send: hold off
                // rather than let the queue grow without bound.
                thread::yield_now();
                return;
            }
            message(captured, made, |m| {
                let _ = tx.send(m);
            });
            if !notified.load(SeqCst) && !notified.swap(true, SeqCst) {
                let _ = waker.wake();
            }
        })))
    }
}

struct Polling {
    poller: polling::Poller,
    events: polling::Events,
    added: bool,
    pipes: Arc<Pipes>,
    c: Arc<Counters>,
}

impl PipeSystem for Polling {
    fn rewatch(&mut self) -> io::Result<()> {
        for i in 0..self.pipes.len() {
            let fd = self.pipes.reader(i);
            if self.added {
                self.poller.delete(fd)?;
            }
            // SAFETY: the fd is deleted from the poller (above, or when the poller is dropped
            // with this system) before `Pipes`, which this system keeps alive, closes it.
            unsafe {
                self.poller.add_with_mode(
                    fd.as_raw_fd(),
                    polling::Event::readable(i),
                    polling::PollMode::Level,
                )?;
            }
        }
        self.added = true;
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        self.events.clear();
        self.poller.wait(&mut self.events, Some(Duration::ZERO))?;
        for e in self.events.iter() {
            bump(&self.c.events, 1);
            read_cb(&self.pipes, &self.c, e.key);
        }
        Ok(())
    }
}

struct Calloop {
    lp: calloop::EventLoop<'static, ()>,
    tokens: Vec<calloop::RegistrationToken>,
    /// The sending end of the talkers' `calloop::channel`, made for the first talker.
    inbox: Option<calloop::channel::Sender<Message>>,
    pipes: Arc<Pipes>,
    c: Arc<Counters>,
}

impl PipeSystem for Calloop {
    fn rewatch(&mut self) -> io::Result<()> {
        let h = self.lp.handle();
        for t in self.tokens.drain(..) {
            h.remove(t);
        }
        for i in 0..self.pipes.len() {
            // SAFETY: `Pipes` outlives the loop: this system holds an Arc to it and drops the
            // loop (and every source) first, as fields drop in declaration order.
            let fd: BorrowedFd<'static> =
                unsafe { BorrowedFd::borrow_raw(self.pipes.reader(i).as_raw_fd()) };
            let source =
                calloop::generic::Generic::new(fd, calloop::Interest::READ, calloop::Mode::Level);
            let (pipes, c) = (Arc::clone(&self.pipes), Arc::clone(&self.c));
            let token = h
                .insert_source(source, move |_, _, _| {
                    bump(&c.events, 1);
                    read_cb(&pipes, &c, i);
                    Ok(calloop::PostAction::Continue)
                })
                .map_err(|e| io::Error::other(e.error))?;
            self.tokens.push(token);
        }
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        self.lp
            .dispatch(Some(Duration::ZERO), &mut ())
            .map_err(io::Error::other)
    }

    /// Sends a closure through a `calloop::channel` source.
    fn talker(&mut self, captured: bool) -> io::Result<Option<Talker>> {
        if self.inbox.is_none() {
            let (tx, rx) = calloop::channel::channel::<Message>();
            self.lp
                .handle()
                .insert_source(rx, |event, _, _| {
                    if let calloop::channel::Event::Msg(f) = event {
                        f();
                    }
                })
                .map_err(|e| io::Error::other(e.error))?;
            self.inbox = Some(tx);
        }
        let Some(tx) = self.inbox.clone() else {
            return Ok(None);
        };
        Ok(Some(Box::new(move |made| {
            message(captured, made, |m| {
                let _ = tx.send(m);
            });
        })))
    }
}

/// One round's measurements.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Removing and re-adding every watch, plus one non-blocking iteration.
    pub setup: Duration,
    /// Iterations until every byte was read.
    pub dispatch: Duration,
    /// CPU time of the calling (loop) thread during `dispatch`.
    pub dispatch_cpu: Duration,
    /// Callbacks run during dispatch.
    pub events: u64,
    /// Iterations during dispatch.
    pub iterations: u64,
}

/// Runs one round of bench.c with `active` first writes and `writes` chained writes.
///
/// # Errors
///
/// The system's errors; `TimedOut` when the bytes are not all read within a minute (a lost
/// event).
pub fn round(
    sys: &mut dyn PipeSystem,
    pipes: &Pipes,
    c: &Counters,
    active: usize,
    writes: usize,
) -> io::Result<Round> {
    round_marked(sys, pipes, c, active, writes, &mut || {})
}

/// [`round`], calling `mark` right before and right after the timed dispatch.
///
/// # Errors
///
/// As [`round`].
pub fn round_marked(
    sys: &mut dyn PipeSystem,
    pipes: &Pipes,
    c: &Counters,
    active: usize,
    writes: usize,
    mark: &mut dyn FnMut(),
) -> io::Result<Round> {
    let started = Instant::now();
    sys.rewatch()?;
    sys.turn()?;
    let setup = started.elapsed();
    c.count.store(0, Relaxed);
    c.events.store(0, Relaxed);
    c.writes.store(writes as u64, Relaxed);
    let space = (pipes.len() / active.max(1)).max(1);
    let mut fired = 0;
    for i in 0..active.min(pipes.len()) {
        rustix::net::send(pipes.writer(i * space), b"e", SendFlags::empty())?;
        fired += 1;
    }
    c.fired.store(fired, Relaxed);
    mark();
    let cpu = crate::report::thread_cpu();
    let started = Instant::now();
    let mut iterations = 0;
    while c.count.load(Relaxed) != c.fired.load(Relaxed) {
        sys.turn()?;
        iterations += 1;
        if iterations % 1024 == 0 && started.elapsed() > Duration::from_secs(60) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} of {} bytes read after a minute",
                    c.count.load(Relaxed),
                    c.fired.load(Relaxed)
                ),
            ));
        }
    }
    let dispatch = started.elapsed();
    let dispatch_cpu = crate::report::thread_cpu() - cpu;
    mark();
    Ok(Round {
        setup,
        dispatch,
        dispatch_cpu,
        events: c.events.load(Relaxed),
        iterations,
    })
}

/// `(pipes, active, writes)`.
type PointKey = (usize, usize, usize);

/// `(system, dispatch µs, setup µs)`.
type SystemMedians = (String, f64, f64);

/// What `vireo-bench pipes` runs.
#[derive(Debug, Clone)]
pub struct PipesOptions {
    /// Numbers of socketpairs.
    pub pipes: Vec<usize>,
    /// `(active, writes)` parameter sets.
    pub sets: Vec<(usize, usize)>,
    /// Measured rounds per point (one more is run first as a warm-up).
    pub rounds: usize,
    /// Systems to run (all when empty).
    pub systems: Vec<String>,
}

impl Default for PipesOptions {
    fn default() -> PipesOptions {
        PipesOptions {
            pipes: vec![100, 1000, 9900],
            sets: vec![(1, 100), (100, 1000)],
            rounds: 25,
            systems: Vec::new(),
        }
    }
}

/// Raises the soft open-files limit to at least `want` if the hard limit allows; returns the
/// soft limit now in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    let target = l.maximum.map_or(want, |max| max.min(want));
    if l.current.is_some_and(|cur| cur < target) {
        l.current = Some(target);
        let _ = setrlimit(Resource::Nofile, l);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Runs the benchmark and reports it.
///
/// # Errors
///
/// An unknown system, socketpairs that cannot be made, or a system's error.
pub fn report(
    opts: &PipesOptions,
    mut progress: impl FnMut(&str),
) -> io::Result<crate::report::Report> {
    use crate::report::{Chart, Report, Target, median};

    let chosen = crate::report::choose(&systems(), &opts.systems)?;
    let mut rep = Report {
        bench: "pipes".into(),
        intro: vec![
            format!(
                "vireo-bench pipes: libevent's bench.c; medians of {} rounds (after one warm-up); \
             dispatch = until every byte is read, setup = remove and re-add every watch + one \
             non-blocking iteration",
                opts.rounds
            ),
            "Setup gives every fd again: vireo removes each watch and adds a new one (each \
             add checks the fd with one fstat, to tell a number closed and reopened in between \
             from the file it named); raw epoll, mio, polling and libevent delete and add the \
             kernel registration; libev stops, sets (ev_io_set) and starts its watcher, and \
             checks it with one epoll_ctl call; libuv stops and starts its poll handle. With \
             9900 pipes vireo's pass of fstat calls also slows the dispatch that follows it (a \
             trial without them matched libev's dispatch). vireo-epoll-pause re-arms each watch by pausing and resuming it with \
             update_handle instead (the same fd kept, as libev's stop and start would): no \
             fstat, no allocation, no kernel change"
                .to_owned(),
        ],
        columns: [
            "pipes",
            "active",
            "writes",
            "system",
            "dispatch us",
            "x raw-epoll",
            "setup us",
            "x raw-epoll",
            "events",
            "iterations",
        ]
        .map(String::from)
        .to_vec(),
        ..Report::default()
    };
    let mut dispatch_chart = Chart {
        name: "pipes-dispatch".into(),
        title: "pipes: dispatch time (lower is better)".into(),
        y_label: "microseconds".into(),
        groups: Vec::new(),
    };
    let mut setup_chart = Chart {
        name: "pipes-setup".into(),
        title: "pipes: remove + re-add every watch (lower is better)".into(),
        y_label: "microseconds".into(),
        groups: Vec::new(),
    };
    // (pipes, active, writes) -> system -> (dispatch, setup)
    let mut medians: Vec<(PointKey, Vec<SystemMedians>)> = Vec::new();
    let limit = raise_fd_limit(2 * opts.pipes.iter().copied().max().unwrap_or(0) as u64 + 256);
    for &n in &opts.pipes {
        if (2 * n as u64 + 64) > limit {
            rep.intro.push(format!(
                "skipped {n} pipes: the open-files limit is {limit} (raise `ulimit -n`)"
            ));
            continue;
        }
        let pipes = Arc::new(Pipes::new(n)?);
        let c = Arc::new(Counters::default());
        for &(active, writes) in &opts.sets {
            // The rounds run in blocks, the systems taking turns block by block (in an order
            // rotated each block), so that a slow spell of a shared machine is spread over
            // every system instead of landing on one. Each block starts the system afresh and
            // drops its first round as a warm-up.
            let blocks = opts.rounds.clamp(1, 5);
            let mut samples: Vec<(Vec<f64>, Vec<f64>, u64, u64)> =
                vec![(Vec::new(), Vec::new(), 0, 0); chosen.len()];
            for block in 0..blocks {
                let rounds = opts.rounds / blocks + usize::from(block < opts.rounds % blocks);
                for k in 0..chosen.len() {
                    let si = (k + block) % chosen.len();
                    let name = &chosen[si];
                    progress(&format!(
                        "{name}: {n} pipes, {active} active, {writes} writes"
                    ));
                    let mut sys = start(name, &pipes, &c)?;
                    let acc = &mut samples[si];
                    for r in 0..=rounds {
                        let got = round(sys.as_mut(), &pipes, &c, active, writes)?;
                        if r > 0 {
                            acc.0.push(got.dispatch.as_secs_f64() * 1e6);
                            acc.1.push(got.setup.as_secs_f64() * 1e6);
                            acc.2 += got.events;
                            acc.3 += got.iterations;
                        }
                    }
                }
            }
            let mut row = Vec::new();
            for (name, (mut dispatch, mut setup, events, iterations)) in chosen.iter().zip(samples)
            {
                let rounds = dispatch.len().max(1) as u64;
                let (d, s) = (median(&mut dispatch), median(&mut setup));
                rep.json.push(serde_json::json!({
                    "bench": "pipes", "system": name,
                    "backend": if name == PAUSE { "epoll" } else { name.strip_prefix("vireo-").unwrap_or("") },
                    "pipes": n, "active": active, "writes": writes, "rounds": opts.rounds,
                    "dispatch_us_median": d, "setup_us_median": s,
                    "events": events / rounds, "iterations": iterations / rounds,
                }));
                row.push((name.clone(), d, s, events / rounds, iterations / rounds));
            }
            let floor = |col: usize| {
                row.iter()
                    .find(|r| r.0 == "raw-epoll")
                    .map_or(f64::NAN, |r| if col == 0 { r.1 } else { r.2 })
            };
            for (name, d, s, ev, it) in &row {
                rep.rows.push(vec![
                    n.to_string(),
                    active.to_string(),
                    writes.to_string(),
                    name.clone(),
                    format!("{d:.1}"),
                    format!("{:.2}", d / floor(0)),
                    format!("{s:.1}"),
                    format!("{:.3}", s / floor(1)),
                    ev.to_string(),
                    it.to_string(),
                ]);
            }
            let group = format!("{n}/{active}/{writes}");
            dispatch_chart.groups.push((
                group.clone(),
                row.iter().map(|r| (r.0.clone(), r.1)).collect(),
            ));
            setup_chart
                .groups
                .push((group, row.iter().map(|r| (r.0.clone(), r.2)).collect()));
            medians.push((
                (n, active, writes),
                row.iter().map(|r| (r.0.clone(), r.1, r.2)).collect(),
            ));
        }
    }
    // Targets: the worst ratio over every parameter set (or those with `active` ready).
    let ratio = |a: &str, b: &str, col: usize, active: Option<usize>| -> Option<f64> {
        medians
            .iter()
            .filter(|((_, act, _), _)| active.is_none_or(|want| *act == want))
            .filter_map(|(_, row)| {
                let get = |name: &str| {
                    row.iter()
                        .find(|r| r.0 == name)
                        .map(|r| if col == 0 { r.1 } else { r.2 })
                };
                Some(get(a)? / get(b)?)
            })
            .reduce(f64::max)
    };
    for (a, b, col, active, limit, what) in [
        (
            "vireo-epoll",
            "raw-epoll",
            0,
            None,
            1.05,
            "vireo-epoll (static) dispatch <= 1.05x raw epoll",
        ),
        (
            "vireo-poll",
            "raw-poll",
            0,
            None,
            1.05,
            "vireo-poll dispatch <= 1.05x raw poll",
        ),
        (
            "vireo-io-uring",
            "vireo-epoll",
            0,
            Some(100),
            1.0,
            "vireo-io-uring dispatch <= vireo-epoll at 100 active",
        ),
        (
            "vireo-epoll",
            "mio",
            0,
            None,
            1.0,
            "vireo-epoll dispatch <= mio",
        ),
        (
            "vireo-epoll",
            "calloop",
            0,
            None,
            1.0,
            "vireo-epoll dispatch <= calloop",
        ),
        (
            "vireo-any-epoll",
            "vireo-epoll",
            0,
            None,
            1.05,
            "run-time choice: vireo-any-epoll dispatch <= 1.05x vireo-epoll (static)",
        ),
        (
            "vireo-epoll",
            "raw-epoll",
            1,
            None,
            0.10,
            "vireo-epoll setup <= 0.10x raw epoll DEL+ADD",
        ),
    ] {
        if let Some(r) = ratio(a, b, col, active) {
            rep.targets.push(Target {
                what: what.into(),
                measured: format!("worst {r:.2}x over the parameter sets"),
                met: r <= limit,
            });
        }
    }
    // The check the C loops' users would make: vireo-epoll against the fastest of raw epoll
    // and the C loops present, set by set.
    let floors = ["raw-epoll", "libev", "libevent", "libuv"];
    let worst = medians
        .iter()
        .filter_map(|(key, row)| {
            let get = |name: &str| row.iter().find(|r| r.0 == name).map(|r| r.1);
            let (best, best_name) = floors
                .iter()
                .filter_map(|f| Some((get(f)?, *f)))
                .min_by(|a, b| a.0.total_cmp(&b.0))?;
            Some((get("vireo-epoll")? / best, best_name, *key))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((r, name, (n, active, writes))) = worst {
        let present: Vec<&str> = floors
            .iter()
            .copied()
            .filter(|f| chosen.iter().any(|c| c == f))
            .collect();
        rep.targets.push(Target {
            what: format!(
                "vireo-epoll dispatch <= the fastest of {} on every set",
                present.join(", ")
            ),
            measured: format!("worst {r:.2}x ({name} at {n}/{active}/{writes})"),
            met: r <= 1.0,
        });
    }
    rep.charts = vec![dispatch_chart, setup_chart];
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_system_moves_every_byte() {
        let pipes = Arc::new(Pipes::new(16).unwrap());
        let c = Arc::new(Counters::default());
        for name in systems() {
            let mut sys = start(&name, &pipes, &c).unwrap();
            for _ in 0..3 {
                let r = round(sys.as_mut(), &pipes, &c, 4, 40).unwrap();
                // Every write was read: 4 first bytes and 40 passed on.
                assert_eq!(c.count.load(Relaxed), 44, "{name}");
                assert_eq!(c.fired.load(Relaxed), 44, "{name}");
                assert!(r.events >= 44 && r.iterations >= 1, "{name}: {r:?}");
            }
        }
    }
}
