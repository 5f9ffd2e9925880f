"""monitor.py - Cockpit's instruments for a training loop, computed by curvd outside it.

    from curvd_client import Client
    from curvd_client.monitor import Monitor

    mon = Monitor(Client(url), "mlp", "digits", every=10, batch={"offset": 0, "size": 256})
    for step in range(steps):
        ...                                   # one optimizer step
        mon.step(model)                       # returns at once: pushed on a background thread
    mon.close()                               # waits for the last push
    hist = mon.history()                      # [{version, time, job, skipped, instruments}]
    mon.to_csv("history.csv"); mon.to_tensorboard("runs/mlp")

The monitor itself lives in the daemon (``POST /v1/models/{name}/monitors``): it runs op
``instruments`` on every ``every``-th pushed version at the lowest queue priority and keeps
the time series (``GET /v1/models/{name}/history``). ``step`` takes a ``torch.nn.Module``
(its state_dict, exported as curvd's parameters) or safetensors bytes; while a push is in
flight the newest weights wait and older waiting ones are dropped, so a fast loop never
blocks and never builds a backlog (``pushed`` / ``dropped`` count them).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .client import Client, CurvdError
from . import tensorboard as _tb


class Monitor:
    """A training monitor on the daemon plus a background pusher of the model's weights."""

    def __init__(self, client: Client, model_name: str, dataset: str, every: int = 1, *,
                 batch: Optional[Mapping[str, Any]] = None,
                 include: Optional[Sequence[str]] = None,
                 exclude: Optional[Sequence[str]] = None, seed: Optional[int] = None,
                 **options: Any) -> None:
        body: Dict[str, Any] = {"dataset": dataset, "every": int(every)}
        if batch is not None:
            body["batch"] = dict(batch)
        if include is not None:
            body["include"] = list(include)
        if exclude is not None:
            body["exclude"] = list(exclude)
        if seed is not None:
            body["seed"] = seed
        body.update(options)  # probes, bins, lanczos_steps, tic_epsilon
        self.client, self.model = client, model_name
        self.info = client._json("POST", "/v1/models/%s/monitors" % client._name(model_name),
                                 body)
        self.id = self.info["id"]
        self.pushed = self.dropped = 0
        self.error: Optional[BaseException] = None
        self._next: Optional[bytes] = None
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="curvd-monitor", daemon=True)
        self._thread.start()

    @staticmethod
    def _weights(model: Any) -> bytes:
        if isinstance(model, (bytes, bytearray)):
            return bytes(model)
        from .torch_export import state_dict_bytes  # needs torch
        return state_dict_bytes(model)

    def step(self, model: Any) -> None:
        """Hands the current weights to the pusher and returns at once (the weights are
        copied now: training may go on changing the model)."""
        raw = self._weights(model)
        with self._cv:
            if self._closed:
                raise RuntimeError("Monitor.step after close()")
            if self._next is not None:
                self.dropped += 1  # a newer version supersedes the waiting one
            self._next = raw
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._next is None and not self._closed:
                    self._cv.wait()
                if self._next is None:
                    return
                raw, self._next = self._next, None
            try:
                self.client.push_parameters(self.model, raw)
                with self._cv:
                    self.pushed += 1
                    self._cv.notify_all()
            except (CurvdError, OSError) as e:  # kept for the caller; training goes on
                with self._cv:
                    self.error = e
                    self._cv.notify_all()

    def flush(self, timeout: Optional[float] = None) -> None:
        """Waits until no weights are waiting to be pushed."""
        with self._cv:
            self._cv.wait_for(lambda: self._next is None, timeout)

    def close(self, timeout: Optional[float] = 60.0) -> None:
        """Pushes what is waiting, then stops the background thread (the daemon's monitor
        stays: ``delete()`` removes it)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def delete(self) -> None:
        """Removes the monitor (and its history) from the daemon."""
        self.client.request("DELETE", "/v1/models/%s/monitors/%s" % (
            self.client._name(self.model), self.id))

    def history(self, since: Optional[int] = None) -> List[Dict[str, Any]]:
        """This monitor's entries, oldest first."""
        q = "?monitor=%s" % self.id + ("&since=%d" % since if since is not None else "")
        return self.client._json("GET", "/v1/models/%s/history%s" % (
            self.client._name(self.model), q))["history"]

    def wait_for_version(self, version: int, timeout: float = 60.0,
                         poll: float = 0.2) -> List[Dict[str, Any]]:
        """Polls the history until an entry for a version >= version is there."""
        end = time.time() + timeout
        while True:
            h = self.history()
            if any(e.get("version", 0) >= version for e in h) or time.time() > end:
                return h
            time.sleep(poll)

    def to_csv(self, path: str) -> List[str]:
        """The history as CSV (curvd_client.tensorboard.write_history_csv); the columns."""
        return _tb.write_history_csv(self.history(), path)

    def to_tensorboard(self, logdir: str) -> str:
        """The history as TensorBoard scalars (step = model version); the events file."""
        return _tb.write_history(self.history(), logdir)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
