"""The training engine alone: sonar-round speed and peak memory on a larger table, each in a fresh process.

    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py speed            # 3 rounds of 48 sonar models, 100 epochs
    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py memory           # 10^5 x 40 rows, 48 models, 1 epoch
    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py memory --rows 300000 --models 96
    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py speed --models 96 --epochs 30 --repeats 1 --ops

`speed` times `fit_many` on rounds shaped like the quickstart's (trials with searched lr, weight decay,
l1, dropout, width and batch size; 3 inner folds each; early stopping; a report every 5 epochs) and
prints the median wall and process CPU time of `--repeats` rounds (CPU time moves less than wall
time on a shared machine). `memory` prints the process's peak RSS (ru_maxrss)
after one `fit_many` call, next to the RSS before it (data and imports), so the difference is the
engine's. Run the two engines to compare back to back in one shell session: timings on a shared
machine move by 10-20% between minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from foldsweep.data import load_dataset
from foldsweep.spec import DataSpec, ModelSpec, TrainSpec
from foldsweep.train import FitJob, fit_many


def _jobs(y: np.ndarray, n_models: int, epochs: int, batch_sizes: list[int], seed: int) -> list[FitJob]:
    """`n_models` fold fits: n_models / 3 trials of 3 stratified folds, knobs drawn like a random sampler's."""
    rng = np.random.default_rng(seed)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    jobs = []
    for trial in range(n_models // 3):
        model = ModelSpec(width=int(np.exp(rng.uniform(np.log(16), np.log(128)))), dropout=float(rng.uniform(0, 0.5)))
        train = TrainSpec(epochs=epochs, patience=10, batch_size=int(rng.choice(batch_sizes)),
                          lr=float(np.exp(rng.uniform(np.log(3e-4), np.log(3e-2)))),
                          weight_decay=float(np.exp(rng.uniform(np.log(1e-5), np.log(0.1)))),
                          l1=float(np.exp(rng.uniform(np.log(1e-7), np.log(1e-3)))))
        jobs += [FitJob(tr, va, model, train, seed=1000 * trial + f) for f, (tr, va) in enumerate(folds)]
    return jobs


def speed(args: argparse.Namespace) -> dict[str, object]:
    data = load_dataset(DataSpec(dataset="sonar"))
    X, y = torch.as_tensor(data.X), torch.as_tensor(data.y)
    walls, cpus, epochs = [], [], 0
    for r in range(args.repeats):
        jobs = _jobs(data.y, args.models, args.epochs, [8, 16, 32], seed=r)
        start, cpu = time.perf_counter(), time.process_time()
        results = fit_many(X, y, jobs, 2, "accuracy", report_every=5)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        epochs += sum(res.epochs_run for res in results)
    if args.ops:
        print_top_ops(X, y, _jobs(data.y, args.models, args.epochs, [8, 16, 32], seed=0))
    return {"bench": "speed", "models": args.models, "repeats": args.repeats, "median_wall_s": statistics.median(walls),
            "walls_s": [round(w, 3) for w in walls], "median_cpu_s": statistics.median(cpus), "fold_epochs": epochs,
            "fold_epochs_per_s": epochs / sum(walls)}


def print_top_ops(X: torch.Tensor, y: torch.Tensor, jobs: list[FitJob]) -> None:
    """torch.profiler's 15 most expensive ops by their own CPU time, over one more round (to stderr): per-op
    seconds move far less with the machine's load than a round's total does."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit_many(X, y, jobs, 2, "accuracy", report_every=5)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


def memory(args: argparse.Namespace) -> dict[str, object]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, 40)).astype(np.float32)
    y = (X[:, :5].sum(1) + rng.normal(size=args.rows) > 0).astype(np.int64)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    jobs = _jobs(y, args.models, args.epochs, [256, 512, 1024], seed=0)
    jobs = [FitJob(j.train_rows, j.valid_rows, j.model, j.train.model_copy(update={"batch_size": 512}), j.seed,
                   fixed_epochs=args.epochs) for j in jobs]  # one structure group: one batch of all models
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    fit_many(Xt, yt, jobs, 2, "accuracy", report_every=5)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"bench": "memory", "rows": args.rows, "models": len(jobs), "epochs": args.epochs,
            "rss_before_mb": round(before), "peak_rss_mb": round(peak), "engine_mb": round(peak - before),
            "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "memory"])
    parser.add_argument("--models", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=None, help="default: 100 (speed), 1 (memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--ops", action="store_true", help="speed: also print the top ops of one round (stderr)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.epochs is None:
        args.epochs = 100 if args.what == "speed" else 1
    print(json.dumps(speed(args) if args.what == "speed" else memory(args)))


if __name__ == "__main__":
    main()
