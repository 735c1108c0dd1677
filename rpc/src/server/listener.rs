//! Listeners: binding the addresses, accepting, and libvirt's rules for when a server stops
//! accepting (its client limit, and a pause after the process runs out of descriptors).

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vireo_core::{Events, Frequency, LoopHandle};

use super::{ListenAddr, State};
use crate::net::Stream;

/// A bound, non-blocking listening socket. A Unix one removes its file when dropped.
pub(super) enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr`; returns the listener and the address bound (the port picked for
    /// `tcp:…:0`).
    pub(super) fn bind(addr: &ListenAddr) -> io::Result<(Listener, ListenAddr)> {
        match addr {
            ListenAddr::Unix(path) => {
                let listener = match UnixListener::bind(path) {
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                        // A socket file left by a server that died: replace it only when
                        // nobody answers on it.
                        if UnixStream::connect(path).is_ok() {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("{} is in use by a running server", path.display()),
                            ));
                        }
                        std::fs::remove_file(path)?;
                        UnixListener::bind(path)?
                    }
                    other => other?,
                };
                listener.set_nonblocking(true)?;
                Ok((Listener::Unix(listener, path.clone()), addr.clone()))
            }
            ListenAddr::Tcp(a) => {
                let listener = TcpListener::bind(a)?;
                listener.set_nonblocking(true)?;
                let local = listener.local_addr()?;
                Ok((Listener::Tcp(listener), ListenAddr::Tcp(local)))
            }
        }
    }

    pub(super) fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l, path) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Ok((Stream::Unix(s), format!("unix:{}", path.display())))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), format!("tcp:{peer}")))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl State {
    /// Accepts what listener `index` of server `srv` has waiting.
    pub(super) fn accept_from(&mut self, h: &LoopHandle, srv: usize, index: usize) {
        // Bounded so one busy listener cannot starve the clients.
        for _ in 0..64 {
            let s = &self.servers[srv];
            if !s.accepting || self.shutting_down {
                return;
            }
            let Some((listener, _)) = s.listeners.get(index) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    if s.admin && !same_uid(&stream) {
                        // libvirtd's rule for its admin socket: nobody else's uid.
                        tracing::warn!(%peer, "admin socket: a client of another uid was refused");
                        continue;
                    }
                    if let Err(e) = self.add_client(h, srv, stream, peer) {
                        tracing::warn!(error = %e, "cannot watch a new client");
                    }
                    self.check_limits(h, srv);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.raw_os_error().is_some_and(is_fd_exhaustion) => {
                    tracing::warn!(error = %e, retry_ms = s.config.accept_retry.as_millis() as u64,
                        "out of file descriptors: accepting paused");
                    self.pause_accepting_for_emfile(h, srv);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    tracing::debug!(error = %e, "accept failed");
                }
            }
        }
    }

    fn pause_accepting_for_emfile(&mut self, h: &LoopHandle, srv: usize) {
        self.set_accepting(h, srv, false);
        if self.servers[srv].emfile_timer.is_some() {
            return;
        }
        let Some(state) = self.me.upgrade() else {
            return;
        };
        let retry = self.servers[srv].config.accept_retry;
        let timer = h.add_timeout(Frequency::Period(retry), move |h, id| {
            let _ = h.remove_timeout(id);
            let _ = state.with(|st| {
                st.servers[srv].emfile_timer = None;
                st.check_limits(h, srv);
            });
        });
        self.servers[srv].emfile_timer = timer.ok();
    }

    fn set_accepting(&mut self, h: &LoopHandle, srv: usize, on: bool) {
        let s = &mut self.servers[srv];
        if s.accepting == on {
            return;
        }
        s.accepting = on;
        let events = if on {
            Events::READABLE
        } else {
            Events::empty()
        };
        for (_, watch) in &s.listeners {
            let _ = h.update_handle(*watch, events);
        }
    }

    /// libvirt's CheckLimits: accept only below `max_clients` and outside an EMFILE pause.
    pub(super) fn check_limits(&mut self, h: &LoopHandle, srv: usize) {
        let s = &self.servers[srv];
        if self.shutting_down || s.emfile_timer.is_some() {
            return;
        }
        let below = s.nclients < s.config.max_clients;
        if below != s.accepting {
            if below {
                tracing::info!(server = %s.config.name, clients = s.nclients, "accepting again");
            } else {
                tracing::warn!(
                    server = %s.config.name,
                    max_clients = s.config.max_clients,
                    "client limit reached: accepting paused"
                );
            }
            self.set_accepting(h, srv, below);
        }
    }
}

/// Whether the peer of a Unix stream has this process's effective uid (`SO_PEERCRED`); a TCP
/// stream never has.
fn same_uid(stream: &Stream) -> bool {
    match stream {
        Stream::Unix(s) => rustix::net::sockopt::socket_peercred(s)
            .is_ok_and(|c| c.uid == rustix::process::geteuid()),
        Stream::Tcp(_) => false,
    }
}

fn is_fd_exhaustion(errno: i32) -> bool {
    errno == rustix::io::Errno::MFILE.raw_os_error()
        || errno == rustix::io::Errno::NFILE.raw_os_error()
}
