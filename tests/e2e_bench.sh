#!/bin/sh
# e2e_bench.sh - smoke test of the benchmark harness (bench/bench.py): the
# tiny case and the test-size transformer LM (lmtiny: a graph model exported
# by torch_export, sequence cross-entropy) at one repetition must run both
# sides and print every row, so `make bench` cannot rot unnoticed.  Timings
# are not checked here.
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
finish
