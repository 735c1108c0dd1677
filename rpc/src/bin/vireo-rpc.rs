//! `vireo-rpc`: calls, administration and load against a vireo RPC server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use vireo_backends::Choice;
use vireo_rpc::client::Client;
use vireo_rpc::load::{LoadConfig, LoadReport, run_load};
use vireo_rpc::proto::Procedure;
use vireo_rpc::server::ListenAddr;

/// Client of the vireo RPC server: single calls, administration through libvirt's admin protocol, and a
/// load generator that drives many connections from one vireo event-loop thread.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The server: unix:PATH or tcp:HOST:PORT.
    #[arg(long, global = true, default_value = "unix:/tmp/vireo-rpcd.sock")]
    connect: ListenAddr,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make one call and print the reply.
    #[command(subcommand)]
    Call(Call),
    /// Administer a daemon through libvirt's admin protocol (virt-admin's) on its admin socket:
    /// vireo-rpcd's (by default NAME-admin.sock beside --connect's unix socket) or libvirtd's
    /// (`$XDG_RUNTIME_DIR/libvirt/libvirt-admin-sock`, /run/libvirt/libvirt-admin-sock). The
    /// daemon accepts only clients of its own uid.
    Admin(AdminArgs),
    /// Drive the server with many connections and report throughput and latency.
    Load(LoadArgs),
}

#[derive(Debug, Subcommand)]
enum Call {
    /// ECHO: the server sends the text back.
    Echo {
        /// The payload.
        text: String,
    },
    /// SLEEP: a slow call that occupies a worker for MS milliseconds (at most 60000).
    Sleep {
        /// Milliseconds.
        ms: u32,
    },
    /// HASH: the FNV-1a-64 hash of the text, computed by a worker.
    Hash {
        /// The payload.
        text: String,
    },
    /// STATS: pool, loop and client statistics as JSON.
    Stats,
}

#[derive(Debug, Args)]
struct AdminArgs {
    /// The admin socket (default: NAME-admin.sock beside --connect's unix:DIR/NAME.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// The daemon's version.
    Version,
    /// The daemon's servers.
    SrvList,
    /// A server's worker pool (virt-admin srv-threadpool-info).
    SrvThreadpoolInfo {
        /// The server (vireo-rpcd: vireo; libvirtd: libvirtd or admin).
        #[arg(default_value = "vireo")]
        server: String,
    },
    /// Changes a server's worker pool; the limits not given stay (virt-admin
    /// srv-threadpool-set). Prints the pool afterwards.
    SrvThreadpoolSet {
        /// The server.
        #[arg(default_value = "vireo")]
        server: String,
        /// Workers kept at all times.
        #[arg(long)]
        min_workers: Option<u32>,
        /// Normal workers at most.
        #[arg(long)]
        max_workers: Option<u32>,
        /// Priority workers.
        #[arg(long)]
        prio_workers: Option<u32>,
    },
    /// Sets the daemon's auto-shutdown timeout: it stops after this many seconds with no
    /// client connected; 0 never (virt-admin daemon-timeout).
    DaemonTimeout {
        /// Seconds.
        timeout: u32,
    },
    /// A server's client limits (virt-admin srv-clients-info).
    SrvClientsInfo {
        /// The server.
        #[arg(default_value = "vireo")]
        server: String,
    },
}

fn admin(connect: &ListenAddr, args: AdminArgs) -> anyhow::Result<()> {
    use vireo_rpc::xdr::Value;
    let socket = match args.socket {
        Some(p) => p,
        None => match connect {
            ListenAddr::Unix(p) => {
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                p.with_file_name(format!("{stem}-admin.sock"))
            }
            ListenAddr::Tcp(_) => {
                bail!("--connect is a tcp address: give the admin socket with --socket")
            }
        },
    };
    let mut admin = vireo_rpc::admin::AdminClient::connect(&socket)
        .with_context(|| format!("cannot open the admin connection on {}", socket.display()))?;
    let print = |params: Vec<vireo_rpc::xdr::TypedParam>| {
        for p in params {
            let value = match p.value {
                Value::Int(v) => v.to_string(),
                Value::UInt(v) => v.to_string(),
                Value::LLong(v) => v.to_string(),
                Value::ULLong(v) => v.to_string(),
                Value::Double(v) => v.to_string(),
                Value::Boolean(v) => if v { "yes" } else { "no" }.to_owned(),
                Value::String(v) => v,
            };
            println!("{:<15}: {value}", p.field);
        }
    };
    match args.command {
        AdminCommand::Version => {
            let v = admin.lib_version()?;
            println!(
                "Running against daemon: {}.{}.{}",
                v / 1_000_000,
                (v / 1000) % 1000,
                v % 1000
            );
        }
        AdminCommand::SrvList => {
            for (i, name) in admin.list_servers()?.iter().enumerate() {
                println!("{i:>2}  {name}");
            }
        }
        AdminCommand::SrvThreadpoolInfo { server } => print(admin.threadpool_parameters(&server)?),
        AdminCommand::SrvThreadpoolSet {
            server,
            min_workers,
            max_workers,
            prio_workers,
        } => {
            if min_workers.is_none() && max_workers.is_none() && prio_workers.is_none() {
                bail!("give at least one of --min-workers, --max-workers, --prio-workers");
            }
            admin.set_threadpool_parameters(&server, min_workers, max_workers, prio_workers)?;
            print(admin.threadpool_parameters(&server)?);
        }
        AdminCommand::SrvClientsInfo { server } => print(admin.client_limits(&server)?),
        AdminCommand::DaemonTimeout { timeout } => admin.set_daemon_timeout(timeout)?,
    }
    admin.close()?;
    Ok(())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LoadProc {
    Echo,
    Hash,
    Sleep,
    /// ECHO, HASH, SLEEP and STATS in turn (8:4:2:1).
    Mix,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Connections.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Calls outstanding per connection.
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// What to call.
    #[arg(long = "proc", value_enum, default_value = "echo")]
    procedure: LoadProc,
    /// Payload bytes of ECHO and HASH calls.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Milliseconds per SLEEP call.
    #[arg(long, default_value_t = 1)]
    sleep_ms: u32,
    /// Backend of the load generator's own event loop.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Call(call) => {
            let mut client = connect(&cli.connect)?;
            match call {
                Call::Echo { text } => {
                    println!(
                        "{}",
                        String::from_utf8_lossy(&client.echo(text.as_bytes())?)
                    )
                }
                Call::Sleep { ms } => {
                    client.sleep(ms)?;
                    println!("slept {ms} ms");
                }
                Call::Hash { text } => println!("{:#018x}", client.hash(text.as_bytes())?),
                Call::Stats => println!("{}", pretty(&client.stats()?)?),
            }
        }
        Command::Admin(args) => admin(&cli.connect, args)?,
        Command::Load(args) => load(cli.connect, args)?,
    }
    Ok(())
}

fn connect(addr: &ListenAddr) -> anyhow::Result<Client> {
    let mut client = Client::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    client.set_timeout(Some(Duration::from_secs(120)))?;
    Ok(client)
}

fn pretty(json: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    Ok(serde_json::to_string_pretty(&v)?)
}

fn load(addr: ListenAddr, args: LoadArgs) -> anyhow::Result<()> {
    if !(args.duration > 0.0 && args.duration <= 1e9) {
        bail!("--duration must be a positive number of seconds, at most 1e9");
    }
    if args.clients == 0 || args.inflight == 0 {
        bail!("--clients and --inflight must be at least 1");
    }
    let backend: Choice = args.backend.parse()?;
    let duration = Duration::from_secs_f64(args.duration);
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {elapsed:>4} {msg}").expect("valid template"),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let tick = bar.clone();
    let mut cfg = LoadConfig::new(addr);
    cfg.clients = args.clients;
    cfg.inflight = args.inflight;
    cfg.duration = duration;
    cfg.payload = args.payload;
    cfg.sleep_ms = args.sleep_ms;
    cfg.backend = backend;
    cfg.mix = match args.procedure {
        LoadProc::Echo => vec![(Procedure::Echo, 1)],
        LoadProc::Hash => vec![(Procedure::Hash, 1)],
        LoadProc::Sleep => vec![(Procedure::Sleep, 1)],
        LoadProc::Mix => mix(),
    };
    cfg.progress = Some(Arc::new(move |elapsed: Duration, replies: u64| {
        tick.set_position((elapsed.as_millis() as u64).min(tick.length().unwrap_or(0)));
        tick.set_message(format!("{replies} replies"));
    }));
    let report = run_load(&cfg).context("load run failed")?;
    bar.finish_and_clear();
    print_report(&report, args.json);
    if report.errors > 0 {
        bail!("{} errors", report.errors);
    }
    Ok(())
}

/// The demo's mix: ECHO, HASH, SLEEP and STATS, 8:4:2:1.
fn mix() -> Vec<(Procedure, u32)> {
    vec![
        (Procedure::Echo, 8),
        (Procedure::Hash, 4),
        (Procedure::Sleep, 2),
        (Procedure::Stats, 1),
    ]
}

fn print_report(r: &LoadReport, json: bool) {
    if json {
        let line = serde_json::json!({
            "sent": r.sent, "received": r.received, "errors": r.errors,
            "error_replies": r.error_replies, "elapsed_s": r.elapsed.as_secs_f64(),
            "requests_per_sec": r.rate(), "p50_us": r.latency_us(50.0),
            "p90_us": r.latency_us(90.0), "p99_us": r.latency_us(99.0),
            "p999_us": r.latency_us(99.9),
        });
        println!("{line}");
        return;
    }
    println!(
        "{} calls, {} replies in {:.2} s: {:.0} requests/s",
        r.sent,
        r.received,
        r.elapsed.as_secs_f64(),
        r.rate()
    );
    println!(
        "latency p50 {} us, p90 {} us, p99 {} us, p99.9 {} us",
        r.latency_us(50.0),
        r.latency_us(90.0),
        r.latency_us(99.0),
        r.latency_us(99.9)
    );
    println!("errors: {}", r.errors);
    for e in &r.error_samples {
        println!("  {e}");
    }
}
