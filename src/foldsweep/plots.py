"""Pictures of a sweep, as PNG files that the MLflow UI shows without any plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from foldsweep.sweep import Sweep  # noqa: E402


def sweep_plots(sweep: Sweep, summary: dict[str, Any], folder: Path) -> list[Path]:
    return [optimization_history(sweep, folder / "optimization_history.png"),
            outer_scores(summary, folder / "outer_scores.png")]


def optimization_history(sweep: Sweep, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for ref in sweep.studies:
        trials = ref.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ax.plot([t.number for t in trials], [t.value for t in trials], "o", ms=3, alpha=0.6, label=ref.key)
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


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
