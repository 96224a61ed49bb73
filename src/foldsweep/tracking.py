"""MLflow behind one small seam: sweep run -> study runs -> trial runs, written in batches.

A trial's run is created and filled when the trial ends (one create, a few `log_batch` calls, one
terminate), so tracking costs a handful of calls per trial whatever the number of epochs and folds.
`NullTracker` stands in when tracking is off.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from foldsweep.spec import TrackingSpec

T = TypeVar("T")
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
PARENT, RUN_NAME = "mlflow.parentRunId", "mlflow.runName"


class NullTracker:
    """Tracking switched off: every call succeeds and records nothing."""

    enabled = False
    tracking_uri = ""
    experiment_id = ""

    def sweep_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        return ""

    def study_run(self, sweep_run_id: str, study: str, run_id: str | None) -> str:
        return ""

    def log_trial(self, parent: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                  curves: dict[str, np.ndarray], tags: dict[str, str], status: str, start: float) -> str:
        return ""

    def log_values(self, run_id: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        return None

    def log_files(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        return None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        return None

    def fail_running(self, parent: str) -> int:
        return 0


class MlflowTracker(NullTracker):
    enabled = True

    def __init__(self, spec: TrackingSpec, sweep_name: str) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        from mlflow import MlflowClient

        self.tracking_uri = _absolute_sqlite(spec.uri)
        _ensure_sqlite_folder(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        name = spec.experiment or sweep_name
        experiment = _retry(lambda: self.client.get_experiment_by_name(name))
        if experiment is None:
            artifacts = Path(spec.artifact_location).resolve().as_uri() if "://" not in spec.artifact_location \
                else spec.artifact_location
            self.experiment_id = _retry(lambda: self.client.create_experiment(
                name, artifact_location=f"{artifacts}/{name}",
                tags={"mlflow.experimentKind": "custom_model_development"}))
        else:
            self.experiment_id = experiment.experiment_id

    def sweep_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        if run_id:
            self._reopen(run_id)
            return run_id
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags))
        return run.info.run_id

    def study_run(self, sweep_run_id: str, study: str, run_id: str | None) -> str:
        if run_id:
            self._reopen(run_id)
            return run_id
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=study,
                                                    tags={PARENT: sweep_run_id, "foldsweep.study": study}))
        return run.info.run_id

    def log_trial(self, parent: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                  curves: dict[str, np.ndarray], tags: dict[str, str], status: str, start: float) -> str:
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name, start_time=int(start * 1000),
                                                    tags={PARENT: parent, **tags}))
        run_id = run.info.run_id
        self._write(run_id, metrics, params, {}, curves)
        _retry(lambda: self.client.set_terminated(run_id, status))
        return str(run_id)

    def log_values(self, run_id: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        self._write(run_id, metrics, params or {}, tags or {}, {})

    def log_files(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        """Each (file, folder inside the run's artifacts; "" for the top)."""
        for path, folder in files:
            _retry(lambda p=path, f=folder: self.client.log_artifact(run_id, str(p), artifact_path=f or None))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        if run_id:
            _retry(lambda: self.client.set_terminated(run_id, status))

    def fail_running(self, parent: str) -> int:
        """Mark runs left RUNNING under `parent` by a killed process as FAILED; returns how many."""
        runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT}` = '{parent}' and "
                                       "attributes.status = 'RUNNING'")
        for run in runs:
            self.finish(run.info.run_id, "FAILED")
        return len(runs)

    def _reopen(self, run_id: str) -> None:
        _retry(lambda: self.client.update_run(run_id, status="RUNNING"))

    def _write(self, run_id: str, metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str],
               curves: dict[str, np.ndarray]) -> None:
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
            _retry(lambda c=chunk: self.client.log_batch(run_id, metrics=c[0], params=c[1], tags=c[2]))


def make_tracker(spec: TrackingSpec, sweep_name: str) -> NullTracker:
    return MlflowTracker(spec, sweep_name) if spec.enabled else NullTracker()


def _short(value: Any, limit: int = 500) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:limit]


def _absolute_sqlite(uri: str) -> str:
    """A relative sqlite path is pinned to the current folder so worker processes all hit one file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _ensure_sqlite_folder(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


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

