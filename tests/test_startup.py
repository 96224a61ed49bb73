"""Commands import only what they use, `run --profile` accounts for the wall time, phases cost nothing when off.

Imports are checked in a fresh interpreter per command (this test process has torch and MLflow loaded
already), by the modules it holds once the command has run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_spec, wait_for_pictures

from foldsweep import profile

PROBE = """
import json, sys
from foldsweep.cli import cli
try:
    cli(sys.argv[1:], prog_name="foldsweep")
except SystemExit as done:
    code = done.code
heavy = ("torch", "mlflow", "matplotlib", "optuna")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def _probe(folder: Path, *args: str) -> dict[str, object]:
    """Run one command in a fresh interpreter; its exit code and which heavy packages it imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one finished tiny sweep (tracking on: `report` and `export` must not need MLflow)."""
    folder = tmp_path_factory.mktemp("startup")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(optuna={"n_trials": 1, "trials_per_batch": 1}),
                                                     sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "foldsweep", "run", "tiny.yaml", "--json", "--profile"], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (folder / "profile.txt").write_text(done.stderr)
    return folder


def test_validate_imports_neither_torch_mlflow_matplotlib_nor_optuna(swept: Path) -> None:
    assert _probe(swept, "validate", "tiny.yaml") == {"code": 0, "loaded": []}


@pytest.mark.parametrize("command", [["status"], ["status", "tiny"], ["report", "tiny"], ["export", "tiny"]])
def test_commands_that_read_a_sweep_import_neither_torch_nor_mlflow(swept: Path, command: list[str]) -> None:
    assert _probe(swept, *command) == {"code": 0, "loaded": ["optuna"]}


def test_a_tracked_run_imports_neither_mlflow_nor_matplotlib(tmp_path: Path) -> None:
    """Issue 14: the sweep process paid MLflow's import (~2.5 s) before its first training step, and
    matplotlib's at its end; now the writer process imports both (on the other core) and logs the runs."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(optuna={"n_trials": 1, "trials_per_batch": 1}),
                                                       sort_keys=False))
    assert _probe(tmp_path, "run", "tiny.yaml", "--json") == {"code": 0, "loaded": ["torch", "optuna"]}
    wait_for_pictures(tmp_path / "mlruns" / "sweeps" / "tiny")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    studies = [run for run in runs if "foldsweep.study" in run.data.tags]
    assert len(runs) == 1 + 2 * len(studies) and {run.info.status for run in runs} == {"FINISHED"}
    sweep = next(run for run in runs if run.info.run_name == "tiny")
    assert {a.path for a in client.list_artifacts(sweep.info.run_id, "plots")} >= {"plots/outer_scores.png",
                                                                                    "plots/learning_curves.png"}


def test_run_profile_names_every_phase_and_they_add_up_to_the_wall_time(swept: Path) -> None:
    rows = {}
    for line in (swept / "profile.txt").read_text().splitlines():
        if line[:24].strip() in (*profile.ORDER, "other", "wall", "to first training step"):
            rows[line[:24].strip()] = float(line[24:34])
    assert set(profile.ORDER) - {profile.TRAINING} <= set(rows)  # one round: all of training is the first
    phases = sum(rows[name] for name in (*profile.ORDER, "other") if name in rows)
    assert phases == pytest.approx(rows["wall"], abs=0.01)
    assert 0 < rows["to first training step"] < rows["wall"]
    assert rows["other"] < 0.25 * rows["wall"], rows  # the phases claim nearly all of the time


def test_nested_phases_are_booked_exclusively() -> None:
    profile.enable()
    with profile.phase(profile.ASK_TELL):
        time.sleep(0.05)
        with profile.phase(profile.TRACKING):
            time.sleep(0.1)
    times = profile.snapshot()
    assert times[profile.ASK_TELL] == pytest.approx(0.05, abs=0.03)
    assert times[profile.TRACKING] == pytest.approx(0.1, abs=0.03)
    profile._clock.enabled = False


def test_nothing_is_booked_when_profiling_is_off() -> None:
    profile.enable()
    profile._clock.enabled = False
    with profile.phase(profile.TRAINING):
        time.sleep(0.01)
    assert profile.TRAINING not in profile.snapshot() and profile.FIRST not in profile.snapshot()
