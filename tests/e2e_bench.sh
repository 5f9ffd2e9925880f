#!/bin/sh
# e2e_bench.sh - smoke test of the benchmark harness (bench/bench.py): the
# tiny case at one repetition must run both sides and print every row, so
# `make bench` cannot rot unnoticed.  Timings are not checked here.
# Usage: sh tests/e2e_bench.sh build/curvd
set -u
B=$(dirname "$1")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
pass=0 fail=0
check() { if eval "$2"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $1"; fi; }
/usr/bin/python3 bench/bench.py --bench-ops "$B/bench_ops" --cases tiny --reps 1 --threads 1 \
    --markdown "$T/table.md" > "$T/out.txt" 2> "$T/err.txt"
check "bench.py exits 0" "[ $? -eq 0 ]"
for op in gradient hvp ggnvp trace eigen5 power5 density; do
    check "row $op" "grep -q '^tiny  *$op' '$T/out.txt'"
done
check "speed-ups are numbers" "grep '^tiny  *trace' '$T/out.txt' | grep -q '[0-9]x'"
check "markdown table" "grep -q '^| tiny | density |' '$T/table.md'"
[ $fail -eq 0 ] || { cat "$T/out.txt" "$T/err.txt"; }
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
