"""What MLflow tracking costs a sweep: the same sweep with tracking on and off, timed in one process.

Each run starts in a fresh folder (own Optuna journal, own MLflow store), so the "on" runs pay for
everything a user pays for: creating the store, one run per study and per trial with its curves, the
artifacts and plots, and the system-metrics thread. The modes alternate (off, on, off, on, ...) so
that a change in machine load hits both alike; the medians are compared.

    python benchmarks/bench_tracking.py                 # quickstart: 3 outer x 3 inner, 10 trials per study
    python benchmarks/bench_tracking.py --trials 4 --repeats 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from contextlib import chdir
from pathlib import Path

import optuna

from foldsweep.spec import load_spec
from foldsweep.workers import run_sweep

QUICKSTART = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"


def timed_sweep(tracking: bool, trials: int, workers: int) -> tuple[float, int]:
    """Wall seconds of one whole sweep in a fresh folder, and how many trials it ran."""
    overrides = (f"tracking.enabled={str(tracking).lower()}", f"optuna.n_trials={trials}",
                 f"resources.workers={workers}", "resources.devices=cpu")
    spec = load_spec(QUICKSTART, overrides)
    with tempfile.TemporaryDirectory() as folder, chdir(folder):
        started = time.perf_counter()
        summary = run_sweep(spec)
        wall = time.perf_counter() - started
    return wall, (len(summary["nested"]["outer"]) + 1) * trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trials per study (quickstart: 10)")
    parser.add_argument("--repeats", type=int, default=2, help="sweeps per mode")
    parser.add_argument("--workers", type=int, default=1, help="CPU worker processes per sweep")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    walls: dict[bool, list[float]] = {False: [], True: []}
    n_trials = 0
    for repeat in range(args.repeats):
        for tracking in (False, True):
            wall, n_trials = timed_sweep(tracking, args.trials, args.workers)
            walls[tracking].append(wall)
            print(f"run {repeat + 1}, tracking {'on ' if tracking else 'off'}: {wall:6.2f} s", flush=True)
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"quickstart, {n_trials} trials, {args.workers} worker(s), median of {args.repeats}: "
          f"tracking off {off:.2f} s, on {on:.2f} s")
    print(f"tracking overhead: {on - off:+.2f} s = {(on / off - 1) * 100:+.1f}% of the sweep "
          f"({(on - off) / n_trials * 1000:+.0f} ms per trial)")


if __name__ == "__main__":
    main()
