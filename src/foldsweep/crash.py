"""Crash points: a process that stops itself at the Nth write of a kind, for the crash-consistency tests.

`FOLDSWEEP_CRASH_AT=KIND:N[:SIGNAL]` (KIND `journal`, `mlflow`, `warm_start`, `refit`, `summary` or
`pictures`; SIGNAL `KILL` (default), `INT`, or `STOP`: frozen there, holding its locks, until a test kills
it) sends the signal to this process just before the Nth write of that kind completes: halfway through a
journal record, between a trial's MLflow run being sent and Optuna being told, right after the Nth outer
best is enqueued into `final` (the others not yet), right after the Nth outer refit is recorded in its
study (not yet on its MLflow run), right after the sweep's summary is recorded (its report not yet in
MLflow), or right after the pictures are handed to the MLflow writer (every run finished). A test can thus
stop a sweep exactly where a power cut or Ctrl-C would hurt most, every time. Unset, it costs one dict
lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "FOLDSWEEP_CRASH_AT"
_SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "STOP": signal.SIGSTOP}
_seen: Counter[str] = Counter()


def crash_point(kind: str) -> None:
    """Count a write of `kind`; stop the process here if this is the one `FOLDSWEEP_CRASH_AT` names."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    parts = wanted.split(":")
    if parts[0] != kind:
        return
    _seen[kind] += 1
    if _seen[kind] == int(parts[1]):
        os.kill(os.getpid(), _SIGNALS.get(parts[2] if parts[2:] else "KILL", signal.SIGKILL))
