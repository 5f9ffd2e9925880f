"""e2e_clients.py - the Python client (clients/python) against a live daemon.

Usage: /usr/bin/python3 tests/e2e_clients.py build/curvd
Starts `curvd serve --port 0` on 127.0.0.1 and checks: models and datasets
registered from torch exports (dicts/bytes) and from files, numbers equal to
PyTorch's (loss, gradient) for MLPs and a CNN, parameter pushes and version
pinning, every op in GET /v1/ops submitted and waited for, progress, cancel,
wait timeouts, errors as CurvdError with status/code/field, the exporter's
UnsupportedModuleError, the standard-library safetensors module, `pip install`
of the package, the README's Python blocks, and the training-monitor example
end to end (a valid PNG).  Bounded (alarm); ends with 'N passed, M failed'.
"""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from curvd_client import Client, CurvdError, Job, JobFailed, JobTimeout, Progress  # noqa: E402
from curvd_client import safetensors as st  # noqa: E402
from curvd_client.torch_export import (UnsupportedModuleError, export_architecture,  # noqa: E402
                                       export_dataset, export_model, state_dict_bytes,
                                       write_files)

from e2e_lib import (CURVD, PY, RESULTS, VERBOSE, Daemon, check, for_url,  # noqa: E402
                     readme_block, skip)
from torchref import rel  # noqa: E402


def raises(fn, exc=CurvdError):
    try:
        fn()
    except exc as e:
        return e
    except Exception as e:  # the wrong kind
        return RuntimeError("raised %r instead of %s" % (e, exc.__name__))
    return None


def mlp(act=nn.Tanh, din=6, h=8, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, h), act(), nn.Linear(h, c))


# ---- the checks ----------------------------------------------------------------

def test_service(c):
    h = c.health()
    check("health ok", h.get("status") == "ok" and h.get("workers", 0) >= 1, h)
    ops = c.ops()
    want = {"loss", "gradient", "matvec", "dense", "trace", "diag", "eigen", "density", "solve",
            "newton", "snr"}
    check("ops lists the core ops", want <= set(ops["ops"]), ops)
    check("metrics text", "curvd_jobs_submitted_total" in c.metrics())
    check("demo model listed", "demo-mlp" in [m["name"] for m in c.list_models()])
    check("demo dataset listed", "digits" in [d["name"] for d in c.list_datasets()])
    check("trailing /v1 in base URL accepted", Client(c.base_url + "/v1/").health()["status"] == "ok")
    return ops["ops"]


def test_torch_models(c, tmp):
    # MLP, CrossEntropyLoss, registered from the export's dict + bytes
    model = mlp(nn.Tanh)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(1)
    x = torch.randn(40, 6)
    y = torch.randint(0, 3, (40,))
    arch, params = export_model(model, loss_fn, [6])
    info = c.register_model("py-mlp", arch, params)
    check("register_model -> version 1", info["version"] == 1 and info["parameter_count"] == 6 * 8 + 8 + 8 * 3 + 3, info)
    names = [(p["name"], p["shape"]) for p in c.get_model("py-mlp")["parameters"]]
    check("parameters in state_dict order", names == [(k, list(v.shape)) for k, v in model.state_dict().items()], names)
    d = c.register_dataset("py-data", export_dataset(x, y))
    check("register_dataset from bytes", d["n"] == 40 and d["y"]["kind"] == "labels", d)
    r = c.run(op="loss", model="py-mlp", dataset="py-data", timeout=30)
    check("loss == torch", abs(r["loss"] - float(loss_fn(model(x), y))) < 1e-5, r)
    g = c.run(op="gradient", model="py-mlp", dataset="py-data", timeout=30)["gradient"]
    model.zero_grad()
    loss_fn(model(x), y).backward()
    tg = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    check("gradient == torch autograd", rel(g, tg) < 1e-4, rel(g, tg))

    # pinning: a job submitted before a push keeps the old version
    slow = c.submit(op="trace", model="py-mlp", dataset="py-data", options={"max_probes": 400, "tol": 0})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    pushed = c.push_parameters("py-mlp", state_dict_bytes(model))
    check("push_parameters -> version 2", pushed["version"] == 2, pushed)
    check("earlier job pinned version 1", slow.info.get("model_version") == 1, slow.info)
    r = c.run(op="loss", model="py-mlp", dataset="py-data", timeout=30)
    check("loss after push == torch", abs(r["loss"] - float(loss_fn(model(x), y))) < 1e-5, r)
    slow.wait(timeout=60)
    # downloaded parameters round-trip through the stdlib safetensors reader
    t = st.loads(c.get_parameters("py-mlp"))
    check("get_parameters round trip", set(t) == set(model.state_dict()) and
          rel(t["0.weight"].flat(), model.state_dict()["0.weight"]) < 1e-7)
    data = st.loads(c.get_dataset_data("py-data"))
    check("get_dataset_data round trip", data["x"].shape == [40, 6] and data["y"].flat() == y.tolist())

    # write_files: out/ under the current directory by default, or directory=
    cwd = os.getcwd()
    os.makedirs(os.path.join(tmp, "wf"))
    os.chdir(os.path.join(tmp, "wf"))
    try:
        dflt = write_files(model, loss_fn, [6], x, y)
    finally:
        os.chdir(cwd)
    check("write_files writes into out/ by default",
          dflt == {k: os.path.join("out", f) for k, f in (("arch", "arch.json"), ("params", "params.safetensors"),
                                                          ("data", "data.safetensors"))} and
          all(os.path.getsize(os.path.join(tmp, "wf", p)) > 0 for p in dflt.values()), dflt)
    kw = write_files(model, loss_fn, [6], directory=os.path.join(tmp, "wf", "new", "dir"))
    check("write_files(directory=...) creates the directory; no data without x, y",
          sorted(kw) == ["arch", "params"] and kw["arch"] == os.path.join(tmp, "wf", "new", "dir", "arch.json")
          and os.path.getsize(kw["params"]) > 0, kw)
    # from files (paths), architecture as JSON text; the older form write_files(directory, model, ...)
    files = write_files(tmp, model, loss_fn, [6], x, y)
    check("write_files writes three files", all(os.path.getsize(p) > 0 for p in files.values()), files)
    with open(files["params"], "rb") as f1, open(os.path.join(tmp, "wf", dflt["params"]), "rb") as f2:
        check("write_files(directory, model, ...) == write_files(model, ...)", f1.read() == f2.read())
    check("register_model_files", c.register_model_files("py-mlp-files", files["arch"], files["params"])["version"] == 1)
    check("register_dataset_file", c.register_dataset_file("py-data-files", files["data"])["n"] == 40)
    with open(files["arch"]) as f:
        text = f.read()
    check("register_model with JSON text and a params path",
          c.register_model("py-mlp-text", text, files["params"])["version"] == 1)
    r2 = c.run(op="loss", model="py-mlp-files", dataset="py-data-files", timeout=30)
    check("model from files computes the same loss", abs(r2["loss"] - r["loss"]) < 1e-6, (r, r2))
    check("put_dataset replaces (version 2)", c.put_dataset("py-data-files", files["data"])["version"] == 2)

    # regression with MSELoss; BCEWithLogits
    for loss_fn2, yy in ((nn.MSELoss(), torch.randn(40, 3)), (nn.BCEWithLogitsLoss(reduction="sum"), torch.rand(40, 3)),
                         (nn.CrossEntropyLoss(reduction="sum"), torch.randint(0, 3, (40,)))):
        m2 = mlp(nn.ReLU, seed=3)
        n = type(loss_fn2).__name__ + "-" + loss_fn2.reduction
        a2, p2 = export_model(m2, loss_fn2, [6])
        c.register_model("py-" + n, a2, p2)
        c.put_dataset("py-" + n, export_dataset(x, yy))
        r = c.run(op="loss", model="py-" + n, dataset="py-" + n, timeout=30)
        check("loss == torch (%s)" % n, abs(r["loss"] - float(loss_fn2(m2(x), yy))) < 1e-4 * max(1, abs(r["loss"])), r)

    # a CNN with BatchNorm (evaluation mode), pooling, Flatten, Dropout
    torch.manual_seed(5)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, stride=1, padding=1), nn.GELU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 5))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.2, 0.2)
        cnn[1].running_var.uniform_(0.5, 2.0)
    cnn.eval()
    xc = torch.randn(12, 1, 8, 8)
    yc = torch.randint(0, 5, (12,))
    a3, p3 = export_model(cnn, nn.CrossEntropyLoss(), [1, 8, 8])
    c.register_model("py-cnn", a3, p3)
    c.register_dataset("py-cnn-data", export_dataset(xc, yc))
    r = c.run(op="loss", model="py-cnn", dataset="py-cnn-data", timeout=30)
    check("CNN loss == torch (eval mode)", abs(r["loss"] - float(nn.CrossEntropyLoss()(cnn(xc), yc))) < 1e-4, r)



def same_numbers(a, b, path="result"):
    """None if a and b agree (all fields but elapsed_s; numbers to 1e-9 relative), else where they differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        ka, kb = set(a) - {"elapsed_s"}, set(b) - {"elapsed_s"}
        if ka != kb:
            return "%s: keys %s vs %s" % (path, sorted(ka ^ kb), "")
        for k in sorted(ka):
            r = same_numbers(a[k], b[k], path + "." + k)
            if r:
                return r
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return "%s: lengths %d vs %d" % (path, len(a), len(b))
        for i, (p, q) in enumerate(zip(a, b)):
            r = same_numbers(p, q, "%s[%d]" % (path, i))
            if r:
                return r
        return None
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-300):
            return None
    elif a == b:
        return None
    return "%s: %r vs %r" % (path, a, b)


def test_torch_files_vs_run(c, tmp):
    """A PyTorch model exported with write_files, registered over HTTP from those
    files, gives the same numbers as `curvd run` on the very same files."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 10), nn.Tanh(), nn.Linear(10, 4))
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(48, 1, 8, 8)
    y = torch.randint(0, 4, (48,))
    work = os.path.join(tmp, "torchfiles")
    os.makedirs(work)
    files = write_files(work, model, loss_fn, [1, 8, 8], x, y)
    check("write_files wrote arch, params, data",
          sorted(files) == ["arch", "data", "params"] and all(os.path.getsize(f) > 0 for f in files.values()), files)
    info = c.register_model_files("tf-cnn", files["arch"], files["params"])
    check("register_model_files from write_files output", info["version"] == 1 and
          info["parameter_count"] == sum(p.numel() for p in model.parameters()), info)
    d = c.register_dataset_file("tf-data", files["data"])
    check("register_dataset_file from write_files output", d["n"] == 48, d)
    r = c.run(op="loss", model="tf-cnn", dataset="tf-data", timeout=60)
    check("torch files: loss == torch", abs(r["loss"] - float(loss_fn(model(x), y))) < 1e-5, r)
    jobs = {
        "trace": {"curvature": "hessian", "seed": 3, "options": {"max_probes": 40, "tol": 0}},
        "eigen": {"curvature": "ggn", "seed": 4, "options": {"k": 3}},
        "density": {"curvature": "ggn", "seed": 5, "options": {"lanczos_steps": 12, "runs": 2}},
        "snr": {"curvature": "ggn", "seed": 6, "options": {"k": 3}},
        "solve": {"curvature": "ggn", "seed": 7, "options": {"damping": 0.5}},
    }
    for op, extra in jobs.items():
        doc = dict(op=op, model="tf-cnn", dataset="tf-data", batch={"offset": 4, "size": 40}, **extra)
        try:
            http = c.run(doc, timeout=90)
        except (CurvdError, JobFailed, JobTimeout) as e:
            check("torch files: %s over HTTP" % op, False, repr(e))
            continue
        jpath = os.path.join(work, "job_%s.json" % op)
        with open(jpath, "w") as f:
            json.dump(dict(doc, model="m", dataset="d"), f)  # names are not used by curvd run
        p = subprocess.run([CURVD, "run", "--blas-threads", "1", "--arch", files["arch"], "--params", files["params"],
                            "--data", files["data"], "--job", jpath], capture_output=True, text=True, timeout=90)
        if not check("torch files: curvd run %s" % op, p.returncode == 0, p.stderr[-800:]):
            continue
        cli = json.loads(p.stdout)
        diff = same_numbers(http, cli)
        check("torch files: %s over HTTP == curvd run on the same files" % op, diff is None and http["op"] == op, diff)
        if op == "snr":
            check("torch files: snr gives 3 directions", len(http.get("directions", [])) == 3, http.get("directions"))
    same_peak_under_load(files, jobs)


def same_peak_under_load(files, jobs):
    """The bytes a job reports (peak_memory_bytes) are the same when it runs
    beside other jobs: the accounting counts the bytes asked for, not what the
    allocator's arenas, shared with the other workers, round them up to (the
    CI machine once saw a density job 16 bytes over its twin). Eight workers,
    so that the jobs run side by side here too."""
    d = Daemon("--workers", "8")
    c = Client(d.url)
    c.register_model_files("tf-cnn", files["arch"], files["params"])
    c.register_dataset_file("tf-data", files["data"])
    seen, errors = {}, []

    def submit(rounds):
        for _ in range(rounds):
            for op in jobs:
                doc = dict(op=op, model="tf-cnn", dataset="tf-data", batch={"offset": 4, "size": 40}, **jobs[op])
                try:
                    seen.setdefault(op, set()).add(c.run(doc, timeout=90)["peak_memory_bytes"])
                except Exception as e:  # noqa: BLE001 (reported below)
                    errors.append(repr(e))

    threads = [threading.Thread(target=submit, args=(15,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d.stop()
    check("peak_memory_bytes: one value per job over 90 runs each, 6 at a time",
          not errors and all(len(v) == 1 for v in seen.values()) and len(seen) == len(jobs), (errors[:2], seen))


def test_export_errors():
    e = raises(lambda: export_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.LSTM(4, 4)),
                                    nn.MSELoss(), [4]), UnsupportedModuleError)
    check("LSTM at index 3 refused", isinstance(e, UnsupportedModuleError) and "nn.LSTM" in str(e) and
          "index 3" in str(e) and e.index == 3 and e.module_type == "LSTM", repr(e))
    check("UnsupportedModuleError is a ValueError", isinstance(e, ValueError))
    e = raises(lambda: export_model(mlp(), nn.NLLLoss(), [6]), UnsupportedModuleError)
    check("NLLLoss on logits refused (no LogSoftmax)", e is not None and "NLLLoss" in str(e) and
          "LogSoftmax" in str(e) and "loss" in str(e), repr(e))
    arch = export_model(nn.Sequential(nn.Linear(6, 3), nn.LogSoftmax(dim=1)), nn.NLLLoss(), [6])[0]
    check("NLLLoss after LogSoftmax exported (graph form)", arch["loss"] == {"type": "NLLLoss", "reduction": "mean"}
          and arch["modules"]["1"] == {"type": "LogSoftmax", "dim": 1}, arch)
    arch = export_model(mlp(), nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=2), [6])[0]
    check("label_smoothing and ignore_index exported", arch["loss"] == {
        "type": "CrossEntropyLoss", "reduction": "mean", "label_smoothing": 0.1, "ignore_index": 2}, arch)
    e = raises(lambda: export_model(mlp(), nn.MSELoss(), [6], class_dim=-1), ValueError)
    check("class_dim with MSELoss refused", e is not None and "class_dim" in str(e), repr(e))
    e = raises(lambda: export_model(mlp(), nn.MSELoss(reduction="none"), [6]), UnsupportedModuleError)
    check("reduction none refused", e is not None and "reduction" in str(e), repr(e))
    arch = export_model(nn.Sequential(nn.Sequential(nn.Linear(6, 3))), nn.MSELoss(), [6])[0]
    check("nested Sequential exported in the graph form (qualified names)",
          list(arch["modules"]) == ["0.0"] and [n["op"] for n in arch["nodes"]] ==
          ["placeholder", "call_module", "output"] and "layers" not in arch, arch)

    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class QuietLinear(nn.Linear):  # same forward: accepted
        pass

    arch = export_model(nn.Sequential(MyLinear(6, 3)), nn.MSELoss(), [6])[0]
    check("subclass overriding forward traced through (F.linear with its parameters, then * 2)",
          [(n["op"], n.get("target")) for n in arch["nodes"]] ==
          [("placeholder", None), ("call_function", "linear"), ("call_function", "mul"), ("output", None)]
          and arch["nodes"][1]["params"] == {"weight": "0.weight", "bias": "0.bias"} and
          arch["nodes"][2]["scalar"] == 2, arch)
    arch = export_architecture(nn.Sequential(QuietLinear(6, 3)), nn.MSELoss(), [6])
    check("subclass keeping forward accepted", arch["layers"][0]["type"] == "Linear", arch)

    class Net(nn.Module):
        pass

    e = raises(lambda: export_model(Net(), nn.MSELoss(), [6]), UnsupportedModuleError)
    check("model without forward() refused", e is not None and "forward()" in str(e) and "Net" in str(e), repr(e))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    e = raises(lambda: export_model(Branchy(), nn.MSELoss(), [6]), UnsupportedModuleError)
    check("model torch.fx cannot trace refused", e is not None and "torch.fx" in str(e) and "Branchy" in str(e) and
          "control flow" in str(e), repr(e))

    class Einsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            h = self.lin(x)
            return torch.einsum("ni,ni->ni", h, h)

    e = raises(lambda: export_model(Einsum(), nn.MSELoss(), [6]), UnsupportedModuleError)
    check("unmapped function: error names node, module path, source line and what is supported",
          e is not None and "einsum" in str(e) and "e2e_clients.py:" in str(e) and "Supported modules" in str(e)
          and "LayerNorm" in str(e) and "matmul" in str(e), repr(e))

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            h = self.lin(x)
            skip = h
            h += 1  # in place: skip changes too, which torch.fx does not see
            return h + skip

    e = raises(lambda: export_model(Aliased(), nn.MSELoss(), [6]), UnsupportedModuleError)
    check("in-place op on an aliased tensor refused (traced graph != model)",
          e is not None and "in-place" in str(e), repr(e))

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5))

        def forward(self, x):
            return x + self.blk(x)

    e = raises(lambda: export_model(Blocks(), nn.MSELoss(), [6]), ValueError)
    check("graph model in training mode refused, naming the module path",
          type(e) is ValueError and "nn.Dropout at 'blk.1'" in str(e) and "model.eval()" in str(e), repr(e))

    # training mode: refused where it computes differently (Dropout p > 0, BatchNorm)
    drop = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    e = raises(lambda: export_model(drop, nn.CrossEntropyLoss(), [6]), ValueError)
    check("Dropout in training mode refused with a ValueError naming model.eval()",
          type(e) is ValueError and "training mode" in str(e) and "model.eval()" in str(e) and
          "nn.Dropout at index 1" in str(e), repr(e))
    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    e = raises(lambda: export_model(bn, nn.CrossEntropyLoss(), [6]), ValueError)
    check("BatchNorm in training mode refused", type(e) is ValueError and "nn.BatchNorm1d at index 1" in str(e) and
          "model.eval()" in str(e), repr(e))
    drop.eval()
    check("Dropout model accepted after model.eval()",
          export_model(drop, nn.CrossEntropyLoss(), [6])[0]["layers"][1] == {"type": "Dropout", "p": 0.5})
    m = mlp()
    check("a model without Dropout/BatchNorm is accepted in training mode (same numbers)",
          m.training and export_model(m, nn.CrossEntropyLoss(), [6])[0]["layers"][0]["type"] == "Linear")
    check("Dropout(p=0) in training mode accepted",
          export_model(nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.0)), nn.MSELoss(), [6]) is not None)
    # without torch: a clear ImportError; the rest of the client works
    code = ("import sys; sys.modules['torch'] = None\n"
            "import curvd_client\n"
            "try:\n    import curvd_client.torch_export\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "clients", "python")))
    check("torch_export without torch: clear ImportError", "IMPORTERROR" in p.stdout and "needs PyTorch" in p.stdout,
          p.stdout + p.stderr)


def test_stdlib_safetensors(c):
    # a dataset built from Python lists, no torch involved
    xs = [[float(i % 4 == j) for j in range(4)] for i in range(16)]
    ys = [[float(i % 2), float(i % 3)] for i in range(16)]
    buf = st.dumps({"x": st.Tensor.from_list(xs, "F32"), "y": st.Tensor.from_list(ys, "F32")})
    back = st.loads(buf)
    check("safetensors round trip", back["x"].tolist() == xs and back["y"].shape == [16, 2])
    c.register_dataset("py-lists", buf)
    r = c.run(op="loss", model="demo-regression", dataset="py-lists", timeout=30)
    check("dataset from lists usable", isinstance(r.get("loss"), float), r)
    t = st.Tensor.from_list([1, 2, 3], "I64")
    check("I64 tensor", t.flat() == [1, 2, 3] and len(t.data) == 24)
    check("BF16 tensor", st.Tensor.from_list([1.0, -2.0], "BF16").flat() == [1.0, -2.0])


OP_JOBS = {
    "loss": ({}, lambda r, D: isinstance(r["loss"], float)),
    "gradient": ({}, lambda r, D: len(r["gradient"]) == D),
    "matvec": ({"options": {"probe_seed": 3}}, lambda r, D: len(r["product"]) == D),
    "dense": ({}, lambda r, D: len(r["matrix"]) == D and len(r["matrix"][0]) == D),
    "per_sample_gradients": ({"batch": {"offset": 0, "size": 4}}, lambda r, D: len(r["per_sample_gradients"]) in (4, D)),
    "trace": ({"options": {"max_probes": 30}}, lambda r, D: "trace" in r and "stderr" in r),
    "diag": ({"options": {"max_probes": 20}}, lambda r, D: len(r["diag"]) == D),
    "eigen": ({"options": {"k": 3}}, lambda r, D: len(r["eigenvalues"]) == 3 and r["eigenvalues"][0] >= r["eigenvalues"][2]),
    "density": ({"options": {"lanczos_steps": 20, "grid_points": 50}},
                lambda r, D: len(r["density"]["grid"]) == 50 and len(r["density"]["values"]) == 50),
    "solve": ({"options": {"damping": 0.1}}, lambda r, D: len(r["solution"]) == D),
    "newton": ({"options": {"damping": 0.1}}, lambda r, D: len(r["step"]) == D),
    "snr": ({"curvature": "ggn", "options": {"k": 2}},
            lambda r, D: len(r["directions"]) == 2 and "gamma_snr" in r["directions"][0]),
    "jvp": ({"options": {"probe_seed": 3}}, lambda r, D: len(r["jvp"]) > 0),
    "vjp": ({"options": {"cotangent_seed": 3}}, lambda r, D: len(r["vjp"]) == D),
    "frobenius_norm": ({"options": {"max_probes": 10}}, lambda r, D: r["frobenius_norm"] >= 0),
    "instruments": ({"options": {"probes": 4, "bins": 6}},
                    lambda r, D: r["gradient_norm"] >= 0 and len(r["gradient_histogram"]["counts"]) == 6
                    and "alpha" in r and isinstance(r["unavailable"], dict)),
}


def test_ops(c, ops):
    D = c.get_model("demo-regression")["parameter_count"]
    jobs = []
    for op in ops:
        extra, _ = OP_JOBS.get(op, ({}, None))
        try:
            jobs.append((op, c.submit(dict(extra), op=op, model="demo-regression", dataset="regression", seed=1)))
        except CurvdError as e:
            check("submit op %s" % op, False, e)
    for op, job in jobs:
        try:
            r = job.wait(timeout=60, poll=0.5)
        except CurvdError as e:
            check("op %s succeeds" % op, False, e)
            continue
        ok = OP_JOBS[op][1] if op in OP_JOBS else (lambda r, D: True)
        try:
            good = r["op"] == op and "matvecs" in r and "elapsed_s" in r and ok(r, D)
        except (KeyError, TypeError, IndexError) as e:
            good = False
            r = {"error": repr(e), "keys": list(r)}
        check("op %s: result fields" % op, good, json.dumps(r)[:300])
    # blocks "layer": per-block results with parameter names
    r = c.run(op="trace", model="demo-mlp", dataset="digits", blocks="layer", options={"max_probes": 20}, timeout=60)
    check("blocks=layer trace", [b["params"] for b in r["blocks"]] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]], r)
    # same seed, same numbers
    a = c.run(op="trace", model="demo-mlp", dataset="digits", seed=7, options={"max_probes": 10}, timeout=60)
    b = c.run(op="trace", model="demo-mlp", dataset="digits", seed=7, options={"max_probes": 10}, timeout=60)
    check("same seed, same trace", a["trace"] == b["trace"])
    # server-side wait at submission
    j = c.submit(op="loss", model="demo-mlp", dataset="digits", wait=30)
    check("submit(wait=) returns a finished job", j.done and "result" in j.info, j.info)
    # list_jobs filters
    js = c.list_jobs(model="demo-regression")
    check("list_jobs(model=)", len(js) >= len(ops) and all(x["model"] == "demo-regression" for x in js))
    check("list_jobs(status=, limit=)", len(c.list_jobs(status="succeeded", limit=2)) == 2)


def test_progress_cancel(c):
    seen = []
    # a million probes: runs for minutes even on a fast machine (the checks below
    # need it still running after the 0.6 s wait and the polls; cancelled)
    job = c.submit(op="trace", model="demo-mlp", dataset="digits", options={"max_probes": 1000000, "tol": 0})
    check("submit returns a Job", isinstance(job, Job) and len(job.id) > 0)
    e = raises(lambda: job.wait(timeout=0.6, poll=0.2, on_progress=lambda j: seen.append(j.progress)), JobTimeout)
    check("wait(timeout) raises JobTimeout", isinstance(e, JobTimeout) and isinstance(e, TimeoutError) and
          e.code == "wait_timeout", repr(e))
    check("on_progress called with Progress", len(seen) >= 1 and isinstance(seen[-1], Progress), seen)
    deadline = time.time() + 20  # a busy machine may not have started it yet
    while job.status() == "queued" and time.time() < deadline:
        time.sleep(0.05)
    while job.progress.matvecs_done == 0 and time.time() < deadline:
        time.sleep(0.05)
    p = job.progress
    check("progress advances", p.matvecs_done > 0 and p.matvecs_planned == 1000000 and 0 <= p.fraction < 1, p)
    check("status running", job.status() == "running")
    after = job.cancel()
    check("cancel -> cancelled", after["status"] == "cancelled", after)
    e = raises(lambda: job.result, JobFailed)
    check("result of a cancelled job raises JobFailed", isinstance(e, JobFailed) and e.code == "cancelled" and
          e.job_status == "cancelled" and isinstance(e, CurvdError), repr(e))
    check("Job.error", (job.error or {}).get("code") == "cancelled")
    check("client.job(id)", c.job(job.id).info["status"] == "cancelled")
    # a job timeout set at submission ends the job as failed
    j = c.submit(op="trace", model="demo-mlp", dataset="digits", options={"max_probes": 1000000, "tol": 0},
                 job_timeout=0.2)
    e = raises(lambda: j.wait(timeout=30), JobFailed)
    check("job_timeout -> JobFailed job_timeout", isinstance(e, JobFailed) and e.code == "job_timeout", repr(e))


def test_errors(c, url):
    def err(fn):
        try:
            fn()
        except CurvdError as e:
            return e
        return None

    e = err(lambda: c.submit(op="trace", model="demo-mlp", dataset="digits", bogus=1))
    check("unknown field -> 400 unknown_field bogus", e and e.status == 400 and e.code == "unknown_field" and
          e.field == "bogus" and e.body["error"]["code"] == "unknown_field", repr(e))
    e = err(lambda: c.submit(op="trace", model="demo-mlp", dataset="digits", options={"probes": 3}))
    check("unknown option -> 400 options.probes", e and e.status == 400 and e.field == "options.probes", repr(e))
    e = err(lambda: c.submit(op="nope", model="demo-mlp", dataset="digits"))
    check("unknown op -> 400 field op", e and e.status == 400 and e.field == "op", repr(e))
    e = err(lambda: c.submit(op="trace", model="missing", dataset="digits"))
    check("unknown model -> 404 not_found", e and e.status == 404 and e.code == "not_found", repr(e))
    e = err(lambda: c.get_model("missing"))
    check("get_model missing -> 404", e and e.status == 404 and "missing" in e.message, repr(e))
    e = err(lambda: c.job("0123456789abcdef"))
    check("unknown job -> 404", e and e.status == 404, repr(e))
    arch, params = export_model(mlp(), nn.MSELoss(), [6])
    e = err(lambda: c.register_model("py-mlp", arch, params))
    check("duplicate name -> 409", e and e.status == 409, repr(e))
    e = err(lambda: c.register_model("bad name!", arch, params))
    check("invalid name -> 400 field name", e and e.status == 400 and e.field == "name", repr(e))
    e = err(lambda: c.push_parameters("py-mlp", b"not safetensors at all"))
    check("bad safetensors -> 400", e and e.status == 400 and e.message, repr(e))
    small = state_dict_bytes(mlp(h=5))
    e = err(lambda: c.push_parameters("py-mlp", small))
    check("mis-shaped parameters -> 400 naming the tensor", e and e.status == 400 and "0.weight" in (e.message + e.field),
          repr(e))
    # in use: deleting a dataset a running job uses is refused
    j = c.submit(op="trace", model="py-mlp", dataset="py-data", options={"max_probes": 1000000, "tol": 0})
    deadline = time.time() + 10
    while j.status() == "queued" and time.time() < deadline:
        time.sleep(0.05)
    e = err(lambda: c.delete_dataset("py-data"))
    check("delete dataset in use -> 409 in_use", e and e.status == 409 and e.code == "in_use", repr(e))
    j.cancel()
    check("delete model", c.delete_model("py-mlp-text")["deleted"] == "py-mlp-text")
    e = err(lambda: c.get_model("py-mlp-text"))
    check("deleted model -> 404", e and e.status == 404, repr(e))
    check("delete dataset", c.delete_dataset("py-lists")["kind"] == "dataset")
    # unreachable
    dead = Client("http://127.0.0.1:1", timeout=5)
    e = err(dead.health)
    check("unreachable -> CurvdError status 0 connection_failed", e and e.status == 0 and e.code == "connection_failed",
          repr(e))
    # an answer cut mid-body (a daemon killed while it wrote: e2e_persist's crash loop)
    import socket
    srv = socket.create_server(("127.0.0.1", 0))

    def cut():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"status\":")
        conn.close()
    threading.Thread(target=cut, daemon=True).start()
    e = err(Client("http://127.0.0.1:%d" % srv.getsockname()[1], timeout=5).health)
    srv.close()
    check("answer cut mid-body -> CurvdError status 0 connection_failed",
          e and e.status == 0 and e.code == "connection_failed", repr(e))


def test_pip_install(tmp):
    target = os.path.join(tmp, "site")
    p = subprocess.run([PY, "-m", "pip", "--version"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        skip("pip install clients/python", "pip is not available for %s (Debian: python3-pip)" % PY)
        return
    p = subprocess.run([PY, "-c", "import setuptools"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        skip("pip install clients/python", "setuptools is not available for %s (Debian: python3-setuptools)" % PY)
        return
    src = os.path.join(tmp, "src")
    shutil.copytree(os.path.join(ROOT, "clients", "python"), src,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    p = subprocess.run([PY, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
                        "--target", target, src], capture_output=True, text=True, timeout=120)
    if not check("pip install clients/python", p.returncode == 0, (p.stdout + p.stderr)[-1500:]):
        return
    p = subprocess.run([PY, "-c", "import curvd_client, os; print(curvd_client.__file__, curvd_client.__version__); "
                        "print(os.path.exists(os.path.join(os.path.dirname(curvd_client.__file__), 'py.typed')))"],
                       capture_output=True, text=True, timeout=30, cwd=tmp, env=dict(os.environ, PYTHONPATH=target))
    check("installed package imports (typed)", p.returncode == 0 and target in p.stdout and "True" in p.stdout,
          p.stdout + p.stderr)


def test_types(tmp):
    """mypy --strict on the standard-library part of the client, when mypy is installed."""
    p = subprocess.run([PY, "-m", "mypy", "--version"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        skip("mypy --strict on curvd_client", "mypy is not installed for %s (Debian: mypy)" % PY)
        return
    pkg = os.path.join(ROOT, "clients", "python", "curvd_client")
    p = subprocess.run([PY, "-m", "mypy", "--strict", "--ignore-missing-imports", "--no-incremental",
                        "--cache-dir", os.path.join(tmp, "mypy-cache")] +
                       [os.path.join(pkg, f) for f in ("__init__.py", "client.py", "safetensors.py")],
                       capture_output=True, text=True, timeout=120)
    check("mypy --strict on curvd_client", p.returncode == 0, (p.stdout + p.stderr)[-1500:])


def run_block(lang, code, cwd, url, timeout=90):
    code = for_url(code, url)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "clients", "python"), CURVD_URL=url)
    if lang == "python":
        cmd = [PY, "-c", code]
    else:
        cmd = ["sh", "-ec", code]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return p, time.time() - t0


def test_readme(url, tmp):
    work = os.path.join(tmp, "readme")
    os.makedirs(work)
    os.symlink(os.path.join(ROOT, "clients"), os.path.join(work, "clients"))
    code = readme_block("python-quickstart")
    if check("README python-quickstart block present", code is not None):
        p, _ = run_block("python", code, work, url)
        check("README python-quickstart runs", p.returncode == 0, (p.stdout + p.stderr)[-2000:])
        check("README python-quickstart output", "400 unknown_option options.probes" in p.stdout and
              "cancelled: cancelled" in p.stdout and "top eigenvalues" in p.stdout, p.stdout[-1500:])
    code = readme_block("python-torch")
    if check("README python-torch block present", code is not None):
        p, _ = run_block("python", code, work, url)
        check("README python-torch runs", p.returncode == 0, (p.stdout + p.stderr)[-2000:])
        m = re.search(r"curvd loss ([\d.]+), torch loss ([\d.]+)", p.stdout)
        check("README python-torch: curvd loss == torch loss", m and abs(float(m.group(1)) - float(m.group(2))) < 1e-5,
              p.stdout[-800:])
        check("README python-torch: LSTM message", "unsupported module nn.LSTM at index 3" in p.stdout, p.stdout[-800:])
        # write_files(".", ...) writes into the current directory, write_files(model, ...) into out/
        d = work if re.search(r"write_files\((\"\.\"|'\.')", code) else os.path.join(work, "out")
        check("README python-torch: files written",
              all(os.path.exists(os.path.join(d, f)) for f in ("arch.json", "params.safetensors", "data.safetensors")), d)
    # clients/python/README.md
    pywork = os.path.join(tmp, "pyreadme")
    os.makedirs(pywork)
    code = readme_block("client-quickstart", "clients/python/README.md")
    if check("clients/python/README.md quickstart block present", code is not None):
        p, _ = run_block("python", code, pywork, url)
        check("clients/python/README.md quickstart runs and prints a trace",
              p.returncode == 0 and re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?\n", p.stdout) is not None,
              (p.stdout + p.stderr)[-2000:])
    code = readme_block("client-torch", "clients/python/README.md")
    if check("clients/python/README.md torch block present", code is not None):
        p, _ = run_block("python", code, pywork, url)
        check("clients/python/README.md torch block runs", p.returncode == 0, (p.stdout + p.stderr)[-2000:])
        check("clients/python/README.md torch block writes out/",
              all(os.path.isfile(os.path.join(pywork, "out", f)) and os.path.getsize(os.path.join(pywork, "out", f)) > 0
                  for f in ("arch.json", "params.safetensors", "data.safetensors")) and "out/arch.json" in p.stdout,
              p.stdout[-800:])
    code = readme_block("train-monitor")
    if check("README train-monitor block present", code is not None):
        p, dt = run_block("sh", code, work, url, timeout=120)
        check("README train-monitor runs", p.returncode == 0, (p.stdout + p.stderr)[-2000:])
        check_png(os.path.join(work, "curvature.png"), "README train-monitor PNG")
        check("train-monitor well under a minute", dt < 45, "%.1f s" % dt)


def check_png(path, name):
    ok = os.path.exists(path)
    detail = "missing"
    if ok:
        with open(path, "rb") as f:
            head = f.read(33)
        size = os.path.getsize(path)
        w, h = struct.unpack(">II", head[16:24]) if len(head) >= 24 else (0, 0)
        ok = head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and w >= 400 and h >= 300 and size > 20000
        detail = "%d bytes, %dx%d" % (size, w, h)
        if ok:
            try:  # decodes as an image
                import matplotlib
                matplotlib.use("Agg")
                import matplotlib.image
                img = matplotlib.image.imread(path)
                ok = img.shape[0] == h and img.shape[1] == w and float(img.std()) > 0.01
                detail += ", decoded %s" % (img.shape,)
            except ImportError:
                pass
    check(name + " is a valid PNG", ok, detail)


def test_example(url, tmp):
    out = os.path.join(tmp, "monitor.png")
    js = os.path.join(tmp, "monitor.json")
    p = subprocess.run([PY, os.path.join(ROOT, "clients", "python", "examples", "train_monitor.py"), "--url", url,
                        "--steps", "80", "--every", "20", "--out", out, "--json", js, "--name", "mon2"],
                       capture_output=True, text=True, timeout=120)
    check("train_monitor.py runs", p.returncode == 0, (p.stdout + p.stderr)[-2000:])
    check_png(out, "train_monitor.py plot")
    try:
        d = json.load(open(js))
    except (OSError, ValueError) as e:
        check("train_monitor.py --json", False, e)
        return
    steps = d["steps"]
    check("measured at steps 0,20,...,80", steps == [0, 20, 40, 60, 80], steps)
    res = d["results"]
    complete = all(len(res.get(k, {})) == len(steps) for k in ("eigen", "trace", "snr"))
    check("eigen, trace and snr results for every checkpoint", complete and not d["errors"],
          {k: len(v) for k, v in res.items()})
    versions = [d["versions"][str(s)] for s in steps]
    check("one parameter push per checkpoint", versions == sorted(set(versions)) and len(versions) == 5, versions)
    if complete:
        ev = [res["eigen"][str(s)]["eigenvalues"][0] for s in steps]
        tr = [res["trace"][str(s)]["trace"] for s in steps]
        check("top eigenvalues and traces positive", all(e > 0 for e in ev) and
              all(t > 0 for t in tr), (ev, tr))
    check("training loss decreased", d["loss"][-1] < d["loss"][0], (d["loss"][0], d["loss"][-1]))


def main():
    signal.signal(signal.SIGALRM, lambda *a: (print("FAIL timeout: e2e_clients.py ran over 170 s"),
                                              print("%d passed, %d failed" % (RESULTS["passed"], RESULTS["failed"] + 1)),
                                              os._exit(1)))
    signal.alarm(170)
    d = Daemon()
    tmp = tempfile.mkdtemp(prefix="curvd-clients-")
    t0 = time.time()
    try:
        c = Client(d.url, timeout=30)
        ops = test_service(c)
        for name, fn in (("torch models", lambda: test_torch_models(c, tmp)),
                         ("torch files vs curvd run", lambda: test_torch_files_vs_run(c, tmp)),
                         ("export errors", test_export_errors),
                         ("stdlib safetensors", lambda: test_stdlib_safetensors(c)),
                         ("ops", lambda: test_ops(c, ops)),
                         ("progress/cancel", lambda: test_progress_cancel(c)),
                         ("errors", lambda: test_errors(c, d.url)),
                         ("pip install", lambda: test_pip_install(tmp)),
                         ("types", lambda: test_types(tmp)),
                         ("README", lambda: test_readme(d.url, tmp)),
                         ("example", lambda: test_example(d.url, tmp))):
            t = time.time()
            try:
                fn()
            except Exception:  # a crash in one group is one failure, the rest still run
                import traceback
                check("%s (no exception)" % name, False, traceback.format_exc()[-1500:])
            if VERBOSE:
                print("-- %s: %.1f s" % (name, time.time() - t))
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if VERBOSE:
        print("total %.1f s" % (time.time() - t0))
    print("%d passed, %d failed" % (RESULTS["passed"], RESULTS["failed"]))
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
