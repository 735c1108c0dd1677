//! The load generator: many connections driven from one vireo event-loop thread.
//!
//! Every connection keeps `inflight` calls outstanding (non-blocking sockets, replies matched
//! by serial) until the duration ends, then waits for the replies still owed. Every call must
//! get exactly one reply: a reply that never comes, comes twice or carries an unknown serial
//! is counted as an error.
//!
//! ```no_run
//! use std::time::Duration;
//! use vireo_rpc::load::{LoadConfig, run_load};
//!
//! let report = run_load(&LoadConfig {
//!     duration: Duration::from_secs(2),
//!     ..LoadConfig::new("unix:/tmp/vireo.sock".parse()?)
//! })?;
//! println!("{:.0} calls/s, p99 {} µs", report.rate(), report.latency_us(99.0));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use vireo_backends::{AnyBackend, Choice};
use vireo_core::{EventLoop, Events, Frequency, LoopHandle, WatchId};

use crate::net::Stream;
use crate::proto::{
    self, FrameReader, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, MAX_MESSAGE,
    Procedure, status,
};
use crate::server::ListenAddr;

/// What the load generator sends and for how long.
#[derive(Clone)]
pub struct LoadConfig {
    /// The server.
    pub addr: ListenAddr,
    /// Connections.
    pub clients: usize,
    /// Calls outstanding per connection.
    pub inflight: usize,
    /// How long new calls are sent.
    pub duration: Duration,
    /// Procedures sent in turn, each repeated by its weight (`[(Echo, 1)]` by default).
    pub mix: Vec<(Procedure, u32)>,
    /// Payload bytes of `ECHO` and `HASH` calls.
    pub payload: usize,
    /// Milliseconds asked for by `SLEEP` calls.
    pub sleep_ms: u32,
    /// After `duration`, how long to wait for the replies still owed before counting them
    /// lost.
    pub drain_timeout: Duration,
    /// The backend of the generator's own loop.
    pub backend: Choice,
    /// Called about ten times a second with the time elapsed and the replies so far.
    pub progress: Option<Arc<dyn Fn(Duration, u64) + Send + Sync>>,
}

impl std::fmt::Debug for LoadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadConfig")
            .field("addr", &self.addr)
            .field("clients", &self.clients)
            .field("inflight", &self.inflight)
            .field("duration", &self.duration)
            .field("mix", &self.mix)
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

impl LoadConfig {
    /// 16 connections, 4 calls each in flight, `ECHO` of 64 bytes for 5 seconds.
    pub fn new(addr: ListenAddr) -> LoadConfig {
        LoadConfig {
            addr,
            clients: 16,
            inflight: 4,
            duration: Duration::from_secs(5),
            mix: vec![(Procedure::Echo, 1)],
            payload: 64,
            sleep_ms: 1,
            drain_timeout: Duration::from_secs(10),
            backend: Choice::Auto,
            progress: None,
        }
    }
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Calls sent.
    pub sent: u64,
    /// Replies received for calls sent (OK or error).
    pub received: u64,
    /// Replies with status ERROR.
    pub error_replies: u64,
    /// Calls that got no reply, replies to no outstanding call, replies with wrong content
    /// and connections lost: every one is an error.
    pub errors: u64,
    /// Descriptions of the first few errors.
    pub error_samples: Vec<String>,
    /// Time from the first call to the last reply.
    pub elapsed: Duration,
    /// Call-to-reply latency in microseconds.
    pub latency: Histogram<u64>,
    /// Replies per procedure.
    pub by_procedure: Vec<(Procedure, u64)>,
}

impl LoadReport {
    /// Replies per second.
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at `percentile` (0-100), in microseconds.
    pub fn latency_us(&self, percentile: f64) -> u64 {
        self.latency.value_at_percentile(percentile)
    }
}

struct Conn {
    stream: Stream,
    watch: Option<WatchId>,
    reader: FrameReader,
    tx: Vec<u8>,
    tx_off: usize,
    /// serial -> (sent at, procedure, expected reply check)
    outstanding: HashMap<u32, (Instant, Procedure)>,
    next_serial: u32,
    turn: usize,
    interest: Events,
}

struct Load {
    cfg: LoadConfig,
    schedule: Vec<Procedure>,
    echo_payload: Vec<u8>,
    hash_reply: [u8; 8],
    conns: Vec<Conn>,
    sending: bool,
    sent: u64,
    received: u64,
    error_replies: u64,
    errors: u64,
    error_samples: Vec<String>,
    latency: Histogram<u64>,
    by_procedure: HashMap<Procedure, u64>,
    last_reply: Instant,
}

impl Load {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.error_samples.len() < 10 {
            self.error_samples.push(what);
        }
    }

    fn payload_of(&self, p: Procedure) -> Vec<u8> {
        match p {
            Procedure::Echo | Procedure::Hash => self.echo_payload.clone(),
            Procedure::Sleep => self.cfg.sleep_ms.to_be_bytes().to_vec(),
            Procedure::Stats => Vec::new(),
        }
    }

    /// Tops connection `i` up to `inflight` outstanding calls.
    fn fill(&mut self, i: usize) {
        if !self.sending {
            return;
        }
        while self.conns[i].outstanding.len() < self.cfg.inflight {
            let c = &mut self.conns[i];
            let p = self.schedule[c.turn % self.schedule.len()];
            c.turn += 1;
            c.next_serial = c.next_serial.wrapping_add(1);
            let serial = c.next_serial;
            let payload = self.payload_of(p);
            let c = &mut self.conns[i];
            proto::encode_frame_into(&mut c.tx, &Header::call(p as u32, serial), &payload);
            c.outstanding.insert(serial, (Instant::now(), p));
            self.sent += 1;
        }
    }

    fn flush(&mut self, i: usize) -> io::Result<()> {
        let c = &mut self.conns[i];
        while c.tx_off < c.tx.len() {
            match c.stream.write(&c.tx[c.tx_off..]) {
                Ok(n) => c.tx_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if c.tx_off == c.tx.len() {
            c.tx.clear();
            c.tx_off = 0;
        }
        Ok(())
    }

    fn on_ready(&mut self, h: &LoopHandle, i: usize, events: Events) {
        if self.conns[i].watch.is_none() {
            return;
        }
        if let Err(e) = self.service(i, events) {
            let lost = self.conns[i].outstanding.len();
            self.error(format!(
                "connection {i}: {e} ({lost} calls without a reply)"
            ));
            self.errors += lost as u64;
            self.conns[i].outstanding.clear();
            if let Some(w) = self.conns[i].watch.take() {
                let _ = h.remove_handle(w);
            }
            return;
        }
        let c = &mut self.conns[i];
        let want = if c.tx_off < c.tx.len() {
            Events::READABLE | Events::WRITABLE
        } else {
            Events::READABLE
        };
        if want != c.interest {
            c.interest = want;
            if let Some(w) = c.watch {
                let _ = h.update_handle(w, want);
            }
        }
    }

    fn service(&mut self, i: usize, events: Events) -> io::Result<()> {
        if events.intersects(Events::READABLE | Events::HANGUP | Events::ERROR) {
            self.receive(i)?;
        }
        self.fill(i);
        if let Err(e) = self.flush(i) {
            // The server may have answered before it went away: count what it sent first.
            while let Ok(true) = self.receive(i) {}
            return Err(e);
        }
        Ok(())
    }

    /// One read and the frames it completes; `Ok(false)` when there was nothing to read.
    fn receive(&mut self, i: usize) -> io::Result<bool> {
        let c = &mut self.conns[i];
        let got = match c.reader.read_from(&mut c.stream) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => return Err(e),
        };
        while let Some(frame) = self.conns[i].reader.next_frame()? {
            self.on_frame(i, frame.header, &frame.payload);
        }
        Ok(got)
    }

    fn on_frame(&mut self, i: usize, header: Header, payload: &[u8]) {
        if header.program == KEEPALIVE_PROGRAM {
            if header.is_keepalive(KEEPALIVE_PING) {
                let c = &mut self.conns[i];
                proto::encode_frame_into(&mut c.tx, &Header::keepalive(KEEPALIVE_PONG), &[]);
            }
            return;
        }
        let Some((sent_at, p)) = self.conns[i].outstanding.remove(&header.serial) else {
            self.error(format!(
                "connection {i}: reply to serial {} that is not outstanding",
                header.serial
            ));
            return;
        };
        let now = Instant::now();
        self.last_reply = now;
        self.received += 1;
        let us = now.duration_since(sent_at).as_micros() as u64;
        let _ = self.latency.record(us.max(1));
        *self.by_procedure.entry(p).or_default() += 1;
        if header.status != status::OK {
            self.error_replies += 1;
            self.error(format!(
                "connection {i}: {} call {} failed: {}",
                p.name(),
                header.serial,
                String::from_utf8_lossy(payload)
            ));
            return;
        }
        let correct = match p {
            Procedure::Echo => payload == self.echo_payload.as_slice(),
            Procedure::Hash => payload == self.hash_reply,
            Procedure::Sleep => payload.is_empty(),
            Procedure::Stats => serde_json::from_slice::<serde_json::Value>(payload).is_ok(),
        };
        if !correct || header.procedure != p as u32 {
            self.error(format!(
                "connection {i}: wrong reply to {} call {}",
                p.name(),
                header.serial
            ));
        }
    }

    fn outstanding(&self) -> usize {
        self.conns.iter().map(|c| c.outstanding.len()).sum()
    }
}

fn lock(load: &Mutex<Load>) -> std::sync::MutexGuard<'_, Load> {
    load.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a load against a server and reports what it measured.
///
/// # Errors
///
/// `InvalidInput` for zero clients, zero in-flight calls or an empty mix; the error of the
/// first connection that cannot be made, or of the event loop.
pub fn run_load(cfg: &LoadConfig) -> io::Result<LoadReport> {
    if cfg.clients == 0 || cfg.inflight == 0 || cfg.mix.iter().all(|(_, w)| *w == 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "clients, inflight and the mix must not be zero",
        ));
    }
    let mut event_loop = EventLoop::with_backend(AnyBackend::with_choice(cfg.backend)?)?;
    let handle = event_loop.handle().clone();
    let schedule: Vec<Procedure> = cfg
        .mix
        .iter()
        .flat_map(|(p, w)| std::iter::repeat_n(*p, *w as usize))
        .collect();
    let echo_payload: Vec<u8> = (0..cfg.payload).map(|i| (i * 31 % 251) as u8).collect();
    let mut conns = Vec::with_capacity(cfg.clients);
    for _ in 0..cfg.clients {
        let stream = Stream::connect(&cfg.addr)?;
        stream.set_nonblocking(true)?;
        conns.push(Conn {
            stream,
            watch: None,
            reader: FrameReader::new(MAX_MESSAGE),
            tx: Vec::new(),
            tx_off: 0,
            outstanding: HashMap::new(),
            next_serial: 0,
            turn: 0,
            interest: Events::READABLE,
        });
    }
    let start = Instant::now();
    let load = Arc::new(Mutex::new(Load {
        cfg: cfg.clone(),
        schedule,
        hash_reply: proto::fnv1a64(&echo_payload).to_be_bytes(),
        echo_payload,
        conns,
        sending: true,
        sent: 0,
        received: 0,
        error_replies: 0,
        errors: 0,
        error_samples: Vec::new(),
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        by_procedure: HashMap::new(),
        last_reply: start,
    }));
    {
        let mut l = lock(&load);
        for i in 0..l.conns.len() {
            let weak = Arc::downgrade(&load);
            let fd = l.conns[i].stream.fd();
            let watch = handle.add_handle(fd, Events::READABLE, move |h, _, _, ev| {
                if let Some(load) = weak.upgrade() {
                    lock(&load).on_ready(h, i, ev);
                }
            })?;
            l.conns[i].watch = Some(watch);
            l.fill(i);
            l.on_ready(&handle, i, Events::WRITABLE);
        }
    }
    if let Some(progress) = cfg.progress.clone() {
        let weak = Arc::downgrade(&load);
        handle.add_timeout(
            Frequency::Period(Duration::from_millis(100)),
            move |_, _| {
                if let Some(load) = weak.upgrade() {
                    let received = lock(&load).received;
                    progress(start.elapsed(), received);
                }
            },
        )?;
    }
    let stop_sending = start + cfg.duration;
    let give_up = stop_sending + cfg.drain_timeout;
    loop {
        let now = Instant::now();
        {
            let mut l = lock(&load);
            if now >= stop_sending {
                l.sending = false;
            }
            let open = l.conns.iter().any(|c| c.watch.is_some());
            if (!l.sending && l.outstanding() == 0) || !open || now >= give_up {
                break;
            }
        }
        let until = if now < stop_sending {
            stop_sending
        } else {
            give_up
        };
        event_loop.run_once_timeout(until - now)?;
    }
    let mut l = lock(&load);
    let lost = l.outstanding();
    if lost > 0 {
        l.error(format!(
            "{lost} calls got no reply within {:?}",
            cfg.drain_timeout
        ));
        l.errors += lost as u64 - 1;
    }
    for c in &mut l.conns {
        if let Some(w) = c.watch.take() {
            let _ = handle.remove_handle(w);
        }
    }
    let elapsed = l.last_reply.duration_since(start);
    let mut by_procedure: Vec<(Procedure, u64)> =
        l.by_procedure.iter().map(|(p, n)| (*p, *n)).collect();
    by_procedure.sort_by_key(|(p, _)| *p as u32);
    let report = LoadReport {
        sent: l.sent,
        received: l.received,
        error_replies: l.error_replies,
        errors: l.errors,
        error_samples: l.error_samples.clone(),
        elapsed,
        latency: l.latency.clone(),
        by_procedure,
    };
    drop(l);
    // Let the loop drop the callbacks' state.
    let _ = event_loop.run_once_timeout(Duration::ZERO);
    Ok(report)
}
