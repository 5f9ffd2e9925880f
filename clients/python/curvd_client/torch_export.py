"""PyTorch → curvd: architecture JSON and safetensors bytes from any traceable ``nn.Module``.

A flat ``torch.nn.Sequential`` of the modules below becomes curvd's Sequential
form (docs/interface.md): layer ``i`` owns the parameters ``state_dict()``
names ``"i.weight"``, ``"i.bias"``, ..., with PyTorch's type and attribute
names.  Any other model that ``torch.fx.symbolic_trace`` can trace (nested
Sequentials, custom modules, residual blocks, transformers) becomes the graph
form: its modules by qualified name plus the traced nodes
(:mod:`curvd_client.torch_graph`).  Either way curvd evaluates the model
exactly as PyTorch does in evaluation mode (Dropout is the identity,
BatchNorm uses running statistics), so :func:`export_model` refuses a model
whose Dropout or BatchNorm layers are in training mode (call ``model.eval()``
first).

    import torch
    from curvd_client import Client
    from curvd_client.torch_export import export_model, export_dataset, state_dict_bytes

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    model.eval()                          # what curvd evaluates (needed with Dropout/BatchNorm)
    arch, params = export_model(model, torch.nn.CrossEntropyLoss(), input_shape=[64])
    c = Client("http://127.0.0.1:8080")
    c.register_model("mlp", arch, params)
    c.register_dataset("train", export_dataset(x, y))
    ...                                   # a training step later:
    c.push_parameters("mlp", state_dict_bytes(model))

torch is imported when this module is imported; without it the import fails
with an :class:`ImportError` that says how to get it.  Supported modules:
Linear, Conv2d, ReLU, Tanh, Sigmoid, LeakyReLU, ELU, GELU, Softplus, SiLU,
Identity, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d,
BatchNorm2d, Dropout, LayerNorm, GroupNorm, Embedding,
MultiheadAttention (batch_first, graph form), Mish, Hardswish, Conv1d, AvgPool1d, MaxPool1d,
Upsample (nearest), ConvTranspose2d, AdaptiveAvgPool1d, Softmax, LogSoftmax, plus the functions of
``torch_graph.SUPPORTED_FUNCTIONS``; losses MSELoss, CrossEntropyLoss, NLLLoss
(after a log_softmax), BCEWithLogitsLoss (reduction "mean" or "sum";
label_smoothing and ignore_index as PyTorch; ``class_dim=-1`` for [N, ..., C]
sequence logits).  Anything else raises :class:`UnsupportedModuleError`
naming the module and its index, or (graph form) the traced node, its module
path and source line.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

try:
    import torch
    from torch import nn
except ImportError as _e:  # pragma: no cover - depends on the machine
    raise ImportError(
        "curvd_client.torch_export needs PyTorch, which is not installed for this Python "
        "(%s). Install it (Debian: apt-get install python3-torch, and run /usr/bin/python3; "
        "or: pip install torch). The rest of curvd_client works without it." % _e) from _e

__all__ = ["UnsupportedModuleError", "UnsupportedNodeError", "SUPPORTED_MODULES", "GRAPH_MODULES",
           "SUPPORTED_FUNCTIONS", "SUPPORTED_LOSSES", "export_model",
           "export_architecture", "layer_json", "loss_json", "state_dict_bytes",
           "export_dataset", "safetensors_bytes", "write_files", "DEFAULT_DIRECTORY"]

#: Module class names curvd evaluates (docs/interface.md).
SUPPORTED_MODULES: Tuple[str, ...] = (
    "Linear", "Conv2d", "ReLU", "Tanh", "Sigmoid", "LeakyReLU", "ELU", "GELU", "Softplus",
    "SiLU", "Identity", "Flatten", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm1d",
    "BatchNorm2d", "Dropout", "Mish", "Hardswish", "LayerNorm", "GroupNorm", "Embedding",
    "Conv1d", "MaxPool1d", "AvgPool1d", "AdaptiveAvgPool1d", "ConvTranspose2d", "Upsample")
#: Where :func:`write_files` writes when given no directory (``/out/`` is in .gitignore).
DEFAULT_DIRECTORY = "out"
#: Loss class names curvd evaluates.
SUPPORTED_LOSSES: Tuple[str, ...] = ("MSELoss", "CrossEntropyLoss", "NLLLoss",
                                     "BCEWithLogitsLoss")

_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


class UnsupportedModuleError(ValueError):
    """A module (or loss, or setting) curvd cannot evaluate.

    Attributes:
        index: The module's index in the Sequential (None for the loss or the model itself).
        module_type: Its class name, e.g. ``"LSTM"``.
        reason: Why it is refused.
    """

    def __init__(self, index: Any, module: Any, reason: str, what: str = "module") -> None:
        cls = module if isinstance(module, type) else type(module)
        self.index = index
        self.module_type: str = cls.__name__
        self.reason = reason
        mod = cls.__module__ or ""
        shown = ("nn." + cls.__name__ if mod.startswith("torch.nn")
                 else "%s.%s" % (mod, cls.__qualname__) if mod and mod != "builtins"
                 else cls.__name__)
        if index is not None:
            msg = "unsupported module %s at index %s: %s" % (shown, index, reason)
        else:
            msg = "unsupported %s %s: %s" % (what, shown, reason)
        super().__init__(msg)


def _exact(m: Any, name: str) -> bool:
    """True if m is a torch.nn.<name> computing what the torch class computes.

    Subclasses are accepted only when they keep the torch class's forward().
    """
    cls = getattr(nn, name, None)
    return cls is not None and isinstance(m, cls) and type(m).forward is cls.forward


def _pair(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


def _single(v: Any) -> Any:
    """A 1-d module's size: PyTorch's 1-tuple (3,) as the number 3."""
    return v[0] if isinstance(v, (tuple, list)) and len(v) == 1 else v


def _upsample_json(m: Any, index: Any) -> Dict[str, Any]:
    """Upsample (mode 'nearest' only; one scale factor for all axes)."""
    if m.mode != "nearest":
        raise UnsupportedModuleError(index, m, "mode %r (only 'nearest')" % m.mode)
    if m.recompute_scale_factor:
        raise UnsupportedModuleError(index, m, "recompute_scale_factor=True is not supported")
    sf = m.scale_factor
    if isinstance(sf, (tuple, list)):
        if len(set(float(f) for f in sf)) != 1:
            raise UnsupportedModuleError(index, m, "per-axis scale_factor %r (one factor for "
                                         "all axes only)" % (sf,))
        sf = sf[0]
    return {"type": "Upsample", "size": _pair(_single(m.size)),
            "scale_factor": None if sf is None else float(sf), "mode": "nearest"}


def layer_json(m: "nn.Module", index: Any = None) -> Dict[str, Any]:
    """The architecture JSON of one module (raises :class:`UnsupportedModuleError`)."""
    n = next((s for s in SUPPORTED_MODULES if _exact(m, s)), None)
    if n is None:
        n = type(m).__name__
        if isinstance(m, nn.Sequential):
            reason = ("nested nn.Sequential is not supported (state_dict names would not be "
                      "'i.weight'); flatten it into one Sequential")
        elif any(isinstance(m, getattr(nn, s)) for s in SUPPORTED_MODULES):
            reason = "it overrides forward(), so curvd cannot know what it computes"
        else:
            reason = "curvd supports " + ", ".join(SUPPORTED_MODULES)
        raise UnsupportedModuleError(index, m, reason)
    if n == "Linear":
        return {"type": n, "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    size = _single if n.endswith("1d") else _pair
    if n in ("Conv2d", "Conv1d", "ConvTranspose2d"):
        if m.padding_mode != "zeros":
            raise UnsupportedModuleError(index, m, "padding_mode %r (only 'zeros')" % m.padding_mode)
        d = {"type": n, "in_channels": m.in_channels, "out_channels": m.out_channels,
             "kernel_size": size(m.kernel_size), "stride": size(m.stride),
             "padding": size(m.padding)}
        if n == "ConvTranspose2d":
            d["output_padding"] = _pair(m.output_padding)
            d.update(groups=m.groups, bias=m.bias is not None, dilation=_pair(m.dilation))
            return d
        d.update(dilation=size(m.dilation), groups=m.groups, bias=m.bias is not None)
        return d
    if n == "Upsample":
        return _upsample_json(m, index)
    if n in ("MaxPool2d", "AvgPool2d", "MaxPool1d", "AvgPool1d"):
        d: Dict[str, Any] = {"type": n, "kernel_size": size(m.kernel_size),
                             "stride": size(m.stride), "padding": size(m.padding),
                             "ceil_mode": m.ceil_mode}
        if n.startswith("MaxPool"):
            if m.return_indices:
                raise UnsupportedModuleError(index, m, "return_indices=True (a Sequential layer "
                                             "must return one tensor)")
            d["dilation"] = size(m.dilation)
        else:
            if getattr(m, "divisor_override", None) is not None:
                raise UnsupportedModuleError(index, m, "divisor_override is not supported")
            d["count_include_pad"] = m.count_include_pad
        return d
    if n == "AdaptiveAvgPool1d":
        return {"type": n, "output_size": _single(m.output_size)}
    if n == "AdaptiveAvgPool2d":
        os_ = m.output_size
        sizes = list(os_) if isinstance(os_, (tuple, list)) else [os_, os_]
        if any(s is None for s in sizes):
            raise UnsupportedModuleError(index, m, "output_size with None entries; give both sizes")
        return {"type": n, "output_size": sizes}
    if n in ("BatchNorm1d", "BatchNorm2d"):
        if not m.track_running_stats or m.running_mean is None:
            raise UnsupportedModuleError(index, m, "track_running_stats=False (curvd evaluates "
                                         "BatchNorm in evaluation mode with running statistics)")
        return {"type": n, "num_features": m.num_features, "eps": m.eps, "affine": m.affine}
    if n == "LeakyReLU":
        return {"type": n, "negative_slope": m.negative_slope}
    if n == "ELU":
        return {"type": n, "alpha": m.alpha}
    if n == "GELU":
        return {"type": n, "approximate": getattr(m, "approximate", "none")}
    if n == "Softplus":
        return {"type": n, "beta": m.beta, "threshold": m.threshold}
    if n == "Flatten":
        if m.start_dim == 0:
            raise UnsupportedModuleError(index, m, "start_dim=0 would flatten the batch dimension")
        return {"type": n, "start_dim": m.start_dim, "end_dim": m.end_dim}
    if n == "Dropout":
        return {"type": n, "p": m.p}
    if n == "LayerNorm":
        d = {"type": n, "normalized_shape": list(m.normalized_shape), "eps": m.eps,
             "elementwise_affine": m.elementwise_affine}
        if m.elementwise_affine and getattr(m, "bias", True) is None:
            d["bias"] = False  # torch >= 2.1's LayerNorm(bias=False); the default is left out
        return d
    if n == "GroupNorm":
        return {"type": n, "num_groups": m.num_groups, "num_channels": m.num_channels,
                "eps": m.eps, "affine": m.affine}
    if n == "Embedding":
        for attr, why in (("max_norm", "max_norm (renormalizes the weight in forward)"),
                          ("scale_grad_by_freq", "scale_grad_by_freq=True"),
                          ("sparse", "sparse=True")):
            if getattr(m, attr):
                raise UnsupportedModuleError(index, m, why + " is not supported")
        return {"type": n, "num_embeddings": m.num_embeddings,
                "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx}
    return {"type": n}  # ReLU, Tanh, Sigmoid, SiLU, Mish, Hardswish, Identity


def loss_json(loss: "nn.Module", class_dim: int = 1) -> Dict[str, Any]:
    """The ``loss`` object of the architecture (raises :class:`UnsupportedModuleError`).

    ``class_dim``: where CrossEntropyLoss/NLLLoss find the classes in the model
    output: 1 (PyTorch's [N, C, d1...]) or -1 ([N, ..., C], a sequence model's
    logits, as ``loss_fn(logits.reshape(-1, C), y.reshape(-1))``).
    """
    n = next((s for s in SUPPORTED_LOSSES if _exact(loss, s)), None)
    if n is None:
        raise UnsupportedModuleError(None, loss, "curvd supports " + ", ".join(SUPPORTED_LOSSES),
                                     "loss")
    if loss.reduction not in ("mean", "sum"):
        raise UnsupportedModuleError(None, loss, "reduction %r (curvd supports 'mean' and 'sum')"
                                     % loss.reduction, "loss")
    if getattr(loss, "weight", None) is not None:
        raise UnsupportedModuleError(None, loss, "class/element weights are not supported", "loss")
    if getattr(loss, "pos_weight", None) is not None:
        raise UnsupportedModuleError(None, loss, "pos_weight is not supported", "loss")
    if class_dim not in (1, -1):
        raise ValueError("class_dim must be 1 ([N, C, d1...]) or -1 ([N, ..., C]), got %r"
                         % (class_dim,))
    d: Dict[str, Any] = {"type": n, "reduction": loss.reduction}
    if n in ("CrossEntropyLoss", "NLLLoss"):
        if class_dim != 1:
            d["class_dim"] = class_dim
        ls = float(getattr(loss, "label_smoothing", 0.0) or 0.0)
        if ls != 0.0:
            d["label_smoothing"] = ls
        if loss.ignore_index != -100:
            d["ignore_index"] = loss.ignore_index
    elif class_dim != 1:
        raise ValueError("class_dim applies to CrossEntropyLoss/NLLLoss, not to %s (its targets "
                         "have the output's shape)" % n)
    return d


def _flat_sequential(model: "nn.Module") -> bool:
    """True for an nn.Sequential built from a list of the Sequential form's modules.

    Such a model is exported in the Sequential form (byte-identical to the
    exports before the graph form).  A child that is a module of neither form
    raises UnsupportedModuleError naming its index, as before.
    """
    if not _exact(model, "Sequential"):
        return False
    from .torch_graph import GRAPH_MODULES
    flat = True
    for i, (key, m) in enumerate(model.named_children()):
        if key != str(i) or isinstance(m, nn.Sequential):
            flat = False
            continue
        if any(_exact(m, s) for s in SUPPORTED_MODULES):
            continue
        flat = False
        if not any(_exact(m, s) for s in GRAPH_MODULES) and type(m).__module__.startswith(
                "torch.nn"):
            raise UnsupportedModuleError(i, m, "curvd supports " + ", ".join(GRAPH_MODULES))
    return flat


def export_architecture(model: "nn.Module", loss: "nn.Module", input_shape: Sequence[int],
                        class_dim: int = 1, example_input: Any = None) -> Dict[str, Any]:
    """The architecture document of ``model`` with ``loss``.

    ``input_shape`` is one sample's shape without the batch dimension, e.g.
    ``[64]``, ``[1, 28, 28]`` or ``[T]`` (token ids).  A flat ``nn.Sequential``
    of the Sequential form's modules gives ``{"input_shape", "layers", "loss"}``;
    any other model is traced with torch.fx and gives the graph form
    ``{"input_shape", ["input_dtype"], "modules", "nodes", "loss"}``.
    ``example_input`` (optional, a batch like the dataset's x) is what the
    traced graph runs on to learn every node's shape (default: zeros; int64
    zeros when the input feeds an Embedding).  ``class_dim``: see :func:`loss_json`.
    """
    shape = [int(s) for s in input_shape]
    if not shape or any(s <= 0 for s in shape):
        raise ValueError("input_shape must be a non-empty list of positive sizes (no batch "
                         "dimension), got %r" % (list(input_shape),))
    if _flat_sequential(model):
        layers = [layer_json(m, i) for i, m in enumerate(model.children())]
        arch: Dict[str, Any] = {"input_shape": shape, "layers": layers}
        out_rank = 2
    else:
        from .torch_graph import export_graph
        info: Dict[str, Any] = {}
        arch = export_graph(model, shape, example_input, info)
        out_rank = info["output_rank"]
    arch["loss"] = loss_json(loss, class_dim)
    _check_loss_output(arch, loss, class_dim, out_rank)
    return arch


def _check_loss_output(arch: Dict[str, Any], loss: "nn.Module", class_dim: int,
                       out_rank: int) -> None:
    """NLLLoss reads log-probabilities: the output must be a log_softmax over the class dim."""
    if arch["loss"]["type"] != "NLLLoss":
        return
    dim: Any = None
    if "nodes" in arch:
        from .torch_graph import output_node
        last = output_node(arch) or {}
        if last.get("op") == "call_module" and \
                arch["modules"][last["target"]]["type"] == "LogSoftmax":
            dim = arch["modules"][last["target"]]["dim"]
        elif last.get("op") == "call_function" and last.get("target") == "log_softmax":
            dim = last["dim"]
    if dim is None or dim % out_rank != class_dim % out_rank:
        raise UnsupportedModuleError(None, loss, "NLLLoss needs log-probabilities: the model "
                                     "must end in nn.LogSoftmax / F.log_softmax over the class "
                                     "dimension (%d); or use CrossEntropyLoss on the logits"
                                     % class_dim, "loss")


def safetensors_bytes(tensors: Mapping[str, "torch.Tensor"]) -> bytes:
    """Serializes ``{name: tensor}`` as a safetensors file (dtypes kept; curvd converts floats to F32)."""
    header: Dict[str, Any] = {}
    blobs: List[bytes] = []
    off = 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        if t.dtype not in _DTYPES:
            raise ValueError("tensor %r has dtype %s; safetensors export supports %s"
                             % (name, t.dtype, ", ".join(str(d) for d in _DTYPES)))
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def state_dict_bytes(model: "nn.Module") -> bytes:
    """The model's ``state_dict()`` (weights, biases, BatchNorm buffers) as safetensors bytes.

    This is the body for :meth:`curvd_client.Client.push_parameters` after a training step.
    A parameter shared by several modules (tied weights, e.g. an output head that
    reuses the token embedding) is written once, under its first name in
    ``named_parameters()``, which is the name the graph form uses; flat Sequential
    models are written exactly as ``state_dict()`` is.
    """
    sd = model.state_dict()
    try:
        flat = _flat_sequential(model)
    except UnsupportedModuleError:
        flat = True
    if not flat:
        first = {n for n, _ in model.named_parameters()}
        alias = set()
        for mname, mod in model.named_modules(remove_duplicate=False):
            for k, t in mod._parameters.items():
                full = "%s.%s" % (mname, k) if mname else k
                if t is not None and full not in first:
                    alias.add(full)
        sd = type(sd)((k, v) for k, v in sd.items() if k not in alias)
    return safetensors_bytes(sd)


def _check_eval_mode(model: "nn.Module") -> None:
    """Raises ValueError if a layer that computes differently in training mode is in it."""
    train = []
    if _flat_sequential(model):
        where = [("index %d" % i, m) for i, m in enumerate(model.children())]
    else:
        where = [("'%s'" % k, m) for k, m in model.named_modules() if k]
    for w, m in where:
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            train.append("nn.%s at %s" % (type(m).__name__, w))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            train.append("nn.%s at %s" % (type(m).__name__, w))
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            train.append("nn.MultiheadAttention (dropout %g) at %s" % (m.dropout, w))
    if train:
        raise ValueError(
            "the model is in training mode: %s compute%s differently there, but curvd always "
            "evaluates in evaluation mode (Dropout is the identity, BatchNorm uses its running "
            "statistics). Call model.eval() before exporting (and model.train() to go on "
            "training)." % (", ".join(train), "s" if len(train) == 1 else ""))


def export_model(model: "nn.Module", loss: "nn.Module", input_shape: Sequence[int],
                 class_dim: int = 1, example_input: Any = None) -> Tuple[Dict[str, Any], bytes]:
    """``(architecture dict, parameters safetensors bytes)`` for :meth:`Client.register_model`.

    ``class_dim=-1`` for a sequence model's [N, T, C] logits with [N, T]
    targets (CrossEntropyLoss/NLLLoss); ``example_input``: see
    :func:`export_architecture`.

    curvd evaluates the model in evaluation mode, so Dropout (p > 0) and
    BatchNorm layers must be in evaluation mode too: call ``model.eval()``
    first.  (A model without such layers computes the same in either mode
    and is accepted as it is.)

    Raises:
        UnsupportedModuleError: names the first module (type and index) or
            loss setting curvd cannot evaluate, e.g. ``nn.LSTM at index 3``;
            for a traced model (``torch_graph.UnsupportedNodeError``) the node,
            its module path, the source line and what is supported.
        ValueError: a Dropout or BatchNorm layer is in training mode; the
            message names it and the fix, ``model.eval()``.
    """
    _check_eval_mode(model)
    arch = export_architecture(model, loss, input_shape, class_dim, example_input)
    return arch, state_dict_bytes(model)


def export_dataset(x: Any, y: Any) -> bytes:
    """A dataset safetensors file (docs/interface.md) from inputs ``x`` [N, *input_shape] and targets ``y``.

    Floating ``x`` becomes F32; integer ``x`` (token ids [N, T] for a model
    that starts with an Embedding) becomes I64.  Integer ``y`` (class indices
    [N], or [N, T] for a sequence model, for CrossEntropyLoss/NLLLoss) becomes
    I64; floating ``y`` (targets shaped like the model output, for MSELoss /
    BCEWithLogitsLoss) becomes F32.  Tensors, numpy arrays and lists are accepted.
    """
    xt = torch.as_tensor(x).detach().cpu()
    yt = torch.as_tensor(y).detach().cpu()
    if xt.dim() < 2:
        raise ValueError("x must be [N, *input_shape] (at least 2-D), got shape %s" % list(xt.shape))
    if yt.shape[0] != xt.shape[0]:
        raise ValueError("x has %d samples but y has %d" % (xt.shape[0], yt.shape[0]))
    if xt.dtype == torch.bool:
        raise ValueError("x is boolean: give float inputs or integer token ids")
    xt = xt.to(torch.float32 if xt.dtype.is_floating_point else torch.int64)
    if yt.dtype.is_floating_point:
        yt = yt.to(torch.float32)
    elif yt.dtype == torch.bool:
        raise ValueError("y is boolean: give class indices (integers) or float targets")
    else:
        yt = yt.to(torch.int64)
    return safetensors_bytes({"x": xt, "y": yt})


def write_files(model: Any, loss: Any, input_shape: Any, x: Any = None, y: Any = None,
                directory: Optional[Any] = None, class_dim: int = 1) -> Dict[str, str]:
    """Writes ``arch.json``, ``params.safetensors`` (and ``data.safetensors`` if x, y are given).

    The files `curvd run`, ``curvctl`` and :meth:`Client.register_model_files`
    take, in ``directory`` (default :data:`DEFAULT_DIRECTORY`, ``out/`` under
    the current directory; created when missing).  The older form
    ``write_files(directory, model, loss, input_shape, x, y, class_dim=1)`` is
    accepted too.  ``class_dim=-1`` for sequence models ([N, T, C] logits, [N, T]
    targets); ``x`` (when given) is also the example the traced graph runs on.
    Returns ``{"arch": path, "params": path[, "data": path]}``.  Refuses what
    :func:`export_model` refuses (e.g. Dropout in training mode).
    """
    if isinstance(model, (str, bytes, os.PathLike)):  # write_files(directory, model, ...)
        model, loss, input_shape, x, y, directory = loss, input_shape, x, y, directory, model
    d = os.fspath(directory if directory is not None else DEFAULT_DIRECTORY)
    arch, params = export_model(model, loss, input_shape, class_dim, x)
    os.makedirs(d, exist_ok=True)
    out = {"arch": os.path.join(d, "arch.json"),
           "params": os.path.join(d, "params.safetensors")}
    with open(out["arch"], "w", encoding="utf-8") as f:
        json.dump(arch, f, indent=1)
    with open(out["params"], "wb") as f:
        f.write(params)
    if x is not None and y is not None:
        out["data"] = os.path.join(d, "data.safetensors")
        with open(out["data"], "wb") as f:
            f.write(export_dataset(x, y))
    return out


# the graph form (imported last: torch_graph builds on this module's definitions)
from .torch_graph import GRAPH_MODULES, SUPPORTED_FUNCTIONS, UnsupportedNodeError  # noqa: E402
