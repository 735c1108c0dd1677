//! io_uring polls armed by a thread that exits: the kernel cancels them (`ECANCELED`) on rings
//! without `SINGLE_ISSUER`, and the backend must arm them again for the loop's new thread, on
//! every setup the probe can fall back to.
#![cfg(feature = "io-uring")]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use vireo_backends::{IoUring, SetupFlags};
use vireo_core::{EventLoop, Events};

const FLAGS: [SetupFlags; 3] = [
    SetupFlags::SingleIssuerDeferTaskrun,
    SetupFlags::CoopTaskrun,
    SetupFlags::None,
];

#[test]
fn watches_and_wakeups_survive_the_exit_of_the_thread_that_armed_them() {
    if let Err(why) = IoUring::probe() {
        let required = std::env::var("VIREO_REQUIRE_BACKENDS")
            .is_ok_and(|v| v.split(',').any(|b| b.trim() == "io-uring"));
        assert!(!required, "io_uring is required but unavailable: {why}");
        eprintln!("skipping: io_uring unavailable here: {why}");
        return;
    }
    for flags in FLAGS {
        let backend = match IoUring::with_setup_flags(flags) {
            Ok(b) => b,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("skipping {flags}: this kernel does not know it");
                continue;
            }
            Err(e) => panic!("{flags}: {e}"),
        };
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        // Arm every poll (the watch's and the waker's) on a thread that then exits.
        let mut lp = {
            let fired = Arc::clone(&fired);
            let fd = reader.as_raw_fd();
            std::thread::spawn(move || {
                let mut lp = EventLoop::with_backend(backend).unwrap();
                lp.handle()
                    .add_handle(fd, Events::READABLE, move |_, _, _, _| {
                        fired.store(true, SeqCst)
                    })
                    .unwrap();
                lp.run_once_timeout(Duration::ZERO).unwrap();
                lp
            })
            .join()
            .unwrap()
        };
        // A cross-thread wake-up reaches the loop blocked on its new thread.
        let woke = Arc::new(AtomicBool::new(false));
        let handle = lp.handle().clone();
        let waker = {
            let woke = Arc::clone(&woke);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                handle.invoke(move |_| woke.store(true, SeqCst)).unwrap();
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !woke.load(SeqCst) && Instant::now() < deadline {
            lp.run_once_timeout(Duration::from_secs(10)).unwrap();
        }
        waker.join().unwrap();
        assert!(woke.load(SeqCst), "{flags}: the wake-up never arrived");
        // And the watch still reports its fd.
        rustix::io::write(&writer, b"x").unwrap();
        while !fired.load(SeqCst) && Instant::now() < deadline {
            lp.run_once_timeout(Duration::from_millis(100)).unwrap();
        }
        assert!(fired.load(SeqCst), "{flags}: READABLE never arrived");
    }
}
