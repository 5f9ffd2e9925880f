# e2e_lib.sh - the start-up every tests/e2e_*.sh shares: the curvd binary,
# a temporary directory, the pass/fail counters, and curvd daemons on free
# loopback ports that are stopped when the script exits.  POSIX sh.
#
# Sourced right after `set -u`, with the script's arguments unchanged:
#     . "$(dirname "$0")/e2e_lib.sh"
# Sets
#   CURVD  the script's $1 (default build/curvd), made absolute
#   ROOT   the repository root        PY  /usr/bin/python3 (else python3)
#   T      a fresh temporary directory, removed on exit (E2E_KEEP=1 keeps it)
#   PASS, FAIL  the counters
# Defines
#   ok NAME             counts a pass (VERBOSE=1 prints it)
#   bad MESSAGE         counts a failure and prints it
#   check NAME CMD...   ok or bad by CMD's exit status
#   finish              prints "N passed, M failed" and exits 0 or 1
#   e2e_start LOG ARGS...  runs `curvd serve --port 0 ARGS` (stderr -> LOG),
#                       reads the port from its "listening on" line and waits
#                       until GET /v1/health answers 200; sets DPID, DPORT,
#                       BASE (http://127.0.0.1:PORT); non-zero status (and
#                       DPORT empty) when it did not come up within 20 s
#   e2e_start_or_finish LOG ARGS...  e2e_start; when the daemon did not
#                       start: a failure with its log, then finish
#   e2e_wait_exit PID SECONDS  waits for a daemon to exit; RC = its exit
#                       status, or 124 when it still runs after SECONDS
#   e2e_check_alive LOG  the last started daemon still runs (a check)
#   jtrue FILE EXPR     the Python expression EXPR over d (FILE's JSON) is true
#   e2e_npm_install PKGDIR DEST MODULE  pinned npm packages for a node test (below)
#   body_ctype METHOD URL CURLARGS...  the documented Content-Type (issue 27:
#                       other types are 415) of a body given with -d or
#                       --data-binary: octet-stream for PUT and parts, else JSON;
#                       "" when the arguments carry -F or their own Content-Type
#   readme_block NAME   the fenced block after <!-- test: NAME --> in
#                       README.md, with http://127.0.0.1:8080 and
#                       localhost:8080 pointed at $BASE

CURVD=${1:-build/curvd}
case "$CURVD" in /*) ;; *) CURVD="$(pwd)/$CURVD" ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
T=$(mktemp -d "${TMPDIR:-/tmp}/curvd-$(basename "$0" .sh).XXXXXX")
PASS=0
FAIL=0
E2E_PIDS=""
DPID=""
DPORT=""
BASE=""

e2e_cleanup() {
  for _p in $E2E_PIDS; do kill -9 "$_p" 2>/dev/null; done
  if [ -n "${E2E_KEEP:-}" ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap e2e_cleanup EXIT
trap 'exit 1' INT TERM

ok() { PASS=$((PASS + 1)); [ -z "${VERBOSE:-}" ] || echo "ok: $1" >&2; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL: $*" >&2; }
check() { _e2e_name=$1; shift; if "$@"; then ok "$_e2e_name"; else bad "$_e2e_name"; fi; }
finish() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; exit $?; }

e2e_start() {
  _log=$1; shift
  "$CURVD" serve --port 0 "$@" 2> "$_log" &
  DPID=$!
  E2E_PIDS="$E2E_PIDS $DPID"
  DPORT=""
  BASE=""
  _i=0
  while [ $_i -lt 200 ]; do
    if [ -z "$DPORT" ]; then
      DPORT=$(sed -n 's/^curvd: listening on http:\/\/127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$_log")
      [ -n "$DPORT" ] && BASE="http://127.0.0.1:$DPORT"
    fi
    if [ -n "$DPORT" ] && [ "$(curl -s -o /dev/null --max-time 5 -w '%{http_code}' "$BASE/v1/health")" = 200 ]; then
      return 0
    fi
    kill -0 "$DPID" 2>/dev/null || break
    sleep 0.1
    _i=$((_i + 1))
  done
  DPORT=""
  return 1
}

e2e_start_or_finish() {
  e2e_start "$@" && return 0
  bad "daemon did not start: $(cat "$1")"
  finish
}

e2e_wait_exit() {
  _i=0
  _n=$(($2 * 10))
  while [ $_i -lt $_n ] && kill -0 "$1" 2>/dev/null; do sleep 0.1; _i=$((_i + 1)); done
  if kill -0 "$1" 2>/dev/null; then RC=124; return; fi
  wait "$1"
  RC=$?
}

e2e_check_alive() {
  if kill -0 "$DPID" 2>/dev/null; then ok "daemon alive"; else bad "daemon died: $(tail -5 "$1")"; fi
}

jtrue() {
  "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' "$1" "$2" 2>/dev/null
}

body_ctype() {
  _m=$1; _u=$2; shift 2
  _body=""
  for _a in "$@"; do
    case "$_a" in -F|--form|Content-Type:*|content-type:*) return 0 ;; -d|--data|--data-binary) _body=1 ;; esac
  done
  [ -n "$_body" ] || return 0
  case "$_m $_u" in PUT*|*/parts) echo "Content-Type: application/octet-stream" ;; *) echo "Content-Type: application/json" ;; esac
}

readme_block() {
  awk -v tag="<!-- test: $1 -->" '
    $0 == tag { s = 1; next }
    s == 1 && /^```/ { s = 2; next }
    s == 2 && /^```/ { exit }
    s == 2 { print }' "$ROOT/README.md" \
  | sed "s#http://127.0.0.1:8080#$BASE#g; s#localhost:8080#${BASE#http://}#g"
}

# e2e_npm_install PKGDIR DEST MODULE: node and the npm packages pinned in
# PKGDIR's package.json + package-lock.json, installed (npm ci) into DEST
# unless DEST already holds that lock file and node_modules/MODULE.  Installs
# nodejs and npm with apt-get as root when missing.  Sets NODE and NPMDIR
# (= DEST); a failure (with the reason) and finish when either cannot be had.
e2e_npm_install() {
  NODE=$(command -v node || true)
  _npm=$(command -v npm || true)
  if { [ -z "$NODE" ] || [ -z "$_npm" ]; } && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
    echo "$(basename "$0"): installing nodejs and npm" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; } \
      > "$T/apt-node.log" 2>&1 || true
    NODE=$(command -v node || true)
    _npm=$(command -v npm || true)
  fi
  if [ -z "$NODE" ]; then bad "node is missing (apt-get install nodejs npm)"; finish; fi
  NPMDIR=$2
  if [ ! -f "$NPMDIR/node_modules/$3/package.json" ] || ! cmp -s "$1/package-lock.json" "$NPMDIR/package-lock.json"; then
    if [ -z "$_npm" ]; then bad "npm is missing (apt-get install npm)"; finish; fi
    rm -rf "$NPMDIR"
    mkdir -p "$NPMDIR"
    cp "$1/package.json" "$1/package-lock.json" "$NPMDIR/"
    echo "$(basename "$0"): npm ci $3 into $NPMDIR" >&2
    ( cd "$NPMDIR" && timeout 240 "$_npm" ci --no-audit --no-fund --loglevel=error ) > "$T/npm.log" 2>&1
  fi
  if [ -f "$NPMDIR/node_modules/$3/package.json" ]; then ok "$3 installed"; else
    bad "$3 could not be installed: $(tail -5 "$T/npm.log" 2>/dev/null)"
    finish
  fi
}
