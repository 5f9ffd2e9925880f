"""curvd - the curvd engine in-process (libcurvd.so through ctypes): no daemon.

    import curvd
    h = curvd.Hessian(model, loss_fn, (x, y))
    h.trace(max_probes=100, seed=0)["trace"]

Curvatures: :class:`Hessian`, :class:`GGN`, :class:`FisherMC`, :class:`EF`,
:class:`KFAC` (and :class:`Curvature` with any curvature name of the job
document).  Each method runs one job (docs/interface.md §3) and returns its
result document as a dict, the same numbers ``curvd run`` gives for the same
files and seed.  ``data`` is ``(x, y)`` (torch tensors or numpy arrays) or an
iterable of such batches (a DataLoader: the curvature of all of them, one
dataset).  :func:`analyze` runs any job; :func:`pyhessian` answers with
PyHessian's method names and return shapes.

The model and data go to the engine once, when the object is made: x and y
are used without a copy where they are contiguous CPU float32 (x) and int64
labels or float32 targets (y); the parameters are copied (call
:meth:`Curvature.update` after changing the model).
"""
import ctypes
import json
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _lib
from ._lib import CurvdError

__all__ = ["CurvdError", "UnsupportedModuleError", "Model", "Data", "Curvature", "Hessian",
           "GGN", "FisherMC", "EF", "KFAC", "analyze", "pyhessian", "set_blas_threads",
           "version"]

try:
    from curvd_client.torch_export import UnsupportedModuleError
except ImportError:  # pragma: no cover - torch_export needs nothing but is optional
    class UnsupportedModuleError(ValueError):  # type: ignore[no-redef]
        pass


def version() -> str:
    """libcurvd's version (as ``curvd --version``)."""
    return _lib.lib.curvd_version().decode()


def set_blas_threads(n: int) -> None:
    """OpenBLAS's thread count for this whole process."""
    _lib.lib.curvd_set_blas_threads(int(n))


# ---- handles --------------------------------------------------------------------------

class _Guard:
    """Runs read a handle while other threads may run too (ctypes releases the GIL);
    writes (new parameters) and close wait until no run uses it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs = 0
        self.version = 0
        self.operators: "weakref.WeakSet[Any]" = weakref.WeakSet()  # closed before the handle

    @contextmanager
    def reading(self, obj: Any):
        with self._cond:
            if not obj._h:
                raise ValueError("the %s was closed" % type(obj).__name__.lower())
            self._runs += 1
        try:
            yield obj._h
        finally:
            with self._cond:
                self._runs -= 1
                self._cond.notify_all()

    def close(self, obj: Any, free: Any) -> None:
        """Closes obj's handle with free() once no run uses it, its operators first."""
        if getattr(obj, "_h", None):
            with self.writing(obj) as h:
                for op in list(self.operators):
                    op.close()
                obj._h = None
                free(h)

    @contextmanager
    def writing(self, obj: Any):
        with self._cond:
            self._cond.wait_for(lambda: self._runs == 0)
            if not obj._h:
                raise ValueError("the %s was closed" % type(obj).__name__.lower())
            self.version += 1  # open operators of the old values are stale
            yield obj._h


class Model:
    """An architecture document (dict or JSON text) with its parameters in the engine."""

    def __init__(self, architecture: Any, params: Optional[bytes] = None) -> None:
        self._h = None
        self._guard = _Guard()
        text = architecture if isinstance(architecture, (str, bytes)) else json.dumps(architecture)
        raw = text.encode() if isinstance(text, str) else text
        self._h = _lib.call(_lib.lib.curvd_model_open, raw, len(raw))
        if params is not None:
            self.load_params(params)

    def load_params(self, safetensors: bytes) -> None:
        """Every parameter and buffer from a state_dict safetensors buffer (waits for runs
        on other threads to finish first)."""
        buf = ctypes.create_string_buffer(bytes(safetensors), len(safetensors))
        with self._guard.writing(self) as h:
            _lib.call(_lib.lib.curvd_model_load_params, h, buf, len(safetensors))

    def param_names(self) -> List[str]:
        """The parameters in the engine's vector order (vectors, gradients, eigenvectors
        and steps are laid out tensor after tensor in this order, each row-major)."""
        h = self._handle()
        return [_lib.lib.curvd_model_tensor_name(h, i).decode()
                for i in range(_lib.lib.curvd_model_tensor_count(h))
                if _lib.lib.curvd_model_tensor_is_param(h, i) == 1]

    def tensors(self) -> Dict[str, int]:
        """The state_dict entries the model expects: name -> element count."""
        h = self._handle()
        n = _lib.lib.curvd_model_tensor_count(h)
        return {_lib.lib.curvd_model_tensor_name(h, i).decode():
                int(_lib.lib.curvd_model_tensor_numel(h, i)) for i in range(n)}

    def set_tensor(self, name: str, values: Any) -> None:
        """One parameter or buffer from float values (copied)."""
        a = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
        with self._guard.writing(self) as h:
            _lib.call(_lib.lib.curvd_model_set_tensor, h, name.encode(), a.ctypes.data, a.size)

    def _handle(self) -> int:
        if not self._h:
            raise ValueError("the model was closed")
        return self._h

    def close(self) -> None:
        """Frees the engine's model (after runs on other threads finish)."""
        self._guard.close(self, _lib.lib.curvd_model_close)

    def __del__(self) -> None:
        if getattr(self, "_h", None):  # no run can hold an unreachable object
            _lib.lib.curvd_model_close(self._h)
            self._h = None


def _as_array(v: Any, name: str) -> np.ndarray:
    """v (torch tensor, numpy array, list) as a numpy array sharing memory where it can."""
    if hasattr(v, "detach") and hasattr(v, "device"):
        if v.device.type != "cpu":
            raise ValueError("%s is on device %s: curvd runs on the CPU; pass %s.cpu()"
                             % (name, v.device, name))
        v = v.detach()
        if v.dtype.is_complex:
            raise ValueError("%s is complex (%s): give real values" % (name, v.dtype))
        try:
            return v.numpy()
        except TypeError:  # bfloat16 and friends
            return v.float().numpy()
    return np.asarray(v)


class Data:
    """Inputs x [N, ...] and targets y [N, ...] in the engine (borrowed where possible)."""

    def __init__(self, x: Any, y: Any) -> None:
        xa, ya = _as_array(x, "x"), _as_array(y, "y")
        if xa.ndim < 1 or ya.ndim < 1 or xa.shape[0] != ya.shape[0]:
            raise ValueError("x and y must have the same number of samples in their first "
                             "dimension, got x %s and y %s" % (list(xa.shape), list(ya.shape)))
        xa, xt = self._typed(xa, "x", allow_float=True)
        ya, yt = self._typed(ya, "y", allow_float=True)
        self._h = None
        self._guard = _Guard()
        self._keep = (xa, ya)  # the engine borrows these buffers
        xs = (ctypes.c_int64 * max(1, xa.ndim - 1))(*xa.shape[1:])
        ys = (ctypes.c_int64 * max(1, ya.ndim - 1))(*ya.shape[1:])
        self.n = int(xa.shape[0])
        self._h = _lib.call(_lib.lib.curvd_data_open, self.n, xa.ctypes.data, xt, xa.ndim - 1, xs,
                            ya.ctypes.data, yt, ya.ndim - 1, ys)

    @classmethod
    def from_safetensors(cls, buf: bytes) -> "Data":
        """A dataset from a safetensors buffer with tensors "x" and "y" (copied)."""
        d = cls.__new__(cls)
        d._h = None
        d._guard = _Guard()
        d._keep = ()
        raw = ctypes.create_string_buffer(bytes(buf), len(buf))
        d._h = _lib.call(_lib.lib.curvd_data_load, raw, len(buf))
        d.n = -1
        return d

    @staticmethod
    def _typed(a: np.ndarray, name: str, allow_float: bool) -> Tuple[np.ndarray, int]:
        if a.dtype == np.bool_:
            raise ValueError("%s is boolean: give float values or integer class indices / "
                             "token ids" % name)
        if np.issubdtype(a.dtype, np.floating):
            return np.ascontiguousarray(a, dtype=np.float32), _lib.FLOAT32
        if np.issubdtype(a.dtype, np.integer):
            if a.dtype == np.int32:
                return np.ascontiguousarray(a), _lib.INT32
            return np.ascontiguousarray(a, dtype=np.int64), _lib.INT64
        raise ValueError("%s has dtype %s: give float32/float64 values or integer indices"
                         % (name, a.dtype))

    def close(self) -> None:
        """Frees the engine's dataset (after runs on other threads finish)."""
        self._guard.close(self, _lib.lib.curvd_data_close)

    def __del__(self) -> None:
        if getattr(self, "_h", None):
            _lib.lib.curvd_data_close(self._h)
            self._h = None


def run(model: Model, data: Data, job: Dict[str, Any], dense_max: Optional[int] = None,
        job_memory: Optional[int] = None) -> Dict[str, Any]:
    """Runs one job document on model and data in this thread; the result as a dict."""
    text = json.dumps(job).encode()
    opts = {k: v for k, v in (("dense_max", dense_max), ("job_memory", job_memory))
            if v is not None}
    with model._guard.reading(model) as mh, data._guard.reading(data) as dh:
        res = _lib.call(_lib.lib.curvd_run, mh, dh, text, len(text),
                        json.dumps(opts).encode() if opts else None)
    return json.loads(_lib.take_string(res))


# ---- from PyTorch ---------------------------------------------------------------------

def _batches(data: Any) -> Tuple[Any, Any]:
    """(x, y) of one batch, or of every batch of an iterable concatenated."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not _is_batch_pair(data[0]):
        return data[0], data[1]
    xs, ys = [], []
    for i, b in enumerate(data):
        if not (isinstance(b, (tuple, list)) and len(b) >= 2):
            raise ValueError("data: batch %d is not an (x, y) pair" % i)
        xs.append(_as_array(b[0], "x (batch %d)" % i))
        ys.append(_as_array(b[1], "y (batch %d)" % i))
    if not xs:
        raise ValueError("data: the iterable gave no batches")
    return np.concatenate(xs), np.concatenate(ys)


def _is_batch_pair(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2


def _export(model: Any, loss_fn: Any, x: Any, class_dim: Optional[int]) -> Tuple[Dict[str, Any], bytes]:
    from curvd_client import torch_export as te
    import torch
    xt = torch.as_tensor(x)
    if class_dim is None:
        class_dim = 1  # [N, T, C] logits of a sequence model: class_dim -1
        was_training = getattr(model, "training", False)
        try:  # in eval mode (BatchNorm's statistics untouched), the mode restored after
            model.eval()
            with torch.no_grad():
                out = model(xt[:1])
        except Exception:  # noqa: BLE001 - the export below names what is unsupported
            out = None
        finally:
            model.train(was_training)
        if (isinstance(out, torch.Tensor) and out.dim() == 3 and
                isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))):
            class_dim = -1
    return te.export_model(model, loss_fn, list(xt.shape[1:]), class_dim=class_dim,
                           example_input=xt[: min(len(xt), 8)])


_JOB_FIELDS = ("seed", "batch", "blocks", "micro_batch")


class Curvature:
    """A curvature of a model's loss on a dataset, in-process.

    ``Curvature(model, loss_fn, data, curvature="ggn")``; the subclasses fix
    the curvature.  ``model`` is a torch.nn.Module (exported like
    curvd_client.torch_export does: flat Sequential, or traced with torch.fx)
    and ``loss_fn`` its loss module; or give ``architecture`` (a dict) and
    ``params`` (state_dict safetensors bytes) instead of a torch model.
    Keyword arguments of the methods go into the job: ``seed``, ``batch``,
    ``blocks``, ``micro_batch`` at the top level, everything else into
    ``options``.  ``dense_max`` / ``job_memory`` are the limits of
    ``curvd run``.
    """

    curvature = "hessian"

    def __init__(self, model: Any = None, loss_fn: Any = None, data: Any = None,
                 curvature: Optional[str] = None, class_dim: Optional[int] = None,
                 architecture: Optional[Dict[str, Any]] = None, params: Optional[bytes] = None,
                 dense_max: Optional[int] = None, job_memory: Optional[int] = None) -> None:
        if data is None:
            raise ValueError("data: give (x, y) or an iterable of (x, y) batches")
        if curvature is not None:
            self.curvature = curvature
        x, y = _batches(data)
        if architecture is None:
            if model is None or loss_fn is None:
                raise ValueError("give a torch model and loss_fn, or architecture and params")
            architecture, params = _export(model, loss_fn, x, class_dim)
        self._torch_model = model
        self.model = Model(architecture, params)
        self.data = Data(x, y)
        self.architecture = architecture
        self.limits = {"dense_max": dense_max, "job_memory": job_memory}
        self._dim: Optional[int] = None

    def update(self, model: Any = None) -> None:
        """Copies the (changed) parameters of the torch model into the engine again."""
        from curvd_client import torch_export as te
        m = model if model is not None else self._torch_model
        if m is None:
            raise ValueError("update() needs the torch model (this object was made from "
                             "architecture= and params=): pass it, or use "
                             "self.model.load_params(state_dict_bytes)")
        self.model.load_params(te.state_dict_bytes(m))

    def job(self, op: str, **kw: Any) -> Dict[str, Any]:
        """The job document of op with keyword arguments split as the class says."""
        doc: Dict[str, Any] = {"op": op, "curvature": self.curvature}
        opts = {k: v for k, v in kw.items() if k not in _JOB_FIELDS and v is not None}
        doc.update({k: kw[k] for k in _JOB_FIELDS if kw.get(k) is not None})
        if opts:
            doc["options"] = opts
        return doc

    def run(self, op: str, **kw: Any) -> Dict[str, Any]:
        """Any op on this curvature; the result document."""
        return run(self.model, self.data, self.job(op, **kw), **self.limits)

    def trace(self, **kw: Any) -> Dict[str, Any]:
        return self.run("trace", **kw)

    def diag(self, **kw: Any) -> Dict[str, Any]:
        return self.run("diag", **kw)

    def eigenvalues(self, k: int = 1, **kw: Any) -> Dict[str, Any]:
        return self.run("eigen", k=k, **kw)

    def density(self, **kw: Any) -> Dict[str, Any]:
        return self.run("density", **kw)

    def snr(self, **kw: Any) -> Dict[str, Any]:
        return self.run("snr", **kw)

    def newton(self, **kw: Any) -> Dict[str, Any]:
        return self.run("newton", **kw)

    def solve(self, rhs: Any, **kw: Any) -> Dict[str, Any]:
        return self.run("solve", rhs=np.asarray(rhs, dtype=np.float64).ravel().tolist(), **kw)

    def dense(self, **kw: Any) -> np.ndarray:
        return np.asarray(self.run("dense", **kw)["matrix"])

    @property
    def shape(self) -> Tuple[int, int]:
        if self._dim is None:
            self._dim = sum(n for n, p in zip(self.model.tensors().values(), self._params())
                            if p)
        return (self._dim, self._dim)

    def _params(self) -> Sequence[int]:
        h = self.model._handle()
        return [_lib.lib.curvd_model_tensor_is_param(h, i)
                for i in range(_lib.lib.curvd_model_tensor_count(h))]

    dtype = np.dtype(np.float64)

    @property
    def param_names(self) -> List[str]:
        """The parameters in the order of every vector here (h @ v, diag, eigenvectors,
        steps): the engine's (a graph model's: the order the graph uses them, which may
        differ from model.parameters())."""
        return self.model.param_names()

    def split(self, v: Any) -> Dict[str, Any]:
        """A vector in the engine's order as {name: tensor shaped like the parameter}
        (torch tensors when the torch model is known, else numpy arrays)."""
        a = np.asarray(_as_array(v, "v"), dtype=np.float64).ravel()
        sizes = self.model.tensors()
        shapes = ({n: tuple(p.shape) for n, p in self._torch_model.named_parameters()}
                  if self._torch_model is not None else {})
        out, k = {}, 0
        for n in self.param_names:
            part = a[k:k + sizes[n]].reshape(shapes.get(n, (sizes[n],)))
            k += sizes[n]
            if self._torch_model is not None:
                import torch
                part = torch.as_tensor(part, dtype=dict(
                    self._torch_model.named_parameters())[n].dtype)
            out[n] = part
        if k != a.size:
            raise ValueError("v has %d entries, the parameters %d" % (a.size, k))
        return out

    def join(self, tensors: Any) -> np.ndarray:
        """{name: tensor} (or a torch model's named parameters) as one vector in the
        engine's order, e.g. join(dict(model.named_parameters()))."""
        d = dict(tensors)
        return np.concatenate([np.asarray(_as_array(d[n], n), dtype=np.float64).ravel()
                               for n in self.param_names])

    def _operator(self, kw: Dict[str, Any]) -> "_Operator":
        """The open operator of the job keywords kw (rebuilt when they or the model's
        values changed)."""
        key = json.dumps(kw, sort_keys=True)
        op = getattr(self, "_op", None)
        if op is None or op.key != key or op.version != self.model._guard.version:
            if op is not None:
                op.close()
            self._op = None
            self._op = _Operator(self, self.job("matvec", probe_seed=0, **kw), key)
        return self._op

    def matvec(self, v: Any, **kw: Any) -> Any:
        """The curvature times v, or V (D x k, column by column) - a vector over all
        parameters, or a block's with blocks=[[names]]; the engine's state (forward pass,
        Kronecker factors) is built on the first product and kept for the next ones."""
        is_torch = hasattr(v, "detach")
        a = np.asarray(_as_array(v, "v"), dtype=np.float64)
        cols = a.reshape(a.shape[0], -1) if a.ndim == 2 else a.reshape(-1, 1)
        out = self._operator(kw).apply(np.ascontiguousarray(cols.T))
        res = out.T if a.ndim == 2 else out.reshape(-1)
        if is_torch:
            import torch
            return torch.as_tensor(res, dtype=v.dtype)
        return res

    def __matmul__(self, v: Any) -> Any:
        return self.matvec(v)

    def linear_operator(self) -> Any:
        """A scipy.sparse.linalg.LinearOperator of the curvature (curvlinops' convention)."""
        from scipy.sparse.linalg import LinearOperator
        return LinearOperator(self.shape, matvec=lambda v: self.matvec(v), dtype=np.float64)

    def close(self) -> None:
        op = getattr(self, "_op", None)
        if op is not None:
            op.close()
            self._op = None
        self.model.close()
        self.data.close()


class _Operator:
    """curvd_operator: a curvature operator kept open on (model, data); products run
    under the model's and the data's read guards, one at a time."""

    def __init__(self, c: Curvature, job: Dict[str, Any], key: str) -> None:
        self.key, self.version, self._h = key, c.model._guard.version, None
        self._model, self._data, self._lock = c.model, c.data, threading.Lock()
        text = json.dumps(job).encode()
        lim = {k: v for k, v in c.limits.items() if v is not None}
        with c.model._guard.reading(c.model) as mh, c.data._guard.reading(c.data) as dh:
            self._h = _lib.call(_lib.lib.curvd_operator_open, mh, dh, text, len(text),
                                json.dumps(lim).encode() if lim else None)
        self.dim = int(_lib.lib.curvd_operator_dim(self._h))
        c.model._guard.operators.add(self)
        c.data._guard.operators.add(self)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Y = A X for k row vectors X (k x dim, C order)."""
        if X.shape[-1] != self.dim:
            raise ValueError("v has %d entries, the operator's dimension is %d"
                             % (X.shape[-1], self.dim))
        X = np.ascontiguousarray(X, dtype=np.float64)
        Y = np.empty_like(X)
        with self._lock, self._model._guard.reading(self._model), \
                self._data._guard.reading(self._data):
            if not self._h:
                raise ValueError("the operator was closed")
            _lib.call(_lib.lib.curvd_operator_apply, self._h, X.shape[0], X.ctypes.data,
                      Y.ctypes.data)
        return Y

    def close(self) -> None:
        with self._lock:
            if self._h:
                _lib.lib.curvd_operator_close(self._h)
                self._h = None

    __del__ = close


class Hessian(Curvature):
    curvature = "hessian"


class GGN(Curvature):
    curvature = "ggn"


class FisherMC(Curvature):
    curvature = "fisher_mc"


class EF(Curvature):
    curvature = "ef"


class KFAC(Curvature):
    curvature = "kfac"


def analyze(model: Any, loss_fn: Any, data: Any, op: str = "trace", curvature: str = "hessian",
            **options: Any) -> Dict[str, Any]:
    """One job on a torch model and data, e.g. ``analyze(m, loss, (x, y), op="eigen", k=3)``."""
    c = Curvature(model, loss_fn, data, curvature=curvature)
    try:
        return c.run(op, **options)
    finally:
        c.close()


class _PyHessian:
    """PyHessian's ``hessian`` object: trace, eigenvalues, density with its names and returns."""

    def __init__(self, model: Any, criterion: Any, data: Any = None, dataloader: Any = None,
                 seed: int = 0) -> None:
        if (data is None) == (dataloader is None):
            raise ValueError("give data=(x, y) or dataloader=..., as PyHessian takes them")
        self.h = Hessian(model, criterion, data if data is not None else dataloader)
        self.model = model
        self.seed = seed

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list:  # noqa: N803
        """The per-probe values v^T H v (PyHessian's trace_vhv); their mean is the trace."""
        r = self.h.trace(max_probes=maxIter, tol=tol, return_samples=True, seed=self.seed)
        return list(r["samples"])

    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1):  # noqa: N803
        """(eigenvalues, eigenvectors) by power iteration with deflation, the vectors as
        lists of tensors shaped like the parameters."""
        r = self.h.eigenvalues(k=top_n, method="power", max_iter=maxIter, tol=tol,
                               return_vectors=True, seed=self.seed)
        vecs = [self._split(v) for v in r.get("eigenvectors", [])]
        return list(r["eigenvalues"]), vecs

    def density(self, iter: int = 100, n_v: int = 1):  # noqa: A002
        """(eigen_list_full, weight_list_full): SLQ nodes and weights per run."""
        r = self.h.density(lanczos_steps=iter, runs=n_v, seed=self.seed)
        return [list(n) for n in r["nodes"]], [list(w) for w in r["weights"]]

    def _split(self, v: Sequence[float]) -> list:
        """v (the engine's order) as tensors in model.parameters() order (by name)."""
        parts = self.h.split(v)
        return [parts[n] for n, _ in self.model.named_parameters() if n in parts]


def pyhessian(model: Any, criterion: Any, data: Any = None, dataloader: Any = None,
              seed: int = 0) -> _PyHessian:
    """PyHessian's ``hessian(model, criterion, data=(x, y))`` on curvd's engine."""
    return _PyHessian(model, criterion, data, dataloader, seed)
