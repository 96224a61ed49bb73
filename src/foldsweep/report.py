"""What the sweep concluded, for people: the nested estimate with its CI, optimism, stability, plots.

The same numbers go to the terminal (`foldsweep report`), to Markdown/JSON files, and onto the MLflow
sweep run as artifacts and headline metrics, so the collapsed run tree already answers "how did it go".
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from foldsweep.record import SweepRecord
from foldsweep.sweep import Sweep
from foldsweep.tracking import NullTracker


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    nested = summary["nested"]
    metrics = {"nested_mean": nested["mean"], "nested_std": nested["std"], "nested_ci95_low": nested["ci95"][0],
               "nested_ci95_high": nested["ci95"][1], "optimism": summary["optimism"]}
    if summary["final"]["best_value"] is not None:
        metrics["final_best_inner_value"] = summary["final"]["best_value"]
    metrics |= {f"outer_{i}_test_score": s for i, s in enumerate(nested["outer"])}
    return metrics


def summary_markdown(summary: dict[str, Any], looks: list[dict[str, Any]] | None = None) -> str:
    nested, metric = summary["nested"], summary["metric"]
    lines = [
        f"# Sweep `{summary['sweep']}`: nested cross-validation report",
        "",
        f"**Nested estimate ({metric}, {summary['direction']})**: {nested['mean']:.4f} ± {nested['std']:.4f} "
        f"(95% CI {nested['ci95'][0]:.4f} to {nested['ci95'][1]:.4f}) over {len(nested['outer'])} outer folds.",
        "",
        f"**Optimism** (best inner-CV value minus outer-test score, positive = the search flattered itself): "
        f"{summary['optimism']:+.4f}",
        "",
        "| outer fold | best inner value | outer-test score | optimism | refit epochs |",
        "|---|---|---|---|---|",
    ]
    for i, refit in enumerate(summary["outer_refits"]):
        lines.append(f"| {i} | {refit['best_inner_value']:.4f} | {refit['outer_test_score']:.4f} | "
                     f"{refit['optimism']:+.4f} | {refit['epochs']} |")
    lines += ["", "## Hyperparameter stability (best config per outer fold)", ""]
    lines += _stability_table(summary)
    lines += ["", "## Final configuration (study `final`, all development rows)", ""]
    lines += [f"- `{k}`: {v}" for k, v in summary["final"]["best_params"].items()]
    best = summary["final"]["best_value"]
    lines += [f"- inner-CV value: {best:.4f}" if best is not None else "- inner-CV value: none",
              f"- refit epochs: {summary['final'].get('best_epoch')}"]
    lines += ["", "## Sealed test set", ""]
    if looks:
        lines += [f"- look {i + 1} at {look['time']}: {metric} = {look['score']:.4f}" for i, look in enumerate(looks)]
        if len(looks) > 1:
            lines.append(f"- **{len(looks)} looks**: every look after the first is biased by the ones before")
    else:
        lines.append("- sealed, never looked at (`foldsweep test SWEEP` makes the one deliberate look)")
    return "\n".join(lines) + "\n"


def stability(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each knob's chosen value per outer fold and its spread: a knob that jumps around is not pinned down."""
    chosen: dict[str, list[Any]] = {}
    for refit in summary["outer_refits"]:
        for key, value in refit["params"].items():
            chosen.setdefault(key, []).append(value)
    out = {}
    for key, values in chosen.items():
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        spread = (float(np.std(np.log10(values))) if numeric and min(values) > 0 else float(np.std(values))) \
            if numeric else len(set(map(str, values)))
        out[key] = {"values": values, "spread": spread,
                    "spread_kind": "std of log10" if numeric and min(values) > 0 else ("std" if numeric else
                                                                                         "distinct values")}
    return out


def _stability_table(summary: dict[str, Any]) -> list[str]:
    table = stability(summary)
    if not table:
        return ["(nothing was searched)"]
    rows = ["| knob | per outer fold | spread |", "|---|---|---|"]
    for key, entry in table.items():
        shown = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in entry["values"])
        rows.append(f"| `{key}` | {shown} | {entry['spread']:.3g} ({entry['spread_kind']}) |")
    return rows


def log_sweep_artifacts(sweep: Sweep, record: SweepRecord, tracker: NullTracker, ids: dict[str, str],
                        summary: dict[str, Any]) -> None:
    """Headline metrics on the sweep and study runs, files on the sweep run, a copy in the record."""
    markdown = summary_markdown(summary, record.ledger)
    (record.folder / "report.md").write_text(markdown)
    if not tracker.enabled:
        return
    tracker.log_values(ids["sweep"], headline_metrics(summary),
                       params={f"best.{k}": v for k, v in summary["final"]["best_params"].items()})
    final_best = summary["final"]["best_value"]
    if final_best is not None:
        tracker.log_values(ids["final"], {"best_inner_value": final_best})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {
            "summary.json": json.dumps(summary, indent=1, default=str),
            "report.md": markdown,
            "spec.yaml": yaml.safe_dump(sweep.spec.model_dump(mode="json"), sort_keys=False),
            "best_config.yaml": yaml.safe_dump(summary["final"]["best_params"], sort_keys=False),
        }
        for name, text in files.items():
            (folder / name).write_text(text)
        logged = [(folder / name, "") for name in files] + [(record.folder / "plan.json", "")]
        logged += [(path, "plots") for path in _plots(sweep, summary, folder / "plots")]
        tracker.log_files(ids["sweep"], logged)


def _plots(sweep: Sweep, summary: dict[str, Any], folder: Path) -> list[Path]:
    from foldsweep.plots import sweep_plots

    folder.mkdir(parents=True, exist_ok=True)
    return sweep_plots(sweep, summary, folder)
