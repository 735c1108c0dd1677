#!/usr/bin/env bash
# Runs the test suites under valgrind memcheck and fails on any definite leak or memory error.
#   scripts/memcheck.sh            # every suite below
#   scripts/memcheck.sh pool       # the suites whose executable name contains "pool"
# io_uring is left out (the io_uring suites, and the backend in every other suite through
# VIREO_SKIP_BACKENDS): valgrind cannot follow the kernel reading and writing the shared rings.
# The EMFILE test is left out too: under valgrind the child's setrlimit(RLIMIT_NOFILE) is
# refused (valgrind keeps descriptors of its own at the top of the range).
set -euo pipefail
cd "$(dirname "$0")/.."
filter="${1:-}"
export VIREO_SKIP_BACKENDS=io-uring
# What `AnyBackend` picks by itself (the `any` conformance suite, the binaries' `auto`): epoll.
export VIREO_BACKEND=epoll
unset VIREO_REQUIRE_BACKENDS
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
mapfile -t exes < <(
    cargo test --release --workspace --all-features --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
'
)
failed=0
ran=0
for exe in "${exes[@]}"; do
    name="$(basename "$exe")"
    case "$name" in
        io_uring-*|uring_probe-*|vireo_bench-*) continue ;;
    esac
    [[ -n "$filter" && "$name" != *"$filter"* ]] && continue
    ran=$((ran + 1))
    log="target/memcheck-${name}.log"
    if valgrind --quiet --leak-check=full --show-leak-kinds=definite \
        --errors-for-leak-kinds=definite --error-exitcode=99 \
        "$exe" --test-threads=1 \
        --skip out_of_file_descriptors_pauses_accepting_and_recovers >"$log" 2>&1; then
        echo "ok      $name"
    else
        echo "FAILED  $name (see $log)"
        failed=$((failed + 1))
    fi
done
echo "$ran suites under memcheck, $failed failed"
[[ $failed -eq 0 ]]
