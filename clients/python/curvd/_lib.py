"""_lib.py - the ctypes binding of libcurvd.so (api/curvd.h): finding the
library, the function prototypes, and turning its JSON error documents into
:class:`CurvdError`.  Everything above this module speaks Python objects."""
import ctypes
import json
import os
from typing import Any, Dict, Optional

from curvd_client.client import CurvdError as _ClientError


class CurvdError(_ClientError):
    """An error from the curvd engine, with the HTTP API's ``code`` and ``field``.

    ``status`` is 0: the engine ran in this process (the same error over HTTP
    is a 4xx/5xx status with the same code and field).
    """

    def __init__(self, code: str, message: str, field: str = "",
                 body: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(0, code, message, field, body)


def _candidates():
    env = os.environ.get("CURVD_LIB")
    if env:
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    return [os.path.join(root, "build", "libcurvd.so"), os.path.join(here, "libcurvd.so"),
            "libcurvd.so"]


def _load() -> ctypes.CDLL:
    tried = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            tried.append(path + " (missing)")
            continue
        try:
            return ctypes.CDLL(path)
        except OSError as ex:
            tried.append("%s (%s)" % (path, ex))
    raise ImportError("curvd: cannot load libcurvd.so (build it with `make` in the curvd "
                      "clone, or point $CURVD_LIB at it); tried: " + "; ".join(tried))


_c = ctypes.c_char_p
_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_errp = ctypes.POINTER(ctypes.c_void_p)

_PROTOTYPES = {
    "curvd_version": (ctypes.c_char_p, []),
    "curvd_api_version": (ctypes.c_int, []),
    "curvd_free": (None, [_p]),
    "curvd_set_blas_threads": (None, [ctypes.c_int]),
    "curvd_model_open": (_p, [_c, ctypes.c_size_t, _errp]),
    "curvd_model_close": (None, [_p]),
    "curvd_model_tensor_count": (ctypes.c_int, [_p]),
    "curvd_model_tensor_name": (ctypes.c_char_p, [_p, ctypes.c_int]),
    "curvd_model_tensor_numel": (_i64, [_p, ctypes.c_int]),
    "curvd_model_tensor_is_param": (ctypes.c_int, [_p, ctypes.c_int]),
    "curvd_model_set_tensor": (ctypes.c_int, [_p, _c, _p, _i64, _errp]),
    "curvd_model_load_params": (ctypes.c_int, [_p, _p, ctypes.c_size_t, _errp]),
    "curvd_data_open": (_p, [_i64, _p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_i64), _p,
                             ctypes.c_int, ctypes.c_int, ctypes.POINTER(_i64), _errp]),
    "curvd_data_load": (_p, [_p, ctypes.c_size_t, _errp]),
    "curvd_data_close": (None, [_p]),
    "curvd_run": (_p, [_p, _p, _c, ctypes.c_size_t, _c, _errp]),
    "curvd_operator_open": (_p, [_p, _p, _c, ctypes.c_size_t, _c, _errp]),
    "curvd_operator_dim": (_i64, [_p]),
    "curvd_operator_apply": (ctypes.c_int, [_p, ctypes.c_int, _p, _p, _errp]),
    "curvd_operator_close": (None, [_p]),
}

lib = _load()
for _name, (_res, _args) in _PROTOTYPES.items():
    _f = getattr(lib, _name)
    _f.restype = _res
    _f.argtypes = _args

API_VERSION = 1
if lib.curvd_api_version() != API_VERSION:
    raise ImportError("curvd: libcurvd.so has API version %d, this package needs %d (rebuild "
                      "with `make`)" % (lib.curvd_api_version(), API_VERSION))

FLOAT32, INT64, INT32 = 0, 1, 2


def take_string(ptr: Optional[int]) -> Optional[str]:
    """The library's malloc'd string at ptr as str (freed), or None."""
    if not ptr:
        return None
    try:
        return ctypes.string_at(ptr).decode("utf-8", "replace")
    finally:
        lib.curvd_free(ptr)


class CurvdValueError(CurvdError, ValueError):
    """A CurvdError about the data or parameters given (shape, dtype, values, labels):
    also a ValueError, as Python code expects for bad arguments."""


# error codes (and fields) that are about the caller's tensors
_VALUE_CODES = {"shape_mismatch", "target_mismatch", "bad_dtype", "invalid_shape",
                "non_finite", "bad_value", "unexpected_tensor", "missing_tensor",
                "out_of_range"}


def error_from(errp: ctypes.c_void_p) -> CurvdError:
    """The CurvdError of an error document the library returned in errp."""
    text = take_string(errp.value)
    try:
        body = json.loads(text) if text else None
        e = body["error"]
        code, field = e.get("code", "error"), e.get("field", "")
        cls = CurvdValueError if code in _VALUE_CODES or field in ("x", "y") else CurvdError
        return cls(code, e.get("message", ""), field, body)
    except (ValueError, KeyError, TypeError):
        return CurvdError("internal", "libcurvd failed without an error document: %r" % text)


def call(fn, *args):
    """Calls a library function whose last argument is char **err; raises on failure."""
    err = ctypes.c_void_p()
    res = fn(*args, ctypes.byref(err))
    if err.value or res is None or (isinstance(res, int) and fn.restype is ctypes.c_int
                                    and res < 0):
        raise error_from(err)
    return res
