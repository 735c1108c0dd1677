//! The server's behaviour, bad input and faults; every test runs on every compiled backend, and
//! after each fault a well-behaved client on another connection must still be served.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, backends, clients_of, eventually, send, wait_closed};
use vireo_rpc::client::Client;
use vireo_rpc::proto::{
    self, Header, KEEPALIVE_PING, KEEPALIVE_PONG, MAX_SLEEP_MS, Procedure, kind, status,
};
use vireo_rpc::server::{ListenAddr, TEST_PANIC_PROCEDURE};

#[test]
fn every_procedure_answers() {
    for kind in backends() {
        let server = TestServer::start(kind, |_| {});
        let mut c = server.client();
        assert_eq!(c.echo(b"hello").unwrap(), b"hello");
        assert_eq!(c.echo(b"").unwrap(), b"");
        assert_eq!(c.hash(b"foobar").unwrap(), 0x8594_4171_f739_67e8);
        let started = Instant::now();
        c.sleep(20).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(20), "{kind}");
        let stats: serde_json::Value = serde_json::from_str(&c.stats().unwrap()).unwrap();
        assert_eq!(stats["pool"]["min_workers"], 2, "{kind}");
        assert_eq!(stats["pool"]["prio_workers"], 1, "{kind}");
        assert_eq!(stats["clients"], 1, "{kind}");
        server.set_limits(Some(1), Some(3), None).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&c.stats().unwrap()).unwrap();
        assert_eq!(
            (&stats["pool"]["min_workers"], &stats["pool"]["max_workers"]),
            (&serde_json::json!(1), &serde_json::json!(3)),
            "{kind}"
        );
        // A reply echoes program, version, procedure and serial.
        let reply = c
            .call_with_header(Header::call(Procedure::Echo as u32, 77), b"x")
            .unwrap();
        assert_eq!(
            reply.header,
            Header::call(1, 77).reply(status::OK),
            "{kind}"
        );
        // 16 MiB - 24 bytes of payload: the largest message.
        let big = vec![7u8; proto::MAX_MESSAGE - proto::HEADER_LEN];
        assert_eq!(c.echo(&big).unwrap().len(), big.len(), "{kind}");
        let summary = server.stop();
        assert_eq!(summary.calls_received, summary.replies_sent, "{kind}");
    }
}

#[test]
fn tcp_on_loopback_serves_alongside_unix() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| c.listen.push("tcp:0".parse().unwrap()));
        let ListenAddr::Tcp(tcp) = server.addrs[1].clone() else {
            panic!("{kind}: no tcp address in {:?}", server.addrs)
        };
        assert!(tcp.ip().is_loopback() && tcp.port() != 0, "{kind}: {tcp}");
        let mut c = Client::connect(&ListenAddr::Tcp(tcp)).unwrap();
        c.set_timeout(Some(common::PATIENCE)).unwrap();
        assert_eq!(c.echo(b"over tcp").unwrap(), b"over tcp", "{kind}");
        assert_eq!(c.hash(b"a").unwrap(), 0xaf63_dc4c_8601_ec8c, "{kind}");
        server.assert_serves();
    }
}

/// The two ways a server runs calls: on its pool, and on the loop thread (no workers).
fn with_and_without_workers(c: &mut vireo_rpc::server::ServerConfig, pooled: bool) {
    if !pooled {
        c.min_workers = 0;
        c.max_workers = 0;
        c.prio_workers = 0;
    }
}

#[test]
fn malformed_calls_get_error_replies_and_the_connection_stays() {
    for (kind, pooled) in backends().into_iter().flat_map(|k| [(k, true), (k, false)]) {
        let server = TestServer::start(kind, |c| with_and_without_workers(c, pooled));
        let mut c = server.client();
        let bad = [
            (
                Header {
                    program: 0x1234,
                    ..Header::call(1, 1)
                },
                vec![],
                "program",
            ),
            (
                Header {
                    version: 9,
                    ..Header::call(1, 2)
                },
                vec![],
                "program",
            ),
            (Header::call(99, 3), vec![], "unknown procedure"),
            (
                Header {
                    kind: kind::REPLY,
                    ..Header::call(1, 4)
                },
                vec![],
                "type",
            ),
            (
                Header {
                    kind: kind::MESSAGE,
                    ..Header::call(1, 5)
                },
                vec![],
                "type",
            ),
            (Header::call(Procedure::Sleep as u32, 6), vec![1, 2], "u32"),
            (
                Header::call(Procedure::Sleep as u32, 7),
                (MAX_SLEEP_MS + 1).to_be_bytes().to_vec(),
                "limit",
            ),
            (
                Header::call(TEST_PANIC_PROCEDURE, 11),
                vec![],
                "unknown procedure",
            ),
        ];
        for (header, payload, expect) in bad {
            let reply = c.call_with_header(header, &payload).unwrap();
            assert_eq!(reply.header.status, status::ERROR, "{kind} {header:?}");
            assert_eq!(reply.header.serial, header.serial, "{kind}");
            assert_eq!(reply.header.kind, kind::REPLY, "{kind}");
            let e = vireo_rpc::xdr::decode_error(&reply.payload).expect("libvirt's error body");
            assert_eq!(
                (e.code, e.domain),
                (
                    if expect == "u32" || expect == "limit" {
                        8
                    } else {
                        39
                    },
                    7
                ),
                "{kind} {header:?}"
            );
            let message = e.message.unwrap();
            assert!(
                message.contains(expect),
                "{kind}: {message:?} lacks {expect:?}"
            );
            // The same connection keeps working.
            assert_eq!(c.echo(b"ok").unwrap(), b"ok", "{kind}");
        }
        server.assert_serves();
    }
}

#[test]
fn bad_lengths_close_only_that_client() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| c.max_message_size = 1024);
        let mut bystander = server.client();
        for (len, what) in [
            (0u32, "zero"),
            (4, "four"),
            (27, "below 28"),
            (1024 + 5, "above the limit"),
            (u32::MAX, "4 GiB"),
        ] {
            let mut s = server.raw();
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend([0u8; 24]);
            send(&mut s, &bytes);
            wait_closed(&mut s).unwrap_or_else(|e| panic!("{kind}: length {what}: {e}"));
            assert_eq!(bystander.echo(b"fine").unwrap(), b"fine", "{kind}");
        }
        // The limit itself is accepted.
        let mut c = server.client();
        let payload = vec![1u8; 1024 - proto::HEADER_LEN];
        assert_eq!(c.echo(&payload).unwrap(), payload, "{kind}");
        server.assert_serves();
    }
}

#[test]
fn cut_frames_and_garbage_do_not_disturb_others() {
    for kind in backends() {
        let server = TestServer::start(kind, |_| {});
        // A header cut short, then disconnect.
        {
            let mut s = server.raw();
            let frame = proto::encode_frame(&Header::call(1, 1), b"abc");
            send(&mut s, &frame[..10]);
        }
        // A length word cut short, then disconnect.
        {
            let mut s = server.raw();
            send(&mut s, &[0, 0]);
        }
        server.assert_serves();
        // Garbage from a fixed-seed xorshift: its first word is far above the limit.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let first = u32::from_be_bytes(garbage[..4].try_into().unwrap()) as usize;
        assert!(!(proto::MIN_FRAME_LEN..=proto::MAX_MESSAGE + 4).contains(&first));
        let mut s = server.raw();
        send(&mut s, &garbage);
        wait_closed(&mut s).unwrap_or_else(|e| panic!("{kind}: garbage: {e}"));
        server.assert_serves();
        let summary = server.stop();
        assert!(summary.clients_dropped >= 1, "{kind}: {summary:?}");
    }
}

#[test]
fn keepalive_closes_a_client_stalled_mid_frame_while_others_are_served() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| {
            c.keepalive_interval = Some(Duration::from_millis(50));
            c.keepalive_count = 2;
        });
        let mut stalled = server.raw();
        let frame = proto::encode_frame(&Header::call(1, 1), &[0u8; 100]);
        send(&mut stalled, &frame[..60]);
        let mut other = server.client();
        // The stalled client is pinged, does not answer, and is closed; meanwhile others
        // keep being served (the well-behaved client answers pings during its calls).
        let started = Instant::now();
        let waiter = std::thread::spawn(move || {
            let r = wait_closed(&mut stalled);
            (r, started.elapsed())
        });
        while !waiter.is_finished() {
            assert_eq!(other.echo(b"alive").unwrap(), b"alive", "{kind}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (closed, after) = waiter.join().unwrap();
        closed.unwrap_or_else(|e| panic!("{kind}: stalled client: {e}"));
        // Three intervals at least: two pings go unanswered first.
        assert!(
            after >= Duration::from_millis(100),
            "{kind}: closed after {after:?}"
        );
        server.assert_serves();
    }
}

#[test]
fn keepalive_pings_are_answered_with_pong() {
    for kind in backends() {
        let server = TestServer::start(kind, |_| {});
        let mut s = server.raw();
        send(
            &mut s,
            &proto::encode_frame(&Header::keepalive(KEEPALIVE_PING), &[]),
        );
        let frame = common::read_frame(&mut s);
        assert!(
            frame.header.is_keepalive(KEEPALIVE_PONG),
            "{kind}: {:?}",
            frame.header
        );
        server.assert_serves();
    }
}

#[test]
fn a_client_that_never_reads_is_throttled_then_dropped() {
    use std::io::Write;
    for (kind, pooled) in backends().into_iter().flat_map(|k| [(k, true), (k, false)]) {
        let server = TestServer::start(kind, |c| {
            with_and_without_workers(c, pooled);
            c.max_queued_reply_bytes = 300 * 1024;
        });
        let mut greedy = server.raw();
        greedy.set_nonblocking(true).unwrap();
        // ECHO calls of 256 KiB each, never reading a reply. The server reads at most
        // `max_client_requests` calls ahead; their replies back up, pass the 300 KiB cap, and
        // the server drops the connection, which ends the writing with an error.
        let call = proto::encode_frame(&Header::call(1, 1), &vec![0u8; 256 * 1024]);
        let mut written = 0usize;
        let deadline = Instant::now() + common::PATIENCE;
        let mut off = 0;
        let dropped = loop {
            match greedy.write(&call[off..]) {
                Ok(n) => {
                    off = (off + n) % call.len();
                    written += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => break e,
            }
            assert!(
                Instant::now() < deadline,
                "{kind}: never dropped ({written} bytes written)"
            );
            assert!(written < 64 << 20, "{kind}: the server reads without limit");
        };
        assert!(
            matches!(
                dropped.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{kind}: {dropped}"
        );
        eventually("the greedy client to be gone", || clients_of(&server) == 0);
        server.assert_serves();
    }
}

#[test]
fn a_thousand_clients_at_once() {
    common_raise_fd_limit(2600);
    for kind in backends() {
        let server = TestServer::start(kind, |_| {});
        let report = vireo_rpc::load::run_load(&vireo_rpc::load::LoadConfig {
            clients: 1000,
            inflight: 2,
            duration: Duration::from_millis(500),
            backend: vireo_backends::Choice::Only(kind),
            ..vireo_rpc::load::LoadConfig::new(server.addr.clone())
        })
        .unwrap();
        assert_eq!(report.errors, 0, "{kind}: {:?}", report.error_samples);
        assert_eq!(report.sent, report.received, "{kind}");
        assert!(report.received >= 2000, "{kind}: {}", report.received);
        server.assert_serves();
        let summary = server.stop();
        assert!(summary.clients_accepted >= 1001, "{kind}");
    }
}

#[test]
fn max_clients_pauses_accepting_until_one_leaves() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| c.max_clients = 3);
        let mut first: Vec<_> = (0..3).map(|_| server.client()).collect();
        for c in &mut first {
            assert_eq!(c.echo(b"in").unwrap(), b"in", "{kind}");
        }
        // The fourth connects (the kernel queues it) but is not accepted, so its call waits.
        let mut waiting = server.raw();
        send(
            &mut waiting,
            &proto::encode_frame(&Header::call(1, 42), b"late"),
        );
        waiting
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let early = loop {
            match std::io::Read::read(&mut waiting, &mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        assert!(
            early.as_ref().is_err_and(|e| matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )),
            "{kind}: served beyond max_clients: {early:?}"
        );
        // One leaves: the fourth is accepted and answered.
        drop(first.pop());
        waiting.set_read_timeout(Some(common::PATIENCE)).unwrap();
        let reply = common::read_frame(&mut waiting);
        assert_eq!(
            (reply.header.serial, &reply.payload[..]),
            (42, &b"late"[..]),
            "{kind}"
        );
        drop(waiting);
        drop(first);
        server.assert_serves();
    }
}

#[test]
fn a_panicking_procedure_gets_an_error_and_the_worker_survives() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| {
            c.programs = vec![vireo_rpc::demo::program_with_test_procedures()];
            c.min_workers = 1;
            c.max_workers = 1;
        });
        let mut c = server.client();
        for _ in 0..3 {
            let reply = c.call(TEST_PANIC_PROCEDURE, &[]).unwrap();
            assert_eq!(reply.header.status, status::ERROR, "{kind}");
            let message = reply.error_message().unwrap();
            assert!(message.contains("panicked"), "{kind}: {message}");
            // The only worker is still there.
            assert_eq!(c.echo(b"after").unwrap(), b"after", "{kind}");
        }
        let stats: serde_json::Value = serde_json::from_str(&c.stats().unwrap()).unwrap();
        assert_eq!(stats["pool"]["workers"], 1, "{kind}");
        server.assert_serves();
    }
}

#[test]
fn priority_calls_overtake_a_queue_of_slow_ones() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| {
            c.min_workers = 1;
            c.max_workers = 1;
            c.prio_workers = 1;
        });
        // Occupy the only normal worker and queue more slow calls behind it.
        let mut sleepers: Vec<_> = (0..3)
            .map(|i| {
                let mut s = server.raw();
                send(
                    &mut s,
                    &proto::encode_frame(
                        &Header::call(Procedure::Sleep as u32, i),
                        &500u32.to_be_bytes(),
                    ),
                );
                s
            })
            .collect();
        let started = Instant::now();
        let mut c = server.client();
        c.stats().unwrap();
        // STATS ran on the priority worker, well before the 1.5 s of queued sleeps.
        assert!(
            started.elapsed() < Duration::from_millis(1400),
            "{kind}: {:?}",
            started.elapsed()
        );
        for s in &mut sleepers {
            s.set_read_timeout(Some(common::PATIENCE)).unwrap();
            let mut b = [0u8; 28];
            std::io::Read::read_exact(s, &mut b).unwrap();
        }
    }
}

#[test]
fn shutdown_answers_every_call_received() {
    for (kind, pooled) in backends().into_iter().flat_map(|k| [(k, true), (k, false)]) {
        let server = TestServer::start(kind, |c| with_and_without_workers(c, pooled));
        let addr = server.addr.clone();
        let load = std::thread::spawn(move || {
            vireo_rpc::load::run_load(&vireo_rpc::load::LoadConfig {
                clients: 8,
                inflight: 8,
                duration: common::PATIENCE,
                mix: vec![(Procedure::Echo, 4), (Procedure::Sleep, 1)],
                sleep_ms: 5,
                backend: vireo_backends::Choice::Only(kind),
                ..vireo_rpc::load::LoadConfig::new(addr)
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let summary = server.stop();
        let report = load.join().unwrap();
        assert_eq!(
            summary.calls_received, summary.replies_sent,
            "{kind} pooled={pooled}: {summary:?}"
        );
        assert_eq!(summary.replies_dropped, 0, "{kind} pooled={pooled}");
        // The load generator got every reply the server sent; the calls it sent after the
        // server stopped reading were never received and are reported as lost.
        assert_eq!(
            report.received, summary.replies_sent,
            "{kind} pooled={pooled}"
        );
        assert!(report.received > 0, "{kind} pooled={pooled}");
    }
}

/// Raises the soft open-files limit towards `want` (to the hard limit at most).
fn common_raise_fd_limit(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    let target = l.maximum.map_or(want, |max| max.min(want));
    if l.current.is_some_and(|cur| cur < target) {
        l.current = Some(target);
        setrlimit(Resource::Nofile, l).expect("raise RLIMIT_NOFILE");
    }
    let got = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        got >= 2200,
        "RLIMIT_NOFILE hard limit {got} is too low for 1000 clients"
    );
}
