//! Fd watches: level-triggered readiness, delivery masks, several watches per fd, changes from
//! inside callbacks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_core::{Backend, Events, WatchId};

use crate::kit::*;

/// A written pipe makes its READABLE watch fire with READABLE.
pub fn readable_after_write<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.draining_watch())
        .unwrap();
    run_iterations(&mut lp, 2);
    assert!(log.is_empty(), "fired before any write: {:?}", log.take());
    write(&w, b"x");
    run_until(&mut lp, "READABLE", || !log.is_empty());
    assert_eq!(log.events_of(id), vec![Events::READABLE]);
}

/// Readiness that came and went between two iterations (data written, then read by someone
/// else before the loop looked) is not reported: a backend reports what holds when it is
/// asked, not what held once (io_uring's poll completions carry the mask of the moment of the
/// wake-up and need re-checking).
pub fn readiness_consumed_between_iterations_is_not_reported<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = Recorder::new();
    let (r, w) = pipe();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 2);
    for _ in 0..20 {
        write(&w, b"x");
        assert_eq!(drain(raw(&r)), 1);
        lp.run_once_timeout(Duration::ZERO).unwrap();
    }
    assert!(
        log.is_empty(),
        "stale readiness reported: {}",
        summary(&log.take())
    );
    // And readiness that holds is still reported.
    write(&w, b"y");
    run_until(&mut lp, "the byte", || !log.is_empty());
    assert_eq!(log.events_of(id), vec![Events::READABLE]);
}

/// A callback that reads nothing is called again on every iteration (level-triggered).
pub fn level_triggered_refire<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.watch())
        .unwrap();
    write(&w, b"x");
    run_until(&mut lp, "first READABLE", || !log.is_empty());
    run_iterations(&mut lp, 5);
    assert_eq!(log.events_of(id), vec![Events::READABLE; 6]);
}

/// A partial read leaves data, so the watch fires again until the fd is drained.
pub fn partial_read_refires_until_drained<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let reads = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&reads);
    lp.handle()
        .add_handle(raw(&r), Events::READABLE, move |_, _, fd, _| {
            sink.lock().unwrap().push(read_raw(fd, 1));
        })
        .unwrap();
    write(&w, b"abc");
    run_until(&mut lp, "three one-byte reads", || {
        reads.lock().unwrap().len() == 3
    });
    run_iterations(&mut lp, 3);
    assert_eq!(
        *reads.lock().unwrap(),
        vec![1, 1, 1],
        "fired after the fd was drained"
    );
}

/// A connected socket is writable; after the interest becomes READABLE only, WRITABLE stops.
pub fn writable_socket_then_readable_only<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (a, _b) = socketpair();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&a), Events::WRITABLE, log.watch())
        .unwrap();
    run_until(&mut lp, "WRITABLE", || !log.is_empty());
    assert_eq!(log.take(), vec![Fired::Watch(id, Events::WRITABLE)]);
    lp.handle().update_handle(id, Events::READABLE).unwrap();
    run_iterations(&mut lp, 3);
    assert!(log.is_empty(), "still fired: {:?}", log.take());
}

/// Closing a pipe's writer gives the READABLE watch HANGUP, on every iteration until removed.
pub fn hangup_on_closed_pipe_writer_repeats<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.watch())
        .unwrap();
    drop(w);
    run_until(&mut lp, "HANGUP", || !log.is_empty());
    run_iterations(&mut lp, 3);
    let seen = log.events_of(id);
    assert_eq!(
        seen.len(),
        4,
        "HANGUP must repeat while the watch exists: {seen:?}"
    );
    assert!(seen.iter().all(|e| *e == Events::HANGUP), "{seen:?}");
    lp.handle().remove_handle(id).unwrap();
    log.take();
    run_iterations(&mut lp, 2);
    assert!(log.is_empty());
}

/// Closing a socket's peer gives READABLE|HANGUP (EOF is readable), repeated until removed.
pub fn hangup_on_closed_socket_peer<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (a, b) = socketpair();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&a), Events::READABLE, log.watch())
        .unwrap();
    drop(b);
    run_until(&mut lp, "HANGUP", || !log.is_empty());
    run_iterations(&mut lp, 2);
    assert_eq!(
        log.events_of(id),
        vec![Events::READABLE | Events::HANGUP; 3]
    );
}

/// Writing end of a pipe whose reader is gone: a WRITABLE watch gets ERROR.
pub fn error_on_pipe_without_reader<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&w), Events::WRITABLE, log.watch())
        .unwrap();
    drop(r);
    run_until(&mut lp, "ERROR", || {
        log.events_of(id).iter().any(|e| e.contains(Events::ERROR))
    });
    let last = *log.events_of(id).last().unwrap();
    assert!(
        last.contains(Events::ERROR) && !last.contains(Events::READABLE),
        "{last:?}"
    );
}

/// A watch with an empty interest never fires, even on a readable, hung-up fd, and the loop
/// does not spin on it (it blocks for the whole timeout).
pub fn empty_interest_never_fires_and_does_not_spin<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let log = Recorder::new();
    lp.handle()
        .add_handle(raw(&r), Events::empty(), log.watch())
        .unwrap();
    write(&w, b"x");
    drop(w);
    let iterations = iterations_within(&mut lp, Duration::from_millis(100));
    assert!(log.is_empty(), "fired: {:?}", log.take());
    assert!(
        iterations <= 3,
        "the loop spun {iterations} times on a disabled fd"
    );
}

/// A watch whose interest is HANGUP alone gets the hangup but never READABLE, although the
/// fd is readable too; ERROR and HANGUP need no READABLE or WRITABLE interest to arrive.
pub fn hangup_only_interest_gets_hangup_without_readable<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    write(&w, b"unread");
    let log = Recorder::new();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::HANGUP, log.watch())
        .unwrap();
    run_iterations(&mut lp, 2);
    assert!(log.is_empty(), "fired without a hangup: {:?}", log.take());
    drop(w);
    run_until(&mut lp, "HANGUP", || !log.is_empty());
    assert_eq!(log.events_of(id), vec![Events::HANGUP]);
}

/// Two watches on one fd: the one with an empty interest stays silent while the other fires.
pub fn empty_interest_silent_beside_active_sibling<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let log = Recorder::new();
    let quiet = lp
        .handle()
        .add_handle(raw(&r), Events::empty(), log.watch())
        .unwrap();
    let active = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.watch())
        .unwrap();
    write(&w, b"x");
    run_until(&mut lp, "READABLE", || !log.is_empty());
    run_iterations(&mut lp, 2);
    assert!(log.events_of(quiet).is_empty());
    assert_eq!(log.events_of(active).len(), 3);
}

/// Two watches on one fd with different interests each get only their own bits; removing
/// one leaves the other working.
pub fn two_watches_split_interest<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (a, b) = socketpair();
    let log = Recorder::new();
    let reader = lp
        .handle()
        .add_handle(raw(&a), Events::READABLE, log.watch())
        .unwrap();
    let writer = lp
        .handle()
        .add_handle(raw(&a), Events::WRITABLE, log.watch())
        .unwrap();
    write(&b, b"x");
    run_until(&mut lp, "both watches", || {
        !log.events_of(reader).is_empty() && !log.events_of(writer).is_empty()
    });
    assert!(log.events_of(reader).iter().all(|e| *e == Events::READABLE));
    assert!(log.events_of(writer).iter().all(|e| *e == Events::WRITABLE));
    lp.handle().remove_handle(writer).unwrap();
    log.take();
    run_iterations(&mut lp, 2);
    assert_eq!(log.take(), vec![Fired::Watch(reader, Events::READABLE); 2]);
}

/// An fd and its `dup` are independent: both fire; removing one keeps the other.
pub fn dup_fd_is_independent<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let dup = rustix::io::fcntl_dupfd_cloexec(&r, 0).unwrap();
    let log = Recorder::new();
    let orig = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, log.watch())
        .unwrap();
    let copy = lp
        .handle()
        .add_handle(raw(&dup), Events::READABLE, log.watch())
        .unwrap();
    write(&w, b"x");
    run_until(&mut lp, "both", || log.len() >= 2);
    assert_eq!(
        log.take(),
        vec![
            Fired::Watch(orig, Events::READABLE),
            Fired::Watch(copy, Events::READABLE)
        ]
    );
    lp.handle().remove_handle(orig).unwrap();
    run_iterations(&mut lp, 2);
    assert_eq!(log.take(), vec![Fired::Watch(copy, Events::READABLE); 2]);
    // Closing the original after its watch is gone does not disturb the dup's watch.
    lp.handle().remove_handle(copy).unwrap();
    drop(r);
    let again = lp
        .handle()
        .add_handle(raw(&dup), Events::READABLE, log.watch())
        .unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(log.take(), vec![Fired::Watch(again, Events::READABLE)]);
}

/// Interest changed inside the callback (READABLE -> WRITABLE -> empty -> READABLE) takes
/// effect from the next iteration.
pub fn update_interest_inside_callback<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (a, b) = socketpair();
    write(&b, b"x");
    let log = Recorder::new();
    let sink = log.clone();
    let id = lp
        .handle()
        .add_handle(raw(&a), Events::READABLE, move |h, id, _, ev| {
            sink.push(Fired::Watch(id, ev));
            let next = if ev == Events::READABLE {
                Events::WRITABLE
            } else {
                Events::empty()
            };
            h.update_handle(id, next).unwrap();
        })
        .unwrap();
    run_until(&mut lp, "two firings", || log.len() >= 2);
    run_iterations(&mut lp, 2);
    let seen: Vec<Events> = log
        .take()
        .into_iter()
        .map(|f| match f {
            Fired::Watch(_, e) => e,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seen, vec![Events::READABLE, Events::WRITABLE]);
    // Back to READABLE from outside: the unread byte is still there.
    lp.handle().update_handle(id, Events::READABLE).unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(log.events_of(id), vec![Events::READABLE]);
}

/// A watch that removes itself fires once; its state is dropped once, after the callback.
pub fn remove_self_inside_callback<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    let probe = DropProbe::new();
    let tracked = probe.tracked();
    let log = Recorder::new();
    let sink = log.clone();
    let id = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, move |h, id, _, ev| {
            let _keep = &tracked;
            sink.push(Fired::Watch(id, ev));
            h.remove_handle(id).unwrap();
            assert!(h.remove_handle(id).is_err(), "second remove must fail");
        })
        .unwrap();
    write(&w, b"x");
    run_until(&mut lp, "the one firing", || !log.is_empty());
    assert_eq!(
        probe.drops(),
        1,
        "state not dropped at the end of the iteration"
    );
    run_iterations(&mut lp, 3);
    assert_eq!(log.take(), vec![Fired::Watch(id, Events::READABLE)]);
    assert_eq!(probe.drops(), 1);
}

/// A callback that removes another watch whose event is in the same batch: that watch does
/// not fire, in either id order.
pub fn remove_other_watch_in_same_batch<B: Backend>() {
    for remover_first in [true, false] {
        let mut lp = new_loop::<B>();
        let (r1, w1) = pipe();
        let (r2, w2) = pipe();
        let log = Recorder::new();
        let victim: Arc<Mutex<Option<WatchId>>> = Arc::default();
        let remover_cb = {
            let log = log.clone();
            let victim = Arc::clone(&victim);
            move |h: &vireo_core::LoopHandle, id, _, ev| {
                log.push(Fired::Watch(id, ev));
                if let Some(v) = victim.lock().unwrap().take() {
                    h.remove_handle(v).unwrap();
                }
            }
        };
        let (remover, target) = if remover_first {
            let a = lp
                .handle()
                .add_handle(raw(&r1), Events::READABLE, remover_cb)
                .unwrap();
            let b = lp
                .handle()
                .add_handle(raw(&r2), Events::READABLE, log.watch())
                .unwrap();
            (a, b)
        } else {
            let b = lp
                .handle()
                .add_handle(raw(&r2), Events::READABLE, log.watch())
                .unwrap();
            let a = lp
                .handle()
                .add_handle(raw(&r1), Events::READABLE, remover_cb)
                .unwrap();
            (a, b)
        };
        *victim.lock().unwrap() = Some(target);
        write(&w1, b"x");
        write(&w2, b"x");
        run_until(&mut lp, "the remover", || {
            !log.events_of(remover).is_empty()
        });
        run_iterations(&mut lp, 1);
        let target_fired = log.events_of(target).len();
        if remover_first {
            assert_eq!(
                target_fired, 0,
                "removed watch fired later in the same batch"
            );
        } else {
            // The target has the lower id, so it ran before the remover in the first pass.
            assert_eq!(target_fired, 1, "lower id must run first, then never again");
        }
    }
}

/// A watch added inside a callback is not dispatched in that iteration, only the next.
pub fn add_inside_callback_waits_for_next_iteration<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (r, w) = pipe();
    write(&w, b"x");
    let log = Recorder::new();
    let added: Arc<Mutex<Option<WatchId>>> = Arc::default();
    let (sink, slot) = (log.clone(), Arc::clone(&added));
    let first = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, move |h, id, fd, ev| {
            sink.push(Fired::Watch(id, ev));
            if slot.lock().unwrap().is_none() {
                let new = h.add_handle(fd, Events::READABLE, sink.watch()).unwrap();
                *slot.lock().unwrap() = Some(new);
            }
        })
        .unwrap();
    run_until(&mut lp, "first firing", || !log.is_empty());
    assert_eq!(log.take(), vec![Fired::Watch(first, Events::READABLE)]);
    let second = added.lock().unwrap().unwrap();
    run_iterations(&mut lp, 1);
    assert_eq!(
        log.take(),
        vec![
            Fired::Watch(first, Events::READABLE),
            Fired::Watch(second, Events::READABLE)
        ]
    );
}

/// Ready watches are dispatched in ascending id order, whatever their fd numbers and the
/// order in which they became ready.
pub fn watches_dispatch_in_id_order<B: Backend>() {
    let write_orders: [[usize; 6]; 3] =
        [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]];
    for order in write_orders {
        let mut lp = new_loop::<B>();
        let pipes: Vec<_> = (0..6).map(|_| pipe()).collect();
        let log = Recorder::new();
        // Register in a mixed fd order so fd order and id order disagree.
        let ids: Vec<WatchId> = [2usize, 5, 0, 3, 1, 4]
            .iter()
            .map(|&i| {
                lp.handle()
                    .add_handle(raw(&pipes[i].0), Events::READABLE, log.draining_watch())
                    .unwrap()
            })
            .collect();
        run_iterations(&mut lp, 1); // registered before they become ready
        for i in order {
            write(&pipes[i].1, b"x");
        }
        run_until(&mut lp, "all six", || log.len() >= 6);
        let seen: Vec<WatchId> = log
            .take()
            .into_iter()
            .map(|f| match f {
                Fired::Watch(id, _) => id,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "write order {order:?}");
    }
}
