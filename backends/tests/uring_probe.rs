//! The io_uring start-up probe under a seccomp filter that denies `io_uring_setup`.
//!
//! Each check runs in a child process (this same binary, re-executed with
//! `VIREO_URING_PROBE_CHILD` set), which installs the filter on its only thread and then asks
//! vireo for io_uring. The parent asserts that the answer came at once, as the right typed error
//! with the right text, and that `auto` fell back to epoll while an explicit `io-uring` failed.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
use vireo_backends::{AnyBackend, BackendKind, Choice, IoUring, UringError};
use vireo_core::Backend;

const CHILD_ENV: &str = "VIREO_URING_PROBE_CHILD";

fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
        return ExitCode::SUCCESS;
    }
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let eperm_variant = match sysctl.as_str() {
        "2" => "DisabledBySysctl",
        "1" => "RestrictedToGroup",
        _ => "Denied",
    };
    let checks = [
        ("EPERM", eperm_variant, "PermissionDenied"),
        ("ENOSYS", "NotSupported", "Unsupported"),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (mode, variant, kind) in checks {
        let name = format!("probe_under_seccomp_{}", mode.to_lowercase());
        match run_check(mode, variant, kind) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(why) => {
                println!("test {name} ... FAILED\n{why}");
                failed += 1;
            }
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_check(mode: &str, variant: &str, kind: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .env(CHILD_ENV, mode)
        .env_remove("VIREO_BACKEND")
        .output()
        .map_err(|e| format!("spawning the child: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "child failed ({}):\n{stdout}\n{stderr}",
            out.status
        ));
    }
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .ok_or_else(|| format!("child printed no {key}:\n{stdout}\n{stderr}"))
    };
    let expect = |key: &str, want: &str| -> Result<(), String> {
        let got = line(key)?;
        if got.contains(want) {
            Ok(())
        } else {
            Err(format!("{key}: expected {want:?} in {got:?}"))
        }
    };
    expect("variant", variant)?;
    expect("message", mode)?;
    expect("new_kind", kind)?;
    expect("new_downcast", variant)?;
    expect("auto_kind", "epoll")?;
    expect("auto_fallback", "io-uring unavailable: io_uring")?;
    expect("explicit", "VIREO_BACKEND=io-uring: io_uring")?;
    let ms: f64 = line("probe_ms")?
        .parse()
        .map_err(|e| format!("probe_ms: {e}"))?;
    if ms > 1000.0 {
        return Err(format!("the probe took {ms} ms: it must answer at once"));
    }
    Ok(())
}

/// In the child: deny io_uring_setup with `mode`, then report what vireo says.
fn child(mode: &str) {
    let errno = match mode {
        "EPERM" => libc::EPERM,
        "ENOSYS" => libc::ENOSYS,
        other => panic!("unknown mode {other}"),
    };
    let filter: BpfProgram = SeccompFilter::new(
        [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        std::env::consts::ARCH
            .try_into()
            .expect("a seccomp target arch"),
    )
    .expect("a seccomp filter")
    .try_into()
    .expect("a BPF program");
    seccompiler::apply_filter(&filter).expect("installing the seccomp filter");

    let start = Instant::now();
    let err = IoUring::probe().expect_err("io_uring_setup is denied");
    let took: Duration = start.elapsed();
    println!("variant={err:?}");
    println!("message={err}");
    println!("probe_ms={}", took.as_secs_f64() * 1e3);

    let io = IoUring::new().expect_err("io_uring_setup is denied");
    println!("new_kind={:?}", io.kind());
    let typed = io.get_ref().and_then(|e| e.downcast_ref::<UringError>());
    println!("new_downcast={typed:?}");

    let auto = AnyBackend::with_choice(Choice::Auto).expect("auto falls back");
    println!("auto_kind={}", auto.kind());
    println!("auto_fallback={}", auto.fallbacks().join("; "));

    let explicit = AnyBackend::with_choice(Choice::Only(BackendKind::IoUring))
        .expect_err("an explicit io-uring must not fall back");
    println!("explicit={explicit}");
}
