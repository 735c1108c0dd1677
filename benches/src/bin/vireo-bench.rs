//! `vireo-bench`: side-by-side benchmarks of vireo against the tools people use today.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use vireo_benches::pool::{SYSTEMS, System, Workload, throughput, wake_latency};
use vireo_benches::report::{Chart, Report, Target, median, micros, percentile};

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
    /// The pool's multi-core scaling: jobs of about 10 µs from one producer with 1, 2, 4, 8 and
    /// 16 workers, every pool side by side (meant for a machine with that many cores).
    Scaling(ScalingArgs),
    /// The RPC server: vireo on each backend vs a tokio server speaking the same protocol, ECHO
    /// at several client counts and payload sizes, driven by the same load generator.
    Rpc(RpcArgs),
    /// libevent's bench.c: N socketpairs, A active, W chained writes; dispatch and setup time of
    /// vireo on every backend (and vireo-epoll-pause, re-arming by pause and resume) beside raw
    /// epoll/poll loops, mio, polling, calloop, and the C loops libev, libevent and libuv
    /// where they are installed.
    Pipes(PipesArgs),
    /// Timers: add + cancel of many timers, and thousands of periodic timers (CPU per firing,
    /// lateness, never early); vireo on every backend beside calloop.
    Timers(TimersArgs),
    /// Waking a sleeping loop from another thread: latency and throughput of vireo's invoke
    /// (and update_handle) beside mio's Waker + channel and calloop's channel.
    Wake(WakeArgs),
    /// The core's dispatch alone: ns per readiness on a backend that reports N watches ready
    /// from memory (no system call), beside a loop calling the same boxed closures from a Vec.
    Dispatch(DispatchArgs),
    /// bench.c dispatch on vireo while 0, 1 and 2 other threads call invoke and update_handle
    /// as fast as they can (the daemon's workers hand every reply back through invoke).
    Contention(ContentionArgs),
    /// libvirt's client on vireo (each backend) beside libvirt's default event loop, against a
    /// real libvirtd (test driver): 1, 100 and 1,000 connections subscribed to domain events
    /// while another suspends and resumes the domain. Needs libvirt installed.
    Libvirt(LibvirtArgs),
    /// One point of `libvirt`, in a process of its own (an event implementation is registered
    /// once per process): prints one JSON line.
    #[command(hide = true)]
    LibvirtClient(LibvirtClientArgs),
    /// Every benchmark above at moderate sizes: a markdown report (the body of BENCHMARKS.md)
    /// and SVG charts.
    Compare(CompareArgs),
    /// The RPC server under load for a long time (10 minutes by default): clients connecting
    /// and disconnecting, SLEEP calls, threadpool changes through the admin socket; checks that every call is answered
    /// and that RSS and open fds stay flat.
    Soak(SoakArgs),
}

#[derive(Debug, Args)]
struct SoakArgs {
    /// Seconds the soak lasts.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// The server's backend: poll, epoll, io-uring, portable or auto.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Connections per window of load.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds per window (every client reconnects each window).
    #[arg(long, default_value_t = 5.0)]
    window: f64,
    #[command(flatten)]
    out: Output,
}

fn soak(args: SoakArgs) -> anyhow::Result<()> {
    if !(args.duration > 0.0 && args.duration <= 1e9 && args.window > 0.0 && args.window <= 1e9) {
        bail!("--duration and --window must be positive numbers of seconds");
    }
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let backend: vireo_backends::Choice = args.backend.parse()?;
    let opts = vireo_benches::soak::SoakOptions {
        backend,
        duration: Duration::from_secs_f64(args.duration),
        clients: args.clients,
        window: Duration::from_secs_f64(args.window),
    };
    let bar = indicatif::ProgressBar::new(opts.duration.as_secs());
    if args.out.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
                .expect("valid template"),
        );
    }
    let result = vireo_benches::soak::run(&opts, |elapsed, r| {
        bar.set_position(elapsed.as_secs());
        bar.set_message(format!("{} replies, {} errors", r.received, r.errors));
    })?;
    bar.finish_and_clear();
    let report = vireo_benches::soak::report(&result, &opts);
    emit(&report, &args.out)?;
    if report.targets.iter().any(|t| !t.met) {
        bail!("the soak failed a check");
    }
    Ok(())
}

#[derive(Debug, Args)]
struct ScalingArgs {
    /// Worker counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    workers: Vec<usize>,
    /// Jobs of about 10 µs per measurement.
    #[arg(long, default_value_t = 200_000)]
    jobs: usize,
    /// Measurements per system and worker count; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run only these systems (repeatable).
    #[arg(long = "system", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(SYSTEMS))]
    systems: Vec<String>,
    #[command(flatten)]
    out: Output,
}

fn scaling(args: ScalingArgs) -> anyhow::Result<()> {
    if args.workers.is_empty() || args.workers.contains(&0) || args.jobs == 0 || args.runs == 0 {
        bail!("--workers must all be at least 1, --jobs and --runs at least 1");
    }
    let opts = vireo_benches::pool::ScalingOptions {
        workers: args.workers,
        jobs: args.jobs,
        runs: args.runs,
        systems: SYSTEMS
            .into_iter()
            .filter(|s| args.systems.is_empty() || args.systems.iter().any(|c| c == s))
            .map(String::from)
            .collect(),
    };
    let bar = progress_bar(args.out.json);
    let report = vireo_benches::pool::scaling(&opts, &|m| bar.set_message(m.to_owned()));
    bar.finish_and_clear();
    emit(&report, &args.out)
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Where to write the markdown report.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "target/vireo-bench/compare.md"
    )]
    out: std::path::PathBuf,
    /// Where to write the SVG charts (default: a `plots` folder beside the report).
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
}

fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let q = args.quick;
    let bar = progress_bar(false);
    let progress = |bench: &str, m: &str| bar.set_message(format!("{bench}: {m}"));
    let mut reports = Vec::new();
    reports.push(vireo_benches::pipes::report(
        &vireo_benches::pipes::PipesOptions {
            pipes: if q { vec![100] } else { vec![100, 1000, 9900] },
            rounds: if q { 3 } else { 10 },
            ..Default::default()
        },
        |m| progress("pipes", m),
    )?);
    reports.push(vireo_benches::timers::report(
        &vireo_benches::timers::TimersOptions {
            add_cancel: if q { 20_000 } else { 200_000 },
            periodic: if q { 200 } else { 2000 },
            duration: Duration::from_secs_f64(if q { 0.3 } else { 1.0 }),
            systems: Vec::new(),
        },
        |m| progress("timers", m),
    )?);
    reports.push(vireo_benches::wake::report(
        &vireo_benches::wake::WakeOptions {
            samples: if q { 200 } else { 1000 },
            messages: if q { 10_000 } else { 100_000 },
            systems: Vec::new(),
        },
        |m| progress("wake", m),
    )?);
    reports.push(vireo_benches::contention::report(
        &vireo_benches::contention::ContentionOptions {
            pipes: if q { 100 } else { 1000 },
            rounds: if q { 2 } else { 10 },
            ..Default::default()
        },
        |m| progress("contention", m),
    )?);
    reports.push(vireo_benches::dispatch::report(
        &vireo_benches::dispatch::DispatchOptions {
            reports: if q { 100_000 } else { 2_000_000 },
            runs: if q { 1 } else { 5 },
            ..Default::default()
        },
        |m| progress("dispatch", m),
    )?);
    let hidden = Output {
        json: false,
        plot: None,
    };
    reports.push(pool_report(
        &mut PoolArgs {
            workers: 2,
            jobs: if q { 100_000 } else { 500_000 },
            spin_jobs: if q { 20_000 } else { 100_000 },
            runs: if q { 1 } else { 3 },
            latency_samples: if q { 100 } else { 500 },
            quick: false,
            out: Output { ..hidden },
            systems: Vec::new(),
        },
        &|m| progress("pool", m),
    )?);
    reports.push(rpc_report(
        &mut RpcArgs {
            clients: if q { vec![16] } else { vec![1, 16, 64] },
            payloads: if q { vec![64] } else { vec![64, 16384] },
            inflight: 4,
            duration: if q { 0.3 } else { 1.0 },
            runs: 1,
            workers: 2,
            quick: false,
            systems: Vec::new(),
            out: Output {
                json: false,
                plot: None,
            },
        },
        &|m| progress("rpc", m),
    )?);
    bar.finish_and_clear();

    let plot_dir = args.plot.clone().unwrap_or_else(|| {
        args.out
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("plots")
    });
    let report_dir = args.out.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(report_dir)?;
    let mut md = String::new();
    md.push_str(&format!(
        "# vireo benchmarks\n\n\
         Produced by `cargo run --release -p vireo-benches --bin vireo-bench -- compare{} --out {} \
         --plot {}` (every subcommand at moderate sizes; each subcommand also runs alone, with \
         `--help` for its parameters, `--json` for one JSON object per result and `--plot DIR` \
         for its charts).\n\n{}\n\n\
         ## How to read these figures\n\n\
         - The machines these runs come from are shared and noisy: the same command can move a \
         figure by 10-40% from one run to the next. Compare systems **within one table** (they \
         ran in the same process, minutes apart, interleaved), not across runs or machines.\n\
         - Times are medians over rounds (pipes) or runs (pool, rpc); latencies are percentiles \
         over all samples. `x NAME` columns are ratios to system NAME in the same run: below 1 is \
         faster for times, above 1 is faster for rates.\n\
         - On a 2-CPU machine, anything with more busy threads than CPUs (the pool with a \
         producer and two workers, the RPC server with its load generator) measures the \
         scheduler as much as the code; the notes of the issues that added each benchmark say \
         what was profiled.\n\
         - Each target from the benchmark issue is listed at the end with the value measured in \
         this run.\n\n",
        if q { " --quick" } else { "" },
        args.out.display(),
        plot_dir.display(),
        machine()
    ));
    let mut targets = Vec::new();
    for r in &reports {
        md.push_str(&format!("### {}\n\n{}\n", r.bench, r.markdown()));
        for chart in &r.charts {
            let path = vireo_benches::plot::draw(chart, &plot_dir)?;
            let rel = pathdiff(&path, report_dir);
            md.push_str(&format!("![{}]({})\n\n", chart.title, rel));
        }
        targets.extend(r.targets.iter().map(|t| (r.bench.clone(), t.clone())));
    }
    md.push_str("### Targets\n\n| bench | target | measured | |\n|---|---|---|---|\n");
    for (bench, t) in &targets {
        let mark = if t.met { "met" } else { "**missed**" };
        md.push_str(&format!(
            "| {bench} | {} | {} | {mark} |\n",
            t.what, t.measured
        ));
    }
    std::fs::write(&args.out, &md)?;
    for r in &reports {
        println!("== {} ==", r.bench);
        print!("{}", r.text());
        println!();
    }
    println!("report: {}", args.out.display());
    println!("charts: {}", plot_dir.display());
    Ok(())
}

/// `path` relative to `base` when it lies below it, else as given.
fn pathdiff(path: &std::path::Path, base: &std::path::Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The machine, for the report: CPUs, kernel, date.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let uname = rustix::system::uname();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "Machine: {cpus} CPUs ({model}), {} {} {}.",
        uname.sysname().to_string_lossy(),
        uname.release().to_string_lossy(),
        uname.machine().to_string_lossy()
    )
}

#[derive(Debug, Args)]
struct ContentionArgs {
    /// Socketpairs.
    #[arg(long, default_value_t = 1000)]
    pipes: usize,
    /// First writes per round (active pairs).
    #[arg(long, default_value_t = 100)]
    active: usize,
    /// Chained writes per round.
    #[arg(long, default_value_t = 1000)]
    writes: usize,
    /// Measured rounds per point.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Numbers of talking threads (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    talkers: Vec<usize>,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only these systems (repeatable): vireo-BACKEND, mio or calloop.
    #[arg(long = "system", value_name = "NAME")]
    systems: Vec<String>,
    /// Bytes each talker's closure captures (comma-separated): 0 (nothing) and/or 32 (a
    /// worker's reply).
    #[arg(long, value_delimiter = ',', default_value = "0,32")]
    captured: Vec<usize>,
    #[command(flatten)]
    out: Output,
}

fn contention(mut args: ContentionArgs) -> anyhow::Result<()> {
    if args.quick {
        args.pipes = args.pipes.min(100);
        args.rounds = args.rounds.min(3);
    }
    if args.pipes == 0 || args.active == 0 || args.rounds == 0 || args.talkers.is_empty() {
        bail!("--pipes, --active and --rounds must be at least 1, --talkers not empty");
    }
    let opts = vireo_benches::contention::ContentionOptions {
        pipes: args.pipes,
        active: args.active,
        writes: args.writes,
        rounds: args.rounds,
        talkers: args.talkers,
        systems: args.systems,
        captured: args.captured,
    };
    run_bench(&args.out, |progress| {
        vireo_benches::contention::report(&opts, progress)
    })
}

#[derive(Debug, Args)]
struct LibvirtArgs {
    /// Subscribed connections per point (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    connections: Vec<usize>,
    /// Seconds of suspend/resume per point.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Seconds of idle keepalive traffic per point.
    #[arg(long, default_value_t = 3.0)]
    idle_seconds: f64,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only these systems (repeatable): vireo-BACKEND or libvirt-default.
    #[arg(long = "system", value_name = "NAME")]
    systems: Vec<String>,
    #[command(flatten)]
    out: Output,
}

fn libvirt(mut args: LibvirtArgs) -> anyhow::Result<()> {
    if args.quick {
        args.connections = vec![1, 20];
        args.seconds = args.seconds.min(0.5);
        args.idle_seconds = args.idle_seconds.min(0.5);
    }
    if args.connections.is_empty() || args.connections.contains(&0) {
        bail!("--connections must list counts of at least 1");
    }
    let seconds_ok = args.seconds > 0.0 && args.seconds <= 600.0;
    let idle_ok = (0.0..=600.0).contains(&args.idle_seconds);
    if !(seconds_ok && idle_ok) {
        bail!("--seconds must be in (0, 600], --idle-seconds in [0, 600]");
    }
    let opts = vireo_benches::libvirt::LibvirtOptions {
        connections: args.connections,
        seconds: args.seconds,
        idle_seconds: args.idle_seconds,
        systems: args.systems,
    };
    let exe = std::env::current_exe()?;
    run_bench(&args.out, |progress| {
        vireo_benches::libvirt::report(&exe, &opts, progress)
    })
}

#[derive(Debug, Args)]
struct LibvirtClientArgs {
    #[arg(long)]
    system: String,
    #[arg(long)]
    uri: String,
    #[arg(long)]
    connections: usize,
    #[arg(long)]
    seconds: f64,
    #[arg(long)]
    idle_seconds: f64,
}

fn libvirt_client(args: LibvirtClientArgs) -> anyhow::Result<()> {
    let line = vireo_benches::libvirt::client(
        &args.system,
        &args.uri,
        args.connections,
        args.seconds,
        args.idle_seconds,
    )?;
    println!("{line}");
    // Exit without closing a thousand connections one by one: the daemon sees EOF on each.
    std::process::exit(0);
}

#[derive(Debug, Args)]
struct DispatchArgs {
    /// Ready watches per iteration (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    ready: Vec<usize>,
    /// Readiness reports per run.
    #[arg(long, default_value_t = 2_000_000)]
    reports: usize,
    /// Runs per point; medians are reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    out: Output,
}

fn dispatch(mut args: DispatchArgs) -> anyhow::Result<()> {
    if args.quick {
        args.reports = args.reports.min(200_000);
        args.runs = args.runs.min(3);
    }
    if args.ready.is_empty() || args.ready.contains(&0) || args.reports == 0 || args.runs == 0 {
        bail!("--ready must all be at least 1, --reports and --runs at least 1");
    }
    let opts = vireo_benches::dispatch::DispatchOptions {
        ready: args.ready,
        reports: args.reports,
        runs: args.runs,
    };
    run_bench(&args.out, |progress| {
        vireo_benches::dispatch::report(&opts, progress)
    })
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
    let opts = vireo_benches::wake::WakeOptions {
        samples: args.samples,
        messages: args.messages,
        systems: args.systems,
    };
    run_bench(&args.out, |progress| {
        vireo_benches::wake::report(&opts, progress)
    })
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
    if !(args.duration > 0.0 && args.duration <= 1e9) || args.add_cancel == 0 {
        bail!("--duration must be positive and --add-cancel at least 1");
    }
    let opts = vireo_benches::timers::TimersOptions {
        add_cancel: args.add_cancel,
        periodic: args.periodic,
        duration: Duration::from_secs_f64(args.duration),
        systems: args.systems,
    };
    run_bench(&args.out, |progress| {
        vireo_benches::timers::report(&opts, progress)
    })
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
/// Runs one benchmark behind a progress bar (hidden with `--json`) and emits its report.
fn run_bench(
    out: &Output,
    bench: impl FnOnce(&dyn Fn(&str)) -> std::io::Result<Report>,
) -> anyhow::Result<()> {
    let bar = progress_bar(out.json);
    let report = bench(&|m| bar.set_message(m.to_owned()));
    bar.finish_and_clear();
    emit(&report?, out)
}

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
    let opts = vireo_benches::pipes::PipesOptions {
        pipes: args.pipes,
        sets: args.sets,
        rounds: args.rounds,
        systems: args.systems,
    };
    run_bench(&args.out, |progress| {
        vireo_benches::pipes::report(&opts, progress)
    })
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
    /// Worker threads of each server (vireo's pool, tokio's runtime); the vireo-inline-*
    /// servers have none.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// A smoke run well under a minute.
    #[arg(long)]
    quick: bool,
    /// Run only these systems (repeatable): vireo-BACKEND (calls run by the pool),
    /// vireo-inline-BACKEND (no workers: calls run on the loop thread) or tokio.
    #[arg(long = "system", value_name = "NAME")]
    systems: Vec<String>,
    #[command(flatten)]
    out: Output,
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
    #[command(flatten)]
    out: Output,
    /// Run only these systems (repeatable; for profiling one of them). Ratio columns need the
    /// baseline systems in the run.
    #[arg(long = "system", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(SYSTEMS))]
    systems: Vec<String>,
}

// Every system in a run shares this allocator. glibc's malloc serializes threads that free
// what another thread allocated (one arena lock), which is what handing work between threads
// does; mimalloc frees such blocks without a lock. The counting wrapper stays off (one relaxed
// load per allocation) until the soak switches it on to watch the live heap.
#[global_allocator]
static ALLOC: vireo_benches::heap::Counting<mimalloc::MiMalloc> =
    vireo_benches::heap::Counting::new(mimalloc::MiMalloc);

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Pool(args) => pool(args),
        Command::Scaling(args) => scaling(args),
        Command::Rpc(args) => rpc(args),
        Command::Pipes(args) => pipes(args),
        Command::Timers(args) => timers(args),
        Command::Wake(args) => wake(args),
        Command::Dispatch(args) => dispatch(args),
        Command::Contention(args) => contention(args),
        Command::Libvirt(args) => libvirt(args),
        Command::LibvirtClient(args) => libvirt_client(args),
        Command::Compare(args) => compare(args),
        Command::Soak(args) => soak(args),
    }
}

fn pool_report(args: &mut PoolArgs, progress: &dyn Fn(&str)) -> anyhow::Result<Report> {
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
                progress(&format!("{name}, {} jobs", workload.name()));
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
    let mut rep = Report {
        bench: "pool".into(),
        intro: vec![format!(
            "vireo-bench pool: 1 producer, {} workers, {} runs (medians, after a warm-up round); \
             {} empty jobs, {} jobs of ~1 us; latency over {} jobs per run",
            args.workers, args.runs, args.jobs, args.spin_jobs, args.latency_samples
        )],
        columns: [
            "system",
            "empty Mj/s",
            "x mutex",
            "x chan",
            "1us Mj/s",
            "x mutex",
            "x chan",
            "idle p50 us",
            "idle p99 us",
            "burst p50 us",
            "burst p99 us",
        ]
        .map(String::from)
        .to_vec(),
        ..Report::default()
    };
    let mut chart = Chart {
        name: "pool-throughput".into(),
        title: "pool: empty jobs per second, 1 producer (higher is better)".into(),
        y_label: "million jobs/s".into(),
        groups: vec![("empty".into(), Vec::new()), ("~1 us".into(), Vec::new())],
    };
    for (system, empty, spin, i50, i99, b50, b99) in &rows {
        rep.rows.push(vec![
            system.to_string(),
            format!("{:.2}", empty / 1e6),
            format!("{:.2}", empty / mutex_empty),
            format!("{:.2}", empty / chan_empty),
            format!("{:.3}", spin / 1e6),
            format!("{:.2}", spin / mutex_spin),
            format!("{:.2}", spin / chan_spin),
            format!("{:.1}", micros(*i50)),
            format!("{:.1}", micros(*i99)),
            format!("{:.1}", micros(*b50)),
            format!("{:.1}", micros(*b99)),
        ]);
        chart.groups[0].1.push((system.to_string(), empty / 1e6));
        chart.groups[1].1.push((system.to_string(), spin / 1e6));
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
            rep.json.push(serde_json::json!({
                "bench": "pool", "system": system, "workload": workload,
                "workers": args.workers, "jobs": jobs, "runs": args.runs,
                "jobs_per_sec_median": rate, "ratio_vs_mutex_condvar": vs_mutex,
                "ratio_vs_crossbeam_channel": vs_chan,
            }));
        }
        rep.json.push(serde_json::json!({
            "bench": "pool", "system": system, "workload": "wake_latency",
            "workers": args.workers, "samples": args.latency_samples * args.runs,
            "idle_p50_us": micros(*i50), "idle_p99_us": micros(*i99),
            "burst_p50_us": micros(*b50), "burst_p99_us": micros(*b99),
        }));
    }
    if let Some(v) = rows.iter().find(|r| r.0 == "vireo-pool") {
        rep.targets.push(Target {
            what: "empty jobs >= 2x mutex-condvar".into(),
            measured: format!("{:.2}x", v.1 / mutex_empty),
            met: v.1 >= 2.0 * mutex_empty,
        });
        rep.targets.push(Target {
            what: "empty jobs >= 1x crossbeam-channel".into(),
            measured: format!("{:.2}x", v.1 / chan_empty),
            met: v.1 >= chan_empty,
        });
        let lowest = rows
            .iter()
            .filter(|r| r.0 != "vireo-pool (32 B captured)")
            .all(|r| v.6 <= r.6);
        rep.targets.push(Target {
            what: "lowest burst p99".into(),
            measured: format!("{:.1} us", micros(v.6)),
            met: lowest,
        });
    }
    rep.charts = vec![chart];
    Ok(rep)
}

fn pool(mut args: PoolArgs) -> anyhow::Result<()> {
    let bar = progress_bar(args.out.json);
    let report = pool_report(&mut args, &|m| bar.set_message(m.to_owned()))?;
    bar.finish_and_clear();
    emit(&report, &args.out)
}

/// One run of one system at one point: requests/s, p50 and p99 in µs, errors.
type RpcRun = (f64, u64, u64, u64);

fn rpc_report(args: &mut RpcArgs, progress: &dyn Fn(&str)) -> anyhow::Result<Report> {
    use vireo_benches::rpc;
    use vireo_rpc::load::{LoadConfig, run_load};

    if args.quick {
        args.duration = args.duration.min(0.3);
        args.runs = 1;
    }
    if !(args.duration > 0.0 && args.duration <= 1e9) {
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
    // (clients, payload) -> system -> runs
    let mut results: BTreeMap<(usize, usize), BTreeMap<String, Vec<RpcRun>>> = BTreeMap::new();
    for &(clients, payload) in &points {
        for run in 0..args.runs {
            for i in 0..chosen.len() {
                let name = &chosen[(i + run) % chosen.len()];
                progress(&format!("{name}, {clients} clients, {payload} B"));
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
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut rep = Report {
        bench: "rpc".into(),
        intro: vec![format!(
            "vireo-bench rpc: ECHO, {} calls in flight per client, {:.1} s per point, medians of \
             {} runs; {} server workers (vireo-BACKEND: the loop reads, a worker runs the call, \
             the loop writes the reply; vireo-inline-BACKEND: the same server with no workers, \
             each call run on the loop thread as it is read, as tokio's server runs calls on \
             the thread that read them); load generator: one vireo loop thread",
            args.inflight, args.duration, args.runs, args.workers
        )],
        columns: [
            "clients", "payload", "system", "req/s", "p50 us", "p99 us", "x tokio", "errors",
        ]
        .map(String::from)
        .to_vec(),
        ..Report::default()
    };
    let mut chart = Chart {
        name: "rpc-throughput".into(),
        title: "rpc: ECHO requests per second (higher is better)".into(),
        y_label: "thousand requests/s".into(),
        groups: Vec::new(),
    };
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
        let tokio = rows.iter().find(|r| r.0 == "tokio").map(|r| (r.1, r.3));
        let tokio_rate = tokio.map_or(f64::NAN, |t| t.0);
        chart.groups.push((
            format!("{clients} x {payload} B"),
            rows.iter().map(|r| (r.0.clone(), r.1 / 1e3)).collect(),
        ));
        for (name, rate, p50, p99, errors) in &rows {
            rep.json.push(serde_json::json!({
                "bench": "rpc", "system": name, "procedure": "echo",
                "clients": clients, "payload": payload, "inflight": args.inflight,
                "duration_s": args.duration, "runs": args.runs, "workers": args.workers,
                "requests_per_sec_median": rate, "p50_us_median": p50,
                "p99_us_median": p99, "ratio_vs_tokio": rate / tokio_rate, "errors": errors,
            }));
            rep.rows.push(vec![
                clients.to_string(),
                payload.to_string(),
                name.clone(),
                format!("{rate:.0}"),
                format!("{p50:.0}"),
                format!("{p99:.0}"),
                format!("{:.2}", rate / tokio_rate),
                errors.to_string(),
            ]);
        }
        if *clients == 64 {
            // The target over every vireo system, then the same over the servers
            // that hand calls to a pool (the seed's design), so that both stay visible.
            let of = |pooled: bool| {
                rows.iter()
                    .filter(|r| r.0.starts_with("vireo-"))
                    .filter(move |r| !pooled || !r.0.starts_with("vireo-inline-"))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
            };
            for (best, which) in [(of(false), "vireo"), (of(true), "vireo with workers")] {
                if let (Some(best), Some((t_rate, t_p99))) = (best, tokio) {
                    rep.targets.push(Target {
                        what: format!(
                            "best {which} >= 1x tokio at 64 clients, {payload} B, p99 no worse"
                        ),
                        measured: format!(
                            "{} {:.2}x, p99 {:.0} vs {:.0} us",
                            best.0,
                            best.1 / t_rate,
                            best.3,
                            t_p99
                        ),
                        met: best.1 >= t_rate && best.3 <= t_p99,
                    });
                }
            }
        }
    }
    rep.charts = vec![chart];
    Ok(rep)
}

fn rpc(mut args: RpcArgs) -> anyhow::Result<()> {
    let bar = progress_bar(args.out.json);
    let report = rpc_report(&mut args, &|m| bar.set_message(m.to_owned()))?;
    bar.finish_and_clear();
    emit(&report, &args.out)
}
