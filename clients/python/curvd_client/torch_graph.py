"""torch.fx -> curvd's graph architecture form (issue 19; documented in docs/interface.md).

This module owns the export of a model that is not a flat ``nn.Sequential``:
it traces the model with ``torch.fx``, runs the traced graph once on an example
input (``ShapeProp``, recording every node's concrete value), and maps the fx
nodes onto curvd's canonical nodes: ``placeholder``, ``get_attr`` (learned
tensors and constant buffers outside called modules), ``call_module`` (a
module of ``modules``), ``call_function`` (a canonical function name with
PyTorch's keyword attributes) and ``output``.

Folding: nodes that produce Python values (``x.size(1)``, ``x.shape``, integer
arithmetic on them) are evaluated and disappear; their consumers get the
value.  Reshapes write the concrete per-sample shape with batch ``-1``.
Tensors computed only from buffers (``self.mask[:T, :T]``) are constants: they
must equal a registered (persistent) buffer, which becomes a ``get_attr``.
``chunk``/``split`` + ``getitem`` and slicing become ``narrow`` (+ ``reshape``).
What cannot be mapped raises :class:`UnsupportedNodeError` naming the node, the
module path it was traced in, the source line and what is supported.

Used by :func:`curvd_client.torch_export.export_architecture`; not a public API
by itself.
"""
from __future__ import annotations

import dis
import inspect
import math
import operator
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import torch_export as _te

#: Module class names the graph form evaluates (the Sequential ones and issue 19's).
GRAPH_MODULES: Tuple[str, ...] = _te.SUPPORTED_MODULES + (
    "LayerNorm", "GroupNorm", "Embedding", "MultiheadAttention", "Mish", "Hardswish", "Conv1d",
    "AvgPool1d", "MaxPool1d", "Upsample", "ConvTranspose2d", "Softmax", "LogSoftmax")

#: Canonical function targets (docs/interface.md) and what the exporter maps onto them.
SUPPORTED_FUNCTIONS: Tuple[str, ...] = (
    "add (+, +=, torch.add, x.add)", "sub", "mul", "div (/)", "neg", "pow (**, scalar exponent)",
    "relu", "gelu", "silu", "sigmoid", "tanh", "softplus", "elu", "leaky_relu", "mish",
    "hardswish", "softmax", "log_softmax", "transpose", "permute",
    "reshape (view, reshape, squeeze, unsqueeze)", "flatten", "cat", "narrow (chunk/split + "
    "getitem, slicing)", "mean", "sum", "matmul (@)", "bmm", "masked_fill (mask = a buffer)",
    "scaled_dot_product_attention", "dropout/contiguous/clone (identity)",
    "F.linear", "F.conv1d", "F.conv2d", "F.layer_norm", "F.group_norm", "F.embedding",
    "F.batch_norm", "F.adaptive_avg_pool2d", "F.max_pool1d/2d", "F.avg_pool1d/2d",
    "F.interpolate (nearest)")

# Module types whose call may be written as a function node (tied weights).
_FUNCTION_FORM = {"Linear": "linear", "Embedding": "embedding", "LayerNorm": "layer_norm",
                  "Conv1d": "conv1d", "Conv2d": "conv2d", "GroupNorm": "group_norm"}


class UnsupportedNodeError(_te.UnsupportedModuleError):
    """A traced node curvd cannot evaluate.

    Attributes:
        node: The fx node's name (e.g. ``"einsum_1"``).
        module_path: The qualified name of the module whose forward() it was traced in
            (``""`` for the top-level model).
        source: ``file:line: code`` that fx reports for it (``""`` if unknown).
        reason: Why it is refused.
    """

    def __init__(self, node: str, what: str, module_path: str, source: str, reason: str,
                 module_type: str = "") -> None:
        self.index = None
        self.node = node
        self.module_path = module_path
        self.source = source
        self.reason = reason
        self.module_type = module_type
        where = "in module '%s'" % module_path if module_path else "in the top-level module"
        msg = "cannot export node '%s' (%s) %s" % (node, what, where)
        if source:
            msg += " at %s" % source
        msg += ": %s. Supported modules: %s; functions: %s" % (
            reason, ", ".join(GRAPH_MODULES), ", ".join(SUPPORTED_FUNCTIONS))
        ValueError.__init__(self, msg)


# ---- tracing -----------------------------------------------------------------------------

def _proxy_iter(self: Any) -> Any:
    """fx.Proxy.__iter__ that finds the calling instruction by its byte offset.

    torch 1.13 indexes the instruction list by f_lasti // 2, which is wrong on
    Python 3.11 (inline caches), so ``q, k, v = x.split(...)`` failed to trace.
    """
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    if caller is not None:
        for inst in dis.get_instructions(caller.f_code):
            if inst.offset == caller.f_lasti:
                if inst.opname == "UNPACK_SEQUENCE":
                    return (self[i] for i in range(inst.argval))
                break
    return self.tracer.iter(self)


class _Tracer(fx.Tracer):
    """Records each node's module path and source line; proxies buffers (get_attr)."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True
        self._path: List[str] = []

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):  # its node belongs to the calling module
            return super().call_module(m, forward, args, kwargs)
        self._path.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._path.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        n = super().create_node(*args, **kwargs)
        n.meta["curvd_module"] = self._path[-1] if self._path else ""
        return n


def _trace(model: nn.Module) -> fx.Graph:
    if type(model).forward is nn.Module.forward:
        raise _te.UnsupportedModuleError(None, model, "it defines no forward()", "model")
    params = list(inspect.signature(model.forward).parameters.values())
    params = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                              p.KEYWORD_ONLY)]
    if not params:
        raise _te.UnsupportedModuleError(None, model, "its forward() takes no input", "model")
    concrete = {}
    for p in params[1:]:
        if p.default is p.empty:
            raise _te.UnsupportedModuleError(
                None, model, "forward() takes more than one input (%s); curvd models take one "
                "input tensor" % ", ".join(q.name for q in params), "model")
        concrete[p.name] = p.default
    patch = sys.version_info >= (3, 11) and torch.__version__.split(".")[0] in ("1",)
    old_iter = fx.Proxy.__iter__
    if patch:
        fx.Proxy.__iter__ = _proxy_iter  # type: ignore[assignment]
    try:
        return _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise _te.UnsupportedModuleError(
            None, model, "torch.fx cannot trace it (%s: %s). curvd exports models that "
            "torch.fx.symbolic_trace can trace: no Python control flow on tensor values, one "
            "input tensor" % (type(e).__name__, e), "model") from e
    finally:
        if patch:
            fx.Proxy.__iter__ = old_iter  # type: ignore[assignment]


class _Recorder(ShapeProp):
    """ShapeProp that also keeps every node's value (tensors, ints, tuples)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        self.values[n] = v
        return v


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _same_as_eager(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor) -> None:
    """The traced graph must compute what the model computes (on the example and, for float
    inputs, on a random batch): fx records `h += y` as h + y, so an in-place op on a tensor
    that another name still reads would be exported wrong."""
    inputs = [example]
    if example.dtype.is_floating_point:
        g = torch.Generator().manual_seed(0)
        inputs.append(torch.randn(example.shape, generator=g))
    for x in inputs:
        want, got = model(x.clone()), gm(x.clone())
        if not (_is_tensor(want) and _is_tensor(got)):
            return  # the output check names what the model returns
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-6,
                                                         equal_nan=True):
            raise _te.UnsupportedModuleError(
                None, model, "the graph torch.fx traced computes something else than the model "
                "(max difference %.3g): in-place operations on tensors that are read again "
                "(h += x while another name holds h; x.add_(...)) are not seen by torch.fx; "
                "use out-of-place forms" % float((want - got).abs().max())
                if want.shape == got.shape else "shape %s vs %s" % (list(got.shape),
                                                                     list(want.shape)), "model")


def _source(n: fx.Node) -> str:
    """``file:line: code`` of the innermost user frame fx recorded for n ("" if none)."""
    st = getattr(n, "stack_trace", None) or n.meta.get("stack_trace") or ""
    lines = [ln for ln in st.rstrip().splitlines() if ln.strip()]
    for i, ln in enumerate(lines):  # innermost frame first (fx walks the stack upwards)
        s = ln.strip()
        if not s.startswith("File ") or __file__ in s or _TORCH_DIR in s:
            continue
        loc = s[5:]
        try:
            fname, rest = loc.split(", line ", 1)
            loc = "%s:%s" % (fname.strip('"'), rest.split(",", 1)[0])
        except ValueError:
            pass
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        return "%s: %s" % (loc, code) if code and not code.startswith("File ") else loc
    return ""


def _fn_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", None) or repr(t)
    if mod in ("_operator", "operator"):
        return "operator." + name
    if mod.startswith("torch.nn.functional"):
        return "F." + name
    if mod.startswith("torch"):
        return "torch." + name
    return "%s.%s" % (mod, name) if mod else name


# ---- the target table ----------------------------------------------------------------------

def _bind_spec(*names: str, **defaults: Any) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
    return names, defaults


_BIN = _bind_spec("input", "other", alpha=1)
_UN = _bind_spec("input")

# (fx target or ("method", name)) -> (canonical, spec)
_TABLE: Dict[Any, Tuple[str, Any]] = {}


def _reg(canon: str, spec: Any, *targets: Any) -> None:
    for t in targets:
        if t is not None:
            _TABLE[t] = (canon, spec)


def _m(name: str) -> Tuple[str, str]:
    return ("method", name)


_reg("add", _BIN, operator.add, operator.iadd, torch.add, _m("add"), _m("add_"))
_reg("sub", _BIN, operator.sub, operator.isub, torch.sub, torch.subtract, _m("sub"), _m("sub_"))
_reg("rsub", _BIN, torch.rsub)
_reg("mul", _BIN, operator.mul, operator.imul, torch.mul, torch.multiply, _m("mul"), _m("mul_"))
_reg("div", _bind_spec("input", "other", rounding_mode=None), operator.truediv,
     operator.itruediv, torch.div, torch.true_divide, _m("div"), _m("div_"), _m("true_divide"))
_reg("neg", _UN, operator.neg, torch.neg, _m("neg"))
_reg("pow", _bind_spec("input", "exponent"), operator.pow, torch.pow, _m("pow"))
_reg("relu", _bind_spec("input", inplace=False), F.relu, F.relu_, torch.relu, torch.relu_,
     _m("relu"), _m("relu_"))
_reg("gelu", _bind_spec("input", approximate="none"), F.gelu)
_reg("silu", _bind_spec("input", inplace=False), F.silu)
_reg("mish", _bind_spec("input", inplace=False), F.mish)
_reg("hardswish", _bind_spec("input", inplace=False), F.hardswish)
_reg("sigmoid", _UN, torch.sigmoid, getattr(F, "sigmoid", None), _m("sigmoid"))
_reg("tanh", _UN, torch.tanh, getattr(F, "tanh", None), _m("tanh"))
_reg("softplus", _bind_spec("input", beta=1, threshold=20), F.softplus)
_reg("elu", _bind_spec("input", alpha=1.0, inplace=False), F.elu)
_reg("leaky_relu", _bind_spec("input", negative_slope=0.01, inplace=False), F.leaky_relu)
_SOFTMAX = _bind_spec("input", "dim", _stacklevel=3, dtype=None)
_reg("softmax", _SOFTMAX, F.softmax)
_reg("log_softmax", _SOFTMAX, F.log_softmax)
_reg("softmax", _bind_spec("input", "dim", dtype=None), torch.softmax, _m("softmax"))
_reg("log_softmax", _bind_spec("input", "dim", dtype=None), torch.log_softmax, _m("log_softmax"))
_reg("transpose", _bind_spec("input", "dim0", "dim1"), torch.transpose, _m("transpose"))
_reg("permute", _bind_spec("input", "dims"), torch.permute, _m("permute"))
_reg("reshape", _bind_spec("input", "shape"), torch.reshape, _m("reshape"), _m("view"),
     torch.squeeze, _m("squeeze"), torch.unsqueeze, _m("unsqueeze"))
_reg("flatten", _bind_spec("input", start_dim=0, end_dim=-1), torch.flatten, _m("flatten"))
_reg("cat", _bind_spec("tensors", dim=0), torch.cat, getattr(torch, "concat", None))
_reg("chunk", _bind_spec("input", "chunks", dim=0), torch.chunk, _m("chunk"))
_reg("split", _bind_spec("input", "split_size_or_sections", dim=0), torch.split, _m("split"))
_reg("getitem", _bind_spec("input", "index"), operator.getitem)
_reg("mean", _bind_spec("input", dim=None, keepdim=False, dtype=None), torch.mean, _m("mean"))
_reg("sum", _bind_spec("input", dim=None, keepdim=False, dtype=None), torch.sum, _m("sum"))
_reg("matmul", _bind_spec("input", "other"), operator.matmul, torch.matmul, _m("matmul"))
_reg("bmm", _bind_spec("input", "mat2"), torch.bmm, _m("bmm"))
_reg("masked_fill", _bind_spec("input", "mask", "value"), torch.masked_fill, _m("masked_fill"),
     _m("masked_fill_"))
_reg("scaled_dot_product_attention",
     _bind_spec("query", "key", "value", attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None),
     getattr(F, "scaled_dot_product_attention", None))
_reg("dropout", _bind_spec("input", p=0.5, training=True, inplace=False), F.dropout,
     F.dropout1d if hasattr(F, "dropout1d") else None, F.dropout2d, F.alpha_dropout)
_reg("dropout", _bind_spec("input", "p", "training"), torch.dropout)
_reg("identity", _UN, _m("contiguous"), _m("clone"))
_reg("linear", _bind_spec("input", "weight", bias=None), F.linear)
_reg("layer_norm", _bind_spec("input", "normalized_shape", weight=None, bias=None, eps=1e-5),
     F.layer_norm)
_reg("group_norm", _bind_spec("input", "num_groups", weight=None, bias=None, eps=1e-5),
     F.group_norm)
_reg("embedding", _bind_spec("input", "weight", padding_idx=None, max_norm=None, norm_type=2.0,
                             scale_grad_by_freq=False, sparse=False), F.embedding)
_CONV = _bind_spec("input", "weight", bias=None, stride=1, padding=0, dilation=1, groups=1)
_reg("conv1d", _CONV, F.conv1d)
_reg("conv2d", _CONV, F.conv2d)
_reg("batch_norm", _bind_spec("input", "running_mean", "running_var", weight=None, bias=None,
                              training=False, momentum=0.1, eps=1e-5), F.batch_norm)
_reg("adaptive_avg_pool2d", _bind_spec("input", "output_size"), F.adaptive_avg_pool2d)
_MAXP = _bind_spec("input", "kernel_size", stride=None, padding=0, dilation=1, ceil_mode=False,
                   return_indices=False)
_AVGP = _bind_spec("input", "kernel_size", stride=None, padding=0, ceil_mode=False,
                   count_include_pad=True, divisor_override=None)
_reg("max_pool2d", _MAXP, F.max_pool2d)
_reg("max_pool1d", _MAXP, F.max_pool1d)
_reg("avg_pool2d", _AVGP, F.avg_pool2d)
_reg("avg_pool1d", _AVGP, F.avg_pool1d)
_reg("interpolate", _bind_spec("input", size=None, scale_factor=None, mode="nearest",
                               align_corners=None, recompute_scale_factor=None, antialias=False),
     F.interpolate)

_ACT_ATTRS = {"gelu": ("approximate",), "softplus": ("beta", "threshold"), "elu": ("alpha",),
              "leaky_relu": ("negative_slope",)}
_FACTORS = ("add", "sub", "rsub", "mul", "div")


def _lookup(n: fx.Node) -> Optional[Tuple[str, Any]]:
    key = ("method", n.target) if n.op == "call_method" else n.target
    try:
        return _TABLE.get(key)
    except TypeError:  # unhashable target
        return None


def _bind(n: fx.Node, spec: Any) -> Dict[str, Any]:
    names, defaults = spec
    args = list(n.args)
    out: Dict[str, Any] = {}
    if names and names[-1] in ("dims", "shape") and n.op == "call_method" and len(args) > 2:
        args = args[:1] + [tuple(args[1:])]  # x.permute(0, 2, 1) / x.view(a, b)
    allnames = list(names) + [k for k in defaults if k not in names]
    for name, a in zip(allnames, args):
        out[name] = a
    for k, v in n.kwargs.items():
        out[k] = v
    for k, v in defaults.items():
        out.setdefault(k, v)
    return out


# ---- the exporter --------------------------------------------------------------------------

def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _num(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, int):
        return v
    raise TypeError(v)


class _GraphExporter:
    """One export: the fx graph, its recorded values and the nodes written so far."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.model = model
        self.graph = _trace(model)
        gm = fx.GraphModule(model, self.graph)
        rec = _Recorder(gm)
        with torch.no_grad():
            try:
                rec.propagate(example)
            except Exception as e:
                raise _te.UnsupportedModuleError(
                    None, model, "running the traced model on an example input of shape %s "
                    "failed (%s: %s); check input_shape" % (list(example.shape), type(e).__name__,
                                                           e), "model") from e
            _same_as_eager(model, gm, example)
        self.values = rec.values
        self.params = _all_tensors(model, "_parameters")
        self.first_param_name = {id(p): k for k, p in model.named_parameters()}
        self.state_keys = set(model.state_dict().keys())
        self.buffers = _all_tensors(model, "_buffers")
        self.kind: Dict[fx.Node, str] = {}
        self.alias: Dict[fx.Node, str] = {}     # fx node -> name of the curvd node it is
        self.param_of: Dict[fx.Node, str] = {}  # fx node -> state_dict name (kind "param")
        self.nodes: List[Dict[str, Any]] = []
        self.names: set = set()
        self.get_attrs: Dict[str, str] = {}     # state_dict name -> node name
        self.modules_called: Dict[str, int] = {}
        self.module_json: Dict[str, Dict[str, Any]] = {}
        self.split_dim: Dict[fx.Node, int] = {}

    # -- errors and helpers --
    def fail(self, n: fx.Node, reason: str, module_type: str = "") -> UnsupportedNodeError:
        if n.op == "call_module":
            what = "call_module %s nn.%s" % (n.target, type(self.model.get_submodule(
                n.target)).__name__)
        elif n.op in ("call_function", "call_method"):
            what = "%s %s" % (n.op, ("x." + n.target) if n.op == "call_method"
                              else _fn_name(n.target))
        else:
            what = "%s %s" % (n.op, n.target)
        return UnsupportedNodeError(n.name, what, n.meta.get("curvd_module", ""), _source(n),
                                    reason, module_type)

    def shape(self, n: fx.Node) -> List[int]:
        return list(self.values[n].shape)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name = "%s_%d" % (base, k)
            k += 1
        return name

    def emit(self, d: Dict[str, Any]) -> str:
        if d["name"] in self.names:
            d["name"] = self.fresh(d["name"])
        self.names.add(d["name"])
        self.nodes.append(d)
        return d["name"]

    def value(self, a: Any) -> Any:
        """A folded argument: nodes of kind value replaced by their values (recursively)."""
        if isinstance(a, fx.Node):
            if self.kind[a] != "value":
                raise KeyError(a)
            return self.values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        if isinstance(a, slice):
            return slice(self.value(a.start), self.value(a.stop), self.value(a.step))
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        return a

    def number(self, n: fx.Node, a: Any, what: str) -> Any:
        try:
            v = self.value(a)
            return _num(v)
        except (KeyError, TypeError):
            got = ("the tensor '%s'" % a.name) if isinstance(a, fx.Node) else repr(a)
            raise self.fail(n, "%s must be a Python number, got %s" % (what, got)) from None

    def is_tensor_arg(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and self.kind[a] in ("act", "param", "const", "derived")

    def dim(self, n: fx.Node, d: Any, rank: int, what: str = "dim") -> int:
        d = self.value(d)
        if not isinstance(d, int) or isinstance(d, bool) or not -rank <= d < rank:
            raise self.fail(n, "%s %r is not a dimension of a rank-%d tensor" % (what, d, rank))
        d = d % rank
        if d == 0:
            raise self.fail(n, "%s %d is the batch dimension; curvd evaluates each sample "
                            "separately and refuses ops over the batch dimension" % (what, d))
        return d

    # -- tensors as arguments --
    def get_attr(self, target: str, buffer: bool) -> str:
        if target in self.get_attrs:
            return self.get_attrs[target]
        t = self.params[target] if not buffer else self.buffers[target]
        d: Dict[str, Any] = {"name": target.replace(".", "_"), "op": "get_attr", "target": target,
                             "shape": list(t.shape)}
        if buffer:
            d["buffer"] = True
        self.get_attrs[target] = self.emit(d)
        return self.get_attrs[target]

    def const_buffer(self, user: fx.Node, a: fx.Node) -> str:
        """The state_dict name of the buffer a constant tensor equals (else an error)."""
        v = self.values[a]
        roots = [a]
        seen = set()
        cands: List[str] = []
        while roots:
            r = roots.pop()
            if r in seen:
                continue
            seen.add(r)
            if r.op == "get_attr" and r.target in self.buffers:
                cands.append(r.target)
            roots.extend(r.all_input_nodes)
        cands += [k for k in self.buffers if k not in cands]
        for k in cands:
            b = self.buffers[k]
            if k in self.state_keys and b.shape == v.shape and b.dtype == v.dtype and \
                    torch.equal(b, v):
                return k
        hint = (" (a slice of buffer %s %s: register the buffer at exactly the size the model "
                "uses, e.g. the mask at the sequence length, and use it without slicing or "
                "comparisons)" % (cands[0], list(self.buffers[cands[0]].shape))) if cands else ""
        nonpers = [k for k in cands if k not in self.state_keys]
        if nonpers and a.op == "get_attr":
            hint = " (buffer %s is not persistent: register it with persistent=True so that it " \
                   "is in state_dict())" % nonpers[0]
        raise self.fail(user, "argument '%s' is a constant tensor computed in forward() (shape "
                        "%s, %s) that is not a registered buffer%s" % (a.name, list(v.shape),
                                                                       v.dtype, hint))

    def tensor(self, user: fx.Node, a: Any, what: str = "input") -> str:
        """The curvd node name of a tensor argument (emitting get_attr nodes as needed)."""
        if not isinstance(a, fx.Node):
            raise self.fail(user, "%s must be a tensor, got %r" % (what, a))
        k = self.kind[a]
        if k == "act":
            return self.alias[a]
        if k == "param":
            return self.get_attr(self.param_of[a], False)
        if k == "const":
            return self.get_attr(self.const_buffer(user, a), True)
        if k == "derived" and self.embedding_table(a) is not None:
            return self.get_attr(self.embedding_table(a), False)  # type: ignore[arg-type]
        if k == "derived":
            raise self.fail(a, "it computes a tensor from parameters alone (not from the model "
                            "input); curvd takes learned tensors as they are: use the parameter "
                            "directly (e.g. F.linear(x, W) instead of x @ W.t(), a positional "
                            "embedding registered at the sequence length instead of a slice)")
        raise self.fail(user, "%s '%s' is not a tensor" % (what, a.name))

    def embedding_table(self, a: fx.Node) -> Optional[str]:
        """emb(torch.arange(V)) with V = num_embeddings (positions): the weight itself."""
        if a.op != "call_module" or len(a.args) != 1 or not isinstance(a.args[0], fx.Node):
            return None
        m = self.model.get_submodule(a.target)
        ids = self.values.get(a.args[0])
        if not (_te._exact(m, "Embedding") and m.max_norm is None and self.kind[a.args[0]] ==
                "const" and _is_tensor(ids) and not ids.dtype.is_floating_point and
                torch.equal(ids, torch.arange(m.num_embeddings))):
            return None
        return self.first_param_name[id(m.weight)]

    def param(self, user: fx.Node, a: Any, what: str) -> Optional[str]:
        """The state_dict name of a parameter/buffer argument of a functional module call."""
        if a is None:
            return None
        if isinstance(a, fx.Node) and self.kind[a] == "param":
            return self.param_of[a]
        if isinstance(a, fx.Node) and self.kind[a] == "const":
            return self.const_buffer(user, a)
        raise self.fail(user, "%s must be a parameter or buffer of the model used as it is "
                        "(got '%s')" % (what, getattr(a, "name", a)))

    # -- classification --
    def classify(self) -> None:
        first = True
        for n in self.graph.nodes:
            v = self.values.get(n)
            if n.op == "placeholder":
                self.kind[n] = "act" if first else "value"
                if first:
                    self.input_node = n
                    self.alias[n] = self.emit({"name": n.name, "op": "placeholder"})
                first = False
                continue
            if n.op == "output":
                continue
            if n.op == "get_attr":
                if _is_tensor(v) and n.target in self.params:
                    self.kind[n] = "param"   # named as named_parameters() names it (ties)
                    self.param_of[n] = self.first_param_name.get(id(self.params[n.target]),
                                                                 n.target)
                else:
                    self.kind[n] = "const" if _is_tensor(v) else "value"
                continue
            tensors = _is_tensor(v) or (isinstance(v, (tuple, list)) and
                                        any(_is_tensor(t) for t in v))
            if not tensors:
                self.kind[n] = "value"
                continue
            ins = [self.kind[i] for i in n.all_input_nodes]
            if n.op == "call_module" and any(True for _ in self.model.get_submodule(
                    n.target).parameters()):
                ins.append("param")   # e.g. an Embedding of torch.arange(T): not a constant
            if "act" in ins:
                self.kind[n] = "act"
            elif "param" in ins or "derived" in ins:
                src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
                if (src is not None and self.kind[src] == "param" and _is_tensor(v) and
                        v.shape == self.values[src].shape and
                        v.data_ptr() == self.values[src].data_ptr()):
                    self.kind[n] = "param"   # p[:, :T] with T the full size, p.contiguous()
                    self.param_of[n] = self.param_of[src]
                else:
                    self.kind[n] = "derived"
            else:
                self.kind[n] = "const"

    # -- mapping --
    def run(self) -> List[Dict[str, Any]]:
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.classify()
        out_node = None
        for n in self.graph.nodes:
            if n.op == "output":
                out_node = n
                continue
            if self.kind.get(n) != "act" or n in self.alias:
                continue
            self.check_inplace(n)
            if n.op == "call_module":
                self.call_module(n)
            elif n.op in ("call_function", "call_method"):
                self.call_function(n)
            else:
                raise self.fail(n, "unexpected node kind")
        assert out_node is not None
        res = out_node.args[0]
        if not isinstance(res, fx.Node) or not _is_tensor(self.values.get(res)):
            raise self.fail(out_node, "the model must return one tensor (got %s)"
                            % type(self.values.get(res, res)).__name__)
        self.output_rank = self.values[res].dim()
        self.emit({"name": self.fresh("output"), "op": "output",
                   "args": [self.tensor(out_node, res)]})
        return self.nodes

    def node(self, n: fx.Node, target: str, args: List[str], **attrs: Any) -> None:
        d: Dict[str, Any] = {"name": n.name, "op": "call_function", "target": target,
                             "args": args}
        d.update(attrs)
        self.alias[n] = self.emit(d)

    def call_module(self, n: fx.Node) -> None:
        m = self.model.get_submodule(n.target)
        tname = type(m).__name__
        typ = next((s for s in GRAPH_MODULES if _te._exact(m, s)), None)
        if typ is None:
            reason = ("it overrides forward() of nn.%s" % next(
                s for s in GRAPH_MODULES if isinstance(m, getattr(nn, s)))
                if any(isinstance(m, getattr(nn, s)) for s in GRAPH_MODULES)
                else "curvd has no nn.%s" % tname)
            raise self.fail(n, reason, tname)
        try:
            attrs = module_json(m, typ, n.target)
        except _te.UnsupportedModuleError as e:
            raise self.fail(n, e.reason, tname) from None
        own = list(m.named_parameters())
        self.modules_called[n.target] = self.modules_called.get(n.target, 0) + 1
        if own and self.modules_called[n.target] > 1:
            raise self.fail(n, "module '%s' is called more than once and has parameters "
                            "(curvd shares only parameter-free modules between calls)"
                            % n.target, tname)
        tied = {k: self.first_param_name[id(p)] for k, p in own
                if self.first_param_name[id(p)] != "%s.%s" % (n.target, k)}
        if typ == "MultiheadAttention":
            self.mha(n, m, attrs)
            return
        if len(n.args) != 1 or n.kwargs:
            raise self.fail(n, "nn.%s takes one input here" % typ, tname)
        x = self.tensor(n, n.args[0])
        if tied:
            if typ not in _FUNCTION_FORM:
                raise self.fail(n, "its parameters are shared with another module (%s)" %
                                ", ".join(sorted(set(tied.values()))), tname)
            params = {k: self.first_param_name[id(p)] for k, p in own}
            fa = {k: v for k, v in attrs.items() if k != "type"}
            self.node(n, _FUNCTION_FORM[typ], [x], **fa, params=params)
            return
        self.module_json[n.target] = attrs
        self.alias[n] = self.emit({"name": n.name, "op": "call_module", "target": n.target,
                                   "args": [x]})

    def mha(self, n: fx.Node, m: nn.Module, attrs: Dict[str, Any]) -> None:
        b = _bind(n, _bind_spec("query", "key", "value", key_padding_mask=None, need_weights=True,
                                attn_mask=None, average_attn_weights=True, is_causal=False))
        if b["key_padding_mask"] is not None:
            raise self.fail(n, "key_padding_mask is not supported (curvd's attention masks are "
                            "constant buffers)", "MultiheadAttention")
        for u in n.users:
            if not (u.op == "call_function" and u.target is operator.getitem and
                    self.value(u.args[1]) == 0):
                raise self.fail(u, "only the attention output (index 0) of nn.MultiheadAttention "
                                "is supported: call it with need_weights=False and use [0]",
                                "MultiheadAttention")
        args = [self.tensor(n, b[k], k) for k in ("query", "key", "value")]
        if b["attn_mask"] is not None:
            args.append(self.get_attr(self.param(n, b["attn_mask"], "attn_mask"), True))
        d: Dict[str, Any] = {"name": n.name, "op": "call_module", "target": n.target,
                             "args": args}
        if self.value(b["is_causal"]):
            d["is_causal"] = True
        self.module_json[n.target] = attrs
        self.alias[n] = self.emit(d)
        for u in n.users:
            self.alias[u] = self.alias[n]

    def check_inplace(self, n: fx.Node) -> None:
        """An in-place op on a tensor that is read again afterwards is refused: the traced
        graph would read the value before the op, PyTorch reads the value after it."""
        if n.op == "call_method":
            inplace = n.target.endswith("_") and not n.target.startswith("_")
        elif n.op == "call_module":
            inplace = bool(getattr(self.model.get_submodule(n.target), "inplace", False))
        else:
            inplace = (n.kwargs.get("inplace") is True or
                       getattr(n.target, "__name__", "").endswith("_") or
                       n.target in (operator.iadd, operator.isub, operator.imul,
                                    operator.itruediv))
        src = n.args[0] if n.args else None
        if not inplace or not isinstance(src, fx.Node):
            return
        order = self.order
        later = [u.name for u in src.users if u is not n and order[u] > order[n]]
        if later:
            raise self.fail(n, "it changes '%s' in place, and %s read%s it afterwards; use the "
                            "out-of-place form (x = x + y, inplace=False)" % (
                                src.name, ", ".join(later), "s" if len(later) == 1 else ""))

    def call_function(self, n: fx.Node) -> None:
        hit = _lookup(n)
        if hit is None:
            raise self.fail(n, "curvd has no mapping for %s" % (
                "x." + n.target if n.op == "call_method" else _fn_name(n.target)))
        canon, spec = hit
        b = _bind(n, spec)
        h = getattr(self, "f_" + canon, None)
        if h is not None:
            h(n, b)
        elif canon in _FACTORS:
            self.arith(n, canon, b)
        else:
            self.unary(n, canon, b)

    # arithmetic: tensor op tensor, tensor op number, number op tensor
    def arith(self, n: fx.Node, canon: str, b: Dict[str, Any]) -> None:
        if self.value(b.get("alpha", 1)) != 1:
            raise self.fail(n, "alpha=%r is not supported" % (b["alpha"],))
        if b.get("rounding_mode") is not None:
            raise self.fail(n, "rounding_mode=%r is not supported" % (b["rounding_mode"],))
        a, o = b["input"], b["other"]
        reverse = False
        if canon == "rsub":
            canon, reverse = "sub", True
        ta, to = self.is_tensor_arg(a), self.is_tensor_arg(o)
        if ta and to:
            self.node(n, canon, [self.tensor(n, a), self.tensor(n, o)])
            return
        if to:
            a, o = o, a
            reverse = not reverse
        elif not ta:
            raise self.fail(n, "no tensor operand")
        s = self.number(n, o, "the scalar operand")
        attrs: Dict[str, Any] = {"scalar": s}
        if reverse and canon in ("sub", "div"):
            attrs["reverse"] = True
        self.node(n, canon, [self.tensor(n, a)], **attrs)

    def unary(self, n: fx.Node, canon: str, b: Dict[str, Any]) -> None:
        attrs = {k: self.number(n, b[k], k) if k != "approximate" else self.value(b[k])
                 for k in _ACT_ATTRS.get(canon, ())}
        self.node(n, canon, [self.tensor(n, b["input"])], **attrs)

    def f_pow(self, n: fx.Node, b: Dict[str, Any]) -> None:
        if not self.is_tensor_arg(b["input"]) or self.is_tensor_arg(b["exponent"]):
            raise self.fail(n, "only tensor ** number is supported")
        self.node(n, "pow", [self.tensor(n, b["input"])],
                  exponent=self.number(n, b["exponent"], "exponent"))

    def f_neg(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self.node(n, "neg", [self.tensor(n, b["input"])])

    def _softmax(self, n: fx.Node, b: Dict[str, Any], canon: str) -> None:
        if b.get("dim") is None:
            raise self.fail(n, "give softmax's dim explicitly")
        if self.value(b.get("dtype")) not in (None, torch.float32):
            raise self.fail(n, "dtype=%r is not supported" % (b["dtype"],))
        rank = len(self.shape(n))
        self.node(n, canon, [self.tensor(n, b["input"])], dim=self.dim(n, b["dim"], rank))

    def f_softmax(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._softmax(n, b, "softmax")

    def f_log_softmax(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._softmax(n, b, "log_softmax")

    def f_transpose(self, n: fx.Node, b: Dict[str, Any]) -> None:
        r = len(self.shape(n))
        self.node(n, "transpose", [self.tensor(n, b["input"])],
                  dim0=self.dim(n, b["dim0"], r, "dim0"), dim1=self.dim(n, b["dim1"], r, "dim1"))

    def f_permute(self, n: fx.Node, b: Dict[str, Any]) -> None:
        dims = self.value(b["dims"])
        r = len(self.shape(n))
        dims = [int(d) % r for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if dims[0] != 0:
            raise self.fail(n, "permute must keep the batch dimension first (dims %s)" % dims)
        self.node(n, "permute", [self.tensor(n, b["input"])], dims=dims)

    def f_reshape(self, n: fx.Node, b: Dict[str, Any]) -> None:
        src = b["input"]
        ins, outs = self.shape(src), self.shape(n)
        if not outs or outs[0] != ins[0]:
            raise self.fail(n, "it changes the batch dimension (%s -> %s); curvd's reshapes "
                            "keep dim 0 as the batch" % (ins, outs))
        self.node(n, "reshape", [self.tensor(n, src)], shape=[-1] + outs[1:])

    def f_flatten(self, n: fx.Node, b: Dict[str, Any]) -> None:
        r = len(self.shape(b["input"]))
        s = self.dim(n, b["start_dim"], r, "start_dim")
        e = self.value(b["end_dim"]) % r
        self.node(n, "flatten", [self.tensor(n, b["input"])], start_dim=s, end_dim=e)

    def f_cat(self, n: fx.Node, b: Dict[str, Any]) -> None:
        ts = b["tensors"]
        r = len(self.shape(n))
        self.node(n, "cat", [self.tensor(n, t) for t in ts], dim=self.dim(n, b["dim"], r))

    def _multi(self, n: fx.Node, b: Dict[str, Any]) -> None:
        r = len(self.shape(b["input"]))
        self.split_dim[n] = self.dim(n, b["dim"], r)
        self.alias[n] = ""  # read only through getitem
        for u in n.users:
            if not (u.op == "call_function" and u.target is operator.getitem):
                raise self.fail(u, "the parts of chunk/split must be taken by indexing "
                                "(a, b = x.chunk(2, -1) or parts[0])")

    f_chunk = _multi
    f_split = _multi

    def f_getitem(self, n: fx.Node, b: Dict[str, Any]) -> None:
        src = b["input"]
        if src in self.split_dim:
            idx = self.value(b["index"])
            parts = self.values[src]
            d = self.split_dim[src]
            if not isinstance(idx, int):
                raise self.fail(n, "chunk/split parts must be indexed by an integer")
            idx %= len(parts)
            start = sum(int(parts[j].shape[d]) for j in range(idx))
            self.node(n, "narrow", [self.tensor(n, src.args[0])], dim=d, start=start,
                      length=int(parts[idx].shape[d]))
            return
        if not _is_tensor(self.values[src]):
            raise self.fail(n, "indexing a %s is not supported" % type(self.values[src]).__name__)
        self.slicing(n, src, b["index"])

    def slicing(self, n: fx.Node, src: fx.Node, index: Any) -> None:
        try:
            idx = self.value(index)
        except KeyError:
            raise self.fail(n, "indexing with a tensor is not supported (slices and integers "
                            "only)") from None
        idx = idx if isinstance(idx, tuple) else (idx,)
        ins = self.shape(src)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        full: List[Any] = []
        for i in idx:
            if i is Ellipsis:
                full += [slice(None)] * (len(ins) - used)
            else:
                full.append(i)
        cur = self.tensor(n, src)
        steps: List[Dict[str, Any]] = []
        reshape = False
        d = 0
        for i in full:
            if i is None:
                reshape = True
                continue
            if d >= len(ins):
                raise self.fail(n, "too many indices")
            size = ins[d]
            if isinstance(i, bool) or not isinstance(i, (int, slice)):
                raise self.fail(n, "index %r is not supported (slices with step 1 and integers "
                                "only)" % (i,))
            if isinstance(i, int):
                if not -size <= i < size:
                    raise self.fail(n, "index %d out of range" % i)
                start, length, reshape = i % size, 1, True
            else:
                start, stop, step = i.indices(size)
                if step != 1:
                    raise self.fail(n, "slices with a step are not supported")
                length = max(0, stop - start)
            if (start, length) != (0, size):
                if d == 0:
                    raise self.fail(n, "it indexes the batch dimension")
                steps.append({"target": "narrow", "dim": d, "start": start, "length": length})
            d += 1
        if reshape:
            outs = self.shape(n)
            steps.append({"target": "reshape", "shape": [-1] + outs[1:]})
        if not steps:
            self.alias[n] = cur
            return
        for k, s in enumerate(steps):
            name = n.name if k == len(steps) - 1 else self.fresh("%s_%s" % (n.name, s["target"]))
            d2: Dict[str, Any] = {"name": name, "op": "call_function", "target": s.pop("target"),
                                  "args": [cur]}
            d2.update(s)
            cur = self.emit(d2)
        self.alias[n] = cur

    def _reduce(self, n: fx.Node, b: Dict[str, Any], canon: str) -> None:
        if b.get("dim") is None:
            raise self.fail(n, "%s over all dimensions includes the batch dimension; give dim"
                            % canon)
        if self.value(b.get("dtype")) is not None:
            raise self.fail(n, "dtype is not supported")
        dims = self.value(b["dim"])
        r = len(self.shape(b["input"]))
        dims = [self.dim(n, d, r) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        self.node(n, canon, [self.tensor(n, b["input"])], dim=dims,
                  keepdim=bool(self.value(b["keepdim"])))

    def f_mean(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._reduce(n, b, "mean")

    def f_sum(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._reduce(n, b, "sum")

    def f_matmul(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self.node(n, "matmul", [self.tensor(n, b["input"]), self.tensor(n, b["other"])])

    def f_bmm(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self.node(n, "bmm", [self.tensor(n, b["input"]), self.tensor(n, b["mat2"])])

    def f_masked_fill(self, n: fx.Node, b: Dict[str, Any]) -> None:
        mask = b["mask"]
        if not (isinstance(mask, fx.Node) and self.kind[mask] == "const"):
            raise self.fail(n, "the mask of masked_fill must be a constant buffer (register it "
                            "with register_buffer at the size the model uses)")
        self.node(n, "masked_fill", [self.tensor(n, b["input"]),
                                     self.get_attr(self.const_buffer(n, mask), True)],
                  value=self.number(n, b["value"], "value"))

    def f_scaled_dot_product_attention(self, n: fx.Node, b: Dict[str, Any]) -> None:
        if self.value(b["dropout_p"]) not in (0, 0.0):
            raise self.fail(n, "dropout_p must be 0 (curvd evaluates without dropout)")
        args = [self.tensor(n, b[k], k) for k in ("query", "key", "value")]
        if b["attn_mask"] is not None:
            args.append(self.get_attr(self.param(n, b["attn_mask"], "attn_mask"), True))
        scale = self.value(b["scale"])
        self.node(n, "scaled_dot_product_attention", args,
                  is_causal=bool(self.value(b["is_causal"])),
                  scale=None if scale is None else float(scale))

    def f_dropout(self, n: fx.Node, b: Dict[str, Any]) -> None:
        if self.value(b["training"]) and self.value(b["p"]) > 0:
            raise self.fail(n, "dropout in training mode (call model.eval() before exporting; "
                            "curvd evaluates in evaluation mode)")
        self.alias[n] = self.tensor(n, b["input"])

    def f_identity(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self.alias[n] = self.tensor(n, b["input"])

    # functional forms of modules: the module's attributes + params
    def _params(self, n: fx.Node, b: Dict[str, Any], keys: Sequence[str]) -> Dict[str, str]:
        return {k: self.param(n, b[k], k) for k in keys if b.get(k) is not None}  # type: ignore

    def f_linear(self, n: fx.Node, b: Dict[str, Any]) -> None:
        p = self._params(n, b, ("weight", "bias"))
        w = self.values[b["weight"]]
        self.node(n, "linear", [self.tensor(n, b["input"])], in_features=int(w.shape[1]),
                  out_features=int(w.shape[0]), bias="bias" in p, params=p)

    def f_layer_norm(self, n: fx.Node, b: Dict[str, Any]) -> None:
        p = self._params(n, b, ("weight", "bias"))
        if len(p) == 1:
            raise self.fail(n, "layer_norm with a weight but no bias (or the reverse) is not "
                            "supported")
        ns = self.value(b["normalized_shape"])
        ns = list(ns) if isinstance(ns, (list, tuple, torch.Size)) else [ns]
        self.node(n, "layer_norm", [self.tensor(n, b["input"])], normalized_shape=ns,
                  eps=float(self.value(b["eps"])), elementwise_affine=bool(p), params=p)

    def f_group_norm(self, n: fx.Node, b: Dict[str, Any]) -> None:
        p = self._params(n, b, ("weight", "bias"))
        if len(p) == 1:
            raise self.fail(n, "group_norm with a weight but no bias is not supported")
        self.node(n, "group_norm", [self.tensor(n, b["input"])],
                  num_groups=int(self.value(b["num_groups"])),
                  num_channels=int(self.shape(b["input"])[1]), eps=float(self.value(b["eps"])),
                  affine=bool(p), params=p)

    def f_embedding(self, n: fx.Node, b: Dict[str, Any]) -> None:
        for k, dflt in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            if self.value(b[k]) != dflt:
                raise self.fail(n, "%s=%r is not supported" % (k, self.value(b[k])))
        p = self._params(n, b, ("weight",))
        w = self.values[b["weight"]]
        attrs: Dict[str, Any] = {"num_embeddings": int(w.shape[0]),
                                 "embedding_dim": int(w.shape[1])}
        if self.value(b["padding_idx"]) is not None:
            attrs["padding_idx"] = int(self.value(b["padding_idx"])) % int(w.shape[0])
        self.node(n, "embedding", [self.tensor(n, b["input"])], **attrs, params=p)

    def _conv(self, n: fx.Node, b: Dict[str, Any], canon: str, k: int) -> None:
        p = self._params(n, b, ("weight", "bias"))
        w = self.values[b["weight"]]
        g = int(self.value(b["groups"]))

        def tup(v: Any) -> Any:
            v = self.value(v)
            return v if isinstance(v, str) else (list(v) if isinstance(v, (list, tuple))
                                                 else [v] * k)
        self.node(n, canon, [self.tensor(n, b["input"])], in_channels=int(w.shape[1]) * g,
                  out_channels=int(w.shape[0]), kernel_size=list(w.shape[2:]),
                  stride=tup(b["stride"]), padding=tup(b["padding"]),
                  dilation=tup(b["dilation"]), groups=g, bias="bias" in p, params=p)

    def f_conv1d(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._conv(n, b, "conv1d", 1)

    def f_conv2d(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._conv(n, b, "conv2d", 2)

    def f_batch_norm(self, n: fx.Node, b: Dict[str, Any]) -> None:
        if self.value(b["training"]):
            raise self.fail(n, "batch_norm in training mode (curvd evaluates with running "
                            "statistics; call model.eval())")
        p = self._params(n, b, ("weight", "bias", "running_mean", "running_var"))
        if "running_mean" not in p or "running_var" not in p:
            raise self.fail(n, "batch_norm needs running statistics")
        self.node(n, "batch_norm", [self.tensor(n, b["input"])],
                  num_features=int(self.shape(b["input"])[1]), eps=float(self.value(b["eps"])),
                  affine="weight" in p, params=p)

    def f_adaptive_avg_pool2d(self, n: fx.Node, b: Dict[str, Any]) -> None:
        os_ = self.value(b["output_size"])
        sizes = list(os_) if isinstance(os_, (list, tuple)) else [os_, os_]
        if any(s is None for s in sizes):
            raise self.fail(n, "output_size with None entries; give both sizes")
        self.node(n, "adaptive_avg_pool2d", [self.tensor(n, b["input"])], output_size=sizes)

    def _pool(self, n: fx.Node, b: Dict[str, Any], canon: str, k: int) -> None:
        def tup(v: Any) -> Any:
            v = self.value(v)
            return list(v) if isinstance(v, (list, tuple)) else [v] * k
        ks = tup(b["kernel_size"])
        attrs: Dict[str, Any] = {"kernel_size": ks,
                                 "stride": tup(b["stride"]) if self.value(b["stride"]) else ks,
                                 "padding": tup(b["padding"]),
                                 "ceil_mode": bool(self.value(b["ceil_mode"]))}
        if canon.startswith("max"):
            if self.value(b["return_indices"]):
                raise self.fail(n, "return_indices=True is not supported")
            attrs["dilation"] = tup(b["dilation"])
        else:
            if self.value(b["divisor_override"]) is not None:
                raise self.fail(n, "divisor_override is not supported")
            attrs["count_include_pad"] = bool(self.value(b["count_include_pad"]))
        self.node(n, canon, [self.tensor(n, b["input"])], **attrs)

    def f_max_pool2d(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._pool(n, b, "max_pool2d", 2)

    def f_max_pool1d(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._pool(n, b, "max_pool1d", 1)

    def f_avg_pool2d(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._pool(n, b, "avg_pool2d", 2)

    def f_avg_pool1d(self, n: fx.Node, b: Dict[str, Any]) -> None:
        self._pool(n, b, "avg_pool1d", 1)

    def f_interpolate(self, n: fx.Node, b: Dict[str, Any]) -> None:
        if self.value(b["mode"]) != "nearest":
            raise self.fail(n, "interpolate mode %r (curvd supports 'nearest')"
                            % self.value(b["mode"]))
        attrs: Dict[str, Any] = {"mode": "nearest"}
        for k in ("size", "scale_factor"):
            v = self.value(b[k])
            if v is not None:
                attrs[k] = list(v) if isinstance(v, (list, tuple)) else v
        self.node(n, "interpolate", [self.tensor(n, b["input"])], **attrs)


def _all_tensors(model: nn.Module, kind: str) -> Dict[str, torch.Tensor]:
    """Every parameter (kind "_parameters") or buffer ("_buffers") under every name it has."""
    out: Dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for k, t in getattr(mod, kind).items():
            if t is not None:
                out["%s.%s" % (mname, k) if mname else k] = t
    return out


def module_json(m: nn.Module, typ: str, where: Any) -> Dict[str, Any]:
    """The ``modules`` entry of a module of the graph form (raises UnsupportedModuleError)."""
    if typ in _te.SUPPORTED_MODULES:
        return _te.layer_json(m, where)
    bad = lambda reason: _te.UnsupportedModuleError(where, m, reason)  # noqa: E731
    if typ == "LayerNorm":
        return {"type": typ, "normalized_shape": list(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine}
    if typ == "GroupNorm":
        return {"type": typ, "num_groups": m.num_groups, "num_channels": m.num_channels,
                "eps": m.eps, "affine": m.affine}
    if typ == "Embedding":
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
            raise bad("max_norm, scale_grad_by_freq and sparse are not supported")
        d: Dict[str, Any] = {"type": typ, "num_embeddings": m.num_embeddings,
                             "embedding_dim": m.embedding_dim}
        if m.padding_idx is not None:
            d["padding_idx"] = m.padding_idx
        return d
    if typ == "MultiheadAttention":
        if not m.batch_first:
            raise bad("batch_first=False: curvd's dim 0 is the batch (use batch_first=True)")
        if not m._qkv_same_embed_dim:
            raise bad("kdim/vdim different from embed_dim are not supported")
        if m.bias_k is not None or m.add_zero_attn:
            raise bad("add_bias_kv and add_zero_attn are not supported")
        return {"type": typ, "embed_dim": m.embed_dim, "num_heads": m.num_heads,
                "batch_first": True, "bias": m.in_proj_bias is not None}
    if typ in ("Mish", "Hardswish"):
        return {"type": typ}
    if typ in ("Softmax", "LogSoftmax"):
        if m.dim is None:
            raise bad("dim=None (implicit dim); give dim")
        return {"type": typ, "dim": m.dim}
    if typ in ("Conv1d", "ConvTranspose2d"):
        if m.padding_mode != "zeros":
            raise bad("padding_mode %r (only 'zeros')" % m.padding_mode)
        d = {"type": typ, "in_channels": m.in_channels, "out_channels": m.out_channels,
             "kernel_size": _te._pair(m.kernel_size), "stride": _te._pair(m.stride),
             "padding": _te._pair(m.padding), "dilation": _te._pair(m.dilation),
             "groups": m.groups, "bias": m.bias is not None}
        if typ == "ConvTranspose2d":
            d["output_padding"] = _te._pair(m.output_padding)
        return d
    if typ == "AvgPool1d":
        return {"type": typ, "kernel_size": _te._pair(m.kernel_size),
                "stride": _te._pair(m.stride), "padding": _te._pair(m.padding),
                "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad}
    if typ == "MaxPool1d":
        if m.return_indices:
            raise bad("return_indices=True is not supported")
        return {"type": typ, "kernel_size": _te._pair(m.kernel_size),
                "stride": _te._pair(m.stride), "padding": _te._pair(m.padding),
                "dilation": _te._pair(m.dilation), "ceil_mode": m.ceil_mode}
    if typ == "Upsample":
        if m.mode != "nearest":
            raise bad("mode %r (curvd supports 'nearest')" % m.mode)
        d = {"type": typ, "mode": "nearest"}
        if m.size is not None:
            d["size"] = _te._pair(m.size)
        if m.scale_factor is not None:
            d["scale_factor"] = _te._pair(m.scale_factor)
        return d
    raise bad("not supported")  # pragma: no cover - GRAPH_MODULES and this list agree


def export_graph(model: nn.Module, input_shape: Sequence[int],
                 example: Optional[torch.Tensor] = None,
                 info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``{"input_shape", ["input_dtype"], "modules", "nodes"}`` of ``model`` (no loss).

    ``example``: a batch of inputs (its first rows are used); default zeros of
    ``input_shape`` with batch 2 (int64 when the input feeds an Embedding).
    ``info`` (optional) receives ``output_rank``: the output's rank with the batch dim.
    """
    _te._check_eval_mode(model)  # running it in training mode would also move BN statistics
    shape = [int(s) for s in input_shape]
    if example is None:
        dtype = torch.int64 if _feeds_embedding(model) else torch.float32
        example = torch.zeros([2] + shape, dtype=dtype)
    else:
        example = torch.as_tensor(example).detach().cpu()
        example = example.to(torch.float32 if example.dtype.is_floating_point else torch.int64)
        if list(example.shape[1:]) != shape:
            raise ValueError("x has per-sample shape %s but input_shape is %s"
                             % (list(example.shape[1:]), shape))
        example = example[:2] if example.shape[0] >= 2 else torch.cat([example, example])
    ex = _GraphExporter(model, example)
    nodes = ex.run()
    if info is not None:
        info["output_rank"] = ex.output_rank
    modules = {k: ex.module_json[k] for k, _ in model.named_modules() if k in ex.module_json}
    out: Dict[str, Any] = {"input_shape": shape}
    if not example.dtype.is_floating_point:
        out["input_dtype"] = "int64"
    out["modules"] = modules
    out["nodes"] = nodes
    return out


def _feeds_embedding(model: nn.Module) -> bool:
    """True when the model's input is read by an Embedding (token ids: int64 example)."""
    g = _trace(model)
    ph = next(n for n in g.nodes if n.op == "placeholder")
    for u in ph.users:
        if u.op == "call_module" and isinstance(model.get_submodule(u.target), nn.Embedding):
            return True
        if u.op == "call_function" and u.target is F.embedding:
            return True
    return False


def output_node(arch: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The node the output node reads (for the loss's checks), or None."""
    nodes = arch.get("nodes", [])
    if not nodes:
        return None
    src = nodes[-1]["args"][0]
    return next((d for d in nodes if d["name"] == src), None)
