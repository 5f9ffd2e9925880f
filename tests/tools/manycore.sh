#!/bin/sh
# manycore.sh - run e2e scripts (default: all of them) and optionally the unit
# suites as on a many-core CI machine, from a small VM: curvd, libcurvd.so
# and the suites see CURVD_SHIM_CPUS (16) CPUs through tests/tools/cpushim.c
# (LD_PRELOAD), so `curvd serve` starts 8 workers and `curvd run`'s default
# pool is 16 threads.  Every script runs, failures included; a summary
# line per script goes to $OUT/summary (exit 1 if any failed).
#
# Usage: tests/tools/manycore.sh [-u] [-b] [tests/e2e_x.py ...]
#   -u  also the unit suites build/tests/test_*   -b  CURVD_SHIM_BLAS=1
#   (OpenBLAS's own default pool sized for the emulated cores too)
# Env: B (build dir, default build), OUT (logs, default $B/manycore/logs).
# Needs a built tree (`make build-tests`); builds the shim into $B/manycore/.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
B=${B:-build}
M=$ROOT/$B/manycore
OUT=${OUT:-$M/logs}
unit=0
while [ $# -gt 0 ]; do
  case $1 in
    -u) unit=1; shift ;;
    -b) export CURVD_SHIM_BLAS=1; shift ;;
    *) break ;;
  esac
done
mkdir -p "$M" "$OUT"
${CC:-cc} -shared -fPIC -O2 -Wall -Wextra -o "$M/cpushim.so" tests/tools/cpushim.c -ldl || exit 2
# build/manycore/curvd: the real binary under the shim (it finds curvd-mpi.so
# beside itself through /proc/self/exe); the tests find libcurvd.so beside it.
cat > "$M/curvd" <<EOS
#!/bin/sh
LD_PRELOAD="$M/cpushim.so\${LD_PRELOAD:+:\$LD_PRELOAD}" exec "$ROOT/$B/curvd" "\$@"
EOS
chmod +x "$M/curvd"
for f in libcurvd.so curvd-mpi.so bench_ops; do
  [ -e "$B/$f" ] && ln -sf "$ROOT/$B/$f" "$M/$f"
done
# in-process users (Python's ctypes load of libcurvd.so, the suites) get the
# shim too; it lies only to code outside /usr and /lib (not Python, torch, OpenBLAS)
export LD_PRELOAD="$M/cpushim.so${LD_PRELOAD:+:$LD_PRELOAD}"
# the emulation took: serve's default workers are min(CPUs, 8)
n=${CURVD_SHIM_CPUS:-16}; [ "$n" -gt 8 ] && n=8
timeout 3 "$M/curvd" serve --port 0 --no-demo 2> "$OUT/serve.log"
grep -q "curvd: $n workers" "$OUT/serve.log" || { echo "no $n workers under the shim:" >&2; cat "$OUT/serve.log" >&2; exit 2; }
: > "$OUT/summary"
fail=0
line() { echo "$1 rc=$2 $3s load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/summary"; }
if [ $unit = 1 ]; then
  for t in "$B"/tests/test_*; do
    case $t in *.d) continue ;; esac
    s=$(date +%s); "$t" > "$OUT/$(basename "$t").log" 2>&1; rc=$?
    line "$(basename "$t")" $rc $(( $(date +%s) - s )); [ $rc = 0 ] || fail=1
  done
fi
list="$*"
[ -n "$list" ] || list="$(ls tests/e2e_*.sh tests/e2e_*.py | grep -v 'e2e_lib\.')"
for t in $list; do
  s=$(date +%s)
  bin=$M/curvd
  # e2e_dockerfile reads the binary's ELF header (readelf, ldd), it runs nothing
  case $t in *e2e_dockerfile.sh) bin=$ROOT/$B/curvd ;; esac
  case $t in
    *.py) /usr/bin/python3 "$t" "$bin" > "$OUT/$(basename "$t").log" 2>&1 ;;
    *) sh "$t" "$bin" > "$OUT/$(basename "$t").log" 2>&1 ;;
  esac
  rc=$?; line "$(basename "$t")" $rc $(( $(date +%s) - s )); [ $rc = 0 ] || fail=1
done
exit $fail
