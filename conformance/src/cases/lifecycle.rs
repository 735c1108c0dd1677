//! Ids, errors, the lifetime of callback state, fd edge cases, kernel-set bookkeeping, panics.

use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustix::io::Errno;
use vireo_core::{Backend, Error, EventLoop, Events, Frequency, WatchId};

use crate::kit::*;

/// Watch and timer ids start at 1, count separately, and are never reused after removal.
pub fn ids_start_at_one_separate_and_never_reused<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (r, _w) = pipe();
    let w1 = h
        .add_handle(raw(&r), Events::READABLE, |_, _, _, _| {})
        .unwrap();
    let t1 = h.add_timeout(Frequency::Disabled, |_, _| {}).unwrap();
    let w2 = h
        .add_handle(raw(&r), Events::READABLE, |_, _, _, _| {})
        .unwrap();
    assert_eq!((w1.as_u64(), t1.as_u64(), w2.as_u64()), (1, 1, 2));
    h.remove_handle(w2).unwrap();
    h.remove_timeout(t1).unwrap();
    run_iterations(&mut lp, 1); // purge
    let w3 = h
        .add_handle(raw(&r), Events::READABLE, |_, _, _, _| {})
        .unwrap();
    let t2 = h.add_timeout(Frequency::Disabled, |_, _| {}).unwrap();
    assert_eq!((w3.as_u64(), t2.as_u64()), (3, 2));
}

/// Unknown and already-removed ids are errors naming the id, for watches and timers alike.
pub fn unknown_ids_are_errors<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (r, _w) = pipe();
    let w = h
        .add_handle(raw(&r), Events::READABLE, |_, _, _, _| {})
        .unwrap();
    let t = h.add_timeout(Frequency::Disabled, |_, _| {}).unwrap();
    h.remove_handle(w).unwrap();
    h.remove_timeout(t).unwrap();
    // Removed but not yet purged, then purged: both are unknown.
    for purge in [false, true] {
        if purge {
            run_iterations(&mut lp, 1);
        }
        assert!(matches!(h.remove_handle(w), Err(Error::UnknownWatch(id)) if id == w));
        assert!(matches!(
            h.update_handle(w, Events::WRITABLE),
            Err(Error::UnknownWatch(_))
        ));
        assert!(matches!(h.remove_timeout(t), Err(Error::UnknownTimer(id)) if id == t));
        assert!(matches!(
            h.update_timeout(t, Frequency::EveryIteration),
            Err(Error::UnknownTimer(_))
        ));
    }
    let err = h.remove_handle(w).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("watch {} is not registered", w.as_u64())
    );
    let io: std::io::Error = err.into();
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
}

/// An invalid fd (negative, or a closed number) is refused at add with EBADF.
pub fn invalid_fd_is_ebadf<B: Backend>() {
    let lp = new_loop::<B>();
    let (r, w) = pipe();
    let closed = r.as_raw_fd();
    drop(r);
    drop(w);
    for fd in [-1, closed] {
        match lp
            .handle()
            .add_handle(fd, Events::READABLE, |_, _, _, _| {})
        {
            Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(Errno::BADF.raw_os_error())),
            other => panic!("fd {fd}: expected EBADF, got {other:?}"),
        }
    }
}

/// Callback state is dropped exactly once, on the loop thread, after remove returned (never
/// inside it), at the loop's next purge point.
pub fn state_dropped_once_after_remove_on_loop_thread<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (r, _w) = pipe();
    let probe = DropProbe::new();
    let tracked = probe.tracked();
    let w = h
        .add_handle(raw(&r), Events::READABLE, move |_, _, _, _| {
            let _keep = &tracked;
        })
        .unwrap();
    // Removed from another thread: the state must still be dropped on the loop thread.
    let remover = {
        let h = h.clone();
        thread::spawn(move || h.remove_handle(w).unwrap())
    };
    remover.join().unwrap();
    assert_eq!(probe.drops(), 0, "dropped inside remove_handle");
    run_iterations(&mut lp, 1);
    assert_eq!(probe.drops(), 1);
    assert_eq!(probe.dropped_on(), Some(thread::current().id()));
    run_iterations(&mut lp, 2);
    assert_eq!(probe.drops(), 1);
}

/// Timer state follows the same rule as watch state.
pub fn timer_state_dropped_once_after_remove<B: Backend>() {
    let mut lp = new_loop::<B>();
    let probe = DropProbe::new();
    let tracked = probe.tracked();
    let t = lp
        .handle()
        .add_timeout(Frequency::EveryIteration, move |h, id| {
            let _keep = &tracked;
            h.remove_timeout(id).unwrap();
        })
        .unwrap();
    let _ = t;
    run_iterations(&mut lp, 1);
    assert_eq!(
        probe.drops(),
        1,
        "not dropped at the end of the iteration that removed it"
    );
    assert_eq!(probe.dropped_on(), Some(thread::current().id()));
    run_iterations(&mut lp, 2);
    assert_eq!(probe.drops(), 1);
}

/// Dropping the loop drops every remaining callback once; handles then report Closed.
pub fn dropping_loop_drops_everything<B: Backend>() {
    let lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (r, _w) = pipe();
    let probe = DropProbe::new();
    let (a, b, c) = (probe.tracked(), probe.tracked(), probe.tracked());
    h.add_handle(raw(&r), Events::READABLE, move |_, _, _, _| {
        let _keep = &a;
    })
    .unwrap();
    h.add_timeout(Frequency::from_millis(1000), move |_, _| {
        let _keep = &b;
    })
    .unwrap();
    h.invoke(move |_| {
        let _keep = &c;
    })
    .unwrap();
    drop(lp);
    assert_eq!(probe.drops(), 3);
    assert!(matches!(
        h.add_timeout(Frequency::Disabled, |_, _| {}),
        Err(Error::Closed)
    ));
    assert!(matches!(h.invoke(|_| {}), Err(Error::Closed)));
    assert!(matches!(
        h.add_handle(raw(&r), Events::READABLE, |_, _, _, _| {}),
        Err(Error::Closed)
    ));
}

/// Remove, close, reopen the same fd number, re-add: the new watch sees the new file only,
/// whether or not the loop ran in between, and even while another fd keeps the old file open
/// and readable (epoll would keep reporting it under the old registration).
pub fn remove_close_reopen_readd_no_stale_event<B: Backend>() {
    for iterate_between in [false, true] {
        let mut lp = new_loop::<B>();
        let h = lp.handle().clone();
        let (mut reader, old_w) = pipe();
        write(&old_w, b"stale");
        let log = Recorder::new();
        let old = h
            .add_handle(raw(&reader), Events::READABLE, log.watch())
            .unwrap();
        run_until(&mut lp, "old READABLE", || !log.is_empty());
        let number = raw(&reader);
        let keep_old_open = rustix::io::fcntl_dupfd_cloexec(&reader, 0).unwrap();
        h.remove_handle(old).unwrap();
        if iterate_between {
            run_iterations(&mut lp, 1);
        }
        // Close the number and open a new file on it, atomically (no other thread can take
        // the number in between): dup2 over it.
        let (new_r, new_w) = pipe();
        rustix::io::dup2(&new_r, &mut reader).unwrap();
        drop(new_r);
        assert_eq!(raw(&reader), number);
        log.take();
        let new = h.add_handle(number, Events::READABLE, log.watch()).unwrap();
        let iterations = iterations_within(&mut lp, Duration::from_millis(100));
        assert!(
            log.is_empty(),
            "stale event from the old file: {:?}",
            log.take()
        );
        assert!(
            iterations <= 4,
            "spun {iterations} times on the old file's events"
        );
        write(&new_w, b"x");
        run_until(&mut lp, "the new file's READABLE", || !log.is_empty());
        assert_eq!(log.events_of(new)[0], Events::READABLE);
        drop(keep_old_open);
    }
}

/// A program may close an fd as soon as `remove_handle` returns, before the loop has applied
/// the removal, and another thread may open a file under the freed number in between. When
/// that file cannot be polled at all (a directory, a procfs file: epoll refuses even `DEL`
/// on it with `EPERM`), the loop still runs without an error, and a watch added for the new
/// file behaves as for any file that cannot be polled.
pub fn removed_fd_reused_by_an_unpollable_file_is_no_error<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (mut reader, w) = pipe();
    write(&w, b"x");
    let log = Recorder::new();
    let old = h
        .add_handle(raw(&reader), Events::READABLE, log.watch())
        .unwrap();
    run_until(&mut lp, "READABLE", || !log.is_empty());
    h.remove_handle(old).unwrap();
    // Close the number and open a directory on it, atomically: dup2 over it.
    let dir = rustix::fs::open(
        "/",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    rustix::io::dup2(&dir, &mut reader).unwrap();
    log.take();
    run_iterations(&mut lp, 2);
    assert!(log.is_empty(), "a removed watch fired: {:?}", log.take());
    // The number now names a directory: always ready, like a regular file.
    let new = h
        .add_handle(raw(&reader), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(log.events_of(new), vec![Events::READABLE]);
    h.remove_handle(new).unwrap();
    run_iterations(&mut lp, 1);
}

/// Regular files are always ready for the whole interest, on every backend.
pub fn regular_file_always_ready<B: Backend>() {
    let mut lp = new_loop::<B>();
    let file = regular_file();
    let log = Recorder::new();
    let rw = lp
        .handle()
        .add_handle(raw(&file), Events::READABLE | Events::WRITABLE, log.watch())
        .unwrap();
    let ro = lp
        .handle()
        .add_handle(raw(&file), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 2);
    assert_eq!(
        log.events_of(rw),
        vec![Events::READABLE | Events::WRITABLE; 2]
    );
    assert_eq!(log.events_of(ro), vec![Events::READABLE; 2]);
    lp.handle().remove_handle(rw).unwrap();
    lp.handle().remove_handle(ro).unwrap();
    log.take();
    run_iterations(&mut lp, 1);
    assert!(log.is_empty());
}

/// Closing a watched fd (a contract violation): at most one late report (a poll in flight may
/// hold the file), then silence; the loop does not spin, and the watch is removable once.
pub fn closed_while_registered_is_silent<B: Backend>() {
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
    run_iterations(&mut lp, 1);
    drop(r);
    drop(w);
    let iterations = iterations_within(&mut lp, Duration::from_millis(100));
    let late = log.take();
    assert!(
        late.len() <= 1,
        "a closed fd kept firing: {}",
        summary(&late)
    );
    assert!(iterations <= 5, "spun {iterations} times on a closed fd");
    lp.handle().remove_handle(id).unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(probe.drops(), 1);
}

/// A watched fd closed and its number reused while the watch was never removed (a contract
/// violation): once a watch is added for the new file, the old watch is out of the fan-out
/// and never reports the new file, on every backend; the new watch gets the new file's
/// events; removing the old watch still succeeds and drops its state once.
pub fn stale_watch_never_reports_the_file_that_reused_its_number<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (mut reader, _old_w) = pipe();
    let probe = DropProbe::new();
    let log = Recorder::new();
    let old = h
        .add_handle(
            raw(&reader),
            Events::READABLE,
            log.tracked_watch(probe.tracked()),
        )
        .unwrap();
    run_iterations(&mut lp, 1);
    let number = raw(&reader);
    // Close the number and open another file on it, with the old watch still registered.
    let (new_r, new_w) = pipe();
    rustix::io::dup2(&new_r, &mut reader).unwrap();
    drop(new_r);
    write(&new_w, b"for the new watch");
    let new = h.add_handle(number, Events::READABLE, log.watch()).unwrap();
    run_until(&mut lp, "the new file's READABLE", || {
        !log.events_of(new).is_empty()
    });
    run_iterations(&mut lp, 5);
    assert!(
        log.events_of(old).is_empty(),
        "the old watch received the new file's events: {}",
        summary(&log.take())
    );
    assert!(log.events_of(new).iter().all(|e| *e == Events::READABLE));
    h.remove_handle(old).unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(probe.drops(), 1);
    // The new watch is unaffected by the old one's removal.
    log.take();
    run_iterations(&mut lp, 1);
    assert_eq!(log.events_of(new), vec![Events::READABLE]);
}

/// The same contract violation, raced by the dispatch pass itself: the stale watch was
/// reported ready in this iteration, and a callback that runs before it (a lower id) closes
/// its fd, opens another file on the number and adds a watch for it. From that add on, the
/// stale watch is out of the fan-out: it is not called later in the same pass either.
pub fn stale_watch_added_over_in_its_own_pass_is_not_called<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let (first_r, first_w) = pipe();
    let (stale_r, stale_w) = pipe();
    let (new_r, new_w) = pipe();
    let number = raw(&stale_r);
    let log = Recorder::new();
    // Moved into the first watch's callback, which puts another file on the stale number.
    let swap = Arc::new(Mutex::new(Some((stale_r, new_r))));
    let added = Arc::new(Mutex::new(None::<WatchId>));
    let first = {
        let (swap, added, log) = (Arc::clone(&swap), Arc::clone(&added), log.clone());
        h.add_handle(raw(&first_r), Events::READABLE, move |h, id, _, ev| {
            log.push(Fired::Watch(id, ev));
            let Some((mut stale_r, new_r)) = swap.lock().unwrap().take() else {
                return;
            };
            rustix::io::dup2(&new_r, &mut stale_r).unwrap();
            drop(new_r);
            let new = h.add_handle(number, Events::READABLE, log.watch()).unwrap();
            *added.lock().unwrap() = Some(new);
            // Kept open (the number now names the new pipe) until the test ends.
            std::mem::forget(stale_r);
        })
        .unwrap()
    };
    let stale = h.add_handle(number, Events::READABLE, log.watch()).unwrap();
    assert!(first < stale);
    // Both ready before the iteration that reports them together.
    write(&first_w, b"x");
    write(&stale_w, b"old file");
    write(&new_w, b"new file");
    run_until(&mut lp, "the first watch", || {
        !log.events_of(first).is_empty()
    });
    let new = added
        .lock()
        .unwrap()
        .expect("the first callback added a watch");
    run_until(&mut lp, "the new watch", || !log.events_of(new).is_empty());
    run_iterations(&mut lp, 3);
    assert!(
        log.events_of(stale).is_empty(),
        "the stale watch ran after a watch was added over its number: {}",
        summary(&log.take())
    );
    h.remove_handle(stale).unwrap();
    h.remove_handle(new).unwrap();
    run_iterations(&mut lp, 1);
    // SAFETY: the number was left open by the callback (forgotten); nothing else owns it.
    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(number) });
}

/// An eventfd removed, replaced by another eventfd on the same number (`dup2`) and watched
/// again within one iteration: all anonymous-inode files share one `(st_dev, st_ino)`, so the
/// core cannot prove it is the same file and registers the new one afresh. The new watch never
/// gets the old file's readiness and does get its own.
pub fn eventfd_replaced_on_the_same_number_is_a_new_registration<B: Backend>() {
    use rustix::event::{EventfdFlags, eventfd};
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let mut first = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
    let log = Recorder::new();
    let old = h
        .add_handle(raw(&first), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    rustix::io::write(&first, &1u64.to_ne_bytes()).unwrap();
    run_until(&mut lp, "the first eventfd's READABLE", || !log.is_empty());
    let number = raw(&first);
    // In one iteration: remove, replace the file, watch the number again.
    h.remove_handle(old).unwrap();
    let second = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
    rustix::io::dup2(&second, &mut first).unwrap();
    log.take();
    let new = h.add_handle(number, Events::READABLE, log.watch()).unwrap();
    run_iterations(&mut lp, 3);
    assert!(
        log.is_empty(),
        "the new eventfd got the old one's readiness: {}",
        summary(&log.take())
    );
    rustix::io::write(&second, &1u64.to_ne_bytes()).unwrap();
    run_until(&mut lp, "the second eventfd's READABLE", || !log.is_empty());
    assert_eq!(log.events_of(new)[0], Events::READABLE);
    drop(second);
}

/// A regular file closed while watched (a contract violation) goes silent like any other fd:
/// the always-ready emulation of backends whose kernel refuses regular files must notice the
/// close instead of reporting it, with a zero timeout, forever.
pub fn closed_regular_file_while_registered_is_silent<B: Backend>() {
    let mut lp = new_loop::<B>();
    let file = regular_file();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&file), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(log.events_of(id), vec![Events::READABLE]);
    drop(file);
    let iterations = iterations_within(&mut lp, Duration::from_millis(100));
    let late = log.take();
    assert!(
        late.len() <= 1,
        "a closed regular file kept firing: {}",
        summary(&late)
    );
    assert!(iterations <= 5, "spun {iterations} times on a closed file");
    lp.handle().remove_handle(id).unwrap();
    run_iterations(&mut lp, 1);
}

/// Removing and re-adding a watch (and pausing and resuming one) within one iteration changes
/// nothing in the kernel set: no registration system call.
pub fn net_zero_changes_cost_no_kernel_change<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let pipes: Vec<_> = (0..20).map(|_| pipe()).collect();
    let mut ids: Vec<WatchId> = pipes
        .iter()
        .map(|(r, _)| {
            h.add_handle(raw(r), Events::READABLE, |_, _, _, _| {})
                .unwrap()
        })
        .collect();
    run_iterations(&mut lp, 1);
    let before = lp.stats().kernel_changes;
    for _ in 0..3 {
        for (id, (r, _)) in ids.iter_mut().zip(&pipes) {
            h.remove_handle(*id).unwrap();
            *id = h
                .add_handle(raw(r), Events::READABLE, |_, _, _, _| {})
                .unwrap();
            h.update_handle(*id, Events::empty()).unwrap();
            h.update_handle(*id, Events::READABLE).unwrap();
        }
        run_iterations(&mut lp, 1);
    }
    assert_eq!(lp.stats().kernel_changes, before);
    // A real change is still applied.
    h.update_handle(ids[0], Events::WRITABLE).unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(lp.stats().kernel_changes, before + 1);
}

/// 5,000 registered fds with a few active: exactly the active ones fire.
pub fn many_fds_few_active<B: Backend>() {
    raise_fd_limit(12_000);
    let mut lp = new_loop::<B>();
    let fired = Arc::new(Mutex::new(Vec::new()));
    let pairs: Vec<_> = (0..2500).map(|_| socketpair()).collect();
    let mut ids = Vec::new();
    for (a, b) in &pairs {
        for fd in [a, b] {
            let sink = Arc::clone(&fired);
            ids.push(
                lp.handle()
                    .add_handle(raw(fd), Events::READABLE, move |_, id, fd, _| {
                        drain(fd);
                        sink.lock().unwrap().push(id);
                    })
                    .unwrap(),
            );
        }
    }
    assert_eq!(ids.len(), 5000);
    let active = [7usize, 1234, 2499];
    for &i in &active {
        write(&pairs[i].1, b"x"); // makes pairs[i].0, watch ids[2 * i], readable
    }
    run_until(&mut lp, "three active fds", || {
        fired.lock().unwrap().len() >= 3
    });
    run_iterations(&mut lp, 1);
    let got = fired.lock().unwrap().clone();
    let want: Vec<WatchId> = active.iter().map(|&i| ids[2 * i]).collect();
    assert_eq!(got, want);
}

/// 5,000 fds ready at once, more than io_uring's completion queue holds (4,096): no event is
/// lost, every callback runs, within a few iterations.
pub fn more_ready_fds_than_a_completion_queue_holds<B: Backend>() {
    raise_fd_limit(12_000);
    let mut lp = new_loop::<B>();
    let fired = Arc::new(AtomicUsize::new(0));
    let pairs: Vec<_> = (0..2500).map(|_| socketpair()).collect();
    for (a, b) in &pairs {
        for fd in [a, b] {
            let count = Arc::clone(&fired);
            lp.handle()
                .add_handle(raw(fd), Events::READABLE, move |h, id, fd, _| {
                    drain(fd);
                    count.fetch_add(1, Ordering::SeqCst);
                    h.remove_handle(id).unwrap();
                })
                .unwrap();
        }
    }
    run_iterations(&mut lp, 1); // registered before they become ready
    for (a, b) in &pairs {
        write(a, b"x");
        write(b, b"x");
    }
    let mut iterations = 0;
    run_until(&mut lp, "5,000 callbacks", || {
        iterations += 1;
        fired.load(Ordering::SeqCst) == 5000
    });
    assert!(iterations <= 10, "took {iterations} iterations");
}

/// After a watch is removed and its fd closed, the peer sees EOF as soon as the loop has run:
/// at once when it happens inside a callback, after one iteration when it happens outside.
/// (A pending io_uring poll holds a reference to the file until the removal reaches the
/// kernel.)
pub fn remove_then_close_lets_peer_see_eof_promptly<B: Backend>() {
    use std::os::fd::OwnedFd;

    fn peer_sees_eof(peer: &OwnedFd) -> bool {
        let mut buf = [0u8; 8];
        matches!(rustix::io::read(peer, &mut buf), Ok(0))
    }

    // Inside another watch's callback, while the removed watch is idle (armed in io_uring).
    let mut lp = new_loop::<B>();
    let (ours, peer) = socketpair();
    let idle = lp
        .handle()
        .add_handle(raw(&ours), Events::READABLE, |_, _, _, _| {})
        .unwrap();
    run_iterations(&mut lp, 1);
    let (trigger_r, trigger_w) = pipe();
    let ours = Arc::new(Mutex::new(Some(ours)));
    let slot = Arc::clone(&ours);
    lp.handle()
        .add_handle(raw(&trigger_r), Events::READABLE, move |h, id, fd, _| {
            drain(fd);
            h.remove_handle(id).unwrap();
            h.remove_handle(idle).unwrap();
            drop(slot.lock().unwrap().take()); // close
        })
        .unwrap();
    write(&trigger_w, b"x");
    run_until(&mut lp, "the callback", || ours.lock().unwrap().is_none());
    assert!(peer_sees_eof(&peer), "no EOF after run_once returned");

    // Between iterations.
    let (ours, peer) = socketpair();
    let id = lp
        .handle()
        .add_handle(raw(&ours), Events::READABLE, |_, _, _, _| {})
        .unwrap();
    run_iterations(&mut lp, 1);
    lp.handle().remove_handle(id).unwrap();
    drop(ours);
    run_iterations(&mut lp, 1);
    assert!(peer_sees_eof(&peer), "no EOF after the next iteration");
}

fn raise_fd_limit(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c < want) {
        limit.current = limit.maximum.map(|m| m.min(want.max(m.min(want))));
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// Runs iterations (at most 100, each waiting at most 50 ms) until one unwinds with a panic;
/// returns whether one did. An iteration's error fails the case.
fn run_until_panic<B: Backend>(lp: &mut EventLoop<B>) -> bool {
    for _ in 0..100 {
        match catch_unwind(AssertUnwindSafe(|| {
            lp.run_once_timeout(Duration::from_millis(50))
        })) {
            Err(_) => return true,
            Ok(r) => {
                r.unwrap();
            }
        }
    }
    false
}

/// A panicking watch callback unwinds out of run_once; the loop stays usable, the watch stays
/// registered, and the other watches of that batch fire in the next iteration.
pub fn panicking_callback_leaves_loop_usable<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r1, w1) = pipe();
    let (r2, w2) = pipe();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let log = Recorder::new();
    let bomb = lp
        .handle()
        .add_handle(raw(&r1), Events::READABLE, move |_, _, _, _| {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("deliberate panic from a conformance case");
            }
        })
        .unwrap();
    let other = lp
        .handle()
        .add_handle(raw(&r2), Events::READABLE, log.draining_watch())
        .unwrap();
    let ticks = Recorder::new();
    lp.handle()
        .add_timeout(Frequency::EveryIteration, ticks.timer())
        .unwrap();
    write(&w1, b"x");
    write(&w2, b"x");
    let panicked = run_until_panic(&mut lp);
    assert!(panicked, "the callback's panic did not reach the caller");
    assert!(
        log.events_of(other).is_empty(),
        "a higher id ran after the panic"
    );
    run_until(&mut lp, "the other watch after the panic", || {
        !log.events_of(other).is_empty()
    });
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the panicking watch was lost"
    );
    lp.handle().update_handle(bomb, Events::empty()).unwrap();
    assert!(!ticks.is_empty());
}

/// A queued closure that panics after watch callbacks ran in the same iteration unwinds out of
/// run_once; those watches keep their callbacks and fire again.
pub fn panicking_invoke_keeps_the_watches_of_its_iteration<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let h = lp.handle().clone();
    let watch = h
        .add_handle(raw(&r), Events::READABLE, move |h, _, _, _| {
            // Not drained: level-triggered, it stays ready.
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                h.invoke(|_| panic!("deliberate panic from a queued closure"))
                    .unwrap();
            }
        })
        .unwrap();
    write(&w, b"x");
    let panicked = run_until_panic(&mut lp);
    assert!(panicked, "the closure's panic did not reach the caller");
    let before = calls.load(Ordering::SeqCst);
    run_until(&mut lp, "the watch after the closure's panic", || {
        calls.load(Ordering::SeqCst) > before
    });
    lp.handle().remove_handle(watch).unwrap();
}

/// A panicking timer callback unwinds out of run_once; the timers that were due after it in
/// the same pass are not lost and fire in the next iteration, and the panicking timer stays.
pub fn panicking_timer_loses_no_due_timer<B: Backend>() {
    let mut lp = new_loop::<B>();
    let h = lp.handle().clone();
    let log = Recorder::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let bomb = h
        .add_timeout(Frequency::from_millis(5), move |_, _| {
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("deliberate panic from a conformance case");
            }
        })
        .unwrap();
    // Due later in the same pass: a longer period and a larger id.
    let victim = h
        .add_timeout(Frequency::from_millis(10), log.timer())
        .unwrap();
    thread::sleep(Duration::from_millis(15));
    let outcome = catch_unwind(AssertUnwindSafe(|| lp.run_once_timeout(Duration::ZERO)));
    assert!(
        outcome.is_err(),
        "the timer's panic did not reach the caller"
    );
    assert!(log.is_empty());
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(
        log.take(),
        vec![Fired::Timer(victim)],
        "the due timer was lost"
    );
    run_until(&mut lp, "the panicking timer again", || {
        calls.load(Ordering::SeqCst) >= 2
    });
    h.remove_timeout(bomb).unwrap();
}
