//! `vireo-conformance`: runs every conformance case on every compiled backend and prints the
//! case x backend matrix (or JSON lines). Exits non-zero when any case fails.

use std::collections::HashMap;
use std::io::Write;
use std::panic;
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use vireo_backends::{AnyBackend, BackendKind, Choice};
use vireo_conformance::{Case, REQUIRE_ENV, cases_for, is_required, unavailable_reason};
use vireo_core::Backend;

/// Runs the vireo conformance suite on every compiled backend and prints a case x backend
/// matrix: every backend must pass every case.
#[derive(Debug, Parser)]
#[command(name = "vireo-conformance", version, about, long_about = None)]
struct Args {
    /// Print one JSON object per case and backend, then a summary object, instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only this backend (also read from the VIREO_BACKEND environment variable;
    /// "all" or "auto" runs every compiled backend).
    #[arg(long, env = "VIREO_BACKEND", value_name = "NAME")]
    backend: Option<String>,
    /// Run only the cases whose `group::name` contains this text.
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// List the cases and the compiled backends, run nothing.
    #[arg(long)]
    list: bool,
    /// Give up on a case after this many seconds and count it as failed.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    timeout: u64,
}

/// A compiled backend: its name, why it cannot start here (if it cannot), its cases.
type Column = (&'static str, Option<String>, Vec<Case>);

fn column<B: Backend + Send + 'static>() -> Column {
    (B::NAME, unavailable_reason::<B>(), cases_for::<B>())
}

/// What a backend says about itself when started here.
fn describe(name: &str) -> Option<String> {
    let kind: BackendKind = name.parse().ok()?;
    let mut info = AnyBackend::with_choice(Choice::Only(kind)).ok()?.info();
    info.details.retain(|(key, _)| *key != "chosen_by");
    Some(info.to_string())
}

/// The compiled backends with their instantiated cases.
#[allow(clippy::vec_init_then_push)] // each push is behind its own feature
fn backends() -> Vec<Column> {
    let mut all = Vec::new();
    #[cfg(feature = "poll")]
    all.push(column::<vireo_backends::Poll>());
    #[cfg(feature = "epoll")]
    all.push(column::<vireo_backends::Epoll>());
    #[cfg(feature = "io-uring")]
    all.push(column::<vireo_backends::IoUring>());
    #[cfg(feature = "portable")]
    all.push(column::<vireo_backends::Portable>());
    all
}

#[derive(Debug, Clone)]
struct Outcome {
    passed: bool,
    elapsed: Duration,
    error: Option<String>,
}

/// Panic messages by thread, recorded by the panic hook (the default hook's output would
/// interleave with the table).
fn panic_messages() -> &'static Mutex<HashMap<ThreadId, String>> {
    static MESSAGES: OnceLock<Mutex<HashMap<ThreadId, String>>> = OnceLock::new();
    MESSAGES.get_or_init(Default::default)
}

fn run_case(case: Case, limit: Duration) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let spawned = thread::Builder::new()
        .name(format!("case-{}", case.name))
        .spawn(move || {
            let result = panic::catch_unwind(case.run);
            let message = panic_messages()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&thread::current().id());
            let _ = tx.send((result.is_ok(), start.elapsed(), message));
        });
    if let Err(e) = spawned {
        return Outcome {
            passed: false,
            elapsed: Duration::ZERO,
            error: Some(format!("could not start the case's thread: {e}")),
        };
    }
    match rx.recv_timeout(limit) {
        Ok((true, elapsed, _)) => Outcome {
            passed: true,
            elapsed,
            error: None,
        },
        Ok((false, elapsed, message)) => {
            let mut message = message.unwrap_or_else(|| "panicked".into());
            if message.len() > 2000 {
                let mut end = 2000;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
                message.push_str(" ...");
            }
            Outcome {
                passed: false,
                elapsed,
                error: Some(message),
            }
        }
        // The case's thread is left behind; the process exits with a failure at the end.
        Err(_) => Outcome {
            passed: false,
            elapsed: limit,
            error: Some(format!("did not finish within {limit:?}")),
        },
    }
}

fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2}ms", d.as_secs_f64() * 1e3)
    } else if d < Duration::from_secs(10) {
        format!("{:.0}ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vireo-conformance: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the suite; `Ok(false)` when a case failed.
fn run(args: Args) -> anyhow::Result<bool> {
    let mut selected = backends();
    let compiled: Vec<&str> = selected.iter().map(|(name, _, _)| *name).collect();
    if let Some(want) = args
        .backend
        .as_deref()
        .filter(|b| !matches!(*b, "all" | "auto"))
    {
        if !compiled.contains(&want) {
            bail!(
                "unknown or not compiled backend {want:?} (compiled: {})",
                compiled.join(", ")
            );
        }
        selected.retain(|(name, _, _)| *name == want);
    }
    for (_, _, cases) in &mut selected {
        if let Some(filter) = &args.filter {
            cases.retain(|c| format!("{}::{}", c.group, c.name).contains(filter.as_str()));
        }
    }
    let case_count = selected.first().map_or(0, |(_, _, c)| c.len());
    if case_count == 0 {
        bail!(
            "no case matches the filter {:?}",
            args.filter.unwrap_or_default()
        );
    }

    if args.list {
        println!("backends: {}", compiled.join(", "));
        for case in &selected[0].2 {
            println!("{}::{}", case.group, case.name);
        }
        return Ok(true);
    }

    panic::set_hook(Box::new(|info| {
        panic_messages()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(thread::current().id(), info.to_string());
    }));

    let limit = Duration::from_secs(args.timeout);
    let width = selected[0]
        .2
        .iter()
        .map(|c| c.group.len() + 2 + c.name.len())
        .max()
        .unwrap_or(0)
        + 2;
    let names: Vec<&str> = selected.iter().map(|(n, _, _)| *n).collect();
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "vireo conformance: {case_count} cases x {} backend(s)",
            names.len()
        )?;
    }
    let mut failures = Vec::new();
    for (name, why, _) in &selected {
        if why.is_none() && !args.json {
            if let Some(info) = describe(name) {
                writeln!(out, "  {name:<9} {info}")?;
            }
        }
        if let Some(why) = why {
            let required = is_required(name);
            if !args.json {
                writeln!(
                    out,
                    "{} {name}: cannot start here: {why}",
                    if required {
                        "FAILED (required)"
                    } else {
                        "skipping"
                    }
                )?;
            }
            if required {
                failures.push((
                    name.to_string(),
                    "backend".to_string(),
                    Some(format!("required by {REQUIRE_ENV} but cannot start: {why}")),
                ));
            }
        }
    }
    if !args.json {
        writeln!(out)?;
        write!(out, "{:<width$}", "case")?;
        for name in &names {
            write!(out, "{name:>16}")?;
        }
        writeln!(out)?;
    }

    let mut totals: Vec<(usize, Duration)> = vec![(0, Duration::ZERO); names.len()];
    for i in 0..case_count {
        let case = selected[0].2[i];
        let label = format!("{}::{}", case.group, case.name);
        if !args.json {
            write!(out, "{label:<width$}")?;
            out.flush()?;
        }
        for (b, (backend, why, cases)) in selected.iter().enumerate() {
            if why.is_some() {
                if args.json {
                    let line = serde_json::json!({
                        "case": case.name, "group": case.group, "backend": backend,
                        "passed": serde_json::Value::Null, "skipped": true, "error": why,
                    });
                    writeln!(out, "{line}")?;
                } else {
                    write!(out, "{:>16}", "skip")?;
                }
                continue;
            }
            let outcome = run_case(cases[i], limit);
            totals[b].1 += outcome.elapsed;
            if outcome.passed {
                totals[b].0 += 1;
            } else {
                failures.push((backend.to_string(), label.clone(), outcome.error.clone()));
            }
            if args.json {
                let line = serde_json::json!({
                    "case": case.name,
                    "group": case.group,
                    "backend": backend,
                    "passed": outcome.passed,
                    "ms": outcome.elapsed.as_secs_f64() * 1e3,
                    "error": outcome.error,
                });
                writeln!(out, "{line}")?;
            } else {
                let cell = format!(
                    "{} {}",
                    if outcome.passed { "ok" } else { "FAIL" },
                    fmt_duration(outcome.elapsed)
                );
                write!(out, "{cell:>16}")?;
                out.flush()?;
            }
        }
        if !args.json {
            writeln!(out)?;
        }
    }

    let passed: usize = totals.iter().map(|t| t.0).sum();
    let skipped = selected.iter().filter(|(_, why, _)| why.is_some()).count() * case_count;
    let failed = failures.len();
    if args.json {
        let per_backend: Vec<_> = names
            .iter()
            .zip(&totals)
            .map(|(n, (p, d))| {
                serde_json::json!({"backend": n, "passed": p, "cases": case_count,
                                   "ms": d.as_secs_f64() * 1e3})
            })
            .collect();
        let summary = serde_json::json!({
            "summary": true, "passed": passed, "failed": failed, "skipped": skipped,
            "backends": per_backend,
        });
        writeln!(out, "{summary}")?;
    } else {
        write!(out, "{:<width$}", "passed / time")?;
        for (p, d) in &totals {
            write!(
                out,
                "{:>16}",
                format!("{p}/{case_count} {}", fmt_duration(*d))
            )?;
        }
        writeln!(out, "\n")?;
        for (backend, label, error) in &failures {
            writeln!(
                out,
                "FAILED {backend} {label}: {}",
                error.as_deref().unwrap_or("")
            )?;
        }
        if skipped > 0 {
            writeln!(out, "{passed} passed, {failed} failed, {skipped} skipped")?;
        } else {
            writeln!(out, "{passed} passed, {failed} failed")?;
        }
    }
    out.flush().context("writing the report")?;
    Ok(failed == 0)
}
