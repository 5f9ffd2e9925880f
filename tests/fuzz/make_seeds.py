"""make_seeds.py - writes the seed corpora of the fuzz harnesses (tests/fuzz/README.md).

    /usr/bin/python3 tests/fuzz/make_seeds.py OPS_JSON

OPS_JSON: the GET /v1/ops document (e.g. `curl -s localhost:8080/v1/ops > ops.json`).
Writes tests/fuzz/{job,arch,safetensors,multipart,http}/seed-*: the job variants of every op
and curvature (tests/e2e_microbatch.py job_variants), architectures exported from torch
modules (clients/python), dataset and parameter files of the harnesses' small models, and
multipart bodies and request scripts of the documented routes.  Findings (inputs that
crashed a harness once, now fixed) are kept beside the seeds as finding-*; this script does
not touch them.  Needs python3-torch.
"""
import base64
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import e2e_microbatch as mb  # noqa: E402
from curvd_client import torch_export as te  # noqa: E402


def write(harness, name, data):
    d = os.path.join(HERE, harness)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def clear(harness):
    for p in glob.glob(os.path.join(HERE, harness, "seed-*")):
        os.remove(p)


# The harnesses' models (tests/fuzz/fuzz_common.c), as torch modules.
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def jobs(ops):
    clear("job")
    specs = ops["op_specs"]
    n = 0
    for curv in (None,) + tuple(ops["curvatures"]):
        for op, spec in specs.items():
            if (curv is None) == spec["uses_curvature"]:
                continue
            for _label, job in mb.job_variants(op, spec, curv, 1.0):
                job = dict(job, model="cnn" if n % 3 == 2 else "mlp", dataset="data")
                write("job", "%03d.json" % n, json.dumps(job))
                n += 1
    extra = [
        {"op": "trace", "model": "mlp", "dataset": "data", "batch": {"indices": [0, 3, 5]},
         "blocks": [["0.weight", "0.bias"], ["2.weight"]], "options": {"max_probes": 4}},
        {"op": "eigen", "model": "mlp", "dataset": "data", "batch": {"offset": 2, "size": 8},
         "micro_batch": 4, "options": {"k": 2}},
        {"op": "matvec", "model": "mlp", "dataset": "data",
         "options": {"vector": [0.5] * 67}},
    ]
    for j in extra:
        write("job", "%03d.json" % n, json.dumps(j))
        n += 1
    return n


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.n = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.n(x + torch.relu(self.a(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 10)

    def forward(self, x):
        h = self.emb(x)
        a = self.att(h, h, h, need_weights=False)[0]
        return self.out(h + a)


def archs():
    clear("arch")
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    models = [
        (mlp(), ce, [4]), (cnn(), ce, [1, 6, 6]),
        (nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)), mse, [5]),
        (nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 1)),
         nn.BCEWithLogitsLoss(), [5]),
        (nn.Sequential(nn.Linear(5, 4), nn.LeakyReLU(0.2), nn.ELU(), nn.GELU(), nn.Softplus(),
                       nn.Mish(), nn.Hardswish(), nn.Linear(4, 3), nn.LogSoftmax(dim=1)),
         nn.NLLLoss(), [5]),
        (nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                       nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)).eval(), ce, [2, 8, 8]),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.Upsample(scale_factor=2),
                       nn.ConvTranspose2d(2, 1, 2, stride=2), nn.Flatten(),
                       nn.Linear(144, 2)), ce, [1, 6, 6]),
        (nn.Sequential(nn.Conv1d(2, 3, 3), nn.AvgPool1d(2), nn.Flatten(), nn.Dropout(0.0),
                       nn.Linear(6, 2)), ce, [2, 7]),
        (nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Identity(), nn.Linear(6, 2)), ce, [6]),
        (nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
                       nn.Flatten(), nn.Linear(64, 2)), ce, [4, 4, 4]),
        (Residual(), ce, [6]),
    ]
    n = 0
    for m, loss, shape in models:
        try:
            arch = te.export_architecture(m.eval(), loss, shape)
        except Exception as ex:  # a module this build does not export: skip it
            print("arch seed skipped: %s" % ex, file=sys.stderr)
            continue
        write("arch", "%02d.json" % n, json.dumps(arch))
        n += 1
    try:
        arch = te.export_architecture(TinyLM().eval(), ce, [5], class_dim=-1)
        write("arch", "%02d.json" % n, json.dumps(arch))
        n += 1
    except Exception as ex:
        print("arch seed skipped: %s" % ex, file=sys.stderr)
    return n


def safetensors_files():
    torch.manual_seed(1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    xi, yi = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    files = {
        "data.safetensors": te.export_dataset(x, y),
        "img.safetensors": te.export_dataset(xi, yi),
        "targets.safetensors": te.export_dataset(torch.randn(6, 5), torch.randn(6, 2)),
        "tokens.safetensors": te.export_dataset(torch.randint(0, 10, (4, 5)),
                                                torch.randint(0, 10, (4, 5))),
        "mlp_params.safetensors": te.state_dict_bytes(mlp()),
        "cnn_params.safetensors": te.state_dict_bytes(cnn()),
    }
    return files


def st_extra():
    """Hand-made headers: other dtypes, metadata, empty tensors."""
    def st(header, data):
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        return len(h).to_bytes(8, "little") + h + data
    return {
        "dtypes.safetensors": st(
            {"__metadata__": {"format": "pt"},
             "x": {"dtype": "F16", "shape": [2, 4], "data_offsets": [0, 16]},
             "y": {"dtype": "I32", "shape": [2], "data_offsets": [16, 24]}},
            bytes(range(24))),
        "bf16.safetensors": st(
            {"x": {"dtype": "BF16", "shape": [1, 4], "data_offsets": [0, 8]},
             "y": {"dtype": "U8", "shape": [1], "data_offsets": [8, 9]}},
            bytes(9)),
        "empty.safetensors": st({"x": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
                                 "y": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}},
                                b""),
    }


def safetensors():
    clear("safetensors")
    files = dict(safetensors_files(), **st_extra())
    for name, data in files.items():
        write("safetensors", name, data)
    return files


CRLF = "\r\n"


def form(parts, boundary="XyZ"):
    out = b"preamble" + CRLF.encode()
    for name, filename, data in parts:
        disp = 'Content-Disposition: form-data; name="%s"' % name
        if filename:
            disp += '; filename="%s"' % filename
        head = "--" + boundary + CRLF + disp + CRLF
        if filename:
            head += "Content-Type: application/octet-stream" + CRLF
        out += (head + CRLF).encode() + (data if isinstance(data, bytes) else data.encode())
        out += CRLF.encode()
    return out + ("--" + boundary + "--" + CRLF).encode()


def multipart(files, arch_mlp):
    clear("multipart")
    ct = "multipart/form-data; boundary=XyZ\n"
    write("multipart", "model", ct.encode() + form(
        [("name", None, "m1"), ("architecture", "a.json", arch_mlp),
         ("parameters", "p.safetensors", files["mlp_params.safetensors"])]))
    write("multipart", "dataset", ct.encode() + form(
        [("name", None, "d1"), ("data", "d.safetensors", files["data.safetensors"])]))
    write("multipart", "quoted", b'multipart/form-data; charset=utf-8; boundary="a b"\n' + form(
        [("name", None, "x"), ("other", "f\\\"q.bin", "\r\n--a\r\n")], boundary="a b"))
    write("multipart", "noheaders",
          b"multipart/form-data; boundary=B\n--B\r\n\r\nbody\r\n--B--\r\n")
    return 4


def req(method, target, headers=(), body=None):
    s = "%s %s\n" % (method, target)
    for h in headers:
        s += h + "\n"
    s = s.encode()
    if body is not None:
        s += b"\n" + (body if isinstance(body, bytes) else body.encode())
    return s


def script(*reqs):
    return b"\n%%\n".join(reqs)


def http(files, arch_mlp):
    clear("http")
    js = ["Content-Type: application/json"]
    octet = ["Content-Type: application/octet-stream"]
    mp = ["Content-Type: multipart/form-data; boundary=XyZ"]
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    trace = json.dumps({"op": "trace", "model": "mlp", "dataset": "data",
                        "options": {"max_probes": 4}})
    seeds = {
        "health": script(req("GET", "/v1/health"), req("GET", "/v1/ops"), req("GET", "/metrics"),
                         req("HEAD", "/"), req("GET", "/dashboard/app.js")),
        "lists": script(req("GET", "/v1/models"), req("GET", "/v1/datasets"),
                        req("GET", "/v1/models/mlp"), req("GET", "/v1/datasets/data"),
                        req("GET", "/v1/jobs?status=queued&limit=3&model=mlp"),
                        req("GET", "/v1/models/nope"), req("PATCH", "/v1/models")),
        "job": script(req("POST", "/v1/jobs?wait=0", js, trace), req("GET", "/v1/jobs/@id"),
                      req("GET", "/v1/jobs/@id?wait=1"), req("DELETE", "/v1/jobs/@id"),
                      req("GET", "/v1/jobs?status=cancelled")),
        "job_bad": script(req("POST", "/v1/jobs?wiat=5", js, trace),
                          req("POST", "/v1/jobs", js, '{"op": "trace", "op": "eigen"}'),
                          req("DELETE", "/v1/models/mlp%00zzz")),
        "model_json": script(
            req("POST", "/v1/models", js, json.dumps(
                {"name": "m2", "architecture": json.loads(arch_mlp),
                 "parameters": b64(files["mlp_params.safetensors"])})),
            req("GET", "/v1/models/m2/parameters"),
            req("PUT", "/v1/models/m2/parameters", octet, files["mlp_params.safetensors"]),
            req("DELETE", "/v1/models/m2")),
        "model_form": script(req("POST", "/v1/models", mp, form(
            [("name", None, "m3"), ("architecture", "a.json", arch_mlp),
             ("parameters", "p.safetensors", files["mlp_params.safetensors"])]))),
        "dataset": script(
            req("POST", "/v1/datasets", js, json.dumps(
                {"name": "d2", "data": b64(files["data.safetensors"])})),
            req("PUT", "/v1/datasets/d3", octet, files["img.safetensors"]),
            req("GET", "/v1/datasets/d3/data"), req("DELETE", "/v1/datasets/d2")),
        "dataset_form": script(req("POST", "/v1/datasets", mp, form(
            [("name", None, "d4"), ("data", "d.safetensors", files["data.safetensors"])]))),
        "parts": script(
            req("POST", "/v1/datasets/big/parts", octet, files["data.safetensors"]),
            req("POST", "/v1/datasets/big/parts", octet, files["data.safetensors"]),
            req("GET", "/v1/datasets/big/parts"),
            req("POST", "/v1/datasets/big/commit", js, '{"replace": false, "n": 32}'),
            req("POST", "/v1/jobs", js, trace.replace('"data"', '"big"')),
            req("DELETE", "/v1/datasets/big/parts")),
        "file": script(req("POST", "/v1/datasets/x", js, '{"file": "data.safetensors"}'),
                       req("POST", "/v1/datasets/y", js,
                           '{"file": "sub/img.safetensors", "replace": true}'),
                       req("POST", "/v1/jobs", js, trace.replace('"data"', '"x"')),
                       req("POST", "/v1/datasets/z", js, '{"file": "link.safetensors"}'),
                       req("POST", "/v1/datasets/z", js, '{"file": "../outside.safetensors"}'),
                       req("POST", "/v1/datasets/z", js, '{"file": "sub/../data.safetensors"}'),
                       req("DELETE", "/v1/datasets/x")),
    }
    for name, data in seeds.items():
        write("http", name, data)
    return len(seeds)


def main():
    ops = json.load(open(sys.argv[1]))
    counts = {"job": jobs(ops), "arch": archs()}
    files = safetensors()
    counts["safetensors"] = len(files)
    arch_mlp = json.dumps(te.export_architecture(mlp(), nn.CrossEntropyLoss(), [4]))
    counts["multipart"] = multipart(files, arch_mlp)
    counts["http"] = http(files, arch_mlp)
    print("seeds:", ", ".join("%s %d" % kv for kv in counts.items()))


if __name__ == "__main__":
    main()
