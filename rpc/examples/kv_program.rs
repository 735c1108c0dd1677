//! A user-defined program on vireo-rpc: a small key-value store with libvirt's XDR strings,
//! served on a daemon with an admin socket, then called by a client.
//!
//! ```sh
//! cargo run -p vireo-rpc --example kv_program
//! ```
//!
//! While it runs (it waits for Enter when given `--wait`), stock `virt-admin` manages it:
//! `virt-admin -c 'libvirtd:///system?socket=/tmp/vireo-kv-admin.sock' srv-list`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vireo_rpc::client::Client;
use vireo_rpc::program::{Program, RpcError};
use vireo_rpc::proto::{Header, kind, status};
use vireo_rpc::server::{DaemonConfig, ListenAddr, Server, ServerConfig};
use vireo_rpc::xdr::{Decoder, Encoder};

const KV_PROGRAM: u32 = 0x2000_4b56;
const KV_VERSION: u32 = 1;
/// `PUT { string key, string value }`.
const PUT: u32 = 1;
/// `GET { string key }` -> `string value`, or an error for a missing key.
const GET: u32 = 2;
/// `LEN` -> `u32` number of keys; a priority procedure: it never waits behind slow calls.
const LEN: u32 = 3;

fn kv_program() -> Program {
    let store: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let bad = |e: vireo_rpc::xdr::XdrError| RpcError::invalid_arg(format!("bad arguments: {e}"));
    let (put, get, len) = (Arc::clone(&store), Arc::clone(&store), store);
    Program::new(KV_PROGRAM, KV_VERSION)
        .procedure(PUT, move |call, _out| {
            let mut d = Decoder::new(call.payload());
            let (key, value) = (d.string(1024).map_err(bad)?, d.string(65536).map_err(bad)?);
            d.finish().map_err(bad)?;
            put.lock().unwrap().insert(key, value);
            Ok(())
        })
        .procedure(GET, move |call, out| {
            let mut d = Decoder::new(call.payload());
            let key = d.string(1024).map_err(bad)?;
            d.finish().map_err(bad)?;
            let store = get.lock().unwrap();
            let value = store
                .get(&key)
                .ok_or_else(|| RpcError::failed(format!("no key {key:?}")))?;
            out.extend_from_slice(&strings(&[value]));
            Ok(())
        })
        .priority_procedure(LEN, move |_call, out| {
            out.extend_from_slice(&(len.lock().unwrap().len() as u32).to_be_bytes());
            Ok(())
        })
}

/// XDR strings, one after the other.
fn strings(items: &[&str]) -> Vec<u8> {
    let mut e = Encoder::new();
    for s in items {
        e.string(s);
    }
    e.into_bytes()
}

fn call(client: &mut Client, serial: u32, procedure: u32, args: &[u8]) -> std::io::Result<Vec<u8>> {
    let header = Header {
        program: KV_PROGRAM,
        version: KV_VERSION,
        procedure,
        kind: kind::CALL,
        serial,
        status: status::OK,
    };
    Ok(client.call_with_header(header, args)?.into_result()?)
}

fn main() -> std::io::Result<()> {
    let dir = std::env::temp_dir();
    let server = Server::bind_with(
        DaemonConfig {
            admin: Some(dir.join("vireo-kv-admin.sock")),
            ..DaemonConfig::default()
        },
        ServerConfig {
            name: "kv".into(),
            listen: vec![ListenAddr::Unix(dir.join("vireo-kv.sock"))],
            programs: vec![kv_program()],
            min_workers: 2,
            ..ServerConfig::default()
        },
    )?;
    let addr = server.local_addrs()[0].clone();
    let stop = server.shutdown_handle();
    let running = std::thread::spawn(move || server.run());

    let mut client = Client::connect(&addr)?;
    call(&mut client, 1, PUT, &strings(&["colour", "green"]))?;
    let reply = call(&mut client, 2, GET, &strings(&["colour"]))?;
    println!(
        "GET colour = {:?}",
        Decoder::new(&reply).string(65536).unwrap()
    );
    let missing = call(&mut client, 3, GET, &strings(&["size"]));
    println!("GET size -> {}", missing.unwrap_err());
    println!(
        "LEN = {}",
        u32::from_be_bytes(call(&mut client, 4, LEN, &[])?[..4].try_into().unwrap())
    );

    if std::env::args().any(|a| a == "--wait") {
        println!("serving on {addr}; press Enter to stop");
        std::io::stdin().read_line(&mut String::new())?;
    }
    stop.shutdown();
    let summary = running.join().expect("the server thread")?;
    println!(
        "{} calls, {} replies",
        summary.calls_received, summary.replies_sent
    );
    Ok(())
}
