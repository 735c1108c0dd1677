//! The C ABI: libvirt's six functions and a loop thread of its own (`include/vireo-libvirt.h`).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;

use vireo_backends::{AnyBackend, Choice};
use vireo_core::{EventLoop, LoopHandle};

use crate::{FreeCallback, HandleCallback, TimeoutCallback, guarded, lock};

/// libvirt's `virEventAddHandleFunc` on the registered loop: watches `fd` for `events` and
/// calls `cb(watch, fd, events, opaque)` on the loop thread while some hold. Returns the
/// watch id (> 0), or -1 when no loop is set, `cb` is NULL, `fd` is not open, the loop is
/// gone, or every id was handed out. `ff(opaque)` runs on the loop thread once the watch is
/// removed (not when the add fails).
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_add_handle(
    fd: c_int,
    events: c_int,
    cb: Option<HandleCallback>,
    opaque: *mut c_void,
    ff: Option<FreeCallback>,
) -> c_int {
    guarded(-1, || crate::add_handle(fd, events, cb, opaque, ff))
}

/// libvirt's `virEventUpdateHandleFunc`: replaces the watch's events (0 pauses it). Unknown
/// or removed ids are ignored. Never waits for a running callback.
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_update_handle(watch: c_int, events: c_int) {
    guarded((), || crate::update_handle(watch, events));
}

/// libvirt's `virEventRemoveHandleFunc`: 0, or -1 for an unknown or removed id. Never waits
/// for a running callback and never calls the free callback itself.
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_remove_handle(watch: c_int) -> c_int {
    guarded(-1, || crate::remove_handle(watch))
}

/// libvirt's `virEventAddTimeoutFunc`: `ms` < 0 disabled, 0 every iteration, > 0 periodic.
/// Returns the timer id (> 0) or -1 (as for handles).
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_add_timeout(
    ms: c_int,
    cb: Option<TimeoutCallback>,
    opaque: *mut c_void,
    ff: Option<FreeCallback>,
) -> c_int {
    guarded(-1, || crate::add_timeout(ms, cb, opaque, ff))
}

/// libvirt's `virEventUpdateTimeoutFunc`: a new frequency, the period restarting now.
/// Unknown or removed ids are ignored.
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_update_timeout(timer: c_int, ms: c_int) {
    guarded((), || crate::update_timeout(timer, ms));
}

/// libvirt's `virEventRemoveTimeoutFunc`: 0, or -1 for an unknown or removed id.
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_remove_timeout(timer: c_int) -> c_int {
    guarded(-1, || crate::remove_timeout(timer))
}

/// The loop thread started by [`vireo_libvirt_start`].
struct Running {
    handle: LoopHandle,
    thread: JoinHandle<()>,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);
thread_local! {
    /// This thread's last failure, for [`vireo_libvirt_last_error`].
    static LAST_ERROR: std::cell::RefCell<Option<CString>> = const { std::cell::RefCell::new(None) };
}
static BACKEND: Mutex<Option<&'static CStr>> = Mutex::new(None);

fn fail(why: String) -> c_int {
    let text = CString::new(why.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(text));
    -1
}

fn backend_name(name: &str) -> &'static CStr {
    match name {
        "poll" => c"poll",
        "epoll" => c"epoll",
        "io-uring" => c"io-uring",
        "portable" => c"portable",
        _ => c"other",
    }
}

/// Starts a vireo loop on a thread of its own (backend from `VIREO_BACKEND`, `auto` by
/// default: the best that starts here) and registers it with libvirt (`libvirt.so.0`, loaded
/// with `dlopen`; the copy already in the process when there is one). Call it once, before
/// the first `virConnectOpen`. Returns 0, or -1 with the reason in
/// [`vireo_libvirt_last_error`]: libvirt missing or too old, no backend, or a loop already
/// registered in this process (also after [`vireo_libvirt_stop`]: libvirt cannot replace an
/// implementation, so a process registers one loop in its life).
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_start() -> c_int {
    guarded(-1, start)
}

fn start() -> c_int {
    let mut running = lock(&RUNNING);
    if running.is_some() || crate::REGISTRY.get().is_some() {
        return fail(crate::Error::AlreadyRegistered.to_string());
    }
    let libvirt = match crate::Libvirt::load() {
        Ok(l) => l,
        Err(e) => return fail(e.to_string()),
    };
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("vireo-libvirt".into())
        .spawn(move || {
            let made = Choice::from_env()
                .and_then(AnyBackend::with_choice)
                .and_then(EventLoop::with_backend);
            let mut event_loop = match made {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot start a vireo loop: {e}")));
                    return;
                }
            };
            let _ = tx.send(Ok((
                event_loop.handle().clone(),
                backend_name(event_loop.backend_name()),
            )));
            if let Err(e) = event_loop.run() {
                eprintln!("vireo-libvirt: the event loop stopped: {e}");
            }
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot spawn the loop thread: {e}")),
    };
    let (handle, backend) = match rx.recv() {
        Ok(Ok(made)) => made,
        Ok(Err(why)) => {
            let _ = thread.join();
            return fail(why);
        }
        Err(_) => {
            let _ = thread.join();
            return fail("the loop thread died".into());
        }
    };
    if let Err(e) = libvirt.register(&handle) {
        handle.quit();
        let _ = thread.join();
        return fail(e.to_string());
    }
    *lock(&BACKEND) = Some(backend);
    *running = Some(Running { handle, thread });
    0
}

/// Stops the loop started by [`vireo_libvirt_start`] and waits for its thread: every handle
/// and timeout still registered is dropped there (their free callbacks run on it). libvirt
/// keeps the registration, so close every connection first: afterwards adds return -1.
/// Returns 0, or -1 when no loop was started or when called on the loop thread (from a
/// callback: the loop cannot wait for itself).
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_stop() -> c_int {
    guarded(-1, || {
        if vireo_libvirt_is_loop_thread() == 1 {
            return fail("vireo_libvirt_stop was called on the loop thread, which it joins".into());
        }
        let Some(running) = lock(&RUNNING).take() else {
            return fail("no loop was started".into());
        };
        running.handle.quit();
        match running.thread.join() {
            Ok(()) => 0,
            Err(_) => fail("the loop thread panicked".into()),
        }
    })
}

/// 1 when called on the thread of the registered loop during one of its iterations (from a
/// libvirt callback, say), else 0.
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_is_loop_thread() -> c_int {
    guarded(0, || {
        c_int::from(crate::current_loop().is_some_and(|h| h.is_loop_thread()))
    })
}

/// The backend of the loop started by [`vireo_libvirt_start`] (`"epoll"`, `"io-uring"`, ...),
/// or NULL before it started. The string is static.
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_backend() -> *const c_char {
    guarded(std::ptr::null(), || {
        lock(&BACKEND).map_or(std::ptr::null(), CStr::as_ptr)
    })
}

/// Why the last call on this thread that returned -1 failed, or NULL. The string stays
/// valid until the next failing call on the same thread (a failure on another thread does not
/// touch it).
#[unsafe(no_mangle)]
pub extern "C" fn vireo_libvirt_last_error() -> *const c_char {
    guarded(std::ptr::null(), || {
        LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |s| s.as_ptr()))
    })
}
