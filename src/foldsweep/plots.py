"""Pictures of a sweep, as PNG files that the MLflow UI shows without any plugin, or as open figures.

Every function takes plain data (Optuna studies, a summary dict, curves read back from MLflow by the
caller), writes one file and returns its path, or None when there is nothing honest to draw. `figures`
gives the same pictures as matplotlib Figures for a notebook. Figures are made without pyplot, so
drawing them neither needs nor changes the caller's matplotlib backend (a notebook keeps its own).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, overload

import matplotlib
import numpy as np
import optuna
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from foldsweep.pictures import BestTrial, SweepPictures
from foldsweep.studies import best_trial

__all__ = ["TrialCurves", "curves_of", "draw_study_pictures", "figures", "learning_curves", "outer_scores",
           "parallel_coordinates", "param_importances", "warm_up"]

Curve = tuple[np.ndarray, np.ndarray]  # (epochs, values)


@dataclass
class TrialCurves:
    """One trial's per-fold train and validation loss curves, and the epoch each fold kept."""

    title: str
    train: list[Curve]
    valid: list[Curve]
    best_epochs: list[int]


Histories = Callable[[str, list[str]], dict[str, Curve]]  # (run id, metric keys) -> logged curves


def draw_study_pictures(pictures: SweepPictures, histories: Histories, folder: Path) -> list[Path]:
    """The pictures that need only the studies (all but the outer scores), as PNG files in `folder`."""
    studies = [(key, _as_study(key, direction, trials)) for key, direction, trials in pictures.studies]
    best = [curves_of(trial, histories) for trial in pictures.best]
    drawn = {"optimization_history": _history(studies, pictures.metric),
             "param_importances": _importances(studies, pictures.knobs),
             "parallel_coordinates": _parallel(studies, pictures.knobs, pictures.metric),
             "learning_curves": _curves(best)}
    folder.mkdir(parents=True, exist_ok=True)
    return [_save(fig, folder / f"{name}.png") for name, fig in drawn.items() if fig is not None]


def curves_of(trial: BestTrial, histories: Histories) -> TrialCurves:
    """A best trial's per-fold loss curves, read back from its run."""
    folds = range(trial.folds)
    curves = histories(trial.run_id, [f"fold_{i}/{name}" for i in folds for name in ("train_loss", "val_loss")])
    return TrialCurves(trial.title, [curves[f"fold_{i}/train_loss"] for i in folds if f"fold_{i}/train_loss" in curves],
                       [curves[f"fold_{i}/val_loss"] for i in folds if f"fold_{i}/val_loss" in curves],
                       trial.best_epochs)


def warm_up() -> None:
    """Pay the first picture's one-time costs before any picture is due: matplotlib's fonts and renderer
    (~0.4 s) and the import behind Optuna's importance evaluator (scikit-learn: 1.5 s in a process that
    has not loaded it, measured in the MLflow writer)."""
    with _quiet_optuna():
        study = optuna.create_study()
    study.add_trials([optuna.trial.create_trial(params={"x": x}, distributions={"x": FloatDistribution(0, 1)},
                                                value=x * x) for x in (0.1, 0.5, 0.9)])
    fig = _importances([("warm", study)], ["x"])
    if fig is not None:
        fig.savefig(io.BytesIO(), format="png", dpi=110)


def _as_study(key: str, direction: str, trials: list[FrozenTrial]) -> optuna.Study:
    """An in-memory copy of a study's trials: what Optuna's importance evaluators read."""
    with _quiet_optuna():
        study = optuna.create_study(study_name=key, direction=optuna.study.StudyDirection[direction.upper()])
    study.add_trials(trials)
    return study


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Without Optuna's "A new study created in memory" line: these copies are ours, not the user's studies."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def figures(studies: list[tuple[str, optuna.Study]], knobs: list[str], metric: str, summary: dict[str, Any],
            best: list[TrialCurves]) -> dict[str, Figure]:
    """Every picture there is something to draw for, by name (the PNG file names without `.png`)."""
    drawn = {"optimization_history": _history(studies, metric), "outer_scores": _outer_scores(summary),
             "param_importances": _importances(studies, knobs),
             "parallel_coordinates": _parallel(studies, knobs, metric), "learning_curves": _curves(best)}
    return {name: fig for name, fig in drawn.items() if fig is not None}


def _history(studies: list[tuple[str, optuna.Study]], metric: str) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for key, study in studies:
        trials = _complete(study)
        ax.plot([t.number for t in trials], [_value(t) for t in trials], "o", ms=3, alpha=0.6, label=key)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"inner-CV {metric}")
    ax.set_title("optimization history per study")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def outer_scores(summary: dict[str, Any], path: Path) -> Path:
    return _save(_outer_scores(summary), path)


def _outer_scores(summary: dict[str, Any]) -> Figure:
    nested = summary["nested"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    xs = range(len(nested["outer"]))
    ax.bar(xs, nested["outer"], color="#4c72b0", label="outer-test score")
    ax.plot(xs, [r["best_inner_value"] for r in summary["outer_refits"]], "kx", label="best inner-CV value")
    ax.axhline(nested["mean"], color="k", lw=1, label=f"nested mean {nested['mean']:.3f}")
    ax.axhspan(*nested["ci95"], color="grey", alpha=0.2, label="95% CI")
    ax.set_xlabel("outer fold")
    ax.set_ylabel(summary["metric"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def param_importances(studies: list[tuple[str, optuna.Study]], knobs: list[str], path: Path) -> Path | None:
    """Optuna's importance per knob and study; a study with fewer than 2 complete trials, or whose trials all
    scored the same, has none to give."""
    return _save(_importances(studies, knobs), path)


def _importances(studies: list[tuple[str, optuna.Study]], knobs: list[str]) -> Figure | None:
    table: dict[str, dict[str, float]] = {}
    for key, study in studies:
        if knobs and _varies([_value(t) for t in _complete(study)]):
            table[key] = optuna.importance.get_param_importances(study, params=knobs)
    if not table:
        return None
    knobs = sorted({k for scores in table.values() for k in scores})
    fig = Figure(figsize=(7, 1.2 + 0.5 * len(knobs)))
    ax = fig.subplots()
    height = 0.8 / len(table)
    for s, (name, scores) in enumerate(table.items()):
        ax.barh([k + s * height for k in range(len(knobs))], [scores.get(k, 0.0) for k in knobs], height,
                label=name)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(knobs))], knobs)
    ax.invert_yaxis()
    ax.set_xlabel("importance (share of the inner-CV value's variation)")
    ax.set_title("parameter importances per study")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _varies(values: list[float]) -> bool:
    """Whether the values differ by more than rounding: fANOVA shares out their variance, and raised on ties
    such as two folds' mean accuracies of 0.6025641025641025 and 0.6025641025641026."""
    return len(values) >= 2 and max(values) - min(values) > 1e-9 * max(1.0, *map(abs, values))


def parallel_coordinates(studies: list[tuple[str, optuna.Study]], knobs: list[str], metric: str,
                         path: Path) -> Path | None:
    """One line per complete trial across the searched knobs (scaled to their ranges), coloured by value."""
    return _save(_parallel(studies, knobs, metric), path)


def _parallel(studies: list[tuple[str, optuna.Study]], knobs: list[str], metric: str) -> Figure | None:
    drawn = [(key, best, _complete(study)) for key, study in studies if (best := best_trial(study)) is not None]
    if not drawn or not knobs:
        return None
    maximize = studies[0][1].direction == optuna.study.StudyDirection.MAXIMIZE
    values = [_value(t) for _, _, trials in drawn for t in trials]
    norm = Normalize(min(values), max(values))
    cmap = matplotlib.colormaps["viridis" if maximize else "viridis_r"]
    fig = Figure(figsize=(9, 2.4 * len(drawn)))
    axes = fig.subplots(len(drawn), 1, squeeze=False)
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
    fig.tight_layout()
    return fig


def learning_curves(best: list[TrialCurves], path: Path) -> Path | None:
    """Train vs validation loss per fold of each study's best trial: where each fold model began to overfit."""
    return _save(_curves(best), path)


def _curves(best: list[TrialCurves]) -> Figure | None:
    best = [b for b in best if b.train or b.valid]
    if not best:
        return None
    cols = min(len(best), 2)
    rows = math.ceil(len(best) / cols)
    fig = Figure(figsize=(6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
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
    return fig


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


@overload
def _save(fig: Figure, path: Path) -> Path: ...
@overload
def _save(fig: None, path: Path) -> None: ...
def _save(fig: Figure | None, path: Path) -> Path | None:
    """Write a drawn figure as PNG; nothing to draw writes nothing."""
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path
