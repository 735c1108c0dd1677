//! Dispatch while other threads talk to the loop: bench.c's rounds (see [`crate::pipes`]) on
//! a vireo loop while 0, 1 or 2 other threads call `invoke` and `update_handle` as fast as they
//! can. The daemon's real workload: its workers hand every reply back through `invoke`.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::thread;

use vireo_core::Events;

use crate::pipes::{Counters, Pipes, round, start};
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
    /// Systems (`vireo-BACKEND`); all compiled vireo backends when empty.
    pub systems: Vec<String>,
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
        }
    }
}

/// What one system did with `talkers` other threads.
struct Point {
    /// Median dispatch wall time, µs.
    wall: f64,
    /// Median loop-thread CPU time during dispatch, µs.
    cpu: f64,
    /// Calls the talkers made.
    calls: u64,
}

/// Runs the rounds of one system with `talkers` other threads.
fn measure(name: &str, opts: &ContentionOptions, talkers: usize) -> io::Result<Point> {
    let pipes = Arc::new(Pipes::new(opts.pipes)?);
    let counters = Arc::new(Counters::default());
    let mut sys = start(name, &pipes, &counters)?;
    let handle = sys.vireo_handle().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name} is not a vireo loop"),
        )
    })?;
    // A watch of its own for the talkers to update (an idle socket: it never fires).
    let (idle, _peer) = std::os::unix::net::UnixStream::pair()?;
    let target = handle
        .add_handle(idle.as_raw_fd(), Events::empty(), |_, _, _, _| {})
        .map_err(io::Error::other)?;
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    // The rounds start once every talker is talking.
    let talking = Arc::new(Barrier::new(talkers + 1));
    let threads: Vec<_> = (0..talkers)
        .map(|t| {
            let (h, stop, calls) = (handle.clone(), Arc::clone(&stop), Arc::clone(&calls));
            let talking = Arc::clone(&talking);
            thread::spawn(move || {
                let _ = h.invoke(|_| {});
                let mut made = 1u64;
                talking.wait();
                while !stop.load(Relaxed) {
                    // Each talker alternates: an invoke, then a pause/resume of the idle watch.
                    if made % 2 == 0 {
                        let _ = h.invoke(|_| {});
                    } else {
                        let events = if (made / 2 + t as u64) % 2 == 0 {
                            Events::READABLE
                        } else {
                            Events::empty()
                        };
                        let _ = h.update_handle(target, events);
                    }
                    made += 1;
                }
                calls.fetch_add(made, Relaxed);
            })
        })
        .collect();
    talking.wait();
    let (mut dispatch, mut cpu) = (Vec::new(), Vec::new());
    let mut result = Ok(());
    for r in 0..=opts.rounds {
        match round(sys.as_mut(), &pipes, &counters, opts.active, opts.writes) {
            Ok(done) if r > 0 => {
                dispatch.push(done.dispatch.as_secs_f64() * 1e6);
                cpu.push(done.dispatch_cpu.as_secs_f64() * 1e6);
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
    // Run what the talkers left queued, so the loop drops it on this thread.
    let _ = sys.turn();
    result?;
    drop(idle);
    Ok(Point {
        wall: median(&mut dispatch),
        cpu: median(&mut cpu),
        calls: calls.load(Relaxed),
    })
}

/// Runs the benchmark and reports it.
///
/// # Errors
///
/// An unknown system or a system's error.
pub fn report(opts: &ContentionOptions, mut progress: impl FnMut(&str)) -> io::Result<Report> {
    let vireo: Vec<String> = crate::pipes::systems()
        .into_iter()
        .filter(|s| s.starts_with("vireo-") && !s.starts_with("vireo-any-"))
        .collect();
    let chosen = crate::report::choose(&vireo, &opts.systems)?;
    let mut rep = Report {
        bench: "contention".into(),
        intro: vec![format!(
            "vireo-bench contention: bench.c dispatch ({} pipes, {} active, {} writes; medians \
             of {} rounds) while other threads call invoke and update_handle as fast as they \
             can; ratio = dispatch with talkers / quiet. Wall time includes the time the \
             talkers take the loop's cores from it (3 threads on 2 cores cannot stay at 1.0x); \
             loop CPU is what the loop thread itself spent",
            opts.pipes, opts.active, opts.writes, opts.rounds
        )],
        columns: [
            "system",
            "talkers",
            "dispatch us",
            "vs quiet",
            "loop cpu us",
            "cpu vs quiet",
            "calls by talkers",
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
    for name in &chosen {
        let mut quiet = None;
        let mut quiet_cpu = None;
        let mut bars = Vec::new();
        for &talkers in &opts.talkers {
            progress(&format!("{name}, {talkers} talkers"));
            let Point {
                wall: us,
                cpu,
                calls,
            } = measure(name, opts, talkers)?;
            let base = *quiet.get_or_insert(us);
            let ratio = us / base;
            let cpu_ratio = cpu / *quiet_cpu.get_or_insert(cpu);
            if talkers == 2 && worst.as_ref().is_none_or(|w| ratio > w.0) {
                worst = Some((ratio, name.clone()));
            }
            if talkers == 2 && worst_cpu.as_ref().is_none_or(|w| cpu_ratio > w.0) {
                worst_cpu = Some((cpu_ratio, name.clone()));
            }
            rep.rows.push(vec![
                name.clone(),
                talkers.to_string(),
                format!("{us:.1}"),
                format!("{ratio:.2}"),
                format!("{cpu:.1}"),
                format!("{cpu_ratio:.2}"),
                calls.to_string(),
            ]);
            rep.json.push(serde_json::json!({
                "bench": "contention",
                "system": name,
                "talkers": talkers,
                "dispatch_us_median": us,
                "ratio_vs_quiet": ratio,
                "loop_cpu_us_median": cpu,
                "cpu_ratio_vs_quiet": cpu_ratio,
                "talker_calls": calls,
                "pipes": opts.pipes,
                "active": opts.active,
                "writes": opts.writes,
                "rounds": opts.rounds,
            }));
            bars.push((format!("{talkers} talkers"), us));
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
        };
        let p = measure("vireo-poll", &opts, 1).unwrap();
        assert!(p.wall > 0.0 && p.cpu > 0.0);
        assert!(p.calls > 0, "the talker made no call");
        assert!(measure("raw-epoll", &opts, 0).is_err());
    }
}
