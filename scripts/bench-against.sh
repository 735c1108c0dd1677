#!/usr/bin/env bash
# Compares this checkout's hot paths with another commit's, in one run: builds both
# vireo-bench binaries, runs pipes, timers, wake and rpc for each in turn (old, new, old,
# new, ...), and prints the medians over the repetitions with their new/old ratio.
#
#   scripts/bench-against.sh REV [REPETITIONS]      (REV: a commit, default 6 repetitions)
#
# Needs git, cargo and python3. Every run is bounded (timeout 300 s each).
set -euo pipefail
rev=${1:?usage: scripts/bench-against.sh REV [REPETITIONS]}
reps=${2:-6}
top=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'git -C "$top" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$top" worktree add -q --detach "$work/old" "$rev"
(cd "$work/old" && CARGO_TARGET_DIR="$work/target" cargo build -q --release -p vireo-benches --bin vireo-bench)
(cd "$top" && cargo build -q --release -p vireo-benches --bin vireo-bench)
old="$work/target/release/vireo-bench"
new="$top/target/release/vireo-bench"
out="$work/out"
mkdir -p "$out"
for rep in $(seq "$reps"); do
    for v in old new; do
        b=$old
        [ "$v" = new ] && b=$new
        timeout 300 "$b" pipes --pipes 100,1000 --sets 100:1000 --rounds 15 --system vireo-epoll \
            --system vireo-poll --system vireo-io-uring --system raw-epoll --json >"$out/pipes-$v-$rep.json"
        timeout 300 "$b" timers --add-cancel 200000 --periodic 2000 --duration 1 \
            --system vireo-epoll --system vireo-io-uring --json >"$out/timers-$v-$rep.json"
        timeout 300 "$b" wake --samples 1000 --messages 100000 --json >"$out/wake-$v-$rep.json"
        timeout 300 "$b" rpc --clients 16 --payloads 64 --duration 2 --runs 2 \
            --system vireo-epoll --system vireo-io-uring --json >"$out/rpc-$v-$rep.json"
    done
done
python3 - "$out" <<'PY'
import collections, glob, json, statistics, sys
metrics = {
    "pipes": ["dispatch_us_median", "setup_us_median"],
    "timers": ["add_cancel_ns_per_op", "cpu_ns_per_firing", "lateness_p50_us"],
    "wake": ["latency_p50_us", "per_sec_1_thread", "per_sec_2_threads", "update_p50_us"],
    "rpc": ["requests_per_sec_median", "p50_us_median", "p99_us_median"],
}
vals = collections.defaultdict(list)
for f in glob.glob(sys.argv[1] + "/*.json"):
    bench, version, _ = f.rsplit("/", 1)[1][:-5].split("-")
    for line in open(f):
        if line.strip():
            r = json.loads(line)
            key = (bench, r["system"], r.get("pipes", ""))
            for m in metrics[bench]:
                if r.get(m) is not None:
                    vals[(key, m, version)].append(r[m])
for key, m in sorted({(k, m) for k, m, _ in vals}):
    o, n = vals.get((key, m, "old")), vals.get((key, m, "new"))
    if o and n:
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"{key[0]:6} {key[1]:15} {str(key[2]):5} {m:24} old {mo:12.1f} new {mn:12.1f} new/old {mn / mo:5.2f}")
PY
