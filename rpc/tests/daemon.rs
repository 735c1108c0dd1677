//! `vireo-rpcd` as a process: running out of file descriptors, and SIGTERM under load. Every
//! test runs on every compiled backend.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::{PATIENCE, backends};
use vireo_rpc::client::Client;
use vireo_rpc::proto::Procedure;
use vireo_rpc::server::ListenAddr;

/// Starts the daemon and waits for its "listening" line.
fn daemon(
    kind: vireo_backends::BackendKind,
    dir: &Path,
    fd_limit: Option<u64>,
    extra: &[&str],
) -> (Child, BufReader<ChildStdout>, ListenAddr) {
    let sock = dir.join("d.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vireo-rpcd"));
    cmd.arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(["--backend", kind.name()])
        // Small pools, unless the test sets the workers itself.
        .args(if extra.contains(&"--max-workers") {
            &[][..]
        } else {
            &["--min-workers", "2", "--prio-workers", "1"][..]
        })
        .args(extra)
        .env("VIREO_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(limit) = fd_limit {
        let pre_exec = move || {
            use rustix::process::{Resource, Rlimit, setrlimit};
            let l = Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            };
            setrlimit(Resource::Nofile, l).map_err(std::io::Error::from)
        };
        // SAFETY: the closure runs in the forked child before exec; it makes one system call
        // (setrlimit) and touches no lock or allocator state of the parent.
        unsafe {
            cmd.pre_exec(pre_exec);
        }
    }
    let mut child = cmd.spawn().expect("spawn vireo-rpcd");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("read the listening line");
    assert!(line.starts_with("listening on"), "{kind}: {line:?}");
    (child, out, ListenAddr::Unix(sock))
}

fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

fn terminate(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
}

#[test]
fn out_of_file_descriptors_pauses_accepting_and_recovers() {
    for kind in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, _out, addr) =
            daemon(kind, dir.path(), Some(20), &["--accept-retry-ms", "50"]);
        // More clients than the daemon has descriptors: the kernel queues them all; the
        // daemon accepts until EMFILE, pauses, and resumes as clients leave.
        let mut clients: Vec<Client> = (0..30)
            .map(|_| {
                let mut c = Client::connect(&addr).expect("connect");
                c.set_timeout(Some(PATIENCE)).unwrap();
                c
            })
            .collect();
        // Each makes a call and leaves, in order of arrival: those still queued in the kernel
        // are accepted as descriptors free up.
        for (i, mut c) in std::mem::take(&mut clients).into_iter().enumerate() {
            let reply = c
                .echo(b"fd")
                .unwrap_or_else(|e| panic!("{kind}: client {i}: {e}"));
            assert_eq!(reply, b"fd");
        }
        terminate(&child);
        assert!(child.wait().unwrap().success(), "{kind}");
        let log = stderr_of(&mut child);
        assert!(log.contains("out of file descriptors"), "{kind}: {log}");
        assert!(log.contains("accepting again"), "{kind}: {log}");
    }
}

#[test]
fn sigterm_under_load_answers_every_call_received() {
    // With a pool, and without one (every call on the loop thread).
    let no_workers: &[&str] = &[
        "--max-workers",
        "0",
        "--min-workers",
        "0",
        "--prio-workers",
        "0",
    ];
    for (kind, extra) in backends()
        .into_iter()
        .flat_map(|k| [(k, &[][..]), (k, no_workers)])
    {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, mut out, addr) = daemon(kind, dir.path(), None, extra);
        let load = std::thread::spawn(move || {
            vireo_rpc::load::run_load(&vireo_rpc::load::LoadConfig {
                clients: 8,
                inflight: 8,
                duration: PATIENCE,
                mix: vec![(Procedure::Echo, 4), (Procedure::Sleep, 1)],
                sleep_ms: 5,
                backend: vireo_backends::Choice::Only(kind),
                ..vireo_rpc::load::LoadConfig::new(addr)
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        terminate(&child);
        let status = child.wait().unwrap();
        let report = load.join().unwrap();
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert!(
            status.success(),
            "{kind}: {status} {}",
            stderr_of(&mut child)
        );
        // "stopped: C clients, R calls received, S replies sent, D replies dropped"
        let numbers: Vec<u64> = rest
            .lines()
            .find(|l| l.starts_with("stopped:"))
            .unwrap_or_else(|| panic!("{kind}: no summary in {rest:?}"))
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        let [_, received, sent, dropped] = numbers[..] else {
            panic!("{kind}: {rest:?}")
        };
        assert_eq!(received, sent, "{kind}: every call received is answered");
        assert_eq!(dropped, 0, "{kind}");
        assert_eq!(
            report.received, sent,
            "{kind}: the client got every reply sent"
        );
        assert!(sent > 0, "{kind}");
    }
}

/// Signals go through the event loop: SIGHUP is logged and ignored (the daemon keeps
/// serving), SIGINT stops it gracefully like SIGTERM.
#[test]
fn sighup_is_ignored_and_sigint_stops() {
    for kind in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, _out, addr) = daemon(kind, dir.path(), None, &[]);
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let mut c = Client::connect(&addr).expect("connect");
        c.set_timeout(Some(PATIENCE)).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("kill");
        // Answers after the SIGHUP: a call after it is still served.
        for _ in 0..3 {
            assert_eq!(c.echo(b"hup").unwrap(), b"hup", "{kind}");
        }
        rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("kill");
        assert!(child.wait().unwrap().success(), "{kind}");
        let log = stderr_of(&mut child);
        assert!(log.contains("SIGHUP"), "{kind}: {log}");
        assert!(log.contains("stopping"), "{kind}: {log}");
    }
}

#[test]
fn the_timeout_option_stops_an_idle_daemon_with_exit_0() {
    for kind in backends() {
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let (mut child, mut out, addr) = daemon(kind, dir.path(), None, &["--timeout", "1"]);
        // A client holds it up; after it leaves, one idle second stops the daemon.
        let mut c = Client::connect(&addr).unwrap();
        c.set_timeout(Some(PATIENCE)).unwrap();
        std::thread::sleep(Duration::from_millis(1300));
        assert_eq!(c.echo(b"still here").unwrap(), b"still here", "{kind}");
        let left = std::time::Instant::now();
        drop(c);
        let status = child.wait().unwrap();
        assert!(status.success(), "{kind}: {status}");
        assert!(left.elapsed() >= Duration::from_millis(900), "{kind}");
        assert!(started.elapsed() < PATIENCE, "{kind}");
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert!(
            rest.contains("stopped: 1 clients, 1 calls received"),
            "{kind}: {rest}"
        );

        // Without --timeout, `vireo-rpc admin daemon-timeout` sets one at run time.
        let (mut child, _out, _) = daemon(kind, dir.path(), None, &[]);
        let set = Command::new(env!("CARGO_BIN_EXE_vireo-rpc"))
            .arg("admin")
            .arg("--socket")
            .arg(dir.path().join("d-admin.sock"))
            .args(["daemon-timeout", "1"])
            .output()
            .unwrap();
        assert!(set.status.success(), "{kind}: {set:?}");
        let status = child.wait().unwrap();
        assert!(status.success(), "{kind}: {status}");
    }
}
