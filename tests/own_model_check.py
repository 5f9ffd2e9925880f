"""own_model_check.py OWN_OUT RUN_OUT - checks the README's "Your own model" steps.

OWN_OUT holds the four JSON answers of the own-model curl block (model, dataset, job,
PUT of version 2), RUN_OUT the JSON result of the curvd-run block on the same files:
the job over HTTP and `curvd run` must give the same trace, stderr, probes and matvecs
(to 1e-9).  Prints the trace; an AssertionError says what differs.  Used by
tests/e2e_clients.sh and tests/e2e_readme.sh.
"""
import json
import sys

text = open(sys.argv[1]).read()
docs, i, dec = [], 0, json.JSONDecoder()
while i < len(text):
    if text[i].isspace():
        i += 1
        continue
    d, i = dec.raw_decode(text, i)
    docs.append(d)
assert len(docs) == 4, "expected 4 JSON answers, got %d" % len(docs)
model, data, job, put = docs
assert model["name"] == "mine" and model["version"] == 1 and \
    model["parameter_count"] == 64 * 32 + 32 + 32 * 10 + 10, model
assert data["name"] == "mydata" and data["n"] == 1797, data
assert job["status"] == "succeeded" and job["result"]["op"] == "trace", job
assert put["version"] == 2, put
cli = json.load(open(sys.argv[2]))
http = job["result"]
for k in ("trace", "stderr", "probes", "matvecs"):
    a, b = http[k], cli[k]
    assert a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b)), (k, a, b)
print("trace", http["trace"])
