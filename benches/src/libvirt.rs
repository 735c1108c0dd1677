//! libvirt's client on vireo (each backend) beside libvirt's default event loop
//! (`virEventRegisterDefaultImpl` and a thread running `virEventRunDefaultImpl`), against a
//! real libvirtd (test driver): N connections subscribed to domain lifecycle events while
//! another connection suspends and resumes the domain.
//!
//! An event implementation is registered once per process, so every (system, connections)
//! point runs in a process of its own: `vireo-bench libvirt-client`, whose one JSON line the
//! report collects. Measured there: events delivered per second, latency from the driver's
//! call returning to the callback (an event that overtakes the reply counts as 0), the loop
//! thread's CPU per event (read on the loop thread itself, through a 0 ms timeout), and the
//! loop thread's CPU per second while the connections sit idle with keepalive on (1 s x 3).

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::io;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::report::{Chart, Report, Target};

/// What `vireo-bench libvirt` runs.
#[derive(Debug, Clone)]
pub struct LibvirtOptions {
    /// Subscribed connections per point.
    pub connections: Vec<usize>,
    /// Seconds of suspend/resume per point.
    pub seconds: f64,
    /// Seconds of idle keepalive traffic per point.
    pub idle_seconds: f64,
    /// Systems (`vireo-BACKEND`, `libvirt-default`); all when empty.
    pub systems: Vec<String>,
}

impl Default for LibvirtOptions {
    fn default() -> Self {
        LibvirtOptions {
            connections: vec![1, 100, 1000],
            seconds: 3.0,
            idle_seconds: 3.0,
            systems: Vec::new(),
        }
    }
}

/// The default implementation's name in the tables.
pub const DEFAULT: &str = "libvirt-default";

/// vireo on each backend that starts here, then libvirt's default loop.
pub fn systems() -> Vec<String> {
    crate::report::systems_with(&[DEFAULT])
}

type Ptr = *mut c_void;
type TimeoutCb = unsafe extern "C" fn(c_int, Ptr);
type FreeCb = unsafe extern "C" fn(Ptr);
type LifecycleCb = unsafe extern "C" fn(Ptr, Ptr, c_int, c_int, Ptr) -> c_int;

/// The part of libvirt's client API the benchmark calls, found with `dlsym`.
struct Api {
    open: unsafe extern "C" fn(*const c_char) -> Ptr,
    set_keepalive: unsafe extern "C" fn(Ptr, c_int, c_uint) -> c_int,
    register_any: unsafe extern "C" fn(Ptr, Ptr, c_int, LifecycleCb, Ptr, Option<FreeCb>) -> c_int,
    lookup: unsafe extern "C" fn(Ptr, *const c_char) -> Ptr,
    suspend: unsafe extern "C" fn(Ptr) -> c_int,
    resume: unsafe extern "C" fn(Ptr) -> c_int,
    register_default: unsafe extern "C" fn() -> c_int,
    run_default: unsafe extern "C" fn() -> c_int,
    add_timeout: unsafe extern "C" fn(c_int, TimeoutCb, Ptr, Option<FreeCb>) -> c_int,
    remove_timeout: unsafe extern "C" fn(c_int) -> c_int,
}

fn api() -> io::Result<&'static Api> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        // SAFETY: loading libvirt runs its constructors, which touch only libvirt's globals.
        let lib = unsafe { libloading::Library::new(vireo_libvirt::LIBVIRT_SONAME) }
            .map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: each symbol is the libvirt function of that name, whose C type is
                // the field's (libvirt-host.h, libvirt-domain.h, libvirt-event.h); the library
                // is leaked below, so the pointers stay valid for the process.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{}: {e}", $name))?
            };
        }
        let api = Api {
            open: sym!("virConnectOpen"),
            set_keepalive: sym!("virConnectSetKeepAlive"),
            register_any: sym!("virConnectDomainEventRegisterAny"),
            lookup: sym!("virDomainLookupByName"),
            suspend: sym!("virDomainSuspend"),
            resume: sym!("virDomainResume"),
            register_default: sym!("virEventRegisterDefaultImpl"),
            run_default: sym!("virEventRunDefaultImpl"),
            add_timeout: sym!("virEventAddTimeout"),
            remove_timeout: sym!("virEventRemoveTimeout"),
        };
        std::mem::forget(lib);
        Ok(api)
    })
    .as_ref()
    .map_err(|e| io::Error::other(e.clone()))
}

/// What the callbacks share with the driver (one per process).
struct Shared {
    /// Event arrival times of the running round.
    arrivals: Mutex<Vec<Instant>>,
    arrived: Condvar,
    /// The loop thread's CPU time, read on it by [`probe_cpu`].
    cpu: Mutex<Option<Duration>>,
    cpu_read: Condvar,
}

static SHARED: Shared = Shared {
    arrivals: Mutex::new(Vec::new()),
    arrived: Condvar::new(),
    cpu: Mutex::new(None),
    cpu_read: Condvar::new(),
};

unsafe extern "C" fn on_lifecycle(_: Ptr, _: Ptr, _: c_int, _: c_int, _: Ptr) -> c_int {
    let now = Instant::now();
    let mut a = SHARED.arrivals.lock().unwrap_or_else(|e| e.into_inner());
    a.push(now);
    SHARED.arrived.notify_all();
    0
}

unsafe extern "C" fn read_cpu(timer: c_int, _: Ptr) {
    let cpu = crate::report::thread_cpu();
    // SAFETY: libvirt's public wrapper around the registered implementation's remove.
    unsafe { (api().expect("loaded").remove_timeout)(timer) };
    *SHARED.cpu.lock().unwrap_or_else(|e| e.into_inner()) = Some(cpu);
    SHARED.cpu_read.notify_all();
}

/// The loop thread's CPU time so far, read on the loop thread.
fn probe_cpu(api: &Api) -> io::Result<Duration> {
    *SHARED.cpu.lock().unwrap_or_else(|e| e.into_inner()) = None;
    // SAFETY: libvirt's public virEventAddTimeout with a callback of the right type.
    if unsafe { (api.add_timeout)(0, read_cpu, std::ptr::null_mut(), None) } < 0 {
        return Err(io::Error::other("virEventAddTimeout failed"));
    }
    let guard = SHARED.cpu.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, timeout) = SHARED
        .cpu_read
        .wait_timeout_while(guard, Duration::from_secs(30), |c| c.is_none())
        .unwrap_or_else(|e| e.into_inner());
    if timeout.timed_out() {
        return Err(io::Error::other("the loop did not run the CPU probe"));
    }
    Ok(guard.expect("read"))
}

/// Waits until `count` events of the running round arrived; returns their times.
fn wait_events(count: usize) -> io::Result<Vec<Instant>> {
    let guard = SHARED.arrivals.lock().unwrap_or_else(|e| e.into_inner());
    let (mut guard, timeout) = SHARED
        .arrived
        .wait_timeout_while(guard, Duration::from_secs(60), |a| a.len() < count)
        .unwrap_or_else(|e| e.into_inner());
    if timeout.timed_out() {
        return Err(io::Error::other(format!(
            "{} of {count} events in 60 s",
            guard.len()
        )));
    }
    Ok(std::mem::take(&mut *guard))
}

/// The client side of one point (`vireo-bench libvirt-client`): prints one JSON line.
///
/// # Errors
///
/// libvirt missing, a connection refused, or events that do not arrive.
pub fn client(
    system: &str,
    uri: &str,
    connections: usize,
    seconds: f64,
    idle: f64,
) -> io::Result<String> {
    crate::pipes::raise_fd_limit(connections as u64 + 256);
    let api = api()?;
    if system == DEFAULT {
        // SAFETY: libvirt's own default loop, registered once in this process.
        if unsafe { (api.register_default)() } < 0 {
            return Err(io::Error::other("virEventRegisterDefaultImpl failed"));
        }
        std::thread::Builder::new()
            .name("libvirt-default".into())
            .spawn(move || {
                loop {
                    // SAFETY: runs one iteration of the default loop registered above.
                    if unsafe { (api.run_default)() } < 0 {
                        break;
                    }
                }
            })?;
    } else {
        let kind = system
            .strip_prefix("vireo-")
            .ok_or_else(|| io::Error::other(format!("unknown system {system}")))?
            .parse()?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("vireo-loop".into())
            .spawn(move || {
                let made =
                    vireo_backends::AnyBackend::with_choice(vireo_backends::Choice::Only(kind))
                        .and_then(vireo_core::EventLoop::with_backend);
                match made {
                    Ok(mut lp) => {
                        let _ = tx.send(Ok(lp.handle().clone()));
                        let _ = lp.run();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let handle = rx
            .recv()
            .map_err(|_| io::Error::other("the loop thread died"))??;
        vireo_libvirt::register(&handle).map_err(io::Error::other)?;
    }
    let uri_c = CString::new(uri).map_err(io::Error::other)?;
    let open = || -> io::Result<Ptr> {
        // SAFETY: virConnectOpen with a NUL-terminated URI.
        let c = unsafe { (api.open)(uri_c.as_ptr()) };
        if c.is_null() {
            Err(io::Error::other(format!("cannot connect to {uri}")))
        } else {
            Ok(c)
        }
    };
    let driver = open()?;
    for _ in 0..connections {
        let c = open()?;
        // SAFETY: a live connection; keepalive 1 s x 3 and the lifecycle callback (event 0)
        // with the right signature, no opaque.
        unsafe {
            if (api.set_keepalive)(c, 1, 3) < 0 {
                return Err(io::Error::other("virConnectSetKeepAlive failed"));
            }
            if (api.register_any)(
                c,
                std::ptr::null_mut(),
                0,
                on_lifecycle,
                std::ptr::null_mut(),
                None,
            ) < 0
            {
                return Err(io::Error::other("virConnectDomainEventRegisterAny failed"));
            }
        }
    }
    // SAFETY: the driver connection is live; "test" is the test driver's domain.
    let dom = unsafe { (api.lookup)(driver, c"test".as_ptr()) };
    if dom.is_null() {
        return Err(io::Error::other("no domain named test"));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    // Warm-up: one suspend and resume, not counted.
    round(api, dom, true, connections, &mut latency)?;
    round(api, dom, false, connections, &mut latency)?;
    latency.reset();
    let cpu0 = probe_cpu(api)?;
    let started = Instant::now();
    let mut events = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        round(api, dom, true, connections, &mut latency)?;
        round(api, dom, false, connections, &mut latency)?;
        events += 2 * connections as u64;
    }
    let elapsed = started.elapsed();
    let cpu1 = probe_cpu(api)?;
    let idle_started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(idle));
    let cpu2 = probe_cpu(api)?;
    let idle_elapsed = idle_started.elapsed().as_secs_f64();
    let busy = cpu1.saturating_sub(cpu0);
    Ok(serde_json::json!({
        "bench": "libvirt",
        "system": system,
        "connections": connections,
        "events": events,
        "seconds": elapsed.as_secs_f64(),
        "events_per_s": events as f64 / elapsed.as_secs_f64(),
        "latency_p50_us": latency.value_at_quantile(0.5),
        "latency_p99_us": latency.value_at_quantile(0.99),
        "loop_cpu_us_per_event": busy.as_secs_f64() * 1e6 / events.max(1) as f64,
        "idle_loop_cpu_ms_per_s": cpu2.saturating_sub(cpu1).as_secs_f64() * 1e3 / idle_elapsed,
    })
    .to_string())
}

/// Suspends (or resumes) the domain and waits for every subscriber's event, recording each
/// one's latency from the call's return.
fn round(
    api: &Api,
    dom: Ptr,
    suspend: bool,
    connections: usize,
    latency: &mut Histogram<u64>,
) -> io::Result<()> {
    // SAFETY: a live domain handle.
    let rc = unsafe {
        if suspend {
            (api.suspend)(dom)
        } else {
            (api.resume)(dom)
        }
    };
    let returned = Instant::now();
    if rc < 0 {
        return Err(io::Error::other("virDomainSuspend/Resume failed"));
    }
    for t in wait_events(connections)? {
        let us = t.saturating_duration_since(returned).as_micros() as u64;
        latency.saturating_record(us.max(1));
    }
    Ok(())
}

/// One point's figures, from its client's JSON.
#[derive(Debug, Clone)]
struct Point {
    events_per_s: f64,
    p50: f64,
    p99: f64,
    cpu: f64,
    idle: f64,
}

fn point(json: &str) -> io::Result<Point> {
    let v: serde_json::Value = serde_json::from_str(json.trim()).map_err(io::Error::other)?;
    let f = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| io::Error::other(format!("no {k} in {json}")))
    };
    Ok(Point {
        events_per_s: f("events_per_s")?,
        p50: f("latency_p50_us")?,
        p99: f("latency_p99_us")?,
        cpu: f("loop_cpu_us_per_event")?,
        idle: f("idle_loop_cpu_ms_per_s")?,
    })
}

/// Runs every point, each client in a process of its own (`exe libvirt-client ...`).
///
/// # Errors
///
/// libvirt or libvirtd missing (the message names the packages), or a point that fails.
pub fn report(
    exe: &std::path::Path,
    opts: &LibvirtOptions,
    mut progress: impl FnMut(&str),
) -> io::Result<Report> {
    use vireo_libvirt::testing;
    if let Some(missing) = testing::missing(&[]) {
        return Err(io::Error::other(format!(
            "vireo-bench libvirt needs libvirt (Debian packages: {}); missing: {missing}",
            testing::PACKAGES
        )));
    }
    let chosen = crate::report::choose(&systems(), &opts.systems)?;
    // The daemon inherits this limit: 1,000 clients need more than the usual 1,024 fds.
    let most = opts.connections.iter().copied().max().unwrap_or(0);
    crate::pipes::raise_fd_limit(most as u64 + 512);
    let mut rep = Report {
        bench: "libvirt".into(),
        intro: vec![format!(
            "vireo-bench libvirt: libvirt's client on each event loop against a real libvirtd \
             (test driver): N connections subscribed to lifecycle events while another \
             suspends and resumes the domain for {} s; latency from the driver's call \
             returning to the callback; loop CPU measured on the loop thread; idle = {} s with \
             keepalive 1 s x 3 on every connection",
            opts.seconds, opts.idle_seconds
        )],
        columns: [
            "connections",
            "system",
            "events/s",
            "x default",
            "p50 us",
            "p99 us",
            "loop cpu us/event",
            "default / this",
            "idle cpu ms/s",
        ]
        .map(String::from)
        .to_vec(),
        ..Report::default()
    };
    let mut chart = Chart {
        name: "libvirt-cpu".into(),
        title: "libvirt client: loop-thread CPU per event (lower is better)".into(),
        y_label: "microseconds".into(),
        groups: Vec::new(),
    };
    let mut worst_at: Vec<(usize, f64)> = Vec::new();
    for &n in &opts.connections {
        let daemon =
            testing::SessionDaemon::start("max_clients = 5000\nmax_anonymous_clients = 5000\n")
                .map_err(io::Error::other)?;
        let mut row: Vec<(String, Point)> = Vec::new();
        for name in &chosen {
            progress(&format!("{name}: {n} connections"));
            let out = std::process::Command::new("timeout")
                .arg("300")
                .arg(exe)
                .args(["libvirt-client", "--system", name, "--uri", daemon.uri()])
                .args(["--connections", &n.to_string()])
                .args(["--seconds", &opts.seconds.to_string()])
                .args(["--idle-seconds", &opts.idle_seconds.to_string()])
                .output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "{name} with {n} connections: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            let json = String::from_utf8_lossy(&out.stdout).to_string();
            rep.json
                .push(serde_json::from_str(json.trim()).map_err(io::Error::other)?);
            row.push((name.clone(), point(&json)?));
        }
        let base = row.iter().find(|r| r.0 == DEFAULT).map(|r| r.1.clone());
        let mut bars = Vec::new();
        for (name, p) in &row {
            let (x_rate, x_cpu) = base.as_ref().map_or((f64::NAN, f64::NAN), |b| {
                (p.events_per_s / b.events_per_s, b.cpu / p.cpu)
            });
            if name != DEFAULT {
                match worst_at.iter_mut().find(|w| w.0 == n) {
                    Some(w) => w.1 = w.1.min(x_cpu),
                    None => worst_at.push((n, x_cpu)),
                }
            }
            rep.rows.push(vec![
                n.to_string(),
                name.clone(),
                format!("{:.0}", p.events_per_s),
                format!("{x_rate:.2}"),
                format!("{:.0}", p.p50),
                format!("{:.0}", p.p99),
                format!("{:.2}", p.cpu),
                format!("{x_cpu:.2}"),
                format!("{:.2}", p.idle),
            ]);
            bars.push((name.clone(), p.cpu));
        }
        chart.groups.push((format!("{n} connections"), bars));
    }
    for (n, factor) in worst_at {
        let (limit, what) = if n >= 1000 {
            (
                3.0,
                format!(
                    "at {n} connections: loop CPU per event >= 3x less than libvirt's default loop"
                ),
            )
        } else if n == 1 {
            (
                1.0,
                format!(
                    "at {n} connection: loop CPU per event no worse than libvirt's default loop"
                ),
            )
        } else {
            continue;
        };
        rep.targets.push(Target {
            what,
            measured: format!("worst vireo backend {factor:.2}x less"),
            met: factor >= limit,
        });
    }
    rep.charts.push(chart);
    Ok(rep)
}
