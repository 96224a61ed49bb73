"""`foldsweep ui`: the MLflow UI over this project's store, started, waited for and always stopped.

The server is a child process; this module owns its whole life (port check first, readiness by
polling /health, deep links once it answers, SIGTERM turned into a clean exit) so no orphan keeps the port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foldsweep.errors import FoldsweepError
from foldsweep.spec import TrackingSpec
from foldsweep.tracking.store import _absolute_sqlite, _artifact_root

__all__ = ["experiment_links", "serve_ui", "ui_command"]


def ui_command(spec: TrackingSpec, host: str, port: int) -> list[str]:
    """`mlflow server` over the spec's store; artifacts it is sent through the server land in the spec's folder."""
    uri = _absolute_sqlite(spec.uri)
    if uri.startswith(("http://", "https://")):
        raise FoldsweepError(f"tracking.uri `{uri}` is an MLflow server already: open it in a browser")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise FoldsweepError(f"no MLflow store at {uri[len('sqlite:///'):]}; run a sweep first "
                             "(`foldsweep run SPEC`) or start `foldsweep ui` in the folder that holds mlruns/")
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--artifacts-destination", _artifact_root(spec.artifact_location), "--host", host, "--port", str(port),
            "--workers", "1", "--uvicorn-opts", "--no-access-log"]


def serve_ui(spec: TrackingSpec, host: str, port: int, on_ready: Callable[[str, list[tuple[str, str]]], None],
             timeout_s: float = 120.0) -> int:
    """Run the MLflow UI until it exits or this process is stopped; `on_ready(url, links)` once it answers.

    The server is always stopped on the way out (Ctrl-C, SIGTERM, an error), so no orphan keeps the port.
    """
    command = ui_command(spec, host, port)
    _check_port(host, port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner for a viewer
    proc = subprocess.Popen(command, env=env, stdout=2)  # its chatter to stderr: stdout is for the links
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_ready(proc, url, timeout_s)
        on_ready(url, experiment_links(_absolute_sqlite(spec.uri), url))
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()  # `mlflow server` forwards it to its uvicorn child
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def experiment_links(tracking_uri: str, url: str) -> list[tuple[str, str]]:
    """(experiment, deep link) per experiment; without `workflowType` the UI opens its GenAI traces view."""
    from mlflow import MlflowClient

    experiments = MlflowClient(tracking_uri).search_experiments()
    return [(e.name, f"{url}/#/experiments/{e.experiment_id}?workflowType=machine_learning")
            for e in experiments if e.name != "Default"]


def _check_port(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise FoldsweepError(f"cannot serve on {host}:{port} ({err.strerror}); pick another with --port") from None


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FoldsweepError(f"the MLflow UI exited with code {proc.returncode} before answering; "
                                 "its messages are above")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    raise FoldsweepError(f"the MLflow UI did not answer at {url} within {timeout_s:.0f}s")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
