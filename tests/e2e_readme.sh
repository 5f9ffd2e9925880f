#!/bin/sh
# e2e_readme.sh - runs the README's demo curl examples (the first ```sh block
# under "## Try it") against a daemon on a free loopback port.
# Usage: sh tests/e2e_readme.sh build/curvd
set -u
. "$(dirname "$0")/e2e_lib.sh"
e2e_start_or_finish "$T/log" --workers 2
awk '/^## Try it/{s=1} s&&/^```sh/{b=1;next} b&&/^```/{exit} b&&/^curl/{print}' "$ROOT/README.md" \
  | sed "s/localhost:8080/127.0.0.1:$DPORT/g; s/^curl -s/curl -sf/" > "$T/cmds"
[ -s "$T/cmds" ] || { bad "no examples found"; finish; }
while IFS= read -r cmd; do
  if sh -c "$cmd" > "$T/out" 2>&1 && ! grep -q '"status":"failed"' "$T/out"; then
    ok "$cmd"
    case "$cmd" in *wait=*)
      if grep -q '"status":"succeeded"' "$T/out"; then ok "$cmd: succeeded"; else bad "(not succeeded): $cmd: $(head -c 400 "$T/out")"; fi ;;
    esac
  else
    bad "$cmd: $(head -c 400 "$T/out")"
  fi
done < "$T/cmds"
finish
