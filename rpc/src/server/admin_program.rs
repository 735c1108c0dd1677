//! libvirt's admin program (`0x06900690` v1) on the daemon's admin socket, for stock
//! `virt-admin`: connection open/close, lib version, server list and lookup, threadpool
//! parameters (get and set), client limits (get and set), client list, lookup, information
//! and close, logging filters and outputs (through [`super::LoggingControl`]) and the daemon
//! timeout, with libvirtd's parameter names, order, validation and error texts. Calls run on
//! the loop thread: they only read or change the daemon's own state and the pools' limits.

use std::time::Duration;

use vireo_pool::LimitsError;

use super::{Close, State};
use crate::admin::{ADMIN_PROGRAM, ADMIN_VERSION, procedure};
use crate::proto::{self, Frame, kind, status};
use crate::xdr::{Decoder, Encoder, TypedParam, Value, error_body};

/// libvirt's `virErrorNumber`s and domains used here.
const VIR_ERR_INTERNAL_ERROR: i32 = 1;
const VIR_ERR_INVALID_ARG: i32 = 8;
const VIR_ERR_ARGUMENT_UNSUPPORTED: i32 = 74;
const VIR_ERR_NO_SERVER: i32 = 95;
const VIR_FROM_NONE: i32 = 0;
const VIR_FROM_RPC: i32 = 7;

/// A failed call: libvirt's code, domain and message.
type Failure = (i32, i32, String);

fn malformed(e: impl std::fmt::Display) -> Failure {
    (
        VIR_ERR_INTERNAL_ERROR,
        VIR_FROM_RPC,
        format!("internal error: malformed arguments: {e}"),
    )
}

fn invalid_arg(why: &str) -> Failure {
    (
        VIR_ERR_INVALID_ARG,
        VIR_FROM_NONE,
        format!("invalid argument: {why}"),
    )
}

/// A server's name in a call (`admin_nonnull_server`).
fn server_name(d: &mut Decoder<'_>) -> Result<String, Failure> {
    d.string(4096).map_err(malformed)
}

/// libvirt's `ADMIN_SERVER_LIST_MAX` and `ADMIN_CLIENT_LIST_MAX`: longer lists are an error
/// (the client would refuse them).
fn check_list_len(n: usize) -> Result<(), Failure> {
    const LIST_MAX: usize = 16384;
    if n > LIST_MAX {
        return Err((
            VIR_ERR_INTERNAL_ERROR,
            VIR_FROM_RPC,
            format!("internal error: {n} entries exceed the list limit of {LIST_MAX}"),
        ));
    }
    Ok(())
}

/// libvirt's `virTypedParamsValidate` for parameters that are all unsigned ints: in the order
/// of their names, each must be one of `allowed`, at most once, of type uint.
fn validate_uints(params: &[TypedParam], allowed: &[&str]) -> Result<(), Failure> {
    let mut sorted: Vec<&TypedParam> = params.iter().collect();
    sorted.sort_by(|a, b| a.field.cmp(&b.field));
    for (i, p) in sorted.iter().enumerate() {
        if !allowed.contains(&p.field.as_str()) {
            return Err((
                VIR_ERR_ARGUMENT_UNSUPPORTED,
                VIR_FROM_NONE,
                format!(
                    "argument unsupported: parameter '{}' not supported",
                    p.field
                ),
            ));
        }
        if i > 0 && sorted[i - 1].field == p.field {
            return Err(invalid_arg(&format!(
                "parameter '{}' occurs multiple times",
                p.field
            )));
        }
        let kind = match p.value {
            Value::UInt(_) => continue,
            Value::Int(_) => "int",
            Value::LLong(_) => "llong",
            Value::ULLong(_) => "ullong",
            Value::Double(_) => "double",
            Value::Boolean(_) => "boolean",
            Value::String(_) => "string",
        };
        return Err(invalid_arg(&format!(
            "invalid type '{kind}' for parameter '{}', expected 'uint'",
            p.field
        )));
    }
    Ok(())
}

/// libvirt's `virCheckFlags(0, ...)`: these procedures take no flags.
fn no_flags(flags: u32, function: &str) -> Result<(), Failure> {
    if flags != 0 {
        // virReportInvalidArg: no "invalid argument: " before it.
        return Err((
            VIR_ERR_INVALID_ARG,
            VIR_FROM_NONE,
            format!("unsupported flags ({flags:#x}) in function {function}"),
        ));
    }
    Ok(())
}

fn done(d: Decoder<'_>) -> Result<(), Failure> {
    d.finish().map_err(malformed)
}

impl State {
    /// Answers one frame of an admin client (keepalive was handled by the caller).
    pub(super) fn dispatch_admin(&mut self, key: usize, frame: &Frame) -> Result<(), Close> {
        let h = frame.header;
        let result = if h.kind != kind::CALL {
            Err((
                VIR_ERR_INTERNAL_ERROR,
                VIR_FROM_RPC,
                format!("internal error: unexpected message type {}", h.kind),
            ))
        } else if h.program != ADMIN_PROGRAM || h.version != ADMIN_VERSION {
            Err((
                VIR_ERR_INTERNAL_ERROR,
                VIR_FROM_RPC,
                format!(
                    "internal error: cannot find program {:#x} version {} on the admin socket",
                    h.program, h.version
                ),
            ))
        } else {
            self.admin_call(h.procedure, &frame.payload)
        };
        let reply = match result {
            Ok(body) => proto::encode_frame(&h.reply(status::OK), &body),
            Err((code, domain, message)) => {
                proto::encode_frame(&h.reply(status::ERROR), &error_body(code, domain, &message))
            }
        };
        // Answered at once; counted like any reply so throttling and shutdown see it.
        self.clients[key].in_flight += 1;
        self.queue(key, reply, true)
    }

    fn admin_call(&mut self, proc_: u32, body: &[u8]) -> Result<Vec<u8>, Failure> {
        let mut d = Decoder::new(body);
        let mut out = Encoder::new();
        match proc_ {
            procedure::CONNECT_OPEN => {
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                no_flags(flags, "adminDispatchConnectOpen")?;
            }
            procedure::CONNECT_CLOSE => done(d)?,
            procedure::CONNECT_GET_LIB_VERSION => {
                done(d)?;
                out.u64(lib_version());
            }
            procedure::CONNECT_LIST_SERVERS => {
                let need = d.u32().map_err(malformed)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                no_flags(flags, "adminConnectListServers")?;
                let names: Vec<&str> = self
                    .servers
                    .iter()
                    .filter(|s| !s.admin)
                    .map(|s| s.config.name.as_str())
                    .collect();
                // `need_results` is a flag (libvirt's client sends 0 or 1): the whole list
                // or none.
                let listed = if need == 0 { 0 } else { names.len() };
                check_list_len(listed)?;
                out.u32(listed as u32);
                for name in &names[..listed] {
                    out.string(name);
                }
                out.u32(names.len() as u32);
            }
            procedure::CONNECT_LOOKUP_SERVER => {
                let name = server_name(&mut d)?;
                // Any flags: libvirt's adminConnectLookupServer checks them against themselves.
                let _flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server(&name)?;
                out.string(&self.servers[srv].config.name);
            }
            procedure::SERVER_GET_THREADPOOL_PARAMETERS => {
                let name = server_name(&mut d)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server(&name)?;
                no_flags(flags, "adminServerGetThreadPoolParameters")?;
                // A server without a pool reports 0 for everything, as libvirt's does.
                let s = self.pool(srv).map(|p| p.stats()).unwrap_or_default();
                let uint = |v: usize| Value::UInt(u32::try_from(v).unwrap_or(u32::MAX));
                out.typed_params(&[
                    TypedParam::new("minWorkers", uint(s.min_workers)),
                    TypedParam::new("maxWorkers", uint(s.max_workers)),
                    TypedParam::new("nWorkers", uint(s.workers)),
                    TypedParam::new("freeWorkers", uint(s.free_workers)),
                    TypedParam::new("prioWorkers", uint(s.prio_workers)),
                    TypedParam::new("jobQueueDepth", uint(s.queue_depth)),
                ]);
            }
            SERVER_SET_THREADPOOL_PARAMETERS => {
                let name = server_name(&mut d)?;
                let params = d.typed_params(32).map_err(malformed)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server_named_in_call(&name)?;
                no_flags(flags, "adminServerSetThreadPoolParameters")?;
                self.set_threadpool(srv, &params)?;
            }
            SERVER_LIST_CLIENTS => {
                let name = server_name(&mut d)?;
                let need = d.u32().map_err(malformed)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server(&name)?;
                no_flags(flags, "adminServerListClients")?;
                let clients: Vec<(u64, i64, u32)> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| c.server == srv)
                    .map(|(_, c)| (c.uid, c.connected, c.transport()))
                    .collect();
                let listed = if need == 0 { 0 } else { clients.len() };
                check_list_len(listed)?;
                out.u32(listed as u32);
                let name = &self.servers[srv].config.name;
                for &(id, ts, transport) in &clients[..listed] {
                    out.string(name).u64(id).i64(ts).u32(transport);
                }
                out.u32(clients.len() as u32);
            }
            SERVER_LOOKUP_CLIENT => {
                let name = server_name(&mut d)?;
                let id = d.u64().map_err(malformed)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server(&name)?;
                no_flags(flags, "adminServerLookupClient")?;
                let key = self.client_by_id(srv, id)?;
                let c = &self.clients[key];
                out.string(&self.servers[srv].config.name)
                    .u64(c.uid)
                    .i64(c.connected)
                    .u32(c.transport());
            }
            CLIENT_GET_INFO => {
                let (name, id) = Self::client_ref(&mut d)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server_named_in_call(&name)?;
                let key = self.client_by_id(srv, id).map_err(|(code, domain, _)| {
                    let why = format!("Client not found: no client with matching id '{id}' found");
                    (code, domain, why)
                })?;
                no_flags(flags, "adminClientGetInfo")?;
                out.typed_params(&self.clients[key].info());
            }
            CLIENT_CLOSE => {
                let (name, id) = Self::client_ref(&mut d)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let key = self
                    .find_server(&name)
                    .and_then(|srv| self.client_by_id(srv, id))?;
                no_flags(flags, "adminClientClose")?;
                let srv = self.clients[key].server;
                self.close(key, Close::Gone("closed by the admin socket".into()));
                let h = self.handle.clone();
                self.check_limits(&h, srv);
            }
            SERVER_SET_CLIENT_LIMITS => {
                let name = server_name(&mut d)?;
                let params = d.typed_params(32).map_err(malformed)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server_named_in_call(&name)?;
                no_flags(flags, "adminServerSetClientLimits")?;
                self.set_client_limits(srv, &params)?;
            }
            procedure::CONNECT_SET_DAEMON_TIMEOUT => {
                let timeout = d.u32().map_err(malformed)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                no_flags(flags, "adminConnectSetDaemonTimeout")?;
                self.set_timeout(Some(Duration::from_secs(u64::from(timeout))));
            }
            GET_LOGGING_OUTPUTS | GET_LOGGING_FILTERS => {
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                no_flags(
                    flags,
                    if proc_ == GET_LOGGING_OUTPUTS {
                        "adminConnectGetLoggingOutputs"
                    } else {
                        "adminConnectGetLoggingFilters"
                    },
                )?;
                let log = self.logging()?;
                let text = if proc_ == GET_LOGGING_OUTPUTS {
                    log.outputs()
                } else {
                    log.filters()
                };
                let n = text.split_whitespace().count() as u32;
                if proc_ == GET_LOGGING_OUTPUTS {
                    out.string(&text);
                } else {
                    out.opt_string((!text.is_empty()).then_some(text.as_str()));
                }
                out.u32(n);
            }
            SET_LOGGING_OUTPUTS | SET_LOGGING_FILTERS => {
                let text = d.opt_string(crate::xdr::STRING_MAX).map_err(malformed)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                no_flags(
                    flags,
                    if proc_ == SET_LOGGING_OUTPUTS {
                        "adminConnectSetLoggingOutputs"
                    } else {
                        "adminConnectSetLoggingFilters"
                    },
                )?;
                let log = self.logging()?;
                let set = if proc_ == SET_LOGGING_OUTPUTS {
                    log.set_outputs(text.as_deref())
                } else {
                    log.set_filters(text.as_deref())
                };
                set.map_err(|why| invalid_arg(&why))?;
            }
            procedure::SERVER_GET_CLIENT_LIMITS => {
                let name = server_name(&mut d)?;
                let flags = d.u32().map_err(malformed)?;
                done(d)?;
                let srv = self.find_server(&name)?;
                no_flags(flags, "adminServerGetClientLimits")?;
                let s = &self.servers[srv];
                let uint = |v: usize| Value::UInt(u32::try_from(v).unwrap_or(u32::MAX));
                out.typed_params(&[
                    TypedParam::new("nclients_max", uint(s.config.max_clients)),
                    TypedParam::new("nclients", uint(s.nclients)),
                    // No authentication phase: every client is authenticated once accepted.
                    TypedParam::new("nclients_unauth_max", uint(0)),
                    TypedParam::new("nclients_unauth", uint(0)),
                ]);
            }
            other => {
                return Err((
                    VIR_ERR_INTERNAL_ERROR,
                    VIR_FROM_RPC,
                    format!(
                        "internal error: admin procedure {other} is not supported by vireo-rpcd"
                    ),
                ));
            }
        }
        Ok(out.into_bytes())
    }

    /// libvirt's `adminServerSetThreadPoolParameters`: `minWorkers`, `maxWorkers` and
    /// `prioWorkers` (unsigned ints), each optional; the others keep their values.
    fn set_threadpool(&mut self, srv: usize, params: &[TypedParam]) -> Result<(), Failure> {
        validate_uints(params, &["minWorkers", "maxWorkers", "prioWorkers"])?;
        let mut limits = [None; 3];
        for p in params {
            let slot = match p.field.as_str() {
                "minWorkers" => 0,
                "maxWorkers" => 1,
                _ => 2,
            };
            if let Value::UInt(v) = p.value {
                limits[slot] = Some(v as usize);
            }
        }
        // libvirt checks the resulting minimum against the resulting maximum first.
        let pool = self.pool(srv);
        let now = pool.as_ref().map(|p| p.stats()).unwrap_or_default();
        let (min, max) = (
            limits[0].unwrap_or(now.min_workers),
            limits[1].unwrap_or(now.max_workers),
        );
        if min > max {
            return Err(invalid_arg("minWorkers cannot be larger than maxWorkers"));
        }
        let ceiling = self.servers[srv].config.worker_ceiling;
        if let Some(n) = limits.iter().flatten().copied().find(|&n| n > ceiling) {
            return Err(invalid_arg(&format!(
                "worker limit {n} is above this server's ceiling of {ceiling}"
            )));
        }
        let Some(pool) = pool else {
            // Calls run on the loop thread: there is no pool to start or tune.
            if limits[1].is_some_and(|max| max > 0) {
                return Err(invalid_arg(
                    "maxWorkers must not be switched from zero to non-zero and vice versa",
                ));
            }
            if limits[2].is_some_and(|prio| prio > 0) {
                return Err(invalid_arg(
                    "prioWorkers cannot be set on a server without workers (maxWorkers 0): \
                     its calls run on the event loop thread",
                ));
            }
            return Ok(());
        };
        match pool.set_limits(limits[0], limits[1], limits[2]) {
            Ok(()) => Ok(()),
            Err(LimitsError::MinAboveMax { .. }) => {
                Err(invalid_arg("minWorkers cannot be larger than maxWorkers"))
            }
            Err(LimitsError::NoWorkers) => Err(invalid_arg(
                "maxWorkers must not be switched from zero to non-zero and vice versa",
            )),
            Err(e) => Err((
                VIR_ERR_INTERNAL_ERROR,
                VIR_FROM_NONE,
                format!("internal error: cannot change the limits: {e}"),
            )),
        }
    }
}

/// `SERVER_SET_THREADPOOL_PARAMETERS { server, typed_param params<32>, u32 flags }`.
const SERVER_SET_THREADPOOL_PARAMETERS: u32 = 7;
/// `SERVER_LIST_CLIENTS { server, u32 need_results, u32 flags }` -> clients, count.
const SERVER_LIST_CLIENTS: u32 = 8;
/// `SERVER_LOOKUP_CLIENT { server, u64 id, u32 flags }` -> client.
const SERVER_LOOKUP_CLIENT: u32 = 9;
/// `CLIENT_GET_INFO { client, u32 flags }` -> typed parameters.
const CLIENT_GET_INFO: u32 = 10;
/// `CLIENT_CLOSE { client, u32 flags }`.
const CLIENT_CLOSE: u32 = 11;
/// `SERVER_SET_CLIENT_LIMITS { server, typed_param params<32>, u32 flags }`.
const SERVER_SET_CLIENT_LIMITS: u32 = 13;
const VIR_ERR_NO_CLIENT: i32 = 96;
/// `GET_LOGGING_OUTPUTS { u32 flags }` -> `string outputs, u32 n`.
const GET_LOGGING_OUTPUTS: u32 = 14;
/// `GET_LOGGING_FILTERS { u32 flags }` -> `string* filters, u32 n`.
const GET_LOGGING_FILTERS: u32 = 15;
/// `SET_LOGGING_OUTPUTS { string* outputs, u32 flags }`.
const SET_LOGGING_OUTPUTS: u32 = 16;
/// `SET_LOGGING_FILTERS { string* filters, u32 flags }`.
const SET_LOGGING_FILTERS: u32 = 17;

impl State {
    /// [`find_server`](State::find_server) with the text libvirtd's hand-written
    /// dispatchers use (set threadpool, set client limits, client info); the others report
    /// the lookup's own.
    fn find_server_named_in_call(&self, name: &str) -> Result<usize, Failure> {
        self.find_server(name).map_err(|(code, domain, _)| {
            let why = format!("Server not found: no server with matching name '{name}' found");
            (code, domain, why)
        })
    }

    /// The index of the (named) server called `name`.
    fn find_server(&self, name: &str) -> Result<usize, Failure> {
        self.servers
            .iter()
            .position(|s| !s.admin && s.config.name == name)
            .ok_or_else(|| {
                (
                    VIR_ERR_NO_SERVER,
                    VIR_FROM_RPC,
                    format!("Server not found: No server named '{name}'"),
                )
            })
    }

    /// The pool of named server `srv`; `None` when its calls run on the loop thread.
    fn pool(&self, srv: usize) -> Option<std::sync::Arc<vireo_pool::Pool>> {
        self.servers[srv].pool.clone()
    }

    /// The client an `admin_nonnull_client` names: its server (checked) and id; the
    /// timestamp and transport are the caller's copy and are not trusted.
    fn client_ref(d: &mut Decoder<'_>) -> Result<(String, u64), Failure> {
        let name = server_name(d)?;
        let id = d.u64().map_err(malformed)?;
        let _timestamp = d.i64().map_err(malformed)?;
        let _transport = d.u32().map_err(malformed)?;
        Ok((name, id))
    }

    fn logging(&self) -> Result<std::sync::Arc<dyn super::LoggingControl>, Failure> {
        self.logging.clone().ok_or_else(|| {
            (
                VIR_ERR_INTERNAL_ERROR,
                VIR_FROM_RPC,
                "internal error: this server does not control the daemon's logging".to_owned(),
            )
        })
    }

    /// The key of server `srv`'s client with libvirt id `id`.
    fn client_by_id(&self, srv: usize, id: u64) -> Result<usize, Failure> {
        self.clients
            .iter()
            .find(|(_, c)| c.uid == id && c.server == srv)
            .map(|(k, _)| k)
            .ok_or_else(|| {
                (
                    VIR_ERR_NO_CLIENT,
                    VIR_FROM_RPC,
                    format!("Client not found: No client with matching ID '{id}'"),
                )
            })
    }

    /// libvirt's `virNetServerSetClientLimits`: `nclients_max` and `nclients_unauth_max`
    /// (unsigned ints). vireo has no authentication phase, so the unauthenticated maximum is
    /// 0 and may only be set to 0.
    fn set_client_limits(&mut self, srv: usize, params: &[TypedParam]) -> Result<(), Failure> {
        validate_uints(params, &["nclients_max", "nclients_unauth_max"])?;
        let mut max = None;
        for p in params {
            let Value::UInt(v) = p.value else {
                continue;
            };
            match p.field.as_str() {
                "nclients_max" => max = Some(v as usize),
                _ if v == 0 => {}
                _ => {
                    return Err(invalid_arg(
                        "nclients_unauth_max must be 0: vireo-rpcd has no authentication phase",
                    ));
                }
            }
        }
        if let Some(max) = max {
            if max == 0 {
                return Err(invalid_arg("nclients_max must be at least 1"));
            }
            self.servers[srv].config.max_clients = max;
            let h = self.handle.clone();
            self.check_limits(&h, srv);
        }
        Ok(())
    }
}

/// This crate's version in libvirt's encoding (`major * 1_000_000 + minor * 1000 + micro`).
fn lib_version() -> u64 {
    let part = |s: &str| s.parse::<u64>().unwrap_or(0);
    let mut v = env!("CARGO_PKG_VERSION").split('.');
    let (major, minor, micro) = (
        part(v.next().unwrap_or("0")),
        part(v.next().unwrap_or("0")),
        part(v.next().unwrap_or("0")),
    );
    major * 1_000_000 + minor * 1000 + micro
}
