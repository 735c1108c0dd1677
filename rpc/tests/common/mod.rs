//! Shared helpers of the server tests: a server per backend, raw connections, checks.
#![allow(dead_code, unreachable_pub)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vireo_backends::{AnyBackend, BackendKind, Choice};
use vireo_rpc::admin::AdminClient;
use vireo_rpc::client::Client;
use vireo_rpc::server::{
    Daemon, DaemonConfig, DaemonSummary, ListenAddr, Server, ServerConfig, ServerSummary,
    ShutdownHandle,
};

/// How long any wait in these tests may take before it counts as a failure.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The compiled backends that can start here. One that cannot is skipped with its reason,
/// unless `VIREO_REQUIRE_BACKENDS` names it: then the test fails.
pub fn backends() -> Vec<BackendKind> {
    BackendKind::compiled()
        .into_iter()
        .filter(|&kind| {
            if vireo_conformance::is_skipped(kind.name()) {
                eprintln!("skipping backend {kind}: {}", vireo_conformance::SKIP_ENV);
                return false;
            }
            true
        })
        .filter(|&kind| match AnyBackend::with_choice(Choice::Only(kind)) {
            Ok(_) => true,
            Err(e) => {
                assert!(
                    !vireo_conformance::is_required(kind.name()),
                    "backend {kind} is required but cannot start: {e}"
                );
                eprintln!("skipping backend {kind}: {e}");
                false
            }
        })
        .collect()
}

/// A server running on its own thread, on a Unix socket in a temporary directory, with an
/// admin socket beside it; stopped and joined on drop.
pub struct TestServer {
    pub addr: ListenAddr,
    pub addrs: Vec<ListenAddr>,
    pub admin: std::path::PathBuf,
    pub kind: BackendKind,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<ServerSummary>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn start(kind: BackendKind, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let admin = dir.path().join("rpc-admin.sock");
        let daemon = DaemonConfig {
            backend: Choice::Only(kind),
            admin: Some(admin.clone()),
            ..DaemonConfig::default()
        };
        let mut config = ServerConfig {
            listen: vec![ListenAddr::Unix(dir.path().join("rpc.sock"))],
            min_workers: 2,
            max_workers: 4,
            prio_workers: 1,
            ..ServerConfig::default()
        };
        tweak(&mut config);
        let server = Server::bind_with(daemon, config).expect("server starts");
        let addrs = server.local_addrs().to_vec();
        let addr = addrs[0].clone();
        let stop = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        TestServer {
            addr,
            addrs,
            admin,
            kind,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn client(&self) -> Client {
        let mut c = Client::connect(&self.addr).expect("connect");
        c.set_timeout(Some(PATIENCE)).unwrap();
        c
    }

    /// A connection to the admin socket (libvirt's admin program).
    pub fn admin(&self) -> AdminClient {
        AdminClient::connect(&self.admin).expect("admin connect")
    }

    /// Sets the pool's limits through the admin socket, as `virt-admin srv-threadpool-set`.
    pub fn set_limits(
        &self,
        min: Option<u32>,
        max: Option<u32>,
        prio: Option<u32>,
    ) -> io::Result<()> {
        self.admin()
            .set_threadpool_parameters("vireo", min, max, prio)
    }

    /// A raw connection for sending bytes that break the protocol.
    pub fn raw(&self) -> UnixStream {
        let ListenAddr::Unix(path) = &self.addr else {
            unreachable!("test servers listen on Unix sockets")
        };
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s
    }

    /// Checks that a well-behaved client on a new connection is served.
    #[track_caller]
    pub fn assert_serves(&self) {
        let mut c = self.client();
        assert_eq!(
            c.echo(b"still here")
                .expect("a well-behaved client is served"),
            b"still here",
            "backend {}",
            self.kind
        );
    }

    /// Stops the server and returns what it did.
    pub fn stop(mut self) -> ServerSummary {
        self.stop.shutdown();
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("server thread")
            .expect("server runs")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.shutdown();
            let _ = t.join();
        }
    }
}

/// Reads until the peer closes (Ok) or PATIENCE passes (Err); data read is discarded.
pub fn wait_closed(s: &mut UnixStream) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Err("not closed".into());
            }
            Err(e) => return Err(e.to_string()),
        }
        if Instant::now() > deadline {
            return Err("still sending, not closed".into());
        }
    }
}

/// Sends raw bytes, ignoring a reset (the server may close first).
pub fn send(s: &mut UnixStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

/// Polls `check` until it holds or PATIENCE passes.
#[track_caller]
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server's client count, from STATS.
pub fn clients_of(server: &TestServer) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&server.client().stats().expect("stats")).unwrap();
    // The connection asking counts itself.
    stats["clients"].as_u64().unwrap() - 1
}

/// Reads one whole frame from a blocking socket (EINTR retried); panics when the peer closes.
#[track_caller]
pub fn read_frame(s: &mut UnixStream) -> vireo_rpc::proto::Frame {
    let mut reader = vireo_rpc::proto::FrameReader::new(vireo_rpc::proto::MAX_MESSAGE);
    loop {
        if let Some(f) = reader.next_frame().expect("a valid frame") {
            return f;
        }
        match reader.read_from(s) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// `field : value` lines (virt-admin's and `vireo-rpc admin`'s output), trimmed, in order.
pub fn fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The stdout of a command that must have succeeded (`what` names it in the failure).
#[track_caller]
pub fn stdout_of(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A daemon of named servers running on its own thread, with an admin socket, in a temporary
/// directory.
pub struct TestDaemon {
    /// Each server's addresses, in the order given.
    pub addrs: Vec<Vec<ListenAddr>>,
    pub admin: std::path::PathBuf,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<DaemonSummary>>>,
    _dir: tempfile::TempDir,
}

impl TestDaemon {
    /// One server per config, each listening on a Unix socket of its own (set here).
    pub fn start(backend: Choice, timeout: Option<Duration>, servers: Vec<ServerConfig>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let admin = dir.path().join("admin.sock");
        let mut daemon = Daemon::new(DaemonConfig {
            backend,
            admin: Some(admin.clone()),
            timeout,
            ..DaemonConfig::default()
        })
        .expect("daemon starts");
        let mut addrs = Vec::new();
        for (i, mut config) in servers.into_iter().enumerate() {
            config.listen = vec![ListenAddr::Unix(dir.path().join(format!("s{i}.sock")))];
            addrs.push(daemon.add_server(config).expect("server starts").to_vec());
        }
        let stop = daemon.shutdown_handle();
        let thread = Some(std::thread::spawn(move || daemon.run()));
        TestDaemon {
            addrs,
            admin,
            stop,
            thread,
            _dir: dir,
        }
    }

    /// A client of server `server`.
    pub fn client(&self, server: usize) -> Client {
        let mut c = Client::connect(&self.addrs[server][0]).expect("connect");
        c.set_timeout(Some(PATIENCE)).unwrap();
        c
    }

    /// Whether `run` returned (the daemon timeout, say).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for `run` to return by itself, and returns what the daemon did.
    pub fn join(mut self) -> DaemonSummary {
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("daemon thread")
            .expect("daemon runs")
    }

    /// Stops the daemon and returns what it did.
    pub fn stop(self) -> DaemonSummary {
        self.stop.shutdown();
        self.join()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.shutdown();
            let _ = thread.join();
        }
    }
}
