//! Creating a ring, and saying precisely why io_uring is unusable when it is.

use std::{error, fmt, io};

use io_uring::{IoUring, opcode};

/// Why io_uring cannot be used on this machine, as found by [`probe`](crate::IoUring::probe)
/// or [`IoUring::new`](vireo_core::Backend::new).
///
/// Converted into an [`io::Error`] (with this value as its inner error, reachable through
/// `get_ref().and_then(|e| e.downcast_ref::<UringError>())`) where the `Backend` trait needs one.
#[derive(Debug)]
#[non_exhaustive]
pub enum UringError {
    /// `io_uring_setup` failed with `ENOSYS`: the kernel is older than 5.1, was built without
    /// io_uring, or a seccomp filter (as in many container runtimes' default profiles) answers
    /// `ENOSYS` for it.
    NotSupported,
    /// `EPERM` with the sysctl `kernel.io_uring_disabled = 2`: io_uring is switched off.
    DisabledBySysctl,
    /// `EPERM` with `kernel.io_uring_disabled = 1`: only members of `kernel.io_uring_group`
    /// (and privileged processes) may create rings.
    RestrictedToGroup,
    /// `EPERM` although the sysctl allows io_uring: a seccomp filter or another security policy
    /// (containers, WSL, sandboxes) forbids it.
    Denied,
    /// `ENOMEM`: the ring could not be mapped, usually the `RLIMIT_MEMLOCK` limit on kernels
    /// before 5.12.
    MemLock,
    /// The kernel lacks something this backend needs (named).
    MissingFeature(&'static str),
    /// Any other error from `io_uring_setup` or the first `io_uring_enter`.
    Os(io::Error),
}

impl fmt::Display for UringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UringError::NotSupported => f.write_str(
                "io_uring is not supported: io_uring_setup failed with ENOSYS (kernel older than \
                 5.1, built without io_uring, or a seccomp filter answering ENOSYS)",
            ),
            UringError::DisabledBySysctl => f.write_str(
                "io_uring is disabled: io_uring_setup failed with EPERM and \
                 kernel.io_uring_disabled is 2",
            ),
            UringError::RestrictedToGroup => f.write_str(
                "io_uring is restricted: io_uring_setup failed with EPERM, \
                 kernel.io_uring_disabled is 1 and this process is not in kernel.io_uring_group",
            ),
            UringError::Denied => f.write_str(
                "io_uring is denied: io_uring_setup failed with EPERM although \
                 kernel.io_uring_disabled allows it (a seccomp filter or container policy)",
            ),
            UringError::MemLock => f.write_str(
                "io_uring ring could not be allocated: ENOMEM (raise RLIMIT_MEMLOCK on kernels \
                 before 5.12)",
            ),
            UringError::MissingFeature(what) => {
                write!(f, "io_uring is too old for vireo: it lacks {what}")
            }
            UringError::Os(e) => write!(f, "io_uring setup failed: {e}"),
        }
    }
}

impl error::Error for UringError {
    fn source(&self) -> Option<&(dyn error::Error + 'static)> {
        match self {
            UringError::Os(e) => Some(e),
            _ => None,
        }
    }
}

impl From<UringError> for io::Error {
    fn from(e: UringError) -> io::Error {
        let kind = match &e {
            UringError::NotSupported | UringError::MissingFeature(_) => io::ErrorKind::Unsupported,
            UringError::DisabledBySysctl | UringError::RestrictedToGroup | UringError::Denied => {
                io::ErrorKind::PermissionDenied
            }
            UringError::MemLock => io::ErrorKind::OutOfMemory,
            UringError::Os(inner) => inner.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// The value of `kernel.io_uring_disabled`, when the kernel has that sysctl.
fn io_uring_disabled_sysctl() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn classify(e: io::Error) -> UringError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => UringError::NotSupported,
        Some(libc::EPERM) => match io_uring_disabled_sysctl() {
            Some(2) => UringError::DisabledBySysctl,
            Some(1) => UringError::RestrictedToGroup,
            _ => UringError::Denied,
        },
        Some(libc::ENOMEM) => UringError::MemLock,
        _ => UringError::Os(e),
    }
}

/// The setup flags a ring was created with, from the most capable set down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupFlags {
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG`
    /// (Linux 6.1+): completions are produced only when the loop thread waits, the best
    /// batching; the flag tells the loop when deferred work is still pending.
    SingleIssuerDeferTaskrun,
    /// `IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG` (Linux 5.19+).
    CoopTaskrun,
    /// No setup flags.
    None,
}

impl SetupFlags {
    /// The ladder tried at creation, most capable first.
    pub(crate) const LADDER: [SetupFlags; 3] = [
        SetupFlags::SingleIssuerDeferTaskrun,
        SetupFlags::CoopTaskrun,
        SetupFlags::None,
    ];

    /// The flags as the kernel headers name them.
    pub fn as_str(self) -> &'static str {
        match self {
            SetupFlags::SingleIssuerDeferTaskrun => "SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG",
            SetupFlags::CoopTaskrun => "COOP_TASKRUN|TASKRUN_FLAG",
            SetupFlags::None => "none",
        }
    }
}

impl fmt::Display for SetupFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`probe`](crate::IoUring::probe) found about this machine's io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringInfo {
    /// The setup flags the ring ended up with.
    pub flags: SetupFlags,
    /// Whether waits carry their timeout in the enter call (`IORING_ENTER_EXT_ARG`, 5.11+);
    /// otherwise a `IORING_OP_TIMEOUT` is queued before each timed wait.
    pub ext_arg: bool,
    /// Submission queue entries.
    pub sq_entries: u32,
    /// Completion queue entries.
    pub cq_entries: u32,
}

pub(crate) const SQ_ENTRIES: u32 = 256;
pub(crate) const CQ_ENTRIES: u32 = 4096;

/// Builds a ring with exactly `flags`.
pub(crate) fn build(flags: SetupFlags, sq: u32, cq: u32) -> io::Result<IoUring> {
    let mut builder = IoUring::builder();
    builder.setup_cqsize(cq).setup_clamp();
    match flags {
        SetupFlags::SingleIssuerDeferTaskrun => {
            builder
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }
        SetupFlags::CoopTaskrun => {
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        SetupFlags::None => {}
    }
    builder.build(sq)
}

/// Creates a ring with the most capable flags the kernel accepts, checks the features vireo
/// needs, and runs one no-op through it.
pub(crate) fn create() -> Result<(IoUring, UringInfo), UringError> {
    let mut last = None;
    let mut found = None;
    'ladder: for flags in SetupFlags::LADDER {
        for (sq, cq) in [(SQ_ENTRIES, CQ_ENTRIES), (32, 256)] {
            match build(flags, sq, cq) {
                Ok(ring) => {
                    found = Some((ring, flags));
                    break 'ladder;
                }
                // Unknown flags: try fewer. Out of locked memory: try smaller first.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    last = Some(e);
                    continue 'ladder;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => last = Some(e),
                Err(e) => return Err(classify(e)),
            }
        }
    }
    let Some((mut ring, flags)) = found else {
        return Err(classify(
            last.unwrap_or_else(|| io::Error::other("no ring")),
        ));
    };
    let params = ring.params();
    if !params.is_feature_nodrop() {
        return Err(UringError::MissingFeature("IORING_FEAT_NODROP (Linux 5.5)"));
    }
    let info = UringInfo {
        flags,
        ext_arg: params.is_feature_ext_arg(),
        sq_entries: params.sq_entries(),
        cq_entries: params.cq_entries(),
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(classify)?;
    for (code, name) in [
        (opcode::PollAdd::CODE, "IORING_OP_POLL_ADD"),
        (opcode::PollRemove::CODE, "IORING_OP_POLL_REMOVE"),
        (opcode::Timeout::CODE, "IORING_OP_TIMEOUT"),
    ] {
        if !probe.is_supported(code) {
            return Err(UringError::MissingFeature(name));
        }
    }
    // Some sandboxes allow io_uring_setup but filter io_uring_enter: run one no-op.
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| UringError::Os(io::Error::other("a new submission queue is full")))?;
    ring.submit_and_wait(1).map_err(classify)?;
    ring.completion().for_each(drop);
    Ok((ring, info))
}
