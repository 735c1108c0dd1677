//! Unix signals and child processes as loop sources ([`vireo_core::signal`]).
//!
//! Signals are process-wide and the cases of one backend run in parallel in one process, so
//! every case raises a signal of its own (real-time signals from `SIGRTMIN + 1` up, and
//! `SIGUSR1`, `SIGUSR2`, `SIGWINCH` for the standard ones).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vireo_core::{Backend, Error, EventLoop, SignalInfo};

use crate::kit::*;

/// How long a signal may take to wake a blocked loop (the rule is "at once").
const WAKE_BOUND: Duration = Duration::from_millis(900);

fn rt(n: i32) -> i32 {
    libc::SIGRTMIN() + n
}

fn raise(sig: i32) {
    // SAFETY: kill(2) on this process with a signal the case watches (a handler is installed).
    assert_eq!(unsafe { libc::kill(libc::getpid(), sig) }, 0);
}

type Seen = Arc<Mutex<Vec<SignalInfo>>>;

fn watch<B: Backend>(lp: &EventLoop<B>, signals: &[i32]) -> (vireo_core::SignalId, Seen) {
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let id = lp
        .handle()
        .add_signal(signals, move |h, _, info| {
            assert!(h.is_loop_thread());
            sink.lock().unwrap().push(*info);
        })
        .unwrap();
    (id, seen)
}

fn total(seen: &Seen) -> u32 {
    seen.lock().unwrap().iter().map(|i| i.count).sum()
}

/// A signal raised by another thread while the loop blocks wakes it at once; the callback
/// runs on the loop thread and is told the signal, a count, and who sent it.
pub fn signal_wakes_a_blocked_loop<B: Backend>() {
    let mut lp = new_loop::<B>();
    let sig = rt(1);
    let (_, seen) = watch(&lp, &[sig]);
    let other = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        raise(sig);
    });
    let start = Instant::now();
    lp.run_once_timeout(Duration::from_secs(30)).unwrap();
    let took = start.elapsed();
    other.join().unwrap();
    assert!(took < WAKE_BOUND, "woke after {took:?}");
    run_until(&mut lp, "the signal callback", || {
        !seen.lock().unwrap().is_empty()
    });
    let info = seen.lock().unwrap()[0];
    assert_eq!(info.signal, sig);
    assert_eq!(info.count, 1);
    // SAFETY: getpid/getuid cannot fail.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    assert_eq!(info.pid, Some(pid));
    assert_eq!(info.uid, Some(uid));
}

/// A burst of queued (real-time) signals is counted one by one; a burst of a standard signal
/// is counted at least once and at most once per kill (the kernel merges pending ones). After
/// the burst nothing more is reported.
pub fn a_burst_of_signals_is_counted<B: Backend>() {
    let mut lp = new_loop::<B>();
    let (queued, std_sig) = (rt(2), libc::SIGUSR1);
    let (_, seen_rt) = watch(&lp, &[queued]);
    let (_, seen_std) = watch(&lp, &[std_sig]);
    for _ in 0..50 {
        raise(queued);
        raise(std_sig);
    }
    run_until(&mut lp, "50 real-time signals", || total(&seen_rt) == 50);
    run_until(&mut lp, "a standard signal", || total(&seen_std) >= 1);
    run_iterations(&mut lp, 5);
    assert_eq!(total(&seen_rt), 50);
    assert!(total(&seen_std) <= 50);
    let calls = seen_rt.lock().unwrap().len();
    assert!(calls <= 50, "{calls} callbacks for 50 deliveries");
}

/// A signal that arrives while no iteration runs is reported by the next one.
pub fn signal_between_iterations_is_reported_next<B: Backend>() {
    let mut lp = new_loop::<B>();
    let sig = rt(3);
    let (_, seen) = watch(&lp, &[sig]);
    run_iterations(&mut lp, 1);
    raise(sig);
    run_until(&mut lp, "the signal callback", || total(&seen) == 1);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// Two watches of one signal in one loop and one in another loop each hear every delivery;
/// one watch for several signals hears each.
pub fn every_watch_in_every_loop_hears_a_signal<B: Backend>() {
    let mut a = new_loop::<B>();
    let mut b = new_loop::<B>();
    let (sig, other) = (rt(4), rt(5));
    let (_, a1) = watch(&a, &[sig]);
    let (_, a2) = watch(&a, &[sig, other]);
    let (_, b1) = watch(&b, &[sig]);
    raise(sig);
    raise(other);
    run_until(&mut a, "both watches of loop a", || {
        total(&a1) == 1 && total(&a2) == 2
    });
    run_until(&mut b, "the watch of loop b", || total(&b1) == 1);
    let mut signals: Vec<i32> = a2.lock().unwrap().iter().map(|i| i.signal).collect();
    signals.sort_unstable();
    assert_eq!(signals, [sig, other]);
}

/// A watch removed from inside its callback is not called again, and once the last watch of
/// a signal is gone the signal's previous disposition is back.
pub fn removed_inside_its_callback_and_disposition_restored<B: Backend>() {
    let mut lp = new_loop::<B>();
    let sig = libc::SIGUSR2;
    // SAFETY: reads this signal's disposition into a zeroed, valid sigaction.
    let disposition = || unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut old), 0);
        old.sa_sigaction
    };
    // SAFETY: ignoring SIGUSR2 in this process (only this case uses it).
    unsafe { libc::signal(sig, libc::SIG_IGN) };
    let calls = Arc::new(Mutex::new(0));
    let seen = Arc::clone(&calls);
    let probe = DropProbe::new();
    let (tracked, inside) = (probe.tracked(), probe.clone());
    lp.handle()
        .add_signal(&[sig], move |h, id, _| {
            let _ = &tracked;
            *seen.lock().unwrap() += 1;
            h.remove_signal(id).unwrap();
            assert_eq!(inside.drops(), 0, "dropped inside remove_signal");
        })
        .unwrap();
    assert_ne!(disposition(), libc::SIG_IGN, "no handler installed");
    raise(sig);
    run_until(&mut lp, "the first call", || *calls.lock().unwrap() == 1);
    raise(sig);
    run_iterations(&mut lp, 3);
    assert_eq!(*calls.lock().unwrap(), 1);
    assert_eq!(
        disposition(),
        libc::SIG_IGN,
        "the previous disposition is not back"
    );
}

/// A watch removed from another thread is never called, even for a signal already pending
/// in its pipe.
pub fn removed_signal_watch_never_fires<B: Backend>() {
    let mut lp = new_loop::<B>();
    let sig = rt(6);
    let (keep, kept) = watch(&lp, &[sig]);
    let (gone, removed) = watch(&lp, &[sig]);
    raise(sig);
    let h = lp.handle().clone();
    thread::spawn(move || h.remove_signal(gone).unwrap())
        .join()
        .unwrap();
    run_until(&mut lp, "the kept watch", || total(&kept) == 1);
    run_iterations(&mut lp, 3);
    assert!(removed.lock().unwrap().is_empty());
    assert!(matches!(
        lp.handle().remove_signal(gone),
        Err(Error::UnknownWatch(_))
    ));
    lp.handle().remove_signal(keep).unwrap();
}

/// What cannot be watched is an error, not a panic.
pub fn unwatchable_signals_are_refused<B: Backend>() {
    let lp = new_loop::<B>();
    for bad in [
        &[][..],
        &[0],
        &[65],
        &[-1],
        &[libc::SIGKILL],
        &[libc::SIGSTOP],
        &[libc::SIGSEGV],
    ] {
        assert!(
            matches!(lp.handle().add_signal(bad, |_, _, _| {}), Err(Error::Io(_))),
            "{bad:?} accepted"
        );
    }
}

fn shell(script: &str) -> Child {
    Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `child` has exited without reaping it (`waitid` with `WNOWAIT`).
fn until_zombie(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::waitid(
        rustix::process::WaitId::Pid(pid),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
    )
    .unwrap();
}

type Status = Arc<Mutex<Vec<std::process::ExitStatus>>>;

fn add_child<B: Backend>(
    lp: &EventLoop<B>,
    child: &Child,
    sigchld: bool,
) -> (vireo_core::ChildId, Status) {
    let got: Status = Arc::default();
    let sink = Arc::clone(&got);
    let cb = move |h: &vireo_core::LoopHandle, _, status| {
        assert!(h.is_loop_thread());
        sink.lock().unwrap().push(status);
    };
    let id = if sigchld {
        lp.handle().add_child_by_sigchld(child.id(), cb)
    } else {
        lp.handle().add_child(child.id(), cb)
    }
    .unwrap();
    (id, got)
}

// The children are reaped by vireo's child watches: that is what the case checks.
#[allow(clippy::zombie_processes)]
fn children<B: Backend>(sigchld: bool) {
    use std::os::unix::process::ExitStatusExt;
    let mut lp = new_loop::<B>();
    // Exits while watched (when its input closes), with a code.
    let mut during = shell("read x; exit 7");
    let (_, got_during) = add_child(&lp, &during, sigchld);
    drop(during.stdin.take());
    // Exited before the watch was added.
    let before = shell("exit 0");
    until_zombie(&before);
    let (_, got_before) = add_child(&lp, &before, sigchld);
    // Killed by a signal.
    let mut killed = shell("read x");
    let (_, got_killed) = add_child(&lp, &killed, sigchld);
    killed.kill().unwrap();
    // Removed before it exits: never reported, not reaped.
    let mut removed = shell("read x; exit 3");
    let (rid, got_removed) = add_child(&lp, &removed, sigchld);
    lp.handle().remove_child(rid).unwrap();
    let _ = removed.stdin.take().map(|mut s| s.write_all(b"\n"));
    until_zombie(&removed);
    run_until(&mut lp, "three exit statuses", || {
        !got_during.lock().unwrap().is_empty()
            && !got_before.lock().unwrap().is_empty()
            && !got_killed.lock().unwrap().is_empty()
    });
    run_iterations(&mut lp, 3);
    assert_eq!(got_during.lock().unwrap().len(), 1, "reported once");
    assert_eq!(got_during.lock().unwrap()[0].code(), Some(7));
    assert_eq!(got_before.lock().unwrap()[0].code(), Some(0));
    assert_eq!(got_killed.lock().unwrap()[0].signal(), Some(libc::SIGKILL));
    assert!(got_removed.lock().unwrap().is_empty());
    // vireo reaped the three it reported, and left the removed one to its owner.
    assert_eq!(removed.wait().unwrap().code(), Some(3));
    assert!(
        during.try_wait().is_err(),
        "the reported child was not reaped"
    );
    // Only children still to be reaped can be watched.
    let echild = |pid: u32| {
        matches!(lp.handle().add_child(pid, |_, _, _| {}),
            Err(Error::Io(e)) if e.raw_os_error() == Some(libc::ECHILD))
    };
    assert!(echild(removed.id()), "an already reaped child");
    assert!(echild(1), "another process's child");
    assert!(echild(i32::MAX as u32), "a pid that does not exist");
    assert!(matches!(lp.handle().add_child(0, |_, _, _| {}),
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::InvalidInput));
}

/// Child processes through pidfds: an exit while watched, one before the watch, a kill by a
/// signal, each reported once on the loop thread and reaped; a removed watch reports nothing
/// and leaves the child to its owner; a pid that is not a child is refused.
pub fn child_exit_statuses_by_pidfd<B: Backend>() {
    children::<B>(false);
}

/// The same through the SIGCHLD fallback (waitpid of exactly the watched pids).
pub fn child_exit_statuses_by_sigchld<B: Backend>() {
    children::<B>(true);
}
