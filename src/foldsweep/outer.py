"""The outer loop of nested CV, once the search is done.

The inner searches only rank configurations; their scores are optimistic because they picked the
winner. So the final study is warm-started from the outer bests (each a good configuration found on
other rows), each outer study's best is refit once on its outer-train rows and scored once on its
untouched outer-test rows, and those outer-test scores, not the inner ones, make the nested estimate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from foldsweep.errors import SweepFailed
from foldsweep.metrics import score
from foldsweep.objective import job_seed
from foldsweep.sweep import StudyRef, Sweep, best_trial, study_done
from foldsweep.train import FitJob, fit_many


def warm_start_final(sweep: Sweep) -> None:
    """Enqueue the outer bests into `final` once every outer study is done (never into a sibling)."""
    final = sweep.study("final")
    if not sweep.spec.optuna.warm_start_final or final.study.user_attrs.get("warm_started"):
        return
    outer = [ref for ref in sweep.studies if ref.key != "final"]
    if not all(study_done(ref, sweep.n_trials) for ref in outer):
        return
    final.study.set_user_attr("warm_started", True)
    seen: list[dict[str, Any]] = []
    for ref in outer:
        best = best_trial(ref)
        if best is not None and best.params not in seen and len(seen) < min(len(outer), sweep.n_trials - 1):
            seen.append(best.params)
            final.study.enqueue_trial(best.params, user_attrs={"warm_start_from": ref.key})


def refit_outer(sweep: Sweep) -> list[dict[str, Any]]:
    """Each outer best, trained on its whole outer-train for its inner best epoch count, scored once."""
    pending = [(i, ref) for i, ref in enumerate(sweep.studies[:-1]) if _stale_refit(ref)]
    jobs = []
    for i, ref in pending:
        best = best_trial(ref)
        if best is None:
            raise SweepFailed(f"study {ref.key} has no finished trial; see `foldsweep status {sweep.spec.name}`")
        config = sweep.spec.with_params(best.params)
        fold = sweep.plan.outer[i]
        jobs.append(FitJob(fold.train, fold.valid, config.model, config.train,
                           job_seed(sweep.spec.optuna.seed, ref.key, "refit"),
                           fixed_epochs=int(best.user_attrs.get("mean_best_epoch", config.train.epochs))))
    if jobs:
        results = fit_many(sweep.X, sweep.y, jobs, sweep.data.n_classes, sweep.data.metric)
        for (_, ref), job, result in zip(pending, jobs, results):
            best = best_trial(ref)
            assert best is not None and best.value is not None
            test_score = score(sweep.data.metric, sweep.data.y[job.valid_rows], result.valid_pred)
            optimism = _optimism(best.value, test_score, sweep.data.maximize)
            epochs = job.fixed_epochs or 0  # always set on a refit job
            refit = {"outer_test_score": test_score, "best_inner_value": best.value, "best_trial": best.number,
                     "params": best.params, "epochs": epochs, "optimism": optimism}
            ref.study.set_user_attr("refit", refit)  # stored before anything else: never refit twice
            metrics = {"outer_test_score": test_score, "best_inner_value": best.value, "optimism": optimism,
                       "refit_epochs": float(epochs)}
            sweep.tracker.log_values(ref.study.user_attrs.get("mlflow_run_id", ""), metrics,
                                     tags={"best_trial": str(best.number)})
    return [ref.study.user_attrs["refit"] for ref in sweep.studies[:-1]]


def _stale_refit(ref: StudyRef) -> bool:
    """Not refit yet, or refit before more trials (an extended sweep) found a better configuration."""
    refit = ref.study.user_attrs.get("refit")
    best = best_trial(ref)
    return refit is None or (best is not None and refit["best_trial"] != best.number)


def summarize(sweep: Sweep, refits: list[dict[str, Any]]) -> dict[str, Any]:
    """The nested estimate: the outer-test scores' mean with a t interval (there are only a few outer
    folds), the mean optimism, and `final`'s best as the configuration to export."""
    scores = np.array([r["outer_test_score"] for r in refits])
    final = best_trial(sweep.study("final"))
    if final is None:
        raise SweepFailed("study final has no finished trial; the sweep has no configuration to export")
    mean = float(scores.mean())
    std = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    half = _t_quantile(len(scores) - 1) * std / math.sqrt(len(scores)) if len(scores) > 1 else 0.0
    return {
        "sweep": sweep.spec.name, "metric": sweep.data.metric,
        "direction": "maximize" if sweep.data.maximize else "minimize",
        "nested": {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "outer": scores.tolist()},
        "final": {"best_params": final.params, "best_value": final.value, "best_trial": final.number,
                  "best_epoch": final.user_attrs.get("mean_best_epoch")},
        "optimism": float(np.mean([r["optimism"] for r in refits])),
        "outer_refits": refits,
        "epochs_trained": _epochs_trained(sweep, refits),
    }


def _epochs_trained(sweep: Sweep, refits: list[dict[str, Any]]) -> int:
    """Fold-model epochs the sweep trained: every trial's folds (pruned and failed ones too) and the refits."""
    trials = sum(int(t.user_attrs.get("epochs_trained", 0)) for ref in sweep.studies
                 for t in ref.study.get_trials(deepcopy=False))
    return trials + sum(int(r["epochs"]) for r in refits)


def _optimism(inner: float, outer: float, maximize: bool) -> float:
    """How much better the search's own score looked than the untouched outer-test score."""
    return inner - outer if maximize else outer - inner


def _t_quantile(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))
