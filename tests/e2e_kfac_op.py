"""e2e_kfac_op.py - op "kfac" (issue 22) against Kronecker factors built in torch (float64).

Usage: /usr/bin/python3 tests/e2e_kfac_op.py build/curvd
The reference factors come from forward/backward hooks on the same weights and batch:
A from the layer inputs (with a 1 appended for the bias; Conv2d: the im2col patches),
B from the cotangents at the layer output of the loss Hessian's square-root columns
(type-2) or of the data gradients (empirical), with docs/interface.md's scaling, for
  - an MLP (Linear-Tanh-Linear-ReLU-Linear, CrossEntropyLoss mean, N = 8): type-2 and
    empirical; A, B (1e-5 relative), traces and factor eigenvalues; the block
    P (B (x) A) P^T in theta = [vec_r(W), b] order against curvd's dense ggn block at N = 1;
    mc at N = 1 against curvd's own dense fisher_mc block (same seed: same draws);
  - a CNN (Conv2d-ReLU-Flatten-Linear, N = 4), expand and reduce, type-2 and empirical;
  - option compare on the MLP: relative_frobenius_error 0 and newton_cosine 1 at N = 1,
    a positive error at N = 8, the Hutchinson path (--dense-max 10) near the exact error;
  - --vectors-out writes A and B as tensors layers.NAME.A / layers.NAME.B;
  - a Linear without bias and a BatchNorm1d (kind "exact") at N = 1;
  - data-parallel (mpirun -np 2, mc with compare): the same numbers as one process
    (1e-4: the shards sum the float32 products in another order).
Ends with 'N passed, M failed'.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, skip, summary  # noqa: E402

TOL = 1e-5


def layer_inputs_outputs(model, kinds):
    """Hooks recording each module of kinds' input and (retained-grad) output."""
    rec = {}

    def hook(name):
        def f(mod, inp, out):
            out.retain_grad()
            rec[name] = (mod, inp[0].detach(), out)
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, kinds)]
    return rec, hs


def loss_sqrt(h, y, scale):
    """S_n (N x C x C) with S_n S_n^T = scale * (diag(p) - p p^T) (CE)."""
    p = torch.softmax(h, dim=1)
    H = scale * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    w, Q = torch.linalg.eigh(H)
    return Q * w.clamp(min=0).sqrt()[:, None, :]


def patches(mod, x):
    """Conv2d im2col rows: N x R x (in*kh*kw) (+1 with a bias)."""
    cols = torch.nn.functional.unfold(x, mod.kernel_size, dilation=mod.dilation,
                                      padding=mod.padding, stride=mod.stride)
    a = cols.transpose(1, 2)
    if mod.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], a.shape[1], 1, dtype=a.dtype)], dim=2)
    return a


def ref_factors(model, x, y, fisher, approx):
    """{layer name: (A, B)} per docs/interface.md for CE mean."""
    N = x.shape[0]
    c = 1.0 / N
    rec, hs = layer_inputs_outputs(model, (torch.nn.Linear, torch.nn.Conv2d))
    h = model(x)
    for hk in hs:
        hk.remove()
    if fisher == "type-2":
        S = loss_sqrt(h.detach(), y, c)
        cots = [S[:, :, j] for j in range(S.shape[2])]
        w = 1.0
    else:  # empirical: g_n = dL_n/dh, B = (1/c) sum g g^T
        hd = h.detach().requires_grad_(True)
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(hd, y), hd)[0]
        cots = [g]
        w = 1.0 / c
    Bs = {n: 0 for n in rec}
    for cot in cots:
        outs = [rec[n][2] for n in rec]
        grads = torch.autograd.grad(h, outs, grad_outputs=cot, retain_graph=True)
        for n, gz in zip(rec, grads):
            if gz.dim() == 4:  # N x out x Hh x Ww -> N x R x out
                gz = gz.flatten(2).transpose(1, 2)
                b = gz.sum(1, keepdim=True) if approx == "reduce" else gz
            else:
                b = gz[:, None, :]
            b = b.reshape(-1, b.shape[-1])
            Bs[n] = Bs[n] + w * b.T @ b
    out = {}
    for n, (mod, a, _) in rec.items():
        if isinstance(mod, torch.nn.Conv2d):
            a = patches(mod, a)
            if approx == "reduce":
                a = a.mean(1)
            else:
                R = a.shape[1]
                a = a.reshape(-1, a.shape[-1]) / R ** 0.5
        elif mod.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        out[n] = (a.T @ a / N, Bs[n])
    return out


def theta_block(A, B, bias):
    """P (B (x) A) P^T in theta = [vec_r(W), b] order."""
    da, db = A.shape[0], B.shape[0]
    K = torch.kron(B, A)
    if not bias:
        return K
    idx = [o * da + i for o in range(db) for i in range(da - 1)] + \
          [o * da + da - 1 for o in range(db)]
    idx = torch.tensor(idx)
    return K[idx][:, idx]


def check_layers(tag, res, ref):
    lay = {l["name"]: l for l in res["layers"]}
    for n, (A, B) in ref.items():
        l = lay.get(n)
        if not check(f"{tag} layer {n} present and kronecker", l is not None
                     and l["kind"] == "kronecker", str(l and l.get("kind"))):
            continue
        Ac = torch.tensor(l["A"], dtype=torch.float64)
        Bc = torch.tensor(l["B"], dtype=torch.float64)
        check(f"{tag} {n} A", tr.rel(Ac, A) < TOL, f"rel {tr.rel(Ac, A):.2e}")
        check(f"{tag} {n} B", tr.rel(Bc, B) < TOL, f"rel {tr.rel(Bc, B):.2e}")
        ta, tb = float(A.trace()), float(B.trace())
        check(f"{tag} {n} traces", tr.close(l["trace_a"], ta, TOL) and tr.close(l["trace_b"], tb, TOL)
              and tr.close(l["trace"], ta * tb, TOL), f"{l['trace']} vs {ta * tb}")
        ea, eb = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(B)
        check(f"{tag} {n} eigenvalues", tr.rel(l["eigenvalues_a"], ea) < TOL
              and tr.rel(l["eigenvalues_b"], eb) < TOL and l["dim_a"] == A.shape[0]
              and l["dim_b"] == B.shape[0] and l["dim"] == A.shape[0] * B.shape[0],
              f"{tr.rel(l['eigenvalues_a'], ea):.2e} {tr.rel(l['eigenvalues_b'], eb):.2e}")


def mlp(n, seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4),
                            torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(n, 5)
    y = torch.randint(0, 3, (n,))
    return m, x, y


def cnn(n, seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 3))
    x = torch.randn(n, 2, 5, 5)
    y = torch.randint(0, 3, (n,))
    return m, x, y


def run_kfac(d, options, extra=()):
    return tr.curvd_run(CURVD, d, {"op": "kfac", "seed": 7, "options": options}, extra=extra)[1]


def dense_block(d, curv, params, options=None):
    job = {"op": "dense", "curvature": curv, "seed": 7, "blocks": [params]}
    if options:
        job["options"] = options
    r = tr.curvd_run(CURVD, d, job)[1]
    return torch.tensor(r["blocks"][0]["matrix"], dtype=torch.float64)


def check_mlp():
    loss = torch.nn.CrossEntropyLoss()
    for n in (8, 1):
        model, x, y = mlp(n, seed=n)
        with tempfile.TemporaryDirectory() as d:
            tr.write_case(d, model, [5], loss, x, y)
            m64 = model.double()
            for ft in ("type-2", "empirical"):
                res = run_kfac(d, {"fisher_type": ft})
                check(f"mlp N={n} {ft} echoes", res["fisher_type"] == ft
                      and res["kfac_approx"] == "expand" and len(res["layers"]) == 3)
                check_layers(f"mlp N={n} {ft}", res, ref_factors(m64, x.double(), y, ft, "expand"))
                if ft == "type-2":  # eigenvalues: false skips only the eigenvalues
                    bare = run_kfac(d, {"fisher_type": ft, "eigenvalues": False})
                    same = all(b["A"] == l["A"] and b["B"] == l["B"] and b["trace"] == l["trace"]
                               for b, l in zip(bare["layers"], res["layers"]))
                    check(f"mlp N={n} eigenvalues false: no eigenvalues, same factors",
                          same and all("eigenvalues_a" not in b and "eigenvalues_b" not in b
                                       for b in bare["layers"]), str(bare["layers"][0].keys()))
            if n == 1:
                check_n1(d, m64, x, y)
            else:
                res = run_kfac(d, {"compare": True, "return_factors": False})
                errs = [l["compare"]["relative_frobenius_error"] for l in res["layers"]]
                check("mlp N=8 compare: positive Frobenius errors", all(e > 1e-3 for e in errs)
                      and all(l["compare"]["frobenius_method"] == "exact" for l in res["layers"])
                      and "A" not in res["layers"][0], str(errs))
                hut = run_kfac(d, {"compare": True, "return_factors": False,
                                   "compare_probes": 200}, extra=("--dense-max", "10"))
                he = [l["compare"]["relative_frobenius_error"] for l in hut["layers"]]
                check("mlp N=8 compare hutchinson near exact",
                      all(l["compare"]["frobenius_method"] == "hutchinson" for l in hut["layers"])
                      and all(abs(a - b) < 0.3 * b for a, b in zip(he, errs)),
                      f"{he} vs {errs}")
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
                res = run_kfac(d, {}, extra=("--vectors-out", f.name))
                ts = tr.read_safetensors(f.name)
                ok = all(f"layers.{l['name']}.A" in ts and f"layers.{l['name']}.B" in ts
                         and l["A"]["tensor"] == f"layers.{l['name']}.A" for l in res["layers"])
                check(f"mlp N={n} --vectors-out A and B", ok, str(sorted(ts)))


def check_n1(d, m64, x, y):
    """N = 1: the Kronecker block equals the exact ggn / fisher_mc / ef block; compare."""
    for ft, curv, opts in (("type-2", "ggn", {}), ("empirical", "ef", {}),
                           ("mc", "fisher_mc", {"mc_samples": 3})):
        res = run_kfac(d, dict(opts, fisher_type=ft))
        for l in res["layers"]:
            K = theta_block(torch.tensor(l["A"], dtype=torch.float64),
                          torch.tensor(l["B"], dtype=torch.float64), True)
            F = dense_block(d, curv, l["params"], opts or None)
            check(f"mlp N=1 {ft} layer {l['name']}: P(B(x)A)P^T == dense {curv}",
                  tr.rel(K, F) < TOL, f"rel {tr.rel(K, F):.2e}")
    res = run_kfac(d, {"compare": True, "return_factors": False})
    for l in res["layers"]:
        cp = l["compare"]
        check(f"mlp N=1 compare layer {l['name']}",
              cp["relative_frobenius_error"] < TOL and abs(cp["newton_cosine"] - 1) < TOL
              and abs(cp["top_eigenvalue_ratio"] - 1) < 1e-4 and cp["curvature"] == "ggn",
              str(cp))


def check_cnn():
    loss = torch.nn.CrossEntropyLoss()
    model, x, y = cnn(4, seed=3)
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [2, 5, 5], loss, x, y)
        m64 = model.double()
        for approx in ("expand", "reduce"):
            for ft in ("type-2", "empirical"):
                res = run_kfac(d, {"fisher_type": ft, "kfac_approx": approx})
                check(f"cnn {ft} {approx} echoes", res["kfac_approx"] == approx
                      and [l["kind"] for l in res["layers"]] == ["kronecker", "kronecker"])
                check_layers(f"cnn {ft} {approx}", res, ref_factors(m64, x.double(), y, ft, approx))


def check_mixed():
    """A Linear without bias, BatchNorm1d (no Kronecker structure: kind exact), N = 1."""
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5, bias=False), torch.nn.BatchNorm1d(5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 3)).eval()
    x, y = torch.randn(1, 4), torch.randint(0, 3, (1,))
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [4], torch.nn.CrossEntropyLoss(), x, y)
        res = run_kfac(d, {"compare": True})
        kinds = [(l["name"], l["kind"], l.get("bias")) for l in res["layers"]]
        check("mixed: layer kinds in model order", kinds == [("0", "kronecker", False),
                                                          ("1", "exact", None),
                                                          ("3", "kronecker", True)], str(kinds))
        l0 = res["layers"][0]
        K = theta_block(torch.tensor(l0["A"], dtype=torch.float64),
                        torch.tensor(l0["B"], dtype=torch.float64), False)
        F = dense_block(d, "ggn", l0["params"])
        check("mixed: no-bias layer block == dense ggn at N = 1", tr.rel(K, F) < TOL
              and l0["compare"]["relative_frobenius_error"] < TOL, f"rel {tr.rel(K, F):.2e}")


def check_errors():
    model, x, y = mlp(2, seed=0)
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [5], torch.nn.CrossEntropyLoss(), x, y)
        rc, err = tr.curvd_run(CURVD, d, {"op": "kfac", "options": {"damping": 1.0}},
                               expect_ok=False)
        check("damping without compare refused", rc != 0
              and err.get("error", {}).get("field") == "options.damping", str(err))
        rc, err = tr.curvd_run(CURVD, d, {"op": "kfac", "options": {"fisher_type": "type-1"}},
                               expect_ok=False)
        check("unknown fisher_type refused", rc != 0, str(err))


def first_json(text):
    """The first JSON object of a rank-0 stdout (mpirun may add lines)."""
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


def check_mpi():
    mpirun = shutil.which("mpirun")
    if not mpirun or not os.path.exists(os.path.join(os.path.dirname(CURVD), "curvd-mpi.so")):
        skip("kfac under mpirun", "mpirun or build/curvd-mpi.so missing")
        return
    model, x, y = mlp(6, seed=5)
    job = {"op": "kfac", "seed": 3, "options": {"fisher_type": "mc", "mc_samples": 2,
                                                "compare": True}}
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [5], torch.nn.CrossEntropyLoss(), x, y)
        one = tr.curvd_run(CURVD, d, job)[1]
        args = ("arch.json", "params.safetensors", "data.safetensors")
        p = subprocess.run([mpirun, "--oversubscribe", "--allow-run-as-root", "-np", "2", CURVD,
                            "run", "--arch", os.path.join(d, args[0]),
                            "--params", os.path.join(d, args[1]),
                            "--data", os.path.join(d, args[2]),
                            "--job", os.path.join(d, "job.json")],
                           capture_output=True, text=True, timeout=120)
        if not check("kfac under mpirun -np 2 runs", p.returncode == 0, p.stderr[-500:]):
            return
        two = first_json(p.stdout)
        worst = 0.0
        for a, b in zip(one["layers"], two["layers"]):
            worst = max(worst, tr.rel(b["A"], a["A"]), tr.rel(b["B"], a["B"]))
            for k in ("relative_frobenius_error", "top_eigenvalue_ratio", "newton_cosine"):
                worst = max(worst, abs(a["compare"][k] - b["compare"][k]) / abs(a["compare"][k]))
        check("kfac mc + compare: 2 ranks == one process", two.get("ranks") == 2 and worst < 1e-4,
              f"worst rel {worst:.2e}")


def main():
    check_mpi()
    check_mlp()
    check_cnn()
    check_mixed()
    check_errors()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
