#!/usr/bin/env bash
# Fuzzes vireo-rpc's frame reader for a bounded time (default 60 s), then the server's read
# path for its default case count. The seeds in rpc/fuzz/corpus run first.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
case "$seconds" in (*[!0-9]*|'') echo "usage: $0 [SECONDS]" >&2; exit 2;; esac
VIREO_FUZZ_SECONDS="$seconds" cargo test --release -p vireo-rpc --test fuzz -- --nocapture
