"""e2e_torch_conv1d.py - `curvd run` on Conv1d, MaxPool1d, AvgPool1d,
AdaptiveAvgPool1d, ConvTranspose2d and Upsample (nearest) against torch.autograd
(float64).

Usage: /usr/bin/python3 tests/e2e_torch_conv1d.py build/curvd
(a) a 1-d CNN on [2, 17]: Conv1d (padding, then stride/dilation/groups, then
    padding='same' with an even kernel through the exporter), Upsample by 1.3
    (PyTorch's float source index), MaxPool1d and AvgPool1d (ceil_mode, padding,
    count_include_pad False), AdaptiveAvgPool1d, CrossEntropyLoss;
(b) a decoder-like 2-d net on [2, 3, 4]: ConvTranspose2d (stride 2, padding,
    output_padding), Upsample x2, a grouped dilated ConvTranspose2d without bias
    with per-axis strides, Upsample to a smaller size, MSELoss (sum).
Each: the exported attributes, loss, gradient, Hessian and GGN products, the
dense Hessian and GGN, per-sample gradients, and (b) the GGN's top eigenvalues
by the Gram kernels.  VERBOSE=1 prints every check.  Ends with 'N passed, M failed'.
"""
import copy
import os
import sys
import tempfile
import warnings

import torch
from torch.nn.utils import stateless

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import check, summary  # noqa: E402
from torchref import flat, gradient, rel, run  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*padding='same'.*")


def dense_hessian(model, loss_fn, x, y):
    """The loss's Hessian in the flat parameters (vectorized double backward)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = flat([p.detach() for p in model.parameters()])

    def f(t):
        ps, off = {}, 0
        for n, sh in zip(names, shapes):
            k = sh.numel()
            ps[n] = t[off:off + k].view(sh)
            off += k
        return loss_fn(stateless.functional_call(model, ps, (x,)), y)

    return torch.autograd.functional.hessian(f, theta, vectorize=True)


def per_sample(model, loss_fn, x, y):
    """Each sample's contribution to the gradient of the batch loss, N x D."""
    n = x.shape[0]
    scale = 1.0 / n if loss_fn.reduction == "mean" else 1.0
    per = type(loss_fn)(reduction="sum")
    return torch.stack([gradient(model, per, x[i:i + 1], y[i:i + 1]) for i in range(n)]) * scale


def net_1d():
    torch.manual_seed(11)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Upsample(scale_factor=1.3),
        torch.nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True),
        torch.nn.Conv1d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2),
        torch.nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        torch.nn.Conv1d(4, 3, 4, padding="same"),
        torch.nn.Sigmoid(),
        torch.nn.AdaptiveAvgPool1d(3),
        torch.nn.Flatten(),
        torch.nn.Linear(9, 3),
    ).eval()
    return model, torch.randn(5, 2, 17), torch.randint(0, 3, (5,)), [2, 17]


def net_convt():
    torch.manual_seed(12)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        torch.nn.Tanh(),
        torch.nn.Upsample(scale_factor=2, mode="nearest"),
        torch.nn.Conv2d(4, 2, 3, stride=2),
        torch.nn.Tanh(),
        torch.nn.ConvTranspose2d(2, 2, (2, 3), stride=(1, 2), dilation=(2, 1), groups=2,
                                 bias=False),
        torch.nn.Upsample(size=(5, 6)),
        torch.nn.Flatten(),
        torch.nn.Linear(60, 3),
    ).eval()
    return model, torch.randn(4, 2, 3, 4), torch.randn(4, 3), [2, 3, 4]


def check_export():
    model, _, _, shape = net_1d()
    layers = tr.arch_json(model, shape, torch.nn.CrossEntropyLoss())["layers"]
    check("export Conv1d", layers[4] == {
        "type": "Conv1d", "in_channels": 4, "out_channels": 4, "kernel_size": 3, "stride": 2,
        "padding": 2, "dilation": 2, "groups": 2, "bias": True}, str(layers[4]))
    check("export padding='same'", layers[6]["padding"] == "same", str(layers[6]))
    check("export Upsample", layers[2] == {"type": "Upsample", "size": None,
                                           "scale_factor": 1.3, "mode": "nearest"},
          str(layers[2]))
    check("export AvgPool1d", layers[5] == {
        "type": "AvgPool1d", "kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
        "count_include_pad": False}, str(layers[5]))
    model, _, _, shape = net_convt()
    layers = tr.arch_json(model, shape, torch.nn.MSELoss(reduction="sum"))["layers"]
    check("export ConvTranspose2d", layers[7] == {
        "type": "ConvTranspose2d", "in_channels": 2, "out_channels": 2, "kernel_size": [2, 3],
        "stride": [1, 2], "padding": [0, 0], "output_padding": [0, 0], "groups": 2,
        "bias": False, "dilation": [2, 1]}, str(layers[7]))
    bad = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="bilinear"))
    try:
        tr.arch_json(bad, [1, 3, 3], torch.nn.MSELoss())
        check("export refuses bilinear", False, "accepted")
    except ValueError as e:
        check("export refuses bilinear", "mode 'bilinear'" in str(e), str(e))


def check_net(tag, make, loss_fn, gram):
    model, x, y, shape = make()
    m64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    y64 = y if y.dtype == torch.int64 else y.double()
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, shape, loss_fn, x, y)
        tr.check_products(tag, d, m64, loss_fn, x64, y64)
        H = dense_hessian(m64, loss_fn, x64, y64)
        tr.check_dense(tag, d, "hessian", H)
        G = tr.dense_ggn(m64, loss_fn, x64, y64)
        tr.check_dense(tag, d, "ggn", G)
        res = run(d, {"op": "per_sample_gradients"})
        e = rel(res["per_sample_gradients"], per_sample(m64, loss_fn, x64, y64))
        check(tag + " per-sample gradients", e < 1e-4, f"rel err {e}")
        if gram:
            tr.check_gram_top2(tag, d, G)


def main():
    check_export()
    check_net("conv1d", net_1d, torch.nn.CrossEntropyLoss(), False)
    check_net("convt", net_convt, torch.nn.MSELoss(reduction="sum"), True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
