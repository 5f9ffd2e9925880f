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
. "$(dirname "$0")/e2e_lib.sh"
e2e_start_or_finish "$T/log" --workers 2

# curl lines one by one: each must succeed (-f), a ?wait= job must succeed
curl_lines() {
  readme_block "$1" | grep '^curl' | sed 's/^curl -s/curl -sf/' > "$T/cmds"
  [ -s "$T/cmds" ] || { bad "README block $1: no curl lines"; return; }
  while IFS= read -r cmd; do
    if sh -c "$cmd" > "$T/out" 2>&1 && ! grep -q '"status":"failed"' "$T/out"; then
      ok
      case "$cmd" in *wait=*)
        if grep -q '"status":"succeeded"' "$T/out"; then ok; else bad "not succeeded: $cmd"; head -c 400 "$T/out"; echo; fi ;;
      esac
    else
      bad "$cmd"; head -c 400 "$T/out"; echo
    fi
  done < "$T/cmds"
}

# ---- first screen -----------------------------------------------------------------
[ "$(readme_block quickstart-curl | grep -c '^curl')" -eq 5 ] && ok || bad "quickstart-curl is not 5 curl lines"
curl_lines quickstart-curl

W="$T/w"
mkdir -p "$W"
ln -s "$ROOT/clients" "$W/clients"
readme_block quickstart-python > "$T/quick.py"
[ "$(grep -c . "$T/quick.py")" -eq 5 ] && ok || bad "quickstart-python is not 5 lines"
if ( cd "$W" && timeout 120 "$PY" "$T/quick.py" ) > "$T/quick.out" 2>&1 \
   && "$PY" - "$T/quick.out" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().split("\n")
trace, eig = float(lines[0]), json.loads(lines[1])
assert trace > 0 and len(eig) == 3 and eig[0] >= eig[1] >= eig[2], (trace, eig)
EOF
then ok; else bad "quickstart-python: $(tail -c 600 "$T/quick.out")"; fi

# ---- more examples ----------------------------------------------------------------
curl_lines more-examples

# ---- graph form: the transformer's files, eigenvalues and per-module traces ------------
readme_block graph-files > "$T/gfiles.sh"
readme_block graph-curl | grep '^curl' | sed 's/^curl -s/curl -sf/' > "$T/gcurl.sh"
if ( cd "$W" && timeout 120 sh -e "$T/gfiles.sh" ) > "$T/gfiles.out" 2>&1 \
   && ( cd "$W" && timeout 120 sh -e "$T/gcurl.sh" ) > "$T/gcurl.out" 2> "$T/gcurl.err" \
   && "$PY" - "$T/gcurl.out" <<'EOF'
import json, sys
docs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
eig, tr = docs[-2]["result"], docs[-1]["result"]
assert len(eig["eigenvalues"]) == 3 and eig["eigenvalues"][0] >= eig["eigenvalues"][1], eig
names = [b["name"] for b in tr["blocks"]]
assert names[:2] == ["tok_emb", "pos_emb"] and "blocks.0.attn.mha" in names and names[-1] == "head", names
mha = tr["blocks"][names.index("blocks.0.attn.mha")]
assert len(mha["params"]) == 4 and mha["dim"] == 1088, mha
EOF
then ok; else bad "graph-files/graph-curl: $(tail -c 600 "$T/gfiles.out") $(tail -c 600 "$T/gcurl.err") $(tail -c 300 "$T/gcurl.out")"; fi

# ---- Your own model, steps 1-3 in order, in an empty directory ----------------------
readme_block own-model-files > "$T/files.sh"
readme_block own-model > "$T/own.sh"
readme_block curvd-run | sed "s#build/curvd#'$CURVD'#g" > "$T/run.sh"
if ( cd "$W" && timeout 120 sh -e "$T/files.sh" ) > "$T/files.out" 2>&1 \
   && [ -s "$W/out/arch.json" ] && [ -s "$W/out/params.safetensors" ] && [ -s "$W/out/data.safetensors" ]
then ok; else bad "own-model-files: $(tail -c 600 "$T/files.out")"; fi
if ( cd "$W" && timeout 60 sh -e "$T/own.sh" ) > "$T/own.out" 2> "$T/own.err"; then ok
else bad "own-model: exit $?: $(tail -c 600 "$T/own.err")"; fi
if ( cd "$W" && timeout 60 sh -e "$T/run.sh" ) > "$T/run.out" 2> "$T/run.err"; then ok
else bad "curvd-run: $(tail -c 600 "$T/run.err")"; fi
if "$PY" "$ROOT/tests/own_model_check.py" "$T/own.out" "$T/run.out" > "$T/cmp" 2>&1
then ok; else bad "own-model answers / curvd-run result: $(tail -c 600 "$T/cmp")"; fi

finish
