"""How often the nested estimate's 95% interval contains the truth, on problems whose truth is known.

Each problem is 300 rows drawn from one of two fixed scikit-learn generators (`make_classification`
with fixed parameters; every problem gets its own rows, none shared). Each is swept twice by
`run_sweep` (outer k=5 with repeats 1 and 3, inner k=3, a random sampler, 3 trials per study, 30
epochs, tracking off, one worker). The truth is the accuracy of the model a user would ship, the
final config refit on all development rows for its refit epochs, measured on 20,000 fresh rows of
the same generator that no problem sees. Reported per repeats setting: coverage and mean width of the
interval foldsweep prints (Nadeau-Bengio corrected t) and of the plain t over all outer scores it
replaced, mean nested estimate minus truth, and mean optimism.

    python benchmarks/bench_coverage.py                   # 50 problems x repeats 1 and 3 (~25 min on 2 busy cores)
    python benchmarks/bench_coverage.py --problems 4      # a smoke run
Results append to --out (JSON lines; a rerun skips the problems already there); `--first N` starts at
problem N, so two processes can share the work and `--problems 0 --out a.jsonl` only prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import chdir
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from scipy import stats
from sklearn.datasets import make_classification

from foldsweep.data import load_dataset
from foldsweep.evaluate import train_final
from foldsweep.metrics import score
from foldsweep.record import SweepRecord
from foldsweep.spec import parse_spec
from foldsweep.workers import run_sweep

ROWS, TRUTH_ROWS = 300, 20_000
GENERATORS = {  # fixed generator parameters; `random_state` fixes the generator, the pool's rows are its draws
    "binary": {"n_features": 20, "n_informative": 6, "n_redundant": 4, "n_classes": 2, "class_sep": 0.8,
               "flip_y": 0.05, "random_state": 11},
    "three_class": {"n_features": 12, "n_informative": 5, "n_redundant": 2, "n_classes": 3, "class_sep": 1.0,
                    "flip_y": 0.03, "random_state": 12},
}
SEARCH = {
    "lr": {"type": "float", "low": 0.0003, "high": 0.03, "log": True},
    "weight_decay": {"type": "float", "low": 0.00001, "high": 0.1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "batch_size": {"type": "categorical", "choices": [16, 32]},
    "width": {"type": "int", "low": 16, "high": 64, "log": True},
}


def pools(n_problems: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One pool per generator: problem p takes rows [p*ROWS, (p+1)*ROWS), the last TRUTH_ROWS are the truth."""
    per = math.ceil(n_problems / len(GENERATORS))
    return {name: make_classification(n_samples=per * ROWS + TRUTH_ROWS, **params)  # type: ignore[arg-type]
            for name, params in GENERATORS.items()}


def spec(name: str, repeats: int, seed: int) -> dict[str, Any]:
    return {
        "name": name, "data": {"path": "data.csv", "target": "y", "metric": "accuracy"},
        "split": {"test_size": 0.2, "seed": seed, "outer": {"kind": "stratified", "k": 5, "repeats": repeats},
                  "inner": {"kind": "stratified", "k": 3}},
        "model": {"depth": 2}, "train": {"epochs": 30, "patience": 8},
        "search": SEARCH,
        "optuna": {"n_trials": 3, "sampler": "random", "trials_per_batch": 3, "seed": seed},
        "resources": {"devices": "cpu", "workers": 1}, "tracking": {"enabled": False},
    }


def one_problem(generator: str, index: int, X: np.ndarray, y: np.ndarray, truth: tuple[np.ndarray, np.ndarray],
                repeats: int) -> dict[str, Any]:
    """Sweep one problem in a fresh folder; the truth is the shipped model's accuracy on the truth rows."""
    rows = slice(index * ROWS, (index + 1) * ROWS)
    with tempfile.TemporaryDirectory() as folder, chdir(folder):
        os.environ["FOLDSWEEP_HOME"] = str(Path(folder) / "mlruns")
        frame = pd.DataFrame(X[rows], columns=[f"x{i}" for i in range(X.shape[1])]).assign(y=y[rows])
        frame.to_csv("data.csv", index=False)
        config = parse_spec(spec(f"cov-{generator}-{index}-r{repeats}", repeats, index), source="bench")
        started = time.time()
        summary = run_sweep(config, base_dir=Path(folder))
        data = load_dataset(config.data, Path(folder))
        dev = SweepRecord.open(config.name).plan.dev
        final = config.with_params(summary["final"]["best_params"]).model_copy(update={"search": {}})
        model, _ = train_final(final, data, dev, int(summary["final"]["best_epoch"]))
        X_truth, y_truth = truth
        # data.classes maps encoded labels back; the generator's labels are 0..C-1 and encode to themselves
        truth_score = score("accuracy", y_truth, model.predict(X_truth.astype(np.float32)))
        outer = np.array(summary["nested"]["outer"])
        plain = stats.t.ppf(0.975, len(outer) - 1) * outer.std(ddof=1) / math.sqrt(len(outer))
        return {"generator": generator, "index": index, "repeats": repeats, "truth": truth_score,
                "mean": summary["nested"]["mean"], "ci95": summary["nested"]["ci95"],
                "plain": [float(outer.mean() - plain), float(outer.mean() + plain)], "outer": outer.tolist(),
                "optimism": summary["optimism"], "wall_s": round(time.time() - started, 1)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| repeats | problems | coverage (corrected t) | mean width | coverage (plain t) | mean width | "
             "mean estimate - truth | mean optimism |", "|---|---|---|---|---|---|---|---|"]
    for repeats in sorted({r["repeats"] for r in results}):
        rs = [r for r in results if r["repeats"] == repeats]
        cov = sum(r["ci95"][0] <= r["truth"] <= r["ci95"][1] for r in rs)
        cov_plain = sum(r["plain"][0] <= r["truth"] <= r["plain"][1] for r in rs)
        width = np.mean([r["ci95"][1] - r["ci95"][0] for r in rs])
        width_plain = np.mean([r["plain"][1] - r["plain"][0] for r in rs])
        bias = np.mean([r["mean"] - r["truth"] for r in rs])
        lines.append(f"| {repeats} | {len(rs)} | {cov}/{len(rs)} ({cov / len(rs):.0%}) | {width:.3f} | "
                     f"{cov_plain}/{len(rs)} ({cov_plain / len(rs):.0%}) | {width_plain:.3f} | {bias:+.3f} | "
                     f"{np.mean([r['optimism'] for r in rs]):+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--first", type=int, default=0, help="first problem (to split the work over processes)")
    parser.add_argument("--out", type=Path, default=Path("bench_coverage.jsonl"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = args.out.resolve()
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    seen = {(r["generator"], r["index"], r["repeats"]) for r in done}
    drawn = pools(max(args.problems, 50))  # the same rows however the work is split
    names = list(GENERATORS)
    for p in range(args.first, args.problems):
        generator, index = names[p % len(names)], p // len(names)
        X, y = drawn[generator]
        truth = (X[-TRUTH_ROWS:], y[-TRUTH_ROWS:])
        for repeats in args.repeats:
            if (generator, index, repeats) in seen:
                continue
            result = one_problem(generator, index, X, y, truth, repeats)
            done.append(result)
            with out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            inside = result["ci95"][0] <= result["truth"] <= result["ci95"][1]
            print(f"{generator} #{index} repeats {repeats}: truth {result['truth']:.3f}, nested {result['mean']:.3f} "
                  f"[{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}] {'in' if inside else 'OUT'}, "
                  f"{result['wall_s']}s", flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
