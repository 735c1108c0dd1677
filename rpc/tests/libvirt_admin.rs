//! `vireo-rpc admin` against a real libvirtd's admin socket (needs libvirt; skipped
//! without it unless VIREO_REQUIRE_LIBVIRT=1): the answers are libvirtd's, field for field and
//! in its order, as stock `virt-admin` prints them in the same test.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use common::fields;
use vireo_libvirt::testing::{self, SessionDaemon};

fn ok(out: Output, what: &str) -> String {
    common::stdout_of(out, what)
}

#[test]
fn libvirt_admin_reads_libvirtd_as_virt_admin_does() {
    let mut missing: Vec<String> = testing::missing(&[]).into_iter().collect();
    if !Path::new("/usr/bin/virt-admin").exists() {
        missing.push("/usr/bin/virt-admin (libvirt-clients)".into());
    }
    if !testing::ready_or_skip(
        "vireo-rpc admin against libvirtd",
        (!missing.is_empty()).then(|| missing.join(", ")),
    ) {
        return;
    }
    let daemon = SessionDaemon::start("").unwrap_or_else(|e| panic!("{e}"));
    let socket = daemon.admin_socket();
    let vireo = |args: &[&str]| {
        let mut c = daemon.as_daemon_user(Path::new(env!("CARGO_BIN_EXE_vireo-rpc")));
        c.arg("admin").arg("--socket").arg(&socket).args(args);
        ok(c.output().unwrap(), &format!("vireo-rpc admin {args:?}"))
    };
    let virt_admin = |args: &[&str]| {
        let mut c = daemon.as_daemon_user(Path::new("/usr/bin/virt-admin"));
        c.arg("-c")
            .arg(format!("libvirtd:///session?socket={}", socket.display()))
            .args(args);
        ok(c.output().unwrap(), &format!("virt-admin {args:?}"))
    };

    let servers = vireo(&["srv-list"]);
    // libvirtd lists its servers in no fixed order.
    let mut names: Vec<&str> = servers
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["admin", "libvirtd"], "{servers}");

    let ours = fields(&vireo(&["srv-threadpool-info", "libvirtd"]));
    let theirs = fields(&virt_admin(&["srv-threadpool-info", "libvirtd"]));
    let order: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        order,
        [
            "minWorkers",
            "maxWorkers",
            "nWorkers",
            "freeWorkers",
            "prioWorkers",
            "jobQueueDepth"
        ]
    );
    assert_eq!(ours, theirs, "vireo-rpc and virt-admin disagree");
    let values: BTreeMap<_, _> = ours.into_iter().collect();
    assert_eq!(values["minWorkers"], "5");
    assert_eq!(values["maxWorkers"], "20");

    let ours = fields(&vireo(&["srv-clients-info", "libvirtd"]));
    let theirs = fields(&virt_admin(&["srv-clients-info", "libvirtd"]));
    let keys: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "nclients_max",
            "nclients",
            "nclients_unauth_max",
            "nclients_unauth"
        ]
    );
    assert_eq!(ours, theirs);

    let version = vireo(&["version"]);
    assert!(version.starts_with("Running against daemon: "), "{version}");

    // An unknown server is the daemon's error, printed as virt-admin prints it.
    let mut c = daemon.as_daemon_user(Path::new(env!("CARGO_BIN_EXE_vireo-rpc")));
    let out = c
        .arg("admin")
        .arg("--socket")
        .arg(&socket)
        .args(["srv-threadpool-info", "nosuch"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch"), "{err}");
}

/// The admin program's refusals, text for text: raw calls (rpc/tests/admin/raw_calls.py)
/// that libvirt's own client would not make (flags, unknown servers and clients) get the same
/// error code and message from vireo's admin socket as from libvirtd's.
#[test]
fn admin_refusals_match_libvirtd_text_for_text() {
    let missing = testing::missing(&[]);
    if !testing::ready_or_skip("admin refusals against libvirtd", missing) {
        return;
    }
    use vireo_rpc::server::ServerConfig;
    use vireo_rpc::xdr::{Encoder, TypedParam, Value};

    let real = SessionDaemon::start("").unwrap_or_else(|e| panic!("{e}"));
    let script = real.dir().join("raw_calls.py");
    std::fs::write(&script, include_str!("admin/raw_calls.py")).unwrap();
    let ours = common::TestDaemon::start(
        vireo_backends::Choice::Auto,
        None,
        vec![ServerConfig {
            min_workers: 1,
            ..ServerConfig::default()
        }],
    );

    // `PROC:HEXBODY` arguments of raw_calls.py, for a daemon whose first server is `server`.
    let cases = |server: &str| -> Vec<String> {
        let call = |procedure: u32, args: &dyn for<'a> Fn(&'a mut Encoder) -> &'a mut Encoder| {
            let mut e = Encoder::new();
            args(&mut e);
            let hex: String = e.into_bytes().iter().map(|b| format!("{b:02x}")).collect();
            format!("{procedure}:{hex}")
        };
        fn client<'a>(e: &'a mut Encoder, srv: &str, id: u64) -> &'a mut Encoder {
            e.string(srv).u64(id).i64(0).u32(0).u32(0)
        }
        fn params<'a>(e: &'a mut Encoder, srv: &str, p: &[TypedParam]) -> &'a mut Encoder {
            e.string(srv).typed_params(p).u32(0)
        }
        let uint = |name: &str, v: u32| TypedParam::new(name, Value::UInt(v));
        vec![
            // Flags where libvirtd takes none (and any on lookup-server).
            call(4, &|e| e.u32(1).u32(1)),
            call(5, &|e| e.string(server).u32(7)),
            call(6, &|e| e.string("nosuch").u32(1)),
            call(6, &|e| e.string(server).u32(1)),
            call(7, &|e| e.string("nosuch").u32(0).u32(0)),
            call(7, &|e| e.string(server).u32(0).u32(4)),
            call(8, &|e| e.string(server).u32(1).u32(2)),
            call(9, &|e| e.string(server).u64(999_999).u32(1)),
            call(9, &|e| e.string(server).u64(999_999).u32(0)),
            call(10, &|e| client(e, server, 999_999)),
            call(10, &|e| client(e, "nosuch", 1)),
            call(11, &|e| client(e, server, 999_999)),
            call(12, &|e| e.string(server).u32(1)),
            call(13, &|e| e.string("nosuch").u32(0).u32(0)),
            call(15, &|e| e.u32(1)),
            call(17, &|e| e.opt_string(None).u32(1)),
            call(19, &|e| e.u32(0).u32(1)),
            // Refused values: none of them changes anything.
            call(7, &|e| params(e, server, &[uint("minWorkers", 30)])),
            call(7, &|e| params(e, server, &[uint("bogus", 1)])),
            call(7, &|e| {
                params(e, server, &[TypedParam::new("maxWorkers", Value::Int(3))])
            }),
            call(7, &|e| {
                let p = [
                    uint("prioWorkers", 1),
                    uint("minWorkers", 1),
                    uint("minWorkers", 2),
                ];
                params(e, server, &p)
            }),
            call(7, &|e| {
                let p = [
                    uint("zeta", 1),
                    TypedParam::new("maxWorkers", Value::String("x".into())),
                ];
                params(e, server, &p)
            }),
            call(13, &|e| {
                params(
                    e,
                    server,
                    &[TypedParam::new("nclients_max", Value::Int(10))],
                )
            }),
        ]
    };
    let run = |mut cmd: std::process::Command, socket: &Path, server: &str| {
        let out = cmd
            .arg(&script)
            .arg(socket)
            .args(cases(server))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let theirs = run(
        real.as_daemon_user(Path::new("/usr/bin/python3")),
        &real.admin_socket(),
        "libvirtd",
    );
    let answers = run(
        std::process::Command::new("/usr/bin/python3"),
        &ours.admin,
        "vireo",
    );
    ours.stop();
    let ours = answers;
    let cases = cases("vireo");
    let differ: Vec<String> = cases
        .iter()
        .zip(ours.lines())
        .zip(theirs.lines())
        .filter(|((_, o), t)| o != t)
        .map(|((case, o), t)| format!("call {case}\n  vireo:    {o}\n  libvirtd: {t}"))
        .collect();
    assert!(differ.is_empty(), "\n{}", differ.join("\n"));
    assert_eq!(ours.lines().count(), cases.len(), "{ours}");
    assert_eq!(theirs.lines().count(), cases.len(), "{theirs}");
}
