//! Waking a sleeping loop from another thread: latency until the loop runs what was sent
//! (vireo's `invoke`, and `update_handle` enabling a watch whose fd is ready), and `invoke`
//! throughput from 1 and 2 threads; beside mio's `Waker` with a channel and calloop's channel.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use vireo_backends::{AnyBackend, BackendKind, Choice};
use vireo_core::{EventLoop, Events};

use crate::report::{Chart, Report, Target, micros, percentile};

/// What `vireo-bench wake` runs.
#[derive(Debug, Clone)]
pub struct WakeOptions {
    /// Latency samples per system (the loop asleep before each).
    pub samples: usize,
    /// Messages per sending thread in the throughput runs.
    pub messages: usize,
    /// Systems to run (all when empty).
    pub systems: Vec<String>,
}

impl Default for WakeOptions {
    fn default() -> WakeOptions {
        WakeOptions {
            samples: 2000,
            messages: 200_000,
            systems: Vec::new(),
        }
    }
}

/// The systems: vireo on each compiled backend that starts here, mio, calloop.
pub fn systems() -> Vec<String> {
    crate::report::systems_with(&["mio", "calloop"])
}

/// What one system measured.
#[derive(Debug, Clone, Default)]
pub struct WakeResult {
    /// Latencies of a message sent to a sleeping loop.
    pub latency: Vec<Duration>,
    /// Latencies of enabling a ready watch from another thread (vireo only).
    pub update: Vec<Duration>,
    /// Messages run per second, one sending thread.
    pub rate_1: f64,
    /// Messages run per second, two sending threads.
    pub rate_2: f64,
}

/// Long enough for a loop to be asleep again after the previous sample.
const SETTLE: Duration = Duration::from_micros(300);

/// The loop side of a system: runs until `stop` is set, handing each message's send time to
/// `on_message`.
type Sender = Box<dyn Fn(Instant) + Send + Sync>;

/// Runs one system.
///
/// # Errors
///
/// An unknown system or the system's own errors.
pub fn run(name: &str, opts: &WakeOptions) -> io::Result<WakeResult> {
    let mut out = WakeResult::default();
    // Latency: one message at a time, the loop asleep before each.
    let (latency, _) = drive(name, opts.samples, 1, true)?;
    out.latency = latency;
    for threads in [1, 2] {
        let (_, rate) = drive(name, opts.messages, threads, false)?;
        if threads == 1 {
            out.rate_1 = rate;
        } else {
            out.rate_2 = rate;
        }
    }
    if let Some(kind) = name.strip_prefix("vireo-") {
        out.update = vireo_update(kind.parse()?, opts.samples)?;
    }
    Ok(out)
}

/// Sends `per_thread` messages from each of `threads` threads; with `paced`, one at a time with
/// the loop asleep before each (latency), else as fast as possible (throughput).
fn drive(
    name: &str,
    per_thread: usize,
    threads: usize,
    paced: bool,
) -> io::Result<(Vec<Duration>, f64)> {
    let total = (per_thread * threads) as u64;
    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(if paced {
        per_thread
    } else {
        0
    })));
    let record = {
        let (done, latencies) = (Arc::clone(&done), Arc::clone(&latencies));
        move |sent: Instant| {
            if paced {
                latencies.lock().unwrap().push(sent.elapsed());
            }
            done.fetch_add(1, SeqCst);
        }
    };
    let (tx, rx) = mpsc::channel::<Sender>();
    let loop_thread = {
        let done = Arc::clone(&done);
        let name = name.to_owned();
        thread::spawn(move || run_loop(&name, tx, record, &done, total))
    };
    let send = Arc::new(
        rx.recv()
            .map_err(|_| io::Error::other("the loop did not start"))?,
    );
    let started = Instant::now();
    let senders: Vec<_> = (0..threads)
        .map(|_| {
            let (send, done) = (Arc::clone(&send), Arc::clone(&done));
            thread::spawn(move || {
                for i in 0..per_thread {
                    if paced {
                        thread::sleep(SETTLE);
                    }
                    send(Instant::now());
                    if paced {
                        while done.load(SeqCst) < i as u64 + 1 {
                            std::hint::spin_loop();
                        }
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.join()
            .map_err(|_| io::Error::other("a sender panicked"))?;
    }
    loop_thread
        .join()
        .map_err(|_| io::Error::other("the loop panicked"))??;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    Ok((latencies, rate))
}

/// The loop thread of `name`: sends its sender through `tx`, runs until `total` messages ran.
fn run_loop(
    name: &str,
    tx: mpsc::Sender<Sender>,
    record: impl Fn(Instant) + Send + Sync + Clone + 'static,
    done: &AtomicU64,
    total: u64,
) -> io::Result<()> {
    let finished = || done.load(SeqCst) >= total;
    if let Some(kind) = name.strip_prefix("vireo-") {
        let mut lp =
            EventLoop::with_backend(AnyBackend::with_choice(Choice::Only(kind.parse()?))?)?;
        let h = lp.handle().clone();
        let _ = tx.send(Box::new(move |sent| {
            let record = record.clone();
            let _ = h.invoke(move |_| record(sent));
        }));
        while !finished() {
            lp.run_once_timeout(Duration::from_secs(1))?;
        }
        Ok(())
    } else if name == "mio" {
        const WAKE: mio::Token = mio::Token(0);
        let mut poll = mio::Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        let (msg_tx, msg_rx) = crossbeam_channel::unbounded::<Instant>();
        let _ = tx.send(Box::new(move |sent| {
            let _ = msg_tx.send(sent);
            let _ = waker.wake();
        }));
        let mut events = mio::Events::with_capacity(64);
        while !finished() {
            poll.poll(&mut events, Some(Duration::from_secs(1)))?;
            while let Ok(sent) = msg_rx.try_recv() {
                record(sent);
            }
        }
        Ok(())
    } else if name == "calloop" {
        let mut lp: calloop::EventLoop<'static, ()> =
            calloop::EventLoop::try_new().map_err(io::Error::other)?;
        let (msg_tx, msg_rx) = calloop::channel::channel::<Instant>();
        lp.handle()
            .insert_source(msg_rx, move |event, _, _| {
                if let calloop::channel::Event::Msg(sent) = event {
                    record(sent);
                }
            })
            .map_err(|e| io::Error::other(e.error))?;
        let _ = tx.send(Box::new(move |sent| {
            let _ = msg_tx.send(sent);
        }));
        while !finished() {
            lp.dispatch(Some(Duration::from_secs(1)), &mut ())
                .map_err(io::Error::other)?;
        }
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown system {name}"),
        ))
    }
}

/// Another thread enables a paused watch whose fd is readable; latency until its callback runs
/// (which pauses it again).
fn vireo_update(kind: BackendKind, samples: usize) -> io::Result<Vec<Duration>> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    std::io::Write::write_all(&mut &b, b"x")?;
    let sent = Arc::new(Mutex::new(None::<Instant>));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(samples)));
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let loop_thread = {
        let (sent, latencies, done) =
            (Arc::clone(&sent), Arc::clone(&latencies), Arc::clone(&done));
        let fd = a.as_raw_fd();
        thread::spawn(move || -> io::Result<()> {
            let mut lp = EventLoop::with_backend(AnyBackend::with_choice(Choice::Only(kind))?)?;
            let d = Arc::clone(&done);
            let watch = lp
                .handle()
                .add_handle(fd, Events::empty(), move |h, id, _, _| {
                    if let Some(t) = sent.lock().unwrap().take() {
                        latencies.lock().unwrap().push(t.elapsed());
                    }
                    let _ = h.update_handle(id, Events::empty());
                    d.fetch_add(1, SeqCst);
                })?;
            let _ = tx.send((lp.handle().clone(), watch));
            while done.load(SeqCst) < samples as u64 {
                lp.run_once_timeout(Duration::from_secs(1))?;
            }
            Ok(())
        })
    };
    let (h, watch) = rx
        .recv()
        .map_err(|_| io::Error::other("the loop did not start"))?;
    for i in 0..samples {
        thread::sleep(SETTLE);
        *sent.lock().unwrap() = Some(Instant::now());
        h.update_handle(watch, Events::READABLE)?;
        while done.load(SeqCst) < i as u64 + 1 {
            std::hint::spin_loop();
        }
    }
    loop_thread
        .join()
        .map_err(|_| io::Error::other("the loop panicked"))??;
    drop((a, b));
    let out = std::mem::take(&mut *latencies.lock().unwrap());
    Ok(out)
}

/// Runs the benchmark on every chosen system and reports it.
///
/// # Errors
///
/// An unknown system or a system's error.
pub fn report(opts: &WakeOptions, mut progress: impl FnMut(&str)) -> io::Result<Report> {
    let chosen = crate::report::choose(&systems(), &opts.systems)?;
    let mut rep = Report {
        bench: "wake".into(),
        intro: vec![format!(
            "vireo-bench wake: {} messages sent one at a time to a sleeping loop (latency until \
             it runs), then {} per thread as fast as possible from 1 and 2 threads; vireo uses \
             invoke (and update_handle on a ready fd), mio a Waker with a channel, calloop its \
             channel",
            opts.samples, opts.messages
        )],
        columns: [
            "system",
            "p50 us",
            "p99 us",
            "update p50 us",
            "update p99 us",
            "1 thread M/s",
            "2 threads M/s",
        ]
        .map(String::from)
        .to_vec(),
        ..Report::default()
    };
    let mut chart = Chart {
        name: "wake-latency".into(),
        title: "wake: latency to a sleeping loop (lower is better)".into(),
        y_label: "microseconds".into(),
        groups: vec![("p50".into(), Vec::new()), ("p99".into(), Vec::new())],
    };
    let mut worst_p50: Option<f64> = None;
    for name in &chosen {
        progress(name);
        let mut r = run(name, opts)?;
        let (p50, p99) = (
            micros(percentile(&mut r.latency, 50.0)),
            micros(percentile(&mut r.latency, 99.0)),
        );
        let update = if r.update.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (
                micros(percentile(&mut r.update, 50.0)),
                micros(percentile(&mut r.update, 99.0)),
            )
        };
        if name.starts_with("vireo-") {
            worst_p50 = Some(worst_p50.map_or(p50, |w: f64| w.max(p50)));
        }
        let cell = |v: f64| {
            if v.is_nan() {
                "-".to_owned()
            } else {
                format!("{v:.1}")
            }
        };
        rep.rows.push(vec![
            name.clone(),
            format!("{p50:.1}"),
            format!("{p99:.1}"),
            cell(update.0),
            cell(update.1),
            format!("{:.2}", r.rate_1 / 1e6),
            format!("{:.2}", r.rate_2 / 1e6),
        ]);
        rep.json.push(serde_json::json!({
            "bench": "wake", "system": name,
            "backend": name.strip_prefix("vireo-").unwrap_or(""),
            "samples": opts.samples, "latency_p50_us": p50, "latency_p99_us": p99,
            "update_p50_us": if update.0.is_nan() { None } else { Some(update.0) },
            "update_p99_us": if update.1.is_nan() { None } else { Some(update.1) },
            "messages_per_thread": opts.messages,
            "per_sec_1_thread": r.rate_1, "per_sec_2_threads": r.rate_2,
        }));
        chart.groups[0].1.push((name.clone(), p50));
        chart.groups[1].1.push((name.clone(), p99));
    }
    if let Some(w) = worst_p50 {
        rep.targets.push(Target {
            what: "wake-up p50 < 10 us".into(),
            measured: format!("worst vireo backend {w:.1} us"),
            met: w < 10.0,
        });
    }
    rep.charts = vec![chart];
    Ok(rep)
}
