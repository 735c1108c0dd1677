//! A server without workers (`max_workers` 0, libvirt's server whose pool has no workers): every
//! call runs on the loop thread, on every compiled backend.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{TestServer, backends, send};
use vireo_rpc::program::Program;
use vireo_rpc::proto::{self, Header, Procedure, status};
use vireo_rpc::server::{ListenAddr, ServerConfig, TEST_PANIC_PROCEDURE};
use vireo_rpc::xdr::{TypedParam, Value};

/// A program whose one procedure answers with the name of the thread it runs on.
const WHERE: u32 = 0x2000_0077;

fn where_program() -> Program {
    Program::new(WHERE, 1).procedure(1, |_, out| {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        out.extend_from_slice(name.as_bytes());
        Ok(())
    })
}

fn no_workers(c: &mut ServerConfig) {
    c.min_workers = 0;
    c.max_workers = 0;
    c.prio_workers = 0;
    c.programs = vec![
        vireo_rpc::demo::program_with_test_procedures(),
        where_program(),
    ];
}

/// The name of the thread that ran a `WHERE` call on `server`.
fn thread_of_call(server: &TestServer) -> String {
    let mut c = server.client();
    let reply = c
        .call_with_header(
            Header {
                program: WHERE,
                version: 1,
                ..Header::call(1, 9)
            },
            &[],
        )
        .unwrap();
    assert_eq!(
        reply.header.status,
        status::OK,
        "{:?}",
        reply.error_message()
    );
    String::from_utf8(reply.payload).unwrap()
}

#[test]
fn calls_run_on_the_loop_thread_and_every_procedure_answers() {
    for kind in backends() {
        let server = TestServer::start(kind, no_workers);
        // The pool's workers are named `vireo-rpc-N`, `prio-vireo-rpc-N`; the loop runs on
        // the test's unnamed server thread.
        let name = thread_of_call(&server);
        assert!(!name.contains("vireo-rpc"), "{kind}: ran on {name:?}");
        let mut c = server.client();
        assert_eq!(c.echo(b"hello").unwrap(), b"hello", "{kind}");
        assert_eq!(c.hash(b"foobar").unwrap(), 0x8594_4171_f739_67e8, "{kind}");
        c.sleep(1).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&c.stats().unwrap()).unwrap();
        for field in ["min_workers", "max_workers", "workers", "prio_workers"] {
            assert_eq!(stats["pool"][field], 0, "{kind}: {field} in {stats}");
        }
        assert_eq!(stats["clients"], 1, "{kind}");
        // A panicking handler is answered with an error, and the loop goes on serving.
        for _ in 0..3 {
            let reply = c.call(TEST_PANIC_PROCEDURE, &[]).unwrap();
            assert_eq!(reply.header.status, status::ERROR, "{kind}");
            let message = reply.error_message().unwrap();
            assert!(message.contains("panicked"), "{kind}: {message}");
        }
        let big = vec![7u8; proto::MAX_MESSAGE - proto::HEADER_LEN];
        assert_eq!(c.echo(&big).unwrap().len(), big.len(), "{kind}");
        server.assert_serves();
        let summary = server.stop();
        assert_eq!(summary.calls_received, summary.replies_sent, "{kind}");
    }
}

#[test]
fn a_server_with_workers_runs_calls_on_them() {
    // The other side of the test above: the same procedure on a pooled server names a worker.
    for kind in backends() {
        let server = TestServer::start(kind, |c| c.programs = vec![where_program()]);
        let name = thread_of_call(&server);
        assert!(name.starts_with("vireo-rpc"), "{kind}: ran on {name:?}");
    }
}

#[test]
fn pipelined_calls_beyond_the_throttle_are_all_answered_in_order() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| {
            no_workers(c);
            c.max_client_requests = 3;
        });
        let mut s = server.raw();
        // 200 calls in one write: the server reads 3 ahead, answers, reads on.
        let mut calls = Vec::new();
        for serial in 0..200u32 {
            calls.extend(proto::encode_frame(
                &Header::call(Procedure::Echo as u32, serial),
                &serial.to_be_bytes(),
            ));
        }
        send(&mut s, &calls);
        // One reader for all the replies: a read may return several.
        let mut reader = proto::FrameReader::new(proto::MAX_MESSAGE);
        for serial in 0..200u32 {
            let frame = loop {
                if let Some(f) = reader.next_frame().expect("a valid frame") {
                    break f;
                }
                assert_ne!(reader.read_from(&mut s).unwrap(), 0, "{kind}: closed");
            };
            assert_eq!(frame.header.serial, serial, "{kind}");
            assert_eq!(frame.header.status, status::OK, "{kind}");
            assert_eq!(frame.payload, serial.to_be_bytes(), "{kind}");
        }
        // Nothing more is owed.
        assert_eq!(reader.buffered(), 0, "{kind}");
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        assert!(s.read(&mut [0u8; 1]).is_err(), "{kind}: an extra reply");
        let summary = server.stop();
        assert_eq!(summary.calls_received, 200, "{kind}");
        assert_eq!(summary.replies_sent, 200, "{kind}");
    }
}

#[test]
fn many_clients_under_load_lose_nothing() {
    for kind in backends() {
        let server = TestServer::start(kind, no_workers);
        let report = vireo_rpc::load::run_load(&vireo_rpc::load::LoadConfig {
            clients: 32,
            inflight: 8,
            duration: Duration::from_millis(300),
            backend: vireo_backends::Choice::Only(kind),
            ..vireo_rpc::load::LoadConfig::new(server.addr.clone())
        })
        .unwrap();
        assert_eq!(report.errors, 0, "{kind}: {:?}", report.error_samples);
        assert_eq!(report.sent, report.received, "{kind}");
        assert!(report.received > 0, "{kind}");
        let summary = server.stop();
        assert_eq!(summary.calls_received, summary.replies_sent, "{kind}");
        assert_eq!(summary.replies_dropped, 0, "{kind}");
    }
}

fn uint(params: &[TypedParam], field: &str) -> u32 {
    match params.iter().find(|p| p.field == field).map(|p| &p.value) {
        Some(Value::UInt(v)) => *v,
        other => panic!("{field}: {other:?} in {params:?}"),
    }
}

#[test]
fn the_admin_socket_reports_no_pool_and_refuses_to_start_one() {
    for kind in backends() {
        let server = TestServer::start(kind, no_workers);
        let mut admin = server.admin();
        let params = admin.threadpool_parameters("vireo").unwrap();
        for field in [
            "minWorkers",
            "maxWorkers",
            "nWorkers",
            "freeWorkers",
            "prioWorkers",
            "jobQueueDepth",
        ] {
            assert_eq!(uint(&params, field), 0, "{kind}: {field}");
        }
        let refused = |min, max, prio| {
            server
                .set_limits(min, max, prio)
                .expect_err("refused")
                .to_string()
        };
        // libvirt's checks, in libvirt's order.
        assert!(
            refused(None, Some(4), None).contains("must not be switched from zero to non-zero"),
            "{kind}"
        );
        assert!(
            refused(Some(1), None, None).contains("minWorkers cannot be larger than maxWorkers"),
            "{kind}"
        );
        assert!(
            refused(Some(8), Some(4), None).contains("minWorkers cannot be larger"),
            "{kind}"
        );
        assert!(
            refused(None, None, Some(1)).contains("prioWorkers"),
            "{kind}"
        );
        // Asking for what it has is fine, and changes nothing.
        server.set_limits(Some(0), Some(0), Some(0)).unwrap();
        let params = admin.threadpool_parameters("vireo").unwrap();
        assert_eq!(uint(&params, "maxWorkers"), 0, "{kind}");
        server.assert_serves();
    }
}

#[test]
fn a_pooled_server_cannot_be_switched_to_no_workers() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| c.min_workers = 0);
        let e = server.set_limits(None, Some(0), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("must not be switched from zero to non-zero"),
            "{kind}: {e}"
        );
        let params = server.admin().threadpool_parameters("vireo").unwrap();
        assert_eq!(uint(&params, "maxWorkers"), 4, "{kind}");
        server.assert_serves();
    }
}

#[test]
fn no_workers_with_priority_workers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        listen: vec![ListenAddr::Unix(dir.path().join("s.sock"))],
        min_workers: 0,
        max_workers: 0,
        prio_workers: 1,
        ..ServerConfig::default()
    };
    let e = vireo_rpc::server::Server::bind(config).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("prio_workers"), "{e}");
}

#[test]
fn min_workers_above_max_workers_is_lowered_to_it() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| {
            c.min_workers = 3;
            c.max_workers = 1;
        });
        let params = server.admin().threadpool_parameters("vireo").unwrap();
        assert_eq!(uint(&params, "minWorkers"), 1, "{kind}");
        assert_eq!(uint(&params, "maxWorkers"), 1, "{kind}");
        server.assert_serves();
    }
}
