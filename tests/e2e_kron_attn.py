"""e2e_kron_attn.py - Kronecker curvatures (issue 22) on attention projections: a transformer
exported in graph form (clients/python/examples/graph_models.py's LM with
nn.MultiheadAttention, bias, causal mask: E = 8, 2 heads, 2 blocks), through `curvd run`.

The graph parser expands MultiheadAttention into primitive nodes with two Linear layers (the
packed q/k/v projection in_proj_weight/in_proj_bias and out_proj.weight/bias); each is a
Kronecker block with the T positions as weight-sharing positions (R = T), both in the
module's one per-layer block.  Checks, against factors built in torch float64 (the MHA
re-implemented functionally, so that the projections' inputs and outputs can be read: its
output is checked equal to nn.MultiheadAttention's first):
  - op kfac (type-2, expand and reduce; empirical expand): A and B of both projections of
    both blocks, named ".in_proj" / ".out_proj", kind "kronecker", dims (E+1, 3E) / (E+1, E);
    A from the projection inputs (a 1 appended), B from the loss Hessian's square-root
    columns backpropagated to the projection outputs (type-2) or from the data gradient
    (empirical, 1/c with c = 1/(N T));
  - op dense, kfac expand and reduce, on the attention block [in_proj_weight, in_proj_bias,
    out_proj.weight, out_proj.bias]: blockdiag(P (B (x) A) P^T) of the torch factors;
  - N = 1, T = 1 (expand): each projection's block equals the exact ggn / ef / fisher_mc
    diagonal block of its tensors (kfac type-2 / empirical / mc, kflr, ekfac type-2), and op
    kfac's compare gives Frobenius error 0 and Newton cosine 1 there;
  - blocks "layer": block_kinds of the MultiheadAttention block lists two kronecker entries;
    the exact paths on that block ("exact": true) agree with its dense kfac matrix: trace,
    diag, eigen (largest, with vectors), density nodes, solve, matvec, newton method kfac;
    ekfac's trace there equals the exact ggn trace of the block (diag(Q^T F Q) is exact);
  - kfra is refused (graph models are not Sequential);
  - attention written with nn.Linear modules (the LM's "matmul" form) or as F.linear on
    get_attr parameters: every projection is a Kronecker block (block_kinds).
Usage: /usr/bin/python3 tests/e2e_kron_attn.py build/curvd.  Ends with 'N passed, M failed'.
"""
import copy
import math
import os
import sys
import tempfile
import types

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python", "examples"))
import graph_models as gm  # noqa: E402
import torchref as tr  # noqa: E402
from curvd_client.torch_export import write_files  # noqa: E402
from e2e_kfac_op import theta_block  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-5
E, HEADS, VOCAB, LAYERS = 8, 2, 7, 2


def case(n, t, seed):
    cfg = {"vocab": VOCAB, "d_model": E, "heads": HEADS, "seq_len": t, "layers": LAYERS}
    model = gm.transformer_lm(**cfg, attention="mha", seed=seed)
    x, y = gm.lm_batch(n=n, seed=seed + 1, **cfg)
    return model, x, y


def write(d, model, x, y):
    write_files(d, model, torch.nn.CrossEntropyLoss(), [x.shape[1]], x, y, class_dim=-1)


def run(d, job, ok=True):
    return tr.curvd_run(CURVD, d, dict({"seed": 5}, **job), expect_ok=ok)


def mha_names(i):
    p = f"blocks.{i}.attn.mha."
    return [p + "in_proj_weight", p + "in_proj_bias", p + "out_proj.weight", p + "out_proj.bias"]


# ---- torch reference -------------------------------------------------------------------------

def functional_mha(rec, key):
    """A SelfAttention.forward computing nn.MultiheadAttention functionally (packed in_proj,
    heads, mask, softmax, out_proj), recording (input, output) of both projections."""
    def forward(self, x):
        mha = self.mha
        n, t, e = x.shape
        h, dk = mha.num_heads, e // mha.num_heads
        z1 = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = (u.reshape(n, t, h, dk).transpose(1, 2) for u in z1.split(e, dim=-1))
        s = (q / math.sqrt(dk)) @ k.transpose(-2, -1)
        if self.mask is not None:
            s = s.masked_fill(self.mask[:t, :t], float("-inf"))
        o = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(n, t, e)
        z2 = F.linear(o, mha.out_proj.weight, mha.out_proj.bias)
        rec[key] = [(x.detach(), z1), (o.detach(), z2)]
        return z2
    return forward


def with_bias(a):
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def ref_factors(model, x, y, fisher, approx):
    """{param names of a projection: (A, B)} for every attention projection (float64)."""
    m64 = model.double()
    want = m64(x)
    rec = {}
    for i, b in enumerate(m64.blocks):
        b.attn.forward = types.MethodType(functional_mha(rec, i), b.attn)
    h = m64(x)
    check(f"N={x.shape[0]} T={x.shape[1]} torch reference: functional MHA == nn.MultiheadAttention",
          tr.rel(h, want) < 1e-12, f"rel {tr.rel(h, want):.2e}")
    n, t, c = h.shape
    lossf = torch.nn.CrossEntropyLoss()

    def loss_of(hh):
        return lossf(hh.reshape(-1, c), y.reshape(-1))

    if fisher == "type-2":  # per-sample square roots of the loss Hessian (T C x T C)
        H = torch.autograd.functional.hessian(loss_of, h.detach()).reshape(n, t * c, n, t * c)
        S = []
        for i in range(n):
            w, Q = torch.linalg.eigh(H[i, :, i, :])
            S.append(Q * w.clamp(min=0).sqrt()[None, :])
        S = torch.stack(S)  # n x TC x TC
        cots, w = [S[:, :, j].reshape(n, t, c) for j in range(t * c)], 1.0
    else:  # empirical: g = dL/dh, B = (1/c) sum g g^T, c = 1/(N T) (CE mean over positions)
        hd = h.detach().requires_grad_(True)
        cots, w = [torch.autograd.grad(loss_of(hd), hd)[0]], float(n * t)
    zs = [z for i in sorted(rec) for (_, z) in rec[i]]
    Bs = [0.0] * len(zs)
    for cot in cots:
        for q, gz in enumerate(torch.autograd.grad(h, zs, grad_outputs=cot, retain_graph=True)):
            b = gz.sum(1) if approx == "reduce" else gz.reshape(-1, gz.shape[-1])
            Bs[q] = Bs[q] + w * b.T @ b
    out, q = {}, 0
    for i in sorted(rec):
        names = mha_names(i)
        for j, (a, _) in enumerate(rec[i]):
            a = with_bias(a)
            a = a.mean(1) if approx == "reduce" else a.reshape(-1, a.shape[-1]) / t ** 0.5
            out[tuple(names[2 * j:2 * j + 2])] = (a.T @ a / n, Bs[q])
            q += 1
    return out


def block_diag_ref(ref, i):
    names = mha_names(i)
    K1 = theta_block(*ref[tuple(names[:2])], True)
    K2 = theta_block(*ref[tuple(names[2:])], True)
    return torch.block_diag(K1, K2)


# ---- checks ----------------------------------------------------------------------------------

def check_factors(tag, res, ref):
    lay = {tuple(l["params"]): l for l in res["layers"]}
    for names, (A, B) in ref.items():
        l = lay.get(names)
        proj = "in_proj" if "in_proj" in names[0] else "out_proj"
        if not check(f"{tag} {names[0]}: a kronecker layer named {proj}", l is not None
                     and l["kind"] == "kronecker" and l["name"].endswith(proj)
                     and l["dim_a"] == E + 1 and l["dim_b"] == B.shape[0],
                     str(l and {k: l[k] for k in ("name", "kind", "dim_a", "dim_b")})):
            continue
        Ac, Bc = (torch.tensor(l[k], dtype=torch.float64) for k in ("A", "B"))
        check(f"{tag} {names[0]} A", tr.rel(Ac, A) < TOL, f"rel {tr.rel(Ac, A):.2e}")
        check(f"{tag} {names[0]} B", tr.rel(Bc, B) < TOL, f"rel {tr.rel(Bc, B):.2e}")


def check_torch(n, t):
    model, x, y = case(n, t, seed=3)
    with tempfile.TemporaryDirectory() as d:
        write(d, model, x, y)
        for ft, approx in (("type-2", "expand"), ("type-2", "reduce"), ("empirical", "expand")):
            tag = f"N={n} T={t} {ft} {approx}"
            ref = ref_factors(model, x, y, ft, approx)
            opts = {"fisher_type": ft, "kfac_approx": approx}
            check_factors(tag + " op kfac", run(d, {"op": "kfac", "options": opts})[1], ref)
            if ft != "type-2":
                continue
            r = run(d, {"op": "dense", "curvature": "kfac", "options": opts,
                        "blocks": [mha_names(i) for i in range(LAYERS)]})[1]
            for i in range(LAYERS):
                M = torch.tensor(r["blocks"][i]["matrix"], dtype=torch.float64)
                K = block_diag_ref(ref, i)
                check(f"{tag} dense kfac of attention block {i} == blockdiag(P(B(x)A)P^T)",
                      M.shape == K.shape and tr.rel(M, K) < TOL,
                      f"{tuple(M.shape)} rel {tr.rel(M, K) if M.shape == K.shape else '-'}")


def check_n1():
    """N = 1, T = 1: each projection's Kronecker block == the exact block of its curvature."""
    model, x, y = case(1, 1, seed=4)
    pairs = [mha_names(i)[:2] for i in range(LAYERS)] + [mha_names(i)[2:] for i in range(LAYERS)]
    with tempfile.TemporaryDirectory() as d:
        write(d, model, x, y)
        for curv, ft, exact, extra in (("kfac", "type-2", "ggn", {}),
                                       ("kfac", "empirical", "ef", {}),
                                       ("kfac", "mc", "fisher_mc", {"mc_samples": 3}),
                                       ("kflr", None, "ggn", {}),
                                       ("ekfac", "type-2", "ggn", {})):
            opts = dict(extra, **({"fisher_type": ft} if ft else {}))
            rk = run(d, {"op": "dense", "curvature": curv, "options": opts, "blocks": pairs})[1]
            re_ = run(d, {"op": "dense", "curvature": exact, "blocks": pairs,
                          **({"options": extra} if extra else {})})[1]
            for p, bk, be in zip(pairs, rk["blocks"], re_["blocks"]):
                K, X = (torch.tensor(b["matrix"], dtype=torch.float64) for b in (bk, be))
                kinds = [k["kind"] for k in bk.get("block_kinds", [])]
                check(f"N=1 T=1 {curv}/{ft} {p[0]}: block == exact {exact} block, kronecker",
                      tr.rel(K, X) < TOL and kinds == ["kronecker"],
                      f"rel {tr.rel(K, X):.2e} {kinds}")
        res = run(d, {"op": "kfac", "options": {"compare": True, "return_factors": False}})[1]
        lay = {tuple(l["params"]): l for l in res["layers"]}
        for p in pairs:
            cp = lay.get(tuple(p), {}).get("compare", {})
            check(f"N=1 T=1 op kfac compare {p[0]}: Frobenius error 0, newton cosine 1",
                  cp.get("relative_frobenius_error", 1) < TOL
                  and abs(cp.get("newton_cosine", 0) - 1) < TOL, str(cp))


def check_ops():
    """blocks "layer": block_kinds and the exact paths on the attention block."""
    model, x, y = case(3, 5, seed=6)
    with tempfile.TemporaryDirectory() as d:
        write(d, model, x, y)
        r = run(d, {"op": "dense", "curvature": "kfac", "blocks": "layer"})[1]
        blk = {b["name"]: b for b in r["blocks"]}
        for i in range(LAYERS):
            b = blk.get(f"blocks.{i}.attn.mha")
            kinds = b and [(k["name"], k["kind"], k.get("dim_a"), k.get("dim_b"), k["params"])
                           for k in b["block_kinds"]]
            pre = f"blocks.{i}.attn.mha"
            check(f"block {pre}: block_kinds two kronecker projections", kinds == [
                (pre + ".in_proj", "kronecker", E + 1, 3 * E, mha_names(i)[:2]),
                (pre + ".out_proj", "kronecker", E + 1, E, mha_names(i)[2:])], str(kinds))
        name = "blocks.0.attn.mha"
        if name not in blk:
            return
        M = torch.tensor(blk[name]["matrix"], dtype=torch.float64)
        D = M.shape[0]
        ev = torch.linalg.eigvalsh(M)
        scale = float(ev.abs().max())
        off = M.clone()
        off[:3 * E * (E + 1), :3 * E * (E + 1)] = 0
        off[3 * E * (E + 1):, 3 * E * (E + 1):] = 0
        check("attention block: the two projections' cross block is 0", float(off.abs().max()) == 0)

        def op(job):
            res = run(d, dict({"curvature": "kfac", "blocks": "layer"}, **job))[1]
            return {b["name"]: b for b in res["blocks"]}[name]

        t = op({"op": "trace"})
        check("attention block trace: exact = tr(dense)", t.get("exact") is True
              and tr.close(t["trace"], float(M.trace()), 1e-6), f"{t.get('trace')}")
        g = op({"op": "diag", "options": {"method": "exact"}})
        check("attention block diag: exact = diag(dense)", g.get("exact") is True
              and tr.rel(g["diag"], M.diagonal()) < 1e-6)
        k = 3
        e = op({"op": "eigen", "options": {"k": k, "which": "largest", "return_vectors": True}})
        V = torch.tensor(e["eigenvectors"], dtype=torch.float64).T
        got = torch.tensor(e["eigenvalues"], dtype=torch.float64)
        res = float((M @ V - V * got).norm(dim=0).max())
        check("attention block eigen: exact = eigvalsh(dense), eigenvectors", e.get("exact") is True
              and float((got - ev.flip(0)[:k]).abs().max()) <= 1e-6 * scale and res <= 1e-6 * scale,
              f"{got} vs {ev.flip(0)[:k]}, residual {res:.2e}")
        den = op({"op": "density", "options": {"grid_points": 100}})
        nodes = torch.tensor(den["nodes"][0], dtype=torch.float64)
        check("attention block density: nodes = the spectrum", den.get("exact") is True
              and len(nodes) == D and float((nodes - ev).abs().max()) <= 1e-6 * scale)
        m64 = copy.deepcopy(model).double()
        h = m64(x)
        loss = torch.nn.CrossEntropyLoss()(h.reshape(-1, h.shape[-1]), y.reshape(-1))
        ps = dict(m64.named_parameters())
        gb = torch.cat([t_.reshape(-1) for t_ in torch.autograd.grad(
            loss, [ps[n_] for n_ in mha_names(0)])])
        lam = 0.1 * scale
        s = op({"op": "solve", "options": {"damping": lam}})
        xs = torch.linalg.solve(M + lam * torch.eye(D, dtype=torch.float64), gb)
        check("attention block solve: exact = damped solve", s.get("exact") is True
              and tr.rel(s["solution"], xs) < 1e-6, f"rel {tr.rel(s['solution'], xs):.2e}")
        nt = op({"op": "newton", "options": {"method": "kfac", "damping": lam}})
        check("attention block newton kfac: exact = -(M + lam I)^-1 g", nt.get("exact") is True
              and tr.rel(nt["step"], -xs) < 1e-6, f"{ {k_: nt[k_] for k_ in nt if k_ != 'step'} }")
        v = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        mv = run(d, {"op": "matvec", "curvature": "kfac", "blocks": [mha_names(0)],
                     "options": {"vector": v.tolist()}})[1]
        check("attention block matvec = dense product", tr.rel(mv["product"], M @ v) < 1e-10,
              f"rel {tr.rel(mv['product'], M @ v):.2e}")
        ek = run(d, {"op": "trace", "curvature": "ekfac", "blocks": [mha_names(0)]})[1]
        gg = run(d, {"op": "dense", "curvature": "ggn", "blocks": [mha_names(0)[:2],
                                                                   mha_names(0)[2:]]})[1]
        tg = sum(float(torch.tensor(b["matrix"]).double().trace()) for b in gg["blocks"])
        check("ekfac: exact trace of the attention block == exact ggn trace",
              ek["blocks"][0].get("exact") is True and tr.close(ek["blocks"][0]["trace"], tg, 1e-4),
              f"{ek['blocks'][0].get('trace')} vs {tg}")
        rc, err = run(d, {"op": "trace", "curvature": "kfra"}, ok=False)
        check("kfra refused on a graph model", rc != 0 and "kfra" in str(err), str(err)[:200])


class FLinear(torch.nn.Module):
    """Projections written as F.linear on get_attr parameters over [N, T, E]."""

    def __init__(self):
        super().__init__()
        self.wq = torch.nn.Parameter(torch.randn(3 * E, E) * 0.3)
        self.bq = torch.nn.Parameter(torch.randn(3 * E) * 0.1)
        self.wo = torch.nn.Parameter(torch.randn(VOCAB, E) * 0.3)

    def forward(self, x):
        q, k, v = F.linear(x, self.wq, self.bq).split(E, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E), dim=-1) @ v
        return F.linear(a, self.wo)


def check_other_forms():
    """Attention written with nn.Linear modules (the LM's "matmul" form) or F.linear: every
    projection is a Kronecker block of its own."""
    cfg = {"vocab": VOCAB, "d_model": E, "heads": HEADS, "seq_len": 4, "layers": 1}
    torch.manual_seed(8)
    fl, xf = FLinear().eval(), torch.randn(2, 4, E)
    yf = torch.randint(0, VOCAB, (2, 4))
    mm = gm.transformer_lm(**cfg, attention="matmul", seed=2)
    xm, ym = gm.lm_batch(n=2, seed=3, **cfg)
    for tag, model, x, y, shape, want in (
            ("matmul attention (nn.Linear qkv, proj)", mm, xm, ym, [4],
             {"blocks.0.attn.qkv": (E + 1, 3 * E), "blocks.0.attn.proj": (E + 1, E)}),
            ("F.linear projections", fl, xf, yf, [4, E], {"wq": (E + 1, 3 * E), "wo": (E, VOCAB)})):
        with tempfile.TemporaryDirectory() as d:
            write_files(d, model, torch.nn.CrossEntropyLoss(), shape, x, y, class_dim=-1)
            r = run(d, {"op": "trace", "curvature": "kfac", "blocks": "layer"})[1]
            got = {b["name"]: [(k["kind"], k.get("dim_a"), k.get("dim_b"))
                               for k in b["block_kinds"]] for b in r["blocks"]}
            check(f"{tag}: kronecker blocks", all(got.get(n) == [("kronecker",) + dims]
                                                  for n, dims in want.items()), str(got))


def main():
    check_torch(3, 5)
    check_n1()
    check_ops()
    check_other_forms()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
