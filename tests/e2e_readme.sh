#!/bin/sh
# e2e_readme.sh - runs the README's first screen and "Your own model" as a
# newcomer would, against a daemon on a free loopback port (the URL is the
# only thing replaced): the curl session (<!-- test: quickstart-curl -->), the
# Python session (quickstart-python), the demo examples (more-examples), then
# the three "Your own model" steps in order in an empty directory (own-model-files
# writes out/, own-model registers and runs on them, curvd-run runs the same
# job in-process; build/curvd is replaced by the binary under test).
# Usage: sh tests/e2e_readme.sh build/curvd
set -u
CURVD=${1:-build/curvd}
case "$CURVD" in /*) ;; *) CURVD="$(pwd)/$CURVD" ;; esac
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
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

pass() { PASS=$((PASS + 1)); }
fail() { FAIL=$((FAIL + 1)); echo "FAIL: $*"; }

# block NAME: the fenced block after <!-- test: NAME --> in README.md, URL replaced
block() {
  awk -v tag="<!-- test: $1 -->" '
    $0 == tag { s = 1; next }
    s == 1 && /^```/ { s = 2; next }
    s == 2 && /^```/ { exit }
    s == 2 { print }' "$ROOT/README.md" \
  | sed "s#http://127.0.0.1:8080#http://127.0.0.1:$PORT#g; s#localhost:8080#127.0.0.1:$PORT#g"
}

# curl lines one by one: each must succeed (-f), a ?wait= job must succeed
curl_lines() {
  block "$1" | grep '^curl' | sed 's/^curl -s/curl -sf/' > "$T/cmds"
  [ -s "$T/cmds" ] || { fail "README block $1: no curl lines"; return; }
  while IFS= read -r cmd; do
    if sh -c "$cmd" > "$T/out" 2>&1 && ! grep -q '"status":"failed"' "$T/out"; then
      pass
      case "$cmd" in *wait=*)
        if grep -q '"status":"succeeded"' "$T/out"; then pass; else fail "not succeeded: $cmd"; head -c 400 "$T/out"; echo; fi ;;
      esac
    else
      fail "$cmd"; head -c 400 "$T/out"; echo
    fi
  done < "$T/cmds"
}

# ---- first screen -----------------------------------------------------------------
[ "$(block quickstart-curl | grep -c '^curl')" -eq 5 ] && pass || fail "quickstart-curl is not 5 curl lines"
curl_lines quickstart-curl

W="$T/w"
mkdir -p "$W"
ln -s "$ROOT/clients" "$W/clients"
block quickstart-python > "$T/quick.py"
[ "$(grep -c . "$T/quick.py")" -eq 5 ] && pass || fail "quickstart-python is not 5 lines"
if ( cd "$W" && timeout 120 "$PY" "$T/quick.py" ) > "$T/quick.out" 2>&1 \
   && "$PY" - "$T/quick.out" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().split("\n")
trace, eig = float(lines[0]), json.loads(lines[1])
assert trace > 0 and len(eig) == 3 and eig[0] >= eig[1] >= eig[2], (trace, eig)
EOF
then pass; else fail "quickstart-python: $(tail -c 600 "$T/quick.out")"; fi

# ---- more examples ----------------------------------------------------------------
curl_lines more-examples

# ---- Your own model, steps 1-3 in order, in an empty directory ----------------------
block own-model-files > "$T/files.sh"
block own-model > "$T/own.sh"
block curvd-run | sed "s#build/curvd#'$CURVD'#g" > "$T/run.sh"
if ( cd "$W" && timeout 120 sh -e "$T/files.sh" ) > "$T/files.out" 2>&1 \
   && [ -s "$W/out/arch.json" ] && [ -s "$W/out/params.safetensors" ] && [ -s "$W/out/data.safetensors" ]
then pass; else fail "own-model-files: $(tail -c 600 "$T/files.out")"; fi
if ( cd "$W" && timeout 60 sh -e "$T/own.sh" ) > "$T/own.out" 2> "$T/own.err"; then pass
else fail "own-model: exit $?: $(tail -c 600 "$T/own.err")"; fi
if ( cd "$W" && timeout 60 sh -e "$T/run.sh" ) > "$T/run.out" 2> "$T/run.err"; then pass
else fail "curvd-run: $(tail -c 600 "$T/run.err")"; fi
if "$PY" - "$T/own.out" "$T/run.out" > "$T/cmp" 2>&1 <<'EOF'
import json, sys
text, docs, i, dec = open(sys.argv[1]).read(), [], 0, json.JSONDecoder()
while i < len(text):
    if text[i].isspace():
        i += 1
        continue
    d, i = dec.raw_decode(text, i)
    docs.append(d)
assert len(docs) == 4, "expected 4 JSON answers, got %d" % len(docs)
model, data, job, put = docs
assert model["name"] == "mine" and model["version"] == 1, model
assert data["name"] == "mydata" and data["n"] == 1797, data
assert job["status"] == "succeeded" and job["result"]["op"] == "trace", job
assert put["version"] == 2, put
cli = json.load(open(sys.argv[2]))
a, b = job["result"]["trace"], cli["trace"]
assert a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b)), (a, b)
EOF
then pass; else fail "own-model answers / curvd-run result: $(tail -c 600 "$T/cmp")"; fi

echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
