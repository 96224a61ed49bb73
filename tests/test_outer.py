"""The statistical core: the nested interval, optimism, the outer refits and the warm start of `final`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.distributions import FloatDistribution
from scipy import stats

from foldsweep.data import load_dataset
from foldsweep.errors import SweepFailed
from foldsweep.metrics import score, score_se
from foldsweep.outer import (
    INTERVAL,
    Z95,
    _optimism,
    holdout_ratio,
    interval_errors,
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
from foldsweep.studies import best_trial, plateau_replay, refit_epochs, slot_order
from foldsweep.sweep import Sweep, open_studies, work
from foldsweep.tracking import NullTracker
from foldsweep.train import fit_many
from tests.conftest import tiny_spec


def opened(search: dict[str, Any] | None = None, **overrides: object) -> Sweep:
    """The tiny sweep's studies in memory (no MLflow, no files), nothing searched yet; `search` replaces its
    search space whole."""
    raw = tiny_spec(**overrides)
    raw["search"] = raw["search"] if search is None else search
    spec = parse_spec(raw)
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
def test_tied_outer_scores_still_give_an_interval_as_wide_as_their_rows_allow() -> None:
    scores = np.full(3, 69 / 80)  # the measured miss: three outer folds of 80 rows, each 69 right
    row_se = np.full(3, math.sqrt(69 / 80 * 11 / 80 / 80))
    errors = interval_errors(scores, 0.5, row_se)
    low, high = nested_interval(float(scores.mean()), errors)
    assert errors.between == pytest.approx(0.0, abs=1e-12)
    assert errors.rows == pytest.approx(math.sqrt(69 / 80 * 11 / 80 / 240))
    assert high - low == pytest.approx(2 * stats.norm.ppf(0.975) * math.sqrt(69 / 80 * 11 / 80 / 240))
    assert high - low > 0.08  # of the order of sqrt(p(1-p)/n_dev), not zero


def test_interval_by_hand_the_larger_of_the_two_standard_errors() -> None:
    scores, row_se = np.array([0.70, 0.80, 0.75]), np.full(3, 0.05)
    errors = interval_errors(scores, 0.5, row_se)
    assert errors.rows == pytest.approx(math.sqrt(0.05**2 / 3))  # 0.0289: the 3 folds cover the rows once
    assert errors.between == pytest.approx(math.sqrt((1 / 3 + 0.5) * 0.0025))  # 0.0456: s^2 = 0.0025
    assert nested_interval(0.75, errors) == pytest.approx((0.75 - 1.96 * 0.045644, 0.75 + 1.96 * 0.045644), abs=1e-4)
    close = interval_errors(np.array([0.74, 0.76, 0.75]), 0.5, row_se)  # s^2 = 0.0001: the rows' floor rules
    assert close.se == close.rows == pytest.approx(0.028868, abs=1e-6)
    assert Z95 == pytest.approx(stats.norm.ppf(0.975), rel=1e-12)


def test_repeats_score_the_same_rows_again_and_do_not_shrink_the_row_term() -> None:
    row_se = np.full(6, 0.05)
    once = interval_errors(np.array([0.70, 0.80, 0.75]), 0.5, row_se[:3])
    twice = interval_errors(np.array([0.70, 0.80, 0.75, 0.72, 0.78, 0.75]), 0.5, row_se, repeats=2)
    assert twice.rows == once.rows
    missing = interval_errors(np.array([0.70, 0.80, 0.75]), 0.5, np.full(3, math.nan))  # recorded before the floor
    assert missing.rows == 0.0 and missing.se == missing.between


def test_row_standard_error_of_accuracy_is_binomial() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 1])
    pred = np.eye(2)[[0, 1, 1, 1, 1, 0, 0, 1, 1, 1]]  # 7 of 10 right
    assert score_se("accuracy", y, pred) == pytest.approx(math.sqrt(0.7 * 0.3 / 10), rel=1e-12)


def test_row_standard_error_of_per_row_losses_and_of_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 200), 0.01, 0.99)
    pred = np.stack([1 - p1, p1], 1)
    loss = -np.log(np.where(y == 1, p1, 1 - p1))
    assert score_se("log_loss", y, pred) == pytest.approx(loss.std() / math.sqrt(200), rel=1e-9)
    value = rng.normal(size=50)
    target = value + rng.normal(0, 0.5, 50)
    assert score_se("mae", target, value) == pytest.approx(np.abs(value - target).std() / math.sqrt(50), rel=1e-9)
    auc, n1, n0 = score("roc_auc", y, pred), int(y.sum()), int((1 - y).sum())
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    hanley_mcneil = math.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0))
    assert score_se("roc_auc", y, pred) == pytest.approx(hanley_mcneil, rel=1e-12)


def test_interval_is_cut_to_what_the_metric_can_take() -> None:
    assert within_range("accuracy", 0.62, 1.03) == (0.62, 1.0)
    assert within_range("rmse", -0.2, 0.9) == (0.0, 0.9)
    assert within_range("r2", 0.5, 1.2) == (0.5, 1.0)


def test_interval_of_one_score_is_its_rows_sampling_error() -> None:
    errors = interval_errors(np.array([0.7]), 0.25, np.array([0.04]))
    assert errors.between == 0.0 and nested_interval(0.7, errors) == pytest.approx((0.7 - Z95 * 0.04, 0.7 + Z95 * 0.04))


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


def test_summary_uses_the_interval_over_the_outer_scores_and_their_rows(sweep: Sweep) -> None:
    refits = refit_outer(sweep)
    summary = summarize(sweep, refits)
    scores = np.array([r["outer_test_score"] for r in refits])
    assert summary["nested"]["outer"] == scores.tolist()
    for r, fold in zip(refits, sweep.plan.outer, strict=True):  # accuracy: the binomial p(1-p)/n_test
        p = r["outer_test_score"]
        assert r["outer_test_se"] == pytest.approx(math.sqrt(p * (1 - p) / len(fold.valid)), rel=1e-12)
    ratio = holdout_ratio(sweep)
    assert ratio == pytest.approx(np.mean([len(f.valid) for f in sweep.plan.outer])
                                  / np.mean([len(f.train) for f in sweep.plan.outer]))
    errors = interval_errors(scores, ratio, np.array([r["outer_test_se"] for r in refits]))
    low, high = nested_interval(float(scores.mean()), errors)
    assert summary["nested"]["ci95"] == [max(low, 0.0), min(high, 1.0)]  # accuracy: never past 0..1
    assert (summary["nested"]["se"], summary["nested"]["se_rows"]) == (errors.se, errors.rows) and errors.rows > 0
    assert summary["nested"]["interval"] == INTERVAL and "max(per-row SE" in INTERVAL
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


# -- nothing computed on outer-test rows chooses anything ---------------------------------------------------
@pytest.fixture(scope="module")
def linear_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 rows of a noisy linear regression on 4 features."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 4))
    path = tmp_path_factory.mktemp("table") / "linear.csv"
    pd.DataFrame(X, columns=list("abcd")).assign(y=X @ [1.0, -2.0, 0.5, 0.0] + 0.1 * rng.normal(size=160)).to_csv(
        path, index=False)
    return path


def on_table(path: Path, **overrides: object) -> Sweep:
    return opened(data={"dataset": None, "path": str(path), "target": "y"}, **overrides)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",  # scoring the row's float32 prediction
                            "ignore:invalid value encountered:RuntimeWarning")
def test_an_extreme_outer_test_row_neither_diverges_the_refit_nor_changes_which_trial_is_refit(linear_table) -> None:
    sweep = on_table(linear_table, search={"lr": {"type": "float", "low": 1e-4, "high": 1e4, "log": True}})
    for ref in sweep.studies[:-1]:
        plant(sweep, ref.key, 0.003, 0.9)
    best = plant(sweep, "outer-0", 0.005, 0.5)  # rmse: lower is better
    plant(sweep, "final", 0.003, 0.9)
    sweep.X[sweep.plan.outer[0].valid[0], 0] = 1e25  # one held-out row: its squared error overflows float32
    refits = refit_outer(sweep)
    assert refits[0]["best_trial"] == best and refits[0]["params"] == {"lr": 0.005}
    assert refits[0]["diverged"] == [] and summarize(sweep, refits)["refit_fallbacks"] == []
    assert refits[0]["outer_test_score"] > 1e20  # the model's honest score on that row, not another model's


PLATEAU = {"train": {"epochs": 60, "patience": 6, "lr_schedule": "plateau", "gamma": 0.3},
           "optuna": {**tiny_spec()["optuna"], "n_trials": 4}}


def test_a_refit_replays_the_plateau_cuts_its_searched_fits_made_before_their_best_epoch(linear_table) -> None:
    sweep = on_table(linear_table, search={"lr": {"type": "float", "low": 0.03, "high": 0.1, "log": True}},
                     **PLATEAU)
    work(sweep, "test", maintain=lambda: warm_start_final(sweep), poll_s=0.0)
    cut = 0
    for i, ref in enumerate(sweep.studies[:-1]):
        best = best_trial(ref)
        assert best is not None
        job = refit_job(sweep, i, ref, best)
        assert job.fixed_epochs is not None
        replay = plateau_replay(best, job.fixed_epochs, 0.3)
        assert job.plateau_factors == replay
        [refit] = fit_many(sweep.X, sweep.y, [job], sweep.data.n_classes, sweep.data.metric)
        expected = np.ones(job.fixed_epochs) if replay is None else np.array(replay)
        np.testing.assert_allclose(refit.plateau_factor, expected, rtol=1e-6)
        cuts = best.user_attrs.get("plateau_cuts", [])
        assert (replay is not None) == any(cuts)
        if any(cuts):  # the inner fits trained below factor 1 before their best epoch: so does the refit
            assert refit.plateau_factor.min() < 1.0 and refit.plateau_factor[0] == 1.0
            cut += 1
    assert cut  # (the regression's noise floor makes Adam plateau: its fits cut and improve again)


def test_the_replayed_factor_stretches_each_folds_way_to_its_best_epoch_and_takes_the_median() -> None:
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"best_epochs": [10, 20, 5],
                                                             "plateau_cuts": [[4], [5, 15], []]})
    replay = plateau_replay(trial, 20, 0.5)
    assert replay is not None and len(replay) == 20
    # refit epoch e: fold 0 at e * 10 // 20 (cut from 4: e >= 8), fold 1 at e (cuts at 5, 15), fold 2 never
    counts = [np.median([int(e // 2 >= 4), int(e >= 5) + int(e >= 15), 0]) for e in range(20)]
    assert replay == tuple(0.5**c for c in counts)
    assert replay[7] == 1.0 and replay[8] == 0.5 and replay[19] == 0.5
    even = optuna.trial.create_trial(value=0.5, user_attrs={"best_epochs": [4, 4], "plateau_cuts": [[1], [1, 2]]})
    assert plateau_replay(even, 4, 0.25) == (1.0, 0.25, 0.125, 0.125)  # two folds: the geometric mean
    assert plateau_replay(optuna.trial.create_trial(value=0.5, user_attrs={"best_epochs": [3]}), 6, 0.5) is None


# -- a warm start cut short ------------------------------------------------------------------------------
WARM = {"split": {**tiny_spec()["split"], "outer": {"k": 3}}, "optuna": {**tiny_spec()["optuna"], "n_trials": 3}}


class Killed(BaseException):
    """Stands in for a SIGKILL: nothing after it runs."""


def final_trials(sweep: Sweep) -> list[tuple[int | None, dict[str, Any], str | None, str]]:
    """`final`'s trials as (slot (None while waiting), configuration, outer best it copies, state), in slot order."""
    trials = sorted(sweep.study("final").study.get_trials(deepcopy=False), key=slot_order)
    return [(t.user_attrs.get("slot"), t.params, t.user_attrs.get("warm_start_from"), t.state.name) for t in trials]


def test_a_warm_start_cut_after_its_first_outer_best_resumes_to_an_uninterrupted_runs_trials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clean = opened(**WARM)
    work(clean, "test", maintain=lambda: warm_start_final(clean), poll_s=0.0)
    assert [key for _, _, key, _ in final_trials(clean)].count(None) == 1  # 3 outer studies, 2 of final's 3 slots

    storage = optuna.storages.InMemoryStorage()
    cut = opened(**WARM)
    cut.studies = open_studies(cut.spec, cut.plan, storage, cut.data.maximize)
    enqueue = optuna.Study.enqueue_trial

    def killed_after_the_first(study: optuna.Study, *args: Any, **kwargs: Any) -> None:
        enqueue(study, *args, **kwargs)
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(optuna.Study, "enqueue_trial", killed_after_the_first)
        with pytest.raises(Killed):
            work(cut, "test", maintain=lambda: warm_start_final(cut), poll_s=0.0)
    assert [key for _, _, key, _ in final_trials(cut) if key] == ["outer-0"]  # one of two outer bests in the journal

    rerun = opened(**WARM)
    rerun.studies = open_studies(rerun.spec, rerun.plan, storage, rerun.data.maximize)  # what a new process opens
    work(rerun, "test", maintain=lambda: warm_start_final(rerun), poll_s=0.0)
    assert final_trials(rerun) == final_trials(clean)
    best, clean_best = best_trial(rerun.study("final")), best_trial(clean.study("final"))
    assert best is not None and clean_best is not None and best.params == clean_best.params
