//! The worker-pool comparison: vireo-pool against the designs people use today.
//!
//! - `vireo-pool`: work stealing on crossbeam-deque (this project).
//! - `mutex-condvar`: one `Mutex<VecDeque>` and a `Condvar`, libvirt's `virThreadPool` design.
//! - `crossbeam-channel`: workers receiving from one unbounded channel.
//! - `rayon`: `rayon::ThreadPool::spawn`.
//!
//! One producer thread submits, N workers run. Throughput workloads count every job through one
//! static counter, so every job closure captures nothing and boxing it allocates nothing for
//! any system; the `vireo-pool (32 B captured)` row shows what a closure that captures data
//! costs (one allocation per job).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::report::{Chart, Report, median};

/// A boxed job, as the baseline pools take them.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// The queue and the quit flag, under one mutex, and the condition variable.
type FifoShared = (Mutex<(VecDeque<Job>, bool)>, Condvar);

/// libvirt's design: one FIFO under a mutex, one condition variable.
pub struct MutexCondvarPool {
    shared: Arc<FifoShared>,
    workers: Vec<JoinHandle<()>>,
}

impl MutexCondvarPool {
    /// Starts `n` workers.
    pub fn new(n: usize) -> MutexCondvarPool {
        let shared: Arc<FifoShared> =
            Arc::new((Mutex::new((VecDeque::new(), false)), Condvar::new()));
        let workers = (0..n)
            .map(|_| {
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    let (lock, cond) = &*shared;
                    let mut state = lock.lock().unwrap();
                    loop {
                        if let Some(job) = state.0.pop_front() {
                            drop(state);
                            job();
                            state = lock.lock().unwrap();
                        } else if state.1 {
                            return;
                        } else {
                            state = cond.wait(state).unwrap();
                        }
                    }
                })
            })
            .collect();
        MutexCondvarPool { shared, workers }
    }

    /// Queues a job and signals one worker.
    pub fn submit(&self, job: Job) {
        let (lock, cond) = &*self.shared;
        lock.lock().unwrap().0.push_back(job);
        cond.notify_one();
    }

    /// Runs what is queued, then joins.
    pub fn shutdown(self) {
        self.shared.0.lock().unwrap().1 = true;
        self.shared.1.notify_all();
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// Workers receiving boxed jobs from one crossbeam channel.
pub struct ChannelPool {
    tx: Option<crossbeam_channel::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl ChannelPool {
    /// Starts `n` workers.
    pub fn new(n: usize) -> ChannelPool {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let workers = (0..n)
            .map(|_| {
                let rx = rx.clone();
                thread::spawn(move || {
                    for job in rx {
                        job();
                    }
                })
            })
            .collect();
        ChannelPool {
            tx: Some(tx),
            workers,
        }
    }

    /// Sends a job.
    pub fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }

    /// Runs what is queued, then joins.
    pub fn shutdown(mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The systems compared.
pub enum System {
    /// vireo-pool.
    Vireo(vireo_pool::Pool),
    /// vireo-pool with closures that capture 32 bytes (one allocation per job).
    VireoCapturing(vireo_pool::Pool),
    /// libvirt's design.
    MutexCondvar(MutexCondvarPool),
    /// crossbeam-channel workers.
    Channel(ChannelPool),
    /// rayon, and the count of its threads still running (dropping a rayon pool does not
    /// join its threads; shutdown waits for them so they cannot disturb the next system).
    Rayon(rayon::ThreadPool, Arc<(Mutex<usize>, Condvar)>),
}

/// The names of the systems, in report order.
pub const SYSTEMS: [&str; 5] = [
    "vireo-pool",
    "vireo-pool (32 B captured)",
    "mutex-condvar",
    "crossbeam-channel",
    "rayon",
];

impl System {
    /// Starts system `name` with `workers` threads.
    ///
    /// # Panics
    ///
    /// On an unknown name or when threads cannot be started.
    pub fn start(name: &str, workers: usize) -> System {
        let vireo = || {
            vireo_pool::Pool::builder()
                .min_workers(workers)
                .max_workers(workers)
                .name("bench")
                .build()
                .expect("vireo pool")
        };
        match name {
            "vireo-pool" => System::Vireo(vireo()),
            "vireo-pool (32 B captured)" => System::VireoCapturing(vireo()),
            "mutex-condvar" => System::MutexCondvar(MutexCondvarPool::new(workers)),
            "crossbeam-channel" => System::Channel(ChannelPool::new(workers)),
            "rayon" => {
                let alive = Arc::new((Mutex::new(workers), Condvar::new()));
                let exited = Arc::clone(&alive);
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(workers)
                    .exit_handler(move |_| {
                        *exited.0.lock().unwrap() -= 1;
                        exited.1.notify_all();
                    })
                    .build()
                    .expect("rayon pool");
                System::Rayon(pool, alive)
            }
            other => panic!("unknown system {other}"),
        }
    }

    /// Submits `f` the way the system takes jobs (no extra boxing for vireo and rayon).
    pub fn submit<F: FnOnce() + Send + 'static>(&self, f: F) {
        match self {
            System::Vireo(p) => {
                let _ = p.submit(f);
            }
            System::VireoCapturing(p) => {
                let payload = [1u64, 2, 3, 4];
                let _ = p.submit(move || {
                    std::hint::black_box(payload);
                    f()
                });
            }
            System::MutexCondvar(p) => p.submit(Box::new(f)),
            System::Channel(p) => p.submit(Box::new(f)),
            System::Rayon(p, _) => p.spawn(f),
        }
    }

    /// Stops the system after its queued jobs.
    pub fn shutdown(self) {
        match self {
            System::Vireo(p) | System::VireoCapturing(p) => p.drain(),
            System::MutexCondvar(p) => p.shutdown(),
            System::Channel(p) => p.shutdown(),
            System::Rayon(p, alive) => {
                drop(p);
                let (lock, cond) = &*alive;
                let mut left = lock.lock().unwrap();
                while *left > 0 {
                    left = cond.wait(left).unwrap();
                }
            }
        }
    }
}

/// Counts finished jobs and wakes the producer when the last one is done.
static DONE: AtomicUsize = AtomicUsize::new(0);
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static FINISHED: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

fn job_done() {
    if DONE.fetch_add(1, Ordering::AcqRel) + 1 == TARGET.load(Ordering::Acquire) {
        *FINISHED.0.lock().unwrap() = true;
        FINISHED.1.notify_all();
    }
}

fn spin_job<const MICROS: u64>() {
    let start = Instant::now();
    while start.elapsed() < Duration::from_micros(MICROS) {
        std::hint::spin_loop();
    }
    job_done();
}

fn expect(n: usize) {
    DONE.store(0, Ordering::Release);
    TARGET.store(n, Ordering::Release);
    *FINISHED.0.lock().unwrap() = false;
}

fn wait_finished(limit: Duration) -> bool {
    let (lock, cond) = &FINISHED;
    let guard = lock.lock().unwrap();
    let (guard, _) = cond
        .wait_timeout_while(guard, limit, |finished| !*finished)
        .unwrap();
    *guard
}

/// The throughput workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Jobs that only count themselves.
    Empty,
    /// Jobs that spin for about 1 µs.
    Spin1us,
    /// Jobs that spin for about 10 µs (the scaling benchmark's jobs).
    Spin10us,
}

impl Workload {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Empty => "empty",
            Workload::Spin1us => "1us",
            Workload::Spin10us => "10us",
        }
    }
}

/// Submits `jobs` jobs from this thread and returns the time until the last one finished.
///
/// # Panics
///
/// When the jobs do not finish within a minute (a broken pool).
pub fn throughput(system: &System, workload: Workload, jobs: usize) -> Duration {
    expect(jobs);
    let start = Instant::now();
    for _ in 0..jobs {
        match workload {
            Workload::Empty => system.submit(job_done),
            Workload::Spin1us => system.submit(spin_job::<1>),
            Workload::Spin10us => system.submit(spin_job::<10>),
        }
    }
    assert!(
        wait_finished(Duration::from_secs(60)),
        "jobs did not finish within a minute"
    );
    start.elapsed()
}

/// Latency from submit to the job starting, for `samples` jobs submitted one at a time with
/// the pool going idle in between (`burst = false`), or all at once (`burst = true`).
///
/// # Panics
///
/// When the jobs do not finish within a minute.
pub fn wake_latency(system: &System, samples: usize, burst: bool) -> Vec<Duration> {
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(samples)));
    if burst {
        expect(samples);
        for _ in 0..samples {
            let latencies = Arc::clone(&latencies);
            let submitted = Instant::now();
            system.submit(move || {
                let waited = submitted.elapsed();
                latencies.lock().unwrap().push(waited);
                job_done();
            });
        }
        assert!(
            wait_finished(Duration::from_secs(60)),
            "burst did not finish"
        );
    } else {
        for _ in 0..samples {
            expect(1);
            let l = Arc::clone(&latencies);
            let submitted = Instant::now();
            system.submit(move || {
                let waited = submitted.elapsed();
                l.lock().unwrap().push(waited);
                job_done();
            });
            assert!(wait_finished(Duration::from_secs(60)), "job did not run");
            // Long enough for the workers to go back to sleep.
            thread::sleep(Duration::from_micros(200));
        }
    }
    let mut out = latencies.lock().unwrap();
    std::mem::take(&mut *out)
}

/// A ratio for the table; `-` when its baseline was not run.
fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".into()
    }
}

/// What `vireo-bench scaling` measures.
#[derive(Debug, Clone)]
pub struct ScalingOptions {
    /// Worker counts to measure, in order.
    pub workers: Vec<usize>,
    /// Jobs of about 10 µs per measurement.
    pub jobs: usize,
    /// Measurements per system and worker count (medians are reported).
    pub runs: usize,
    /// Systems to run (names from [`SYSTEMS`]).
    pub systems: Vec<String>,
}

impl Default for ScalingOptions {
    fn default() -> ScalingOptions {
        ScalingOptions {
            workers: vec![1, 2, 4, 8, 16],
            jobs: 200_000,
            runs: 3,
            systems: SYSTEMS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Throughput of jobs of about 10 µs from one producer against the number of workers: the
/// pool's multi-core scaling. Reports jobs/s, the speed-up over the same system with one
/// worker, and the ratio to the Mutex+Condvar pool at the same worker count.
///
/// # Panics
///
/// When a system's jobs do not finish within a minute (a broken pool).
pub fn scaling(opts: &ScalingOptions, progress: &dyn Fn(&str)) -> Report {
    // system -> workers -> jobs/s per run
    let mut rates: BTreeMap<String, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
    // Round 0 warms up and is dropped; systems take turns, rotated every round.
    for round in 0..=opts.runs {
        for &workers in &opts.workers {
            for i in 0..opts.systems.len() {
                let name = &opts.systems[(i + round) % opts.systems.len()];
                progress(&format!("{name}, {workers} workers"));
                let system = System::start(name, workers);
                let took = throughput(&system, Workload::Spin10us, opts.jobs);
                system.shutdown();
                if round > 0 {
                    rates
                        .entry(name.clone())
                        .or_default()
                        .entry(workers)
                        .or_default()
                        .push(opts.jobs as f64 / took.as_secs_f64());
                }
            }
        }
    }
    let mut med = |system: &str, workers: usize| -> f64 {
        rates
            .get_mut(system)
            .and_then(|w| w.get_mut(&workers))
            .map_or(f64::NAN, |v| median(v))
    };
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let mut rep = Report {
        bench: "scaling".into(),
        intro: vec![format!(
            "vireo-bench scaling: 1 producer, {} jobs of ~10 us per point, medians of {} runs \
             after a warm-up round, on {cpus} CPUs; x1w = speed-up over the same system with \
             the first worker count, x mutex = ratio to mutex-condvar at the same worker count",
            opts.jobs, opts.runs
        )],
        columns: ["system", "workers", "Mj/s", "x1w", "x mutex"]
            .map(String::from)
            .to_vec(),
        ..Report::default()
    };
    let mut chart = Chart {
        name: "pool-scaling".into(),
        title: "pool: jobs of ~10 us per second against workers (higher is better)".into(),
        y_label: "million jobs/s".into(),
        groups: Vec::new(),
    };
    let first = opts.workers.first().copied().unwrap_or(1);
    for &workers in &opts.workers {
        let mut group = Vec::new();
        let mutex = med("mutex-condvar", workers);
        for system in &opts.systems {
            let rate = med(system, workers);
            let alone = med(system, first);
            rep.rows.push(vec![
                system.clone(),
                workers.to_string(),
                format!("{:.3}", rate / 1e6),
                ratio(rate / alone),
                ratio(rate / mutex),
            ]);
            rep.json.push(serde_json::json!({
                "bench": "scaling", "system": system, "workers": workers, "jobs": opts.jobs,
                "runs": opts.runs, "cpus": cpus, "jobs_per_sec_median": rate,
                "speedup_vs_first": rate / alone, "ratio_vs_mutex_condvar": rate / mutex,
            }));
            group.push((system.clone(), rate / 1e6));
        }
        chart.groups.push((format!("{workers} workers"), group));
    }
    rep.charts.push(chart);
    rep
}
