"""torchref.py - PyTorch reference helpers for curvd's end-to-end tests.

Exports an nn.Sequential + loss with the Python client's exporter
(clients/python/curvd_client/torch_export.py, so every e2e test exercises it),
reads safetensors by hand (Debian has no `safetensors` module), builds the small
random MLP cases the torch tests share, and computes reference quantities with
torch.autograd (double-backward HVPs, dense Hessians/GGNs).  The pass/fail
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
    D = sum(p.numel() for p in model.parameters())
    cols = [hvp(model, loss_fn, x, y, torch.eye(D, dtype=x.dtype)[i]) for i in range(D)]
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
