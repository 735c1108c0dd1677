//! The queue of closures from [`LoopHandle::invoke`](crate::LoopHandle::invoke).
//!
//! Any number of threads push; only the loop thread takes. A push is one compare-and-swap on
//! the head of a lock-free stack (a Treiber stack); the loop takes everything queued so far
//! with one swap and reverses it into a FIFO [`Batch`]. So the loop pays one atomic operation
//! per iteration however many closures arrived, and touches no cache line a producer writes
//! except the head (a channel's consumer shares each slot's line with the producers filling
//! the next ones). Each closure lives in a single allocation: a [`Header`] followed by the
//! closure itself, with a function pointer that knows the closure's type.
//!
//! Pushes are ordered by their successful compare-and-swap, so closures from one thread run
//! in the order that thread queued them, and a batch holds exactly the closures whose push
//! completed before the loop's swap. After [`Invokes::close`] every push fails and gives
//! the closure back.
//!
//! The loom models at the end of this file (`RUSTFLAGS="--cfg loom" cargo test -p
//! vireo-core --release --lib loom`) explore every interleaving of two producers with the
//! loop taking and closing.

#[cfg(loom)]
use loom::sync::atomic::{AtomicPtr, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicPtr, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use std::ptr;

/// What every queued node starts with.
#[repr(C)]
struct Header<A> {
    next: *mut Header<A>,
    /// Runs the closure with `Some(arg)` or drops it with `None`, and frees the node: called
    /// exactly once per node, with the pointer [`Invokes::push`] made for it.
    finish: unsafe fn(*mut Header<A>, Option<&A>),
}

/// A queued closure: the header first (`repr(C)`), so a node pointer is a header pointer.
#[repr(C)]
struct Node<A, F> {
    header: Header<A>,
    f: F,
}

/// [`Header::finish`] for closures of type `F`.
///
/// # Safety
///
/// `node` must come from `Box::into_raw` of a `Box<Node<A, F>>` (cast to its header) and
/// must not be used again.
unsafe fn finish<A, F: FnOnce(&A)>(node: *mut Header<A>, arg: Option<&A>) {
    // SAFETY: the caller passes the pointer `push` made from a `Box<Node<A, F>>`, once.
    let node = unsafe { Box::from_raw(node.cast::<Node<A, F>>()) };
    let Node { f, .. } = *node;
    if let Some(arg) = arg {
        f(arg);
    }
}

/// The head value that marks a closed queue: the address of a static, which no allocation
/// can share. Never dereferenced.
static CLOSED_MARK: u8 = 0;

fn closed<A>() -> *mut Header<A> {
    ptr::addr_of!(CLOSED_MARK).cast_mut().cast()
}

/// The shared end: a lock-free stack of queued closures taking an `&A` when they run.
pub(crate) struct Invokes<A> {
    head: AtomicPtr<Header<A>>,
}

// SAFETY: the nodes hold `Send` closures (`push` requires it) and move between threads only
// through the atomic head, with release/acquire ordering on every hand-over.
unsafe impl<A> Send for Invokes<A> {}
// SAFETY: as above; `&Invokes` only allows pushing (any thread) and taking (whoever holds
// the node list afterwards owns it alone).
unsafe impl<A> Sync for Invokes<A> {}

impl<A> Invokes<A> {
    pub(crate) fn new() -> Self {
        Invokes {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Queues `f`; gives it back when the queue is closed.
    pub(crate) fn push<F: FnOnce(&A) + Send + 'static>(&self, f: F) -> Result<(), F> {
        let node = Box::into_raw(Box::new(Node {
            header: Header {
                next: ptr::null_mut(),
                finish: finish::<A, F>,
            },
            f,
        }))
        .cast::<Header<A>>();
        let mut head = self.head.load(Relaxed);
        loop {
            if head == closed() {
                // SAFETY: the node was never published: this thread still owns it.
                let node = unsafe { Box::from_raw(node.cast::<Node<A, F>>()) };
                return Err(node.f);
            }
            // SAFETY: unpublished, so this thread is the only one that reaches it.
            unsafe { (*node).next = head };
            // Release: whoever swaps the list out sees the node's contents.
            match self
                .head
                .compare_exchange_weak(head, node, Release, Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => head = now,
            }
        }
    }

    /// Whether nothing is queued (or the queue is closed). Read after the waker's counter,
    /// it sees every push counted up to that value.
    pub(crate) fn is_empty(&self) -> bool {
        let head = self.head.load(Acquire);
        head.is_null() || head == closed()
    }

    /// Takes everything queued so far, oldest first (loop thread).
    pub(crate) fn take(&self) -> Batch<A> {
        let head = self.head.load(Relaxed);
        // A closed queue stays closed: swapping null in would reopen it.
        if head.is_null() || head == closed() {
            return Batch::default();
        }
        // SAFETY: `swap` hands this caller the whole published list (acquire).
        unsafe { Batch::from_stack(self.head.swap(ptr::null_mut(), Acquire)) }
    }

    /// Closes the queue: later pushes fail. Returns what was still queued, oldest first.
    pub(crate) fn close(&self) -> Batch<A> {
        // SAFETY: as in `take`; the mark itself is not a node.
        unsafe { Batch::from_stack(self.head.swap(closed(), Acquire)) }
    }
}

impl<A> Drop for Invokes<A> {
    fn drop(&mut self) {
        // Only when the loop never closed it (it was leaked): drop what is left, unrun.
        drop(self.close());
    }
}

/// Closures taken out of the queue, oldest first, owned by whoever holds the batch. Dropping
/// it drops the closures without running them.
pub(crate) struct Batch<A> {
    front: *mut Header<A>,
    back: *mut Header<A>,
}

// SAFETY: the batch owns its nodes, whose closures are `Send`.
unsafe impl<A> Send for Batch<A> {}

impl<A> Default for Batch<A> {
    fn default() -> Self {
        Batch {
            front: ptr::null_mut(),
            back: ptr::null_mut(),
        }
    }
}

impl<A> Batch<A> {
    /// Reverses a stack (newest first) into a batch.
    ///
    /// # Safety
    ///
    /// `top` is null, the closed mark, or a list of nodes made by `push` that the caller now
    /// owns alone.
    unsafe fn from_stack(mut top: *mut Header<A>) -> Self {
        let mut batch = Batch::default();
        if top == closed() {
            return batch;
        }
        batch.back = top;
        let mut reversed = ptr::null_mut();
        while !top.is_null() {
            // SAFETY: every node of the list is owned by the caller and valid until finished.
            let next = unsafe { (*top).next };
            // SAFETY: as above.
            unsafe { (*top).next = reversed };
            reversed = top;
            top = next;
        }
        batch.front = reversed;
        batch
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.front.is_null()
    }

    /// Puts `later` behind this batch's closures.
    pub(crate) fn append(&mut self, mut later: Batch<A>) {
        if later.is_empty() {
            return;
        }
        if self.is_empty() {
            self.front = later.front;
        } else {
            // SAFETY: `back` is this batch's last node, owned by it.
            unsafe { (*self.back).next = later.front };
        }
        self.back = later.back;
        later.front = ptr::null_mut();
        later.back = ptr::null_mut();
    }

    /// Takes the oldest closure out of the batch.
    pub(crate) fn pop(&mut self) -> Option<Job<A>> {
        let node = self.front;
        if node.is_null() {
            return None;
        }
        // SAFETY: `front` is a node this batch owns.
        self.front = unsafe { (*node).next };
        if self.front.is_null() {
            self.back = ptr::null_mut();
        }
        Some(Job { node })
    }
}

impl<A> Drop for Batch<A> {
    fn drop(&mut self) {
        while let Some(job) = self.pop() {
            drop(job);
        }
    }
}

/// One queued closure, owned.
pub(crate) struct Job<A> {
    node: *mut Header<A>,
}

impl<A> Job<A> {
    /// Runs the closure (and frees it).
    pub(crate) fn run(self, arg: &A) {
        let node = self.node;
        std::mem::forget(self);
        // SAFETY: the job owned the node, and `forget` keeps its drop from finishing it again.
        unsafe { ((*node).finish)(node, Some(arg)) }
    }
}

impl<A> Drop for Job<A> {
    fn drop(&mut self) {
        // SAFETY: the job owns the node and is dropped once.
        unsafe { ((*self.node).finish)(self.node, None) }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<u32>>>;

    fn logger(log: &Log, n: u32) -> impl FnOnce(&()) + Send + 'static {
        let log = Arc::clone(log);
        move |_| log.lock().unwrap().push(n)
    }

    #[test]
    fn batches_run_oldest_first_and_appends_keep_order() {
        let q = Invokes::<()>::new();
        let log: Log = Arc::default();
        assert!(q.is_empty());
        for n in 0..3 {
            assert!(q.push(logger(&log, n)).is_ok());
        }
        assert!(!q.is_empty());
        let mut batch = q.take();
        assert!(q.is_empty());
        for n in 3..5 {
            assert!(q.push(logger(&log, n)).is_ok());
        }
        batch.append(q.take());
        batch.append(Batch::default());
        while let Some(job) = batch.pop() {
            job.run(&());
        }
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert!(batch.is_empty());
    }

    #[test]
    fn dropped_batches_and_closed_queues_drop_each_closure_once_unrun() {
        let q = Invokes::<()>::new();
        let token = Arc::new(());
        let ran: Log = Arc::default();
        for n in 0..4 {
            let (t, ran) = (Arc::clone(&token), Arc::clone(&ran));
            assert!(
                q.push(move |_| {
                    let _t = t;
                    ran.lock().unwrap().push(n);
                })
                .is_ok()
            );
        }
        let mut batch = q.take();
        batch.pop().expect("one").run(&());
        drop(batch);
        let t = Arc::clone(&token);
        assert!(q.push(move |_| drop(t)).is_ok());
        drop(q.close());
        assert_eq!(Arc::strong_count(&token), 1);
        assert_eq!(*ran.lock().unwrap(), [0]);
        // Closed: the closure comes back, and taking finds nothing.
        let t = Arc::clone(&token);
        let back = q.push(move |_| drop(t)).expect_err("refused");
        assert_eq!(Arc::strong_count(&token), 2);
        drop(back);
        assert!(q.is_empty());
        assert!(q.take().is_empty());
        // Taking did not reopen it.
        let t = Arc::clone(&token);
        assert!(q.push(move |_| drop(t)).is_err());
        assert_eq!(Arc::strong_count(&token), 1);
    }

    #[test]
    fn a_panicking_closure_frees_its_node_and_leaves_the_rest() {
        let q = Invokes::<()>::new();
        let token = Arc::new(());
        let t = Arc::clone(&token);
        assert!(
            q.push(move |_| {
                let _t = t;
                panic!("boom");
            })
            .is_ok()
        );
        let t = Arc::clone(&token);
        assert!(q.push(move |_| drop(t)).is_ok());
        let mut batch = q.take();
        let job = batch.pop().expect("first");
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(&())));
        assert!(caught.is_err());
        assert_eq!(Arc::strong_count(&token), 2);
        drop(batch);
        assert_eq!(Arc::strong_count(&token), 1);
    }

    #[test]
    fn racing_producers_lose_nothing_and_keep_their_own_order() {
        const PER: u32 = 20_000;
        let q = Arc::new(Invokes::<()>::new());
        let log: Log = Arc::default();
        let producers: Vec<_> = (0..3u32)
            .map(|p| {
                let (q, log) = (Arc::clone(&q), Arc::clone(&log));
                std::thread::spawn(move || {
                    for i in 0..PER {
                        assert!(q.push(logger(&log, p * PER + i)).is_ok());
                    }
                })
            })
            .collect();
        let mut ran = 0;
        let mut done = false;
        while !done {
            done = producers.iter().all(|p| p.is_finished());
            let mut batch = q.take();
            while let Some(job) = batch.pop() {
                job.run(&());
                ran += 1;
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        let mut batch = q.take();
        while let Some(job) = batch.pop() {
            job.run(&());
            ran += 1;
        }
        assert_eq!(ran, 3 * PER);
        let log = log.lock().unwrap();
        for p in 0..3 {
            let mine: Vec<u32> = log.iter().copied().filter(|n| n / PER == p).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "producer {p} out of order"
            );
            assert_eq!(mine.len(), PER as usize);
        }
    }
}

/// Every interleaving of two producers with the loop taking, then closing: each closure runs
/// or is dropped (by the loop, or given back to its producer) exactly once, and one
/// producer's closures run in its order.
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    #[test]
    fn loom_pushes_racing_take_and_close() {
        loom::model(|| {
            let q = Arc::new(Invokes::<AtomicUsize>::new());
            let dropped = Arc::new(AtomicUsize::new(0));
            struct Counted(Arc<AtomicUsize>);
            impl Drop for Counted {
                fn drop(&mut self) {
                    self.0.fetch_add(1, SeqCst);
                }
            }
            let producers: Vec<_> = (0..2usize)
                .map(|p| {
                    let (q, dropped) = (Arc::clone(&q), Arc::clone(&dropped));
                    loom::thread::spawn(move || {
                        for i in 0..2usize {
                            let c = Counted(Arc::clone(&dropped));
                            let tag = p * 2 + i;
                            // Each closure checks that this producer's earlier one ran first
                            // (bit per closure in the argument).
                            let _ = q.push(move |seen: &AtomicUsize| {
                                let _c = c;
                                let before = seen.fetch_or(1 << tag, SeqCst);
                                if i == 1 {
                                    assert!(before & (1 << (p * 2)) != 0, "out of order");
                                }
                            });
                        }
                    })
                })
                .collect();
            let seen = AtomicUsize::new(0);
            let mut batch = q.take();
            while let Some(job) = batch.pop() {
                job.run(&seen);
            }
            let left = q.close();
            for p in producers {
                p.join().unwrap();
            }
            // Closed before some pushes: those closures came back and were dropped by
            // their producers; what was still queued drops with `left`, unrun.
            drop(left);
            assert_eq!(dropped.load(SeqCst), 4);
        });
    }
}
