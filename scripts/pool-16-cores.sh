#!/bin/bash
# The pool on a many-core machine: docs/bench/pool-16-cores.md came from this script.
#
#   scripts/pool-16-cores.sh [VIREO_BENCH] [OUT_DIR]
#
# VIREO_BENCH is a release build of vireo-bench (default target/release/vireo-bench, built
# with `cargo build --release -p vireo-benches`); tables go to OUT_DIR (default
# target/pool-16-cores). Takes about 2.5 minutes on 16 CPUs.
set -euo pipefail
B=${1:-target/release/vireo-bench}
OUT=${2:-target/pool-16-cores}
mkdir -p "$OUT"
lscpu > "$OUT/lscpu.txt" 2>&1 || true
timeout 300 "$B" scaling --jobs 200000 --runs 3 > "$OUT/scaling.txt"
timeout 150 "$B" pool --workers 2 --runs 5 > "$OUT/pool2.txt"
timeout 150 "$B" pool --workers 15 --runs 5 > "$OUT/pool15.txt"
cat "$OUT/scaling.txt" "$OUT/pool2.txt" "$OUT/pool15.txt"
