"""What the sweep concluded, for people: the nested estimate with its CI, optimism, stability, plots.

The same numbers go to the terminal (`foldsweep report`), to Markdown/JSON files, and onto the MLflow
sweep run as artifacts and headline metrics, so the collapsed run tree already answers "how did it go".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from foldsweep.errors import FoldsweepError
from foldsweep.pictures import pictures_note, sweep_pictures
from foldsweep.record import SweepRecord
from foldsweep.spec import SweepSpec
from foldsweep.studies import StudyRef, best_trial
from foldsweep.tracking import NullTracker

if TYPE_CHECKING:
    from foldsweep.plots import TrialCurves  # matplotlib loads only when plots are drawn
    from foldsweep.sweep import Sweep  # the training loop (torch): `report` only reads the studies

__all__ = ["best_curves", "build_report", "diagnostics", "headline_metrics", "log_pictures_later",
           "log_sweep_artifacts", "optimism_wording", "refresh_report", "report_markdown", "stability",
           "study_metrics", "summary_markdown"]


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    nested = summary["nested"]
    metrics = {"nested_mean": nested["mean"], "nested_std": nested["std"], "nested_ci95_low": nested["ci95"][0],
               "nested_ci95_high": nested["ci95"][1], "optimism": summary["optimism"],
               "refit_fallbacks": float(len(summary.get("refit_fallbacks", [])))}
    if "sealed_test" in summary:
        metrics["sealed_test_rows_in_dev"] = float(summary["sealed_test"]["test_rows_in_dev"])
    if summary["final"]["best_value"] is not None:
        metrics["final_best_inner_value"] = summary["final"]["best_value"]
    metrics |= {f"outer_{i}_test_score": s for i, s in enumerate(nested["outer"])}
    return metrics


def summary_markdown(summary: dict[str, Any], looks: list[dict[str, Any]] | None = None,
                     diagnosed: list[dict[str, Any]] | None = None) -> str:
    nested, metric = summary["nested"], summary["metric"]
    lines = [
        f"# Sweep `{summary['sweep']}`: nested cross-validation report",
        "",
        f"**Nested estimate ({metric}, {summary['direction']})**: {nested['mean']:.4f}, the unweighted mean of "
        f"{len(nested['outer'])} outer-fold scores (their standard deviation {nested['std']:.4f}; 95% CI "
        f"{nested['ci95'][0]:.4f} to {nested['ci95'][1]:.4f}, {nested.get('interval', 'plain t')}).",
        "",
        f"**Optimism** ({optimism_wording(summary['direction'])}): {summary['optimism']:+.4f}",
        "",
        *[f"**Refit fallback**: {note}\n" for note in summary.get("refit_fallbacks", [])],
        "| outer fold | best inner value | outer-test score | optimism | refit epochs |",
        "|---|---|---|---|---|",
    ]
    for i, refit in enumerate(summary["outer_refits"]):
        lines.append(f"| {i} | {refit['best_inner_value']:.4f} | {refit['outer_test_score']:.4f} | "
                     f"{refit['optimism']:+.4f} | {refit['epochs']} |")
    lines += ["", "## Hyperparameter stability (best config per outer fold)", ""]
    lines += _stability_table(summary)
    if diagnosed:
        lines += ["", "## Overfitting diagnostics (best trial of each study)", ""]
        lines += _diagnostics_table(diagnosed)
    lines += ["", "## Final configuration (study `final`, all development rows)", ""]
    lines += [f"- `{k}`: {v}" for k, v in summary["final"]["best_params"].items()]
    best = summary["final"]["best_value"]
    lines += [f"- inner-CV value: {best:.4f}" if best is not None else "- inner-CV value: none",
              f"- refit epochs: {summary['final'].get('best_epoch')}"]
    lines += ["", "## Sealed test set", ""]
    seen_in_dev = summary.get("sealed_test", {}).get("note")
    if seen_in_dev:
        lines.append(f"- **{seen_in_dev}**")
    if looks:
        lines += [f"- look {i + 1} at {look['time']}" + (f" by sweep `{look['sweep']}`" if look.get("sweep", summary[
                  "sweep"]) != summary["sweep"] else "") + (f": record damaged ({look['damaged']})" if look.get(
                  "damaged") else f": {metric} = {look['score']:.4f} (model {str(look.get('model_hash', ''))[:12]}"
                  f"{', --again' if look.get('again') else ''})") for i, look in enumerate(looks)]
        if len(looks) > 1:
            lines.append(f"- **{len(looks)} looks**: every look after the first is biased by the ones before")
    else:
        lines.append("- sealed, never looked at (`foldsweep test SWEEP` makes the one deliberate look)")
    return "\n".join(lines) + "\n"


def optimism_wording(direction: str) -> str:
    """What optimism subtracts from what: the sign convention is "positive = flattered" for either direction."""
    if direction == "minimize":
        return "outer-test score minus best inner-CV value, positive = the search flattered itself"
    return "best inner-CV value minus outer-test score, positive = the search flattered itself"


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


def diagnostics(studies: list[StudyRef], spec: SweepSpec) -> list[dict[str, Any]]:
    """Over- and underfitting signs of each study's best trial, from what `tell` stored on it.

    `gap` is validation minus training loss at each fold's best epoch (mean over folds; the training
    loss is measured as trained, with dropout); a best epoch at the epoch budget means the model was
    still improving when training stopped.
    """
    rows = []
    for ref in studies:
        best = best_trial(ref)
        if best is None:
            continue
        epochs = [int(e) for e in best.user_attrs.get("best_epochs", [])]
        budget = spec.with_params(best.params).train.epochs
        scores = best.user_attrs.get("fold_scores", [])
        rows.append({"study": ref.key, "trial": best.number, "value": best.value,
                     "fold_std": float(np.std(scores)) if scores else None, "best_epochs": epochs,
                     "epoch_budget": budget, "at_budget": sum(e >= budget for e in epochs),
                     "gap": best.user_attrs.get("gap")})
    return rows


def build_report(name: str) -> dict[str, Any]:
    """The stored summary plus what needs the studies (diagnostics) and the ledger (test looks)."""
    from foldsweep.studies import open_existing

    record, refs = open_existing(name)
    summary = record.meta.get("summary")
    if summary is None:
        raise FoldsweepError(f"sweep `{name}` has not finished yet; `foldsweep run` it to the end first")
    looks = record.ledger
    return summary | {"stability": stability(summary), "diagnostics": diagnostics(refs, record.spec),
                      "test_looks": looks, "test_look_count": len(looks), "pictures_note": pictures_note(record.folder)}


def report_markdown(report: dict[str, Any]) -> str:
    return summary_markdown(report, report["test_looks"], report["diagnostics"])


def refresh_report(record: SweepRecord) -> Path:
    """Rewrite the record's report.md (after a test look, say); returns its path for MLflow."""
    path = record.folder / "report.md"
    path.write_text(report_markdown(build_report(record.name)))
    return path


def _diagnostics_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| study | best trial | inner value | fold std | best epoch per fold | at epoch budget | val - train loss |",
           "|---|---|---|---|---|---|---|"]
    for row in rows:
        std = f"{row['fold_std']:.4f}" if row["fold_std"] is not None else "-"
        gap = f"{row['gap']:+.4f}" if row["gap"] is not None else "-"
        out.append(f"| {row['study']} | {row['trial']} | {row['value']:.4f} | {std} | "
                   f"{', '.join(map(str, row['best_epochs']))} | {row['at_budget']}/{len(row['best_epochs'])} "
                   f"(of {row['epoch_budget']}) | {gap} |")
    out += ["", "A positive loss gap is the overfitting the regularizers fight; best epochs at the budget mean "
            "training stopped while still improving (raise `train.epochs`)."]
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
    markdown = summary_markdown(summary, record.ledger, diagnostics(sweep.studies, sweep.spec))
    (record.folder / "report.md").write_text(markdown)
    if not tracker.enabled:
        return
    tracker.log_values(ids["sweep"], headline_metrics(summary),
                       params={f"best.{k}": v for k, v in summary["final"]["best_params"].items()})
    for ref in sweep.studies:
        tracker.log_values(ids[ref.key], study_metrics(ref.study))
    texts = {
        "summary.json": json.dumps(summary, indent=1, default=str),
        "report.md": markdown,
        "spec.yaml": yaml.safe_dump(sweep.spec.model_dump(mode="json"), sort_keys=False),
        "best_config.yaml": yaml.safe_dump(summary["final"]["best_params"], sort_keys=False),
        "plan.json": json.dumps(sweep.plan.summary() | {"plan_hash": record.meta["plan_hash"]}, indent=1),
    }
    tracker.log_report(ids["sweep"], texts)


def log_pictures_later(sweep: Sweep, record: SweepRecord, tracker: NullTracker, ids: dict[str, str],
                       summary: dict[str, Any]) -> None:
    """The sweep's last act: its pictures are drawn and logged by the MLflow writer after the sweep has
    returned (a second or more of matplotlib and fANOVA that nothing else waits for); until they are, the
    record folder holds a note that `foldsweep report` reads (see `pictures.PENDING`)."""
    if tracker.enabled:
        pictures = sweep_pictures(sweep.studies, list(sweep.spec.search), sweep.data.metric)
        tracker.log_pictures_later(ids["sweep"], pictures, summary, record.folder)


def study_metrics(study: optuna.Study) -> dict[str, float]:
    """A study run's headline: its best inner-CV value and how its trials ended (surplus asks not counted)."""
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL
              and not str(t.user_attrs.get("reason", "")).startswith("surplus")]
    metrics = {"n_complete": float(sum(t.state == TrialState.COMPLETE for t in trials)),
               "n_pruned": float(sum(t.state == TrialState.PRUNED for t in trials)), "n_failed": float(len(failed))}
    best = best_trial(study)
    if best is not None:
        metrics["best_inner_value"] = float(best.value or 0.0)
    return metrics


def best_curves(studies: list[StudyRef], metric: str, tracker: NullTracker) -> list[TrialCurves]:
    """Each study's best trial's per-fold loss curves, read back from its MLflow run."""
    from foldsweep.plots import curves_of

    return [curves_of(best, tracker.metric_histories) for best in sweep_pictures(studies, [], metric).best]
