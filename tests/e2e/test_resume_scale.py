"""Resume at scale: a 10^6-row sweep killed with SIGKILL mid-way resumes like a small one, and starts in seconds."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from optuna.trial import TrialState
from sweep_procs import check_consistent, finish, start, trials, wait_for

ROWS, FEATURES = 1_000_000, 20
SCALE = {"data": {"dataset": None, "path": "big.parquet", "target": "y"},
         "split": {"test_size": 0.2, "seed": 0, "outer": {"k": 2}, "inner": {"k": 2}},
         "train": {"epochs": 1, "patience": 1, "batch_size": 1024},
         "search": {"batch_size": {"type": "categorical", "choices": [1024, 2048]}},
         "optuna": {"n_trials": 3, "trials_per_batch": 1, "n_startup_trials": 1, "report_every": 1},
         "resources": {"devices": "cpu", "workers": 1, "models_per_batch": 2}}
STARTUP_PHASES = ("start-up and imports", "data and plan", "store set-up")


def _write_table(path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((ROWS, FEATURES), dtype=np.float32)
    y = np.where(X[:, 0] + 0.5 * rng.standard_normal(ROWS, dtype=np.float32) > 0, "pos", "neg")
    columns = {f"f{i}": X[:, i] for i in range(FEATURES)} | {"y": y}
    pq.write_table(pa.table(columns), path, row_group_size=250_000)


def _phases(stderr: str) -> dict[str, float]:
    """Seconds per phase from `--profile`'s table (`phase  seconds  share`)."""
    found = {}
    for name in STARTUP_PHASES:
        match = re.search(rf"^{re.escape(name)}\s+([0-9.]+)", stderr, re.MULTILINE)
        assert match, (name, stderr[-2000:])
        found[name] = float(match.group(1))
    return found


def _one_done_one_running(journal: Path) -> bool:
    if not journal.exists():
        return False
    found = trials(str(journal), "tiny")
    done = sum(t.state == TrialState.COMPLETE for ts in found.values() for t in ts)
    return done >= 1 and any(t.state == TrialState.RUNNING for ts in found.values() for t in ts)


@pytest.mark.slow  # ~2-4 min on 2 cores: a 10^6-row table, a killed sweep, its resume
def test_a_million_row_sweep_killed_mid_way_resumes_to_exactly_n_trials(write_spec, workdir: Path) -> None:
    _write_table(workdir / "big.parquet")
    spec = write_spec(**SCALE)
    journal = workdir / "mlruns" / "optuna" / "tiny.journal"
    first = start("run", str(spec), cwd=workdir)
    wait_for(lambda: _one_done_one_running(journal), first, timeout=600)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = trials(str(journal), "tiny")
    assert any(t.state == TrialState.RUNNING for ts in before.values() for t in ts)
    record = workdir / "mlruns" / "sweeps" / "tiny"
    assert (record / "record.json").stat().st_size < 4_000  # the plan is in plan.npz, not in the JSON

    code, out, err = finish(start("run", str(spec), "--json", "--profile", cwd=workdir), timeout=900)
    assert code == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["resumed"] is True
    check_consistent(str(journal), summary, n_trials=3)  # exactly n_trials, nothing twice, MLflow agrees
    finished_before = {(key, t.number) for key, ts in before.items() for t in ts if t.state == TrialState.COMPLETE}
    after = trials(str(journal), "tiny")
    assert finished_before <= {(key, t.number) for key, ts in after.items() for t in ts
                               if t.state == TrialState.COMPLETE}
    phases = _phases(err)
    print(f"resume start-up at {ROWS:,} rows: {phases}")
    assert phases["data and plan"] < 30, phases  # load, fingerprint, record and plan.npz read: seconds
