//! One client connection's state machine on the loop thread: read whole frames (bounded by
//! the input budget and the per-client throttle), queue and write replies in order, keep the
//! watch's interest in step, close with a reason.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use vireo_core::{Events, LoopHandle, WatchId};

use super::{State, UNBUDGETED_INPUT};
use crate::net::Stream;
use crate::proto::FrameReader;

pub(super) struct Outgoing {
    pub(super) bytes: Vec<u8>,
    /// A reply to a call (counted in flight until written), not a keepalive message.
    pub(super) tracked: bool,
}

pub(super) struct Client {
    pub(super) uid: u64,
    pub(super) stream: Stream,
    pub(super) peer: String,
    pub(super) watch: WatchId,
    pub(super) interest: Events,
    pub(super) reader: FrameReader,
    pub(super) tx: VecDeque<Outgoing>,
    pub(super) tx_offset: usize,
    pub(super) tx_bytes: usize,
    /// Calls received (handed to the pool, or run on the loop thread) whose reply is not yet
    /// fully written.
    pub(super) in_flight: usize,
    pub(super) last_rx: Instant,
    pub(super) pings_left: u32,
    /// The peer shut its side down: nothing more is read; the client is closed once every
    /// call received is answered and its reply written.
    pub(super) eof: bool,
    /// Not read until the input budget has room again (see `max_buffered_input`).
    pub(super) rx_paused: bool,
    /// Bytes this client reserved from the input budget for the frame it assembles.
    pub(super) rx_charged: usize,
    /// Index of its server in the daemon (the admin socket's for an admin client).
    pub(super) server: usize,
    /// When it connected, in seconds since the Unix epoch (libvirt's client timestamp).
    pub(super) connected: i64,
    /// The peer's uid, gid and pid (`SO_PEERCRED`), for a Unix client.
    pub(super) cred: Option<(u32, u32, i32)>,
}

impl Client {
    /// libvirt's transport number: 0 unix, 1 tcp.
    pub(super) fn transport(&self) -> u32 {
        match self.stream {
            Stream::Unix(_) => 0,
            Stream::Tcp(_) => 1,
        }
    }

    /// libvirt's client information, in libvirtd's order: `readonly`, then for a Unix client
    /// `unix_user_id`, `unix_user_name`, `unix_group_id`, `unix_group_name`,
    /// `unix_process_id`; for TCP the peer's address as `sock_addr`.
    pub(super) fn info(&self) -> Vec<crate::xdr::TypedParam> {
        use crate::xdr::{TypedParam, Value};
        let mut p = vec![TypedParam::new("readonly", Value::Boolean(false))];
        match self.cred {
            Some((uid, gid, pid)) => {
                p.push(TypedParam::new("unix_user_id", Value::Int(uid as i32)));
                p.push(TypedParam::new(
                    "unix_user_name",
                    Value::String(user_name(uid)),
                ));
                p.push(TypedParam::new("unix_group_id", Value::Int(gid as i32)));
                p.push(TypedParam::new(
                    "unix_group_name",
                    Value::String(group_name(gid)),
                ));
                p.push(TypedParam::new("unix_process_id", Value::Int(pid)));
            }
            None => {
                let addr = self.peer.strip_prefix("tcp:").unwrap_or(&self.peer);
                p.push(TypedParam::new("sock_addr", Value::String(addr.to_owned())));
            }
        }
        p
    }

    /// Calls still in the workers: the client waits on the server, so its silence (it is
    /// not read while throttled) says nothing about whether it is alive.
    pub(super) fn awaiting_replies(&self) -> bool {
        self.in_flight > self.tx.iter().filter(|o| o.tracked).count()
    }
}

/// Why a client is closed.
pub(super) enum Close {
    /// The peer closed or reset the connection.
    Gone(String),
    /// The server closes it (protocol error, keepalive, unread replies): logged as a warning.
    Dropped(String),
}

impl State {
    pub(super) fn add_client(
        &mut self,
        h: &LoopHandle,
        srv: usize,
        stream: Stream,
        peer: String,
    ) -> io::Result<()> {
        let entry = self.clients.vacant_entry();
        let key = entry.key();
        let uid = self.next_uid;
        let cred = peer_cred(&stream);
        let state = self
            .me
            .upgrade()
            .ok_or_else(|| io::Error::other("the server is gone"))?;
        let watch = h.add_handle(stream.fd(), Events::READABLE, move |h, _, _, events| {
            let _ = state.with(|st| st.client_ready(h, key, uid, events));
        })?;
        self.next_uid += 1;
        tracing::debug!(%peer, uid, "client connected");
        entry.insert(Client {
            uid,
            stream,
            peer,
            watch,
            interest: Events::READABLE,
            reader: FrameReader::new(self.servers[srv].config.max_message_size),
            tx: VecDeque::new(),
            tx_offset: 0,
            tx_bytes: 0,
            in_flight: 0,
            last_rx: Instant::now(),
            pings_left: self.servers[srv].config.keepalive_count,
            eof: false,
            rx_paused: false,
            rx_charged: 0,
            server: srv,
            connected: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            cred,
        });
        let s = &mut self.servers[srv];
        s.nclients += 1;
        s.summary.clients_accepted += 1;
        s.counters.clients.store(s.nclients, Relaxed);
        self.update_idle_timer();
        Ok(())
    }

    pub(super) fn client_ready(&mut self, h: &LoopHandle, key: usize, uid: u64, events: Events) {
        if self.clients.get(key).is_none_or(|c| c.uid != uid) {
            return;
        }
        // Write before read, as libvirt: a reply written may lift the throttle. A hang-up
        // with replies queued is settled by the write's error.
        let mut outcome = Ok(());
        let failed = events.intersects(Events::HANGUP | Events::ERROR);
        if events.contains(Events::WRITABLE) || (failed && !self.clients[key].tx.is_empty()) {
            outcome = self.write_out(key);
        }
        if outcome.is_ok() && events.intersects(Events::READABLE) | failed {
            outcome = self.read_in(key);
            // Replies queued by the read (calls run on the loop thread, refusals) go out now
            // rather than an iteration later.
            if outcome.is_ok() && !self.clients[key].tx.is_empty() {
                outcome = self.write_out(key);
            }
        }
        if outcome.is_ok() && events.contains(Events::ERROR) {
            // The socket's own error ends the read or write above; one that remains is the
            // loop's (a registration the kernel refused): this connection cannot be served.
            outcome = Err(Close::Dropped(
                "the event loop reports an error on this connection".into(),
            ));
        }
        self.settle(h, key, outcome);
    }

    /// After a client's reads and writes: closes it when they failed or when it has shut
    /// its side down and is owed nothing more, else sets what its watch waits for.
    pub(super) fn settle(&mut self, h: &LoopHandle, key: usize, outcome: Result<(), Close>) {
        let srv = self.clients[key].server;
        let outcome = outcome.and_then(|()| {
            let c = &self.clients[key];
            if c.eof && c.in_flight == 0 && c.tx.is_empty() {
                Err(Close::Gone("disconnected".into()))
            } else {
                Ok(())
            }
        });
        match outcome {
            Ok(()) => self.refresh_interest(h, key),
            Err(why) => {
                self.close(key, why);
                self.check_limits(h, srv);
            }
        }
        self.resume_paused(h, srv);
    }

    /// Reserves from the input budget what client `key`'s frame needs beyond
    /// [`UNBUDGETED_INPUT`], releasing what it no longer needs. Returns false (and holds no
    /// reservation) when the budget has no room for it.
    fn reserve_input(&mut self, key: usize) -> bool {
        let c = &mut self.clients[key];
        let s = &mut self.servers[c.server];
        let budget = s.config.max_buffered_input;
        let need = c
            .reader
            .pending_frame_len()
            .map_or(0, |len| len.saturating_sub(UNBUDGETED_INPUT));
        let others = s.rx_total - c.rx_charged;
        let fits = others + need <= budget;
        c.rx_charged = if fits { need } else { 0 };
        s.rx_total = others + c.rx_charged;
        fits
    }

    /// Reads again from clients paused for the input budget whose reservation now fits, in
    /// the order they were paused.
    fn resume_paused(&mut self, h: &LoopHandle, srv: usize) {
        let s = &mut self.servers[srv];
        if s.rx_paused.is_empty() || s.rx_total >= s.config.max_buffered_input {
            return;
        }
        let mut still = Vec::new();
        for (key, uid) in std::mem::take(&mut s.rx_paused) {
            if self.clients.get(key).is_none_or(|c| c.uid != uid) {
                continue;
            }
            if self.reserve_input(key) {
                self.clients[key].rx_paused = false;
                // The watch's level trigger reports the data still waiting in the socket.
                self.refresh_interest(h, key);
            } else {
                still.push((key, uid));
            }
        }
        self.servers[srv].rx_paused = still;
    }

    fn throttled(&self, c: &Client) -> bool {
        c.in_flight >= self.servers[c.server].config.max_client_requests
    }

    /// Reads what the socket has (a bounded number of reads) and dispatches whole frames.
    fn read_in(&mut self, key: usize) -> Result<(), Close> {
        for _ in 0..16 {
            let c = &self.clients[key];
            if c.in_flight >= self.servers[c.server].config.max_client_requests
                || self.shutting_down
                || c.eof
                || c.rx_paused
            {
                return Ok(());
            }
            if !self.reserve_input(key) {
                let c = &mut self.clients[key];
                c.rx_paused = true;
                self.servers[c.server].rx_paused.push((key, c.uid));
                tracing::debug!(peer = %c.peer, uid = c.uid, buffered = c.reader.buffered(),
                    "input budget spent: reading paused");
                return Ok(());
            }
            let c = &mut self.clients[key];
            match c.reader.read_from(&mut c.stream) {
                Ok(0) => {
                    // The peer shut its side down (or closed): answer what it sent, then
                    // close, as libvirt does for a client that stops sending.
                    c.eof = true;
                    let partial = c.reader.buffered();
                    tracing::debug!(peer = %c.peer, uid = c.uid, partial,
                        in_flight = c.in_flight, "end of input");
                    return self.dispatch_frames(key);
                }
                Ok(_) => {
                    c.last_rx = Instant::now();
                    c.pings_left = self.servers[c.server].config.keepalive_count;
                    let more = c.reader.filled_last_read();
                    self.dispatch_frames(key)?;
                    if !more {
                        // Drained: readiness reports the next bytes; no read to hear EAGAIN.
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(Close::Dropped(e.to_string()));
                }
                Err(e) => return Err(Close::Gone(e.to_string())),
            }
        }
        Ok(())
    }

    /// Hands every buffered whole frame on, until the client is throttled.
    pub(super) fn dispatch_frames(&mut self, key: usize) -> Result<(), Close> {
        loop {
            let c = &mut self.clients[key];
            let max = self.servers[c.server].config.max_client_requests;
            if c.in_flight >= max && !self.shutting_down {
                return Ok(());
            }
            let frame = match c.reader.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Close::Dropped(e.to_string())),
            };
            // The next frame may need less of the budget (or more: then the next read asks).
            self.reserve_input(key);
            self.dispatch(key, frame)?;
        }
    }

    pub(super) fn queue(&mut self, key: usize, bytes: Vec<u8>, tracked: bool) -> Result<(), Close> {
        let c = &mut self.clients[key];
        let cap = self.servers[c.server].config.max_queued_reply_bytes;
        if !c.tx.is_empty() && c.tx_bytes + bytes.len() > cap {
            return Err(Close::Dropped(format!(
                "client does not read its replies ({} bytes queued, limit {cap})",
                c.tx_bytes
            )));
        }
        c.tx_bytes += bytes.len();
        c.tx.push_back(Outgoing { bytes, tracked });
        Ok(())
    }

    /// Writes queued replies, several per system call, until the socket would block.
    pub(super) fn write_out(&mut self, key: usize) -> Result<(), Close> {
        let mut finished_tracked = 0;
        let result = {
            let c = &mut self.clients[key];
            loop {
                if c.tx.is_empty() {
                    break Ok(());
                }
                let slices: Vec<IoSlice<'_>> =
                    c.tx.iter()
                        .take(64)
                        .enumerate()
                        .map(|(i, o)| {
                            IoSlice::new(if i == 0 {
                                &o.bytes[c.tx_offset..]
                            } else {
                                &o.bytes
                            })
                        })
                        .collect();
                match c.stream.write_vectored(&slices) {
                    Ok(mut n) => {
                        while n > 0 {
                            let front = c.tx.front().expect("bytes written belong to a reply");
                            let left = front.bytes.len() - c.tx_offset;
                            if n < left {
                                c.tx_offset += n;
                                break;
                            }
                            n -= left;
                            let done = c.tx.pop_front().expect("front exists");
                            c.tx_bytes -= done.bytes.len();
                            c.tx_offset = 0;
                            if done.tracked {
                                c.in_flight -= 1;
                                finished_tracked += 1;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(Close::Gone(e.to_string())),
                }
            }
        };
        let s = &mut self.servers[self.clients[key].server];
        s.summary.replies_sent += finished_tracked;
        s.counters.replies_sent.fetch_add(finished_tracked, Relaxed);
        result?;
        if finished_tracked > 0 {
            // Room below the throttle: frames already buffered go first.
            self.dispatch_frames(key)?;
        }
        Ok(())
    }

    pub(super) fn refresh_interest(&mut self, h: &LoopHandle, key: usize) {
        let c = &self.clients[key];
        let reading = !self.shutting_down && !self.throttled(c) && !c.eof && !c.rx_paused;
        let c = &mut self.clients[key];
        let mut want = Events::empty();
        if reading {
            want |= Events::READABLE;
        }
        if !c.tx.is_empty() {
            want |= Events::WRITABLE;
        }
        if want != c.interest {
            c.interest = want;
            let _ = h.update_handle(c.watch, want);
        }
    }

    pub(super) fn close(&mut self, key: usize, why: Close) {
        let Some(c) = self.clients.try_remove(key) else {
            return;
        };
        let s = &mut self.servers[c.server];
        s.rx_total -= c.rx_charged;
        s.nclients -= 1;
        s.counters.clients.store(s.nclients, Relaxed);
        let _ = self.handle.remove_handle(c.watch);
        match why {
            Close::Gone(why) => tracing::debug!(peer = %c.peer, uid = c.uid, %why, "client closed"),
            Close::Dropped(why) => {
                s.summary.clients_dropped += 1;
                tracing::warn!(peer = %c.peer, uid = c.uid, %why, "client dropped");
            }
        }
        // The stream closes here, after its watch was removed.
        drop(c);
        self.update_idle_timer();
    }
}

/// The peer's uid, gid and pid (`SO_PEERCRED`) of a Unix stream.
pub(super) fn peer_cred(stream: &Stream) -> Option<(u32, u32, i32)> {
    match stream {
        Stream::Unix(s) => rustix::net::sockopt::socket_peercred(s)
            .ok()
            .map(|c| (c.uid.as_raw(), c.gid.as_raw(), c.pid.as_raw_nonzero().get())),
        Stream::Tcp(_) => None,
    }
}

/// A user's name (`getpwuid_r`), or the number when it has none.
fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid_r writes into `pwd` and `buf` (valid for `buf.len()` bytes) and sets
    // `result` to `&pwd` or NULL; `pw_name` then points into `buf`, read before it goes.
    entry_name(uid, |buf, result| unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut found = std::ptr::null_mut();
        let ok = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) == 0
            && !found.is_null();
        *result = ok.then(|| {
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned()
        });
    })
}

/// A group's name (`getgrgid_r`), or the number when it has none.
fn group_name(gid: u32) -> String {
    // SAFETY: as for `getpwuid_r` in `user_name`.
    entry_name(gid, |buf, result| unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut found = std::ptr::null_mut();
        let ok = libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) == 0
            && !found.is_null();
        *result = ok.then(|| {
            std::ffi::CStr::from_ptr(grp.gr_name)
                .to_string_lossy()
                .into_owned()
        });
    })
}

/// Runs a reentrant passwd/group lookup with a buffer; the number when it finds nothing.
fn entry_name(id: u32, lookup: impl FnOnce(&mut [libc::c_char], &mut Option<String>)) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut name = None;
    lookup(&mut buf, &mut name);
    name.unwrap_or_else(|| id.to_string())
}
