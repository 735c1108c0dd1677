//! The framework: user-defined programs (their replies, their errors as libvirt's error
//! replies, routing by program, version and procedure), several named servers on one daemon,
//! the checks of `add_server`, and the daemon timeout. Every test runs on every compiled
//! backend.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::{PATIENCE, TestDaemon, backends, eventually};
use vireo_backends::Choice;
use vireo_rpc::admin::AdminClient;
use vireo_rpc::client::{Client, Reply};
use vireo_rpc::program::{Program, RpcError, code};
use vireo_rpc::proto::{self, Header, KEEPALIVE_PROGRAM, Procedure, kind, status};
use vireo_rpc::server::{Daemon, DaemonConfig, ListenAddr, ServerConfig};
use vireo_rpc::xdr::{TypedParam, Value, decode_error};

const USER: u32 = 0x2000_0001;

fn header(program: u32, version: u32, procedure: u32, serial: u32) -> Header {
    Header {
        program,
        version,
        procedure,
        kind: kind::CALL,
        serial,
        status: status::OK,
    }
}

/// A program whose procedures cover every way a handler can end.
fn user_program(seen: Arc<AtomicU64>) -> Program {
    Program::new(USER, 1)
        .procedure(1, |call, out| {
            out.extend(call.payload().iter().rev());
            Ok(())
        })
        .procedure(2, |_, out| {
            out.extend_from_slice(b"partial reply, then an error");
            Err(RpcError::new(42, 10, "nope"))
        })
        .procedure(3, |_, _| panic!("on purpose"))
        .procedure(4, |_, out| {
            out.clear();
            out.extend_from_slice(b"not a frame");
            Ok(())
        })
        .procedure(5, |_, out| {
            out.resize(out.len() + proto::MAX_MESSAGE, 0);
            Ok(())
        })
        .priority_procedure(6, move |call, out| {
            seen.store(call.client_id(), SeqCst);
            out.extend_from_slice(call.server_name().as_bytes());
            Ok(())
        })
}

fn small(name: &str, programs: Vec<Program>) -> ServerConfig {
    ServerConfig {
        name: name.into(),
        programs,
        min_workers: 1,
        max_workers: 2,
        prio_workers: 1,
        ..ServerConfig::default()
    }
}

/// The error body of an error reply.
#[track_caller]
fn error_of(reply: &Reply) -> (i32, i32, String) {
    assert_eq!(reply.header.status, status::ERROR, "{reply:?}");
    assert_eq!(reply.header.kind, kind::REPLY);
    let e = decode_error(&reply.payload).expect("libvirt's error body");
    (e.code, e.domain, e.message.unwrap_or_default())
}

#[test]
fn a_user_program_is_served_and_every_failure_is_a_libvirt_error_reply() {
    for kind in backends() {
        let seen = Arc::new(AtomicU64::new(0));
        let d = TestDaemon::start(
            Choice::Only(kind),
            None,
            vec![small("user", vec![user_program(Arc::clone(&seen))])],
        );
        let mut c = d.client(0);
        let reply = c.call_with_header(header(USER, 1, 1, 7), b"abc").unwrap();
        assert_eq!(
            reply.header,
            header(USER, 1, 1, 7).reply(status::OK),
            "{kind}"
        );
        assert_eq!(reply.payload, b"cba", "{kind}");

        let e = error_of(&c.call_with_header(header(USER, 1, 2, 8), b"").unwrap());
        assert_eq!(
            e,
            (42, 10, "nope".to_owned()),
            "{kind}: the handler's own error"
        );

        let cases = [
            (3, "panicked"),
            (4, "changed reply bytes"),
            (5, "above the limit"),
        ];
        for (procedure, expect) in cases {
            let reply = c
                .call_with_header(header(USER, 1, procedure, 9), b"")
                .unwrap();
            let (code_, domain, message) = error_of(&reply);
            assert_eq!(
                (code_, domain),
                (code::INTERNAL_ERROR, code::FROM_RPC),
                "{kind}"
            );
            assert!(message.contains(expect), "{kind} {procedure}: {message}");
            assert_eq!(reply.header.serial, 9, "{kind}");
        }
        let routing = [
            (header(USER, 1, 77, 10), "unknown procedure: 77"),
            (
                header(USER, 2, 1, 11),
                "cannot find program 0x20000001 version 2",
            ),
            (
                header(proto::PROGRAM, proto::VERSION, Procedure::Echo as u32, 12),
                "cannot find program",
            ),
            (
                Header {
                    kind: kind::MESSAGE,
                    ..header(USER, 1, 1, 13)
                },
                "unexpected message type 2",
            ),
        ];
        for (h, expect) in routing {
            let (code_, domain, message) = error_of(&c.call_with_header(h, b"").unwrap());
            assert_eq!((code_, domain), (code::RPC, code::FROM_RPC), "{kind} {h:?}");
            assert!(
                message.contains(expect),
                "{kind}: {message:?} lacks {expect:?}"
            );
        }
        // A priority procedure sees the server's name and the caller's id, which the admin
        // socket lists.
        let reply = c.call_with_header(header(USER, 1, 6, 14), b"").unwrap();
        assert_eq!(reply.payload, b"user", "{kind}");
        let mut admin = AdminClient::connect(&d.admin).unwrap();
        let mut args = vireo_rpc::xdr::Encoder::new();
        args.string("user").u32(1).u32(0);
        let listed = admin.call(8, &args.into_bytes()).unwrap();
        let mut dec = vireo_rpc::xdr::Decoder::new(&listed);
        assert_eq!(dec.u32().unwrap(), 1, "{kind}: one client on server user");
        assert_eq!(dec.string(64).unwrap(), "user");
        assert_eq!(
            dec.u64().unwrap(),
            seen.load(SeqCst),
            "{kind}: the id Call::client_id gave"
        );
        // The connection survived every failure.
        assert_eq!(
            c.call(0, b"").unwrap().error_message().unwrap(),
            "cannot find program 0x76697265 version 1",
            "{kind}"
        );
        let summary = d.stop();
        let (name, s) = &summary.servers[0];
        assert_eq!(name, "user");
        assert_eq!(s.calls_received, s.replies_sent, "{kind}: {s:?}");
        assert_eq!(s.calls_received, 11, "{kind}: {s:?}");
        assert_eq!(summary.admin.calls_received, 2, "{kind}: open and list");
    }
}

#[test]
fn two_versions_of_a_program_and_two_programs_share_a_server() {
    for kind in backends() {
        let v = |n: u8| {
            Program::new(USER, u32::from(n)).procedure(1, move |_, out| {
                out.push(n);
                Ok(())
            })
        };
        let d = TestDaemon::start(
            Choice::Only(kind),
            None,
            vec![small("multi", vec![v(1), v(2), vireo_rpc::demo::program()])],
        );
        let mut c = d.client(0);
        for n in [1u8, 2] {
            let reply = c
                .call_with_header(header(USER, u32::from(n), 1, 1), b"")
                .unwrap();
            assert_eq!(reply.payload, [n], "{kind}");
        }
        assert_eq!(c.echo(b"demo too").unwrap(), b"demo too", "{kind}");
        d.stop();
    }
}

#[test]
fn named_servers_share_the_loop_with_their_own_pools_programs_and_limits() {
    for kind in backends() {
        let d = TestDaemon::start(
            Choice::Only(kind),
            None,
            vec![
                small("alpha", vec![vireo_rpc::demo::program()]),
                ServerConfig {
                    max_workers: 3,
                    max_clients: 7,
                    ..small("beta", vec![user_program(Arc::default())])
                },
            ],
        );
        let mut a = d.client(0);
        let mut b = d.client(1);
        let mut b2 = d.client(1);
        assert_eq!(a.echo(b"alpha").unwrap(), b"alpha", "{kind}");
        assert!(
            a.call_with_header(header(USER, 1, 1, 1), b"x")
                .unwrap()
                .error_message()
                .is_some()
        );
        assert_eq!(
            b.call_with_header(header(USER, 1, 1, 1), b"xy")
                .unwrap()
                .payload,
            b"yx"
        );
        assert!(b2.echo(b"no demo here").is_err(), "{kind}");

        let mut admin = AdminClient::connect(&d.admin).unwrap();
        assert_eq!(admin.list_servers().unwrap(), ["alpha", "beta"], "{kind}");
        // need_results 0 asks for the count alone.
        let mut args = vireo_rpc::xdr::Encoder::new();
        args.u32(0).u32(0);
        let body = admin.call(4, &args.into_bytes()).unwrap();
        assert_eq!(body, [0, 0, 0, 0, 0, 0, 0, 2], "{kind}");
        let get = |admin: &mut AdminClient, server: &str, field: &str| {
            admin
                .threadpool_parameters(server)
                .unwrap()
                .into_iter()
                .find(|p| p.field == field)
                .map(|p| p.value)
                .unwrap()
        };
        assert_eq!(
            get(&mut admin, "alpha", "maxWorkers"),
            Value::UInt(2),
            "{kind}"
        );
        assert_eq!(
            get(&mut admin, "beta", "maxWorkers"),
            Value::UInt(3),
            "{kind}"
        );
        admin
            .set_threadpool_parameters("beta", None, Some(5), None)
            .unwrap();
        assert_eq!(
            get(&mut admin, "beta", "maxWorkers"),
            Value::UInt(5),
            "{kind}"
        );
        assert_eq!(
            get(&mut admin, "alpha", "maxWorkers"),
            Value::UInt(2),
            "{kind}"
        );
        let limits = |admin: &mut AdminClient, server: &str| -> Vec<TypedParam> {
            admin.client_limits(server).unwrap()
        };
        let beta = limits(&mut admin, "beta");
        assert_eq!(
            beta[0],
            TypedParam::new("nclients_max", Value::UInt(7)),
            "{kind}"
        );
        assert_eq!(
            beta[1],
            TypedParam::new("nclients", Value::UInt(2)),
            "{kind}"
        );
        let alpha = limits(&mut admin, "alpha");
        assert_eq!(
            alpha[1],
            TypedParam::new("nclients", Value::UInt(1)),
            "{kind}"
        );
        let e = admin.threadpool_parameters("admin").unwrap_err();
        assert!(
            e.to_string().contains("No server named 'admin'"),
            "{kind}: {e}"
        );
        drop((a, b, b2));
        eventually("beta's clients to go", || {
            limits(&mut admin, "beta")[1] == TypedParam::new("nclients", Value::UInt(0))
        });
        drop(admin);
        let summary = d.stop();
        let names: Vec<&str> = summary.servers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"], "{kind}");
        assert_eq!(summary.servers[0].1.clients_accepted, 1, "{kind}");
        assert_eq!(summary.servers[1].1.clients_accepted, 2, "{kind}");
        assert_eq!(summary.servers[1].1.calls_received, 2, "{kind}");
    }
}

#[test]
fn add_server_refuses_bad_configs_and_the_daemon_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::new(DaemonConfig::default()).unwrap();
    let at = |name: &str| vec![ListenAddr::Unix(dir.path().join(name))];
    let config = |name: &str, programs: Vec<Program>| ServerConfig {
        name: name.into(),
        listen: at(name),
        programs,
        min_workers: 1,
        ..ServerConfig::default()
    };
    let refused = [
        (config("", vec![]), "needs a name"),
        (
            config("k", vec![Program::new(KEEPALIVE_PROGRAM, 1)]),
            "keepalive program",
        ),
        (
            config("twice", vec![Program::new(USER, 1), Program::new(USER, 1)]),
            "given twice",
        ),
        (
            ServerConfig {
                listen: Vec::new(),
                ..config("nolisten", vec![])
            },
            "no address",
        ),
    ];
    for (c, expect) in refused {
        let e = daemon.add_server(c).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains(expect), "{e}");
    }
    daemon
        .add_server(config("one", vec![vireo_rpc::demo::program()]))
        .unwrap();
    let e = daemon.add_server(config("one", vec![])).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(daemon.server_names().collect::<Vec<_>>(), ["one"]);
    let addr = daemon.local_addrs("one").unwrap()[0].clone();
    assert!(daemon.local_addrs("k").is_none());
    let stop = daemon.shutdown_handle();
    let running = std::thread::spawn(move || daemon.run());
    let mut c = Client::connect(&addr).unwrap();
    assert_eq!(c.echo(b"served").unwrap(), b"served");
    drop(c);
    stop.shutdown();
    let summary = running.join().unwrap().unwrap();
    assert_eq!(summary.servers.len(), 1);
}

#[test]
fn the_daemon_timeout_stops_an_idle_daemon_and_waits_while_a_client_is_connected() {
    for kind in backends() {
        // Idle from the start: it stops by itself.
        let started = Instant::now();
        let d = TestDaemon::start(
            Choice::Only(kind),
            Some(Duration::from_millis(200)),
            vec![small("t", vec![])],
        );
        let summary = d.join();
        assert!(started.elapsed() >= Duration::from_millis(200), "{kind}");
        assert_eq!(summary.servers[0].1.clients_accepted, 0, "{kind}");

        // A connected client holds it; its leaving starts the timeout.
        let d = TestDaemon::start(
            Choice::Only(kind),
            Some(Duration::from_millis(300)),
            vec![small("t", vec![vireo_rpc::demo::program()])],
        );
        let mut c = d.client(0);
        assert_eq!(c.echo(b"x").unwrap(), b"x");
        std::thread::sleep(Duration::from_millis(900));
        assert!(!d.is_finished(), "{kind}: stopped with a client");
        assert_eq!(c.echo(b"still").unwrap(), b"still", "{kind}");
        drop(c);
        let summary = d.join();
        assert_eq!(summary.servers[0].1.calls_received, 2, "{kind}");

        // Set through the admin socket (virt-admin daemon-timeout): counted once the admin
        // client, a client too, has gone; 0 turns it off again.
        let d = TestDaemon::start(Choice::Only(kind), None, vec![small("t", vec![])]);
        let mut admin = AdminClient::connect(&d.admin).unwrap();
        admin.set_daemon_timeout(1).unwrap();
        admin.set_daemon_timeout(0).unwrap();
        admin.close().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!d.is_finished(), "{kind}: 0 is no timeout");
        let mut admin = AdminClient::connect(&d.admin).unwrap();
        admin.set_daemon_timeout(1).unwrap();
        let asked = Instant::now();
        admin.close().unwrap();
        let summary = d.join();
        assert!(asked.elapsed() >= Duration::from_millis(900), "{kind}");
        assert!(asked.elapsed() < PATIENCE, "{kind}");
        assert_eq!(summary.admin.clients_accepted, 2, "{kind}");
    }
}
