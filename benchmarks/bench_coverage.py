"""How often the nested estimate's 95% interval contains the truth, on problems whose truth is known.

A problem is ROWS rows drawn from one of two fixed scikit-learn generators (`make_classification` with
fixed parameters; every problem gets its own rows, none shared). Each is swept by `run_sweep` with the
setting's outer folds at repeats 1 and 3, inner k = 3, TPE (10 trials, 4 of them random start-up), a
search space whose configurations differ (learning rate over three decades, weight decay over five, width
4 to 128, a 30-epoch budget, so slow rates underfit), tracking off, one worker.

Two targets, as the interval could be read to cover either:
- (b) the shipped model: the final config refit on all development rows for its refit epochs, scored on
  20,000 fresh rows of the same generator that no problem sees (`truth`, per problem);
- (a) the procedure's expected score: the mean of (b) over training sets of this size, estimated per
  problem by the mean `truth` of the other problems of the same generator, setting and repeats (they are
  independent training sets of the same size from the same distribution; leaving the problem itself
  out keeps its own truth from pulling the target towards it).

Per setting and repeats, for the interval foldsweep prints now (`nested.ci95`: normal, the larger of the
per-row and the Nadeau-Bengio standard error) and for the one it printed before (Nadeau-Bengio corrected
resampled t over the outer scores, t with n - 1 degrees of freedom, recomputed here from the outer
scores): coverage of each target with its exact (Clopper-Pearson) 95% bounds, mean width; and the mean
estimate minus truth and the mean optimism (search's inner value minus outer-test score; > 0 means the
search really selected on noise).

    python benchmarks/bench_coverage.py --problems 50                          # both settings
    python benchmarks/bench_coverage.py --problems 4 --setting quickstart      # a smoke run
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
from dataclasses import dataclass
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

TRUTH_ROWS = 20_000


@dataclass(frozen=True)
class Setting:
    """A problem size and outer fold count (inner k = 3 throughout)."""

    rows: int
    outer_k: int


SETTINGS = {"quickstart": Setting(rows=208, outer_k=3),  # sonar's size: 166 development rows, 3 x 3 folds
            "k5": Setting(rows=300, outer_k=5)}
GENERATORS = {  # fixed generator parameters; `random_state` fixes the generator, the pool's rows are its draws
    "binary": {"n_features": 20, "n_informative": 6, "n_redundant": 4, "n_classes": 2, "class_sep": 0.8,
               "flip_y": 0.05, "random_state": 11},
    "three_class": {"n_features": 12, "n_informative": 5, "n_redundant": 2, "n_classes": 3, "class_sep": 1.0,
                    "flip_y": 0.03, "random_state": 12},
}
SEARCH = {  # wide on purpose: slow rates underfit in the epoch budget, fast ones and little decay overfit
    "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True},
    "weight_decay": {"type": "float", "low": 0.00001, "high": 1.0, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.7},
    "batch_size": {"type": "categorical", "choices": [16, 32]},
    "width": {"type": "int", "low": 4, "high": 128, "log": True},
}


def pools(n_problems: int, rows: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One pool per generator: problem p takes rows [p*rows, (p+1)*rows), the last TRUTH_ROWS are the truth."""
    per = math.ceil(n_problems / len(GENERATORS))
    return {name: make_classification(n_samples=per * rows + TRUTH_ROWS, **params)  # type: ignore[arg-type]
            for name, params in GENERATORS.items()}


def spec(name: str, setting: Setting, repeats: int, seed: int) -> dict[str, Any]:
    return {
        "name": name, "data": {"path": "data.csv", "target": "y", "metric": "accuracy"},
        "split": {"test_size": 0.2, "seed": seed,
                  "outer": {"kind": "stratified", "k": setting.outer_k, "repeats": repeats},
                  "inner": {"kind": "stratified", "k": 3}},
        "model": {"depth": 2}, "train": {"epochs": 30, "patience": 8},
        "search": SEARCH,
        "optuna": {"n_trials": 10, "sampler": "tpe", "n_startup_trials": 4, "trials_per_batch": 4, "seed": seed},
        "resources": {"devices": "cpu", "workers": 1}, "tracking": {"enabled": False},
    }


def corrected_t(outer: np.ndarray, test_train: float) -> list[float]:
    """The interval foldsweep printed before: Nadeau-Bengio corrected resampled t, n - 1 degrees of freedom."""
    n = len(outer)
    half = stats.t.ppf(0.975, n - 1) * math.sqrt((1 / n + test_train) * outer.var(ddof=1))
    return [max(0.0, float(outer.mean() - half)), min(1.0, float(outer.mean() + half))]


def one_problem(setting_name: str, generator: str, index: int, pool: tuple[np.ndarray, np.ndarray],
                repeats: int) -> dict[str, Any]:
    """Sweep one problem in a fresh folder; the truth is the shipped model's accuracy on the truth rows."""
    setting = SETTINGS[setting_name]
    X, y = pool
    rows = slice(index * setting.rows, (index + 1) * setting.rows)
    with tempfile.TemporaryDirectory() as folder, chdir(folder):
        os.environ["FOLDSWEEP_HOME"] = str(Path(folder) / "mlruns")
        frame = pd.DataFrame(X[rows], columns=[f"x{i}" for i in range(X.shape[1])]).assign(y=y[rows])
        frame.to_csv("data.csv", index=False)
        config = parse_spec(spec(f"cov-{setting_name}-{generator}-{index}-r{repeats}", setting, repeats, index),
                            source="bench")
        started = time.time()
        summary = run_sweep(config, base_dir=Path(folder))
        data = load_dataset(config.data, Path(folder))
        plan = SweepRecord.open(config.name).plan
        final = config.with_params(summary["final"]["best_params"]).model_copy(update={"search": {}})
        model, _ = train_final(final, data, plan.dev, int(summary["final"]["best_epoch"]))
        # data.classes maps encoded labels back; the generator's labels are 0..C-1 and encode to themselves
        truth = score("accuracy", y[-TRUTH_ROWS:], model.predict(X[-TRUTH_ROWS:].astype(np.float32)))
        outer = np.array(summary["nested"]["outer"])
        test_train = float(np.mean([len(f.valid) for f in plan.outer]) / np.mean([len(f.train) for f in plan.outer]))
        return {"setting": setting_name, "generator": generator, "index": index, "repeats": repeats, "truth": truth,
                "mean": summary["nested"]["mean"], "ci95": summary["nested"]["ci95"],
                "se_rows": summary["nested"]["se_rows"], "se_between": summary["nested"]["se_between"],
                "old": corrected_t(outer, test_train), "outer": outer.tolist(), "optimism": summary["optimism"],
                "wall_s": round(time.time() - started, 1)}


def expected_scores(results: list[dict[str, Any]]) -> list[float]:
    """Target (a) per result: the mean truth of the other problems of its generator, setting and repeats."""
    targets = []
    for r in results:
        others = [o["truth"] for o in results if o is not r and
                  (o["setting"], o["generator"], o["repeats"]) == (r["setting"], r["generator"], r["repeats"])]
        targets.append(float(np.mean(others)) if others else math.nan)
    return targets


def coverage(hits: list[bool]) -> str:
    """`k/n (share, exact 95% bounds)`."""
    n, k = len(hits), int(sum(hits))
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return f"{k}/{n} ({k / n:.0%}, {ci.low:.2f}-{ci.high:.2f})"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| setting | repeats | interval | problems | covers (b) shipped model | covers (a) expected score | "
             "mean width | mean estimate - truth | mean optimism |", "|---|---|---|---|---|---|---|---|---|"]
    for setting, repeats in sorted({(r["setting"], r["repeats"]) for r in results}):
        group = [(r, a) for r, a in zip(results, expected_scores(results), strict=True)
                 if (r["setting"], r["repeats"]) == (setting, repeats) and math.isfinite(a)]
        if not group:
            continue
        bias = np.mean([r["mean"] - r["truth"] for r, _ in group])
        optimism = np.mean([r["optimism"] for r, _ in group])
        for label, key in (("new (printed)", "ci95"), ("old corrected t", "old")):
            shipped = [r[key][0] <= r["truth"] <= r[key][1] for r, _ in group]
            expected = [r[key][0] <= a <= r[key][1] for r, a in group]
            width = np.mean([r[key][1] - r[key][0] for r, _ in group])
            lines.append(f"| {setting} | {repeats} | {label} | {len(group)} | {coverage(shipped)} | "
                         f"{coverage(expected)} | {width:.3f} | {bias:+.3f} | {optimism:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--setting", choices=list(SETTINGS), nargs="+", default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--first", type=int, default=0, help="first problem (to split the work over processes)")
    parser.add_argument("--out", type=Path, default=Path("bench_coverage.jsonl"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = args.out.resolve()
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    seen = {(r["setting"], r["generator"], r["index"], r["repeats"]) for r in done}
    names = list(GENERATORS)
    for setting in args.setting:
        drawn = pools(max(args.problems, 50), SETTINGS[setting].rows)  # the same rows however the work is split
        for p in range(args.first, args.problems):
            generator, index = names[p % len(names)], p // len(names)
            for repeats in args.repeats:
                if (setting, generator, index, repeats) in seen:
                    continue
                result = one_problem(setting, generator, index, drawn[generator], repeats)
                done.append(result)
                with out.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                inside = result["ci95"][0] <= result["truth"] <= result["ci95"][1]
                print(f"{setting} {generator} #{index} repeats {repeats}: truth {result['truth']:.3f}, nested "
                      f"{result['mean']:.3f} [{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}] "
                      f"{'in' if inside else 'OUT'}, {result['wall_s']}s", flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
