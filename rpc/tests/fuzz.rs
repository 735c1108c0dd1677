//! Fuzzing the frame reader and the server's per-client read path with arbitrary bytes in
//! arbitrary chunks (proptest generators biased towards the protocol's edges: lengths near the
//! minimum and the limit, valid headers, keepalive frames, garbage).
//!
//! Invariants: nothing panics; memory stays within the frame being assembled plus one read;
//! cutting the same bytes into different chunks gives the same frames and the same error;
//! every outcome is a decoded frame or a protocol error; the server answers or closes, and keeps
//! serving others.
//!
//! `VIREO_FUZZ_SECONDS` runs the reader fuzzer for that long (`scripts/fuzz.sh` sets it);
//! without it each property runs its default case count. The seeds in `rpc/fuzz/corpus/` run
//! first.

mod common;

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vireo_rpc::proto::{
    self, Frame, FrameReader, Header, KEEPALIVE_PING, MIN_FRAME_LEN, ProtocolError,
};

const LIMIT: usize = 4096;

/// The reference: decode `bytes` in one piece, the obvious way.
fn reference(bytes: &[u8], max_message: usize) -> (Vec<Frame>, Option<ProtocolError>) {
    let max_len = max_message + 4;
    let mut frames = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 4 {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        if (len as usize) < MIN_FRAME_LEN {
            return (frames, Some(ProtocolError::TooShort(len)));
        }
        if len as usize > max_len {
            return (frames, Some(ProtocolError::TooLong { len, max: max_len }));
        }
        let len = len as usize;
        if bytes.len() - at < len {
            break;
        }
        let header = Header::from_bytes(bytes[at + 4..at + 28].try_into().unwrap());
        frames.push(Frame {
            header,
            payload: bytes[at + 28..at + len].to_vec(),
        });
        at += len;
    }
    (frames, None)
}

/// A source that hands out `bytes` in the given chunk sizes, then end of stream.
struct Chunks<'a> {
    bytes: &'a [u8],
    sizes: Vec<usize>,
    turn: usize,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.sizes[self.turn % self.sizes.len()].max(1);
        self.turn += 1;
        let n = size.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

/// Runs the reader over `bytes` cut into `sizes`, through `read_from`.
fn through_reader(
    bytes: &[u8],
    sizes: Vec<usize>,
    max_message: usize,
) -> (Vec<Frame>, Option<ProtocolError>, usize) {
    let mut r = FrameReader::new(max_message);
    let mut src = Chunks {
        bytes,
        sizes,
        turn: 0,
    };
    let mut frames = Vec::new();
    let mut peak = 0;
    loop {
        match r.next_frame() {
            Ok(Some(f)) => {
                frames.push(f);
                continue;
            }
            Ok(None) => {}
            Err(e) => return (frames, Some(e), peak),
        }
        match r.read_from(&mut src) {
            Ok(0) => return (frames, None, peak),
            Ok(_) => peak = peak.max(r.capacity()),
            Err(e) => match e
                .into_inner()
                .and_then(|e| e.downcast::<ProtocolError>().ok())
            {
                Some(p) => return (frames, Some(*p), peak),
                None => panic!("a read from memory failed"),
            },
        }
    }
}

/// Byte strings biased towards the protocol: whole frames (valid or not), cut frames, edge
/// lengths, garbage.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        // A valid frame with a small payload.
        (
            any::<[u32; 6]>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(h, p)| {
                let header = Header {
                    program: h[0],
                    version: h[1],
                    procedure: h[2],
                    kind: h[3],
                    serial: h[4],
                    status: h[5],
                };
                proto::encode_frame(&header, &p)
            }),
        // A keepalive ping.
        Just(proto::encode_frame(&Header::keepalive(KEEPALIVE_PING), &[])),
        // A length word at an edge, then some bytes.
        (
            prop_oneof![
                Just(0u32),
                Just(4),
                Just(27),
                Just(28),
                Just(LIMIT as u32 + 4),
                Just(LIMIT as u32 + 5),
                Just(u32::MAX),
                any::<u32>()
            ],
            proptest::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(len, rest)| {
                let mut v = len.to_be_bytes().to_vec();
                v.extend(rest);
                v
            }),
        // Garbage.
        proptest::collection::vec(any::<u8>(), 0..32),
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
}

fn sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..300, 1..8)
}

fn check_reader(bytes: &[u8], sizes: Vec<usize>) -> Result<(), TestCaseError> {
    let (want_frames, want_err) = reference(bytes, LIMIT);
    let (frames, err, peak) = through_reader(bytes, sizes, LIMIT);
    prop_assert_eq!(&frames, &want_frames);
    prop_assert_eq!(err, want_err);
    // The frame being assembled (at most the limit) plus one read of at most 64 KiB.
    prop_assert!(peak <= LIMIT + 4 + 64 * 1024, "peak {}", peak);
    // Fed byte by byte through `feed`, the same outcome.
    let mut r = FrameReader::new(LIMIT);
    let mut fed = Vec::new();
    let mut fed_err = None;
    'outer: for b in bytes {
        r.feed(std::slice::from_ref(b));
        loop {
            match r.next_frame() {
                Ok(Some(f)) => fed.push(f),
                Ok(None) => break,
                Err(e) => {
                    fed_err = Some(e);
                    break 'outer;
                }
            }
        }
    }
    prop_assert_eq!(&fed, &want_frames);
    prop_assert_eq!(fed_err, want_err);
    Ok(())
}

#[test]
fn corpus_seeds_decode_like_the_reference() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("rpc/fuzz/corpus exists") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for cut in [1, 3, 7, 64, 4096] {
            check_reader(&bytes, vec![cut]).unwrap();
        }
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} seeds");
}

#[test]
fn frame_reader_matches_the_reference_in_any_chunking() {
    let seconds: Option<u64> = std::env::var("VIREO_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let cases = if seconds.is_some() { 1_000 } else { 256 };
    let deadline = Instant::now() + Duration::from_secs(seconds.unwrap_or(0));
    let mut rounds = 0u64;
    loop {
        // A fresh runner each round: a new random seed, and `cases` new inputs.
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&(stream(), sizes()), |(bytes, sizes)| {
                check_reader(&bytes, sizes)
            })
            .unwrap();
        rounds += 1;
        if Instant::now() >= deadline {
            break;
        }
    }
    if seconds.is_some() {
        eprintln!(
            "fuzzed the frame reader with {} inputs",
            rounds * u64::from(cases)
        );
    }
}

#[test]
fn server_answers_or_closes_on_arbitrary_bytes_and_keeps_serving() {
    let Some(kind) = common::backends().into_iter().next() else {
        return;
    };
    let server = common::TestServer::start(kind, |c| {
        c.max_message_size = LIMIT;
        c.keepalive_interval = Some(Duration::from_millis(200));
        c.keepalive_count = 1;
    });
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(stream(), sizes()), |(bytes, sizes)| {
            let mut s = server.raw();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut at = 0;
            let mut i = 0;
            while at < bytes.len() {
                let n = sizes[i % sizes.len()].min(bytes.len() - at);
                if s.write_all(&bytes[at..at + n]).is_err() {
                    break; // closed for a protocol error
                }
                at += n;
                i += 1;
            }
            // Whatever comes back must be well-formed frames.
            let mut reader = FrameReader::new(proto::MAX_MESSAGE);
            loop {
                match reader.read_from(&mut s) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        break;
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            while let Some(f) = reader
                .next_frame()
                .map_err(|e| TestCaseError::fail(e.to_string()))?
            {
                prop_assert!(
                    f.header.kind == proto::kind::REPLY
                        || f.header.is_keepalive(proto::KEEPALIVE_PONG)
                        || f.header.is_keepalive(KEEPALIVE_PING),
                    "{:?}",
                    f.header
                );
            }
            drop(s);
            server.assert_serves();
            Ok(())
        })
        .unwrap();
}
