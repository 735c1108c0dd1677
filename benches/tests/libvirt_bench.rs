//! `vireo-bench libvirt` end to end (needs libvirt; skipped without it unless
//! VIREO_REQUIRE_LIBVIRT=1): every point delivers events, on vireo and on libvirt's default
//! loop, and reports positive figures.

use std::process::Command;

#[test]
fn libvirt_bench_measures_vireo_and_the_default_loop() {
    let missing = vireo_libvirt::testing::missing(&[]);
    if !vireo_libvirt::testing::ready_or_skip("vireo-bench libvirt", missing) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vireo-bench"))
        .args(["libvirt", "--quick", "--json"])
        .args(["--system", "vireo-epoll", "--system", "libvirt-default"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // --quick: 1 and 20 connections, two systems.
    assert_eq!(lines.len(), 4, "{lines:?}");
    for l in &lines {
        let n = l["connections"].as_u64().unwrap();
        let events = l["events"].as_u64().unwrap();
        assert!(events >= 2 * n, "{l}");
        assert_eq!(events % (2 * n), 0, "every subscriber got every event: {l}");
        assert!(l["events_per_s"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["loop_cpu_us_per_event"].as_f64().unwrap() > 0.0, "{l}");
    }
}
