//! The soak: the RPC server under the load generator for a long time, with clients connecting
//! and disconnecting, SLEEP calls filling the queue and the pool's limits changed all along;
//! every second the process's RSS and open fds are sampled. It reports whether every call got
//! its reply, and whether memory and descriptors stay flat after the warm-up.
//!
//! The server and the load run in this process (the figures cover both): a leak in either shows.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

use vireo_backends::Choice;
use vireo_rpc::admin::AdminClient;
use vireo_rpc::client::Client;
use vireo_rpc::load::{LoadConfig, run_load};
use vireo_rpc::proto::Procedure;
use vireo_rpc::server::{DaemonConfig, ListenAddr, Server, ServerConfig};

use crate::report::{Report, Target};

/// What `vireo-bench soak` runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The server's backend.
    pub backend: Choice,
    /// How long the whole soak lasts.
    pub duration: Duration,
    /// Connections per window; each window connects afresh.
    pub clients: usize,
    /// How long one window of load lasts before its clients disconnect.
    pub window: Duration,
}

impl Default for SoakOptions {
    fn default() -> SoakOptions {
        SoakOptions {
            backend: Choice::Auto,
            duration: Duration::from_secs(600),
            clients: 32,
            window: Duration::from_secs(5),
        }
    }
}

/// One sample of the process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the start.
    pub at: f64,
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Live heap in KiB: bytes allocated and not freed since the soak started, as counted by
    /// [`crate::heap`] (zero when the binary does not install the counting allocator).
    pub heap_kib: i64,
}

fn sample(start: Instant) -> io::Result<Sample> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("unreadable /proc/self/statm"))?;
    let page = rustix::param::page_size() as u64;
    let fds = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(Sample {
        at: start.elapsed().as_secs_f64(),
        rss_kib: pages * page / 1024,
        fds,
        heap_kib: crate::heap::live_bytes() / 1024,
    })
}

/// What the soak measured.
#[derive(Debug, Clone, Default)]
pub struct SoakResult {
    /// The backend the server ran on.
    pub backend: String,
    /// Calls sent and replies received over all windows.
    pub sent: u64,
    /// Replies received.
    pub received: u64,
    /// Errors reported by the load generator (lost replies included).
    pub errors: u64,
    /// threadpool changes (admin socket) made, and how many failed.
    pub limit_changes: u64,
    /// Threadpool changes that failed.
    pub limit_errors: u64,
    /// The deepest pool queue and the fewest and most workers seen by the `STATS` call made
    /// after each threadpool change.
    pub max_queue_depth: u64,
    /// Fewest workers seen.
    pub min_workers_seen: u64,
    /// Most workers seen.
    pub max_workers_seen: u64,
    /// Times the server's loop started over on a fresh backend instance (from `STATS`).
    pub backend_rebuilds: u64,
    /// Windows of load run (each connects and disconnects every client).
    pub windows: u64,
    /// One sample per second.
    pub samples: Vec<Sample>,
    /// First error messages.
    pub error_samples: Vec<String>,
}

/// Runs the soak.
///
/// # Errors
///
/// When the server cannot start, or a load window cannot connect.
pub fn run(
    opts: &SoakOptions,
    mut progress: impl FnMut(Duration, &SoakResult),
) -> io::Result<SoakResult> {
    crate::heap::start();
    let dir = std::env::temp_dir().join(format!("vireo-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let addr = ListenAddr::Unix(dir.join("soak.sock"));
    // The soak moves the limits through the admin socket, as virt-admin would.
    let admin = dir.join("soak-admin.sock");
    let server = Server::bind_with(
        DaemonConfig {
            backend: opts.backend,
            admin: Some(admin.clone()),
            ..DaemonConfig::default()
        },
        ServerConfig {
            listen: vec![addr.clone()],
            min_workers: 2,
            max_workers: 8,
            prio_workers: 2,
            ..ServerConfig::default()
        },
    )?;
    let mut result = SoakResult {
        backend: server.backend_name().to_owned(),
        ..SoakResult::default()
    };
    let server_name = server.name().to_owned();
    let stop = server.shutdown_handle();
    let running = thread::Builder::new()
        .name("soak-server".into())
        .spawn(move || server.run())?;
    let start = Instant::now();
    let end = start + opts.duration;
    let done = Arc::new(AtomicBool::new(false));

    // Limits change every second: max cycling 2..=10 workers, min 1 or 2; a STATS call
    // after each change shows the queue and the workers.
    let limits = {
        let (addr, done) = (addr.clone(), Arc::clone(&done));
        let name = server_name.clone();
        thread::spawn(move || -> PoolSeen {
            let mut seen = PoolSeen {
                min_workers: u64::MAX,
                ..PoolSeen::default()
            };
            let mut i = 0u32;
            while !done.load(SeqCst) {
                thread::sleep(Duration::from_secs(1));
                i += 1;
                let outcome = AdminClient::connect(&admin)
                    .and_then(|mut a| {
                        a.set_threadpool_parameters(
                            &name,
                            Some(1 + i % 2),
                            Some(2 + i % 9),
                            Some(1 + i % 3),
                        )?;
                        a.close()
                    })
                    .and_then(|()| Client::connect(&addr))
                    .and_then(|mut c| {
                        c.set_timeout(Some(Duration::from_secs(30)))?;
                        c.stats()
                    });
                seen.made += 1;
                match outcome.ok().and_then(|s| pool_stats(&s)) {
                    Some((depth, workers, rebuilds)) => {
                        seen.rebuilds = rebuilds;
                        seen.max_queue_depth = seen.max_queue_depth.max(depth);
                        seen.min_workers = seen.min_workers.min(workers);
                        seen.max_workers = seen.max_workers.max(workers);
                    }
                    None => seen.failed += 1,
                }
            }
            seen
        })
    };
    // One sample per second, into a vector sized for the whole run (up to a day) up front: one
    // growing as it goes would show in the live heap as a leak of 32 bytes a second.
    let sampler = {
        let done = Arc::clone(&done);
        let expected = opts.duration.as_secs().min(86_400) as usize + 64;
        thread::spawn(move || -> Vec<Sample> {
            let mut out = Vec::with_capacity(expected);
            while !done.load(SeqCst) {
                if let Ok(s) = sample(start) {
                    out.push(s);
                }
                thread::sleep(Duration::from_secs(1));
            }
            out
        })
    };

    let mut outcome = Ok(());
    while Instant::now() < end {
        let left = end.saturating_duration_since(Instant::now());
        let mut cfg = LoadConfig::new(addr.clone());
        cfg.clients = opts.clients;
        cfg.inflight = 4;
        cfg.duration = opts.window.min(left).max(Duration::from_millis(100));
        cfg.payload = 512;
        cfg.sleep_ms = 20;
        cfg.mix = vec![
            (Procedure::Echo, 8),
            (Procedure::Hash, 4),
            (Procedure::Sleep, 3),
            (Procedure::Stats, 1),
        ];
        match run_load(&cfg) {
            Ok(r) => {
                result.sent += r.sent;
                result.received += r.received;
                result.errors += r.errors;
                for e in r.error_samples {
                    if result.error_samples.len() < 10 {
                        result.error_samples.push(e);
                    }
                }
            }
            Err(e) => {
                outcome = Err(io::Error::new(
                    e.kind(),
                    format!(
                        "window {} at {:.0} s: the load generator failed: {e}",
                        result.windows + 1,
                        start.elapsed().as_secs_f64()
                    ),
                ));
                break;
            }
        }
        if running.is_finished() {
            break; // the server stopped by itself: reported below
        }
        result.windows += 1;
        progress(start.elapsed(), &result);
    }
    done.store(true, SeqCst);
    let seen = limits.join().unwrap_or_default();
    result.limit_changes = seen.made;
    result.limit_errors = seen.failed;
    result.max_queue_depth = seen.max_queue_depth;
    result.min_workers_seen = seen.min_workers.min(seen.max_workers);
    result.max_workers_seen = seen.max_workers;
    result.backend_rebuilds = seen.rebuilds;
    result.samples = sampler.join().unwrap_or_default();
    // A server that stopped before it was told to is the first thing to report: the load
    // generator's error (its socket gone) only follows from it.
    let stopped_early = running.is_finished();
    stop.shutdown();
    let served = match running.join() {
        Ok(Ok(_)) if !stopped_early => Ok(()),
        Ok(Ok(_)) => Err(io::Error::other(format!(
            "the server stopped at {:.0} s without being asked",
            start.elapsed().as_secs_f64()
        ))),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("the server failed: {e} ({e:?})"),
        )),
        Err(panic) => Err(io::Error::other(format!(
            "the server panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        ))),
    };
    let _ = std::fs::remove_dir_all(&dir);
    served.and(outcome).map(|()| result)
}

/// What the limits thread saw.
#[derive(Debug, Default)]
struct PoolSeen {
    made: u64,
    failed: u64,
    max_queue_depth: u64,
    min_workers: u64,
    max_workers: u64,
    rebuilds: u64,
}

/// `(queue_depth, workers, backend_rebuilds)` from a STATS reply.
fn pool_stats(json: &str) -> Option<(u64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let pool = v.get("pool")?;
    Some((
        pool.get("queue_depth")?.as_u64()?,
        pool.get("workers")?.as_u64()?,
        v.get("loop")?.get("backend_rebuilds")?.as_u64()?,
    ))
}

/// The soak's report: totals, RSS and fds after warm-up, and the verdicts.
pub fn report(r: &SoakResult, opts: &SoakOptions) -> Report {
    // Warm-up: the first fifth of the run (at least 10 s when the run is long enough).
    let total = r.samples.last().map_or(0.0, |s| s.at);
    let warm = (total / 5.0).max(total.min(10.0));
    let after: Vec<&Sample> = r.samples.iter().filter(|s| s.at >= warm).collect();
    let half = after.len() / 2;
    let median = |xs: &[&Sample], f: fn(&Sample) -> i64| -> i64 {
        let mut v: Vec<i64> = xs.iter().map(|s| f(s)).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let halves = |f: fn(&Sample) -> i64| (median(&after[..half], f), median(&after[half..], f));
    let (rss_a, rss_b) = halves(|s| s.rss_kib as i64);
    let (fds_a, fds_b) = halves(|s| s.fds as i64);
    let (heap_a, heap_b) = halves(|s| s.heap_kib);
    let max_fds = after.iter().map(|s| s.fds).max().unwrap_or(0);
    let growth = if rss_a > 0 {
        rss_b as f64 / rss_a as f64 - 1.0
    } else {
        0.0
    };
    // The live heap swings with the calls in flight (each holds its message and reply) by
    // tens of KiB between samples; the medians of the halves move far less. The check allows
    // 64 KiB or 5%, whichever is more: a leak of one byte per call shows within minutes.
    let heap_allowance = (heap_a.abs() / 20).max(64);
    let mut rep = Report {
        bench: "soak".into(),
        intro: vec![format!(
            "vireo-bench soak on {}: {:.0} s, {} windows of {} clients (connect, {:.1} s of ECHO/HASH/SLEEP 20 ms/STATS, disconnect), threadpool limits changed through the admin socket every second; RSS and fds of this process (server and load) sampled every second, compared after a {:.0} s warm-up",
            r.backend,
            total,
            r.windows,
            opts.clients,
            opts.window.as_secs_f64(),
            warm
        )],
        columns: ["measure", "value"].map(String::from).to_vec(),
        ..Report::default()
    };
    let rows = [
        ("calls sent", r.sent.to_string()),
        ("replies received", r.received.to_string()),
        ("errors", r.errors.to_string()),
        (
            "limit changes + STATS (failed)",
            format!("{} ({})", r.limit_changes, r.limit_errors),
        ),
        (
            "pool: deepest queue, workers seen",
            format!(
                "{} calls, {}..={}",
                r.max_queue_depth, r.min_workers_seen, r.max_workers_seen
            ),
        ),
        (
            "server loop: backend rebuilds",
            r.backend_rebuilds.to_string(),
        ),
        (
            "RSS KiB, 1st / 2nd half median",
            format!("{rss_a} / {rss_b}"),
        ),
        ("RSS growth", format!("{:+.1}%", growth * 100.0)),
        (
            "live heap KiB, 1st / 2nd half median",
            format!("{heap_a} / {heap_b}"),
        ),
        (
            "fds, 1st / 2nd half median (max)",
            format!("{fds_a} / {fds_b} ({max_fds})"),
        ),
    ];
    for (k, v) in rows {
        rep.rows.push(vec![k.into(), v]);
    }
    for e in &r.error_samples {
        rep.rows.push(vec!["error".into(), e.clone()]);
    }
    rep.json.push(serde_json::json!({
        "bench": "soak", "backend": r.backend, "duration_s": total, "windows": r.windows,
        "clients": opts.clients, "sent": r.sent, "received": r.received, "errors": r.errors,
        "limit_changes": r.limit_changes, "limit_errors": r.limit_errors,
        "max_queue_depth": r.max_queue_depth, "min_workers_seen": r.min_workers_seen,
        "max_workers_seen": r.max_workers_seen, "backend_rebuilds": r.backend_rebuilds,
        "rss_kib_first_half": rss_a, "rss_kib_second_half": rss_b,
        "heap_kib_first_half": heap_a, "heap_kib_second_half": heap_b,
        "fds_first_half": fds_a, "fds_second_half": fds_b, "fds_max": max_fds,
        "samples": r.samples.iter().map(|s| [s.at, s.rss_kib as f64, s.fds as f64, s.heap_kib as f64]).collect::<Vec<_>>(),
    }));
    rep.targets.push(Target {
        what: "every call answered (sent = received, no error)".into(),
        measured: format!(
            "{} sent, {} received, {} errors",
            r.sent, r.received, r.errors
        ),
        met: r.sent == r.received && r.errors == 0 && r.limit_errors == 0,
    });
    rep.targets.push(Target {
        what: "RSS flat after warm-up (second-half median at most 10% above the first)".into(),
        measured: format!("{:+.1}%", growth * 100.0),
        met: growth <= 0.10,
    });
    rep.targets.push(Target {
        what:
            "live heap flat after warm-up (second-half median at most 64 KiB or 5% above the first)"
                .into(),
        measured: format!("{heap_a} then {heap_b} KiB"),
        met: heap_b <= heap_a + heap_allowance,
    });
    rep.targets.push(Target {
        what: "fds flat after warm-up (second-half median at most 2 above the first)".into(),
        measured: format!("{fds_a} then {fds_b}"),
        met: fds_b <= fds_a + 2,
    });
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(heap: impl Fn(f64) -> i64) -> SoakResult {
        SoakResult {
            backend: "test".into(),
            sent: 10,
            received: 10,
            samples: (0..100)
                .map(|i| {
                    let at = f64::from(i);
                    Sample {
                        at,
                        rss_kib: 20_000,
                        fds: 75,
                        heap_kib: heap(at),
                    }
                })
                .collect(),
            ..SoakResult::default()
        }
    }

    fn verdicts(r: &SoakResult) -> Vec<bool> {
        report(r, &SoakOptions::default())
            .targets
            .iter()
            .map(|t| t.met)
            .collect()
    }

    #[test]
    fn a_growing_heap_fails_only_the_heap_check() {
        // 4 KiB a second: the halves' medians lie 40 s apart, 160 KiB, over the 64 KiB allowance.
        let leaking = run_with(|at| 700 + (at * 4.0) as i64);
        assert_eq!(verdicts(&leaking), [true, true, false, true]);
        let flat = run_with(|at| 700 + (at as i64 % 7) * 10);
        assert_eq!(verdicts(&flat), [true, true, true, true]);
    }

    #[test]
    fn a_lost_reply_fails_the_first_check() {
        let mut r = run_with(|_| 700);
        r.received -= 1;
        assert_eq!(verdicts(&r), [false, true, true, true]);
    }
}
