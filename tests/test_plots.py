"""Plots from real Optuna studies: each writes a PNG, or nothing when there is nothing honest to draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest

from foldsweep.plots import TrialCurves, learning_curves, parallel_coordinates, param_importances

PNG = b"\x89PNG\r\n\x1a\n"
KNOBS = ["lr", "dropout", "batch_size"]


def _study(n_complete: int, n_pruned: int = 0) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(n_complete + n_pruned):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        trial.suggest_categorical("batch_size", [16, 32])
        if i < n_complete:
            study.tell(trial, 1.0 - dropout + np.log10(lr) / 10)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_importances_need_two_complete_trials_in_some_study(tmp_path: Path) -> None:
    path = tmp_path / "importances.png"
    assert param_importances([("outer-0", _study(1, n_pruned=3))], KNOBS, path) is None
    assert not path.exists()
    drawn = param_importances([("outer-0", _study(1)), ("final", _study(6))], KNOBS, path)
    assert drawn == path and path.read_bytes().startswith(PNG)


def test_parallel_coordinates_draw_complete_trials_only(tmp_path: Path) -> None:
    path = tmp_path / "parallel.png"
    assert parallel_coordinates([("outer-0", _study(0, n_pruned=2))], KNOBS, "accuracy", path) is None
    assert parallel_coordinates([("outer-0", _study(4, n_pruned=2))], [], "accuracy", path) is None
    drawn = parallel_coordinates([("outer-0", _study(4, n_pruned=2)), ("final", _study(3))], KNOBS, "accuracy", path)
    assert drawn == path and path.read_bytes().startswith(PNG)


def test_learning_curves_draw_each_fold_of_each_best_trial(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    assert learning_curves([TrialCurves("outer-0: trial 0", [], [], [])], path) is None
    epochs = np.arange(1, 11)
    folds = [(epochs, np.linspace(0.7, 0.1, 10)), (epochs, np.linspace(0.7, 0.2, 10))]
    valid = [(epochs, 0.4 + (epochs - 5) ** 2 / 100), (epochs, 0.5 + (epochs - 4) ** 2 / 100)]
    drawn = learning_curves([TrialCurves("outer-0: trial 3", folds, valid, [5, 4]),
                             TrialCurves("final: trial 1", folds, valid, [5, 4])], path)
    assert drawn == path and path.read_bytes().startswith(PNG)


def test_a_study_whose_trials_all_scored_the_same_has_no_importances(tmp_path: Path) -> None:
    """fANOVA raised "zero total variance" on trials of equal accuracy (up to the last bit: a tiny sweep's two
    trials had fold means 0.6025641025641025 and ...26), and the sweep's pictures were lost."""
    tied = optuna.create_study(direction="maximize")
    for lr, value in ((1e-3, 0.6025641025641025), (1e-2, 0.6025641025641026), (3e-2, 0.6025641025641025)):
        tied.add_trial(optuna.trial.create_trial(params={"lr": lr}, value=value, distributions={
            "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}))
    path = tmp_path / "importances.png"
    assert param_importances([("outer-0", tied)], ["lr"], path) is None
    assert param_importances([("outer-0", tied), ("final", _study(6))], KNOBS, path) == path
