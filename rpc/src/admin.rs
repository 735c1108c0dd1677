//! A client of libvirt's admin program (`0x06900690` v1), the protocol of `virt-admin`: it
//! talks to any libvirt daemon's admin socket (`libvirt-admin-sock`).
//!
//! ```no_run
//! use vireo_rpc::admin::AdminClient;
//!
//! let mut admin = AdminClient::connect("/run/libvirt/libvirt-admin-sock".as_ref())?;
//! for server in admin.list_servers()? {
//!     for p in admin.threadpool_parameters(&server)? {
//!         println!("{server} {}: {:?}", p.field, p.value);
//!     }
//! }
//! admin.close()?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::io;
use std::path::Path;
use std::time::Duration;

use crate::client::Client;
use crate::proto::{Header, kind, status};
use crate::server::ListenAddr;
use crate::xdr::{Decoder, Encoder, TypedParam, decode_error};

/// libvirt's admin program number.
pub const ADMIN_PROGRAM: u32 = 0x0690_0690;
/// Its version.
pub const ADMIN_VERSION: u32 = 1;

/// Admin procedure numbers (libvirt's `admin_protocol.x`).
pub mod procedure {
    /// `CONNECT_OPEN { u32 flags }`.
    pub const CONNECT_OPEN: u32 = 1;
    /// `CONNECT_CLOSE`.
    pub const CONNECT_CLOSE: u32 = 2;
    /// `CONNECT_GET_LIB_VERSION` -> `u64`.
    pub const CONNECT_GET_LIB_VERSION: u32 = 3;
    /// `CONNECT_LIST_SERVERS { u32 need_results, u32 flags }` -> servers, count
    /// (`need_results` is a flag: 0 asks for the count only).
    pub const CONNECT_LIST_SERVERS: u32 = 4;
    /// `CONNECT_LOOKUP_SERVER { string name, u32 flags }` -> server.
    pub const CONNECT_LOOKUP_SERVER: u32 = 5;
    /// `SERVER_GET_THREADPOOL_PARAMETERS { server, u32 flags }` -> typed parameters.
    pub const SERVER_GET_THREADPOOL_PARAMETERS: u32 = 6;
    /// `SERVER_SET_THREADPOOL_PARAMETERS { server, typed_param params<32>, u32 flags }`.
    pub const SERVER_SET_THREADPOOL_PARAMETERS: u32 = 7;
    /// `SERVER_GET_CLIENT_LIMITS { server, u32 flags }` -> typed parameters.
    pub const SERVER_GET_CLIENT_LIMITS: u32 = 12;
    /// `CONNECT_SET_DAEMON_TIMEOUT { u32 timeout, u32 flags }`.
    pub const CONNECT_SET_DAEMON_TIMEOUT: u32 = 19;
}

/// The largest server list libvirt sends (`ADMIN_SERVER_LIST_MAX`).
const SERVER_LIST_MAX: u32 = 16384;
/// The most typed parameters in a reply (`ADMIN_SERVER_THREADPOOL_PARAMETERS_MAX`).
const PARAMS_MAX: u32 = 32;
/// A server name's limit on the wire.
const NAME_MAX: u32 = 4096;

/// An error reply of the admin program: libvirt's error code, domain and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    /// `virErrorNumber` (8: invalid argument, 95: no such server, 96: no such client, ...).
    pub code: i32,
    /// `virErrorDomain`.
    pub domain: i32,
    /// The message, as `virt-admin` prints it after `error: `.
    pub message: String,
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AdminError {}

fn invalid(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// A connection to a daemon's admin socket, opened with `CONNECT_OPEN`.
#[derive(Debug)]
pub struct AdminClient {
    client: Client,
    serial: u32,
}

impl AdminClient {
    /// Connects to the admin socket at `path` and opens the admin connection.
    ///
    /// # Errors
    ///
    /// The socket's error, or the daemon's error reply (an [`AdminError`] inside the
    /// `io::Error`: a daemon refuses clients of another uid, for one).
    pub fn connect(path: &Path) -> io::Result<AdminClient> {
        let mut client = Client::connect(&ListenAddr::Unix(path.to_owned()))?;
        client.set_timeout(Some(Duration::from_secs(60)))?;
        let mut me = AdminClient { client, serial: 0 };
        let mut body = Encoder::new();
        body.u32(0);
        me.call(procedure::CONNECT_OPEN, &body.into_bytes())?;
        Ok(me)
    }

    /// One call: its reply body, or the error reply as an [`AdminError`].
    ///
    /// # Errors
    ///
    /// The socket's, a malformed reply, or the daemon's error.
    pub fn call(&mut self, procedure: u32, body: &[u8]) -> io::Result<Vec<u8>> {
        let header = Header {
            program: ADMIN_PROGRAM,
            version: ADMIN_VERSION,
            procedure,
            kind: kind::CALL,
            serial: self.serial,
            status: status::OK,
        };
        self.serial = self.serial.wrapping_add(1);
        let reply = self.client.call_with_header(header, body)?;
        if reply.header.status == status::OK {
            return Ok(reply.payload);
        }
        let e = decode_error(&reply.payload).map_err(invalid)?;
        Err(io::Error::other(AdminError {
            code: e.code,
            domain: e.domain,
            message: e.message.unwrap_or_else(|| format!("error {}", e.code)),
        }))
    }

    /// The daemon's libvirt version, `major * 1_000_000 + minor * 1000 + micro`.
    ///
    /// # Errors
    ///
    /// As [`call`](AdminClient::call).
    pub fn lib_version(&mut self) -> io::Result<u64> {
        let body = self.call(procedure::CONNECT_GET_LIB_VERSION, &[])?;
        let mut d = Decoder::new(&body);
        let v = d.u64().map_err(invalid)?;
        d.finish().map_err(invalid)?;
        Ok(v)
    }

    /// The names of the daemon's servers.
    ///
    /// # Errors
    ///
    /// As [`call`](AdminClient::call).
    pub fn list_servers(&mut self) -> io::Result<Vec<String>> {
        let mut args = Encoder::new();
        // `need_results` is a flag, as libvirt's client sends it: 1 asks for the list.
        args.u32(1).u32(0);
        let body = self.call(procedure::CONNECT_LIST_SERVERS, &args.into_bytes())?;
        let mut d = Decoder::new(&body);
        let n = d.count(SERVER_LIST_MAX, 4).map_err(invalid)?;
        let mut names = Vec::with_capacity(n);
        for _ in 0..n {
            names.push(d.string(NAME_MAX).map_err(invalid)?);
        }
        let _ret = d.u32().map_err(invalid)?;
        d.finish().map_err(invalid)?;
        Ok(names)
    }

    /// Checks that `server` exists (libvirt's `CONNECT_LOOKUP_SERVER`).
    ///
    /// # Errors
    ///
    /// The daemon's "no such server" error, or as [`call`](AdminClient::call).
    pub fn lookup_server(&mut self, server: &str) -> io::Result<()> {
        let mut args = Encoder::new();
        args.string(server).u32(0);
        let body = self.call(procedure::CONNECT_LOOKUP_SERVER, &args.into_bytes())?;
        let mut d = Decoder::new(&body);
        d.string(NAME_MAX).map_err(invalid)?;
        d.finish().map_err(invalid)
    }

    fn server_params(&mut self, procedure: u32, server: &str) -> io::Result<Vec<TypedParam>> {
        self.lookup_server(server)?;
        let mut args = Encoder::new();
        args.string(server).u32(0);
        let body = self.call(procedure, &args.into_bytes())?;
        let mut d = Decoder::new(&body);
        let params = d.typed_params(PARAMS_MAX).map_err(invalid)?;
        d.finish().map_err(invalid)?;
        Ok(params)
    }

    /// A server's worker pool, in the daemon's order (libvirtd: `minWorkers, maxWorkers,
    /// nWorkers, freeWorkers, prioWorkers, jobQueueDepth`).
    ///
    /// # Errors
    ///
    /// As [`lookup_server`](AdminClient::lookup_server).
    pub fn threadpool_parameters(&mut self, server: &str) -> io::Result<Vec<TypedParam>> {
        self.server_params(procedure::SERVER_GET_THREADPOOL_PARAMETERS, server)
    }

    /// Changes a server's worker pool: `minWorkers`, `maxWorkers`, `prioWorkers` (those given;
    /// the others stay), validated by the daemon.
    ///
    /// # Errors
    ///
    /// The daemon's refusal (`invalid argument: minWorkers cannot be larger than maxWorkers`,
    /// ...), or as [`lookup_server`](AdminClient::lookup_server).
    pub fn set_threadpool_parameters(
        &mut self,
        server: &str,
        min_workers: Option<u32>,
        max_workers: Option<u32>,
        prio_workers: Option<u32>,
    ) -> io::Result<()> {
        use crate::xdr::Value;
        self.lookup_server(server)?;
        let params: Vec<TypedParam> = [
            ("minWorkers", min_workers),
            ("maxWorkers", max_workers),
            ("prioWorkers", prio_workers),
        ]
        .into_iter()
        .filter_map(|(f, v)| v.map(|v| TypedParam::new(f, Value::UInt(v))))
        .collect();
        let mut args = Encoder::new();
        args.string(server).typed_params(&params).u32(0);
        let body = self.call(
            procedure::SERVER_SET_THREADPOOL_PARAMETERS,
            &args.into_bytes(),
        )?;
        Decoder::new(&body).finish().map_err(invalid)
    }

    /// A server's client limits and counts (libvirtd: `nclients_max, nclients,
    /// nclients_unauth_max, nclients_unauth`).
    ///
    /// # Errors
    ///
    /// As [`lookup_server`](AdminClient::lookup_server).
    pub fn client_limits(&mut self, server: &str) -> io::Result<Vec<TypedParam>> {
        self.server_params(procedure::SERVER_GET_CLIENT_LIMITS, server)
    }

    /// Sets the daemon's timeout (`virt-admin daemon-timeout`): it stops after `seconds`
    /// with no client connected; 0 never.
    ///
    /// # Errors
    ///
    /// As [`call`](AdminClient::call).
    pub fn set_daemon_timeout(&mut self, seconds: u32) -> io::Result<()> {
        let mut args = Encoder::new();
        args.u32(seconds).u32(0);
        let body = self.call(procedure::CONNECT_SET_DAEMON_TIMEOUT, &args.into_bytes())?;
        Decoder::new(&body).finish().map_err(invalid)
    }

    /// Closes the admin connection (`CONNECT_CLOSE`).
    ///
    /// # Errors
    ///
    /// As [`call`](AdminClient::call).
    pub fn close(mut self) -> io::Result<()> {
        self.call(procedure::CONNECT_CLOSE, &[]).map(drop)
    }
}
