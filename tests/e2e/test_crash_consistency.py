"""Crash consistency: whatever stops a sweep (a full disk, SIGKILL, Ctrl-C, a deleted MLflow store), the
same command run again ends with exactly n_trials finished per study, no configuration lost or run twice,
MLflow agreeing with Optuna on every trial, and nothing already computed thrown away."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from click.testing import CliRunner
from conftest import mounted_tmpfs, tiny_spec
from mlflow import MlflowClient
from optuna.trial import TrialState
from sweep_procs import check_consistent, finish, start, trials, wait_for

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
    """16 kB: the journal fills it a few rounds in."""
    yield from mounted_tmpfs(tmp_path / "disk", "16k")


@pytest.fixture
def mlflow_disk(tmp_path: Path) -> Iterator[Path]:
    """1.4 MB: MLflow's empty database takes 1.2 MB, so trial runs fill it."""
    yield from mounted_tmpfs(tmp_path / "mlflow-disk", "1400k")


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


@pytest.mark.slow  # ~3 min on 2 busy cores: MLflow's store is created on a nearly full disk, then the sweep again
def test_a_full_mlflow_disk_ends_in_one_line_and_the_rerun_resumes(write_spec, mlflow_disk: Path) -> None:
    spec = write_spec(tracking={"uri": f"sqlite:///{mlflow_disk}/mlflow.db"})
    code, _, err = finish(start("run", str(spec), cwd=spec.parent))
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: disk full while writing the MLflow store")
    assert "Traceback" not in err and "not fully written" not in err, err  # one line in all, not three
    subprocess.run(["mount", "-o", "remount,size=64m", str(mlflow_disk)], check=True)
    code, out, err = finish(start("run", str(spec), "--json", cwd=spec.parent))
    assert code == 0, err
    check_consistent(JOURNAL, json.loads(out.strip().splitlines()[-1]))


def configs(journal: str) -> dict[tuple[str, int], str]:
    """The configuration each (study, slot) was finished with."""
    return {(key, int(t.user_attrs["slot"])): json.dumps(t.params, sort_keys=True)
            for key, found in trials(journal, "tiny").items() for t in found
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}


def scores(journal: str) -> dict[tuple[str, int], float | None]:
    """The value each (study, slot) finished with."""
    return {(key, int(t.user_attrs["slot"])): t.value for key, found in trials(journal, "tiny").items() for t in found
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
            assert threading.current_thread() is threading.main_thread()
            # a real Ctrl-C, while the round's other trials wait to be told. raise_signal delivers it to this
            # thread, so its handler runs at the next instruction; os.kill could hand it to any of the process's
            # threads, and the interpreter would then act on it only later (once, under load, after the round)
            signal.raise_signal(signal.SIGINT)

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


# -- kill points spread over a run -------------------------------------------------------------------------
# (what counts, its Nth occurrence, the signal, workers). A tiny sweep makes ~120 journal writes and 6 trial
# runs; journal kills land halfway through a record, MLflow kills between a trial's run and Optuna's tell.
FAST_POINTS = [("journal", 25, "KILL", 1), ("mlflow", 2, "INT", 1)]
SLOW_POINTS = [*[("journal", n, sig, 1) for n, sig in ((3, "KILL"), (12, "INT"), (40, "INT"), (55, "KILL"),
                                                       (70, "INT"), (85, "KILL"), (100, "INT"))],
               *[("mlflow", n, sig, 1) for n, sig in ((1, "KILL"), (4, "KILL"), (5, "INT"), (6, "KILL"))],
               *[("journal", n, sig, 2) for n, sig in ((10, "KILL"), (30, "INT"), (50, "KILL"), (70, "INT"))],
               *[("mlflow", n, sig, 2) for n, sig in ((1, "INT"), (2, "KILL"), (3, "INT"), (5, "KILL"))],
               # the end of a run: after each outer refit, after the summary (the warm start: its own test below)
               ("refit", 1, "KILL", 1), ("refit", 2, "INT", 1), ("summary", 1, "KILL", 1)]


@pytest.mark.parametrize(("kind", "nth", "sig", "workers"), [
    *FAST_POINTS, *[pytest.param(*point, marks=pytest.mark.slow) for point in SLOW_POINTS]])
def test_a_sweep_killed_anywhere_resumes_to_the_same_trials(kind: str, nth: int, sig: str, workers: int, write_spec,
                                                            workdir: Path, baseline) -> None:
    spec = write_spec(optuna={**tiny_spec()["optuna"], **SAMPLED["optuna"]},
                      resources={"devices": "cpu", "workers": workers})
    code, _, err = finish(start("run", str(spec), cwd=workdir, env={CRASH_ENV: f"{kind}:{nth}:{sig}"}))
    stopped = -signal.SIGKILL if sig == "KILL" else 130
    assert code in ((stopped,) if workers == 1 else (stopped, 0)), err  # with 2, the helper may be the one stopped
    assert "Traceback" not in err

    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    check_consistent(JOURNAL, summary)
    # With two workers, which asks which slot first is a race. With one, configurations equal the uninterrupted
    # ones, unless the kill fell between a trial's creation and its holder stamp: that trial is found dead only
    # after the heartbeat grace, and the rerun has moved past its round by then (docs/crash-safety.md, "Not covered").
    unstamped = [t for ts in trials(JOURNAL, "tiny").values() for t in ts
                 if "stopped answering" in t.user_attrs.get("reason", "")]
    if workers == 1 and not unstamped:
        assert configs(JOURNAL) == baseline[1]


PURE_FITS = importlib.util.find_spec("foldsweep.rng") is not None
SEARCHED = {"optuna": {**tiny_spec()["optuna"], "n_trials": 4}}  # slots 2 and 3 are TPE's, from 0 and 1's scores


@pytest.mark.slow  # ~7 min on 2 busy cores: four sweeps of 4 trials per study
@pytest.mark.xfail(not PURE_FITS, strict=False, reason="a fit still depends on the batch it trains in (one random "
                   "generator per batch); a resumed round trains other batches, so scores, TPE's later suggestions "
                   "and the estimate move until the engine's per-model random streams (foldsweep.rng) land")
def test_the_nested_estimate_after_kills_equals_that_of_an_uninterrupted_run(write_spec, workdir: Path,
                                                                            tmp_path_factory) -> None:
    clean = tmp_path_factory.mktemp("clean")
    (clean / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(**SEARCHED), sort_keys=False))
    code, out, err = finish(start("run", "tiny.yaml", "--json", cwd=clean))
    assert code == 0, err
    uninterrupted = json.loads(out.strip().splitlines()[-1])

    spec = write_spec(**SEARCHED)
    for point in ("journal:60:KILL", "mlflow:3:INT"):
        finish(start("run", str(spec), cwd=workdir, env={CRASH_ENV: point}))
    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    check_consistent(JOURNAL, summary, n_trials=4)
    assert scores(JOURNAL) == scores(str(clean / JOURNAL))
    assert configs(JOURNAL) == configs(str(clean / JOURNAL))
    assert summary["nested"] == uninterrupted["nested"]
    assert summary["final"]["best_params"] == uninterrupted["final"]["best_params"]


WARM_TWO = {"optuna": {**tiny_spec()["optuna"], "n_trials": 3}}  # final: 1 sampled slot, 2 for the outer bests


@pytest.mark.slow  # ~2 min on 2 busy cores: two sweeps of 3 trials per study
@pytest.mark.parametrize("sig", ["KILL", "INT"])
def test_a_kill_between_two_warm_start_enqueues_resumes_to_the_uninterrupted_final_study(write_spec, workdir: Path,
                                                                                        tmp_path_factory,
                                                                                        sig: str) -> None:
    clean = tmp_path_factory.mktemp("clean-warm")
    (clean / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(**WARM_TWO), sort_keys=False))
    code, out, err = finish(start("run", "tiny.yaml", "--json", cwd=clean))
    assert code == 0, err
    uninterrupted = json.loads(out.strip().splitlines()[-1])

    spec = write_spec(**WARM_TWO)
    code, _, err = finish(start("run", str(spec), cwd=workdir, env={CRASH_ENV: f"warm_start:1:{sig}"}))
    assert code == (-signal.SIGKILL if sig == "KILL" else 130), err
    copied = [t.user_attrs["warm_start_from"] for t in trials(JOURNAL, "tiny")["final"]
              if "warm_start_from" in t.user_attrs]
    assert copied == ["outer-0"]  # the journal holds one of the two outer bests

    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    check_consistent(JOURNAL, summary, n_trials=3)
    assert configs(JOURNAL) == configs(str(clean / JOURNAL))
    assert summary["final"]["best_params"] == uninterrupted["final"]["best_params"]
    assert summary["nested"] == uninterrupted["nested"]


def _stopped(proc: subprocess.Popen[str]) -> bool:
    return psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED


def test_a_second_run_of_a_running_sweep_refuses_in_one_line_and_a_kill_frees_the_sweep(write_spec,
                                                                                       workdir: Path) -> None:
    """Issue 23 item 3: two `run`s of one sweep at once made two MLflow trees (every trial logged twice) and the
    slower one trained trials only to discard them as surplus. The second now refuses, naming the first."""
    spec = write_spec()
    first = start("run", str(spec), cwd=workdir, env={CRASH_ENV: "mlflow:1:STOP"})  # frozen mid-round
    try:
        wait_for(lambda: _stopped(first), first)
        code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))
        assert code == 2, err
        line = err.strip().splitlines()
        assert len(line) == 1 and line[0].startswith(f"error: sweep `tiny` is being run by pid {first.pid} since "), err
        assert line[0].endswith("; wait for it, or add workers with `foldsweep worker mlruns/sweeps/tiny/spec.yaml "
                                "--storage mlruns/optuna/tiny.journal`"), err
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))  # the kill released the lock
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["resumed"] is True
    check_consistent(JOURNAL, summary)  # one run per name: one sweep run, one per study, one per trial


def _trial_runs(workdir: Path) -> int:
    """Trial runs in the MLflow store so far (read beside the sweep that writes it)."""
    path = workdir / "mlruns" / "mlflow.db"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM runs WHERE name LIKE '%/trial-%'").fetchone()[0])
        except sqlite3.OperationalError:  # the schema is still being made
            return 0


def _journal_has(workdir: Path, text: str) -> int:
    path = workdir / JOURNAL
    return path.read_text(errors="replace").count(text) if path.exists() else 0


def _stop_when(proc: subprocess.Popen[str], event: Callable[[], bool], sig: signal.Signals) -> None:
    """Signal the sweep's process group as soon as `event` holds; a sweep that ends first is left to end."""
    while proc.poll() is None and not event():
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    finish(proc)


@pytest.mark.slow  # ~40 s on 2 busy cores: four interrupted runs of the tiny sweep, then the one that finishes it
def test_mlflow_equals_optuna_on_every_trial_after_a_sequence_of_kills(write_spec, workdir: Path) -> None:
    """Issue 23 item 4: after kills (one in the warm start of `final`) and a Ctrl-C, trials failed in Optuna
    had no MLflow run, or a bare FAILED one that did not name its trial. Each kill here waits on an event of the
    running sweep (a trial run in MLflow, the warm start's enqueued trials in the journal)."""
    spec = write_spec(resources={"devices": "cpu", "workers": 2})
    events = [(lambda: _trial_runs(workdir) >= 1, signal.SIGKILL),
              (lambda: _journal_has(workdir, "fixed_params") >= 1, signal.SIGKILL),
              (lambda: _trial_runs(workdir) >= 5, signal.SIGINT),
              (lambda: _journal_has(workdir, '"refit"') >= 1, signal.SIGKILL)]
    for event, sig in events:
        _stop_when(start("run", str(spec), cwd=workdir), event, sig)
    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))
    assert code == 0, err
    assert "Traceback" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    check_consistent(JOURNAL, summary)  # every trial, any state: one run, Optuna's status, the tags naming it
    lost = [t for ts in trials(JOURNAL, "tiny").values() for t in ts if t.state == TrialState.FAIL]
    assert lost  # the kills did lose trials: their runs were checked too


def test_a_project_on_a_full_disk_ends_in_one_line_in_all(tmp_path: Path) -> None:
    """Journal, record and MLflow store on one small disk: four 'not fully written to MLflow' lines came first."""
    for disk in mounted_tmpfs(tmp_path / "project", "1800k"):
        (disk / "tiny.yaml").write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
        code, _, err = finish(start("run", "tiny.yaml", cwd=disk))
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: disk full while writing"), err
