//! The RPC comparison: the vireo server on each backend against a tokio server that speaks the
//! same protocol, both driven by the same load generator (one vireo loop thread on epoll).
//!
//! The tokio server is written the way a tokio user would write it: a multi-threaded runtime
//! with as many worker threads as the vireo pool has workers, one task per connection that
//! reads whatever has arrived, answers every whole call in it (ECHO and HASH inline, SLEEP on a
//! timer) and writes the replies back in one `write_all`.
//!
//! vireo runs twice per backend: `vireo-<backend>` is the seed's design (the loop reads, a
//! worker runs the call, the loop writes the reply), `vireo-inline-<backend>` the same server
//! with no workers (`max_workers` 0: each call runs on the loop thread as it is read, as the
//! tokio server runs them on the thread that read them).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use vireo_backends::Choice;
use vireo_rpc::proto::{self, FrameReader, Header, Procedure, kind, status};
use vireo_rpc::server::{DaemonConfig, ListenAddr, Server, ServerConfig, ShutdownHandle};

/// A server under test, stopped by [`Running::stop`].
pub enum Running {
    /// The vireo server on its own thread.
    Vireo(
        ShutdownHandle,
        JoinHandle<io::Result<vireo_rpc::server::ServerSummary>>,
    ),
    /// The tokio server: its runtime's thread and the stop signal.
    Tokio(Arc<Notify>, JoinHandle<()>),
}

impl Running {
    /// Stops the server and waits for it.
    pub fn stop(self) {
        match self {
            Running::Vireo(stop, thread) => {
                stop.shutdown();
                let _ = thread.join();
            }
            Running::Tokio(stop, thread) => {
                stop.notify_one();
                let _ = thread.join();
            }
        }
    }
}

/// The systems: `vireo-<backend>` for each compiled backend that starts here (calls run by
/// the server's pool), `vireo-inline-<backend>` for each (the server without workers: calls
/// run on its loop thread, as the tokio server runs them on its I/O threads), then `tokio`.
pub fn systems() -> Vec<String> {
    let mut systems = crate::report::systems_with(&[]);
    let inline: Vec<String> = systems
        .iter()
        .map(|s| s.replacen("vireo-", "vireo-inline-", 1))
        .collect();
    systems.extend(inline);
    systems.push("tokio".to_owned());
    systems
}

/// Starts system `name` on a Unix socket at `path` with `workers` worker threads (none for
/// `vireo-inline-*`).
///
/// # Errors
///
/// When the server cannot start.
pub fn start(name: &str, path: &Path, workers: usize) -> io::Result<(Running, ListenAddr)> {
    let addr = ListenAddr::Unix(path.to_path_buf());
    if let Some(backend) = name.strip_prefix("vireo-") {
        let (backend, workers, prio) = match backend.strip_prefix("inline-") {
            Some(backend) => (backend, 0, 0),
            None => (backend, workers, 1),
        };
        let server = Server::bind_with(
            DaemonConfig {
                backend: Choice::Only(backend.parse()?),
                ..DaemonConfig::default()
            },
            ServerConfig {
                listen: vec![addr.clone()],
                min_workers: workers,
                max_workers: workers,
                prio_workers: prio,
                ..ServerConfig::default()
            },
        )?;
        let stop = server.shutdown_handle();
        let thread = std::thread::Builder::new()
            .name("vireo-loop".into())
            .spawn(move || server.run())?;
        Ok((Running::Vireo(stop, thread), addr))
    } else if name == "tokio" {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?;
        let listener = {
            let _guard = runtime.enter();
            UnixListener::bind(path)?
        };
        let stop = Arc::new(Notify::new());
        let stopped = Arc::clone(&stop);
        let path: PathBuf = path.to_path_buf();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    () = accept_loop(listener) => {}
                    () = stopped.notified() => {}
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = std::fs::remove_file(path);
        });
        Ok((Running::Tokio(stop, thread), addr))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown system {name}"),
        ))
    }
}

async fn accept_loop(listener: UnixListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(serve(stream));
    }
}

/// One connection: read, answer every whole call, write the replies in one go.
async fn serve(mut stream: UnixStream) {
    let mut reader = FrameReader::new(proto::MAX_MESSAGE);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        reader.feed(&buf[..n]);
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    let h = frame.header;
                    if h.program == proto::KEEPALIVE_PROGRAM {
                        if h.is_keepalive(proto::KEEPALIVE_PING) {
                            proto::encode_frame_into(
                                &mut out,
                                &Header::keepalive(proto::KEEPALIVE_PONG),
                                &[],
                            );
                        }
                        continue;
                    }
                    answer(&h, &frame.payload, &mut out).await;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

async fn answer(h: &Header, payload: &[u8], out: &mut Vec<u8>) {
    let err = |out: &mut Vec<u8>, msg: &str| {
        // libvirt's error body, as vireo's server sends.
        let body = vireo_rpc::xdr::error_body(39, 7, msg);
        proto::encode_frame_into(out, &h.reply(status::ERROR), &body);
    };
    if h.kind != kind::CALL || h.program != proto::PROGRAM || h.version != proto::VERSION {
        return err(out, "unexpected message");
    }
    match Procedure::from_u32(h.procedure) {
        Some(Procedure::Echo) => proto::encode_frame_into(out, &h.reply(status::OK), payload),
        Some(Procedure::Hash) => proto::encode_frame_into(
            out,
            &h.reply(status::OK),
            &proto::fnv1a64(payload).to_be_bytes(),
        ),
        Some(Procedure::Sleep) => match <[u8; 4]>::try_from(payload) {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(u64::from(u32::from_be_bytes(ms)))).await;
                proto::encode_frame_into(out, &h.reply(status::OK), &[]);
            }
            Err(_) => err(out, "SLEEP takes a u32"),
        },
        Some(Procedure::Stats) => proto::encode_frame_into(out, &h.reply(status::OK), b"{}"),
        _ => err(out, "unknown procedure"),
    }
}
