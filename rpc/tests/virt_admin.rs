//! Stock `virt-admin` (Debian's libvirt-clients) manages `vireo-rpcd` through its admin socket:
//! the values it prints are the pool's and the server's, read back after each change, with
//! libvirtd's field names in libvirtd's order (checked against a real libvirtd in the same test
//! when one can run). Skipped without virt-admin unless VIREO_REQUIRE_LIBVIRT=1.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::fields;
use vireo_libvirt::testing::{self, SessionDaemon};
use vireo_rpc::client::Client;
use vireo_rpc::server::ListenAddr;

fn keys(f: &[(String, String)]) -> Vec<String> {
    f.iter().map(|(k, _)| k.clone()).collect()
}

fn value(f: &[(String, String)], key: &str) -> String {
    f.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {key} in {f:?}"))
}

struct Daemon {
    child: Child,
    admin: PathBuf,
    public: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vireo_rpcd() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("d.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo-rpcd"))
        .arg("--listen")
        .arg(format!("unix:{}", public.display()))
        .args(["--min-workers", "2", "--keepalive-interval", "0"])
        .env("VIREO_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut admin = None;
    let mut line = String::new();
    while admin.is_none() {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "vireo-rpcd stopped");
        admin = line
            .trim()
            .strip_prefix("admin on unix:")
            .map(PathBuf::from);
    }
    let admin = admin.unwrap();
    assert_eq!(
        admin,
        dir.path().join("d-admin.sock"),
        "the default admin path"
    );
    Daemon {
        child,
        admin,
        public,
        _dir: dir,
    }
}

fn virt_admin(socket: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["30", "virt-admin", "-c"])
        .arg(format!("libvirtd:///system?socket={}", socket.display()))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    common::stdout_of(out, "virt-admin")
}

fn err(out: Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn stock_virt_admin_manages_vireo_rpcd() {
    let missing = (!Path::new("/usr/bin/virt-admin").exists())
        .then(|| "/usr/bin/virt-admin (libvirt-clients)".to_owned());
    if !testing::ready_or_skip("virt-admin against vireo-rpcd", missing) {
        return;
    }
    let d = vireo_rpcd();
    let admin = |args: &[&str]| virt_admin(&d.admin, args);

    let list = ok(admin(&["srv-list"]));
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("vireo")),
        "{list}"
    );

    let pool = fields(&ok(admin(&["srv-threadpool-info", "vireo"])));
    assert_eq!(
        keys(&pool),
        [
            "minWorkers",
            "maxWorkers",
            "nWorkers",
            "freeWorkers",
            "prioWorkers",
            "jobQueueDepth"
        ]
    );
    assert_eq!(value(&pool, "minWorkers"), "2");
    assert_eq!(value(&pool, "maxWorkers"), "20");
    assert_eq!(value(&pool, "prioWorkers"), "5");

    ok(admin(&[
        "srv-threadpool-set",
        "vireo",
        "--min-workers",
        "3",
        "--max-workers",
        "8",
    ]));
    let pool = fields(&ok(admin(&["srv-threadpool-info", "vireo"])));
    assert_eq!(value(&pool, "minWorkers"), "3");
    assert_eq!(value(&pool, "maxWorkers"), "8");
    assert_eq!(
        value(&pool, "nWorkers"),
        "3",
        "the pool grew to the new minimum"
    );

    // vireo-rpc admin speaks the same protocol, finding the admin socket from --connect.
    // (Raised, not lowered: prioWorkers is the number alive, and surplus workers leave on
    // their own after the call returns, as libvirt's do; new ones are counted at once.)
    let out = Command::new(env!("CARGO_BIN_EXE_vireo-rpc"))
        .arg("--connect")
        .arg(format!("unix:{}", d.public.display()))
        .args(["admin", "srv-threadpool-set", "--prio-workers", "6"])
        .output()
        .unwrap();
    let printed = fields(&ok(out));
    assert_eq!(value(&printed, "prioWorkers"), "6");
    let pool = fields(&ok(admin(&["srv-threadpool-info", "vireo"])));
    assert_eq!(
        value(&pool, "prioWorkers"),
        "6",
        "virt-admin does not see vireo-rpc's change"
    );

    let e = err(admin(&[
        "srv-threadpool-set",
        "vireo",
        "--min-workers",
        "9",
    ]));
    assert!(
        e.contains("invalid argument: minWorkers cannot be larger than maxWorkers"),
        "{e}"
    );
    let pool = fields(&ok(admin(&["srv-threadpool-info", "vireo"])));
    assert_eq!(
        value(&pool, "minWorkers"),
        "3",
        "a refused change changed something"
    );

    // One client on the public socket is counted; admin clients are not.
    let mut client = Client::connect(&ListenAddr::Unix(d.public.clone())).unwrap();
    assert_eq!(client.echo(b"x").unwrap(), b"x");
    let limits = fields(&ok(admin(&["srv-clients-info", "vireo"])));
    assert_eq!(
        keys(&limits),
        [
            "nclients_max",
            "nclients",
            "nclients_unauth_max",
            "nclients_unauth"
        ]
    );
    assert_eq!(value(&limits, "nclients_max"), "5000");
    assert_eq!(value(&limits, "nclients"), "1");

    // That client in the list, its information, and its disconnection.
    let listed = ok(admin(&["srv-clients-list", "vireo"]));
    let row = listed
        .lines()
        .find(|l| l.contains("unix"))
        .unwrap_or_else(|| panic!("no unix client in {listed}"));
    let id = row.split_whitespace().next().unwrap().to_owned();
    let info = fields(&ok(admin(&["client-info", "vireo", &id])));
    let names = keys(&info);
    let params: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .skip_while(|k| *k != "readonly")
        .collect();
    assert_eq!(
        params,
        [
            "readonly",
            "unix_user_id",
            "unix_user_name",
            "unix_group_id",
            "unix_group_name",
            "unix_process_id"
        ],
        "{info:?}"
    );
    assert_eq!(
        value(&info, "unix_user_id"),
        rustix::process::getuid().as_raw().to_string()
    );
    assert_eq!(
        value(&info, "unix_process_id"),
        std::process::id().to_string()
    );
    assert_eq!(value(&info, "readonly"), "no");
    let gone = ok(admin(&["client-disconnect", "vireo", &id]));
    assert!(
        gone.contains(&format!("Client '{id}' disconnected")),
        "{gone}"
    );
    assert!(
        client.echo(b"x").is_err(),
        "the disconnected client was still served"
    );
    let limits = fields(&ok(admin(&["srv-clients-info", "vireo"])));
    assert_eq!(value(&limits, "nclients"), "0");
    let e = err(admin(&["client-info", "vireo", &id]));
    assert!(
        e.contains(&format!("No client with matching ID '{id}'")),
        "{e}"
    );

    // Client limits: set, read back, and a refused value.
    ok(admin(&["srv-clients-set", "vireo", "--max-clients", "10"]));
    let limits = fields(&ok(admin(&["srv-clients-info", "vireo"])));
    assert_eq!(value(&limits, "nclients_max"), "10");
    let e = err(admin(&["srv-clients-set", "vireo", "--max-clients", "0"]));
    assert!(e.contains("invalid argument"), "{e}");
    let limits = fields(&ok(admin(&["srv-clients-info", "vireo"])));
    assert_eq!(value(&limits, "nclients_max"), "10");

    let e = err(admin(&["srv-threadpool-info", "nosuch"]));
    assert!(
        e.contains("Server not found: No server named 'nosuch'"),
        "{e}"
    );
    let version = ok(admin(&["version"]));
    assert!(
        version.contains("Running against daemon: 0.1.0"),
        "{version}"
    );

    // Logging: the filters are the daemon's tracing filter, replaced at run time.
    let log = d.admin.parent().unwrap().join("log");
    let filters = ok(admin(&["daemon-log-filters"]));
    assert_eq!(filters.trim(), "Logging filters:", "{filters}");
    let outputs = ok(admin(&["daemon-log-outputs"]));
    assert!(outputs.contains("1:stderr"), "{outputs}");
    let debug_lines = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("client connected")
            .count()
    };
    assert_eq!(
        debug_lines(),
        0,
        "debug lines before the filter allowed them"
    );
    ok(admin(&["daemon-log-filters", "1:vireo_rpc"]));
    let filters = ok(admin(&["daemon-log-filters"]));
    assert!(filters.contains("1:vireo_rpc"), "{filters}");
    let mut c = Client::connect(&ListenAddr::Unix(d.public.clone())).unwrap();
    assert_eq!(c.echo(b"y").unwrap(), b"y");
    // The debug line is written before the reply; stderr is unbuffered.
    assert!(debug_lines() >= 1, "the new filter did not take effect");
    let e = err(admin(&["daemon-log-filters", "bad[[["]));
    assert!(e.contains("invalid argument: bad logging filters"), "{e}");
    let e = err(admin(&["daemon-log-outputs", "1:file:/tmp/elsewhere"]));
    assert!(e.contains("invalid argument"), "{e}");

    // Another uid is refused even when the socket's mode lets it connect.
    if rustix::process::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = d.admin.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&d.admin, std::fs::Permissions::from_mode(0o777)).unwrap();
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "virt-admin",
                "-c",
            ])
            .arg(format!("libvirtd:///system?socket={}", d.admin.display()))
            .arg("srv-list")
            .output()
            .unwrap();
        assert!(!out.status.success(), "another uid was served");
        let log = std::fs::read_to_string(dir.join("log")).unwrap();
        assert!(log.contains("a client of another uid was refused"), "{log}");
    }

    // The same commands against a real libvirtd: the same field names in the same order.
    if testing::missing(&[]).is_none() {
        let real = SessionDaemon::start("").unwrap_or_else(|e| panic!("{e}"));
        let theirs = |args: &[&str]| {
            let mut c = real.as_daemon_user(Path::new("/usr/bin/virt-admin"));
            c.arg("-c")
                .arg(format!(
                    "libvirtd:///session?socket={}",
                    real.admin_socket().display()
                ))
                .args(args);
            fields(&ok(c.output().unwrap()))
        };
        assert_eq!(
            keys(&theirs(&["srv-threadpool-info", "libvirtd"])),
            keys(&pool),
            "threadpool fields differ from libvirtd's"
        );
        assert_eq!(
            keys(&theirs(&["srv-clients-info", "libvirtd"])),
            keys(&limits),
            "client-limit fields differ from libvirtd's"
        );
    }
}

#[test]
fn stock_virt_admin_sets_the_daemon_timeout_and_sees_every_named_server() {
    let missing = (!Path::new("/usr/bin/virt-admin").exists())
        .then(|| "/usr/bin/virt-admin (libvirt-clients)".to_owned());
    if !testing::ready_or_skip("virt-admin against vireo's daemons", missing) {
        return;
    }
    // daemon-timeout: vireo-rpcd has none by default; once set, it stops by itself after
    // virt-admin (its last client) disconnects, exit 0.
    let mut d = vireo_rpcd();
    ok(virt_admin(&d.admin, &["daemon-timeout", "--timeout", "1"]));
    let asked = std::time::Instant::now();
    let status = loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < common::PATIENCE,
            "vireo-rpcd did not stop after its daemon timeout"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(asked.elapsed() >= std::time::Duration::from_millis(900));

    // Two named servers on one daemon: virt-admin lists them in order and manages each.
    use vireo_rpc::server::ServerConfig;
    let server = |name: &str, workers: usize| ServerConfig {
        name: name.into(),
        min_workers: 1,
        max_workers: workers,
        prio_workers: 1,
        keepalive_interval: None,
        ..ServerConfig::default()
    };
    let daemon = common::TestDaemon::start(
        vireo_backends::Choice::Auto,
        None,
        vec![server("alpha", 2), server("beta", 3)],
    );
    let socket = daemon.admin.clone();
    let admin = |args: &[&str]| virt_admin(&socket, args);

    let list = ok(admin(&["srv-list"]));
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.next()?.parse::<u32>().ok()?;
            w.next()
        })
        .collect();
    assert_eq!(names, ["alpha", "beta"], "{list}");
    let max = |name: &str| {
        value(
            &fields(&ok(admin(&["srv-threadpool-info", name]))),
            "maxWorkers",
        )
    };
    assert_eq!((max("alpha"), max("beta")), ("2".into(), "3".into()));
    ok(admin(&["srv-threadpool-set", "beta", "--max-workers", "5"]));
    assert_eq!((max("alpha"), max("beta")), ("2".into(), "5".into()));

    let mut a = daemon.client(0);
    let mut b = daemon.client(1);
    assert_eq!(a.echo(b"a").unwrap(), b"a");
    assert_eq!(b.echo(b"b").unwrap(), b"b");
    let ids = |name: &str| -> Vec<String> {
        ok(admin(&["srv-clients-list", name]))
            .lines()
            .filter(|l| l.contains("unix"))
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    let (in_alpha, in_beta) = (ids("alpha"), ids("beta"));
    assert_eq!((in_alpha.len(), in_beta.len()), (1, 1));
    assert_ne!(in_alpha, in_beta);
    let e = err(admin(&["client-info", "alpha", &in_beta[0]]));
    assert!(e.contains("No client with matching ID"), "{e}");
    ok(admin(&["client-disconnect", "beta", &in_beta[0]]));
    assert!(b.echo(b"gone").is_err(), "beta's client was still served");
    assert_eq!(a.echo(b"alpha stays").unwrap(), b"alpha stays");
    assert_eq!(ids("beta").len(), 0);
    let summary = daemon.stop();
    assert_eq!(summary.servers[1].1.clients_accepted, 1);
}

#[test]
fn stock_virt_admin_sees_a_server_without_workers_and_cannot_give_it_a_pool() {
    let missing = (!Path::new("/usr/bin/virt-admin").exists())
        .then(|| "/usr/bin/virt-admin (libvirt-clients)".to_owned());
    if !testing::ready_or_skip("virt-admin against a server without workers", missing) {
        return;
    }
    use vireo_rpc::server::ServerConfig;
    let daemon = common::TestDaemon::start(
        vireo_backends::Choice::Auto,
        None,
        vec![ServerConfig {
            name: "inline".into(),
            min_workers: 0,
            max_workers: 0,
            prio_workers: 0,
            keepalive_interval: None,
            ..ServerConfig::default()
        }],
    );
    let socket = daemon.admin.clone();
    let admin = |args: &[&str]| virt_admin(&socket, args);
    let info = fields(&ok(admin(&["srv-threadpool-info", "inline"])));
    for (key, v) in &info {
        assert_eq!(v, "0", "{key} in {info:?}");
    }
    assert_eq!(info.len(), 6, "{info:?}");
    // libvirt's own refusal, word for word.
    let e = err(admin(&[
        "srv-threadpool-set",
        "inline",
        "--max-workers",
        "4",
    ]));
    assert!(
        e.contains("maxWorkers must not be switched from zero to non-zero and vice versa"),
        "{e}"
    );
    let e = err(admin(&[
        "srv-threadpool-set",
        "inline",
        "--min-workers",
        "1",
    ]));
    assert!(
        e.contains("minWorkers cannot be larger than maxWorkers"),
        "{e}"
    );
    let mut c = daemon.client(0);
    assert_eq!(c.echo(b"inline").unwrap(), b"inline");
    let summary = daemon.stop();
    assert_eq!(summary.servers[0].1.replies_sent, 1);
}
