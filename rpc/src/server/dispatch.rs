//! From a whole frame to its program's handler on a worker, and the reply back to the loop.
//!
//! On the loop thread a call is routed (program number and version, then procedure) and
//! refused there when nothing serves it; otherwise it goes to the pool, the priority lane for
//! priority procedures. The worker runs the handler (a panic is caught and answered), encodes
//! the reply frame and queues it for the loop: the first reply after a drain schedules one
//! [`LoopHandle::invoke`], which takes every reply that arrived by then.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use vireo_core::{LoopHandle, WeakLoopLocal};
use vireo_pool::{Pool, SubmitError};

use super::{Close, Counters, LoopCounters, State};
use crate::program::{Call, CallContext, Program, RpcError, ServerStats};
use crate::proto::{self, Frame, HEADER_LEN, Header, LEN_WORD, MAX_MESSAGE, kind, status};

/// A reply finished by a worker, on its way to the loop thread.
struct Completion {
    key: usize,
    uid: u64,
    reply: Vec<u8>,
}

/// Replies travel to the loop in batches: the first one after a drain schedules one
/// [`LoopHandle::invoke`], and that drain takes every reply that arrived by then, so a busy
/// server pays one wake-up and one write per client per batch rather than per reply.
#[derive(Default)]
pub(super) struct Completions {
    /// The replies, and whether a drain is scheduled.
    queue: Mutex<(Vec<Completion>, bool)>,
}

impl Completions {
    /// Adds a reply; returns whether the caller must schedule a drain.
    fn push(&self, completion: Completion) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.0.push(completion);
        !std::mem::replace(&mut q.1, true)
    }

    fn take(&self) -> Vec<Completion> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.1 = false;
        std::mem::take(&mut q.0)
    }
}

/// What a server's workers need besides the frame: one reference count per job.
pub(super) struct WorkerCtx {
    pub(super) name: String,
    /// The server's index in the daemon.
    pub(super) server: usize,
    pub(super) state: WeakLoopLocal<State>,
    pub(super) handle: LoopHandle,
    pub(super) completions: Completions,
    /// `None` for a server whose calls run on the loop thread.
    pub(super) pool: Option<Weak<Pool>>,
    pub(super) counters: Arc<Counters>,
    pub(super) loop_counters: Arc<LoopCounters>,
    pub(super) programs: Vec<Program>,
}

impl CallContext for WorkerCtx {
    fn server_name(&self) -> &str {
        &self.name
    }

    fn stats(&self) -> Option<ServerStats> {
        let pool = match &self.pool {
            Some(pool) => pool.upgrade()?.stats(),
            // No pool: every limit and count is 0.
            None => vireo_pool::Stats::default(),
        };
        Some(ServerStats {
            pool,
            clients: self.counters.clients.load(Relaxed),
            calls_received: self.counters.calls_received.load(Relaxed),
            replies_sent: self.counters.replies_sent.load(Relaxed),
            loop_iterations: self.loop_counters.iterations.load(Relaxed),
            loop_dispatched: self.loop_counters.dispatched.load(Relaxed),
            backend_rebuilds: self.loop_counters.backend_rebuilds.load(Relaxed),
        })
    }
}

impl WorkerCtx {
    /// The program and procedure (indices) that serve a call, and whether it is a priority
    /// one; libvirt's error otherwise.
    fn route(&self, h: &Header) -> Result<(usize, usize, bool), RpcError> {
        if h.kind != kind::CALL {
            return Err(RpcError::rpc(format!("unexpected message type {}", h.kind)));
        }
        let Some(p) = self
            .programs
            .iter()
            .position(|p| p.number() == h.program && p.version() == h.version)
        else {
            return Err(RpcError::rpc(format!(
                "cannot find program {:#x} version {}",
                h.program, h.version
            )));
        };
        let program = &self.programs[p];
        let Some(e) = program.entry_index(h.procedure) else {
            return Err(RpcError::rpc(format!("unknown procedure: {}", h.procedure)));
        };
        Ok((p, e, program.entry(e).priority))
    }
}

/// An error reply to call `h`.
fn error_frame(h: &Header, e: &RpcError) -> Vec<u8> {
    proto::encode_frame(&h.reply(status::ERROR), &e.to_body())
}

/// Runs one call's handler and encodes its reply frame (on a worker thread).
fn execute(frame: &Frame, uid: u64, program: usize, entry: usize, ctx: &WorkerCtx) -> Vec<u8> {
    let h = frame.header;
    let head = h.reply(status::OK).to_bytes();
    let mut out = Vec::with_capacity(LEN_WORD + HEADER_LEN + frame.payload.len().min(64 * 1024));
    out.extend_from_slice(&[0; LEN_WORD]);
    out.extend_from_slice(&head);
    let call = Call {
        header: h,
        payload: &frame.payload,
        client: uid,
        server: ctx,
    };
    let handler = &ctx.programs[program].entry(entry).handler;
    let result = catch_unwind(AssertUnwindSafe(|| handler(&call, &mut out)));
    let result = match result {
        Ok(Ok(()))
            if out.len() < LEN_WORD + HEADER_LEN || out[LEN_WORD..][..HEADER_LEN] != head =>
        {
            Err(RpcError::internal(
                "internal error: the procedure changed reply bytes it did not write",
            ))
        }
        Ok(Ok(())) if out.len() - LEN_WORD > MAX_MESSAGE => Err(RpcError::internal(format!(
            "internal error: a reply of {} bytes is above the limit of {MAX_MESSAGE}",
            out.len() - LEN_WORD
        ))),
        Ok(result) => result,
        Err(_) => Err(RpcError::internal("internal error: the procedure panicked")),
    };
    match result {
        Ok(()) => {
            let len = u32::try_from(out.len()).expect("checked against MAX_MESSAGE");
            out[..LEN_WORD].copy_from_slice(&len.to_be_bytes());
            out
        }
        Err(e) => error_frame(&h, &e),
    }
}

impl State {
    /// Hands one whole frame of client `key` on: keepalive and admin calls are answered on the
    /// loop, a call of a program goes to the server's pool, or runs here when the server has
    /// none (its reply is queued; the caller writes it).
    pub(super) fn dispatch(&mut self, key: usize, frame: Frame) -> Result<(), Close> {
        if self.keepalive_message(key, &frame.header)? {
            return Ok(());
        }
        let srv = self.clients[key].server;
        let s = &mut self.servers[srv];
        // Counted like any call: every call received gets one reply.
        s.summary.calls_received += 1;
        s.counters.calls_received.fetch_add(1, Relaxed);
        if s.admin {
            return self.dispatch_admin(key, &frame);
        }
        let ctx = s
            .ctx
            .as_ref()
            .expect("a server of programs has its workers' context");
        let header = frame.header;
        let (program, entry, priority) = match ctx.route(&header) {
            Ok(route) => route,
            Err(e) => {
                // Answered at once; counted like any reply so throttling and shutdown see it.
                self.clients[key].in_flight += 1;
                return self.queue(key, error_frame(&header, &e), true);
            }
        };
        let Some(pool) = s.pool.as_ref() else {
            // libvirt's server without workers: the call runs here, on the loop thread.
            let c = &mut self.clients[key];
            c.in_flight += 1;
            let reply = execute(&frame, c.uid, program, entry, ctx);
            return self.queue(key, reply, true);
        };
        // One reference count for everything a job needs (each count is a cache line that the
        // loop and the workers would otherwise pass back and forth).
        let ctx = Arc::clone(ctx);
        let c = &mut self.clients[key];
        c.in_flight += 1;
        let uid = c.uid;
        let job = move || {
            let reply = execute(&frame, uid, program, entry, &ctx);
            if ctx.completions.push(Completion { key, uid, reply }) {
                let weak = ctx.state.clone();
                let srv = ctx.server;
                // An error means the loop is gone, and the replies with it.
                let _ = ctx.handle.invoke(move |h| {
                    if let Some(state) = weak.upgrade() {
                        let _ = state.with(|st| st.drain_completions(h, srv));
                    }
                });
            }
        };
        let submitted = if priority {
            pool.submit_priority(job)
        } else {
            pool.try_submit(job)
        };
        match submitted {
            Ok(()) => Ok(()),
            Err(SubmitError::Full(_) | SubmitError::Closed(_)) => {
                let busy = RpcError::failed("server busy");
                self.queue(key, error_frame(&header, &busy), true)
            }
        }
    }

    /// Server `srv`'s replies arrive on the loop thread: queue each on its client, then write
    /// each client's queue once.
    fn drain_completions(&mut self, h: &LoopHandle, srv: usize) {
        let Some(ctx) = self.servers[srv].ctx.clone() else {
            return;
        };
        let batch = ctx.completions.take();
        let mut touched = Vec::new();
        for Completion { key, uid, reply } in batch {
            if self.clients.get(key).is_none_or(|c| c.uid != uid) {
                self.servers[srv].summary.replies_dropped += 1;
                continue;
            }
            if self.clients[key].tx.is_empty() {
                touched.push((key, uid));
            }
            if let Err(why) = self.queue(key, reply, true) {
                self.close(key, why);
                self.check_limits(h, srv);
            }
        }
        for (key, uid) in touched {
            if self.clients.get(key).is_none_or(|c| c.uid != uid) {
                continue;
            }
            let outcome = self.write_out(key);
            self.settle(h, key, outcome);
        }
    }
}
