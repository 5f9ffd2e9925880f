#!/bin/sh
# e2e_readme.sh - runs the README's demo curl examples (the first ```sh block
# under "## Try it") against a daemon on a free loopback port.
# Usage: sh tests/e2e_readme.sh build/curvd
set -u
CURVD=${1:-build/curvd}
T=$(mktemp -d)
PASS=0; FAIL=0
cleanup() { [ -n "${DPID:-}" ] && kill "$DPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT INT TERM
"$CURVD" serve --port 0 --workers 2 2>"$T/log" &
DPID=$!
i=0
while [ $i -lt 100 ] && ! grep -q "listening on" "$T/log"; do sleep 0.1; i=$((i + 1)); done
PORT=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$T/log" | head -1)
[ -n "$PORT" ] || { echo "daemon did not start"; cat "$T/log"; echo "0 passed, 1 failed"; exit 1; }
awk '/^## Try it/{s=1} s&&/^```sh/{b=1;next} b&&/^```/{exit} b&&/^curl/{print}' README.md \
  | sed "s/localhost:8080/127.0.0.1:$PORT/g; s/^curl -s/curl -sf/" > "$T/cmds"
[ -s "$T/cmds" ] || { echo "no examples found"; echo "0 passed, 1 failed"; exit 1; }
while IFS= read -r cmd; do
  if sh -c "$cmd" > "$T/out" 2>&1 && ! grep -q '"status":"failed"' "$T/out"; then
    PASS=$((PASS + 1))
    case "$cmd" in *wait=*)
      if grep -q '"status":"succeeded"' "$T/out"; then PASS=$((PASS + 1)); else FAIL=$((FAIL + 1)); echo "FAIL (not succeeded): $cmd"; head -c 400 "$T/out"; echo; fi ;;
    esac
  else
    FAIL=$((FAIL + 1)); echo "FAIL: $cmd"; head -c 400 "$T/out"; echo
  fi
done < "$T/cmds"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
