"""e2e_laplace_online.py - kept posteriors and online Laplace (issue 23, items 1 and 3)
under curvd serve, against torch in float64.

Usage: /usr/bin/python3 tests/e2e_laplace_online.py build/curvd
A small MLP classifier (CrossEntropyLoss mean) and two tasks (datasets of 16 and 10
samples). Task 1 at parameters theta_1 (model version 1), task 2 at theta_2 (version 2,
pushed as new parameters). With H_t = g_t G_sum,t (laplace_ref.Ref's dense GGN of the
summed NLL at theta_t, g_t = 1 / (sigma^2 T)) and P0 = delta I from task 1's
prior_precision:
  - laplace keep (full, diag, kron, and keep as a name): "posterior" and "kept" in the
    result, kept.log_det_posterior_precision = log det(H_1 + P0) (kron: the dense
    P (B (x) A) P^T blocks), GET /v1/models/{name} lists them with model_version 1;
  - predict posterior on version 1: the variance J P^-1 J^T with P = H_1 + P0, equal to a
    predict that fits the same options itself;
  - after new parameters (version 2): predict posterior refused 409
    posterior_version_mismatch;
  - laplace accumulate_into on task 2 (its own prior_precision 3.0 is not added):
    kept.tasks 2, log det(P0 + H_1 + H_2) for full and diag; kron the pooled factors
    A = (N_1 A_1 + N_2 A_2) / (N_1 + N_2), B = B_1 + B_2 against their dense definition
    (and not the exact sum of Kronecker products, which differs); predict posterior on
    version 2 against J_2 P^-1 J_2^T with the accumulated P;
  - refusals: accumulate_into with another structure (400), of an unknown name (404),
    with lowrank (400), predict posterior with its own structure option (400),
    keep in-process (curvd run: 400 options.keep / options.posterior); keep beyond
    --max-registry-bytes refused at submit (413 registry_full naming the budget: a full
    posterior's D^2 doubles), a diag one kept under the same budget;
  - DELETE /v1/models/{name}/posteriors (?name= one, 404 unknown; all without it), and
    DELETE of the model drops its posteriors (a new registration has none).
Ends with 'N passed, M failed'.
"""
import copy
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients",
                                "python"))
import laplace_ref as lr  # noqa: E402
import torchref as tr  # noqa: E402
from curvd_client import Client, CurvdError  # noqa: E402
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402
from e2e_lib import CURVD, Daemon, check, summary  # noqa: E402

TOL = 1e-6
DELTA = 0.5
N1, N2 = 16, 10


def tasks():
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    m2 = copy.deepcopy(m1)
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x1, y1 = torch.randn(N1, 5), torch.randint(0, 3, (N1,))
    x2, y2 = torch.randn(N2, 5) + 0.5, torch.randint(0, 3, (N2,))
    return m1, m2, (x1, y1), (x2, y2)


def logdet(M):
    return float(torch.logdet(M))


def kron_pooled(r1, r2):
    """The accumulated kron precision's data term, dense, per layer block."""
    out = []
    for b in range(len(r1.dims)):
        A1, B1 = r1.factors[b]
        A2, B2 = r2.factors[b]
        A = (N1 * A1 + N2 * A2) / (N1 + N2)
        out.append(lr.kron_dense(A, B1 + B2))
    return out


def predict_var(ref, P, x):
    J = lr.jacobian(ref.m64, x.double())
    return J @ torch.linalg.solve(P, J.transpose(1, 2))


def rel_max(a, b):
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def run(c, job, op, options, timeout=120):
    return c.run(dict(job, op=op, options=options), timeout=timeout)


def submit_error(c, job, op, options):
    try:
        r = c.run(dict(job, op=op, options=options), timeout=120)
        return None, r
    except CurvdError as e:
        return e, None


def dense_P(ref, structure, delta, factors=None):
    """P = H + delta I for one task (g = 1)."""
    D = ref.D
    eye = torch.eye(D, dtype=torch.float64)
    if structure == "full":
        return ref.G + delta * eye
    if structure == "diag":
        return torch.diag(torch.diagonal(ref.G)) + delta * eye
    return torch.block_diag(*factors) + delta * eye


def main():
    m1, m2, (x1, y1), (x2, y2) = tasks()
    loss = torch.nn.CrossEntropyLoss()
    r1, r2 = lr.Ref(m1, x1, y1, loss), lr.Ref(m2, x2, y2, loss)
    eye = torch.eye(r1.D, dtype=torch.float64)
    k1 = [r1.kron_block(b) for b in range(len(r1.dims))]
    P1 = {st: dense_P(r1, st, DELTA, k1) for st in ("full", "diag", "kron")}
    Pacc = {"full": r1.G + r2.G + DELTA * eye,
            "diag": torch.diag(torch.diagonal(r1.G) + torch.diagonal(r2.G)) + DELTA * eye,
            "kron": torch.block_diag(*kron_pooled(r1, r2)) + DELTA * eye}
    exact_kron = torch.block_diag(*k1) + torch.block_diag(
        *[r2.kron_block(b) for b in range(len(r2.dims))]) + DELTA * eye
    with Daemon("--no-demo") as dmn:
        c = Client(dmn.url, timeout=60)
        c.register_dataset("t1", export_dataset(x1, y1))
        c.register_dataset("t2", export_dataset(x2, y2))
        c.register_model("mlp", *export_model(m1, loss, [5]))
        j1 = {"model": "mlp", "dataset": "t1", "batch": "all", "seed": 3}
        j2 = {"model": "mlp", "dataset": "t2", "batch": "all", "seed": 3}

        # ---- keep on version 1
        for st in ("full", "diag", "kron"):
            r = run(c, j1, "laplace", {"structure": st, "prior_precision": DELTA,
                                       "keep": "p-" + st})
            k = r.get("kept", {})
            want = logdet(P1[st])
            check(f"keep {st}: posterior named, 1 task, log det(H_1 + P0)",
                  r.get("posterior") == "p-" + st and k.get("tasks") == 1
                  and tr.close(k.get("log_det_posterior_precision"), want, TOL, TOL)
                  and tr.close(r.get("log_det_posterior_precision"), want, TOL, TOL),
                  f"{r.get('posterior')} {k} vs {want}")
        r = run(c, j1, "laplace", {"structure": "diag", "prior_precision": DELTA, "keep": True})
        check("keep true: the default name", r.get("posterior") == "default", str(r)[:200])
        posts = {p["name"]: p for p in c.get_model("mlp").get("posteriors", [])}
        check("GET model lists the kept posteriors with their model version and bytes",
              sorted(posts) == ["default", "p-diag", "p-full", "p-kron"]
              and all(p["model_version"] == 1 and p["tasks"] == 1 and p["bytes"] > 0
                      for p in posts.values())
              and posts["p-full"]["bytes"] >= 8 * r1.D * r1.D
              and posts["p-kron"]["structure"] == "kron",
              str(posts)[:400])

        # ---- predict with the kept posterior on version 1
        for st in ("full", "diag", "kron"):
            r = run(c, j1, "predict", {"posterior": "p-" + st, "return_covariance": True})
            S = predict_var(r1, P1[st], x1)
            e = rel_max(torch.tensor(r["covariance"], dtype=torch.float64), S)
            fit = run(c, j1, "predict", {"structure": st, "prior_precision": DELTA})
            same = max(abs(a - b) for ra, rb in zip(r["variance"], fit["variance"])
                       for a, b in zip(ra, rb))
            check(f"predict posterior p-{st}: covariance = J P^-1 J^T, P = H_1 + P0; equal to "
                  "a predict fitting the same options", e < 1e-5 and same < 1e-9
                  and r.get("posterior") == "p-" + st and r.get("tasks") == 1,
                  f"rel err {e}, vs fit {same}")

        # ---- new parameters: version 2
        c.push_parameters("mlp", tr.safetensors_bytes(m2.state_dict()))
        err, _ = submit_error(c, j2, "predict", {"posterior": "p-full"})
        check("predict posterior on a newer model version: 409 posterior_version_mismatch",
              err is not None and err.status == 409
              and err.code == "posterior_version_mismatch"
              and err.field == "options.posterior", str(err))

        # ---- accumulate task 2 (at version 2)
        for st in ("full", "diag", "kron"):
            r = run(c, j2, "laplace", {"structure": st, "prior_precision": 3.0,
                                       "accumulate_into": "p-" + st})
            k = r.get("kept", {})
            want = logdet(Pacc[st])
            ok = r.get("posterior") == "p-" + st and k.get("tasks") == 2 \
                and tr.close(k.get("log_det_posterior_precision"), want, TOL, TOL) \
                and all(tr.close(d, DELTA, 1e-12) for d in k.get("prior_precision", [0]))
            check(f"accumulate_into p-{st}: 2 tasks, the prior kept, log det(P0 + H_1 + H_2)"
                  + (" with the pooled Kronecker factors" if st == "kron" else ""), ok,
                  f"{k} vs {want}")
            if st == "kron":
                ex = logdet(exact_kron)
                check("kron: the pooled factors are not the exact sum of the Kronecker "
                      "products (the documented approximation)",
                      abs(k.get("log_det_posterior_precision", ex) - ex) > 1e-3,
                      f"{k.get('log_det_posterior_precision')} vs exact sum {ex}")
            r = run(c, j2, "predict", {"posterior": "p-" + st, "return_covariance": True})
            S = predict_var(r2, Pacc[st], x2)
            e = rel_max(torch.tensor(r["covariance"], dtype=torch.float64), S)
            check(f"predict posterior p-{st} after accumulation (version 2): J_2 P^-1 J_2^T",
                  e < 1e-5 and r.get("tasks") == 2, f"rel err {e}")
        posts = {p["name"]: p for p in c.get_model("mlp").get("posteriors", [])}
        check("accumulated posteriors moved to version 2; the others stay at version 1",
              posts["p-full"]["model_version"] == 2 and posts["p-full"]["tasks"] == 2
              and posts["default"]["model_version"] == 1, str(posts)[:300])

        # ---- refusals
        for op, opts, status, code, field in (
                ("laplace", {"structure": "diag", "accumulate_into": "p-full"}, 400,
                 "invalid_option", "options.accumulate_into"),
                ("laplace", {"structure": "full", "accumulate_into": "nope"}, 404, "not_found",
                 "options.accumulate_into"),
                ("predict", {"posterior": "nope"}, 404, "not_found", "options.posterior"),
                ("laplace", {"structure": "lowrank", "accumulate_into": "p-full"}, 400,
                 "invalid_option", "options.accumulate_into"),
                ("predict", {"posterior": "p-full", "structure": "full"}, 400, "invalid_option",
                 "options.structure"),
                ("laplace", {"keep": "bad name"}, 400, "invalid_option", "options.keep")):
            err, _ = submit_error(c, j2, op, opts)
            check(f"refused {op} {opts}: {status} {code} {field}", err is not None
                  and err.status == status and err.code == code and err.field == field,
                  str(err))
        # ---- DELETE /v1/models/{name}/posteriors (one by ?name=, unknown 404)
        st, _, raw = c.request("DELETE", "/v1/models/mlp/posteriors", query={"name": "default"})
        left = sorted(p["name"] for p in c.get_model("mlp")["posteriors"])
        check("DELETE posteriors?name=default deletes that one", st == 200
              and json.loads(raw).get("deleted") == ["default"]
              and left == ["p-diag", "p-full", "p-kron"], f"{st} {raw[:200]} {left}")
        try:
            c.request("DELETE", "/v1/models/mlp/posteriors", query={"name": "default"})
            err = None
        except CurvdError as e:
            err = e
        check("DELETE of an unknown posterior: 404", err is not None and err.status == 404,
              str(err))
        budget = c.get_model("mlp")["bytes"] + c.get_dataset("t1")["bytes"] + 4 * r1.D * r1.D
        c.delete_model("mlp")
        c.register_model("mlp", *export_model(m2, loss, [5]))
        check("DELETE model drops its posteriors", c.get_model("mlp").get("posteriors") == [],
              str(c.get_model("mlp").get("posteriors")))
        run(c, j1, "laplace", {"structure": "diag", "keep": "x"})
        run(c, j1, "laplace", {"structure": "diag", "keep": "y"})
        st, _, raw = c.request("DELETE", "/v1/models/mlp/posteriors")
        check("DELETE posteriors without a name deletes all of the model's", st == 200
              and sorted(json.loads(raw).get("deleted", [])) == ["x", "y"]
              and c.get_model("mlp").get("posteriors") == [], f"{st} {raw[:200]}")

    # ---- the registry's budget applies
    # (the model, task 1 and half a full posterior's D^2 doubles)
    with Daemon("--no-demo", "--max-registry-bytes", str(budget)) as dmn:
        c = Client(dmn.url, timeout=60)
        c.register_dataset("t1", export_dataset(x1, y1))
        c.register_model("mlp", *export_model(m1, loss, [5]))
        j1 = {"model": "mlp", "dataset": "t1", "batch": "all"}
        err, _ = submit_error(c, j1, "laplace", {"structure": "full", "keep": True})
        check("keep beyond --max-registry-bytes: refused at submit with 413 registry_full "
              "naming the budget", err is not None and err.status == 413
              and err.code == "registry_full" and err.field == "options.keep"
              and "--max-registry-bytes" in err.message, str(err)[:300])
        r = run(c, j1, "laplace", {"structure": "diag", "keep": True})
        check("a diag posterior fits the same budget", r.get("posterior") == "default",
              str(r)[:200])

    # ---- in-process: no registry
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, m1, [5], loss, x1, y1)
        for op, opts, field in (("laplace", {"keep": True}, "options.keep"),
                                ("laplace", {"accumulate_into": "a"}, "options.accumulate_into"),
                                ("predict", {"posterior": "a"}, "options.posterior")):
            rc, r = tr.curvd_run(CURVD, d, {"op": op, "options": opts}, expect_ok=False)
            e = r.get("error", {})
            check(f"curvd run refuses {field} (no registry in-process)", rc != 0
                  and e.get("code") == "invalid_option" and e.get("field") == field
                  and "registry" in e.get("message", ""), str(r)[:300])
    return summary()


if __name__ == "__main__":
    sys.exit(main())
