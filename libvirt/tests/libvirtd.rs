//! A real libvirt client on vireo's loop, against a real libvirtd (the test driver, a session
//! daemon started here in a temporary directory), on every backend: libvirt's own C client
//! (`examples/events.c`, built here with the system compiler against libvirt-dev) and
//! python-libvirt (`examples/events.py` on /usr/bin/python3).
//!
//! - A second connection (virsh) destroys, starts, suspends and resumes the `test` domain and
//!   creates and destroys a transient one: every lifecycle event arrives, in order, on vireo's
//!   loop thread.
//! - Killing the daemon delivers the close callback with reason EOF (1) on the loop thread.
//! - Freezing it (SIGSTOP) delivers the keepalive close (reason 2) within interval x count +
//!   2 s (keepalive 1 s x 3 here).
//!
//! Needs libvirt (Debian: libvirt-daemon libvirt-clients libvirt-dev python3-libvirt), a C
//! compiler and setpriv (util-linux) when run as root; skipped with a message without them,
//! failed instead when VIREO_REQUIRE_LIBVIRT=1.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vireo_backends::{AnyBackend, BackendKind, Choice};

use vireo_libvirt::testing::{self, SessionDaemon};

const INTERVAL_S: u64 = 1;
const COUNT: u64 = 3;

/// The scenarios run one at a time: the keepalive bound is about time, and a 2-core machine
/// running eight daemons and clients at once measures the scheduler instead.
static SERIAL: Mutex<()> = Mutex::new(());

/// Whether everything is here; without it the test is skipped (or fails when required).
fn libvirt_ready() -> bool {
    let mut missing: Vec<String> = testing::missing(&["cc"]).into_iter().collect();
    if !Path::new("/usr/include/libvirt/libvirt.h").exists() {
        missing.push("/usr/include/libvirt/libvirt.h".into());
    }
    let python = Command::new("/usr/bin/python3")
        .args(["-c", "import libvirt"])
        .output();
    if !python.is_ok_and(|o| o.status.success()) {
        missing.push("python3-libvirt (import libvirt)".into());
    }
    testing::ready_or_skip(
        "the real-libvirtd tests",
        (!missing.is_empty()).then(|| missing.join(", ")),
    )
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn start_daemon() -> SessionDaemon {
    SessionDaemon::start("").unwrap_or_else(|e| panic!("{e}"))
}

/// Where the cdylib is: beside this test binary (target/*/deps), or one folder up.
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let so = dir.join("libvireo_libvirt.so");
        if so.exists() {
            return so;
        }
    }
    panic!("libvireo_libvirt.so not found near {}", exe.display());
}

/// The C client, built once per test process.
fn c_client() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let so = cdylib();
        let so_dir = so.parent().unwrap();
        let out = std::env::temp_dir().join(format!("vireo-libvirt-events-{}", std::process::id()));
        run(Command::new("cc")
            .arg("-Wall")
            .arg("-Werror")
            .arg("-o")
            .arg(&out)
            .arg(manifest.join("examples/events.c"))
            .arg("-I")
            .arg(manifest.join("include"))
            .arg("-L")
            .arg(so_dir)
            .arg(format!("-Wl,-rpath,{}", so_dir.display()))
            .args(["-lvireo_libvirt", "-lvirt"]));
        out
    })
}

#[derive(Clone, Copy, Debug)]
enum Client {
    C,
    Python,
}

/// A running client; its lines arrive on `lines`.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Running {
    fn start(client: Client, backend: BackendKind, daemon: &SessionDaemon) -> Running {
        let args = [
            daemon.uri().to_owned(),
            INTERVAL_S.to_string(),
            COUNT.to_string(),
        ];
        let mut cmd = match client {
            Client::C => Command::new(c_client()),
            Client::Python => {
                let mut c = Command::new("/usr/bin/python3");
                c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/events.py"))
                    .env("VIREO_LIBVIRT_SO", cdylib());
                c
            }
        };
        cmd.args(&args)
            .env("VIREO_BACKEND", backend.name())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start the client");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut me = Running {
            child,
            stdin,
            lines,
            what: format!("{client:?} client on {backend}"),
        };
        assert_eq!(
            me.next(Duration::from_secs(30)),
            format!("backend {backend}")
        );
        assert_eq!(me.next(Duration::from_secs(30)), "ready");
        me
    }

    fn next(&mut self, within: Duration) -> String {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("{}: no line within {within:?}", self.what))
    }

    /// Ends the client (end of input) and checks it exits cleanly.
    fn finish(mut self) {
        drop(self.stdin.take());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{}: {status}", self.what);
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{}: did not exit",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backends() -> Vec<BackendKind> {
    BackendKind::compiled()
        .into_iter()
        .filter(|&k| match AnyBackend::with_choice(Choice::Only(k)) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("{k} cannot start here, not tested: {e}");
                false
            }
        })
        .collect()
}

const TRANSIENT: &str = "<domain type='test'><name>vireo-transient</name><memory>8192</memory>\
                         <vcpu>1</vcpu><os><type>hvm</type></os></domain>";

/// Every event of a second connection's changes, in order, on the loop thread; then the
/// daemon is killed and the close callback says EOF, on the loop thread.
fn events_then_eof(client: Client) {
    if !libvirt_ready() {
        return;
    }
    for backend in backends() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let daemon = start_daemon();
        let mut c = Running::start(client, backend, &daemon);
        let xml = daemon.dir().join("transient.xml");
        std::fs::write(&xml, TRANSIENT).unwrap();
        daemon
            .virsh(&format!(
                "destroy test; start test; suspend test; resume test; create {}; destroy vireo-transient",
                xml.display()
            ))
            .unwrap();
        // Event and detail numbers are libvirt's (virDomainEventType and its details).
        for expected in [
            "event test stopped 1 1",
            "event test started 0 1",
            "event test suspended 0 1",
            "event test resumed 0 1",
            "event vireo-transient started 0 1",
            "event vireo-transient stopped 1 1",
        ] {
            assert_eq!(c.next(Duration::from_secs(30)), expected, "{}", c.what);
        }
        daemon.signal(rustix::process::Signal::KILL).unwrap();
        assert_eq!(c.next(Duration::from_secs(30)), "close 1 1", "{}", c.what);
        assert_eq!(c.next(Duration::from_secs(30)), "done", "{}", c.what);
        c.finish();
    }
}

/// A frozen daemon: the keepalive closes the connection (reason 2) within interval x count +
/// 2 s, on the loop thread.
fn keepalive_closes_a_frozen_daemon(client: Client) {
    if !libvirt_ready() {
        return;
    }
    for backend in backends() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let daemon = start_daemon();
        let mut c = Running::start(client, backend, &daemon);
        daemon.signal(rustix::process::Signal::STOP).unwrap();
        let frozen = Instant::now();
        let bound = Duration::from_secs(INTERVAL_S * COUNT + 2);
        let line = c.next(bound + Duration::from_secs(10));
        let took = frozen.elapsed();
        assert_eq!(line, "close 2 1", "{}", c.what);
        assert!(took <= bound, "{}: keepalive close after {took:?}", c.what);
        assert_eq!(c.next(Duration::from_secs(30)), "done", "{}", c.what);
        c.finish();
        daemon.signal(rustix::process::Signal::CONT).unwrap();
    }
}

#[test]
fn c_client_gets_every_domain_event_and_eof_on_every_backend() {
    events_then_eof(Client::C);
}

#[test]
fn python_client_gets_every_domain_event_and_eof_on_every_backend() {
    events_then_eof(Client::Python);
}

#[test]
fn c_client_keepalive_closes_a_frozen_daemon_on_every_backend() {
    keepalive_closes_a_frozen_daemon(Client::C);
}

#[test]
fn python_client_keepalive_closes_a_frozen_daemon_on_every_backend() {
    keepalive_closes_a_frozen_daemon(Client::Python);
}
