#!/bin/sh
# e2e_dashboard.sh - the web dashboard served by curvd at / (clients/dashboard).
#
# Usage: sh tests/e2e_dashboard.sh build/curvd
# Starts `curvd serve --port 0` on 127.0.0.1; checks the static routes with
# curl (GET /, GET /dashboard/{file}, content types, 404/405) and the README's
# dashboard block; then drives the page in headless Chromium with
# playwright-core (clients/dashboard/test/dashboard.test.js): submit a density
# job from the form, wait for the SVG plot, check that it drew the curve,
# screenshot to build/dashboard.png; then the eigen, per-layer trace and SNR
# presets, a refused job and a cancel.
#
# Needs Debian's chromium (installed here with apt-get when missing and run as
# root) and npm's playwright-core (installed into build/npm from
# clients/dashboard/test/package.json + package-lock.json).  Only when chromium
# cannot be installed is the browser part skipped, with a message saying so.
# $CHROMIUM overrides /usr/bin/chromium.  Ends with "N passed, M failed".
set -u
. "$(dirname "$0")/e2e_lib.sh"

# ---- daemon ---------------------------------------------------------------------
e2e_start_or_finish "$T/daemon.log" --bind 127.0.0.1

# ---- the static routes (curl) ----------------------------------------------------------
# get METHOD PATH: status -> stdout, body -> $T/body, headers -> $T/hdr
get() { curl -s -S --max-time 20 -X "$1" -o "$T/body" -D "$T/hdr" -w '%{http_code}' "$BASE$2" 2>"$T/curl.err" || echo 000; }
hdr() { tr -d '\r' < "$T/hdr" | grep -i "^$1:" | head -1 | sed 's/^[^:]*: *//'; }
check "GET / is 200" [ "$(get GET /)" = 200 ]
check "GET / is text/html" sh -c "echo '$(hdr content-type)' | grep -q '^text/html'"
check "GET / references the script and the stylesheet" sh -c "grep -q '/dashboard/app.js' '$T/body' && grep -q '/dashboard/style.css' '$T/body'"
check "GET / has no external resources" sh -c "! grep -Eiq '(src|href)=\"(https?:)?//' '$T/body'"
check "GET / Cache-Control no-cache" [ "$(hdr cache-control)" = no-cache ]
for f in app.js monitor.js style.css index.html; do
  check "GET /dashboard/$f is 200" [ "$(get GET "/dashboard/$f")" = 200 ]
  cmp -s "$T/body" "$ROOT/clients/dashboard/$f" && ok "/dashboard/$f is the file in clients/dashboard" \
    || bad "/dashboard/$f differs from clients/dashboard/$f (rebuild build/curvd?)"
done
get GET /dashboard/app.js > /dev/null
check "app.js is text/javascript" sh -c "echo '$(hdr content-type)' | grep -q '^text/javascript'"
check "app.js uses no external URL" sh -c "! grep -Eq '(fetch|src|href)[ (=]*.(https?:)?//' '$ROOT/clients/dashboard/app.js'"
get GET /dashboard/style.css > /dev/null
check "style.css is text/css" sh -c "echo '$(hdr content-type)' | grep -q '^text/css'"
check "unknown dashboard file is 404" [ "$(get GET /dashboard/nope.js)" = 404 ]
check "404 is the JSON error" grep -q '"code":"not_found"' "$T/body"
check "HEAD / is 200" [ "$(curl -s -o /dev/null -I -w '%{http_code}' "$BASE/")" = 200 ]
check "POST / is 405" [ "$(get POST /)" = 405 ]
check "405 Allow: GET" [ "$(hdr allow)" = GET ]
check "no traversal out of the embedded files" [ "$(get GET /dashboard/..%2Fhttp.c)" = 404 ]

# the README's dashboard block, as written (URL replaced)
readme_block dashboard > "$T/readme.sh"
if [ -s "$T/readme.sh" ] && [ "$(sh -e "$T/readme.sh" 2>&1)" = 1 ]; then ok "README dashboard block"; else
  bad "README dashboard block: $(cat "$T/readme.sh")"
fi

# ---- chromium ---------------------------------------------------------------------------
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ] && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
  echo "e2e_dashboard: installing Debian's chromium (apt-get install chromium)" >&2
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } > "$T/apt.log" 2>&1 \
    || echo "e2e_dashboard: apt-get failed: $(tail -3 "$T/apt.log")" >&2
fi
if [ ! -x "$CHROMIUM" ]; then
  if [ "${CURVD_ALLOW_SKIP:-}" = 1 ]; then
    echo "SKIP: browser part of the dashboard test: chromium is not installed and could not be installed" >&2
    echo "      (CURVD_ALLOW_SKIP=1; as root: apt-get install chromium; or set CHROMIUM=/path/to/chromium)" >&2
  else
    bad "chromium is not installed and could not be installed: the browser test cannot run (as root: apt-get install chromium; CHROMIUM=/path/to/chromium; CURVD_ALLOW_SKIP=1 skips)"
  fi
  finish
fi
ok "chromium available ($("$CHROMIUM" --version 2>/dev/null | head -1))"

# ---- playwright-core (npm) into build/npm ------------------------------------------------------
e2e_npm_install "$ROOT/clients/dashboard/test" "$ROOT/build/npm" playwright-core

# ---- the browser test ---------------------------------------------------------------------------
mkdir -p "$ROOT/build"
SHOT="$ROOT/build/dashboard.png"
rm -f "$SHOT"
CHROMIUM="$CHROMIUM" NODE_PATH="$NPMDIR/node_modules" timeout 120 "$NODE" \
  "$ROOT/clients/dashboard/test/dashboard.test.js" "$BASE" "$SHOT" > "$T/node.out" 2>&1
rc=$?
grep -v ' passed, [0-9]* failed$' "$T/node.out" >&2
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$T/node.out" | tail -1)
if [ -n "$line" ]; then
  np=${line%% passed*}
  nf=${line#* passed, }
  nf=${nf%% failed*}
  PASS=$((PASS + np))
  FAIL=$((FAIL + nf))
  [ "$rc" = 0 ] || [ "$nf" != 0 ] || bad "browser test exited $rc"
else
  bad "browser test crashed (exit $rc): $(tail -c 1500 "$T/node.out")"
fi
check "screenshot build/dashboard.png is a PNG" sh -c "head -c 8 '$SHOT' | od -An -c | grep -q 'P   N   G'"
e2e_check_alive "$T/daemon.log"

# ---- a daemon that requires a token (--generate-token): #token= link and prompt ----------
kill "$DPID"
e2e_start_or_finish "$T/token.log" --workers 1 --generate-token
TOKEN=$(sed -n 's/^curvd: generated token .*: \([0-9a-f]*\)$/\1/p' "$T/token.log")
CHROMIUM="$CHROMIUM" NODE_PATH="$NPMDIR/node_modules" timeout 120 "$NODE" \
  "$ROOT/clients/dashboard/test/token.test.js" "$BASE" "$TOKEN" > "$T/token.out" 2>&1
rc=$?
grep -v ' passed, [0-9]* failed$' "$T/token.out" >&2
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$T/token.out" | tail -1)
if [ -n "$line" ]; then
  np=${line%% passed*}; nf=${line#* passed, }; nf=${nf%% failed*}
  PASS=$((PASS + np)); FAIL=$((FAIL + nf))
  [ "$rc" = 0 ] || [ "$nf" != 0 ] || bad "token browser test exited $rc"
else
  bad "token browser test crashed (exit $rc): $(tail -c 1500 "$T/token.out")"
fi
e2e_check_alive "$T/token.log"
finish
