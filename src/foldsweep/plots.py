"""Pictures of a sweep, as PNG files that the MLflow UI shows without any plugin.

Every function takes plain data (Optuna studies, a summary dict, curves read back from MLflow by the
caller), writes one file and returns its path, or None when there is nothing honest to draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

if TYPE_CHECKING:
    from foldsweep.sweep import Sweep

Curve = tuple[np.ndarray, np.ndarray]  # (epochs, values)


@dataclass
class TrialCurves:
    """One trial's per-fold train and validation loss curves, and the epoch each fold kept."""

    title: str
    train: list[Curve]
    valid: list[Curve]
    best_epochs: list[int]


def sweep_plots(sweep: Sweep, summary: dict[str, Any], folder: Path, best: list[TrialCurves]) -> list[Path]:
    studies = [(ref.key, ref.study) for ref in sweep.studies]
    knobs = list(sweep.spec.search)
    paths = [optimization_history(sweep, folder / "optimization_history.png"),
             outer_scores(summary, folder / "outer_scores.png"),
             param_importances(studies, knobs, folder / "param_importances.png"),
             parallel_coordinates(studies, knobs, sweep.data.metric, folder / "parallel_coordinates.png"),
             learning_curves(best, folder / "learning_curves.png")]
    return [p for p in paths if p is not None]


def optimization_history(sweep: Sweep, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for ref in sweep.studies:
        trials = ref.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ax.plot([t.number for t in trials], [_value(t) for t in trials], "o", ms=3, alpha=0.6, label=ref.key)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"inner-CV {sweep.data.metric}")
    ax.set_title("optimization history per study")
    ax.legend(fontsize=7)
    return _save(fig, path)


def outer_scores(summary: dict[str, Any], path: Path) -> Path:
    nested = summary["nested"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(nested["outer"]))
    ax.bar(xs, nested["outer"], color="#4c72b0", label="outer-test score")
    ax.plot(xs, [r["best_inner_value"] for r in summary["outer_refits"]], "kx", label="best inner-CV value")
    ax.axhline(nested["mean"], color="k", lw=1, label=f"nested mean {nested['mean']:.3f}")
    ax.axhspan(*nested["ci95"], color="grey", alpha=0.2, label="95% CI")
    ax.set_xlabel("outer fold")
    ax.set_ylabel(summary["metric"])
    ax.legend(fontsize=7)
    return _save(fig, path)


def param_importances(studies: list[tuple[str, optuna.Study]], knobs: list[str], path: Path) -> Path | None:
    """Optuna's importance per knob and study; a study with fewer than 2 complete trials has none to give."""
    table: dict[str, dict[str, float]] = {}
    for key, study in studies:
        if len(_complete(study)) >= 2 and knobs:
            table[key] = optuna.importance.get_param_importances(study, params=knobs)
    if not table:
        return None
    knobs = sorted({k for scores in table.values() for k in scores})
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(knobs)))
    height = 0.8 / len(table)
    for s, (name, scores) in enumerate(table.items()):
        ax.barh([k + s * height for k in range(len(knobs))], [scores.get(k, 0.0) for k in knobs], height,
                label=name)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(knobs))], knobs)
    ax.invert_yaxis()
    ax.set_xlabel("importance (share of the inner-CV value's variation)")
    ax.set_title("parameter importances per study")
    ax.legend(fontsize=7)
    return _save(fig, path)


def parallel_coordinates(studies: list[tuple[str, optuna.Study]], knobs: list[str], metric: str,
                         path: Path) -> Path | None:
    """One line per complete trial across the searched knobs (scaled to their ranges), coloured by value."""
    drawn = [(key, study.best_trial, _complete(study)) for key, study in studies if _complete(study)]
    if not drawn or not knobs:
        return None
    maximize = studies[0][1].direction == optuna.study.StudyDirection.MAXIMIZE
    values = [_value(t) for _, _, trials in drawn for t in trials]
    norm = plt.Normalize(min(values), max(values))
    cmap = plt.get_cmap("viridis" if maximize else "viridis_r")
    fig, axes = plt.subplots(len(drawn), 1, figsize=(9, 2.4 * len(drawn)), squeeze=False)
    for ax, (key, best, trials) in zip(axes[:, 0], drawn):
        for trial in sorted(trials, key=lambda t: _value(t) * (1 if maximize else -1)):
            ys = [_scaled(trial, k) for k in knobs] + [norm(_value(trial))]
            is_best = trial.number == best.number
            ax.plot(range(len(ys)), ys, color=cmap(norm(_value(trial))), alpha=0.8, lw=2.5 if is_best else 1.0,
                    zorder=3 if is_best else 2)
        for x, knob in enumerate(knobs):
            low, high = _range_labels(trials, knob)
            ax.text(x, -0.08, low, ha="center", va="top", fontsize=6)
            ax.text(x, 1.08, high, ha="center", va="bottom", fontsize=6)
        ax.text(len(knobs), -0.08, f"{norm.vmin:.3g}", ha="center", va="top", fontsize=6)
        ax.text(len(knobs), 1.08, f"{norm.vmax:.3g}", ha="center", va="bottom", fontsize=6)
        for x in range(len(knobs) + 1):
            ax.axvline(x, color="grey", lw=0.6)
        ax.set_xticks(range(len(knobs) + 1), [*knobs, metric], fontsize=8)
        ax.set_ylim(-0.25, 1.25)
        ax.set_yticks([])
        ax.set_ylabel(key, fontsize=8)
    axes[0, 0].set_title("parallel coordinates (thick line: the study's best trial)")
    return _save(fig, path)


def learning_curves(best: list[TrialCurves], path: Path) -> Path | None:
    """Train vs validation loss per fold of each study's best trial: where each fold model began to overfit."""
    best = [b for b in best if b.train or b.valid]
    if not best:
        return None
    cols = min(len(best), 2)
    rows = math.ceil(len(best) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, trial in zip(axes.flat, best):
        for fold, (train, valid) in enumerate(zip(trial.train, trial.valid)):
            color = f"C{fold}"
            ax.plot(*train, color=color, lw=1.2)
            ax.plot(*valid, color=color, lw=1.2, ls="--")
            epoch = trial.best_epochs[fold] if fold < len(trial.best_epochs) else None
            if epoch is not None and epoch in valid[0]:
                ax.plot(epoch, valid[1][list(valid[0]).index(epoch)], "o", color=color, ms=5)
        ax.set_title(trial.title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(best):]:
        ax.axis("off")
    handles = [Line2D([], [], color="k", lw=1.2), Line2D([], [], color="k", lw=1.2, ls="--"),
               Line2D([], [], color="k", marker="o", ls="")]
    fig.legend(handles, ["train loss", "validation loss", "epoch kept (early stopping)"], loc="lower center",
               ncol=3, fontsize=8)
    fig.suptitle("learning curves of each study's best trial (one colour per fold)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path, layout=False)


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _value(trial: FrozenTrial) -> float:
    """A complete trial's value (Optuna types it optional, for the other states)."""
    return cast(float, trial.value)


def _scaled(trial: FrozenTrial, knob: str) -> float:
    """A knob's value as a position in [0, 1] of its search range (log ranges on a log scale)."""
    dist = trial.distributions.get(knob)
    if dist is None:
        return float("nan")
    if isinstance(dist, CategoricalDistribution):
        return dist.to_internal_repr(trial.params[knob]) / max(1, len(dist.choices) - 1)
    dist = cast(FloatDistribution | IntDistribution, dist)
    low, high, value = float(dist.low), float(dist.high), float(trial.params[knob])
    if getattr(dist, "log", False):
        low, high, value = np.log10(low), np.log10(high), np.log10(value)
    return (value - low) / (high - low) if high > low else 0.5


def _range_labels(trials: list[FrozenTrial], knob: str) -> tuple[str, str]:
    dist = next((t.distributions[knob] for t in trials if knob in t.distributions), None)
    if dist is None:
        return "", ""
    if isinstance(dist, CategoricalDistribution):
        return str(dist.choices[0]), str(dist.choices[-1])
    dist = cast(FloatDistribution | IntDistribution, dist)
    return f"{dist.low:.3g}", f"{dist.high:.3g}"


def _save(fig: Any, path: Path, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
