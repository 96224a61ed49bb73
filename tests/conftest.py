"""Shared fixtures: every test that runs a sweep gets its own working folder (so `mlruns/` is private)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

TINY = {
    "name": "tiny",
    "data": {"dataset": "sonar"},
    "split": {"test_size": 0.25, "seed": 0, "outer": {"k": 2}, "inner": {"k": 2}},
    "model": {"width": 16, "depth": 1},
    "train": {"epochs": 6, "patience": 3, "batch_size": 32},
    "search": {
        "lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True},
        "weight_decay": {"type": "float", "low": 0.00001, "high": 0.01, "log": True},
        "l1": {"type": "float", "low": 0.0000001, "high": 0.0001, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.3},
        "batch_size": {"type": "categorical", "choices": [16, 32]},
        "width": {"type": "int", "low": 8, "high": 16},
    },
    "optuna": {"n_trials": 2, "trials_per_batch": 2, "n_startup_trials": 1, "report_every": 2},
    "resources": {"devices": "cpu", "workers": 1},
}


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """The tiny sweep as a dict; `overrides` replace whole top-level blocks or merge into dict blocks."""
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real file system (tmpfs) of `size` at `folder` (made here), for full-disk tests; skips where it cannot be
    mounted (it needs root). A test can grow it (`mount -o remount,size=...`) once space 'comes back'."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill_disk(folder: Path) -> None:
    """Write zeros to `folder`/filler until its file system is full."""
    fd = os.open(folder / "filler", os.O_CREAT | os.O_WRONLY)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)


def wait_for_pictures(record_folder: Path, timeout: float = 120.0) -> None:
    """Wait until the MLflow writer has logged the sweep's pictures: it draws them after the sweep returns."""
    from foldsweep.pictures import pictures_note

    deadline = time.monotonic() + timeout
    while note := pictures_note(record_folder):
        assert "still being drawn" in note, note
        assert time.monotonic() < deadline, f"pictures not logged after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and 2-core CI machines have no spare ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder: `mlruns/` (Optuna journal, MLflow db, sweep records) is created inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FOLDSWEEP_HOME", raising=False)
    return tmp_path


@pytest.fixture
def write_spec(workdir: Path):
    def write(name: str = "tiny.yaml", **overrides: Any) -> Path:
        path = workdir / name
        path.write_text(yaml.safe_dump(tiny_spec(**overrides), sort_keys=False))
        return path

    return write
