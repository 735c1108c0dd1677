//! A length word costs the server what arrived, not what it announces. Alone in its test
//! binary because it measures the process's resident memory.

mod common;

use common::{TestServer, backends, send};
use vireo_rpc::proto;

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn connections_announcing_the_largest_frame_commit_almost_no_memory() {
    const CONNECTIONS: usize = 64;
    for kind in backends() {
        let server = TestServer::start(kind, |_| {});
        server.assert_serves();
        let before = rss();
        let mut hogs = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut s = server.raw();
            let word = ((proto::MAX_MESSAGE + proto::LEN_WORD) as u32).to_be_bytes();
            send(&mut s, &word);
            send(&mut s, &[0]);
            hogs.push(s);
        }
        // Every hog's bytes were in its socket before this client connected, and one loop
        // iteration reads every ready socket: when the reply comes, the server has read them.
        for _ in 0..3 {
            server.assert_serves();
        }
        let grown = rss().saturating_sub(before);
        eprintln!("{kind}: RSS grew by {} KiB", grown >> 10);
        // Announced: 64 x 16 MiB = 1 GiB. Arrived: 64 x 5 bytes, in buffers of 4 KiB.
        assert!(
            grown < 32 << 20,
            "{kind}: RSS grew by {} KiB for {CONNECTIONS} announced frames",
            grown >> 10
        );
        drop(hogs);
    }
}
