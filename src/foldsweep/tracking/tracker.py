"""The tracker the sweep talks to: `MlflowTracker` when tracking is on, `NullTracker` when it is off.

Both have the same methods, so callers never test whether tracking is enabled. Every run is written by
the writer process (`writer`, serving a `runs.RunStore`); this process never imports MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from foldsweep.crash import crash_point
from foldsweep.errors import FoldsweepError
from foldsweep.spec import TrackingSpec
from foldsweep.tracking.runs import Reconciled, TrialRun
from foldsweep.tracking.store import _absolute_sqlite
from foldsweep.tracking.writer import WriterProcess, take_writer

if TYPE_CHECKING:
    import torch  # imported where a model is logged: the MLflow writer process must start light

    from foldsweep.pictures import SweepPictures

__all__ = ["MlflowTracker", "NullTracker", "TrialRun", "make_tracker"]


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

    def log_report(self, run_id: str, texts: dict[str, str]) -> None:
        return None

    def log_pictures_later(self, run_id: str, pictures: SweepPictures, summary: dict[str, Any], folder: Path) -> None:
        return None

    def flush(self) -> None:
        return None

    def abandon(self, status: str) -> None:
        return None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        return None

    def close(self) -> None:
        return None

    def reconcile(self, parent: str, want: dict[str, TrialRun]) -> Reconciled:
        return Reconciled(0, {})

    def log_step(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        return None

    def log_model(self, parent: str, name: str, model: torch.nn.Module, n_inputs: int, params: dict[str, Any],
                  tags: dict[str, str]) -> dict[str, str]:
        return {}


class MlflowTracker(NullTracker):
    """Tracking on: every run is written by the writer process (see `writer`), so this process never imports
    MLflow; only `log_model` (a fitted network, which must not cross a pipe) opens a store here."""

    enabled = True

    def __init__(self, spec: TrackingSpec, sweep_name: str) -> None:
        self._spec = spec
        self._experiment = spec.experiment or sweep_name
        self._writer: WriterProcess | None = take_writer()
        described = self._writer.call("open", _absolute_sqlite(spec.uri), self._experiment, spec.artifact_location,
                                      spec.system_metrics)
        self.tracking_uri: str = described["tracking_uri"]
        self.experiment_id: str = described["experiment_id"]
        self._opened: dict[tuple[str, str], int] = {}  # trial runs asked for, by (parent, name): their tokens
        self._refused: list[str] = []  # trial runs the writer could not create, reported at the next flush
        self._hand_over = False  # True once the writer has work that outlives this process (the pictures)
        self._finished: set[str] = set()  # runs this tracker finished: a later failure or Ctrl-C leaves them be

    @property
    def recreated(self) -> list[str]:  # type: ignore[override]
        """Runs the store had lost (deleted or replaced) and the sweep made again."""
        described: dict[str, Any] = self._live().call("describe")
        return list(described["recreated"])

    def sweep_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        """The sweep's run (created with provenance tags, or reopened on resume), watched by system metrics."""
        return str(self._live().call("sweep_run", name, tags, run_id))

    def study_run(self, sweep_run_id: str, study: str, run_id: str | None) -> str:
        return str(self._live().call("study_run", sweep_run_id, study, run_id))

    def open_trial(self, parent: str, name: str, start: float) -> None:
        """Create a trial's run while the trial trains (RUNNING in the UI until told)."""
        if parent:
            self._opened[(parent, name)] = self._live().ask("open_trial", parent, name, start)

    def log_trial(self, parent: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                  curves: dict[str, np.ndarray], tags: dict[str, str], status: str, start: float) -> str:
        """The run id at once (the Optuna trial must name it before it is told); the rows follow in the background."""
        writer = self._live()
        token = self._opened.pop((parent, name), None)
        try:
            run_id = str(writer.answer(writer.ask("open_trial", parent, name, start) if token is None else token))
        except FoldsweepError as err:
            if not writer.alive():
                raise
            self._refused.append(f"open_trial {name}: {err}")
            run_id = ""
        if run_id:
            writer.post("fill_trial", run_id, metrics, params, tags, curves, status)
        crash_point("mlflow")  # the run is written, Optuna not yet told: where a kill hurts most
        return run_id

    def flush(self) -> None:
        """Wait until every trial run is written; a failed write raises here."""
        self._drain(None, strict=True)

    def abandon(self, status: str) -> None:
        """After an interruption: land what was sent, end the runs of trials never told with `status`.

        Never raises, so it cannot hide the interruption that got us here, and prints nothing: the interruption
        has its one line, and the rerun writes any run left incomplete from Optuna's record (`reconcile`).
        """
        self._drain(status, strict=False)

    def _drain(self, close_unlogged: str | None, strict: bool) -> None:
        if self._writer is None:
            return
        try:
            failures = self._refused + self._writer.flush(close_unlogged)
        except FoldsweepError as err:  # the writer process is gone
            failures = [str(err)]
        self._refused = []
        if failures and strict:
            raise FoldsweepError(f"the MLflow writer failed {len(failures)} time(s); first: {failures[0]}")
        if failures:  # an interrupted or failed sweep: its own line says why, and the rerun rewrites these runs
            logging.getLogger(__name__).debug("%d trial run(s) not fully written to MLflow before the sweep stopped "
                                              "(the rerun writes them from Optuna's record); first: %s",
                                              len(failures), failures[0])

    def log_values(self, run_id: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        """Rows on a run (a param whose value moved is written as a tag: see `RunStore.log_values`).

        Sent without waiting (a failure is raised by the next `flush`), so a refit is not held up by the
        pictures the writer is drawing meanwhile."""
        self._live().post("log_values", run_id, metrics, params, tags)

    def log_files(self, run_id: str, files: list[tuple[Path, str]]) -> None:
        """Each (file, folder inside the run's artifacts; "" for the top)."""
        self._live().call("log_files", run_id, files)

    def metric_histories(self, run_id: str, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(steps, values) of each logged curve, read back so plots need not keep every curve in memory."""
        self.flush()
        histories: dict[str, tuple[np.ndarray, np.ndarray]] = self._live().call("metric_histories", run_id, keys)
        return histories

    def log_report(self, run_id: str, texts: dict[str, str]) -> None:
        """The sweep's report on its run: `texts` as files of those names."""
        self._live().call("log_report", run_id, texts)

    def log_pictures_later(self, run_id: str, pictures: SweepPictures, summary: dict[str, Any], folder: Path) -> None:
        """The sweep's last request: the writer draws the pictures and logs them on `run_id` after this process
        has gone on (`close` then does not wait), with a note in the record folder `folder` until it has
        (see `pictures.PENDING`). Every run must be finished before: nothing after this is waited for."""
        from foldsweep.pictures import mark_pending

        writer = self._live()
        note = mark_pending(folder, writer.pid)
        writer.post("write_output_to", str(folder / "logs" / "pictures.log"))  # no longer the terminal's or a pipe's
        writer.post("log_pictures", run_id, pictures, summary, str(note))
        self._hand_over = True
        crash_point("pictures")  # every run finished, the pictures handed over: a Ctrl-C here ends nothing

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Land the trial runs sent so far, then close the run (its system metrics end with a last sample).

        A run finished once stays as it was: a Ctrl-C after the sweep's end (its pictures handed over) must not
        mark its complete runs KILLED, nor wait for the pictures to be drawn to do so."""
        if not run_id or self._writer is None or run_id in self._finished:
            return
        if status == "FINISHED":
            self.flush()
        else:  # after a failure, trials asked but never told end with the sweep's status
            self.abandon(status)
        self._writer.call("finish", run_id, status)
        self._finished.add(run_id)

    def close(self) -> None:
        """End the writer process once it has written everything it was sent; after `log_pictures_later`,
        let it finish on its own instead of waiting for it."""
        if self._writer is not None:
            self._writer.close(wait=not self._hand_over)
            self._writer = None

    def reconcile(self, parent: str, want: dict[str, TrialRun]) -> Reconciled:
        """Make the trial runs under `parent` agree with Optuna (see `RunStore.reconcile`)."""
        self.flush()
        reconciled: Reconciled = self._live().call("reconcile", parent, want)
        return reconciled

    def log_step(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        """Metrics at an explicit step (a test look's number), so every look stays in the metric's history."""
        self._live().call("log_step", run_id, metrics, step, tags)

    def log_model(self, parent: str, name: str, model: torch.nn.Module, n_inputs: int, params: dict[str, Any],
                  tags: dict[str, str]) -> dict[str, str]:
        """A run of its own holding the network as an MLflow PyTorch model (see `RunStore.log_model`)."""
        from foldsweep.tracking.runs import RunStore

        here = RunStore(self.tracking_uri, self._experiment, self._spec.artifact_location, system_metrics=False)
        return here.log_model(parent, name, model, n_inputs, params, tags)

    def _live(self) -> WriterProcess:
        if self._writer is None:
            raise FoldsweepError("the MLflow tracker was closed; nothing more can be written with it")
        return self._writer


def make_tracker(spec: TrackingSpec, sweep_name: str) -> NullTracker:
    return MlflowTracker(spec, sweep_name) if spec.enabled else NullTracker()
