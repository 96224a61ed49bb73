"""foldsweep against the common way of writing the same nested sweep, timed in one run.

The baseline is what people write: `study.optimize` with an objective that loops StratifiedKFold folds,
each fold a StandardScaler + `nn.Module` MLP + AdamW + DataLoader loop with an L1 term in the loss,
`.item()` per batch, early stopping on the validation loss (best weights restored); nested by hand
(one study per outer fold, refit on outer-train for the mean best epoch, score on outer-test). It runs
twice: without logging and with one `mlflow.log_metric` call per epoch per fold into a real sqlite
MLflow store. foldsweep runs `run_sweep` on the same spec (same folds, knobs, epochs, patience, trial
count, TPE settings) with full tracking, twice: with one worker process, and with one worker per core
(what `resources.workers` defaults to on a CPU machine; the baseline is the one-process loop people
write). Its MLflow writer is one more process, as in any foldsweep run. It also runs its `final` study,
whose fits count in its fits per second like any other. Every process runs one torch thread (what a
foldsweep CPU worker uses), and each MLflow store is created before its side is timed (the schema
migrations are a once-per-project cost, printed apart).

    python benchmarks/bench_sweep.py            # 3 outer x 3 inner, 30 trials per study, 100 epochs: ~5 min
    python benchmarks/bench_sweep.py --quick    # a smoke run: 6 trials, 30 epochs
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import tempfile
import time
import warnings
from contextlib import chdir, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

SEARCH = {
    "lr": {"type": "float", "low": 0.0003, "high": 0.03, "log": True},
    "weight_decay": {"type": "float", "low": 0.00001, "high": 0.1, "log": True},
    "l1": {"type": "float", "low": 0.0000001, "high": 0.001, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
    "width": {"type": "int", "low": 16, "high": 128, "log": True},
}


@dataclass(frozen=True)
class Setup:
    outer: int
    inner: int
    trials: int
    epochs: int
    patience: int
    startup: int
    seed: int = 0
    test_size: float = 0.2


@dataclass
class Side:
    name: str
    wall_s: float
    fits: int
    epochs: int
    nested: list[float]
    best_inner: list[float]

    @property
    def fits_per_s(self) -> float:
        return self.fits / self.wall_s

    @property
    def epochs_per_s(self) -> float:
        return self.epochs / self.wall_s


# -- the baseline, the common way --------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, n_in: int, width: int, dropout: float, n_out: int = 2) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(width, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    s = SEARCH
    return {
        "lr": trial.suggest_float("lr", s["lr"]["low"], s["lr"]["high"], log=True),
        "weight_decay": trial.suggest_float("weight_decay", s["weight_decay"]["low"], s["weight_decay"]["high"],
                                            log=True),
        "l1": trial.suggest_float("l1", s["l1"]["low"], s["l1"]["high"], log=True),
        "dropout": trial.suggest_float("dropout", s["dropout"]["low"], s["dropout"]["high"]),
        "batch_size": trial.suggest_categorical("batch_size", s["batch_size"]["choices"]),
        "width": trial.suggest_int("width", s["width"]["low"], s["width"]["high"], log=True),
    }


def fit_fold(X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray, p: dict[str, Any],
             epochs: int, patience: int | None, log_key: str | None = None, mlflow: Any = None
             ) -> tuple[float, int, int]:
    """Accuracy, the epoch it comes from and the epochs run.

    With `patience`, early stopping on the validation loss restores the best weights; without it (a refit
    scored on outer-test rows) the model trains `epochs` and the last epoch is scored, untouched by them.
    """
    scaler = StandardScaler().fit(X_tr)
    x_tr = torch.tensor(scaler.transform(X_tr), dtype=torch.float32)
    x_va = torch.tensor(scaler.transform(X_va), dtype=torch.float32)
    t_tr, t_va = torch.as_tensor(y_tr), torch.as_tensor(y_va)
    model = Net(X_tr.shape[1], p["width"], p["dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    loader = DataLoader(TensorDataset(x_tr, t_tr), batch_size=p["batch_size"], shuffle=True)
    best_loss, best_epoch, best_state, bad, epoch = math.inf, epochs, None, 0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        running = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            l1 = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Linear))
            (loss + p["l1"] * l1).backward()
            opt.step()
            running += loss.item() * len(xb)
        if patience is None:
            continue
        model.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(model(x_va), t_va).item()
        if log_key is not None:
            mlflow.log_metrics({f"{log_key}/train_loss": running / len(x_tr), f"{log_key}/val_loss": val_loss},
                               step=epoch)
        if val_loss < best_loss:
            best_loss, best_epoch, bad = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_va).argmax(1) == t_va).float().mean())
    return accuracy, best_epoch, epoch


def baseline(X: np.ndarray, y: np.ndarray, setup: Setup, log: bool, folder: Path) -> Side:
    """Nested CV by hand: a study per outer fold, each trial a loop over inner folds, then refit and score."""
    mlflow = None
    if log:
        import mlflow

        mlflow.set_tracking_uri(store_uri(folder))
        mlflow.set_experiment("baseline")
    started = time.perf_counter()
    dev, _ = train_test_split(np.arange(len(y)), test_size=setup.test_size, random_state=setup.seed, stratify=y)
    dev = np.sort(dev)
    counts = {"fits": 0, "epochs": 0}
    nested, best_inner = [], []
    outer = StratifiedKFold(setup.outer, shuffle=True, random_state=setup.seed)
    for i, (o_tr, o_te) in enumerate(outer.split(np.zeros(len(dev)), y[dev])):
        o_tr, o_te = dev[o_tr], dev[o_te]
        inner = list(StratifiedKFold(setup.inner, shuffle=True, random_state=setup.seed + 1 + i)
                     .split(np.zeros(len(o_tr)), y[o_tr]))

        def objective(trial: optuna.Trial, o_tr: np.ndarray = o_tr, inner: list[Any] = inner, i: int = i) -> float:
            p = suggest(trial)
            run = mlflow.start_run(run_name=f"outer-{i}/trial-{trial.number}") if mlflow else nullcontext()
            scores, best_epochs = [], []
            with run:
                for k, (tr, va) in enumerate(inner):
                    tr, va = o_tr[tr], o_tr[va]
                    acc, best, ran = fit_fold(X[tr], y[tr], X[va], y[va], p, setup.epochs, setup.patience,
                                              f"fold_{k}" if mlflow else None, mlflow)
                    scores.append(acc)
                    best_epochs.append(best)
                    counts["fits"] += 1
                    counts["epochs"] += ran
            trial.set_user_attr("best_epoch", max(1, round(float(np.mean(best_epochs)))))
            return float(np.mean(scores))

        sampler = optuna.samplers.TPESampler(seed=setup.seed + i, n_startup_trials=setup.startup, multivariate=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(objective, n_trials=setup.trials)
        refit_epochs = study.best_trial.user_attrs["best_epoch"]
        accuracy, _, _ = fit_fold(X[o_tr], y[o_tr], X[o_te], y[o_te], study.best_params, refit_epochs, None)
        nested.append(accuracy)
        best_inner.append(float(study.best_value))
        counts["fits"] += 1
        counts["epochs"] += refit_epochs
    wall = time.perf_counter() - started
    name = "baseline + mlflow.log_metric per epoch" if log else "baseline, no logging"
    return Side(name, wall, counts["fits"], counts["epochs"], nested, best_inner)


# -- foldsweep ---------------------------------------------------------------------------------------------
def sweep_spec(setup: Setup, trials_per_batch: int, pruner: str = "none", workers: int = 1) -> dict[str, Any]:
    return {
        "name": "bench",
        "data": {"dataset": "sonar", "metric": "accuracy"},
        "split": {"test_size": setup.test_size, "seed": setup.seed, "outer": {"kind": "stratified", "k": setup.outer},
                  "inner": {"kind": "stratified", "k": setup.inner}},
        "model": {"depth": 2, "activation": "relu"},
        "train": {"epochs": setup.epochs, "patience": setup.patience},
        "search": SEARCH,
        "optuna": {"n_trials": setup.trials, "sampler": "tpe", "n_startup_trials": setup.startup,
                   "trials_per_batch": trials_per_batch, "seed": setup.seed, "pruner": pruner},
        "resources": {"devices": "cpu", "workers": workers},
    }


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"  # where foldsweep's default tracking.uri points


def create_store(folder: Path) -> float:
    """Create the MLflow store (schema migrations: seconds, once per project) before a side is timed."""
    from mlflow import MlflowClient

    started = time.perf_counter()
    (folder / "mlruns").mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=store_uri(folder)).search_experiments()
    return time.perf_counter() - started


def run_foldsweep(setup: Setup, trials_per_batch: int, folder: Path, workers: int) -> Side:
    """`run_sweep` with full MLflow tracking (sqlite store) and the default journal storage, in `folder`."""
    from foldsweep.spec import parse_spec
    from foldsweep.workers import run_sweep

    spec = parse_spec(sweep_spec(setup, trials_per_batch, workers=workers))
    with chdir(folder):
        started = time.perf_counter()
        summary = run_sweep(spec)
        wall = time.perf_counter() - started
    # the outer studies only, like the baseline; `final` is timed too but not scored here
    best_inner = [r["best_inner_value"] for r in summary["outer_refits"]]
    name = "foldsweep, full tracking, " + ("1 worker" if workers == 1 else f"{workers} workers (one per core)")
    return Side(name, wall, summary["fold_fits"], summary.get("epochs_trained", 0),
                summary["nested"]["outer"], best_inner)


def check_same_folds(X: np.ndarray, y: np.ndarray, setup: Setup) -> None:
    """The baseline's hand-written splits are foldsweep's plan: the two sides score the same rows."""
    from foldsweep.data import load_dataset
    from foldsweep.spec import parse_spec
    from foldsweep.splits import make_plan

    spec = parse_spec(sweep_spec(setup, 1))
    plan = make_plan(load_dataset(spec.data), spec.split)
    dev, _ = train_test_split(np.arange(len(y)), test_size=setup.test_size, random_state=setup.seed, stratify=y)
    outer = StratifiedKFold(setup.outer, shuffle=True, random_state=setup.seed)
    for fold, (_, te) in zip(plan.outer, outer.split(np.zeros(len(dev)), y[np.sort(dev)]), strict=True):
        assert np.array_equal(fold.valid, np.sort(dev)[te]), "baseline outer folds differ from foldsweep's plan"


# -- the report --------------------------------------------------------------------------------------------
def table(sides: list[Side]) -> str:
    lines = ["| run | wall s | fold fits | fits/s | fold-epochs/s | nested accuracy | mean best inner CV |",
             "|---|---|---|---|---|---|---|"]
    for side in sides:
        lines.append(f"| {side.name} | {side.wall_s:.1f} | {side.fits} | {side.fits_per_s:.2f} | "
                     f"{side.epochs_per_s:.0f} | {100 * np.mean(side.nested):.1f} "
                     f"({', '.join(f'{100 * s:.1f}' for s in side.nested)}) | {100 * np.mean(side.best_inner):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="trials per study (default 30)")
    parser.add_argument("--epochs", type=int, default=100, help="max epochs per fit (default 100)")
    parser.add_argument("--patience", type=int, default=15, help="early-stopping patience (default 15)")
    parser.add_argument("--outer", type=int, default=3)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--trials-per-batch", type=int, default=8,
                        help="foldsweep's optuna.trials_per_batch: trials asked per study per round (default 8)")
    parser.add_argument("--quick", action="store_true", help="6 trials, 30 epochs: checks the script runs")
    parser.add_argument("--skip-logging-baseline", action="store_true", help="leave out the slowest run")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON too")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.patience = 6, 30, 10
    setup = Setup(args.outer, args.inner, args.trials, args.epochs, args.patience, startup=min(10, args.trials // 3))
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)  # what foldsweep's CPU worker uses; the baseline's small ops gain nothing from more
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import mlflow  # imported before any timing (both logging sides need it); it sets up its loggers on import

    logging.getLogger(mlflow.__name__).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from foldsweep.data import load_dataset
    from foldsweep.spec import DataSpec

    data = load_dataset(DataSpec(dataset="sonar"))
    check_same_folds(data.X, data.y, setup)
    print(f"sonar, {setup.outer} outer x {setup.inner} inner, {setup.trials} trials per study, "
          f"{setup.epochs} epochs, patience {setup.patience}, TPE ({setup.startup} startup trials), "
          f"one process, 1 torch thread, {os.cpu_count()} cores", flush=True)
    sides: list[Side] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = [("foldsweep", lambda f: run_foldsweep(setup, args.trials_per_batch, f, 1))]
        if cores > 1:  # what `resources.workers` defaults to on a CPU machine
            runs.append(("foldsweep-cores", lambda f: run_foldsweep(setup, args.trials_per_batch, f, cores)))
        runs += [("baseline", lambda f: baseline(data.X, data.y, setup, False, f)),
                 ("baseline-logged", lambda f: baseline(data.X, data.y, setup, True, f))]
        for name, run in runs:
            if name == "baseline-logged" and args.skip_logging_baseline:
                continue
            folder = root / name
            store_s = create_store(folder) if name != "baseline" else 0.0
            torch.manual_seed(setup.seed)
            sides.append(run(folder))
            assert torch.get_num_threads() == 1, "a side changed the thread count"
            print(f"  {sides[-1].name}: {sides[-1].wall_s:.1f} s, {sides[-1].fits_per_s:.2f} fits/s"
                  + (f" (MLflow store created beforehand, untimed: {store_s:.1f} s)" if store_s else ""), flush=True)
    ours, bases = [s for s in sides if s.name.startswith("foldsweep")], [s for s in sides if s.name.startswith("base")]
    print()
    print(table(sides))
    print()
    for fold in ours:
        for base in bases:
            print(f"{fold.name} vs {base.name}: {fold.fits_per_s / base.fits_per_s:.1f}x fold fits/s, "
                  f"{fold.epochs_per_s / base.epochs_per_s:.1f}x fold-epochs/s; nested accuracy "
                  f"{100 * (np.mean(fold.nested) - np.mean(base.nested)):+.1f} points")
    if args.json:
        print(json.dumps([{**vars(s), "fits_per_s": s.fits_per_s, "epochs_per_s": s.epochs_per_s} for s in sides]))


if __name__ == "__main__":
    main()
