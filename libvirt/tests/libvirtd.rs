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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vireo_backends::{AnyBackend, BackendKind, Choice};

const PACKAGES: &str = "libvirt-daemon libvirt-clients libvirt-dev python3-libvirt";
const INTERVAL_S: u64 = 1;
const COUNT: u64 = 3;

/// The scenarios run one at a time: the keepalive bound is about time, and a 2-core machine
/// running eight daemons and clients at once measures the scheduler instead.
static SERIAL: Mutex<()> = Mutex::new(());

/// Whether everything is here; without it the test is skipped (or fails when required).
fn libvirt_ready() -> bool {
    let mut missing = Vec::new();
    for path in [
        "/usr/sbin/libvirtd",
        "/usr/bin/virsh",
        "/usr/include/libvirt/libvirt.h",
        "/usr/bin/python3",
    ] {
        if !Path::new(path).exists() {
            missing.push(path.to_owned());
        }
    }
    if vireo_libvirt::Libvirt::load().is_err() {
        missing.push(vireo_libvirt::LIBVIRT_SONAME.to_owned());
    }
    let python = Command::new("/usr/bin/python3")
        .args(["-c", "import libvirt"])
        .output();
    if !python.is_ok_and(|o| o.status.success()) {
        missing.push("python3-libvirt (import libvirt)".to_owned());
    }
    if Command::new("cc").arg("--version").output().is_err() {
        missing.push("a C compiler (cc)".to_owned());
    }
    if is_root() && Command::new("setpriv").arg("--version").output().is_err() {
        missing.push("setpriv".to_owned());
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "libvirt tests need {} (Debian packages: {PACKAGES}); missing: {}",
        "libvirt, a C compiler and python3-libvirt",
        missing.join(", ")
    );
    if std::env::var("VIREO_REQUIRE_LIBVIRT").as_deref() == Ok("1") {
        panic!("{why} (VIREO_REQUIRE_LIBVIRT=1)");
    }
    eprintln!("skipped: {why}");
    false
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The uid the daemon runs as when the tests run as root (libvirtd's system mode refuses to
/// start here, so it runs as a session daemon of an unprivileged user).
const NOBODY: &str = "65534";

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

/// A session libvirtd with the test driver, in a directory of its own.
struct Daemon {
    dir: PathBuf,
    child: Child,
    pid: i32,
    uri: String,
}

impl Daemon {
    fn start() -> Daemon {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vireo-libvirtd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "run", "config", "cache"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let env = [
            ("HOME", dir.join("home")),
            ("XDG_RUNTIME_DIR", dir.join("run")),
            ("XDG_CONFIG_HOME", dir.join("config")),
            ("XDG_CACHE_HOME", dir.join("cache")),
        ];
        let log = std::fs::File::create(dir.join("libvirtd.log")).unwrap();
        let mut cmd = if is_root() {
            run(Command::new("chown")
                .args(["-R", &format!("{NOBODY}:{NOBODY}")])
                .arg(&dir));
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "env",
                "-i",
            ]);
            for (k, v) in &env {
                c.arg(format!("{k}={}", v.display()));
            }
            c.arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin");
            c
        } else {
            let mut c = Command::new("env");
            c.arg("-i");
            for (k, v) in &env {
                c.arg(format!("{k}={}", v.display()));
            }
            c.arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin");
            c
        };
        std::fs::set_permissions(
            dir.join("run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        // Bounded: the daemon goes by itself if a test dies before its drop.
        cmd.args(["timeout", "300", "/usr/sbin/libvirtd"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("start libvirtd");
        let socket = dir.join("run/libvirt/libvirt-sock");
        let pidfile = dir.join("run/libvirt/libvirtd.pid");
        let started = Instant::now();
        let pid = loop {
            // No signal to wait on: the daemon says it is up by creating these files.
            let pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let (Some(pid), true) = (pid, socket.exists()) {
                break pid;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "libvirtd did not start: {}",
                std::fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let uri = format!("test+unix:///default?socket={}", socket.display());
        Daemon {
            dir,
            child,
            pid,
            uri,
        }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid).expect("positive pid");
        rustix::process::kill_process(pid, sig).expect("signal libvirtd");
    }

    /// One virsh connection running `commands` (separated by `;`).
    fn virsh(&self, commands: &str) {
        run(Command::new("timeout")
            .args(["60", "virsh", "-q", "-c", &self.uri, commands])
            .current_dir(&self.dir));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    fn start(client: Client, backend: BackendKind, daemon: &Daemon) -> Running {
        let args = [
            daemon.uri.clone(),
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
        let daemon = Daemon::start();
        let mut c = Running::start(client, backend, &daemon);
        let xml = daemon.dir.join("transient.xml");
        std::fs::write(&xml, TRANSIENT).unwrap();
        daemon.virsh(&format!(
            "destroy test; start test; suspend test; resume test; create {}; destroy vireo-transient",
            xml.display()
        ));
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
        daemon.signal(rustix::process::Signal::KILL);
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
        let daemon = Daemon::start();
        let mut c = Running::start(client, backend, &daemon);
        daemon.signal(rustix::process::Signal::STOP);
        let frozen = Instant::now();
        let bound = Duration::from_secs(INTERVAL_S * COUNT + 2);
        let line = c.next(bound + Duration::from_secs(10));
        let took = frozen.elapsed();
        assert_eq!(line, "close 2 1", "{}", c.what);
        assert!(took <= bound, "{}: keepalive close after {took:?}", c.what);
        assert_eq!(c.next(Duration::from_secs(30)), "done", "{}", c.what);
        c.finish();
        daemon.signal(rustix::process::Signal::CONT);
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
