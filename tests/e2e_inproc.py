"""e2e_inproc.py - `import curvd` (issue 25): the engine in-process through build/libcurvd.so.

Usage: /usr/bin/python3 tests/e2e_inproc.py build/curvd   (libcurvd.so beside it)
  - numbers: the same job documents through `curvd run --blas-threads 1` and in-process at
    one BLAS thread give identical results (every field but elapsed_s) for trace (Hutchinson
    and Hutch++), eigen (lanczos, power with vectors), density, diag, gradient, newton and
    kfac, on an MLP (CrossEntropyLoss) and a CNN; the transformer LM (graph form, token ids)
    too; job_memory: too small a budget is curvd run --job-memory's error, one that splits
    the batch into micro-batches its result;
  - against torch (float64): dense Hessian and GGN, h @ v for a numpy vector and a torch
    matrix, top eigenvalues; scipy's eigsh on h.linear_operator();
  - data as an iterable of batches (a DataLoader) = the concatenated batch; curvd.analyze;
  - PyHessian's calls (curvd.pyhessian(...).trace / eigenvalues / density) with its return
    shapes and the trace within 3 stderr of the exact trace;
  - clients/python/examples/pyhessian_side_by_side.py --check (PyHessian's README calls,
    curvd vs plain torch, the ESD plot);
  - bad input: an unsupported module (UnsupportedModuleError naming it), a meta-device
    tensor and a boolean y (ValueError naming the tensor), an invalid option (CurvdError
    with the HTTP API's code and field), a closed model (ValueError, no crash), a parameter
    of the wrong size and a NaN (CurvdError), the C API's own NULL checks through ctypes;
  - threads: distinct handles and a shared model run concurrently = sequentially; close()
    and update() from another thread wait for a running job;
  - parameter order: vectors in the engine's order (param_names; a graph model may use its
    parameters in another order than model.parameters()), split/join by name, pyhessian's
    eigenvectors in model.parameters() order;
  - the calling overhead of a tiny job (printed; bench/README.md records it);
  - the README's in-process block (<!-- test: inproc-python -->) runs and prints a trace.
Ends with 'N passed, M failed'.
"""
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, PY, ROOT, check, readme_block, summary  # noqa: E402

os.environ.setdefault("CURVD_LIB", os.path.join(os.path.dirname(CURVD), "libcurvd.so"))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import curvd  # noqa: E402
from curvd import _lib  # noqa: E402


def same(a, b, path=""):
    """The first difference between two result documents, or None (elapsed_s
    ignored; peak_memory_bytes counts the bytes the engine asks for, the same in
    every process)."""
    if isinstance(a, dict) and isinstance(b, dict):
        ka = set(a) - {"elapsed_s"}
        kb = set(b) - {"elapsed_s"}
        if ka != kb:
            return "%s: keys %s vs %s" % (path, sorted(ka ^ kb), "")
        for k in sorted(ka):
            d = same(a[k], b[k], path + "." + k)
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return "%s: length %d vs %d" % (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            d = same(x, y, "%s[%d]" % (path, i))
            if d:
                return d
        return None
    return None if a == b else "%s: %r vs %r" % (path, a, b)


def check_same_as_run(tag, h, d, jobs):
    """Each job through `curvd run --blas-threads 1` and in-process: identical results."""
    curvd.set_blas_threads(1)
    for job in jobs:
        job = dict(job, curvature=job.get("curvature", h.curvature))
        _, want = tr.curvd_run(CURVD, d, job, extra=("--blas-threads", "1"))
        got = curvd.run(h.model, h.data, job)
        diff = same(want, got)
        check(f"{tag} {job['op']} {json.dumps(job.get('options', {}))[:60]}: = curvd run",
              diff is None, diff or "")


def check_job_memory(h, d):
    """job_memory in process as `curvd run --job-memory`: a budget too small is the same
    error document (libcurvd leaves the refusal to the engine's own plan), one that splits
    the 16 samples into micro-batches gives the same result."""
    curvd.set_blas_threads(1)
    job = {"op": "eigen", "curvature": "hessian", "seed": 1, "options": {"k": 2}}
    _, want = tr.curvd_run(CURVD, d, job, expect_ok=False, extra=("--job-memory", "1000"))
    try:
        curvd.run(h.model, h.data, job, job_memory=1000)
        got = None
    except curvd.CurvdError as e:
        got = {"code": e.code, "message": e.message, "field": e.field}

    check("job_memory too small: the error of curvd run --job-memory (code, field, message)",
          got is not None and got["code"] == "job_memory" and got == want.get("error"), f"{got} vs {want}")
    # a budget just above the minimum the refusal names (rounded up past its last digit),
    # so the 16 samples go in micro-batches: the engine's accounting, not a constant here
    m = re.search(r"at least ([\d.]+) KiB", str((want.get("error") or {}).get("message")))
    if not check("job_memory refusal names the minimum in KiB", m is not None, want):
        return
    budget = int((float(m.group(1)) + 0.1) * 1024) + 1
    _, want = tr.curvd_run(CURVD, d, job, extra=("--job-memory", str(budget), "--blas-threads", "1"))
    got = curvd.run(h.model, h.data, job, job_memory=budget)
    diff = same(want, got)
    check("job_memory splitting the batch: = curvd run --job-memory",
          diff is None and got.get("micro_batches", 1) > 1,
          diff or f"micro_batches {got.get('micro_batches')}")


MLP_JOBS = [
    {"op": "trace", "seed": 3, "options": {"max_probes": 20, "tol": 0, "return_samples": True}},
    {"op": "trace", "seed": 3, "options": {"method": "hutch++", "max_probes": 12}},
    {"op": "eigen", "seed": 1, "options": {"k": 3}},
    {"op": "eigen", "seed": 1, "options": {"k": 2, "method": "power", "return_vectors": True}},
    {"op": "density", "seed": 2, "options": {"lanczos_steps": 12, "runs": 2,
                                             "grid_points": 50}},
    {"op": "diag", "seed": 2, "options": {"max_probes": 10}},
    {"op": "gradient"},
    {"op": "newton", "curvature": "ggn", "options": {"damping": 0.1}},
    {"op": "kfac", "options": {"fisher_type": "empirical"}},
]


def mlp_case():
    model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.CrossEntropyLoss(), n=16)
    return model, torch.nn.CrossEntropyLoss(), x, y


def check_numbers():
    model, lf, x, y = mlp_case()
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [x.shape[1]], lf, x, y)
        h = curvd.Hessian(model, lf, (x, y))
        check_same_as_run("mlp", h, d, MLP_JOBS)
        check_job_memory(h, d)
    torch.manual_seed(2)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(12, 4)).eval()
    xc, yc = torch.randn(6, 1, 6, 6), torch.randint(0, 4, (6,))
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, cnn, [1, 6, 6], torch.nn.CrossEntropyLoss(), xc, yc)
        h = curvd.GGN(cnn, torch.nn.CrossEntropyLoss(), (xc, yc))
        check_same_as_run("cnn", h, d, MLP_JOBS[:3] + MLP_JOBS[4:5])
    check_lm()


def check_lm():
    sys.path.insert(0, os.path.join(ROOT, "clients", "python", "examples"))
    import graph_models as gm
    from curvd_client.torch_export import write_files
    x, y = gm.lm_batch(n=3, **gm.SMALL_LM)
    model = gm.transformer_lm(**gm.SMALL_LM, attention="mha").eval()
    lf = torch.nn.CrossEntropyLoss()
    with tempfile.TemporaryDirectory() as d:
        write_files(model, lf, [gm.SMALL_LM["seq_len"]], x, y, directory=d, class_dim=-1)
        h = curvd.GGN(model, lf, (x, y))
        check_same_as_run("lm", h, d, [MLP_JOBS[0], MLP_JOBS[2]])


def check_torch():
    model, lf, x, y = mlp_case()
    import copy
    m64 = copy.deepcopy(model).double()
    H = np.asarray(tr.dense_hessian(m64, lf, x.double(), y))
    G = np.asarray(tr.dense_ggn(m64, lf, x.double(), y))
    h = curvd.Hessian(model, lf, (x, y))
    g = curvd.GGN(model, lf, (x, y))
    D = H.shape[0]
    check("shape = (D, D)", h.shape == (D, D), str(h.shape))
    err = lambda a, b: float(np.abs(a - b).max() / max(1e-12, np.abs(b).max()))  # noqa: E731
    check("dense hessian = torch", err(h.dense(), H) < 1e-5, "%.2e" % err(h.dense(), H))
    check("dense ggn = torch", err(g.dense(), G) < 1e-5, "%.2e" % err(g.dense(), G))
    v = np.random.default_rng(0).standard_normal(D)
    check("h @ numpy vector = H v", err(h @ v, H @ v) < 1e-5)
    V = torch.randn(D, 3, dtype=torch.float64)
    HV = h @ V
    check("h @ torch matrix = H V (a torch tensor)", isinstance(HV, torch.Tensor) and
          err(HV.numpy(), H @ V.numpy()) < 1e-5)
    t0 = time.perf_counter()
    for _ in range(20):
        h @ v
    print("note: h @ v through the open operator: %.3f ms per product (D = %d)"
          % ((time.perf_counter() - t0) / 20 * 1e3, D))
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(1.5)
    h2 = curvd.Hessian(m2, lf, (x, y))
    h.update(m2)  # the operator of the old values is rebuilt
    check("h @ v after update(model) = the new model's product", err(h @ v, h2 @ v) < 1e-12,
          "%.2e" % err(h @ v, h2 @ v))
    h.update(model)
    blk = [["0.weight", "0.bias"]]
    vb = np.random.default_rng(5).standard_normal(42)
    check("h.matvec(v, blocks=...) = the block of H", err(h.matvec(vb, blocks=blk),
                                                          H[:42, :42] @ vb) < 1e-5)
    ev = h.eigenvalues(k=2)["eigenvalues"]
    want = np.sort(np.linalg.eigvalsh(H))[::-1][:2]
    check("eigenvalues(k=2) = eigvalsh's top 2", err(np.array(ev), want) < 1e-4, str(ev))
    from scipy.sparse.linalg import eigsh
    top = eigsh(g, k=1, which="LA")[0][0]  # the object itself, as curvlinops' operators
    top2 = eigsh(g.linear_operator(), k=1, which="LA")[0][0]
    check("eigsh(h.linear_operator()) = eigsh(h)", abs(top - top2) < 1e-6 * abs(top),
          f"{top} {top2}")
    check("eigsh(h) = top GGN eigenvalue", abs(top - np.linalg.eigvalsh(G)[-1])
          < 1e-5 * abs(top), "%g" % top)
    loader = [(x[i:i + 5], y[i:i + 5]) for i in range(0, len(x), 5)]
    hl = curvd.Hessian(model, lf, loader)
    check("data as an iterable of batches = the concatenated batch",
          same(hl.trace(seed=1), h.trace(seed=1)) is None)
    r = curvd.analyze(model, lf, (x, y), op="trace", curvature="ggn", seed=1)
    check("analyze = GGN(...).trace", same(r, g.trace(seed=1)) is None)
    ph = curvd.pyhessian(model, lf, data=(x, y))
    t = ph.trace(maxIter=200, tol=0)
    se = np.std(t) / np.sqrt(len(t))
    check("pyhessian trace: 200 v^T H v values, mean within 3 stderr of tr(H)",
          len(t) == 200 and abs(np.mean(t) - np.trace(H)) < 3 * se,
          "%g vs %g (se %g)" % (np.mean(t), np.trace(H), se))
    ev, vecs = ph.eigenvalues(top_n=2, maxIter=500, tol=1e-6)
    shapes = [tuple(p.shape) for p in model.parameters()]
    check("pyhessian eigenvalues: 2 values, vectors shaped like the parameters",
          len(ev) == 2 and len(vecs) == 2 and [tuple(t.shape) for t in vecs[0]] == shapes and
          abs(ev[0] - want[0]) < 1e-3 * abs(want[0]), str(ev))
    nodes, weights = ph.density(iter=10, n_v=2)
    check("pyhessian density: n_v runs of iter nodes and weights",
          len(nodes) == 2 and all(len(n) == 10 for n in nodes) and len(weights) == 2 and
          all(abs(sum(w) - 1) < 1e-6 for w in weights))


def raises(name, exc, fn, test=lambda e: True):
    try:
        fn()
    except exc as e:  # noqa: B902
        return check(name, test(e), "%s: %s" % (type(e).__name__, e))
    except Exception as e:  # noqa: BLE001
        return check(name, False, "raised %s: %s" % (type(e).__name__, e))
    return check(name, False, "no exception")


def check_bad_input():
    model, lf, x, y = mlp_case()
    lstm = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LSTM(4, 3))
    raises("unsupported module: UnsupportedModuleError naming it", curvd.UnsupportedModuleError,
           lambda: curvd.Hessian(lstm, lf, (x, y)), lambda e: "LSTM" in str(e))
    xm = torch.empty(16, 5, device="meta")
    raises("a tensor on another device: ValueError naming x", ValueError,
           lambda: curvd.Data(xm, y), lambda e: "x" in str(e) and "meta" in str(e))
    raises("boolean y: ValueError naming y", ValueError,
           lambda: curvd.Data(x, y > 0), lambda e: str(e).startswith("y"))
    torch.manual_seed(5)
    bn = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4),
                             torch.nn.Linear(4, 3))  # training mode
    before = bn[1].running_mean.clone(), int(bn[1].num_batches_tracked)
    raises("a BatchNorm model in training mode: ValueError naming model.eval()", ValueError,
           lambda: curvd.Hessian(bn, lf, (x, y)), lambda e: "eval()" in str(e))
    check("... and its running statistics are untouched", torch.equal(
        bn[1].running_mean, before[0]) and int(bn[1].num_batches_tracked) == before[1] and
        bn.training)
    arch = curvd.Hessian(model, lf, (x, y)).architecture
    raises("x with the wrong feature count: a ValueError (CurvdError) naming x",
           ValueError, lambda: curvd.Curvature(architecture=arch,
                                               data=(torch.randn(16, 6), y)).run("loss"),
           lambda e: isinstance(e, curvd.CurvdError) and e.field == "x")
    g0 = curvd.Curvature(architecture=arch, data=(x, y))
    raises("update() without a torch model: ValueError", ValueError, lambda: g0.update())
    h = curvd.Hessian(model, lf, (x, y))
    raises("invalid option: CurvdError with the API's code and field", curvd.CurvdError,
           lambda: h.trace(max_probes=0),
           lambda e: e.code == "invalid_option" and e.field == "options.max_probes")
    raises("unknown op: CurvdError unknown_op", curvd.CurvdError, lambda: h.run("tracee"),
           lambda e: e.code == "unknown_op" and "trace" in e.message)
    yb = torch.full_like(y, 7)
    raises("label out of range: CurvdError on y", curvd.CurvdError,
           lambda: curvd.Hessian(model, lf, (x, yb)).trace(),
           lambda e: e.field == "y")
    raises("wrong parameter size: CurvdError shape_mismatch", curvd.CurvdError,
           lambda: h.model.set_tensor("0.weight", np.zeros(3)),
           lambda e: e.code == "shape_mismatch" and e.field == "0.weight")
    raises("NaN parameter: CurvdError non_finite", curvd.CurvdError,
           lambda: h.model.set_tensor("0.bias", np.full(7, np.nan)),
           lambda e: e.code == "non_finite")
    h.model.set_tensor("0.bias", np.zeros(7))
    check("set_tensor changes the model", h.run("loss")["loss"] != curvd.Hessian(
        model, lf, (x, y)).run("loss")["loss"])
    g = curvd.Hessian(model, lf, (x, y))
    del model  # the engine copied the parameters
    g @ np.ones(g.shape[0])  # an operator open on it
    g.model.close()  # closes the operator first
    raises("a closed model: ValueError, no crash", ValueError, lambda: g.trace())
    raises("a closed model's operator: ValueError, no crash", ValueError,
           lambda: g @ np.ones(g.shape[0]))
    lib = _lib.lib
    err = ctypes.c_void_p()
    rc = lib.curvd_run(None, None, b"{}", 2, None, ctypes.byref(err))
    e = _lib.error_from(err)
    check("C API: curvd_run(NULL, ...) fails with an error document",
          rc is None and e.code == "invalid_value", str(e))
    bad = b'{"input_shape": [3], "layers": [{"type": "Linear", "in_features": 4}]}'
    rc = lib.curvd_model_open(bad, len(bad), ctypes.byref(err))
    e = _lib.error_from(err)
    check("C API: a bad architecture names the field", rc is None and e.field.startswith(
        "layers[0]"), str(e))


def check_threads():
    """Distinct handles on distinct threads at once, and one model shared by concurrent
    runs (ctypes releases the GIL): the same results as one after the other."""
    import threading
    model, lf, x, y = mlp_case()
    hs = [curvd.Hessian(model, lf, (x, y)), curvd.GGN(model, lf, (x, y))]
    jobs = [(h, {"op": "eigen", "curvature": h.curvature, "seed": 5, "options": {"k": 2}})
            for h in hs] + [(hs[0], {"op": "trace", "curvature": "hessian", "seed": 6,
                                     "options": {"max_probes": 30, "tol": 0}})]
    want = [curvd.run(h.model, h.data, j) for h, j in jobs]
    got = [None] * len(jobs)

    def work(i):
        for _ in range(3):
            got[i] = curvd.run(jobs[i][0].model, jobs[i][0].data, jobs[i][1])

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    diffs = [same(w, g) for w, g in zip(want, got)]
    check("concurrent runs on three threads = sequential runs", all(d is None for d in diffs),
          str(diffs))
    # close() and update() from another thread wait for the running job (no crash)
    h = curvd.GGN(model, lf, (x, y))
    res = {}

    def long_job():
        try:
            res["r"] = h.density(lanczos_steps=60, runs=200)  # ~1 s here
        except Exception as e:  # noqa: BLE001
            res["r"] = e

    t = threading.Thread(target=long_job)
    t.start()
    # update() and close() once the job holds both handles (its run guards), not
    # at once: the thread may not have reached its run yet (a fast machine's
    # update() leaves it no GIL switch), and close() first makes it fail
    deadline = time.time() + 30
    while h.data._guard._runs == 0 and "r" not in res and time.time() < deadline:
        time.sleep(0.001)
    running = h.data._guard._runs > 0
    h.update(model)
    h.close()
    t.join()
    check("the job ran when update() and close() were called", running, str(res.get("r"))[:200])
    check("close()/update() while a job runs on another thread: the job finishes, then the "
          "handles close", isinstance(res.get("r"), dict) and "nodes" in res["r"],
          str(res.get("r"))[:200])
    raises("after close(): ValueError", ValueError, lambda: h.trace())


class Swapped(torch.nn.Module):
    """Registers b before a but calls a first: the engine's order (a, b) differs from
    model.parameters()'s (b, a)."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Linear(4, 3)
        self.a = torch.nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def check_order():
    """Vectors are in the engine's parameter order (param_names); split/join and
    pyhessian's eigenvectors map them to the model's names."""
    import copy
    torch.manual_seed(4)
    m = Swapped().eval()
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    lf = torch.nn.CrossEntropyLoss()
    h = curvd.Hessian(m, lf, (x, y))
    names = h.param_names
    check("param_names: the engine's order (a before b)", names[0].startswith("a.") and
          [n for n, _ in m.named_parameters()][0].startswith("b."), str(names))
    H = np.asarray(tr.dense_hessian(copy.deepcopy(m).double(), lf, x.double(), y))  # torch order
    torch_names = [n for n, _ in m.named_parameters()]
    sizes = {n: p.numel() for n, p in m.named_parameters()}
    offs, k = {}, 0
    for n in torch_names:
        offs[n] = k
        k += sizes[n]
    perm = np.concatenate([np.arange(offs[n], offs[n] + sizes[n]) for n in names])
    v = np.random.default_rng(3).standard_normal(len(perm))
    check("h @ v in the engine's order = torch's H permuted",
          np.abs(h @ v - H[np.ix_(perm, perm)] @ v).max() < 1e-5 * np.abs(H).max())
    parts = h.split(v)
    check("split/join round trip by name (float32 tensors)",
          np.allclose(h.join(parts), v, rtol=1e-6, atol=1e-7) and
          tuple(parts["a.weight"].shape) == (4, 5))
    ph = curvd.pyhessian(m, lf, data=(x, y))
    ev, vecs = ph.eigenvalues(top_n=1, maxIter=300, tol=1e-8)
    vt = torch.cat([t.reshape(-1) for t in vecs[0]]).double().numpy()  # torch order
    rq = vt @ H @ vt / (vt @ vt)
    check("pyhessian eigenvectors in model.parameters() order: Rayleigh quotient = eigenvalue",
          abs(rq - ev[0]) < 1e-3 * abs(ev[0]), f"{rq} vs {ev[0]}")


def check_overhead():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3))
    h = curvd.Hessian(m, torch.nn.CrossEntropyLoss(), (torch.randn(4, 4),
                                                       torch.randint(0, 3, (4,))))
    h.run("loss")
    t0 = time.perf_counter()
    for _ in range(200):
        h.run("loss")
    ms = (time.perf_counter() - t0) / 200 * 1e3
    print("note: in-process calling overhead, op loss on a 4-sample Linear: %.3f ms per job" % ms)
    check("in-process calling overhead of a tiny job below 5 ms (issue: <= 1 ms)", 0 < ms < 5,
          "%.3f ms" % ms)


def check_readme():
    code = readme_block("inproc-python")
    if not check("README has the inproc-python block", code is not None):
        return
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "clients", "python"))
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=ROOT)
    check("README inproc-python block runs", p.returncode == 0 and p.stdout.strip(),
          (p.stdout + p.stderr)[-800:])


def check_install():
    """`make python`'s recipe in a fresh virtual environment (offline, Debian's setuptools):
    the package with libcurvd.so copied in, imported from outside the clone.  The venv is
    made --without-pip and runs the system's pip through --system-site-packages: its own
    pip would need ensurepip, which Debian ships only in python3-venv (not a test dep)."""
    import shutil
    with tempfile.TemporaryDirectory() as t:
        src = os.path.join(t, "python")
        shutil.copytree(os.path.join(ROOT, "clients", "python"), src,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        shutil.copy(os.environ["CURVD_LIB"], os.path.join(src, "curvd", "libcurvd.so"))
        venv = os.path.join(t, "venv")
        steps = [[PY, "-m", "venv", "--without-pip", "--system-site-packages", venv],
                 [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q",
                  "--no-build-isolation", "--no-deps", "--no-index", src]]
        out = ""
        for cmd in steps:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=t)
            out += p.stdout + p.stderr
            if p.returncode:
                break
        shutil.rmtree(src)
        env = {k: v for k, v in os.environ.items() if k not in ("CURVD_LIB", "PYTHONPATH")}
        code = ("import curvd, curvd._lib as l, torch; m = torch.nn.Linear(3, 2); "
                "print(l.lib._name); print(curvd.GGN(m, torch.nn.MSELoss(), (torch.randn(4, 3), "
                "torch.randn(4, 2))).trace(seed=0)['trace'])")
        p = subprocess.run([os.path.join(venv, "bin", "python"), "-c", code], capture_output=True,
                           text=True, timeout=120, cwd=t, env=env)
        check("pip install clients/python (with libcurvd.so) in a venv: import curvd works",
              p.returncode == 0 and "site-packages/curvd/libcurvd.so" in p.stdout,
              (out + p.stdout + p.stderr)[-800:])


def check_side_by_side():
    """clients/python/examples/pyhessian_side_by_side.py --check: PyHessian's README calls on
    curvd and in plain torch agree up to estimator noise; the ESD plot is written."""
    with tempfile.TemporaryDirectory() as t:
        png = os.path.join(t, "esd.png")
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "clients", "python"))
        p = subprocess.run([PY, os.path.join(ROOT, "clients", "python", "examples",
                                             "pyhessian_side_by_side.py"), "--check", "--out",
                            png], capture_output=True, text=True, timeout=300, env=env)
        check("pyhessian_side_by_side.py --check: curvd = torch up to estimator noise, plot",
              p.returncode == 0 and os.path.getsize(png) > 1000 if os.path.exists(png) else False,
              (p.stdout + p.stderr)[-800:])


def main():
    check_install()
    check_side_by_side()
    check_numbers()
    check_torch()
    check_bad_input()
    check_threads()
    check_order()
    check_overhead()
    check_readme()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
