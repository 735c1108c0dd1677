//! Micro-benchmarks of the hot paths (`cargo bench -p vireo-benches`): one dispatch of a ready
//! watch, timer add + cancel, and a pool submit that another worker steals.
#![allow(missing_docs)] // criterion_group! generates an undocumented public function

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use vireo_backends::{AnyBackend, BackendKind, Choice};
use vireo_core::{EventLoop, Events, Frequency};

/// One loop iteration that finds one level-triggered watch ready and runs its callback.
fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch_one_ready_watch");
    for kind in BackendKind::compiled() {
        let Ok(backend) = AnyBackend::with_choice(Choice::Only(kind)) else {
            eprintln!("skipping {kind}: cannot start here");
            continue;
        };
        let mut event_loop = EventLoop::with_backend(backend).expect("loop");
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        // One byte left unread: the watch stays ready (level-triggered).
        std::io::Write::write_all(&mut &b, b"x").unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&hits);
        event_loop
            .handle()
            .add_handle(a.as_raw_fd(), Events::READABLE, move |_, _, _, _| {
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .expect("watch");
        group.bench_function(kind.name(), |bench| {
            bench.iter(|| event_loop.run_once_timeout(Duration::ZERO).unwrap());
        });
        assert!(hits.load(Ordering::Relaxed) > 0);
        drop((a, b));
    }
    group.finish();
}

/// Adding a timer and cancelling it again, with 10,000 other timers pending.
fn timer_add_cancel(c: &mut Criterion) {
    let event_loop =
        EventLoop::with_backend(AnyBackend::with_choice(Choice::Auto).expect("backend"))
            .expect("loop");
    let handle = event_loop.handle().clone();
    for i in 0..10_000u64 {
        handle
            .add_timeout(Frequency::Period(Duration::from_secs(60 + i)), |_, _| {})
            .unwrap();
    }
    let mut n = 0u64;
    c.bench_function("timer_add_cancel", |bench| {
        bench.iter(|| {
            n += 1;
            let id = handle
                .add_timeout(
                    Frequency::Period(Duration::from_millis(1 + n % 10_000)),
                    |_, _| {},
                )
                .unwrap();
            handle.remove_timeout(id).unwrap();
        });
    });
    drop(event_loop);
}

/// A submit from outside the pool, run by one of two workers.
fn pool_submit(c: &mut Criterion) {
    let pool = vireo_pool::Pool::builder()
        .min_workers(2)
        .max_workers(2)
        .build()
        .expect("pool");
    let done = Arc::new(AtomicU64::new(0));
    let mut sent = 0u64;
    c.bench_function("pool_submit_and_run", |bench| {
        bench.iter(|| {
            let done = Arc::clone(&done);
            pool.submit(move || {
                done.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
            sent += 1;
        });
    });
    pool.drain();
    assert_eq!(done.load(Ordering::Relaxed), sent);
}

criterion_group!(benches, dispatch, timer_add_cancel, pool_submit);
criterion_main!(benches);
