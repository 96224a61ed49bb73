"""Crash consistency: whatever stops a sweep (a full disk, SIGKILL, Ctrl-C, a deleted MLflow store), the
same command run again ends with exactly n_trials finished per study, no configuration lost or run twice,
MLflow agreeing with Optuna on every trial, and nothing already computed thrown away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_procs import check_consistent, finish, start, trials

from foldsweep.cli import cli
from foldsweep.crash import CRASH_ENV
from foldsweep.spec import load_spec
from foldsweep.workers import run_sweep

# Without the warm start every configuration of the tiny sweep comes from the sampler alone (2 trials a study,
# asked in one round, are both startup samples), so configurations per slot must match an uninterrupted run
# whatever the fits score. Warm-starting `final` copies outer bests, which equal only once fits are pure.
SAMPLED = {"optuna": {"warm_start_final": False}}


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


def configs(journal: str) -> dict[tuple[str, int], str]:
    """The configuration each (study, slot) was finished with."""
    return {(key, int(t.user_attrs["slot"])): json.dumps(t.params, sort_keys=True)
            for key, found in trials(journal, "tiny").items() for t in found
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


def _summary(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[tuple[str, int], str]]:
    """The tiny sweep run once without interruption: its summary and configurations per slot."""
    folder = tmp_path_factory.mktemp("baseline")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(optuna={**tiny_spec()["optuna"], **SAMPLED["optuna"]}),
                                                     sort_keys=False))
    code, out, err = finish(start("run", "tiny.yaml", "--json", cwd=folder))
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), configs(str(folder / "mlruns" / "optuna" / "tiny.journal"))


JOURNAL = "mlruns/optuna/tiny.journal"


def test_ctrl_c_mid_round_retries_the_lost_trials_with_their_own_configuration(write_spec, workdir: Path,
                                                                                baseline) -> None:
    spec = load_spec(write_spec(optuna={**tiny_spec()["optuna"], **SAMPLED["optuna"]}))
    seen: list[str] = []

    def ctrl_c_after_the_first_trial(event: str, info: dict) -> None:
        if event == "trial" and not seen:
            seen.append(info["study"])
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, while the round's other trials wait to be told

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, progress=ctrl_c_after_the_first_trial)
    lost = [t for ts in trials(JOURNAL, "tiny").values() for t in ts if t.user_attrs.get("lost")]
    assert lost and all(t.state == TrialState.FAIL for t in lost)

    summary = _summary(CliRunner().invoke(cli, ["run", str(workdir / "tiny.yaml"), "--json"]))
    check_consistent(JOURNAL, summary)
    after = trials(JOURNAL, "tiny")
    for t in lost:  # each retried exactly once, with its own parameters, in its own slot
        retries = [r for r in after[_study_of(after, t)] if r.user_attrs.get("retry_of") == t.number]
        assert [(r.params, r.user_attrs["slot"], r.state) for r in retries] == [
            (t.params, t.user_attrs["slot"], TrialState.COMPLETE)]
    assert configs(JOURNAL) == baseline[1]  # the same configuration in every slot as without the Ctrl-C


def _study_of(found: dict[str, list], trial) -> str:
    return next(key for key, ts in found.items() if trial in ts)


def test_a_kill_between_the_mlflow_run_and_optunas_tell_ends_with_both_agreeing(write_spec, workdir: Path,
                                                                              baseline) -> None:
    spec = write_spec(optuna={**tiny_spec()["optuna"], **SAMPLED["optuna"]})
    first = start("run", str(spec), cwd=workdir, env={CRASH_ENV: "mlflow:3"})
    code, _, err = finish(first)
    assert code == -signal.SIGKILL, err
    summary = _summary(CliRunner().invoke(cli, ["run", str(spec), "--json"]))
    check_consistent(JOURNAL, summary)
    assert configs(JOURNAL) == baseline[1]


def test_a_deleted_mlflow_store_is_made_again_from_optuna(write_spec, workdir: Path) -> None:
    spec = write_spec()
    first = _summary(CliRunner().invoke(cli, ["run", str(spec), "--json"]))
    for path in (workdir / "mlruns").glob("mlflow.db*"):
        path.unlink()
    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))  # a new process: no cached connection
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert "had lost this sweep's runs (deleted or replaced): made the sweep and study runs again and 6 trial " \
           "runs from Optuna's records" in err
    assert "Traceback" not in err
    assert summary["nested"] == first["nested"]  # nothing was trained again
    check_consistent(JOURNAL, summary)
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    outer = client.search_runs([summary["mlflow"]["experiment_id"]], "tags.`foldsweep.study` = 'outer-0'")[0]
    assert outer.data.metrics["outer_test_score"] == first["nested"]["outer"][0]
