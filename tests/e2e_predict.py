"""e2e_predict.py - op "predict" (issue 23, item 2) against torch in float64.

Usage: /usr/bin/python3 tests/e2e_predict.py build/curvd
The posterior is op laplace's (tests/laplace_ref.py's Ref: G_sum, the KFAC factors built
in torch, the layer blocks); the predictive is the linearized (GLM) one of laplace-torch:
mean f(x), covariance J_n P^-1 J_n^T with J_n the output Jacobian formed by torch autograd
and P formed densely (full: g G + P0; diag: g diag(G) + P0; kron: the blocks
g P (B (x) A) P^T + delta_b I; lowrank: V diag(g lam) V^T + P0 with the dense top-k;
last_layer: the last layer's), g = 1 / (sigma^2 T). Cases: an MLP classifier
(CrossEntropyLoss), an MLP regressor (MSELoss) and a two-output Bernoulli MLP
(BCEWithLogitsLoss):
  - mean, variance, covariance on the job's batch for every structure, per-block prior,
    temperature, sigma_noise; options.x (other inputs: no targets, no metrics);
  - probs: the probit formula on curvd's own mean and variance, and on torch's;
  - mc_probs: against a torch Monte Carlo estimate of E[softmax(f)], f ~ N(mean, cov),
    with 40x the draws (within 6 standard errors), the same for the same seed;
  - nll, accuracy, ece (10 bins) against numpy on the probit probabilities (regression:
    the Gaussian predictive N(mean, variance + sigma^2));
  - optimize_prior: the prior precision of op laplace's optimum;
  - posterior_samples (full, diag, kron, last_layer kron): whitened by P's Cholesky factor
    (L^T (theta_s - theta)), their mean ~ 0 and covariance ~ I (loose, 4000 draws);
  - CrossEntropyLoss with reduction sum (full, kron);
  - refusals (400 with the field): a classifier with several class positions per sample,
    return_covariance with too many outputs, options.x of the wrong size, samples out of
    range, posterior samples with lowrank or too many, sigma_noise with a classifier; at
    submit under curvd serve.
Ends with 'N passed, M failed'.
"""
import math
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import laplace_ref as lr  # noqa: E402
import torchref as tr  # noqa: E402
from e2e_lib import Daemon, check, summary  # noqa: E402

TOL = 2e-4


def predict(d, options, expect_ok=True, seed=3):
    return lr.run_op(d, "predict", options, expect_ok, seed)


def precision(ref, structure, deltas, **kw):
    return ref.precision(structure, deltas, **kw)


def ref_predictive(ref, X, structure, deltas, **kw):
    P, sl = precision(ref, structure, deltas, **kw)
    J = lr.jacobian(ref.m64, X)[:, :, sl]
    S = J @ torch.linalg.solve(P, J.transpose(1, 2))
    with torch.no_grad():
        f = ref.m64(X)
    return f, S


def arr(v):
    return torch.tensor(v, dtype=torch.float64)


def rel_to_max(a, b):
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def probit(mean, var, bce):
    z = mean / torch.sqrt(1 + math.pi / 8 * var)
    return torch.sigmoid(z) if bce else torch.softmax(z, dim=-1)


def check_predictive(tag, d, ref, structure, deltas, X=None, **kw):
    opts = {"structure": structure, "prior_precision": deltas if len(deltas) > 1 else deltas[0],
            "return_covariance": True}
    inner = structure
    if structure.startswith("last_layer"):
        opts["structure"] = "last_layer"
        inner = structure.split(":")[1] if ":" in structure else "full"
        if inner != "full":
            opts["last_layer_structure"] = inner
    if inner == "lowrank":
        opts["k"] = 6
    for key, name in (("sigma", "sigma_noise"), ("T", "temperature")):
        if key in kw:
            opts[name] = kw[key]
    if X is not None:
        opts["x"] = X.reshape(-1).tolist()
    r = predict(d, opts)
    f, S = ref_predictive(ref, ref.x if X is None else X.double(), inner, deltas,
                          last=structure.startswith("last_layer"), **kw)
    mean, var, cov = arr(r["mean"]), arr(r["variance"]), arr(r["covariance"])
    check(f"{tag} {structure}: mean = f(x)", tr.rel(mean, f) < 1e-5, f"{tr.rel(mean, f)}")
    e = rel_to_max(cov, S)
    check(f"{tag} {structure}: covariance = J P^-1 J^T", e < TOL, f"rel err {e}")
    e = rel_to_max(var, torch.diagonal(S, dim1=1, dim2=2))
    check(f"{tag} {structure}: variance = diag(J P^-1 J^T)", e < TOL
          and torch.equal(var, torch.diagonal(cov, dim1=1, dim2=2)), f"rel err {e}")
    return r, f, S


def check_probs(tag, r, f, S, bce):
    mean, var = arr(r["mean"]), arr(r["variance"])
    probs = arr(r["probs"])
    own = probit(mean, var, bce)
    want = probit(f, torch.diagonal(S, dim1=1, dim2=2), bce)
    check(f"{tag}: probs = probit formula on mean/variance (and on torch's)",
          float((probs - own).abs().max()) < 1e-12 and float((probs - want).abs().max()) < 1e-5,
          f"{float((probs - own).abs().max())} {float((probs - want).abs().max())}")


def check_mc(tag, d, ref, bce, structure="full"):
    S_ = 20000
    r = predict(d, {"structure": structure, "samples": S_, "prior_precision": 0.5})
    r2 = predict(d, {"structure": structure, "samples": S_, "prior_precision": 0.5})
    f, S = ref_predictive(ref, ref.x, structure, [0.5])
    torch.manual_seed(11)
    M = 40 * S_
    L = torch.linalg.cholesky(S + 1e-12 * torch.eye(S.shape[1], dtype=torch.float64))
    acc = torch.zeros_like(f)
    for _ in range(8):
        z = torch.randn(M // 8, *f.shape, dtype=torch.float64)
        h = f + torch.einsum("nij,snj->sni", L, z)
        acc += (torch.sigmoid(h) if bce else torch.softmax(h, dim=-1)).sum(0)
    want = acc / M
    mc = arr(r["mc_probs"])
    se = torch.sqrt(want * (1 - want) / S_) + 1e-4
    z = float(((mc - want).abs() / se).max())
    check(f"{tag}: mc_probs within 6 standard errors of a 40x Monte Carlo in torch", z < 6,
          f"max |z| {z}")
    probs = arr(r["probs"])
    check(f"{tag}: mc_probs rows are probabilities; seeded (the same twice); 'samples' echoed",
          (bce or float((mc.sum(1) - 1).abs().max()) < 1e-9) and r["mc_probs"] == r2["mc_probs"]
          and r.get("samples") == S_ and float((mc - probs).abs().max()) < 0.2,
          f"{r.get('samples')}")


def ece10(conf, correct):
    b = np.clip(np.floor(conf * 10).astype(int), 0, 9)
    return sum(abs((correct[b == i] - conf[b == i]).sum()) for i in range(10)) / len(conf)


def check_metrics(tag, r, ref, kind, sigma=1.0):
    if kind == "reg":
        mean, var = np.array(r["mean"]), np.array(r["variance"]) + sigma * sigma
        y = ref.y.numpy()
        want = np.mean(np.sum(0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var), axis=1))
        check(f"{tag}: nll of the Gaussian predictive (variance + sigma^2); no accuracy/ece",
              tr.close(r.get("nll"), want, 1e-9, 1e-12) and "accuracy" not in r
              and "ece" not in r and "probs" not in r, f"{r.get('nll')} vs {want}")
        return
    p = np.array(r["probs"])
    if kind == "bce":
        y = ref.y.numpy()
        nll = -np.mean(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p), axis=1))
        pred = (p > 0.5).astype(float)
        correct = (pred == (y > 0.5)).astype(float).ravel()
        conf = np.maximum(p, 1 - p).ravel()
    else:
        y = ref.y.numpy()
        nll = -np.mean(np.log(p[np.arange(len(y)), y]))
        correct = (p.argmax(1) == y).astype(float)
        conf = p.max(1)
    acc, ece = correct.mean(), ece10(conf, correct)
    check(f"{tag}: nll, accuracy, ece (10 bins) against numpy on probs",
          tr.close(r.get("nll"), nll, 1e-9, 1e-12) and tr.close(r.get("accuracy"), acc, 1e-12)
          and tr.close(r.get("ece"), ece, 1e-9, 1e-12),
          f"{r.get('nll')} {r.get('accuracy')} {r.get('ece')} vs {nll} {acc} {ece}")


def check_case(tag, d, ref, kind):
    bce = kind == "bce"
    per = [0.3, 2.0, 7.0][:len(ref.dims)]
    sig = {"sigma": 0.5} if kind == "reg" else {}
    for st in ("full", "diag", "kron", "lowrank", "last_layer", "last_layer:kron",
               "last_layer:diag"):
        r, f, S = check_predictive(f"{tag}", d, ref, st, [0.7], **sig)
        if kind != "reg":
            check_probs(f"{tag} {st}", r, f, S, bce)
        if st == "full":
            check_metrics(f"{tag} {st}", r, ref, kind, **({"sigma": 0.5} if sig else {}))
    for st in ("full", "kron", "lowrank"):
        check_predictive(f"{tag} per-block prior", d, ref, st, per, T=0.5, **sig)
    torch.manual_seed(9)
    X = torch.randn(7, ref.x.shape[1])
    r, f, S = check_predictive(f"{tag} options.x", d, ref, "kron", [0.7], X=X, **sig)
    check(f"{tag} options.x: 7 rows, no metrics without targets", len(r["mean"]) == 7
          and "nll" not in r and "accuracy" not in r, str(list(r))[:200])
    if kind != "reg":
        check_probs(f"{tag} options.x", r, f, S, bce)
        check_mc(f"{tag}", d, ref, bce)
    # optimize_prior: op laplace's optimum
    for st in ("kron", "full"):
        opts = {"structure": st, "optimize_prior": True}
        if kind == "reg":
            opts["optimize_sigma"] = True
        r = predict(d, opts)
        rl = lr.run_op(d, "laplace", opts)
        ok = tr.close(r.get("prior_precision"), rl.get("prior_precision"), 1e-6)
        if kind == "reg":
            ok = ok and tr.close(r.get("sigma_noise"), rl.get("sigma_noise"), 1e-6)
        check(f"{tag} {st} optimize_prior: laplace's optimum", ok,
              f"{r.get('prior_precision')} {r.get('sigma_noise')} vs "
              f"{rl.get('prior_precision')} {rl.get('sigma_noise')}")
        want = ref_predictive(ref, ref.x, st, [r["prior_precision"]],
                              sigma=r["sigma_noise"])[1]
        e = rel_to_max(arr(r["variance"]), torch.diagonal(want, dim1=1, dim2=2))
        check(f"{tag} {st} optimize_prior: the variance at the optimum", e < TOL, f"{e}")


def check_samples(tag, d, ref):
    n = 4000
    for st in ("full", "diag", "kron", "last_layer:kron"):
        last = st.startswith("last_layer")
        inner = st.split(":")[1] if last else st
        opts = {"structure": "last_layer" if last else st, "prior_precision": 0.7,
                "samples": n, "return_posterior_samples": True}
        if last:
            opts["last_layer_structure"] = inner
        r = predict(d, opts)
        P, sl = precision(ref, inner, [0.7], last=last)
        th = arr(r["posterior_samples"]) - ref.theta[sl]
        L = torch.linalg.cholesky(P)
        w = th @ L
        C = w.T @ w / n
        eye = torch.eye(C.shape[0], dtype=torch.float64)
        err, mean = float((C - eye).abs().max()), float(w.mean(0).abs().max())
        tr_err = abs(float(torch.trace(C)) / C.shape[0] - 1)
        names = [nm for nm, _ in ref.m64.named_parameters()]
        check(f"{tag} posterior_samples {st}: whitened ~ N(0, I) (|cov - I| {err:.3f}, "
              f"|mean| {mean:.3f}, trace {tr_err:.4f})", th.shape == (n, P.shape[0])
              and err < 0.15 and mean < 0.1 and tr_err < 0.03
              and r.get("posterior_params") == names[-2 if last else 0:], "")


def check_refusals(root, d_cls, d_reg):
    torch.manual_seed(4)
    wide = torch.nn.Sequential(torch.nn.Linear(2, 300))
    dw = os.path.join(root, "wide")
    os.makedirs(dw)
    tr.write_case(dw, wide, [2], torch.nn.CrossEntropyLoss(), torch.randn(8, 2),
                  torch.randint(0, 300, (8,)))
    seq = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1))  # [3 classes, 4 positions]
    ds = os.path.join(root, "seq")
    os.makedirs(ds)
    tr.write_case(ds, seq, [2, 4], torch.nn.CrossEntropyLoss(), torch.randn(8, 2, 4),
                  torch.randint(0, 3, (8, 4)))
    cases = [
        (ds, {}, "model", "invalid_model"),
        (dw, {"structure": "diag", "return_covariance": True}, "options.return_covariance",
         "too_large"),
        (dw, {"structure": "diag", "return_posterior_samples": True, "samples": 100000},
         "options.samples", "too_large"),
        (d_cls, {"x": [0.1] * 7}, "options.x", "invalid_option"),
        (d_cls, {"x": []}, "options.x", "invalid_option"),
        (d_cls, {"samples": 0}, "options.samples", "invalid_option"),
        (d_cls, {"samples": 100001}, "options.samples", "invalid_option"),
        (d_cls, {"structure": "lowrank", "return_posterior_samples": True},
         "options.return_posterior_samples", "invalid_option"),
        (d_cls, {"sigma_noise": 0.5}, "options.sigma_noise", "invalid_option"),
        (d_cls, {"prior_precision": [1.0, 2.0]}, "options.prior_precision", "invalid_option"),
        (d_reg, {"temperature": 0}, "options.temperature", "invalid_option"),
    ]
    for d, opts, field, code in cases:
        rc, r = predict(d, opts, expect_ok=False)
        err = r.get("error", {})
        check(f"refused {str(opts)[:60]}: {code} at {field}", rc != 0
              and err.get("field") == field and err.get("code") == code, str(r)[:300])


def check_service():
    """Under curvd serve (demo-mlp on digits: 64 inputs, 10 classes): options.x of the wrong
    size is a 400 at submit; a kron predict on two inline digits and on a batch run."""
    m = {"op": "predict", "model": "demo-mlp", "dataset": "digits",
         "batch": {"offset": 0, "size": 64}}
    with Daemon() as dmn:
        st, r = lr.post(dmn.url, dict(m, options={"x": [0.0] * 65}))
        check("service: options.x of 65 numbers refused at submit (400, options.x)", st == 400
              and r.get("error", {}).get("field") == "options.x", f"{st} {r}")
        st, r = lr.post(dmn.url, dict(m, options={"x": [0.0] * 128, "optimize_prior": True}))
        res = r.get("result", {})
        check("service: predict on options.x (2 digits) succeeds", st in (200, 201)
              and len(res.get("probs", [])) == 2 and len(res["probs"][0]) == 10,
              f"{st} {str(r)[:300]}")
        st, r = lr.post(dmn.url, dict(m, options={"structure": "last_layer"}))
        res = r.get("result", {})
        check("service: predict on the batch has nll, accuracy, ece", st in (200, 201)
              and len(res.get("mean", [])) == 64 and 0 <= res.get("ece", -1) <= 1
              and 0 <= res.get("accuracy", -1) <= 1, f"{st} {str(r)[:300]}")


def main():
    with tempfile.TemporaryDirectory() as root:
        dirs = {}
        for name, (m, x, y, loss) in (("cls", lr.classifier("mean")), ("reg", lr.regressor()),
                                      ("bce", lr.bernoulli())):
            d = os.path.join(root, name)
            os.makedirs(d)
            tr.write_case(d, m, list(x.shape[1:]), loss, x, y)
            dirs[name] = (d, lr.Ref(m, x, y, loss))
        for name, tag in (("cls", "CE"), ("reg", "MSE"), ("bce", "BCE")):
            check_case(tag, dirs[name][0], dirs[name][1], name)
        # CrossEntropyLoss with reduction sum: ggn_factor 1, the same posterior
        m, x, y, loss = lr.classifier("sum")
        d = os.path.join(root, "sum")
        os.makedirs(d)
        tr.write_case(d, m, list(x.shape[1:]), loss, x, y)
        ref = lr.Ref(m, x, y, loss)
        for st in ("full", "kron"):
            r, f, S = check_predictive("CE sum", d, ref, st, [0.7])
            check(f"CE sum {st}: ggn_factor 1", r.get("ggn_factor") == 1, str(r.get("ggn_factor")))
        check_samples("CE", *dirs["cls"])
        check_refusals(root, dirs["cls"][0], dirs["reg"][0])
    check_service()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
