//! Timers: frequencies, precision, drift, updates and removal, ordering against watches.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vireo_core::{Backend, Events, Frequency, TimerId};

use crate::kit::*;

/// When a timer fired, in order.
type Stamps = Arc<Mutex<Vec<Instant>>>;

/// Records when a timer fires.
fn stamps() -> (Stamps, impl FnMut(&vireo_core::LoopHandle, TimerId) + Send) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    (log, move |_: &vireo_core::LoopHandle, _| {
        sink.lock().unwrap().push(Instant::now())
    })
}

/// A disabled timer never fires, and does not keep the loop from blocking.
pub fn disabled_timer_never_fires<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = Recorder::new();
    lp.handle()
        .add_timeout(Frequency::Disabled, log.timer())
        .unwrap();
    lp.handle()
        .add_timeout(Frequency::from_millis(-1), log.timer())
        .unwrap();
    let start = Instant::now();
    lp.run_once_timeout(Duration::from_millis(50)).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(50),
        "did not block"
    );
    run_iterations(&mut lp, 3);
    assert!(log.is_empty());
}

/// A 0 timer fires on every iteration without blocking, and fd events still arrive.
pub fn zero_timer_fires_every_iteration_without_starving_fds<B: Backend>() {
    let mut lp = new_loop::<B>();
    let ticks = Recorder::new();
    let t = lp
        .handle()
        .add_timeout(Frequency::EveryIteration, ticks.timer())
        .unwrap();
    let start = Instant::now();
    for _ in 0..20 {
        // A long timeout: the timer must keep the wait from blocking.
        lp.run_once_timeout(Duration::from_secs(5)).unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "an iteration blocked"
    );
    assert_eq!(ticks.take(), vec![Fired::Timer(t); 20]);
    let (r, w) = pipe();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.draining_watch())
        .unwrap();
    write(&w, b"x");
    run_until(&mut lp, "READABLE beside a 0 timer", || !log.is_empty());
    assert_eq!(log.events_of(id), vec![Events::READABLE]);
}

/// A periodic timer never fires before its period, for sub-millisecond and longer periods.
pub fn period_never_early<B: Backend>() {
    for period in [Duration::from_micros(1500), Duration::from_millis(20)] {
        let mut lp = new_loop::<B>();
        let (log, cb) = stamps();
        let start = Instant::now();
        lp.handle()
            .add_timeout(Frequency::Period(period), cb)
            .unwrap();
        run_until(&mut lp, "five firings", || log.lock().unwrap().len() >= 5);
        for (k, t) in log.lock().unwrap().iter().enumerate() {
            let earliest = start + period * (k as u32 + 1);
            assert!(*t >= earliest, "firing {k} came {:?} early", earliest - *t);
        }
    }
}

/// Deadlines follow the grid start + k x period: over 200 periods the lateness does not grow.
pub fn no_cumulative_drift_over_200_periods<B: Backend>() {
    let period = Duration::from_millis(10);
    let mut lp = new_loop::<B>();
    let (log, cb) = stamps();
    let start = Instant::now();
    lp.handle()
        .add_timeout(Frequency::Period(period), cb)
        .unwrap();
    let deadline = start + period * 200;
    while Instant::now() < deadline + period / 2 {
        lp.run_once_timeout(Duration::from_millis(50)).unwrap();
    }
    let times = log.lock().unwrap().clone();
    assert!(
        times.len() >= 150,
        "only {} firings in 200 periods",
        times.len()
    );
    // Each firing belongs to the grid slot it is at or after; its lateness against that slot
    // is what the loop added. With drift the lateness grows by the wakeup latency at every
    // firing and sweeps the whole period; without it, it stays near the latency. The median
    // is immune to a few slow wakeups on a loaded machine.
    let lateness = |t: &Instant| {
        let since = t.duration_since(start);
        let slot = since.as_nanos() / period.as_nanos();
        since - period * slot as u32
    };
    let mut late: Vec<Duration> = times.iter().map(lateness).collect();
    late.sort();
    let median = late[late.len() / 2];
    assert!(
        median < period / 4,
        "median lateness {median:?} against the start + k x period grid: the timer drifts"
    );
    assert!(
        *times.last().unwrap() >= start + period * times.len() as u32,
        "fired early"
    );
}

/// Missed periods coalesce into one firing, and the next firing is back on the grid.
pub fn missed_periods_coalesce<B: Backend>() {
    let period = Duration::from_millis(10);
    let mut lp = new_loop::<B>();
    let (log, cb) = stamps();
    let start = Instant::now();
    lp.handle()
        .add_timeout(Frequency::Period(period), cb)
        .unwrap();
    // Keep the loop from running for ten periods (the point of the case is elapsed time).
    thread::sleep(period * 10);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "missed periods must fire once"
    );
    run_until(&mut lp, "the next firing", || {
        log.lock().unwrap().len() >= 2
    });
    let second = log.lock().unwrap()[1];
    let behind = second.duration_since(start);
    assert!(
        behind >= period * 11,
        "next firing {behind:?} came before the next grid slot"
    );
}

/// Updating a timer restarts its period from the moment of the update.
pub fn update_restarts_period<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (log, cb) = stamps();
    let t = lp
        .handle()
        .add_timeout(Frequency::from_millis(30), cb)
        .unwrap();
    thread::sleep(Duration::from_millis(20));
    let updated = Instant::now();
    lp.handle()
        .update_timeout(t, Frequency::from_millis(30))
        .unwrap();
    run_until(&mut lp, "the firing", || !log.lock().unwrap().is_empty());
    let first = log.lock().unwrap()[0];
    assert!(
        first >= updated + Duration::from_millis(30),
        "fired {:?} after the update, before the restarted period",
        first - updated
    );
}

/// A timer that changes its own frequency inside its callback: from every iteration to a
/// period, then to disabled.
pub fn update_timer_from_own_callback<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (log, mut stamp) = stamps();
    lp.handle()
        .add_timeout(Frequency::EveryIteration, move |h, id| {
            stamp(h, id);
            h.update_timeout(id, Frequency::Disabled).unwrap();
        })
        .unwrap();
    run_iterations(&mut lp, 5);
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "disabled from its own callback, yet fired again"
    );

    let mut lp = new_loop::<B>();
    let count = Arc::new(Mutex::new(0u32));
    let c = Arc::clone(&count);
    let switched = Arc::new(Mutex::new(None));
    let s = Arc::clone(&switched);
    lp.handle()
        .add_timeout(Frequency::EveryIteration, move |h, id| {
            *c.lock().unwrap() += 1;
            if s.lock().unwrap().is_none() {
                h.update_timeout(id, Frequency::from_millis(40)).unwrap();
                *s.lock().unwrap() = Some(Instant::now());
            }
        })
        .unwrap();
    run_iterations(&mut lp, 5);
    assert_eq!(*count.lock().unwrap(), 1, "a 40 ms period fired at once");
    run_until(&mut lp, "the periodic firing", || {
        *count.lock().unwrap() == 2
    });
    let since = switched.lock().unwrap().unwrap().elapsed();
    assert!(since >= Duration::from_millis(40));
}

/// A timer that removes itself fires exactly once.
pub fn remove_timer_from_own_callback<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = Recorder::new();
    let sink = log.clone();
    let t = lp
        .handle()
        .add_timeout(Frequency::EveryIteration, move |h, id| {
            sink.push(Fired::Timer(id));
            h.remove_timeout(id).unwrap();
        })
        .unwrap();
    run_iterations(&mut lp, 4);
    assert_eq!(log.take(), vec![Fired::Timer(t)]);
}

/// A timer callback that removes another timer due in the same pass: it does not fire.
pub fn remove_other_due_timer_in_same_pass<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = Recorder::new();
    let victim = Arc::new(Mutex::new(None::<TimerId>));
    let (sink, v) = (log.clone(), Arc::clone(&victim));
    let first = lp
        .handle()
        .add_timeout(Frequency::EveryIteration, move |h, id| {
            sink.push(Fired::Timer(id));
            if let Some(t) = v.lock().unwrap().take() {
                h.remove_timeout(t).unwrap();
            }
        })
        .unwrap();
    let second = lp
        .handle()
        .add_timeout(Frequency::EveryIteration, log.timer())
        .unwrap();
    *victim.lock().unwrap() = Some(second);
    run_iterations(&mut lp, 3);
    assert_eq!(log.take(), vec![Fired::Timer(first); 3]);
}

/// Many timers removed or updated (their stale schedule entries outnumbering the live ones,
/// which makes the core compact its queue) leave the survivors firing, in deadline order, and
/// the removed ones silent.
pub fn survivors_fire_in_order_after_mass_removal<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let log = Recorder::new();
    let mut keep = Vec::new();
    for i in 0..300u64 {
        // Deadlines 20..320 ms ahead, in reverse id order.
        let id = h
            .add_timeout(
                Frequency::Period(Duration::from_millis(320 - i)),
                log.timer(),
            )
            .unwrap();
        if i % 10 == 0 {
            keep.push(id);
        } else if i % 10 == 1 {
            // Updated twice to a far period: stale entries, never due within this test.
            h.update_timeout(id, Frequency::Period(Duration::from_secs(3600)))
                .unwrap();
            h.update_timeout(id, Frequency::Period(Duration::from_secs(7200)))
                .unwrap();
        } else {
            h.remove_timeout(id).unwrap();
        }
    }
    // Every kept timer fires, the first firings in deadline order (the highest id first);
    // nothing else fires.
    let mut fired = Vec::new();
    let mut firsts: Vec<Fired> = Vec::new();
    run_until(&mut lp, "every kept timer to fire", || {
        fired.extend(log.take());
        for f in &fired {
            if !firsts.contains(f) {
                firsts.push(*f);
            }
        }
        firsts.len() >= keep.len()
    });
    keep.reverse();
    let expected: Vec<Fired> = keep.iter().map(|&id| Fired::Timer(id)).collect();
    assert_eq!(firsts, expected);
    assert!(fired.iter().all(|f| expected.contains(f)), "{fired:?}");
}

/// Due timers run by deadline, then by id; all before the ready watches.
pub fn timers_by_deadline_then_id_before_watches<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let log = Recorder::new();
    let (r, w) = pipe();
    let watch = h
        .add_handle(raw(&r), Events::READABLE, log.draining_watch())
        .unwrap();
    let late = h
        .add_timeout(Frequency::from_millis(30), log.timer())
        .unwrap();
    let early = h
        .add_timeout(Frequency::from_millis(10), log.timer())
        .unwrap();
    let every_a = h
        .add_timeout(Frequency::EveryIteration, log.timer())
        .unwrap();
    let every_b = h
        .add_timeout(Frequency::EveryIteration, log.timer())
        .unwrap();
    write(&w, b"x");
    // Let both periods pass before the loop looks (elapsed time is the point here).
    thread::sleep(Duration::from_millis(40));
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(
        log.take(),
        vec![
            Fired::Timer(early),
            Fired::Timer(late),
            Fired::Timer(every_a),
            Fired::Timer(every_b),
            Fired::Watch(watch, Events::READABLE),
        ]
    );
}

/// A timer added inside a callback is first considered in the next iteration.
pub fn timer_added_in_callback_waits_for_next_iteration<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = Recorder::new();
    let added = Arc::new(Mutex::new(None::<TimerId>));
    let (sink, slot) = (log.clone(), Arc::clone(&added));
    let parent = lp
        .handle()
        .add_timeout(Frequency::EveryIteration, move |h, id| {
            sink.push(Fired::Timer(id));
            let mut slot = slot.lock().unwrap();
            if slot.is_none() {
                *slot = Some(
                    h.add_timeout(Frequency::EveryIteration, sink.timer())
                        .unwrap(),
                );
            }
        })
        .unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(log.take(), vec![Fired::Timer(parent)]);
    let child = added.lock().unwrap().unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(log.take(), vec![Fired::Timer(parent), Fired::Timer(child)]);
}

/// `Frequency::from_millis` follows libvirt: -1 disabled, 0 every iteration, >0 a period.
pub fn libvirt_millisecond_frequencies<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = Recorder::new();
    let start = Instant::now();
    let off = lp
        .handle()
        .add_timeout(Frequency::from_millis(-1), log.timer())
        .unwrap();
    let every = lp
        .handle()
        .add_timeout(Frequency::from_millis(0), log.timer())
        .unwrap();
    let period = lp
        .handle()
        .add_timeout(Frequency::from_millis(15), log.timer())
        .unwrap();
    let mut seen = Vec::new();
    run_until(&mut lp, "the 15 ms timer", || {
        seen.extend(log.take());
        seen.contains(&Fired::Timer(period))
    });
    assert!(!seen.contains(&Fired::Timer(off)));
    assert!(start.elapsed() >= Duration::from_millis(15));
    run_iterations(&mut lp, 2);
    let rest = log.take();
    assert!(!rest.contains(&Fired::Timer(off)));
    assert_eq!(
        rest.iter().filter(|f| **f == Fired::Timer(every)).count(),
        2
    );
}

/// Periods too long for any deadline (`Duration::MAX`, `i64::MAX` seconds) are accepted by
/// add and update, never fire, and leave the loop and its other timers working.
pub fn extreme_periods_are_never_and_never_panic<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let log = Recorder::new();
    let huge = [
        Duration::MAX,
        Duration::from_secs(i64::MAX as u64),
        Duration::from_secs(u64::MAX / 2),
        Duration::new(i64::MAX as u64 / 2, 999_999_999),
    ];
    let mut ids = Vec::new();
    for p in huge {
        ids.push(h.add_timeout(Frequency::period(p), log.timer()).unwrap());
    }
    // Updates to and from an extreme period.
    let moved = h
        .add_timeout(Frequency::from_millis(1), log.timer())
        .unwrap();
    h.update_timeout(moved, Frequency::period(Duration::MAX))
        .unwrap();
    h.update_timeout(
        ids[0],
        Frequency::period(Duration::from_secs(i64::MAX as u64)),
    )
    .unwrap();
    // The loop does not block forever on a deadline so far away, and its other timers fire.
    let tick = h
        .add_timeout(Frequency::from_millis(1), log.timer())
        .unwrap();
    run_until(&mut lp, "a 1 ms timer beside extreme ones", || {
        !log.is_empty()
    });
    assert!(
        log.take().iter().all(|f| *f == Fired::Timer(tick)),
        "an extreme timer fired"
    );
    lp.run_once_timeout(Duration::from_millis(5)).unwrap();
    h.remove_timeout(tick).unwrap();
    log.take();
    lp.run_once_timeout(Duration::from_millis(20)).unwrap();
    assert!(log.is_empty(), "an extreme timer fired: {:?}", log.take());
    for id in ids.into_iter().chain([moved]) {
        h.remove_timeout(id).unwrap();
    }
    lp.run_once_timeout(Duration::ZERO).unwrap();
}
