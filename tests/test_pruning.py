"""Pruning in a real sweep: trials are stopped mid-training, say where, and the epochs they skip are saved.

The MLflow side of a pruned trial (its run's state tag and curves) is pinned in test_tracking.py; here
the Optuna record and the epoch accounting the pruning benchmark relies on.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from foldsweep.spec import load_spec
from foldsweep.storage import default_storage, preflight
from foldsweep.workers import run_sweep

EPOCHS = 12


@pytest.fixture
def pruned_sweep(write_spec) -> tuple[dict, list[optuna.trial.FrozenTrial]]:
    """Median pruning after one finished trial per study, one trial per round, reports every 2 epochs."""
    path: Path = write_spec(train={"epochs": EPOCHS, "patience": EPOCHS, "batch_size": 32},
                            optuna={"n_trials": 5, "trials_per_batch": 1, "n_startup_trials": 1, "report_every": 2,
                                    "pruner": "median", "seed": 3},
                            tracking={"enabled": False})
    spec = load_spec(path)
    summary = run_sweep(spec)
    storage = preflight(default_storage(spec.name), 1)
    trials = [t for name in optuna.get_all_study_names(storage)
              for t in optuna.load_study(study_name=name, storage=storage).get_trials()]
    return summary, trials


def test_pruned_trials_stop_early_and_say_at_which_epoch(pruned_sweep) -> None:
    _, trials = pruned_sweep
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner pruned nothing; the test sweep must prune"
    for trial in pruned:
        epoch = max(trial.intermediate_values)
        assert epoch < EPOCHS
        assert trial.user_attrs["reason"] == f"pruned at epoch {epoch}"
        # every fold stopped there (2 inner folds): the epochs after it were never trained
        assert 0 < trial.user_attrs["epochs_trained"] <= 2 * epoch


def test_summary_counts_every_epoch_trained(pruned_sweep) -> None:
    summary, trials = pruned_sweep
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(t.user_attrs["epochs_trained"] <= 2 * EPOCHS for t in complete)
    refits = sum(r["epochs"] for r in summary["outer_refits"])
    assert summary["epochs_trained"] == sum(t.user_attrs["epochs_trained"] for t in trials) + refits
    assert summary["epochs_trained"] < len(trials) * 2 * EPOCHS + refits  # pruning (and early stopping) saved some


def test_wilcoxon_prunes_between_folds_with_one_report_per_fold(write_spec) -> None:
    """Folds are the steps: a pruned trial reported its first folds' scores and never trained the rest."""
    k = 6
    path = write_spec(split={"test_size": 0.25, "seed": 0, "outer": {"k": 2}, "inner": {"k": k}},
                      search={"lr": {"type": "float", "low": 0.00001, "high": 0.03, "log": True}},
                      train={"epochs": EPOCHS, "patience": EPOCHS, "batch_size": 16},
                      optuna={"n_trials": 8, "trials_per_batch": 1, "n_startup_trials": 2, "pruner": "wilcoxon",
                              "seed": 0},
                      tracking={"enabled": False})
    spec = load_spec(path)
    run_sweep(spec)
    storage = preflight(default_storage(spec.name), 1)
    trials = [t for name in optuna.get_all_study_names(storage)
              for t in optuna.load_study(study_name=name, storage=storage).get_trials()]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "Wilcoxon pruned nothing; the test sweep must prune"
    for trial in pruned:
        folds = len(trial.intermediate_values)
        assert sorted(trial.intermediate_values) == list(range(folds)) and 2 <= folds < k
        assert trial.user_attrs["reason"].startswith(f"pruned after fold {folds} of {k}")
        assert trial.user_attrs["epochs_trained"] <= folds * EPOCHS  # the folds after it were never trained
    for trial in (t for t in trials if t.state == TrialState.COMPLETE):
        scores = trial.user_attrs["fold_scores"]
        assert [trial.intermediate_values[s] for s in range(k)] == pytest.approx(scores)
        assert trial.value == pytest.approx(sum(scores) / k)
