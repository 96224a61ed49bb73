"""Crash consistency: whatever stops a sweep (a full disk, SIGKILL, Ctrl-C, a deleted MLflow store), the
same command run again ends with exactly n_trials finished per study, no configuration lost or run twice,
MLflow agreeing with Optuna on every trial, and nothing already computed thrown away."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_procs import STUDIES, trials

from foldsweep.cli import cli

N = 2  # the tiny sweep's n_trials


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 kB file system (tmpfs) that the test can grow once space 'comes back'."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def check_consistent(journal: str, summary: dict, n_trials: int = N) -> None:
    """Exactly n_trials finished per study, no configuration twice, and MLflow agreeing with Optuna."""
    found = trials(journal, "tiny")
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = {r.info.run_name: r for r in client.search_runs([summary["mlflow"]["experiment_id"]], max_results=5000)}
    for key in STUDIES:
        done = [t for t in found[key] if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == n_trials, (key, [(t.number, t.state.name) for t in found[key]])
        configs = [json.dumps(t.params, sort_keys=True) for t in done]
        assert len(set(configs)) == len(configs), (key, configs)  # none evaluated twice
        assert not [t for t in found[key] if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        for t in done:
            run = runs[f"{key}/trial-{t.number}"]
            want = "FINISHED" if t.state == TrialState.COMPLETE else "KILLED"
            assert run.info.status == want, (key, t.number, t.state.name, run.info.status)
            if t.state == TrialState.COMPLETE:
                metric = summary["metric"]
                assert run.data.metrics[metric] == pytest.approx(t.value), (key, t.number)


def test_a_full_disk_ends_in_one_line_and_the_rerun_resumes_exactly(write_spec, small_disk: Path) -> None:
    spec = write_spec()
    journal = str(small_disk / "tiny.journal")
    first = CliRunner().invoke(cli, ["run", str(spec), "--storage", journal, "--json"])
    assert first.exit_code == 2, first.output
    assert first.stderr.strip().splitlines()[-1].startswith("error: disk full while writing the Optuna journal")
    assert "Traceback" not in first.stderr
    assert Path(journal).read_bytes().endswith(b"\n")  # no half record left behind

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)  # space comes back
    second = CliRunner().invoke(cli, ["run", str(spec), "--storage", journal, "--json"])
    assert second.exit_code == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["resumed"] is True
    check_consistent(journal, summary)
