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
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
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
