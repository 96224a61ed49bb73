"""What a sweep's pictures are drawn from, as plain data that can cross to another process.

The MLflow writer process draws the study pictures while the sweep refits (see `tracking.writer`), so
the sweep never imports matplotlib and its end does not wait for the drawing. This module is what both
sides share, and so imports nothing heavy: the trials are Optuna's own `FrozenTrial`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from optuna.trial import TrialState

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from foldsweep.studies import StudyRef

__all__ = ["BestTrial", "SweepPictures", "sweep_pictures"]


@dataclass(frozen=True)
class BestTrial:
    """Where a study's best trial's curves are: its MLflow run, its folds, and the epoch each fold kept."""

    title: str
    run_id: str
    folds: int
    best_epochs: list[int]


@dataclass(frozen=True)
class SweepPictures:
    """Each study's (key, direction, trials), the searched knobs, the metric's name, each study's best trial."""

    studies: list[tuple[str, str, list[FrozenTrial]]]
    knobs: list[str]
    metric: str
    best: list[BestTrial]


def sweep_pictures(studies: list[StudyRef], knobs: list[str], metric: str) -> SweepPictures:
    """The studies' trials as they stand, and where each best trial's curves were logged."""
    best = []
    for ref in studies:
        if not ref.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            continue
        trial = ref.study.best_trial
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            best.append(BestTrial(f"{ref.key}: trial {trial.number} ({metric} {trial.value:.4f})", run_id,
                                  len(ref.folds), list(trial.user_attrs.get("best_epochs", []))))
    return SweepPictures([(ref.key, ref.study.direction.name.lower(), ref.study.get_trials(deepcopy=False))
                          for ref in studies], knobs, metric, best)
