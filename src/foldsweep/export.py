"""The winning configuration as a sweep file of its own, with the provenance that produced it.

An export is a valid spec (nothing left to search, the best values written into `model:` and
`train:`), so it loads through the same loader and `foldsweep fit` can train it; `provenance` says
which sweep, study and trial it came from and what the nested estimate of the procedure was.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import version  # not the modules: `export` need not import torch
from typing import Any

import optuna
import yaml

from foldsweep import __version__
from foldsweep.errors import FoldsweepError
from foldsweep.studies import best_trial, open_existing, refit_epochs

__all__ = ["export_best", "render"]


def export_best(name: str) -> dict[str, Any]:
    record, refs = open_existing(name)
    spec = record.spec
    final = next(ref for ref in refs if ref.key == "final")
    best = best_trial(final)
    if best is None:
        raise FoldsweepError(f"study `{name}/final` has no finished trial yet; finish the sweep with "
                             "`foldsweep run` first")
    config = spec.with_params(best.params).model_copy(update={"search": {}})
    meta = record.meta
    summary = meta.get("summary", {})
    doc = config.model_dump(mode="json", exclude={"provenance"})
    doc["provenance"] = {
        "sweep": name, "study": final.study.study_name, "trial": best.number, "best_params": best.params,
        "inner_cv_value": best.value, "metric_direction": final.study.direction.name.lower(),
        "refit_epochs": refit_epochs(best, config.train.epochs, record.plan.final_inner, len(record.plan.dev)),
        "spec_hash": meta["spec_hash"], "data_fingerprint": meta["fingerprint"],
        "nested": summary.get("nested"), "optimism": summary.get("optimism"),
        "test_looks": len(record.ledger), "mlflow_run_id": meta.get("mlflow_runs", {}).get("sweep"),
        "versions": {"foldsweep": __version__, "torch": version("torch"), "optuna": optuna.__version__,
                     "scikit-learn": version("scikit-learn"), "python": platform.python_version()},
    }
    if best.user_attrs.get("plateau_cuts"):  # what the final fit replays (`evaluate.final_job`)
        doc["provenance"] |= {"plateau_cuts": best.user_attrs["plateau_cuts"],
                              "fold_best_epochs": best.user_attrs.get("best_epochs")}
    return doc


def render(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, default=str) + "\n"
    header = (f"# Best configuration of sweep `{doc['provenance']['sweep']}` exported by foldsweep.\n"
              "# Train it on all development data: foldsweep fit THIS_FILE -o models/NAME\n")
    return header + yaml.safe_dump(doc, sort_keys=False)
