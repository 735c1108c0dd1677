//! Live-heap accounting for the soak: a global allocator wrapper that, once switched on, keeps a
//! running total of the bytes handed out and not yet given back.
//!
//! RSS alone cannot tell a leak from an allocator that keeps freed pages for later (mimalloc
//! keeps the segments of exited threads and hands them to the next thread; glibc keeps the stacks
//! of exited threads). The live-heap total can: it grows only when memory is allocated and never
//! freed. Counting costs one relaxed load per allocation while off, so the other benchmarks run
//! with it compiled in and switched off.
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: vireo_benches::heap::Counting<std::alloc::System> =
//!     vireo_benches::heap::Counting::new(std::alloc::System);
//!
//! vireo_benches::heap::start();
//! let v = vec![0u8; 4096];
//! assert!(vireo_benches::heap::live_bytes() >= 4096);
//! # drop(v);
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

static ON: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicI64 = AtomicI64::new(0);

/// A global allocator that counts live bytes on top of `A` while [`start`] has switched it on.
#[derive(Debug)]
pub struct Counting<A>(A);

impl<A> Counting<A> {
    /// Wraps `inner`.
    pub const fn new(inner: A) -> Counting<A> {
        Counting(inner)
    }
}

/// Starts counting. Blocks allocated before this call and freed after it are subtracted, so the
/// total can start slightly below zero; compare totals, not their absolute value.
pub fn start() {
    ON.store(true, Relaxed);
}

/// Net bytes allocated since [`start`] (allocated minus freed). Zero while counting is off or
/// when no counting allocator is installed.
pub fn live_bytes() -> i64 {
    LIVE.load(Relaxed)
}

fn count(delta: i64) {
    if ON.load(Relaxed) {
        LIVE.fetch_add(delta, Relaxed);
    }
}

// SAFETY: every method forwards to `A` with the caller's arguments unchanged, so `A`'s
// guarantees carry over; the counting touches only atomics and never allocates.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (so `A`) returned, with its layout.
        unsafe { self.0.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract for `ptr`, `layout` and `new_size`.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_is_allocated_and_freed() {
        let a = Counting::new(std::alloc::System);
        start();
        let layout = Layout::from_size_align(1 << 20, 8).unwrap();
        // Other tests of this binary allocate through the system allocator, not through `a`,
        // so the changes seen here are this test's own.
        let before = live_bytes();
        // SAFETY: a non-zero-sized layout; the block is freed with the same layout.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        assert_eq!(live_bytes() - before, 1 << 20);
        // SAFETY: `p` came from `a.alloc(layout)`.
        let q = unsafe { a.realloc(p, layout, 3 << 20) };
        assert!(!q.is_null());
        assert_eq!(live_bytes() - before, 3 << 20);
        // SAFETY: `q` is the live block of size 3 MiB, alignment 8.
        unsafe { a.dealloc(q, Layout::from_size_align(3 << 20, 8).unwrap()) };
        assert_eq!(live_bytes(), before);
    }
}
