"""What a sweep's pictures are drawn from, as plain data that can cross to another process.

The MLflow writer process draws and logs the pictures after the sweep has written everything else and
returned (see `tracking.writer`), so the sweep never imports matplotlib and its end does not wait for
the drawing. Until they are logged, a note in the sweep's record folder (`PENDING`) says which process
draws them, or why it could not: pictures are drawn from what is already kept (the studies and the
logged curves), so a rerun of `foldsweep run` draws them again and nothing is lost. This module is what
both sides share, and so imports nothing heavy: the trials are Optuna's own `FrozenTrial`s.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from foldsweep.studies import StudyRef

__all__ = ["PENDING", "BestTrial", "SweepPictures", "mark_pending", "pictures_drawn", "pictures_note", "sweep_pictures"]

PENDING = "pictures.pending"  # in the record folder from the sweep's end until its pictures are logged
WRITER_MAIN = "_writer_main"  # in the command line of the MLflow writer process (`tracking.writer`), which draws them


@dataclass(frozen=True)
class BestTrial:
    """Where a study's best trial's curves are: its MLflow run, its folds, and the epoch each fold kept."""

    title: str
    run_id: str
    folds: int
    best_epochs: list[int]


@dataclass(frozen=True)
class SweepPictures:
    """Each study's (key, direction, trials), the searched knobs, the metric's name, each study's best trial."""

    studies: list[tuple[str, str, list[FrozenTrial]]]
    knobs: list[str]
    metric: str
    best: list[BestTrial]


def sweep_pictures(studies: list[StudyRef], knobs: list[str], metric: str) -> SweepPictures:
    """The studies' trials as they stand, and where each best trial's curves were logged (`studies.best_trial`)."""
    from foldsweep.studies import best_trial, trial_run_id  # the sweep's and `report`'s side: never the writer's

    best = []
    for ref in studies:
        trial = best_trial(ref)
        if trial is None:
            continue
        run_id = trial_run_id(ref, trial)
        if run_id:
            best.append(BestTrial(f"{ref.key}: trial {trial.number} ({metric} {trial.value:.4f})", run_id,
                                  len(ref.folds), list(trial.user_attrs.get("best_epochs", []))))
    return SweepPictures([(ref.key, ref.study.direction.name.lower(), ref.study.get_trials(deepcopy=False))
                          for ref in studies], knobs, metric, best)


def mark_pending(folder: Path, pid: int, *, sweep: bool = False) -> Path:
    """Note in the record folder that process `pid` will draw and log the sweep's pictures; returns the note.

    With `sweep`, `pid` is the sweep's own process, about to record its summary (from then on the sweep counts
    as finished) and to log its report before it hands the pictures over: stopped in between, it leaves the
    note, and `report` says the pictures were never handed over.
    """
    path = folder / PENDING
    note: dict[str, object] = {"pid": pid, "since": time.time()}
    _write_note(path, note | {"sweep": True} if sweep else note)
    return path


def pictures_drawn(note: Path, pid: int, *, failure: str | None = None) -> None:
    """The writer's last word: remove the note (logged), or keep it with the reason they were not.

    A note naming another process belongs to a later run of the same sweep and is left alone.
    """
    try:
        found = json.loads(note.read_text())
    except (OSError, ValueError):
        return
    if found.get("pid") != pid:
        return
    if failure is None:
        note.unlink(missing_ok=True)
    else:
        _write_note(note, found | {"failed": failure}, in_place=True)


def pictures_note(folder: Path) -> str:
    """One line for `report` while the sweep's MLflow pictures are not logged; empty once they are."""
    rerun = "rerun `foldsweep run` on the sweep's spec to draw them again (nothing else is redone)"
    try:
        found = json.loads((folder / PENDING).read_text())
    except OSError:  # no note: logged (or never due: tracking off)
        return ""
    except ValueError:
        return (f"the sweep's MLflow pictures may not have been logged (their note {folder / PENDING} is "
                f"damaged); {rerun}")
    if "failed" in found:
        return f"the sweep's MLflow pictures were not logged ({found['failed']}); {rerun}"
    if found.get("sweep"):
        if _alive(int(found.get("pid", 0)), writer=False):
            return f"the sweep is still logging its report to MLflow (process {found['pid']}); its pictures follow"
        return (f"the sweep's MLflow pictures were not logged: the sweep (pid {found.get('pid')}) stopped before it "
                f"handed them over; {rerun}")
    if _alive(int(found.get("pid", 0))):
        return f"the sweep's MLflow pictures are still being drawn (process {found['pid']})"
    return (f"the sweep's MLflow pictures were not logged: the process drawing them (pid {found.get('pid')}) "
            f"stopped; {rerun}")


def _alive(pid: int, *, writer: bool = True) -> bool:
    """Whether process `pid` runs (and, with `writer`, is an MLflow writer); one that ended and waits for its
    parent to reap it (a Python session that ran the sweep through the API) does not, nor another program that
    got the pid of a writer that was killed (after a reboot, or pids wrapping round)."""
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return not writer or any(WRITER_MAIN in part for part in process.cmdline())
    except psutil.NoSuchProcess:  # gone (a zombie's command line raises ZombieProcess, one of these)
        return False
    except psutil.AccessDenied:  # someone else's process: running, and no command line of ours to check
        return True


def _write_note(path: Path, value: dict[str, object], *, in_place: bool = False) -> None:
    """Write to a temporary file and rename, so a reader never sees half a note.

    With `in_place`, a note that cannot be written so (a full disk: the likely reason the pictures failed) is
    written over the old one instead, in the space that one already holds, so that the reason is kept.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # its own: a rerun may write while a writer fails
    try:
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        if not in_place:
            raise
        text = json.dumps(value).encode()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text)
            os.ftruncate(fd, len(text))
        finally:
            os.close(fd)
