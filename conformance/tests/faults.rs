//! The core under injected kernel faults (the scripted backend): every fault is reported or
//! absorbed without a panic, the loop stays usable, and no event is lost.

use std::time::{Duration, Instant};

use rustix::io::Errno;
use vireo_backends::scripted::{Call, Op, Script, Scripted};
use vireo_conformance::kit::*;
use vireo_core::{EventLoop, Events, Frequency};

fn scripted() -> (EventLoop<Scripted>, Script) {
    let script = Script::new();
    let lp = EventLoop::with_backend(Scripted::with_script(script.clone()).unwrap()).unwrap();
    (lp, script)
}

fn errno_of(e: &std::io::Error) -> Option<Errno> {
    Errno::from_io_error(e)
}

#[test]
fn interrupted_wait_is_an_empty_iteration_and_loses_nothing() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (r, w) = pipe();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.draining_watch())
        .unwrap();
    write(&w, b"x");
    script.fail_next(Op::Wait, Errno::INTR);
    assert_eq!(lp.run_once_timeout(Duration::ZERO).unwrap(), 0);
    assert!(log.is_empty());
    run_until(&mut lp, "the byte to be reported", || !log.is_empty());
    assert_eq!(log.take(), vec![Fired::Watch(id, Events::READABLE)]);
}

#[test]
fn failed_wait_is_reported_and_the_next_iteration_delivers() {
    for errno in [Errno::NOMEM, Errno::BADF, Errno::FAULT] {
        let (mut lp, script) = scripted();
        let log = Recorder::new();
        let (r, w) = pipe();
        let id = lp
            .handle()
            .add_handle(raw(&r), Events::READABLE, log.draining_watch())
            .unwrap();
        write(&w, b"x");
        script.fail_next(Op::Wait, errno);
        let err = lp.run_once_timeout(Duration::ZERO).unwrap_err();
        assert_eq!(errno_of(&err), Some(errno));
        assert!(log.is_empty());
        run_until(&mut lp, "the byte to be reported", || !log.is_empty());
        assert_eq!(
            log.take(),
            vec![Fired::Watch(id, Events::READABLE)],
            "{errno:?}"
        );
    }
}

#[test]
fn failed_registration_is_reported_then_retried() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (r, w) = pipe();
    write(&w, b"x");
    script.fail_next(Op::Register, Errno::NOMEM);
    script.fail_next(Op::Register, Errno::NOSPC);
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.watch())
        .unwrap();
    // Each refused registration is the watch's ERROR, not the loop's failure.
    // The first iteration's own attempt fails (NOMEM), and so does its retry after dispatch
    // (NOSPC), whose ERROR reaches the watch in the second iteration beside the byte that the
    // registration, landed by then, reports.
    assert_eq!(lp.run_once_timeout(Duration::ZERO).unwrap(), 1);
    assert_eq!(log.take(), vec![Fired::Watch(id, Events::ERROR)]);
    assert_eq!(lp.run_once_timeout(Duration::ZERO).unwrap(), 1);
    assert_eq!(
        log.take(),
        vec![Fired::Watch(id, Events::READABLE | Events::ERROR)]
    );
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(log.take(), vec![Fired::Watch(id, Events::READABLE)]);
    let registers = script
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Register(fd, _) if *fd == raw(&r)))
        .count();
    assert_eq!(registers, 3, "two failed attempts and one that worked");
}

#[test]
fn failed_interest_change_is_retried_until_it_lands() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (a, _b) = socketpair();
    let id = lp
        .handle()
        .add_handle(raw(&a), Events::empty(), log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    script.fail_next(Op::Register, Errno::NOMEM);
    script.fail_next(Op::Reregister, Errno::NOMEM);
    lp.handle().update_handle(id, Events::WRITABLE).unwrap();
    // An empty interest was never registered; the first change is a register, then (after
    // the fault, which the watch hears as ERROR) retried, and the socket's WRITABLE finally
    // reaches the watch.
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(log.events_of(id), vec![Events::ERROR]);
    run_until(&mut lp, "WRITABLE", || {
        log.events_of(id).contains(&Events::WRITABLE)
    });
}

#[test]
fn failed_removal_keeps_the_watch_silent_and_drops_its_state_once() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let probe = DropProbe::new();
    let (r, w) = pipe();
    let id = lp
        .handle()
        .add_handle(
            raw(&r),
            Events::READABLE,
            log.tracked_watch(probe.tracked()),
        )
        .unwrap();
    run_iterations(&mut lp, 1);
    script.fail_next(Op::Deregister, Errno::NOMEM);
    lp.handle().remove_handle(id).unwrap();
    write(&w, b"x");
    // Retried in the next iteration; nobody is left to hear about it.
    assert_eq!(lp.run_once_timeout(Duration::ZERO).unwrap(), 0);
    run_iterations(&mut lp, 3);
    assert!(log.is_empty(), "a removed watch fired: {:?}", log.take());
    assert_eq!(probe.drops(), 1);
    // EBADF and ENOENT from a removal are not errors (the fd was closed first).
    let (r2, _w2) = pipe();
    let id2 = lp
        .handle()
        .add_handle(raw(&r2), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    script.fail_next(Op::Deregister, Errno::BADF);
    lp.handle().remove_handle(id2).unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(script.pending_faults(), 0);
}

#[test]
fn spurious_readiness_is_delivered_within_the_watch_mask_only() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (a, _b) = socketpair();
    let reader = lp
        .handle()
        .add_handle(raw(&a), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    // Nothing to read, yet the kernel says READABLE (allowed: spurious reports).
    script.make_ready(raw(&a), Events::READABLE | Events::WRITABLE);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    // WRITABLE is outside the watch's interest: masked.
    assert_eq!(log.take(), vec![Fired::Watch(reader, Events::READABLE)]);
    // ERROR and HANGUP always pass.
    script.make_ready(raw(&a), Events::HANGUP | Events::ERROR);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(
        log.take(),
        vec![Fired::Watch(reader, Events::HANGUP | Events::ERROR)]
    );
    // Readiness for an fd with no watch reaches nobody.
    let (c, _d) = socketpair();
    script.make_ready(raw(&c), Events::READABLE);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert!(log.is_empty());
}

#[test]
fn readiness_for_a_watch_removed_in_the_same_iteration_is_dropped() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (a, _b) = socketpair();
    let (c, _d) = socketpair();
    let victim = std::sync::Arc::new(std::sync::Mutex::new(None));
    // The killer has the lower id, so it runs first and removes the victim, whose report
    // arrived in the same wait.
    let killer = lp
        .handle()
        .add_handle(raw(&a), Events::READABLE, {
            let (log, victim) = (log.clone(), std::sync::Arc::clone(&victim));
            move |h, id, _, ev| {
                log.push(Fired::Watch(id, ev));
                if let Some(v) = victim.lock().unwrap().take() {
                    h.remove_handle(v).unwrap();
                }
            }
        })
        .unwrap();
    let v = lp
        .handle()
        .add_handle(raw(&c), Events::READABLE, log.watch())
        .unwrap();
    *victim.lock().unwrap() = Some(v);
    run_iterations(&mut lp, 1);
    script.make_ready(raw(&c), Events::READABLE);
    script.make_ready(raw(&a), Events::READABLE);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(log.take(), vec![Fired::Watch(killer, Events::READABLE)]);
    // Later reports for its fd reach nobody.
    script.make_ready(raw(&c), Events::READABLE);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert!(log.is_empty());
}

#[test]
fn spurious_wakeups_never_fire_a_timer_early() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let started = Instant::now();
    let id = lp
        .handle()
        .add_timeout(Frequency::Period(Duration::from_millis(30)), log.timer())
        .unwrap();
    for _ in 0..20 {
        script.wake_spuriously();
    }
    run_until(&mut lp, "the timer", || !log.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(log.take()[0], Fired::Timer(id));
    assert_eq!(script.pending_faults(), 0);
}

#[test]
fn a_detached_backend_is_driven_by_the_script_alone() {
    let script = Script::new();
    let mut lp = EventLoop::with_backend(Scripted::detached(script.clone())).unwrap();
    let log = Recorder::new();
    let (a, w) = pipe();
    let id = lp
        .handle()
        .add_handle(raw(&a), Events::READABLE, log.watch())
        .unwrap();
    // Data is there, but nothing reports it: the kernel is not asked.
    write(&w, b"x");
    run_iterations(&mut lp, 3);
    assert!(log.is_empty());
    script.make_ready(raw(&a), Events::READABLE);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(log.take(), vec![Fired::Watch(id, Events::READABLE)]);
    assert_eq!(lp.backend_info().get("over"), Some("nothing"));
}

#[test]
fn advancing_the_script_clock_makes_timers_due_without_waiting() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let started = Instant::now();
    let hour = lp
        .handle()
        .add_timeout(Frequency::Period(Duration::from_secs(3600)), log.timer())
        .unwrap();
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert!(log.is_empty());
    script.advance(Duration::from_secs(3600));
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(log.take(), vec![Fired::Timer(hour)]);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_detached_loop_runs_timers_on_virtual_time_in_order() {
    let script = Script::new();
    let mut lp = EventLoop::with_backend(Scripted::detached(script.clone())).unwrap();
    let log = Recorder::new();
    let started = Instant::now();
    let t0 = script.now();
    let slow = lp
        .handle()
        .add_timeout(Frequency::Period(Duration::from_secs(30)), log.timer())
        .unwrap();
    // The script's clock is the monotonic clock plus every advance, so a fast timer added a few
    // nanoseconds after the slow one could fall due in the same iteration as the slow one on a
    // loaded machine. One virtual second between the two adds keeps the deadlines apart.
    script.advance(Duration::from_secs(1));
    let fast = lp
        .handle()
        .add_timeout(Frequency::Period(Duration::from_secs(10)), log.timer())
        .unwrap();
    // Each run_once sleeps until the next deadline, on the script's clock: 11 s, 21 s, 30 s
    // (the slow timer) and 31 s.
    for _ in 0..4 {
        lp.run_once().unwrap();
    }
    assert_eq!(
        log.take(),
        vec![
            Fired::Timer(fast),
            Fired::Timer(fast),
            Fired::Timer(slow),
            Fired::Timer(fast)
        ]
    );
    let virtual_elapsed = script.now() - t0;
    assert!(
        virtual_elapsed >= Duration::from_secs(31),
        "{virtual_elapsed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "real time passed"
    );
}

#[test]
fn more_than_two_to_the_32_missed_periods_coalesce_into_one_firing() {
    // The script's clock is the monotonic clock plus what was advanced: periods long enough
    // that the real time between two iterations cannot make one due.
    for period in [Duration::from_millis(100), Duration::from_millis(300)] {
        let (mut lp, script) = scripted();
        let log = Recorder::new();
        let t = lp
            .handle()
            .add_timeout(Frequency::Period(period), log.timer())
            .unwrap();
        // 5e9 periods missed, beyond what a u32 counts.
        script.advance(period * 1_000_000_000 * 5);
        lp.run_once_timeout(Duration::ZERO).unwrap();
        assert_eq!(log.take(), vec![Fired::Timer(t)], "{period:?}");
        // The next deadline lies after now, on the grid: nothing is due until time moves.
        lp.run_once_timeout(Duration::ZERO).unwrap();
        assert!(
            log.is_empty(),
            "{period:?}: fired again without time passing"
        );
        script.advance(period);
        lp.run_once_timeout(Duration::ZERO).unwrap();
        assert_eq!(log.take(), vec![Fired::Timer(t)], "{period:?}");
    }
}

#[test]
fn one_fd_failing_forever_is_its_watches_error_and_the_others_are_served() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (bad_r, bad_w) = pipe();
    let (good_r, good_w) = pipe();
    script.break_fd(raw(&bad_r), Errno::NOSPC);
    let bad = lp
        .handle()
        .add_handle(raw(&bad_r), Events::READABLE, log.watch())
        .unwrap();
    let good = lp
        .handle()
        .add_handle(raw(&good_r), Events::READABLE, log.draining_watch())
        .unwrap();
    write(&bad_w, b"x");
    for round in 0..20 {
        write(&good_w, b"y");
        lp.run_once_timeout(Duration::from_secs(5))
            .expect("a failing fd is not the loop's error");
        let fired = log.take();
        assert!(
            fired.contains(&Fired::Watch(bad, Events::ERROR)),
            "round {round}: {fired:?}"
        );
        assert!(
            fired.contains(&Fired::Watch(good, Events::READABLE)),
            "round {round}: {fired:?}"
        );
        assert_eq!(
            fired.len(),
            2,
            "round {round}: one call per watch: {fired:?}"
        );
    }
    // Once the kernel takes it, the fd is an ordinary watch again.
    script.mend_fd(raw(&bad_r));
    lp.run_once_timeout(Duration::ZERO).unwrap();
    log.take();
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(log.take(), vec![Fired::Watch(bad, Events::READABLE)]);
}

#[test]
fn a_token_reported_twice_in_one_wait_calls_its_watch_once() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (a, _b) = socketpair();
    let id = lp
        .handle()
        .add_handle(raw(&a), Events::READABLE | Events::WRITABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    log.take();
    script.make_ready(raw(&a), Events::READABLE);
    script.make_ready(raw(&a), Events::HANGUP);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    let fired = log.take();
    assert_eq!(fired.len(), 1, "{fired:?}");
    let Fired::Watch(got, events) = fired[0] else {
        panic!("{fired:?}")
    };
    assert_eq!(got, id);
    assert!(
        events.contains(Events::READABLE | Events::HANGUP),
        "{events:?}"
    );
}

#[test]
fn a_rebuild_that_cannot_get_a_new_instance_does_not_fail_the_loop() {
    let (mut lp, script) = scripted();
    let log = Recorder::new();
    let (r, w) = pipe();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.draining_watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    // A stale registration reported, and no fresh instance to start over on (out of fds).
    for _ in 0..3 {
        script.report_token(vireo_core::Token::UNKNOWN, Events::READABLE);
        script.fail_next(Op::Fresh, Errno::MFILE);
        write(&w, b"x");
        lp.run_once_timeout(Duration::from_secs(5))
            .expect("a failed rebuild is not the loop's error");
        assert_eq!(log.take(), vec![Fired::Watch(id, Events::READABLE)]);
    }
    assert_eq!(lp.stats().backend_rebuilds, 0);
    assert_eq!(script.pending_faults(), 0);
    // Once an instance can be made, the loop starts over and keeps serving.
    script.report_token(vireo_core::Token::UNKNOWN, Events::READABLE);
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(lp.stats().backend_rebuilds, 1);
    write(&w, b"y");
    run_until(&mut lp, "READABLE after the rebuild", || !log.is_empty());
    assert_eq!(log.take(), vec![Fired::Watch(id, Events::READABLE)]);
}

fn raise(sig: i32) {
    // SAFETY: kill(2) on this process with a signal a watch of the test handles.
    assert_eq!(unsafe { libc::kill(libc::getpid(), sig) }, 0);
}

#[test]
fn a_refused_signal_pipe_registration_still_reports_every_signal() {
    let (mut lp, script) = scripted();
    let sig = libc::SIGRTMIN() + 7;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(0u32));
    let sink = std::sync::Arc::clone(&seen);
    // The pipe's registration fails: its watch hears ERROR until it lands, and a signal that
    // arrived meanwhile is reported all the same.
    script.fail_next(Op::Register, Errno::NOMEM);
    lp.handle()
        .add_signal(&[sig], move |_, _, info| {
            *sink.lock().unwrap() += info.count
        })
        .unwrap();
    raise(sig);
    run_until(&mut lp, "the first signal", || *seen.lock().unwrap() == 1);
    raise(sig);
    run_until(&mut lp, "the second signal", || *seen.lock().unwrap() == 2);
    assert_eq!(script.pending_faults(), 0);
}

#[test]
fn a_failed_wait_loses_no_signal() {
    let (mut lp, script) = scripted();
    let sig = libc::SIGRTMIN() + 8;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(0u32));
    let sink = std::sync::Arc::clone(&seen);
    lp.handle()
        .add_signal(&[sig], move |_, _, info| {
            *sink.lock().unwrap() += info.count
        })
        .unwrap();
    raise(sig);
    script.fail_next(Op::Wait, Errno::NOMEM);
    assert!(lp.run_once_timeout(Duration::ZERO).is_err());
    run_until(&mut lp, "the signal", || *seen.lock().unwrap() == 1);
}

#[test]
fn a_refused_pidfd_registration_still_reports_the_exit() {
    use std::os::unix::process::ExitStatusExt;
    let (mut lp, script) = scripted();
    let mut child = std::process::Command::new("sh")
        .args(["-c", "read x; exit 5"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = std::sync::Arc::new(std::sync::Mutex::new(None));
    let sink = std::sync::Arc::clone(&status);
    script.fail_next(Op::Register, Errno::NOSPC);
    lp.handle()
        .add_child_process(&child, move |_, _, s| *sink.lock().unwrap() = Some(s))
        .unwrap();
    // ERROR before the child exits reports nothing (it has no status yet).
    run_iterations(&mut lp, 2);
    assert!(status.lock().unwrap().is_none());
    drop(child.stdin.take());
    run_until(&mut lp, "the exit status", || {
        status.lock().unwrap().is_some()
    });
    let s = status.lock().unwrap().unwrap();
    assert_eq!(s.code(), Some(5));
    assert_eq!(s.signal(), None);
    assert!(child.try_wait().is_err(), "not reaped by the watch");
}
