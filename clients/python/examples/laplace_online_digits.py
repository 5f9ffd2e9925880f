#!/usr/bin/python3
"""laplace_online_digits.py - online Laplace (continual learning) through curvd.

Two tasks on scikit-learn's digits: task A the digits 0-4, task B the digits 5-9 (one
10-way MLP; each task is scored on its own five classes, the "multi-head" evaluation of
split-MNIST). The sequence (Botev's thesis §5.1.3, Ritter et al. 2018; docs/interface.md,
laplace, "Online Laplace"):

  1. train the MAP network on task A (prior N(0, 1/prior) as weight decay);
  2. op laplace on A's training split with structure kron, optimize_prior and
     "keep": "online": the posterior N(theta_A, Lambda_A^-1), kept by the server under
     the model's version 1;
  3. train on task B from theta_A with the Laplace penalty 1/2 (theta - theta_A)^T
     Lambda_A (theta - theta_A), Lambda_A = ggn_factor (B (x) A) + delta I per layer
     (op kfac gives the client the factors A and B of task A; ggn_factor and delta are
     laplace's), and push theta_B (version 2);
  4. op laplace on B's split with "accumulate_into": "online": Lambda_B = Lambda_A +
     ggn_factor_B (B_B (x) A_B), kept at version 2 (kron: the pooled factors);
  5. op predict with "posterior": "online" on both tasks' test inputs: the accumulated
     posterior's predictive.

It compares, per task, the network fine-tuned on B without a penalty (forgets A), the
one trained with the Laplace penalty (the MAP of the online posterior), and the Laplace
predictive of the accumulated posterior at that MAP. A full run (default options: a
64-64-10 tanh MLP, 400 Adam steps per task, 75% of each task's digits to train) printed:

    task A: laplace kron kept as 'online': 4810 parameters, prior precision 3.344, evidence -133.09
    task B: accumulated into 'online': 2 tasks, log det of the posterior precision 6390.62 (task A's: 5963.74)

    task  network                         accuracy       NLL       ECE
    A     fine-tuned on B (no penalty)      0.3721    1.5962    0.1613
    A     online Laplace MAP                0.9860    0.0778    0.0256
    A     online Laplace predictive         0.9860    0.2684    0.1974
    B     fine-tuned on B (no penalty)      0.9745    0.0710    0.0089
    B     online Laplace MAP                0.9787    0.0762    0.0094
    B     online Laplace predictive         0.9787    0.1414    0.0789

The penalty of task A's kept posterior keeps task A (0.986 vs 0.372 fine-tuned without
it) at no cost on task B; the predictive of the accumulated posterior is, as in
laplace_digits.py, underconfident here (higher NLL and ECE than its MAP at the same
accuracy).  The client needs Lambda_A for the penalty: op kfac returns task A's factors
(the same type-2 factors laplace kept), while the server keeps the posterior itself;
a third task's penalty would need the accumulated (pooled) factors, which curvd keeps
but does not return.

Needs PyTorch and scikit-learn (Debian: python3-torch python3-sklearn; run with
/usr/bin/python3) and a running daemon (`curvd serve`):

    /usr/bin/python3 clients/python/examples/laplace_online_digits.py --url http://127.0.0.1:8080
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

# Run from a checkout without installing the client.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from curvd_client import Client  # noqa: E402
from laplace_digits import connect, digits_arrays, metrics, replace  # noqa: E402

TASKS = {"A": (0, 1, 2, 3, 4), "B": (5, 6, 7, 8, 9)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("CURVD_URL", "http://127.0.0.1:8080"),
                   help="curvd base URL (default $CURVD_URL or http://127.0.0.1:8080)")
    p.add_argument("--steps", type=int, default=None,
                   help="full-batch Adam steps per task (default 400; --quick: 120)")
    p.add_argument("--quick", action="store_true", help="fewer steps and a smaller net")
    p.add_argument("--hidden", type=int, default=None, help="hidden units (default 64; --quick 32)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--prior", type=float, default=1.0, help="task A's prior precision")
    p.add_argument("--name", default="online-digits", help="model name on the server")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 120 if a.quick else 400
    if a.hidden is None:
        a.hidden = 32 if a.quick else 64
    return a


def split(client: Client, seed: int) -> Dict[str, Any]:
    """Per task: standardized (x_train, y_train, x_test, y_test), 75% / 25% of its digits."""
    import torch
    x, y = digits_arrays(client)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    ntr = int(0.75 * len(y))
    tr, te = perm[:ntr], perm[ntr:]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    out = {}
    for t, classes in TASKS.items():
        mask = torch.zeros(len(y), dtype=torch.bool)
        for c in classes:
            mask |= y == c
        a, b = tr[mask[tr]], te[mask[te]]
        out[t] = (x[a], y[a], x[b], y[b])
    return out


def kron_penalty(model: Any, theta0: List[Any], layers: List[Dict[str, Any]], factor: float,
                 delta: float) -> Any:
    """1/2 (theta - theta0)^T Lambda (theta - theta0) with Lambda = factor P (B (x) A) P^T
    + delta I per Linear layer (W~ = [W | b]: 1/2 factor tr(dW~^T B dW~ A))."""
    import torch
    ps = list(model.parameters())
    total = 0.5 * delta * sum(((p - q) ** 2).sum() for p, q in zip(ps, theta0))
    for i, lay in enumerate(layers):
        W, b = ps[2 * i], ps[2 * i + 1]
        dW = torch.cat([W - theta0[2 * i], (b - theta0[2 * i + 1])[:, None]], dim=1)
        total = total + 0.5 * factor * torch.trace(dW.T @ lay["B"] @ dW @ lay["A"])
    return total


def train(model: Any, x: Any, y: Any, steps: int, lr: float, penalty: Any) -> Any:
    """Full-batch Adam on the mean cross-entropy plus penalty(model) / N."""
    import torch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y) + penalty(model) / len(y)
        loss.backward()
        opt.step()
    return model


def task_scores(probs: Any, y: Any, classes: Any) -> Dict[str, float]:
    """metrics() on the task's own classes (the probabilities renormalized over them)."""
    import numpy as np
    p = np.asarray(probs, dtype=np.float64)[:, list(classes)]
    p = p / p.sum(1, keepdims=True)
    return metrics(p, np.asarray(y) - classes[0])


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    client, rc = connect("laplace_online_digits", args.url, 120)
    if client is None:
        return rc
    import torch
    from torch import nn
    from curvd_client.torch_export import export_dataset, export_model
    t0 = time.monotonic()
    data = split(client, args.seed)
    xa, ya, xa_te, ya_te = data["A"]
    xb, yb, xb_te, yb_te = data["B"]
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    loss_fn = nn.CrossEntropyLoss()
    prior = args.prior

    # 1. task A's MAP
    train(model, xa, ya, args.steps, args.lr,
          lambda m: 0.5 * prior * sum((p * p).sum() for p in m.parameters()))
    theta_a = [p.detach().clone() for p in model.parameters()]

    # 2. register, fit and keep task A's posterior (version 1)
    replace(client, "model", args.name)
    for t in ("A", "B"):
        replace(client, "dataset", "%s-%s" % (args.name, t))
        client.register_dataset("%s-%s" % (args.name, t), export_dataset(*data[t][:2]))
    client.register_model(args.name, *export_model(model, loss_fn, [64]))
    job = {"model": args.name, "batch": "all"}
    fit_a = client.run(dict(job, dataset=args.name + "-A"), op="laplace",
                       options={"structure": "kron", "optimize_prior": True, "keep": "online"},
                       timeout=300)
    delta = fit_a["prior_precision"]
    print("task A: laplace kron kept as %r: %d parameters, prior precision %.4g, evidence %.2f"
          % (fit_a["posterior"], fit_a["n_params"], delta, fit_a["log_marginal_likelihood"]))

    # 3. task B with the Laplace penalty (A's factors from op kfac), and without (fine-tune)
    kf = client.run(dict(job, dataset=args.name + "-A"), op="kfac", curvature="kfac",
                    options={"return_factors": True}, timeout=300)
    layers = [{"A": torch.tensor(lay["A"], dtype=torch.float32),
               "B": torch.tensor(lay["B"], dtype=torch.float32)} for lay in kf["layers"]]
    factor = fit_a["ggn_factor"]
    finetuned = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    finetuned.load_state_dict(model.state_dict())
    train(finetuned, xb, yb, args.steps, args.lr,
          lambda m: 0.5 * delta * sum((p * p).sum() for p in m.parameters()))
    train(model, xb, yb, args.steps, args.lr,
          lambda m: kron_penalty(m, theta_a, layers, factor, delta))
    client.push_parameters(args.name, export_model(model, loss_fn, [64])[1])

    # 4. accumulate task B's curvature into the kept posterior (version 2)
    fit_b = client.run(dict(job, dataset=args.name + "-B"), op="laplace",
                       options={"structure": "kron", "accumulate_into": "online"}, timeout=300)
    print("task B: accumulated into %r: %d tasks, log det of the posterior precision %.2f "
          "(task A's: %.2f)" % (fit_b["posterior"], fit_b["kept"]["tasks"],
                                fit_b["kept"]["log_det_posterior_precision"],
                                fit_a["kept"]["log_det_posterior_precision"]))

    # 5. the predictive of the accumulated posterior on both tasks' test inputs
    rows = []
    for t, (x_te, y_te) in (("A", (xa_te, ya_te)), ("B", (xb_te, yb_te))):
        classes = TASKS[t]
        with torch.no_grad():
            ft = torch.softmax(finetuned(x_te), 1).numpy()
            mp = torch.softmax(model(x_te), 1).numpy()
        r = client.run(dict(job, dataset=args.name + "-" + t), op="predict",
                       options={"posterior": "online", "x": x_te.reshape(-1).tolist()},
                       timeout=300)
        rows.append((t, "fine-tuned on B (no penalty)", task_scores(ft, y_te, classes)))
        rows.append((t, "online Laplace MAP", task_scores(mp, y_te, classes)))
        rows.append((t, "online Laplace predictive", task_scores(r["probs"], y_te, classes)))
    print("\n%-5s %-30s %9s %9s %9s" % ("task", "network", "accuracy", "NLL", "ECE"))
    for t, label, m in rows:
        print("%-5s %-30s %9.4f %9.4f %9.4f" % (t, label, m["accuracy"], m["nll"], m["ece"]))
    print("\n(%.1f s in all)" % (time.monotonic() - t0))
    ok = all(math.isfinite(m[k]) for _, _, m in rows for k in m)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
