"""e2e_uploads.py - datasets bigger than one request, through the clients.

Usage: /usr/bin/python3 tests/e2e_uploads.py build/curvd
Starts `curvd serve --max-body 64K --data-dir DIR` and a second daemon with the
default body limit, builds a dataset for the demo model several times larger
than 64K, and checks: the Python client uploads it transparently in parts
(progress callback, `source` says how many parts, the download is the same
bytes), curvctl does too (a progress bar on stderr with --progress), the file
registered from --data-dir is memory-mapped, and jobs (gradient, trace) on each
give the same numbers as on the dataset uploaded in one piece to the second
daemon; plus an abandoned upload, a part that does not match and a path
escape.  Standard library only; ends with 'N passed, M failed'.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from curvd_client import Client, CurvdError  # noqa: E402
from curvd_client import safetensors as st  # noqa: E402

from e2e_lib import RESULTS, Daemon, check, summary  # noqa: E402

CURVCTL = os.path.join(ROOT, "clients", "curvctl")
JOBS = [{"op": "gradient"},
        {"op": "trace", "seed": 7, "options": {"max_probes": 8, "tol": 0}}]


def dataset(n, din, classes, seed=1):
    rnd = random.Random(seed)
    x = st.Tensor.from_list([[rnd.gauss(0, 1) for _ in range(din)] for _ in range(n)], "F32")
    y = st.Tensor.from_list([rnd.randrange(classes) for _ in range(n)], "I64")
    return st.dumps({"x": x, "y": y})


def results(c, name):
    out = []
    for j in JOBS:
        doc = dict(j, model="demo-mlp", dataset=name)
        r = c.run(doc, timeout=120)
        out.append({k: v for k, v in r.items() if not k.endswith("_s") and k != "timing"})
    return out


def test_uploads(small, big, tmp, data_dir):
    h = small.health()
    check("health reports max_body_bytes", h.get("max_body_bytes") == 65536, h)
    check("health reports data_dir", h.get("data_dir") is True, h)
    m = small.get_model("demo-mlp")
    din, classes = m["input_shape"][0], m["output_dim"]
    data = dataset(2000, din, classes)
    check("the dataset is larger than --max-body", len(data) > 4 * 65536, len(data))
    path = os.path.join(tmp, "big.safetensors")
    with open(path, "wb") as f:
        f.write(data)

    # reference: the same bytes in one request to a daemon with the default limit
    ref = big.register_dataset("ref", data)
    check("one-piece upload (default --max-body)", ref["n"] == 2000 and ref["source"] == "http", ref)
    want = results(big, "ref")

    # in one piece to the small daemon: 413
    e = None
    try:
        small._upload_whole("whole", data, False)
    except CurvdError as err:
        e = err
    check("one piece over --max-body is 413 body_too_large", e is not None and e.status == 413 and
          e.code == "body_too_large", repr(e))

    # the Python client splits it
    seen = []
    d = small.register_dataset_file("py", path, progress=lambda s, t: seen.append((s, t)))
    nparts = int(d["source"].split("(")[1].split()[0]) if "(" in d["source"] else 1
    check("client uploaded in parts", d["n"] == 2000 and nparts >= 4, d)
    check("progress calls rise to the total", len(seen) == nparts + 1 and
          all(a[0] <= b[0] for a, b in zip(seen, seen[1:])) and seen[-1] == (len(data), len(data)), seen)
    check("download equals the file", small.get_dataset_data("py") == data)
    check("job results equal the one-piece upload", results(small, "py") == want)
    check("put_dataset in parts replaces (version 2)",
          small.put_dataset("py", data)["version"] == 2)

    # curvctl splits it too, with a progress bar on stderr
    env = dict(os.environ, CURVD_URL=small.base_url)
    p = subprocess.run(["sh", CURVCTL, "datasets", "register", "ctl", "--data", path, "--progress"],
                       capture_output=True, text=True, env=env, timeout=120)
    check("curvctl datasets register (in parts)", p.returncode == 0 and "2000 samples" in p.stdout,
          p.stdout + p.stderr)
    check("curvctl progress bar on stderr", "100%" in p.stderr and "part" in p.stderr, p.stderr)
    check("curvctl: job results equal the one-piece upload", results(small, "ctl") == want)
    p = subprocess.run(["sh", CURVCTL, "datasets", "register", "ctl", "--data", path],
                       capture_output=True, text=True, env=env, timeout=120)
    check("curvctl without a tty or --progress: no bar", p.returncode != 0 and "%" not in p.stderr and
          "already_exists" in p.stderr, p.stderr)

    # --data-dir: memory-mapped, same numbers
    shutil.copy(path, os.path.join(data_dir, "big.safetensors"))
    d = small.register_server_file("mapped", "big.safetensors")
    check("data-dir file is mapped", d.get("mapped") is True and d["bytes"] < 1024 and
          d["mapped_bytes"] == len(data), d)
    check("mapped: job results equal the one-piece upload", results(small, "mapped") == want)
    p = subprocess.run(["sh", CURVCTL, "datasets", "map", "mapped2", "../big.safetensors"],
                       capture_output=True, text=True, env=env, timeout=60)
    check("curvctl datasets map: path escape refused", p.returncode == 1 and "path_escape" in p.stderr,
          p.stderr)
    check("delete a mapped dataset", small.delete_dataset("mapped")["deleted"] == "mapped")

    # abandoned and mismatched uploads
    sp = st.RowSplitter(data, 65536)
    part, _ = sp.part(0)
    small.request("POST", "/v1/datasets/half/parts", body=part,
                  content_type="application/octet-stream")
    check("unfinished upload is not a dataset", "half" not in [x["name"] for x in small.list_datasets()])
    up = small.get_upload("half")
    check("GET .../parts shows the upload", up["parts"] == 1 and up["n"] == sp.rows_per_part, up)
    check("metrics: staged bytes", "curvd_registry_staged_bytes %d" % up["staged_bytes"] in small.metrics())
    other = dataset(10, din + 1, classes)
    e = None
    try:
        small.request("POST", "/v1/datasets/half/parts", body=other,
                      content_type="application/octet-stream")
    except CurvdError as err:
        e = err
    check("a part of another shape: 400 part_mismatch", e is not None and e.status == 400 and
          e.code == "part_mismatch" and e.field == "x", repr(e))
    check("abort_upload drops it", small.abort_upload("half") and not small.abort_upload("half"))
    check("no staged bytes left", small.health().get("registry_staged_bytes") == 0, small.health())


def main():
    signal.signal(signal.SIGALRM, lambda *a: (print("FAIL timeout: e2e_uploads.py ran over 300 s"),
                                              print("%d passed, %d failed" % (RESULTS["passed"], RESULTS["failed"] + 1)),
                                              os._exit(1)))
    signal.alarm(300)
    tmp = tempfile.mkdtemp(prefix="curvd-uploads-")
    data_dir = os.path.join(tmp, "data")
    os.mkdir(data_dir)
    small = Daemon("--max-body", "64K", "--data-dir", data_dir, "--workers", "1")
    big = Daemon("--workers", "1")
    try:
        test_uploads(Client(small.url, timeout=60), Client(big.url, timeout=60), tmp, data_dir)
    except Exception:
        import traceback
        check("uploads (no exception)", False, traceback.format_exc()[-2000:])
    finally:
        small.stop()
        big.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
