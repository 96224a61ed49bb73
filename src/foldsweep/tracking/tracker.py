"""The tracker the sweep talks to: `MlflowTracker` when tracking is on, `NullTracker` when it is off.

Both have the same methods, so callers never test whether tracking is enabled. The sweep run and
study runs are written here, in the calling process; trial runs go through the writer process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from foldsweep.crash import crash_point
from foldsweep.errors import FoldsweepError
from foldsweep.spec import TrackingSpec
from foldsweep.tracking.provenance import _start_monitor, _stop_monitor, provenance_tags
from foldsweep.tracking.store import _absolute_sqlite, _retry, _write_ahead_log, create_store, open_experiment
from foldsweep.tracking.writer import PARENT, _short, _TrialWriter, _write_rows

if TYPE_CHECKING:
    import torch  # imported where a model is logged: the MLflow writer process must start light


@dataclass(frozen=True)
class TrialRun:
    """What a trial's run must say, taken from Optuna (the record of truth): its status and headline rows."""

    status: str  # FINISHED | KILLED | FAILED
    metrics: dict[str, float]
    params: dict[str, Any]
    tags: dict[str, str]


class NullTracker:
    """Tracking switched off: every call succeeds and records nothing."""

    enabled = False
    tracking_uri = ""
    experiment_id = ""
    recreated: list[str] = []  # noqa: RUF012 (never changed: nothing is tracked)

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

    def reconcile(self, parent: str, want: dict[str, TrialRun]) -> int:
        return 0

    def log_step(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        return None

    def log_model(self, parent: str, name: str, model: torch.nn.Module, n_inputs: int, params: dict[str, Any],
                  tags: dict[str, str]) -> dict[str, str]:
        return {}


class MlflowTracker(NullTracker):
    enabled = True

    def __init__(self, spec: TrackingSpec, sweep_name: str) -> None:
        self.tracking_uri = _absolute_sqlite(spec.uri)
        self._writer: _TrialWriter | None = _TrialWriter(self.tracking_uri)  # imports MLflow while we do
        from mlflow import MlflowClient

        # after the import: importing mlflow configures its loggers at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        _quiet_reraised_errors()

        self.system_metrics = spec.system_metrics
        self._monitors: dict[str, Any] = {}
        self._sweep_run = ""
        self.recreated: list[str] = []  # runs the store had lost (deleted or replaced), made again
        create_store(self.tracking_uri)  # under a lock: two sweeps starting at once must not both migrate it
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        _write_ahead_log(self.tracking_uri)
        self.experiment_id = open_experiment(self.client, spec.experiment or sweep_name, spec.artifact_location)
        self._writer.experiment(self.experiment_id)

    def sweep_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        """The sweep's run (created with provenance tags, or reopened on resume), watched by system metrics."""
        resumed = bool(run_id) and self._reopen(run_id or "", name)
        if not resumed or not run_id:
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name,
                                                        tags={**provenance_tags(), **tags}))
            run_id = str(run.info.run_id)
        self._sweep_run = run_id
        if self.system_metrics:
            self._monitors[run_id] = _start_monitor(run_id, self.tracking_uri, resumed)
        return run_id

    def study_run(self, sweep_run_id: str, study: str, run_id: str | None) -> str:
        if run_id and self._reopen(run_id, study):
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
        crash_point("mlflow")  # the run is written, Optuna not yet told: where a kill hurts most
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
            self._writer = _TrialWriter(self.tracking_uri)
            self._writer.experiment(self.experiment_id)
        return self._writer

    def _report(self, errors: list[str], strict: bool) -> None:
        if errors and strict:
            raise FoldsweepError(f"MLflow could not write {len(errors)} trial run(s); first: {errors[0]}")
        for error in errors:
            logging.getLogger(__name__).warning("a trial run was not fully written to MLflow: %s", error)

    def log_values(self, run_id: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        """Rows on a run. MLflow never changes a param: one whose value moved (an extended sweep's new best)
        is written as a tag of the same name instead, which the run page shows beside the first value."""
        params = params or {}
        logged = _retry(lambda: self.client.get_run(run_id)).data.params if params else {}
        moved = {k: _short(v) for k, v in params.items() if k in logged and logged[k] != _short(v)}
        self._write(run_id, metrics, {k: v for k, v in params.items() if k not in moved}, {**(tags or {}), **moved}, {})

    def log_files(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        """Each (file, folder inside the run's artifacts; "" for the top)."""
        for path, folder in files:
            _retry(partial(self.client.log_artifact, run_id, str(path), artifact_path=folder or None))

    def metric_histories(self, run_id: str, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(steps, values) of each logged curve, read back so plots need not keep every curve in memory."""
        self.flush()
        out = {}
        for key in keys:
            history = sorted(_retry(partial(self.client.get_metric_history, run_id, key)), key=lambda m: m.step)
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

    def reconcile(self, parent: str, want: dict[str, TrialRun]) -> int:
        """Make the trial runs under `parent` agree with Optuna; returns how many runs were created.

        A killed process can leave a run RUNNING, end one FAILED whose trial Optuna recorded as
        complete (or the reverse), or never write it. Each run named in `want` gets Optuna's status
        and, where missing, its headline metrics; a missing run of a finished trial is created from them
        (tagged `foldsweep.backfilled`: its per-epoch curves are gone); any other run still RUNNING is FAILED.
        """
        self.flush()
        runs: dict[str, list[Any]] = {}
        for run in self._runs_under(parent):
            runs.setdefault(run.info.run_name, []).append(run)
        created = 0
        for name, trial in want.items():
            found = runs.pop(name, [])
            if not found and trial.status != "FAILED":  # a failed trial that never got a run needs none
                run_id = str(_retry(lambda: self.client.create_run(self.experiment_id, run_name=name,  # noqa: B023
                                                                   tags={PARENT: parent})).info.run_id)
                self._write(run_id, trial.metrics, trial.params, {**trial.tags, "foldsweep.backfilled": "true"}, {})
                _retry(partial(self.client.set_terminated, run_id, trial.status))
                created += 1
            for run in found:
                self._agree(run, trial)
        for left in runs.values():
            for run in left:
                if run.info.status == "RUNNING":
                    _retry(partial(self.client.set_terminated, run.info.run_id, "FAILED"))
        return created

    def _agree(self, run: Any, trial: TrialRun) -> None:
        if run.info.status == trial.status and all(k in run.data.metrics for k in trial.metrics):
            return
        missing = {k: v for k, v in trial.metrics.items() if k not in run.data.metrics}
        params = {} if run.data.params else trial.params  # never written: the process died before the fill
        self._write(run.info.run_id, missing, params, {"foldsweep.state": trial.tags["foldsweep.state"]}, {})
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
        _write_rows(self.client, run_id, metrics, params, tags, curves)


def _quiet_reraised_errors() -> None:
    """MLflow logs each database error it re-raises with a full traceback (a full disk gave 24); the error
    itself still reaches us and ends as one line, so these loggers only speak when it is critical."""
    for name in ("mlflow.store.db.utils", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def make_tracker(spec: TrackingSpec, sweep_name: str) -> NullTracker:
    return MlflowTracker(spec, sweep_name) if spec.enabled else NullTracker()
