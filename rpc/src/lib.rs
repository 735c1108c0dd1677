//! The seed's daemon flow, end to end: a client calls, the call travels as an RPC frame, the
//! server's event loop reads the whole message and hands it to a worker, the worker runs it, and
//! the reply goes back through the loop.
//!
//! - [`proto`]: libvirt's framing (length word, 24-byte header, payload) and the numbers of
//!   vireo's demo program and of keepalive.
//! - [`server`]: daemons in libvirt's shape: one vireo event loop, named servers each with
//!   listeners, a [`vireo_pool::Pool`] and libvirt's limits (per-client throttling, max
//!   clients, EMFILE back-off, keepalive, graceful stop), and libvirt's admin socket.
//! - [`program`]: programs (number, version, procedures whose handlers run on workers) and the
//!   error replies they send.
//! - [`demo`]: vireo's demo program (`ECHO`, `SLEEP`, `HASH`, `STATS`).
//! - [`client`]: a blocking client for one call at a time.
//! - [`load`]: the load generator, many connections on one event-loop thread.
//! - [`admin`]: a client of libvirt's admin program (what `virt-admin` speaks), for any
//!   libvirt daemon's admin socket.
//! - [`xdr`]: XDR as libvirt's RPC bodies use it (typed parameters, the error body), checked
//!   against hostile input.
//!
//! Binaries: `vireo-rpcd` (the server), `vireo-rpc` (calls, admin and load), `vireo-demo` (the
//! server on every compiled backend under load, one table each).
//!
//! ```
//! use vireo_rpc::client::Client;
//! use vireo_rpc::server::{Server, ServerConfig};
//!
//! let dir = std::env::temp_dir().join(format!("vireo-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let addr = format!("unix:{}", dir.join("rpc.sock").display()).parse()?;
//! let server = Server::bind(ServerConfig {
//!     listen: vec![addr],
//!     min_workers: 1,
//!     prio_workers: 1,
//!     ..ServerConfig::default()
//! })?;
//! let addr = server.local_addrs()[0].clone();
//! let stop = server.shutdown_handle();
//! let running = std::thread::spawn(move || server.run());
//!
//! let mut client = Client::connect(&addr)?;
//! assert_eq!(client.echo(b"ping")?, b"ping");
//! assert_eq!(client.hash(b"")?, 0xcbf2_9ce4_8422_2325);
//!
//! stop.shutdown();
//! let summary = running.join().unwrap()?;
//! assert_eq!(summary.replies_sent, 2);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), std::io::Error>(())
//! ```
#![deny(missing_docs)]

pub mod admin;
pub mod client;
pub mod demo;
pub mod load;
mod net;
pub mod program;
pub mod proto;
pub mod server;
pub mod xdr;
