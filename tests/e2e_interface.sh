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
. "$(dirname "$0")/e2e_lib.sh"
e2e_start_or_finish "$T/log" --workers 1 --no-demo

if curl -sf "$BASE/v1/ops" > "$T/ops.json" \
   && "$CURVD" routes > "$T/routes.txt" && "$CURVD" --help > "$T/help.txt" 2>&1; then
  ok "read /v1/ops, curvd routes and curvd --help"
else
  bad "could not read /v1/ops, curvd routes or curvd --help"
fi

if "$PY" "$ROOT/tests/check_interface.py" "$ROOT/docs/interface.md" \
     "$T/routes.txt" "$T/ops.json" "$T/help.txt"; then
  ok "docs/interface.md matches the code"
else
  bad "docs/interface.md and the code differ (lines above)"
fi

if "$PY" "$ROOT/tests/check_interface.py" --self-test "$ROOT/docs/interface.md" \
     "$T/routes.txt" "$T/ops.json" "$T/help.txt"; then
  ok "the interface check's self-test"
else
  bad "the interface check's self-test"
fi
finish
