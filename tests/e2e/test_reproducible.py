"""Same spec, same seed, one CPU worker, two fresh folders: the same trials, the same scores, the same estimate."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec

from foldsweep.cli import cli
from foldsweep.studies import open_existing


def _sweep_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, list[tuple]]]:
    folder.mkdir()
    monkeypatch.chdir(folder)
    spec = folder / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tracking={"enabled": False}, optuna={"pruner": "median"})))
    result = CliRunner().invoke(cli, ["run", str(spec), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    _, refs = open_existing("tiny")
    trials = {ref.key: [(t.number, t.state.name, t.params, t.value, t.user_attrs.get("fold_scores"),
                         t.intermediate_values) for t in ref.study.get_trials(deepcopy=False)] for ref in refs}
    return summary, trials


def test_two_runs_of_one_spec_give_identical_trials_and_scores(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FOLDSWEEP_HOME", raising=False)
    first_summary, first = _sweep_in(tmp_path / "a", monkeypatch)
    second_summary, second = _sweep_in(tmp_path / "b", monkeypatch)
    assert os.path.exists(tmp_path / "a" / "mlruns") and os.path.exists(tmp_path / "b" / "mlruns")
    assert sum(len(ts) for ts in first.values()) >= 6
    assert first == second
    for key in ("nested", "final", "optimism"):
        assert first_summary[key] == second_summary[key]
