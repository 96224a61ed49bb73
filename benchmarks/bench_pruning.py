"""What pruning saves: the same nested sweep with each pruner, fold-model epochs trained and nested score.

Every pruner runs `sweeps/sonar.yaml` (5 outer x 5 inner, 50 trials per study, 200 epochs, patience 20)
in a fresh folder with full tracking, one worker process. "epochs trained" counts every fold model's
epochs (pruned and failed trials too) and the outer refits: what the sweep paid for.

    python benchmarks/bench_pruning.py                                # none, median, hyperband, wilcoxon: ~7 min
    python benchmarks/bench_pruning.py --trials 20 --pruners none,median
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from contextlib import chdir
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

SONAR = Path(__file__).resolve().parent.parent / "sweeps" / "sonar.yaml"


def run(pruner: str, overrides: list[str]) -> dict[str, Any]:
    from foldsweep.spec import load_spec
    from foldsweep.storage import default_storage, preflight
    from foldsweep.workers import run_sweep

    spec = load_spec(SONAR, [f"optuna.pruner={pruner}", "resources.devices=cpu", "resources.workers=1",
                             *overrides])
    with tempfile.TemporaryDirectory() as folder, chdir(folder):
        started = time.perf_counter()
        summary = run_sweep(spec)
        wall = time.perf_counter() - started
        storage = preflight(default_storage(spec.name), 1)
        states = [t.state for name in optuna.get_all_study_names(storage)
                  for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)]
    return {"pruner": pruner, "epochs": summary["epochs_trained"], "nested": summary["nested"]["mean"],
            "outer": summary["nested"]["outer"], "pruned": states.count(TrialState.PRUNED),
            "trials": len(states), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruners", default="none,median,hyperband,wilcoxon",
                        help="comma-separated (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=None, help="optuna.n_trials (default: the spec's 50)")
    parser.add_argument("--outer", type=int, default=None, help="split.outer.k (default: the spec's 5)")
    parser.add_argument("--inner", type=int, default=None, help="split.inner.k (default: the spec's 5)")
    args = parser.parse_args()
    overrides = [f"{key}={value}" for key, value in (("optuna.n_trials", args.trials), ("split.outer.k", args.outer),
                                                      ("split.inner.k", args.inner)) if value is not None]
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    print(f"sweeps/sonar.yaml {' '.join(overrides)}".strip(), flush=True)
    rows = []
    for pruner in args.pruners.split(","):
        rows.append(run(pruner, overrides))
        r = rows[-1]
        print(f"  {pruner}: {r['epochs']} epochs, nested {100 * r['nested']:.1f}, {r['wall_s']:.0f} s", flush=True)
    base = next((r for r in rows if r["pruner"] == "none"), None)
    print("\n| pruner | epochs trained | vs none | pruned trials | nested accuracy (per outer fold) | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cut = f"{100 * (r['epochs'] / base['epochs'] - 1):+.0f}%" if base else "-"
        outer = ", ".join(f"{100 * s:.1f}" for s in r["outer"])
        print(f"| {r['pruner']} | {r['epochs']:,} | {cut} | {r['pruned']} of {r['trials']} | "
              f"{100 * r['nested']:.1f} ({outer}) | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
