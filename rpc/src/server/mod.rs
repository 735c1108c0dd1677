//! Daemons in libvirt's shape: a [`Daemon`] runs one event loop and holds named servers; a
//! server has listeners, a worker pool, client limits, keepalive and the
//! programs ([`Program`]) it serves; libvirt's admin program, on a socket of
//! its own, administers them all (what stock `virt-admin` speaks).
//!
//! The loop thread accepts, reads whole frames (incrementally, across any number of reads),
//! answers keepalive, throttles each client at `max_client_requests` calls in flight, and
//! writes replies in the order they complete. Workers only run the procedure's handler, which
//! decodes the payload and encodes the reply; the reply goes back to the loop with
//! [`LoopHandle::invoke`]. Priority procedures go to the pool's priority lane, so a queue of
//! slow calls never delays them. A server configured with no workers
//! ([`ServerConfig::max_workers`] 0) runs each call on the loop thread instead, where it
//! would have handed it to the pool, and queues the reply at once.
//!
//! The parts, one file each: `listener` (bind, accept, the client limit and the EMFILE pause),
//! `connection` (one client's state machine: read, throttle, write, close), `dispatch` (from a
//! frame to its program's handler on a worker and back), and the programs the server itself
//! answers: `keepalive` and `admin_program`. The demo program lives in [`crate::demo`].
//!
//! A daemon of one server, [`Server`]:
//!
//! ```no_run
//! use vireo_rpc::server::{ListenAddr, Server, ServerConfig};
//!
//! let config = ServerConfig {
//!     listen: vec!["unix:/tmp/vireo.sock".parse::<ListenAddr>()?],
//!     ..ServerConfig::default() // serves vireo_rpc::demo::program()
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
//!
//! Several servers on one loop, with an admin socket:
//!
//! ```no_run
//! use vireo_rpc::server::{Daemon, DaemonConfig, ServerConfig};
//!
//! let mut daemon = Daemon::new(DaemonConfig {
//!     admin: Some("/tmp/vireo-admin.sock".into()),
//!     ..DaemonConfig::default()
//! })?;
//! daemon.add_server(ServerConfig {
//!     name: "public".into(),
//!     listen: vec!["unix:/tmp/vireo.sock".parse()?],
//!     ..ServerConfig::default()
//! })?;
//! daemon.add_server(ServerConfig {
//!     name: "local".into(),
//!     listen: vec!["tcp:127.0.0.1:0".parse()?],
//!     min_workers: 1,
//!     ..ServerConfig::default()
//! })?;
//! // virt-admin -c 'libvirtd:///system?socket=/tmp/vireo-admin.sock' srv-list: public, local
//! let summary = daemon.run()?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use slab::Slab;
use vireo_backends::{AnyBackend, Choice};
use vireo_core::{EventLoop, Frequency, LoopHandle, LoopLocal, TimerId, WatchId, WeakLoopLocal};
use vireo_pool::Pool;

mod admin_program;
mod connection;
mod dispatch;
mod keepalive;
mod listener;

use crate::program::Program;
use crate::proto;
use connection::{Client, Close};
use dispatch::WorkerCtx;
use listener::Listener;

pub use crate::demo::TEST_PANIC_PROCEDURE;

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

/// The daemon's settings: what all its servers share.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Which backend runs the event loop.
    pub backend: Choice,
    /// A Unix socket for libvirt's admin program (what stock `virt-admin` speaks: the
    /// daemon's servers, their threadpools, client limits and clients, the logging, the
    /// daemon timeout), served on the daemon's loop: `None` (the default) serves none. Like
    /// libvirtd's, it accepts only clients whose uid (`SO_PEERCRED`) is the daemon's; others
    /// are disconnected at once. It is not one of the listed servers (libvirtd lists its own as
    /// `admin`): its calls run on the loop thread, without a pool to tune.
    pub admin: Option<PathBuf>,
    /// What the admin socket's logging procedures change (`virt-admin daemon-log-filters`,
    /// `daemon-log-outputs`): the program's own logging, which the daemon does not own. `None`
    /// answers them with an error.
    pub logging: Option<Arc<dyn LoggingControl>>,
    /// After shutdown began and every call is answered, how long queued replies may take to
    /// flush before the remaining clients are dropped (10 s).
    pub shutdown_grace: Duration,
    /// libvirtd's `--timeout`: stop (as [`ShutdownHandle::shutdown`] does) after this long
    /// with no client connected to any server or to the admin socket; `None` (the default)
    /// never. `virt-admin daemon-timeout` changes it at run time (0 turns it off).
    pub timeout: Option<Duration>,
}

impl Default for DaemonConfig {
    fn default() -> DaemonConfig {
        DaemonConfig {
            backend: Choice::Auto,
            admin: None,
            logging: None,
            shutdown_grace: Duration::from_secs(10),
            timeout: None,
        }
    }
}

/// One server's settings; the defaults are libvirtd's.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The server's name, as `virt-admin srv-list` shows it (`vireo`); unique in a daemon.
    pub name: String,
    /// Addresses to listen on (at least one).
    pub listen: Vec<ListenAddr>,
    /// The programs served (the default: [`crate::demo::program`]); each number and version
    /// at most once, and none with the keepalive program's number, which the server answers
    /// itself.
    pub programs: Vec<Program>,
    /// Workers started at once (libvirt's `min_workers`, 5); above `max_workers` it is
    /// lowered to `max_workers`, as libvirt does.
    pub min_workers: usize,
    /// Normal workers at most (`max_workers`, 20).
    ///
    /// 0 gives the server no pool: every call runs on the loop thread where it would have
    /// been handed to a worker (once read whole; `max_client_requests` applies as with
    /// workers), and its reply is queued at once; replies queued while a client's input is
    /// read are written right after that read (what the socket does not take waits until it
    /// can). libvirt's server does the same when its pool has no workers. That saves the
    /// hand-off to a worker and back: in `vireo-bench rpc` on a 2-CPU machine (16 and 64
    /// clients, every backend), 64-byte ECHO calls ran 1.5x to 2.2x as fast this way, and
    /// 16 KiB ones 1.2x to 1.8x (BENCHMARKS.md). The price is that a handler holds up every
    /// client of the daemon while it runs: a `SLEEP` of up to 60 s stops the loop, pings,
    /// accepts and shutdown included. `prio_workers` must be 0 too, and the admin socket
    /// cannot switch such a server to a pool or back (libvirt refuses that switch as well).
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
    /// The highest worker count the server uses: `add_server` refuses `min_workers`,
    /// `max_workers` or `prio_workers` above it, and the admin socket's threadpool settings
    /// answer an error for a limit above it (64).
    pub worker_ceiling: usize,
    /// Input the server may buffer for large frames of all its clients together (256 MiB; at
    /// least `max_message_size`). A client whose frame is longer than [`UNBUDGETED_INPUT`]
    /// reserves the rest of that frame from this budget before reading past it; when the
    /// budget has no room, reading from that client pauses until other large frames complete
    /// or their clients leave. Its data waits in its socket and nothing is dropped; a frame
    /// that got its reservation is read to its end without pausing again, as fast as its peer
    /// sends it (a peer that stops sending mid-frame cannot answer a ping, so keepalive, when on,
    /// closes it and its reservation returns); clients sending smaller frames are never held
    /// up. Memory follows the bytes that arrived, not the reservations.
    pub max_buffered_input: usize,
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
            name: "vireo".to_owned(),
            listen: Vec::new(),
            programs: vec![crate::demo::program()],
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
            worker_ceiling: 64,
            max_buffered_input: 256 * 1024 * 1024,
        }
    }
}

impl ServerConfig {
    /// The admin socket's own settings (libvirtd's `admin_*` defaults: 5000 clients, 5 calls
    /// in flight each, keepalive 5 s x 5); it has no pool and no programs of its own.
    fn admin() -> ServerConfig {
        ServerConfig {
            name: "admin".to_owned(),
            programs: Vec::new(),
            min_workers: 0,
            max_workers: 0,
            prio_workers: 0,
            max_message_size: proto::MAX_MESSAGE,
            max_buffered_input: proto::MAX_MESSAGE,
            ..ServerConfig::default()
        }
    }
}

/// What a server did, returned by [`Server::run`] and, per server, by [`Daemon::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerSummary {
    /// Connections accepted.
    pub clients_accepted: u64,
    /// Calls received (whole frames other than keepalive, valid or not).
    pub calls_received: u64,
    /// Replies written completely to their clients.
    pub replies_sent: u64,
    /// Replies dropped because their client had gone.
    pub replies_dropped: u64,
    /// Connections closed for a protocol error, keepalive timeout or an unread reply queue.
    pub clients_dropped: u64,
}

/// What a daemon did, returned by [`Daemon::run`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DaemonSummary {
    /// Each server's, by name, in the order they were added.
    pub servers: Vec<(String, ServerSummary)>,
    /// The admin socket's (its calls are admin calls, counted nowhere else).
    pub admin: ServerSummary,
}

/// A server's counters, read by worker threads.
#[derive(Debug, Default)]
struct Counters {
    clients: AtomicUsize,
    calls_received: AtomicU64,
    replies_sent: AtomicU64,
}

/// The loop's counters, copied after every iteration for worker threads.
#[derive(Debug, Default)]
struct LoopCounters {
    iterations: AtomicU64,
    dispatched: AtomicU64,
    backend_rebuilds: AtomicU64,
}

/// Stops a running daemon gracefully; `Clone + Send + Sync`.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    requested: Arc<AtomicBool>,
    handle: LoopHandle,
}

impl ShutdownHandle {
    /// Stops accepting and reading, finishes the calls already received, flushes their replies
    /// and makes [`Daemon::run`] (or [`Server::run`]) return. Safe from any thread (a
    /// signal-handling thread, say).
    pub fn shutdown(&self) {
        self.requested.store(true, SeqCst);
        // Wakes the loop; an error means the loop is already gone.
        let _ = self.handle.invoke(|_| {});
    }
}

/// The daemon's state: only the loop thread reaches it (no lock).
type Shared = LoopLocal<State>;

struct State {
    me: WeakLoopLocal<State>,
    handle: LoopHandle,
    /// The named servers in the order they were added, then the admin socket's, if any.
    servers: Vec<Srv>,
    clients: Slab<Client>,
    next_uid: u64,
    shutting_down: bool,
    logging: Option<Arc<dyn LoggingControl>>,
    requested: Arc<AtomicBool>,
    /// The daemon timeout, and the timer running while no client is connected.
    timeout: Option<Duration>,
    idle_timer: Option<TimerId>,
}

/// One server on the loop thread.
struct Srv {
    config: ServerConfig,
    /// The admin socket: its clients speak libvirt's admin program, answered on the loop.
    admin: bool,
    /// `None` for the admin socket and for a server whose calls run on the loop thread
    /// (`max_workers` 0).
    pool: Option<Arc<Pool>>,
    ctx: Option<Arc<WorkerCtx>>,
    counters: Arc<Counters>,
    listeners: Vec<(Listener, WatchId)>,
    accepting: bool,
    emfile_timer: Option<TimerId>,
    keepalive_timer: Option<TimerId>,
    /// Clients of this server now.
    nclients: usize,
    summary: ServerSummary,
    /// Sum of its clients' `rx_charged`: the input budget in use.
    rx_total: usize,
    /// Its clients paused for the input budget, as `(key, uid)`.
    rx_paused: Vec<(usize, u64)>,
}

/// A running event loop with named servers and, optionally, libvirt's admin socket: libvirt's
/// `virNetDaemon`. Build it, [`add_server`](Daemon::add_server) each server, then
/// [`run`](Daemon::run) it on the thread that built it.
pub struct Daemon {
    event_loop: EventLoop<AnyBackend>,
    state: Shared,
    pools: Vec<Arc<Pool>>,
    loop_counters: Arc<LoopCounters>,
    servers: Vec<(String, Vec<ListenAddr>)>,
    admin_path: Option<PathBuf>,
    shutdown_grace: Duration,
    requested: Arc<AtomicBool>,
}

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon")
            .field("backend", &self.event_loop.backend_name())
            .field("servers", &self.servers)
            .field("admin", &self.admin_path)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts the event loop and binds the admin socket, when `config` asks for one.
    ///
    /// # Errors
    ///
    /// The error of a backend that cannot start or of the admin socket's bind (`AddrInUse`
    /// when a running daemon answers on it).
    pub fn new(config: DaemonConfig) -> io::Result<Daemon> {
        let event_loop = EventLoop::with_backend(AnyBackend::with_choice(config.backend)?)?;
        let handle = event_loop.handle().clone();
        let loop_counters = Arc::new(LoopCounters::default());
        let requested = Arc::new(AtomicBool::new(false));
        let admin = match &config.admin {
            Some(path) => Some(Listener::bind(&ListenAddr::Unix(path.clone()))?.0),
            None => None,
        };
        let state = handle.local_cyclic(|me| State {
            me: me.clone(),
            handle: handle.clone(),
            servers: Vec::new(),
            clients: Slab::new(),
            next_uid: 1,
            shutting_down: false,
            logging: config.logging.clone(),
            requested: Arc::clone(&requested),
            timeout: config.timeout.filter(|t| !t.is_zero()),
            idle_timer: None,
        });
        let mut event_loop = event_loop;
        if let Some(listener) = admin {
            event_loop
                .with_local(&state, |st| {
                    st.add_srv(ServerConfig::admin(), true, None, None, vec![listener])
                })
                .map_err(io::Error::from)??;
        }
        if let Some(path) = &config.admin {
            tracing::info!(admin = %path.display(), "admin socket");
        }
        Ok(Daemon {
            event_loop,
            state,
            pools: Vec::new(),
            loop_counters,
            servers: Vec::new(),
            admin_path: config.admin,
            shutdown_grace: config.shutdown_grace,
            requested,
        })
    }

    /// Starts a server's pool, binds its listen addresses and serves its programs on the
    /// daemon's loop; returns the addresses bound (with the ports picked for `tcp:…:0`).
    /// A server with `max_workers` 0 gets no pool: its calls run on the loop thread (see
    /// [`ServerConfig::max_workers`]).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a config without an address, with an empty name or one already
    /// used, with `max_workers` 0 and `prio_workers` above 0, worker counts above
    /// `worker_ceiling`, `max_client_requests`/`max_clients` 0, `max_buffered_input` below
    /// `max_message_size`, or two programs with one number and version (or one with the
    /// keepalive program's number); the error of a bind or of a worker thread that cannot be
    /// spawned.
    pub fn add_server(&mut self, config: ServerConfig) -> io::Result<&[ListenAddr]> {
        let invalid = |why: String| Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        if config.name.is_empty() {
            return invalid("a server needs a name".into());
        }
        if self.servers.iter().any(|(n, _)| *n == config.name) {
            return invalid(format!("a server named {:?} already exists", config.name));
        }
        if config.listen.is_empty() {
            return invalid("no address to listen on".into());
        }
        if config.max_client_requests == 0 || config.max_clients == 0 {
            return invalid("max_client_requests and max_clients must be at least 1".into());
        }
        if config.max_buffered_input < config.max_message_size {
            return invalid(
                "max_buffered_input must hold at least one message of max_message_size".into(),
            );
        }
        for (i, p) in config.programs.iter().enumerate() {
            if p.number() == proto::KEEPALIVE_PROGRAM {
                return invalid(format!(
                    "program {:#x} is the keepalive program, which the server answers itself",
                    p.number()
                ));
            }
            if config.programs[..i]
                .iter()
                .any(|q| (q.number(), q.version()) == (p.number(), p.version()))
            {
                return invalid(format!(
                    "program {:#x} version {} is given twice",
                    p.number(),
                    p.version()
                ));
            }
        }
        let most = config
            .min_workers
            .max(config.max_workers)
            .max(config.prio_workers);
        if most > config.worker_ceiling {
            return invalid(format!(
                "{most} workers is above the worker ceiling of {} (raise it: worker_ceiling, \
                 vireo-rpcd --worker-ceiling)",
                config.worker_ceiling
            ));
        }
        let pool = if config.max_workers == 0 {
            if config.prio_workers > 0 {
                return invalid(
                    "a server with max_workers 0 runs every call on the loop thread and has no \
                     pool: prio_workers must be 0 too"
                        .into(),
                );
            }
            None
        } else {
            let pool = Pool::builder()
                .min_workers(config.min_workers)
                .max_workers(config.max_workers)
                .prio_workers(config.prio_workers)
                .name("vireo-rpc")
                .build()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            Some(Arc::new(pool))
        };
        let mut bound = Vec::new();
        let mut local = Vec::new();
        for addr in &config.listen {
            let (listener, addr) = Listener::bind(addr)?;
            bound.push(listener);
            local.push(addr);
        }
        let name = config.name.clone();
        let (pool2, loop_counters) = (pool.clone(), Arc::clone(&self.loop_counters));
        self.event_loop
            .with_local(&self.state, |st| {
                let counters = Arc::new(Counters::default());
                let ctx = Arc::new(WorkerCtx {
                    name: config.name.clone(),
                    server: st.servers.len(),
                    state: st.me.clone(),
                    handle: st.handle.clone(),
                    completions: Default::default(),
                    pool: pool2.as_ref().map(Arc::downgrade),
                    counters: Arc::clone(&counters),
                    loop_counters,
                    programs: config.programs.clone(),
                });
                st.add_srv(config, false, pool2, Some((ctx, counters)), bound)
            })
            .map_err(io::Error::from)??;
        for addr in &local {
            tracing::info!(server = %name, %addr, backend = self.event_loop.backend_name(), "listening");
        }
        self.pools.extend(pool);
        self.servers.push((name, local));
        Ok(&self.servers.last().expect("just added").1)
    }

    /// The servers' names, in the order they were added.
    pub fn server_names(&self) -> impl Iterator<Item = &str> {
        self.servers.iter().map(|(n, _)| n.as_str())
    }

    /// The addresses server `name` listens on; `None` when there is no such server.
    pub fn local_addrs(&self, name: &str) -> Option<&[ListenAddr]> {
        self.servers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_slice())
    }

    /// The admin socket's path, when [`DaemonConfig::admin`] asked for one.
    pub fn admin_path(&self) -> Option<&std::path::Path> {
        self.admin_path.as_deref()
    }

    /// The name of the backend running the loop.
    pub fn backend_name(&self) -> &'static str {
        self.event_loop.backend_name()
    }

    /// The handle of the daemon's event loop, for sources of the program's own on the same
    /// loop (signals, timers, child processes): `vireo-rpcd` handles its signals this way.
    pub fn loop_handle(&self) -> &LoopHandle {
        self.event_loop.handle()
    }

    /// A handle that stops the daemon gracefully from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            requested: Arc::clone(&self.requested),
            handle: self.event_loop.handle().clone(),
        }
    }

    /// Serves until [`ShutdownHandle::shutdown`] (or the daemon timeout), then finishes the
    /// calls already received, flushes their replies (for at most `shutdown_grace` once every
    /// call is answered), drains the pools and returns what each server did.
    ///
    /// # Errors
    ///
    /// An error of the event loop's backend.
    pub fn run(mut self) -> io::Result<DaemonSummary> {
        self.event_loop
            .with_local(&self.state, State::update_idle_timer)
            .map_err(io::Error::from)?;
        let mut grace_until: Option<Option<Instant>> = None;
        loop {
            if self.requested.load(SeqCst) {
                let grace = self.shutdown_grace;
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
                            let until =
                                *grace_until.get_or_insert(Instant::now().checked_add(grace));
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
            if grace_until.is_some() {
                self.event_loop
                    .run_once_timeout(Duration::from_millis(50))?;
            } else {
                self.event_loop.run_once()?;
            }
            let stats = self.event_loop.stats();
            let c = &self.loop_counters;
            c.iterations.store(stats.iterations, SeqCst);
            c.dispatched.store(stats.dispatched, SeqCst);
            let rebuilds = c.backend_rebuilds.swap(stats.backend_rebuilds, SeqCst);
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
                let mut summary = DaemonSummary::default();
                for srv in &st.servers {
                    if srv.admin {
                        summary.admin = srv.summary;
                    } else {
                        summary.servers.push((srv.config.name.clone(), srv.summary));
                    }
                }
                summary
            })
            .map_err(io::Error::from)?;
        for pool in &self.pools {
            pool.drain();
        }
        // Run the removals so every callback's state is dropped before the loop goes.
        let _ = self.event_loop.run_once_timeout(Duration::ZERO);
        for (name, s) in &summary.servers {
            tracing::info!(server = %name, calls = s.calls_received, replies = s.replies_sent, "stopped");
        }
        Ok(summary)
    }
}

/// A daemon of one server: [`Daemon`] with the server's addresses and summary at hand.
pub struct Server {
    daemon: Daemon,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("backend", &self.daemon.backend_name())
            .field("listen", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A daemon with [`DaemonConfig::default`] (automatic backend, no admin socket) serving
    /// one server.
    ///
    /// # Errors
    ///
    /// As [`Daemon::new`] and [`Daemon::add_server`].
    pub fn bind(config: ServerConfig) -> io::Result<Server> {
        Server::bind_with(DaemonConfig::default(), config)
    }

    /// A daemon with `daemon`'s settings serving one server.
    ///
    /// # Errors
    ///
    /// As [`Daemon::new`] and [`Daemon::add_server`].
    pub fn bind_with(daemon: DaemonConfig, config: ServerConfig) -> io::Result<Server> {
        let mut daemon = Daemon::new(daemon)?;
        daemon.add_server(config)?;
        Ok(Server { daemon })
    }

    /// The daemon around the server.
    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.daemon.servers[0].0
    }

    /// The admin socket's path, when [`DaemonConfig::admin`] asked for one.
    pub fn admin_path(&self) -> Option<&std::path::Path> {
        self.daemon.admin_path()
    }

    /// The addresses the server listens on, with the ports picked for `tcp:…:0`.
    pub fn local_addrs(&self) -> &[ListenAddr] {
        &self.daemon.servers[0].1
    }

    /// The name of the backend running the loop.
    pub fn backend_name(&self) -> &'static str {
        self.daemon.backend_name()
    }

    /// As [`Daemon::loop_handle`].
    pub fn loop_handle(&self) -> &LoopHandle {
        self.daemon.loop_handle()
    }

    /// A handle that stops the server gracefully from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.daemon.shutdown_handle()
    }

    /// As [`Daemon::run`]; returns what the server did (the admin socket's calls are not
    /// counted).
    ///
    /// # Errors
    ///
    /// An error of the event loop's backend.
    pub fn run(self) -> io::Result<ServerSummary> {
        let summary = self.daemon.run()?;
        Ok(summary.servers.first().map(|(_, s)| *s).unwrap_or_default())
    }
}

impl State {
    /// Adds a server whose listeners are bound: watches them, starts its keepalive timer.
    fn add_srv(
        &mut self,
        config: ServerConfig,
        admin: bool,
        pool: Option<Arc<Pool>>,
        ctx: Option<(Arc<WorkerCtx>, Arc<Counters>)>,
        bound: Vec<Listener>,
    ) -> io::Result<()> {
        let index = self.servers.len();
        let strong = self
            .me
            .upgrade()
            .ok_or_else(|| io::Error::other("the daemon is gone"))?;
        let h = self.handle.clone();
        let (ctx, counters) = match ctx {
            Some((ctx, counters)) => (Some(ctx), counters),
            None => (None, Arc::new(Counters::default())),
        };
        let mut srv = Srv {
            config,
            admin,
            pool,
            ctx,
            counters,
            listeners: Vec::new(),
            accepting: true,
            emfile_timer: None,
            keepalive_timer: None,
            nclients: 0,
            summary: ServerSummary::default(),
            rx_total: 0,
            rx_paused: Vec::new(),
        };
        let undo = |h: &LoopHandle, srv: &Srv| {
            for (_, w) in &srv.listeners {
                let _ = h.remove_handle(*w);
            }
            if let Some(t) = srv.keepalive_timer {
                let _ = h.remove_timeout(t);
            }
        };
        for (i, listener) in bound.into_iter().enumerate() {
            let state = strong.clone();
            let added = h.add_handle(
                listener.fd(),
                vireo_core::Events::READABLE,
                move |h, _, _, _| {
                    let _ = state.with(|st| st.accept_from(h, index, i));
                },
            );
            match added {
                Ok(watch) => srv.listeners.push((listener, watch)),
                Err(e) => {
                    undo(&h, &srv);
                    return Err(e.into());
                }
            }
        }
        if let Some(interval) = srv.config.keepalive_interval {
            let state = strong.clone();
            let period = Frequency::Period(interval.max(Duration::from_millis(1)));
            match h.add_timeout(period, move |h, _| {
                let _ = state.with(|st| st.keepalive(h, index));
            }) {
                Ok(t) => srv.keepalive_timer = Some(t),
                Err(e) => {
                    undo(&h, &srv);
                    return Err(e.into());
                }
            }
        }
        self.servers.push(srv);
        Ok(())
    }

    /// Keeps the daemon-timeout timer running exactly while no client is connected (and the
    /// daemon is not stopping).
    fn update_idle_timer(&mut self) {
        let idle = self.clients.is_empty() && !self.shutting_down;
        match (idle, self.timeout, self.idle_timer) {
            (true, Some(timeout), None) => {
                let Some(state) = self.me.upgrade() else {
                    return;
                };
                let timer = self
                    .handle
                    .add_timeout(Frequency::Period(timeout), move |h, id| {
                        let _ = h.remove_timeout(id);
                        let _ = state.with(|st| {
                            st.idle_timer = None;
                            if st.clients.is_empty() {
                                tracing::info!(
                                    timeout_s = timeout.as_secs_f64(),
                                    "no client for the daemon timeout: stopping"
                                );
                                st.requested.store(true, SeqCst);
                            }
                        });
                    });
                self.idle_timer = timer.ok();
            }
            (false, _, Some(id)) | (_, None, Some(id)) => {
                let _ = self.handle.remove_timeout(id);
                self.idle_timer = None;
            }
            _ => {}
        }
    }

    /// `virt-admin daemon-timeout`: a new timeout (0: none), counted from now when idle.
    fn set_timeout(&mut self, timeout: Option<Duration>) {
        if let Some(id) = self.idle_timer.take() {
            let _ = self.handle.remove_timeout(id);
        }
        self.timeout = timeout.filter(|t| !t.is_zero());
        self.update_idle_timer();
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        tracing::info!(clients = self.clients.len(), "shutting down");
        let h = self.handle.clone();
        for srv in &mut self.servers {
            for (_, watch) in srv.listeners.drain(..) {
                let _ = h.remove_handle(watch);
            }
            for t in [srv.keepalive_timer.take(), srv.emfile_timer.take()]
                .into_iter()
                .flatten()
            {
                let _ = h.remove_timeout(t);
            }
        }
        self.update_idle_timer();
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
