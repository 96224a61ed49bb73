"""How long should a refit train? Outer-test scores of the refit-length rules, on bundled data sets.

For each data set and split seed, `run_sweep` runs the quickstart's nested sweep (3 outer x 3 inner, TPE,
tracking off, one worker). Then, for each outer fold, the configuration the sweep refit is examined:
- its inner folds are trained again (same rows, same seeds) to read each fold's best epoch by validation
  loss (what early stopping keeps) and by the validation metric (what the search optimises), and its
  inner score at each fold's best-loss epoch against the same folds at one common epoch count;
- it is refit on all outer-train rows for the full epoch budget, with the outer-test rows scored after
  every epoch (they never steer the fit: no early stopping, no restore), twice with different seeds.
A refit of E epochs is the same fit stopped at E (no schedule depends on the total here), so every
rule is read off the same curves, paired: `loss` = mean best-loss epoch (foldsweep's rule until now),
`metric` = mean best-metric epoch, `x k/(k-1)` = either scaled by the refit's larger training set,
`budget` = every epoch, and `oracle` = the best epoch on outer-test itself (a ceiling, not a rule).

    python benchmarks/bench_refit.py                            # sonar, breast_cancer, wine; 4 seeds (~15 min)
    python benchmarks/bench_refit.py --datasets sonar --seeds 1  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import chdir
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import yaml

from foldsweep.data import load_dataset
from foldsweep.objective import job_seed, trial_jobs
from foldsweep.record import SweepRecord
from foldsweep.spec import parse_spec
from foldsweep.train import FitJob, fit_many
from foldsweep.workers import run_sweep

QUICKSTART = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
RULES = ("loss", "metric", "loss x k/(k-1)", "metric x k/(k-1)", "budget", "oracle")


def sweep_spec(dataset: str, seed: int, trials: int) -> dict[str, Any]:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["name"] = f"refit-{dataset}-{seed}"
    raw["data"] = {"dataset": dataset}
    raw["split"] |= {"seed": seed, "outer": {"kind": "auto", "k": 3}, "inner": {"kind": "auto", "k": 3}}
    raw["optuna"] |= {"seed": seed, "n_trials": trials}
    raw["resources"] = {"devices": "cpu", "workers": 1}
    raw["tracking"] = {"enabled": False}
    return raw


def best_index(curve: np.ndarray, maximize: bool) -> int:
    """1-based epoch of the curve's best value (the first, on ties)."""
    return int(np.argmax(curve) if maximize else np.argmin(curve)) + 1


def examine(dataset: str, seed: int, trials: int, refit_seeds: int) -> list[dict[str, Any]]:
    """One sweep, then per outer fold: best epochs by loss and metric, and the outer-test curve of the refit."""
    with tempfile.TemporaryDirectory() as folder, chdir(folder):
        os.environ["FOLDSWEEP_HOME"] = str(Path(folder) / "mlruns")
        config = parse_spec(sweep_spec(dataset, seed, trials), source="bench")
        summary = run_sweep(config)
        data = load_dataset(config.data)
        plan = SweepRecord.open(config.name).plan
    X, y = torch.as_tensor(data.X), torch.as_tensor(data.y)
    rows = []
    for i, refit in enumerate(summary["outer_refits"]):
        trial = config.with_params(refit["params"])
        inner = fit_many(X, y, trial_jobs(trial, plan.inner[i], (f"outer-{i}", refit["best_trial"])),
                         data.n_classes, data.metric)
        by_loss = [r.best_epoch for r in inner]
        by_metric = [best_index(r.val_metric, data.maximize) for r in inner]
        common = max(1, round(float(np.mean(by_loss))))
        at_common = [float(r.val_metric[min(common, r.epochs_run) - 1]) for r in inner]
        fold = plan.outer[i]
        budget = trial.train.epochs
        jobs = [FitJob(fold.train, fold.valid, trial.model, trial.train, job_seed(seed, f"outer-{i}", "bench", s),
                       fixed_epochs=budget) for s in range(refit_seeds)]
        curve = np.mean([r.val_metric for r in fit_many(X, y, jobs, data.n_classes, data.metric)], axis=0)
        scale = len(fold.train) / float(np.mean([len(f.train) for f in plan.inner[i]]))
        epochs = {"loss": np.mean(by_loss), "metric": np.mean(by_metric)}
        epochs |= {"loss x k/(k-1)": epochs["loss"] * scale, "metric x k/(k-1)": epochs["metric"] * scale,
                   "budget": budget, "oracle": best_index(curve, data.maximize)}
        chosen = {rule: int(min(budget, max(1, round(float(e))))) for rule, e in epochs.items()}
        rows.append({"dataset": dataset, "seed": seed, "fold": i, "metric": data.metric,
                     "best_inner": refit["best_inner_value"],
                     "inner_at_best_epochs": float(np.mean([r.val_metric[r.best_epoch - 1] for r in inner])),
                     "inner_at_common_epoch": float(np.mean(at_common)),
                     "epochs": chosen, "outer": {rule: float(curve[e - 1]) for rule, e in chosen.items()}})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = "| data set | metric | refits | best inner | inner, common epoch | " + \
        " | ".join(f"{r} (epochs)" for r in RULES) + " |"
    lines = [head, "|" + "---|" * (5 + len(RULES))]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        cells = [f"{np.mean([r['outer'][rule] for r in rs]):.4f} ({np.mean([r['epochs'][rule] for r in rs]):.0f})"
                 for rule in RULES]
        lines.append(f"| {dataset} | {rs[0]['metric']} | {len(rs)} | {np.mean([r['best_inner'] for r in rs]):.4f} | "
                     f"{np.mean([r['inner_at_common_epoch'] for r in rs]):.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sonar", "breast_cancer", "wine"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--trials", type=int, default=10, help="trials per study")
    parser.add_argument("--refit-seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_refit.jsonl"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    out = args.out.resolve()
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    done = {(r["dataset"], r["seed"]) for r in rows}
    for dataset in args.datasets:
        for seed in range(args.seeds):
            if (dataset, seed) in done:
                continue
            found = examine(dataset, seed, args.trials, args.refit_seeds)
            rows += found
            with out.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in found)
            print(f"{dataset} seed {seed}: " + ", ".join(
                f"{rule} {np.mean([r['outer'][rule] for r in found]):.3f}" for rule in RULES), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
