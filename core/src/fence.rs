//! An asymmetric fence for the loop's "which watch runs now" handshake.
//!
//! A remover on another thread must know whether the watch it removed is running on the loop
//! thread. The loop publishes the running watch, then reads the watch's flags; the remover
//! writes the flags, then reads the running watch. Each side needs a full fence between its
//! write and its read, or both could miss the other's write (a Dekker pair). The loop makes
//! that handshake before every watch callback, while removers that race a dispatch of their
//! own watch are rare, so the fence is moved to them: with `membarrier(2)`'s
//! `PRIVATE_EXPEDITED` command the remover makes every running thread of the process execute
//! a full memory barrier, and the loop only needs its compiler not to reorder the two
//! accesses. Where the kernel refuses the registration (seccomp, old kernels), every loop
//! keeps the full fence on its own side.

use std::sync::OnceLock;
use std::sync::atomic::{Ordering::SeqCst, compiler_fence, fence};

use rustix::thread::{MembarrierCommand, membarrier};

/// The process that registered for expedited barriers (a forked child must register again).
static REGISTERED: OnceLock<Option<u32>> = OnceLock::new();

fn this_process() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Registers this process for expedited barriers (once); returns whether loops may rely on
/// [`heavy`]. Called when a loop is made, before any remover can call [`heavy`] for it.
pub(crate) fn asymmetric() -> bool {
    let registered = REGISTERED.get_or_init(|| {
        membarrier(MembarrierCommand::RegisterPrivateExpedited)
            .ok()
            .map(|()| this_process())
    });
    match *registered {
        Some(pid) if pid == this_process() => true,
        // Registered by the parent of a fork: this child's registration is its own.
        Some(_) => membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok(),
        None => false,
    }
}

/// The loop's side of the handshake: orders its write before its read, for free when
/// removers use [`heavy`].
#[inline]
pub(crate) fn light(asymmetric: bool) {
    if asymmetric {
        compiler_fence(SeqCst);
    } else {
        fence(SeqCst);
    }
}

/// The remover's side: a full fence on every thread of the process that runs now, so that
/// each of them has either made its earlier writes visible to this thread, or not yet made
/// the reads that follow its [`light`] fence (which then see this thread's earlier writes).
pub(crate) fn heavy(asymmetric: bool) {
    if !asymmetric {
        fence(SeqCst);
        return;
    }
    fence(SeqCst);
    if membarrier(MembarrierCommand::PrivateExpedited).is_ok() {
        return;
    }
    // The registration belongs to another process image (a fork that did not make a loop
    // since): register now, or fall back to the slow global barrier, which needs none.
    if membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
        && membarrier(MembarrierCommand::PrivateExpedited).is_ok()
    {
        return;
    }
    let _ = membarrier(MembarrierCommand::Global);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

    /// The store-buffering litmus test, many times over: each side stores its flag, fences
    /// (the loop [`light`], the remover [`heavy`]) and reads the other's. Both reading the
    /// old value would be the lost handshake; x86 itself lets that happen without fences.
    fn store_buffering(asymmetric: bool, rounds: u64) {
        let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        // Round numbers to start; each side reports what it saw of the other's round.
        let (go, seen) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let done = Arc::new(AtomicBool::new(false));
        let remover = {
            let (a, b, go, seen, done) = (
                Arc::clone(&a),
                Arc::clone(&b),
                Arc::clone(&go),
                Arc::clone(&seen),
                Arc::clone(&done),
            );
            std::thread::spawn(move || {
                let mut round = 0;
                while !done.load(Relaxed) && round < rounds {
                    let next = go.load(SeqCst);
                    if next == round {
                        std::hint::spin_loop();
                        continue;
                    }
                    round = next;
                    b.store(round, Relaxed);
                    heavy(asymmetric);
                    seen.store(a.load(Relaxed) + 1, SeqCst);
                }
            })
        };
        for round in 1..=rounds {
            seen.store(0, SeqCst);
            go.store(round, SeqCst);
            a.store(round, Relaxed);
            light(asymmetric);
            let saw_b = b.load(Relaxed);
            let saw_a = loop {
                match seen.load(SeqCst) {
                    0 => std::hint::spin_loop(),
                    n => break n - 1,
                }
            };
            assert!(
                saw_a == round || saw_b == round,
                "round {round}: neither side saw the other (asymmetric: {asymmetric})"
            );
        }
        done.store(true, Relaxed);
        remover.join().unwrap();
    }

    #[test]
    fn the_fence_pair_never_loses_the_handshake() {
        let asymmetric = asymmetric();
        store_buffering(asymmetric, 2_000);
        // The fallback pair (a full fence on each side) must hold as well.
        store_buffering(false, 2_000);
    }

    #[test]
    fn registration_is_stable_within_a_process() {
        assert_eq!(asymmetric(), asymmetric());
        // Whatever the kernel allowed, the remover's side never fails.
        heavy(asymmetric());
        heavy(false);
    }
}
