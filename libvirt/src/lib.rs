//! vireo as libvirt's event loop.
//!
//! libvirt lets a client program plug in its own event loop with `virEventRegisterImpl`:
//! six functions (add, update and remove a handle; add, update and remove a timeout) on which
//! libvirt's RPC client, its keepalive and its domain-event delivery then run. This crate is
//! those six functions on a vireo loop, any backend:
//!
//! - **From Rust**: [`register`] makes a [`LoopHandle`]'s loop this process's libvirt event
//!   implementation; the program runs the loop as usual, so libvirt's fds and timers share it
//!   with the program's own.
//! - **From C or Python**: the `cdylib` (`libvireo_libvirt.so`, header
//!   `libvirt/include/vireo-libvirt.h`) exports the six functions with libvirt's signatures
//!   and `vireo_libvirt_start()`, which runs a loop on the best backend (or `VIREO_BACKEND`)
//!   on a thread of its own and registers it. A Python program loads it with `ctypes` beside
//!   `import libvirt`: both use the same `libvirt.so.0`, so the registration holds for
//!   python-libvirt too.
//!
//! There is no build-time dependency on libvirt: [`Libvirt::load`] opens `libvirt.so.0` with
//! `dlopen` when asked, and a missing or too old libvirt is an [`Error`].
//!
//! # libvirt's rules, as implemented
//!
//! - Event bits are libvirt's (READABLE 1, WRITABLE 2, ERROR 4, HANGUP 8; vireo's
//!   [`Events`] has the same values); a handle receives `ready & (events | ERROR | HANGUP)`,
//!   level-triggered; `events = 0` registers a handle that never fires.
//! - Timeouts in ms: negative disabled, 0 every iteration, above 0 periodic (never one-shot);
//!   an update restarts the period from now.
//! - Ids are positive `int`s from two counters (handles, timeouts) starting at 1, never
//!   reused. After 2,147,483,647 adds of one kind in a process the next add of that kind
//!   returns -1 (as a failed allocation does in libvirt): ids never wrap to a value that
//!   was handed out before, nor to 0 or a negative one.
//! - An update of an unknown or removed id does nothing (libvirt's GLib loop); a remove of one
//!   returns -1. A remove never waits for a callback that runs on the loop thread and never
//!   calls the free callback itself: `ff(opaque)` runs later on the loop thread, after the
//!   remove returned and after any running invocation of the callback finished (libvirt
//!   removes handles while holding locks that its callbacks take, so a waiting remove would
//!   deadlock). A failed add does not call `ff`; libvirt frees `opaque` itself then.
//! - Every function may be called from any thread and from inside any callback. No panic
//!   crosses the C boundary: an internal failure makes the call return -1 (or do nothing).
//!
//! # Example
//!
//! ```no_run
//! use vireo_core::EventLoop;
//! use vireo_backends::AnyBackend;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut event_loop = EventLoop::<AnyBackend>::new()?;
//! vireo_libvirt::register(event_loop.handle())?;
//! // ... virConnectOpen and friends (through the `virt` crate, say) now run on this loop.
//! event_loop.run()?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod ffi;
mod ids;
pub mod testing;

use std::ffi::{c_int, c_void};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use vireo_core::{Events, Frequency, LoopHandle, TimerId, WatchId};

pub use ffi::{
    vireo_libvirt_add_handle, vireo_libvirt_add_timeout, vireo_libvirt_backend,
    vireo_libvirt_is_loop_thread, vireo_libvirt_last_error, vireo_libvirt_remove_handle,
    vireo_libvirt_remove_timeout, vireo_libvirt_start, vireo_libvirt_stop,
    vireo_libvirt_update_handle, vireo_libvirt_update_timeout,
};
use ids::Ids;

/// libvirt's `virEventHandleCallback`.
pub type HandleCallback =
    unsafe extern "C" fn(watch: c_int, fd: c_int, events: c_int, opaque: *mut c_void);
/// libvirt's `virEventTimeoutCallback`.
pub type TimeoutCallback = unsafe extern "C" fn(timer: c_int, opaque: *mut c_void);
/// libvirt's `virFreeCallback`.
pub type FreeCallback = unsafe extern "C" fn(opaque: *mut c_void);

type AddHandleFn = unsafe extern "C" fn(
    c_int,
    c_int,
    Option<HandleCallback>,
    *mut c_void,
    Option<FreeCallback>,
) -> c_int;
type UpdateHandleFn = unsafe extern "C" fn(c_int, c_int);
type RemoveFn = unsafe extern "C" fn(c_int) -> c_int;
type AddTimeoutFn = unsafe extern "C" fn(
    c_int,
    Option<TimeoutCallback>,
    *mut c_void,
    Option<FreeCallback>,
) -> c_int;
type UpdateTimeoutFn = unsafe extern "C" fn(c_int, c_int);
type RegisterImplFn = unsafe extern "C" fn(
    AddHandleFn,
    UpdateHandleFn,
    RemoveFn,
    AddTimeoutFn,
    UpdateTimeoutFn,
    RemoveFn,
);
type GetVersionFn =
    unsafe extern "C" fn(*mut std::ffi::c_ulong, *const i8, *mut std::ffi::c_ulong) -> c_int;

/// The name `dlopen` looks for.
pub const LIBVIRT_SONAME: &str = "libvirt.so.0";

/// Why libvirt could not be loaded or the loop not registered.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `dlopen` failed: libvirt is not installed (Debian: `libvirt0`, which `libvirt-clients`
    /// and `python3-libvirt` bring), or the path is wrong.
    Load {
        /// What was opened.
        path: String,
        /// `dlerror`'s text.
        reason: String,
    },
    /// The library has no `virEventRegisterImpl`: not libvirt, or older than 0.5.0.
    TooOld {
        /// What was opened.
        path: String,
    },
    /// A loop is already behind this process's exported functions (libvirt cannot replace a
    /// registered implementation, so neither can vireo).
    AlreadyRegistered,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Load { path, reason } => write!(
                f,
                "cannot load {path}: {reason} (install libvirt: Debian's libvirt0, brought by \
                 libvirt-clients or python3-libvirt)"
            ),
            Error::TooOld { path } => write!(
                f,
                "{path} has no virEventRegisterImpl: not libvirt, or a libvirt older than 0.5.0"
            ),
            Error::AlreadyRegistered => f.write_str(
                "an event loop is already registered in this process (libvirt cannot replace one)",
            ),
        }
    }
}

impl std::error::Error for Error {}

/// libvirt, opened with `dlopen`.
pub struct Libvirt {
    path: String,
    lib: libloading::Library,
}

impl fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Libvirt")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Libvirt {
    /// Opens [`LIBVIRT_SONAME`] (the copy already in the process, if any: python-libvirt's,
    /// say).
    ///
    /// # Errors
    ///
    /// [`Error::Load`] when it is not installed; [`Error::TooOld`] when it lacks
    /// `virEventRegisterImpl`.
    pub fn load() -> Result<Libvirt, Error> {
        Libvirt::load_from(LIBVIRT_SONAME)
    }

    /// Opens libvirt from `path` (a soname or a file).
    ///
    /// # Errors
    ///
    /// As [`load`](Libvirt::load).
    pub fn load_from(path: &str) -> Result<Libvirt, Error> {
        // SAFETY: loading libvirt runs its ELF constructors, which only initialise libvirt's
        // own globals; no Rust invariant depends on them.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| Error::Load {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let me = Libvirt {
            path: path.to_owned(),
            lib,
        };
        me.register_fn()?;
        Ok(me)
    }

    fn register_fn(&self) -> Result<RegisterImplFn, Error> {
        // SAFETY: the symbol is libvirt's `virEventRegisterImpl`, whose C type is
        // `RegisterImplFn` (include/libvirt/libvirt-event.h); it is copied out as a plain
        // function pointer and used while `self.lib` is alive (registration keeps the library
        // loaded forever, see `register`).
        unsafe { self.lib.get::<RegisterImplFn>(b"virEventRegisterImpl\0") }
            .map(|s| *s)
            .map_err(|_| Error::TooOld {
                path: self.path.clone(),
            })
    }

    /// libvirt's version as `(major, minor, micro)`, from `virGetVersion`; `None` when the
    /// library does not say.
    pub fn version(&self) -> Option<(u64, u64, u64)> {
        // SAFETY: `virGetVersion(unsigned long *libVer, const char *type, unsigned long
        // *typeVer)` with `type` NULL only writes `*libVer`; the pointers are valid locals.
        let v = unsafe {
            let f = self.lib.get::<GetVersionFn>(b"virGetVersion\0").ok()?;
            let mut lib_ver: std::ffi::c_ulong = 0;
            if f(&mut lib_ver, std::ptr::null(), std::ptr::null_mut()) != 0 {
                return None;
            }
            // `c_ulong` is 32 bits on some targets.
            #[allow(clippy::useless_conversion)]
            u64::from(lib_ver)
        };
        Some((v / 1_000_000, (v / 1000) % 1000, v % 1000))
    }

    /// Makes `handle`'s loop this process's libvirt event implementation (see [`register`]).
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyRegistered`] when a loop is already behind the exported functions.
    pub fn register(self, handle: &LoopHandle) -> Result<(), Error> {
        let register_impl = self.register_fn()?;
        set_loop(handle)?;
        // SAFETY: the six functions have libvirt's exact signatures and never unwind; libvirt
        // keeps the pointers for the life of the process, and they point into this crate's
        // code, which is never unloaded while libvirt is (the library handle is leaked below,
        // so libvirt itself stays loaded too).
        unsafe {
            register_impl(
                vireo_libvirt_add_handle,
                vireo_libvirt_update_handle,
                vireo_libvirt_remove_handle,
                vireo_libvirt_add_timeout,
                vireo_libvirt_update_timeout,
                vireo_libvirt_remove_timeout,
            );
        }
        std::mem::forget(self.lib);
        Ok(())
    }
}

/// Loads libvirt ([`Libvirt::load`]) and makes `handle`'s loop this process's libvirt event
/// implementation, from any thread, once per process. Call it before the first
/// `virConnectOpen` (libvirt asks for an implementation when it opens a connection), then run
/// the loop as usual.
///
/// If another implementation was registered with libvirt first (`virEventRegisterDefaultImpl`,
/// or python-libvirt's `virEventRegisterImpl`), libvirt keeps that one and ignores this
/// registration with a warning of its own; vireo cannot tell.
///
/// # Errors
///
/// [`Error::Load`] or [`Error::TooOld`] when libvirt is missing or too old,
/// [`Error::AlreadyRegistered`] on a second call.
pub fn register(handle: &LoopHandle) -> Result<(), Error> {
    Libvirt::load()?.register(handle)
}

/// Puts `handle`'s loop behind the exported functions (`vireo_libvirt_add_handle` and the
/// five others) without telling libvirt: for a program that passes them to
/// `virEventRegisterImpl` itself, and for tests that call them directly, as libvirt does.
/// Once per process.
///
/// # Errors
///
/// [`Error::AlreadyRegistered`] when a loop is already there.
pub fn set_loop(handle: &LoopHandle) -> Result<(), Error> {
    let mut fresh = false;
    REGISTRY.get_or_init(|| {
        fresh = true;
        Registry {
            handle: handle.clone(),
            watches: Mutex::new(Ids::default()),
            timers: Mutex::new(Ids::default()),
        }
    });
    if fresh {
        Ok(())
    } else {
        Err(Error::AlreadyRegistered)
    }
}

/// The handle of the loop behind the exported functions, if one was set.
pub fn current_loop() -> Option<LoopHandle> {
    REGISTRY.get().map(|r| r.handle.clone())
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

struct Registry {
    handle: LoopHandle,
    watches: Mutex<Ids<WatchId>>,
    timers: Mutex<Ids<TimerId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// libvirt's opaque pointer and free callback, carried by a vireo callback: the free callback
/// runs when the vireo callback's state drops (on the loop thread, after the remove), but
/// only once the add succeeded.
struct Opaque {
    opaque: *mut c_void,
    ff: Option<FreeCallback>,
    added: Arc<AtomicBool>,
}

// SAFETY: libvirt hands the opaque pointer to an event implementation that calls it back from
// its own loop thread; the pointer is only passed back to libvirt's callbacks (and its free
// callback), which are written for that, and never dereferenced here.
unsafe impl Send for Opaque {}

impl Opaque {
    /// The state for a new vireo callback, and the flag that arms its free callback once the
    /// add succeeded.
    fn new(opaque: *mut c_void, ff: Option<FreeCallback>) -> (Opaque, Arc<AtomicBool>) {
        let added = Arc::new(AtomicBool::new(false));
        let state = Opaque {
            opaque,
            ff,
            added: Arc::clone(&added),
        };
        (state, added)
    }
}

impl Drop for Opaque {
    fn drop(&mut self) {
        if let Some(ff) = self.ff {
            if self.added.load(Ordering::Acquire) {
                // SAFETY: `ff` and `opaque` came together from libvirt's add call, which
                // asks for `ff(opaque)` once the handle or timeout is gone; this runs once.
                unsafe { ff(self.opaque) };
            }
        }
    }
}

/// Runs `f`, turning a panic into `fallback` (nothing may unwind into C).
fn guarded<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

fn add_handle(
    fd: c_int,
    events: c_int,
    cb: Option<HandleCallback>,
    opaque: *mut c_void,
    ff: Option<FreeCallback>,
) -> c_int {
    let (Some(reg), Some(cb)) = (REGISTRY.get(), cb) else {
        return -1;
    };
    // Held until the id is mapped, so that a callback of the new watch that removes it (on
    // the loop thread, before this returns) finds it; the loop never holds vireo's state
    // lock while it runs callbacks, so this cannot deadlock with one.
    let mut ids = lock(&reg.watches);
    let Some(id) = ids.allocate() else {
        return -1;
    };
    let (state, added) = Opaque::new(opaque, ff);
    let interest = Events::from_bits_truncate(events as u32);
    let watch = reg.handle.add_handle(fd, interest, move |_, _, fd, ready| {
        let state = &state;
        // SAFETY: libvirt's handle callback with the watch id, fd and events it asked for and
        // the opaque pointer it gave with them.
        unsafe { cb(id, fd, ready.bits() as c_int, state.opaque) };
    });
    match watch {
        Ok(watch) => {
            added.store(true, Ordering::Release);
            ids.insert(id, watch);
            id
        }
        Err(_) => -1,
    }
}

fn update_handle(watch: c_int, events: c_int) {
    let Some(reg) = REGISTRY.get() else { return };
    let Some(id) = lock(&reg.watches).get(watch) else {
        return;
    };
    let _ = reg
        .handle
        .update_handle_nowait(id, Events::from_bits_truncate(events as u32));
}

fn remove_handle(watch: c_int) -> c_int {
    let Some(reg) = REGISTRY.get() else { return -1 };
    let Some(id) = lock(&reg.watches).remove(watch) else {
        return -1;
    };
    match reg.handle.remove_handle_nowait(id) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

fn add_timeout(
    ms: c_int,
    cb: Option<TimeoutCallback>,
    opaque: *mut c_void,
    ff: Option<FreeCallback>,
) -> c_int {
    let (Some(reg), Some(cb)) = (REGISTRY.get(), cb) else {
        return -1;
    };
    // Held until the id is mapped (see `add_handle`).
    let mut ids = lock(&reg.timers);
    let Some(id) = ids.allocate() else {
        return -1;
    };
    let (state, added) = Opaque::new(opaque, ff);
    let timer = reg
        .handle
        .add_timeout(Frequency::from_millis(ms), move |_, _| {
            let state = &state;
            // SAFETY: libvirt's timeout callback with its timer id and opaque pointer.
            unsafe { cb(id, state.opaque) };
        });
    match timer {
        Ok(timer) => {
            added.store(true, Ordering::Release);
            ids.insert(id, timer);
            id
        }
        Err(_) => -1,
    }
}

fn update_timeout(timer: c_int, ms: c_int) {
    let Some(reg) = REGISTRY.get() else { return };
    let Some(id) = lock(&reg.timers).get(timer) else {
        return;
    };
    let _ = reg.handle.update_timeout(id, Frequency::from_millis(ms));
}

fn remove_timeout(timer: c_int) -> c_int {
    let Some(reg) = REGISTRY.get() else { return -1 };
    let Some(id) = lock(&reg.timers).remove(timer) else {
        return -1;
    };
    match reg.handle.remove_timeout(id) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}
