"""The statistical core: the nested interval, optimism, the outer refits and the warm start of `final`."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from scipy import stats

from foldsweep.data import load_dataset
from foldsweep.errors import SweepFailed
from foldsweep.outer import (
    _optimism,
    _t_quantile,
    holdout_ratio,
    nested_interval,
    refit_job,
    refit_outer,
    summarize,
    warm_start_final,
    within_range,
)
from foldsweep.report import summary_markdown
from foldsweep.spec import parse_spec
from foldsweep.splits import Fold, make_plan
from foldsweep.studies import best_trial, refit_epochs
from foldsweep.sweep import Sweep, open_studies, work
from foldsweep.tracking import NullTracker
from tests.conftest import tiny_spec


def opened(**overrides: object) -> Sweep:
    """The tiny sweep's studies in memory (no MLflow, no files), nothing searched yet."""
    spec = parse_spec(tiny_spec(**overrides))
    data = load_dataset(spec.data)
    plan = make_plan(data, spec.split)
    studies = open_studies(spec, plan, optuna.storages.InMemoryStorage(), data.maximize)
    return Sweep(spec=spec, data=data, plan=plan, studies=studies, tracker=NullTracker(), device=torch.device("cpu"))


def searched() -> Sweep:
    """The tiny sweep searched to the end, the coordinator's warm start run between rounds as in `run`."""
    sweep = opened()
    work(sweep, "test", maintain=lambda: warm_start_final(sweep), poll_s=0.0)
    return sweep


# -- the interval --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dof", [1, 2, 4, 14, 100])
def test_t_quantile_is_scipys(dof: int) -> None:
    assert _t_quantile(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=1e-12)


@pytest.mark.parametrize("n", [3, 5, 15])
def test_interval_without_correction_is_scipys_t_interval(n: int) -> None:
    scores = np.random.default_rng(n).uniform(0.6, 0.9, size=n)
    low, high = nested_interval(scores, 0.0)
    expected = stats.t.interval(0.95, n - 1, loc=scores.mean(), scale=stats.sem(scores))
    assert (low, high) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_interval_is_the_corrected_resampled_t(ratio: float) -> None:
    scores = np.array([0.71, 0.80, 0.76, 0.69, 0.83, 0.78, 0.74, 0.81, 0.70, 0.77])
    n = len(scores)
    scale = math.sqrt((1 / n + ratio) * scores.var(ddof=1))
    expected = stats.t.interval(0.95, n - 1, loc=scores.mean(), scale=scale)
    assert nested_interval(scores, ratio) == pytest.approx(expected, rel=1e-12)
    plain = stats.t.interval(0.95, n - 1, loc=scores.mean(), scale=stats.sem(scores))
    # 10 correlated scores are not 10 new ones: wider than the plain t by sqrt(1 + n * n_test/n_train)
    assert (expected[1] - expected[0]) / (plain[1] - plain[0]) == pytest.approx(math.sqrt(1 + n * ratio))


def test_interval_is_cut_to_what_the_metric_can_take() -> None:
    assert within_range("accuracy", 0.62, 1.03) == (0.62, 1.0)
    assert within_range("rmse", -0.2, 0.9) == (0.0, 0.9)
    assert within_range("r2", 0.5, 1.2) == (0.5, 1.0)


def test_interval_of_one_score_is_that_score() -> None:
    assert nested_interval(np.array([0.7]), 0.25) == (0.7, 0.7)


# -- optimism ------------------------------------------------------------------------------------------
def test_optimism_is_positive_when_the_search_flattered_itself_in_either_direction() -> None:
    assert _optimism(0.90, 0.80, maximize=True) == pytest.approx(0.10)  # accuracy: inner looked higher
    assert _optimism(0.50, 0.70, maximize=False) == pytest.approx(0.20)  # rmse: inner looked lower
    assert _optimism(0.80, 0.90, maximize=True) == pytest.approx(-0.10)


def test_report_says_what_optimism_subtracts_for_a_minimised_metric() -> None:
    summary = {"sweep": "s", "metric": "rmse", "direction": "minimize", "optimism": 0.2,
               "nested": {"mean": 0.7, "std": 0.1, "ci95": [0.5, 0.9], "outer": [0.6, 0.8]}, "outer_refits": [],
               "final": {"best_params": {}, "best_value": 0.5, "best_epoch": 3}}
    text = summary_markdown(summary)
    assert "**Optimism** (outer-test score minus best inner-CV value, positive = the search flattered itself)" in text
    assert "best inner-CV value minus outer-test" not in text
    maximised = summary_markdown(summary | {"metric": "accuracy", "direction": "maximize"})
    assert "(best inner-CV value minus outer-test score, positive = the search flattered itself)" in maximised


# -- the outer loop on a real (tiny) sweep ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep() -> Sweep:
    return searched()


def test_refit_trains_on_exactly_the_outer_train_rows_and_scores_the_outer_test_rows(sweep: Sweep) -> None:
    for i, ref in enumerate(sweep.studies[:-1]):
        best = best_trial(ref)
        assert best is not None
        job = refit_job(sweep, i, ref, best)
        assert np.array_equal(job.train_rows, sweep.plan.outer[i].train)
        assert np.array_equal(job.valid_rows, sweep.plan.outer[i].valid)
        scale = len(sweep.plan.outer[i].train) / np.mean([len(f.train) for f in sweep.plan.inner[i]])
        expected = min(sweep.spec.train.epochs, max(1, round(best.user_attrs["mean_best_epoch"] * scale)))
        assert job.fixed_epochs == expected == refit_epochs(best, sweep.spec.train.epochs, ref.folds,
                                                            len(job.train_rows))


def test_refit_epochs_scale_the_best_loss_epoch_by_the_larger_training_set_up_to_the_budget() -> None:
    folds = [Fold(np.arange(80), np.arange(80, 120)), Fold(np.arange(40, 120), np.arange(40))]  # 80 training rows
    trial = optuna.trial.create_trial(value=0.8, user_attrs={"mean_best_epoch": 10})
    assert refit_epochs(trial, 100, folds, 120) == 15  # 120 rows / 80 = k/(k-1) with k=3
    assert refit_epochs(trial, 12, folds, 120) == 12  # never past the configured epochs
    assert refit_epochs(trial, 100, folds, 80) == 10
    assert refit_epochs(optuna.trial.create_trial(value=0.8), 30, folds, 120) == 30  # unknown: the budget


def test_nothing_is_enqueued_into_a_sibling_and_final_gets_the_outer_bests(sweep: Sweep) -> None:
    for ref in sweep.studies[:-1]:
        for trial in ref.study.get_trials(deepcopy=False):
            assert "fixed_params" not in trial.system_attrs and "warm_start_from" not in trial.user_attrs
    final = sweep.study("final").study
    warm = {t.user_attrs["warm_start_from"]: t.params for t in final.get_trials(deepcopy=False)
            if "warm_start_from" in t.user_attrs}
    assert warm  # n_trials=2 leaves one slot for the outer bests
    for key, params in warm.items():
        best = best_trial(sweep.study(key))
        assert best is not None and params == best.params


def test_summary_uses_the_corrected_interval_over_the_outer_scores(sweep: Sweep) -> None:
    refits = refit_outer(sweep)
    summary = summarize(sweep, refits)
    scores = np.array([r["outer_test_score"] for r in refits])
    assert summary["nested"]["outer"] == scores.tolist()
    ratio = holdout_ratio(sweep)
    assert ratio == pytest.approx(np.mean([len(f.valid) for f in sweep.plan.outer])
                                  / np.mean([len(f.train) for f in sweep.plan.outer]))
    low, high = nested_interval(scores, ratio)
    assert summary["nested"]["ci95"] == [max(low, 0.0), min(high, 1.0)]  # accuracy: never past 0..1
    for r in refits:
        assert r["optimism"] == pytest.approx(r["best_inner_value"] - r["outer_test_score"])
    assert summary["optimism"] == pytest.approx(np.mean([r["optimism"] for r in refits]))
    assert summary["refit_fallbacks"] == [] and all(r["diverged"] == [] for r in refits)


# -- a refit that diverges -------------------------------------------------------------------------------
SGD = {"train": {"epochs": 6, "patience": 3, "batch_size": 32, "optimizer": "sgd"}}
LR = {"lr": FloatDistribution(1e-4, 1e4, log=True)}


def plant(sweep: Sweep, key: str, lr: float, value: float) -> int:
    """A finished trial of `key` with this learning rate (SGD at lr >= 500 gives NaN within two epochs)."""
    study = sweep.study(key).study
    study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=LR, value=value,
                                              user_attrs={"mean_best_epoch": 4}))
    return study.get_trials(deepcopy=False)[-1].number


def test_a_diverged_refit_is_never_scored_it_falls_back_to_the_next_best_trial() -> None:
    sweep = opened(**SGD)
    for ref in sweep.studies[:-1]:
        plant(sweep, ref.key, 0.01, 0.70)
    fine = plant(sweep, "outer-0", 0.02, 0.80)
    diverging = plant(sweep, "outer-0", 1000.0, 0.90)  # looks best, diverges when refit
    plant(sweep, "final", 0.01, 0.70)
    refits = refit_outer(sweep)
    first = refits[0]
    assert first["best_trial"] == fine and first["best_inner_value"] == 0.80
    assert [d["trial"] for d in first["diverged"]] == [diverging] and first["diverged"][0]["epoch"] >= 1
    assert math.isfinite(first["outer_test_score"]) and refits[1]["diverged"] == []
    summary = summarize(sweep, refits)
    assert summary["refit_fallbacks"] == [f"outer-0: refit of trial {diverging} (NaN/inf at epoch "
                                          f"{first['diverged'][0]['epoch']}) diverged; its next-best trial {fine} "
                                          "was refit and scored instead"]
    assert f"**Refit fallback**: {summary['refit_fallbacks'][0]}" in summary_markdown(summary)


def test_a_study_whose_every_refit_diverges_stops_the_sweep() -> None:
    sweep = opened(**SGD)
    for ref in sweep.studies[:-1]:
        plant(sweep, ref.key, 1000.0, 0.9)
        plant(sweep, ref.key, 500.0, 0.8)
    with pytest.raises(SweepFailed, match=r"^every finished trial of study outer-0 diverged when refit on its "
                                          r"outer-train rows \(loss NaN/inf\); lower the learning-rate range$"):
        refit_outer(sweep)
