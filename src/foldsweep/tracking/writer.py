"""Trial runs written by a child process, so MLflow's per-row Python cost stays off the training core.

The parent sends requests over a socket (the experiment, open a run, fill it, flush); the child answers
with run ids and, at each flush, the errors since the last one. The child is started before the parent
imports MLflow, so the two imports (seconds each) overlap on two cores; it touches the store only once
told the experiment, so never before the parent has created the store (under its lock). The child is started as
`python -c "from foldsweep.tracking.writer import _writer_main; ..."`, so nothing this module imports
at the top may be heavy (no torch): the first trial waits for the writer to start.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import subprocess
import sys
import time
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from foldsweep.errors import FoldsweepError
from foldsweep.tracking.store import _retry

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's limits per `log_batch` call
PARENT = "mlflow.parentRunId"


def _write_rows(client: Any, run_id: str, metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str],
                curves: dict[str, np.ndarray]) -> None:
    """Everything in as few `log_batch` calls as MLflow's per-call limits allow."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    rows = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    for key, values in curves.items():
        rows += [Metric(key, float(v), now, step) for step, v in enumerate(values, start=1) if np.isfinite(v)]
    param_rows = [Param(k, _short(v)) for k, v in params.items()]
    tag_rows = [RunTag(k, _short(v, 5000)) for k, v in tags.items()]
    batches = max(-(-len(rows) // MAX_METRICS), -(-len(param_rows) // MAX_PARAMS), -(-len(tag_rows) // MAX_TAGS))
    for b in range(batches):
        chunk = (rows[b * MAX_METRICS : (b + 1) * MAX_METRICS], param_rows[b * MAX_PARAMS : (b + 1) * MAX_PARAMS],
                 tag_rows[b * MAX_TAGS : (b + 1) * MAX_TAGS])
        _retry(partial(client.log_batch, run_id, metrics=chunk[0], params=chunk[1], tags=chunk[2]))


class _TrialWriter:
    """Creates and fills trial runs in a child process, in request order.

    MLflow spends about 0.1-0.2 ms of Python per metric row. In a thread that time would share the GIL
    with training, which drops and retakes it on every tensor op and so waits out each of the thread's
    slices (measured: slower than writing inline); a process writes on another core instead. It is a
    plain subprocess (not multiprocessing), so it never re-runs the caller's script, in its own session,
    so Ctrl-C on the terminal leaves it to the parent to flush and stop; it ends when the parent is gone.
    """

    def __init__(self, tracking_uri: str) -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", "from foldsweep.tracking.writer import _writer_main; _writer_main()",
                   str(theirs.fileno()), tracking_uri]
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._used = False
        self._opened: set[tuple[str, str]] = set()
        self._run_ids: dict[tuple[str, str], str] = {}
        self._flushed: dict[int, list[str]] = {}
        self._tokens = itertools.count()

    def experiment(self, experiment_id: str) -> None:
        """Where runs go; the child opens the store on this message (so after the store was created)."""
        try:
            self._conn.send(("experiment", experiment_id, None))
        except OSError:
            raise self._gone() from None

    def open(self, parent: str, name: str, start: float) -> None:
        self._opened.add((parent, name))
        self._send(("open", (parent, name), start))

    def run_id(self, parent: str, name: str, start: float) -> str:
        """The run opened for this trial ("" if MLflow refused it; `flush` then reports why)."""
        key = (parent, name)
        if key not in self._opened:
            self.open(parent, name, start)
        while key not in self._run_ids:
            self._receive(timeout=1.0)
        self._opened.discard(key)
        return self._run_ids.pop(key)

    def fill(self, run_id: str, metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str],
             curves: dict[str, np.ndarray], status: str) -> None:
        self._send(("fill", run_id, (metrics, params, tags, curves, status)))

    def flush(self, close_unlogged: str | None = None) -> list[str]:
        """Wait for every request so far; returns the errors since the last flush."""
        if not self._used:
            return []
        token = next(self._tokens)
        self._send(("flush", token, close_unlogged))
        while token not in self._flushed:
            self._receive(timeout=1.0)
        return self._flushed.pop(token)

    def close(self) -> None:
        if not self._used:  # nothing to write (a sweep resumed after its last trial): no need to wait for it
            self._process.terminate()
        with contextlib.suppress(OSError):
            self._conn.send(None)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._conn.close()

    def _send(self, request: tuple[str, Any, Any]) -> None:
        try:
            while self._conn.poll(0):  # take the answers first, so neither side ever blocks on a full socket
                self._receive(timeout=0)
            self._conn.send(request)
            self._used = True
        except OSError:
            raise self._gone() from None

    def _receive(self, timeout: float) -> None:
        try:
            ready = self._conn.poll(timeout)
            answer = self._conn.recv() if ready else None
        except (EOFError, OSError):
            raise self._gone() from None
        if answer is None:
            if self._process.poll() is not None:
                raise self._gone()
            return
        kind, key, value = answer
        if kind == "opened":
            self._run_ids[key] = value
        else:
            self._flushed[key] = value

    def _gone(self) -> FoldsweepError:
        return FoldsweepError(f"the MLflow writer process stopped (exit code {self._process.poll()}); trial "
                              "runs from then on were not written")


def _writer_main() -> None:
    """The writer process: open, fill and close runs until told to stop or the parent is gone."""
    from mlflow import MlflowClient

    fd, tracking_uri = int(sys.argv[1]), sys.argv[2]
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # errors re-raised: reported at flush
    conn = Connection(fd)
    client: Any = None
    experiment_id = ""
    errors: list[str] = []
    unfilled: set[str] = set()
    while True:
        try:
            request = conn.recv()
        except (EOFError, ConnectionError):  # the parent died without saying stop (kill -9: a reset)
            return
        if request is None:
            return
        kind, key, value = request
        if kind == "experiment":
            experiment_id, client = key, MlflowClient(tracking_uri)
            continue
        answer = ""
        try:
            answer = _serve(client, experiment_id, kind, key, value, unfilled)
        except Exception as err:  # the sweep goes on; the parent hears of it at its next flush
            errors.append(f"{kind} {key}: {err}")
        reply = ("opened", key, answer) if kind == "open" else ("flushed", key, errors) if kind == "flush" else None
        if reply is not None and not _answer(conn, reply):
            return
        if kind == "flush":
            errors = []


def _answer(conn: Connection, reply: tuple[str, Any, Any]) -> bool:
    """Send a reply; False when the parent is gone (killed while we wrote: a broken pipe, not a bug)."""
    try:
        conn.send(reply)
    except (EOFError, ConnectionError):
        return False
    return True


def _serve(client: Any, experiment_id: str, kind: str, key: Any, value: Any, unfilled: set[str]) -> str:
    if kind == "open":
        parent, name = key
        run = _retry(lambda: client.create_run(experiment_id, run_name=name, start_time=int(value * 1000),
                                               tags={PARENT: parent}))
        unfilled.add(str(run.info.run_id))
        return str(run.info.run_id)
    if kind == "fill":
        metrics, params, tags, curves, status = value
        unfilled.discard(key)
        _write_rows(client, key, metrics, params, tags, curves)
        _retry(lambda: client.set_terminated(key, status))
    elif value is not None:  # a flush after a failure: trials asked but never told end with the sweep's status
        for run_id in sorted(unfilled):
            _retry(partial(client.set_terminated, run_id, value))
        unfilled.clear()
    return ""


def _short(value: Any, limit: int = 500) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:limit]
