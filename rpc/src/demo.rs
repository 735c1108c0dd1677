//! vireo's demo program ([`PROGRAM`] v[`VERSION`]): `ECHO`, `SLEEP`, `HASH` and `STATS`, what
//! `vireo-rpcd`, `vireo-demo`, the load generator and the benchmarks serve and call.
//!
//! ```
//! use vireo_rpc::proto::Procedure;
//!
//! let program = vireo_rpc::demo::program();
//! assert_eq!(program.number(), vireo_rpc::proto::PROGRAM);
//! assert_eq!(program.is_priority(Procedure::Stats as u32), Some(true));
//! assert_eq!(program.is_priority(Procedure::Sleep as u32), Some(false));
//! ```

use std::time::Duration;

use crate::program::{Program, RpcError, ServerStats};
use crate::proto::{self, MAX_SLEEP_MS, PROGRAM, Procedure, VERSION};

/// A procedure number outside the demo's that panics in the worker; served only by
/// [`program_with_test_procedures`] (for fault-injection tests).
pub const TEST_PANIC_PROCEDURE: u32 = 0x7e57_0001;

/// The demo program: [`Procedure::Echo`], [`Procedure::Sleep`] and [`Procedure::Hash`] on
/// normal workers, [`Procedure::Stats`] on priority workers.
pub fn program() -> Program {
    Program::new(PROGRAM, VERSION)
        .procedure(Procedure::Echo as u32, |call, out| {
            out.extend_from_slice(call.payload());
            Ok(())
        })
        .procedure(Procedure::Sleep as u32, |call, _| {
            let Ok(ms) = <[u8; 4]>::try_from(call.payload()).map(u32::from_be_bytes) else {
                return Err(RpcError::invalid_arg(
                    "SLEEP takes a u32 number of milliseconds",
                ));
            };
            if ms > MAX_SLEEP_MS {
                return Err(RpcError::invalid_arg(format!(
                    "SLEEP of {ms} ms is above the limit of {MAX_SLEEP_MS}"
                )));
            }
            std::thread::sleep(Duration::from_millis(u64::from(ms)));
            Ok(())
        })
        .procedure(Procedure::Hash as u32, |call, out| {
            out.extend_from_slice(&proto::fnv1a64(call.payload()).to_be_bytes());
            Ok(())
        })
        .priority_procedure(Procedure::Stats as u32, |call, out| {
            let stats = call
                .server_stats()
                .ok_or_else(|| RpcError::failed("the server's pool is gone"))?;
            out.extend_from_slice(stats_json(&stats).as_bytes());
            Ok(())
        })
}

/// [`program`] and [`TEST_PANIC_PROCEDURE`].
pub fn program_with_test_procedures() -> Program {
    program().procedure(TEST_PANIC_PROCEDURE, |_, _| {
        panic!("the test procedure panics on purpose")
    })
}

/// `STATS`' reply: the pool, the loop and the server's counters as JSON.
fn stats_json(s: &ServerStats) -> String {
    let p = &s.pool;
    serde_json::json!({
        "pool": {
            "min_workers": p.min_workers,
            "max_workers": p.max_workers,
            "workers": p.workers,
            "free_workers": p.free_workers,
            "prio_workers": p.prio_workers,
            "max_prio_workers": p.max_prio_workers,
            "queue_depth": p.queue_depth,
            "prio_queue_depth": p.prio_queue_depth,
            "completed": p.completed,
            "panicked": p.panicked,
            "stolen": p.stolen,
        },
        "loop": {
            "iterations": s.loop_iterations,
            "dispatched": s.loop_dispatched,
            "backend_rebuilds": s.backend_rebuilds,
        },
        "clients": s.clients,
        "calls_received": s.calls_received,
        "replies_sent": s.replies_sent,
    })
    .to_string()
}
