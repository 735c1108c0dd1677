//! Dispatch while other threads talk to the loop: bench.c's rounds (see [`crate::pipes`]) on
//! a vireo loop while 0, 1 or 2 other threads call `invoke` and `update_handle` as fast as they
//! can (the daemon's real workload: its workers hand every reply back through `invoke`), and
//! on mio and calloop while other threads send closures through their channels.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::thread;

use crate::pipes::{Counters, Pipes, REPLY, round_marked, start};
use crate::report::{Chart, Report, Target, median};

/// What `vireo-bench contention` runs.
#[derive(Debug, Clone)]
pub struct ContentionOptions {
    /// Socketpairs.
    pub pipes: usize,
    /// First writes per round (the active pairs).
    pub active: usize,
    /// Chained writes per round.
    pub writes: usize,
    /// Measured rounds per point (one warm-up round more).
    pub rounds: usize,
    /// Numbers of other threads (each point runs with that many talkers).
    pub talkers: Vec<usize>,
    /// Systems (`vireo-BACKEND`, `mio`, `calloop`); all of them when empty.
    pub systems: Vec<String>,
    /// Bytes each talker's closure captures: 0 (nothing, so boxing it allocates nothing) and
    /// [`REPLY`] (a worker's reply); each value is a point of its own.
    pub captured: Vec<usize>,
}

impl Default for ContentionOptions {
    fn default() -> Self {
        ContentionOptions {
            pipes: 1000,
            active: 100,
            writes: 1000,
            rounds: 15,
            talkers: vec![0, 1, 2],
            systems: Vec::new(),
            captured: vec![0, REPLY],
        }
    }
}

/// The other systems measured beside vireo: each with its own channel to the loop.
const PEERS: [&str; 2] = ["mio", "calloop"];

/// What one system did with `talkers` other threads.
struct Point {
    /// Median dispatch wall time, µs.
    wall: f64,
    /// Median loop-thread CPU time during dispatch, µs.
    cpu: f64,
    /// Median calls the talkers made during one round's dispatch.
    calls: f64,
    /// Calls the talkers made in all.
    total: u64,
}

/// A talker's call count, on a cache line of its own (so that counting costs the loop
/// nothing).
#[repr(align(128))]
#[derive(Default)]
struct Count(AtomicU64);

/// Runs the rounds of one system with `talkers` other threads.
fn measure(
    name: &str,
    opts: &ContentionOptions,
    talkers: usize,
    captured: bool,
) -> io::Result<Point> {
    let pipes = Arc::new(Pipes::new(opts.pipes)?);
    let counters = Arc::new(Counters::default());
    let mut sys = start(name, &pipes, &counters)?;
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<Count>> = Arc::new((0..talkers).map(|_| Count::default()).collect());
    // The rounds start once every talker is talking.
    let talking = Arc::new(Barrier::new(talkers + 1));
    let mut threads = Vec::new();
    for t in 0..talkers {
        let mut talk = sys.talker(captured)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} has no way for other threads to talk to its loop here"),
            )
        })?;
        let (stop, counts, talking) =
            (Arc::clone(&stop), Arc::clone(&counts), Arc::clone(&talking));
        threads.push(thread::spawn(move || {
            talk(0);
            counts[t].0.store(1, Relaxed);
            let mut made = 1u64;
            talking.wait();
            while !stop.load(Relaxed) {
                talk(made);
                made += 1;
                counts[t].0.store(made, Relaxed);
            }
        }));
    }
    talking.wait();
    let calls_now = || counts.iter().map(|c| c.0.load(Relaxed)).sum::<u64>();
    let (mut dispatch, mut cpu, mut calls) = (Vec::new(), Vec::new(), Vec::new());
    let mut result = Ok(());
    for r in 0..=opts.rounds {
        // The talkers' calls during the timed dispatch.
        let mut marks = Vec::with_capacity(2);
        let mut mark = || marks.push(calls_now());
        match round_marked(
            sys.as_mut(),
            &pipes,
            &counters,
            opts.active,
            opts.writes,
            &mut mark,
        ) {
            Ok(done) if r > 0 => {
                dispatch.push(done.dispatch.as_secs_f64() * 1e6);
                cpu.push(done.dispatch_cpu.as_secs_f64() * 1e6);
                calls.push(marks.last().copied().unwrap_or(0).saturating_sub(marks[0]) as f64);
            }
            Ok(_) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let total = calls_now();
    // Run what the talkers left queued, so the loop drops it on this thread.
    let _ = sys.turn();
    result?;
    Ok(Point {
        wall: median(&mut dispatch),
        cpu: median(&mut cpu),
        calls: median(&mut calls),
        total,
    })
}

/// Runs the benchmark and reports it.
///
/// # Errors
///
/// An unknown system or a system's error.
pub fn report(opts: &ContentionOptions, mut progress: impl FnMut(&str)) -> io::Result<Report> {
    let all: Vec<String> = crate::pipes::systems()
        .into_iter()
        .filter(|s| {
            (s.starts_with("vireo-") && !s.starts_with("vireo-any-") && s != crate::pipes::PAUSE)
                || PEERS.contains(&s.as_str())
        })
        .collect();
    let chosen = crate::report::choose(&all, &opts.systems)?;
    let mut rep = Report {
        bench: "contention".into(),
        intro: vec![format!(
            "vireo-bench contention: bench.c dispatch ({} pipes, {} active, {} writes; medians \
             of {} rounds) while other threads talk to the loop as fast as they can: on vireo \
             each talker alternates invoke and update_handle (pausing or resuming an idle \
             watch); mio's and calloop's talkers send closures through their channels (mio: a \
             crossbeam channel and a mio::Waker woken by the first sender after a drain, \
             holding off while {} wait; calloop: calloop::channel), which the loop runs. Each \
             closure captures nothing (0 B: boxing it allocates nothing) or {} B (a worker's \
             reply). ratio = dispatch with talkers / quiet. Wall time includes the time the \
             talkers take the loop's cores from it (3 threads on 2 cores cannot stay at 1.0x); \
             loop CPU is what the loop thread itself spent; the loop's extra CPU per talker \
             call is (loop CPU - quiet loop CPU) / calls made during the dispatch",
            opts.pipes,
            opts.active,
            opts.writes,
            opts.rounds,
            crate::pipes::MIO_BACKLOG,
            REPLY
        )],
        columns: [
            "system",
            "captured B",
            "talkers",
            "dispatch us",
            "vs quiet",
            "loop cpu us",
            "cpu vs quiet",
            "talker calls",
            "loop ns per call",
        ]
        .map(String::from)
        .to_vec(),
        ..Report::default()
    };
    let mut chart = Chart {
        name: "contention".into(),
        title: "contention: dispatch us with other threads talking (lower is better)".into(),
        y_label: "microseconds".into(),
        groups: Vec::new(),
    };
    let mut worst: Option<(f64, String)> = None;
    let mut worst_cpu: Option<(f64, String)> = None;
    if let Some(bad) = opts.captured.iter().find(|&&c| c != 0 && c != REPLY) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("captured bytes must be 0 or {REPLY}, not {bad}"),
        ));
    }
    // The quiet point first (the base of the ratios), then every talker count with each
    // closure size.
    let mut plan: Vec<(usize, Option<usize>)> = Vec::new();
    if opts.talkers.contains(&0) {
        plan.push((0, None));
    }
    for &c in &opts.captured {
        plan.extend(
            opts.talkers
                .iter()
                .filter(|&&t| t > 0)
                .map(|&t| (t, Some(c))),
        );
    }
    for name in &chosen {
        let mut quiet = None;
        let mut quiet_cpu = None;
        let mut bars = Vec::new();
        for &(talkers, captured) in &plan {
            progress(&format!(
                "{name}, {talkers} talkers, {} B captured",
                captured.unwrap_or(0)
            ));
            let Point {
                wall: us,
                cpu,
                calls,
                total,
            } = measure(name, opts, talkers, captured.is_some_and(|c| c > 0))?;
            let base = *quiet.get_or_insert(us);
            let ratio = us / base;
            let quiet_cpu = *quiet_cpu.get_or_insert(cpu);
            let cpu_ratio = cpu / quiet_cpu;
            // The loop's extra CPU for each call the talkers made meanwhile.
            let per_call = (talkers > 0 && calls > 0.0).then(|| (cpu - quiet_cpu) * 1e3 / calls);
            let is_vireo = name.starts_with("vireo-");
            if is_vireo && talkers == 2 && worst.as_ref().is_none_or(|w| ratio > w.0) {
                worst = Some((ratio, name.clone()));
            }
            if is_vireo && talkers == 2 && worst_cpu.as_ref().is_none_or(|w| cpu_ratio > w.0) {
                worst_cpu = Some((cpu_ratio, name.clone()));
            }
            rep.rows.push(vec![
                name.clone(),
                captured.map_or_else(|| "-".into(), |c| c.to_string()),
                talkers.to_string(),
                format!("{us:.1}"),
                format!("{ratio:.2}"),
                format!("{cpu:.1}"),
                format!("{cpu_ratio:.2}"),
                format!("{calls:.0}"),
                per_call.map_or_else(|| "-".into(), |n| format!("{n:.1}")),
            ]);
            rep.json.push(serde_json::json!({
                "bench": "contention",
                "system": name,
                "talkers": talkers,
                "captured_bytes": captured,
                "dispatch_us_median": us,
                "ratio_vs_quiet": ratio,
                "loop_cpu_us_median": cpu,
                "cpu_ratio_vs_quiet": cpu_ratio,
                "talker_calls_median": calls,
                "talker_calls_total": total,
                "loop_ns_per_talker_call": per_call,
                "pipes": opts.pipes,
                "active": opts.active,
                "writes": opts.writes,
                "rounds": opts.rounds,
            }));
            bars.push((
                match captured {
                    Some(c) => format!("{talkers} talkers, {c} B"),
                    None => format!("{talkers} talkers"),
                },
                us,
            ));
        }
        chart.groups.push((name.clone(), bars));
    }
    if let Some((ratio, name)) = worst {
        rep.targets.push(Target {
            what: "dispatch with 2 threads talking <= 1.10x quiet".into(),
            measured: format!("worst {ratio:.2}x ({name})"),
            met: ratio <= 1.10,
        });
    }
    if let Some((ratio, name)) = worst_cpu {
        rep.targets.push(Target {
            what: "loop-thread CPU with 2 threads talking <= 1.10x quiet".into(),
            measured: format!("worst {ratio:.2}x ({name})"),
            met: ratio <= 1.10,
        });
    }
    rep.charts.push(chart);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn talkers_talk_and_every_round_completes() {
        let opts = ContentionOptions {
            pipes: 20,
            active: 5,
            writes: 50,
            rounds: 2,
            talkers: vec![1],
            systems: vec!["vireo-poll".into()],
            captured: vec![REPLY],
        };
        for name in ["vireo-poll", "mio", "calloop"] {
            let p = measure(name, &opts, 1, true).unwrap();
            assert!(p.wall > 0.0 && p.cpu > 0.0, "{name}");
            assert!(p.total > 0, "{name}: the talker made no call");
            assert!(p.calls >= 0.0 && p.calls <= p.total as f64, "{name}");
        }
        let err = measure("raw-epoll", &opts, 1, false)
            .err()
            .expect("raw epoll has no talker");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
