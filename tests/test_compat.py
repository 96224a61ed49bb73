"""The one door to Optuna's and MLflow's private parts: nothing else reaches them, and a missing one says so."""

from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest

from foldsweep.compat import IncompatibleLibrary, seed_sampler, storage_of, trial_id

SOURCE = Path(__file__).resolve().parents[1] / "src" / "foldsweep"
STDLIB = {"_exit", "_run_exitfuncs"}  # os._exit (public, despite its name); atexit's runner, for `cli._exit_now`


def _own_private_names() -> set[str]:
    """Every `_name` foldsweep itself defines (functions, classes, attributes it assigns)."""
    names: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {name for name in names if name.startswith("_")}


def test_no_module_but_compat_reaches_a_private_part_of_another_library() -> None:
    own = _own_private_names()
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("optuna", "mlflow"):
                private = [part for part in node.module.split(".") if part.startswith("_")]
                private += [alias.name for alias in node.names if alias.name.startswith("_")]
                if private:
                    found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in own | STDLIB:
                    found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not found, found


def test_the_checker_sees_a_private_attribute(tmp_path: Path) -> None:
    """The grep above would pass vacuously if it looked at nothing: it finds what today's code hides in compat."""
    tree = ast.parse((SOURCE / "compat.py").read_text())
    reached = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert {"_storage", "_trial_id", "_get_trials", "_get_stale_trial_ids", "_rng"} <= (reached | strings)
    assert "_storage" not in _own_private_names()


def _startup_draw(sampler: optuna.samplers.BaseSampler, seed: int | None) -> float:
    study = optuna.create_study(sampler=sampler)
    if seed is not None:
        seed_sampler(sampler, seed)
    trial = study.ask()
    return trial.suggest_float("x", 0.0, 1.0)


@pytest.mark.parametrize("make", [lambda: optuna.samplers.TPESampler(seed=0),
                                  lambda: optuna.samplers.RandomSampler(seed=0)])
def test_reseeding_really_changes_the_samplers_draws(make) -> None:
    """A reseed that silently did nothing (a renamed `_rng`) would break every resumed sweep's determinism."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert _startup_draw(make(), 5) == _startup_draw(make(), 5)
    assert _startup_draw(make(), 5) != _startup_draw(make(), 6)
    assert _startup_draw(make(), 5) != _startup_draw(make(), None)


def test_a_sampler_without_a_random_state_is_refused_not_skipped() -> None:
    class Fixed(optuna.samplers.RandomSampler):
        def __init__(self) -> None:  # no `_rng`: as if Optuna renamed it
            pass

    with pytest.raises(IncompatibleLibrary, match=r"cannot seed the random state of Fixed .*supported range"):
        seed_sampler(Fixed(), 1)


def test_a_missing_private_part_names_itself_and_the_supported_versions() -> None:
    class Bare:
        pass

    with pytest.raises(IncompatibleLibrary, match=r"no `Bare._storage`, which foldsweep relies on; install versions"):
        storage_of(Bare())  # type: ignore[arg-type]
    with pytest.raises(IncompatibleLibrary, match=r"no `Bare._trial_id`"):
        trial_id(Bare())  # type: ignore[arg-type]
