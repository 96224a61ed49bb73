"""foldsweep from Python, notebook style: a DataFrame in, a nested-CV result out.

Run it as a script (`python examples/quickstart.py`, about a minute on 2 CPU cores) or cell by cell
(`# %%` marks the cells for Jupyter/VS Code). It tunes an MLP on scikit-learn's breast-cancer table
held in a pandas DataFrame: no CSV, no YAML file. Everything lands under ./mlruns, as with the CLI,
so `foldsweep report quickstart-py` or `foldsweep ui` work on it afterwards.
"""

# %%
from __future__ import annotations

from pathlib import Path
from typing import Any

from sklearn.datasets import load_breast_cancer

import foldsweep


def sweep_spec(n_trials: int = 8, epochs: int = 60) -> dict[str, Any]:
    """The sweep as a dict: the same keys as a sweep file, without a `data:` block (the rows come from Python)."""
    return {
        "name": "quickstart-py",
        "split": {"test_size": 0.2, "seed": 0, "outer": {"k": 3}, "inner": {"k": 3}},
        "model": {"depth": 2},
        "train": {"epochs": epochs, "patience": 10},
        "search": {
            "lr": {"type": "float", "low": 3e-4, "high": 3e-2, "log": True},
            "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
            "dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "width": {"type": "int", "low": 16, "high": 64, "log": True},
        },
        "optuna": {"n_trials": n_trials, "n_startup_trials": 4, "seed": 0},
        "resources": {"devices": "cpu"},
    }


def main(n_trials: int = 8, epochs: int = 60, model_dir: str = "models/quickstart-py") -> foldsweep.SweepResult:
    # %% the table: 569 rows, 30 numeric features and a 0/1 `target` column
    frame = load_breast_cancer(as_frame=True).frame

    # %% the nested sweep (rerunning this cell resumes it; a different frame would be refused)
    result = foldsweep.run(sweep_spec(n_trials, epochs), data=frame, target="target")
    print(result)  # the nested estimate, CI and optimism in one line; a notebook shows the summary table

    # %% the numbers, as Python values
    nested = result.nested
    print(f"nested {nested.metric}: {nested.mean:.3f} (95% CI {nested.ci95[0]:.3f}..{nested.ci95[1]:.3f}), "
          f"outer folds {[round(s, 3) for s in nested.outer]}, optimism {nested.optimism:+.3f}")
    print("final config:", result.best_params)
    trials = result.trials_dataframe()
    print(trials.groupby("study")["value"].max())

    # %% the report (rich tables; in Jupyter they render as HTML) and the figures (matplotlib)
    foldsweep_report = result.report()
    print(foldsweep_report)
    figures = result.plots()
    print("figures:", ", ".join(figures))

    # %% the final model on all development rows, and predictions from raw columns
    model = result.fit(model_dir) if not Path(model_dir, "model.pt").exists() else foldsweep.load_model(model_dir)
    print(model.predict(frame.head(5)), model.predict_proba(frame.head(5)).round(3))

    # %% the one deliberate look at the sealed test rows (a second look needs again=True and is counted)
    if not result.test_looks:
        look = result.test()
        print(f"sealed test {look['metric']}: {look['score']:.3f} on {look['test_rows']} rows")
    return result


if __name__ == "__main__":
    main()
