"""The outer loop of nested CV, once the search is done.

The inner searches only rank configurations; their scores are optimistic because they picked the
winner. So the final study is warm-started from the outer bests (each a good configuration found on
other rows), each outer study's best is refit once on its outer-train rows and scored once on its
untouched outer-test rows, and those outer-test scores, not the inner ones, make the nested estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from foldsweep.crash import crash_point
from foldsweep.errors import SweepFailed
from foldsweep.metrics import score, score_se
from foldsweep.objective import job_seed
from foldsweep.splits import sealed_rows_seen, seen_note
from foldsweep.studies import StudyRef, best_trial, plateau_replay, refit_epochs, slot_order, study_done
from foldsweep.sweep import Sweep
from foldsweep.train import FitJob, FitResult, fit_many

__all__ = ["INTERVAL", "METRIC_RANGE", "IntervalErrors", "Z95", "fallback_note", "holdout_ratio", "interval_errors",
           "nested_interval", "refit_job", "refit_outer", "summarize", "warm_start_final", "within_range"]

INTERVAL = ("95% normal: mean ± 1.96 · max(per-row SE of the pooled outer-test score, Nadeau-Bengio corrected SE "
            "of the outer-fold scores)")
Z95 = 1.959963984540054  # the normal 0.975 quantile
METRIC_RANGE = {"accuracy": (0.0, 1.0), "roc_auc": (0.0, 1.0), "f1_macro": (0.0, 1.0), "log_loss": (0.0, math.inf),
                "rmse": (0.0, math.inf), "mae": (0.0, math.inf), "r2": (-math.inf, 1.0)}


def warm_start_final(sweep: Sweep) -> None:
    """Enqueue the outer bests into `final` once every outer study is done (never into a sibling).

    All or nothing: each enqueue is one journal record, and a kill can fall between two. So `final` is
    marked `warm_started` (which frees the slots `Sweep.budget` holds for the outer bests) only after the
    last one; a rerun finds no mark, enqueues exactly the outer bests `final` does not hold yet (by their
    `warm_start_from`), in the same order and before any more trial is asked, and every slot gets the
    configuration an uninterrupted run gave it (a partial warm start would leave the other slots to fresh
    samples, and the final configuration could change with nothing flagged).
    """
    final = sweep.study("final")
    if not sweep.spec.optuna.warm_start_final or final.study.user_attrs.get("warm_started"):
        return
    outer = [ref for ref in sweep.studies if ref.key != "final"]
    if not all(study_done(ref, sweep.n_trials) for ref in outer):
        return
    queued = {t.user_attrs["warm_start_from"] for t in final.study.get_trials(deepcopy=False)
              if "warm_start_from" in t.user_attrs}
    for key, params in _warm_starts(outer, min(len(outer), sweep.n_trials - 1)):
        if key not in queued:
            final.study.enqueue_trial(params, user_attrs={"warm_start_from": key})
            crash_point("warm_start")
    final.study.set_user_attr("warm_started", True)


def _warm_starts(outer: list[StudyRef], limit: int) -> list[tuple[str, dict[str, Any]]]:
    """The outer bests `final` starts from, in study order: each configuration once, at most `limit`."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    for ref in outer:
        best = best_trial(ref)
        if best is not None and len(chosen) < limit and all(best.params != params for _, params in chosen):
            chosen.append((ref.key, best.params))
    return chosen


def refit_outer(sweep: Sweep) -> list[dict[str, Any]]:
    """Each outer best, trained on its whole outer-train for `refit_epochs`, scored once on outer-test.

    A refit that diverges (NaN/inf loss) would score its NaN predictions as if they were a model's, so
    it is never scored: the study's next-best finished trial is refit instead, and the fallback is
    recorded on the refit (report, summary, MLflow). A study whose every finished trial diverges stops
    the sweep.
    """
    pending = [(i, ref) for i, ref in enumerate(sweep.studies[:-1]) if _stale_refit(ref)]
    ranked = {i: _ranked(sweep, ref) for i, ref in pending}
    diverged: dict[int, list[dict[str, int]]] = {i: [] for i, _ in pending}
    while pending:
        jobs = [refit_job(sweep, i, ref, ranked[i][0]) for i, ref in pending]
        results = fit_many(sweep.X, sweep.y, jobs, sweep.data.n_classes, sweep.data.metric,
                           cuda_graphs=sweep.spec.resources.cuda_graphs)
        retry = []
        for (i, ref), job, result in zip(pending, jobs, results):
            trial = ranked[i].pop(0)
            if result.diverged_at:
                diverged[i].append({"trial": trial.number, "epoch": int(result.diverged_at)})
                if not ranked[i]:
                    raise SweepFailed(f"every finished trial of study {ref.key} diverged when refit on its "
                                      "outer-train rows (loss NaN/inf); lower the learning-rate range")
                retry.append((i, ref))
                continue
            _record_refit(sweep, ref, trial, job, result, diverged[i])
        pending = retry
    return [ref.study.user_attrs["refit"] for ref in sweep.studies[:-1]]


def refit_job(sweep: Sweep, i: int, ref: StudyRef, trial: optuna.trial.FrozenTrial) -> FitJob:
    """Outer fold i's training rows (every one, nothing else), a fixed epoch count and the plateau cuts its
    inner fits made on the way (`plateau_replay`), scored on its test rows (which choose nothing)."""
    config = sweep.spec.with_params(trial.params)
    fold = sweep.plan.outer[i]
    seed = job_seed(sweep.spec.optuna.seed, ref.key, "refit")
    epochs = refit_epochs(trial, config.train.epochs, ref.folds, len(fold.train))
    replay = plateau_replay(trial, epochs, config.train.gamma) if config.train.lr_schedule == "plateau" else None
    return FitJob(fold.train, fold.valid, config.model, config.train, seed, fixed_epochs=epochs, plateau_factors=replay)


def _ranked(sweep: Sweep, ref: StudyRef) -> list[optuna.trial.FrozenTrial]:
    """Finished trials best first (ties by slot, as `best_trial`): a diverged refit's fallbacks."""
    complete = ref.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise SweepFailed(f"study {ref.key} has no finished trial; see `foldsweep status {sweep.spec.name}`")
    sign = -1.0 if sweep.data.maximize else 1.0
    return sorted(complete, key=lambda t: (sign * float(t.value if t.value is not None else math.nan), *slot_order(t)))


def _record_refit(sweep: Sweep, ref: StudyRef, trial: optuna.trial.FrozenTrial, job: FitJob, result: FitResult,
                  diverged: list[dict[str, int]]) -> None:
    assert trial.value is not None
    y_test = sweep.data.y[job.valid_rows]
    test_score = score(sweep.data.metric, y_test, result.valid_pred)
    test_se = score_se(sweep.data.metric, y_test, result.valid_pred)
    optimism = _optimism(trial.value, test_score, sweep.data.maximize)
    epochs = job.fixed_epochs or 0  # always set on a refit job
    refit = {"outer_test_score": test_score, "outer_test_se": test_se, "best_inner_value": trial.value,
             "best_trial": trial.number, "params": trial.params, "epochs": epochs, "optimism": optimism,
             "diverged": diverged}
    ref.study.set_user_attr("refit", refit)  # stored before anything else: never refit twice
    crash_point("refit")  # recorded in the study, not yet on its MLflow run nor in the summary
    metrics = {"outer_test_score": test_score, "best_inner_value": trial.value, "optimism": optimism,
               "refit_epochs": float(epochs), "refit_fallbacks": float(len(diverged))}
    tags = {"best_trial": str(trial.number)}
    if diverged:
        tags["refit_fallback"] = fallback_note(ref.key, refit)
    sweep.tracker.log_values(ref.study.user_attrs.get("mlflow_run_id", ""), metrics, tags=tags)


def fallback_note(key: str, refit: dict[str, Any]) -> str:
    """What a diverged refit led to, in one line (report, MLflow tag)."""
    gone = ", ".join(f"trial {d['trial']} (NaN/inf at epoch {d['epoch']})" for d in refit.get("diverged", []))
    return f"{key}: refit of {gone} diverged; its next-best trial {refit['best_trial']} was refit and scored instead"


def _stale_refit(ref: StudyRef) -> bool:
    """Not refit yet, or refit before more trials (an extended sweep) found a better configuration."""
    refit = ref.study.user_attrs.get("refit")
    best = best_trial(ref)
    return refit is None or (best is not None and refit["best_trial"] != best.number)


def summarize(sweep: Sweep, refits: list[dict[str, Any]]) -> dict[str, Any]:
    """The nested estimate: the outer-test scores' mean with an interval that allows for their correlation
    and for the sampling of the outer-test rows (`nested_interval`), the mean optimism, and `final`'s best
    as the configuration to export."""
    scores = np.array([r["outer_test_score"] for r in refits])
    row_se = np.array([r.get("outer_test_se", math.nan) for r in refits])  # a refit recorded before it: no floor
    final = best_trial(sweep.study("final"))
    if final is None:
        raise SweepFailed("study final has no finished trial; the sweep has no configuration to export")
    mean = float(scores.mean())
    std = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    errors = interval_errors(scores, holdout_ratio(sweep), row_se, repeats=sweep.spec.split.outer.repeats)
    low, high = within_range(sweep.data.metric, *nested_interval(mean, errors))
    seen = sealed_rows_seen(sweep.data, sweep.plan.dev, sweep.plan.test)
    return {
        "sweep": sweep.spec.name, "metric": sweep.data.metric,
        "direction": "maximize" if sweep.data.maximize else "minimize",
        "nested": {"mean": mean, "std": std, "ci95": [low, high], "interval": INTERVAL, "outer": scores.tolist(),
                   "se": errors.se, "se_rows": errors.rows, "se_between": errors.between},
        "final": {"best_params": final.params, "best_value": final.value, "best_trial": final.number,
                  "best_epoch": refit_epochs(final, sweep.spec.with_params(final.params).train.epochs,
                                             sweep.plan.final_inner, len(sweep.plan.dev))},
        "optimism": float(np.mean([r["optimism"] for r in refits])),
        "outer_refits": refits,
        "refit_fallbacks": [fallback_note(f"outer-{i}", r) for i, r in enumerate(refits) if r.get("diverged")],
        "sealed_test": seen | {"note": seen_note(seen)},
        "epochs_trained": _epochs_trained(sweep, refits),
    }


@dataclass(frozen=True)
class IntervalErrors:
    """The two standard errors of the nested estimate and the one the interval uses (the larger)."""

    rows: float  # the outer-test rows' own sampling: the pooled outer-test score's per-row SE
    between: float  # the outer-fold scores' spread, Nadeau-Bengio corrected for their overlap

    @property
    def se(self) -> float:
        return max(self.rows, self.between)


def interval_errors(scores: np.ndarray, test_train: float, row_se: np.ndarray, *, repeats: int = 1) -> IntervalErrors:
    """The per-row and the between-fold standard error of the mean outer-test score.

    Per row: each repeat's k outer folds score every development row once, so the mean over a repeat is
    a mean over all development rows and its sampling variance is mean(se_j^2) / k (for accuracy
    p(1-p)/n_dev). Repeats score the same rows again, so they do not shrink it. It is never zero while
    the scores are not all 0 or all 1 (three outer scores that tie still came from a finite sample).

    Between folds: the Nadeau-Bengio corrected variance `(1/n + n_test/n_train) * s^2` of the n outer
    scores (Nadeau & Bengio 2003, Machine Learning 52): the outer folds train on overlapping rows and
    repeats reuse them, so the scores are positively correlated and `s^2 / n` would be too small. It
    carries what the per-row term misses (how much the fitted model, and the search's pick, change with
    the training rows), but from 3 outer scores it is itself a rough estimate, zero when they tie.

    `s^2` already holds each score's own sampling error, so the two are not added; the interval takes the
    larger (`IntervalErrors.se`). Missing per-row errors (NaN: a refit recorded before they were) count
    as no floor.
    """
    n = len(scores)
    known = row_se[np.isfinite(row_se)]
    folds_per_repeat = max(1, n // max(1, repeats))
    rows = math.sqrt(float(np.mean(known**2)) / folds_per_repeat) if len(known) else 0.0
    between = math.sqrt((1.0 / n + test_train) * float(np.var(scores, ddof=1))) if n > 1 else 0.0
    return IntervalErrors(rows=rows, between=between)


def nested_interval(mean: float, errors: IntervalErrors) -> tuple[float, float]:
    """95% interval for the procedure's score: mean ± 1.96 · the larger of the two standard errors.

    A normal quantile, not Student's t with n - 1 = 2 degrees of freedom (t = 4.30 at 3 outer folds):
    the per-row term is estimated from every development row and its floor keeps the interval from
    resting on the spread of 3 numbers alone; what this gives up is measured in docs/coverage.md
    (coverage of the procedure's expected score and of the shipped model's score on fresh rows).
    """
    half = Z95 * errors.se
    return mean - half, mean + half


def within_range(metric: str, low: float, high: float) -> tuple[float, float]:
    """The interval cut to the values the metric can take (accuracy 0..1, rmse >= 0, r2 <= 1): with few outer
    folds the interval can reach past them, and a bound no score can reach says nothing."""
    floor, ceiling = METRIC_RANGE.get(metric, (-math.inf, math.inf))
    return max(low, floor), min(high, ceiling)


def holdout_ratio(sweep: Sweep) -> float:
    """Mean outer-test rows over mean outer-train rows: the correlation term of the interval."""
    folds = sweep.plan.outer
    return float(np.mean([len(f.valid) for f in folds]) / np.mean([len(f.train) for f in folds]))


def _epochs_trained(sweep: Sweep, refits: list[dict[str, Any]]) -> int:
    """Fold-model epochs the sweep trained: every trial's folds (pruned and failed ones too) and the refits."""
    trials = sum(int(t.user_attrs.get("epochs_trained", 0)) for ref in sweep.studies
                 for t in ref.study.get_trials(deepcopy=False))
    return trials + sum(int(r["epochs"]) for r in refits)


def _optimism(inner: float, outer: float, maximize: bool) -> float:
    """How much better the search's own score looked than the untouched outer-test score (positive = flattered)."""
    return inner - outer if maximize else outer - inner

