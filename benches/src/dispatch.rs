//! The core's dispatch cost alone: a backend that reports N tokens ready from memory (no system
//! call anywhere), so an iteration is only the core's work: resolve each token, apply the
//! delivery mask, call the callback. Beside it, the floor for any callback dispatcher: a
//! hand-written loop calling the same N boxed closures from a `Vec`.

use std::hint::black_box;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use vireo_core::{Backend, EventLoop, Events, Readiness, Token};

use crate::report::{Chart, Report, Target, median};

/// What `vireo-bench dispatch` runs.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// Numbers of ready watches per iteration.
    pub ready: Vec<usize>,
    /// Readiness reports per run (spread over iterations of `ready` each).
    pub reports: usize,
    /// Runs per point; the median is reported.
    pub runs: usize,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            ready: vec![10, 100, 1000, 10_000],
            reports: 2_000_000,
            runs: 7,
        }
    }
}

/// A backend with no kernel object: every registered fd (but the loop's waker) is reported
/// READABLE by every wait, which never blocks.
#[derive(Debug, Default)]
pub struct Memory {
    registered: Vec<(RawFd, Token)>,
}

impl Backend for Memory {
    const NAME: &'static str = "memory";

    fn new() -> io::Result<Self> {
        Ok(Memory::default())
    }

    fn register(&mut self, fd: RawFd, token: Token, _interest: Events) -> io::Result<()> {
        if token != Token::WAKER {
            self.registered.push((fd, token));
        }
        Ok(())
    }

    fn reregister(&mut self, fd: RawFd, token: Token, _interest: Events) -> io::Result<()> {
        for entry in &mut self.registered {
            if entry.0 == fd {
                entry.1 = token;
            }
        }
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd, _token: Token) -> io::Result<()> {
        self.registered.retain(|e| e.0 != fd);
        Ok(())
    }

    fn wait(&mut self, ready: &mut Vec<Readiness>, _timeout: Option<Duration>) -> io::Result<()> {
        ready.extend(self.registered.iter().map(|&(_, token)| Readiness {
            token,
            events: Events::READABLE,
        }));
        Ok(())
    }
}

/// One point: nanoseconds per readiness for vireo and for the closure loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Ready watches per iteration.
    pub ready: usize,
    /// vireo's median ns per readiness.
    pub vireo_ns: f64,
    /// The closure loop's median ns per call.
    pub closures_ns: f64,
}

/// The callback both sides run: a counter of its own (no shared atomics), kept alive with
/// `black_box`.
fn callback() -> impl FnMut(u64, RawFd, Events) + Send + 'static {
    let mut count = 0u64;
    move |id, fd, events| {
        count += 1;
        black_box((count, id, fd, events));
    }
}

/// Measures one point.
///
/// # Errors
///
/// When `/dev/null` cannot be opened `ready` times (the open-files limit).
pub fn measure(ready: usize, reports: usize, runs: usize) -> io::Result<Point> {
    crate::pipes::raise_fd_limit(ready as u64 + 64);
    let files: Vec<OwnedFd> = (0..ready)
        .map(|_| {
            rustix::fs::open(
                "/dev/null",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(io::Error::from)
        })
        .collect::<io::Result<_>>()?;
    let iterations = (reports / ready.max(1)).max(1);
    let mut lp = EventLoop::with_backend(Memory::default())?;
    for f in &files {
        let mut cb = callback();
        lp.handle()
            .add_handle(f.as_raw_fd(), Events::READABLE, move |_, id, fd, ev| {
                cb(id.as_u64(), fd, ev)
            })
            .map_err(io::Error::other)?;
    }
    // Registers everything; one warm-up iteration.
    lp.run_once_timeout(Duration::ZERO)?;
    type Closure = Box<dyn FnMut(u64, RawFd, Events) + Send>;
    let mut closures: Vec<Closure> = (0..ready)
        .map(|_| Box::new(callback()) as Closure)
        .collect();
    let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    let mut vireo = Vec::new();
    let mut hand = Vec::new();
    for _ in 0..runs {
        let before = lp.stats().dispatched;
        let start = Instant::now();
        for _ in 0..iterations {
            lp.run_once_timeout(Duration::ZERO)?;
        }
        let elapsed = start.elapsed();
        let dispatched = lp.stats().dispatched - before;
        if dispatched != (iterations * ready) as u64 {
            return Err(io::Error::other(format!(
                "dispatched {dispatched} callbacks, expected {}",
                iterations * ready
            )));
        }
        vireo.push(elapsed.as_nanos() as f64 / dispatched as f64);

        let start = Instant::now();
        for _ in 0..iterations {
            for (i, f) in closures.iter_mut().enumerate() {
                f(i as u64 + 1, fds[i], Events::READABLE);
            }
        }
        hand.push(start.elapsed().as_nanos() as f64 / (iterations * ready) as f64);
    }
    Ok(Point {
        ready,
        vireo_ns: median(&mut vireo),
        closures_ns: median(&mut hand),
    })
}

/// Runs the benchmark and reports it.
///
/// # Errors
///
/// As [`measure`].
pub fn report(opts: &DispatchOptions, mut progress: impl FnMut(&str)) -> io::Result<Report> {
    let mut rep = Report {
        bench: "dispatch".into(),
        intro: vec![format!(
            "vireo-bench dispatch: the core alone, on a backend that reports every watch ready \
             from memory (no system call), beside a loop calling the same boxed closures from a \
             Vec; ns per readiness, medians of {} runs of {} reports",
            opts.runs, opts.reports
        )],
        columns: ["ready", "vireo ns", "closures ns", "vireo / closures"]
            .map(String::from)
            .to_vec(),
        ..Report::default()
    };
    let mut chart = Chart {
        name: "dispatch".into(),
        title: "dispatch: ns per readiness, core only (lower is better)".into(),
        y_label: "nanoseconds".into(),
        groups: Vec::new(),
    };
    let mut worst: Option<f64> = None;
    for &ready in &opts.ready {
        progress(&format!("{ready} ready"));
        let p = measure(ready, opts.reports, opts.runs)?;
        let ratio = p.vireo_ns / p.closures_ns;
        worst = Some(worst.map_or(ratio, |w| w.max(ratio)));
        rep.rows.push(vec![
            ready.to_string(),
            format!("{:.1}", p.vireo_ns),
            format!("{:.1}", p.closures_ns),
            format!("{ratio:.2}"),
        ]);
        rep.json.push(serde_json::json!({
            "bench": "dispatch",
            "ready": ready,
            "vireo_ns_per_readiness": p.vireo_ns,
            "closures_ns_per_call": p.closures_ns,
            "ratio": ratio,
            "runs": opts.runs,
            "reports": opts.reports,
        }));
        chart.groups.push((
            format!("{ready} ready"),
            vec![
                ("vireo".into(), p.vireo_ns),
                ("closures".into(), p.closures_ns),
            ],
        ));
    }
    if let Some(worst) = worst {
        rep.targets.push(Target {
            what: "core-only ns per readiness <= 1.5x a hand-written closure loop".into(),
            measured: format!("worst {worst:.2}x"),
            met: worst <= 1.5,
        });
    }
    rep.charts.push(chart);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_watch_is_dispatched_once_per_iteration() {
        let p = measure(50, 5_000, 1).unwrap();
        assert!(p.vireo_ns > 0.0 && p.closures_ns > 0.0, "{p:?}");
    }

    #[test]
    fn the_memory_backend_reports_what_is_registered() {
        let mut m = Memory::default();
        m.register(7, Token::WAKER, Events::READABLE).unwrap();
        m.register(8, Token(3), Events::READABLE).unwrap();
        m.reregister(8, Token(4), Events::empty()).unwrap();
        let mut ready = Vec::new();
        m.wait(&mut ready, None).unwrap();
        assert_eq!(
            ready,
            vec![Readiness {
                token: Token(4),
                events: Events::READABLE
            }]
        );
        m.deregister(8, Token(4)).unwrap();
        ready.clear();
        m.wait(&mut ready, None).unwrap();
        assert!(ready.is_empty());
    }
}
