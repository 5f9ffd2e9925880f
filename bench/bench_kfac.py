"""bench_kfac.py - Kronecker factors (issue 22): curvd's op "kfac" against a PyTorch
implementation of the same factors the way curvlinops and BackPACK compute them (forward
hooks for the layer inputs, backward hooks for the output gradients, one backward pass per
backpropagated column), same float32 weights and batch, same threads.

Cases: bench.py's MLP 784-512-512-10 (N = 512) and CNN (2c2d-like, N = 128), CrossEntropyLoss
mean.  Work: every Linear/Conv2d layer's A (layer inputs with a 1 appended, patches for
Conv2d: KFC "expand") and B for fisher_type
  type-2     the C columns of the loss Hessian's square root S_n = diag(sqrt p) - p sqrt(p)^T
             (times sqrt(1/N) for the mean) backpropagated: C backward passes;
  empirical  the data gradient: one backward pass.
curvd: `curvd run` with {"op": "kfac", "options": {"fisher_type": ..., "return_factors":
false}} and its elapsed_s (the job: forward pass, factors, their eigenvalues); torch: the best
of --reps of forward + backward passes + the factor GEMMs (+ eigenvalues of each factor, as
curvd reports them).  Both sides pinned to --threads BLAS threads.  The traces tr(A) tr(B)
per layer must agree to 1e-4 relative (float32 sums in different orders).

Second target: one KFAC natural-gradient step (op newton, method kfac, damping 1e-3,
damping_mode exact) on the bench MLP against curvd's own op gradient on the same batch,
the ratio of the best-of-reps times (issue 22: <= 3x); --step-cases.

Usage: python3 bench/bench_kfac.py [--curvd build/curvd] [--cases mlp,cnn] [--threads 2]
       [--reps 3] [--fisher type-2,empirical] [--step-cases mlp] [--json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blas_env  # noqa: E402,F401  (before torch: its BLAS threads)
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import bench  # noqa: E402  (the bench models)
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402


def layers_of(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def with_ones(a):
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)


def torch_factors(model, x, y, fisher):
    """{layer index: (A, B)} the curvlinops way: hooks, one backward pass per column."""
    mods = layers_of(model)
    acts, grads = {}, {m: [] for m in mods}
    hooks = [m.register_forward_hook(lambda m, i, o: acts.__setitem__(m, i[0].detach()))
             for m in mods]
    hooks += [m.register_full_backward_hook(lambda m, gi, go: grads[m].append(go[0].detach()))
              for m in mods]
    out = model(x)
    n, c = out.shape
    if fisher == "type-2":
        p = torch.softmax(out.detach(), 1)
        sp = p.sqrt()
        cols = [(torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1))[:, :, j] / n ** 0.5
                for j in range(c)]
        for j, col in enumerate(cols):
            out.backward(col, retain_graph=j + 1 < c)
    else:  # empirical: B = (1/c) g g^T with g = dL_n/dz = (1/N) dl_n/dz, c = 1/N
        loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
        loss.backward()
    for h in hooks:
        h.remove()
    res = []
    for m in mods:
        a = acts[m]
        if isinstance(m, torch.nn.Conv2d):
            cols_ = torch.nn.functional.unfold(a, m.kernel_size, padding=m.padding,
                                               stride=m.stride)  # N x K x P
            pos = cols_.shape[2]
            a2 = cols_.transpose(1, 2).reshape(-1, cols_.shape[1])
            gs = [g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) for g in grads[m]]
            scale_a = n * pos
        else:
            a2, gs, scale_a = a, grads[m], n
        if m.bias is not None:
            a2 = with_ones(a2)
        A = a2.T @ a2 / scale_a
        B = sum(g.T @ g for g in gs)
        if fisher == "empirical":
            B = B / n  # B = c * sum dl dl^T with c = 1/N (the sum's gradients are dl)
        res.append((A, B))
    return res


def time_torch(model, x, y, fisher, reps, eig=True):
    best, res = None, None
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        res = torch_factors(model, x, y, fisher)
        for A, B in res if eig else ():  # curvd reports the factors' eigenvalues: so
            torch.linalg.eigvalsh(A)       # does this side
            torch.linalg.eigvalsh(B)
        t = time.perf_counter() - t0
        best = t if best is None else min(best, t)
    return best, res


def write_case(d, model, shape, x, y):
    """The model (CrossEntropyLoss) and the batch as curvd run's files in d."""
    arch, params = export_model(model, torch.nn.CrossEntropyLoss(), shape, 1, x)
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch, f)
    with open(os.path.join(d, "params.safetensors"), "wb") as f:
        f.write(params)
    with open(os.path.join(d, "data.safetensors"), "wb") as f:
        f.write(export_dataset(x, y))


def run_curvd(curvd, d, fisher, threads, reps, eig=True):
    job = {"op": "kfac", "options": {"fisher_type": fisher, "return_factors": False,
                                     "eigenvalues": eig}}
    return run_job(curvd, d, job, threads, reps)


def run_job(curvd, d, job, threads, reps):
    """Best elapsed_s of reps runs of one curvd job on the files in d, and the last result."""
    best, res = None, None
    for _ in range(reps):
        p = subprocess.run([curvd, "run", "--arch", os.path.join(d, "arch.json"),
                            "--params", os.path.join(d, "params.safetensors"),
                            "--data", os.path.join(d, "data.safetensors"), "--job", "-",
                            "--blas-threads", str(threads)],
                           input=json.dumps(job), capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise SystemExit("curvd failed: " + p.stderr[-1000:])
        res = json.loads(p.stdout)
        best = res["elapsed_s"] if best is None else min(best, res["elapsed_s"])
    return best, res


def time_step(args, cases, name):
    """The issue's second target: one KFAC natural-gradient step -(F~ + lambda I)^-1 g
    (op newton, method kfac: the type-2 factors, their eigendecompositions, the gradient,
    the step) against curvd's own op gradient on the same batch, each the best of reps."""
    make, shape, n = cases[name]
    torch.manual_seed(1)
    model = make().eval()
    x = torch.randn(n, *shape)
    y = torch.randint(0, 10, (n,))
    with tempfile.TemporaryDirectory() as d:
        write_case(d, model, shape, x, y)
        job = {"op": "newton", "options": {"method": "kfac", "damping": 1e-3,
                                           "damping_mode": "exact"}}
        tn, rn = run_job(args.curvd, d, job, args.threads, args.reps)
        tg, rg = run_job(args.curvd, d, {"op": "gradient"}, args.threads, args.reps)
    ok = len(rn.get("step", [])) == rg.get("num_params") and rn.get("method") == "kfac"
    return {"case": name, "n": n, "newton_s": tn, "gradient_s": tg, "ratio": tn / tg, "ok": ok}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--curvd", default=os.path.join(HERE, "..", "build", "curvd"))
    ap.add_argument("--cases", default="mlp,cnn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fisher", default="type-2,empirical")
    ap.add_argument("--work", default="factors,eigenvalues",
                    help="factors: the factors only (curvd: eigenvalues false; torch: hooks + "
                         "GEMMs, the issue's 'computing all factors'); eigenvalues: also each "
                         "factor's eigenvalues on both sides")
    ap.add_argument("--step-cases", default="mlp",
                    help="cases timing the KFAC natural-gradient step against the gradient "
                         "('' for none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    cases = {"mlp": (bench.mlp_model, [784], 512), "cnn": (bench.cnn_model, [1, 28, 28], 128)}
    rows, bad = [], 0
    for name in args.cases.split(","):
        make, shape, n = cases[name]
        model = make().eval()
        x = torch.randn(n, *shape)
        y = torch.randint(0, 10, (n,))
        with tempfile.TemporaryDirectory() as d:
            write_case(d, model, shape, x, y)
            for fisher, work in [(f, w) for f in args.fisher.split(",")
                                 for w in args.work.split(",")]:
                eig = work == "eigenvalues"
                tc, res = run_curvd(args.curvd, d, fisher, args.threads, args.reps, eig)
                tt, ref = time_torch(model, x, y, fisher, args.reps, eig)
                kron = [lay for lay in res["layers"] if lay["kind"] == "kronecker"]
                worst = 0.0
                for lay, (A, B) in zip(kron, ref):
                    want = float(torch.trace(A) * torch.trace(B))
                    worst = max(worst, abs(lay["trace"] - want) / max(abs(want), 1e-30))
                bad += worst > 1e-4 or len(kron) != len(ref)
                rows.append({"case": name, "n": n, "fisher_type": fisher, "work": work,
                             "curvd_s": tc,
                             "torch_s": tt, "speedup": tt / tc, "trace_rel_diff": worst})
    steps = []
    for name in args.step_cases.split(",") if args.step_cases else []:
        steps.append(time_step(args, cases, name))
        bad += not steps[-1]["ok"]
    if args.json:
        print(json.dumps({"factors": rows, "kfac_step": steps}, indent=1))
    else:
        print(f"threads {args.threads}, best of {args.reps}")
        print("| case | N | fisher_type | work | curvd s | torch s | speed-up | traces rel. diff |")
        print("|---|---:|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['case']} | {r['n']} | {r['fisher_type']} | {r['work']} | "
                  f"{r['curvd_s']:.4g} | "
                  f"{r['torch_s']:.4g} | {r['speedup']:.2f}x | {r['trace_rel_diff']:.1e} |")
        if steps:
            print("\nKFAC natural-gradient step (op newton, method kfac, damping 1e-3, exact) "
                  "against curvd's gradient on the same batch (target <= 3x)")
            print("| case | N | newton kfac s | gradient s | ratio |")
            print("|---|---:|---:|---:|---:|")
            for r in steps:
                print(f"| {r['case']} | {r['n']} | {r['newton_s']:.4g} | {r['gradient_s']:.4g} | "
                      f"{r['ratio']:.2f}x |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
