//! Choosing among the compiled backends at run time.

use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::time::Duration;
use std::{env, fmt};

use vireo_core::{Backend, BackendInfo, Events, Readiness, Token};

/// The environment variable [`AnyBackend::new`] reads: `poll`, `epoll`, `io-uring`,
/// `portable` or `auto` (the default).
pub const BACKEND_ENV: &str = "VIREO_BACKEND";

/// A backend that can be chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// [`Poll`](crate::Poll) (feature `poll`).
    Poll,
    /// [`Epoll`](crate::Epoll) (feature `epoll`).
    Epoll,
    /// [`IoUring`](crate::IoUring) (feature `io-uring`).
    IoUring,
    /// [`Portable`](crate::Portable) (feature `portable`).
    Portable,
}

impl BackendKind {
    /// Every kind, best first: the order `auto` tries them in after the compile-time default.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::IoUring,
        BackendKind::Epoll,
        BackendKind::Portable,
        BackendKind::Poll,
    ];

    /// The name used by `VIREO_BACKEND` and [`Backend::NAME`].
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Poll => "poll",
            BackendKind::Epoll => "epoll",
            BackendKind::IoUring => "io-uring",
            BackendKind::Portable => "portable",
        }
    }

    /// Whether this backend is compiled into this build.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Poll => cfg!(feature = "poll"),
            BackendKind::Epoll => {
                cfg!(all(
                    feature = "epoll",
                    any(target_os = "linux", target_os = "android")
                ))
            }
            BackendKind::IoUring => cfg!(all(feature = "io-uring", target_os = "linux")),
            BackendKind::Portable => cfg!(feature = "portable"),
        }
    }

    /// The compiled kinds, best first.
    pub fn compiled() -> Vec<BackendKind> {
        BackendKind::ALL
            .into_iter()
            .filter(|k| k.is_compiled())
            .collect()
    }

    /// The kind of [`DefaultBackend`](crate::DefaultBackend).
    pub fn default_kind() -> BackendKind {
        BackendKind::compiled()[0]
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = io::Error;

    fn from_str(s: &str) -> io::Result<BackendKind> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "unknown backend {s:?}: expected one of poll, epoll, io-uring, portable, auto"
                    ),
                )
            })
    }
}

/// How [`AnyBackend`] picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The compile-time default, then down the chain (io-uring, epoll, portable, poll) past
    /// those that cannot start here; each fallback is logged and kept in the backend's info.
    Auto,
    /// Exactly this backend; failing to start it is an error, never a silent fallback.
    Only(BackendKind),
}

impl FromStr for Choice {
    type Err = io::Error;

    /// `auto` (or nothing) is [`Choice::Auto`]; a backend's name is [`Choice::Only`] it.
    fn from_str(s: &str) -> io::Result<Choice> {
        match s {
            "" | "auto" => Ok(Choice::Auto),
            name => name.parse().map(Choice::Only),
        }
    }
}

impl Choice {
    /// Reads [`BACKEND_ENV`]: unset, empty or `auto` is [`Choice::Auto`].
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an unknown name or one that is not valid UTF-8.
    pub fn from_env() -> io::Result<Choice> {
        match env::var(BACKEND_ENV) {
            Err(env::VarError::NotPresent) => Ok(Choice::Auto),
            Err(env::VarError::NotUnicode(_)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{BACKEND_ENV} is not valid UTF-8"),
            )),
            Ok(v) => v.parse(),
        }
    }
}

// One per loop, never moved in a hot path: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Inner {
    #[cfg(feature = "poll")]
    Poll(crate::Poll),
    #[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
    Epoll(crate::Epoll),
    #[cfg(all(feature = "io-uring", target_os = "linux"))]
    IoUring(crate::IoUring),
    #[cfg(feature = "portable")]
    Portable(crate::Portable),
}

/// Calls the same method on whichever backend is inside.
macro_rules! each {
    ($inner:expr, $b:ident => $body:expr) => {
        match $inner {
            #[cfg(feature = "poll")]
            Inner::Poll($b) => $body,
            #[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
            Inner::Epoll($b) => $body,
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            Inner::IoUring($b) => $body,
            #[cfg(feature = "portable")]
            Inner::Portable($b) => $body,
        }
    };
}

/// One of the compiled backends, chosen at run time.
///
/// [`Backend::new`] reads `VIREO_BACKEND` ([`Choice::from_env`]); [`AnyBackend::with_choice`]
/// takes the choice from the program. With `auto`, a backend that cannot start (io_uring denied
/// by seccomp, say) is passed over with a logged reason, which [`backend_info`] keeps under
/// `fallback`; a named backend that cannot start is an error.
///
/// [`backend_info`]: vireo_core::EventLoop::backend_info
///
/// ```
/// use vireo_backends::{AnyBackend, BackendKind, Choice};
/// use vireo_core::{Backend, EventLoop};
///
/// let backend = AnyBackend::with_choice(Choice::Only(BackendKind::Poll))?;
/// let event_loop = EventLoop::with_backend(backend)?;
/// assert_eq!(event_loop.backend_name(), "poll");
/// assert_eq!(event_loop.backend_info().get("chosen_by"), Some("explicit"));
/// # std::io::Result::Ok(())
/// ```
pub struct AnyBackend {
    inner: Inner,
    kind: BackendKind,
    explicit: bool,
    fallbacks: Vec<String>,
}

impl fmt::Debug for AnyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnyBackend")
            .field("kind", &self.kind)
            .field("fallbacks", &self.fallbacks)
            .finish_non_exhaustive()
    }
}

fn open(kind: BackendKind) -> io::Result<Inner> {
    match kind {
        #[cfg(feature = "poll")]
        BackendKind::Poll => crate::Poll::new().map(Inner::Poll),
        #[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
        BackendKind::Epoll => crate::Epoll::new().map(Inner::Epoll),
        #[cfg(all(feature = "io-uring", target_os = "linux"))]
        BackendKind::IoUring => crate::IoUring::new().map(Inner::IoUring),
        #[cfg(feature = "portable")]
        BackendKind::Portable => crate::Portable::new().map(Inner::Portable),
        #[allow(unreachable_patterns)]
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "backend {other} is not compiled in (compiled: {})",
                compiled_names()
            ),
        )),
    }
}

fn compiled_names() -> String {
    BackendKind::compiled()
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl AnyBackend {
    /// Starts the backend `choice` asks for.
    ///
    /// # Errors
    ///
    /// For [`Choice::Only`]: why that backend cannot start (not compiled in, or the kernel's
    /// error, e.g. a [`UringError`](crate::UringError) inside the `io::Error`). For
    /// [`Choice::Auto`]: the last backend's error when none can start.
    pub fn with_choice(choice: Choice) -> io::Result<AnyBackend> {
        match choice {
            Choice::Only(kind) => {
                let inner = open(kind)
                    .map_err(|e| io::Error::new(e.kind(), format!("{BACKEND_ENV}={kind}: {e}")))?;
                Ok(AnyBackend {
                    inner,
                    kind,
                    explicit: true,
                    fallbacks: Vec::new(),
                })
            }
            Choice::Auto => {
                let mut fallbacks = Vec::new();
                let mut last = None;
                for kind in BackendKind::compiled() {
                    match open(kind) {
                        Ok(inner) => {
                            return Ok(AnyBackend {
                                inner,
                                kind,
                                explicit: false,
                                fallbacks,
                            });
                        }
                        Err(e) => {
                            let reason = format!("{kind} unavailable: {e}");
                            log::warn!("vireo: {reason}; trying the next backend");
                            fallbacks.push(reason);
                            last = Some(e);
                        }
                    }
                }
                Err(last.unwrap_or_else(|| io::Error::other("no backend compiled in")))
            }
        }
    }

    /// Which backend runs.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Why backends before the running one were passed over (only with [`Choice::Auto`]).
    pub fn fallbacks(&self) -> &[String] {
        &self.fallbacks
    }
}

impl Backend for AnyBackend {
    const NAME: &'static str = "any";

    /// Chooses by `VIREO_BACKEND` (see [`Choice::from_env`]).
    fn new() -> io::Result<Self> {
        AnyBackend::with_choice(Choice::from_env()?)
    }

    /// The same kind as this one, also when it was chosen by `auto`: a loop that starts over
    /// stays on the backend it reported.
    fn fresh(&self) -> io::Result<Self> {
        let inner = match &self.inner {
            #[cfg(feature = "poll")]
            Inner::Poll(b) => b.fresh().map(Inner::Poll),
            #[cfg(all(feature = "epoll", any(target_os = "linux", target_os = "android")))]
            Inner::Epoll(b) => b.fresh().map(Inner::Epoll),
            #[cfg(all(feature = "io-uring", target_os = "linux"))]
            Inner::IoUring(b) => b.fresh().map(Inner::IoUring),
            #[cfg(feature = "portable")]
            Inner::Portable(b) => b.fresh().map(Inner::Portable),
        }?;
        Ok(AnyBackend {
            inner,
            kind: self.kind,
            explicit: self.explicit,
            fallbacks: self.fallbacks.clone(),
        })
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn clock(&self) -> Option<vireo_core::Clock> {
        each!(&self.inner, b => b.clock())
    }

    fn flush(&mut self) -> io::Result<()> {
        each!(&mut self.inner, b => b.flush())
    }

    fn info(&self) -> BackendInfo {
        let mut info = each!(&self.inner, b => b.info())
            .with("chosen_by", if self.explicit { "explicit" } else { "auto" });
        if !self.fallbacks.is_empty() {
            info = info.with("fallback", self.fallbacks.join("; "));
        }
        info
    }

    fn register(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        each!(&mut self.inner, b => b.register(fd, token, interest))
    }

    fn reregister(&mut self, fd: RawFd, token: Token, interest: Events) -> io::Result<()> {
        each!(&mut self.inner, b => b.reregister(fd, token, interest))
    }

    fn deregister(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        each!(&mut self.inner, b => b.deregister(fd, token))
    }

    fn wait(&mut self, ready: &mut Vec<Readiness>, timeout: Option<Duration>) -> io::Result<()> {
        each!(&mut self.inner, b => b.wait(ready, timeout))
    }
}

/// Starts the backend `VIREO_BACKEND` names (or `auto`) and returns what runs.
///
/// # Errors
///
/// As [`AnyBackend::with_choice`].
pub fn backend_info() -> io::Result<BackendInfo> {
    AnyBackend::new().map(|b| b.info())
}
