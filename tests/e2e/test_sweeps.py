"""Every example in sweeps/ validates as shipped and runs end to end on a tiny budget (via --set overrides)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from foldsweep.cli import cli
from foldsweep.spec import load_spec

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))
TINY_BUDGET = ("optuna.n_trials=2", "optuna.trials_per_batch=2", "optuna.n_startup_trials=1", "train.epochs=3",
               "split.outer.k=2", "split.inner.k=2", "resources.workers=1", "resources.devices=cpu",
               "tracking.enabled=false")
# the per-family variants the header of sonar-l1-vs-l2.yaml tells people to run
VARIANTS = {"sonar-l1": ("search.weight_decay.choices=[0.0]",), "sonar-l2": ("search.l1.choices=[0.0]",)}


def _sets(overrides: tuple[str, ...]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_the_examples_are_there() -> None:
    names = {p.stem for p in SWEEPS}
    assert names >= {"sonar", "sonar-l1-vs-l2", "digits", "diabetes", "grouped", "timeseries"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_each_example_is_documented_and_validates_as_shipped(path: Path, workdir: Path) -> None:
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert len(header) >= 2 and any("foldsweep run sweeps/" in line for line in header), "header: what and how"
    result = CliRunner().invoke(cli, ["validate", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["sweep"] == yaml.safe_load(path.read_text())["name"]
    assert info["dev_rows"] > 0 and info["test_rows"] > 0


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_each_example_runs_on_a_tiny_budget(path: Path, workdir: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, ["run", str(path), "--json", *_sets(TINY_BUDGET)])
    assert result.exit_code == 0, result.stderr
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "/foldsweep/" in w.filename]
    assert not ours  # a warning raised at our line would land on the user's terminal
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    spec = load_spec(path)
    assert summary["sweep"] == spec.name
    assert spec.data.metric in ("auto", summary["metric"])
    assert len(summary["nested"]["outer"]) == 2 and math.isfinite(summary["nested"]["mean"])
    assert set(summary["final"]["best_params"]) == set(spec.search)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_per_family_variants_pin_the_other_penalty(name: str, workdir: Path) -> None:
    path = Path(__file__).resolve().parents[2] / "sweeps" / "sonar-l1-vs-l2.yaml"
    overrides = (f"name={name}", *VARIANTS[name], *TINY_BUDGET)
    result = CliRunner().invoke(cli, ["run", str(path), "--json", *_sets(overrides)])
    assert result.exit_code == 0, result.stderr
    best = json.loads(result.stdout.strip().splitlines()[-1])["final"]["best_params"]
    pinned = "weight_decay" if name == "sonar-l1" else "l1"
    assert best[pinned] == 0.0
