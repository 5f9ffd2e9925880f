#!/usr/bin/python3
"""laplace_digits.py - a Laplace posterior for a PyTorch classifier, fitted by curvd.

Trains a small MLP on scikit-learn's digits (8x8 images of handwritten digits, 10
classes, 1,797 samples; a fixed train/test split, standardized pixels), then asks a
curvd daemon for the Laplace approximation of its posterior (op laplace, laplace-torch's
conventions, docs/interface.md "laplace"):

  * structure "kron" (KFAC factors) and "last_layer" (the output layer, dense), each
    with optimize_prior: the prior precision that maximizes the evidence (the log
    marginal likelihood), computed from the curvature once;
  * op predict at those priors: the linearized (GLM) predictive on the test inputs
    (options.x), with probit-approximated class probabilities.

It compares the MAP network (the softmax of its logits, in torch) with the Laplace
predictives on the test split: accuracy, negative log-likelihood and expected calibration
error (10 equal-width confidence bins), and draws reliability diagrams of MAP vs Laplace
(kron) side by side.  A full run (default options, 1347 train / 450 test digits, a
64-64-10 tanh MLP, 500 steps) printed:

    laplace kron: 4810 parameters, optimized prior precision 4.173, evidence -504.05
    laplace last_layer: 650 parameters, optimized prior precision 1.485, evidence -121.57
    test split              accuracy       NLL       ECE  confidence
    MAP                       0.9733    0.1008    0.0078      0.9715
    Laplace (kron)            0.9711    0.2464    0.1462      0.8250
    Laplace (last_layer)      0.9711    0.1461    0.0631      0.9080
    ECE MAP 0.0078 vs Laplace (kron) 0.1462, NLL MAP 0.1008 vs Laplace (kron) 0.2464

On this in-distribution test split the MAP network is already well calibrated, and the
Laplace predictives at the evidence-optimized prior are *under*confident (their mean
confidence is below their accuracy: the bars of the right-hand diagram stand above the
diagonal); the whole-network (kron) posterior more so than the last layer's.  It is not
KFAC's doing: the exact GGN (structure "full", under `curvd serve --dense-max 8192`)
gives ECE 0.1709, NLL 0.2777 at its optimized prior 2.678.  Laplace's
gains are usually reported on shifted or out-of-distribution inputs (Daxberger et al.
2021); choosing the prior by held-out NLL instead of the evidence (laplace-torch's
gridsearch) is the usual remedy for in-distribution underconfidence.

The posterior is always built on the job's batch (the training data: register the
training split as the job's dataset); the test split travels as options.x, and its
targets stay with the client, which computes the test metrics itself from predict's
`probs` (the same definitions as predict's own nll/accuracy/ece on a batch).

Needs PyTorch and matplotlib (Debian: python3-torch python3-matplotlib; run with
/usr/bin/python3), scikit-learn for the data (else the daemon's own "digits" demo
dataset is downloaded), and a running daemon (`curvd serve`):

    /usr/bin/python3 clients/python/examples/laplace_digits.py \\
        --url http://127.0.0.1:8080 --out laplace_digits.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

# Run from a checkout without installing the client.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from curvd_client import Client, CurvdError  # noqa: E402

BINS = 10  # equal-width confidence bins of the ECE and the reliability diagrams


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("CURVD_URL", "http://127.0.0.1:8080"),
                   help="curvd base URL (default $CURVD_URL or http://127.0.0.1:8080)")
    p.add_argument("--out", default="laplace_digits.png", help="PNG plot to write")
    p.add_argument("--steps", type=int, default=None,
                   help="full-batch Adam steps (default 500; --quick: 150)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and smaller splits (600 train / 300 test), for tests")
    p.add_argument("--hidden", type=int, default=64, help="hidden units (default 64)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--prior", type=float, default=1.0,
                   help="the training prior's precision (weight decay; default 1)")
    p.add_argument("--name", default="laplace-digits",
                   help="model name on the server (dataset: NAME-train); replaced if present")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 150 if a.quick else 500
    if a.steps < 1:
        p.error("--steps must be >= 1")
    return a


# ---- data -------------------------------------------------------------------------------

def digits_arrays(client: Client) -> Tuple[Any, Any]:
    """The 1,797 digits as (x [N, 64] float, y [N] int): scikit-learn's, else the daemon's."""
    import numpy as np
    try:
        from sklearn.datasets import load_digits
        d = load_digits()
        return d.data.astype(np.float64), d.target.astype(np.int64)
    except ImportError:
        pass
    # The daemon's demo dataset "digits" holds the same images (pixels / 16).
    from curvd_client import safetensors
    if "synthetic" in str(client.get_dataset("digits").get("source", "")):
        raise RuntimeError("no scikit-learn here and the daemon's digits are synthetic")
    t = safetensors.loads(client.get_dataset_data("digits"))
    x = np.array(t["x"].flat(), dtype=np.float64).reshape(-1, 64)
    return x, np.array(t["y"].flat(), dtype=np.int64)


def load_split(client: Client, quick: bool, seed: int) -> Tuple[Any, Any, Any, Any]:
    """A seeded train/test split (1347/450; quick: 600/300), standardized with the train
    split's mean and standard deviation, as float32/int64 tensors."""
    import torch
    x, y = digits_arrays(client)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_test = (600, 300) if quick else (1347, 450)
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)  # some border pixels are always 0
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


# ---- metrics ----------------------------------------------------------------------------

def metrics(probs: Any, y: Any) -> Dict[str, float]:
    """Accuracy, NLL (mean -log p[y]), ECE over BINS equal-width confidence bins
    (confidence 1 in the last bin), as op predict computes them on a batch, and the mean
    confidence (largest class probability)."""
    import numpy as np
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(np.float64)
    b = np.minimum((conf * BINS).astype(int), BINS - 1)
    ece = sum(abs((correct[b == i] - conf[b == i]).sum()) for i in range(BINS)) / len(y)
    nll = -np.log(np.maximum(probs[np.arange(len(y)), y], 1e-300)).mean()
    return {"accuracy": float(correct.mean()), "nll": float(nll), "ece": float(ece),
            "confidence": float(conf.mean())}


def reliability(probs: Any, y: Any) -> Tuple[Any, Any, Any]:
    """Per bin: mean confidence, accuracy and count (NaN for an empty bin)."""
    import numpy as np
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(np.float64)
    b = np.minimum((conf * BINS).astype(int), BINS - 1)
    n = np.bincount(b, minlength=BINS)
    with np.errstate(invalid="ignore"):
        mconf = np.bincount(b, conf, BINS) / n
        acc = np.bincount(b, correct, BINS) / n
    return mconf, acc, n


def plot(path: str, panels: List[Tuple[str, Any, Dict[str, float]]], y: Any) -> None:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), sharey=True)
    edges = np.linspace(0, 1, BINS + 1)
    for ax, (title, probs, m) in zip(axes, panels):
        mconf, acc, n = reliability(probs, y)
        ax.bar(edges[:-1], np.nan_to_num(acc), width=1 / BINS, align="edge",
               edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
        lo, hi = np.fmin(acc, mconf), np.fmax(acc, mconf)  # the gap, either way round
        ax.bar(edges[:-1], np.nan_to_num(hi - lo), bottom=np.nan_to_num(lo), width=1 / BINS,
               align="edge", fill=False, edgecolor="tab:red", hatch="//",
               label="gap to the mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for i in np.flatnonzero(n):
            ax.text(edges[i] + 0.5 / BINS, 0.02, str(n[i]), ha="center", fontsize=7,
                    color="white" if acc[i] > 0.1 else "black")
        ax.set_title("%s\nacc %.3f  NLL %.3f  ECE %.3f"
                     % (title, m["accuracy"], m["nll"], m["ece"]))
        ax.set_xlabel("confidence (largest class probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("accuracy (samples per bin at the bottom)")
    fig.suptitle("curvd: MAP vs Laplace on digits (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------

def train(xtr: Any, ytr: Any, hidden: int, steps: int, lr: float, prior: float,
          seed: int) -> Any:
    """The MAP network under the prior N(0, 1/prior): full-batch Adam on the mean
    cross-entropy plus prior/(2N)·|θ|² (the negative log posterior over N)."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        penalty = sum((p * p).sum() for p in model.parameters())
        loss = loss_fn(model(xtr), ytr) + prior / (2 * len(ytr)) * penalty
        loss.backward()
        opt.step()
    return model


def replace(client: Client, kind: str, name: str) -> None:
    """Deletes a previous run's model or dataset of this name, if any."""
    try:
        (client.delete_model if kind == "model" else client.delete_dataset)(name)
    except CurvdError as e:
        if e.status != 404:
            raise


def connect(prog: str, url: str, timeout: float) -> Tuple[Optional[Client], int]:
    """(a client of the daemon at url, 0) when PyTorch imports and the daemon answers;
    else (None, the exit code: 2 without torch, 1 without a daemon) after a message."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        print("%s: no module named 'torch'\n(run with /usr/bin/python3 on Debian: "
              "python3-torch)" % prog, file=sys.stderr)
        return None, 2
    client = Client(url, timeout=timeout)
    try:
        client.health()
    except CurvdError as e:
        print("%s: %s (start it with: curvd serve)" % (prog, e), file=sys.stderr)
        return None, 1
    return client, 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    client, rc = connect("laplace_digits", args.url, 60)
    if client is None:
        return rc
    import torch
    from torch import nn
    from curvd_client.torch_export import export_dataset, export_model
    t0 = time.monotonic()

    # 1. The MAP network, trained in torch.
    try:
        xtr, ytr, xte, yte = load_split(client, args.quick, args.seed)
    except RuntimeError as e:
        print("laplace_digits: %s" % e, file=sys.stderr)
        return 2
    model = train(xtr, ytr, args.hidden, args.steps, args.lr, args.prior, args.seed)
    with torch.no_grad():
        map_probs = torch.softmax(model(xte), dim=1).numpy()
        train_loss = float(nn.functional.cross_entropy(model(xtr), ytr))
    print("trained a 64-%d-10 MLP: %d train / %d test samples, %d Adam steps, train loss %.4f"
          % (args.hidden, len(ytr), len(yte), args.steps, train_loss))

    # 2. Register it, and the training split (the posterior is built on the job's batch).
    data = args.name + "-train"
    replace(client, "model", args.name)
    replace(client, "dataset", data)
    client.register_dataset(data, export_dataset(xtr, ytr))
    client.register_model(args.name, *export_model(model, nn.CrossEntropyLoss(), [64]))
    job = {"model": args.name, "dataset": data, "batch": "all"}

    # 3. The Laplace posterior and its evidence, the prior precision optimized.
    fits = {}
    for label, opts in (("kron", {"structure": "kron"}),
                        ("last_layer", {"structure": "last_layer"})):
        r = client.run(job, op="laplace", options=dict(opts, optimize_prior=True), timeout=300)
        fits[label] = r
        print("laplace %-10s  %5d parameters  optimized prior precision %.4g  "
              "log marginal likelihood %.2f  (log likelihood %.2f)"
              % (label, r["n_params"], r["prior_precision"], r["log_marginal_likelihood"],
                 r["log_likelihood"]))

    # 4. The predictive on the test inputs, at the optimized priors.
    x_test = xte.reshape(-1).tolist()
    results = [("MAP", map_probs, metrics(map_probs, yte.numpy()))]
    for label in ("kron", "last_layer"):
        opts = {"structure": label, "prior_precision": fits[label]["prior_precision"],
                "x": x_test}
        r = client.run(job, op="predict", options=opts, timeout=300)
        probs = r["probs"]
        results.append(("Laplace (%s)" % label, probs, metrics(probs, yte.numpy())))

    print("\n%-22s %9s %9s %9s %11s" % ("test split", "accuracy", "NLL", "ECE", "confidence"))
    for label, _, m in results:
        print("%-22s %9.4f %9.4f %9.4f %11.4f"
              % (label, m["accuracy"], m["nll"], m["ece"], m["confidence"]))
    mp, kr = results[0][2], results[1][2]
    print("\nECE MAP %.4f vs Laplace (kron) %.4f, NLL MAP %.4f vs Laplace (kron) %.4f"
          % (mp["ece"], kr["ece"], mp["nll"], kr["nll"]))

    plot(args.out, [results[0], results[1]], yte.numpy())
    print("wrote %s (%.1f s in all)" % (args.out, time.monotonic() - t0))
    ok = all(math.isfinite(m[k]) for _, _, m in results for k in m)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
