//! A blocking client: one call at a time, keepalive answered while it waits.
//!
//! ```no_run
//! use vireo_rpc::client::Client;
//!
//! let mut client = Client::connect(&"unix:/tmp/vireo.sock".parse()?)?;
//! assert_eq!(client.echo(b"hello")?, b"hello");
//! println!("{}", client.stats()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use crate::net::Stream;
use crate::proto::{
    self, FrameReader, Header, KEEPALIVE_PING, KEEPALIVE_PONG, MAX_MESSAGE, Procedure, status,
};
use crate::server::ListenAddr;

/// An error reply: the server's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError(pub String);

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server error: {}", self.0)
    }
}

impl std::error::Error for RemoteError {}

impl From<RemoteError> for io::Error {
    fn from(e: RemoteError) -> io::Error {
        io::Error::other(e)
    }
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply's header (program, version, procedure and serial of the call).
    pub header: Header,
    /// The payload: the result, or libvirt's error body for an error.
    pub payload: Vec<u8>,
}

impl Reply {
    /// Whether the status is OK.
    pub fn is_ok(&self) -> bool {
        self.header.status == status::OK
    }

    /// The message of an error reply: the one in libvirt's error body, or the payload as
    /// text when it is not one; `None` for an OK reply.
    pub fn error_message(&self) -> Option<String> {
        if self.is_ok() {
            return None;
        }
        Some(match crate::xdr::decode_error(&self.payload) {
            Ok(e) => e
                .message
                .unwrap_or_else(|| format!("error {} in domain {}", e.code, e.domain)),
            Err(_) => String::from_utf8_lossy(&self.payload).into_owned(),
        })
    }

    /// The payload of an OK reply, or the error message.
    ///
    /// # Errors
    ///
    /// [`RemoteError`] with the message of an error reply (see
    /// [`error_message`](Reply::error_message)).
    pub fn into_result(self) -> Result<Vec<u8>, RemoteError> {
        match self.error_message() {
            None => Ok(self.payload),
            Some(message) => Err(RemoteError(message)),
        }
    }
}

/// A connection that makes one call at a time.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    reader: FrameReader,
    serial: u32,
}

impl Client {
    /// Connects to a server.
    ///
    /// # Errors
    ///
    /// The connect error.
    pub fn connect(addr: &ListenAddr) -> io::Result<Client> {
        Ok(Client {
            stream: Stream::connect(addr)?,
            reader: FrameReader::new(MAX_MESSAGE),
            serial: 0,
        })
    }

    /// Limits how long one read or write may block (`None`: no limit, the default).
    ///
    /// # Errors
    ///
    /// The socket option's error.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_timeouts(timeout)
    }

    /// Sends a call with any header fields (for tests of the server's checks) and waits for
    /// the reply with its serial, answering keepalive pings meanwhile.
    ///
    /// # Errors
    ///
    /// I/O errors; `UnexpectedEof` when the server closes the connection; `InvalidData` for a
    /// malformed frame or a reply to another serial.
    pub fn call_with_header(&mut self, header: Header, payload: &[u8]) -> io::Result<Reply> {
        self.stream
            .write_all(&proto::encode_frame(&header, payload))?;
        loop {
            while let Some(frame) = self.reader.next_frame()? {
                if frame.header.is_keepalive(KEEPALIVE_PING) {
                    let pong = proto::encode_frame(&Header::keepalive(KEEPALIVE_PONG), &[]);
                    self.stream.write_all(&pong)?;
                    continue;
                }
                if frame.header.program == proto::KEEPALIVE_PROGRAM {
                    continue;
                }
                if frame.header.serial != header.serial {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "reply to serial {} while waiting for {}",
                            frame.header.serial, header.serial
                        ),
                    ));
                }
                return Ok(Reply {
                    header: frame.header,
                    payload: frame.payload,
                });
            }
            match self.reader.read_from(&mut self.stream) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Calls `procedure` of vireo's program with the next serial.
    ///
    /// # Errors
    ///
    /// As [`call_with_header`](Client::call_with_header).
    pub fn call(&mut self, procedure: u32, payload: &[u8]) -> io::Result<Reply> {
        self.serial = self.serial.wrapping_add(1);
        self.call_with_header(Header::call(procedure, self.serial), payload)
    }

    fn call_ok(&mut self, procedure: Procedure, payload: &[u8]) -> io::Result<Vec<u8>> {
        Ok(self.call(procedure as u32, payload)?.into_result()?)
    }

    /// `ECHO`: returns the payload.
    ///
    /// # Errors
    ///
    /// I/O errors, or a [`RemoteError`] wrapped in `io::Error`.
    pub fn echo(&mut self, payload: &[u8]) -> io::Result<Vec<u8>> {
        self.call_ok(Procedure::Echo, payload)
    }

    /// `HASH`: the FNV-1a-64 hash of the payload.
    ///
    /// # Errors
    ///
    /// As [`echo`](Client::echo); `InvalidData` for a reply that is not 8 bytes.
    pub fn hash(&mut self, payload: &[u8]) -> io::Result<u64> {
        let reply = self.call_ok(Procedure::Hash, payload)?;
        let bytes: [u8; 8] = reply
            .as_slice()
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "HASH reply is not 8 bytes"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// `SLEEP`: a slow call that takes `ms` milliseconds in a worker.
    ///
    /// # Errors
    ///
    /// As [`echo`](Client::echo).
    pub fn sleep(&mut self, ms: u32) -> io::Result<()> {
        self.call_ok(Procedure::Sleep, &ms.to_be_bytes()).map(drop)
    }

    /// `STATS`: the server's statistics as JSON text.
    ///
    /// # Errors
    ///
    /// As [`echo`](Client::echo).
    pub fn stats(&mut self) -> io::Result<String> {
        let reply = self.call_ok(Procedure::Stats, &[])?;
        String::from_utf8(reply)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "STATS reply is not UTF-8"))
    }
}
