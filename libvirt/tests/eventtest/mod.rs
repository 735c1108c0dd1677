//! The cases of libvirt's `tests/eventtest.c`, run through vireo-libvirt's exported C
//! functions exactly as libvirt calls them, on one backend per test binary (the exported
//! functions act on one loop per process), plus the rules of libvirt's event API that
//! eventtest does not cover (ids, unknown ids, the free callback, re-entrancy).
//!
//! As in eventtest, a thread runs one loop iteration per job, and each job checks which one
//! handle and which one timer fired (or none).

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vireo_core::{Backend, EventLoop};
use vireo_libvirt::*;

const READABLE: c_int = 1;
const NUM_FDS: usize = 31;
const NUM_TIME: usize = 31;

/// What a callback found wrong, as eventtest's EV_ERROR_* codes.
const OK: i32 = 0;
const BAD_WATCH: i32 = 1;
const BAD_FD: i32 = 2;
const BAD_EVENT: i32 = 3;
const BAD_DATA: i32 = 4;

struct HandleInfo {
    read: AtomicI32,
    write: AtomicI32,
    fired: AtomicBool,
    watch: AtomicI32,
    error: AtomicI32,
    delete: AtomicI32,
}

struct TimerInfo {
    timer: AtomicI32,
    fired: AtomicBool,
    error: AtomicI32,
    delete: AtomicI32,
}

unsafe extern "C" fn pipe_reader(watch: c_int, fd: c_int, events: c_int, opaque: *mut c_void) {
    // SAFETY: the opaque pointer is a `HandleInfo` of the test's, alive for the whole test.
    let info = unsafe { &*(opaque as *const HandleInfo) };
    info.fired.store(true, SeqCst);
    let error = if watch != info.watch.load(SeqCst) {
        BAD_WATCH
    } else if fd != info.read.load(SeqCst) {
        BAD_FD
    } else if events & READABLE == 0 {
        BAD_EVENT
    } else {
        let mut one = [0u8; 1];
        // SAFETY: `fd` is the read end of one of the test's pipes, open for the whole test.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        match rustix::io::read(fd, &mut one) {
            Ok(1) => OK,
            _ => BAD_DATA,
        }
    };
    info.error.store(error, SeqCst);
    if error == OK {
        let delete = info.delete.load(SeqCst);
        if delete != -1 {
            vireo_libvirt_remove_handle(delete);
        }
    }
}

unsafe extern "C" fn timer_cb(timer: c_int, opaque: *mut c_void) {
    // SAFETY: the opaque pointer is a `TimerInfo` of the test's, alive for the whole test.
    let info = unsafe { &*(opaque as *const TimerInfo) };
    info.fired.store(true, SeqCst);
    if timer != info.timer.load(SeqCst) {
        info.error.store(BAD_WATCH, SeqCst);
        return;
    }
    info.error.store(OK, SeqCst);
    let delete = info.delete.load(SeqCst);
    if delete != -1 {
        vireo_libvirt_remove_timeout(delete);
    }
}

/// eventtest's event thread: one iteration per job.
struct Jobs {
    run: mpsc::Sender<()>,
    done: mpsc::Receiver<()>,
}

impl Jobs {
    fn start(&self) {
        self.run.send(()).unwrap();
    }

    /// Waits (5 s, as eventtest) for the iteration to end.
    fn finish(&self, name: &str) {
        self.done
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{name}: timed out waiting for the iteration"));
    }
}

struct World {
    handles: Vec<HandleInfo>,
    timers: Vec<TimerInfo>,
    _pipes: Vec<(OwnedFd, OwnedFd)>,
    jobs: Jobs,
}

impl World {
    fn verify(&self, name: &str, handle: Option<usize>, timer: Option<usize>) {
        for (i, h) in self.handles.iter().enumerate() {
            let fired = h.fired.load(SeqCst);
            assert_eq!(
                fired,
                Some(i) == handle,
                "{name}: handle {i} fired = {fired}"
            );
            if fired {
                assert_eq!(h.error.load(SeqCst), OK, "{name}: handle {i} had an error");
            }
        }
        for (i, t) in self.timers.iter().enumerate() {
            let fired = t.fired.load(SeqCst);
            assert_eq!(fired, Some(i) == timer, "{name}: timer {i} fired = {fired}");
            if fired {
                assert_eq!(t.error.load(SeqCst), OK, "{name}: timer {i} had an error");
            }
        }
    }

    fn reset(&self) {
        for h in &self.handles {
            h.fired.store(false, SeqCst);
            h.error.store(OK, SeqCst);
        }
        for t in &self.timers {
            t.fired.store(false, SeqCst);
            t.error.store(OK, SeqCst);
        }
    }

    fn write(&self, i: usize) {
        let fd = self.handles[i].write.load(SeqCst);
        // SAFETY: the write end of one of the test's pipes, open for the whole test.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        assert_eq!(rustix::io::write(fd, b"1").unwrap(), 1);
    }

    /// One iteration that does not block (a 0 ms timeout of its own keeps it awake).
    fn tick(&self, name: &str) {
        let id = vireo_libvirt_add_timeout(0, Some(never_timer), std::ptr::null_mut(), None);
        assert!(id > 0);
        self.jobs.start();
        self.jobs.finish(name);
        assert_eq!(vireo_libvirt_remove_timeout(id), 0);
    }

    fn job(&self, name: &str, handle: Option<usize>, timer: Option<usize>, act: impl FnOnce()) {
        self.jobs.start();
        act();
        self.jobs.finish(name);
        self.verify(name, handle, timer);
        self.reset();
    }
}

fn opaque<T>(b: &T) -> *mut c_void {
    b as *const T as *mut c_void
}

/// Everything, on backend `B`. One call per process.
pub(crate) fn run<B: Backend + Send + 'static>() {
    // Before a loop is set, every function fails or does nothing.
    assert_eq!(
        vireo_libvirt_add_timeout(0, Some(timer_cb), std::ptr::null_mut(), None),
        -1
    );
    assert_eq!(vireo_libvirt_remove_handle(1), -1);
    assert_eq!(vireo_libvirt_remove_timeout(1), -1);
    vireo_libvirt_update_handle(1, READABLE);
    vireo_libvirt_update_timeout(1, 10);
    assert_eq!(vireo_libvirt_is_loop_thread(), 0);

    let (handle_tx, handle_rx) = mpsc::channel();
    let (run_tx, run_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let event_thread = thread::spawn(move || {
        let mut lp = EventLoop::<B>::new().unwrap();
        handle_tx.send(lp.handle().clone()).unwrap();
        while run_rx.recv().is_ok() {
            lp.run_once_timeout(Duration::from_secs(30)).unwrap();
            if done_tx.send(()).is_err() {
                break;
            }
        }
    });
    let handle = handle_rx.recv().unwrap();
    set_loop(&handle).unwrap();
    assert!(matches!(set_loop(&handle), Err(Error::AlreadyRegistered)));
    assert_eq!(vireo_libvirt_start(), -1, "a second loop was started");
    // SAFETY: the pointer is from the call just made and read at once.
    let why = unsafe { std::ffi::CStr::from_ptr(vireo_libvirt_last_error()) };
    assert!(
        why.to_string_lossy().contains("already registered"),
        "{why:?}"
    );

    let mut pipes = Vec::new();
    // Filled before any pointer to an element is handed out, never resized after.
    let mut handles = Vec::new();
    for _ in 0..NUM_FDS {
        let (r, w) = rustix::pipe::pipe().unwrap();
        handles.push(HandleInfo {
            read: AtomicI32::new(r.as_raw_fd()),
            write: AtomicI32::new(w.as_raw_fd()),
            fired: AtomicBool::new(false),
            watch: AtomicI32::new(0),
            error: AtomicI32::new(OK),
            delete: AtomicI32::new(-1),
        });
        pipes.push((r, w));
    }
    let mut last_id = 0;
    for h in &handles {
        let id = vireo_libvirt_add_handle(
            h.read.load(SeqCst),
            READABLE,
            Some(pipe_reader),
            opaque(h),
            None,
        );
        assert!(
            id > last_id,
            "watch ids count up from 1: {id} after {last_id}"
        );
        last_id = id;
        h.watch.store(id, SeqCst);
    }
    let timers: Vec<TimerInfo> = (0..NUM_TIME)
        .map(|_| TimerInfo {
            timer: AtomicI32::new(0),
            fired: AtomicBool::new(false),
            error: AtomicI32::new(OK),
            delete: AtomicI32::new(-1),
        })
        .collect();
    for (i, t) in timers.iter().enumerate() {
        let id = vireo_libvirt_add_timeout(-1, Some(timer_cb), opaque(t), None);
        assert_eq!(id, i as c_int + 1, "timer ids count up from 1 separately");
        t.timer.store(id, SeqCst);
    }
    let w = World {
        handles,
        timers,
        _pipes: pipes,
        jobs: Jobs {
            run: run_tx,
            done: done_rx,
        },
    };
    let (h, t) = (&w.handles, &w.timers);
    let watch = |i: usize| h[i].watch.load(SeqCst);
    let timer = |i: usize| t[i].timer.load(SeqCst);

    w.job("Simple write", Some(1), None, || w.write(1));
    assert_eq!(vireo_libvirt_remove_handle(watch(0)), 0);
    w.job("Deleted before poll", Some(1), None, || w.write(1));
    // eventtest's own race: the removal is meant to land while the loop blocks; either way
    // nothing fires, and a blocked loop must wake for it.
    w.job("Interrupted during poll", None, None, || {
        thread::sleep(Duration::from_millis(100));
        assert_eq!(vireo_libvirt_remove_handle(watch(1)), 0);
    });
    w.job("Deleted during dispatch", Some(2), None, || {
        h[2].delete.store(watch(3), SeqCst);
        w.write(2);
        w.write(3);
    });
    w.job("Deleted self during dispatch", Some(2), None, || {
        h[2].delete.store(watch(2), SeqCst);
        w.write(2);
    });

    vireo_libvirt_update_timeout(timer(1), 100);
    w.job("Firing a timer", None, Some(1), || {});
    vireo_libvirt_update_timeout(timer(1), -1);

    vireo_libvirt_update_timeout(timer(1), 100);
    assert_eq!(vireo_libvirt_remove_timeout(timer(0)), 0);
    w.job("Timer deleted before poll", None, Some(1), || {});
    vireo_libvirt_update_timeout(timer(1), -1);

    w.job("Timer interrupted during poll", None, None, || {
        thread::sleep(Duration::from_millis(100));
        assert_eq!(vireo_libvirt_remove_timeout(timer(1)), 0);
    });

    vireo_libvirt_update_timeout(timer(2), 100);
    vireo_libvirt_update_timeout(timer(3), 100);
    t[2].delete.store(timer(3), SeqCst);
    w.job("Timer deleted during dispatch", None, Some(2), || {});
    vireo_libvirt_update_timeout(timer(2), -1);

    vireo_libvirt_update_timeout(timer(2), 100);
    t[2].delete.store(timer(2), SeqCst);
    w.job("Timer deleted self during dispatch", None, Some(2), || {});

    // Removing what is already removed (by a callback or above) fails; the rest succeed.
    for i in 0..NUM_FDS - 1 {
        let expect = if i <= 3 { -1 } else { 0 };
        assert_eq!(vireo_libvirt_remove_handle(watch(i)), expect, "handle {i}");
    }
    for i in 0..NUM_TIME - 1 {
        let expect = if i <= 3 { -1 } else { 0 };
        assert_eq!(vireo_libvirt_remove_timeout(timer(i)), expect, "timer {i}");
    }
    for _ in 0..4 {
        w.job("Simple write, last handle", Some(NUM_FDS - 1), None, || {
            w.write(NUM_FDS - 1)
        });
    }

    // The same fd twice, once with no events: only the other callback runs.
    h[0].read.store(h[1].read.load(SeqCst), SeqCst);
    h[0].write.store(h[1].write.load(SeqCst), SeqCst);
    h[0].delete.store(-1, SeqCst);
    h[1].delete.store(-1, SeqCst);
    let id0 = vireo_libvirt_add_handle(
        h[0].read.load(SeqCst),
        0,
        Some(pipe_reader),
        opaque(&h[0]),
        None,
    );
    let id1 = vireo_libvirt_add_handle(
        h[1].read.load(SeqCst),
        READABLE,
        Some(pipe_reader),
        opaque(&h[1]),
        None,
    );
    h[0].watch.store(id0, SeqCst);
    h[1].watch.store(id1, SeqCst);
    w.job("Write duplicate", Some(1), None, || w.write(1));
    assert_eq!(vireo_libvirt_remove_handle(id0), 0);
    assert_eq!(vireo_libvirt_remove_handle(id1), 0);
    assert_eq!(vireo_libvirt_remove_handle(watch(NUM_FDS - 1)), 0);
    assert_eq!(vireo_libvirt_remove_timeout(timer(NUM_TIME - 1)), 0);

    beyond_eventtest(&w);

    drop(w);
    event_thread.join().unwrap();
}

/// A free callback's record: how often, and whether on the loop thread.
struct Freed {
    count: AtomicUsize,
    on_loop: AtomicUsize,
}

unsafe extern "C" fn record_free(opaque: *mut c_void) {
    // SAFETY: a `Freed` of the test's, alive for the whole test.
    let f = unsafe { &*(opaque as *const Freed) };
    f.count.fetch_add(1, SeqCst);
    if vireo_libvirt_is_loop_thread() == 1 {
        f.on_loop.fetch_add(1, SeqCst);
    }
}

unsafe extern "C" fn never(_: c_int, _: c_int, _: c_int, _: *mut c_void) {}
unsafe extern "C" fn never_timer(_: c_int, _: *mut c_void) {}

/// A timer callback that changes handles and timers (libvirt's keepalive does).
struct Reentrant {
    watch: AtomicI32,
    other_timer: AtomicI32,
    fired: AtomicUsize,
    on_loop: AtomicBool,
}

unsafe extern "C" fn reentrant_timer(timer: c_int, opaque: *mut c_void) {
    // SAFETY: a `Reentrant` of the test's, alive for the whole test.
    let r = unsafe { &*(opaque as *const Reentrant) };
    r.on_loop.store(vireo_libvirt_is_loop_thread() == 1, SeqCst);
    r.fired.fetch_add(1, SeqCst);
    vireo_libvirt_update_handle(r.watch.load(SeqCst), 0);
    vireo_libvirt_update_handle(r.watch.load(SeqCst), READABLE);
    vireo_libvirt_update_timeout(r.other_timer.load(SeqCst), 1000);
    vireo_libvirt_update_timeout(timer, -1);
}

fn beyond_eventtest(w: &World) {
    // Unknown, removed and non-positive ids: remove fails, update is ignored.
    for id in [0, -1, -7, c_int::MAX, 99_999] {
        assert_eq!(vireo_libvirt_remove_handle(id), -1);
        assert_eq!(vireo_libvirt_remove_timeout(id), -1);
        vireo_libvirt_update_handle(id, READABLE);
        vireo_libvirt_update_timeout(id, 0);
    }
    // A NULL callback or a closed fd is a failed add, which does not call ff.
    let freed = Box::new(Freed {
        count: AtomicUsize::new(0),
        on_loop: AtomicUsize::new(0),
    });
    let fd = w.handles[5].read.load(SeqCst);
    assert_eq!(
        vireo_libvirt_add_handle(fd, READABLE, None, opaque(&*freed), Some(record_free)),
        -1
    );
    assert_eq!(
        vireo_libvirt_add_handle(
            -1,
            READABLE,
            Some(never),
            opaque(&*freed),
            Some(record_free)
        ),
        -1
    );
    assert_eq!(
        vireo_libvirt_add_timeout(10, None, opaque(&*freed), Some(record_free)),
        -1
    );

    // ff runs after remove returned, on the loop thread, once.
    let watch = vireo_libvirt_add_handle(
        fd,
        READABLE,
        Some(never),
        opaque(&*freed),
        Some(record_free),
    );
    let timer =
        vireo_libvirt_add_timeout(-1, Some(never_timer), opaque(&*freed), Some(record_free));
    assert!(watch > 0 && timer > 0);
    assert_eq!(vireo_libvirt_remove_handle(watch), 0);
    assert_eq!(vireo_libvirt_remove_timeout(timer), 0);
    assert_eq!(freed.count.load(SeqCst), 0, "ff ran inside remove");
    w.tick("free callbacks");
    assert_eq!(freed.count.load(SeqCst), 2);
    assert_eq!(freed.on_loop.load(SeqCst), 2, "ff ran off the loop thread");

    // A timer callback updates handles and timers, on the loop thread.
    let r = Box::new(Reentrant {
        watch: AtomicI32::new(0),
        other_timer: AtomicI32::new(0),
        fired: AtomicUsize::new(0),
        on_loop: AtomicBool::new(false),
    });
    let watch = vireo_libvirt_add_handle(fd, READABLE, Some(never), std::ptr::null_mut(), None);
    let other = vireo_libvirt_add_timeout(-1, Some(never_timer), std::ptr::null_mut(), None);
    r.watch.store(watch, SeqCst);
    r.other_timer.store(other, SeqCst);
    let t = vireo_libvirt_add_timeout(0, Some(reentrant_timer), opaque(&*r), None);
    w.tick("re-entrant timer");
    w.tick("re-entrant timer disabled itself");
    assert_eq!(r.fired.load(SeqCst), 1);
    assert!(r.on_loop.load(SeqCst));
    for (id, remove) in [
        (
            watch,
            vireo_libvirt_remove_handle as extern "C" fn(c_int) -> c_int,
        ),
        (other, vireo_libvirt_remove_timeout),
        (t, vireo_libvirt_remove_timeout),
    ] {
        assert_eq!(remove(id), 0);
    }
    // Changes from many threads at once, each add answered by a distinct id.
    let ids = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let ids = Arc::clone(&ids);
            thread::spawn(move || {
                for _ in 0..200 {
                    let id = vireo_libvirt_add_timeout(
                        -1,
                        Some(never_timer),
                        std::ptr::null_mut(),
                        None,
                    );
                    assert!(id > 0);
                    vireo_libvirt_update_timeout(id, 5000);
                    ids.lock().unwrap().push(id);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut ids = std::mem::take(&mut *ids.lock().unwrap());
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 800);
    for id in ids {
        assert_eq!(vireo_libvirt_remove_timeout(id), 0);
    }
}
