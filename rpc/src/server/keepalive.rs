//! libvirt's keepalive program (`0x6b656570` v1), which every server answers itself: a PING
//! gets a PONG at once, any keepalive message proves the peer alive, and a server pings each
//! client that stays silent for `keepalive_interval`, closing it after `keepalive_count`
//! unanswered pings.

use std::time::Instant;

use vireo_core::LoopHandle;

use super::{Close, State};
use crate::proto::{self, Header, KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM};

impl State {
    /// Answers a frame of the keepalive program from client `key`. Returns false when the
    /// frame belongs to another program.
    pub(super) fn keepalive_message(&mut self, key: usize, h: &Header) -> Result<bool, Close> {
        if h.program != KEEPALIVE_PROGRAM {
            return Ok(false);
        }
        if h.is_keepalive(KEEPALIVE_PING) {
            let pong = proto::encode_frame(&Header::keepalive(KEEPALIVE_PONG), &[]);
            self.queue(key, pong, false)?;
        }
        // PONG (and anything else of the keepalive program) only proves the peer is alive.
        Ok(true)
    }

    /// Server `srv`'s keepalive timer: pings its silent clients, closes those that used up
    /// their pings.
    pub(super) fn keepalive(&mut self, h: &LoopHandle, srv: usize) {
        let config = &self.servers[srv].config;
        let (Some(interval), count) = (config.keepalive_interval, config.keepalive_count) else {
            return;
        };
        let now = Instant::now();
        for (_, c) in self.clients.iter_mut().filter(|(_, c)| c.server == srv) {
            if c.awaiting_replies() || c.rx_paused {
                // Not read while it waits on the server: its pongs cannot be seen, and time
                // spent so does not count against it.
                c.last_rx = now;
                c.pings_left = count;
            }
        }
        let keys: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.server == srv && now.duration_since(c.last_rx) >= interval)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let c = &mut self.clients[key];
            if c.pings_left == 0 {
                self.close(
                    key,
                    Close::Dropped("connection closed due to keepalive timeout".into()),
                );
                self.check_limits(h, srv);
                continue;
            }
            c.pings_left -= 1;
            c.last_rx = now;
            let ping = proto::encode_frame(&Header::keepalive(KEEPALIVE_PING), &[]);
            let outcome = self
                .queue(key, ping, false)
                .and_then(|()| self.write_out(key));
            self.settle(h, key, outcome);
        }
    }
}
