#!/bin/sh
# e2e_access.sh - access control over HTTP (issue 27 item 3): Host allow-list
# (421), documented Content-Types (415, cross-site form posts), CORS off by
# default and --cors-origin with its preflight, bearer tokens with roles
# (--auth-token-file: 401 + WWW-Authenticate, 403 per role, the anonymous
# liveness health), the per-client queue quota (--max-queued-per-client),
# start-up errors, and TLS (--tls-cert/--tls-key) checked with curl against
# a certificate made here with the openssl CLI.
#
# Usage: sh tests/e2e_access.sh build/curvd   (VERBOSE=1 lists every pass)
set -u
. "$(dirname "$0")/e2e_lib.sh"

# req METHOD URL [curl args]: prints the status; body in $T/body, headers in $T/hdr
req() {
  m=$1; u=$2; shift 2
  curl -s -S --max-time 60 -X "$m" -o "$T/body" -D "$T/hdr" -w '%{http_code}' "$@" "$BASE$u" \
    2>"$T/curl.err" || echo "000"
}
# hdr NAME: the value of response header NAME (case-insensitive), or ""
hdr() { tr -d '\r' < "$T/hdr" | grep -i "^$1:" | head -1 | sed 's/^[^:]*: *//'; }
# is NAME STATUS CODE METHOD URL [curl args]: status and (CODE not -) error code
is() {
  name=$1; st=$2; code=$3; shift 3
  got=$(req "$@")
  if [ "$got" = "$st" ] && { [ "$code" = - ] || jtrue "$T/body" "d['error']['code'] == '$code' and len(d['error']['message']) > 0"; }; then
    ok "$name"
  else
    bad "$name: expected $st/$code, got $got $(head -c 300 "$T/body")"
  fi
}
JSON='Content-Type: application/json'
OCT='Content-Type: application/octet-stream'
JOB='{"op":"loss","model":"demo-mlp","dataset":"digits","batch":{"offset":0,"size":8}}'

# ---- defaults: open on localhost, Host checked, Content-Type checked, no CORS ----------
e2e_start_or_finish "$T/d1.log" --workers 1
is "default: health open" 200 - GET /v1/health
check "default: health tells the load" jtrue "$T/body" "'queue_depth' in d"
is "Host localhost:PORT served" 200 - GET /v1/health -H "Host: localhost:$DPORT"
is "Host [::1] served" 200 - GET /v1/health -H "Host: [::1]:$DPORT"
is "Host of another site refused 421" 421 host_not_allowed GET /v1/models -H "Host: evil.example:$DPORT"
is "rebinding POST refused 421" 421 host_not_allowed POST /v1/jobs -H "Host: attacker.example" -H "$JSON" --data-binary "$JOB"
is "form post (urlencoded) refused 415" 415 unsupported_media_type POST /v1/jobs --data-binary "$JOB"
is "text/plain refused 415" 415 unsupported_media_type POST /v1/jobs -H 'Content-Type: text/plain' --data-binary "$JOB"
check "415 names the type wanted" jtrue "$T/body" "'application/json' in d['error']['message']"
is "JSON job accepted" 202 - POST /v1/jobs -H "$JSON; charset=utf-8" --data-binary "$JOB"
check "no CORS header by default" [ -z "$(hdr Access-Control-Allow-Origin)" ]
is "safetensors PUT as JSON refused 415" 415 unsupported_media_type PUT /v1/datasets/x -H "$JSON" --data-binary '{}'
is "multipart registration passes the type check" 400 - POST /v1/models -F name=m -F architecture='{}' -F parameters=@/dev/null
is "commit without body passes the type check" 404 - POST /v1/datasets/nothing/commit
is "OPTIONS from a foreign origin refused" 403 cors_not_allowed OPTIONS /v1/jobs -H 'Origin: https://evil.example' -H 'Access-Control-Request-Method: POST'
check "refused preflight allows nothing" [ -z "$(hdr Access-Control-Allow-Origin)" ]
is "OPTIONS without Origin: 204" 204 - OPTIONS /v1/jobs
check "OPTIONS answers Allow" sh -c "tr -d '\r' < '$T/hdr' | grep -qi '^Allow: .*POST'"
kill "$DPID"

# ---- tokens, roles, CORS, per-client quota ----------------------------------------
cat > "$T/tokens" <<'EOF'
# curvd tokens: TOKEN [ROLE]
all-4f1c9a27d0e8b6   
read-77aa01bc9e  read
submit-c3d2e1f0a9 submit   # a comment
admin-0b9e8d7c6a admin
submit-two-5e6f7a submit
EOF
e2e_start_or_finish "$T/d2.log" --workers 1 --auth-token-file "$T/tokens" \
  --cors-origin https://app.example --max-queued-per-client 2
check "start-up log says tokens are required" grep -q "tokens required" "$T/d2.log"
auth() { echo "Authorization: Bearer $1"; }
is "no token: 401" 401 unauthorized GET /v1/models
check "401 has WWW-Authenticate: Bearer" sh -c "tr -d '\r' < '$T/hdr' | grep -qi '^WWW-Authenticate: Bearer realm=\"curvd\"'"
is "unknown token: 401" 401 unauthorized GET /v1/models -H "$(auth all-4f1c9a27d0e8b7)"
check "unknown token: error=invalid_token" sh -c "tr -d '\r' < '$T/hdr' | grep -qi '^WWW-Authenticate: .*error=\"invalid_token\"'"
is "prefix of a token: 401" 401 unauthorized GET /v1/models -H "$(auth all-4f1c9a27d0e8)"
is "token + suffix: 401" 401 unauthorized GET /v1/models -H "$(auth all-4f1c9a27d0e8b6x)"
is "Basic scheme: 401" 401 unauthorized GET /v1/models -H 'Authorization: Basic YWxsOng='
is "no token: job post 401" 401 unauthorized POST /v1/jobs -H "$JSON" --data-binary "$JOB"
is "no token: the dashboard's static page loads" 200 - GET /
is "no token: the dashboard's script loads" 200 - GET /dashboard/app.js
is "bad token: dashboard 401" 401 unauthorized GET / -H "Authorization: Bearer nope-nope"
is "no token: metrics 401" 401 unauthorized GET /metrics
is "no token: health is liveness only" 200 - GET /v1/health
check "anonymous health tells only the status" jtrue "$T/body" "d == {'status': 'ok'}"
is "health with a token tells the load" 200 - GET /v1/health -H "$(auth read-77aa01bc9e)"
check "token health has the load" jtrue "$T/body" "'queue_depth' in d"
R=$(auth read-77aa01bc9e); S=$(auth submit-c3d2e1f0a9); A=$(auth admin-0b9e8d7c6a); N=$(auth all-4f1c9a27d0e8b6)
is "read: GET models" 200 - GET /v1/models -H "$R"
is "read: metrics" 200 - GET /metrics -H "$R"
is "read: dashboard" 200 - GET / -H "$R"
is "read: lower-case scheme" 200 - GET /v1/ops -H "authorization: bearer read-77aa01bc9e"
is "read: job post 403" 403 forbidden POST /v1/jobs -H "$R" -H "$JSON" --data-binary "$JOB"
check "403 names the role" jtrue "$T/body" "\"'read'\" in d['error']['message'] and \"'submit'\" in d['error']['message']"
is "read: delete model 403" 403 forbidden DELETE /v1/models/demo-mlp -H "$R"
is "submit: job post" 202 - POST /v1/jobs -H "$S" -H "$JSON" --data-binary "$JOB"
jid=$(sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' "$T/body")
is "submit: job get" 200 - GET "/v1/jobs/$jid?wait=30" -H "$S"
is "submit: job cancel" 200 - DELETE "/v1/jobs/$jid" -H "$S"
is "submit: register model 403" 403 forbidden POST /v1/models -H "$S" -H "$JSON" --data-binary '{}'
is "submit: replace params 403" 403 forbidden PUT /v1/models/demo-mlp/parameters -H "$S" -H "$OCT" --data-binary x
is "submit: delete dataset 403" 403 forbidden DELETE /v1/datasets/digits -H "$S"
curl -s -H "$A" -o "$T/data.safetensors" "$BASE/v1/datasets/digits/data"
is "admin: PUT dataset" 201 - PUT /v1/datasets/copy -H "$A" -H "$OCT" --data-binary @"$T/data.safetensors"
is "admin: job post" 202 - POST /v1/jobs -H "$A" -H "$JSON" --data-binary "$JOB"
is "admin: delete dataset" 200 - DELETE /v1/datasets/copy -H "$A"
is "no role: PUT dataset" 201 - PUT /v1/datasets/copy2 -H "$N" -H "$OCT" --data-binary @"$T/data.safetensors"
is "no role: delete dataset" 200 - DELETE /v1/datasets/copy2 -H "$N"
# the clients take the token: curvctl (CURVD_TOKEN, --token-file) and the Python client
C="$ROOT/clients/curvctl"
check "curvctl: CURVD_TOKEN read lists models" sh -c "CURVD_URL='$BASE' CURVD_TOKEN=read-77aa01bc9e '$C' models > '$T/c.out' 2>&1 && grep -q demo-mlp '$T/c.out'"
check "curvctl: no token is a server error (exit 1, unauthorized)" sh -c "CURVD_URL='$BASE' CURVD_TOKEN= '$C' models > '$T/c.out' 2>&1; [ \$? = 1 ] && grep -qi 'token' '$T/c.out'"
printf '# submit\nsubmit-c3d2e1f0a9 submit\n' > "$T/mytoken"
check "curvctl: --token-file submits and waits" sh -c "CURVD_URL='$BASE' '$C' --token-file '$T/mytoken' submit --op loss --model demo-mlp --dataset digits --batch 8 --wait 30 > '$T/c.out' 2>&1"
check "curvctl: the token is not on curl's command line" sh -c "! grep -q 'submit-c3d2e1f0a9' '$C'"
cat > "$T/client.py" <<'PYEOF'
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "clients", "python"))
from curvd_client import Client, CurvdError
c = Client(sys.argv[2], token="submit-c3d2e1f0a9")
r = c.run(op="loss", model="demo-mlp", dataset="digits", batch={"offset": 0, "size": 8})
assert "loss" in r, r
try:
    c.delete_model("demo-mlp")
    raise SystemExit("delete with a submit token succeeded")
except CurvdError as e:
    assert e.status == 403 and e.code == "forbidden", e
os.environ["CURVD_TOKEN"] = "read-77aa01bc9e"
assert any(m["name"] == "demo-mlp" for m in Client(sys.argv[2]).list_models())
try:
    Client(sys.argv[2], token="").list_models()
    raise SystemExit("no token succeeded")
except CurvdError as e:
    assert e.status == 401 and e.code == "unauthorized", e
print("ok")
PYEOF
check "Python client: token=, CURVD_TOKEN, 401/403 as CurvdError" sh -c "'$PY' '$T/client.py' '$ROOT' '$BASE' > '$T/py.out' 2>&1 || { cat '$T/py.out' >&2; false; }"
# CORS: the one origin
is "CORS: allowed origin" 200 - GET /v1/models -H "$R" -H 'Origin: https://app.example'
check "CORS: Access-Control-Allow-Origin echoed" [ "$(hdr Access-Control-Allow-Origin)" = https://app.example ]
check "CORS: Vary: Origin" [ "$(hdr Vary)" = Origin ]
is "CORS: other origin" 200 - GET /v1/models -H "$R" -H 'Origin: https://evil.example'
check "CORS: other origin gets no allow header" [ -z "$(hdr Access-Control-Allow-Origin)" ]
is "CORS: preflight (no token) 204" 204 - OPTIONS /v1/jobs -H 'Origin: https://app.example' \
  -H 'Access-Control-Request-Method: POST' -H 'Access-Control-Request-Headers: authorization, content-type'
check "CORS: preflight allows the origin" [ "$(hdr Access-Control-Allow-Origin)" = https://app.example ]
check "CORS: preflight allows Authorization" sh -c "tr -d '\r' < '$T/hdr' | grep -qi '^Access-Control-Allow-Headers: .*Authorization'"
check "CORS: preflight allows POST" sh -c "tr -d '\r' < '$T/hdr' | grep -qi '^Access-Control-Allow-Methods: .*POST'"
is "CORS: preflight from another origin 403" 403 cors_not_allowed OPTIONS /v1/jobs -H 'Origin: https://evil.example'
# per-client quota: one worker busy, two queued for this token, the third refused.
# LONG runs for many minutes (200 runs; all cancelled below): one of fixed
# length that a fast machine ends before the listing lets the worker take a
# queued job out of the queue ("3 queued in all" would see 2)
LONG='{"op":"density","model":"demo-mlp","dataset":"digits","options":{"lanczos_steps":3000,"runs":200}}'
for i in 1 2 3; do req POST /v1/jobs -H "$S" -H "$JSON" --data-binary "$LONG" > /dev/null; done
is "quota: third queued job of one token 429" 429 client_queue_full POST /v1/jobs -H "$S" -H "$JSON" --data-binary "$LONG"
check "quota: 429 carries Retry-After" sh -c "tr -d '\r' < '$T/hdr' | grep -qiE '^Retry-After: [1-9]'"
is "quota: another token still queues" 202 - POST /v1/jobs -H "$(auth submit-two-5e6f7a)" -H "$JSON" --data-binary "$LONG"
curl -s -H "$A" -o "$T/jobs.json" "$BASE/v1/jobs?status=queued"
check "quota: 3 queued in all" jtrue "$T/jobs.json" "len(d['jobs']) == 3"
for id in $(sed 's/"id":"\([0-9a-f]*\)"/\n\1\n/g' "$T/jobs.json" "$T/body" | grep -E '^[0-9a-f]{16}$' | sort -u); do
  curl -s -o /dev/null -X DELETE -H "$A" "$BASE/v1/jobs/$id"
done
curl -s -H "$A" -o "$T/jobs.json" "$BASE/v1/jobs?status=running"
for id in $(sed 's/"id":"\([0-9a-f]*\)"/\n\1\n/g' "$T/jobs.json" | grep -E '^[0-9a-f]{16}$'); do
  curl -s -o /dev/null -X DELETE -H "$A" "$BASE/v1/jobs/$id"
done
e2e_check_alive "$T/d2.log"
kill "$DPID"

# ---- --generate-token (the Docker image's command) -----------------------------------
e2e_start_or_finish "$T/d4.log" --workers 1 --generate-token --bind 127.0.0.1
GT=$(sed -n 's/^curvd: generated token .*: \([0-9a-f]*\)$/\1/p' "$T/d4.log")
check "--generate-token: 32 hex digits in the log" [ "${#GT}" = 32 ]
check "--generate-token: the dashboard link carries it" grep -q "/#token=$GT\$" "$T/d4.log"
is "--generate-token: no token 401" 401 unauthorized GET /v1/models
is "--generate-token: the token works (admin)" 201 - PUT /v1/datasets/gt -H "$(auth "$GT")" -H "$OCT" --data-binary @"$T/data.safetensors"
is "--generate-token: health for the HEALTHCHECK" 200 - GET /v1/health
kill "$DPID"
CURVD_TOKEN=mine-0123456789 e2e_start_or_finish "$T/d5.log" --workers 1 --generate-token
check "CURVD_TOKEN: not printed" sh -c "! grep -q mine-0123456789 '$T/d5.log' && grep -q 'token from CURVD_TOKEN' '$T/d5.log'"
is "CURVD_TOKEN: that token works" 200 - GET /v1/models -H "$(auth mine-0123456789)"
is "CURVD_TOKEN: another is 401" 401 unauthorized GET /v1/models -H "$(auth "$GT")"
kill "$DPID"

# ---- start-up errors ------------------------------------------------------------------
startup_fails() { # NAME REGEX ARGS...: curvd serve exits non-zero, stderr matches
  name=$1; re=$2; shift 2
  timeout 20 "$CURVD" serve --port 0 --no-demo "$@" > /dev/null 2> "$T/err.log"
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qE "$re" "$T/err.log"; then ok "$name"; else bad "$name: rc $rc, $(head -c 300 "$T/err.log")"; fi
}
printf 'tok-1 superuser\n' > "$T/badrole"
printf '# nothing\n\n' > "$T/empty"
startup_fails "token file missing" "auth-token-file .*No such file" --auth-token-file "$T/none"
startup_fails "unknown role" "unknown role 'superuser'" --auth-token-file "$T/badrole"
startup_fails "no token listed" "lists no token" --auth-token-file "$T/empty"
startup_fails "--tls-cert without --tls-key" "both --tls-cert and --tls-key" --tls-cert "$T/tokens"
startup_fails "--tls-cert not PEM" "not a PEM file" --tls-cert "$T/tokens" --tls-key "$T/tokens"

# ---- TLS --------------------------------------------------------------------------
if ! command -v openssl > /dev/null 2>&1; then
  bad "openssl CLI missing (apt-get install openssl)"
  finish
fi
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$T/key.pem" -out "$T/cert.pem" > "$T/openssl.log" 2>&1 || bad "openssl: $(cat "$T/openssl.log")"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=other \
  -keyout "$T/key2.pem" -out "$T/cert2.pem" > /dev/null 2>&1
startup_fails "--tls-key of another certificate" "cannot start HTTPS" --tls-cert "$T/cert.pem" --tls-key "$T/key2.pem"
"$CURVD" serve --port 0 --workers 1 --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" \
  --auth-token-file "$T/tokens" 2> "$T/d3.log" &
DPID=$!
E2E_PIDS="$E2E_PIDS $DPID"
DPORT=""
i=0
while [ $i -lt 100 ] && [ -z "$DPORT" ]; do
  DPORT=$(sed -n 's/^curvd: listening on https:\/\/127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$T/d3.log")
  sleep 0.1; i=$((i + 1))
done
if [ -z "$DPORT" ]; then bad "TLS daemon did not start: $(cat "$T/d3.log")"; finish; fi
BASE="https://localhost:$DPORT"
i=0
while [ $i -lt 100 ] && [ "$(req GET /v1/health --cacert "$T/cert.pem")" != 200 ]; do sleep 0.1; i=$((i + 1)); done
is "TLS: health over https (verified certificate)" 200 - GET /v1/health --cacert "$T/cert.pem"
is "TLS: token over https" 200 - GET /v1/models --cacert "$T/cert.pem" -H "$R"
is "TLS: job over https" 200 - POST '/v1/jobs?wait=30' --cacert "$T/cert.pem" -H "$S" -H "$JSON" --data-binary "$JOB"
check "TLS: job succeeded" jtrue "$T/body" "d['status'] == 'succeeded'"
is "TLS: no token 401" 401 unauthorized GET /v1/models --cacert "$T/cert.pem"
check "TLS: curvctl --cacert" sh -c "CURVD_URL='$BASE' CURVD_TOKEN=read-77aa01bc9e '$C' --cacert '$T/cert.pem' models > '$T/c.out' 2>&1 && grep -q demo-mlp '$T/c.out'"
check "TLS: Python client CURVD_CA_FILE" sh -c "CURVD_CA_FILE='$T/cert.pem' CURVD_TOKEN=read-77aa01bc9e PYTHONPATH='$ROOT/clients/python' '$PY' -c 'from curvd_client import Client; import sys; assert Client(sys.argv[1]).health()[\"status\"] == \"ok\"' '$BASE'"
st=$(curl -s -o /dev/null --max-time 10 -w '%{http_code}' "https://localhost:$DPORT/v1/health" 2>/dev/null)
check "TLS: an unknown certificate is refused by curl" [ "$st" = 000 ]
st=$(curl -s -o /dev/null --max-time 10 -w '%{http_code}' "http://127.0.0.1:$DPORT/v1/health" 2>/dev/null)
check "TLS: plain HTTP gets no answer" [ "$st" != 200 ]
is "TLS: still serving after a plain-HTTP attempt" 200 - GET /v1/health --cacert "$T/cert.pem"
e2e_check_alive "$T/d3.log"
kill "$DPID"
finish
