//! What one client on the public socket must not be able to do to the server or to the other
//! clients: change the pool, starve it, lose its own replies by half-closing, or be dropped by
//! keepalive while it waits for replies. Every test runs on every compiled backend.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{TestServer, backends, send};
use vireo_rpc::proto::{
    self, Frame, FrameReader, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, Procedure,
    status,
};
use vireo_rpc::server::{Server, ServerConfig};

fn pool_limits(server: &TestServer) -> (u64, u64, u64) {
    let stats: serde_json::Value =
        serde_json::from_str(&server.client().stats().expect("stats")).unwrap();
    let p = &stats["pool"];
    (
        p["min_workers"].as_u64().unwrap(),
        p["max_workers"].as_u64().unwrap(),
        p["max_prio_workers"].as_u64().unwrap(),
    )
}

#[test]
fn pool_administration_is_not_on_the_public_socket() {
    for kind in backends() {
        let server = TestServer::start(kind, |_| {});
        let before = pool_limits(&server);
        let mut c = server.client();
        // Procedure 5 was vireo's own SET_LIMITS; the admin socket does this now.
        let limits: Vec<u8> = [2000i64, 2000, -1]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let reply = c.call(5, &limits).unwrap();
        let message = reply.error_message().expect("an error reply");
        assert!(
            message.contains("unknown procedure: 5"),
            "{kind}: {message}"
        );
        assert_eq!(pool_limits(&server), before, "{kind}");
        // The connection stays usable.
        assert_eq!(c.echo(b"after").unwrap(), b"after", "{kind}");
    }
}

#[test]
fn threadpool_limits_above_the_ceiling_get_an_error_and_change_nothing() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| c.worker_ceiling = 8);
        let before = pool_limits(&server);
        for (min, max, prio) in [
            (Some(2000), Some(2000), None),
            (None, Some(9), None),
            (None, None, Some(9)),
            (Some(9), Some(9), None),
        ] {
            let e = server.set_limits(min, max, prio).unwrap_err();
            assert!(e.to_string().contains("ceiling of 8"), "{kind}: {e}");
        }
        assert_eq!(pool_limits(&server), before, "{kind}");
        server.set_limits(Some(1), Some(8), Some(8)).unwrap();
        assert_eq!(pool_limits(&server), (1, 8, 8), "{kind}");
    }
}

#[test]
fn bind_refuses_worker_counts_above_the_ceiling_and_a_budget_below_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = |tweak: fn(&mut ServerConfig)| {
        let mut c = ServerConfig {
            listen: vec![
                format!("unix:{}", dir.path().join("s").display())
                    .parse()
                    .unwrap(),
            ],
            ..ServerConfig::default()
        };
        tweak(&mut c);
        c
    };
    let e = Server::bind(config(|c| c.max_workers = 65)).unwrap_err();
    assert!(e.to_string().contains("ceiling"), "{e}");
    let e = Server::bind(config(|c| c.prio_workers = 100)).unwrap_err();
    assert!(e.to_string().contains("ceiling"), "{e}");
    let e = Server::bind(config(|c| c.max_buffered_input = 1024)).unwrap_err();
    assert!(e.to_string().contains("max_buffered_input"), "{e}");
    assert!(
        Server::bind(config(|c| {
            c.max_workers = 100;
            c.worker_ceiling = 100;
        }))
        .is_ok()
    );
}

/// Reads replies from a raw connection, answering keepalive pings meanwhile.
struct Replies {
    reader: FrameReader,
}

impl Replies {
    fn new() -> Replies {
        Replies {
            reader: FrameReader::new(proto::MAX_MESSAGE),
        }
    }

    /// The next frame that is not keepalive; panics when the server closes first.
    fn next(&mut self, s: &mut UnixStream) -> Frame {
        loop {
            while let Some(f) = self.reader.next_frame().expect("a valid frame") {
                if f.header.program != KEEPALIVE_PROGRAM {
                    return f;
                }
                if f.header.is_keepalive(KEEPALIVE_PING) {
                    let pong = proto::encode_frame(&Header::keepalive(KEEPALIVE_PONG), &[]);
                    s.write_all(&pong).unwrap();
                }
            }
            match self.reader.read_from(s) {
                Ok(0) => panic!("the server closed the connection"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

/// The next reply on a connection whose replies come one at a time.
fn read_reply(s: &mut UnixStream) -> Frame {
    Replies::new().next(s)
}

#[test]
fn a_throttled_client_that_answers_pings_gets_every_reply() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| {
            c.keepalive_interval = Some(Duration::from_millis(100));
            c.keepalive_count = 3;
            c.max_client_requests = 2;
        });
        let mut s = server.raw();
        // Four calls of 600 ms each, two at a time: the client is throttled for ~1.2 s, far
        // longer than keepalive's 400 ms (3 unanswered pings, 100 ms apart).
        for serial in 1..=4 {
            let call = Header::call(Procedure::Sleep as u32, serial);
            send(&mut s, &proto::encode_frame(&call, &600u32.to_be_bytes()));
        }
        let mut replies = Replies::new();
        let mut serials: Vec<u32> = (0..4)
            .map(|_| {
                let f = replies.next(&mut s);
                assert_eq!(f.header.status, status::OK, "{kind}");
                f.header.serial
            })
            .collect();
        serials.sort_unstable();
        assert_eq!(serials, [1, 2, 3, 4], "{kind}");
        server.assert_serves();
        assert_eq!(server.stop().clients_dropped, 0, "{kind}");
    }
}

#[test]
fn a_client_that_half_closes_gets_every_reply_then_eof() {
    for kind in backends() {
        let server = TestServer::start(kind, |c| c.max_client_requests = 2);
        let mut s = server.raw();
        // More calls than the throttle lets in at once, one of them slow.
        let mut calls = Vec::new();
        for serial in 1..=7u32 {
            let (procedure, payload) = if serial == 3 {
                (Procedure::Sleep, 100u32.to_be_bytes().to_vec())
            } else {
                (Procedure::Echo, serial.to_be_bytes().to_vec())
            };
            calls.extend(proto::encode_frame(
                &Header::call(procedure as u32, serial),
                &payload,
            ));
        }
        send(&mut s, &calls);
        s.shutdown(Shutdown::Write).unwrap();
        let mut replies = Replies::new();
        let mut serials: Vec<u32> = (0..7).map(|_| replies.next(&mut s).header.serial).collect();
        serials.sort_unstable();
        assert_eq!(serials, [1, 2, 3, 4, 5, 6, 7], "{kind}");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "{kind}: {} bytes after the replies",
            rest.len()
        );
        let summary = server.stop();
        assert_eq!(summary.replies_sent, summary.calls_received, "{kind}");
        assert_eq!(summary.replies_dropped, 0, "{kind}");
    }
}

#[test]
fn a_half_close_with_an_unfinished_frame_closes_without_a_reply() {
    for kind in backends() {
        let server = TestServer::start(kind, |_| {});
        let mut s = server.raw();
        let frame = proto::encode_frame(&Header::call(Procedure::Echo as u32, 1), b"abc");
        send(&mut s, &frame[..frame.len() - 1]);
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{kind}");
        server.assert_serves();
    }
}

/// A frame of `len` bytes (length word included) of the ECHO procedure, header and payload.
fn echo_frame(serial: u32, len: usize) -> Vec<u8> {
    proto::encode_frame(
        &Header::call(Procedure::Echo as u32, serial),
        &vec![(serial % 251) as u8; len - proto::MIN_FRAME_LEN],
    )
}

#[test]
fn large_frames_wait_for_the_input_budget_and_none_is_lost() {
    for kind in backends() {
        // A budget of exactly one largest message: two large frames cannot be assembled at
        // once, so the second client's reading pauses until the first frame completes.
        let server = TestServer::start(kind, |c| c.max_buffered_input = proto::MAX_MESSAGE);
        let big = proto::MAX_MESSAGE + proto::LEN_WORD;
        let mut a = server.raw();
        let mut b = server.raw();
        let frame_a = echo_frame(1, big);
        let frame_b = echo_frame(2, big);
        // A reserves the budget with the first MiB of its frame.
        send(&mut a, &frame_a[..1 << 20]);
        server.assert_serves();
        let writer_b = {
            let mut b = b.try_clone().unwrap();
            std::thread::spawn(move || b.write_all(&frame_b).unwrap())
        };
        // B is paused; small calls are served meanwhile.
        server.assert_serves();
        let writer_a = {
            let mut a = a.try_clone().unwrap();
            let rest = frame_a[1 << 20..].to_vec();
            std::thread::spawn(move || a.write_all(&rest).unwrap())
        };
        let reply_a = read_reply(&mut a);
        assert_eq!(
            (reply_a.header.serial, reply_a.payload.len()),
            (1, big - proto::MIN_FRAME_LEN),
            "{kind}"
        );
        let reply_b = read_reply(&mut b);
        assert_eq!(
            (reply_b.header.serial, reply_b.payload.len()),
            (2, big - proto::MIN_FRAME_LEN),
            "{kind}"
        );
        assert!(reply_b.payload.iter().all(|&x| x == 2), "{kind}");
        writer_a.join().unwrap();
        writer_b.join().unwrap();
        server.assert_serves();
    }
}
