"""A sweep's Optuna studies as the commands that only read them see them: `status`, `report`, `export`.

Kept apart from `sweep` (the training loop), so reading a sweep never imports torch or MLflow: those
commands answer in a fraction of the seconds the imports would take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from foldsweep.errors import FoldsweepError
from foldsweep.record import SweepRecord
from foldsweep.splits import Fold
from foldsweep.storage import LOST, SLOT, preflight

__all__ = ["FINISHED", "IN_FLIGHT", "TRIAL_RUNS", "StudyRef", "best_trial", "holders", "open_existing",
           "plateau_replay", "refit_epochs", "replayed_factors", "slot_order", "study_done", "study_status",
           "trial_run_id"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
IN_FLIGHT = (TrialState.RUNNING, TrialState.WAITING)
TRIAL_RUNS = "mlflow_trial_runs"  # study attribute: trial number -> its run, where the trial names another


@dataclass
class StudyRef:
    key: str  # "outer-0", ..., "final"
    study: optuna.Study
    folds: list[Fold]
    seed_offset: int

    def counts(self) -> dict[str, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {
            "finished": sum(t.state in FINISHED for t in trials),
            "in_flight": sum(t.state in IN_FLIGHT for t in trials),
            "waiting": sum(t.state == TrialState.WAITING for t in trials),
            "failed": sum(t.state == TrialState.FAIL and not t.user_attrs.get(LOST) for t in trials),
            "lost": sum(t.state == TrialState.FAIL and bool(t.user_attrs.get(LOST)) for t in trials),
        }


def open_existing(name: str) -> tuple[SweepRecord, list[StudyRef]]:
    """Studies of a recorded sweep, for `status`, `export` and `report` (no data, no training)."""
    record = SweepRecord.open(name)
    storage = preflight(record.meta["storage"], 1)
    plan = record.plan
    keys = [(f"outer-{i}", plan.inner[i], i) for i in range(len(plan.outer))] + [("final", plan.final_inner, 1000)]
    try:
        refs = [StudyRef(key, optuna.load_study(study_name=f"{name}/{key}", storage=storage), folds, offset)
                for key, folds, offset in keys]
    except KeyError:
        raise FoldsweepError(f"sweep `{name}` has no studies in `{record.meta['storage']}` yet") from None
    return record, refs


def holders(studies: list[StudyRef]) -> list[dict[str, Any]]:
    """Who runs what right now: each worker holding RUNNING trials, with its device and those trials."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for ref in studies:
        for trial in ref.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            who = trial.user_attrs.get("worker") or {}
            key = (str(who.get("host", "?")), str(who.get("name", "?")))
            entry = found.setdefault(key, {"worker": key[1], "host": key[0], "device": who.get("device", "?"),
                                           "trials": []})
            entry["trials"].append(f"{ref.key}#{trial.number}")
    return sorted(found.values(), key=lambda e: (e["host"], e["worker"]))


def study_status(sweep_studies: list[StudyRef], n_trials: int) -> list[dict[str, Any]]:
    rows = []
    for ref in sweep_studies:
        counts = ref.counts()
        best = best_trial(ref)
        rows.append({"study": ref.key, **counts, "n_trials": n_trials,
                     "best": best.value if best is not None else None,
                     "refit": ref.study.user_attrs.get("refit")})
    return rows


def best_trial(ref: StudyRef | optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial; of equal values (common with accuracy), the one in the lowest slot.

    Optuna's own choice among ties (`study.best_trial`) follows trial numbers, which a retried trial
    changes, so a resumed sweep could refit and warm-start from another configuration than an
    uninterrupted one. The one rule for every reader (outer refits, summary, export, report, pictures),
    so the configuration summarised is the one exported, fit and tested.
    """
    study = ref.study if isinstance(ref, StudyRef) else ref
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return min(complete, key=lambda t: (sign * float(t.value or 0.0), *slot_order(t)))


def trial_run_id(ref: StudyRef | optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """The MLflow run holding the trial now ("" if none): the one rule for every reader of a trial's run.

    A trial names its run in `mlflow_run_id` when told, and a told trial can no longer change; when its
    run is made again (the store deleted, or the run never written), the study links the new one instead
    (`TRIAL_RUNS`, kept by `sweep.reconcile_runs`).
    """
    study = ref.study if isinstance(ref, StudyRef) else ref
    linked = study.user_attrs.get(TRIAL_RUNS, {}).get(str(trial.number))
    return str(linked or trial.user_attrs.get("mlflow_run_id", ""))


def slot_order(trial: optuna.trial.FrozenTrial) -> tuple[int, int]:
    """Sort key: slot, then trial number (a trial asked before slots were recorded stands in its number)."""
    return int(trial.user_attrs.get(SLOT, trial.number)), trial.number


def study_done(ref: StudyRef, n_trials: int) -> bool:
    counts = ref.counts()
    return counts["in_flight"] == 0 and (counts["finished"] >= n_trials or counts["failed"] >= n_trials)


def refit_epochs(trial: optuna.trial.FrozenTrial, budget: int, search_folds: list[Fold], refit_rows: int) -> int:
    """How long a refit on more rows trains: the one rule for the outer refits, `fit` and `test`.

    The search stopped each inner fold at its best validation-loss epoch; a refit has no validation
    rows, so it trains for the mean of those epochs scaled by how many more rows it has (k/(k-1) for
    k inner folds), at most the configured `budget`. `benchmarks/bench_refit.py` compared this with the
    unscaled mean, the best-metric epoch (scaled or not) and the whole budget on sonar, breast_cancer
    and wine: the scaled best-loss epoch scored best or level on outer-test rows (docs/statistics.md, "Refit length").
    """
    mean_best = trial.user_attrs.get("mean_best_epoch")
    if mean_best is None:
        return budget
    scale = refit_rows / float(np.mean([len(fold.train) for fold in search_folds]))
    return int(min(budget, max(1, round(float(mean_best) * scale))))


def plateau_replay(trial: optuna.trial.FrozenTrial, epochs: int, gamma: float) -> tuple[float, ...] | None:
    """The plateau factor of each of a refit's `epochs` (`FitJob.plateau_factors`), from the inner fits' cuts.

    A refit watches no rows for a plateau (its every epoch counts as improved: the rule would never cut),
    yet its epoch count is the inner fits' best epoch stretched to more rows (`refit_epochs`), reached with
    the cuts they made on the way. So refit epoch e of E replays, for inner fold i that reached its best
    epoch b_i, that fold's factor at its epoch floor(e * b_i / E): the same share of its way, ending on the
    factor its best epoch trained with (cuts after the best came while it no longer improved). The folds
    are combined by the median of their counts of cuts, gamma ** median: one fold that plateaued early or
    late moves it little, and with an even fold count it is the geometric mean of the middle two.
    None where the fits recorded no cut (another schedule, none cut, or a sweep from before the record):
    the refit then keeps the factor 1, as its fits did.
    """
    return replayed_factors(trial.user_attrs.get("plateau_cuts"), trial.user_attrs.get("best_epochs"), epochs, gamma)


def replayed_factors(cuts: list[list[int]] | None, best_epochs: list[int] | None, epochs: int, gamma: float
                     ) -> tuple[float, ...] | None:
    """`plateau_replay` from the recorded cuts and best epochs themselves (an exported config carries them)."""
    if not cuts or not best_epochs or len(cuts) != len(best_epochs):
        return None
    epoch = np.arange(epochs)
    counts = [np.searchsorted(np.sort(fold), epoch * int(b) // epochs, side="right")
              for fold, b in zip(cuts, best_epochs)]
    return tuple(float(gamma ** n) for n in np.median(counts, axis=0))
