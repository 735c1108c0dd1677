//! [`LoopLocal`]: state that only the loop thread reaches, without a lock.

use std::cell::{Cell, UnsafeCell};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::Error;
use crate::event_loop::Shared;

/// A number for the calling thread, unique for the life of the process (never 0, never
/// reused, unlike a thread-local's address).
pub(crate) fn thread_mark() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static MARK: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    MARK.with(|m| *m)
}

struct Inner<T> {
    /// The loop whose thread may reach the value.
    shared: Arc<Shared>,
    /// Set while a [`LoopLocal::with`] closure runs; only the loop thread touches it.
    borrowed: Cell<bool>,
    value: UnsafeCell<T>,
}

// SAFETY: the value and the flag are only touched by the thread that is running the owning
// loop's iteration at that moment (`with` checks it before touching either) or by the thread
// that holds the loop by `&mut` between iterations (`EventLoop::with_local`); both are one
// thread at a time, and a change of thread goes through the loop itself, which is handed over
// with synchronisation (moving a value between threads does that). `T: Send` because the
// value moves with the loop and is dropped wherever the last clone goes.
unsafe impl<T: Send> Send for Inner<T> {}
// SAFETY: as above: shared references on several threads never reach the value at once.
unsafe impl<T: Send> Sync for Inner<T> {}

/// State that only its loop's thread can reach: the loop thread's `&mut T`, with no lock and
/// no atomic read-modify-write.
///
/// Callbacks must be `Send + 'static`, so state that several callbacks share would otherwise
/// need an `Arc<Mutex<T>>` (a lock per event, for data no other thread touches). A
/// `LoopLocal` is `Send + Sync` and cheap to clone (one reference count), and
/// [`with`](LoopLocal::with) gives `&mut T`:
///
/// - from inside any callback of the loop it was made for (watches, timers, invoked
///   closures, and the drop of a callback's state on the loop thread);
/// - through [`EventLoop::with_local`](crate::EventLoop::with_local) between iterations, for
///   the thread that owns the loop.
///
/// Anywhere else (another thread, a callback of another loop running on another thread, or no
/// iteration running) `with` returns [`Error::NotLoopThread`] and touches nothing; a `with`
/// inside another `with` of the same value returns [`Error::Borrowed`]. Neither ever blocks.
///
/// The value is dropped where the last clone is dropped: usually on the loop thread, as the
/// state of the last callback holding it, or in the loop's drop. A callback that holds a
/// clone and whose loop also holds the value's owner (a [`LoopHandle`](crate::LoopHandle)
/// inside `T`, say) makes a cycle that the loop's drop breaks, because it drops every
/// callback. Use [`downgrade`](LoopLocal::downgrade) for a reference from the value to
/// itself.
///
/// # Example
///
/// ```
/// # use std::{io, time::Duration};
/// # use vireo_core::{Backend, EventLoop, Frequency, Readiness, Token, Events};
/// # use std::os::fd::RawFd;
/// # struct Idle;
/// # impl Backend for Idle {
/// #     const NAME: &'static str = "idle";
/// #     fn new() -> io::Result<Self> { Ok(Idle) }
/// #     fn register(&mut self, _: RawFd, _: Token, _: Events) -> io::Result<()> { Ok(()) }
/// #     fn reregister(&mut self, _: RawFd, _: Token, _: Events) -> io::Result<()> { Ok(()) }
/// #     fn deregister(&mut self, _: RawFd, _: Token) -> io::Result<()> { Ok(()) }
/// #     fn wait(&mut self, _: &mut Vec<Readiness>, t: Option<Duration>) -> io::Result<()> {
/// #         std::thread::sleep(t.unwrap_or(Duration::from_millis(1)));
/// #         Ok(())
/// #     }
/// # }
/// # fn main() -> Result<(), vireo_core::Error> {
/// let mut lp = EventLoop::<Idle>::new()?;
/// // Shared by every callback, no lock.
/// let ticks = lp.handle().local(Vec::new());
/// let mine = ticks.clone();
/// lp.handle().add_timeout(Frequency::EveryIteration, move |h, id| {
///     let n = mine.with(|t| { t.push(id); t.len() }).unwrap();
///     if n == 3 {
///         h.remove_timeout(id).unwrap();
///     }
/// })?;
/// for _ in 0..5 {
///     lp.run_once_timeout(Duration::ZERO)?;
/// }
/// // Between iterations the loop's owner reaches it through the loop.
/// assert_eq!(lp.with_local(&ticks, |t| t.len())?, 3);
/// // Any other thread (or no iteration running) is refused.
/// assert!(std::thread::spawn(move || ticks.with(|t| t.len()).is_err()).join().unwrap());
/// # Ok(())
/// # }
/// ```
pub struct LoopLocal<T> {
    inner: Arc<Inner<T>>,
}

/// A [`LoopLocal`] that does not keep the value alive: [`upgrade`](WeakLoopLocal::upgrade)
/// returns `None` once every `LoopLocal` clone is gone.
pub struct WeakLoopLocal<T> {
    inner: Weak<Inner<T>>,
}

impl<T> Clone for LoopLocal<T> {
    fn clone(&self) -> Self {
        LoopLocal {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> Clone for WeakLoopLocal<T> {
    fn clone(&self) -> Self {
        WeakLoopLocal {
            inner: Weak::clone(&self.inner),
        }
    }
}

impl<T> fmt::Debug for LoopLocal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopLocal").finish_non_exhaustive()
    }
}

impl<T> fmt::Debug for WeakLoopLocal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakLoopLocal").finish_non_exhaustive()
    }
}

/// Clears the borrow flag when a `with` closure returns or unwinds.
struct Borrow<'a>(&'a Cell<bool>);

impl Drop for Borrow<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl<T: Send> LoopLocal<T> {
    pub(crate) fn new(shared: Arc<Shared>, value: T) -> Self {
        LoopLocal {
            inner: Arc::new(Inner {
                shared,
                borrowed: Cell::new(false),
                value: UnsafeCell::new(value),
            }),
        }
    }

    /// Calls `f` with the value, when called on the loop thread during one of its loop's
    /// iterations (from a callback, or from the drop of a callback's state there).
    ///
    /// # Errors
    ///
    /// [`Error::NotLoopThread`] anywhere else; [`Error::Borrowed`] inside another `with` of
    /// this value. `f` is not called then.
    ///
    /// # Panics
    ///
    /// Unwinds with `f`'s panic; the value stays usable.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, Error> {
        if !self.inner.shared.runs_on_this_thread() {
            return Err(Error::NotLoopThread);
        }
        let inner = &*self.inner;
        if inner.borrowed.replace(true) {
            return Err(Error::Borrowed);
        }
        let _borrow = Borrow(&inner.borrowed);
        // SAFETY: the check above passed, so this thread is inside an iteration of the owning
        // loop (or holds it by `&mut`), the only thread that touches `borrowed` and `value`
        // now (see the `Sync` impl); the flag was clear, so no other `&mut` to the value
        // exists on this thread.
        let value = unsafe { &mut *inner.value.get() };
        Ok(f(value))
    }

    pub(crate) fn new_cyclic(
        shared: Arc<Shared>,
        value: impl FnOnce(&WeakLoopLocal<T>) -> T,
    ) -> Self {
        LoopLocal {
            inner: Arc::new_cyclic(|weak| {
                let weak = WeakLoopLocal {
                    inner: Weak::clone(weak),
                };
                Inner {
                    shared,
                    borrowed: Cell::new(false),
                    value: UnsafeCell::new(value(&weak)),
                }
            }),
        }
    }

    /// Whether this value was made by the handle of the loop behind `shared`.
    pub(crate) fn belongs_to(&self, shared: &Arc<Shared>) -> bool {
        Arc::ptr_eq(shared, &self.inner.shared)
    }

    /// How many `LoopLocal` clones hold the value (this one included).
    pub fn strong_count(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// A reference that does not keep the value alive.
    pub fn downgrade(&self) -> WeakLoopLocal<T> {
        WeakLoopLocal {
            inner: Arc::downgrade(&self.inner),
        }
    }
}

impl<T> WeakLoopLocal<T> {
    /// The value, if some [`LoopLocal`] clone still holds it.
    pub fn upgrade(&self) -> Option<LoopLocal<T>> {
        self.inner.upgrade().map(|inner| LoopLocal { inner })
    }
}
