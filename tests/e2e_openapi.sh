#!/bin/sh
# e2e_openapi.sh - api/openapi.yaml: validity and agreement with the op table.
#
# Usage: sh tests/e2e_openapi.sh build/curvd
# 1. Validates api/openapi.yaml as OpenAPI 3.0 with npm's
#    @apidevtools/swagger-parser (tests/openapi/validate.js; pinned in
#    tests/openapi/package.json + package-lock.json, installed into
#    build/npm-openapi) and checks that broken copies (an unquoted comma in a
#    flow mapping, a bad schema type, a dangling $ref) are refused.
# 2. Starts `curvd serve --port 0` on 127.0.0.1 and compares the spec's per-op
#    schemas (Job oneOf on op, <Op>Options, <Op>Result) with GET /v1/ops:
#    ops, curvatures, statuses and op_specs (tests/openapi/check_ops.py), and
#    checks that the checker catches a missing or changed option, result or op.
# 3. Runs a job of every op and checks the job, the answer and the result fields
#    against the schemas (tests/openapi/schema_check.js, ajv), and that jobs the
#    server refuses (unknown or out-of-range options, ...) are refused by Job.
# Needs node and npm (installed with apt-get as root when missing).
# Ends with "N passed, M failed"; VERBOSE=1 lists passing checks.
set -u
. "$(dirname "$0")/e2e_lib.sh"
SPEC="$ROOT/api/openapi.yaml"
TOOLS="$ROOT/tests/openapi"

# ---- node + @apidevtools/swagger-parser into build/npm-openapi ------------------------
e2e_npm_install "$TOOLS" "$ROOT/build/npm-openapi" @apidevtools/swagger-parser
validate() { NODE_PATH="$NPMDIR/node_modules" timeout 60 "$NODE" "$TOOLS/validate.js" "$@"; }

# ---- 1. the spec validates; broken copies do not ---------------------------------------
if validate "$SPEC" "$T/spec.json" > "$T/valid.out" 2>&1; then
  ok "api/openapi.yaml is valid"
  [ -z "${VERBOSE:-}" ] || cat "$T/valid.out" >&2
else
  bad "api/openapi.yaml does not validate: $(cat "$T/valid.out")"
  finish
fi
# broken NAME SED-EXPRESSION: a copy edited by sed must be refused (exit 1)
broken() {
  sed "$2" "$SPEC" > "$T/broken.yaml"
  if cmp -s "$SPEC" "$T/broken.yaml"; then bad "broken copy ($1): the edit did not apply"; return; fi
  validate "$T/broken.yaml" > "$T/broken.out" 2>&1
  rc=$?
  if [ "$rc" = 1 ]; then ok "broken copy refused ($1)"; else
    bad "broken copy ($1) not refused (exit $rc): $(head -5 "$T/broken.out")"
  fi
}
broken "unquoted comma in a flow mapping" \
  's/message: {type: string, description: "What went wrong, for people."}/message: {type: string, description: What went wrong, for people.}/'
broken "unknown schema type" 's/^      type: object$/      type: objekt/'
broken "dangling \$ref" 's|\$ref: "#/components/schemas/TraceOptions"|$ref: "#/components/schemas/NoSuchOptions"|'

# ---- daemon ----------------------------------------------------------------------------
e2e_start_or_finish "$T/daemon.log" --bind 127.0.0.1

# ---- 2. per-op schemas against GET /v1/ops ------------------------------------------
if curl -s -S --max-time 20 -o "$T/ops.json" "$BASE/v1/ops"; then ok "GET /v1/ops"; else bad "GET /v1/ops failed"; finish; fi
ops_check() { "$PY" "$TOOLS/check_ops.py" "$@" > "$T/check.out" 2>&1; rc=$?; cat "$T/check.out" >&2; return $rc; }
TABLE="$T/ops.json"
check "openapi per-op schemas == GET /v1/ops op_specs" ops_check "$T/spec.json" "$TABLE"
check "check_ops.py catches a missing, extra or changed option, result or op" \
  ops_check --self-test "$T/spec.json" "$TABLE"

# ---- 3. real jobs against the schemas ----------------------------------------------------
# Each job the server runs must fit schema Job, its answer JobStatus (with the op's
# JobResult) and have only the result fields the op's schema names; each job the
# server refuses (400) must be refused by schema Job too.  Cases for
# tests/openapi/schema_check.js go to $T/cases.jsonl.
: > "$T/cases.jsonl"
case_add() { "$PY" -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "schema": sys.argv[2],
  "valid": sys.argv[3] == "1", "doc": json.load(open(sys.argv[4]))}))' "$@" >> "$T/cases.jsonl"; }
job() {
  name=$1
  printf '%s' "$2" > "$T/doc.json"
  if ! curl -s -S --max-time 120 -o "$T/job.json" -H 'Content-Type: application/json' \
       -X POST "$BASE/v1/jobs?wait=100" --data-binary @"$T/doc.json"; then bad "job $name: request failed"; return; fi
  check "job $name: result fields are in the result schema" ops_check --result "$T/spec.json" "$T/job.json"
  case_add "job $name" Job 1 "$T/doc.json"
  case_add "answer to job $name" JobStatus 1 "$T/job.json"
}
refused() {
  name=$1
  printf '%s' "$2" > "$T/doc.json"
  st=$(curl -s -S --max-time 30 -o "$T/job.json" -w '%{http_code}' -H 'Content-Type: application/json' \
       -X POST "$BASE/v1/jobs" --data-binary @"$T/doc.json")
  check "job $name: refused by the server (400)" [ "$st" = 400 ]
  case_add "job $name" Job 0 "$T/doc.json"
  case_add "error answer to job $name" Error 1 "$T/job.json"
}
M='"model": "demo-mlp", "dataset": "digits"'
S='"batch": {"offset": 0, "size": 64}'
job loss "{\"op\": \"loss\", $M}"
job gradient "{\"op\": \"gradient\", $M, $S, \"blocks\": \"layer\", \"seed\": 3}"
job matvec "{\"op\": \"matvec\", $M, $S, \"curvature\": \"ggn\", \"blocks\": [[\"2.bias\"]], \"options\": {\"probe_seed\": 3}}"
job dense "{\"op\": \"dense\", $M, $S, \"blocks\": [[\"2.bias\"]], \"options\": {\"mc_samples\": 2}}"
job per_sample_gradients "{\"op\": \"per_sample_gradients\", $M, \"batch\": {\"indices\": [0, 5, 7]}, \"blocks\": [[\"2.bias\"]]}"
job trace "{\"op\": \"trace\", $M, $S, \"options\": {\"method\": \"hutch++\", \"max_probes\": 6, \"tol\": 0, \"return_samples\": true}}"
job diag "{\"op\": \"diag\", $M, $S, \"blocks\": [[\"2.bias\"]], \"options\": {\"max_probes\": 3, \"distribution\": \"gaussian\"}}"
job eigen "{\"op\": \"eigen\", $M, $S, \"curvature\": \"ggn\", \"options\": {\"method\": \"gram\", \"k\": 2, \"subsample\": 0.5, \"return_vectors\": true}}"
job eigen-lanczos "{\"op\": \"eigen\", $M, $S, \"blocks\": \"layer\", \"options\": {\"k\": 2, \"which\": \"magnitude\", \"max_iter\": 40}}"
job density "{\"op\": \"density\", $M, $S, \"options\": {\"lanczos_steps\": 5, \"grid_points\": 20, \"runs\": 2}}"
job solve "{\"op\": \"solve\", $M, $S, \"curvature\": \"ggn\", \"options\": {\"damping\": 1, \"max_iter\": 5, \"method\": \"minres\", \"rhs\": \"gradient\"}}"
job solve-rhs-list "{\"op\": \"solve\", $M, $S, \"curvature\": \"ggn\", \"blocks\": [[\"2.bias\"]], \"options\": {\"damping\": 1, \"rhs\": [1, 0, 0, 0, 0, 0, 0, 0, 0, -1]}}"
job newton "{\"op\": \"newton\", $M, $S, \"curvature\": \"ggn\", \"options\": {\"method\": \"vivit\", \"k\": 2, \"actual_change\": true}}"
job newton-cg "{\"op\": \"newton\", $M, $S, \"curvature\": \"ggn\", \"options\": {\"damping\": 1, \"max_iter\": 5}}"
job newton-bootstrap "{\"op\": \"newton\", $M, $S, \"curvature\": \"fisher_mc\", \"options\": {\"method\": \"vivit\", \"damping\": \"bootstrap\", \"k\": \"all\", \"bootstrap_samples\": 20, \"grid\": [0.01, 0.1, 1]}}"
job newton-acp "{\"op\": \"newton\", $M, $S, \"blocks\": \"layer\", \"options\": {\"method\": \"acp\", \"damping\": 1, \"rescale\": true}}"
job snr "{\"op\": \"snr\", $M, $S, \"curvature\": \"ggn\", \"options\": {\"k\": 2, \"return_raw\": true}}"
job laplace "{\"op\": \"laplace\", $M, $S, \"options\": {\"structure\": \"kron\", \"prior_precision\": [1, 2], \"optimize_prior\": true}}"
job laplace-lowrank "{\"op\": \"laplace\", $M, $S, \"options\": {\"structure\": \"last_layer\", \"last_layer_structure\": \"lowrank\", \"k\": 3}}"
job predict "{\"op\": \"predict\", $M, $S, \"options\": {\"structure\": \"last_layer\", \"samples\": 20, \"return_covariance\": true, \"return_posterior_samples\": true}}"
job predict-x "{\"op\": \"predict\", $M, $S, \"options\": {\"structure\": \"kron\", \"optimize_prior\": true, \"x\": [$(awk 'BEGIN { for (i = 0; i < 128; i++) printf "%s0.5", (i ? "," : "") }')]}}"
job instruments "{\"op\": \"instruments\", $M, $S, \"options\": {\"probes\": 3, \"bins\": 5, \"lanczos_steps\": 4}}"
job instruments-include "{\"op\": \"instruments\", $M, $S, \"options\": {\"include\": [\"loss\", \"norm_test\", \"alpha\"]}}"
refused "unknown option" "{\"op\": \"eigen\", $M, \"options\": {\"k\": 3, \"bogus_option\": 1}}"
refused "unknown instrument" "{\"op\": \"instruments\", $M, \"options\": {\"include\": [\"loss\", \"gradient_nrom\"]}}"
refused "option below its minimum" "{\"op\": \"trace\", $M, \"options\": {\"max_probes\": 0}}"
refused "option above its maximum" "{\"op\": \"density\", $M, \"options\": {\"runs\": 10001}}"
refused "integer option given a fraction" "{\"op\": \"eigen\", $M, \"options\": {\"k\": 2.5}}"
refused "acp_alpha 0 (a number > 0 or \"max\")" "{\"op\": \"newton\", $M, \"options\": {\"method\": \"acp\", \"acp_alpha\": 0}}"
refused "option of the wrong type" "{\"op\": \"trace\", $M, \"options\": {\"return_samples\": 1}}"
refused "option outside its enum" "{\"op\": \"eigen\", $M, \"options\": {\"which\": \"middle\"}}"
refused "unknown method" "{\"op\": \"solve\", $M, \"options\": {\"method\": \"gmres\"}}"
refused "rhs neither gradient nor a list" "{\"op\": \"solve\", $M, \"options\": {\"rhs\": \"grad\"}}"
refused "rhs list holding a string" "{\"op\": \"solve\", $M, \"options\": {\"rhs\": [1, \"2\"]}}"
refused "option of another op" "{\"op\": \"loss\", $M, \"options\": {\"k\": 1}}"
refused "unknown op" "{\"op\": \"nope\", $M}"
refused "unknown field" "{\"op\": \"loss\", $M, \"foo\": 1}"
refused "missing dataset" "{\"op\": \"loss\", \"model\": \"demo-mlp\"}"
refused "unknown curvature" "{\"op\": \"trace\", $M, \"curvature\": \"fisher\"}"
refused "loss with blocks layer" "{\"op\": \"loss\", $M, \"blocks\": \"layer\"}"
refused "matvec with two groups" "{\"op\": \"matvec\", $M, \"blocks\": [[\"0.bias\"], [\"2.bias\"]], \"options\": {\"probe_seed\": 1}}"
refused "negative seed" "{\"op\": \"loss\", $M, \"seed\": -1}"
refused "batch size 0" "{\"op\": \"loss\", $M, \"batch\": {\"offset\": 0, \"size\": 0}}"
refused "unknown batch field" "{\"op\": \"loss\", $M, \"batch\": {\"first\": 3}}"
# answers of the registry and listing routes
answer() {
  if curl -s -S --max-time 20 -o "$T/answer.json" "$BASE$2"; then case_add "GET $2" "$1" 1 "$T/answer.json"
  else bad "GET $2 failed"; fi
}
answer OpList /v1/ops
answer Health /v1/health
answer Model /v1/models/demo-mlp
answer Dataset /v1/datasets/digits
answer Dataset /v1/datasets/regression
if NODE_PATH="$NPMDIR/node_modules" timeout 60 "$NODE" "$TOOLS/schema_check.js" "$T/spec.json" "$T/cases.jsonl" > "$T/schema.out" 2>&1; then
  ok "jobs run fit Job, their answers JobStatus; refused jobs are refused by Job ($(tail -1 "$T/schema.out"))"
  [ -z "${VERBOSE:-}" ] || cat "$T/schema.out" >&2
else
  bad "the schemas and the server disagree: $(cat "$T/schema.out")"
fi
e2e_check_alive "$T/daemon.log"
finish
