//! `vireo-demo`: the RPC server on every compiled backend in turn, under the load generator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use vireo_backends::{BackendKind, Choice};
use vireo_rpc::client::Client;
use vireo_rpc::load::{LoadConfig, run_load};
use vireo_rpc::proto::Procedure;
use vireo_rpc::server::{DaemonConfig, ListenAddr, Server, ServerConfig};

/// Runs the vireo RPC server on a temporary Unix socket on each compiled backend in turn,
/// drives it with the load generator (ECHO, HASH, SLEEP and STATS, 8:4:2:1) and prints a table
/// per backend: requests/s, latency, and the server's pool and loop statistics.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Seconds of load per backend.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Connections.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Calls outstanding per connection.
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Only this backend (repeatable): poll, epoll, io-uring, portable.
    #[arg(long = "backend")]
    backends: Vec<BackendKind>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.duration > 0.0 && args.duration <= 1e9) {
        bail!("--duration must be a positive number of seconds, at most 1e9");
    }
    if args.clients == 0 || args.inflight == 0 {
        bail!("--clients and --inflight must be at least 1");
    }
    let kinds = if args.backends.is_empty() {
        BackendKind::compiled()
    } else {
        args.backends.clone()
    };
    let dir = std::env::temp_dir().join(format!("vireo-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = run_all(&args, &kinds, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_all(args: &Args, kinds: &[BackendKind], dir: &std::path::Path) -> anyhow::Result<()> {
    println!(
        "vireo-demo: {} clients x {} calls in flight, {:.1} s per backend, mix ECHO 1 KiB : HASH 1 KiB : SLEEP 1 ms : STATS = 8:4:2:1",
        args.clients, args.inflight, args.duration
    );
    println!("server: 5..20 workers + 5 priority workers, max 5 calls in flight per client");
    let mut failures = 0;
    for &kind in kinds {
        println!();
        match run_one(args, kind, dir.join(format!("{kind}.sock"))) {
            Ok(true) => {}
            Ok(false) => failures += 1,
            Err(e) => {
                println!("{kind}: skipped: {e:#}");
            }
        }
    }
    if failures > 0 {
        bail!("{failures} backend(s) lost or failed calls");
    }
    Ok(())
}

/// One backend; `Ok(false)` when calls were lost or failed.
fn run_one(args: &Args, kind: BackendKind, path: PathBuf) -> anyhow::Result<bool> {
    let server = Server::bind_with(
        DaemonConfig {
            backend: Choice::Only(kind),
            ..DaemonConfig::default()
        },
        ServerConfig {
            listen: vec![ListenAddr::Unix(path)],
            ..ServerConfig::default()
        },
    )
    .with_context(|| format!("cannot start the server on {kind}"))?;
    let addr = server.local_addrs()[0].clone();
    let backend = server.backend_name();
    let stop = server.shutdown_handle();
    let running = std::thread::Builder::new()
        .name(format!("server-{kind}"))
        .spawn(move || server.run())?;

    let mut cfg = LoadConfig::new(addr.clone());
    cfg.clients = args.clients;
    cfg.inflight = args.inflight;
    cfg.duration = Duration::from_secs_f64(args.duration);
    cfg.payload = 1024;
    cfg.sleep_ms = 1;
    cfg.mix = vec![
        (Procedure::Echo, 8),
        (Procedure::Hash, 4),
        (Procedure::Sleep, 2),
        (Procedure::Stats, 1),
    ];
    let report = run_load(&cfg);
    let stats = Client::connect(&addr).and_then(|mut c| c.stats());
    stop.shutdown();
    let summary = running
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
    let report = report?;
    let stats: serde_json::Value = serde_json::from_str(&stats?)?;
    let pool = &stats["pool"];

    println!("== {backend} ==");
    println!("  requests/s      {:>12.0}", report.rate());
    println!(
        "  latency         p50 {} us   p99 {} us   p99.9 {} us",
        report.latency_us(50.0),
        report.latency_us(99.0),
        report.latency_us(99.9)
    );
    println!(
        "  calls           {} sent, {} replied, {} errors",
        report.sent, report.received, report.errors
    );
    let by: Vec<String> = report
        .by_procedure
        .iter()
        .map(|(p, n)| format!("{} {n}", p.name()))
        .collect();
    println!("  by procedure    {}", by.join(", "));
    println!(
        "  pool            {} workers ({} free), {} priority, {} jobs completed, {} stolen",
        pool["workers"],
        pool["free_workers"],
        pool["prio_workers"],
        pool["completed"],
        pool["stolen"]
    );
    println!(
        "  loop            {} iterations, {} callbacks",
        stats["loop"]["iterations"], stats["loop"]["dispatched"]
    );
    println!(
        "  server          {} calls received, {} replies sent",
        summary.calls_received, summary.replies_sent
    );
    for e in &report.error_samples {
        println!("  error: {e}");
    }
    Ok(report.errors == 0 && report.sent == report.received)
}
