"""e2e_acp.py - newton method "acp" (issue 22: George's amortized covariance preconditioner,
thesis sections 6.3.2-6.4.2) through `curvd run`, against torch in float64.

Per Kronecker layer the curvature is F~ = A (x) alpha I_out (A: KFAC's input factor with the
bias 1 appended, (1/N) sum_n a~_n a~_n^T; Conv2d expand: the im2col patches, 1/(N R)), so
with damping lam the step is s = -(F~ + lam I)^-1 g, i.e. S = -(1/alpha) G~ (A + lam/alpha I)^-1
on W~ = [W | b].  Checks:
  - MLP (Linear 6-12-8-3, Tanh/ReLU, CrossEntropyLoss mean, N = 32) and a CNN (Conv2d(2,3,3)
    -ReLU-Flatten-Linear, N = 6, kfac_approx expand): the step = numpy's dense solve of
    (blockdiag P (alpha I (x) A) P^T + lam I) s = -g with A from torch's layer inputs and g
    torch's gradient; predicted_change = g^T s + s^T F~ s / 2; actual_change = torch's loss
    change; "acp_alpha" lists every Kronecker layer;
  - alpha "max" (default) = (N / c) max_{n, r, j} (dL_n/dz_nr)_j^2 = for mean CE the max over
    samples (positions) and outputs of torch's per-sample gradients (d l_n / d z)^2;
    a numeric acp_alpha is used as given;
  - George's centered update (6.3.3 / 6.3.4) when lam -> 0 (Tanh MLP, A invertible): the
    weight part = -(1/alpha)(1/n) sum_j dl_j (h_j - hbar)^T C^-1 (C the centered covariance),
    the bias part = -(1/alpha)(1/n) sum_j dl_j - S_W hbar;
  - rescale: alpha* = -s^T g / s^T G s with curvd's dense ggn; blocks "layer" = the full step;
    micro_batch 7 (5 micro-batches) = one batch (alpha: the max over the micro-batches);
    curvature omitted / kfac / ggn accepted (result "curvature": "kfac");
  - refusals (400 invalid_option): acp_alpha 0, negative, a string other than "max";
    acp_alpha with method kfac; damping_mode with acp; curvature hessian (invalid_curvature).
Usage: /usr/bin/python3 tests/e2e_acp.py build/curvd.  Ends with 'N passed, M failed'.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402

torch.set_num_threads(1)


def mlp(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), act(),
                         nn.Linear(8, 3)).eval()


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4)).eval()


def write_case(d, model, x, y):
    arch, params = export_model(model, nn.CrossEntropyLoss(), list(x.shape[1:]), 1, x)
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch, f)
    with open(os.path.join(d, "params.safetensors"), "wb") as f:
        f.write(params)
    with open(os.path.join(d, "data.safetensors"), "wb") as f:
        f.write(export_dataset(x, y))


def run(d, job):
    """`curvd run` on the case in d: (rc, result or error)."""
    return tr.curvd_run(CURVD, d, job, expect_ok=False)


def ok_run(d, name, job):
    rc, r = run(d, job)
    check(f"{name}: runs", rc == 0, str(r)[:300])
    return r if rc == 0 else None


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def theta_perm(n_in, n_out):
    """Row-major W~ = [W | b] coordinate -> theta = [vec_r(W), b] index (as e2e_kron.py)."""
    idx = []
    for o in range(n_out):
        idx += [o * n_in + j for j in range(n_in)] + [n_out * n_in + o]
    return np.array(idx)


class Ref:
    """torch float64 reference quantities of a Sequential of Linear / Conv2d layers with
    mean CrossEntropyLoss: per Kronecker layer its inputs a~ (rows: samples x positions),
    the output cotangents g = dL/dz (same rows), A, George's alpha; the gradient g."""

    def __init__(self, model, x, y):
        self.model = model.double()
        self.x, self.y = x.double(), y
        self.N = len(x)
        self.layers = [m for m in self.model if isinstance(m, (nn.Linear, nn.Conv2d))]
        ins, outs = {}, {}
        hooks = []
        for i, m in enumerate(self.layers):
            def fh(mod, inp, out, i=i):
                ins[i] = inp[0].detach()
                out.retain_grad()
                outs[i] = out
            hooks.append(m.register_forward_hook(fh))
        self.model.zero_grad()
        loss = nn.CrossEntropyLoss()(self.model(self.x), y)
        loss.backward()
        for h in hooks:
            h.remove()
        self.loss = float(loss)
        self.g = np.concatenate([torch.cat([m.weight.grad.reshape(-1), m.bias.grad.reshape(-1)])
                                 .numpy() for m in self.layers])
        self.A, self.rows, self.cot, self.R = [], [], [], []
        for i, m in enumerate(self.layers):
            if isinstance(m, nn.Conv2d):
                P = nn.functional.unfold(ins[i], m.kernel_size)  # N x (in kh kw) x R
                a = P.transpose(1, 2).reshape(-1, P.shape[1])
                gz = outs[i].grad.reshape(self.N, m.out_channels, -1).transpose(1, 2)
                gz = gz.reshape(-1, m.out_channels)
                R = P.shape[2]
            else:
                a, gz, R = ins[i], outs[i].grad, 1
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1).numpy()
            self.rows.append(a)
            self.cot.append(gz.numpy())
            self.R.append(R)
            self.A.append(a.T @ a / (self.N * R))
        # George: alpha = max (d l_n / d z)^2 with l_n the per-sample loss; for mean CE,
        # L_n = l_n / N, so d l_n / dz = N dL/dz: (N / c) max g^2 with c = 1/N
        self.alpha_max = [float(np.max((self.N * c) ** 2)) for c in self.cot]

    def per_sample_alpha(self):
        """The same max from per-sample losses l_n (one backward per sample)."""
        best = [0.0] * len(self.layers)
        for n in range(self.N):
            outs = {}
            hooks = []
            for i, m in enumerate(self.layers):
                def fh(mod, inp, out, i=i):
                    out.retain_grad()
                    outs[i] = out
                hooks.append(m.register_forward_hook(fh))
            ln = nn.CrossEntropyLoss(reduction="sum")(self.model(self.x[n:n + 1]),
                                                       self.y[n:n + 1])
            ln.backward()
            for h in hooks:
                h.remove()
            for i in range(len(self.layers)):
                best[i] = max(best[i], float(outs[i].grad.pow(2).max()))
        self.model.zero_grad()
        return best

    def dims(self, i):
        return self.A[i].shape[0], self.cot[i].shape[1]

    def F(self, alphas):
        """blockdiag P (alpha I (x) A) P^T in theta order."""
        D = len(self.g)
        F, o = np.zeros((D, D)), 0
        for i, al in enumerate(alphas):
            da, db = self.dims(i)
            K = np.kron(al * np.eye(db), self.A[i])
            p = theta_perm(da - 1, db)
            T = np.zeros_like(K)
            T[np.ix_(p, p)] = K
            F[o:o + da * db, o:o + da * db] = T
            o += da * db
        return F

    def loss_at(self, step):
        with torch.no_grad():
            o = 0
            saved = []
            for m in self.layers:
                saved.append((m.weight.clone(), m.bias.clone()))
                nw, nb = m.weight.numel(), m.bias.numel()
                m.weight += torch.tensor(step[o:o + nw]).reshape(m.weight.shape)
                m.bias += torch.tensor(step[o + nw:o + nw + nb])
                o += nw + nb
            L = float(nn.CrossEntropyLoss()(self.model(self.x), self.y))
            for m, (w, b) in zip(self.layers, saved):
                m.weight.copy_(w)
                m.bias.copy_(b)
        return L


def check_step(d, tag, ref, lam, extra=None, tol=2e-5):
    opts = dict({"method": "acp", "damping": lam, "actual_change": True}, **(extra or {}))
    r = ok_run(d, f"{tag} newton acp", {"op": "newton", "options": opts})
    if not r:
        return None
    al = [a["alpha"] for a in r.get("acp_alpha", [])]
    check(f"{tag}: acp_alpha lists every Kronecker layer",
          len(al) == len(ref.layers) and all(a > 0 for a in al), str(r.get("acp_alpha")))
    if len(al) != len(ref.layers):
        return r
    F = ref.F(al)
    s = np.array(r["step"])
    want = np.linalg.solve(F + lam * np.eye(len(F)), -ref.g)
    check(f"{tag}: step = -(A (x) alpha I + lam I)^-1 g (dense, torch's A and g)",
          rel(s, want) < tol, f"rel {rel(s, want):.2e}")
    pc = ref.g @ s + 0.5 * s @ F @ s
    check(f"{tag}: predicted_change = g^T s + s^T F~ s / 2",
          abs(r["predicted_change"] - pc) <= 1e-5 * abs(pc), f"{r['predicted_change']} vs {pc}")
    ac = ref.loss_at(s) - ref.loss
    check(f"{tag}: actual_change = torch's loss change",
          abs(r.get("actual_change", np.nan) - ac) <= 1e-4 * max(abs(ac), 1e-3),
          f"{r.get('actual_change')} vs {ac}")
    check(f"{tag}: result fields", r.get("method") == "acp" and r.get("curvature") == "kfac"
          and r.get("damping") == lam and r.get("exact") is True
          and r.get("damping_mode") == "exact", str({k: r.get(k) for k in
                                                    ("method", "curvature", "exact")}))
    return r


def check_mlp(d):
    g = torch.Generator().manual_seed(3)
    N = 32
    x = torch.randn(N, 6, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    model = mlp()
    write_case(d, model, x, y)
    ref = Ref(model, x, y)
    lam = 0.01
    r = check_step(d, "MLP", ref, lam)
    if r:
        al = [a["alpha"] for a in r["acp_alpha"]]
        check("MLP: alpha max = (N/c) max (dL_n/dz)^2 (torch)", rel(al, ref.alpha_max) < 1e-5,
              f"{al} vs {ref.alpha_max}")
        ps = ref.per_sample_alpha()
        check("MLP: alpha max = max over samples and outputs of (d l_n/dz)^2 (per-sample "
              "losses)", rel(al, ps) < 1e-5, f"{al} vs {ps}")
        check("MLP: acp_alpha names the layers",
              [a["name"] for a in r["acp_alpha"]] == ["0", "2", "4"],
              str([a["name"] for a in r["acp_alpha"]]))
    rn = check_step(d, "MLP alpha 2.5", ref, lam, {"acp_alpha": 2.5})
    if rn:
        check("MLP: numeric acp_alpha used as given",
              [a["alpha"] for a in rn["acp_alpha"]] == [2.5] * 3, str(rn["acp_alpha"]))
    if r:
        # rescale: alpha* = -s^T g / s^T G s with the dense ggn
        rr = ok_run(d, "MLP acp rescale", {"op": "newton", "options": {
            "method": "acp", "damping": lam, "rescale": True}})
        rG = ok_run(d, "MLP dense ggn", {"op": "dense", "curvature": "ggn"})
        if rr and rG:
            s0 = np.array(r["step"])
            G = np.array(rG["matrix"])
            a = -(s0 @ ref.g) / (s0 @ G @ s0)
            check("MLP acp rescale: alpha = -s^T g / s^T G s (ggn), step alpha s",
                  abs(rr["alpha"] - a) <= 1e-5 * abs(a) and
                  rel(rr["step"], a * s0) < 1e-5, f"{rr.get('alpha')} vs {a}")
        rb = ok_run(d, "MLP acp blocks layer", {"op": "newton", "blocks": "layer",
                                                "options": {"method": "acp", "damping": lam}})
        if rb:
            st = np.concatenate([b["step"] for b in rb["blocks"]])
            check("MLP acp blocks layer = the full step, one alpha per block",
                  rel(st, r["step"]) < 1e-12 and
                  [b["acp_alpha"][0]["alpha"] for b in rb["blocks"]] ==
                  [a["alpha"] for a in r["acp_alpha"]], f"rel {rel(st, r['step']):.1e}")
        rm = ok_run(d, "MLP acp micro-batched", {"op": "newton", "micro_batch": 7,
                                                 "options": {"method": "acp", "damping": lam}})
        if rm:
            check("MLP acp micro_batch 7 (5 micro-batches) = one batch: alphas (max over the "
                  "micro-batches) and step",
                  rm.get("micro_batches") == 5 and
                  rel([a["alpha"] for a in rm["acp_alpha"]],
                      [a["alpha"] for a in r["acp_alpha"]]) < 1e-6 and rel(rm["step"], r["step"]) < 1e-5,
                  f"{rm.get('micro_batches')} {rel(rm['step'], r['step']):.1e}")
        for cu in ("kfac", "ggn", "ef"):
            rc_, rc = run(d, {"op": "newton", "curvature": cu,
                              "options": {"method": "acp", "damping": lam}})
            check(f"MLP acp with curvature {cu}: same step, result curvature kfac",
                  rc_ == 0 and rc.get("curvature") == "kfac" and
                  rel(rc["step"], r["step"]) < 1e-12, str(rc)[:200])
    refusals = (
        ({"method": "acp", "acp_alpha": 0}, None, "invalid_option", "acp_alpha 0"),
        ({"method": "acp", "acp_alpha": -1.5}, None, "invalid_option", "acp_alpha < 0"),
        ({"method": "acp", "acp_alpha": "min"}, None, "invalid_option", "acp_alpha \"min\""),
        ({"method": "acp", "acp_alpha": True}, None, "invalid_option", "acp_alpha true"),
        ({"method": "kfac", "acp_alpha": 2}, None, "invalid_option", "acp_alpha with kfac"),
        ({"acp_alpha": "max"}, "ggn", "invalid_option", "acp_alpha with cg"),
        ({"method": "acp", "damping_mode": "factored"}, None, "invalid_option",
         "damping_mode with acp"),
        ({"method": "acp"}, "hessian", "invalid_curvature", "acp on hessian"),
    )
    for opts, cu, code, what in refusals:
        job = {"op": "newton", "options": opts}
        if cu:
            job["curvature"] = cu
        rc, rr = run(d, job)
        err = rr.get("error", {})
        check(f"newton acp refused: {what}", rc != 0 and err.get("code") == code and
              err.get("field", "").startswith("options") == (code == "invalid_option"),
              str(rr)[:200])


def check_centered(d):
    """lam -> 0: the step is George's centered update (6.3.3, 6.3.4) per layer."""
    g = torch.Generator().manual_seed(5)
    N = 64
    x = torch.randn(N, 6, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    model = mlp(nn.Tanh)
    write_case(d, model, x, y)
    ref = Ref(model, x, y)
    r = ok_run(d, "centered: newton acp lam -> 0", {"op": "newton", "options": {
        "method": "acp", "damping": 1e-10}})
    if not r:
        return
    s = np.array(r["step"])
    al = [a["alpha"] for a in r["acp_alpha"]]
    o = 0
    for i in range(len(ref.layers)):
        da, db = ref.dims(i)
        h = ref.rows[i][:, :-1]
        dl = N * ref.cot[i]                     # d l_j / d z_j (per-sample loss l_j)
        hbar = h.mean(0)
        C = (h - hbar).T @ (h - hbar) / N
        cond = np.linalg.cond(C)
        SW = -(1 / al[i]) * (dl.T @ (h - hbar) / N) @ np.linalg.inv(C)
        Sb = -(1 / al[i]) * dl.mean(0) - SW @ hbar
        nw = db * (da - 1)
        gotW, gotb = s[o:o + nw].reshape(db, da - 1), s[o + nw:o + nw + db]
        check(f"centered layer {i}: weight step = -(1/alpha)(1/n) sum dl_j (h_j - hbar)^T C^-1",
              cond < 1e4 and rel(gotW, SW) < 1e-4, f"rel {rel(gotW, SW):.2e}, cond(C) {cond:.1e}")
        check(f"centered layer {i}: bias step = -(1/alpha)(1/n) sum dl_j - S_W hbar",
              rel(gotb, Sb) < 1e-4, f"rel {rel(gotb, Sb):.2e}")
        o += da * db


def check_cnn(d):
    g = torch.Generator().manual_seed(7)
    N = 6
    x = torch.randn(N, 2, 5, 5, generator=g)
    y = torch.randint(0, 4, (N,), generator=g)
    model = cnn()
    write_case(d, model, x, y)
    ref = Ref(model, x, y)
    r = check_step(d, "CNN", ref, 0.05)
    if r:
        al = [a["alpha"] for a in r["acp_alpha"]]
        check("CNN: alpha max = (N/c) max over samples, positions, outputs (torch)",
              rel(al, ref.alpha_max) < 1e-5, f"{al} vs {ref.alpha_max}")
        ps = ref.per_sample_alpha()
        check("CNN: alpha max = per-sample losses' max (d l_n/dz_nr)^2", rel(al, ps) < 1e-5,
              f"{al} vs {ps}")


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        check_mlp(d)
        check_centered(d)
        check_cnn(d)
    print(f"e2e_acp: {time.time() - t0:.1f} s")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
