//! The conformance suite: one set of cases that every vireo backend must pass identically.
//!
//! Each case is a generic function `fn case<B: Backend>()` in [`cases`] that panics on a
//! failure; it tests one rule of the [`Backend`](vireo_core::Backend) contract or of the core's
//! event API (see `vireo_core`'s docs). The cases are written with the [`kit`].
//!
//! - [`conformance_suite!`] turns every case into a `#[test]` for one backend, so a failure
//!   reads `epoll::hangup_on_closed_socket_peer`. A backend crate's test file is one line:
//!
//!   ```
//!   vireo_conformance::conformance_suite!(epoll, vireo_backends::Epoll);
//!   ```
//!
//! - [`cases_for`] lists the cases for one backend as plain function pointers; the
//!   `vireo-conformance` binary runs them on every compiled backend and prints the matrix.
//!
//! ```
//! let cases = vireo_conformance::cases_for::<vireo_backends::DefaultBackend>();
//! assert!(cases.len() >= 40);
//! let case = cases.iter().find(|c| c.name == "readable_after_write").unwrap();
//! (case.run)(); // panics if the backend breaks the rule
//! ```
#![deny(missing_docs)]

pub mod cases;
pub mod kit;

/// One conformance case, instantiated for one backend.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The group (module of [`cases`]): `handles`, `lifecycle`, `local`, `signals`, `threads`, `timers`.
    pub group: &'static str,
    /// The case's name, unique across groups.
    pub name: &'static str,
    /// Runs the case; panics on failure.
    pub run: fn(),
}

/// The environment variable naming backends that must run (comma-separated, e.g.
/// `io-uring,epoll`): for them an unavailable backend fails the suite instead of being skipped.
pub const REQUIRE_ENV: &str = "VIREO_REQUIRE_BACKENDS";

/// Whether `name` is listed in [`REQUIRE_ENV`].
pub fn is_required(name: &str) -> bool {
    std::env::var(REQUIRE_ENV)
        .map(|v| v.split(',').any(|b| b.trim() == name))
        .unwrap_or(false)
}

/// The variable naming backends to skip (comma-separated), for environments that cannot run
/// them faithfully: valgrind, which cannot follow io_uring's shared rings, for one.
pub const SKIP_ENV: &str = "VIREO_SKIP_BACKENDS";

/// Whether [`SKIP_ENV`] names backend `name`.
pub fn is_skipped(name: &str) -> bool {
    std::env::var(SKIP_ENV)
        .map(|v| v.split(',').any(|b| b.trim() == name))
        .unwrap_or(false)
}

/// Why backend `B` cannot start on this machine, or `None` when it can.
pub fn unavailable_reason<B: vireo_core::Backend>() -> Option<String> {
    B::new().err().map(|e| e.to_string())
}

/// Whether the cases can run on backend `B` here. When `B` cannot start, prints the reason and
/// returns false (the case is skipped), or panics if [`REQUIRE_ENV`] names the backend.
pub fn available<B: vireo_core::Backend>() -> bool {
    if is_skipped(B::NAME) {
        eprintln!("skipped: {SKIP_ENV} names the {} backend", B::NAME);
        return false;
    }
    let why = match B::new() {
        // A backend that chooses at run time (`AnyBackend`) is skipped with the one it chose.
        Ok(b) if is_skipped(b.name()) => {
            eprintln!(
                "skipped: {SKIP_ENV} names the {} backend, which {} chose",
                b.name(),
                B::NAME
            );
            return false;
        }
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    match why {
        None => true,
        Some(why) if is_required(B::NAME) => {
            panic!(
                "{} is required ({REQUIRE_ENV}) but cannot start: {why}",
                B::NAME
            )
        }
        Some(why) => {
            eprintln!("skipped: the {} backend cannot start here: {why}", B::NAME);
            false
        }
    }
}

/// Every case, instantiated for backend `B`, in the suite's order.
pub fn cases_for<B: vireo_core::Backend + Send + 'static>() -> Vec<Case> {
    __conformance_cases!(@list B)
}

/// Generates one `#[test]` per conformance case for a backend, inside `mod $name`.
///
/// ```
/// vireo_conformance::conformance_suite!(poll, vireo_backends::Poll);
/// // -> tests named poll::readable_after_write, poll::level_triggered_refire, ...
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $backend:ty) => {
        $crate::__conformance_cases!(@tests $name, $backend);
    };
}

/// The one list of cases; both [`cases_for`] and [`conformance_suite!`] expand from it.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    (@expand tests ($name:ident, $backend:ty) [$($group:ident :: $case:ident),* $(,)?]) => {
        mod $name {
            $(
                #[test]
                fn $case() {
                    if $crate::available::<$backend>() {
                        $crate::cases::$group::$case::<$backend>();
                    }
                }
            )*
        }
    };
    (@expand list ($backend:ty) [$($group:ident :: $case:ident),* $(,)?]) => {
        vec![$(
            $crate::Case {
                group: stringify!($group),
                name: stringify!($case),
                run: $crate::cases::$group::$case::<$backend>,
            }
        ),*]
    };
    (@$mode:ident $($args:tt)*) => {
        $crate::__conformance_cases! { @expand $mode ($($args)*) [
            handles::readable_after_write,
            handles::level_triggered_refire,
            handles::readiness_consumed_between_iterations_is_not_reported,
            handles::partial_read_refires_until_drained,
            handles::writable_socket_then_readable_only,
            handles::hangup_on_closed_pipe_writer_repeats,
            handles::hangup_on_closed_socket_peer,
            handles::error_on_pipe_without_reader,
            handles::empty_interest_never_fires_and_does_not_spin,
            handles::empty_interest_silent_beside_active_sibling,
            handles::hangup_only_interest_gets_hangup_without_readable,
            handles::two_watches_split_interest,
            handles::dup_fd_is_independent,
            handles::update_interest_inside_callback,
            handles::remove_self_inside_callback,
            handles::remove_other_watch_in_same_batch,
            handles::add_inside_callback_waits_for_next_iteration,
            handles::watches_dispatch_in_id_order,
            lifecycle::ids_start_at_one_separate_and_never_reused,
            lifecycle::unknown_ids_are_errors,
            lifecycle::invalid_fd_is_ebadf,
            lifecycle::state_dropped_once_after_remove_on_loop_thread,
            lifecycle::timer_state_dropped_once_after_remove,
            lifecycle::dropping_loop_drops_everything,
            lifecycle::remove_close_reopen_readd_no_stale_event,
            lifecycle::removed_fd_reused_by_an_unpollable_file_is_no_error,
            lifecycle::regular_file_always_ready,
            lifecycle::closed_while_registered_is_silent,
            lifecycle::closed_regular_file_while_registered_is_silent,
            lifecycle::stale_watch_never_reports_the_file_that_reused_its_number,
            lifecycle::stale_watch_added_over_in_its_own_pass_is_not_called,
            lifecycle::eventfd_replaced_on_the_same_number_is_a_new_registration,
            lifecycle::net_zero_changes_cost_no_kernel_change,
            lifecycle::many_fds_few_active,
            lifecycle::more_ready_fds_than_a_completion_queue_holds,
            lifecycle::remove_then_close_lets_peer_see_eof_promptly,
            lifecycle::panicking_callback_leaves_loop_usable,
            lifecycle::panicking_invoke_keeps_the_watches_of_its_iteration,
            lifecycle::panicking_timer_loses_no_due_timer,
            timers::disabled_timer_never_fires,
            timers::zero_timer_fires_every_iteration_without_starving_fds,
            timers::period_never_early,
            timers::no_cumulative_drift_over_200_periods,
            timers::missed_periods_coalesce,
            timers::update_restarts_period,
            timers::update_timer_from_own_callback,
            timers::remove_timer_from_own_callback,
            timers::remove_other_due_timer_in_same_pass,
            timers::timers_by_deadline_then_id_before_watches,
            timers::survivors_fire_in_order_after_mass_removal,
            timers::timer_added_in_callback_waits_for_next_iteration,
            timers::libvirt_millisecond_frequencies,
            timers::extreme_periods_are_never_and_never_panic,
            threads::add_from_other_thread_wakes_blocked_loop,
            threads::update_from_other_thread_wakes_blocked_loop,
            threads::quiet_iterations_still_see_changes_and_deadlines,
            threads::remove_from_other_thread_wakes_blocked_loop,
            threads::quit_from_other_thread_stops_run,
            threads::invoke_from_other_thread_runs_on_loop_thread,
            threads::invoke_runs_after_timers_and_watches,
            threads::wakeups_only_while_asleep_and_coalesced,
            threads::no_wake_writes_while_the_loop_never_blocks,
            threads::remove_from_other_thread_waits_for_a_running_callback,
            threads::removes_racing_dispatch_never_overlap_a_callback,
            threads::loop_created_on_one_thread_runs_on_another,
            threads::public_types_are_send_and_sync,
            threads::nowait_changes_return_while_the_callback_runs,
            local::local_state_is_shared_by_every_kind_of_callback,
            local::local_state_is_refused_off_the_loop_thread,
            local::nested_access_is_borrowed_and_a_panic_releases_it,
            local::local_state_of_another_loop_is_refused,
            local::local_state_moves_with_the_loop_and_drops_once,
            local::cyclic_local_state_hands_itself_to_its_callbacks,
            signals::signal_wakes_a_blocked_loop,
            signals::a_burst_of_signals_is_counted,
            signals::signal_between_iterations_is_reported_next,
            signals::every_watch_in_every_loop_hears_a_signal,
            signals::removed_inside_its_callback_and_disposition_restored,
            signals::removed_signal_watch_never_fires,
            signals::unwatchable_signals_are_refused,
            signals::child_exit_statuses_by_pidfd,
            signals::child_exit_statuses_by_sigchld,
        ] }
    };
}
