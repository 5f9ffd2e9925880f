"""e2e_torch_graph.py - graph models (issue 19): the exporter's graph form, and `curvd run`
on it against torch.autograd in float64.

Usage: /usr/bin/python3 tests/e2e_torch_graph.py build/curvd
Cases: a residual MLP; the pre-activation ResNet of clients/python/examples/graph_models.py
(BatchNorm in eval mode with random running statistics, identity and projection shortcuts,
global average pooling); its transformer LM with each attention (nn.MultiheadAttention with
a causal mask buffer, matmul + masked_fill of a mask buffer, F.scaled_dot_product_attention
with is_causal: only with torch >= 2.0, not counted with Debian's 1.13), with and without
the causal mask, with a tied head;
LayerNorm with and without affine over [T, d] inputs; GroupNorm after Conv2d; an Embedding
fed repeated tokens; CrossEntropyLoss with ignore_index and label_smoothing and NLLLoss
after log_softmax on [N, T, C] outputs (class_dim=-1).

(a) Exporter, without curvd: the architecture JSON follows the graph form's rules (one
    placeholder first, one output last, args name earlier nodes, canonical targets,
    get_attr shapes, every parameter and buffer of the file named exactly once or by a
    module, nothing missing); a torch interpreter of the JSON alone (modules rebuilt from
    their JSON attributes, functions from the canonical targets) gives the model's output
    and, through the parameters by name, its gradient (float64, 1e-10).
(b) curvd: loss, gradient, Hessian/GGN/EF/MC-Fisher-vector products and quadratic forms
    (GGN as J^T Lambda J by double backward), per-sample gradients (summing to the
    gradient: the contribution of each row of the batch, also for sequence models), per-module
    blocks ("blocks": "layer": one block per module owning parameters, named by its
    qualified name; per-block gradients), a block matvec and the dense Hessian/GGN on a
    small module.  Vectors are exchanged through one block naming every parameter, so the
    comparison does not depend on curvd's order of the parameter vector.
    EF reference: (1/M) sum_n grad l_n grad l_n^T with l_n the summed loss of row n and M
    the mean's denominator (N, N*T, or the count of targets != ignore_index); 1 for "sum".
Set VERBOSE=1 to print every check.  Ends with 'N passed, M failed'.
"""
import copy
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python", "examples"))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, skip, summary  # noqa: E402
from torchref import rel  # noqa: E402
from curvd_client.torch_export import export_model, export_dataset  # noqa: E402
import graph_models as gm  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))

FUNCTIONS = {"add", "sub", "mul", "div", "neg", "pow", "relu", "gelu", "silu", "sigmoid", "tanh",
             "softplus", "elu", "leaky_relu", "mish", "hardswish", "softmax", "log_softmax",
             "transpose", "permute", "reshape", "flatten", "cat", "narrow", "mean", "sum",
             "matmul", "bmm", "masked_fill", "scaled_dot_product_attention", "dropout",
             "contiguous", "identity", "linear", "conv1d", "conv2d", "layer_norm", "group_norm",
             "embedding", "batch_norm", "adaptive_avg_pool2d", "max_pool2d", "avg_pool2d",
             "max_pool1d", "avg_pool1d", "interpolate"}


# ---- the cases ---------------------------------------------------------------------------

class ResidualMLP(nn.Module):
    def __init__(self, din=5, d=6, classes=3):
        super().__init__()
        self.inp = nn.Linear(din, d)
        self.f1 = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.f2 = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f1(h)
        h = F.silu(h) + 0.5 * self.f2(h)
        return self.out(torch.tanh(h))


class NormMLP(nn.Module):
    """LayerNorm over the last dim of [T, d] inputs, then a per-position Linear, a mean over T."""

    def __init__(self, d=6, classes=3, affine=True):
        super().__init__()
        self.ln = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.fc(self.ln(x)))
        return self.out(h.mean(dim=1))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.gn(self.conv(x))), 1))


class EmbedBag(nn.Module):
    """Embedding of repeated tokens, mean over the sequence, Linear."""

    def __init__(self, vocab=4, d=3, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, classes)

    def forward(self, idx):
        return self.fc(self.emb(idx).mean(dim=1))


class SeqLogSoftmax(nn.Module):
    """A per-position classifier ending in log_softmax over the last dim (NLLLoss)."""

    def __init__(self, vocab=5, d=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, classes)

    def forward(self, idx):
        return F.log_softmax(self.fc(torch.relu(self.emb(idx))), dim=-1)


def randomize_ln(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def lm_case(attention, causal=True, tied=False, loss=None, seed=0):
    cfg = gm.SMALL_LM
    model = gm.transformer_lm(**cfg, attention=attention, causal=causal, tied=tied, seed=seed)
    x, y = gm.lm_batch(n=3, seed=seed, **cfg)
    return model, loss or nn.CrossEntropyLoss(), [cfg["seq_len"]], x, y, -1


def cases():
    """(tag, builder) pairs; builder() -> (model, loss, input_shape, x, y, class_dim)."""
    def residual():
        torch.manual_seed(0)
        return ResidualMLP().eval(), nn.CrossEntropyLoss(), [5], torch.randn(6, 5), \
            torch.randint(0, 3, (6,)), 1

    def resnet():
        x, y = gm.image_batch(n=2, classes=gm.SMALL_RESNET["classes"])
        return gm.preact_resnet(**gm.SMALL_RESNET), nn.CrossEntropyLoss(), [3, 32, 32], x, y, 1

    def layernorm(affine):
        def make():
            torch.manual_seed(1)
            m = randomize_ln(NormMLP(affine=affine)).eval()
            return m, nn.CrossEntropyLoss(reduction="sum"), [4, 6], torch.randn(5, 4, 6), \
                torch.randint(0, 3, (5,)), 1
        return make

    def groupnorm():
        torch.manual_seed(2)
        m = randomize_ln(GroupNormNet()).eval()
        return m, nn.MSELoss(), [2, 5, 5], torch.randn(4, 2, 5, 5), torch.randn(4, 3), 1

    def embedding():
        torch.manual_seed(3)
        x = torch.tensor([[0, 0, 1, 0, 2, 2], [3, 3, 3, 3, 3, 3], [1, 0, 1, 0, 1, 0],
                          [2, 2, 1, 1, 0, 0]])
        return EmbedBag().eval(), nn.CrossEntropyLoss(), [6], x, torch.tensor([0, 2, 1, 1]), 1

    def ce_ignore_smoothing():
        model, _, shape, x, y, cd = lm_case("matmul", seed=4)
        y = y.clone()
        y[0, :3] = -100
        y[2, 5] = -100
        return model, nn.CrossEntropyLoss(label_smoothing=0.1), shape, x, y, cd

    def ce_ignore_index_sum():
        model, _, shape, x, y, cd = lm_case("mha", seed=5)
        y = y.clone()
        y[1, 2:6] = 0
        return model, nn.CrossEntropyLoss(ignore_index=0, reduction="sum"), shape, x, y, cd

    def nll_seq():
        torch.manual_seed(6)
        x = torch.randint(0, 5, (4, 7))
        y = torch.randint(0, 3, (4, 7))
        y[0, 0] = 2
        y[3, 4] = -100
        return SeqLogSoftmax().eval(), nn.NLLLoss(), [7], x, y, -1

    out = [("residual-mlp", residual), ("preact-resnet", resnet),
           ("layernorm-affine", layernorm(True)), ("layernorm-no-affine", layernorm(False)),
           ("groupnorm", groupnorm), ("embedding-repeated", embedding)]
    for attn in gm.ATTENTIONS:
        if attn == "sdpa" and not hasattr(F, "scaled_dot_product_attention"):
            # Debian's python3-torch (1.13) has no F.scaled_dot_product_attention: these
            # cases cannot exist here, so they are not counted (they run with torch >= 2.0)
            print("note: lm-sdpa-* not run: torch %s has no F.scaled_dot_product_attention"
                  % torch.__version__)
            continue
        out.append(("lm-%s-causal" % attn, lambda a=attn: lm_case(a)))
        out.append(("lm-%s-no-mask" % attn, lambda a=attn: lm_case(a, causal=False, seed=1)))
    out += [("lm-matmul-tied", lambda: lm_case("matmul", tied=True, seed=2)),
            ("lm-ce-ignore-smoothing", ce_ignore_smoothing),
            ("lm-ce-ignore-index-sum", ce_ignore_index_sum), ("nll-seq", nll_seq)]
    return out


class ZooArith(nn.Module):
    """Every arithmetic/activation/shape spelling the exporter maps (on [N, 4, 6])."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.b = nn.Parameter(torch.randn(5) * 0.1)
        self.scale = nn.Parameter(torch.rand(1, 4, 1) + 0.5)
        self.register_buffer("keep", torch.tensor([[True, False, True, True, False]] * 4))
        self.sm = nn.Softmax(dim=-1)
        self.mish, self.hsw = nn.Mish(), nn.Hardswish()

    def forward(self, x):
        h = F.linear(x, self.w, self.b)                       # [N, 4, 5]
        h = torch.add(h, 1.0) - 0.5
        h = 2.0 - h
        h = h.add(self.scale) * self.scale
        h = 1.0 / (torch.sigmoid(h) + 1)
        h = -h + torch.tanh(h) ** 2
        h = F.gelu(h, approximate="tanh") + F.silu(h) + F.elu(h, alpha=0.7)
        h = F.leaky_relu(h, 0.1) + F.softplus(h, beta=2.0) + torch.relu(h) + h.relu()
        h = self.mish(h) + self.hsw(h) + F.mish(h) + F.hardswish(h)
        h = h.masked_fill(self.keep, 0.25)
        a, b = h.chunk(2, dim=1)                                # [N, 2, 5] each
        c = torch.cat([b, a], dim=1).transpose(1, 2)            # [N, 5, 4]
        d = c.permute(0, 2, 1).contiguous().view(-1, 20)        # [N, 20]
        e = torch.flatten(c, 1) + d
        p, q, r = e.split([8, 8, 4], dim=-1)
        t = (p.unsqueeze(1) @ q.unsqueeze(2)).squeeze(-1)       # [N, 1]
        u = torch.bmm(p.view(-1, 2, 4), q.view(-1, 4, 2)).sum(dim=(1, 2)).unsqueeze(-1)
        v = r[:, 1:3] * t + e[:, None, :5].mean(-1) - e[..., -1:]
        w = torch.softmax(v, dim=1) + F.log_softmax(v, -1) + self.sm(v)
        return torch.cat([w, u, F.dropout(t, 0.3, training=False)], 1)


class ZooModules(nn.Module):
    """Conv1d, pools 1d/2d, Upsample, ConvTranspose2d and functional module forms."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding=1)
        self.p1 = nn.MaxPool1d(2)
        self.a1 = nn.AvgPool1d(2, stride=1, padding=1, count_include_pad=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.ct = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.cw = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.gw = nn.Parameter(torch.rand(4) + 0.5)
        self.gb = nn.Parameter(torch.randn(4) * 0.1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(1, 3, affine=False)

    def forward(self, x):                                        # [N, 2, 8]
        h = self.a1(self.p1(torch.relu(self.c1(x))))             # [N, 3, 5]
        h = F.avg_pool1d(F.max_pool1d(h, 2, 1), 2, 1)            # [N, 3, 3]
        img = self.up(self.gn(h.unsqueeze(-1) * h.unsqueeze(-2)))  # [N, 3, 6, 6]
        img = self.ct(img)                                       # [N, 2, 12, 12]
        img = F.conv2d(img, self.cw, None, 2, 1)                 # [N, 4, 6, 6]
        img = F.group_norm(img, 2, self.gw, self.gb)
        img = F.batch_norm(img, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                           self.bn.bias, False, 0.1, 1e-5)
        img = F.max_pool2d(F.interpolate(img, scale_factor=2.0, mode="nearest"), 2, 2)
        img = F.avg_pool2d(img, 3, 1, 1, count_include_pad=False)
        return F.adaptive_avg_pool2d(img, (1, 1)).flatten(1)      # [N, 4]


class ZooTokens(nn.Module):
    """F.embedding and F.layer_norm with get_attr tensors, integer indexing, a tied head."""

    def __init__(self):
        super().__init__()
        self.e = nn.Parameter(torch.randn(7, 6))
        self.lw = nn.Parameter(torch.rand(6) + 0.5)
        self.lb = nn.Parameter(torch.randn(6) * 0.1)
        self.mix = nn.Linear(6, 6)

    def forward(self, idx):                                      # [N, 5] token ids
        h = F.embedding(idx, self.e)
        h = F.layer_norm(h + self.mix(h), (6,), self.lw, self.lb)
        last = h[:, -1]                                          # [N, 6]
        return F.linear(last + h[:, 0, :], self.e)               # tied to the embedding


# ---- (a) the exporter's JSON -------------------------------------------------------------

def validate_arch(tag, arch, tensors, params):
    """graph.md's rules; tensors: {name: tensor} of the parameters file; params: the
    model's parameter names."""
    nodes, mods = arch.get("nodes", []), arch.get("modules", {})
    errs = []
    if not nodes or nodes[0].get("op") != "placeholder":
        errs.append("first node is not the placeholder")
    if [n["op"] for n in nodes].count("placeholder") != 1:
        errs.append("not exactly one placeholder")
    if nodes[-1].get("op") != "output" or [n["op"] for n in nodes].count("output") != 1:
        errs.append("output is not last and unique")
    seen, named = set(), set()
    for n in nodes:
        if n["name"] in seen:
            errs.append("duplicate name " + n["name"])
        for a in n.get("args", []):
            if not isinstance(a, str) or a not in seen:
                errs.append("%s reads %r before it is defined" % (n["name"], a))
        op = n["op"]
        if op == "call_module":
            if n["target"] not in mods:
                errs.append("%s: module %s not in modules" % (n["name"], n["target"]))
            named |= {k for k in tensors if k.startswith(n["target"] + ".")}
        elif op == "call_function":
            if n["target"] not in FUNCTIONS:
                errs.append("%s: target %s is not canonical" % (n["name"], n["target"]))
            for t in n.get("params", {}).values():
                if t not in tensors:
                    errs.append("%s: params name %s not in the file" % (n["name"], t))
                named.add(t)
        elif op == "get_attr":
            t = tensors.get(n["target"])
            if t is None or list(t.shape) != n["shape"]:
                errs.append("%s: get_attr %s shape %s vs file %s" % (
                    n["name"], n["target"], n.get("shape"), None if t is None else list(t.shape)))
            named.add(n["target"])
        elif op not in ("placeholder", "output"):
            errs.append("%s: op %s" % (n["name"], op))
        seen.add(n["name"])
    # a buffer the graph does not read (num_batches_tracked of a functional batch_norm's
    # module) may stay in the file, as state_dict() has it; a parameter may not
    extra = sorted(k for k in set(tensors) - named if k in params)
    if extra:
        errs.append("parameters of the file no node or module names: %s" % extra)
    if list(mods) != sorted(mods, key=list(mods).index):
        errs.append("modules order")
    check(tag + " exporter: graph form valid", not errs, "; ".join(errs[:6]))


def build_module(spec):
    kw = {k: v for k, v in spec.items() if k != "type"}
    return getattr(nn, spec["type"])(**kw)


def _sdpa(q, k, v, mask, is_causal, scale):
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        t = s.shape[-1]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, -1) @ v


def eval_graph(arch, tensors, x):
    """The output of the graph form, computed from the JSON and the tensors alone."""
    env, mods = {}, {}
    for k, spec in arch["modules"].items():
        m = build_module(spec)
        sd = {n[len(k) + 1:]: t for n, t in tensors.items() if n.startswith(k + ".")}
        for name, t in sd.items():  # the file's tensors themselves (gradients by name)
            owner, attr = m, name
            if "." in name:
                path, attr = name.rsplit(".", 1)
                owner = m.get_submodule(path)
            if attr in owner._parameters:
                owner._parameters[attr] = t
            else:
                owner._buffers[attr] = t
        mods[k] = m.eval()
    num = lambda v: float(v) if not isinstance(v, str) else float(v)  # noqa: E731
    for n in arch["nodes"]:
        op, a = n["op"], [env[s] for s in n.get("args", [])]
        if op == "placeholder":
            env[n["name"]] = x
            continue
        if op == "get_attr":
            env[n["name"]] = tensors[n["target"]]
            continue
        if op == "output":
            return a[0]
        if op == "call_module":
            m = mods[n["target"]]
            if isinstance(m, nn.MultiheadAttention):
                mask = a[3] if len(a) > 3 else None
                r = m(a[0], a[1], a[2], attn_mask=mask, need_weights=False)[0]
            else:
                r = m(a[0])
            env[n["name"]] = r
            continue
        t, p = n["target"], {k: tensors[v] for k, v in n.get("params", {}).items()}
        if t in ("add", "sub", "mul", "div"):
            fn = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[t]
            if len(a) == 2:
                r = fn(a[0], a[1])
            elif n.get("reverse"):
                r = fn(torch.full_like(a[0], num(n["scalar"])), a[0])
            else:
                r = fn(a[0], num(n["scalar"]))
        elif t == "neg":
            r = -a[0]
        elif t == "pow":
            r = a[0] ** n["exponent"]
        elif t in ("relu", "sigmoid", "tanh", "silu", "mish", "hardswish"):
            r = getattr(F, t)(a[0]) if t not in ("sigmoid", "tanh") else getattr(torch, t)(a[0])
        elif t == "gelu":
            r = F.gelu(a[0], approximate=n.get("approximate", "none"))
        elif t == "softplus":
            r = F.softplus(a[0], n["beta"], n["threshold"])
        elif t == "elu":
            r = F.elu(a[0], n["alpha"])
        elif t == "leaky_relu":
            r = F.leaky_relu(a[0], n["negative_slope"])
        elif t in ("softmax", "log_softmax"):
            r = getattr(torch, t)(a[0], n["dim"])
        elif t == "transpose":
            r = a[0].transpose(n["dim0"], n["dim1"])
        elif t == "permute":
            r = a[0].permute(n["dims"])
        elif t == "reshape":
            assert n["shape"][0] == -1
            r = a[0].reshape([a[0].shape[0]] + n["shape"][1:])
        elif t == "flatten":
            r = torch.flatten(a[0], n["start_dim"], n["end_dim"])
        elif t == "cat":
            r = torch.cat(a, n["dim"])
        elif t == "narrow":
            r = a[0].narrow(n["dim"], n["start"], n["length"])
        elif t in ("mean", "sum"):
            r = getattr(torch, t)(a[0], n["dim"], keepdim=n["keepdim"])
        elif t in ("matmul", "bmm"):
            r = a[0] @ a[1]
        elif t == "masked_fill":
            r = a[0].masked_fill(a[1].bool(), num(n["value"]))
        elif t == "scaled_dot_product_attention":
            r = _sdpa(a[0], a[1], a[2], a[3] if len(a) > 3 else None, n["is_causal"],
                      n.get("scale"))
        elif t in ("dropout", "contiguous", "identity"):
            r = a[0]
        elif t == "linear":
            r = F.linear(a[0], p["weight"], p.get("bias"))
        elif t == "layer_norm":
            r = F.layer_norm(a[0], n["normalized_shape"], p.get("weight"), p.get("bias"),
                             n["eps"])
        elif t == "embedding":
            r = F.embedding(a[0], p["weight"], n.get("padding_idx"))
        elif t == "group_norm":
            r = F.group_norm(a[0], n["num_groups"], p.get("weight"), p.get("bias"), n["eps"])
        elif t in ("conv1d", "conv2d"):
            r = getattr(F, t)(a[0], p["weight"], p.get("bias"), n["stride"], n["padding"],
                              n["dilation"], n["groups"])
        elif t == "batch_norm":
            r = F.batch_norm(a[0], p["running_mean"], p["running_var"], p.get("weight"),
                             p.get("bias"), False, 0.0, n["eps"])
        elif t == "adaptive_avg_pool2d":
            r = F.adaptive_avg_pool2d(a[0], n["output_size"])
        elif t in ("max_pool1d", "max_pool2d"):
            r = getattr(F, t)(a[0], n["kernel_size"], n["stride"], n["padding"], n["dilation"],
                              n["ceil_mode"])
        elif t in ("avg_pool1d", "avg_pool2d"):
            r = getattr(F, t)(a[0], n["kernel_size"], n["stride"], n["padding"], n["ceil_mode"],
                              n["count_include_pad"])
        elif t == "interpolate":
            r = F.interpolate(a[0], size=n.get("size"), scale_factor=n.get("scale_factor"),
                              mode="nearest")
        else:
            raise AssertionError("eval_graph: no %s" % t)
        env[n["name"]] = r
    raise AssertionError("no output node")


def check_export(tag, model, loss_fn, shape, x, y, class_dim, arch, tensors):
    """The JSON alone computes the model: output and gradient by parameter name."""
    validate_arch(tag, arch, tensors, {k for k, _ in model.named_parameters()})
    m64 = copy.deepcopy(model).double().eval()
    x64 = x if not x.dtype.is_floating_point else x.double()
    want = m64(x64)
    t64 = {k: (v.double().requires_grad_(True) if v.dtype.is_floating_point and
               k in dict(model.named_parameters()) else
               (v.double() if v.dtype.is_floating_point else v)) for k, v in tensors.items()}
    try:
        got = eval_graph(arch, t64, x64)
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        check(tag + " exporter: graph evaluates", False, "%s: %s" % (type(e).__name__, e))
        return
    e = rel(got.detach(), want.detach())
    check(tag + " exporter: graph output == model output", e < 1e-10, f"rel err {e}")
    yy = y if not y.dtype.is_floating_point else y.double()
    lg = loss_fn(_cd(got, class_dim), _cd_y(yy, class_dim))
    lw = loss_fn(_cd(want, class_dim), _cd_y(yy, class_dim))
    names = [k for k, _ in model.named_parameters()]
    gg = torch.autograd.grad(lg, [t64[k] for k in names], allow_unused=True)
    gw = torch.autograd.grad(lw, list(m64.parameters()))
    ok = all(a is not None and rel(a, b) < 1e-10 for a, b in zip(gg, gw))
    check(tag + " exporter: graph gradient by name == model gradient", ok,
          str([k for k, a, b in zip(names, gg, gw) if a is None or rel(a, b) >= 1e-10][:5]))


def _cd(out, class_dim):
    """The model output as the loss sees it: [N, ..., C] -> [N*..., C] for class_dim -1."""
    return out.reshape(-1, out.shape[-1]) if class_dim == -1 else out


def _cd_y(y, class_dim):
    return y.reshape(-1) if class_dim == -1 else y


# ---- (b) curvd against torch -------------------------------------------------------------

class Case:
    """A model in float64 with its loss as PyTorch computes it (class_dim applied)."""

    def __init__(self, model, loss_fn, x, y, class_dim):
        self.m = copy.deepcopy(model).double().eval()
        self.loss_fn, self.class_dim = loss_fn, class_dim
        self.x = x if not x.dtype.is_floating_point else x.double()
        self.y = y if not y.dtype.is_floating_point else y.double()
        self.names = [k for k, _ in self.m.named_parameters()]
        self.params = [p for _, p in self.m.named_parameters()]
        self.sizes = [p.numel() for p in self.params]
        self.D = sum(self.sizes)

    def loss_of(self, out, y=None):
        return self.loss_fn(_cd(out, self.class_dim), _cd_y(self.y if y is None else y,
                                                           self.class_dim))

    def loss(self):
        return self.loss_of(self.m(self.x))

    def lambda_loss_of(self, out):
        """The loss whose Hessian in the outputs is the GGN's Lambda.  NLLLoss after a
        log_softmax is CrossEntropyLoss on the log-probabilities (docs/interface.md): the
        same loss value, and the cross-entropy GGN of the logits, as
        softmax(log_softmax(z)) = softmax(z)."""
        if isinstance(self.loss_fn, nn.NLLLoss):
            ce = nn.CrossEntropyLoss(reduction=self.loss_fn.reduction,
                                     ignore_index=self.loss_fn.ignore_index)
            return ce(_cd(out, self.class_dim), _cd_y(self.y, self.class_dim))
        return self.loss_of(out)

    def grad(self, loss=None):
        g = torch.autograd.grad(self.loss() if loss is None else loss, self.params,
                                allow_unused=True)
        return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1)
                          for t, p in zip(g, self.params)])

    def split(self, v):
        out, off = [], 0
        for p in self.params:
            out.append(v[off:off + p.numel()].view_as(p))
            off += p.numel()
        return out

    def hvp(self, v):
        g = torch.autograd.grad(self.loss(), self.params, create_graph=True)
        hv = torch.autograd.grad(g, self.params, grad_outputs=self.split(v), allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                          for h, p in zip(hv, self.params)])

    def ggn_vp(self, v):
        """J^T Lambda J v: J v by the double-backward trick, Lambda by double backward."""
        out = self.m(self.x)
        u = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, self.params, grad_outputs=u, create_graph=True,
                                allow_unused=True)
        pairs = [(gi, vi) for gi, vi in zip(g, self.split(v)) if gi is not None]
        jv = torch.autograd.grad([a for a, _ in pairs], u, grad_outputs=[b for _, b in pairs])[0]
        o = out.detach().requires_grad_(True)
        go = torch.autograd.grad(self.lambda_loss_of(o), o, create_graph=True)[0]
        ljv = torch.autograd.grad(go, o, grad_outputs=jv)[0]
        gt = torch.autograd.grad(out, self.params, grad_outputs=ljv, allow_unused=True)
        return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1)
                          for t, p in zip(gt, self.params)])

    def per_sample(self):
        """Row n's contribution to the gradient: only row n's output depends on the
        parameters (exact for any reduction, ignore_index and label smoothing)."""
        with torch.no_grad():
            full = self.m(self.x)
        rows = []
        for i in range(self.x.shape[0]):
            oi = self.m(self.x[i:i + 1])
            out = torch.cat([full[:i], oi, full[i + 1:]])
            rows.append(self.grad(self.loss_of(out)))
        return torch.stack(rows)

    def denominator(self):
        if self.loss_fn.reduction == "sum":
            return 1.0
        if isinstance(self.loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
            return float((self.y != self.loss_fn.ignore_index).sum())
        return float(self.m(self.x).numel())

    def ef_vp(self, v, ps):
        """(1/M) sum_n grad l_n grad l_n^T v; grad l_n = M * (row n's contribution)."""
        M = self.denominator()
        gl = ps * M
        return (gl.T @ (gl @ v)) / M


class Layout:
    """curvd's order of the parameters (from a block's "params") vs named_parameters()."""

    def __init__(self, case, order):
        self.case, self.order = case, list(order)
        offs, off = {}, 0
        for n, s in zip(case.names, case.sizes):
            offs[n] = (off, s)
            off += s
        self.idx = torch.cat([torch.arange(offs[n][0], offs[n][0] + offs[n][1])
                              for n in self.order]) if self.order else torch.zeros(0).long()

    def to_curvd(self, v):
        return v[self.idx]

    def sub(self, names):
        offs, off = {}, 0
        for n, s in zip(self.case.names, self.case.sizes):
            offs[n] = (off, s)
            off += s
        return torch.cat([torch.arange(offs[n][0], offs[n][0] + offs[n][1]) for n in names])


def module_groups(arch, names):
    """Expected per-module blocks: {frozenset(parameter names)} from the JSON."""
    groups = []
    for k in arch.get("modules", {}):
        g = {n for n in names if n.startswith(k + ".")}
        if g:
            groups.append(g)
    for n in arch.get("nodes", []):
        if n["op"] == "get_attr" and n["target"] in names:
            groups.append({n["target"]})
        for t in n.get("params", {}).values():
            if t in names:
                groups.append({t})
    merged = []
    for g in groups:  # function nodes naming a module's tensor (ties) join its group
        for h in merged:
            if g & h:
                h |= g
                break
        else:
            merged.append(set(g))
    return {frozenset(g) for g in merged}


def run(d, job):
    return tr.curvd_run(CURVD, d, job)[1]


def check_curvd(tag, case, arch, d):
    full = [list(case.names)]

    def blk(job):  # ops that are not blockwise answer at the top level
        r = run(d, dict(job, blocks=full))
        return r["blocks"][0] if "blocks" in r else r

    res = run(d, {"op": "loss"})
    want = float(case.loss())
    check(tag + " loss", abs(res["loss"] - want) <= 1e-5 * abs(want) + 1e-7,
          f"{res['loss']} vs {want}")
    res = blk({"op": "gradient"})
    lay = Layout(case, res["params"])
    check(tag + " block names every parameter", sorted(res["params"]) == sorted(case.names),
          str(res["params"])[:300])
    g = case.grad()
    e = rel(res["gradient"], lay.to_curvd(g))
    check(tag + " gradient", e < 1e-4, f"rel err {e}")
    torch.manual_seed(7)
    v = torch.randn(case.D, dtype=torch.float64)
    vc = lay.to_curvd(v).tolist()
    ps = case.per_sample()
    refs = [("hessian", lambda: case.hvp(v), 1e-4, {}),
            ("ggn", lambda: case.ggn_vp(v), 1e-4, {}),
            ("ef", lambda: case.ef_vp(v, ps), 1e-4, {}),
            ("fisher_mc", lambda: case.ggn_vp(v), 0.15, {"mc_samples": 2000})]
    for kind, ref, tol, opts in refs:
        res = blk({"op": "matvec", "curvature": kind, "seed": 3,
                   "options": dict(opts, vector=vc)})
        want = ref()
        e = rel(res["product"], lay.to_curvd(want))
        check(f"{tag} {kind} product", e < tol, f"rel err {e}")
        q = float(v @ want)
        check(f"{tag} {kind} quadratic form",
              abs(res["quadratic_form"] - q) <= max(tol, 1e-4) * abs(q) + 1e-7,
              f"{res['quadratic_form']} vs {q}")
    res = blk({"op": "per_sample_gradients"})
    got = torch.tensor(res["per_sample_gradients"], dtype=torch.float64)
    e = rel(got, ps[:, lay.idx])
    check(tag + " per-sample gradients", e < 1e-4 and got.shape[0] == case.x.shape[0],
          f"rel err {e}, shape {list(got.shape)}")
    # per-module blocks: one per module owning parameters, named by its qualified name
    res = run(d, {"op": "gradient", "blocks": "layer"})
    got_groups = {frozenset(b["params"]) for b in res["blocks"]}
    want_groups = module_groups(arch, case.names)
    check(tag + " per-module blocks", got_groups == want_groups,
          f"{sorted(map(sorted, got_groups))} vs {sorted(map(sorted, want_groups))}"[:600])
    ok = all(rel(b["gradient"], g[lay.sub(b["params"])]) < 1e-4 for b in res["blocks"])
    check(tag + " per-module gradients", ok)
    # the smallest module block: matvec and dense Hessian/GGN against torch's sub-blocks
    small = min(want_groups, key=lambda s: sum(case.sizes[case.names.index(n)] for n in s))
    names = [n for n in case.names if n in small]
    sub = lay.sub(names)
    border = run(d, {"op": "gradient", "blocks": [names]})["blocks"][0]["params"]
    bidx = Layout(case, border).idx   # the block's vectors are in curvd's order of its names
    u = torch.linspace(-1, 1, len(sub), dtype=torch.float64)
    emb = torch.zeros(case.D, dtype=torch.float64)
    emb[bidx] = u
    res = run(d, {"op": "matvec", "blocks": [names], "options": {"vector": u.tolist()}})
    b0 = res["blocks"][0] if "blocks" in res else dict(res, params=border)  # one block: top level
    e = rel(b0["product"], case.hvp(emb)[Layout(case, b0["params"]).idx])
    check(f"{tag} block matvec on {names}", e < 1e-4 and b0["params"] == border, f"rel err {e}")
    if len(sub) <= 64:
        cols_h, cols_g = [], []
        for i in range(len(sub)):
            ei = torch.zeros(case.D, dtype=torch.float64)
            ei[sub[i]] = 1
            cols_h.append(case.hvp(ei)[sub])
            cols_g.append(case.ggn_vp(ei)[sub])
        for kind, cols in (("hessian", cols_h), ("ggn", cols_g)):
            res = run(d, {"op": "dense", "curvature": kind, "blocks": [names]})
            b0 = res["blocks"][0]
            perm = [names.index(n) for n in b0["params"]]
            idx = torch.cat([torch.arange(sum(case.sizes[case.names.index(m)] for m in
                                              names[:j]),
                                          sum(case.sizes[case.names.index(m)] for m in
                                              names[:j + 1])) for j in perm])
            want = torch.stack(cols, 1)[idx][:, idx]
            e = rel(torch.tensor(b0["matrix"]).T, want)
            check(f"{tag} dense {kind} on {names}", e < 1e-4, f"rel err {e}")


def zoo_cases():
    """Exporter-only cases: every mapping of torch_graph, evaluated from the JSON alone."""
    def arith():
        torch.manual_seed(8)
        return ZooArith().eval(), nn.MSELoss(), [4, 6], torch.randn(3, 4, 6), torch.randn(3, 4), 1

    def modules():
        torch.manual_seed(9)
        m = ZooModules()
        gm.randomize_bn(m, 9)
        return m.eval(), nn.MSELoss(), [2, 8], torch.randn(3, 2, 8), torch.randn(3, 4), 1

    def tokens():
        torch.manual_seed(10)
        return ZooTokens().eval(), nn.CrossEntropyLoss(), [5], torch.randint(0, 7, (3, 5)), \
            torch.randint(0, 7, (3,)), 1
    return [("zoo-arith", arith), ("zoo-modules", modules), ("zoo-tokens", tokens)]


def check_zoo():
    for tag, make in zoo_cases():
        model, loss_fn, shape, x, y, class_dim = make()
        arch, params = export_model(model, loss_fn, shape, class_dim, x)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "params.safetensors")
            with open(path, "wb") as f:
                f.write(params)
            check_export(tag, model, loss_fn, shape, x, y, class_dim, arch,
                         tr.read_safetensors(path))


def main():
    only = os.environ.get("GRAPH_CASES")  # comma-separated tags, for debugging
    if not only:
        check_zoo()
    have_curvd = os.path.exists(CURVD)
    for tag, make in cases():
        if only and tag not in only.split(","):
            continue
        model, loss_fn, shape, x, y, class_dim = make()
        arch, params = export_model(model, loss_fn, shape, class_dim, x)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "arch.json"), "w") as f:
                json.dump(arch, f)
            with open(os.path.join(d, "params.safetensors"), "wb") as f:
                f.write(params)
            with open(os.path.join(d, "data.safetensors"), "wb") as f:
                f.write(export_dataset(x, y))
            tensors = tr.read_safetensors(os.path.join(d, "params.safetensors"))
            check_export(tag, model, loss_fn, shape, x, y, class_dim, arch, tensors)
            if not have_curvd:
                skip(tag + " curvd", "no curvd binary at %s" % CURVD)
                continue
            try:
                check_curvd(tag, Case(model, loss_fn, x, y, class_dim), arch, d)
            except (RuntimeError, KeyError, TypeError, IndexError) as e:
                check(tag + " curvd run", False, "%s: %s" % (type(e).__name__, str(e)[:800]))
    return summary()


if __name__ == "__main__":
    sys.exit(main())
