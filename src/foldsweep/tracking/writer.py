"""The MLflow writer process: the sweep's `RunStore` lives in a child, and the sweep sends it requests.

Why a process: importing MLflow costs seconds, and MLflow spends 0.1-0.2 ms of Python per metric row. In
the training process the import would delay the first training step, and in a thread the rows would
share the GIL with training (which drops and retakes it on every tensor op, and so waits out each of
the thread's slices: measured slower than writing inline). The child starts before the sweep imports
torch (`start_early`), imports MLflow on the other core meanwhile, and writes every run from then on;
the training process never imports MLflow.

Requests run in the order sent. A `call` waits for its answer (run ids, counts, curves: plain values);
a `post` (a trial's rows) does not, and its errors come back at the next `flush`. The child is a plain
subprocess (not multiprocessing, so it never re-runs the caller's script) in its own session, so Ctrl-C
on the terminal leaves it to the parent to flush and stop; it ends when the parent is gone, once it has
served what the parent sent (a sweep's last request, its pictures, is served after the sweep has
returned: `close(wait=False)`). It is
started as `python -c "from foldsweep.tracking.writer import _writer_main; ..."`, so nothing this module
imports at the top may be heavy (no torch, no MLflow).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from foldsweep import errors
from foldsweep.errors import DiskFull, FoldsweepError
from foldsweep.tracking.store import _absolute_sqlite

__all__ = ["WriterProcess", "discard_early", "start_early", "take_writer"]

IDLE_S = 1.0  # a writer with no request for this long is idle: it prepares the pictures' imports then
DISK_FULL = ("disk full while writing the MLflow store: nothing finished is lost; free space and rerun the same "
             "command to resume")


class WriterProcess:
    """The parent's end: send requests, match answers to them by token.

    Args:
        warm_uri: the store the sweep will open, so the child pays MLflow's one-time costs before it is asked.
    """

    def __init__(self, warm_uri: str = "") -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", "from foldsweep.tracking.writer import _writer_main; _writer_main()",
                   str(theirs.fileno()), warm_uri]
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()], start_new_session=True,
                                         stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._answers: dict[int, tuple[bool, Any]] = {}
        self._tokens = itertools.count()
        self._closer = weakref.finalize(self, _stop, self._process, self._conn)

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.poll() is None and not self._conn.closed

    def ask(self, method: str, *args: Any) -> int:
        """Send a request whose answer is wanted; returns the token to `answer` it by."""
        token = next(self._tokens)
        self._send(("call", token, (method, args)))
        return token

    def answer(self, token: int) -> Any:
        """Wait for the answer to `ask`'s request `token`; a failure there is raised here, as one line."""
        while token not in self._answers:
            self._receive(timeout=1.0)
        ok, value = self._answers.pop(token)
        if not ok:
            raise _as_error(*value)
        return value

    def call(self, method: str, *args: Any) -> Any:
        return self.answer(self.ask(method, *args))

    def post(self, method: str, *args: Any) -> None:
        """Send a request and go on; a failure is reported by the next `flush`."""
        self._send(("post", None, (method, args)))

    def flush(self, close_unlogged: str | None = None) -> list[str]:
        """Wait for every request so far; returns the errors of posts since the last flush."""
        errors_since: list[str] = self.call("flush", close_unlogged)
        return errors_since

    def close(self, *, wait: bool = True) -> None:
        """Let the child finish what it was sent, then end it; with `wait=False`, go on without waiting.

        The requests sent are in the socket, and the child reads them all before it sees this end closed,
        so it finishes them even after this process has exited.
        """
        if wait:
            self._closer()
        elif self._closer.detach() is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._conn.close()
            _finishing[:] = [p for p in _finishing if p.poll() is None] + [self._process]

    def _send(self, request: tuple[str, int | None, tuple[str, tuple[Any, ...]]]) -> None:
        try:
            while self._conn.poll(0):  # take the answers first, so neither side ever blocks on a full socket
                self._receive(timeout=0)
            self._conn.send(request)
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
        token, ok, value = answer
        self._answers[token] = (ok, value)

    def _gone(self) -> FoldsweepError:
        return FoldsweepError(f"the MLflow writer process stopped (exit code {self._process.poll()}); runs from "
                              "then on were not written")


def _stop(process: subprocess.Popen[bytes], conn: Connection) -> None:
    with contextlib.suppress(OSError):
        conn.send(None)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    conn.close()


def _as_error(kind: str, message: str) -> FoldsweepError:
    """The child's failure as the same one-line error the parent would have raised itself."""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, FoldsweepError)):
        cls = FoldsweepError
    return cls(message)


_finishing: list[subprocess.Popen[bytes]] = []  # writers left to finish on their own, reaped as they end


# -- started before the heavy imports ------------------------------------------------------------------
_early: list[WriterProcess] = []


def start_early(tracking_uri: str) -> None:
    """Start a writer now, so its MLflow import overlaps the caller's torch import; `take_writer` takes it."""
    if not _early:
        _early.append(WriterProcess(_absolute_sqlite(tracking_uri)))


def take_writer() -> WriterProcess:
    """The writer `start_early` started (if still alive), else a new one."""
    while _early:
        writer = _early.pop()
        if writer.alive():
            return writer
        writer.close()
    return WriterProcess()


def discard_early(*, wait: bool = True) -> None:
    """End a writer started early that no tracker took (tracking off, or the sweep failed before it began);
    with `wait=False`, go on while it finishes its warm-up and ends."""
    while _early:
        _early.pop().close(wait=wait)


# -- the child ------------------------------------------------------------------------------------------
def _writer_main() -> None:
    """The writer process: serve requests until told to stop or the parent is gone."""
    import logging

    from foldsweep.tracking.runs import RunStore
    from foldsweep.tracking.store import warm_up

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # errors re-raised: reported at flush
    conn = Connection(int(sys.argv[1]))
    if len(sys.argv) > 2 and sys.argv[2]:
        warm_up(sys.argv[2])  # the seconds of MLflow's import and set-up, now, while the parent imports torch
    store: Any = None
    failures: list[str] = []
    drawing = "not needed"  # until trials are written: a sweep, which will want its pictures drawn
    while True:
        try:
            idle = drawing == "wanted" and not conn.poll(IDLE_S)
            if idle:  # the first idle moment: the sweep is training, nothing waits on us
                with contextlib.suppress(Exception):  # best effort: drawing for real reports what fails
                    _import_drawing()
                drawing = "ready"
            request = conn.recv()
        except (EOFError, ConnectionError):  # the parent died without saying stop (kill -9: a reset)
            _exit_now(store)
        if request is None:
            _exit_now(store)
        kind, token, (method, args) = request
        if method == "open_trial" and drawing == "not needed":
            drawing = "wanted"
        try:
            if method == "open":
                store = RunStore(*args)
                value: Any = store.describe()
            elif method == "write_output_to":
                _write_output_to(*args)
                value = None
            elif method == "flush":
                if args[0] is not None:  # after a failure: trials asked but never told end with its status
                    store.close_unfilled(args[0])
                value, failures = failures, []
            else:
                value = getattr(store, method)(*args)
            ok = True
        except Exception as err:  # the sweep goes on; the parent hears of it (now, or at its next flush)
            ok, value = False, _failure(err)
            if kind == "post":
                failures.append(f"{method}: {value[1]}")
        if kind == "call" and not _answer(conn, (token, ok, value)):
            _exit_now(store)


def _exit_now(store: Any) -> NoReturn:
    """End without tearing down MLflow's and SQLAlchemy's modules (about a second): every answer was
    committed before it was sent, so only the store's connections are closed first."""
    if store is not None:
        store.close()
    sys.stderr.flush()
    os._exit(0)


def _write_output_to(path: str) -> None:
    """Send this process's output to the file `path` from now on: the sweep's process may end before we do,
    and a pipe it printed into (`foldsweep run ... | tee log`) must not stay open, waiting for us."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _import_drawing() -> None:
    """matplotlib and Optuna imported, and a first picture drawn, while the first trials train, so the sweep's
    end does not wait for them."""
    import optuna

    from foldsweep import plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # in-memory copies of the studies, made quietly
    plots.warm_up()


def _answer(conn: Connection, reply: tuple[int | None, bool, Any]) -> bool:
    """Send a reply; False when the parent is gone (killed while we wrote: a broken pipe, not a bug)."""
    try:
        conn.send(reply)
    except (EOFError, ConnectionError):
        return False
    return True


def _failure(err: Exception) -> tuple[str, str]:
    """(error class name, one line) for the parent to raise: a full disk, or what `errors.explain` makes of
    it, else MLflow's own words."""
    text = str(err)
    if "disk is full" in text or "No space left" in text:
        return DiskFull.__name__, DISK_FULL
    explained = errors.explain(err)
    if explained is not None:
        return type(explained).__name__, str(explained)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return FoldsweepError.__name__, f"MLflow failed: {type(err).__name__}: {first}"[:2000]
