//! Loop-local state ([`LoopLocal`]): reached without a lock from the loop's callbacks, refused
//! everywhere else.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use vireo_core::{Backend, Error, Events, Frequency, LoopLocal, WeakLoopLocal};

use crate::kit::*;

/// Watches, timers and invoked closures share one value; the loop's owner reads it between
/// iterations.
pub fn local_state_is_shared_by_every_kind_of_callback<B: Backend>() {
    let mut lp = new_loop::<B>();
    let log = lp.handle().local(Vec::<&'static str>::new());
    let (r, w) = pipe();
    write(&w, b"x");
    let l = log.clone();
    lp.handle()
        .add_handle(raw(&r), Events::READABLE, move |h, id, fd, _| {
            drain(fd);
            l.with(|v| v.push("watch")).unwrap();
            h.remove_handle(id).unwrap();
        })
        .unwrap();
    let l = log.clone();
    lp.handle()
        .add_timeout(Frequency::EveryIteration, move |h, id| {
            l.with(|v| v.push("timer")).unwrap();
            h.remove_timeout(id).unwrap();
        })
        .unwrap();
    let l = log.clone();
    lp.handle()
        .invoke(move |_| l.with(|v| v.push("invoke")).unwrap())
        .unwrap();
    run_iterations(&mut lp, 2);
    let seen = lp.with_local(&log, |v| v.clone()).unwrap();
    assert_eq!(seen, ["timer", "watch", "invoke"]);
}

/// Another thread is refused, also while the loop is blocked in an iteration, and so is the
/// owner's thread between iterations without [`EventLoop::with_local`](vireo_core::EventLoop::with_local). Nothing is touched.
pub fn local_state_is_refused_off_the_loop_thread<B: Backend>() {
    let mut lp = new_loop::<B>();
    let n = lp.handle().local(0u32);
    assert!(matches!(n.with(|n| *n += 1), Err(Error::NotLoopThread)));
    let (n2, h) = (n.clone(), lp.handle().clone());
    let (tx, rx) = mpsc::channel();
    let other = thread::spawn(move || {
        // Runs while the loop blocks (or is about to) in the iteration below; either way it
        // is not the loop thread.
        tx.send(n2.with(|n| *n += 100).map_err(|e| e.to_string()))
            .unwrap();
        let n3 = n2.clone();
        h.invoke(move |_| n3.with(|n| *n += 1).unwrap()).unwrap();
    });
    let mut from_other = None;
    run_until(&mut lp, "the invoked closure", || {
        from_other = from_other.take().or_else(|| rx.try_recv().ok());
        from_other.is_some() && lp_value_reached(&n)
    });
    other.join().unwrap();
    assert!(
        from_other.unwrap().is_err(),
        "another thread reached loop-local state"
    );
    assert_eq!(lp.with_local(&n, |n| *n).unwrap(), 1);
}

/// Whether the invoked closure has run: the value is refused here (not the loop thread), so
/// this only watches a side channel, the strong count of clones.
fn lp_value_reached(n: &LoopLocal<u32>) -> bool {
    // The other thread's clones are gone once its closure ran and was dropped.
    n.strong_count() == 1
}

/// A `with` inside a `with` of the same value is `Borrowed`; a panic inside `with` leaves the
/// value usable.
pub fn nested_access_is_borrowed_and_a_panic_releases_it<B: Backend>() {
    let mut lp = new_loop::<B>();
    let n = lp.handle().local(0u32);
    let l = n.clone();
    lp.handle()
        .invoke(move |_| {
            let nested = l.with(|_| matches!(l.with(|_| ()), Err(Error::Borrowed)));
            assert!(nested.unwrap(), "a nested with was not Borrowed");
            l.with(|_| panic!("inside with")).unwrap();
        })
        .unwrap();
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lp.run_once_timeout(Duration::ZERO)
    }));
    assert!(unwound.is_err());
    let l = n.clone();
    lp.handle()
        .invoke(move |_| l.with(|n| *n += 1).unwrap())
        .unwrap();
    lp.run_once_timeout(Duration::ZERO).unwrap();
    assert_eq!(lp.with_local(&n, |n| *n).unwrap(), 1);
    assert!(matches!(
        lp.with_local(&n, |_| lp_nested(&n)),
        Ok(Err(Error::Borrowed))
    ));
}

fn lp_nested(n: &LoopLocal<u32>) -> Result<(), Error> {
    n.with(|_| ())
}

/// State made by one loop's handle is refused to another loop, on its thread or through its
/// [`EventLoop::with_local`](vireo_core::EventLoop::with_local).
pub fn local_state_of_another_loop_is_refused<B: Backend>() {
    let mut a = new_loop::<B>();
    let mut b = new_loop::<B>();
    let of_a = a.handle().local(7u32);
    assert!(matches!(
        b.with_local(&of_a, |n| *n),
        Err(Error::NotLoopThread)
    ));
    let l = of_a.clone();
    let (tx, rx) = mpsc::channel();
    b.handle()
        .invoke(move |_| tx.send(l.with(|n| *n).is_err()).unwrap())
        .unwrap();
    b.run_once_timeout(Duration::ZERO).unwrap();
    assert!(rx.try_recv().unwrap(), "loop b reached loop a's state");
    assert_eq!(a.with_local(&of_a, |n| *n).unwrap(), 7);
}

/// The value follows its loop to another thread, is dropped exactly once with the last
/// callback holding it, on the loop thread, and that callback's drop may still reach other
/// loop-local state of the loop (also in the loop's own drop).
pub fn local_state_moves_with_the_loop_and_drops_once<B: Backend + Send + 'static>() {
    /// Reaches the counter as it drops; the probe counts the drop.
    struct Reaches(LoopLocal<u32>, #[allow(dead_code)] Tracked);
    impl Drop for Reaches {
        fn drop(&mut self) {
            self.0.with(|n| *n += 1).expect("drop on the loop thread");
        }
    }
    let lp = new_loop::<B>();
    let probe = DropProbe::new();
    let counter = lp.handle().local(0u32);
    let held = lp.handle().local(probe.tracked());
    let (r, w) = pipe();
    let reaches = Reaches(counter.clone(), DropProbe::new().tracked());
    let watch = lp
        .handle()
        .add_handle(raw(&r), Events::READABLE, move |_, _, fd, _| {
            drain(fd);
            let _ = &reaches;
            held.with(|_| ()).unwrap();
        })
        .unwrap();
    let c = counter.clone();
    let probe2 = DropProbe::new();
    let in_drop = Reaches(c, probe2.tracked());
    lp.handle()
        .add_timeout(Frequency::Disabled, move |_, _| {
            let _ = &in_drop;
        })
        .unwrap();
    write(&w, b"x");
    let seen = probe.clone();
    let runner = thread::spawn(move || {
        let (mut lp, probe) = (lp, seen);
        lp.run_once_timeout(Duration::from_secs(10)).unwrap();
        lp.handle().remove_handle(watch).unwrap();
        assert_eq!(probe.drops(), 0, "dropped inside remove_handle");
        lp.run_once_timeout(Duration::ZERO).unwrap();
        assert_eq!(probe.drops(), 1);
        assert_eq!(probe.dropped_on(), Some(thread::current().id()));
        assert_eq!(lp.with_local(&counter, |n| *n).unwrap(), 1);
        drop(lp);
        // The timer's state was dropped by the loop's drop and still reached the counter.
        assert_eq!(probe2.drops(), 1);
        counter
    });
    let counter = runner.join().unwrap();
    assert_eq!(probe.drops(), 1);
    assert!(matches!(counter.with(|n| *n), Err(Error::NotLoopThread)));
}

/// A value made with `local_cyclic` reaches itself through its weak reference (strong clones
/// for its callbacks) and is dropped once the last strong clone goes, despite the reference.
pub fn cyclic_local_state_hands_itself_to_its_callbacks<B: Backend>() {
    struct Node {
        me: WeakLoopLocal<Node>,
        fired: u32,
        _probe: Tracked,
    }
    let mut lp = new_loop::<B>();
    let probe = DropProbe::new();
    let node = lp.handle().local_cyclic(|me| {
        assert!(me.upgrade().is_none(), "upgraded before it was made");
        Node {
            me: me.clone(),
            fired: 0,
            _probe: probe.tracked(),
        }
    });
    let (r, w) = pipe();
    write(&w, b"x");
    let fd = raw(&r);
    // The node adds its own watch, whose callback holds a strong clone from `me`.
    let h = lp.handle().clone();
    lp.with_local(&node, |n| {
        let strong = n.me.upgrade().expect("the node is alive");
        h.add_handle(fd, Events::READABLE, move |h, id, fd, _| {
            drain(fd);
            strong.with(|n| n.fired += 1).unwrap();
            h.remove_handle(id).unwrap();
        })
        .unwrap();
    })
    .unwrap();
    run_iterations(&mut lp, 3);
    assert_eq!(lp.with_local(&node, |n| n.fired).unwrap(), 1);
    // The watch removed itself and its callback (holding a strong clone) is gone: the value
    // lives on in `node` alone, and goes with it.
    assert_eq!(probe.drops(), 0);
    let weak = node.downgrade();
    drop(node);
    assert_eq!(probe.drops(), 1);
    assert!(weak.upgrade().is_none());
}
