//! `vireo-bench`: side-by-side benchmarks of vireo against the tools people use today.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use vireo_benches::pool::{SYSTEMS, System, Workload, throughput, wake_latency};
use vireo_benches::report::{median, micros, percentile};

/// Side-by-side benchmarks of vireo: every subcommand compares systems in one run and prints a
/// table with ratios (or JSON lines with --json).
#[derive(Debug, Parser)]
#[command(name = "vireo-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The worker pool: vireo-pool vs a Mutex+Condvar FIFO pool (libvirt's design), a
    /// crossbeam-channel pool and rayon; throughput with 1 producer, and wake-up latency.
    Pool(PoolArgs),
    /// The RPC server: vireo on each backend vs a tokio server speaking the same protocol, ECHO
    /// at several client counts and payload sizes, driven by the same load generator.
    Rpc(RpcArgs),
    /// libevent's bench.c: N socketpairs, A active, W chained writes; dispatch and setup time of
    /// vireo on every backend beside raw epoll/poll loops, mio, polling and calloop.
    Pipes(PipesArgs),
    /// Timers: add + cancel of many timers, and thousands of periodic timers (CPU per firing,
    /// lateness, never early); vireo on every backend beside calloop.
    Timers(TimersArgs),
    /// Waking a sleeping loop from another thread: latency and throughput of vireo's invoke
    /// (and update_handle) beside mio's Waker + channel and calloop's channel.
    Wake(WakeArgs),
}

#[derive(Debug, Args)]
struct WakeArgs {
    /// Latency samples per system.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Messages per sending thread in the throughput runs.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only these systems (repeatable).
    #[arg(long = "system", value_name = "NAME")]
    systems: Vec<String>,
    #[command(flatten)]
    out: Output,
}

fn wake(mut args: WakeArgs) -> anyhow::Result<()> {
    if args.quick {
        args.samples = args.samples.min(200);
        args.messages = args.messages.min(20_000);
    }
    if args.samples == 0 || args.messages == 0 {
        bail!("--samples and --messages must be at least 1");
    }
    let bar = progress_bar(args.out.json);
    let opts = vireo_benches::wake::WakeOptions {
        samples: args.samples,
        messages: args.messages,
        systems: args.systems,
    };
    let report = vireo_benches::wake::report(&opts, |m| bar.set_message(m.to_owned()))?;
    bar.finish_and_clear();
    emit(&report, &args.out)
}

#[derive(Debug, Args)]
struct TimersArgs {
    /// Timers added, then cancelled.
    #[arg(long, default_value_t = 1_000_000)]
    add_cancel: usize,
    /// Periodic timers of 1-10 ms.
    #[arg(long, default_value_t = 10_000)]
    periodic: usize,
    /// Seconds the periodic timers run.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only these systems (repeatable).
    #[arg(long = "system", value_name = "NAME")]
    systems: Vec<String>,
    #[command(flatten)]
    out: Output,
}

fn timers(mut args: TimersArgs) -> anyhow::Result<()> {
    if args.quick {
        args.add_cancel = args.add_cancel.min(100_000);
        args.periodic = args.periodic.min(1000);
        args.duration = args.duration.min(0.5);
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) || args.add_cancel == 0 {
        bail!("--duration must be positive and --add-cancel at least 1");
    }
    let bar = progress_bar(args.out.json);
    let opts = vireo_benches::timers::TimersOptions {
        add_cancel: args.add_cancel,
        periodic: args.periodic,
        duration: Duration::from_secs_f64(args.duration),
        systems: args.systems,
    };
    let report = vireo_benches::timers::report(&opts, |m| bar.set_message(m.to_owned()))?;
    bar.finish_and_clear();
    emit(&report, &args.out)
}

/// Output options shared by the subcommands that produce a report.
#[derive(Debug, Args)]
struct Output {
    /// Print one JSON object per result instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write SVG charts into this directory.
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct PipesArgs {
    /// Numbers of socketpairs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,9900")]
    pipes: Vec<usize>,
    /// Parameter sets ACTIVE:WRITES (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1:100,100:1000", value_parser = parse_set)]
    sets: Vec<(usize, usize)>,
    /// Measured rounds per point (one warm-up round more is run first).
    #[arg(long, default_value_t = 25)]
    rounds: usize,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only these systems (repeatable).
    #[arg(long = "system", value_name = "NAME")]
    systems: Vec<String>,
    #[command(flatten)]
    out: Output,
}

fn parse_set(s: &str) -> Result<(usize, usize), String> {
    let (a, w) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not ACTIVE:WRITES"))?;
    let a: usize = a.parse().map_err(|e| format!("active {a:?}: {e}"))?;
    let w: usize = w.parse().map_err(|e| format!("writes {w:?}: {e}"))?;
    if a == 0 {
        return Err("active must be at least 1".into());
    }
    Ok((a, w))
}

/// A progress bar on stderr (hidden for JSON output or when stderr is not a terminal).
fn progress_bar(hidden: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if hidden {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.enable_steady_tick(Duration::from_millis(120));
    }
    bar
}

/// Prints a report as a table or JSON lines, and draws its charts when asked.
fn emit(report: &vireo_benches::report::Report, out: &Output) -> anyhow::Result<()> {
    if out.json {
        for line in &report.json {
            println!("{line}");
        }
    } else {
        print!("{}", report.text());
    }
    if let Some(dir) = &out.plot {
        for chart in &report.charts {
            let path = vireo_benches::plot::draw(chart, dir)?;
            if !out.json {
                println!("chart: {}", path.display());
            }
        }
    }
    Ok(())
}

fn pipes(mut args: PipesArgs) -> anyhow::Result<()> {
    if args.quick {
        args.pipes.retain(|&n| n <= 1000);
        args.rounds = args.rounds.min(4);
    }
    if args.rounds == 0 || args.pipes.is_empty() || args.pipes.contains(&0) {
        bail!("--rounds and every --pipes value must be at least 1");
    }
    let bar = progress_bar(args.out.json);
    let opts = vireo_benches::pipes::PipesOptions {
        pipes: args.pipes,
        sets: args.sets,
        rounds: args.rounds,
        systems: args.systems,
    };
    let report = vireo_benches::pipes::report(&opts, |m| bar.set_message(m.to_owned()))?;
    bar.finish_and_clear();
    emit(&report, &args.out)
}

#[derive(Debug, Args)]
struct RpcArgs {
    /// Client counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// ECHO payload sizes in bytes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,16384")]
    payloads: Vec<usize>,
    /// Calls outstanding per client (vireo's server reads at most 5 ahead per client).
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Seconds of load per point.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Runs per point; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Worker threads of each server (vireo's pool, tokio's runtime).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object per result instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only these systems (repeatable): vireo-<backend> or tokio.
    #[arg(long = "system", value_name = "NAME")]
    systems: Vec<String>,
}

#[derive(Debug, Args)]
struct PoolArgs {
    /// Worker threads in every pool.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Empty jobs per run.
    #[arg(long, default_value_t = 1_000_000)]
    jobs: usize,
    /// Jobs of about 1 µs per run.
    #[arg(long, default_value_t = 300_000)]
    spin_jobs: usize,
    /// Runs per system; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Jobs per wake-up latency measurement (idle and burst).
    #[arg(long, default_value_t = 1000)]
    latency_samples: usize,
    /// A smoke run well under a minute (fewer jobs and runs).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object per result instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only these systems (repeatable; for profiling one of them). Ratio columns need the
    /// baseline systems in the run.
    #[arg(long = "system", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(SYSTEMS))]
    systems: Vec<String>,
}

// Every system in a run shares this allocator. glibc's malloc serializes threads that free
// what another thread allocated (one arena lock), which is what handing work between threads
// does; mimalloc frees such blocks without a lock.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Pool(args) => pool(args),
        Command::Rpc(args) => rpc(args),
        Command::Pipes(args) => pipes(args),
        Command::Timers(args) => timers(args),
        Command::Wake(args) => wake(args),
    }
}

fn pool(mut args: PoolArgs) -> anyhow::Result<()> {
    if args.quick {
        args.jobs = args.jobs.min(200_000);
        args.spin_jobs = args.spin_jobs.min(50_000);
        args.runs = args.runs.min(3);
        args.latency_samples = args.latency_samples.min(200);
    }
    if args.workers == 0 || args.runs == 0 || args.jobs == 0 || args.spin_jobs == 0 {
        bail!("--workers, --runs, --jobs and --spin-jobs must be at least 1");
    }
    // system -> workload -> jobs/s per run
    let mut rates: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut idle: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut burst: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let chosen: Vec<&str> = SYSTEMS
        .into_iter()
        .filter(|s| args.systems.is_empty() || args.systems.iter().any(|c| c == s))
        .collect();
    // Each measurement starts a fresh pool. Systems take turns within each workload, in an
    // order rotated every run, and one unrecorded warm-up round goes first: on a shared machine
    // what ran just before a measurement moves it (clock boost, scheduler state), so every
    // system gets every neighbour.
    for run in 0..=args.runs {
        let warm_up = run == 0;
        for (workload, jobs) in [
            (Workload::Empty, args.jobs),
            (Workload::Spin1us, args.spin_jobs),
        ] {
            for i in 0..chosen.len() {
                let name = chosen[(i + run) % chosen.len()];
                let system = System::start(name, args.workers);
                let took = throughput(&system, workload, jobs);
                system.shutdown();
                if !warm_up {
                    rates
                        .entry(name)
                        .or_default()
                        .entry(workload.name())
                        .or_default()
                        .push(jobs as f64 / took.as_secs_f64());
                }
            }
        }
        if warm_up {
            continue;
        }
        for i in 0..chosen.len() {
            let name = chosen[(i + run) % chosen.len()];
            let system = System::start(name, args.workers);
            idle.entry(name).or_default().extend(wake_latency(
                &system,
                args.latency_samples,
                false,
            ));
            burst.entry(name).or_default().extend(wake_latency(
                &system,
                args.latency_samples,
                true,
            ));
            system.shutdown();
        }
    }

    let mut med = |system: &str, workload: &str| -> f64 {
        median(
            rates
                .get_mut(system)
                .and_then(|w| w.get_mut(workload))
                .map(Vec::as_mut_slice)
                .unwrap_or(&mut []),
        )
    };
    let mut rows = Vec::new();
    for system in chosen {
        let empty = med(system, "empty");
        let spin = med(system, "1us");
        let idle = idle
            .get_mut(system)
            .map(Vec::as_mut_slice)
            .unwrap_or(&mut []);
        let (idle50, idle99) = (percentile(idle, 50.0), percentile(idle, 99.0));
        let burst = burst
            .get_mut(system)
            .map(Vec::as_mut_slice)
            .unwrap_or(&mut []);
        let (burst50, burst99) = (percentile(burst, 50.0), percentile(burst, 99.0));
        rows.push((system, empty, spin, idle50, idle99, burst50, burst99));
    }
    let base = |name: &str, col: usize| {
        rows.iter()
            .find(|r| r.0 == name)
            .map(|r| if col == 0 { r.1 } else { r.2 })
            .unwrap_or(f64::NAN)
    };
    let (mutex_empty, chan_empty) = (base("mutex-condvar", 0), base("crossbeam-channel", 0));
    let (mutex_spin, chan_spin) = (base("mutex-condvar", 1), base("crossbeam-channel", 1));

    if args.json {
        for (system, empty, spin, i50, i99, b50, b99) in &rows {
            for (workload, rate, vs_mutex, vs_chan, jobs) in [
                (
                    "empty",
                    empty,
                    empty / mutex_empty,
                    empty / chan_empty,
                    args.jobs,
                ),
                (
                    "1us",
                    spin,
                    spin / mutex_spin,
                    spin / chan_spin,
                    args.spin_jobs,
                ),
            ] {
                let line = serde_json::json!({
                    "bench": "pool", "system": system, "workload": workload,
                    "workers": args.workers, "jobs": jobs, "runs": args.runs,
                    "jobs_per_sec_median": rate, "ratio_vs_mutex_condvar": vs_mutex,
                    "ratio_vs_crossbeam_channel": vs_chan,
                });
                println!("{line}");
            }
            let line = serde_json::json!({
                "bench": "pool", "system": system, "workload": "wake_latency",
                "workers": args.workers, "samples": args.latency_samples * args.runs,
                "idle_p50_us": micros(*i50), "idle_p99_us": micros(*i99),
                "burst_p50_us": micros(*b50), "burst_p99_us": micros(*b99),
            });
            println!("{line}");
        }
        return Ok(());
    }

    println!(
        "vireo-bench pool: 1 producer, {} workers, {} runs (medians); {} empty jobs, {} jobs of ~1 us; \
         latency over {} jobs per run",
        args.workers, args.runs, args.jobs, args.spin_jobs, args.latency_samples
    );
    println!();
    println!(
        "{:<28}{:>12}{:>9}{:>9}{:>12}{:>9}{:>9}{:>10}{:>10}{:>10}{:>10}",
        "system",
        "empty Mj/s",
        "x mutex",
        "x chan",
        "1us Mj/s",
        "x mutex",
        "x chan",
        "idle p50",
        "idle p99",
        "burst p50",
        "burst p99"
    );
    for (system, empty, spin, i50, i99, b50, b99) in &rows {
        println!(
            "{:<28}{:>12.2}{:>9.2}{:>9.2}{:>12.3}{:>9.2}{:>9.2}{:>8.1}us{:>8.1}us{:>8.1}us{:>8.1}us",
            system,
            empty / 1e6,
            empty / mutex_empty,
            empty / chan_empty,
            spin / 1e6,
            spin / mutex_spin,
            spin / chan_spin,
            micros(*i50),
            micros(*i99),
            micros(*b50),
            micros(*b99),
        );
    }
    Ok(())
}

/// One run of one system at one point: requests/s, p50 and p99 in µs, errors.
type RpcRun = (f64, u64, u64, u64);

fn rpc(mut args: RpcArgs) -> anyhow::Result<()> {
    use vireo_benches::rpc;
    use vireo_rpc::load::{LoadConfig, run_load};

    if args.quick {
        args.duration = args.duration.min(0.3);
        args.runs = 1;
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if args.runs == 0 || args.workers == 0 || args.inflight == 0 {
        bail!("--runs, --workers and --inflight must be at least 1");
    }
    if args.clients.contains(&0) {
        bail!("--clients must all be at least 1");
    }
    let all = rpc::systems();
    for s in &args.systems {
        if !all.contains(s) {
            bail!(
                "unknown or unavailable system {s:?}: choose from {}",
                all.join(", ")
            );
        }
    }
    let chosen: Vec<String> = all
        .into_iter()
        .filter(|s| args.systems.is_empty() || args.systems.contains(s))
        .collect();
    let dir = std::env::temp_dir().join(format!("vireo-bench-rpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let points: Vec<(usize, usize)> = args
        .clients
        .iter()
        .flat_map(|&c| args.payloads.iter().map(move |&p| (c, p)))
        .collect();
    let bar = indicatif::ProgressBar::new((points.len() * chosen.len() * args.runs) as u64);
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // (clients, payload) -> system -> runs
    let mut results: BTreeMap<(usize, usize), BTreeMap<String, Vec<RpcRun>>> = BTreeMap::new();
    for &(clients, payload) in &points {
        for run in 0..args.runs {
            for i in 0..chosen.len() {
                let name = &chosen[(i + run) % chosen.len()];
                bar.set_message(format!("{name}, {clients} clients, {payload} B"));
                let path = dir.join(format!("{name}.sock"));
                let (server, addr) = rpc::start(name, &path, args.workers)?;
                let mut cfg = LoadConfig::new(addr);
                cfg.clients = clients;
                cfg.inflight = args.inflight;
                cfg.payload = payload;
                cfg.duration = Duration::from_secs_f64(args.duration);
                cfg.backend = vireo_backends::Choice::Auto;
                let report = run_load(&cfg);
                server.stop();
                let report = report?;
                results
                    .entry((clients, payload))
                    .or_default()
                    .entry(name.clone())
                    .or_default()
                    .push((
                        report.rate(),
                        report.latency_us(50.0),
                        report.latency_us(99.0),
                        report.errors,
                    ));
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);

    if !args.json {
        println!(
            "vireo-bench rpc: ECHO, {} calls in flight per client, {:.1} s per point, medians of {} runs; \
             {} server workers; load generator: one vireo loop thread",
            args.inflight, args.duration, args.runs, args.workers
        );
        println!();
        println!(
            "{:>7} {:>8}  {:<16}{:>12}{:>10}{:>10}{:>9}{:>8}",
            "clients", "payload", "system", "req/s", "p50", "p99", "x tokio", "errors"
        );
    }
    for ((clients, payload), by_system) in &mut results {
        let mut rows = Vec::new();
        for (name, runs) in by_system.iter_mut() {
            let mut rates: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let mut p50: Vec<f64> = runs.iter().map(|r| r.1 as f64).collect();
            let mut p99: Vec<f64> = runs.iter().map(|r| r.2 as f64).collect();
            let errors: u64 = runs.iter().map(|r| r.3).sum();
            rows.push((
                name.clone(),
                median(&mut rates),
                median(&mut p50),
                median(&mut p99),
                errors,
            ));
        }
        let tokio = rows
            .iter()
            .find(|r| r.0 == "tokio")
            .map_or(f64::NAN, |r| r.1);
        for (name, rate, p50, p99, errors) in rows {
            if args.json {
                let line = serde_json::json!({
                    "bench": "rpc", "system": name, "procedure": "echo",
                    "clients": clients, "payload": payload, "inflight": args.inflight,
                    "duration_s": args.duration, "runs": args.runs, "workers": args.workers,
                    "requests_per_sec_median": rate, "p50_us_median": p50,
                    "p99_us_median": p99, "ratio_vs_tokio": rate / tokio, "errors": errors,
                });
                println!("{line}");
            } else {
                println!(
                    "{:>7} {:>8}  {:<16}{:>12.0}{:>8.0}us{:>8.0}us{:>9.2}{:>8}",
                    clients,
                    payload,
                    name,
                    rate,
                    p50,
                    p99,
                    rate / tokio,
                    errors
                );
            }
        }
    }
    Ok(())
}
