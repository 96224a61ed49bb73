"""The search block as Optuna distributions, samplers seeded per study, pruners by name."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from foldsweep.space import distributions, pruner, sampler, trial_spec
from foldsweep.spec import SweepSpec, parse_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEARCH = {
    "lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.01},
    "width": {"type": "int", "low": 16, "high": 256, "step": 16},
    "batch_size": {"type": "int", "low": 8, "high": 128, "log": True},
    "activation": {"type": "categorical", "choices": ["relu", "gelu", "tanh"]},
    "batch_norm": {"type": "categorical", "choices": [True, False]},
}


def make_spec(search: dict[str, Any] | None = None, **optuna_opts: Any) -> SweepSpec:
    return parse_spec({"name": "t", "data": {"dataset": "sonar"}, "search": SEARCH if search is None else search,
                       "optuna": optuna_opts, "train": {"epochs": 50}})


def test_distributions_map_every_kind() -> None:
    dists = distributions(make_spec())
    assert list(dists) == list(SEARCH)
    assert dists["lr"] == FloatDistribution(1e-4, 0.1, log=True)
    assert dists["dropout"] == FloatDistribution(0.0, 0.5, step=0.1)
    assert dists["weight_decay"] == FloatDistribution(0.0, 0.01)
    assert dists["width"] == IntDistribution(16, 256, step=16)
    assert dists["batch_size"] == IntDistribution(8, 128, log=True)
    assert dists["activation"] == CategoricalDistribution(["relu", "gelu", "tanh"])
    assert dists["batch_norm"] == CategoricalDistribution([True, False])


def test_empty_search_has_no_distributions() -> None:
    assert distributions(make_spec({})) == {}


def test_asked_trials_stay_in_range_and_make_valid_specs() -> None:
    spec = make_spec(sampler="random")
    dists = distributions(spec)
    study = optuna.create_study(sampler=sampler(spec, 0))
    for _ in range(20):
        trial = study.ask(dists)
        p = trial.params
        assert 1e-4 <= p["lr"] <= 0.1 and 0.0 <= p["dropout"] <= 0.5
        assert p["dropout"] == pytest.approx(round(p["dropout"], 1))  # on the 0.1 grid
        assert p["width"] % 16 == 0 and 8 <= p["batch_size"] <= 128
        assert p["activation"] in ("relu", "gelu", "tanh")
        config = trial_spec(spec, trial)
        assert config.train.lr == p["lr"] and config.model.width == p["width"]
        assert config.model.activation == p["activation"] and config.model.batch_norm == p["batch_norm"]
        assert config.train.epochs == 50
        study.tell(trial, 0.5)


def first_sample(spec: SweepSpec, offset: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(sampler=sampler(spec, offset))
    return study.ask(distributions(spec)).params


@pytest.mark.parametrize("name", ["tpe", "random", "qmc"])
def test_study_offsets_give_different_streams(name: str) -> None:
    spec = make_spec(sampler=name, seed=3)
    assert first_sample(spec, 0) == first_sample(spec, 0)  # seeded: reproducible
    assert first_sample(spec, 0) != first_sample(spec, 1)  # another study, another stream
    assert first_sample(spec, 1) != first_sample(make_spec(sampler=name, seed=4), 1)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
     ("qmc", optuna.samplers.QMCSampler)],
)
def test_sampler_names(name: str, cls: type) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert type(sampler(make_spec(sampler=name), 0)) is cls


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("none", optuna.pruners.NopPruner),
        ("median", optuna.pruners.MedianPruner),
        ("percentile", optuna.pruners.PercentilePruner),
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("wilcoxon", optuna.pruners.WilcoxonPruner),
    ],
)
def test_pruner_names(name: str, cls: type) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert type(pruner(make_spec(pruner=name))) is cls
