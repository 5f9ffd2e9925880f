"""HTTP client for curvd (docs/interface.md §5), standard library only.

>>> from curvd_client import Client
>>> c = Client("http://127.0.0.1:8080")
>>> c.run(op="eigen", model="demo-mlp", dataset="digits", options={"k": 1})["eigenvalues"]
[1.31976...]

Every method raises :class:`CurvdError` when the server answers with an error
(4xx/5xx): the exception carries the HTTP status and the server's error JSON
(``code``, ``message``, ``field``).  A :class:`Client` holds no connection
state, so one client may be shared by several threads.
"""
from __future__ import annotations

import http.client
import json
import mmap
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import PurePath

from .safetensors import RowSplitter
from typing import (Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional,
                    Tuple, Union, cast)

__all__ = ["Client", "Job", "Progress", "CurvdError", "JobFailed", "JobTimeout",
           "TERMINAL_STATUSES", "progress_bar"]

#: Job statuses after which nothing changes any more.
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

PathLike = Union[str, "os.PathLike[str]"]
Bytesish = Union[bytes, bytearray, memoryview]
#: An architecture given as a dict, JSON text, JSON bytes, or a path to a JSON file.
ArchitectureLike = Union[Mapping[str, Any], str, Bytesish, "os.PathLike[str]"]
#: Safetensors content given as bytes or as a path to a file.
SafetensorsLike = Union[Bytesish, PathLike]


class CurvdError(Exception):
    """An error answered by curvd (or a failure to reach it).

    Attributes:
        status: The HTTP status (400, 404, 409, 413, 429, 503, ...); 0 when the
            server could not be reached or did not answer in time; for
            :class:`JobFailed`, the HTTP status of the request that saw it (200).
        code: The server's machine-readable code (``unknown_field``,
            ``not_found``, ``in_use``, ...), or ``connection_failed`` /
            ``client_timeout`` for client-side failures.
        message: The server's message, for people.
        field: The JSON path, form part or tensor name the error is about ("" if none).
        body: The server's whole error document (``{"error": {...}}``) when there is one.
    """

    def __init__(self, status: int, code: str, message: str, field: str = "",
                 body: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.body = body

    @property
    def error(self) -> Dict[str, str]:
        """The error object: ``{"code", "message", "field"}``."""
        return {"code": self.code, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        where = " (field %s)" % self.field if self.field else ""
        st = "HTTP %d " % self.status if self.status else ""
        return "%s%s: %s%s" % (st, self.code, self.message, where)

    def __repr__(self) -> str:
        return "%s(status=%r, code=%r, message=%r, field=%r)" % (
            type(self).__name__, self.status, self.code, self.message, self.field)


class JobFailed(CurvdError):
    """A job ended as ``failed`` or ``cancelled``; :attr:`job` is its final status document."""

    def __init__(self, job: Dict[str, Any]) -> None:
        err = job.get("error") or {}
        self.job = job
        self.job_id: str = str(job.get("id", ""))
        self.job_status: str = str(job.get("status", ""))
        super().__init__(200, str(err.get("code", self.job_status)),
                         "job %s %s: %s" % (self.job_id, self.job_status,
                                            err.get("message", "no message")),
                         str(err.get("field", "")), {"error": err})


class JobTimeout(CurvdError, TimeoutError):
    """:meth:`Job.wait` gave up before the job finished (the job keeps running)."""

    def __init__(self, job: Dict[str, Any], waited: float) -> None:
        self.job = job
        self.job_id = str(job.get("id", ""))
        super().__init__(0, "wait_timeout", "job %s still %s after waiting %.3g s"
                         % (self.job_id, job.get("status"), waited))


class Progress(NamedTuple):
    """A job's progress: matvecs done, the planned upper bound, and the fraction done."""

    matvecs_done: int
    matvecs_planned: int
    fraction: float

    @classmethod
    def from_json(cls, p: Optional[Mapping[str, Any]]) -> "Progress":
        p = p or {}
        return cls(int(p.get("matvecs_done", 0) or 0), int(p.get("matvecs_planned", 0) or 0),
                   float(p.get("fraction", 0.0) or 0.0))

    def __str__(self) -> str:
        return "%d/%d matvecs (%.0f%%)" % (self.matvecs_done, self.matvecs_planned,
                                           100 * self.fraction)


#: ``progress(sent_bytes, total_bytes)``, called as an upload goes on.
UploadProgress = Callable[[int, int], None]


def progress_bar(label: str = "upload", stream: Any = None) -> UploadProgress:
    """A progress callback drawing ``label [#####.....] 52% 12.3/23.6 MB`` on stderr
    (one line, redrawn; a newline when done)."""
    out = stream if stream is not None else sys.stderr

    def draw(sent: int, total: int) -> None:
        frac = sent / total if total else 1.0
        n = int(frac * 30)
        out.write("\r%s [%s%s] %3d%% %.1f/%.1f MB" % (label, "#" * n, "." * (30 - n),
                                                      int(100 * frac), sent / 1e6, total / 1e6))
        if sent >= total:
            out.write("\n")
        out.flush()
    return draw


class _Source:
    """The bytes of a SafetensorsLike: bytes as they are, a path memory-mapped."""

    def __init__(self, source: SafetensorsLike) -> None:
        self.source = source
        self.f: Any = None
        self.map: Any = None

    def __enter__(self) -> Any:
        s = self.source
        if isinstance(s, (bytes, bytearray, memoryview)):
            return s
        if isinstance(s, (str, PurePath)) or hasattr(s, "__fspath__"):
            self.f = open(os.fspath(s), "rb")
            if os.fstat(self.f.fileno()).st_size == 0:
                return b""
            self.map = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
            return self.map
        raise TypeError("data must be bytes or a file path, not %s" % type(s).__name__)

    def __exit__(self, *exc: Any) -> None:
        if self.map is not None:
            self.map.close()
        if self.f is not None:
            self.f.close()


def _read(source: SafetensorsLike, what: str) -> bytes:
    """Bytes given directly, or the content of the file at a path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, PurePath)) or hasattr(source, "__fspath__"):
        with open(os.fspath(source), "rb") as f:
            return f.read()
    raise TypeError("%s must be bytes or a file path, not %s" % (what, type(source).__name__))


def _architecture_text(arch: ArchitectureLike) -> str:
    """The architecture as JSON text, from a dict, JSON text/bytes or a file path."""
    if isinstance(arch, Mapping):
        return json.dumps(arch)
    if isinstance(arch, (bytes, bytearray, memoryview)):
        return bytes(arch).decode("utf-8")
    if isinstance(arch, str) and arch.lstrip().startswith("{"):
        return arch
    if isinstance(arch, (str, PurePath)) or hasattr(arch, "__fspath__"):
        with open(os.fspath(arch), "r", encoding="utf-8") as f:
            return f.read()
    raise TypeError("architecture must be a dict, JSON text or a file path, not %s"
                    % type(arch).__name__)


def _multipart(fields: Iterable[Tuple[str, bytes, Optional[str], str]]) -> Tuple[bytes, str]:
    """Encodes (name, value, filename, content type) parts as multipart/form-data."""
    boundary = "curvd-" + uuid.uuid4().hex
    out: List[bytes] = []
    for name, value, filename, ctype in fields:
        disp = 'form-data; name="%s"' % name
        if filename:
            disp += '; filename="%s"' % filename.replace('"', "_")
        out.append(("--%s\r\nContent-Disposition: %s\r\nContent-Type: %s\r\n\r\n"
                    % (boundary, disp, ctype)).encode())
        out.append(value)
        out.append(b"\r\n")
    out.append(("--%s--\r\n" % boundary).encode())
    return b"".join(out), "multipart/form-data; boundary=" + boundary


class Client:
    """A curvd server at ``base_url``.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8080"`` (a trailing ``/v1`` is accepted).
            Defaults to ``$CURVD_URL`` or ``http://127.0.0.1:8080``.
        timeout: Seconds to wait for each HTTP answer (a long poll adds its own wait).
        token: The bearer token of a server started with ``--auth-token-file``
            (sent as ``Authorization: Bearer TOKEN``).  Defaults to ``$CURVD_TOKEN``;
            None or empty: no Authorization header.
        ca_file: For an ``https://`` server whose certificate is not signed by a
            system CA (``--tls-cert`` self-made): the PEM file to trust.
            Defaults to ``$CURVD_CA_FILE``.
    """

    def __init__(self, base_url: Optional[str] = None, timeout: float = 60.0,
                 token: Optional[str] = None, ca_file: Optional[str] = None) -> None:
        url = (base_url or os.environ.get("CURVD_URL") or "http://127.0.0.1:8080").rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        if "://" not in url:
            url = "http://" + url
        self.base_url = url
        self.timeout = float(timeout)
        self._max_body: Optional[int] = None
        tok = token if token is not None else os.environ.get("CURVD_TOKEN", "")
        self._token = tok.strip() or None
        ca = ca_file if ca_file is not None else os.environ.get("CURVD_CA_FILE", "")
        self._ssl = ssl.create_default_context(cafile=ca) if ca else None

    def __repr__(self) -> str:
        return "Client(%r, timeout=%r)" % (self.base_url, self.timeout)

    # ---- transport ---------------------------------------------------------

    def request(self, method: str, path: str, *, body: Optional[bytes] = None,
                content_type: Optional[str] = None, query: Optional[Mapping[str, Any]] = None,
                timeout: Optional[float] = None) -> Tuple[int, Dict[str, str], bytes]:
        """Sends one request; returns (status, headers, body) or raises :class:`CurvdError`.

        ``path`` is relative to the server root (``"/v1/health"``); ``query``
        values of None are left out.
        """
        url = self.base_url + path
        if query:
            q = {k: (("%g" % v) if isinstance(v, float) else str(v))
                 for k, v in query.items() if v is not None}
            if q:
                url += "?" + urllib.parse.urlencode(q)
        req = urllib.request.Request(url, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        req.add_header("Accept", "application/json")
        if self._token:
            req.add_header("Authorization", "Bearer " + self._token)
        t = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=t, context=self._ssl) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            raise self._error(e.code, raw) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.timeout):
                raise CurvdError(0, "client_timeout", "no answer from %s within %.3g s"
                                 % (url, t)) from None
            raise CurvdError(0, "connection_failed", "cannot reach curvd at %s: %s"
                             % (self.base_url, e.reason)) from None
        except (socket.timeout, TimeoutError):
            raise CurvdError(0, "client_timeout", "no answer from %s within %.3g s"
                             % (url, t)) from None
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            # HTTPException: the connection cut mid-answer (IncompleteRead: a daemon
            # killed while it sent the body, BadStatusLine)
            raise CurvdError(0, "connection_failed", "connection to %s failed: %s"
                             % (self.base_url, e)) from None

    @staticmethod
    def _error(status: int, raw: bytes) -> CurvdError:
        try:
            doc = json.loads(raw.decode("utf-8"))
            err = doc["error"]
            return CurvdError(status, str(err.get("code", "")), str(err.get("message", "")),
                              str(err.get("field", "") or ""), doc)
        except (ValueError, KeyError, TypeError, AttributeError):
            text = raw.decode("utf-8", "replace").strip()[:500]
            return CurvdError(status, "http_%d" % status, text or "HTTP %d" % status)

    def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Dict[str, Any]:
        """Sends a request (a JSON ``payload`` or a raw ``body=``); the answer's JSON object."""
        body = None
        ctype = kw.pop("content_type", None)
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            ctype = "application/json"
        elif "body" in kw:
            body = kw.pop("body")
        status, _, raw = self.request(method, path, body=body, content_type=ctype, **kw)
        try:
            doc = json.loads(raw.decode("utf-8")) if raw else {}
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise CurvdError(status, "invalid_response", "%s %s: the answer is not a JSON object: %r"
                             % (method, path, raw[:200]))
        return doc

    @staticmethod
    def _name(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    # ---- service -----------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``GET /v1/health``: status ("ok"), version, workers, queue depth, registry use.

        A draining server (shutting down) answers 503, raised as :class:`CurvdError`.
        """
        return self._json("GET", "/v1/health")

    def ops(self) -> Dict[str, List[str]]:
        """``GET /v1/ops``: ``{"ops": [...], "curvatures": [...]}`` the server supports."""
        return cast(Dict[str, List[str]], self._json("GET", "/v1/ops"))

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition."""
        return self.request("GET", "/metrics")[2].decode("utf-8")

    # ---- models ------------------------------------------------------------

    def list_models(self) -> List[Dict[str, Any]]:
        """Registered models (short descriptions), sorted by name."""
        return cast(List[Dict[str, Any]], self._json("GET", "/v1/models")["models"])

    def get_model(self, name: str) -> Dict[str, Any]:
        """A model's description: architecture, parameter names/shapes, version, ..."""
        return self._json("GET", "/v1/models/" + self._name(name))

    def register_model(self, name: str, architecture: ArchitectureLike,
                       parameters: SafetensorsLike) -> Dict[str, Any]:
        """Registers a model (``POST /v1/models``, multipart); returns its description.

        Args:
            name: ``[A-Za-z0-9_.-]{1,64}``; 409 ``already_exists`` if it exists
                (400 ``invalid_name`` if it is not a valid name).
            architecture: The architecture document (docs/interface.md §1) as a dict, JSON
                text, or the path of a JSON file.
            parameters: The safetensors bytes, or the path of a safetensors file.
        """
        arch = _architecture_text(architecture).encode("utf-8")
        params = _read(parameters, "parameters")
        body, ctype = _multipart([
            ("name", name.encode("utf-8"), None, "text/plain; charset=utf-8"),
            ("architecture", arch, "architecture.json", "application/json"),
            ("parameters", params, "parameters.safetensors", "application/octet-stream"),
        ])
        return self._json("POST", "/v1/models", body=body, content_type=ctype)

    def register_model_files(self, name: str, arch_path: PathLike,
                             params_path: PathLike) -> Dict[str, Any]:
        """Registers a model from an architecture JSON file and a safetensors file."""
        with open(os.fspath(arch_path), "r", encoding="utf-8") as f:
            arch = f.read()
        return self.register_model(name, arch, _read(params_path, "parameters"))

    def delete_model(self, name: str) -> Dict[str, Any]:
        """Deletes a model (409 ``in_use`` while queued or running jobs use it)."""
        return self._json("DELETE", "/v1/models/" + self._name(name))

    def push_parameters(self, name: str, parameters: SafetensorsLike) -> Dict[str, Any]:
        """Replaces a model's weights (``PUT /v1/models/{name}/parameters``).

        ``parameters`` is safetensors bytes (e.g. from
        :func:`curvd_client.torch_export.state_dict_bytes`) or a file path.
        Returns the model summary with its incremented ``version``; jobs
        submitted earlier keep the version they pinned.
        """
        return self._json("PUT", "/v1/models/%s/parameters" % self._name(name),
                          body=_read(parameters, "parameters"),
                          content_type="application/octet-stream")

    def get_parameters(self, name: str) -> bytes:
        """Downloads a model's parameters as safetensors bytes."""
        return self.request("GET", "/v1/models/%s/parameters" % self._name(name))[2]

    # ---- datasets ----------------------------------------------------------

    def list_datasets(self) -> List[Dict[str, Any]]:
        """Registered datasets, sorted by name."""
        return cast(List[Dict[str, Any]], self._json("GET", "/v1/datasets")["datasets"])

    def get_dataset(self, name: str) -> Dict[str, Any]:
        """A dataset's description: n, x shape, y kind/dtype/shape, version."""
        return self._json("GET", "/v1/datasets/" + self._name(name))

    def register_dataset(self, name: str, data: SafetensorsLike, *,
                         progress: Optional[UploadProgress] = None) -> Dict[str, Any]:
        """Registers a new dataset (``POST /v1/datasets``, multipart; 409 if it exists).

        ``data`` is a safetensors file (bytes or a path) with tensors ``x`` and
        ``y`` (docs/interface.md §2), e.g. from :func:`curvd_client.torch_export.export_dataset`.
        A file larger than the server's ``--max-body`` is uploaded in parts
        (:meth:`upload_dataset`); ``progress(sent_bytes, total_bytes)`` is
        called after each part (see :func:`progress_bar`).
        """
        return self.upload_dataset(name, data, replace=False, progress=progress)

    def put_dataset(self, name: str, data: SafetensorsLike, *,
                    progress: Optional[UploadProgress] = None) -> Dict[str, Any]:
        """Creates or replaces a dataset (``PUT /v1/datasets/{name}``); a replacement's version increments.

        Larger than ``--max-body``: uploaded in parts, as :meth:`register_dataset`.
        """
        return self.upload_dataset(name, data, replace=True, progress=progress)

    def register_dataset_file(self, name: str, path: PathLike, *,
                              progress: Optional[UploadProgress] = None) -> Dict[str, Any]:
        """Registers a dataset from a safetensors file (in parts when it is large)."""
        return self.register_dataset(name, path, progress=progress)

    def max_body(self) -> Optional[int]:
        """The server's ``--max-body`` (``max_body_bytes`` of ``GET /v1/health``), cached;
        None for a server that does not report it."""
        if self._max_body is None:
            try:
                doc = self.health()
            except CurvdError as e:
                if e.status != 503:
                    raise
                doc = e.body or {}
            v = doc.get("max_body_bytes")
            self._max_body = int(v) if isinstance(v, (int, float)) and v > 0 else 0
        return self._max_body or None

    def upload_dataset(self, name: str, data: SafetensorsLike, *, replace: bool = False,
                       part_bytes: Optional[int] = None,
                       progress: Optional[UploadProgress] = None) -> Dict[str, Any]:
        """Registers (``replace=False``) or creates/replaces (``replace=True``) a dataset of any size.

        When the file fits in one request below the server's ``--max-body`` (or
        ``part_bytes``, if given) it is sent in one piece (``POST`` multipart or
        ``PUT``); otherwise it is split by rows into parts of at most that many
        bytes (:class:`curvd_client.safetensors.RowSplitter`; a path is
        memory-mapped, not read whole), sent with ``POST
        /v1/datasets/{name}/parts`` and registered with ``POST
        /v1/datasets/{name}/commit`` (which checks the row and part counts).  An
        earlier unfinished upload of the name is discarded first; if a part
        fails the upload is abandoned (``DELETE .../parts``) and the error raised.
        ``progress(sent_bytes, total_bytes)`` is called after each request.
        """
        limit = part_bytes or self.max_body()
        with _Source(data) as buf:
            total = len(buf)
            if not limit or total + 4096 <= limit:
                doc = self._upload_whole(name, bytes(buf), replace)
                if progress:
                    progress(total, total)
                return doc
            return self._upload_parts(name, buf, limit, replace, progress)

    def _upload_whole(self, name: str, raw: bytes, replace: bool) -> Dict[str, Any]:
        if replace:
            return self._json("PUT", "/v1/datasets/" + self._name(name), body=raw,
                              content_type="application/octet-stream")
        body, ctype = _multipart([
            ("name", name.encode("utf-8"), None, "text/plain; charset=utf-8"),
            ("data", raw, "data.safetensors", "application/octet-stream"),
        ])
        return self._json("POST", "/v1/datasets", body=body, content_type=ctype)

    def _upload_parts(self, name: str, buf: Any, limit: int, replace: bool,
                      progress: Optional[UploadProgress]) -> Dict[str, Any]:
        try:
            splitter = RowSplitter(buf, limit)
        except ValueError as e:
            raise CurvdError(0, "cannot_split", "dataset '%s': %s" % (name, e)) from None
        path = "/v1/datasets/%s/parts" % self._name(name)
        self.abort_upload(name)
        rows, total = 0, len(buf)
        try:
            for part, k in splitter:
                self._json("POST", path, body=part, content_type="application/octet-stream")
                rows += k
                if progress:  # done only once committed
                    progress(min(total - 1, total * rows // splitter.rows), total)
            doc = self._json("POST", "/v1/datasets/%s/commit" % self._name(name),
                             {"replace": replace, "n": splitter.rows, "parts": len(splitter)})
        except BaseException:
            try:
                self.abort_upload(name)
            except CurvdError:
                pass
            raise
        if progress:
            progress(total, total)
        return doc

    def get_upload(self, name: str) -> Dict[str, Any]:
        """An unfinished upload in parts (``GET /v1/datasets/{name}/parts``): parts, n, expires_in_s."""
        return self._json("GET", "/v1/datasets/%s/parts" % self._name(name))

    def abort_upload(self, name: str) -> bool:
        """Discards an unfinished upload in parts; False if there was none."""
        try:
            self._json("DELETE", "/v1/datasets/%s/parts" % self._name(name))
            return True
        except CurvdError as e:
            if e.status == 404:
                return False
            raise

    def register_server_file(self, name: str, file: str, *, replace: bool = False) -> Dict[str, Any]:
        """Registers a safetensors file that lives in the server's ``--data-dir``
        (``POST /v1/datasets/{name}``): memory-mapped there, nothing is uploaded."""
        return self._json("POST", "/v1/datasets/" + self._name(name),
                          {"file": file, "replace": replace})

    def delete_dataset(self, name: str) -> Dict[str, Any]:
        """Deletes a dataset (409 ``in_use`` while queued or running jobs use it)."""
        return self._json("DELETE", "/v1/datasets/" + self._name(name))

    def get_dataset_data(self, name: str) -> bytes:
        """Downloads a dataset as safetensors bytes."""
        return self.request("GET", "/v1/datasets/%s/data" % self._name(name))[2]

    # ---- jobs --------------------------------------------------------------

    def submit(self, job: Optional[Mapping[str, Any]] = None, *, wait: Optional[float] = None,
               job_timeout: Optional[float] = None, **fields: Any) -> "Job":
        """Submits a job (``POST /v1/jobs``) and returns a :class:`Job` at once.

        The job document (docs/interface.md §3) is ``job`` updated with keyword fields,
        so both ``submit({"op": "trace", ...})`` and
        ``submit(op="trace", model="m", dataset="d", options={"max_probes": 30})``
        work.  Fields: ``op``, ``model``, ``dataset``, ``curvature``, ``batch``,
        ``blocks``, ``seed``, ``micro_batch`` (samples per micro-batch; default: from
        the server's --job-memory), ``options``; unknown fields are refused by the server (400).

        Args:
            wait: Let the server hold the answer up to this many seconds for the result.
            job_timeout: Running-time limit of this job in seconds (can only
                lower the server's ``--job-timeout``).

        Raises:
            CurvdError: 400 invalid job (``code``/``field`` say what), 404 unknown
                model or dataset, 429 queue full, 503 shutting down.
        """
        doc: Dict[str, Any] = dict(job or {})
        doc.update(fields)
        http_timeout = self.timeout + (wait or 0)
        status = self._json("POST", "/v1/jobs", doc,
                            query={"wait": wait, "timeout": job_timeout}, timeout=http_timeout)
        return Job(self, status)

    def job(self, job_id: str) -> "Job":
        """The job with this id (fetches its current status; 404 if unknown or expired)."""
        return Job(self, self.job_status(job_id))

    def job_status(self, job_id: str, wait: Optional[float] = None) -> Dict[str, Any]:
        """``GET /v1/jobs/{id}``: the status document (with ``result`` or ``error`` when finished).

        ``wait`` holds the answer up to that many seconds until the job finishes.
        """
        return self._json("GET", "/v1/jobs/" + self._name(job_id), query={"wait": wait},
                          timeout=self.timeout + (wait or 0))

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """Cancels a job (``DELETE /v1/jobs/{id}``); returns its status afterwards."""
        return self._json("DELETE", "/v1/jobs/" + self._name(job_id),
                          timeout=self.timeout + 5)

    def list_jobs(self, status: Optional[str] = None, model: Optional[str] = None,
                  dataset: Optional[str] = None, op: Optional[str] = None,
                  limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Jobs (oldest first, without results), optionally filtered."""
        doc = self._json("GET", "/v1/jobs", query={"status": status, "model": model,
                                                   "dataset": dataset, "op": op, "limit": limit})
        return cast(List[Dict[str, Any]], doc["jobs"])

    def run(self, job: Optional[Mapping[str, Any]] = None, *, timeout: Optional[float] = None,
            poll: float = 1.0, on_progress: Optional[Callable[["Job"], None]] = None,
            **fields: Any) -> Dict[str, Any]:
        """Submits a job, waits for it and returns its result (``submit`` + ``Job.wait``).

        Raises:
            JobFailed: the job failed or was cancelled.
            JobTimeout: it did not finish within ``timeout`` seconds (it keeps running).
        """
        return self.submit(job, **fields).wait(timeout=timeout, poll=poll,
                                               on_progress=on_progress)


class Job:
    """A submitted job.  Attributes: :attr:`id` and :attr:`info` (the latest status document)."""

    def __init__(self, client: Client, status: Dict[str, Any]) -> None:
        self.client = client
        self.id: str = str(status["id"])
        self.info: Dict[str, Any] = status

    def __repr__(self) -> str:
        return "Job(id=%r, status=%r, op=%r)" % (self.id, self.info.get("status"),
                                                 self.info.get("op"))

    @property
    def done(self) -> bool:
        """True once the last known status is succeeded, failed or cancelled (no request)."""
        return self.info.get("status") in TERMINAL_STATUSES

    def refresh(self, wait: Optional[float] = None) -> Dict[str, Any]:
        """Fetches the status document (``wait``: long-poll up to that many seconds)."""
        self.info = self.client.job_status(self.id, wait=wait)
        return self.info

    def status(self) -> str:
        """Fetches and returns the status: queued, running, succeeded, failed or cancelled."""
        if not self.done:
            self.refresh()
        return str(self.info["status"])

    @property
    def progress(self) -> Progress:
        """The progress (matvecs done / planned, fraction); refreshed while the job runs."""
        if not self.done:
            self.refresh()
        return Progress.from_json(self.info.get("progress"))

    def wait(self, timeout: Optional[float] = None, poll: float = 1.0,
             on_progress: Optional[Callable[["Job"], None]] = None) -> Dict[str, Any]:
        """Waits for the job to finish and returns its result.

        The server holds each poll open until the job finishes or ``poll``
        seconds pass, so the result arrives without polling delay; ``poll``
        only sets how often ``on_progress(job)`` is called.

        Args:
            timeout: Give up after this many seconds (None: wait as long as it takes).
            poll: Seconds per long poll (progress callback period).
            on_progress: Called with this job after each poll while it is unfinished.

        Raises:
            JobFailed: the job failed or was cancelled (``code``/``message`` from the server).
            JobTimeout: ``timeout`` passed first; the job keeps running.
        """
        start = time.monotonic()
        poll = max(0.05, float(poll))
        while not self.done:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                raise JobTimeout(self.info, time.monotonic() - start)
            self.refresh(wait=poll if left is None else max(0.0, min(poll, left)))
            if not self.done and on_progress is not None:
                on_progress(self)
        return self._result()

    def _result(self) -> Dict[str, Any]:
        if "result" not in self.info and "error" not in self.info:
            self.refresh()  # the 202 answer to a submission carries no result
        if self.info.get("status") != "succeeded":
            raise JobFailed(self.info)
        return cast(Dict[str, Any], self.info["result"])

    @property
    def result(self) -> Dict[str, Any]:
        """The result; waits for the job if needed (raises :class:`JobFailed` if it failed)."""
        return self.wait()

    @property
    def error(self) -> Optional[Dict[str, Any]]:
        """The error object of a failed or cancelled job (last known status), else None."""
        return self.info.get("error")

    def cancel(self) -> Dict[str, Any]:
        """Cancels the job (a running one stops at its next matvec); returns the new status."""
        self.info = self.client.cancel(self.id)
        return self.info
