#!/bin/sh
# e2e_strict.sh - strict parsing over HTTP and in `curvd run` (issue 27 item 5):
# duplicate keys (top level, in options, in an architecture, in a
# registration body), trailing data, NUL in strings ("\u0000") and in URLs
# (%00: the named model must survive), a parameter named in two blocks, the
# submit-time option checks (each refused 400 and never in GET /v1/jobs),
# and Retry-After on 429 (a --max-queue 1 daemon filled) and 503 (draining).
#
# Usage: sh tests/e2e_strict.sh build/curvd   (VERBOSE=1 lists every pass)
set -u
. "$(dirname "$0")/e2e_lib.sh"

# req METHOD URL [curl args]: prints the status; body in $T/body, headers in $T/hdr
req() {
  m=$1; u=$2; shift 2
  ct=$(body_ctype "$m" "$u" "$@")
  [ -z "$ct" ] || set -- -H "$ct" "$@"
  curl -s -S --max-time 60 -X "$m" -o "$T/body" -D "$T/hdr" -w '%{http_code}' "$@" "$BASE$u" \
    2>"$T/curl.err" || echo "000"
}
# refused NAME STATUS CODE FIELD METHOD URL [curl args]: status, code and field
refused() {
  name=$1; st=$2; code=$3; field=$4; shift 4
  got=$(req "$@")
  if [ "$got" = "$st" ] && jtrue "$T/body" "d['error']['code'] == '$code' and d['error']['field'] == '$field' and len(d['error']['message']) > 0"; then
    ok "$name"
  else
    bad "$name: expected $st/$code/'$field', got $got $(head -c 300 "$T/body")"
  fi
}
job() { refused "$1" 400 "$2" "$3" POST /v1/jobs --data-binary "$4"; }
retry_after_ok() { grep -qiE '^Retry-After: [1-9][0-9]*'"$(printf '\r')"'?$' "$T/hdr"; }

e2e_start_or_finish "$T/d1.log" --workers 1

# ---- duplicate keys -----------------------------------------------------------
D='"model":"demo-mlp","dataset":"digits"'
job "duplicate op refused" duplicate_field op "{\"op\":\"loss\",$D,\"op\":\"trace\"}"
job "duplicate option refused" duplicate_field options.k "{\"op\":\"eigen\",$D,\"options\":{\"k\":2,\"k\":3}}"
job "duplicate in batch refused" duplicate_field batch.size "{\"op\":\"loss\",$D,\"batch\":{\"offset\":0,\"size\":2,\"size\":3}}"
ARCH_DUP='{"input_shape":[4],"layers":[{"type":"Linear","in_features":4,"out_features":2,"in_features":4}],"loss":{"type":"MSELoss"}}'
refused "duplicate in an architecture (JSON body)" 400 duplicate_field "architecture.layers[0].in_features" \
  POST /v1/models --data-binary "{\"name\":\"dupa\",\"architecture\":$ARCH_DUP,\"parameters\":\"\"}"
refused "duplicate in an architecture (form part)" 400 duplicate_field "architecture.layers[0].in_features" \
  POST /v1/models -F name=dupb -F "architecture=$ARCH_DUP" -F parameters=@/dev/null
refused "duplicate name in a registration body" 400 duplicate_field name \
  POST /v1/datasets --data-binary '{"name":"dd1","data":"","name":"dd2"}'
for n in dupa dupb dd1 dd2; do
  [ "$(req GET /v1/models/$n)" = 404 ] && [ "$(req GET /v1/datasets/$n)" = 404 ] || bad "$n registered"
done
ok "nothing registered"

# ---- trailing data, control characters, loose numbers --------------------------
job "trailing garbage refused" invalid_json "" "{\"op\":\"loss\",$D} x"
check "trailing: says so" jtrue "$T/body" "'trailing characters' in d['error']['message']"
job "second document refused" invalid_json "" "{\"op\":\"loss\",$D}{}"
printf '{"op":"loss",%s}\000' "$D" > "$T/nul_after.json"
refused "NUL after the document refused" 400 invalid_json "" POST /v1/jobs --data-binary @"$T/nul_after.json"
printf '{"op":"loss",\001%s}' "$D" > "$T/ctl.json"
refused "control character as white space refused" 400 invalid_json "" POST /v1/jobs --data-binary @"$T/ctl.json"
job "leading zero refused" invalid_json "" "{\"op\":\"loss\",$D,\"seed\":01}"

# ---- NUL in strings and names -----------------------------------------------------
job "NUL in op refused" nul_in_string op "{\"op\":\"loss\\u0000x\",$D}"
job "NUL in model name refused" nul_in_string model '{"op":"loss","model":"demo-mlp\u0000zzz","dataset":"digits"}'
job "NUL in block parameter refused" nul_in_string "blocks[0][0]" "{\"op\":\"trace\",$D,\"blocks\":[[\"0.weight\\u0000x\"]]}"
job "NUL in an option key refused" nul_in_string "options.k" "{\"op\":\"eigen\",$D,\"options\":{\"k\\u0000x\":2}}"
refused "NUL in a registration name refused" 400 nul_in_string name \
  POST /v1/datasets --data-binary '{"name":"digits\u0000x","data":""}'

# %00 in the URL: refused whole, the named object untouched
refused "DELETE model NAME%00zzz refused" 400 nul_in_url "" DELETE '/v1/models/demo-mlp%00zzz'
check "the model survives" [ "$(req GET /v1/models/demo-mlp)" = 200 ]
refused "DELETE dataset NAME%00 refused" 400 nul_in_url "" DELETE '/v1/datasets/digits%00'
check "the dataset survives" [ "$(req GET /v1/datasets/digits)" = 200 ]
refused "PUT parameters NAME%00x refused" 400 nul_in_url "" PUT '/v1/models/demo-mlp%00x/parameters' --data-binary 'x'
refused "%00 in a query value refused" 400 nul_in_url "" GET '/v1/jobs?status=queued%00'
refused "%00 in a job id refused" 400 nul_in_url "" GET '/v1/jobs/0123%00'
refused "%2500 is a plain (invalid) name" 400 invalid_name "name" GET '/v1/models/demo-mlp%2500'

# ---- blocks -------------------------------------------------------------------------
job "parameter in two blocks refused" invalid_blocks "blocks[1][1]" "{\"op\":\"trace\",$D,\"blocks\":[[\"0.weight\"],[\"0.bias\",\"0.weight\"]]}"
check "two blocks: both places named" jtrue "$T/body" "'blocks[0][0] and blocks[1][1]' in d['error']['message']"
job "parameter twice in one block refused" invalid_blocks "blocks[0][1]" "{\"op\":\"trace\",$D,\"blocks\":[[\"2.bias\",\"2.bias\"]]}"

# ---- the option checks the README promises at submit --------------------------------
job "eigen k > dim (lanczos)" invalid_option options.k "{\"op\":\"eigen\",$D,\"options\":{\"k\":2411}}"
job "eigen k > dim (power)" invalid_option options.k "{\"op\":\"eigen\",$D,\"options\":{\"k\":2411,\"method\":\"power\"}}"
job "eigen k > dim (block_lanczos)" invalid_option options.k "{\"op\":\"eigen\",$D,\"options\":{\"k\":2411,\"method\":\"block_lanczos\"}}"
job "eigen k > a layer's dim" invalid_option options.k "{\"op\":\"eigen\",$D,\"blocks\":\"layer\",\"options\":{\"k\":331}}"
job "eigen gram on the Hessian (default)" invalid_curvature curvature "{\"op\":\"eigen\",$D,\"options\":{\"k\":2,\"method\":\"gram\"}}"
job "eigen gram on the Hessian (named)" invalid_curvature curvature "{\"op\":\"eigen\",$D,\"curvature\":\"hessian\",\"options\":{\"k\":2,\"method\":\"gram\"}}"
job "snr on the Hessian" invalid_curvature curvature "{\"op\":\"snr\",$D,\"curvature\":\"hessian\"}"
job "matvec vector of the wrong length" invalid_vector options.vector "{\"op\":\"matvec\",$D,\"options\":{\"vector\":[1,2,3]}}"
job "solve rhs of the wrong length" invalid_option options.rhs "{\"op\":\"solve\",$D,\"curvature\":\"ggn\",\"options\":{\"rhs\":[1,2,3],\"damping\":1}}"

# none of the refused jobs was queued
req GET /v1/jobs > /dev/null
check "no refused job in GET /v1/jobs" jtrue "$T/body" "d['count'] == 0 and d['jobs'] == []"

# white space after the document is fine
st=$(req POST '/v1/jobs?wait=30' --data-binary "{\"op\":\"loss\",$D,\"batch\":{\"offset\":0,\"size\":4}}
  ")
check "trailing white space accepted" sh -c "[ '$st' = 200 ] && grep -q succeeded '$T/body'"

# ---- curvd run reads its job strictly -------------------------------------------------
req GET /v1/models/demo-mlp > /dev/null
"$PY" -c 'import json,sys; json.dump(json.load(open(sys.argv[1]))["architecture"], open(sys.argv[2], "w"))' "$T/body" "$T/arch.json"
curl -s -o "$T/params.safetensors" "$BASE/v1/models/demo-mlp/parameters"
curl -s -o "$T/data.safetensors" "$BASE/v1/datasets/digits/data"
run_refused() { # NAME CODE FIELD JOB
  printf '%s' "$4" > "$T/job.json"
  "$CURVD" run --arch "$T/arch.json" --params "$T/params.safetensors" --data "$T/data.safetensors" \
    --job "$T/job.json" > "$T/run.out" 2> "$T/run.err"
  rc=$?
  if [ "$rc" = 1 ] && jtrue "$T/run.err" "d['error']['code'] == '$2' and d['error']['field'] == '$3'"; then ok "$1"; else
    bad "$1: rc $rc, $(head -c 300 "$T/run.err")"
  fi
}
B='"batch":{"offset":0,"size":4}'
run_refused "curvd run: duplicate option" duplicate_field options.k "{\"op\":\"eigen\",$B,\"options\":{\"k\":2,\"k\":3}}"
run_refused "curvd run: trailing garbage" invalid_json job "{\"op\":\"loss\",$B} junk"
run_refused "curvd run: NUL in a string" nul_in_string op "{\"op\":\"loss\\u0000\",$B}"
run_refused "curvd run: parameter in two blocks" invalid_blocks "blocks[1][0]" "{\"op\":\"trace\",$B,\"blocks\":[[\"0.weight\"],[\"0.weight\"]]}"
run_refused "curvd run: k > dim" invalid_option options.k "{\"op\":\"eigen\",$B,\"options\":{\"k\":5000}}"
printf '{"input_shape":[64],"input_shape":[64],"layers":[],"loss":{"type":"MSELoss"}}' > "$T/arch_dup.json"
printf '{"op":"loss","batch":{"offset":0,"size":4}}' > "$T/job.json"
"$CURVD" run --arch "$T/arch_dup.json" --params "$T/params.safetensors" --data "$T/data.safetensors" \
  --job "$T/job.json" > "$T/run.out" 2> "$T/run.err"
check "curvd run: duplicate key in the architecture file" jtrue "$T/run.err" "d['error']['code'] == 'duplicate_field' and d['error']['field'].endswith('input_shape')"
e2e_check_alive "$T/d1.log"
kill "$DPID" 2>/dev/null
e2e_wait_exit "$DPID" 20

# ---- Retry-After on 429 and 503 -------------------------------------------------------
e2e_start_or_finish "$T/d2.log" --workers 1 --max-queue 1 --shutdown-grace 30
# LONG runs for many minutes (200 runs): the draining check below needs a job
# still running at the SIGTERM (one of fixed length ends early on a fast
# machine, and an idle daemon exits at once instead of answering 503)
LONG="{\"op\":\"density\",$D,\"options\":{\"lanczos_steps\":3000,\"runs\":200}}"
got429=""
for i in 1 2 3 4; do
  st=$(req POST /v1/jobs --data-binary "$LONG")
  if [ "$st" = 429 ]; then got429=1; break; fi
done
check "a --max-queue 1 daemon fills: 429" [ -n "$got429" ]
check "429 carries Retry-After" retry_after_ok
check "429 is queue_full" jtrue "$T/body" "d['error']['code'] == 'queue_full'"
# draining (SIGTERM with a job running): 503 shutting_down, with Retry-After
kill -TERM "$DPID"
st=""
for i in 1 2 3 4 5 6 7 8 9 10; do
  st=$(req POST /v1/jobs --data-binary "$LONG")
  [ "$st" = 503 ] && break
  sleep 0.2
done
check "draining: 503" [ "$st" = 503 ]
check "503 carries Retry-After" retry_after_ok
kill -9 "$DPID" 2>/dev/null
finish
