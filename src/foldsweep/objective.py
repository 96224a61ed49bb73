"""One Optuna trial = every inner fold of one configuration, scored as the mean over folds.

The objective is split in three so that many trials can train as one batch: `trial_jobs` turns a
trial into fit jobs, a `Pruning` hook reports fold-mean curves to each trial while the batch trains,
and `outcome` turns the finished fits back into a value (or a pruned / failed state with its reason).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import optuna

from foldsweep.metrics import score
from foldsweep.spec import SweepSpec
from foldsweep.splits import Fold
from foldsweep.train import FitJob, FitResult

__all__ = ["Pruning", "TrialOutcome", "job_seed", "outcome", "trial_jobs"]


@dataclass
class TrialOutcome:
    """What a finished trial tells Optuna and MLflow."""

    state: str  # "complete" | "pruned" | "failed"
    value: float | None
    fold_scores: list[float]
    best_epochs: list[int]
    reason: str = ""
    results: list[FitResult] = field(default_factory=list, repr=False)
    infeasible: bool = False  # the configuration does not fit the device's memory

    @property
    def mean_best_epoch(self) -> int:
        return max(1, int(round(float(np.mean(self.best_epochs))))) if self.best_epochs else 1


def job_seed(sweep_seed: int, *parts: object) -> int:
    """A seed that depends only on what the fit is (sweep, study, trial, fold), never on batch order."""
    text = ":".join(str(p) for p in (sweep_seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def trial_jobs(config: SweepSpec, folds: list[Fold], seed_parts: tuple[object, ...]) -> list[FitJob]:
    return [FitJob(fold.train, fold.valid, config.model, config.train, job_seed(config.optuna.seed, *seed_parts, i))
            for i, fold in enumerate(folds)]


def outcome(results: list[FitResult], folds: list[Fold], y: np.ndarray, metric: str) -> TrialOutcome:
    """Mean fold score; a diverged fold fails the trial, a stopped one means it was pruned."""
    best_epochs = [r.best_epoch for r in results]
    diverged = [(i, r.diverged_at) for i, r in enumerate(results) if r.diverged_at]
    if diverged:
        fold, epoch = diverged[0]
        return TrialOutcome("failed", None, [], best_epochs, f"diverged: loss became NaN/inf at epoch {epoch} "
                            f"(fold {fold}); lower the learning rate", results=results)
    if any(r.stopped for r in results):
        epoch = max(r.epochs_run for r in results)
        return TrialOutcome("pruned", None, [], best_epochs, f"pruned at epoch {epoch}", results=results)
    scores = [score(metric, y[f.valid], r.valid_pred) for f, r in zip(folds, results)]
    return TrialOutcome("complete", float(np.mean(scores)), scores, best_epochs, results=results)


class Pruning:
    """Reports each trial's fold-mean validation metric to Optuna and stops the trials it prunes.

    Called by `fit_many` every `report_every` epochs with the curves of one batch group.
    """

    def __init__(self, trials: list[optuna.trial.Trial], owners: list[int], enabled: bool) -> None:
        self.trials = trials
        self.owners = owners  # job index -> index into `trials`
        self.enabled = enabled
        self.reported: dict[int, int] = {}
        self.pruned: set[int] = set()  # reported no more: a later report would claim epochs it never trained

    def __call__(self, job_ids: list[int], epoch: int, curves: np.ndarray) -> list[int]:
        if not self.enabled:
            return []
        by_trial: dict[int, list[int]] = {}
        for local, job in enumerate(job_ids):
            by_trial.setdefault(self.owners[job], []).append(local)
        stop: list[int] = []
        for t, rows in by_trial.items():
            value = _last_fold_mean(curves[rows])
            if value is None or t in self.pruned or self.reported.get(t, -1) >= epoch:  # a retry repeats epochs
                continue
            trial = self.trials[t]
            trial.report(value, epoch)
            self.reported[t] = epoch
            if trial.should_prune():
                self.pruned.add(t)
                stop.extend(job_ids[r] for r in rows)
        return stop


def _last_fold_mean(curves: np.ndarray) -> float | None:
    """Fold mean at the latest epoch, each stopped fold contributing its last value."""
    last = []
    for row in curves:
        seen = row[~np.isnan(row)]
        if len(seen):
            last.append(seen[-1])
    return float(np.mean(last)) if last else None

