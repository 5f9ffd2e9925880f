"""e2e_torch_loss.py - CrossEntropyLoss's label_smoothing and ignore_index
through `curvd run`, against torch.autograd in float64 on the same weights and
batch: loss, gradient, Hessian- and GGN-vector products, and the refusals of
labels outside [0, C) and of a batch whose every label is ignored.

Usage: /usr/bin/python3 tests/e2e_torch_loss.py build/curvd
Ends with 'N passed, M failed'.  (Sequence outputs, class_dim -1 and NLLLoss
need the graph form; tests/test_losses.c checks them against a double
reference.)
"""
import copy
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402


def write_case(d, model, loss_fn, x, y, loss_obj):
    tr.write_case(d, model, [x.shape[1]], torch.nn.CrossEntropyLoss(
        reduction=loss_fn.reduction), x, y)
    with open(os.path.join(d, "arch.json")) as f:
        arch = json.load(f)
    arch["loss"].update(loss_obj)
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch, f)


def check_case(tag, model, loss_fn, x, y, d):
    tr.check_products(tag, d, copy.deepcopy(model).double(), loss_fn, x.double(), y,
                      loss_atol=1e-7)


def main():
    cases = [
        ("smoothing-mean", dict(label_smoothing=0.2), {"label_smoothing": 0.2}, -100),
        ("ignore1-sum", dict(ignore_index=1, reduction="sum"), {"ignore_index": 1}, 1),
        ("smoothing-ignore-mean", dict(label_smoothing=0.1, ignore_index=2),
         {"label_smoothing": 0.1, "ignore_index": 2}, 2),
        ("default-ignore-mean", dict(), {}, -100),
    ]
    for i, (tag, kw, obj, ign) in enumerate(cases):
        loss_fn = torch.nn.CrossEntropyLoss(**kw)
        model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.CrossEntropyLoss(), seed=10 + i)
        y[::3] = ign  # a third of the labels left out (-100 is also PyTorch's default)
        with tempfile.TemporaryDirectory() as d:
            write_case(d, model, loss_fn, x, y, obj)
            check_case(tag, model, loss_fn, x, y, d)
            if i == 0:
                y_bad = y.clone()
                y_bad[1] = 3
                write_case(d, model, loss_fn, x, y_bad, obj)
                rc, err = tr.curvd_run(CURVD, d, {"op": "loss"}, expect_ok=False)
                check("label outside [0, C) refused", rc != 0 and "y[1] = 3" in
                      err.get("error", {}).get("message", ""), str(err))
                write_case(d, model, loss_fn, x, torch.full_like(y, -100), obj)
                rc, err = tr.curvd_run(CURVD, d, {"op": "loss"}, expect_ok=False)
                check("every label ignored refused", rc != 0 and "ignore_index" in
                      err.get("error", {}).get("message", ""), str(err))
    return summary()


if __name__ == "__main__":
    sys.exit(main())
