"""pyhessian_side_by_side.py - PyHessian's README calls, on curvd's engine and in torch.

PyHessian's README does:

    hessian_comp = hessian(model, criterion, data=(inputs, targets), cuda=False)
    top_eigenvalues, top_eigenvector = hessian_comp.eigenvalues()
    trace = hessian_comp.trace()
    density_eigen, density_weight = hessian_comp.density()
    get_esd_plot(density_eigen, density_weight)

This example makes the same calls through ``curvd.pyhessian`` (the engine in-process, no
daemon) and through a plain-torch copy of PyHessian's algorithms (power iteration with
deflation, Hutchinson with its stopping rule, stochastic Lanczos quadrature; PyHessian
itself is not a Debian package), prints the numbers side by side and draws both spectral
densities into one plot (matplotlib, PNG).  Same numbers up to estimator noise: the top
eigenvalues to PyHessian's tolerance, the traces within their standard errors, the
densities' extreme nodes.

Usage: PYTHONPATH=clients/python python3 clients/python/examples/pyhessian_side_by_side.py
       [--out esd.png] [--n 256] [--check]   (--check: exit 1 when they disagree)
"""
import argparse
import sys
import time

import numpy as np
import torch

import curvd


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


class TorchPyHessian:
    """PyHessian's hessian(model, criterion, data=...) in plain torch (flat vectors)."""

    def __init__(self, model, criterion, data):
        x, y = data
        self.params = [p for p in model.parameters() if p.requires_grad]
        loss = criterion(model(x), y)
        self.g = torch.autograd.grad(loss, self.params, create_graph=True)

    def hv(self, v):
        vs, off = [], 0
        for p in self.params:
            vs.append(v[off:off + p.numel()].view_as(p))
            off += p.numel()
        return flat(torch.autograd.grad(self.g, self.params, grad_outputs=vs, retain_graph=True))

    def dim(self):
        return sum(p.numel() for p in self.params)

    def eigenvalues(self, maxIter=100, tol=1e-3, top_n=1):  # noqa: N803
        vals, vecs = [], []
        for _ in range(top_n):
            v = torch.randn(self.dim())
            lam = None
            for _ in range(maxIter):
                for w in vecs:
                    v = v - (v @ w) * w
                v = v / v.norm()
                hv = self.hv(v)
                new = float(hv @ v)
                done = lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol
                lam, v = new, hv
                if done:
                    break
            vals.append(lam)
            vecs.append(v / v.norm())
        return vals, vecs

    def trace(self, maxIter=100, tol=1e-3):  # noqa: N803
        vhv, prev = [], 0.0
        for _ in range(maxIter):
            v = torch.randint(0, 2, (self.dim(),)).float() * 2 - 1
            vhv.append(float(v @ self.hv(v)))
            mean = float(np.mean(vhv))
            if abs(mean - prev) / (abs(prev) + 1e-6) < tol:
                break
            prev = mean
        return vhv

    def density(self, iter=100, n_v=1):  # noqa: A002
        nodes, weights = [], []
        for _ in range(n_v):
            v = torch.randint(0, 2, (self.dim(),)).float() * 2 - 1
            V, a, b = [v / v.norm()], [], []
            for i in range(iter):
                w = self.hv(V[-1])
                a.append(float(w @ V[-1]))
                for u in V:
                    w = w - (w @ u) * u
                b.append(float(w.norm()))
                if i + 1 < iter:
                    V.append(w / b[-1])
            T = np.diag(a) + np.diag(b[:-1], 1) + np.diag(b[:-1], -1)
            ev, Q = np.linalg.eigh(T)
            nodes.append(list(ev))
            weights.append(list(Q[0] ** 2))
        return nodes, weights


def esd(nodes, weights, bins=2000, sigma2=1e-5, overhead=0.01):
    """PyHessian's density_generate: the runs' nodes broadened by Gaussians on a grid."""
    ev, w = np.concatenate(nodes), np.concatenate(weights) / len(nodes)
    lmax, lmin = ev.max() + overhead, ev.min() - overhead
    grid = np.linspace(lmin, lmax, bins)
    s2 = sigma2 * max(1.0, lmax - lmin)
    dens = (np.exp(-(grid[:, None] - ev[None, :]) ** 2 / (2 * s2)) / np.sqrt(2 * np.pi * s2)
            * w[None, :]).sum(1)
    return grid, dens / (dens.sum() * (grid[1] - grid[0]))


def problem(n):
    """A small MLP on a 3-class problem, trained a few steps (a landscape with structure)."""
    torch.manual_seed(0)
    x = torch.randn(n, 20)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    criterion = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    return model.eval(), criterion, x, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="esd.png")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    model, criterion, x, y = problem(a.n)
    torch.manual_seed(1)
    sides = {"curvd": curvd.pyhessian(model, criterion, data=(x, y)),
             "torch": TorchPyHessian(model, criterion, (x, y))}
    res = {}
    for name, h in sides.items():
        t0 = time.perf_counter()
        top, _ = h.eigenvalues(top_n=2)
        tr = h.trace(maxIter=200, tol=0)
        nodes, weights = h.density(iter=60, n_v=1)
        res[name] = {"top": top, "trace": float(np.mean(tr)),
                     "stderr": float(np.std(tr) / np.sqrt(len(tr))), "nodes": nodes,
                     "weights": weights, "s": time.perf_counter() - t0}
    c, t = res["curvd"], res["torch"]
    print(f"{'':22} {'curvd':>14} {'torch':>14}")
    for i in range(2):
        print(f"{'eigenvalue %d' % (i + 1):22} {c['top'][i]:14.6g} {t['top'][i]:14.6g}")
    print(f"{'trace (200 probes)':22} {c['trace']:14.6g} {t['trace']:14.6g}   "
          f"(stderr {c['stderr']:.3g} / {t['stderr']:.3g})")
    print(f"{'density: top node':22} {max(c['nodes'][0]):14.6g} {max(t['nodes'][0]):14.6g}")
    print(f"{'density: bottom node':22} {min(c['nodes'][0]):14.6g} {min(t['nodes'][0]):14.6g}")
    print(f"{'seconds (all calls)':22} {c['s']:14.3g} {t['s']:14.3g}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in res.items():
            grid, dens = esd(r["nodes"], r["weights"])
            ax.semilogy(grid, dens + 1e-7, label=name)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title("Hessian eigenvalue density (SLQ, 60 steps)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out, dpi=80)
        print("plot:", a.out)
    except ImportError:
        print("matplotlib is not installed: no plot")
    ok = (abs(c["top"][0] - t["top"][0]) < 1e-2 * abs(t["top"][0]) and
          abs(c["trace"] - t["trace"]) < 4 * np.hypot(c["stderr"], t["stderr"]) and
          abs(max(c["nodes"][0]) - max(t["nodes"][0])) < 1e-3 * abs(max(t["nodes"][0])))
    print("agree up to estimator noise:", ok)
    return 0 if ok or not a.check else 1


if __name__ == "__main__":
    sys.exit(main())
