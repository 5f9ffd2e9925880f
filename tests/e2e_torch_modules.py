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
from e2e_lib import check, summary  # noqa: E402
from torchref import rel  # noqa: E402

nn = torch.nn


def per_sample_grads(model, x, y):
    """Per-sample contributions to the gradient of the CE (mean) loss, N x D."""
    params = list(model.parameters())
    per = nn.CrossEntropyLoss(reduction="sum")
    n = x.shape[0]
    return torch.stack([tr.flat(torch.autograd.grad(per(model(x[i:i + 1]), y[i:i + 1]), params))
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
    ce = isinstance(loss_fn, nn.CrossEntropyLoss)
    with tempfile.TemporaryDirectory() as d:
        xs = x.float()   # token ids as exact floats in the Sequential form
        tr.write_case(d, model, list(x.shape[1:]), loss_fn, xs, y)
        tr.check_products(tag, d, m64, loss_fn, x64, y64)
        H = tr.dense_hessian(m64, loss_fn, x64, y64)
        tr.check_dense(tag, d, "hessian", H)
        G = tr.dense_ggn(m64, loss_fn, x64, y64)
        tr.check_dense(tag, d, "ggn", G)
        tr.check_gram_top2(tag, d, G)
        if ce:
            res = tr.run(d, {"op": "per_sample_gradients"})
            e = rel(res["per_sample_gradients"], per_sample_grads(m64, x64, y64))
            check(tag + " per-sample gradients", e < 1e-4, f"rel err {e}")


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
