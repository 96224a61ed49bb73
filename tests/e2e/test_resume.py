"""Resume: a sweep killed with SIGKILL or stopped with Ctrl-C continues where it was; --fresh starts beside it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_procs import check_consistent, finish, finished, start, states, trials, wait_for

from foldsweep.cli import cli

# Two worker processes, one trial (two inner folds) per round: a few seconds in, trials are mid-flight.
BUSY = {"resources": {"devices": "cpu", "workers": 2, "models_per_batch": 2},
        "train": {"epochs": 150, "patience": 150, "batch_size": 32},
        "optuna": {"n_trials": 4, "trials_per_batch": 1, "n_startup_trials": 2, "report_every": 5}}
EXACT = {"outer-0": 4, "outer-1": 4, "final": 4}


def _progress(journal: Path, at_least: int) -> bool:
    """True once `at_least` trials finished and one is running: the moment to pull the plug."""
    if not journal.exists():
        return False
    found = trials(str(journal), "tiny")
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for ts in found.values() for t in ts)
    running = any(t.state == TrialState.RUNNING for ts in found.values() for t in ts)
    return done >= at_least and running


def _refit_history(summary: dict) -> dict[str, list[float]]:
    """Every outer_test_score ever logged per outer study run: one value per refit."""
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = client.search_runs([summary["mlflow"]["experiment_id"]], "tags.`foldsweep.study` LIKE 'outer-%'")
    return {r.data.tags["foldsweep.study"]: [m.value for m in client.get_metric_history(r.info.run_id,
                                                                                      "outer_test_score")]
            for r in runs}


@pytest.mark.slow  # ~60 s: three sweep processes start up, one is killed, the sweep is run twice more
def test_a_sweep_killed_with_sigkill_resumes_to_exactly_n_trials_without_refitting_twice(write_spec,
                                                                                         workdir: Path) -> None:
    spec = write_spec(**BUSY)
    journal = workdir / "mlruns" / "optuna" / "tiny.journal"
    first = start("run", str(spec), cwd=workdir)
    wait_for(lambda: _progress(journal, at_least=2), first)
    os.killpg(first.pid, signal.SIGKILL)  # the coordinator and its worker
    first.wait()
    left = [t.number for ts in trials(str(journal), "tiny").values() for t in ts if t.state == TrialState.RUNNING]
    assert left, "the kill should leave trials RUNNING"

    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["resumed"] is True
    after = trials(str(journal), "tiny")
    assert {key: finished(c) for key, c in states(str(journal), "tiny").items()} == EXACT
    assert all(t.state not in (TrialState.RUNNING, TrialState.WAITING) for ts in after.values() for t in ts)
    dead = [t for ts in after.values() for t in ts if "died while running it" in t.user_attrs.get("reason", "")]
    assert dead, [t.user_attrs.get("reason") for ts in after.values() for t in ts if t.state == TrialState.FAIL]
    assert all(t.state == TrialState.FAIL and t.user_attrs["lost"] for t in dead)

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = client.search_runs([summary["mlflow"]["experiment_id"]])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert client.get_run(summary["mlflow"]["run_id"]).info.status == "FINISHED"  # the reopened sweep run
    assert _refit_history(summary) == {key: [score] for key, score in
                                       zip(("outer-0", "outer-1"), summary["nested"]["outer"])}

    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))  # a finished sweep: nothing to redo
    assert code == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["nested"] == summary["nested"]
    assert _refit_history(again) == _refit_history(summary)  # still one refit per outer fold
    assert {key: finished(c) for key, c in states(str(journal), "tiny").items()} == EXACT


@pytest.mark.slow  # ~40 s: a two-worker sweep is interrupted and run again
def test_ctrl_c_twice_exits_130_tells_how_to_resume_and_the_rerun_finishes(write_spec, workdir: Path) -> None:
    spec = write_spec(**BUSY)
    journal = workdir / "mlruns" / "optuna" / "tiny.journal"
    first = start("run", str(spec), cwd=workdir)
    wait_for(lambda: _progress(journal, at_least=1), first)
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C on a terminal does: the whole foreground group
    time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(first.pid, signal.SIGINT)  # an impatient second Ctrl-C must not cut the recording short
    code, _, err = finish(first, timeout=120)
    assert code == 130, err
    assert f"interrupted: finished trials are kept; resume with: foldsweep run {spec}" in err
    logs = "".join(p.read_text() for p in (workdir / "mlruns" / "sweeps" / "tiny" / "logs").glob("*.log"))
    assert "Traceback" not in err + logs  # the helper stopped as cleanly as the coordinator
    found = trials(str(journal), "tiny")
    assert all(t.state != TrialState.RUNNING for ts in found.values() for t in ts)  # told, not left hanging
    stopped = [t for ts in found.values() for t in ts if t.user_attrs.get("reason", "").startswith("interrupted")]
    assert stopped and all(t.state == TrialState.FAIL and t.user_attrs["lost"] for t in stopped)

    code, _, err = finish(start("run", str(spec), "--json", cwd=workdir))
    assert code == 0, err
    assert {key: finished(c) for key, c in states(str(journal), "tiny").items()} == EXACT


def test_fresh_starts_a_new_sweep_beside_the_old_one(write_spec, workdir: Path) -> None:
    spec = write_spec()
    assert CliRunner().invoke(cli, ["run", str(spec), "--json"]).exit_code == 0
    result = CliRunner().invoke(cli, ["run", str(spec), "--fresh", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sweep"] == "tiny-2" and summary["resumed"] is False
    assert summary["storage"].endswith("tiny-2.journal")
    sweeps = workdir / "mlruns" / "sweeps"
    assert sorted(p.name for p in sweeps.iterdir()) == ["tiny", "tiny-2"]  # the first one is untouched
    status = json.loads(CliRunner().invoke(cli, ["status", "--json"]).stdout)
    assert [(s["sweep"], [row["finished"] for row in s["studies"]]) for s in status] == [("tiny", [2, 2, 2]),
                                                                                         ("tiny-2", [2, 2, 2])]


def test_more_trials_extend_a_finished_sweep_and_bring_refits_and_final_up_to_date(write_spec, workdir: Path) -> None:
    spec = str(write_spec())
    journal = str(workdir / "mlruns" / "optuna" / "tiny.journal")
    first = CliRunner().invoke(cli, ["run", spec, "--json"])
    assert first.exit_code == 0, first.stderr

    more = CliRunner().invoke(cli, ["run", spec, "--set", "optuna.n_trials=3", "--json"])
    assert more.exit_code == 0, more.stderr
    assert "sweep `tiny`: optuna.n_trials 2 -> 3; each study gets 1 more trial(s)" in more.stderr
    summary = json.loads(more.stdout.strip().splitlines()[-1])
    check_consistent(journal, summary, n_trials=3)
    found = trials(journal, "tiny")
    meta = json.loads((workdir / "mlruns" / "sweeps" / "tiny" / "record.json").read_text())
    for i, refit in enumerate(meta["summary"]["outer_refits"]):  # refit from the best of all 3 trials
        complete = [t for t in found[f"outer-{i}"] if t.state == TrialState.COMPLETE]
        assert refit["best_inner_value"] == max(t.value for t in complete)
    assert [c["n_trials"] for c in meta["changes"]] == [[2, 3]]
    run = MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(summary["mlflow"]["run_id"])
    assert run.data.tags["foldsweep.n_trials"] == "3" and run.data.tags["foldsweep.changes"] == "n_trials 2 -> 3"
    status = json.loads(CliRunner().invoke(cli, ["status", "tiny", "--json"]).stdout)[0]["studies"]
    assert [(row["finished"], row["n_trials"]) for row in status] == [(3, 3)] * 3

    fewer = CliRunner().invoke(cli, ["run", spec, "--set", "optuna.n_trials=2"])
    assert fewer.exit_code == 2
    assert fewer.stderr == ("error: sweep `tiny` runs with optuna.n_trials=3; a rerun can add trials but not drop "
                            "finished ones (got 2): keep 3 or more, or rerun with --fresh\n")
    other = CliRunner().invoke(cli, ["run", spec, "--set", "optuna.n_trials=3", "--set", "train.epochs=7"])
    assert other.exit_code == 2
    assert "only optuna.n_trials (more trials) and resources may change on a rerun" in other.stderr


@pytest.mark.slow
def test_a_project_folder_copied_elsewhere_resumes_and_logs_into_its_own_store(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The record kept absolute paths: the copy refused a rerun as 'other settings' and its `test` logged its
    look into the original's MLflow store."""
    import shutil

    import pandas as pd
    import yaml
    from conftest import tiny_spec

    from foldsweep.data import load_dataset
    from foldsweep.spec import DataSpec

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    sonar = load_dataset(DataSpec(dataset="sonar"))
    frame = pd.DataFrame(sonar.X, columns=sonar.feature_names).assign(label=[sonar.classes[i] for i in sonar.y])
    frame.to_csv(original / "sonar.csv", index=False)
    spec = tiny_spec(data={"dataset": None, "path": "sonar.csv", "target": "label"})
    (original / "tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.delenv("FOLDSWEEP_HOME", raising=False)
    monkeypatch.chdir(original)
    assert CliRunner().invoke(cli, ["run", "tiny.yaml"]).exit_code == 0
    shutil.copytree(original, copy)
    monkeypatch.chdir(copy)
    rerun = CliRunner().invoke(cli, ["run", "tiny.yaml", "--json"])
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["resumed"] is True
    looked = CliRunner().invoke(cli, ["test", "tiny"])
    assert looked.exit_code == 0, looked.stderr

    def looks_logged(folder: Path) -> int:
        meta = json.loads((folder / "mlruns/sweeps/tiny/record.json").read_text())
        client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
        return len(client.get_metric_history(meta["mlflow_runs"]["sweep"], "test_score"))

    assert (looks_logged(copy), looks_logged(original)) == (1, 0)
