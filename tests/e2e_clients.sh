#!/bin/sh
# e2e_clients.sh - curvctl (clients/curvctl) against a live daemon.
#
# Usage: sh tests/e2e_clients.sh build/curvd
# Starts `curvd serve --port 0` on 127.0.0.1 and checks curvctl's commands:
# listing and showing models/datasets, registering from files (written by the
# README's PyTorch example), pushing parameters, submitting from flags and
# from a job file, --follow with plain lines when not a terminal and a
# progress bar on one (via script(1)), table and JSON output, status, cancel,
# jobs, and the exit codes and messages of errors; then runs the README's
# curvctl block as written, and its "Your own model" curl block and
# `curvd run` block on the files the python-torch block wrote (same trace).
# Bounded; ends with "N passed, M failed".
# VERBOSE=1 lists passing checks; E2E_KEEP=1 keeps the temporary directory.
set -u
. "$(dirname "$0")/e2e_lib.sh"

# run NAME EXPECTED_RC CMD...: runs CMD (stdout -> $T/out, stderr -> $T/err), checks its exit status
run() {
  n=$1; want=$2; shift 2
  ( cd "$T/w" && timeout 60 "$@" ) > "$T/out" 2> "$T/err" < /dev/null
  rc=$?
  if [ "$rc" = "$want" ]; then ok "$n"; else
    bad "$n: exit $rc, wanted $want; stdout: $(head -c 400 "$T/out"); stderr: $(head -c 400 "$T/err")"
  fi
}
has() { grep -q -e "$2" "$1"; }                 # has FILE REGEX
out_has() { n=$1; shift; if grep -q -e "$1" "$T/out"; then ok "$n"; else bad "$n: no /$1/ in stdout: $(head -c 600 "$T/out")"; fi; }
err_has() { n=$1; shift; if grep -q -e "$1" "$T/err"; then ok "$n"; else bad "$n: no /$1/ in stderr: $(head -c 600 "$T/err")"; fi; }

# ---- daemon -------------------------------------------------------------------
e2e_start_or_finish "$T/daemon.log" --bind 127.0.0.1
URL=$BASE
export CURVD_URL="$URL"
mkdir -p "$T/w"
ln -s "$ROOT/clients" "$T/w/clients"
C="$ROOT/clients/curvctl"

# Files for the registration tests: the README's PyTorch example writes them.
readme_block python-torch > "$T/torch_example.py"
if ( cd "$T/w" && PYTHONPATH="$ROOT/clients/python" timeout 60 "$PY" "$T/torch_example.py" ) > "$T/torch.out" 2>&1; then
  ok "README python-torch example (writes out/arch.json, out/params.safetensors, out/data.safetensors)"
else
  bad "README python-torch example: $(tail -c 800 "$T/torch.out")"
fi

# The README's "Your own model" curl block and its `curvd run` block, on the
# files the python-torch block just wrote: both must run as written and give
# the same trace (same files, same job, same seed).
readme_block own-model > "$T/own.sh"
readme_block curvd-run | sed "s#build/curvd#'$CURVD'#g" > "$T/run.sh"
if [ -s "$T/own.sh" ] && [ -s "$T/run.sh" ]; then
  ok "README own-model and curvd-run blocks present"
  ( cd "$T/w" && timeout 60 sh -e "$T/own.sh" ) > "$T/own.out" 2> "$T/own.err" < /dev/null
  rc=$?
  [ $rc = 0 ] && ok "README own-model block runs" || bad "README own-model block: exit $rc: $(tail -c 800 "$T/own.err")"
  ( cd "$T/w" && timeout 60 sh -e "$T/run.sh" ) > "$T/run.out" 2> "$T/run.err" < /dev/null
  rc=$?
  [ $rc = 0 ] && ok "README curvd-run block runs" || bad "README curvd-run block: exit $rc: $(tail -c 800 "$T/run.err")"
  if "$PY" "$ROOT/tests/own_model_check.py" "$T/own.out" "$T/run.out" > "$T/own.cmp" 2>&1
  then ok "README own-model trace over HTTP == README curvd run ($(cat "$T/own.cmp"))"
  else bad "README own-model vs curvd-run: $(tail -c 800 "$T/own.cmp") $(head -c 600 "$T/own.out")"
  fi
  "$C" models delete mine > /dev/null 2>&1
  "$C" datasets delete mydata > /dev/null 2>&1
else
  bad "README own-model / curvd-run blocks missing"
fi

# ---- basics ------------------------------------------------------------------------
run "--help" 0 "$C" --help
out_has "--help lists commands" "submit --op OP"
run "no arguments: usage, exit 2" 2 "$C"
run "unknown command: exit 2" 2 "$C" frobnicate
err_has "unknown command named" "unknown command 'frobnicate'"
run "--version" 0 "$C" --version
out_has "--version" "^curvctl [0-9]"
run "health" 0 "$C" health
out_has "health table" "^status  *ok"
run "ops" 0 "$C" ops
out_has "ops lists density" "^ops: .*density"

# ---- models and datasets -------------------------------------------------------------
run "models (list)" 0 "$C" models
out_has "models table header" "^NAME  *VERSION  *PARAMS"
out_has "models table row" "^demo-mlp  *1  *2410"
run "models list --format json" 0 "$C" models list --format json
check "models JSON" jtrue "$T/out" "'demo-mlp' in [m['name'] for m in d['models']]"
run "--url before the command" 0 "$C" --url "$URL" --format=json models
check "--url/--format= global options" jtrue "$T/out" "len(d['models']) >= 2"
run "datasets" 0 "$C" datasets
out_has "datasets table" "^digits  *1  *1797  *1797x64"
run "datasets show digits" 0 "$C" datasets show digits
out_has "dataset details" "^n  *1797"
run "models show demo-mlp" 0 "$C" models show demo-mlp
out_has "model layers table" "^0  *Linear  *in_features=64"
out_has "model parameters table" "^0.weight  *32x64  *2048"
run "models register" 0 "$C" models register cli-mlp --arch out/arch.json --params out/params.safetensors
out_has "registered message" "^model cli-mlp: version 1, 2410 parameters"
run "duplicate register: exit 1" 1 "$C" models register cli-mlp --arch out/arch.json --params out/params.safetensors
err_has "duplicate register: server message with HTTP 409" "HTTP 409"
run "datasets register" 0 "$C" datasets register cli-digits --data out/data.safetensors
out_has "dataset registered" "^dataset cli-digits: version 1, 1797 samples"
run "datasets register --replace" 0 "$C" datasets register cli-digits --data out/data.safetensors --replace
out_has "dataset replaced: version 2" "^dataset cli-digits: version 2"
run "push" 0 "$C" push cli-mlp out/params.safetensors
out_has "push: version 2" "^model cli-mlp: version 2"
run "models download" 0 "$C" models download cli-mlp down.safetensors
run "push downloaded parameters" 0 "$C" push cli-mlp down.safetensors
out_has "push round trip: version 3" "version 3"
run "datasets download" 0 "$C" datasets download digits digits.safetensors
check "downloaded dataset non-empty" [ -s "$T/w/digits.safetensors" ]

# ---- submit and follow ------------------------------------------------------------------
run "submit --follow (not a TTY)" 0 "$C" submit --op eigen --model cli-mlp --dataset cli-digits --option k=4 --follow
err_has "plain progress lines" "^job [0-9a-f]* \(queued\|running\|succeeded\): [0-9]*/[0-9]* matvecs ([0-9]*%)"
err_has "final line succeeded" "^job [0-9a-f]* succeeded: "
check "no carriage returns when not a TTY" sh -c "! grep -q \"$(printf '\r')\" '$T/err'"
out_has "result table: eigenvalue column" "^#  *eigenvalue  *residual"
out_has "result table: 4 eigenvalues" "^3  *[0-9.e+-]*  *[0-9.e+-]*$"
out_has "result table: scalar fields" "^matvecs  *[0-9]"
run "per-layer trace table" 0 "$C" submit --op trace --model demo-mlp --dataset digits --blocks layer --option max_probes=20 --seed 3 --follow
out_has "blocks table" "^0  *0.weight,0.bias  *0  *2080  *hutchinson"
cat > "$T/w/job.json" <<'EOF'
{"op": "density", "model": "demo-mlp", "dataset": "digits", "options": {"lanczos_steps": 30, "grid_points": 100}}
EOF
run "submit --job --follow --format json" 0 "$C" --format json submit --job job.json --follow
check "JSON result (density grid of 100)" jtrue "$T/out" "d['status'] == 'succeeded' and len(d['result']['density']['grid']) == 100"
run "flags override the job file" 0 "$C" submit --job job.json --option grid_points=20 --curvature ggn --wait 30
out_has "density summary line" "^density  *20 grid points"
out_has "curvature from the flag" "^curvature  *ggn"
run "--options JSON and --batch OFFSET:SIZE" 0 "$C" --format json submit --op trace --model demo-mlp --dataset digits --options '{"max_probes": 12, "distribution": "gaussian"}' --batch 100:200 --wait 30
check "--batch and --options applied" jtrue "$T/out" "d['result']['batch_size'] == 200 and d['result']['probes'] == 12"
run "snr table" 0 "$C" submit --op snr --curvature fisher_mc --model demo-mlp --dataset digits --batch 256 --option k=2 --follow
out_has "snr directions table" "^#  *eigenvalue  *gamma_snr  *lambda_snr"
out_has "gsnr table" "^gsnr (per layer)"
run "job file from stdin" 0 sh -c "echo '{\"op\":\"loss\",\"model\":\"demo-mlp\",\"dataset\":\"digits\"}' | '$C' submit --job - --wait 30"
out_has "loss table" "^loss  *0\.[0-9]"

# submit without waiting prints the id; status; cancel; jobs
run "submit prints the id" 0 "$C" submit --op trace --model demo-mlp --dataset digits --option max_probes=1000000 --option tol=0
ID=$(cat "$T/out")
check "job id is printed alone" sh -c "echo '$ID' | grep -q '^[0-9a-f]\{8,\}$'"
sleep 0.3
run "status ID" 0 "$C" status "$ID"
out_has "status table" "^status  *\(queued\|running\)"
out_has "status progress" "^progress  *[0-9]*/1000000 matvecs"
run "status ID --format json" 0 "$C" status "$ID" --format json
check "status JSON" jtrue "$T/out" "d['id'] == '$ID' and d['op'] == 'trace'"
run "jobs --status running" 0 "$C" jobs --status running
out_has "running job listed" "^$ID  *running  *trace"
run "cancel ID" 0 "$C" cancel "$ID"
out_has "cancelled" "^job $ID: cancelled"
run "status --follow of a cancelled job: exit 3" 3 "$C" status "$ID" --follow
err_has "cancel message" "cancelled by request"
run "jobs" 0 "$C" jobs --limit 50
out_has "jobs table header" "^ID  *STATUS  *OP  *MODEL  *DATASET  *MATVECS  *DONE"
out_has "jobs lists succeeded eigen job" "succeeded  *eigen  *cli-mlp:v3  *cli-digits"
run "jobs --format json --model cli-mlp" 0 "$C" --format json jobs --model cli-mlp
check "jobs filter" jtrue "$T/out" "d['count'] >= 1 and all(j['model'] == 'cli-mlp' for j in d['jobs'])"
run "--follow --timeout: exit 124" 124 "$C" submit --op trace --model demo-mlp --dataset digits --option max_probes=1000000 --option tol=0 --follow --timeout 1
err_has "--timeout message" "still running after 1 s; it goes on"
LONG=$(sed -n 's/^job \([0-9a-f]*\) submitted$/\1/p' "$T/err" | head -1)
run "cancel the job left running" 0 "$C" cancel "$LONG"
run "a job that times out: exit 3" 3 "$C" submit --op trace --model demo-mlp --dataset digits --option max_probes=1000000 --option tol=0 --job-timeout 0.2 --follow
err_has "job_timeout reported" "code job_timeout"

# the progress bar on a terminal (script(1) gives the command a pty)
if command -v script > /dev/null 2>&1; then
  ( cd "$T/w" && timeout 60 script -qec "'$C' submit --op trace --model demo-mlp --dataset digits --option max_probes=2500 --option tol=0 --follow > tty.out" /dev/null ) > "$T/tty" 2>&1 < /dev/null
  check "TTY: progress bar drawn" grep -q '\[#*\.*\] *[0-9]*% [0-9]*/2500 matvecs' "$T/tty"
  check "TTY: bar redrawn in place (\\r)" sh -c "tr -cd '\r' < '$T/tty' | wc -c | grep -qv '^ *0$'"
  check "TTY: full bar at the end" grep -q '\[####################\] 100% 2500/2500 matvecs' "$T/tty"
  check "TTY: result on stdout" grep -q '^trace  *[0-9]' "$T/w/tty.out"
elif [ "${CURVD_ALLOW_SKIP:-}" = 1 ]; then
  echo "note: script(1) not found (util-linux); TTY progress bar not checked (CURVD_ALLOW_SKIP=1)" >&2
else
  bad "script(1) not found (util-linux): the TTY progress bar cannot be checked (CURVD_ALLOW_SKIP=1 skips)"
fi

# ---- errors ----------------------------------------------------------------------------
run "unknown op: exit 1" 1 "$C" submit --op bogus --model demo-mlp --dataset digits
err_has "unknown op: server message" "^curvctl: unknown op 'bogus'.*HTTP 400, code unknown_op, field op"
run "unknown model: exit 1" 1 "$C" submit --op trace --model nope --dataset digits
err_has "unknown model: 404 message" "not found (HTTP 404, code not_found, field model)"
run "unknown option: exit 1" 1 "$C" submit --op trace --model demo-mlp --dataset digits --option bad=1
err_has "unknown option: field" "field options.bad"
run "missing --op: exit 2" 2 "$C" submit --model demo-mlp --dataset digits
err_has "missing --op message" "needs --op"
run "bad --option syntax: exit 2" 2 "$C" submit --op trace --model demo-mlp --dataset digits --option nokey
run "models show unknown: exit 1" 1 "$C" models show nope
err_has "404 message" "model 'nope' not found"
run "invalid name: exit 2" 2 "$C" models show 'a/b'
run "missing file: exit 2" 2 "$C" models register x --arch missing.json --params out/params.safetensors
err_has "missing file named" "missing.json"
run "bad parameters file: exit 1" 1 "$C" push cli-mlp job.json
err_has "bad parameters: server message" "HTTP 400"
run "unreachable daemon: exit 4" 4 "$C" --url http://127.0.0.1:1 models
err_has "unreachable message" "cannot reach curvd at http://127.0.0.1:1"
run "bad --format: exit 2" 2 "$C" --format yaml models
run "models delete" 0 "$C" models delete cli-mlp
out_has "deleted message" "^deleted model cli-mlp"
run "deleted model gone: exit 1" 1 "$C" models show cli-mlp

# ---- the README block, as written ---------------------------------------------------------
readme_block curvctl > "$T/readme.sh"
if [ -s "$T/readme.sh" ]; then
  ok "README curvctl block present"
  ( cd "$T/w" && timeout 90 sh -e "$T/readme.sh" ) > "$T/readme.out" 2> "$T/readme.err" < /dev/null
  rc=$?
  if [ $rc = 0 ]; then ok "README curvctl block runs"; else
    bad "README curvctl block: exit $rc: $(tail -c 1200 "$T/readme.err")"
  fi
  check "README curvctl block: density JSON" jtrue "$T/w/density-result.json" "d['status'] == 'succeeded' and len(d['result']['density']['grid']) == 100"
  check "README curvctl block: cancelled" grep -q ': cancelled$' "$T/readme.out"
else
  bad "README curvctl block missing"
fi

e2e_check_alive "$T/daemon.log"
finish
