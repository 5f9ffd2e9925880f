#!/usr/bin/python3
"""train_monitor.py - watch the curvature of a PyTorch model while it trains.

Trains a small MLP on scikit-learn's digits (8x8 images of handwritten digits,
shipped with scikit-learn, so it works offline) and every --every steps
pushes the current weights to curvd and asks, without waiting, for

  * the top Hessian eigenvalue        (op eigen, k=1)
  * the Hessian trace                 (op trace, Hutchinson, --probes probes)
  * the SNR of the top GGN direction  (op snr, k=1, Monte Carlo Fisher columns)

on a fixed batch of the training set.  The jobs pin the weights they were
submitted with, so training goes on while curvd computes; a background thread
collects the results.  At the end it writes a plot of curvature over steps.

With --instruments it uses curvd's training monitor instead (Cockpit's instruments:
curvd_client.monitor.Monitor; op instruments on every pushed version, in the daemon's
low-priority lane, coalesced when training outruns it): step() pushes the weights on a
background thread, and the plot is a grid with every scalar instrument over the model
versions; --tensorboard DIR and --csv FILE export the history (TensorBoard event files
written without TensorBoard).

Needs: PyTorch, scikit-learn and matplotlib (Debian: python3-torch
python3-sklearn python3-matplotlib; run with /usr/bin/python3) and a running
daemon (`curvd serve`).

    /usr/bin/python3 clients/python/examples/train_monitor.py \\
        --url http://127.0.0.1:8080 --steps 300 --every 25 --out curvature.png
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

# Run from a checkout without installing the client.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from curvd_client import Client, CurvdError, Job  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("CURVD_URL", "http://127.0.0.1:8080"),
                   help="curvd base URL (default $CURVD_URL or http://127.0.0.1:8080)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--every", type=int, default=25, help="measure every k steps (default 25)")
    p.add_argument("--out", default="curvature.png", help="PNG plot to write")
    p.add_argument("--json", default=None, help="also write the measurements as JSON here")
    p.add_argument("--name", default="train-monitor",
                   help="model name on the server (dataset: NAME-data); replaced if present")
    p.add_argument("--batch-size", type=int, default=64, help="SGD mini-batch (default 64)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    p.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    p.add_argument("--curv-batch", type=int, default=512,
                   help="training samples the curvature is measured on (default 512)")
    p.add_argument("--probes", type=int, default=30, help="Hutchinson probes (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruments", action="store_true",
                   help="Cockpit's instruments through a curvd training monitor (see above)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="with --instruments: write the history as TensorBoard scalars here")
    p.add_argument("--csv", default=None, help="with --instruments: the history as CSV here")
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds to wait for the last results after training (default 120)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.every < 1:
        p.error("--steps and --every must be >= 1")
    return a


def load_digits(seed: int) -> Tuple[Any, Any, Any, Any]:
    """scikit-learn's digits as torch tensors: pixels / 16, 1500 training and 297 test samples."""
    import torch
    from sklearn.datasets import load_digits as sk_load_digits
    d = sk_load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1500], perm[1500:]
    return x[tr], y[tr], x[te], y[te]


class Collector(threading.Thread):
    """Waits for submitted jobs in the background and files their results by (kind, step)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.todo: "queue.Queue[Optional[Tuple[str, int, Job]]]" = queue.Queue()
        self.results: Dict[str, Dict[int, Dict[str, Any]]] = {}
        self.errors: List[str] = []
        self.lock = threading.Lock()

    def add(self, kind: str, step: int, job: Job) -> None:
        self.todo.put((kind, step, job))

    def run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            kind, step, job = item
            try:
                res = job.wait(timeout=300, poll=5)
                with self.lock:
                    self.results.setdefault(kind, {})[step] = res
            except CurvdError as e:
                with self.lock:
                    self.errors.append("step %d %s: %s" % (step, kind, e))

    def finish(self, timeout: float) -> bool:
        """Stops after the queued jobs; False if they did not all finish in time."""
        self.todo.put(None)
        self.join(timeout)
        return not self.is_alive()


def measurements(client: Client, model: str, dataset: str, step: int, batch: Dict[str, int],
                 probes: int, seed: int) -> List[Tuple[str, Job]]:
    """Submits the three curvature jobs for the weights just pushed; returns at once."""
    common = {"model": model, "dataset": dataset, "batch": batch, "seed": seed + step}
    return [
        ("eigen", client.submit(common, op="eigen", options={"k": 1})),
        ("trace", client.submit(common, op="trace",
                                options={"method": "hutchinson", "max_probes": probes})),
        ("snr", client.submit(common, op="snr", curvature="fisher_mc", options={"k": 1})),
    ]


def plot(path: str, loss_steps: List[int], losses: List[float],
         res: Dict[str, Dict[int, Dict[str, Any]]], acc: Dict[int, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    ax[0, 0].plot(loss_steps, losses, color="0.6", lw=0.8, label="mini-batch loss")
    if acc:
        ax2 = ax[0, 0].twinx()
        s = sorted(acc)
        ax2.plot(s, [acc[k] for k in s], "o-", color="tab:green", ms=3, label="test accuracy")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("test accuracy", color="tab:green")
    ax[0, 0].set_title("training loss")
    ax[0, 0].set_ylabel("cross-entropy")
    handles = ax[0, 0].get_legend_handles_labels()
    if acc:
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    ax[0, 0].legend(*handles, loc="center right", fontsize=8)

    e = res.get("eigen", {})
    s = sorted(e)
    ax[0, 1].plot(s, [e[k]["eigenvalues"][0] for k in s], "o-", color="tab:red", ms=4)
    ax[0, 1].set_title("top Hessian eigenvalue")
    ax[0, 1].set_ylabel(r"$\lambda_{max}$")

    t = res.get("trace", {})
    s = sorted(t)
    ax[1, 0].errorbar(s, [t[k]["trace"] for k in s], yerr=[t[k].get("stderr", 0) for k in s],
                      fmt="o-", color="tab:blue", ms=4, capsize=3)
    ax[1, 0].set_title("Hessian trace (Hutchinson, ± stderr)")
    ax[1, 0].set_ylabel("tr H")
    ax[1, 0].set_xlabel("training step")

    n = res.get("snr", {})
    s = [k for k in sorted(n) if n[k].get("directions")]
    for key, color, label in (("gamma_snr", "tab:purple", "gradient SNR (gamma)"),
                              ("lambda_snr", "tab:orange", "curvature SNR (lambda)")):
        pts = [(k, n[k]["directions"][0].get(key)) for k in s]
        pts = [(k, v) for k, v in pts if isinstance(v, (int, float)) and v > 0]
        if pts:
            ax[1, 1].semilogy([p[0] for p in pts], [p[1] for p in pts], "o-", color=color,
                              ms=4, label=label)
    ax[1, 1].set_title("SNR along the top GGN direction")
    ax[1, 1].set_xlabel("training step")
    ax[1, 1].legend(fontsize=8)
    for a in ax.flat:
        a.grid(alpha=0.3)
    fig.suptitle("curvd: curvature while training an MLP on digits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_instruments(path: str, history: List[Dict[str, Any]]) -> List[str]:
    """A grid with one small plot per scalar instrument over the model versions; the names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from curvd_client.tensorboard import scalar_instruments

    series: Dict[str, List[Tuple[int, float]]] = {}
    for e in history:
        for k, v in scalar_instruments(e).items():
            series.setdefault(k, []).append((e["version"], v))
    names = sorted(series)
    cols = 4
    rows = max(1, (len(names) + cols - 1) // cols)
    fig, ax = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    for a, name in zip(ax.flat, names):
        pts = sorted(series[name])
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3)
        a.set_title(name, fontsize=9)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
    for a in list(ax.flat)[len(names):]:
        a.axis("off")
    fig.suptitle("curvd training monitor: Cockpit's instruments per model version")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return names


def main_instruments(args: argparse.Namespace, client: Client, model: Any, loss_fn: Any,
                     opt: Any, xtr: Any, ytr: Any, batch: Dict[str, int], data_name: str) -> int:
    """The training loop with a curvd Monitor: push at every --every steps, then plot and
    export the monitor's history."""
    import torch
    from curvd_client.monitor import Monitor
    from curvd_client import tensorboard

    mon = Monitor(client, args.name, data_name, every=1, batch=batch,
                  probes=min(args.probes, 10), lanczos_steps=10, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    perm, pos = torch.randperm(len(ytr), generator=g), 0
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            mon.step(model)  # returns at once
        if step == args.steps:
            break
        if pos + args.batch_size > len(ytr):
            perm, pos = torch.randperm(len(ytr), generator=g), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        opt.zero_grad()
        loss_fn(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    mon.close()
    last = client.get_model(args.name)["version"]
    history = mon.wait_for_version(last, timeout=args.timeout)
    print("pushed %d versions (%d superseded before their push); %d history entries, "
          "%d monitored versions skipped by coalescing"
          % (mon.pushed, mon.dropped, len(history), sum(e.get("skipped", 0) for e in history)))
    names = plot_instruments(args.out, history)
    print("instruments: %s\nwrote %s" % (", ".join(names), args.out))
    if args.tensorboard:
        print("TensorBoard events: %s" % tensorboard.write_history(history, args.tensorboard))
    if args.csv:
        tensorboard.write_history_csv(history, args.csv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"history": history, "pushed": mon.pushed, "dropped": mon.dropped}, f)
    mon.delete()
    done = any(e.get("version") == last for e in history)
    return 0 if done and mon.error is None else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        import torch
        from torch import nn
        from curvd_client.torch_export import export_dataset, export_model, state_dict_bytes
    except ImportError as e:
        print("train_monitor: %s\n(run with /usr/bin/python3 on Debian: python3-torch)" % e,
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    client = Client(args.url, timeout=30)
    try:
        client.health()
    except CurvdError as e:
        print("train_monitor: %s (start it with: curvd serve)" % e, file=sys.stderr)
        return 1
    data_name = args.name + "-data"
    arch, params = export_model(model, loss_fn, input_shape=[64])
    for fn in (client.delete_model, client.delete_dataset):  # a previous run's leftovers
        try:
            fn(args.name if fn == client.delete_model else data_name)
        except CurvdError as e:
            if e.status != 404:
                raise
    client.register_dataset(data_name, export_dataset(xtr, ytr))
    client.register_model(args.name, arch, params)
    batch = {"offset": 0, "size": min(args.curv_batch, len(ytr))}
    print("registered model %s (%d parameters) and dataset %s (%d samples); measuring on %d "
          "samples every %d steps" % (args.name, sum(p.numel() for p in model.parameters()),
                                      data_name, len(ytr), batch["size"], args.every))

    if args.instruments:
        return main_instruments(args, client, model, loss_fn, opt, xtr, ytr, batch, data_name)
    collector = Collector()
    collector.start()
    loss_steps: List[int] = []
    losses: List[float] = []
    acc: Dict[int, float] = {}
    versions: Dict[int, int] = {}
    g = torch.Generator().manual_seed(args.seed + 1)
    perm = torch.randperm(len(ytr), generator=g)
    pos = 0
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            # Measure the weights as they are before this step's update.
            info = client.push_parameters(args.name, state_dict_bytes(model))
            versions[step] = info["version"]
            for kind, job in measurements(client, args.name, data_name, step, batch,
                                          args.probes, args.seed):
                collector.add(kind, step, job)
            with torch.no_grad():
                acc[step] = float((model(xte).argmax(1) == yte).float().mean())
            with collector.lock:
                done = sum(len(v) for v in collector.results.values())
            print("step %4d  loss %s  test acc %.3f  model v%d  (%d results in so far)"
                  % (step, "%.4f" % losses[-1] if losses else "  -   ", acc[step],
                     info["version"], done))
        if step == args.steps:
            break
        if pos + args.batch_size > len(ytr):
            perm = torch.randperm(len(ytr), generator=g)
            pos = 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        opt.zero_grad()
        loss = loss_fn(model(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        loss_steps.append(step)
        losses.append(float(loss))
    t_train = time.monotonic() - t0
    ok = collector.finish(args.timeout)
    res = collector.results
    for err in collector.errors:
        print("train_monitor: job failed: %s" % err, file=sys.stderr)
    if not ok:
        print("train_monitor: gave up waiting for results after %g s" % args.timeout,
              file=sys.stderr)

    print("\n step   lambda_max      trace (± stderr)      gamma_snr   lambda_snr")
    nan = float("nan")
    for step in sorted(versions):
        eig = res.get("eigen", {}).get(step)
        tr = res.get("trace", {}).get(step)
        snr = res.get("snr", {}).get(step)
        top = ((snr or {}).get("directions") or [{}])[0]
        print("%5d  %11.5g  %11.5g ± %-8.3g  %10.4g  %10.4g" % (
            step, eig["eigenvalues"][0] if eig else nan, tr["trace"] if tr else nan,
            tr.get("stderr", nan) if tr else nan,
            top.get("gamma_snr") or nan, top.get("lambda_snr") or nan))
    plot(args.out, loss_steps, losses, res, acc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": sorted(versions), "versions": versions, "loss": losses,
                       "test_accuracy": acc, "results": res, "errors": collector.errors}, f)
    print("\ntraining took %.2f s, everything %.2f s; wrote %s"
          % (t_train, time.monotonic() - t0, args.out))
    return 0 if ok and not collector.errors else 1


if __name__ == "__main__":
    sys.exit(main())
