"""What MLflow tracking costs a sweep: the same sweep with tracking on and off, timed in one process.

Each run starts in a fresh folder (own Optuna journal, own MLflow store), so the "on" runs pay for
everything a user pays for: creating the store, one run per study and per trial with its curves, the
artifacts and plots, and the system-metrics thread. The modes alternate (off, on, off, on, ...) so
that a change in machine load hits both alike; the medians are compared. On a busy machine the wall
difference drowns in noise, so the "on" runs also clock the time spent inside tracking itself (every
tracker call, and the report with its plots, which only runs for MLflow), with one worker so that all
of it happens in this process.

    python benchmarks/bench_tracking.py                 # quickstart: 3 outer x 3 inner, 10 trials per study
    python benchmarks/bench_tracking.py --trials 4 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import logging
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import chdir
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from mlflow import MlflowClient

from foldsweep import report
from foldsweep.spec import load_spec
from foldsweep.tracking import MlflowTracker
from foldsweep.workers import run_sweep

QUICKSTART = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
TRACKER_CALLS = ("__init__", "sweep_run", "study_run", "log_trial", "log_values", "log_files", "metric_histories",
                 "finish", "close")


class Stopwatch:
    """Seconds spent inside the wrapped functions, outermost call only (the report calls the tracker)."""

    def __init__(self) -> None:
        self.by_call: dict[str, float] = {}
        self.depth = 0

    @property
    def seconds(self) -> float:
        return sum(self.by_call.values())

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.by_call[fn.__name__] = self.by_call.get(fn.__name__, 0.0) + time.perf_counter() - started

        return timed


def clock_tracking() -> Stopwatch:
    watch = Stopwatch()
    for name in TRACKER_CALLS:
        setattr(MlflowTracker, name, watch.wrap(getattr(MlflowTracker, name)))
    report.log_sweep_artifacts = watch.wrap(report.log_sweep_artifacts)  # looked up at call time by workers
    return watch


def cpu_seconds() -> np.ndarray:
    """CPU seconds of this process, and of its children that have ended (the MLflow writer, helper workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime])


def timed_sweep(tracking: bool, trials: int, workers: int, fresh_store: bool) -> tuple[float, float, np.ndarray,
                                                                                     int]:
    """Seconds to create the MLflow store (0 if `fresh_store` or off), wall and CPU seconds of the sweep, trials.

    The store is created before the clock starts unless `fresh_store`: creating it (MLflow's schema
    migrations) is paid once per folder, by the first sweep only.
    """
    overrides = (f"tracking.enabled={str(tracking).lower()}", f"optuna.n_trials={trials}",
                 f"resources.workers={workers}", "resources.devices=cpu")
    spec = load_spec(QUICKSTART, overrides)
    with tempfile.TemporaryDirectory() as folder, chdir(folder):
        created = 0.0
        if tracking and not fresh_store:
            started = time.perf_counter()
            Path("mlruns").mkdir()
            MlflowClient(f"sqlite:///{Path('mlruns/mlflow.db').resolve()}").search_experiments()
            created = time.perf_counter() - started
        started, cpu = time.perf_counter(), cpu_seconds()
        summary = run_sweep(spec)
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return created, wall, cpu, (len(summary["nested"]["outer"]) + 1) * trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trials per study (quickstart: 10)")
    parser.add_argument("--repeats", type=int, default=2, help="sweeps per mode")
    parser.add_argument("--workers", type=int, default=1, help="CPU worker processes per sweep")
    parser.add_argument("--fresh-store", action="store_true", help="count creating the MLflow store too")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    timed_sweep(True, 1, args.workers, args.fresh_store)  # imports and caches warm, for both modes alike
    created: list[float] = []
    watch = clock_tracking()
    walls: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[np.ndarray]] = {False: [], True: []}
    inside: list[float] = []
    n_trials = 0
    for repeat in range(args.repeats):
        for tracking in (False, True):
            before = watch.seconds
            store_s, wall, cpu, n_trials = timed_sweep(tracking, args.trials, args.workers, args.fresh_store)
            created += [store_s] if store_s else []
            walls[tracking].append(wall)
            cpus[tracking].append(cpu)
            spent = f", {watch.seconds - before:.2f} s of it inside tracking calls" if tracking else ""
            print(f"run {repeat + 1}, tracking {'on ' if tracking else 'off'}: {wall:6.2f} s wall, CPU {cpu[0]:6.2f} s "
                  f"in the sweep process + {cpu[1]:5.2f} s in its children{spent}", flush=True)
            if tracking:
                inside.append(watch.seconds - before)
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"quickstart, {n_trials} trials, {args.workers} worker(s), median of {args.repeats}: "
          f"tracking off {off:.2f} s, on {on:.2f} s")
    print(f"tracking overhead by wall time: {on - off:+.2f} s = {(on / off - 1) * 100:+.1f}% of the sweep "
          f"({(on - off) / n_trials * 1000:+.0f} ms per trial)")
    cpu_off, cpu_on = np.median(cpus[False], axis=0), np.median(cpus[True], axis=0)
    for label, off_s, on_s in (("the sweep process", cpu_off[0], cpu_on[0]),
                               ("all processes", cpu_off.sum(), cpu_on.sum())):
        print(f"tracking overhead in CPU time of {label}: {on_s - off_s:+.2f} s = {(on_s / off_s - 1) * 100:+.1f}% "
              f"({(on_s - off_s) / n_trials * 1000:+.0f} ms per trial)")
    if created:
        print(f"creating the MLflow store (once per folder, not in the times above): "
              f"{statistics.median(created):.2f} s")
    spent = statistics.median(inside)
    print(f"time inside tracking calls: {spent:.2f} s = {spent / off * 100:.1f}% of the untracked sweep "
          f"({spent / n_trials * 1000:.0f} ms per trial)")
    print("by call, all runs: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in
                                            sorted(watch.by_call.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
