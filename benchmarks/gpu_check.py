"""The measuring steps of benchmarks/gpu_check.sh, one subcommand each, each writing one JSON file.

The shell script owns the order, the time limits and the installs; these subcommands own the numbers
(benchmarks/gpu_summary.py puts them next to their targets):

    env       OUT.json                   python, torch, CUDA, the device, versions of what the sweep imports
    micro     OUT.json --sizes 5,125     fold-fit epochs per second of foldsweep's engine (`fit_many`) on
                                         sonar-sized fold models, eager and (on CUDA) captured; the two are
                                         also compared model for model (validation-loss curves)
    baseline  OUT.json --device cpu      the plain loop: one model, DataLoader, `.item()` per batch

Sonar-sized means what one inner fold of `sweeps/sonar.yaml` trains: 60 inputs, 106 training and 27
validation rows (5 inner folds of 133 outer-train rows), 2 x 64 hidden units, batch size 16, AdamW.
The rows are the bundled sonar data's. Timings use CUDA events on a GPU (perf_counter on a CPU) around
one `fit_many` call, after a short warm-up call of the same shape (CUDA context, kernels, allocator);
a captured run's capture time is inside its timed call, as it is inside a sweep.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from foldsweep.data import load_dataset
from foldsweep.spec import DataSpec, ModelSpec, TrainSpec
from foldsweep.train import FitJob, FitResult, fit_many

OUTER_TRAIN, FOLDS, WIDTH, BATCH = 133, 5, 64, 16  # one sonar inner fold: 106 training rows, 27 validation
CARRIED_AS = {"mlflow": "mlflow-skinny"}  # what gpu_wheels.sh carries in its place (same code, no UI/server)
REPORT_EVERY = 5  # the sweep's default: a host sync (pruning report) every 5 epochs
SAME_TOLERANCE = 1e-3  # captured vs eager: max |difference| of validation-loss curves over all epochs


def fit_options(mode: str) -> dict[str, Any]:
    """The one place that asks `fit_many` for eager or CUDA-graph-captured training.

    It reads `fit_many`'s signature: an engine with a `cuda_graphs` keyword ("off" | "on", as the spec's
    `resources.cuda_graphs`) gets it; one without has no captured mode. Adapt here if the engine names
    the choice differently.
    """
    if "cuda_graphs" in inspect.signature(fit_many).parameters:
        return {"cuda_graphs": {"eager": "off", "captured": "on"}[mode]}
    if mode == "captured":
        raise LookupError("this engine's fit_many takes no `cuda_graphs` keyword: it has no captured mode")
    return {}


# -- data and jobs -----------------------------------------------------------------------------------------
def sonar_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled sonar table's first OUTER_TRAIN rows, standing in for one outer fold's training part."""
    data = load_dataset(DataSpec(dataset="sonar"))
    return torch.as_tensor(data.X[:OUTER_TRAIN]), torch.as_tensor(data.y[:OUTER_TRAIN])


def fold_jobs(n_models: int, epochs: int, seed: int = 0) -> list[FitJob]:
    """`n_models` fold fits: trials of FOLDS folds, each trial with its own learning rate and weight decay.

    Patience equals the epoch budget, so every model trains every epoch and the count of fold-epochs is
    exact: a benchmark of the step, not of early stopping.
    """
    rng = np.random.default_rng(seed)
    folds = np.array_split(rng.permutation(OUTER_TRAIN), FOLDS)
    jobs = []
    for m in range(n_models):
        valid = np.sort(folds[m % FOLDS])
        train = np.setdiff1d(np.arange(OUTER_TRAIN), valid)
        spec = TrainSpec(epochs=epochs, patience=epochs, batch_size=BATCH, lr=float(10 ** rng.uniform(-3.5, -1.5)),
                         weight_decay=float(10 ** rng.uniform(-5, -1)))
        jobs.append(FitJob(train, valid, ModelSpec(width=WIDTH, depth=2), spec, seed=seed * 100_003 + m))
    return jobs


def timed(device: torch.device, run: Callable[[], Any]) -> tuple[Any, float]:
    """`run()` and its seconds: CUDA events on a GPU (the device's own clock), else perf_counter."""
    if device.type != "cuda":
        start = time.perf_counter()
        return run(), time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    out = run()
    end.record()
    torch.cuda.synchronize(device)
    return out, begin.elapsed_time(end) / 1000


# -- micro: foldsweep's engine -----------------------------------------------------------------------------
def engine_fit(X: torch.Tensor, y: torch.Tensor, jobs: list[FitJob], mode: str) -> list[FitResult]:
    """One `fit_many` call as the sweep makes it: a report hook every REPORT_EVERY epochs (a host sync)."""
    return fit_many(X, y, jobs, 2, "accuracy", report_every=REPORT_EVERY, on_report=lambda ids, epoch, curves: [],
                    **fit_options(mode))


def micro(args: argparse.Namespace) -> dict[str, Any]:
    """Every size in each mode; the JSON is rewritten after each measurement, so a step stopped at its time
    limit still leaves the sizes it finished, and a mode that fails at one size is recorded and skipped."""
    device = torch.device(args.device)
    X, y = (t.to(device) for t in sonar_rows())
    modes = ["eager", "captured"] if device.type == "cuda" else ["eager"]
    out: dict[str, Any] = {"device": str(device), "epochs": args.epochs, "report_every": REPORT_EVERY,
                           "tolerance": SAME_TOLERANCE, "rows": [], "skipped": [], "same": []}
    if device.type != "cuda":
        out["skipped"].append("captured: CUDA graphs need a CUDA device (this run is on the CPU)")
    curves: dict[tuple[int, str], np.ndarray] = {}
    for size in args.sizes:
        for mode in modes:
            try:
                row, curves[(size, mode)] = _measure(X, y, size, args.epochs, mode)
                out["rows"].append(row)
            except Exception as why:  # recorded, and the other sizes and modes still run
                out["skipped"].append(f"{mode} at {size} models: {type(why).__name__}: {str(why)[:300]}")
            out["same"] = _compare(curves, args.sizes)
            args.out.write_text(json.dumps(out, indent=1))
    return out


def _measure(X: torch.Tensor, y: torch.Tensor, size: int, epochs: int, mode: str) -> tuple[dict[str, Any], np.ndarray]:
    """One timed `fit_many` of `size` models after an untimed warm-up of the same shape; its row and curves."""
    device = X.device
    engine_fit(X, y, fold_jobs(size, REPORT_EVERY * 2, seed=1), mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results, seconds = timed(device, partial(engine_fit, X, y, fold_jobs(size, epochs), mode))
    fold_epochs = sum(r.epochs_run for r in results)
    print(f"{size:>6} models {mode:>8}: {fold_epochs / seconds:12.0f} fold-epochs/s ({seconds:.2f} s)", flush=True)
    return ({"models": size, "mode": mode, "seconds": seconds, "fold_epochs": fold_epochs,
             "fold_epochs_per_s": fold_epochs / seconds, "fits_per_s": size / seconds,
             "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None},
            np.stack([r.val_loss for r in results]))


def _compare(curves: dict[tuple[int, str], np.ndarray], sizes: list[int]) -> list[dict[str, Any]]:
    """Captured against eager, model for model: the largest validation-loss difference over all epochs."""
    out = []
    for size in sizes:
        eager, captured = curves.get((size, "eager")), curves.get((size, "captured"))
        if eager is None or captured is None:
            continue
        same_shape = eager.shape == captured.shape
        diff = float(np.nanmax(np.abs(eager - captured))) if same_shape else math.inf
        out.append({"models": size, "max_abs_val_loss_diff": diff, "ok": same_shape and diff <= SAME_TOLERANCE})
    return out


# -- baseline: the plain loop --------------------------------------------------------------------------------
def plain_fit(x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor, y_va: torch.Tensor, epochs: int,
              device: torch.device, seed: int) -> int:
    """One fold the way most code trains it; returns the epochs run (all of them: no early stopping)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x_tr.shape[1], WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, 2)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=BATCH, shuffle=True)
    for _ in range(epochs):
        model.train()
        total = 0.0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        model.eval()
        with torch.no_grad():
            F.cross_entropy(model(x_va.to(device)), y_va.to(device)).item()
    return epochs


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    X, y = sonar_rows()
    job = fold_jobs(1, args.epochs)[0]
    rows = torch.as_tensor(job.train_rows)
    mean, std = X[rows].mean(0), X[rows].std(0).clamp(min=1e-6)
    X = (X - mean) / std
    x_tr, y_tr = X[rows], y[rows]
    x_va, y_va = X[torch.as_tensor(job.valid_rows)], y[torch.as_tensor(job.valid_rows)]
    plain_fit(x_tr, y_tr, x_va, y_va, 2, device, seed=99)  # warm-up, not timed
    fit = partial(plain_fit, x_tr, y_tr, x_va, y_va, args.epochs, device)
    epochs, seconds = timed(device, lambda: sum(fit(seed) for seed in range(args.fits)))
    print(f"plain loop, {device}, {torch.get_num_threads()} threads: {epochs / seconds:.0f} fold-epochs/s", flush=True)
    return {"device": str(device), "threads": torch.get_num_threads(), "fits": args.fits, "epochs": args.epochs,
            "seconds": seconds, "fold_epochs_per_s": epochs / seconds}


# -- env ---------------------------------------------------------------------------------------------------
def env(args: argparse.Namespace) -> dict[str, Any]:
    """What ran: interpreter, torch and its CUDA, the device, and foldsweep's requirements as found there."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1e9, 1),
                 "multiprocessors": props.multi_processor_count}
    for name in ("optuna", "mlflow"):
        try:
            info[name] = __import__(name).__version__
        except ImportError as why:
            info[name] = f"missing: {why}"
    info["requirements"] = requirements_found()
    print(json.dumps(info, indent=1))
    return info


def requirements_found() -> dict[str, str]:
    """Each of pyproject.toml's dependencies: the installed version, marked where it misses the range.

    foldsweep runs from `src/` there, not pip-installed, so nothing else checks its requirements against
    the image's packages; a mismatch here explains an import or behaviour failure in a later step.
    """
    from importlib.metadata import PackageNotFoundError, version

    import tomllib
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    found = {}
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        req = Requirement(line)
        try:
            have = version(CARRIED_AS.get(req.name, req.name))
            ok = req.specifier.contains(have, prereleases=True)
            found[req.name] = have if ok else f"{have} (wants {req.specifier})"
        except PackageNotFoundError:
            found[req.name] = "MISSING"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("out", type=Path)
    p = sub.add_parser("micro")
    p.add_argument("out", type=Path)
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[5, 125, 625, 3125])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p = sub.add_parser("baseline")
    p.add_argument("out", type=Path)
    p.add_argument("--device", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--fits", type=int, default=3)
    args = parser.parse_args()
    run = {"env": env, "micro": micro, "baseline": baseline}[args.command]
    args.out.write_text(json.dumps(run(args), indent=1))  # micro has written it as it went; this is the same


if __name__ == "__main__":
    main()
