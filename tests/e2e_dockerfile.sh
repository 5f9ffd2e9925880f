#!/bin/sh
# e2e_dockerfile.sh - keeps the Dockerfile exact without a Docker engine:
#  1. the build stage installs exactly `scripts/deps.sh --list image` and the
#     runtime stage exactly `scripts/deps.sh --list runtime` (a package added to
#     one list only fails here);
#  2. the runtime libraries are exactly the packages that own the shared
#     libraries build/curvd needs (readelf NEEDED, resolved by ldd, owner by
#     dpkg -S; libc6 is in every Debian image, sanitizer runtimes are not
#     part of a release build), plus curl for the HEALTHCHECK;
#  3. each runtime package is a Debian package (apt-cache) that a -dev
#     package of the build set depends on (directly or one level down);
#  4. the image serves on all interfaces as a non-root user with a token
#     required (--generate-token or --auth-token-file), and its HEALTHCHECK
#     asks a route curvd has on the port it listens on (GET /v1/health
#     answers liveness without a token).
# Usage: sh tests/e2e_dockerfile.sh build/curvd
set -u
. "$(dirname "$0")/e2e_lib.sh"
cd "$ROOT" || exit 1

# ---- 1. package lists --------------------------------------------------------------------
# One logical line per instruction (backslash continuations joined); for each
# `apt-get install` prints "<stage number> <package>" (options skipped).
awk '
  { line = line $0 }
  /\\$/ { sub(/\\$/, "", line); next }
  {
    if (line ~ /^[ \t]*FROM[ \t]/) stage++
    n = split(line, w, /[ \t]+/)
    for (i = 1; i < n; i++) {
      if (w[i] == "apt-get" && w[i + 1] == "install") {
        for (j = i + 2; j <= n && w[j] != "&&" && w[j] != ";"; j++)
          if (w[j] != "" && w[j] !~ /^-/) print stage, w[j]
      }
    }
    line = ""
  }' Dockerfile > "$T/pkgs"
[ "$(awk '{print $1}' "$T/pkgs" | sort -u | tr '\n' ' ')" = "1 2 " ] \
  || bad "expected apt-get install in exactly two stages (build, runtime), found: $(awk '{print $1}' "$T/pkgs" | sort -u | tr '\n' ' ')"
same_set() {  # same_set NAME LABEL_A FILE_A LABEL_B FILE_B
  sort -u "$3" > "$T/a"; sort -u "$5" > "$T/b"
  if cmp -s "$T/a" "$T/b"; then ok "$1"; else
    bad "$1: only in $2: $(comm -23 "$T/a" "$T/b" | tr '\n' ' '); only in $4: $(comm -13 "$T/a" "$T/b" | tr '\n' ' ')"
  fi
}
awk '$1 == 1 {print $2}' "$T/pkgs" > "$T/build_stage"
awk '$1 == 2 {print $2}' "$T/pkgs" > "$T/runtime_stage"
scripts/deps.sh --list image > "$T/image" || bad "scripts/deps.sh --list image failed"
scripts/deps.sh --list runtime > "$T/runtime" || bad "scripts/deps.sh --list runtime failed"
scripts/deps.sh --list build > "$T/build" || bad "scripts/deps.sh --list build failed"
same_set "build stage installs scripts/deps.sh's image set" \
  "the Dockerfile's build stage" "$T/build_stage" "deps.sh image" "$T/image"
same_set "runtime stage installs scripts/deps.sh's runtime set" \
  "the Dockerfile's runtime stage" "$T/runtime_stage" "deps.sh runtime" "$T/runtime"
[ -z "$(sort "$T/build" | comm -23 - "$(sort "$T/image" > "$T/image.s"; echo "$T/image.s")")" ] \
  && ok "image set contains the build set" || bad "scripts/deps.sh: image lacks part of build"

# ---- 2. runtime libraries = owners of what build/curvd loads -------------------------------
[ -x "$CURVD" ] || { bad "$CURVD not built"; finish; }
readelf -d "$CURVD" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' > "$T/needed"
[ -s "$T/needed" ] || bad "readelf found no NEEDED libraries in $CURVD"
ldd "$CURVD" > "$T/ldd"
# dpkg records a file under the path its package ships (/lib/... or /usr/lib/...,
# usrmerge) and library symlinks may go through /etc/alternatives: try each.
owner_of() {
  for f in "$1" "$(readlink -f "$1")"; do
    for g in "$f" "${f#/usr}" "/usr$f"; do
      o=$(dpkg -S "$g" 2>/dev/null | sed -n '1s/:.*//p')
      [ -n "$o" ] && { echo "$o"; return; }
    done
  done
}
: > "$T/owners"
while read -r lib; do
  path=$(awk -v l="$lib" '$1 == l && $2 == "=>" {print $3}' "$T/ldd")
  [ -n "$path" ] || { bad "ldd does not resolve $lib"; continue; }
  owner=$(owner_of "$path")
  [ -n "$owner" ] || { bad "no Debian package owns $lib ($path)"; continue; }
  case "$owner" in
    libc6|libasan*|libubsan*|libtsan*|liblsan*|libclang-rt*) ;;
    *) echo "$owner" >> "$T/owners" ;;
  esac
done < "$T/needed"
echo curl >> "$T/owners"
same_set "runtime set = packages of the libraries $CURVD needs, + curl" \
  "deps.sh runtime" "$T/runtime" "what $CURVD loads (+ curl)" "$T/owners"

# ---- 3. runtime packages exist and come with the build set's -dev packages -----------------
# names in a Depends field ("a (= 1) | b, c" -> a b c)
deps_of() { dpkg-query -W -f='${Depends}\n' "$@" 2>/dev/null | tr ',|' '\n\n' | awk 'NF {print $1}'; }
grep -- '-dev$' "$T/build" > "$T/dev"
deps_of $(cat "$T/dev") | sort -u > "$T/dep1"
{ cat "$T/dep1"; deps_of $(cat "$T/dep1")
  # a virtual package (libopenblas0) counts as the packages providing it
  for v in $(cat "$T/dep1"); do
    dpkg-query -W -f='${Package} ${Provides}\n' 2>/dev/null | awk -v v="$v" '
      { for (i = 2; i <= NF; i++) { p = $i; sub(/,$/, "", p); if (p == v) print $1 } }'
  done; } | sort -u > "$T/closure"
while read -r p; do
  [ "$p" = curl ] && continue
  apt-cache show --no-all-versions "$p" > /dev/null 2>&1 || bad "$p is not a Debian package (apt-cache show)"
  grep -qx "$p" "$T/closure" || bad "$p is not a dependency of the build set's -dev packages ($(tr '\n' ' ' < "$T/dev"))"
done < "$T/runtime"
apt-cache show --no-all-versions curl > /dev/null 2>&1 || bad "curl is not a Debian package"
ok "runtime packages exist and belong to the -dev packages"

# ---- 4. user, bind address, health check ---------------------------------------------------
last_stage=$(awk '/^FROM /{s = ""} {s = s $0 "\n"} END {printf "%s", s}' Dockerfile)
echo "$last_stage" | grep -q '^FROM debian:bookworm-slim' || bad "runtime stage is not debian:bookworm-slim"
user=$(echo "$last_stage" | sed -n 's/^USER[ \t]*//p' | tail -1)
case "$user" in ""|root|0|0:*|root:*) bad "runtime stage runs as root (USER '$user')" ;; *) ok "runs as USER $user" ;; esac
echo "$last_stage" | grep -q '^CMD .*"--bind", "0.0.0.0"' || bad "CMD does not pass --bind 0.0.0.0"
# bound to every interface, the image must not be open: a token is required
echo "$last_stage" | grep -qE '^CMD .*"(--generate-token|--auth-token-file)"' \
  || bad "CMD binds 0.0.0.0 without --generate-token or --auth-token-file (an open daemon)"
"$CURVD" serve --help | grep -q -- '--generate-token' || bad "curvd serve has no --generate-token"
port=$(echo "$last_stage" | sed -n 's/^CMD .*"--port", "\([0-9]*\)".*/\1/p')
hc=$(echo "$last_stage" | awk '/^HEALTHCHECK/{h = 1} h {print} h && !/\\$/ {exit}')
route=$(echo "$hc" | sed -n 's#.*http://127\.0\.0\.1:\([0-9]*\)\(/[^ ]*\).*#\1 \2#p')
[ -n "$route" ] || bad "no HEALTHCHECK with http://127.0.0.1:PORT/PATH in the runtime stage"
[ "${route%% *}" = "$port" ] || bad "HEALTHCHECK port ${route%% *} differs from CMD --port $port"
"$CURVD" routes | grep -qx "GET ${route#* }" || bad "HEALTHCHECK path ${route#* } is not a GET route of curvd"
echo "$last_stage" | grep -q '^ENV OPENBLAS_THREAD_TIMEOUT=4' || bad "OPENBLAS_THREAD_TIMEOUT=4 missing"
[ $FAIL = 0 ] && ok "non-root, --bind 0.0.0.0 with a token, HEALTHCHECK GET ${route#* } on port $port"

finish
