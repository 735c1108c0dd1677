//! `vireo-rpcd`: the RPC server.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use vireo_backends::Choice;
use vireo_rpc::demo::TEST_PANIC_PROCEDURE;
use vireo_rpc::server::{DaemonConfig, ListenAddr, Server, ServerConfig};

/// The vireo RPC server: one event-loop thread for every socket, a worker pool for the calls.
/// SIGINT or SIGTERM stops it gracefully: no new connections or calls, every call already
/// received is answered and its reply flushed, then exit 0. SIGHUP is logged and ignored (the
/// daemon has no configuration file to re-read and logs to stderr). Signals are handled on
/// the event loop itself.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to listen: unix:PATH or tcp:HOST:PORT (repeatable).
    #[arg(long, value_name = "ADDR", default_value = "unix:/tmp/vireo-rpcd.sock")]
    listen: Vec<ListenAddr>,
    /// Event-loop backend: poll, epoll, io-uring, portable or auto.
    #[arg(long, default_value = "auto", env = "VIREO_BACKEND")]
    backend: String,
    /// Workers started at once.
    #[arg(long, default_value_t = 5)]
    min_workers: usize,
    /// Normal workers at most; 0 runs every call on the event-loop thread, with no pool
    /// (then also --prio-workers 0). --min-workers above it is lowered to it.
    #[arg(long, default_value_t = 20)]
    max_workers: usize,
    /// Priority workers (run STATS).
    #[arg(long, default_value_t = 5)]
    prio_workers: usize,
    /// Calls in flight per client before the server stops reading from it.
    #[arg(long, default_value_t = 5)]
    max_client_requests: usize,
    /// Clients at once; at the limit accepting pauses until one leaves.
    #[arg(long, default_value_t = 5000)]
    max_clients: usize,
    /// Largest message in bytes (header and payload), at most 16777216.
    #[arg(long, default_value_t = vireo_rpc::proto::MAX_MESSAGE)]
    max_message_size: usize,
    /// Seconds of silence before a client is pinged; 0 disables keepalive.
    #[arg(long, default_value_t = 5.0)]
    keepalive_interval: f64,
    /// Unanswered pings before a silent client is closed.
    #[arg(long, default_value_t = 5)]
    keepalive_count: u32,
    /// Milliseconds accepting pauses after running out of file descriptors.
    #[arg(long, default_value_t = 5000)]
    accept_retry_ms: u64,
    /// The highest worker count: --min/--max/--prio-workers and the admin socket's
    /// threadpool settings stay at or below it.
    #[arg(long, default_value_t = 64)]
    worker_ceiling: usize,
    /// Bytes of unfinished input buffered for all clients together beyond 128 KiB each;
    /// past it reading pauses (nothing is dropped).
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    max_buffered_input: usize,
    /// The admin socket, for stock virt-admin (libvirt's admin program; only clients of this
    /// daemon's uid are accepted). Default: beside the first unix listen socket, NAME-admin.sock.
    #[arg(long, value_name = "PATH")]
    admin: Option<std::path::PathBuf>,
    /// Serve no admin socket.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    /// The server's name, as virt-admin srv-list shows it.
    #[arg(long, default_value = "vireo")]
    name: String,
    /// Stop (gracefully) after this many seconds with no client connected, as libvirtd's
    /// --timeout; 0 never. virt-admin daemon-timeout changes it at run time.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    timeout: u32,
    /// Answer a procedure that panics (fault-injection tests only).
    #[arg(long, hide = true)]
    enable_test_procedures: bool,
}

fn main() -> anyhow::Result<()> {
    let logging = Logging::init();
    let args = Args::parse();
    let backend: Choice = args.backend.parse()?;
    if args.max_message_size > vireo_rpc::proto::MAX_MESSAGE || args.max_message_size < 24 {
        bail!(
            "--max-message-size must be between 24 and {}",
            vireo_rpc::proto::MAX_MESSAGE
        );
    }
    if !(args.keepalive_interval >= 0.0 && args.keepalive_interval <= 1e9) {
        bail!("--keepalive-interval must be a number of seconds, from 0 to 1e9");
    }
    let admin = if args.no_admin {
        None
    } else {
        args.admin.clone().or_else(|| default_admin(&args.listen))
    };
    let daemon = DaemonConfig {
        backend,
        admin,
        logging: Some(logging),
        timeout: (args.timeout > 0).then(|| Duration::from_secs(u64::from(args.timeout))),
        ..DaemonConfig::default()
    };
    let programs = if args.enable_test_procedures {
        vireo_rpc::demo::program_with_test_procedures()
    } else {
        vireo_rpc::demo::program()
    };
    let config = ServerConfig {
        name: args.name,
        listen: args.listen,
        programs: vec![programs],
        min_workers: args.min_workers,
        max_workers: args.max_workers,
        prio_workers: args.prio_workers,
        max_client_requests: args.max_client_requests,
        max_clients: args.max_clients,
        max_message_size: args.max_message_size,
        keepalive_interval: (args.keepalive_interval > 0.0)
            .then(|| Duration::from_secs_f64(args.keepalive_interval)),
        keepalive_count: args.keepalive_count,
        accept_retry: Duration::from_millis(args.accept_retry_ms),
        worker_ceiling: args.worker_ceiling,
        max_buffered_input: args.max_buffered_input,
        ..ServerConfig::default()
    };
    let server = Server::bind_with(daemon, config).context("cannot start the server")?;
    let stop = server.shutdown_handle();
    let (int, term, hup) = (
        rustix::process::Signal::INT.as_raw(),
        rustix::process::Signal::TERM.as_raw(),
        rustix::process::Signal::HUP.as_raw(),
    );
    server
        .loop_handle()
        .add_signal(&[int, term, hup], move |_, _, info| {
            if info.signal == hup {
                tracing::info!(
                    sender = ?info.pid,
                    "SIGHUP: no configuration file to re-read and logs go to stderr; ignored"
                );
            } else {
                tracing::info!(signal = info.signal, sender = ?info.pid, "stopping");
                stop.shutdown();
            }
        })
        .context("cannot watch SIGINT, SIGTERM and SIGHUP")?;
    if args.enable_test_procedures {
        tracing::warn!(
            procedure = TEST_PANIC_PROCEDURE,
            "test procedures enabled: this one panics"
        );
    }
    // Readiness line for scripts and tests: every address is bound when it is printed.
    for addr in server.local_addrs() {
        say(format_args!(
            "listening on {addr} (backend {})",
            server.backend_name()
        ));
    }
    if let Some(path) = server.admin_path() {
        say(format_args!("admin on unix:{}", path.display()));
    }
    let summary = server.run().context("the event loop failed")?;
    say(format_args!(
        "stopped: {} clients, {} calls received, {} replies sent, {} replies dropped",
        summary.clients_accepted,
        summary.calls_received,
        summary.replies_sent,
        summary.replies_dropped
    ));
    Ok(())
}

/// A line on stdout for scripts; a closed stdout (the reader went away) is not the daemon's
/// failure, so it is ignored rather than a panic.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// `DIR/NAME-admin.sock` beside the first unix listen socket `DIR/NAME.sock`.
fn default_admin(listen: &[ListenAddr]) -> Option<std::path::PathBuf> {
    listen.iter().find_map(|a| match a {
        ListenAddr::Unix(p) => {
            let stem = p.file_stem()?.to_string_lossy().into_owned();
            Some(p.with_file_name(format!("{stem}-admin.sock")))
        }
        ListenAddr::Tcp(_) => None,
    })
}

/// The daemon's logging (stderr), whose filter the admin socket replaces at run time
/// (`virt-admin daemon-log-filters`).
#[derive(Debug)]
struct Logging {
    reload: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    /// The filters as last set through the admin socket (empty: `VIREO_LOG` or `info`).
    filters: std::sync::Mutex<String>,
}

/// What `VIREO_LOG` says, or `info`.
fn default_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// libvirt's filter syntax (`LEVEL:MATCH ...`, levels 1 debug, 2 info, 3 warning, 4 error)
/// as tracing directives: `MATCH` is a tracing target prefix (`vireo_rpc::server`), `*` every
/// target. Anything else is taken as tracing's own directive syntax.
fn directives(filters: &str) -> String {
    let level = |n: &str| match n {
        "1" => Some("debug"),
        "2" => Some("info"),
        "3" => Some("warn"),
        "4" => Some("error"),
        _ => None,
    };
    let mut out = Vec::new();
    for item in filters.split_whitespace() {
        let libvirt = item
            .trim_start_matches('+')
            .split_once(':')
            .and_then(|(n, m)| Some((level(n)?, m)));
        match libvirt {
            Some((lvl, "*")) => out.push(lvl.to_owned()),
            Some((lvl, target)) => out.push(format!("{target}={lvl}")),
            None => out.push(item.to_owned()),
        }
    }
    out.join(",")
}

impl Logging {
    fn init() -> std::sync::Arc<Logging> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let (filter, reload) = tracing_subscriber::reload::Layer::new(default_filter());
        tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
        std::sync::Arc::new(Logging {
            reload,
            filters: std::sync::Mutex::new(String::new()),
        })
    }
}

impl vireo_rpc::server::LoggingControl for Logging {
    fn filters(&self) -> String {
        self.filters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_filters(&self, filters: Option<&str>) -> Result<(), String> {
        let text = filters.unwrap_or("").trim();
        let filter = if text.is_empty() {
            default_filter()
        } else {
            tracing_subscriber::EnvFilter::try_new(directives(text))
                .map_err(|e| format!("bad logging filters {text:?}: {e}"))?
        };
        self.reload
            .reload(filter)
            .map_err(|e| format!("cannot change the logging filters: {e}"))?;
        *self.filters.lock().unwrap_or_else(|e| e.into_inner()) = text.to_owned();
        tracing::info!(filters = text, "logging filters changed");
        Ok(())
    }

    fn outputs(&self) -> String {
        "1:stderr".to_owned()
    }

    fn set_outputs(&self, outputs: Option<&str>) -> Result<(), String> {
        match outputs.map(str::trim) {
            None | Some("") | Some("1:stderr") => Ok(()),
            Some(other) => Err(format!(
                "vireo-rpcd logs to stderr only (outputs {other:?} refused); what it logs is \
                 chosen by the logging filters"
            )),
        }
    }
}
