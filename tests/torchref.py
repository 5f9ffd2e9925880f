"""torchref.py - PyTorch reference helpers for curvd's end-to-end tests.

Exports an nn.Sequential + loss with the Python client's exporter
(clients/python/curvd_client/torch_export.py, so every e2e test exercises it),
reads safetensors by hand (Debian has no `safetensors` module), builds the small
random MLP cases the torch tests share, and computes reference quantities with
torch.autograd (double-backward HVPs, GGN-vector products, dense Hessians/GGNs),
and runs the checks the torch tests share (check_products).  The pass/fail
counting is tests/e2e_lib.py's.
"""
import json
import struct
import subprocess
import os

import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients",
                                "python"))
from curvd_client.torch_export import export_architecture, safetensors_bytes  # noqa: E402,F401
from e2e_lib import CURVD, check  # noqa: E402

def rel(a, b, floor=1e-12):
    """||a - b|| / max(||b||, floor) in float64."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    return float((a - b).norm() / max(float(b.norm()), floor))


def close(a, b, rtol, atol=0.0):
    """a and b are numbers and a is within rtol |b| + atol of b."""
    return a is not None and b is not None and abs(a - b) <= rtol * abs(b) + atol


def stats(v):
    """Sample mean, unbiased variance and SNR mean^2 / var (None when var is 0)."""
    mean, var = float(v.mean()), float(v.var(unbiased=True))
    return mean, var, (mean * mean / var if var > 0 else None)


def snr_direction_matches(dk, gam, je, Lam, N):
    """One direction dk of an snr result against torch: gam holds the per-sample
    gammas, lambda_n = N je_n^T Lam_n je_n.  Returns (gamma mean, variance and snr
    match, lambda's match, torch's gamma mean, lambda mean, lambdas)."""
    lam = N * torch.einsum("nc,ncd,nd->n", je, Lam, je)
    gm, gv, gsn = stats(gam)
    lm, lv, lsn = stats(lam)
    ok_g = (close(abs(dk["gamma_mean"]), abs(gm), 1e-3, 1e-4 * float(gam.abs().max()))
            and close(dk["gamma_var"], gv, 1e-3) and close(dk["gamma_snr"], gsn, 1e-3, 1e-6))
    ok_l = (close(dk["lambda_mean"], lm, 1e-3) and close(dk["lambda_var"], lv, 1e-3)
            and close(dk["lambda_snr"], lsn, 1e-3))
    return ok_g, ok_l, gm, lm, lam


def make_mlp_case(act, loss, n=12, din=5, hidden=(7, 6), C=3, seed=0):
    """A Linear/act MLP (hidden widths, C outputs), x ~ N(0, 1) (n x din) and targets
    as the loss needs them: class indices (CE), probabilities (BCE) or N(0, 1)."""
    torch.manual_seed(seed)
    layers, cur = [], din
    for h in hidden:
        layers += [torch.nn.Linear(cur, h), act()]
        cur = h
    layers.append(torch.nn.Linear(cur, C))
    model = torch.nn.Sequential(*layers)
    x = torch.randn(n, din)
    name = type(loss).__name__
    if name == "CrossEntropyLoss":
        y = torch.randint(0, C, (n,))
    elif name == "BCEWithLogitsLoss":
        y = torch.rand(n, C)
    else:
        y = torch.randn(n, C)
    return model, x, y


def read_safetensors(path):
    """{name: tensor} from a safetensors file (F64, F32, I64, I32, BOOL)."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    kinds = {"F64": torch.float64, "F32": torch.float32, "I64": torch.int64, "I32": torch.int32,
             "BOOL": torch.bool}
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        b, e = h["data_offsets"]
        t = torch.frombuffer(bytearray(raw[base + b:base + e]), dtype=kinds[h["dtype"]])
        out[name] = t.reshape(h["shape"])
    return out


def arch_json(model, input_shape, loss):
    return export_architecture(model, loss, list(input_shape))


def write_case(d, model, input_shape, loss, x, y):
    """Writes arch.json, params.safetensors and data.safetensors into d."""
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch_json(model, input_shape, loss), f)
    with open(os.path.join(d, "params.safetensors"), "wb") as f:
        f.write(safetensors_bytes(model.state_dict()))
    with open(os.path.join(d, "data.safetensors"), "wb") as f:
        f.write(safetensors_bytes({"x": x, "y": y}))


def curvd_run(curvd, d, job, expect_ok=True, extra=()):
    """Runs `curvd run` on the case in d; returns (rc, parsed stdout or stderr JSON)."""
    jp = os.path.join(d, "job.json")
    with open(jp, "w") as f:
        json.dump(job, f)
    p = subprocess.run([curvd, "run", "--arch", os.path.join(d, "arch.json"),
                        "--params", os.path.join(d, "params.safetensors"),
                        "--data", os.path.join(d, "data.safetensors"), "--job", jp,
                        *extra],
                       capture_output=True, text=True, timeout=600)
    if expect_ok and p.returncode != 0:
        raise RuntimeError("curvd run failed: " + p.stderr[-2000:])
    out = p.stdout if p.returncode == 0 else p.stderr
    try:
        return p.returncode, json.loads(out)
    except json.JSONDecodeError:
        return p.returncode, {"raw": out}


def run(d, job):
    """The parsed result of `curvd run` (the script's CURVD) on the case in d."""
    return curvd_run(CURVD, d, job)[1]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def split_like(v, params):
    """The flat vector v cut into tensors shaped like params."""
    out, off = [], 0
    for p in params:
        out.append(v[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


def gradient(model, loss_fn, x, y):
    return flat(torch.autograd.grad(loss_fn(model(x), y), list(model.parameters())))


def ggn_vp(model, loss_fn, x, y, v):
    """G v = J^T (d2 loss/dh2) J v, J v by the double-backward trick."""
    params = list(model.parameters())
    out = model(x)
    u = torch.zeros_like(out, requires_grad=True)
    g = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True)
    jv = torch.autograd.grad(g, u, grad_outputs=split_like(v, params))[0]
    o = out.detach().requires_grad_(True)
    go = torch.autograd.grad(loss_fn(o, y), o, create_graph=True)[0]
    ljv = torch.autograd.grad(go, o, grad_outputs=jv)[0]
    return flat(torch.autograd.grad(out, params, grad_outputs=ljv))


def check_products(tag, d, m64, loss_fn, x, y, loss_atol=0.0):
    """The checks every torch test runs on a case in d, against the float64
    model m64 on x, y: the loss (relative 1e-5, plus loss_atol), the gradient,
    and H v and G v for one random v (relative 1e-4).  Returns the reference
    gradient."""
    res = run(d, {"op": "loss"})
    want = float(loss_fn(m64(x), y))
    check(tag + " loss", abs(res["loss"] - want) <= 1e-5 * abs(want) + loss_atol,
          f"{res['loss']} vs {want}")
    g = gradient(m64, loss_fn, x, y)
    e = rel(run(d, {"op": "gradient"})["gradient"], g)
    check(tag + " gradient", e < 1e-4, f"rel err {e}")
    torch.manual_seed(1)
    v = torch.randn(sum(p.numel() for p in m64.parameters()), dtype=torch.float64)
    res = run(d, {"op": "matvec", "curvature": "hessian", "options": {"vector": v.tolist()}})
    e = rel(res["product"], hvp(m64, loss_fn, x, y, v))
    check(tag + " Hv", e < 1e-4, f"rel err {e}")
    res = run(d, {"op": "matvec", "curvature": "ggn", "options": {"vector": v.tolist()}})
    e = rel(res["product"], ggn_vp(m64, loss_fn, x, y, v))
    check(tag + " Gv", e < 1e-4, f"rel err {e}")
    return g


def check_dense(tag, d, curvature, want):
    """The dense matrix of a curvature (Hessian or GGN) against want."""
    res = run(d, {"op": "dense", "curvature": curvature})
    e = rel(torch.tensor(res["matrix"]).T, want)
    check(f"{tag} dense {'H' if curvature == 'hessian' else 'G'}", e < 1e-4, f"rel err {e}")


def check_gram_top2(tag, d, G):
    """The top-2 GGN eigenvalues by the Gram method against those of G."""
    res = run(d, {"op": "eigen", "curvature": "ggn", "options": {"k": 2, "method": "gram"}})
    want = torch.linalg.eigvalsh(G).flip(0)[:2]
    e = rel(res["eigenvalues"], want)
    check(tag + " top-2 GGN eigenvalues (Gram)", e < 1e-4,
          f"{res['eigenvalues']} vs {want.tolist()}")


def flat_params(model):
    return [p for p in model.parameters()]


def loss_and_grad(model, loss_fn, x, y):
    params = flat_params(model)
    loss = loss_fn(model(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    return loss, g, params


def hvp(model, loss_fn, x, y, v):
    """Hessian-vector product by double backward, as PyHessian does."""
    loss, g, params = loss_and_grad(model, loss_fn, x, y)
    vs, off = [], 0
    for p in params:
        vs.append(v[off:off + p.numel()].view_as(p))
        off += p.numel()
    hv = torch.autograd.grad(g, params, grad_outputs=vs)
    return torch.cat([h.reshape(-1) for h in hv])


def dense_hessian(model, loss_fn, x, y):
    """H column by column (x may hold integer token ids: then in float64)."""
    D = sum(p.numel() for p in model.parameters())
    dt = x.dtype if x.is_floating_point() else torch.float64
    cols = [hvp(model, loss_fn, x, y, torch.eye(D, dtype=dt)[i]) for i in range(D)]
    return torch.stack(cols, 1)


def dense_ggn(model, loss_fn, x, y):
    """G = J^T (d2 loss / dh2) J with J from autograd (double precision friendly)."""
    params = flat_params(model)
    out = model(x)
    C = out.numel()
    J = []
    for i in range(C):
        gi = torch.autograd.grad(out.reshape(-1)[i], params, retain_graph=True)
        J.append(torch.cat([g.reshape(-1) for g in gi]))
    J = torch.stack(J)                       # (N*C) x D
    o = out.detach().reshape(-1).requires_grad_(True)
    l = loss_fn(o.view_as(out), y)
    g = torch.autograd.grad(l, o, create_graph=True)[0]
    Lam = torch.stack([torch.autograd.grad(g[i], o, retain_graph=True)[0] for i in range(C)])
    return J.T @ Lam @ J
