"""e2e_torch_modules.py - `curvd run` on Sequential models with the modules of issue 19
(Linear on the last dimension of [T, d] inputs, LayerNorm, GroupNorm, Embedding, Mish,
Hardswish) against torch.autograd (float64).

Usage: /usr/bin/python3 tests/e2e_torch_modules.py build/curvd
Models, written by the Sequential exporter (curvd_client.torch_export):
(a) Linear/Tanh/LayerNorm/Linear/Mish on [T, d] rows, Flatten, Linear (CrossEntropyLoss);
(b) LayerNorm over two dims, LayerNorm without affine, Hardswish (MSELoss, sum);
(c) Conv2d, GroupNorm (2 groups; and GroupNorm without affine, a group per channel);
(d) Embedding (padding_idx, repeated tokens) into LayerNorm and Linear on rows; and
    Embedding without padding (the dataset's x holds the token ids as floats).
Checks for each: loss, gradient, Hessian and GGN products, dense Hessian and GGN,
per-sample gradients (CrossEntropyLoss models), the GGN's top eigenvalues through the
Gram kernels (ViViT).  VERBOSE=1 prints every check.  Ends with 'N passed, M failed'.
"""
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402
from torchref import rel  # noqa: E402

nn = torch.nn


def run(d, job):
    return tr.curvd_run(CURVD, d, job)[1]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def split_like(v, params):
    out, off = [], 0
    for p in params:
        out.append(v[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


def gradient(model, loss_fn, x, y):
    return flat(torch.autograd.grad(loss_fn(model(x), y), list(model.parameters())))


def ggn_vp(model, loss_fn, x, y, v):
    """J^T Lambda J v, J v by the double-backward trick."""
    params = list(model.parameters())
    out = model(x)
    u = torch.zeros_like(out, requires_grad=True)
    g = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True)
    jv = torch.autograd.grad(g, u, grad_outputs=split_like(v, params))[0]
    o = out.detach().requires_grad_(True)
    go = torch.autograd.grad(loss_fn(o, y), o, create_graph=True)[0]
    ljv = torch.autograd.grad(go, o, grad_outputs=jv)[0]
    return flat(torch.autograd.grad(out, params, grad_outputs=ljv))


def per_sample_grads(model, x, y):
    """Per-sample contributions to the gradient of the CE (mean) loss, N x D."""
    params = list(model.parameters())
    per = nn.CrossEntropyLoss(reduction="sum")
    n = x.shape[0]
    return torch.stack([flat(torch.autograd.grad(per(model(x[i:i + 1]), y[i:i + 1]), params))
                        for i in range(n)]) / n


def randomize(model):
    """Non-trivial affine parameters of the normalizations (PyTorch starts at 1 and 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)


def rows_ln():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3),
                          nn.Mish(), nn.Flatten(), nn.Linear(12, 3))
    randomize(model)
    return model, torch.randn(5, 4, 5), torch.randint(0, 3, (5,)), nn.CrossEntropyLoss()


def ln_two_dims():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm([4, 5], eps=1e-3), nn.Hardswish(),
                          nn.Linear(5, 3, bias=False), nn.LayerNorm(3, elementwise_affine=False),
                          nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    randomize(model)
    return model, torch.randn(4, 4, 5), torch.randn(4, 2), nn.MSELoss(reduction="sum")


def conv_gn():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                          nn.Conv2d(4, 4, 3), nn.GroupNorm(4, 4, affine=False), nn.Mish(),
                          nn.Flatten(), nn.Linear(36, 3))
    randomize(model)
    return model, torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


def tokens(padding_idx):
    def make():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Embedding(9, 4, padding_idx=padding_idx), nn.LayerNorm(4),
                              nn.Linear(4, 4), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3))
        randomize(model)
        x = torch.randint(0, 5, (4, 6))   # few ids: repeats within and across samples
        x[0, 0] = x[3, 5] = 0             # the padding id (when there is one)
        x[1, 2] = 8
        return model, x, torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()
    return make


def check_model(tag, make):
    model, x, y, loss_fn = make()
    model.eval()
    m64 = copy.deepcopy(model).double()
    x64 = x if x.dtype == torch.int64 else x.double()
    y64 = y if y.dtype == torch.int64 else y.double()
    D = sum(p.numel() for p in model.parameters())
    ce = isinstance(loss_fn, nn.CrossEntropyLoss)
    with tempfile.TemporaryDirectory() as d:
        xs = x.float()   # token ids as exact floats in the Sequential form
        tr.write_case(d, model, list(x.shape[1:]), loss_fn, xs, y)
        res = run(d, {"op": "loss"})
        want = float(loss_fn(m64(x64), y64))
        check(tag + " loss", abs(res["loss"] - want) <= 1e-5 * abs(want), f"{res['loss']} {want}")
        res = run(d, {"op": "gradient"})
        e = rel(res["gradient"], gradient(m64, loss_fn, x64, y64))
        check(tag + " gradient", e < 1e-4, f"rel err {e}")
        torch.manual_seed(1)
        v = torch.randn(D, dtype=torch.float64)
        res = run(d, {"op": "matvec", "curvature": "hessian", "options": {"vector": v.tolist()}})
        e = rel(res["product"], tr.hvp(m64, loss_fn, x64, y64, v))
        check(tag + " Hv", e < 1e-4, f"rel err {e}")
        res = run(d, {"op": "matvec", "curvature": "ggn", "options": {"vector": v.tolist()}})
        e = rel(res["product"], ggn_vp(m64, loss_fn, x64, y64, v))
        check(tag + " Gv", e < 1e-4, f"rel err {e}")
        H = dense_hessian(m64, loss_fn, x64, y64, D)
        res = run(d, {"op": "dense", "curvature": "hessian"})
        e = rel(torch.tensor(res["matrix"]).T, H)
        check(tag + " dense H", e < 1e-4, f"rel err {e}")
        G = tr.dense_ggn(m64, loss_fn, x64, y64)
        res = run(d, {"op": "dense", "curvature": "ggn"})
        e = rel(torch.tensor(res["matrix"]).T, G)
        check(tag + " dense G", e < 1e-4, f"rel err {e}")
        res = run(d, {"op": "eigen", "curvature": "ggn", "options": {"k": 2, "method": "gram"}})
        want = torch.linalg.eigvalsh(G).flip(0)[:2]
        e = rel(res["eigenvalues"], want)
        check(tag + " top-2 GGN eigenvalues (Gram)", e < 1e-4,
              f"{res['eigenvalues']} vs {want.tolist()}")
        if ce:
            res = run(d, {"op": "per_sample_gradients"})
            e = rel(res["per_sample_gradients"], per_sample_grads(m64, x64, y64))
            check(tag + " per-sample gradients", e < 1e-4, f"rel err {e}")


def dense_hessian(model, loss_fn, x, y, D):
    """tr.dense_hessian with a float64 identity (x may hold integer token ids)."""
    eye = torch.eye(D, dtype=torch.float64)
    return torch.stack([tr.hvp(model, loss_fn, x, y, eye[i]) for i in range(D)], 1)


def check_export():
    """The exporter writes the new modules' PyTorch attributes."""
    model, _, _, _ = ln_two_dims()
    arch = tr.arch_json(model, [4, 5], nn.MSELoss())
    ln = arch["layers"][1]
    # "bias" is written only when false (torch >= 2.1's LayerNorm(bias=False)), so the
    # document rebuilds the module on any torch
    check("export LayerNorm", ln == {"type": "LayerNorm", "normalized_shape": [4, 5],
                                     "eps": 1e-3, "elementwise_affine": True},
          str(ln))
    model, _, _, _ = tokens(0)()
    arch = tr.arch_json(model, [6], nn.CrossEntropyLoss())
    check("export Embedding", arch["layers"][0] == {"type": "Embedding", "num_embeddings": 9,
                                                   "embedding_dim": 4, "padding_idx": 0},
          str(arch["layers"][0]))
    try:
        tr.arch_json(nn.Sequential(nn.Embedding(9, 4, max_norm=1.0)), [6], nn.MSELoss())
        check("export refuses Embedding max_norm", False)
    except ValueError as err:
        check("export refuses Embedding max_norm", "max_norm" in str(err), str(err))


def main():
    torch.set_num_threads(1)
    check_export()
    check_model("rows+LayerNorm", rows_ln)
    check_model("LayerNorm 2 dims", ln_two_dims)
    check_model("GroupNorm", conv_gn)
    check_model("Embedding padding", tokens(0))
    check_model("Embedding", tokens(None))
    return summary()


if __name__ == "__main__":
    sys.exit(main())
