"""Where a command's wall time goes, by phase: what `foldsweep run --profile` prints.

One module-level registry, off by default, so no caller passes a timer around and an unprofiled run
pays one flag test per phase entered (a phase is entered per round or per trial, never per epoch).
Phases nest and are exclusive: time spent in an inner phase (tracking, inside ask/tell) is not also
counted in the outer one, so the phases add up to the wall time, and what no phase claims is shown as
"other". The first entry into "training" is booked as "first training round" (warm-up costs show
apart), and the moment it starts is kept as the time to the first training step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["ASK_TELL", "DATA", "FIRST", "ORDER", "REFITS", "REPORT", "SHUTDOWN", "STARTUP", "STORE", "TRACKING",
           "TRAINING", "enable", "phase", "render", "snapshot"]

STARTUP = "start-up and imports"
DATA = "data and plan"
STORE = "store set-up"
FIRST = "first training round"
TRAINING = "training"
ASK_TELL = "ask/tell"
TRACKING = "tracking"
REFITS = "refits"
REPORT = "report"
SHUTDOWN = "shutdown"
ORDER = (STARTUP, DATA, STORE, FIRST, TRAINING, ASK_TELL, TRACKING, REFITS, REPORT, SHUTDOWN)


@dataclass
class _Entered:
    name: str
    at: float
    nested: float = 0.0  # seconds booked by phases inside this one


class _Clock:
    """Seconds per phase, and the phases entered and not yet left."""

    def __init__(self) -> None:
        self.enabled = False
        self.origin = 0.0
        self.seconds: dict[str, float] = {}
        self.stack: list[_Entered] = []
        self.first_step = 0.0


_clock = _Clock()


def enable() -> None:
    """Start profiling this process; the time from its start until now is booked as start-up and imports."""
    global _clock
    now = time.perf_counter()
    _clock = _Clock()
    _clock.enabled = True
    _clock.origin = now - _process_age()
    _clock.seconds[STARTUP] = now - _clock.origin


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Book the block's wall time to `name`, minus what nested phases inside it book to themselves."""
    if not _clock.enabled:
        yield
        return
    if name == TRAINING and not _clock.first_step:
        _clock.first_step = time.perf_counter() - _clock.origin
        name = FIRST
    entry = _Entered(name, time.perf_counter())
    _clock.stack.append(entry)
    try:
        yield
    finally:
        _clock.stack.pop()
        spent = time.perf_counter() - entry.at
        _clock.seconds[name] = _clock.seconds.get(name, 0.0) + spent - entry.nested
        if _clock.stack:
            _clock.stack[-1].nested += spent


def snapshot() -> dict[str, float]:
    """Seconds per phase in `ORDER` (then any others), "other" for the rest, "wall" since the process began,
    and "to first training step" (absent before one)."""
    wall = time.perf_counter() - _clock.origin
    out = {name: _clock.seconds[name] for name in ORDER if name in _clock.seconds}
    out |= {name: s for name, s in _clock.seconds.items() if name not in out}
    out["other"] = wall - sum(out.values())
    out["wall"] = wall
    if _clock.first_step:
        out["to first training step"] = _clock.first_step
    return out


def render(times: dict[str, float]) -> str:
    """The snapshot as aligned lines: phase, seconds, share of the wall time."""
    wall = times["wall"]
    lines = [f"{'phase':<24} {'seconds':>8} {'share':>6}"]
    for name, seconds in times.items():
        share = "" if name in ("wall", "to first training step") else f"{100 * seconds / wall:5.1f}%"
        lines.append(f"{name:<24} {seconds:8.3f} {share:>6}")
    return "\n".join(lines)


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included), from /proc when there
    is one; elsewhere 0, and start-up is then not measured."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            return max(0.0, float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0
