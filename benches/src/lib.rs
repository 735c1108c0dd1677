//! vireo's benchmarks. The `vireo-bench` binary runs them; this library holds the workloads and
//! the comparison systems so that each benchmark is written once.
//!
//! Every benchmark compares systems side by side in one run and reports medians of several
//! runs and ratios between systems measured in that same run (machines are shared and noisy).
#![deny(missing_docs)]

pub mod contention;
pub mod dispatch;
pub mod heap;
pub mod libvirt;
pub mod pipes;
pub mod plot;
pub mod pool;
pub mod report;
pub mod rpc;
pub mod soak;
pub mod timers;
pub mod wake;
