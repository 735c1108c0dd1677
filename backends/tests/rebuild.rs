//! A loop that has to start over on a fresh backend instance (epoll keeps a registration of a
//! closed fd while another fd holds its file open) stays on the backend it was built with, also
//! when that backend was chosen at run time through `AnyBackend`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_backends::{AnyBackend, BackendKind, Choice};
use vireo_core::{EventLoop, Events, WatchId};

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
        .expect("pipe")
}

type Seen = Arc<Mutex<Vec<(WatchId, Events)>>>;

fn recording(
    seen: &Seen,
) -> impl FnMut(&vireo_core::LoopHandle, WatchId, i32, Events) + Send + 'static {
    let seen = Arc::clone(seen);
    move |_, id, fd, ev| {
        let mut buf = [0u8; 16];
        // SAFETY: `fd` is open for the duration of the callback (the core's contract), and
        // `buf` is a valid buffer of its length.
        let _ = rustix::io::read(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, &mut buf);
        seen.lock().unwrap().push((id, ev));
    }
}

/// Runs the scenario on `backend`; returns the loop's rebuild count.
fn scenario(backend: AnyBackend, kind: BackendKind) -> u64 {
    let mut lp = EventLoop::with_backend(backend).expect("loop");
    let h = lp.handle().clone();
    let seen: Seen = Arc::default();

    let (mut r, w) = pipe();
    // The first pipe's read end stays open through this copy.
    let _keep = rustix::io::dup(&r).expect("dup");
    let old = h
        .add_handle(r.as_raw_fd(), Events::READABLE, recording(&seen))
        .unwrap();
    lp.run_once_timeout(Duration::ZERO).unwrap();

    // The watched number now names the second pipe's read end (a contract violation: the fd
    // was replaced while registered); the program then removes the old watch and adds one.
    let (r2, w2) = pipe();
    rustix::io::dup2(&r2, &mut r).expect("dup2");
    h.remove_handle(old).unwrap();
    let new = h
        .add_handle(r.as_raw_fd(), Events::READABLE, recording(&seen))
        .unwrap();
    lp.run_once_timeout(Duration::ZERO).unwrap();

    // The first pipe becomes readable: only the registration the kernel kept can see it.
    rustix::io::write(&w, b"x").unwrap();
    for _ in 0..3 {
        lp.run_once_timeout(Duration::from_millis(10)).unwrap();
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "{kind}: the replaced file was reported: {:?}",
        seen.lock().unwrap()
    );

    // The second pipe is reported to the new watch.
    rustix::io::write(&w2, b"y").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().is_empty() && Instant::now() < deadline {
        lp.run_once_timeout(Duration::from_millis(100)).unwrap();
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(new, Events::READABLE)],
        "{kind}"
    );
    assert_eq!(lp.backend_name(), kind.name(), "the loop changed backends");
    lp.stats().backend_rebuilds
}

#[test]
fn a_loop_that_starts_over_keeps_its_backend() {
    let mut rebuilt = Vec::new();
    for kind in BackendKind::compiled() {
        let backend = match AnyBackend::with_choice(Choice::Only(kind)) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipping {kind}: it cannot start here: {e}");
                continue;
            }
        };
        if scenario(backend, kind) > 0 {
            rebuilt.push(kind);
        }
    }
    // epoll is the backend that has to start over here; without a rebuild the test above
    // would not have exercised `Backend::fresh`.
    #[cfg(feature = "epoll")]
    assert!(
        rebuilt.contains(&BackendKind::Epoll),
        "epoll did not start over (rebuilt: {rebuilt:?})"
    );
}
