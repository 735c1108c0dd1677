//! Other threads: wakeups, quit, invoke, moving the loop between threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vireo_core::{Backend, EventLoop, Events, Frequency, LoopHandle};

use crate::kit::*;

/// How long a change from another thread may take to wake a blocked loop. The rule is "at
/// once"; the bound is generous for loaded machines but far below the loop's own timeout.
const WAKE_BOUND: Duration = Duration::from_millis(900);

/// Runs one blocking iteration (no timers, no ready fd) while `act` runs on another thread
/// after a short delay, and returns how long the iteration took.
fn blocked_iteration<B: Backend>(
    lp: &mut EventLoop<B>,
    act: impl FnOnce(LoopHandle) + Send + 'static,
) -> Duration {
    let h = lp.handle().clone();
    let other = thread::spawn(move || {
        // Give the loop time to block, so the wakeup path is what gets exercised.
        thread::sleep(Duration::from_millis(30));
        act(h);
    });
    let start = Instant::now();
    lp.run_once_timeout(Duration::from_secs(30)).unwrap();
    let took = start.elapsed();
    other.join().unwrap();
    took
}

/// A timer added from another thread wakes a loop blocked with nothing to do, and fires.
pub fn add_from_other_thread_wakes_blocked_loop<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = Recorder::new();
    let sink = log.clone();
    let took = blocked_iteration(&mut lp, move |h| {
        h.add_timeout(Frequency::EveryIteration, sink.timer())
            .unwrap();
    });
    assert!(took < WAKE_BOUND, "woke after {took:?}");
    run_until(&mut lp, "the timer", || !log.is_empty());
}

/// Iterations in which nothing changes keep every rule: a quiet loop still wakes for a change
/// from another thread, and for the deadline of a timer it was given before it went quiet.
pub fn quiet_iterations_still_see_changes_and_deadlines<B: Backend>() {
    let mut lp = new_loop::<B>();
    for _ in 0..3 {
        lp.run_once_timeout(Duration::ZERO).unwrap();
    }
    let log = Recorder::new();
    let sink = log.clone();
    let took = blocked_iteration(&mut lp, move |h| {
        h.add_timeout(Frequency::Period(Duration::from_millis(20)), sink.timer())
            .unwrap();
    });
    assert!(took < WAKE_BOUND, "a quiet loop woke after {took:?}");
    // No more changes: each blocking iteration ends at the timer's next deadline.
    let start = Instant::now();
    while log.len() < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the periodic timer fired {} times",
            log.len()
        );
        // Bounded, so a loop that forgot the deadline fails here instead of hanging.
        lp.run_once_timeout(Duration::from_secs(5)).unwrap();
    }
    // A change from another thread still reaches a loop whose last iterations were quiet.
    let (r, w) = pipe();
    let events = Recorder::new();
    let watch = lp
        .handle()
        .add_handle(raw(&r), Events::empty(), events.draining_watch())
        .unwrap();
    write(&w, b"x");
    lp.run_once_timeout(Duration::ZERO).unwrap();
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert!(events.is_empty(), "a paused watch fired");
    let took = blocked_iteration(&mut lp, move |h| {
        h.update_handle(watch, Events::READABLE).unwrap();
    });
    assert!(took < WAKE_BOUND, "woke after {took:?}");
    run_until(&mut lp, "the resumed watch", || !events.is_empty());
}

/// An update from another thread (enabling a readable watch) wakes the loop and takes effect.
pub fn update_from_other_thread_wakes_blocked_loop<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    write(&w, b"x");
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::empty(), log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    let took = blocked_iteration(&mut lp, move |h| {
        h.update_handle(id, Events::READABLE).unwrap();
    });
    assert!(took < WAKE_BOUND, "woke after {took:?}");
    run_until(&mut lp, "READABLE", || !log.is_empty());
}

/// A removal from another thread wakes the loop; the watch never fires again and its state is
/// dropped on the loop thread.
pub fn remove_from_other_thread_wakes_blocked_loop<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let probe = DropProbe::new();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(
            raw(&r),
            Events::READABLE,
            log.tracked_watch(probe.tracked()),
        )
        .unwrap();
    let took = blocked_iteration(&mut lp, move |h| h.remove_handle(id).unwrap());
    assert!(took < WAKE_BOUND, "woke after {took:?}");
    write(&w, b"x");
    run_iterations(&mut lp, 2);
    assert!(log.is_empty());
    assert_eq!(probe.drops(), 1);
    assert_eq!(probe.dropped_on(), Some(thread::current().id()));
}

/// `quit` from another thread stops `run`.
pub fn quit_from_other_thread_stops_run<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let quitter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        h.quit();
    });
    let start = Instant::now();
    lp.run().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    quitter.join().unwrap();
    // The request is consumed: the next run needs another quit.
    let h = lp.handle().clone();
    lp.handle()
        .add_timeout(Frequency::from_millis(20), move |_, _| h.quit())
        .unwrap();
    lp.run().unwrap();
}

/// Closures invoked from other threads run on the loop thread, in FIFO order per thread.
pub fn invoke_from_other_thread_runs_on_loop_thread<B: Backend>() {
    let mut lp = new_loop::<B>();
    let loop_thread = thread::current().id();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let h = lp.handle().clone();
    let sink = Arc::clone(&seen);
    let sender = thread::spawn(move || {
        for i in 0..100u32 {
            let sink = Arc::clone(&sink);
            h.invoke(move |_| {
                assert_eq!(thread::current().id(), loop_thread);
                sink.lock().unwrap().push(i);
            })
            .unwrap();
        }
    });
    run_until(&mut lp, "100 invokes", || seen.lock().unwrap().len() == 100);
    sender.join().unwrap();
    assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
}

/// Invoked closures run after the iteration's timers and watches.
pub fn invoke_runs_after_timers_and_watches<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let log = Recorder::new();
    let watch = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.draining_watch())
        .unwrap();
    let timer = lp
        .handle()
        .add_timeout(Frequency::EveryIteration, log.timer())
        .unwrap();
    let sink = log.clone();
    lp.handle()
        .invoke(move |_| sink.push(Fired::Mark(1)))
        .unwrap();
    write(&w, b"x");
    run_until(&mut lp, "the watch", || !log.events_of(watch).is_empty());
    let all = log.take();
    let pos = |f: Fired| all.iter().position(|x| *x == f).unwrap();
    assert!(pos(Fired::Timer(timer)) < pos(Fired::Mark(1)));
    assert!(pos(Fired::Watch(watch, Events::READABLE)) < all.len());
    // In the iteration where all three happen, the mark is last.
    let mark = pos(Fired::Mark(1));
    assert!(all[..mark].contains(&Fired::Timer(timer)));
}

/// The eventfd is written only while the loop sleeps: changes made on the loop thread, and
/// many changes from another thread while the loop is busy, cost at most one write per sleep.
pub fn wakeups_only_while_asleep_and_coalesced<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (r, _w) = pipe();
    for _ in 0..50 {
        let id = h
            .add_handle(raw(&r), Events::READABLE, |_, _, _, _| {})
            .unwrap();
        h.remove_handle(id).unwrap();
        h.invoke(|_| {}).unwrap();
    }
    run_iterations(&mut lp, 2);
    assert_eq!(
        lp.stats().wake_writes,
        0,
        "loop-thread changes wrote the eventfd"
    );

    // A storm from another thread while the loop is blocked: one wakeup per sleep.
    let h2 = h.clone();
    let (stormer, storm_done) = storm(move || {
        for _ in 0..10_000 {
            h2.invoke(|_| {}).unwrap();
        }
    });
    let before = lp.stats();
    let mut sleeps = 0u64;
    while !storm_done.load(Ordering::SeqCst) {
        lp.run_once_timeout(Duration::from_millis(200)).unwrap();
        sleeps += 1;
    }
    stormer.join().unwrap();
    run_iterations(&mut lp, 2);
    sleeps += 2;
    let after = lp.stats();
    let writes = after.wake_writes - before.wake_writes;
    assert!(
        writes <= sleeps,
        "{writes} eventfd writes for {sleeps} sleeps"
    );
    assert!(
        after.dispatched - before.dispatched >= 10_000,
        "invokes were lost"
    );
}

/// A loop created on one thread can be moved to and run on another.
pub fn loop_created_on_one_thread_runs_on_another<B: Backend + Send + 'static>() {
    let lp = new_loop::<B>();
    let h = lp.handle().clone();
    let log = Recorder::new();
    let (r, w) = pipe();
    let id = h
        .add_handle(raw(&r), Events::READABLE, log.draining_watch())
        .unwrap();
    write(&w, b"x");
    let runner = thread::spawn(move || {
        let mut lp = lp;
        run_until(&mut lp, "READABLE on the new thread", || !log.is_empty());
        log.events_of(id)
    });
    assert_eq!(runner.join().unwrap(), vec![Events::READABLE]);
}

/// `LoopHandle` is `Send + Sync + Clone`; the error and id types are `Send + Sync`.
pub fn public_types_are_send_and_sync<B: Backend>() {
    assert_send_sync::<LoopHandle>();
    assert_send_sync::<vireo_core::Error>();
    assert_send_sync::<vireo_core::WatchId>();
    assert_send_sync::<vireo_core::TimerId>();
    assert_send_sync::<vireo_core::Events>();
    assert_send_sync::<vireo_core::LoopLocal<std::cell::Cell<u32>>>();
    assert_send_sync::<vireo_core::WeakLoopLocal<std::cell::Cell<u32>>>();
    let lp = new_loop::<B>();
    let h: LoopHandle = lp.handle().clone();
    drop(lp);
    drop(h);
}

/// Runs `changes` on another thread, started once both threads are ready; the flag is set when
/// it has finished.
fn storm(changes: impl FnOnce() + Send + 'static) -> (thread::JoinHandle<()>, Arc<AtomicBool>) {
    let done = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(2));
    let (finished, go) = (Arc::clone(&done), Arc::clone(&ready));
    let thread = thread::spawn(move || {
        go.wait();
        changes();
        finished.store(true, Ordering::SeqCst);
    });
    ready.wait();
    (thread, done)
}

/// A loop that does not block (an every-iteration timer keeps its waits at zero) is not
/// asleep: changes from another thread cost no eventfd write, and all of them land.
pub fn no_wake_writes_while_the_loop_never_blocks<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    h.add_timeout(Frequency::EveryIteration, |_, _| {}).unwrap();
    let (r, _w) = pipe();
    let id = h
        .add_handle(raw(&r), Events::empty(), |_, _, _, _| {})
        .unwrap();
    run_iterations(&mut lp, 1);
    let h2 = h.clone();
    let (stormer, storm_done) = storm(move || {
        for i in 0..20_000 {
            let events = if i % 2 == 0 {
                Events::READABLE
            } else {
                Events::empty()
            };
            h2.update_handle(id, events).unwrap();
        }
        h2.invoke(|_| {}).unwrap();
    });
    let before = lp.stats();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !storm_done.load(Ordering::SeqCst) && Instant::now() < deadline {
        // A long timeout: the every-iteration timer must keep it from blocking.
        lp.run_once_timeout(Duration::from_secs(5)).unwrap();
    }
    stormer.join().unwrap();
    run_iterations(&mut lp, 1);
    let writes = lp.stats().wake_writes - before.wake_writes;
    assert_eq!(
        writes, 0,
        "{writes} eventfd writes while the loop never slept"
    );
}

/// Many removes and pauses from another thread racing ready watches: none returns while the
/// watch's callback runs, and no callback starts after the remove or pause of its watch
/// returned (the ordering between the loop thread and the remover, checked under load).
pub fn removes_racing_dispatch_never_overlap_a_callback<B: Backend>() {
    const WATCHES: usize = 6;
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    // Always readable: never drained, so every watch is ready in every iteration.
    let pipes: Vec<_> = (0..WATCHES)
        .map(|_| {
            let (r, w) = pipe();
            write(&w, b"x");
            (r, w)
        })
        .collect();
    let fds: Vec<_> = pipes.iter().map(|(r, _)| raw(r)).collect();
    let violations = Arc::new(AtomicUsize::new(0));
    // A watch's state: (stopped: its remove or pause returned, inside: its callback runs).
    let add = {
        let violations = Arc::clone(&violations);
        move |h: &LoopHandle, fd| {
            let state = Arc::new((AtomicBool::new(false), AtomicBool::new(false)));
            let (s, v) = (Arc::clone(&state), Arc::clone(&violations));
            let id = h
                .add_handle(fd, Events::READABLE, move |_, _, _, _| {
                    if s.0.load(Ordering::SeqCst) {
                        v.fetch_add(1, Ordering::SeqCst);
                    }
                    s.1.store(true, Ordering::SeqCst);
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                    s.1.store(false, Ordering::SeqCst);
                })
                .unwrap();
            (id, state)
        }
    };
    let mut watches: Vec<_> = fds.iter().map(|&fd| add(&h, fd)).collect();
    run_iterations(&mut lp, 1);
    let done = Arc::new(AtomicBool::new(false));
    let remover = {
        let (h, done, violations) = (h.clone(), Arc::clone(&done), Arc::clone(&violations));
        thread::spawn(move || {
            let start = Instant::now();
            let mut rounds = 0;
            while rounds < 3000 && start.elapsed() < Duration::from_secs(3) {
                let i = rounds % WATCHES;
                let (id, state) = &watches[i];
                if rounds % 3 == 0 {
                    h.update_handle(*id, Events::empty()).unwrap();
                } else {
                    h.remove_handle(*id).unwrap();
                }
                state.0.store(true, Ordering::SeqCst);
                if state.1.load(Ordering::SeqCst) {
                    // Still inside although the remove or pause returned.
                    violations.fetch_add(1, Ordering::SeqCst);
                }
                if rounds % 3 == 0 {
                    h.remove_handle(*id).unwrap();
                }
                watches[i] = add(&h, fds[i]);
                rounds += 1;
            }
            done.store(true, Ordering::SeqCst);
            rounds
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
        lp.run_once_timeout(Duration::from_millis(5)).unwrap();
    }
    let rounds = remover.join().unwrap();
    assert!(rounds >= 100, "only {rounds} removes in the time allowed");
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "callbacks overlapped or followed the remove of their watch ({rounds} removes)"
    );
    drop(lp);
    drop(pipes);
}

/// `remove_handle` (and `update_handle` to empty) from another thread, while the loop thread
/// is inside that watch's callback, returns only after the callback returned, and the callback
/// never starts after it returned: the fd may be closed at once.
pub fn remove_from_other_thread_waits_for_a_running_callback<B: Backend>() {
    for pause in [false, true] {
        let mut lp = new_loop::<B>();
        let h = lp.handle().clone();
        let (r, w) = pipe();
        write(&w, b"x");
        let returned = Arc::new(AtomicBool::new(false));
        let overlapped = Arc::new(AtomicBool::new(false));
        let started_after = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = std::sync::mpsc::channel();
        let id = {
            let (returned, overlapped, started_after) = (
                Arc::clone(&returned),
                Arc::clone(&overlapped),
                Arc::clone(&started_after),
            );
            h.add_handle(raw(&r), Events::READABLE, move |_, _, _, _| {
                if returned.load(Ordering::SeqCst) {
                    started_after.store(true, Ordering::SeqCst);
                }
                let _ = started_tx.send(());
                // Give the remover every chance to return while this runs.
                thread::sleep(Duration::from_millis(30));
                if returned.load(Ordering::SeqCst) {
                    overlapped.store(true, Ordering::SeqCst);
                }
            })
            .unwrap()
        };
        let remover = {
            let (h, returned) = (h.clone(), Arc::clone(&returned));
            thread::spawn(move || {
                started.recv_timeout(Duration::from_secs(20)).unwrap();
                if pause {
                    h.update_handle(id, Events::empty()).unwrap();
                } else {
                    h.remove_handle(id).unwrap();
                }
                returned.store(true, Ordering::SeqCst);
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !returned.load(Ordering::SeqCst) && Instant::now() < deadline {
            lp.run_once_timeout(Duration::from_millis(10)).unwrap();
        }
        remover.join().unwrap();
        run_iterations(&mut lp, 3);
        assert!(
            !overlapped.load(Ordering::SeqCst),
            "pause={pause}: the remover returned while the callback ran"
        );
        assert!(
            !started_after.load(Ordering::SeqCst),
            "pause={pause}: the callback started after the remover returned"
        );
    }
}

/// `update_handle_nowait` and `remove_handle_nowait` from another thread return while the
/// watch's callback is running (the callback waits for them: the waiting variants would
/// deadlock), and the watch is not called again. `is_loop_thread` is true in the callback
/// only.
pub fn nowait_changes_return_while_the_callback_runs<B: Backend>() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    write(&w, b"x");
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, move |h, _, _, _| {
            assert!(h.is_loop_thread());
            seen.fetch_add(1, Ordering::SeqCst);
            entered_tx.send(()).unwrap();
            // The data is left unread: a watch still registered fires again.
            release_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a nowait change waited for the running callback");
        })
        .unwrap();
    assert!(!lp.handle().is_loop_thread());
    let h = lp.handle().clone();
    let changer = thread::spawn(move || {
        entered_rx.recv().unwrap();
        assert!(!h.is_loop_thread());
        h.update_handle_nowait(id, Events::empty()).unwrap();
        h.remove_handle_nowait(id).unwrap();
        release_tx.send(()).unwrap();
        h
    });
    lp.run_once_timeout(Duration::from_secs(20)).unwrap();
    let h = changer.join().unwrap();
    run_iterations(&mut lp, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(matches!(
        h.remove_handle_nowait(id),
        Err(vireo_core::Error::UnknownWatch(_))
    ));
    assert!(matches!(
        h.update_handle_nowait(id, Events::READABLE),
        Err(vireo_core::Error::UnknownWatch(_))
    ));
}
