"""Helpers for tests that run `foldsweep` as real processes (to kill them, interrupt them, run several)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from foldsweep.storage import preflight

STUDIES = ("outer-0", "outer-1", "final")
LOCK_WORDS = ("database is locked", "lock file", "could not obtain lock", "deadlock")


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`foldsweep ARGS` in its own process group (so a test can signal it and its helpers together)."""
    return subprocess.Popen([sys.executable, "-m", "foldsweep", *args], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def trials(storage: str, sweep: str) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """Every trial of every study of the sweep, read straight from its Optuna storage."""
    opened = preflight(storage, 1)
    names = set(optuna.get_all_study_names(opened))
    return {key: optuna.load_study(study_name=f"{sweep}/{key}", storage=opened).get_trials(deepcopy=False)
            if f"{sweep}/{key}" in names else [] for key in STUDIES}


def states(storage: str, sweep: str) -> dict[str, Counter[str]]:
    return {key: Counter(t.state.name for t in found) for key, found in trials(storage, sweep).items()}


def finished(counts: Counter[str]) -> int:
    return counts[TrialState.COMPLETE.name] + counts[TrialState.PRUNED.name]


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 180) -> None:
    """Poll until `condition` holds; fail early (with the process's stderr) if the process ends first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before the condition held: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.time() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(0.2)


def worker_names(storage: str, sweep: str) -> Counter[str]:
    """How many finished trials each worker ran (the `worker` attribute a worker stamps on what it asks)."""
    return Counter((t.user_attrs.get("worker") or {}).get("name", "?") for found in trials(storage, sweep).values()
                   for t in found if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


def lock_errors(*texts: str) -> list[str]:
    return [line for text in texts for line in text.splitlines() if any(w in line.lower() for w in LOCK_WORDS)]


def check_consistent(journal: str, summary: dict[str, Any], n_trials: int = 2) -> None:
    """Exactly n_trials finished per study, no configuration twice, and MLflow agreeing with Optuna."""
    found = trials(journal, "tiny")
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    every = client.search_runs([summary["mlflow"]["experiment_id"]], max_results=5000)
    runs = {r.info.run_name: r for r in every}
    twice = {name: n for name, n in Counter(r.info.run_name for r in every).items() if n > 1}
    assert not twice, twice  # one run per name: nothing made twice
    assert [r.info.run_name for r in every if r.info.status == "RUNNING"] == []
    for key in STUDIES:
        for t in found[key]:
            if t.state == TrialState.FAIL and f"{key}/trial-{t.number}" in runs:
                assert runs[f"{key}/trial-{t.number}"].info.status == "FAILED", (key, t.number)
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
    check_runs_match_trials(journal, summary)


RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


def check_runs_match_trials(journal: str, summary: dict[str, Any], sweep: str = "tiny") -> None:
    """MLflow equal to Optuna on every trial, in any state: one run under its study's run, with Optuna's status
    and the tags that name the trial (`optuna.study`, `optuna.trial_number`, `searched.*`); no run besides."""
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    every = client.search_runs([summary["mlflow"]["experiment_id"]], max_results=5000)
    study_runs = {r.info.run_name: r.info.run_id for r in every
                  if r.data.tags.get("mlflow.parentRunId") == summary["mlflow"]["run_id"]}
    for key, found in trials(journal, sweep).items():
        under = Counter(r.info.run_name for r in every if r.data.tags.get("mlflow.parentRunId") == study_runs[key])
        assert under == Counter(f"{key}/trial-{t.number}" for t in found), (key, under)
        runs = {r.info.run_name: r for r in every if r.data.tags.get("mlflow.parentRunId") == study_runs[key]}
        for t in found:
            run = runs[f"{key}/trial-{t.number}"]
            assert run.info.status == RUN_STATUS[t.state], (key, t.number, t.state.name, run.info.status)
            want = {"optuna.study": f"{sweep}/{key}", "optuna.trial_number": str(t.number),
                    **{f"searched.{k}": str(v) for k, v in t.params.items()}}
            assert {k: run.data.tags.get(k) for k in want} == want, (key, t.number, t.state.name)
