//! Timers: (a) adding then cancelling many timers with random periods, (b) thousands of periodic
//! timers firing for a while: loop CPU time per firing and lateness (never early). vireo on each
//! backend beside calloop's timers.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vireo_backends::{AnyBackend, BackendKind, Choice};
use vireo_core::{EventLoop, Frequency};

use crate::report::{Chart, Report, Target, thread_cpu};

/// What `vireo-bench timers` runs.
#[derive(Debug, Clone)]
pub struct TimersOptions {
    /// Timers added and then cancelled.
    pub add_cancel: usize,
    /// Periodic timers (periods 1-10 ms).
    pub periodic: usize,
    /// How long the periodic timers run.
    pub duration: Duration,
    /// Systems to run (all when empty).
    pub systems: Vec<String>,
}

impl Default for TimersOptions {
    fn default() -> TimersOptions {
        TimersOptions {
            add_cancel: 1_000_000,
            periodic: 10_000,
            duration: Duration::from_secs(2),
            systems: Vec::new(),
        }
    }
}

/// The systems: vireo on each compiled backend that starts here, then calloop.
pub fn systems() -> Vec<String> {
    crate::report::systems_with(&["calloop"])
}

/// The most timers calloop adds and cancels in part (a).
pub const CALLOOP_ADD_CANCEL: usize = 20_000;

/// What one system measured.
#[derive(Debug, Clone)]
pub struct TimerResult {
    /// Nanoseconds per add, with the other timers pending.
    pub add_ns: f64,
    /// Nanoseconds per cancel.
    pub cancel_ns: f64,
    /// Firings of the periodic timers.
    pub firings: u64,
    /// Firings before their deadline (must be 0).
    pub early: u64,
    /// Loop-thread CPU time per firing, in nanoseconds.
    pub cpu_ns_per_firing: f64,
    /// Lateness in microseconds.
    pub lateness_us: Histogram<u64>,
}

fn periods(n: usize, seed: u64, lo: Duration, hi: Duration) -> Vec<Duration> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            Duration::from_nanos(rng.random_range(lo.as_nanos() as u64..=hi.as_nanos() as u64))
        })
        .collect()
}

impl TimerResult {
    /// Per-operation and per-firing figures from one system's totals.
    fn from_run(
        added: usize,
        add: Duration,
        cancel: Duration,
        (lateness, firings): Stats,
        early: u64,
        cpu: Duration,
    ) -> TimerResult {
        let per = |d: Duration, n: u64| d.as_nanos() as f64 / n.max(1) as f64;
        TimerResult {
            add_ns: per(add, added as u64),
            cancel_ns: per(cancel, added as u64),
            firings,
            early,
            cpu_ns_per_firing: per(cpu, firings),
            lateness_us: lateness,
        }
    }
}

/// Runs both parts on one system.
///
/// # Errors
///
/// An unknown system or the system's own errors.
pub fn run(name: &str, opts: &TimersOptions) -> io::Result<TimerResult> {
    let long = periods(
        opts.add_cancel,
        1,
        Duration::from_millis(1),
        Duration::from_secs(10),
    );
    let short = periods(
        opts.periodic,
        2,
        Duration::from_millis(1),
        Duration::from_millis(10),
    );
    if let Some(kind) = name.strip_prefix("vireo-") {
        vireo(kind.parse()?, &long, &short, opts.duration)
    } else if name == "calloop" {
        // calloop's timers cost tens of microseconds per add and far more per cancel at this
        // size (linear in the number pending): a million would take many minutes.
        calloop(
            &long[..long.len().min(CALLOOP_ADD_CANCEL)],
            &short,
            opts.duration,
        )
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown system {name}"),
        ))
    }
}

/// (lateness histogram in µs, firings)
type Stats = (Histogram<u64>, u64);

/// A periodic timer's schedule: deadlines at `base + k * period`, where the real `base` lies
/// between `before` and `after` (read around the call that added the timer). Lateness is measured
/// from the latest grid deadline the firing reached on `after`'s grid (the latest possible
/// deadline: periods a busy loop missed are skipped, as vireo coalesces them). Early firing is
/// judged by counting: every firing serves a distinct deadline that has passed, so a timer that
/// fired before `before + period`, or more often than `before`'s grid had deadlines up to its
/// last firing, fired early. Neither check can be an artifact of not knowing `base` exactly or
/// of a callback running a little after the loop read the clock.
struct Grid {
    before: Instant,
    after: Instant,
    period: Duration,
    firings: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    /// The index of the last deadline served.
    served: u32,
}

impl Grid {
    fn new(before: Instant, after: Instant, period: Duration) -> Grid {
        Grid {
            before,
            after,
            period,
            firings: 0,
            first: None,
            last: None,
            served: 0,
        }
    }

    /// Records a firing at `now`; returns the next deadline on `after`'s grid.
    fn fired(&mut self, now: Instant, s: &mut Stats) -> Instant {
        s.1 += 1;
        self.firings += 1;
        self.first.get_or_insert(now);
        self.last = Some(now);
        let k = now.saturating_duration_since(self.after).as_nanos() / self.period.as_nanos();
        // Each firing serves a later deadline than the last one did (the first is deadline 1).
        let k = u32::try_from(k).unwrap_or(u32::MAX).max(self.served + 1);
        self.served = k;
        let served = self.after + self.period * k;
        let _ =
            s.0.record(now.saturating_duration_since(served).as_micros() as u64 + 1);
        self.after + self.period * (k + 1)
    }

    /// Firings that came before any deadline allowed them.
    fn early(&self) -> u64 {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return 0;
        };
        let before_first = u64::from(first < self.before + self.period);
        let deadlines = (last.saturating_duration_since(self.before).as_nanos()
            / self.period.as_nanos()) as u64;
        before_first.max(self.firings.saturating_sub(deadlines))
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn vireo(
    kind: BackendKind,
    long: &[Duration],
    short: &[Duration],
    duration: Duration,
) -> io::Result<TimerResult> {
    let mut lp = EventLoop::with_backend(AnyBackend::with_choice(Choice::Only(kind))?)?;
    let h = lp.handle().clone();
    // (a), twice: the first pass grows the tables and is not recorded.
    let (mut add, mut cancel) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..2 {
        let mut ids = Vec::with_capacity(long.len());
        let started = Instant::now();
        for &p in long {
            ids.push(h.add_timeout(Frequency::Period(p), |_, _| {})?);
        }
        add = started.elapsed();
        let started = Instant::now();
        for id in ids {
            h.remove_timeout(id)?;
        }
        cancel = started.elapsed();
        lp.run_once_timeout(Duration::ZERO)?;
    }
    // (b)
    let stats = Arc::new(Mutex::new((histogram(), 0u64)));
    let mut ids = Vec::with_capacity(short.len());
    let mut grids = Vec::with_capacity(short.len());
    for &p in short {
        let before = Instant::now();
        let grid = Arc::new(Mutex::new(None::<Grid>));
        grids.push(Arc::clone(&grid));
        let (stats, mine) = (Arc::clone(&stats), Arc::clone(&grid));
        ids.push(h.add_timeout(Frequency::Period(p), move |_, _| {
            let now = Instant::now();
            if let Some(g) = mine.lock().unwrap().as_mut() {
                g.fired(now, &mut stats.lock().unwrap());
            }
        })?);
        *grid.lock().unwrap() = Some(Grid::new(before, Instant::now(), p));
    }
    let cpu = thread_cpu();
    let end = Instant::now() + duration;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        lp.run_once_timeout(left)?;
    }
    let cpu = thread_cpu() - cpu;
    for id in ids {
        h.remove_timeout(id)?;
    }
    lp.run_once_timeout(Duration::ZERO)?;
    let (lateness, firings) = stats.lock().unwrap().clone();
    let early = grids
        .iter()
        .map(|g| g.lock().unwrap().as_ref().map_or(0, Grid::early))
        .sum();
    Ok(TimerResult::from_run(
        long.len(),
        add,
        cancel,
        (lateness, firings),
        early,
        cpu,
    ))
}

fn calloop(long: &[Duration], short: &[Duration], duration: Duration) -> io::Result<TimerResult> {
    use calloop::timer::{TimeoutAction, Timer};
    let mut lp: calloop::EventLoop<'static, ()> =
        calloop::EventLoop::try_new().map_err(io::Error::other)?;
    let h = lp.handle();
    let mut tokens = Vec::with_capacity(long.len());
    let started = Instant::now();
    for &p in long {
        tokens.push(
            h.insert_source(Timer::from_duration(p), |_, _, _| TimeoutAction::Drop)
                .map_err(|e| io::Error::other(e.error))?,
        );
    }
    let add = started.elapsed();
    let started = Instant::now();
    for t in tokens {
        h.remove(t);
    }
    let cancel = started.elapsed();
    lp.dispatch(Some(Duration::ZERO), &mut ())
        .map_err(io::Error::other)?;
    let stats = Rc::new(RefCell::new((histogram(), 0u64)));
    let mut tokens = Vec::with_capacity(short.len());
    let mut grids = Vec::with_capacity(short.len());
    for &p in short {
        let before = Instant::now();
        let stats = Rc::clone(&stats);
        let grid = Rc::new(RefCell::new(None::<Grid>));
        grids.push(Rc::clone(&grid));
        let mine = Rc::clone(&grid);
        let token = h
            .insert_source(Timer::from_duration(p), move |_deadline, _, _| {
                let now = Instant::now();
                // The same drift-free schedule as vireo's, measured the same way.
                match mine.borrow_mut().as_mut() {
                    Some(g) => TimeoutAction::ToInstant(g.fired(now, &mut stats.borrow_mut())),
                    None => TimeoutAction::ToDuration(p),
                }
            })
            .map_err(|e| io::Error::other(e.error))?;
        *grid.borrow_mut() = Some(Grid::new(before, Instant::now(), p));
        tokens.push(token);
    }
    let cpu = thread_cpu();
    let end = Instant::now() + duration;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        lp.dispatch(Some(left), &mut ()).map_err(io::Error::other)?;
    }
    let cpu = thread_cpu() - cpu;
    for t in tokens {
        h.remove(t);
    }
    let (lateness, firings) = stats.borrow().clone();
    let early = grids
        .iter()
        .map(|g| g.borrow().as_ref().map_or(0, Grid::early))
        .sum();
    Ok(TimerResult::from_run(
        long.len(),
        add,
        cancel,
        (lateness, firings),
        early,
        cpu,
    ))
}

/// Runs the benchmark on every chosen system and reports it.
///
/// # Errors
///
/// An unknown system or a system's error.
pub fn report(opts: &TimersOptions, mut progress: impl FnMut(&str)) -> io::Result<Report> {
    let chosen = crate::report::choose(&systems(), &opts.systems)?;
    let mut rep = Report {
        bench: "timers".into(),
        intro: vec![format!(
            "vireo-bench timers: (a) add {} timers with random periods (1 ms-10 s), then cancel \
             them all (calloop: at most {CALLOOP_ADD_CANCEL}); (b) {} periodic timers of 1-10 ms for {:.1} s: loop-thread CPU per firing \
             and lateness against a drift-free schedule",
            opts.add_cancel,
            opts.periodic,
            opts.duration.as_secs_f64()
        )],
        columns: [
            "system",
            "add ns",
            "cancel ns",
            "add+cancel ns/op",
            "firings",
            "early",
            "cpu ns/firing",
            "late p50 us",
            "late p99 us",
        ]
        .map(String::from)
        .to_vec(),
        ..Report::default()
    };
    let mut op_chart = Chart {
        name: "timers-add-cancel".into(),
        title: "timers: ns per add or cancel (lower is better)".into(),
        y_label: "nanoseconds".into(),
        groups: vec![("add".into(), Vec::new()), ("cancel".into(), Vec::new())],
    };
    let mut late_chart = Chart {
        name: "timers-lateness".into(),
        title: "timers: lateness (lower is better)".into(),
        y_label: "microseconds".into(),
        groups: vec![("p50".into(), Vec::new()), ("p99".into(), Vec::new())],
    };
    let mut worst_vireo_op: Option<f64> = None;
    let mut early_total = 0;
    for name in &chosen {
        progress(name);
        let r = run(name, opts)?;
        let per_op = (r.add_ns + r.cancel_ns) / 2.0;
        let (p50, p99) = (
            r.lateness_us.value_at_quantile(0.5),
            r.lateness_us.value_at_quantile(0.99),
        );
        if name.starts_with("vireo-") {
            worst_vireo_op = Some(worst_vireo_op.map_or(per_op, |w: f64| w.max(per_op)));
            early_total += r.early;
        }
        rep.rows.push(vec![
            name.clone(),
            format!("{:.0}", r.add_ns),
            format!("{:.0}", r.cancel_ns),
            format!("{per_op:.0}"),
            r.firings.to_string(),
            r.early.to_string(),
            format!("{:.0}", r.cpu_ns_per_firing),
            p50.to_string(),
            p99.to_string(),
        ]);
        rep.json.push(serde_json::json!({
            "bench": "timers", "system": name,
            "backend": name.strip_prefix("vireo-").unwrap_or(""),
            "timers_added": if name == "calloop" { opts.add_cancel.min(CALLOOP_ADD_CANCEL) } else { opts.add_cancel }, "add_ns": r.add_ns, "cancel_ns": r.cancel_ns,
            "add_cancel_ns_per_op": per_op, "periodic_timers": opts.periodic,
            "duration_s": opts.duration.as_secs_f64(), "firings": r.firings, "early": r.early,
            "cpu_ns_per_firing": r.cpu_ns_per_firing, "lateness_p50_us": p50,
            "lateness_p99_us": p99,
        }));
        op_chart.groups[0].1.push((name.clone(), r.add_ns));
        op_chart.groups[1].1.push((name.clone(), r.cancel_ns));
        late_chart.groups[0].1.push((name.clone(), p50 as f64));
        late_chart.groups[1].1.push((name.clone(), p99 as f64));
    }
    if let Some(w) = worst_vireo_op {
        rep.targets.push(Target {
            what: format!("add+cancel <= 100 ns per op at {} timers", opts.add_cancel),
            measured: format!("worst vireo backend {w:.0} ns"),
            met: w <= 100.0,
        });
        rep.targets.push(Target {
            what: "no early firing".into(),
            measured: format!("{early_total} early firings"),
            met: early_total == 0,
        });
    }
    rep.charts = vec![op_chart, late_chart];
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_counts_early_and_late_firings() {
        let p = Duration::from_millis(10);
        let t0 = Instant::now();
        let mut s: Stats = (histogram(), 0);
        // On time, then 3 ms late, then a coalesced firing 2.5 periods on.
        let mut g = Grid::new(t0, t0, p);
        g.fired(t0 + p, &mut s);
        g.fired(t0 + 2 * p + Duration::from_millis(3), &mut s);
        g.fired(t0 + 4 * p + Duration::from_millis(5), &mut s);
        assert_eq!(g.early(), 0);
        assert_eq!(s.1, 3);
        assert!(s.0.max() >= 3000 && s.0.max() <= 5010, "{}", s.0.max());
        // Before the first deadline.
        let mut g = Grid::new(t0, t0, p);
        g.fired(t0 + p / 2, &mut s);
        assert_eq!(g.early(), 1);
        // Twice for one deadline.
        let mut g = Grid::new(t0, t0, p);
        g.fired(t0 + p, &mut s);
        g.fired(t0 + p + Duration::from_millis(1), &mut s);
        assert_eq!(g.early(), 1);
    }
}
