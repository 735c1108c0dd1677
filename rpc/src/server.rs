//! The server: one event-loop thread for every socket, a worker pool for the procedures.
//!
//! The loop thread accepts, reads whole frames (incrementally, across any number of reads),
//! answers keepalive, throttles each client at `max_client_requests` calls in flight, and
//! writes replies in the order they complete. Workers only decode the payload, run the
//! procedure and encode the reply, which they hand back to the loop with
//! [`LoopHandle::invoke`]. Priority procedures (`STATS`, `SET_LIMITS`) go to the pool's
//! priority lane, so a queue of slow calls never delays them.
//!
//! ```no_run
//! use vireo_rpc::server::{ListenAddr, Server, ServerConfig};
//!
//! let config = ServerConfig {
//!     listen: vec!["unix:/tmp/vireo.sock".parse::<ListenAddr>()?],
//!     ..ServerConfig::default()
//! };
//! let server = Server::bind(config)?;
//! let stop = server.shutdown_handle();
//! std::thread::spawn(move || {
//!     std::thread::sleep(std::time::Duration::from_secs(60));
//!     stop.shutdown(); // finish in-flight calls, flush replies, return from run()
//! });
//! let summary = server.run()?;
//! println!("{} calls answered", summary.replies_sent);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use slab::Slab;
use vireo_backends::{AnyBackend, Choice};
use vireo_core::{
    EventLoop, Events, Frequency, LoopHandle, LoopLocal, TimerId, WatchId, WeakLoopLocal,
};
use vireo_pool::{LimitsError, Pool, SubmitError};

mod admin_program;

use crate::net::Stream;
use crate::proto::{
    self, Frame, FrameReader, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM,
    MAX_SLEEP_MS, PROGRAM, Procedure, VERSION, kind, status,
};

/// A procedure number outside the protocol that panics in the worker; answered only when
/// [`ServerConfig::test_procedures`] is set (for fault-injection tests).
pub const TEST_PANIC_PROCEDURE: u32 = 0x7e57_0001;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix stream socket at this path (`unix:PATH`). A stale socket file nobody listens on is
    /// replaced; the file is removed when the server stops.
    Unix(PathBuf),
    /// A TCP socket (`tcp:HOST:PORT`, or `tcp:PORT` for 127.0.0.1; port 0 picks a free one,
    /// see [`Server::local_addrs`]).
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = io::Error;

    fn from_str(s: &str) -> io::Result<ListenAddr> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid(
                    "unix: needs a path, as in unix:/tmp/vireo.sock".into(),
                ));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            // A bare port means loopback: nothing listens beyond this host unless asked to.
            if let Ok(port) = addr.parse::<u16>() {
                return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
            }
            let addr = addr
                .to_socket_addrs()
                .map_err(|e| invalid(format!("bad tcp address {addr:?}: {e}")))?
                .next()
                .ok_or_else(|| invalid(format!("tcp address {addr:?} resolves to nothing")))?;
            Ok(ListenAddr::Tcp(addr))
        } else {
            Err(invalid(format!(
                "bad address {s:?}: expected unix:PATH or tcp:HOST:PORT"
            )))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The server's settings; the defaults are libvirtd's.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to listen on (at least one).
    pub listen: Vec<ListenAddr>,
    /// Which backend runs the event loop.
    pub backend: Choice,
    /// Workers started at once (libvirt's `min_workers`, 5).
    pub min_workers: usize,
    /// Normal workers at most (`max_workers`, 20).
    pub max_workers: usize,
    /// Priority workers (`prio_workers`, 5).
    pub prio_workers: usize,
    /// Calls per client in flight before the server stops reading from it (5).
    pub max_client_requests: usize,
    /// Clients at once; at the limit the server stops accepting until one leaves (5000).
    pub max_clients: usize,
    /// Largest message (header and payload) accepted, at most 16 MiB.
    pub max_message_size: usize,
    /// Silence after which the server pings a client; `None` disables keepalive (5 s).
    pub keepalive_interval: Option<Duration>,
    /// Unanswered pings before a silent client is closed (5).
    pub keepalive_count: u32,
    /// Reply bytes queued for one client before it is closed for not reading (64 MiB).
    pub max_queued_reply_bytes: usize,
    /// How long accepting pauses after `accept` fails with EMFILE/ENFILE (5 s, as libvirt).
    pub accept_retry: Duration,
    /// After shutdown began and every call is answered, how long queued replies may take to
    /// flush before the remaining clients are dropped (10 s).
    pub shutdown_grace: Duration,
    /// Answer [`TEST_PANIC_PROCEDURE`] (fault-injection tests only).
    pub test_procedures: bool,
    /// Accept `SET_LIMITS` from clients of the listen addresses (off by default: any client
    /// could otherwise start or starve the pool's workers). Refused calls get an `ERROR` reply.
    pub allow_set_limits: bool,
    /// The highest worker count the server uses: `bind` refuses `min_workers`,
    /// `max_workers` or `prio_workers` above it, and `SET_LIMITS` answers `ERROR` for a limit
    /// above it (64).
    pub worker_ceiling: usize,
    /// Input the server may buffer for large frames of all clients together (256 MiB; at
    /// least `max_message_size`). A client whose frame is longer than [`UNBUDGETED_INPUT`]
    /// reserves the rest of that frame from this budget before reading past it; when the
    /// budget has no room, reading from that client pauses until other large frames complete
    /// or their clients leave. Its data waits in its socket and nothing is dropped; a frame
    /// that got its reservation is read to its end without pausing again, as fast as its peer
    /// sends it (a peer that stops sending mid-frame cannot answer a ping, so keepalive, when on,
    /// closes it and its reservation returns); clients sending smaller frames are never held
    /// up. Memory follows the bytes that arrived, not the reservations.
    pub max_buffered_input: usize,
    /// A Unix socket for libvirt's admin program (what stock `virt-admin` speaks: the server
    /// `vireo`, its threadpool, client limits and clients), served by this server's loop:
    /// `None` (the default) serves none. Like libvirtd's, it accepts only
    /// clients whose uid (`SO_PEERCRED`) is the server's; others are disconnected at once.
    pub admin: Option<PathBuf>,
    /// What the admin socket's logging procedures change (`virt-admin daemon-log-filters`,
    /// `daemon-log-outputs`): the daemon's own logging, which the server does not own. `None`
    /// answers them with an error.
    pub logging: Option<Arc<dyn LoggingControl>>,
}

/// The daemon's logging, as libvirt's admin program sees it: filters and outputs as strings in
/// the daemon's syntax, read and replaced at run time.
pub trait LoggingControl: Send + Sync + fmt::Debug {
    /// The filters now (empty for the default).
    fn filters(&self) -> String;
    /// Replaces the filters (`None` or empty: back to the default).
    ///
    /// # Errors
    ///
    /// The text of why `filters` was refused (shown by virt-admin after `invalid argument: `).
    fn set_filters(&self, filters: Option<&str>) -> Result<(), String>;
    /// The outputs now.
    fn outputs(&self) -> String;
    /// Replaces the outputs.
    ///
    /// # Errors
    ///
    /// As [`set_filters`](LoggingControl::set_filters).
    fn set_outputs(&self, outputs: Option<&str>) -> Result<(), String>;
}

/// Bytes of a frame that any client may buffer without a reservation from
/// [`ServerConfig::max_buffered_input`] (128 KiB).
pub const UNBUDGETED_INPUT: usize = 128 * 1024;

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: Vec::new(),
            backend: Choice::Auto,
            min_workers: 5,
            max_workers: 20,
            prio_workers: 5,
            max_client_requests: 5,
            max_clients: 5000,
            max_message_size: proto::MAX_MESSAGE,
            keepalive_interval: Some(Duration::from_secs(5)),
            keepalive_count: 5,
            max_queued_reply_bytes: 64 * 1024 * 1024,
            accept_retry: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            test_procedures: false,
            allow_set_limits: false,
            worker_ceiling: 64,
            max_buffered_input: 256 * 1024 * 1024,
            admin: None,
            logging: None,
        }
    }
}

/// What a server did, returned by [`Server::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerSummary {
    /// Connections accepted.
    pub clients_accepted: u64,
    /// Calls received (whole frames of vireo's program, valid or not).
    pub calls_received: u64,
    /// Replies written completely to their clients.
    pub replies_sent: u64,
    /// Replies dropped because their client had gone.
    pub replies_dropped: u64,
    /// Connections closed for a protocol error, keepalive timeout or an unread reply queue.
    pub clients_dropped: u64,
}

/// Counters read by `STATS` from worker threads.
#[derive(Debug, Default)]
struct Counters {
    clients: AtomicUsize,
    iterations: AtomicU64,
    dispatched: AtomicU64,
    backend_rebuilds: AtomicU64,
    calls_received: AtomicU64,
    replies_sent: AtomicU64,
}

/// Stops a running server gracefully; `Clone + Send + Sync`.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    requested: Arc<AtomicBool>,
    handle: LoopHandle,
}

impl ShutdownHandle {
    /// Stops accepting and reading, finishes the calls already received, flushes their replies
    /// and makes [`Server::run`] return. Safe from any thread (a signal-handling thread, say).
    pub fn shutdown(&self) {
        self.requested.store(true, SeqCst);
        // Wakes the loop; an error means the loop is already gone.
        let _ = self.handle.invoke(|_| {});
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(addr: &ListenAddr) -> io::Result<(Listener, ListenAddr)> {
        match addr {
            ListenAddr::Unix(path) => {
                let listener = match UnixListener::bind(path) {
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                        // A socket file left by a server that died: replace it only when
                        // nobody answers on it.
                        if UnixStream::connect(path).is_ok() {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("{} is in use by a running server", path.display()),
                            ));
                        }
                        std::fs::remove_file(path)?;
                        UnixListener::bind(path)?
                    }
                    other => other?,
                };
                listener.set_nonblocking(true)?;
                Ok((Listener::Unix(listener, path.clone()), addr.clone()))
            }
            ListenAddr::Tcp(a) => {
                let listener = TcpListener::bind(a)?;
                listener.set_nonblocking(true)?;
                let local = listener.local_addr()?;
                Ok((Listener::Tcp(listener), ListenAddr::Tcp(local)))
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l, path) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Ok((Stream::Unix(s), format!("unix:{}", path.display())))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), format!("tcp:{peer}")))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

struct Outgoing {
    bytes: Vec<u8>,
    /// A reply to a call (counted in flight until written), not a keepalive message.
    tracked: bool,
}

struct Client {
    uid: u64,
    stream: Stream,
    peer: String,
    watch: WatchId,
    interest: Events,
    reader: FrameReader,
    tx: VecDeque<Outgoing>,
    tx_offset: usize,
    tx_bytes: usize,
    /// Calls handed to the pool whose reply is not yet fully written.
    in_flight: usize,
    last_rx: Instant,
    pings_left: u32,
    /// The peer shut its side down: nothing more is read; the client is closed once every
    /// call received is answered and its reply written.
    eof: bool,
    /// Not read until the input budget has room again (see `max_buffered_input`).
    rx_paused: bool,
    /// Bytes this client reserved from the input budget for the frame it assembles.
    rx_charged: usize,
    /// A client of the admin socket: it speaks libvirt's admin program, not the server's.
    admin: bool,
    /// When it connected, in seconds since the Unix epoch (libvirt's client timestamp).
    connected: i64,
    /// The peer's uid, gid and pid (`SO_PEERCRED`), for a Unix client.
    cred: Option<(u32, u32, i32)>,
}

impl Client {
    /// libvirt's transport number: 0 unix, 1 tcp.
    fn transport(&self) -> u32 {
        match self.stream {
            Stream::Unix(_) => 0,
            Stream::Tcp(_) => 1,
        }
    }

    /// libvirt's client information, in libvirtd's order: `readonly`, then for a Unix client
    /// `unix_user_id`, `unix_user_name`, `unix_group_id`, `unix_group_name`,
    /// `unix_process_id`; for TCP the peer's address as `sock_addr`.
    fn info(&self) -> Vec<crate::xdr::TypedParam> {
        use crate::xdr::{TypedParam, Value};
        let mut p = vec![TypedParam::new("readonly", Value::Boolean(false))];
        match self.cred {
            Some((uid, gid, pid)) => {
                p.push(TypedParam::new("unix_user_id", Value::Int(uid as i32)));
                p.push(TypedParam::new(
                    "unix_user_name",
                    Value::String(user_name(uid)),
                ));
                p.push(TypedParam::new("unix_group_id", Value::Int(gid as i32)));
                p.push(TypedParam::new(
                    "unix_group_name",
                    Value::String(group_name(gid)),
                ));
                p.push(TypedParam::new("unix_process_id", Value::Int(pid)));
            }
            None => {
                let addr = self.peer.strip_prefix("tcp:").unwrap_or(&self.peer);
                p.push(TypedParam::new("sock_addr", Value::String(addr.to_owned())));
            }
        }
        p
    }

    /// Calls still in the workers: the client waits on the server, so its silence (it is
    /// not read while throttled) says nothing about whether it is alive.
    fn awaiting_replies(&self) -> bool {
        self.in_flight > self.tx.iter().filter(|o| o.tracked).count()
    }
}

/// Why a client is closed.
enum Close {
    /// The peer closed or reset the connection.
    Gone(String),
    /// The server closes it (protocol error, keepalive, unread replies): logged as a warning.
    Dropped(String),
}

/// The server's state: only the loop thread reaches it (no lock).
type Shared = LoopLocal<State>;

/// A reply finished by a worker, on its way to the loop thread.
struct Completion {
    key: usize,
    uid: u64,
    reply: Vec<u8>,
}

/// Replies travel to the loop in batches: the first one after a drain schedules one
/// [`LoopHandle::invoke`], and that drain takes every reply that arrived by then, so a busy
/// server pays one wake-up and one write per client per batch rather than per reply.
#[derive(Default)]
struct Completions {
    /// The replies, and whether a drain is scheduled.
    queue: Mutex<(Vec<Completion>, bool)>,
}

impl Completions {
    /// Adds a reply; returns whether the caller must schedule a drain.
    fn push(&self, completion: Completion) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.0.push(completion);
        !std::mem::replace(&mut q.1, true)
    }

    fn take(&self) -> Vec<Completion> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.1 = false;
        std::mem::take(&mut q.0)
    }
}

struct State {
    me: WeakLoopLocal<State>,
    handle: LoopHandle,
    pool: Arc<Pool>,
    counters: Arc<Counters>,
    ctx: Arc<WorkerCtx>,
    config: ServerConfig,
    listeners: Vec<(Listener, WatchId)>,
    accepting: bool,
    emfile_timer: Option<TimerId>,
    keepalive_timer: Option<TimerId>,
    clients: Slab<Client>,
    next_uid: u64,
    shutting_down: bool,
    summary: ServerSummary,
    /// Sum of the clients' `rx_charged`: the input budget in use.
    rx_total: usize,
    /// Clients paused for the input budget, as `(key, uid)`.
    rx_paused: Vec<(usize, u64)>,
    /// Index in `listeners` of the admin socket's listener.
    admin_listener: Option<usize>,
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    event_loop: EventLoop<AnyBackend>,
    state: Shared,
    pool: Arc<Pool>,
    counters: Arc<Counters>,
    local: Vec<ListenAddr>,
    admin_path: Option<PathBuf>,
    requested: Arc<AtomicBool>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("backend", &self.event_loop.backend_name())
            .field("listen", &self.local)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Starts the pool and the event loop and binds every listen address.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a config without an address, with `max_workers` 0, `min_workers`
    /// above `max_workers`, or `max_client_requests`/`max_clients` 0; the error of a backend
    /// that cannot start, of a bind, or of a worker thread that cannot be spawned.
    pub fn bind(config: ServerConfig) -> io::Result<Server> {
        let invalid = |why: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()));
        if config.listen.is_empty() {
            return invalid("no address to listen on");
        }
        if config.max_client_requests == 0 || config.max_clients == 0 {
            return invalid("max_client_requests and max_clients must be at least 1");
        }
        if config.max_buffered_input < config.max_message_size {
            return invalid(
                "max_buffered_input must hold at least one message of max_message_size",
            );
        }
        let most = config
            .min_workers
            .max(config.max_workers)
            .max(config.prio_workers);
        if most > config.worker_ceiling {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{most} workers is above the worker ceiling of {} (raise it: worker_ceiling, \
                     vireo-rpcd --worker-ceiling)",
                    config.worker_ceiling
                ),
            ));
        }
        let pool = Pool::builder()
            .min_workers(config.min_workers)
            .max_workers(config.max_workers)
            .prio_workers(config.prio_workers)
            .name("vireo-rpc")
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let pool = Arc::new(pool);
        let event_loop = EventLoop::with_backend(AnyBackend::with_choice(config.backend)?)?;
        let handle = event_loop.handle().clone();
        let counters = Arc::new(Counters::default());
        let mut bound = Vec::new();
        let mut local = Vec::new();
        for addr in &config.listen {
            let (listener, addr) = Listener::bind(addr)?;
            bound.push(listener);
            local.push(addr);
        }
        let admin_path = config.admin.clone();
        let admin_listener = match &config.admin {
            Some(path) => {
                let (listener, _) = Listener::bind(&ListenAddr::Unix(path.clone()))?;
                bound.push(listener);
                Some(bound.len() - 1)
            }
            None => None,
        };
        let state = handle.local_cyclic(|me| State {
            me: me.clone(),
            handle: handle.clone(),
            pool: Arc::clone(&pool),
            counters: Arc::clone(&counters),
            ctx: Arc::new(WorkerCtx {
                state: me.clone(),
                handle: handle.clone(),
                completions: Completions::default(),
                pool: Arc::downgrade(&pool),
                counters: Arc::clone(&counters),
                worker_ceiling: config.worker_ceiling,
            }),
            config,
            listeners: Vec::new(),
            accepting: true,
            emfile_timer: None,
            keepalive_timer: None,
            clients: Slab::new(),
            next_uid: 1,
            shutting_down: false,
            summary: ServerSummary::default(),
            rx_total: 0,
            rx_paused: Vec::new(),
            admin_listener,
        });
        let mut event_loop = event_loop;
        let strong = state.clone();
        event_loop
            .with_local(&state, |st| -> io::Result<()> {
                for (index, listener) in bound.into_iter().enumerate() {
                    let state = strong.clone();
                    let watch =
                        handle.add_handle(listener.fd(), Events::READABLE, move |h, _, _, _| {
                            let _ = state.with(|st| st.accept_from(h, index));
                        })?;
                    st.listeners.push((listener, watch));
                }
                if let Some(interval) = st.config.keepalive_interval {
                    let state = strong.clone();
                    let period = Frequency::Period(interval.max(Duration::from_millis(1)));
                    st.keepalive_timer = Some(handle.add_timeout(period, move |h, _| {
                        let _ = state.with(|st| st.keepalive(h));
                    })?);
                }
                Ok(())
            })
            .map_err(io::Error::from)??;
        for addr in &local {
            tracing::info!(%addr, backend = event_loop.backend_name(), "listening");
        }
        Ok(Server {
            event_loop,
            state,
            pool,
            counters,
            local,
            admin_path,
            requested: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The admin socket's path, when [`ServerConfig::admin`] asked for one.
    pub fn admin_path(&self) -> Option<&std::path::Path> {
        self.admin_path.as_deref()
    }

    /// The addresses the server listens on, with the ports picked for `tcp:…:0`.
    pub fn local_addrs(&self) -> &[ListenAddr] {
        &self.local
    }

    /// The name of the backend running the loop.
    pub fn backend_name(&self) -> &'static str {
        self.event_loop.backend_name()
    }

    /// The handle of the server's event loop, for sources of the program's own on the same
    /// loop (signals, timers, child processes): `vireo-rpcd` handles its signals this way.
    pub fn loop_handle(&self) -> &LoopHandle {
        self.event_loop.handle()
    }

    /// A handle that stops the server gracefully from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            requested: Arc::clone(&self.requested),
            handle: self.event_loop.handle().clone(),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`], then finishes the calls already received,
    /// flushes their replies (for at most `shutdown_grace` once every call is answered),
    /// drains the pool and returns what it did.
    ///
    /// # Errors
    ///
    /// An error of the event loop's backend.
    pub fn run(mut self) -> io::Result<ServerSummary> {
        let mut grace_until: Option<Option<Instant>> = None;
        loop {
            if self.requested.load(SeqCst) {
                let stop = self
                    .event_loop
                    .with_local(&self.state, |st| {
                        if !st.shutting_down {
                            st.begin_shutdown();
                        }
                        if st.quiet() {
                            return true;
                        }
                        if st.all_answered() {
                            // A grace too long for `Instant` is no deadline at all.
                            let until = *grace_until.get_or_insert(
                                Instant::now().checked_add(st.config.shutdown_grace),
                            );
                            if until.is_some_and(|until| Instant::now() >= until) {
                                tracing::warn!(
                                    clients = st.clients.len(),
                                    "shutdown: clients did not read their replies in time"
                                );
                                return true;
                            }
                        }
                        false
                    })
                    .map_err(io::Error::from)?;
                if stop {
                    break;
                }
            }
            let timeout = if grace_until.is_some() {
                Some(Duration::from_millis(50))
            } else {
                None
            };
            match timeout {
                Some(t) => self.event_loop.run_once_timeout(t)?,
                None => self.event_loop.run_once()?,
            };
            let stats = self.event_loop.stats();
            self.counters.iterations.store(stats.iterations, SeqCst);
            self.counters.dispatched.store(stats.dispatched, SeqCst);
            let rebuilds = self
                .counters
                .backend_rebuilds
                .swap(stats.backend_rebuilds, SeqCst);
            if stats.backend_rebuilds > rebuilds {
                tracing::warn!(
                    backend = self.event_loop.backend_name(),
                    "the kernel kept a registration of a closed fd: the loop started over on a fresh backend instance"
                );
            }
        }
        let summary = self
            .event_loop
            .with_local(&self.state, |st| {
                let keys: Vec<usize> = st.clients.iter().map(|(k, _)| k).collect();
                for key in keys {
                    st.close(key, Close::Gone("server stopped".into()));
                }
                st.summary
            })
            .map_err(io::Error::from)?;
        self.pool.drain();
        // Run the removals so every callback's state is dropped before the loop goes.
        let _ = self.event_loop.run_once_timeout(Duration::ZERO);
        tracing::info!(
            calls = summary.calls_received,
            replies = summary.replies_sent,
            "stopped"
        );
        Ok(summary)
    }
}

impl State {
    fn accept_from(&mut self, h: &LoopHandle, index: usize) {
        // Bounded so one busy listener cannot starve the clients.
        for _ in 0..64 {
            if !self.accepting || self.shutting_down {
                return;
            }
            let accepted = self.listeners[index].0.accept();
            match accepted {
                Ok((stream, peer)) => {
                    let admin = self.admin_listener == Some(index);
                    if admin && !same_uid(&stream) {
                        // libvirtd's rule for its admin socket: nobody else's uid.
                        tracing::warn!(%peer, "admin socket: a client of another uid was refused");
                        continue;
                    }
                    if let Err(e) = self.add_client(h, stream, peer, admin) {
                        tracing::warn!(error = %e, "cannot watch a new client");
                    }
                    self.check_limits(h);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error().is_some_and(is_fd_exhaustion) => {
                    tracing::warn!(error = %e, retry_ms = self.config.accept_retry.as_millis() as u64,
                        "out of file descriptors: accepting paused");
                    self.pause_accepting_for_emfile(h);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    tracing::debug!(error = %e, "accept failed");
                }
            }
        }
    }

    fn pause_accepting_for_emfile(&mut self, h: &LoopHandle) {
        self.set_accepting(h, false);
        if self.emfile_timer.is_some() {
            return;
        }
        let Some(state) = self.me.upgrade() else {
            return;
        };
        let timer = h.add_timeout(Frequency::Period(self.config.accept_retry), move |h, id| {
            let _ = h.remove_timeout(id);
            let _ = state.with(|st| {
                st.emfile_timer = None;
                st.check_limits(h);
            });
        });
        self.emfile_timer = timer.ok();
    }

    fn set_accepting(&mut self, h: &LoopHandle, on: bool) {
        if self.accepting == on {
            return;
        }
        self.accepting = on;
        let events = if on {
            Events::READABLE
        } else {
            Events::empty()
        };
        for (_, watch) in &self.listeners {
            let _ = h.update_handle(*watch, events);
        }
    }

    /// libvirt's CheckLimits: accept only below `max_clients` and outside an EMFILE pause.
    fn check_limits(&mut self, h: &LoopHandle) {
        if self.shutting_down || self.emfile_timer.is_some() {
            return;
        }
        let below = self.clients.len() < self.config.max_clients;
        if below != self.accepting {
            if below {
                tracing::info!(clients = self.clients.len(), "accepting again");
            } else {
                tracing::warn!(
                    max_clients = self.config.max_clients,
                    "client limit reached: accepting paused"
                );
            }
            self.set_accepting(h, below);
        }
    }

    fn add_client(
        &mut self,
        h: &LoopHandle,
        stream: Stream,
        peer: String,
        admin: bool,
    ) -> io::Result<()> {
        let entry = self.clients.vacant_entry();
        let key = entry.key();
        let uid = self.next_uid;
        let cred = peer_cred(&stream);
        let state = self
            .me
            .upgrade()
            .ok_or_else(|| io::Error::other("the server is gone"))?;
        let watch = h.add_handle(stream.fd(), Events::READABLE, move |h, _, _, events| {
            let _ = state.with(|st| st.client_ready(h, key, uid, events));
        })?;
        self.next_uid += 1;
        tracing::debug!(%peer, uid, "client connected");
        entry.insert(Client {
            uid,
            stream,
            peer,
            watch,
            interest: Events::READABLE,
            reader: FrameReader::new(self.config.max_message_size),
            tx: VecDeque::new(),
            tx_offset: 0,
            tx_bytes: 0,
            in_flight: 0,
            last_rx: Instant::now(),
            pings_left: self.config.keepalive_count,
            eof: false,
            rx_paused: false,
            rx_charged: 0,
            admin,
            connected: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            cred,
        });
        self.summary.clients_accepted += 1;
        self.counters.clients.store(self.clients.len(), SeqCst);
        Ok(())
    }

    fn client_ready(&mut self, h: &LoopHandle, key: usize, uid: u64, events: Events) {
        if self.clients.get(key).is_none_or(|c| c.uid != uid) {
            return;
        }
        // Write before read, as libvirt: a reply written may lift the throttle. A hang-up
        // with replies queued is settled by the write's error.
        let mut outcome = Ok(());
        let failed = events.intersects(Events::HANGUP | Events::ERROR);
        if events.contains(Events::WRITABLE) || (failed && !self.clients[key].tx.is_empty()) {
            outcome = self.write_out(key);
        }
        if outcome.is_ok() && events.intersects(Events::READABLE) | failed {
            outcome = self.read_in(key);
        }
        if outcome.is_ok() && events.contains(Events::ERROR) {
            // The socket's own error ends the read or write above; one that remains is the
            // loop's (a registration the kernel refused): this connection cannot be served.
            outcome = Err(Close::Dropped(
                "the event loop reports an error on this connection".into(),
            ));
        }
        self.settle(h, key, outcome);
    }

    /// After a client's reads and writes: closes it when they failed or when it has shut
    /// its side down and is owed nothing more, else sets what its watch waits for.
    fn settle(&mut self, h: &LoopHandle, key: usize, outcome: Result<(), Close>) {
        let outcome = outcome.and_then(|()| {
            let c = &self.clients[key];
            if c.eof && c.in_flight == 0 && c.tx.is_empty() {
                Err(Close::Gone("disconnected".into()))
            } else {
                Ok(())
            }
        });
        match outcome {
            Ok(()) => self.refresh_interest(h, key),
            Err(why) => {
                self.close(key, why);
                self.check_limits(h);
            }
        }
        self.resume_paused(h);
    }

    /// Reserves from the input budget what client `key`'s frame needs beyond
    /// [`UNBUDGETED_INPUT`], releasing what it no longer needs. Returns false (and holds no
    /// reservation) when the budget has no room for it.
    fn reserve_input(&mut self, key: usize) -> bool {
        let budget = self.config.max_buffered_input;
        let c = &mut self.clients[key];
        let need = c
            .reader
            .pending_frame_len()
            .map_or(0, |len| len.saturating_sub(UNBUDGETED_INPUT));
        let others = self.rx_total - c.rx_charged;
        let fits = others + need <= budget;
        c.rx_charged = if fits { need } else { 0 };
        self.rx_total = others + c.rx_charged;
        fits
    }

    /// Reads again from clients paused for the input budget whose reservation now fits, in
    /// the order they were paused.
    fn resume_paused(&mut self, h: &LoopHandle) {
        if self.rx_paused.is_empty() || self.rx_total >= self.config.max_buffered_input {
            return;
        }
        let mut still = Vec::new();
        for (key, uid) in std::mem::take(&mut self.rx_paused) {
            if self.clients.get(key).is_none_or(|c| c.uid != uid) {
                continue;
            }
            if self.reserve_input(key) {
                self.clients[key].rx_paused = false;
                // The watch's level trigger reports the data still waiting in the socket.
                self.refresh_interest(h, key);
            } else {
                still.push((key, uid));
            }
        }
        self.rx_paused = still;
    }

    fn throttled(&self, c: &Client) -> bool {
        c.in_flight >= self.config.max_client_requests
    }

    /// Reads what the socket has (a bounded number of reads) and dispatches whole frames.
    fn read_in(&mut self, key: usize) -> Result<(), Close> {
        for _ in 0..16 {
            let c = &self.clients[key];
            if c.in_flight >= self.config.max_client_requests
                || self.shutting_down
                || c.eof
                || c.rx_paused
            {
                return Ok(());
            }
            if !self.reserve_input(key) {
                let c = &mut self.clients[key];
                c.rx_paused = true;
                self.rx_paused.push((key, c.uid));
                tracing::debug!(peer = %c.peer, uid = c.uid, buffered = c.reader.buffered(),
                    "input budget spent: reading paused");
                return Ok(());
            }
            let c = &mut self.clients[key];
            match c.reader.read_from(&mut c.stream) {
                Ok(0) => {
                    // The peer shut its side down (or closed): answer what it sent, then
                    // close, as libvirt does for a client that stops sending.
                    c.eof = true;
                    let partial = c.reader.buffered();
                    tracing::debug!(peer = %c.peer, uid = c.uid, partial,
                        in_flight = c.in_flight, "end of input");
                    return self.dispatch_frames(key);
                }
                Ok(_) => {
                    c.last_rx = Instant::now();
                    c.pings_left = self.config.keepalive_count;
                    let more = c.reader.filled_last_read();
                    self.dispatch_frames(key)?;
                    if !more {
                        // Drained: readiness reports the next bytes; no read to hear EAGAIN.
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(Close::Dropped(e.to_string()));
                }
                Err(e) => return Err(Close::Gone(e.to_string())),
            }
        }
        Ok(())
    }

    /// Hands every buffered whole frame on, until the client is throttled.
    fn dispatch_frames(&mut self, key: usize) -> Result<(), Close> {
        loop {
            let max = self.config.max_client_requests;
            let c = &mut self.clients[key];
            if c.in_flight >= max && !self.shutting_down {
                return Ok(());
            }
            let frame = match c.reader.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Close::Dropped(e.to_string())),
            };
            // The next frame may need less of the budget (or more: then the next read asks).
            self.reserve_input(key);
            self.dispatch(key, frame)?;
        }
    }

    fn dispatch(&mut self, key: usize, frame: Frame) -> Result<(), Close> {
        let h = &frame.header;
        if h.program == KEEPALIVE_PROGRAM {
            if h.is_keepalive(KEEPALIVE_PING) {
                let pong = proto::encode_frame(&Header::keepalive(KEEPALIVE_PONG), &[]);
                self.queue(key, pong, false)?;
            }
            // PONG (and anything else of the keepalive program) only proves the peer is alive.
            return Ok(());
        }
        self.summary.calls_received += 1;
        self.counters.calls_received.fetch_add(1, SeqCst);
        if self.clients[key].admin {
            // Counted like any call: every call received gets one reply.
            return self.dispatch_admin(key, &frame);
        }
        let refuse = if h.kind != kind::CALL {
            Some(format!("unexpected message type {}", h.kind))
        } else if h.program != PROGRAM || h.version != VERSION {
            Some(format!(
                "cannot find program {:#x} version {}",
                h.program, h.version
            ))
        } else if Procedure::from_u32(h.procedure).is_none()
            && !(self.config.test_procedures && h.procedure == TEST_PANIC_PROCEDURE)
        {
            Some(format!("unknown procedure: {}", h.procedure))
        } else if h.procedure == Procedure::SetLimits as u32 && !self.config.allow_set_limits {
            Some(
                "SET_LIMITS is not allowed on this server (start it with --allow-set-limits)"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(why) = refuse {
            let reply = proto::encode_frame(&h.reply(status::ERROR), why.as_bytes());
            // Answered at once; counted like any reply so throttling and shutdown see it.
            self.clients[key].in_flight += 1;
            return self.queue(key, reply, true);
        }
        let header = *h;
        let priority = Procedure::from_u32(header.procedure).is_some_and(Procedure::is_priority);
        let c = &mut self.clients[key];
        c.in_flight += 1;
        let uid = c.uid;
        // One reference count for everything a job needs (each count is a cache line that the
        // loop and the workers would otherwise pass back and forth).
        let ctx = Arc::clone(&self.ctx);
        let job = move || {
            let reply = match catch_unwind(AssertUnwindSafe(|| execute(&frame, &ctx))) {
                Ok(reply) => reply,
                Err(_) => proto::encode_frame(
                    &header.reply(status::ERROR),
                    b"internal error: the procedure panicked",
                ),
            };
            if ctx.completions.push(Completion { key, uid, reply }) {
                let weak = ctx.state.clone();
                // An error means the loop is gone, and the replies with it.
                let _ = ctx.handle.invoke(move |h| {
                    if let Some(state) = weak.upgrade() {
                        let _ = state.with(|st| st.drain_completions(h));
                    }
                });
            }
        };
        let submitted = if priority {
            self.pool.submit_priority(job)
        } else {
            self.pool.try_submit(job)
        };
        match submitted {
            Ok(()) => Ok(()),
            Err(SubmitError::Full(_) | SubmitError::Closed(_)) => {
                let reply = proto::encode_frame(&header.reply(status::ERROR), b"server busy");
                self.queue(key, reply, true)
            }
        }
    }

    /// Workers' replies arrive on the loop thread: queue each on its client, then write each
    /// client's queue once.
    fn drain_completions(&mut self, h: &LoopHandle) {
        let batch = self.ctx.completions.take();
        let mut touched = Vec::new();
        for Completion { key, uid, reply } in batch {
            if self.clients.get(key).is_none_or(|c| c.uid != uid) {
                self.summary.replies_dropped += 1;
                continue;
            }
            if self.clients[key].tx.is_empty() {
                touched.push((key, uid));
            }
            if let Err(why) = self.queue(key, reply, true) {
                self.close(key, why);
                self.check_limits(h);
            }
        }
        for (key, uid) in touched {
            if self.clients.get(key).is_none_or(|c| c.uid != uid) {
                continue;
            }
            let outcome = self.write_out(key);
            self.settle(h, key, outcome);
        }
    }

    fn queue(&mut self, key: usize, bytes: Vec<u8>, tracked: bool) -> Result<(), Close> {
        let cap = self.config.max_queued_reply_bytes;
        let c = &mut self.clients[key];
        if !c.tx.is_empty() && c.tx_bytes + bytes.len() > cap {
            return Err(Close::Dropped(format!(
                "client does not read its replies ({} bytes queued, limit {cap})",
                c.tx_bytes
            )));
        }
        c.tx_bytes += bytes.len();
        c.tx.push_back(Outgoing { bytes, tracked });
        Ok(())
    }

    /// Writes queued replies, several per system call, until the socket would block.
    fn write_out(&mut self, key: usize) -> Result<(), Close> {
        let mut finished_tracked = 0;
        let result = {
            let c = &mut self.clients[key];
            loop {
                if c.tx.is_empty() {
                    break Ok(());
                }
                let slices: Vec<IoSlice<'_>> =
                    c.tx.iter()
                        .take(64)
                        .enumerate()
                        .map(|(i, o)| {
                            IoSlice::new(if i == 0 {
                                &o.bytes[c.tx_offset..]
                            } else {
                                &o.bytes
                            })
                        })
                        .collect();
                match c.stream.write_vectored(&slices) {
                    Ok(mut n) => {
                        while n > 0 {
                            let front = c.tx.front().expect("bytes written belong to a reply");
                            let left = front.bytes.len() - c.tx_offset;
                            if n < left {
                                c.tx_offset += n;
                                break;
                            }
                            n -= left;
                            let done = c.tx.pop_front().expect("front exists");
                            c.tx_bytes -= done.bytes.len();
                            c.tx_offset = 0;
                            if done.tracked {
                                c.in_flight -= 1;
                                finished_tracked += 1;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(Close::Gone(e.to_string())),
                }
            }
        };
        self.summary.replies_sent += finished_tracked;
        self.counters
            .replies_sent
            .fetch_add(finished_tracked, SeqCst);
        result?;
        if finished_tracked > 0 {
            // Room below the throttle: frames already buffered go first.
            self.dispatch_frames(key)?;
        }
        Ok(())
    }

    fn refresh_interest(&mut self, h: &LoopHandle, key: usize) {
        let c = &self.clients[key];
        let reading = !self.shutting_down && !self.throttled(c) && !c.eof && !c.rx_paused;
        let c = &mut self.clients[key];
        let mut want = Events::empty();
        if reading {
            want |= Events::READABLE;
        }
        if !c.tx.is_empty() {
            want |= Events::WRITABLE;
        }
        if want != c.interest {
            c.interest = want;
            let _ = h.update_handle(c.watch, want);
        }
    }

    fn close(&mut self, key: usize, why: Close) {
        let Some(c) = self.clients.try_remove(key) else {
            return;
        };
        self.rx_total -= c.rx_charged;
        let _ = self.handle.remove_handle(c.watch);
        match why {
            Close::Gone(why) => tracing::debug!(peer = %c.peer, uid = c.uid, %why, "client closed"),
            Close::Dropped(why) => {
                self.summary.clients_dropped += 1;
                tracing::warn!(peer = %c.peer, uid = c.uid, %why, "client dropped");
            }
        }
        self.counters.clients.store(self.clients.len(), SeqCst);
        // The stream closes here, after its watch was removed.
        drop(c);
    }

    fn keepalive(&mut self, h: &LoopHandle) {
        let Some(interval) = self.config.keepalive_interval else {
            return;
        };
        let now = Instant::now();
        for (_, c) in self.clients.iter_mut() {
            if c.awaiting_replies() || c.rx_paused {
                // Not read while it waits on the server: its pongs cannot be seen, and time
                // spent so does not count against it.
                c.last_rx = now;
                c.pings_left = self.config.keepalive_count;
            }
        }
        let keys: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_rx) >= interval)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let c = &mut self.clients[key];
            if c.pings_left == 0 {
                self.close(
                    key,
                    Close::Dropped("connection closed due to keepalive timeout".into()),
                );
                self.check_limits(h);
                continue;
            }
            c.pings_left -= 1;
            c.last_rx = now;
            let ping = proto::encode_frame(&Header::keepalive(KEEPALIVE_PING), &[]);
            let outcome = self
                .queue(key, ping, false)
                .and_then(|()| self.write_out(key));
            self.settle(h, key, outcome);
        }
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        tracing::info!(clients = self.clients.len(), "shutting down");
        for (_, watch) in self.listeners.drain(..).collect::<Vec<_>>() {
            let _ = self.handle.remove_handle(watch);
        }
        if let Some(t) = self.keepalive_timer.take() {
            let _ = self.handle.remove_timeout(t);
        }
        if let Some(t) = self.emfile_timer.take() {
            let _ = self.handle.remove_timeout(t);
        }
        let h = self.handle.clone();
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            // Calls already received are answered; nothing more is read.
            match self.dispatch_frames(key) {
                Ok(()) => self.refresh_interest(&h, key),
                Err(why) => self.close(key, why),
            }
        }
    }

    /// Whether no call is left in the workers (replies may still wait to be written).
    fn all_answered(&self) -> bool {
        self.clients
            .iter()
            .all(|(_, c)| c.in_flight == c.tx.iter().filter(|o| o.tracked).count())
    }

    fn quiet(&self) -> bool {
        self.clients
            .iter()
            .all(|(_, c)| c.in_flight == 0 && c.tx.is_empty())
    }
}

/// The peer's uid, gid and pid (`SO_PEERCRED`) of a Unix stream.
fn peer_cred(stream: &Stream) -> Option<(u32, u32, i32)> {
    match stream {
        Stream::Unix(s) => rustix::net::sockopt::socket_peercred(s)
            .ok()
            .map(|c| (c.uid.as_raw(), c.gid.as_raw(), c.pid.as_raw_nonzero().get())),
        Stream::Tcp(_) => None,
    }
}

/// Whether the peer of a Unix stream has this process's effective uid (`SO_PEERCRED`); a TCP
/// stream never has.
fn same_uid(stream: &Stream) -> bool {
    match stream {
        Stream::Unix(s) => rustix::net::sockopt::socket_peercred(s)
            .is_ok_and(|c| c.uid == rustix::process::geteuid()),
        Stream::Tcp(_) => false,
    }
}

/// A user's name (`getpwuid_r`), or the number when it has none.
fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid_r writes into `pwd` and `buf` (valid for `buf.len()` bytes) and sets
    // `result` to `&pwd` or NULL; `pw_name` then points into `buf`, read before it goes.
    entry_name(uid, |buf, result| unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut found = std::ptr::null_mut();
        let ok = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) == 0
            && !found.is_null();
        *result = ok.then(|| {
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned()
        });
    })
}

/// A group's name (`getgrgid_r`), or the number when it has none.
fn group_name(gid: u32) -> String {
    // SAFETY: as for `getpwuid_r` in `user_name`.
    entry_name(gid, |buf, result| unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut found = std::ptr::null_mut();
        let ok = libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) == 0
            && !found.is_null();
        *result = ok.then(|| {
            std::ffi::CStr::from_ptr(grp.gr_name)
                .to_string_lossy()
                .into_owned()
        });
    })
}

/// Runs a reentrant passwd/group lookup with a buffer; the number when it finds nothing.
fn entry_name(id: u32, lookup: impl FnOnce(&mut [libc::c_char], &mut Option<String>)) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut name = None;
    lookup(&mut buf, &mut name);
    name.unwrap_or_else(|| id.to_string())
}

fn is_fd_exhaustion(errno: i32) -> bool {
    errno == rustix::io::Errno::MFILE.raw_os_error()
        || errno == rustix::io::Errno::NFILE.raw_os_error()
}

/// What a worker needs besides the frame.
struct WorkerCtx {
    state: WeakLoopLocal<State>,
    handle: LoopHandle,
    completions: Completions,
    pool: std::sync::Weak<Pool>,
    counters: Arc<Counters>,
    worker_ceiling: usize,
}

/// Decodes, runs and encodes one call (on a worker thread).
fn execute(frame: &Frame, ctx: &WorkerCtx) -> Vec<u8> {
    let h = &frame.header;
    let ok = |payload: &[u8]| proto::encode_frame(&h.reply(status::OK), payload);
    let err = |msg: &str| proto::encode_frame(&h.reply(status::ERROR), msg.as_bytes());
    let p = &frame.payload;
    match Procedure::from_u32(h.procedure) {
        Some(Procedure::Echo) => ok(p),
        Some(Procedure::Hash) => ok(&proto::fnv1a64(p).to_be_bytes()),
        Some(Procedure::Sleep) => {
            let Ok(ms) = <[u8; 4]>::try_from(p.as_slice()).map(u32::from_be_bytes) else {
                return err("SLEEP takes a u32 number of milliseconds");
            };
            if ms > MAX_SLEEP_MS {
                return err(&format!(
                    "SLEEP of {ms} ms is above the limit of {MAX_SLEEP_MS}"
                ));
            }
            std::thread::sleep(Duration::from_millis(u64::from(ms)));
            ok(&[])
        }
        Some(Procedure::Stats) => {
            let Some(pool) = ctx.pool.upgrade() else {
                return err("server is stopping");
            };
            ok(stats_json(&pool, &ctx.counters).as_bytes())
        }
        Some(Procedure::SetLimits) => {
            let Some(pool) = ctx.pool.upgrade() else {
                return err("server is stopping");
            };
            match decode_limits(p) {
                Err(why) => err(&why),
                Ok(limits) if limits.iter().flatten().any(|&n| n > ctx.worker_ceiling) => {
                    let n = limits.iter().flatten().max().copied().unwrap_or(0);
                    err(&format!(
                        "worker limit {n} is above this server's ceiling of {}",
                        ctx.worker_ceiling
                    ))
                }
                Ok([min, max, prio]) => match pool.set_limits(min, max, prio) {
                    Ok(()) => ok(&[]),
                    Err(e @ (LimitsError::MinAboveMax { .. } | LimitsError::NoWorkers)) => {
                        err(&e.to_string())
                    }
                    Err(e) => err(&format!("cannot change the limits: {e}")),
                },
            }
        }
        None if h.procedure == TEST_PANIC_PROCEDURE => {
            panic!("the test procedure panics on purpose")
        }
        None => err(&format!("unknown procedure: {}", h.procedure)),
    }
}

/// `SET_LIMITS`' payload: three `i64` BE, -1 = unchanged.
fn decode_limits(p: &[u8]) -> Result<[Option<usize>; 3], String> {
    if p.len() != 24 {
        return Err(format!(
            "SET_LIMITS takes 24 bytes (three i64), not {}",
            p.len()
        ));
    }
    let mut out = [None; 3];
    for (i, chunk) in p.chunks_exact(8).enumerate() {
        let v = i64::from_be_bytes(chunk.try_into().expect("8 bytes"));
        out[i] = match v {
            -1 => None,
            v if v < 0 => return Err(format!("limit {v} is negative (only -1, unchanged, is)")),
            v => Some(usize::try_from(v).map_err(|_| format!("limit {v} is too large"))?),
        };
    }
    Ok(out)
}

fn stats_json(pool: &Pool, counters: &Counters) -> String {
    let s = pool.stats();
    serde_json::json!({
        "pool": {
            "min_workers": s.min_workers,
            "max_workers": s.max_workers,
            "workers": s.workers,
            "free_workers": s.free_workers,
            "prio_workers": s.prio_workers,
            "max_prio_workers": s.max_prio_workers,
            "queue_depth": s.queue_depth,
            "prio_queue_depth": s.prio_queue_depth,
            "completed": s.completed,
            "panicked": s.panicked,
            "stolen": s.stolen,
        },
        "loop": {
            "iterations": counters.iterations.load(SeqCst),
            "dispatched": counters.dispatched.load(SeqCst),
            "backend_rebuilds": counters.backend_rebuilds.load(SeqCst),
        },
        "clients": counters.clients.load(SeqCst),
        "calls_received": counters.calls_received.load(SeqCst),
        "replies_sent": counters.replies_sent.load(SeqCst),
    })
    .to_string()
}
