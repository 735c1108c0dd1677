//! A real libvirtd for tests and benchmarks: a session daemon with the test driver
//! (`test:///default`, one running domain named `test`) in a temporary directory of its own.
//!
//! There is no systemd to ask and, as root, libvirtd's system mode does not start (it wants a
//! `libvirt-qemu` user), so [`SessionDaemon::start`] runs `/usr/sbin/libvirtd` in session mode:
//! as the calling user, or, for root, as uid/gid 65534 through `setpriv` (util-linux). The
//! daemon runs under `timeout`, so it goes by itself if its owner dies, and it is killed by
//! its pid when the value drops.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The Debian packages behind what this module runs.
pub const PACKAGES: &str = "libvirt-daemon libvirt-clients libvirt-dev python3-libvirt";

/// The environment variable that makes a missing libvirt a test failure instead of a skip.
pub const REQUIRE_ENV: &str = "VIREO_REQUIRE_LIBVIRT";

/// The uid and gid the daemon runs as when the caller is root.
const NOBODY: u32 = 65534;

/// What is missing to run a libvirtd here, or `None` when nothing is. `extra` names more
/// programs that must be on `PATH` (a C compiler, say).
pub fn missing(extra: &[&str]) -> Option<String> {
    let mut missing = Vec::new();
    for path in ["/usr/sbin/libvirtd", "/usr/bin/virsh"] {
        if !Path::new(path).exists() {
            missing.push(path.to_owned());
        }
    }
    if crate::Libvirt::load().is_err() {
        missing.push(crate::LIBVIRT_SONAME.to_owned());
    }
    let mut programs = extra.to_vec();
    if is_root() {
        programs.push("setpriv");
    }
    for p in programs {
        if Command::new(p).arg("--version").output().is_err() {
            missing.push(p.to_owned());
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// For a test that needs libvirt: `true` when it may run; `false` after printing why it is
/// skipped (the packages to install). With [`REQUIRE_ENV`]`=1`, panics instead of skipping.
///
/// # Panics
///
/// When something is missing and [`REQUIRE_ENV`] is `1`.
pub fn ready_or_skip(what: &str, missing: Option<String>) -> bool {
    let Some(missing) = missing else {
        return true;
    };
    let why = format!("{what} needs libvirt (Debian packages: {PACKAGES}); missing: {missing}");
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{why} ({REQUIRE_ENV}=1)");
    }
    eprintln!("skipped: {why}");
    false
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Why a daemon did not start.
#[derive(Debug)]
pub struct StartError(String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        StartError(e.to_string())
    }
}

/// A running session libvirtd with the test driver.
pub struct SessionDaemon {
    dir: PathBuf,
    child: Child,
    pid: i32,
    uri: String,
}

impl fmt::Debug for SessionDaemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionDaemon")
            .field("pid", &self.pid)
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl SessionDaemon {
    /// Starts a daemon in a fresh temporary directory and waits (at most 30 s) until its
    /// socket is there. `config` is written as its `libvirtd.conf` (empty: libvirt's
    /// defaults).
    ///
    /// # Errors
    ///
    /// When the directory cannot be made, libvirtd cannot be spawned, or it does not come up
    /// (the error carries its log).
    pub fn start(config: &str) -> Result<SessionDaemon, StartError> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vireo-libvirtd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "run", "config/libvirt", "cache"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(dir.join("config/libvirt/libvirtd.conf"), config)?;
        std::fs::set_permissions(
            dir.join("run"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let mut cmd = if is_root() {
            chown_tree(&dir, NOBODY)?;
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={NOBODY}"))
                .arg(format!("--regid={NOBODY}"))
                .args(["--clear-groups", "env", "-i"]);
            c
        } else {
            let mut c = Command::new("env");
            c.arg("-i");
            c
        };
        for (k, v) in [
            ("HOME", "home"),
            ("XDG_RUNTIME_DIR", "run"),
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_CACHE_HOME", "cache"),
        ] {
            cmd.arg(format!("{k}={}", dir.join(v).display()));
        }
        let log = std::fs::File::create(dir.join("libvirtd.log"))?;
        cmd.arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["timeout", "900", "/usr/sbin/libvirtd"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        let mut me = SessionDaemon {
            uri: format!(
                "test+unix:///default?socket={}",
                dir.join("run/libvirt/libvirt-sock").display()
            ),
            dir,
            child,
            pid: 0,
        };
        let started = Instant::now();
        loop {
            // No signal to wait on: the daemon says it is up by writing these files.
            let pid = std::fs::read_to_string(me.dir.join("run/libvirt/libvirtd.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let (Some(pid), true) = (pid, me.socket().exists()) {
                me.pid = pid;
                return Ok(me);
            }
            if started.elapsed() > Duration::from_secs(30) || me.child.try_wait()?.is_some() {
                let log = std::fs::read_to_string(me.dir.join("libvirtd.log")).unwrap_or_default();
                return Err(StartError(format!("libvirtd did not start: {log}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URI of its test driver: `test+unix:///default?socket=...`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Its main socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirt-sock")
    }

    /// Its admin socket (libvirt's admin program; only the daemon's uid may connect).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirt-admin-sock")
    }

    /// The uid the daemon runs as (65534 when the caller is root, else the caller's), which
    /// its admin socket requires of clients.
    pub fn uid(&self) -> u32 {
        if is_root() {
            NOBODY
        } else {
            rustix::process::geteuid().as_raw()
        }
    }

    /// A command that runs `program` as the daemon's user (through `setpriv` when the caller
    /// is root), for clients of its admin socket.
    pub fn as_daemon_user(&self, program: &Path) -> Command {
        if is_root() {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={NOBODY}"))
                .arg(format!("--regid={NOBODY}"))
                .arg("--clear-groups")
                .arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Its directory (removed when the value drops).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon's pid (not the `timeout` wrapper's).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` to the daemon.
    ///
    /// # Errors
    ///
    /// `kill`'s error.
    pub fn signal(&self, signal: rustix::process::Signal) -> io::Result<()> {
        let pid = rustix::process::Pid::from_raw(self.pid)
            .ok_or_else(|| io::Error::other("no daemon pid"))?;
        rustix::process::kill_process(pid, signal).map_err(io::Error::from)
    }

    /// Runs `commands` (separated by `;`) in one `virsh` connection, bounded by 60 s.
    ///
    /// # Errors
    ///
    /// When virsh cannot run or fails (its stderr is in the error).
    pub fn virsh(&self, commands: &str) -> io::Result<Output> {
        let out = Command::new("timeout")
            .args(["60", "virsh", "-q", "-c", &self.uri, commands])
            .current_dir(&self.dir)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "virsh {commands:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(out)
    }
}

fn chown_tree(dir: &Path, id: u32) -> io::Result<()> {
    let owner = Some(rustix::process::Uid::from_raw(id));
    let group = Some(rustix::process::Gid::from_raw(id));
    rustix::fs::chown(dir, owner, group)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            chown_tree(&path, id)?;
        } else {
            rustix::fs::chown(&path, owner, group)?;
        }
    }
    Ok(())
}

impl Drop for SessionDaemon {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
