"""Trials per minute with 1 and with 2 CPU worker processes: the same sweep, each run in a fresh folder.

Each run is a real `foldsweep run` process (so thread settings and imports are paid as a user pays
them) in its own temporary folder (own Optuna journal, own MLflow store). Two rates are printed:
`whole` counts the run end to end (start-up, MLflow, refits, report), `trials` only the span from the
first trial's start to the last trial's end, read from the journal. The modes alternate (1, 2, 1, 2,
...) so that a change in machine load hits both alike; medians are compared.

    python benchmarks/bench_workers.py                       # quickstart, 20 trials per study
    python benchmarks/bench_workers.py --trials 10 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from foldsweep.storage import preflight

QUICKSTART = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"


def one_run(spec: Path, workers: int, trials: int) -> dict[str, float]:
    """One sweep in a fresh folder: trials finished, whole wall time, and the span the trials took."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-m", "foldsweep", "run", str(spec), "--json", "--set", "resources.devices=cpu",
               "--set", f"resources.workers={workers}", "--set", f"optuna.n_trials={trials}"]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=os.environ)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"foldsweep run failed ({done.returncode}): {done.stderr[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        storage = preflight(str(Path(folder) / summary["storage"]), 1)
        finished = [t for name in optuna.get_all_study_names(storage)
                    for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
        return {"trials": len(finished), "wall_s": wall, "span_s": span}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=QUICKSTART)
    parser.add_argument("--trials", type=int, default=20, help="trials per study")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for workers in (1, 2):
            result = one_run(args.spec, workers, args.trials)
            runs[workers].append(result)
            print(f"repeat {repeat + 1}, {workers} worker(s): {result['trials']:.0f} trials, "
                  f"{result['wall_s']:.1f}s whole, {result['span_s']:.1f}s of trials", flush=True)

    rate = {w: {"whole": statistics.median(60 * r["trials"] / r["wall_s"] for r in rs),
                "trials": statistics.median(60 * r["trials"] / r["span_s"] for r in rs)} for w, rs in runs.items()}
    print(f"\n{args.spec.name}, {args.trials} trials per study, {os.cpu_count()} cores, median of {args.repeats}:")
    for workers in (1, 2):
        print(f"  {workers} CPU worker(s): {rate[workers]['whole']:6.1f} trials/min whole run, "
              f"{rate[workers]['trials']:6.1f} trials/min while training")
    print(f"  ratio 2 : 1 workers: {rate[2]['whole'] / rate[1]['whole']:.2f}x whole run, "
          f"{rate[2]['trials'] / rate[1]['trials']:.2f}x while training")


if __name__ == "__main__":
    main()
