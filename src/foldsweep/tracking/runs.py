"""MLflow's side of tracking: one client on one store, answering in plain values (ids, dicts, arrays).

A sweep runs this in the writer process (see `writer`), so the training process never imports MLflow
(seconds of start-up) and MLflow's per-row Python cost stays off the training core; `foldsweep fit` runs
it in-process to log a model. Nothing here returns an MLflow object: every answer must cross a socket
to a process that has not imported MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from foldsweep.compat import dispose_store_engine, use_tracking_uri
from foldsweep.tracking.provenance import _start_monitor, _stop_monitor, provenance_tags
from foldsweep.tracking.store import _retry, _write_ahead_log, create_store, open_experiment

if TYPE_CHECKING:
    import torch

    from foldsweep.pictures import SweepPictures

__all__ = ["MAX_METRICS", "MAX_PARAMS", "MAX_TAGS", "PARENT", "Reconciled", "RunStore", "TrialRun", "short"]

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's limits per `log_batch` call
TAG_LIMIT = 5000  # characters MLflow keeps of a tag's value
PARENT = "mlflow.parentRunId"


@dataclass(frozen=True)
class TrialRun:
    """What a trial's run must say, taken from Optuna (the record of truth): its status and headline rows."""

    status: str  # FINISHED | KILLED | FAILED
    metrics: dict[str, float]
    params: dict[str, Any]
    tags: dict[str, str]
    run_id: str = ""  # the run the trial names (`mlflow_run_id`): none for a trial never told with one


@dataclass(frozen=True)
class Reconciled:
    """What `RunStore.reconcile` did: runs it created, and by run name each trial's run where the trial names
    another (one made again, or one its tell never came to name): Optuna cannot change a finished trial."""

    created: int
    moved: dict[str, str]


class RunStore:
    """The runs of one experiment: the sweep run, its study runs, their trial runs (and fitted models).

    Args:
        tracking_uri: an absolute store URI (see `store._absolute_sqlite`).
        experiment: the experiment's name, created under `artifact_location` if missing.
        system_metrics: sample CPU, memory (and GPU) on the sweep run while it is open.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str, system_metrics: bool) -> None:
        from mlflow import MlflowClient

        # after the import: importing mlflow configures its loggers at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        _quiet_reraised_errors()
        self.tracking_uri = tracking_uri
        self.system_metrics = system_metrics
        create_store(tracking_uri)  # under a lock: two sweeps starting at once must not both migrate it
        self.client = MlflowClient(tracking_uri=tracking_uri)
        _write_ahead_log(tracking_uri)
        self.experiment_id = open_experiment(self.client, experiment, artifact_location)
        self.recreated: list[str] = []  # runs the store had lost (deleted or replaced), made again
        self._monitors: dict[str, Any] = {}
        self._unfilled: set[str] = set()  # trial runs opened and not yet filled

    def close(self) -> None:
        """Stop any system-metrics monitor still sampling and close the database connections (a SQLite store
        folds its write-ahead log back in), best effort: the process is about to end."""
        for run_id in list(self._monitors):
            with contextlib.suppress(Exception):
                self._monitors.pop(run_id).finish()
        with contextlib.suppress(Exception):
            dispose_store_engine(self.client)

    def describe(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "recreated": self.recreated}

    def sweep_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        """The sweep's run (created with provenance tags, or reopened on resume), watched by system metrics."""
        resumed = bool(run_id) and self._reopen(run_id or "", name)
        if not resumed or not run_id:
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name,
                                                        tags={**provenance_tags(), **tags}))
            run_id = str(run.info.run_id)
        if self.system_metrics:
            self._monitors[run_id] = _start_monitor(run_id, self.tracking_uri, resumed)
        return run_id

    def study_run(self, sweep_run_id: str, study: str, run_id: str | None) -> str:
        if run_id and self._reopen(run_id, study):
            return run_id
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=study,
                                                    tags={PARENT: sweep_run_id, "foldsweep.study": study}))
        return str(run.info.run_id)

    def open_trial(self, parent: str, name: str, start: float) -> str:
        """A trial's run, RUNNING until filled (the UI shows the trial while it trains)."""
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name, start_time=int(start * 1000),
                                                    tags={PARENT: parent}))
        self._unfilled.add(str(run.info.run_id))
        return str(run.info.run_id)

    def fill_trial(self, run_id: str, metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str],
                   curves: dict[str, np.ndarray], status: str) -> None:
        self._unfilled.discard(run_id)
        self._write(run_id, metrics, params, tags, curves)
        _retry(lambda: self.client.set_terminated(run_id, status))

    def close_unfilled(self, status: str) -> None:
        """After a failure: trials asked but never told end with the sweep's status."""
        for run_id in sorted(self._unfilled):
            _retry(partial(self.client.set_terminated, run_id, status))
        self._unfilled.clear()

    def log_values(self, run_id: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        """Rows on a run. MLflow never changes a param: one whose value moved (an extended sweep's new best)
        is written as a tag of the same name instead, which the run page shows beside the first value."""
        params = params or {}
        logged = _retry(lambda: self.client.get_run(run_id)).data.params if params else {}
        moved = {k: short(v) for k, v in params.items() if k in logged and logged[k] != short(v)}
        self._write(run_id, metrics, {k: v for k, v in params.items() if k not in moved}, {**(tags or {}), **moved}, {})

    def log_files(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        """Each (file, folder inside the run's artifacts; "" for the top)."""
        for path, folder in files:
            _retry(partial(self.client.log_artifact, run_id, str(path), artifact_path=folder or None))

    def metric_histories(self, run_id: str, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(steps, values) of each logged curve, read back so plots need not keep every curve in memory."""
        out = {}
        for key in keys:
            history = sorted(_retry(partial(self.client.get_metric_history, run_id, key)), key=lambda m: m.step)
            if history:
                out[key] = (np.array([m.step for m in history]), np.array([m.value for m in history]))
        return out

    def log_report(self, run_id: str, texts: dict[str, str]) -> None:
        """The report's files (`texts`: name -> content) at the top of the sweep's run."""
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            for name, text in texts.items():
                (folder / name).write_text(text)
            self.log_files(run_id, [(folder / name, "") for name in texts])

    def log_pictures(self, run_id: str, pictures: SweepPictures, summary: dict[str, Any], note: str) -> None:
        """Draw every picture (the outer scores from `summary`) and log them under plots/ on the sweep's run.

        The last request of a sweep, often served after the sweep's process has ended: the outcome goes to
        the record's `note` (see `pictures.PENDING`), where `foldsweep report` finds it.
        """
        from foldsweep.pictures import pictures_drawn
        from foldsweep.plots import draw_study_pictures, outer_scores

        try:
            with tempfile.TemporaryDirectory() as scratch:
                folder = Path(scratch)
                drawn = draw_study_pictures(pictures, self.metric_histories, folder)
                drawn.append(outer_scores(summary, folder / "outer_scores.png"))
                self.log_files(run_id, [(path, "plots") for path in drawn])
        except Exception as err:
            pictures_drawn(Path(note), os.getpid(), failure=f"{type(err).__name__}: {str(err).strip()[:300]}")
            raise
        pictures_drawn(Path(note), os.getpid())

    def finish(self, run_id: str, status: str) -> None:
        """Stop the run's system-metrics monitor (if any) with a last sample, then close the run."""
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:
            _stop_monitor(monitor)
        _retry(lambda: self.client.set_terminated(run_id, status))

    def reconcile(self, parent: str, want: dict[str, TrialRun]) -> Reconciled:
        """Make the trial runs under `parent` agree with Optuna; returns what was created or found elsewhere.

        A killed process can leave a run RUNNING, end one FAILED whose trial Optuna recorded as complete (or
        the reverse), leave one with nothing but its name (opened, never filled), or never write it. Each run
        named in `want` gets Optuna's status and whatever of its headline metrics, params and tags it lacks;
        a missing run is created from them (tagged `foldsweep.backfilled`: its per-epoch curves are gone),
        failed trials included, so every trial Optuna knows has its run; any other run still RUNNING is FAILED.
        """
        runs: dict[str, list[Any]] = {}
        for run in self._runs_under(parent):
            runs.setdefault(run.info.run_name, []).append(run)
        created = 0
        moved: dict[str, str] = {}
        for name, trial in want.items():
            found = runs.pop(name, [])
            if not found:
                found_id = self._backfill(parent, name, trial)
                created += 1
            else:
                found_id = next((r.info.run_id for r in found if r.info.run_id == trial.run_id), found[0].info.run_id)
            if found_id != trial.run_id:
                moved[name] = str(found_id)
            for run in found:
                self._agree(run, trial)
        for left in runs.values():
            for run in left:
                if run.info.status == "RUNNING":
                    _retry(partial(self.client.set_terminated, run.info.run_id, "FAILED"))
        return Reconciled(created, moved)

    def _backfill(self, parent: str, name: str, trial: TrialRun) -> str:
        """A trial's run made from Optuna's record alone (a kill or a full disk lost it, or it was never made)."""
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags={PARENT: parent}))
        run_id = str(run.info.run_id)
        self._write(run_id, trial.metrics, trial.params, {**trial.tags, "foldsweep.backfilled": "true"}, {})
        _retry(partial(self.client.set_terminated, run_id, trial.status))
        return run_id

    def _agree(self, run: Any, trial: TrialRun) -> None:
        """Add what the run lacks of Optuna's record (a param is never changed, only added), then its status."""
        data = run.data
        metrics = {k: v for k, v in trial.metrics.items() if k not in data.metrics}
        params = {k: v for k, v in trial.params.items() if k not in data.params}
        tags = {k: v for k, v in trial.tags.items() if data.tags.get(k) != short(v, TAG_LIMIT)}
        if metrics or params or tags:
            self._write(run.info.run_id, metrics, params, tags, {})
        if run.info.status != trial.status:
            _retry(partial(self.client.set_terminated, run.info.run_id, trial.status))

    def _runs_under(self, parent: str) -> list[Any]:
        """Every run whose parent is `parent`, page by page (a study can have thousands of trials)."""
        found: list[Any] = []
        token = None
        while True:
            page = _retry(partial(self.client.search_runs, [self.experiment_id], f"tags.`{PARENT}` = '{parent}'",
                                  max_results=5000, page_token=token))
            found += list(page)
            token = page.token
            if not token:
                return found

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

        run_tags = {**provenance_tags(), **tags, **({PARENT: parent} if parent else {})}
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=run_tags))
        run_id = str(run.info.run_id)
        self._write(run_id, {}, params, {}, {})
        example = np.zeros((2, n_inputs), dtype=np.float32)
        with use_tracking_uri(self.tracking_uri), mlflow.start_run(  # fluent log_model reads the global URI
                run_id=run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pt2",
                                            pip_requirements=[f"torch=={torch.__version__}"])
        return {"run_id": run_id, "model_uri": info.model_uri, "tracking_uri": self.tracking_uri}

    def _reopen(self, run_id: str, name: str) -> bool:
        """Mark a known run RUNNING again; False if this store has no such run (it was deleted or replaced)."""
        from mlflow.exceptions import MlflowException

        try:
            run = _retry(lambda: self.client.get_run(run_id))
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.recreated.append(name)
            return False
        if run.info.experiment_id != self.experiment_id:  # a replaced store reusing the id: not ours
            self.recreated.append(name)
            return False
        _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        return True

    def _write(self, run_id: str, metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str],
               curves: dict[str, np.ndarray]) -> None:
        """Everything in as few `log_batch` calls as MLflow's per-call limits allow."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
        for key, values in curves.items():
            rows += [Metric(key, float(v), now, step) for step, v in enumerate(values, start=1) if np.isfinite(v)]
        param_rows = [Param(k, short(v)) for k, v in params.items()]
        tag_rows = [RunTag(k, short(v, TAG_LIMIT)) for k, v in tags.items()]
        batches = max(-(-len(rows) // MAX_METRICS), -(-len(param_rows) // MAX_PARAMS), -(-len(tag_rows) // MAX_TAGS))
        for b in range(batches):
            chunk = (rows[b * MAX_METRICS : (b + 1) * MAX_METRICS], param_rows[b * MAX_PARAMS : (b + 1) * MAX_PARAMS],
                     tag_rows[b * MAX_TAGS : (b + 1) * MAX_TAGS])
            _retry(partial(self.client.log_batch, run_id, metrics=chunk[0], params=chunk[1], tags=chunk[2]))


def short(value: Any, limit: int = 500) -> str:
    """A param or tag value as MLflow takes it: text, cut to its length limit."""
    import json

    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:limit]


def _quiet_reraised_errors() -> None:
    """MLflow logs each database error it re-raises with a full traceback (a full disk gave 24); the error
    itself still reaches us and ends as one line, so these loggers only speak when it is critical."""
    for name in ("mlflow.store.db.utils", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
