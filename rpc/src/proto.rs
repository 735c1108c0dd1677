//! The wire protocol: libvirt's framing, vireo's program.
//!
//! A frame is a `u32` big-endian length that counts itself, a 24-byte header of six `u32`
//! big-endian fields (`program, version, procedure, type, serial, status`), then the payload.
//! A length below [`MIN_FRAME_LEN`] or above the reader's limit (at most [`MAX_MESSAGE`] + 4) is
//! a protocol error.
//!
//! ```
//! use vireo_rpc::proto::{FrameReader, Header, Procedure, encode_frame, MAX_MESSAGE};
//!
//! let bytes = encode_frame(&Header::call(Procedure::Echo as u32, 7), b"hi");
//! let mut reader = FrameReader::new(MAX_MESSAGE);
//! reader.feed(&bytes[..5]);
//! assert!(reader.next_frame().unwrap().is_none()); // a partial frame waits for more bytes
//! reader.feed(&bytes[5..]);
//! let frame = reader.next_frame().unwrap().unwrap();
//! assert_eq!((frame.header.serial, &frame.payload[..]), (7, &b"hi"[..]));
//! ```

use std::fmt;
use std::io::{self, Read};

/// vireo's demo program number (`"vire"`), served by [`crate::demo::program`].
pub const PROGRAM: u32 = 0x7669_7265;
/// The demo program's version.
pub const VERSION: u32 = 1;
/// libvirt's keepalive program (`"keep"`).
pub const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;
/// The keepalive program's version.
pub const KEEPALIVE_VERSION: u32 = 1;
/// Keepalive procedure: a request to answer with [`KEEPALIVE_PONG`].
pub const KEEPALIVE_PING: u32 = 1;
/// Keepalive procedure: the answer to [`KEEPALIVE_PING`].
pub const KEEPALIVE_PONG: u32 = 2;

/// Bytes in the length word.
pub const LEN_WORD: usize = 4;
/// Bytes in the header.
pub const HEADER_LEN: usize = 24;
/// The smallest valid length word: the length word and the header, no payload.
pub const MIN_FRAME_LEN: usize = LEN_WORD + HEADER_LEN;
/// The largest message (header and payload, without the length word): 16 MiB, libvirt's
/// `VIR_NET_MESSAGE_MAX`. The largest valid length word is this plus 4.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// The longest `SLEEP` a call may ask for, in milliseconds.
pub const MAX_SLEEP_MS: u32 = 60_000;

/// Message types (the header's `type` field).
pub mod kind {
    /// A call from a client.
    pub const CALL: u32 = 0;
    /// A reply to a call.
    pub const REPLY: u32 = 1;
    /// A message that expects no reply (keepalive).
    pub const MESSAGE: u32 = 2;
}

/// Reply status (the header's `status` field).
pub mod status {
    /// Success: the payload is the procedure's result.
    pub const OK: u32 = 0;
    /// Failure: the payload is libvirt's error body (`virNetMessageError`, see
    /// [`crate::xdr::decode_error`]).
    pub const ERROR: u32 = 1;
}

/// The procedures of [`PROGRAM`] (see [`crate::demo`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Procedure {
    /// The reply payload is the call payload.
    Echo = 1,
    /// Payload: `u32` BE milliseconds (≤ [`MAX_SLEEP_MS`]); an empty reply after sleeping.
    Sleep = 2,
    /// The reply is the `u64` BE FNV-1a-64 hash of the payload.
    Hash = 3,
    /// Priority: the reply is UTF-8 JSON with pool, loop and client statistics.
    Stats = 4,
}

impl Procedure {
    /// Every procedure, by number.
    pub const ALL: [Procedure; 4] = [
        Procedure::Echo,
        Procedure::Sleep,
        Procedure::Hash,
        Procedure::Stats,
    ];

    /// The procedure with number `n`, if there is one.
    pub fn from_u32(n: u32) -> Option<Procedure> {
        Procedure::ALL.into_iter().find(|p| *p as u32 == n)
    }

    /// Whether priority workers run it (administrative calls that must not wait behind slow
    /// ones).
    pub fn is_priority(self) -> bool {
        matches!(self, Procedure::Stats)
    }

    /// The lower-case name used by the command line.
    pub fn name(self) -> &'static str {
        match self {
            Procedure::Echo => "echo",
            Procedure::Sleep => "sleep",
            Procedure::Hash => "hash",
            Procedure::Stats => "stats",
        }
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Program number ([`PROGRAM`] or [`KEEPALIVE_PROGRAM`]).
    pub program: u32,
    /// Program version.
    pub version: u32,
    /// Procedure number within the program.
    pub procedure: u32,
    /// Message type ([`kind`]).
    pub kind: u32,
    /// Chosen by the client for a call; echoed by its reply.
    pub serial: u32,
    /// [`status`] of a reply; `OK` otherwise.
    pub status: u32,
}

impl Header {
    /// A call of vireo's program.
    pub fn call(procedure: u32, serial: u32) -> Header {
        Header {
            program: PROGRAM,
            version: VERSION,
            procedure,
            kind: kind::CALL,
            serial,
            status: status::OK,
        }
    }

    /// A keepalive message (`KEEPALIVE_PING` or `KEEPALIVE_PONG`).
    pub fn keepalive(procedure: u32) -> Header {
        Header {
            program: KEEPALIVE_PROGRAM,
            version: KEEPALIVE_VERSION,
            procedure,
            kind: kind::MESSAGE,
            serial: 0,
            status: status::OK,
        }
    }

    /// The header of a reply to this call: program, version, procedure and serial echoed.
    pub fn reply(&self, status: u32) -> Header {
        Header {
            kind: kind::REPLY,
            status,
            ..*self
        }
    }

    /// Whether this is a keepalive message with procedure `procedure`.
    pub fn is_keepalive(&self, procedure: u32) -> bool {
        self.program == KEEPALIVE_PROGRAM
            && self.version == KEEPALIVE_VERSION
            && self.kind == kind::MESSAGE
            && self.procedure == procedure
    }

    /// The header's 24 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let fields = [
            self.program,
            self.version,
            self.procedure,
            self.kind,
            self.serial,
            self.status,
        ];
        for (chunk, field) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&field.to_be_bytes());
        }
        out
    }

    /// Reads a header from its 24 bytes.
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Header {
        let field = |i: usize| {
            u32::from_be_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ])
        };
        Header {
            program: field(0),
            version: field(1),
            procedure: field(2),
            kind: field(3),
            serial: field(4),
            status: field(5),
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The payload (may be empty).
    pub payload: Vec<u8>,
}

/// Encodes a whole frame: length word, header, payload.
///
/// # Panics
///
/// When the frame would not fit the length word (a payload of 4 GiB or more); the reader's
/// limit rejects far smaller frames.
pub fn encode_frame(header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MIN_FRAME_LEN + payload.len());
    encode_frame_into(&mut out, header, payload);
    out
}

/// Appends a whole frame to `out`.
///
/// # Panics
///
/// As [`encode_frame`].
pub fn encode_frame_into(out: &mut Vec<u8>, header: &Header, payload: &[u8]) {
    let len = u32::try_from(MIN_FRAME_LEN + payload.len()).expect("frame longer than 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(payload);
}

/// A frame that breaks the protocol; the connection it came from cannot be read further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length word is below [`MIN_FRAME_LEN`].
    TooShort(u32),
    /// The length word is above the limit (`max` counts the length word).
    TooLong {
        /// The length word received.
        len: u32,
        /// The largest length word accepted.
        max: usize,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::TooShort(len) => write!(
                f,
                "frame length {len} is below the minimum of {MIN_FRAME_LEN} bytes"
            ),
            ProtocolError::TooLong { len, max } => {
                write!(f, "frame length {len} is above the limit of {max} bytes")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

impl From<ProtocolError> for io::Error {
    fn from(e: ProtocolError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// The most one read asks for beyond the frame being assembled.
const READ_CHUNK: usize = 64 * 1024;
/// What one read asks for at first; doubled (up to [`READ_CHUNK`]) each time a read fills it.
const FIRST_CHUNK: usize = 4 * 1024;

/// Assembles frames from a byte stream that arrives in pieces of any size.
///
/// Memory follows the bytes that actually arrived, not what a length word announces: each
/// read offers room for as many bytes as are already buffered or one read chunk, whichever
/// is more (the chunk starts at 4 KiB and doubles, up to 64 KiB, while reads fill it), and
/// never more than the rest of the frame being assembled plus one chunk. A peer that
/// announces a 16 MiB frame and sends one more byte costs about 4 KiB, and a whole 16 MiB
/// frame is assembled in a logarithmic number of doublings. The buffer is kept between reads, so its bytes are
/// initialized once, not on every read; a connection that sends small calls keeps a small
/// buffer (4 KiB to start).
#[derive(Debug)]
pub struct FrameReader {
    /// Initialized storage; `pos..end` holds the unconsumed bytes.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    chunk: usize,
    /// Whether the last read filled all the room it was given.
    filled: bool,
    max_len: usize,
    failed: Option<ProtocolError>,
}

impl FrameReader {
    /// A reader accepting messages of up to `max_message` bytes (header and payload, at most
    /// [`MAX_MESSAGE`]; larger values are clamped to it).
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            pos: 0,
            end: 0,
            chunk: FIRST_CHUNK,
            filled: false,
            max_len: max_message.clamp(HEADER_LEN, MAX_MESSAGE) + LEN_WORD,
            failed: None,
        }
    }

    /// The largest length word this reader accepts.
    pub fn max_frame_len(&self) -> usize {
        self.max_len
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// The length (length word included) of the frame being assembled, once its length word
    /// has arrived and is valid.
    pub fn pending_frame_len(&mut self) -> Option<usize> {
        self.front_len().ok().flatten()
    }

    /// Bytes this reader holds room for.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Makes `room` bytes writable after the unconsumed ones.
    fn reserve(&mut self, room: usize) {
        if self.pos > 0 && self.end + room > self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end + room > self.buf.len() {
            self.buf.resize(self.end + room, 0);
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// The length word of the frame at the front, checked, once its 4 bytes are in.
    fn front_len(&mut self) -> Result<Option<usize>, ProtocolError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let avail = &self.buf[self.pos..self.end];
        if avail.len() < LEN_WORD {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        let e = if (len as usize) < MIN_FRAME_LEN {
            ProtocolError::TooShort(len)
        } else if len as usize > self.max_len {
            ProtocolError::TooLong {
                len,
                max: self.max_len,
            }
        } else {
            return Ok(Some(len as usize));
        };
        self.failed = Some(e);
        Err(e)
    }

    /// Reads once from `source` into the buffer, never more than the frame being assembled
    /// plus 64 KiB. Returns the bytes read (0 at end of stream).
    ///
    /// # Errors
    ///
    /// The read's error (`WouldBlock` included) or the protocol error of the frame at the front
    /// (then nothing is read: the stream is unusable).
    pub fn read_from(&mut self, source: &mut impl Read) -> io::Result<usize> {
        let front = self.front_len()?.unwrap_or(0);
        let missing = front.saturating_sub(self.buffered());
        // Grow geometrically with what arrived: never make room for the whole announced frame
        // up front, or a length word alone would commit (and zero) 16 MiB.
        let want = (missing + self.chunk).min(self.chunk.max(self.buffered()));
        self.reserve(want);
        let n = source.read(&mut self.buf[self.end..self.end + want])?;
        self.end += n;
        self.filled = n == want;
        if self.filled && self.chunk < READ_CHUNK {
            self.chunk *= 2;
        }
        Ok(n)
    }

    /// Whether the last [`read_from`](FrameReader::read_from) filled all the room it offered:
    /// when it did not, a stream socket most likely has nothing more right now, and a caller
    /// driven by level-triggered readiness can skip the read that would say `WouldBlock`.
    pub fn filled_last_read(&self) -> bool {
        self.filled
    }

    /// The next complete frame, if one is buffered.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] for a bad length word; every later call returns it again.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let Some(len) = self.front_len()? else {
            return Ok(None);
        };
        if self.buffered() < len {
            return Ok(None);
        }
        let frame = &self.buf[self.pos..self.pos + len];
        let header: &[u8; HEADER_LEN] = frame[LEN_WORD..MIN_FRAME_LEN]
            .try_into()
            .expect("the length was checked");
        let frame = Frame {
            header: Header::from_bytes(header),
            payload: frame[MIN_FRAME_LEN..].to_vec(),
        };
        self.pos += len;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
            // Give back the room a large frame needed.
            if self.buf.len() > 2 * READ_CHUNK {
                self.buf.truncate(READ_CHUNK);
                self.buf.shrink_to_fit();
            }
        }
        Ok(Some(frame))
    }
}

/// The FNV-1a 64-bit hash (the `HASH` procedure).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.extend(std::iter::repeat_n(0u8, 40));
        v
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            program: 1,
            version: 2,
            procedure: 3,
            kind: 4,
            serial: 5,
            status: 6,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        assert_eq!(&h.to_bytes()[..8], &[0, 0, 0, 1, 0, 0, 0, 2]);
    }

    #[test]
    fn frames_split_at_every_byte_are_reassembled() {
        let mut bytes = encode_frame(&Header::call(1, 1), b"first");
        bytes.extend(encode_frame(&Header::call(3, 2), b""));
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(MAX_MESSAGE);
            let mut got = Vec::new();
            for part in [&bytes[..cut], &bytes[cut..]] {
                r.feed(part);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push((f.header.serial, f.payload));
                }
            }
            assert_eq!(got, vec![(1, b"first".to_vec()), (2, vec![])], "cut {cut}");
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn short_and_long_lengths_are_errors_that_stick() {
        for len in [0, 4, 27] {
            let mut r = FrameReader::new(MAX_MESSAGE);
            r.feed(&frame(len));
            assert_eq!(r.next_frame(), Err(ProtocolError::TooShort(len)));
            assert_eq!(r.next_frame(), Err(ProtocolError::TooShort(len)));
        }
        let mut r = FrameReader::new(MAX_MESSAGE);
        r.feed(&frame(MAX_MESSAGE as u32 + 5));
        assert!(matches!(r.next_frame(), Err(ProtocolError::TooLong { .. })));
        // The largest valid length is accepted (and waits for its bytes).
        let mut r = FrameReader::new(MAX_MESSAGE);
        r.feed(&frame(MAX_MESSAGE as u32 + 4));
        assert_eq!(r.next_frame(), Ok(None));
        // A smaller limit is honoured.
        let mut r = FrameReader::new(1024);
        r.feed(&frame(1029));
        assert!(matches!(
            r.next_frame(),
            Err(ProtocolError::TooLong {
                len: 1029,
                max: 1028
            })
        ));
    }

    #[test]
    fn memory_grows_with_the_bytes_that_arrived_not_with_the_length_word() {
        // A stream that claims a 16 MiB frame, then sends one byte at a time.
        let mut r = FrameReader::new(MAX_MESSAGE);
        let word = (MAX_MESSAGE as u32 + 4).to_be_bytes();
        let mut src: &[u8] = &word;
        r.read_from(&mut src).unwrap();
        for _ in 0..3 {
            let mut src: &[u8] = &[0];
            r.read_from(&mut src).unwrap();
        }
        assert_eq!(r.buffered(), 7);
        assert!(r.capacity() <= 2 * FIRST_CHUNK, "{}", r.capacity());
        // The whole frame still arrives, through doublings.
        let body = vec![7u8; MAX_MESSAGE - 3];
        let mut src: &[u8] = &body;
        let mut reads = 0;
        while !src.is_empty() {
            let before = r.buffered();
            r.read_from(&mut src).unwrap();
            assert!(r.buffered() - before <= before.max(READ_CHUNK));
            reads += 1;
        }
        assert!(reads < 64, "{reads} reads for 16 MiB");
        let frame = r.next_frame().unwrap().expect("a whole frame");
        assert_eq!(frame.payload.len(), MAX_MESSAGE - HEADER_LEN);
        // Without a length word, one chunk.
        let mut r = FrameReader::new(MAX_MESSAGE);
        let mut src: &[u8] = &[0, 0, 0];
        r.read_from(&mut src).unwrap();
        assert!(r.capacity() <= 2 * READ_CHUNK);
    }

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn procedures_and_priorities() {
        for p in Procedure::ALL {
            assert_eq!(Procedure::from_u32(p as u32), Some(p));
        }
        assert_eq!(Procedure::from_u32(0), None);
        assert!(Procedure::Stats.is_priority() && !Procedure::Sleep.is_priority());
    }
}
