"""The work loop's rounds: what each round asks depends on the spec alone, never on the machine."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
import torch
from conftest import tiny_spec

import foldsweep.sweep as sweep_module
from foldsweep.data import load_dataset
from foldsweep.outer import warm_start_final
from foldsweep.slots import stored_slot
from foldsweep.spec import parse_spec
from foldsweep.splits import make_plan
from foldsweep.sweep import Sweep, ask_round, open_studies, work
from foldsweep.tracking import NullTracker

Round = list[tuple[str, int, dict[str, Any]]]  # (study, slot, params) of each trial asked


def _asked_rounds(monkeypatch: pytest.MonkeyPatch, device: str, **resources: object) -> list[Round]:
    """Every round a whole sweep asks, with the coordinator's warm start between rounds; the training is
    replaced by a score that is a function of the parameters (what TPE then sees is the same everywhere)."""
    spec = parse_spec(tiny_spec(optuna={"n_trials": 7, "trials_per_batch": 3, "n_startup_trials": 2, "seed": 5},
                                resources={"devices": "cpu", "workers": 1, **resources}))
    data = load_dataset(spec.data)
    plan = make_plan(data, spec.split)
    studies = open_studies(spec, plan, optuna.storages.InMemoryStorage(), data.maximize)
    sweep = Sweep(spec=spec, data=data, plan=plan, studies=studies, tracker=NullTracker(), device=torch.device("cpu"))
    sweep.device = torch.device(device)  # as a GPU worker sizes its rounds (its data stays on the CPU here)
    rounds: list[Round] = []

    def scored(sweep: Sweep, asked: list, worker: str, progress: object) -> None:
        rounds.append([(ref.key, stored_slot(trial), trial.params) for ref, trial in asked])
        for ref, trial in asked:
            ref.study.tell(trial, 1 / (1 + abs(math.log10(trial.params["lr"] / 3e-3)) + trial.params["dropout"]))

    monkeypatch.setattr(sweep_module, "run_round", scored)
    work(sweep, "test", maintain=lambda: warm_start_final(sweep), poll_s=0.0)
    return rounds


def test_the_same_spec_asks_the_same_trials_in_the_same_rounds_whatever_a_batch_holds(monkeypatch) -> None:
    """A batch of 2 models holds one trial of 2 folds, a CPU's default 256 and a GPU's 1024 hold every
    study's round: the rounds (and so TPE's history and the warm start of `final`) must not differ."""
    small = _asked_rounds(monkeypatch, "cpu", models_per_batch=2)
    assert small == _asked_rounds(monkeypatch, "cpu")
    assert small == _asked_rounds(monkeypatch, "cuda")
    # rounds of `trials_per_batch` (3) slots of every study: 7 trials are rounds of 3, 3 and 1
    first = small[0]
    assert sorted((key, slot) for key, slot, _ in first) == [(key, slot) for key in ("final", "outer-0", "outer-1")
                                                            for slot in range(3)]
    per_study = {key: [slot for r in small for k, slot, _ in r if k == key] for key in ("outer-0", "outer-1", "final")}
    assert all(sorted(slots) == list(range(7)) for slots in per_study.values())


def test_ask_round_asks_the_rest_of_each_studys_round_at_once(monkeypatch) -> None:
    spec = parse_spec(tiny_spec(optuna={"n_trials": 4, "trials_per_batch": 4},
                                resources={"devices": "cpu", "models_per_batch": 2}))
    data = load_dataset(spec.data)
    plan = make_plan(data, spec.split)
    sweep = Sweep(spec=spec, data=data, plan=plan,
                  studies=open_studies(spec, plan, optuna.storages.InMemoryStorage(), data.maximize),
                  tracker=NullTracker(), device=torch.device("cpu"))
    asked = ask_round(sweep)
    # final keeps 2 slots for the warm start (one per outer fold): 4 + 4 + 2 trials, 20 models for a batch of 2
    assert sorted(ref.key for ref, _ in asked) == ["final"] * 2 + ["outer-0"] * 4 + ["outer-1"] * 4
