//! Programs in libvirt's sense: a program number, a version and a table of procedures, each a
//! handler that runs on one of the server's workers (or on the loop thread, for a server
//! without workers: [`ServerConfig::max_workers`](crate::server::ServerConfig::max_workers) 0).
//!
//! A [`Server`](crate::server::Server) serves any number of programs (see
//! [`ServerConfig::programs`](crate::server::ServerConfig::programs)); the loop thread reads a
//! whole call, finds its program and procedure, and hands it to the pool (the priority lane for
//! procedures added with [`Program::priority_procedure`]). A call of an unknown program,
//! version or procedure is answered with libvirt's error reply without reaching a worker; a
//! handler's [`RpcError`] and a handler's panic reach the client the same way.
//!
//! ```
//! use vireo_rpc::program::{Program, RpcError};
//!
//! const UPPER: u32 = 1;
//! const LEN: u32 = 2;
//!
//! let program = Program::new(0x2000_0001, 1)
//!     .procedure(UPPER, |call, out| {
//!         let text = std::str::from_utf8(call.payload())
//!             .map_err(|_| RpcError::invalid_arg("UPPER takes UTF-8 text"))?;
//!         out.extend_from_slice(text.to_uppercase().as_bytes());
//!         Ok(())
//!     })
//!     .priority_procedure(LEN, |call, out| {
//!         out.extend_from_slice(&(call.payload().len() as u32).to_be_bytes());
//!         Ok(())
//!     });
//! assert_eq!(program.procedure_numbers().collect::<Vec<_>>(), [UPPER, LEN]);
//! assert_eq!(program.is_priority(LEN), Some(true));
//! ```

use std::fmt;
use std::sync::Arc;

use crate::proto::Header;
use crate::xdr;

/// libvirt's error numbers (`virErrorNumber`) and domains (`virErrorDomain`) that vireo's own
/// replies use; a handler may use any of libvirt's.
pub mod code {
    /// `VIR_ERR_INTERNAL_ERROR`.
    pub const INTERNAL_ERROR: i32 = 1;
    /// `VIR_ERR_INVALID_ARG`.
    pub const INVALID_ARG: i32 = 8;
    /// `VIR_ERR_OPERATION_FAILED`.
    pub const OPERATION_FAILED: i32 = 9;
    /// `VIR_ERR_RPC`: an unknown program, version or procedure, a malformed call.
    pub const RPC: i32 = 39;
    /// `VIR_FROM_NONE`.
    pub const FROM_NONE: i32 = 0;
    /// `VIR_FROM_RPC`.
    pub const FROM_RPC: i32 = 7;
}

/// A failed call, sent to the client as libvirt's error reply (`virNetMessageError`: code,
/// domain, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    code: i32,
    domain: i32,
    message: String,
}

impl RpcError {
    /// An error with libvirt's error number `code` in `domain` (see [`code`]).
    pub fn new(code: i32, domain: i32, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            domain,
            message: message.into(),
        }
    }

    /// `VIR_ERR_OPERATION_FAILED`: the call was understood and could not be done.
    pub fn failed(message: impl Into<String>) -> RpcError {
        RpcError::new(code::OPERATION_FAILED, code::FROM_RPC, message)
    }

    /// `VIR_ERR_INVALID_ARG`: the call's arguments are wrong.
    pub fn invalid_arg(message: impl Into<String>) -> RpcError {
        RpcError::new(code::INVALID_ARG, code::FROM_RPC, message)
    }

    /// `VIR_ERR_RPC`: the call cannot be dispatched (unknown procedure and the like).
    pub fn rpc(message: impl Into<String>) -> RpcError {
        RpcError::new(code::RPC, code::FROM_RPC, message)
    }

    /// `VIR_ERR_INTERNAL_ERROR`.
    pub fn internal(message: impl Into<String>) -> RpcError {
        RpcError::new(code::INTERNAL_ERROR, code::FROM_RPC, message)
    }

    /// libvirt's error number.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// libvirt's error domain.
    pub fn domain(&self) -> i32 {
        self.domain
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The reply body: libvirt's `virNetMessageError`, as [`xdr::error_body`] encodes it.
    pub fn to_body(&self) -> Vec<u8> {
        xdr::error_body(self.code, self.domain, &self.message)
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RpcError {}

/// What a procedure's handler sees of the server it runs on.
pub(crate) trait CallContext: Sync {
    /// The server's name.
    fn server_name(&self) -> &str;
    /// The server's statistics, `None` when its pool is gone.
    fn stats(&self) -> Option<ServerStats>;
}

/// One call, as its handler sees it (on a worker thread, or on the loop thread for a server
/// without workers).
pub struct Call<'a> {
    pub(crate) header: Header,
    pub(crate) payload: &'a [u8],
    pub(crate) client: u64,
    pub(crate) server: &'a dyn CallContext,
}

impl Call<'_> {
    /// The call's header (program, version, procedure, serial).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The call's payload (its arguments), as the client sent it.
    pub fn payload(&self) -> &[u8] {
        self.payload
    }

    /// The id of the client that made the call, as `virt-admin srv-clients-list` shows it.
    pub fn client_id(&self) -> u64 {
        self.client
    }

    /// The name of the server the call arrived on.
    pub fn server_name(&self) -> &str {
        self.server.server_name()
    }

    /// The server's statistics now; `None` when the server's pool is gone (the daemon
    /// drains a pool before it drops it, so not while one of its calls runs). A server
    /// without workers reports a pool whose limits and counts are all 0.
    pub fn server_stats(&self) -> Option<ServerStats> {
        self.server.stats()
    }
}

impl fmt::Debug for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("header", &self.header)
            .field("payload_len", &self.payload.len())
            .field("client", &self.client)
            .field("server", &self.server.server_name())
            .finish()
    }
}

/// A snapshot of a server's state, for procedures that report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// The server's worker pool (all 0 for a server without workers).
    pub pool: vireo_pool::Stats,
    /// Clients connected to this server now.
    pub clients: usize,
    /// Calls this server received.
    pub calls_received: u64,
    /// Replies this server wrote completely.
    pub replies_sent: u64,
    /// Iterations of the daemon's event loop.
    pub loop_iterations: u64,
    /// Callbacks the daemon's event loop ran.
    pub loop_dispatched: u64,
    /// Times the loop started over on a fresh backend instance.
    pub backend_rebuilds: u64,
}

/// A procedure's handler: reads the call and appends the reply's body to `out`, or returns
/// the error the client gets. Runs on a worker thread, or on the loop thread for a server
/// without workers ([`ServerConfig::max_workers`](crate::server::ServerConfig::max_workers)
/// 0), where it holds up every other client while it runs.
///
/// `out` already holds the reply frame's length word and header (the body is written in
/// place, without a copy): append only. A handler that changes or removes those bytes, or
/// whose body would make the reply longer than [`MAX_MESSAGE`](crate::proto::MAX_MESSAGE),
/// gets `VIR_ERR_INTERNAL_ERROR` sent instead; after an `Err`, whatever it appended is
/// discarded.
pub type Handler = dyn Fn(&Call<'_>, &mut Vec<u8>) -> Result<(), RpcError> + Send + Sync;

#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) number: u32,
    pub(crate) priority: bool,
    pub(crate) handler: Arc<Handler>,
}

/// A program: its number, its version and its procedures. Cheap to clone (the handlers are
/// shared).
#[derive(Clone)]
pub struct Program {
    number: u32,
    version: u32,
    /// Sorted by procedure number.
    entries: Vec<Entry>,
}

impl Program {
    /// A program with no procedures yet.
    pub fn new(number: u32, version: u32) -> Program {
        Program {
            number,
            version,
            entries: Vec::new(),
        }
    }

    /// Adds procedure `number`, run by the pool's normal workers. A second handler for the
    /// same number replaces the first.
    pub fn procedure(
        self,
        number: u32,
        handler: impl Fn(&Call<'_>, &mut Vec<u8>) -> Result<(), RpcError> + Send + Sync + 'static,
    ) -> Program {
        self.insert(number, false, Arc::new(handler))
    }

    /// Adds procedure `number`, run by the pool's priority workers: calls that must not wait
    /// behind slow ones (libvirt's `priority` procedures). A server without workers runs it
    /// on the loop thread like any other. Handlers that block for long belong
    /// in [`procedure`](Program::procedure): there are few priority workers.
    pub fn priority_procedure(
        self,
        number: u32,
        handler: impl Fn(&Call<'_>, &mut Vec<u8>) -> Result<(), RpcError> + Send + Sync + 'static,
    ) -> Program {
        self.insert(number, true, Arc::new(handler))
    }

    fn insert(mut self, number: u32, priority: bool, handler: Arc<Handler>) -> Program {
        let entry = Entry {
            number,
            priority,
            handler,
        };
        match self.entries.binary_search_by_key(&number, |e| e.number) {
            Ok(i) => self.entries[i] = entry,
            Err(i) => self.entries.insert(i, entry),
        }
        self
    }

    /// The program number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The program version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The procedure numbers, in increasing order.
    pub fn procedure_numbers(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().map(|e| e.number)
    }

    /// Whether procedure `number` is a priority one; `None` when there is no such procedure.
    pub fn is_priority(&self, number: u32) -> Option<bool> {
        self.entry_index(number).map(|i| self.entries[i].priority)
    }

    pub(crate) fn entry_index(&self, number: u32) -> Option<usize> {
        self.entries
            .binary_search_by_key(&number, |e| e.number)
            .ok()
    }

    pub(crate) fn entry(&self, index: usize) -> &Entry {
        &self.entries[index]
    }
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("number", &format_args!("{:#x}", self.number))
            .field("version", &self.version)
            .field("procedures", &self.procedure_numbers().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_handler_for_a_number_replaces_the_first_and_order_is_kept() {
        let p = Program::new(7, 1)
            .procedure(9, |_, _| Ok(()))
            .procedure(3, |_, _| Err(RpcError::failed("first")))
            .priority_procedure(3, |_, _| Ok(()));
        assert_eq!(p.procedure_numbers().collect::<Vec<_>>(), [3, 9]);
        assert_eq!(p.is_priority(3), Some(true));
        assert_eq!(p.is_priority(9), Some(false));
        assert_eq!(p.is_priority(4), None);
    }

    #[test]
    fn an_error_encodes_as_libvirts_error_body() {
        let e = RpcError::invalid_arg("bad");
        let body = xdr::decode_error(&e.to_body()).unwrap();
        assert_eq!(
            (body.code, body.domain, body.message.as_deref()),
            (code::INVALID_ARG, code::FROM_RPC, Some("bad"))
        );
    }
}
