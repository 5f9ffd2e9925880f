"""laplace_ref.py - torch float64 references shared by the Laplace tests (ops laplace and
predict: tests/e2e_laplace.py, tests/e2e_predict.py, tests/e2e_laplace_online.py).

laplace-torch's conventions (docs/interface.md, op laplace): P = G_sum / (sigma^2 T) +
delta I with G_sum the exact GGN of the summed negative log-likelihood (CE: of the summed
loss; MSE: of 1/2 sum ||y - f||^2), formed densely by torchref.dense_ggn; the KFAC factors
built in torch from hooks (A = mean a a^T, B = sum_n J_n^T Lam_n J_n through the square
roots of the summed loss's output Hessians); log_likelihood = -nll / (sigma^2 T)
(- N C log(sigma sqrt(2 pi))); log_marginal_likelihood = log_likelihood
- 1/2 (log det P - log det P0) - 1/2 theta^T P0 theta.  The cases (an MLP classifier, a
regressor, a two-output Bernoulli MLP), the dense precision of every structure, output
Jacobians, and the runs of curvd the tests share.
"""
import copy
import json
import math
import os
import sys
import urllib.error
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD  # noqa: E402


def kron_dense(A, B):
    """P (B (x) A) P^T in theta = [vec_r(W), b] order (A: (in + 1)^2 with the bias last)."""
    da, db = A.shape[0], B.shape[0]
    K = torch.kron(B, A)
    idx = [o * da + j for o in range(db) for j in range(da - 1)] + \
          [o * da + da - 1 for o in range(db)]
    idx = torch.tensor(idx)
    return K[idx][:, idx]


def jacobian(m64, X):
    """(N, C, D): d f(x_n) / d theta, theta in state_dict order."""
    ps = [p for _, p in m64.named_parameters()]
    h = m64(X)
    N, C = h.shape
    J = torch.zeros(N, C, sum(p.numel() for p in ps), dtype=torch.float64)
    for n in range(N):
        for c in range(C):
            gs = torch.autograd.grad(h[n, c], ps, retain_graph=True)
            J[n, c] = torch.cat([g.reshape(-1) for g in gs])
    return J


def run_op(d, op, options, expect_ok=True, seed=3):
    """`curvd run` of op on the case in d: the result, or (rc, result) when not expect_ok."""
    rc, r = tr.curvd_run(CURVD, d, {"op": op, "seed": seed, "options": options},
                         expect_ok=expect_ok)
    return r if expect_ok else (rc, r)


def post(url, doc):
    """POST /v1/jobs?wait=60: (status, JSON)."""
    req = urllib.request.Request(url + "/v1/jobs?wait=60", data=json.dumps(doc).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=90) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


# ---- cases ------------------------------------------------------------------------------

def classifier(reduction, n=16, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4),
                            torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(n, 5)
    y = torch.randint(0, 3, (n,))
    return m, x, y, torch.nn.CrossEntropyLoss(reduction=reduction)


def bernoulli(n=16, seed=2):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x = torch.randn(n, 4)
    y = torch.randint(0, 2, (n, 2)).float()
    return m, x, y, torch.nn.BCEWithLogitsLoss()


def regressor(n=16, seed=1):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(n, 4)
    y = torch.randn(n, 2)
    return m, x, y, torch.nn.MSELoss()


class Ref:
    """torch float64 quantities of a case: G_sum, nll, the layer blocks, the KFAC factors."""

    def __init__(self, m, x, y, loss):
        self.gaussian = isinstance(loss, torch.nn.MSELoss)
        bce = isinstance(loss, torch.nn.BCEWithLogitsLoss)
        self.m64 = copy.deepcopy(m).double()
        self.x, self.y = x.double(), (y.double() if self.gaussian or bce else y)
        if self.gaussian:
            self.sum_loss = lambda h, t: 0.5 * ((h - t) ** 2).sum()
        elif bce:
            self.sum_loss = lambda h, t: torch.nn.functional.binary_cross_entropy_with_logits(
                h, t, reduction="sum")
        else:
            self.sum_loss = lambda h, t: torch.nn.functional.cross_entropy(h, t, reduction="sum")
        self.G = tr.dense_ggn(self.m64, self.sum_loss, self.x, self.y)
        with torch.no_grad():
            h = self.m64(self.x)
            self.nll = float(self.sum_loss(h, self.y))
        self.NC = h.numel()
        self.linears = [(n, mod) for n, mod in self.m64.named_modules()
                        if isinstance(mod, torch.nn.Linear)]
        self.dims = [mod.weight.numel() + mod.bias.numel() for _, mod in self.linears]
        self.theta = torch.cat([p.detach().reshape(-1) for p in self.m64.parameters()])
        self.D = self.theta.numel()
        self.offs = [sum(self.dims[:i]) for i in range(len(self.dims))]
        self.factors = self.kfac()

    def kfac(self):
        """{block index: (A, B)}: A = mean a~ a~^T, B = sum_n sum_c s s^T with
        s = J_n^T S_n[:, c], S_n S_n^T the summed loss's output Hessian of sample n."""
        rec = {}

        def hook(i):
            def f(mod, inp, out):
                out.retain_grad()
                rec[i] = (inp[0].detach(), out)
            return f

        hs = [mod.register_forward_hook(hook(i)) for i, (_, mod) in enumerate(self.linears)]
        h = self.m64(self.x)
        for hk in hs:
            hk.remove()
        N, C = h.shape
        Lam = torch.zeros(N, C, C, dtype=torch.float64)
        for n in range(N):
            hn = h[n].detach().requires_grad_(True)
            tn = self.y[n:n + 1]
            Lam[n] = torch.autograd.functional.hessian(
                lambda v: self.sum_loss(v[None], tn), hn)
        w, Q = torch.linalg.eigh(Lam)
        S = Q * w.clamp(min=0).sqrt()[:, None, :]
        Bs = {i: 0 for i in rec}
        for c in range(C):
            outs = [rec[i][1] for i in sorted(rec)]
            grads = torch.autograd.grad(h, outs, grad_outputs=S[:, :, c], retain_graph=True)
            for i, gz in zip(sorted(rec), grads):
                Bs[i] = Bs[i] + gz.T @ gz
        out = {}
        for i, (a, _) in rec.items():
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            out[i] = (a.T @ a / N, Bs[i])
        return out

    def kron_block(self, i):
        """P (B (x) A) P^T in theta = [vec_r(W), b] order."""
        return kron_dense(*self.factors[i])

    def prior_diag(self, deltas, blocks):
        return torch.cat([torch.full((self.dims[b],), float(d), dtype=torch.float64)
                          for d, b in zip(deltas, blocks)])

    def blocks_of(self, last):
        return [len(self.dims) - 1] if last else list(range(len(self.dims)))

    def precision(self, structure, deltas, sigma=1.0, T=1.0, k=6, last=False):
        """The dense posterior precision P (on the last layer for last_layer) and its slice:
        full g G + P0; diag g diag(G) + P0; kron the blocks g P (B (x) A) P^T + delta_b I;
        lowrank V diag(g lam) V^T + P0 with the dense top-k; g = 1 / (sigma^2 T)."""
        blocks = self.blocks_of(last)
        if len(deltas) == 1:
            deltas = deltas * len(blocks)
        sl = slice(self.offs[blocks[0]], self.D)
        G = self.G[sl, sl]
        p0 = self.prior_diag(deltas, blocks)
        g = 1.0 / (sigma * sigma * T)
        if structure == "full":
            P = g * G + torch.diag(p0)
        elif structure == "diag":
            P = torch.diag(g * torch.diagonal(G) + p0)
        elif structure == "kron":
            P = torch.block_diag(*[g * self.kron_block(b) + d * torch.eye(self.dims[b],
                                                                           dtype=torch.float64)
                                   for d, b in zip(deltas, blocks)])
        else:
            lam, V = torch.linalg.eigh(G)
            lam, V = lam[-k:], V[:, -k:]
            P = V @ torch.diag(g * lam) @ V.T + torch.diag(p0)
        return P, sl

    def terms(self, structure, deltas, sigma=1.0, T=1.0, k=None, last=False):
        """(lml, loglik, logdet P, logdet P0, scatter, per-block logdet P or None)."""
        blocks = self.blocks_of(last)
        if len(deltas) == 1:
            deltas = deltas * len(blocks)
        P, sl = self.precision(structure, deltas, sigma, T, k, last)
        th = self.theta[sl]
        p0 = self.prior_diag(deltas, blocks)
        ld = float(torch.logdet(P))
        per = None
        if structure in ("diag", "kron"):  # block-diagonal over the prior blocks
            per, o = [], 0
            for b in blocks:
                n = self.dims[b]
                per.append(float(torch.logdet(P[o:o + n, o:o + n])))
                o += n
        lp = float(torch.log(p0).sum())
        sc = float((th * p0) @ th)
        g = 1.0 / (sigma * sigma * T)
        ll = -g * self.nll
        if self.gaussian:
            ll -= self.NC * math.log(sigma * math.sqrt(2 * math.pi))
        return ll - 0.5 * (ld - lp + sc), ll, ld, lp, sc, per

    def block_scatter(self, deltas, blocks):
        return [float(d * (self.theta[self.offs[b]:self.offs[b] + self.dims[b]] ** 2).sum())
                for d, b in zip(deltas, blocks)]


