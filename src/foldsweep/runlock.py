"""One `run` of a sweep at a time: a second one refuses at once instead of making a second MLflow tree.

Two coordinators of one sweep both created the sweep's and the studies' MLflow runs, both logged every
trial, and the slower one trained trials only to give them back as surplus. A coordinator therefore holds
an exclusive lock on the sweep for the whole run, taken before anything is created. It is a kernel flock
(filelock), so a killed holder releases it and the rerun goes on at once. Who holds it (pid, since when,
where the trials are) is written beside it, for the refusal to name. More workers join a running sweep
with `foldsweep worker`, which takes no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from foldsweep.errors import FoldsweepError
from foldsweep.record import home
from foldsweep.storage import redact, write_error

__all__ = ["RunHolder", "SweepBusy", "sole_run"]


class SweepBusy(FoldsweepError):
    """Another process is running this sweep (one line, exit 2, naming it and how to add workers instead)."""


@dataclass(frozen=True)
class RunHolder:
    """Who holds a sweep's run lock: written beside the lock once taken, read by a run that is refused."""

    pid: int
    since: float
    storage: str  # the Optuna storage its workers share (password masked)

    def refusal(self, name: str) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        spec = home() / "sweeps" / name / "spec.yaml"
        return (f"sweep `{name}` is being run by pid {self.pid} since {since}; wait for it, or add workers with "
                f"`foldsweep worker {spec} --storage {self.storage}`")


@contextmanager
def sole_run(name: str, storage: str) -> Iterator[None]:
    """Hold sweep `name`'s run lock for the block; raise SweepBusy at once if another process holds it."""
    folder = home() / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / f"{name}.lock")
        lock.acquire(blocking=False)
    except Timeout:
        raise SweepBusy(_holder(folder / f"{name}.holder", name)) from None
    except OSError as err:
        raise write_error(err, f"the run lock of sweep `{name}` in {folder}") from None
    try:
        _note_holder(folder / f"{name}.holder", RunHolder(os.getpid(), time.time(), redact(storage)))
        yield
    finally:
        lock.release()


def _note_holder(path: Path, holder: RunHolder) -> None:
    """Best effort, written whole (temporary file, then rename): a refused run reads it to name the holder."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(asdict(holder)))
        tmp.replace(path)


def _holder(path: Path, name: str) -> str:
    """The refusal, naming the holder when its note can be read (it is written just after the lock is taken)."""
    try:
        holder = RunHolder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return (f"sweep `{name}` is being run by another process; wait for it, or add workers with `foldsweep "
                "worker SPEC --storage URL`")
    return holder.refusal(name)
