//! The cases, grouped by subject. Each is `pub fn case<B: Backend>()` and panics on failure.

pub mod handles;
pub mod lifecycle;
pub mod local;
pub mod signals;
pub mod threads;
pub mod timers;
