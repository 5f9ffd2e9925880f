#!/bin/sh
# e2e_bench.sh - smoke test of the benchmark harness (bench/bench.py): the
# tiny case and the test-size transformer LM (lmtiny: a graph model exported
# by torch_export, sequence cross-entropy) at one repetition must run both
# sides and print every row, so `make bench` cannot rot unnoticed; so must the
# micro-batched cifarmb case at 32 samples.  Timings are not checked here.
# Usage: sh tests/e2e_bench.sh build/curvd
set -u
. "$(dirname "$0")/e2e_lib.sh"
B=$(dirname "$CURVD")
( cd "$ROOT" && "$PY" bench/bench.py --bench-ops "$B/bench_ops" --cases tiny,lmtiny --reps 1 \
    --threads 1 --markdown "$T/table.md" ) > "$T/out.txt" 2> "$T/err.txt"
check "bench.py exits 0" [ $? -eq 0 ]
for op in gradient hvp ggnvp trace eigen5 power5 density; do
    check "row $op" grep -q "^tiny  *$op" "$T/out.txt"
    check "graph row $op" grep -q "^lmtiny  *$op" "$T/out.txt"
done
check "speed-ups are numbers" sh -c "grep '^tiny  *trace' '$T/out.txt' | grep -q '[0-9]x'"
check "markdown table" grep -q '^| tiny | density |' "$T/table.md"
check "markdown graph rows" grep -q '^| lmtiny | density |' "$T/table.md"
[ "$FAIL" = 0 ] || cat "$T/out.txt" "$T/err.txt"
# the cifarmb case (bench/bench_microbatch.py) on 32 samples in micro-batches of 8: both
# curvd runs (cached, and a budget that recomputes) and torch's micro-batch loop
( cd "$ROOT" && "$PY" bench/bench_microbatch.py --curvd "$CURVD" --n 32 --micro-batch 8 \
    --threads 1 ) > "$T/mb.txt" 2>&1
check "bench_microbatch.py exits 0" [ $? -eq 0 ]
check "cifarmb rows" sh -c "grep -q '^cifarmb  *hvp-mb .*[0-9]x' '$T/mb.txt' && grep -q '^cifarmb  *hvp-cache .*[0-9]x' '$T/mb.txt'"
check "cifarmb budget recomputes" grep -q 'caches [0-3]/4 ' "$T/mb.txt"
[ "$FAIL" = 0 ] || cat "$T/mb.txt"
finish
