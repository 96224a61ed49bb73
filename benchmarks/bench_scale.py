"""foldsweep on large tables: peak memory, memory per model, and speed against a plain training loop.

For each table size (synthetic: sklearn's make_classification, 40 features, 2 classes, written as Parquet)
three processes run, one after another, each measured on its own (so sizes and runs never share a peak):

1. `foldsweep run` (the CLI, tracking on) with a quickstart-like budget: 3 outer x 3 inner stratified
   folds, 4 studies (outer-0..2, final), batch sizes 256 / 512 / 1024 searched with lr, weight decay, L1,
   dropout and width; one round of trials per study, so the round holds studies x trials x inner folds
   models: 48 (4 trials per study) ...
2. ... and the same with 20 trials per study: 240 models. The difference of the two peaks over 192 is
   the memory one more model in the batch costs; its growth from the smallest table to the largest, per
   training row of an inner fold, is the slope the issue bounds.
   Peak RSS is `ru_maxrss` of the sweep process tree as wait4 reports it (the largest one process
   reached: the training process, whose memory this is; the MLflow writer is another, smaller one). A
   watchdog samples the tree's summed RSS and stops a run that passes --max-rss-gb (the table says so).
3. The engine alone (`fit_many`, one torch thread) on the 48 fold fits of that round (the sweep's own
   fold plan, hyperparameters drawn from the same space), then the plain loop on every 8th of those fits:
   one model at a time, a StandardScaler, index batches from a shuffled permutation, torch.optim.AdamW
   with the L1 term in the loss, a validation pass per epoch (one torch thread as well). Patience equals
   the epoch budget, so every fit trains every epoch and fold-epochs are counted exactly.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py            # 10^4, 10^5, 10^6 rows

Tables of --lean-from rows or more (default 10^6) run lean: the sweeps train 1 epoch per fit with the
width fixed at 16 (the rest searched as above), and the engine / plain-loop comparison is left out.
On 2 CPU cores the full budget at 10^6 rows would train for hours; the lean one still holds the same
48 and 240 models in its round, so it measures the peak memory and the memory per model the issue
bounds (a width-16 model's parameters are ~0.1 MB smaller than a searched one's).
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --quick    # 10^4 and 10^5: a few minutes
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --big      # adds 10^7 rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FEATURES, BATCH_SIZES, INNER_K, OUTER_K, TEST_SIZE = 40, [256, 512, 1024], 3, 3, 0.2
STUDIES = OUTER_K + 1  # outer-0..2 and final, asked together in one round
TRIALS = {48: 4, 240: 20}  # models in the round -> trials per study
SEARCH = {
    "lr": {"type": "float", "low": 0.0003, "high": 0.03, "log": True},
    "weight_decay": {"type": "float", "low": 0.00001, "high": 0.1, "log": True},
    "l1": {"type": "float", "low": 0.0000001, "high": 0.001, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "batch_size": {"type": "categorical", "choices": BATCH_SIZES},
    "width": {"type": "int", "low": 16, "high": 128, "log": True},
}
TARGET_PEAK_GB, TARGET_SLOPE_B, TARGET_SPEEDUP = 4.0, 8.0, 2.0


@dataclass
class Measured:
    rc: int
    wall_s: float
    peak_bytes: int
    stopped: bool  # the watchdog stopped it (over --max-rss-gb)
    stdout: str
    cpu_s: float  # user + system CPU time of the process (not of its children)


def train_rows(n: int) -> int:
    """Training rows of one inner fold: what one model of the round trains on."""
    return int(n * (1 - TEST_SIZE) * (1 - 1 / OUTER_K) * (1 - 1 / INNER_K))


def write_table(n: int, folder: Path) -> Path:
    """A make_classification table of n rows as Parquet (float32 features, integer label)."""
    import pandas as pd
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n, n_features=FEATURES, n_informative=12, n_redundant=8,
                               class_sep=0.8, flip_y=0.05, random_state=0)
    frame = pd.DataFrame(X.astype(np.float32), columns=[f"f{i}" for i in range(FEATURES)])
    frame["label"] = y
    path = folder / f"table-{n}.parquet"
    frame.to_parquet(path, index=False)
    return path


def sweep_spec(data: Path, trials: int, epochs: int, lean: bool = False) -> dict[str, Any]:
    """The quickstart's shape at a large table's scale: one round of `trials` per study, tracking on;
    `lean`: the width fixed at 16 (see the module's docstring)."""
    search = {k: v for k, v in SEARCH.items() if k != "width"} if lean else SEARCH
    return {"name": "scale", "data": {"path": str(data), "target": "label", "task": "classification",
                                      "metric": "accuracy"},
            "split": {"test_size": TEST_SIZE, "seed": 0, "outer": {"kind": "stratified", "k": OUTER_K},
                      "inner": {"kind": "stratified", "k": INNER_K}},
            "model": {"depth": 2, "activation": "relu", **({"width": 16} if lean else {})},
            "train": {"epochs": epochs, "patience": epochs},
            "search": search,
            # no warm start: `final` would keep trials back for the outer bests, and the round would be smaller
            "optuna": {"n_trials": trials, "trials_per_batch": trials, "n_startup_trials": trials, "seed": 0,
                       "sampler": "tpe", "warm_start_final": False},
            "resources": {"devices": "cpu", "workers": 1},
            "tracking": {"enabled": True, "uri": "sqlite:///mlruns/mlflow.db"}}


def measured(cmd: list[str], cwd: Path, max_rss: float) -> Measured:
    """Run `cmd` in its own session; its exit, wall time and peak RSS (wait4), stopped past `max_rss` bytes."""
    import psutil

    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    start = time.perf_counter()
    with out.open("w") as sink, err.open("w") as errors:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=sink, stderr=errors, start_new_session=True)
    stopped = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if not stopped and _tree_rss(psutil.Process(proc.pid)) > max_rss:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this run started: its own processes only
            stopped = True
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and not stopped:
        print(f"  {' '.join(cmd[1:4])} failed, stderr ends:\n{err.read_text()[-1500:]}", flush=True)
    return Measured(proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, stopped, out.read_text(),
                    usage.ru_utime + usage.ru_stime)


def _tree_rss(root: Any) -> int:
    """Summed RSS of a process and its children (0 for any that already ended)."""
    import psutil

    total = 0
    try:
        for p in [root, *root.children(recursive=True)]:
            total += p.memory_info().rss
    except psutil.Error:
        pass
    return total


def sweep_point(data: Path, n: int, models: int, epochs: int, max_rss: float, lean: bool) -> dict[str, Any]:
    """One `foldsweep run` with `models` fold models in its round, in a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        spec = Path(tmp) / "scale.yaml"
        spec.write_text(json.dumps(sweep_spec(data, TRIALS[models], epochs, lean)))  # JSON is YAML
        run = measured([sys.executable, "-m", "foldsweep", "run", str(spec), "--json"], Path(tmp), max_rss)
    point = {"rows": n, "models": models, "rc": run.rc, "wall_s": run.wall_s, "peak_bytes": run.peak_bytes,
             "stopped": run.stopped, "epochs": epochs, "lean": lean}
    if run.rc == 0:
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        inner_fits = summary["fold_fits"] - OUTER_K  # the refits counted apart: their epochs vary
        point |= {"fold_fits": summary["fold_fits"], "fold_epochs_per_s": inner_fits * epochs / run.wall_s,
                  "cpu_s": run.cpu_s}
    print(f"  sweep, {models} models: rc {run.rc}, {run.wall_s:.1f} s, peak {run.peak_bytes / 1e9:.2f} GB"
          + (" (stopped by the watchdog)" if run.stopped else ""), flush=True)
    return point


def engine_point(data: Path, n: int, epochs: int, max_rss: float) -> dict[str, Any]:
    """The engine and the plain loop on the round's 48 fold fits, in one child process."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        run = measured([sys.executable, __file__, "_engine", str(data), "--epochs", str(epochs)], Path(tmp), max_rss)
    point = {"rows": n, "rc": run.rc, "peak_bytes": run.peak_bytes, "stopped": run.stopped}
    if run.rc == 0:
        point |= json.loads(run.stdout.strip().splitlines()[-1])
        print(f"  engine {point['engine_fold_epochs_per_s']:.1f} fold-epochs/s, plain loop "
              f"{point['plain_fold_epochs_per_s']:.1f}", flush=True)
    return point


# -- the child: engine and plain loop on the same fits ------------------------------------------------------
def round_jobs(data: Any, epochs: int, seed: int = 0) -> list[Any]:
    """The 48 fits of the sweep's first round: 4 trials in each of 4 studies, on the sweep's own folds."""
    from foldsweep.spec import ModelSpec, SplitSpec, TrainSpec
    from foldsweep.splits import make_plan
    from foldsweep.train import FitJob

    plan = make_plan(data, SplitSpec(test_size=TEST_SIZE, seed=0, outer={"kind": "stratified", "k": OUTER_K},
                                     inner={"kind": "stratified", "k": INNER_K}))
    rng = np.random.default_rng(seed)
    jobs = []
    for study, folds in enumerate([*plan.inner, plan.final_inner]):
        for trial in range(TRIALS[48]):
            model = ModelSpec(width=int(round(np.exp(rng.uniform(np.log(16), np.log(128))))),
                              dropout=float(rng.uniform(0, 0.5)))
            train = TrainSpec(epochs=epochs, patience=epochs, batch_size=BATCH_SIZES[(study + trial) % 3],
                              lr=float(np.exp(rng.uniform(np.log(3e-4), np.log(3e-2)))),
                              weight_decay=float(np.exp(rng.uniform(np.log(1e-5), np.log(0.1)))),
                              l1=float(np.exp(rng.uniform(np.log(1e-7), np.log(1e-3)))))
            jobs += [FitJob(f.train, f.valid, model, train, seed=1000 * (4 * study + trial) + i)
                     for i, f in enumerate(folds)]
    return jobs


def plain_fit(X: Any, y: Any, job: Any) -> int:
    """One fold the way most code trains it; returns the epochs it ran."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(job.seed)
    tr, va = torch.as_tensor(job.train_rows), torch.as_tensor(job.valid_rows)
    mean, std = X[tr].mean(0), X[tr].std(0).clamp(min=1e-6)
    x_tr, y_tr, x_va, y_va = (X[tr] - mean) / std, y[tr], (X[va] - mean) / std, y[va]
    w, p = job.model.width, job.model.dropout
    model = nn.Sequential(nn.Linear(FEATURES, w), nn.ReLU(), nn.Dropout(p), nn.Linear(w, w), nn.ReLU(), nn.Dropout(p),
                          nn.Linear(w, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr, weight_decay=job.train.weight_decay)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    for _ in range(job.train.epochs):
        model.train()
        order = torch.randperm(len(x_tr))
        for start in range(0, len(order), job.train.batch_size):
            idx = order[start : start + job.train.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx]) + job.train.l1 * sum(v.abs().sum() for v in weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            F.cross_entropy(model(x_va), y_va).item()
    return job.train.epochs


def engine_child(data_path: Path, epochs: int) -> dict[str, Any]:
    import torch

    from foldsweep.data import load_dataset
    from foldsweep.spec import DataSpec
    from foldsweep.train import fit_many

    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_dataset(DataSpec(path=str(data_path), target="label", task="classification", metric="accuracy"))
    load_s = time.perf_counter() - start
    X, y = torch.as_tensor(data.X), torch.as_tensor(data.y)
    jobs = round_jobs(data, epochs)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    warm = round_jobs(data, 1)[:3]  # first calls pay one-off costs (lazy init, allocator): not timed
    fit_many(X, y, warm, 2, "accuracy")
    plain_fit(X, y, warm[0])
    start = time.perf_counter()
    results = fit_many(X, y, jobs, 2, "accuracy", report_every=5, on_report=lambda ids, epoch, curves: [])
    engine_s = time.perf_counter() - start
    engine_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sample = jobs[::8]
    start = time.perf_counter()
    plain_epochs = sum(plain_fit(X, y, job) for job in sample)
    plain_s = time.perf_counter() - start
    return {"load_s": load_s, "rss_loaded_bytes": rss_loaded, "engine_peak_bytes": engine_peak,
            "engine_fold_epochs_per_s": sum(r.epochs_run for r in results) / engine_s, "engine_s": engine_s,
            "plain_fits": len(sample), "plain_fold_epochs_per_s": plain_epochs / plain_s}


# -- the report ----------------------------------------------------------------------------------------------
def per_model(points: list[dict[str, Any]], n: int) -> float | None:
    """Bytes one more model in the round costs at n rows: (peak at 240 - peak at 48) / 192."""
    peak = {p["models"]: p["peak_bytes"] for p in points if p["rows"] == n and p["rc"] == 0}
    return (peak[240] - peak[48]) / 192 if 48 in peak and 240 in peak else None


def report(sweeps: list[dict[str, Any]], engines: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    lines = ["| rows | train rows / fold | sweep 48: s | sweep 48: fold-epochs/s | peak GB, 48 models | "
             "peak GB, 240 models | MB per model | engine fold-epochs/s | plain loop fold-epochs/s | engine / plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        by = {p["models"]: p for p in sweeps if p["rows"] == n}
        eng = next((e for e in engines if e["rows"] == n), {})
        cost = per_model(sweeps, n)
        lean = " (lean)" if any(p.get("lean") for p in by.values()) else ""
        cells = [f"{n:,}{lean}", f"{train_rows(n):,}", _cell(by.get(48), "wall_s", "{:.1f}"),
                 _cell(by.get(48), "fold_epochs_per_s", "{:,.1f}"), _peak(by.get(48)), _peak(by.get(240)),
                 f"{cost / 1e6:.1f}" if cost is not None else "-",
                 _cell(eng, "engine_fold_epochs_per_s", "{:,.1f}"), _cell(eng, "plain_fold_epochs_per_s", "{:,.1f}"),
                 f"{eng['engine_fold_epochs_per_s'] / eng['plain_fold_epochs_per_s']:.2f}x"
                 if "engine_fold_epochs_per_s" in eng else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + targets(sweeps, engines, sizes)


def _cell(point: dict[str, Any] | None, key: str, fmt: str) -> str:
    return fmt.format(point[key]) if point and key in point else "-"


def _peak(point: dict[str, Any] | None) -> str:
    if point is None:
        return "-"
    if point["stopped"]:
        return f"> {point['peak_bytes'] / 1e9:.1f} (stopped)"
    return f"{point['peak_bytes'] / 1e9:.2f}" + ("" if point["rc"] == 0 else f" (exit {point['rc']})")


def targets(sweeps: list[dict[str, Any]], engines: list[dict[str, Any]], sizes: list[int]) -> list[str]:
    """The issue's three targets, each next to what this run measured (or why it could not)."""
    top = next((p for p in sweeps if p["rows"] == 10**6 and p["models"] == 240), None)
    peak = ("not measured (10^6 rows not in this run)" if top is None
            else f"{'over ' if top['stopped'] else ''}{top['peak_bytes'] / 1e9:.2f} GB")
    costs = {n: cost for n in sizes if (cost := per_model(sweeps, n)) is not None}
    if len(costs) >= 2:
        lo, hi = min(costs), max(costs)
        slope = (costs[hi] - costs[lo]) / (train_rows(hi) - train_rows(lo))
        slope_text = f"{slope:,.1f} bytes per training row ({lo:,} -> {hi:,} rows)"
    else:
        slope_text = "needs two sizes with both model counts measured"
    eng = next((e for e in engines if e["rows"] == 10**5 and "engine_fold_epochs_per_s" in e), None)
    ratio = (f"{eng['engine_fold_epochs_per_s'] / eng['plain_fold_epochs_per_s']:.2f}x" if eng
             else "not measured at 10^5 rows")
    return [f"- peak memory at 10^6 rows x 40 features, 240-model round: {peak} (target <= {TARGET_PEAK_GB:.0f} GB)",
            f"- memory per model in the round grows by {slope_text} (target <= ~{TARGET_SLOPE_B:.0f})",
            f"- engine over plain loop at 10^5 rows: {ratio} in fold-fit epochs/s (target >= {TARGET_SPEEDUP:.0f}x)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10^4 and 10^5 rows only")
    parser.add_argument("--big", action="store_true", help="add 10^7 rows")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fold fit (all of them: patience = epochs)")
    parser.add_argument("--max-rss-gb", type=float, default=8.0, help="stop a run whose processes hold more")
    parser.add_argument("--json", type=Path, help="also write every measured point here")
    parser.add_argument("--lean-from", type=int, default=10**6,
                        help="tables of this many rows or more run lean: 1 epoch, width 16, no engine point")
    args = parser.parse_args()
    sizes = [10**4, 10**5] if args.quick else [10**4, 10**5, 10**6] + ([10**7] if args.big else [])
    max_rss = args.max_rss_gb * 1e9
    sweeps, engines = [], []
    with tempfile.TemporaryDirectory(prefix="bench-scale-data-") as tmp:
        for n in sizes:
            lean = n >= args.lean_from
            epochs = 1 if lean else args.epochs
            print(f"{n:,} rows x {FEATURES} features, {epochs} epochs per fit" + (", lean" if lean else ""), flush=True)
            data = write_table(n, Path(tmp))
            if not lean:
                engines.append(engine_point(data, n, epochs, max_rss))
            sweeps += [sweep_point(data, n, models, epochs, max_rss, lean) for models in TRIALS]
            data.unlink()
    if args.json:
        args.json.write_text(json.dumps({"sweeps": sweeps, "engines": engines}, indent=1))
    print("\n".join(report(sweeps, engines, sizes)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_engine":
        child = argparse.ArgumentParser()
        child.add_argument("command")
        child.add_argument("data", type=Path)
        child.add_argument("--epochs", type=int, required=True)
        options = child.parse_args()
        print(json.dumps(engine_child(options.data, options.epochs)))
    else:
        main()
