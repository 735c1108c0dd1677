//! The C event loops people pick today, as systems of the pipes benchmark: libev, libevent
//! and libuv, each on its epoll backend.
//!
//! They are opened at run time (`dlopen`), so the benchmarks build without their headers,
//! and a library that is not installed is left out of the system list (Debian packages:
//! `libev4`, `libevent-core-2.1-7`, `libuv1`). Each runs a level-triggered read watcher per
//! pipe, one non-blocking iteration per turn: libev's `ev_io` and `ev_run(EVRUN_NOWAIT)`;
//! libevent's persistent `event` and `event_base_loop(EVLOOP_ONCE | EVLOOP_NONBLOCK)`;
//! libuv's `uv_poll_t` and `uv_run(UV_RUN_NOWAIT)`. The callbacks run bench.c's `read_cb`, as
//! every other system's do.
//!
//! Re-watching (the benchmark's setup) gives each watcher its fd again where the library
//! lets it, as a removed and re-added vireo watch does: libev stops the watcher, sets its fd
//! again (`ev_io_set`: the number may name another file now, so libev checks it with the
//! kernel at the next iteration) and starts it; libevent deletes and adds the event (epoll
//! `DEL` and `ADD`, as bench.c does); libuv stops and starts the poll handle (a `uv_poll_t`
//! keeps its fd for life; giving it again means closing the handle, which takes a loop turn).

use std::ffi::{CStr, c_char, c_int, c_short, c_uint, c_void};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use super::{Counters, PipeSystem, Pipes, bump, read_cb};

/// The systems this module provides, with the shared objects tried for each.
const LIBRARIES: [(&str, &[&str]); 3] = [
    ("libev", &["libev.so.4"]),
    ("libevent", &["libevent_core-2.1.so.7", "libevent-2.1.so.7"]),
    ("libuv", &["libuv.so.1"]),
];

/// The names of the C loops whose library opens here and whose loop starts on epoll, in a
/// fixed order.
pub(super) fn available() -> Vec<String> {
    LIBRARIES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| match *name {
            "libev" => LibEv::api().is_ok(),
            "libevent" => LibEvent::api().is_ok(),
            "libuv" => LibUv::api().is_ok(),
            _ => false,
        })
        .map(str::to_owned)
        .collect()
}

/// Whether `name` is one of this module's systems (available here or not).
pub(super) fn is_c_loop(name: &str) -> bool {
    LIBRARIES.iter().any(|(n, _)| *n == name)
}

/// Starts the C loop `name` on `pipes`, with no watcher yet.
///
/// # Errors
///
/// `Unsupported` when its library is not installed; the library's own failure otherwise.
pub(super) fn start(
    name: &str,
    pipes: &Arc<Pipes>,
    c: &Arc<Counters>,
) -> io::Result<Box<dyn PipeSystem>> {
    let slots = (0..pipes.len())
        .map(|i| Slot {
            pipes: Arc::as_ptr(pipes),
            c: Arc::as_ptr(c),
            i,
        })
        .collect::<Vec<_>>()
        .into_boxed_slice();
    let held = Held {
        slots,
        pipes: Arc::clone(pipes),
        _c: Arc::clone(c),
    };
    Ok(match name {
        "libev" => Box::new(LibEv::new(held)?),
        "libevent" => Box::new(LibEvent::new(held)?),
        "libuv" => Box::new(LibUv::new(held)?),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{other} is not a C loop"),
            ));
        }
    })
}

/// Opens the first of `names` that loads, and leaks it: the function pointers taken from it
/// stay valid for the whole process, and the library's atfork handlers, if any, are never
/// left pointing at unmapped code.
fn open(names: &[&str]) -> Result<&'static libloading::Library, String> {
    let mut errors = Vec::new();
    for name in names {
        // SAFETY: loading these libraries runs their constructors, which only set up their
        // own globals.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return Ok(Box::leak(Box::new(lib))),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(errors.join("; "))
}

/// The symbol `name` of `lib`, as a value of its C type `T`.
///
/// # Safety
///
/// `T` must be the C type of the symbol `name` (a function pointer type).
unsafe fn sym<T: Copy>(lib: &'static libloading::Library, name: &str) -> Result<T, String> {
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    // SAFETY: the type is the symbol's, per the caller; the library is never unloaded.
    let s = unsafe { lib.get::<T>(&z) }.map_err(|e| format!("{name}: {e}"))?;
    Ok(*s)
}

/// One watcher's context for its C callback, at a stable address (a boxed slice that is
/// never resized) for as long as the system lives.
struct Slot {
    pipes: *const Pipes,
    c: *const Counters,
    i: usize,
}

/// The slots and what their pointers point into, kept alive together.
struct Held {
    slots: Box<[Slot]>,
    pipes: Arc<Pipes>,
    _c: Arc<Counters>,
}

impl Held {
    fn slot(&self, i: usize) -> *mut c_void {
        std::ptr::from_ref(&self.slots[i]).cast_mut().cast()
    }
}

/// bench.c's callback, from a C loop's callback with its slot pointer.
///
/// # Safety
///
/// `slot` must point at a [`Slot`] of a live [`Held`].
unsafe fn fire(slot: *mut c_void) {
    // SAFETY: a live slot, per the caller; its pointers point into the Arcs its `Held` keeps.
    let (pipes, c, i) = unsafe {
        let s = &*slot.cast::<Slot>();
        (&*s.pipes, &*s.c, s.i)
    };
    bump(&c.events, 1);
    read_cb(pipes, c, i);
}

fn failed(what: &str, rc: c_int) -> io::Error {
    io::Error::other(format!("{what} failed ({rc})"))
}

// ---------------------------------------------------------------------------------------
// libev 4 (ev.h)

/// `struct ev_io` as ev.h lays it out with its default configuration (priorities on, one
/// `void *data`): `EV_WATCHER_LIST(ev_io)` then `fd` and `events`.
#[repr(C)]
struct EvIo {
    active: c_int,
    pending: c_int,
    priority: c_int,
    data: *mut c_void,
    cb: Option<EvIoCb>,
    next: *mut c_void,
    fd: c_int,
    events: c_int,
}

type EvIoCb = unsafe extern "C" fn(*mut c_void, *mut EvIo, c_int);

const EV_READ: c_int = 0x01;
/// ev.h's `EV__IOFDSET`, which `ev_io_set` adds to the events: the fd is new to the loop.
const EV_IOFDSET: c_int = 0x80;
const EVBACKEND_EPOLL: c_uint = 0x04;
/// Ignore `LIBEV_FLAGS` from the environment.
const EVFLAG_NOENV: c_uint = 0x0100_0000;
const EVRUN_NOWAIT: c_int = 1;

struct EvApi {
    loop_new: unsafe extern "C" fn(c_uint) -> *mut c_void,
    loop_destroy: unsafe extern "C" fn(*mut c_void),
    backend: unsafe extern "C" fn(*mut c_void) -> c_uint,
    io_start: unsafe extern "C" fn(*mut c_void, *mut EvIo),
    io_stop: unsafe extern "C" fn(*mut c_void, *mut EvIo),
    run: unsafe extern "C" fn(*mut c_void, c_int) -> c_int,
}

struct LibEv {
    api: &'static EvApi,
    ev_loop: *mut c_void,
    /// One watcher per pipe, never moved (libev keeps pointers to them while they are
    /// started): a boxed slice made once.
    watchers: Box<[EvIo]>,
    started: bool,
    held: Held,
}

unsafe extern "C" fn ev_read_cb(_loop: *mut c_void, w: *mut EvIo, _revents: c_int) {
    // SAFETY: libev passes the watcher it was started with; its data is a live slot.
    unsafe { fire((*w).data) };
}

impl LibEv {
    fn api() -> Result<&'static EvApi, String> {
        static API: OnceLock<Result<EvApi, String>> = OnceLock::new();
        API.get_or_init(|| {
            let lib = open(LIBRARIES[0].1)?;
            // SAFETY: each type is the function's in ev.h (libev 4, EV_MULTIPLICITY: the
            // loop is the first argument).
            let api = unsafe {
                EvApi {
                    loop_new: sym(lib, "ev_loop_new")?,
                    loop_destroy: sym(lib, "ev_loop_destroy")?,
                    backend: sym(lib, "ev_backend")?,
                    io_start: sym(lib, "ev_io_start")?,
                    io_stop: sym(lib, "ev_io_stop")?,
                    run: sym(lib, "ev_run")?,
                }
            };
            // SAFETY: `ev_version_major` takes nothing and returns an int.
            let major: unsafe extern "C" fn() -> c_int = unsafe { sym(lib, "ev_version_major")? };
            // SAFETY: as above.
            if unsafe { major() } != 4 {
                return Err("not libev 4: the watcher layout here is libev 4's".into());
            }
            Ok(api)
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    fn new(held: Held) -> io::Result<LibEv> {
        let api = LibEv::api().map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
        // SAFETY: a plain call; NULL when the backend cannot start.
        let ev_loop = unsafe { (api.loop_new)(EVBACKEND_EPOLL | EVFLAG_NOENV) };
        if ev_loop.is_null() {
            return Err(io::Error::other("ev_loop_new(EVBACKEND_EPOLL) failed"));
        }
        let mut sys = LibEv {
            api,
            ev_loop,
            watchers: Box::new([]),
            started: false,
            held,
        };
        // SAFETY: a live loop.
        if unsafe { (api.backend)(ev_loop) } != EVBACKEND_EPOLL {
            return Err(io::Error::other("libev did not start on epoll"));
        }
        sys.watchers = (0..sys.held.slots.len())
            .map(|i| {
                // What ev_io_init does: inactive, priority 0, the callback, the fd and the
                // events with the "new fd" bit.
                EvIo {
                    active: 0,
                    pending: 0,
                    priority: 0,
                    data: sys.held.slot(i),
                    cb: Some(ev_read_cb),
                    next: std::ptr::null_mut(),
                    fd: sys.held.pipes.reader(i).as_raw_fd(),
                    events: EV_READ | EV_IOFDSET,
                }
            })
            .collect();
        Ok(sys)
    }
}

impl PipeSystem for LibEv {
    fn rewatch(&mut self) -> io::Result<()> {
        for w in self.watchers.iter_mut() {
            let w: *mut EvIo = w;
            // SAFETY: a live loop and a boxed watcher that stays put while started; a stopped
            // watcher may be set and started again.
            unsafe {
                if self.started {
                    (self.api.io_stop)(self.ev_loop, w);
                    // ev_io_set: the fd is given again, as for a new watcher, so libev
                    // cannot assume the number still names the file it registered.
                    (*w).events = EV_READ | EV_IOFDSET;
                }
                (self.api.io_start)(self.ev_loop, w);
            }
        }
        self.started = true;
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        // SAFETY: a live loop; the callbacks reach only live slots.
        unsafe { (self.api.run)(self.ev_loop, EVRUN_NOWAIT) };
        Ok(())
    }
}

impl Drop for LibEv {
    fn drop(&mut self) {
        for w in self.watchers.iter_mut() {
            // SAFETY: stopping a watcher that is not started does nothing.
            unsafe { (self.api.io_stop)(self.ev_loop, w) };
        }
        // SAFETY: every watcher is stopped; the loop is not used again.
        unsafe { (self.api.loop_destroy)(self.ev_loop) };
    }
}

// ---------------------------------------------------------------------------------------
// libevent 2.1 (event2/event.h)

type EventCb = unsafe extern "C" fn(c_int, c_short, *mut c_void);

const EV_READ_LIBEVENT: c_short = 0x02;
const EV_PERSIST: c_short = 0x10;
/// `EVLOOP_ONCE | EVLOOP_NONBLOCK`: one non-blocking iteration (without `EVLOOP_ONCE`,
/// libevent goes on until an iteration finds nothing).
const EVLOOP_ONCE_NONBLOCK: c_int = 0x01 | 0x02;

struct EventApi {
    base_new: unsafe extern "C" fn() -> *mut c_void,
    base_free: unsafe extern "C" fn(*mut c_void),
    base_method: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    event_new:
        unsafe extern "C" fn(*mut c_void, c_int, c_short, EventCb, *mut c_void) -> *mut c_void,
    event_free: unsafe extern "C" fn(*mut c_void),
    event_add: unsafe extern "C" fn(*mut c_void, *const c_void) -> c_int,
    event_del: unsafe extern "C" fn(*mut c_void) -> c_int,
    base_loop: unsafe extern "C" fn(*mut c_void, c_int) -> c_int,
}

struct LibEvent {
    api: &'static EventApi,
    base: *mut c_void,
    events: Vec<*mut c_void>,
    added: bool,
    held: Held,
}

unsafe extern "C" fn event_read_cb(_fd: c_int, _what: c_short, arg: *mut c_void) {
    // SAFETY: the argument given to event_new: a live slot.
    unsafe { fire(arg) };
}

impl LibEvent {
    fn api() -> Result<&'static EventApi, String> {
        static API: OnceLock<Result<EventApi, String>> = OnceLock::new();
        API.get_or_init(|| {
            let lib = open(LIBRARIES[1].1)?;
            // SAFETY: each type is the function's in event2/event.h (evutil_socket_t is an
            // int on Unix).
            unsafe {
                Ok(EventApi {
                    base_new: sym(lib, "event_base_new")?,
                    base_free: sym(lib, "event_base_free")?,
                    base_method: sym(lib, "event_base_get_method")?,
                    event_new: sym(lib, "event_new")?,
                    event_free: sym(lib, "event_free")?,
                    event_add: sym(lib, "event_add")?,
                    event_del: sym(lib, "event_del")?,
                    base_loop: sym(lib, "event_base_loop")?,
                })
            }
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    fn new(held: Held) -> io::Result<LibEvent> {
        let api = LibEvent::api().map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
        // SAFETY: a plain call; NULL on failure.
        let base = unsafe { (api.base_new)() };
        if base.is_null() {
            return Err(io::Error::other("event_base_new failed"));
        }
        let mut sys = LibEvent {
            api,
            base,
            events: Vec::new(),
            added: false,
            held,
        };
        // SAFETY: a live base; the method is a static string.
        let method = unsafe { CStr::from_ptr((api.base_method)(base)) };
        if method.to_bytes() != b"epoll" {
            return Err(io::Error::other(format!(
                "libevent chose {method:?}, not epoll"
            )));
        }
        for i in 0..sys.held.slots.len() {
            let fd = sys.held.pipes.reader(i).as_raw_fd();
            // SAFETY: a live base; the argument is a slot that outlives the event (events
            // are freed in drop, before the slots).
            let ev = unsafe {
                (api.event_new)(
                    base,
                    fd,
                    EV_READ_LIBEVENT | EV_PERSIST,
                    event_read_cb,
                    sys.held.slot(i),
                )
            };
            if ev.is_null() {
                return Err(io::Error::other("event_new failed"));
            }
            sys.events.push(ev);
        }
        Ok(sys)
    }
}

impl PipeSystem for LibEvent {
    fn rewatch(&mut self) -> io::Result<()> {
        for &ev in &self.events {
            // SAFETY: live events of a live base; no timeout (NULL).
            unsafe {
                if self.added {
                    let rc = (self.api.event_del)(ev);
                    if rc != 0 {
                        return Err(failed("event_del", rc));
                    }
                }
                let rc = (self.api.event_add)(ev, std::ptr::null());
                if rc != 0 {
                    return Err(failed("event_add", rc));
                }
            }
        }
        self.added = true;
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        // SAFETY: a live base; the callbacks reach only live slots.
        let rc = unsafe { (self.api.base_loop)(self.base, EVLOOP_ONCE_NONBLOCK) };
        // 1 means no event was pending at all, which a non-blocking turn may see.
        if rc < 0 {
            return Err(failed("event_base_loop", rc));
        }
        Ok(())
    }
}

impl Drop for LibEvent {
    fn drop(&mut self) {
        for &ev in &self.events {
            // SAFETY: event_free deletes a pending event first; each is freed once.
            unsafe { (self.api.event_free)(ev) };
        }
        // SAFETY: every event is freed; the base is not used again.
        unsafe { (self.api.base_free)(self.base) };
    }
}

// ---------------------------------------------------------------------------------------
// libuv 1 (uv.h)

type UvPollCb = unsafe extern "C" fn(*mut c_void, c_int, c_int);

/// `UV_POLL` in uv.h's `uv_handle_type` (checked against `uv_handle_type_name`).
const UV_POLL: c_int = 8;
const UV_READABLE: c_int = 1;
const UV_RUN_DEFAULT: c_int = 0;
const UV_RUN_NOWAIT: c_int = 2;

struct UvApi {
    loop_size: unsafe extern "C" fn() -> usize,
    loop_init: unsafe extern "C" fn(*mut c_void) -> c_int,
    loop_close: unsafe extern "C" fn(*mut c_void) -> c_int,
    handle_size: unsafe extern "C" fn(c_int) -> usize,
    handle_set_data: unsafe extern "C" fn(*mut c_void, *mut c_void),
    handle_get_data: unsafe extern "C" fn(*const c_void) -> *mut c_void,
    close: unsafe extern "C" fn(*mut c_void, Option<unsafe extern "C" fn(*mut c_void)>),
    poll_init: unsafe extern "C" fn(*mut c_void, *mut c_void, c_int) -> c_int,
    poll_start: unsafe extern "C" fn(*mut c_void, c_int, UvPollCb) -> c_int,
    poll_stop: unsafe extern "C" fn(*mut c_void) -> c_int,
    run: unsafe extern "C" fn(*mut c_void, c_int) -> c_int,
}

/// Memory for a libuv object of a size only known at run time, 16-byte aligned.
type UvMem = Box<[MaybeUninit<u128>]>;

fn uv_mem(size: usize) -> UvMem {
    std::iter::repeat_with(MaybeUninit::uninit)
        .take(size.div_ceil(16))
        .collect()
}

fn uv_ptr(mem: &mut UvMem) -> *mut c_void {
    mem.as_mut_ptr().cast()
}

struct LibUv {
    api: &'static UvApi,
    uv_loop: UvMem,
    /// One initialised `uv_poll_t` per pipe.
    polls: Vec<UvMem>,
    /// Whether the loop was initialised (and must be closed).
    live: bool,
    started: bool,
    held: Held,
}

unsafe extern "C" fn uv_read_cb(handle: *mut c_void, status: c_int, _events: c_int) {
    if status < 0 {
        return;
    }
    if let Ok(api) = LibUv::api() {
        // SAFETY: the handle libuv polls, whose data was set to a live slot before it
        // started.
        unsafe { fire((api.handle_get_data)(handle)) };
    }
}

impl LibUv {
    fn api() -> Result<&'static UvApi, String> {
        static API: OnceLock<Result<UvApi, String>> = OnceLock::new();
        API.get_or_init(|| {
            let lib = open(LIBRARIES[2].1)?;
            // SAFETY: each type is the function's in uv.h (libuv 1.x; handle types are C
            // enums, passed as int).
            let api = unsafe {
                UvApi {
                    loop_size: sym(lib, "uv_loop_size")?,
                    loop_init: sym(lib, "uv_loop_init")?,
                    loop_close: sym(lib, "uv_loop_close")?,
                    handle_size: sym(lib, "uv_handle_size")?,
                    handle_set_data: sym(lib, "uv_handle_set_data")?,
                    handle_get_data: sym(lib, "uv_handle_get_data")?,
                    close: sym(lib, "uv_close")?,
                    poll_init: sym(lib, "uv_poll_init")?,
                    poll_start: sym(lib, "uv_poll_start")?,
                    poll_stop: sym(lib, "uv_poll_stop")?,
                    run: sym(lib, "uv_run")?,
                }
            };
            // SAFETY: uv.h: `const char* uv_handle_type_name(uv_handle_type type)`.
            let name: unsafe extern "C" fn(c_int) -> *const c_char =
                unsafe { sym(lib, "uv_handle_type_name")? };
            // SAFETY: a static string, or NULL for an unknown type.
            let poll = unsafe { name(UV_POLL) };
            // SAFETY: non-null: a static NUL-terminated string.
            if poll.is_null() || unsafe { CStr::from_ptr(poll) }.to_bytes() != b"poll" {
                return Err("this libuv numbers its handle types differently".into());
            }
            Ok(api)
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    fn new(held: Held) -> io::Result<LibUv> {
        let api = LibUv::api().map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
        // SAFETY: plain calls returning sizes.
        let (loop_size, poll_size) = unsafe { ((api.loop_size)(), (api.handle_size)(UV_POLL)) };
        let mut sys = LibUv {
            api,
            uv_loop: uv_mem(loop_size),
            polls: Vec::new(),
            live: false,
            started: false,
            held,
        };
        // SAFETY: memory of uv_loop_size() bytes, aligned for any C object.
        let rc = unsafe { (api.loop_init)(uv_ptr(&mut sys.uv_loop)) };
        if rc != 0 {
            return Err(failed("uv_loop_init", rc));
        }
        sys.live = true;
        let uv_loop = uv_ptr(&mut sys.uv_loop);
        for i in 0..sys.held.slots.len() {
            let mut poll = uv_mem(poll_size);
            let fd = sys.held.pipes.reader(i).as_raw_fd();
            // SAFETY: memory of uv_handle_size(UV_POLL) bytes for a handle of a live loop;
            // it stays put (boxed) until the handle is closed in drop.
            let rc = unsafe { (api.poll_init)(uv_loop, uv_ptr(&mut poll), fd) };
            if rc != 0 {
                return Err(failed("uv_poll_init", rc));
            }
            // SAFETY: an initialised handle; the slot outlives it.
            unsafe { (api.handle_set_data)(uv_ptr(&mut poll), sys.held.slot(i)) };
            sys.polls.push(poll);
        }
        Ok(sys)
    }
}

impl PipeSystem for LibUv {
    fn rewatch(&mut self) -> io::Result<()> {
        for poll in &mut self.polls {
            let h = uv_ptr(poll);
            // SAFETY: initialised handles of a live loop.
            unsafe {
                if self.started {
                    let rc = (self.api.poll_stop)(h);
                    if rc != 0 {
                        return Err(failed("uv_poll_stop", rc));
                    }
                }
                let rc = (self.api.poll_start)(h, UV_READABLE, uv_read_cb);
                if rc != 0 {
                    return Err(failed("uv_poll_start", rc));
                }
            }
        }
        self.started = true;
        Ok(())
    }

    fn turn(&mut self) -> io::Result<()> {
        // SAFETY: a live loop; the callbacks reach only live slots.
        unsafe { (self.api.run)(uv_ptr(&mut self.uv_loop), UV_RUN_NOWAIT) };
        Ok(())
    }
}

impl Drop for LibUv {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        for poll in &mut self.polls {
            // SAFETY: initialised handles, each closed once; no close callback.
            unsafe { (self.api.close)(uv_ptr(poll), None) };
        }
        let uv_loop = uv_ptr(&mut self.uv_loop);
        // SAFETY: a live loop: this run finishes the closes and returns once nothing is
        // active; then the loop can be closed.
        let rc = unsafe {
            (self.api.run)(uv_loop, UV_RUN_DEFAULT);
            (self.api.loop_close)(uv_loop)
        };
        if rc != 0 {
            // The loop still refers to the handles' memory: leak both rather than free
            // memory libuv may touch.
            std::mem::forget(std::mem::take(&mut self.polls));
            std::mem::forget(std::mem::replace(&mut self.uv_loop, uv_mem(0)));
        }
    }
}
