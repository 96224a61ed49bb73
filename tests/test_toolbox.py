"""The overfitting toolbox, knob by knob: each spec option changes what it claims to change and nothing else.

Complements test_train.py (equivalence with torch.optim for both optimizers, clipping, smoothing, the step
and plateau schedules, in-fold preprocessing and feature selection), test_model.py (batch norm, widths)
and test_splits.py (groups, time order, repeats).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from optuna.trial import TrialState
from torch.nn import functional as F

from foldsweep.data import load_dataset
from foldsweep.model import build_mlp
from foldsweep.spec import DataSpec, ModelSpec, TrainSpec, load_spec, parse_spec
from foldsweep.splits import make_plan
from foldsweep.studies import open_existing
from foldsweep.train import FitJob, FitResult, fit_many, schedule_factor
from foldsweep.workers import run_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
FULL_BATCH = 512  # more than sonar's rows: one step an epoch, so row order cannot matter


@pytest.fixture(scope="module")
def sonar() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    data = load_dataset(DataSpec(dataset="sonar"))
    rows = np.random.default_rng(0).permutation(len(data.y))
    return torch.as_tensor(data.X), torch.as_tensor(data.y), np.sort(rows[:150]), np.sort(rows[150:])


def _fit(sonar: Any, model: ModelSpec, train: TrainSpec, epochs: int, keep: bool = False) -> FitResult:
    X, y, tr, va = sonar
    job = FitJob(tr, va, model, train, seed=7, fixed_epochs=epochs)
    return fit_many(X, y, [job], 2, "accuracy", keep_models=keep)[0]


# -- augmentation and friends act on training batches only -------------------------------------------------
@pytest.mark.parametrize(("block", "knob", "value"), [
    ("train", "noise", 1.0), ("train", "mixup", 1.0), ("train", "label_smoothing", 0.3), ("model", "dropout", 0.5),
])
def test_a_training_only_regularizer_changes_the_training_loss_not_validation(sonar, block: str, knob: str,
                                                                              value: float) -> None:
    """With a vanishing learning rate the weights stay put: any change is in what the loss sees."""
    train = TrainSpec(lr=1e-12, batch_size=FULL_BATCH, epochs=2)
    model = ModelSpec(width=32)
    plain = _fit(sonar, model, train, 2)
    if block == "train":
        train = train.model_copy(update={knob: value})
    else:
        model = model.model_copy(update={knob: value})
    treated = _fit(sonar, model, train, 2)
    assert not np.allclose(treated.train_loss, plain.train_loss, rtol=0, atol=1e-4)
    np.testing.assert_allclose(treated.val_loss, plain.val_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(treated.valid_pred, plain.valid_pred, rtol=0, atol=1e-6)


# -- learning-rate schedules scale each epoch's step as specified ------------------------------------------
def _weights(result: FitResult) -> torch.Tensor:
    assert result.model is not None
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


def _initial(sonar: Any, model: ModelSpec) -> torch.Tensor:
    mlp = build_mlp(sonar[0].shape[1], 2, model, seed=7)
    return torch.cat([p.detach().flatten() for p in mlp.parameters()])


def test_one_cycle_starts_at_four_percent_of_the_learning_rate(sonar) -> None:
    """Plain SGD (no momentum, full batch): the first step is exactly lr * factor * gradient."""
    model = ModelSpec(width=16)
    base = TrainSpec(optimizer="sgd", momentum=0.0, lr=0.5, batch_size=FULL_BATCH, epochs=20)
    start = _initial(sonar, model)
    flat = _weights(_fit(sonar, model, base, 1, keep=True)) - start
    cycle = base.model_copy(update={"lr_schedule": "one_cycle"})
    scaled = _weights(_fit(sonar, model, cycle, 1, keep=True)) - start
    assert schedule_factor(cycle, 0) == pytest.approx(0.04)
    torch.testing.assert_close(scaled, 0.04 * flat, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(("schedule", "extra"), [("step", {"step_size": 1, "gamma": 0.5}), ("cosine", {})])
def test_a_schedule_scales_the_second_step_by_its_factor(sonar, schedule: str, extra: dict[str, Any]) -> None:
    """Epoch 0 has factor 1 for both, so both reach the same weights; the next step differs by factor(1)."""
    model = ModelSpec(width=16)
    base = TrainSpec(optimizer="sgd", momentum=0.0, lr=0.5, batch_size=FULL_BATCH, epochs=4, **extra)
    sched = base.model_copy(update={"lr_schedule": schedule})
    after_one = _weights(_fit(sonar, model, base, 1, keep=True))
    torch.testing.assert_close(_weights(_fit(sonar, model, sched, 1, keep=True)), after_one)
    flat = _weights(_fit(sonar, model, base, 2, keep=True)) - after_one
    scaled = _weights(_fit(sonar, model, sched, 2, keep=True)) - after_one
    factor = schedule_factor(sched, 1)
    assert factor == pytest.approx(0.5 if schedule == "step" else 0.5 * (1 + math.cos(math.pi / 4)))
    torch.testing.assert_close(scaled, factor * flat, rtol=1e-3, atol=1e-6)


# -- model knobs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "fn"), [
    ("relu", F.relu), ("gelu", F.gelu), ("tanh", torch.tanh), ("leaky_relu", F.leaky_relu),
])
def test_activation_is_the_named_function(name: str, fn: Any) -> None:
    spec = ModelSpec(width=24, depth=1, activation=name)
    mlp = build_mlp(10, 3, spec, seed=1).eval()
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    hidden, head = mlp.hidden[0], mlp.head
    expected = head(fn(hidden(x)))
    torch.testing.assert_close(mlp(x), expected)
    other = build_mlp(10, 3, spec.model_copy(update={"activation": "tanh" if name != "tanh" else "relu"}), seed=1)
    assert not torch.allclose(other.eval()(x), expected, atol=1e-4)


@pytest.mark.parametrize(("init", "kind", "scale"), [
    ("default", "uniform", lambda i, o: 1 / math.sqrt(i)),
    ("xavier_uniform", "uniform", lambda i, o: math.sqrt(6 / (i + o))),
    ("xavier_normal", "normal", lambda i, o: math.sqrt(2 / (i + o))),
    ("kaiming_uniform", "uniform", lambda i, o: math.sqrt(6 / i)),
    ("kaiming_normal", "normal", lambda i, o: math.sqrt(2 / i)),
])
def test_init_draws_hidden_weights_from_the_named_distribution(init: str, kind: str, scale: Any) -> None:
    fan_in, width = 200, 400
    mlp = build_mlp(fan_in, 2, ModelSpec(width=width, depth=2, init=init), seed=3)
    for layer, n_in in zip(mlp.hidden, (fan_in, width), strict=True):
        w = layer.weight.detach()
        expected = scale(n_in, width)
        if kind == "uniform":  # bound b: max |w| just under b, std b / sqrt(3)
            assert w.abs().max().item() == pytest.approx(expected, rel=0.01)
            assert w.std().item() == pytest.approx(expected / math.sqrt(3), rel=0.02)
        else:
            assert w.std().item() == pytest.approx(expected, rel=0.02)
        if init != "default":
            assert torch.count_nonzero(layer.bias) == 0


# -- everything is searchable --------------------------------------------------------------------------------
EVERY_KNOB = {
    "depth": {"type": "int", "low": 1, "high": 2},
    "activation": {"type": "categorical", "choices": ["relu", "gelu", "tanh", "leaky_relu"]},
    "batch_norm": {"type": "categorical", "choices": [False, True]},
    "init": {"type": "categorical", "choices": ["default", "xavier_uniform", "kaiming_normal"]},
    "optimizer": {"type": "categorical", "choices": ["adamw", "sgd"]},
    "lr_schedule": {"type": "categorical", "choices": ["none", "step", "cosine", "plateau", "one_cycle"]},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "grad_clip": {"type": "float", "low": 0.0, "high": 5.0},
    "noise": {"type": "float", "low": 0.0, "high": 0.3},
    "mixup": {"type": "float", "low": 0.0, "high": 0.4},
    "preprocess": {"type": "categorical", "choices": ["standard", "minmax", "none"]},
    "select_k": {"type": "int", "low": 10, "high": 60, "step": 10},
    "lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True},
}


def test_every_toolbox_knob_can_be_searched_in_one_sweep(workdir: Path) -> None:
    raw = tiny_spec(optuna={"n_trials": 4, "trials_per_batch": 4, "sampler": "random", "seed": 3},
                    tracking={"enabled": False}, train={"epochs": 4, "patience": 4, "batch_size": 16})
    raw["search"] = EVERY_KNOB
    summary = run_sweep(parse_spec(raw))
    _, refs = open_existing("tiny")
    trials = [t for ref in refs for t in ref.study.get_trials(deepcopy=False)]
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs.get("reason") for t in trials]
    for knob in EVERY_KNOB:
        assert len({t.params[knob] for t in trials}) >= 2, knob  # each knob took several values
    assert set(summary["final"]["best_params"]) == set(EVERY_KNOB)


# -- the shipped grouped and time-ordered examples keep their promises --------------------------------------
def test_grouped_example_keeps_every_site_on_one_side_of_every_split() -> None:
    spec = load_spec(SWEEPS / "grouped.yaml")
    data = load_dataset(spec.data)
    plan = make_plan(data, spec.split)
    sites = data.groups
    assert sites is not None and len(set(sites)) == 30
    assert set(sites[plan.test]).isdisjoint(sites[plan.dev])
    for fold in [*plan.outer, *plan.final_inner, *(f for fs in plan.inner for f in fs)]:
        assert set(sites[fold.train]).isdisjoint(sites[fold.valid])
    assert "site" not in data.feature_names


def test_timeseries_example_seals_the_latest_days_and_never_trains_on_the_future() -> None:
    spec = load_spec(SWEEPS / "timeseries.yaml")
    data = load_dataset(spec.data)
    plan = make_plan(data, spec.split)
    days = data.times
    assert days is not None and not np.all(np.diff(days) > 0)  # the file is not in time order
    assert sorted(days[plan.test]) == list(range(320, 400))  # the latest 20% of 400 days
    for fold in [*plan.outer, *plan.final_inner, *(f for fs in plan.inner for f in fs)]:
        assert days[fold.train].max() < days[fold.valid].min()
    assert "day" not in data.feature_names
