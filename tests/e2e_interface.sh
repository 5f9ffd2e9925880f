#!/bin/sh
# e2e_interface.sh - docs/interface.md against the code (issue 18, item 7).
#
# Usage: sh tests/e2e_interface.sh build/curvd
# Starts a daemon on a free loopback port, reads its GET /v1/ops, `curvd routes`
# and `curvd --help`, and runs tests/check_interface.py on them: every route,
# op, op option, curvature, job status and command-line flag must be documented
# in docs/interface.md, and nothing documented there may be missing from the
# code.  Then the checker's self-test shows that an undocumented route, op,
# option, curvature, status or flag, and a route line removed from the
# document, are each caught.  Ends with "N passed, M failed".
set -u
CURVD=${1:-build/curvd}
case "$CURVD" in /*) ;; *) CURVD="$(pwd)/$CURVD" ;; esac
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
T=$(mktemp -d "${TMPDIR:-/tmp}/curvd-iface.XXXXXX")
PASS=0
FAIL=0
DPID=""
cleanup() { [ -n "$DPID" ] && kill "$DPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
trap 'exit 1' INT TERM

"$CURVD" serve --port 0 --workers 1 --no-demo 2>"$T/log" &
DPID=$!
i=0
while [ $i -lt 100 ] && ! grep -q "listening on" "$T/log"; do sleep 0.1; i=$((i + 1)); done
PORT=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$T/log" | head -1)
[ -n "$PORT" ] || { echo "daemon did not start"; cat "$T/log"; echo "0 passed, 1 failed"; exit 1; }

if curl -sf "http://127.0.0.1:$PORT/v1/ops" > "$T/ops.json" \
   && "$CURVD" routes > "$T/routes.txt" && "$CURVD" --help > "$T/help.txt" 2>&1; then
  PASS=$((PASS + 1))
else
  FAIL=$((FAIL + 1)); echo "FAIL: could not read /v1/ops, curvd routes or curvd --help"
fi

if "$PY" "$ROOT/tests/check_interface.py" "$ROOT/docs/interface.md" \
     "$T/routes.txt" "$T/ops.json" "$T/help.txt"; then
  PASS=$((PASS + 1))
else
  FAIL=$((FAIL + 1)); echo "FAIL: docs/interface.md and the code differ (lines above)"
fi

if "$PY" "$ROOT/tests/check_interface.py" --self-test "$ROOT/docs/interface.md" \
     "$T/routes.txt" "$T/ops.json" "$T/help.txt"; then
  PASS=$((PASS + 1))
else
  FAIL=$((FAIL + 1)); echo "FAIL: the interface check's self-test"
fi

echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
