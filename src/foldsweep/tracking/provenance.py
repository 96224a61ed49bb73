"""What the sweep run records about where it ran: versions and git commit (tags), and system metrics.

Kept apart from the tracker so the tags can be computed (and tested) without an MLflow store.
"""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from foldsweep.tracking.store import _retry

__all__ = ["SYSTEM_METRICS_INTERVAL_S", "VERSIONED", "provenance_tags"]

SYSTEM_METRICS_INTERVAL_S = 5.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
VERSIONED = ("mlflow", "scikit-learn", "numpy", "psutil")


def provenance_tags(folder: Path | None = None) -> dict[str, str]:
    """Versions, and the git commit of the working directory when it is a checkout: what a rerun must match."""
    tags = {"python.version": platform.python_version()}
    for package in VERSIONED:
        try:
            tags[f"{package}.version"] = version(package)
        except PackageNotFoundError:
            continue
    commit = _git(folder, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit  # the UI shows this one in its Version column
        tags["foldsweep.git_dirty"] = str(bool(_git(folder, "status", "--porcelain", "--untracked-files=no"))).lower()
    return tags


def _git(folder: Path | None, *args: str) -> str:
    """Output of a git command, or "" outside a checkout or without git (provenance is best effort)."""
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _start_monitor(run_id: str, tracking_uri: str, resumed: bool) -> Any:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resumed,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def _stop_monitor(monitor: Any) -> None:
    """Stop sampling, then log one last sample, so even a sweep shorter than the interval has one point."""
    monitor.finish()
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    _retry(monitor.mlflow_logger.flush)
