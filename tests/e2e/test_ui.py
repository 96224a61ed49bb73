"""`foldsweep ui` as a person starts it: a real MLflow server over the sweep's store, asked over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import wait_for_pictures

from foldsweep.cli import cli


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status, answer.read()


def _wait_for_experiment(base: str, name: str, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"foldsweep ui exited with {proc.returncode}"
        try:
            _, body = _get(f"{base}/api/2.0/mlflow/experiments/search?max_results=10")
            found = [e for e in json.loads(body).get("experiments", []) if e["name"] == name]
            if found:
                return found[0]
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise AssertionError(f"the MLflow REST API at {base} never listed experiment {name}")


def test_ui_serves_the_sweep_experiment_and_its_artifacts(write_spec, workdir: Path) -> None:
    spec = write_spec(optuna={"n_trials": 1, "trials_per_batch": 1, "n_startup_trials": 1, "report_every": 2})
    run = CliRunner().invoke(cli, ["run", str(spec), "--json"], catch_exceptions=False)
    assert run.exit_code == 0
    sweep_run = json.loads(run.stdout.strip().splitlines()[-1])["mlflow"]["run_id"]
    wait_for_pictures(workdir / "mlruns" / "sweeps" / "tiny")
    port, log = _free_port(), workdir / "ui.out"
    with log.open("wb") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "foldsweep", "ui", "--port", str(port)], cwd=workdir,
                                stdout=stdout, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        experiment = _wait_for_experiment(base, "tiny", proc)
        status, png = _get(f"{base}/get-artifact?path=plots/outer_scores.png&run_uuid={sweep_run}")
        assert status == 200 and png.startswith(b"\x89PNG")
        deadline = time.monotonic() + 60  # the links are printed right after the server first answers (10 s was
        # too short on a loaded machine: seen failing at load 6)
        while "tiny:" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        printed = log.read_text()
        assert f"MLflow UI at {base}" in printed
        assert f"{base}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning" in printed
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with pytest.raises(ConnectionRefusedError):  # the server went with it: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_ui_without_a_store_says_where_it_looked(workdir: Path) -> None:
    result = CliRunner().invoke(cli, ["ui", "--port", str(_free_port())])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no MLflow store at ")
    assert str(workdir / "mlruns" / "mlflow.db") in result.stderr


def test_ui_on_a_taken_port_names_the_port(workdir: Path) -> None:
    (workdir / "mlruns").mkdir()
    (workdir / "mlruns" / "mlflow.db").touch()  # the port is checked before the server ever opens the store
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["ui", "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
