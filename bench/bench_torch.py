"""bench_torch.py - the PyTorch side of curvd's benchmark (PyHessian conventions).

Times the same work bench_ops.c times, with torch (float32, same batch, same
threads): gradient; Hessian-vector products by double backward as PyHessian
does (gradient graph built once, reused); GGN-vector products as curvlinops
does (J v by the double-vjp trick, the loss Hessian by autograd, J^T by vjp);
Hutchinson trace with 100 Rademacher probes; top-5 eigenvalues by PyHessian's
power iteration with deflation (maxIter 100, tol 1e-3); SLQ density with 100
Lanczos steps and full reorthogonalization; hvpmb (opt-in, --only hvpmb
--micro-batch B): one HVP over the whole batch in micro-batches of B, a graph per
micro-batch per product (PyHessian's data-loader mode).  Vectors are kept flat (faster
than PyHessian's lists of tensors), so the baseline is if anything favourable
to torch.  Prints one JSON object of seconds per op.
"""
import argparse
import json
import os
import sys
import time

import torch

# case.pt of a graph case pickles the models of clients/python/examples/graph_models.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients",
                                "python", "examples"))


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(v, params):
    out, off = [], 0
    for p in params:
        out.append(v[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


def sequence_loss(loss_fn):
    """class_dim -1: [N, T, C] logits against [N, T] targets, as curvd's loss reads them
    (PyTorch's loss_fn(logits.reshape(-1, C), y.reshape(-1)))."""
    return lambda out, y: loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def best_of(reps, fn):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Problem:
    def __init__(self, model, loss_fn, x, y):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.D = sum(p.numel() for p in self.params)
        self._grad_graph = None
        self._ggn_graph = None

    def gradient(self):
        loss = self.loss_fn(self.model(self.x), self.y)
        return flat(torch.autograd.grad(loss, self.params))

    def hvp(self, v):
        if self._grad_graph is None:
            loss = self.loss_fn(self.model(self.x), self.y)
            self._grad_graph = torch.autograd.grad(loss, self.params, create_graph=True)
        hv = torch.autograd.grad(self._grad_graph, self.params, grad_outputs=unflat(v, self.params),
                                 retain_graph=True)
        return flat(hv)

    def ggnvp(self, v):
        if self._ggn_graph is None:
            out = self.model(self.x)
            loss = self.loss_fn(out, self.y)
            gout = torch.autograd.grad(loss, out, create_graph=True)[0]
            self._ggn_graph = (out, gout)
        out, gout = self._ggn_graph
        u = torch.zeros_like(out, requires_grad=True)
        vjp = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True)
        jv = torch.autograd.grad(vjp, u, grad_outputs=unflat(v, self.params))[0]
        ljv = torch.autograd.grad(gout, out, grad_outputs=jv, retain_graph=True)[0]
        return flat(torch.autograd.grad(out, self.params, grad_outputs=ljv, retain_graph=True))


def hvp_microbatched(pb, v, mb):
    """The whole-set HVP the way PyHessian's data-loader mode computes it: per micro-batch
    a forward pass, the gradient with create_graph and the double-backward product, the
    micro-batch losses weighted n_b / N (the mean over the whole set)."""
    n, acc = pb.x.shape[0], torch.zeros(pb.D)
    vs = unflat(v, pb.params)
    for i in range(0, n, mb):
        xb, yb = pb.x[i:i + mb], pb.y[i:i + mb]
        loss = pb.loss_fn(pb.model(xb), yb) * (xb.shape[0] / n)
        g = torch.autograd.grad(loss, pb.params, create_graph=True)
        acc += flat(torch.autograd.grad(g, pb.params, grad_outputs=vs))
    return acc


def trace(pb, probes=100):
    est = 0.0
    for _ in range(probes):
        v = torch.randint(0, 2, (pb.D,)).float() * 2 - 1
        est += float(v @ pb.hvp(v))
    return est / probes


def power_top(pb, k=5, max_iter=100, tol=1e-3):
    """PyHessian eigenvalues(): power iteration with deflation."""
    vals, vecs = [], []
    for _ in range(k):
        v = torch.randn(pb.D)
        v /= v.norm()
        lam = None
        for _ in range(max_iter):
            for w in vecs:
                v = v - (v @ w) * w
            v /= v.norm()
            hv = pb.hvp(v)
            new = float(hv @ v)
            if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                lam = new
                break
            lam = new
            v = hv / hv.norm()
        vals.append(lam)
        vecs.append(v)
    return vals


def slq(pb, steps=100):
    """PyHessian density(): one run of Lanczos with full reorthogonalization."""
    v = (torch.randint(0, 2, (pb.D,)).float() * 2 - 1)
    v /= v.norm()
    V = [v]
    alpha, beta = [], []
    for i in range(steps):
        w = pb.hvp(V[-1])
        a = float(w @ V[-1])
        alpha.append(a)
        w = w - a * V[-1]
        if i > 0:
            w = w - beta[-1] * V[-2]
        for u in V:                              # full reorthogonalization
            w = w - (w @ u) * u
        b = float(w.norm())
        beta.append(b)
        if i + 1 < steps:
            V.append(w / b)
    T = torch.diag(torch.tensor(alpha)) + torch.diag(torch.tensor(beta[:-1]), 1) + \
        torch.diag(torch.tensor(beta[:-1]), -1)
    evals, evecs = torch.linalg.eigh(T.double())
    return broaden(evals, evecs[0] ** 2)


def broaden(nodes, weights, bins=10000, sigma2=1e-5, overhead=0.01):
    """PyHessian's density_generate(), vectorized: Gaussian broadening on a grid."""
    lmax, lmin = float(nodes.max()) + overhead, float(nodes.min()) - overhead
    grid = torch.linspace(lmin, lmax, bins, dtype=torch.float64)
    s2 = sigma2 * max(1.0, lmax - lmin)
    dens = (torch.exp(-(grid[:, None] - nodes[None, :]) ** 2 / (2 * s2)) /
            (2 * torch.pi * s2) ** 0.5 * weights[None, :]).sum(1)
    return grid, dens / (dens.sum() * (grid[1] - grid[0]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, help="path prefix written by bench.py (.pt)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--micro-batch", type=int, default=0, help="hvpmb: micro-batch size")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    case = torch.load(a.case)
    model, loss_fn = case["model"], case["loss"]
    if case.get("class_dim", 1) == -1:
        loss_fn = sequence_loss(loss_fn)
    model.eval()
    pb = Problem(model, loss_fn, case["x"], case["y"])
    only = set(a.only.split(",")) if a.only else None
    res = {"params": pb.D, "threads": torch.get_num_threads()}
    v = torch.randint(0, 2, (pb.D,)).float() * 2 - 1
    if only and "hvpmb" in only:  # opt-in: a whole-set product is seconds
        res["hvpmb"] = best_of(a.reps, lambda: hvp_microbatched(pb, v, a.micro_batch))
    if not only or "gradient" in only:
        res["gradient"] = best_of(a.reps, pb.gradient)
    if not only or "hvp" in only:
        pb.hvp(v)
        res["hvp"] = best_of(a.reps, lambda: pb.hvp(v))
    if not only or "ggnvp" in only:
        pb.ggnvp(v)
        res["ggnvp"] = best_of(a.reps, lambda: pb.ggnvp(v))
    if not only or "trace" in only:
        res["trace"] = best_of(1, lambda: trace(pb))
    if not only or "power5" in only:
        res["power5"] = best_of(1, lambda: power_top(pb))
    if not only or "density" in only:
        res["density"] = best_of(1, lambda: slq(pb))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
