"""MLflow behind one small seam: sweep run -> study runs -> trial runs, written in batches.

A trial's run is created and filled when the trial ends (one create, a few `log_batch` calls, one
terminate), so tracking costs a handful of calls per trial whatever the number of epochs and folds.
`NullTracker` stands in when tracking is off. The sweep run also carries provenance tags and, while
it runs, MLflow's system metrics (CPU, memory, GPU); `serve_ui` shows the same store in the MLflow UI.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from foldsweep.errors import FoldsweepError
from foldsweep.spec import TrackingSpec

if TYPE_CHECKING:
    import torch  # imported where a model is logged: the MLflow writer process must start light

T = TypeVar("T")
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
PARENT, RUN_NAME = "mlflow.parentRunId", "mlflow.runName"
SYSTEM_METRICS_INTERVAL_S = 5.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
VERSIONED = ("mlflow", "scikit-learn", "numpy", "psutil")


class NullTracker:
    """Tracking switched off: every call succeeds and records nothing."""

    enabled = False
    tracking_uri = ""
    experiment_id = ""

    def sweep_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        return ""

    def study_run(self, sweep_run_id: str, study: str, run_id: str | None) -> str:
        return ""

    def open_trial(self, parent: str, name: str, start: float) -> None:
        return None

    def log_trial(self, parent: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                  curves: dict[str, np.ndarray], tags: dict[str, str], status: str, start: float) -> str:
        return ""

    def log_values(self, run_id: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        return None

    def log_files(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        return None

    def metric_histories(self, run_id: str, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {}

    def flush(self) -> None:
        return None

    def abandon(self, status: str) -> None:
        return None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        return None

    def fail_running(self, parent: str) -> int:
        return 0

    def log_step(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        return None

    def log_model(self, parent: str, name: str, model: torch.nn.Module, n_inputs: int, params: dict[str, Any],
                  tags: dict[str, str]) -> dict[str, str]:
        return {}


class MlflowTracker(NullTracker):
    enabled = True

    def __init__(self, spec: TrackingSpec, sweep_name: str) -> None:
        from mlflow import MlflowClient

        # after the import: importing mlflow configures its loggers at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)

        self.system_metrics = spec.system_metrics
        self._monitors: dict[str, Any] = {}
        self._writer: _TrialWriter | None = None  # started with the first trial
        self._sweep_run = ""
        self.tracking_uri = _absolute_sqlite(spec.uri)
        _ensure_sqlite_folder(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        name = spec.experiment or sweep_name
        experiment = _retry(lambda: self.client.get_experiment_by_name(name))  # creates the store's tables
        _write_ahead_log(self.tracking_uri)
        if experiment is None:
            artifacts = _artifact_root(spec.artifact_location)
            self.experiment_id = _retry(lambda: self.client.create_experiment(
                name, artifact_location=f"{artifacts}/{name}",
                tags={"mlflow.experimentKind": "custom_model_development"}))
        else:
            self.experiment_id = experiment.experiment_id

    def sweep_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        """The sweep's run (created with provenance tags, or reopened on resume), watched by system metrics."""
        resumed = bool(run_id)
        if run_id:
            self._reopen(run_id)
        else:
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name,
                                                        tags={**provenance_tags(), **tags}))
            run_id = str(run.info.run_id)
        self._sweep_run = run_id
        self._trial_writer()  # the writer process starts up while the sweep does
        if self.system_metrics:
            self._monitors[run_id] = _start_monitor(run_id, self.tracking_uri, resumed)
        return run_id

    def study_run(self, sweep_run_id: str, study: str, run_id: str | None) -> str:
        if run_id:
            self._reopen(run_id)
            return run_id
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=study,
                                                    tags={PARENT: sweep_run_id, "foldsweep.study": study}))
        return run.info.run_id

    def open_trial(self, parent: str, name: str, start: float) -> None:
        """Create a trial's run in the writer process while the trial trains (RUNNING in the UI until told)."""
        if parent:
            self._trial_writer().open(parent, name, start)

    def log_trial(self, parent: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                  curves: dict[str, np.ndarray], tags: dict[str, str], status: str, start: float) -> str:
        """The run id at once (the Optuna trial must name it before it is told); the rows follow in the background."""
        writer = self._trial_writer()
        run_id = writer.run_id(parent, name, start)
        if run_id:
            writer.fill(run_id, metrics, params, tags, curves, status)
        return run_id

    def flush(self) -> None:
        """Wait until every trial run is written; a failed write raises here."""
        self._drain(None, strict=True)

    def abandon(self, status: str) -> None:
        """After an interruption: land what was sent, end the runs of trials never told with `status`.

        Never raises (failures are logged), so it cannot hide the interruption that got us here.
        """
        self._drain(status, strict=False)

    def _drain(self, close_unlogged: str | None, strict: bool) -> None:
        if self._writer is None:
            return
        try:
            errors = self._writer.flush(close_unlogged)
        except FoldsweepError as err:  # the writer process is gone
            errors = [str(err)]
        self._report(errors, strict)

    def _trial_writer(self) -> _TrialWriter:
        if self._writer is None:
            self._writer = _TrialWriter(self.tracking_uri, self.experiment_id)
        return self._writer

    def _report(self, errors: list[str], strict: bool) -> None:
        if errors and strict:
            raise FoldsweepError(f"MLflow could not write {len(errors)} trial run(s); first: {errors[0]}")
        for error in errors:
            logging.getLogger(__name__).warning("a trial run was not fully written to MLflow: %s", error)

    def log_values(self, run_id: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        self._write(run_id, metrics, params or {}, tags or {}, {})

    def log_files(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        """Each (file, folder inside the run's artifacts; "" for the top)."""
        for path, folder in files:
            _retry(lambda p=path, f=folder: self.client.log_artifact(run_id, str(p), artifact_path=f or None))

    def metric_histories(self, run_id: str, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(steps, values) of each logged curve, read back so plots need not keep every curve in memory."""
        self.flush()
        out = {}
        for key in keys:
            history = sorted(_retry(lambda k=key: self.client.get_metric_history(run_id, k)), key=lambda m: m.step)
            if history:
                out[key] = (np.array([m.step for m in history]), np.array([m.value for m in history]))
        return out

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Stop the run's system-metrics monitor (if any) with a last sample, then close the run."""
        if not run_id:
            return
        if status == "FINISHED":
            self.flush()
        else:  # after a failure, trials asked but never told end with the sweep's status
            self.abandon(status)
        if run_id == self._sweep_run and self._writer is not None:
            self._writer.close()
            self._writer = None
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:
            _stop_monitor(monitor)
        _retry(lambda: self.client.set_terminated(run_id, status))

    def fail_running(self, parent: str) -> int:
        """Mark runs left RUNNING under `parent` by a killed process as FAILED; returns how many."""
        self.flush()
        runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT}` = '{parent}' and "
                                       "attributes.status = 'RUNNING'")
        for run in runs:
            self.finish(run.info.run_id, "FAILED")
        return len(runs)

    def log_step(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        """Metrics at an explicit step (a test look's number), so every look stays in the metric's history."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        _retry(lambda: self.client.log_batch(run_id, metrics=rows, tags=[RunTag(k, v) for k, v in tags.items()]))

    def log_model(self, parent: str, name: str, model: torch.nn.Module, n_inputs: int, params: dict[str, Any],
                  tags: dict[str, str]) -> dict[str, str]:
        """A run of its own (a child of `parent` when given) holding the network as an MLflow PyTorch model.

        Saved in MLflow's "pt2" format (torch.export: loading runs no pickle). The network takes
        preprocessed features, so the input example is all-zero rows: the training mean (two rows, so
        that torch.export keeps the batch dimension free).
        """
        import mlflow.pytorch
        import torch
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # fluent log_model reads the global URI

        run_tags = {**provenance_tags(), **tags, **({PARENT: parent} if parent else {})}
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=run_tags))
        run_id = str(run.info.run_id)
        self._write(run_id, {}, params, {}, {})
        example = np.zeros((2, n_inputs), dtype=np.float32)
        with _use_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pt2",
                                            pip_requirements=[f"torch=={torch.__version__}"])
        return {"run_id": run_id, "model_uri": info.model_uri, "tracking_uri": self.tracking_uri}

    def _reopen(self, run_id: str) -> None:
        _retry(lambda: self.client.update_run(run_id, status="RUNNING"))

    def _write(self, run_id: str, metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str],
               curves: dict[str, np.ndarray]) -> None:
        _write_rows(self.client, run_id, metrics, params, tags, curves)


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
        _retry(lambda c=chunk: client.log_batch(run_id, metrics=c[0], params=c[1], tags=c[2]))


class _TrialWriter:
    """Creates and fills trial runs in a child process, in request order.

    MLflow spends about 0.1-0.2 ms of Python per metric row. In a thread that time would share the GIL
    with training, which drops and retakes it on every tensor op and so waits out each of the thread's
    slices (measured: slower than writing inline); a process writes on another core instead. It is a
    plain subprocess (not multiprocessing), so it never re-runs the caller's script, in its own session,
    so Ctrl-C on the terminal leaves it to the parent to flush and stop; it ends when the parent is gone.
    """

    def __init__(self, tracking_uri: str, experiment_id: str) -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-c", "from foldsweep.tracking import _writer_main; _writer_main()",
                   str(theirs.fileno()), tracking_uri, experiment_id]
        self._process = subprocess.Popen(command, pass_fds=[theirs.fileno()], start_new_session=True)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._used = False
        self._opened: set[tuple[str, str]] = set()
        self._run_ids: dict[tuple[str, str], str] = {}
        self._flushed: dict[int, list[str]] = {}
        self._tokens = itertools.count()

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

    fd, tracking_uri, experiment_id = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    conn = Connection(fd)
    client = MlflowClient(tracking_uri)
    errors: list[str] = []
    unfilled: set[str] = set()
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent died without saying stop
            return
        if request is None:
            return
        kind, key, value = request
        answer = ""
        try:
            answer = _serve(client, experiment_id, kind, key, value, unfilled)
        except Exception as err:  # the sweep goes on; the parent hears of it at its next flush
            errors.append(f"{kind} {key}: {err}")
        if kind == "open":
            conn.send(("opened", key, answer))
        elif kind == "flush":
            conn.send(("flushed", key, errors))
            errors = []


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
            _retry(lambda r=run_id: client.set_terminated(r, value))
        unfilled.clear()
    return ""


def make_tracker(spec: TrackingSpec, sweep_name: str) -> NullTracker:
    return MlflowTracker(spec, sweep_name) if spec.enabled else NullTracker()


def provenance_tags(folder: Path | None = None) -> dict[str, str]:
    """Versions, and the git commit of the working directory when it is a checkout: what a rerun must match."""
    tags = {"python.version": platform.python_version()}
    for package in VERSIONED:
        try:
            tags[f"{package}.version"] = version(package)
        except PackageNotFoundError:
            continue
    commit = _git(folder, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit  # the UI shows this one in its Version column
        tags["foldsweep.git_dirty"] = str(bool(_git(folder, "status", "--porcelain", "--untracked-files=no"))).lower()
    return tags


def _git(folder: Path | None, *args: str) -> str:
    """Output of a git command, or "" outside a checkout or without git (provenance is best effort)."""
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _start_monitor(run_id: str, tracking_uri: str, resumed: bool) -> Any:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resumed,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def _stop_monitor(monitor: Any) -> None:
    """Stop sampling, then log one last sample, so even a sweep shorter than the interval has one point."""
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    _retry(monitor.mlflow_logger.flush)


# -- the MLflow UI over this project's store ---------------------------------------------------------------
def ui_command(spec: TrackingSpec, host: str, port: int) -> list[str]:
    """`mlflow server` over the spec's store; artifacts it is sent through the server land in the spec's folder."""
    uri = _absolute_sqlite(spec.uri)
    if uri.startswith(("http://", "https://")):
        raise FoldsweepError(f"tracking.uri `{uri}` is an MLflow server already: open it in a browser")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise FoldsweepError(f"no MLflow store at {uri[len('sqlite:///'):]}; run a sweep first "
                             "(`foldsweep run SPEC`) or start `foldsweep ui` in the folder that holds mlruns/")
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--artifacts-destination", _artifact_root(spec.artifact_location), "--host", host, "--port", str(port),
            "--workers", "1", "--uvicorn-opts", "--no-access-log"]


def serve_ui(spec: TrackingSpec, host: str, port: int, on_ready: Callable[[str, list[tuple[str, str]]], None],
             timeout_s: float = 120.0) -> int:
    """Run the MLflow UI until it exits or this process is stopped; `on_ready(url, links)` once it answers.

    The server is always stopped on the way out (Ctrl-C, SIGTERM, an error), so no orphan keeps the port.
    """
    command = ui_command(spec, host, port)
    _check_port(host, port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner for a viewer
    proc = subprocess.Popen(command, env=env, stdout=2)  # its chatter to stderr: stdout is for the links
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_ready(proc, url, timeout_s)
        on_ready(url, experiment_links(_absolute_sqlite(spec.uri), url))
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()  # `mlflow server` forwards it to its uvicorn child
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def experiment_links(tracking_uri: str, url: str) -> list[tuple[str, str]]:
    """(experiment, deep link) per experiment; without `workflowType` the UI opens its GenAI traces view."""
    from mlflow import MlflowClient

    experiments = MlflowClient(tracking_uri).search_experiments()
    return [(e.name, f"{url}/#/experiments/{e.experiment_id}?workflowType=machine_learning")
            for e in experiments if e.name != "Default"]


def _check_port(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise FoldsweepError(f"cannot serve on {host}:{port} ({err.strerror}); pick another with --port") from None


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FoldsweepError(f"the MLflow UI exited with code {proc.returncode} before answering; "
                                 "its messages are above")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    raise FoldsweepError(f"the MLflow UI did not answer at {url} within {timeout_s:.0f}s")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _short(value: Any, limit: int = 500) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:limit]


def _absolute_sqlite(uri: str) -> str:
    """A relative sqlite path is pinned to the current folder so worker processes all hit one file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _artifact_root(location: str) -> str:
    """A local folder as an absolute file URI (what MLflow stores); any other URI as given."""
    return location if "://" in location else Path(location).resolve().as_uri()


def _ensure_sqlite_folder(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def _write_ahead_log(uri: str) -> None:
    """Put a SQLite store in WAL mode (it stays so): one fsync per commit instead of three, and readers
    (the UI, other workers) no longer wait for writers. Measured here: 40 trial runs in 7 s instead of 15 s.
    Best effort: a store another process holds busy right now keeps its mode until the next sweep."""
    if not uri.startswith("sqlite:///"):
        return
    try:
        with contextlib.closing(sqlite3.connect(uri[len("sqlite:///"):], timeout=1.0)) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:
        return


def _retry(call: Callable[[], T], attempts: int = 8) -> T:
    """SQLite allows one writer at a time: a worker that finds it locked waits and tries again."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # MLflow wraps the driver's error in its own exception types
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")

