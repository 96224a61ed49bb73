"""What a sweep gives back in Python: its numbers, tables, pictures, the final model and the test look.

A `SweepResult` is a handle on a sweep's record (`mlruns/sweeps/NAME/`) and its Optuna studies, read
when asked, so a result opened a week later shows what the CLI shows; the CLI's `status`, `report`,
`export`, `fit`, `test` and `trials` go through these same methods. Heavy modules (torch, mlflow,
pandas, matplotlib) are imported inside the methods that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from foldsweep.errors import FoldsweepError
from foldsweep.files import write_text_atomic

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure
    from rich.console import RenderableType

    from foldsweep.console import Shown
    from foldsweep.data import Dataset
    from foldsweep.evaluate import FinalModel
    from foldsweep.record import SweepRecord
    from foldsweep.spec import SweepSpec
    from foldsweep.studies import StudyRef

__all__ = ["FittedModel", "NestedEstimate", "SweepResult", "describe_data", "fit_model", "model_info"]

DEFAULT_MODEL = "model"  # `fit()` without a folder keeps the model here, inside the sweep's record


@dataclass(frozen=True)
class NestedEstimate:
    """The nested-CV estimate of the whole procedure (search included), one entry per outer fold.

    `optimism` is the mean of (best inner-CV value - outer-test score) per fold, sign-adjusted so that
    > 0 always means the search flattered itself.
    """

    metric: str
    direction: str  # "maximize" or "minimize"
    mean: float
    std: float
    ci95: tuple[float, float]
    outer: tuple[float, ...]  # outer-test score per outer fold
    best_inner: tuple[float, ...]  # the winning inner-CV value per outer fold
    optimism: float
    optimism_per_fold: tuple[float, ...]

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> NestedEstimate:
        nested, refits = summary["nested"], summary["outer_refits"]
        low, high = nested["ci95"]
        return cls(metric=str(summary["metric"]), direction=str(summary["direction"]), mean=float(nested["mean"]),
                   std=float(nested["std"]), ci95=(float(low), float(high)),
                   outer=tuple(float(s) for s in nested["outer"]),
                   best_inner=tuple(float(r["best_inner_value"]) for r in refits),
                   optimism=float(summary["optimism"]), optimism_per_fold=tuple(float(r["optimism"]) for r in refits))


def describe_data(spec: SweepSpec, fingerprint: str | None = None) -> str:
    """Where a sweep's rows came from, for `status` and `report`: a bundled set, a file, or a table in memory."""
    if spec.data.frame is not None:
        where = f"in-memory table `{spec.data.frame}` (pass it again from Python for fit and test)"
    elif spec.data.path is not None:
        where = f"file {spec.data.path}"
    else:
        where = f"bundled data set {spec.data.dataset}"
    return where + (f", fingerprint {fingerprint}" if fingerprint else "")


class FittedModel:
    """The final model (from `SweepResult.fit` or `foldsweep.fit`): its folder, and predictions from raw columns.

    `predict` and `predict_proba` take a DataFrame with the training table's feature columns (by name;
    the target column may be there and is ignored) or an array (n, features) in the training column
    order; the preprocessing fitted on the development rows is applied first, as `foldsweep predict` does.
    """

    def __init__(self, final: FinalModel, folder: Path, info: dict[str, Any]) -> None:
        self._final = final
        self.folder = folder
        self.info = info  # what `foldsweep fit --json` prints

    @property
    def classes(self) -> list[str] | None:
        return self._final.prep.classes

    @property
    def model_hash(self) -> str:
        return str(self._final.provenance["model_hash"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._final.provenance)

    def final_model(self) -> FinalModel:
        """The network and its preprocessing (what `foldsweep test --model FOLDER` scores)."""
        return self._final

    def predictions(self, X: pd.DataFrame | np.ndarray) -> pd.DataFrame:
        """The table `foldsweep predict` writes: `prediction`, and `prob_<class>` per class (n rows)."""
        from foldsweep.evaluate import prediction_table

        return prediction_table(self._final, self._encode(X))

    def predict(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Labels (n,) as the class names of the training table, or values (n,) in the target's units."""
        import numpy as np

        return np.asarray(self.predictions(X)["prediction"])

    def predict_proba(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Class probabilities (n, classes), columns in the order of `classes`."""
        if self.classes is None:
            raise FoldsweepError("predict_proba needs a classification model; this one predicts values: use predict")
        import numpy as np

        table = self.predictions(X)
        return np.asarray(table[[f"prob_{c}" for c in self.classes]], dtype=np.float32)

    def _encode(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        import pandas as pd

        from foldsweep.errors import DataError

        prep = self._final.prep
        if not isinstance(X, pd.DataFrame):
            rows = pd.DataFrame(X)
            if rows.shape[1] != len(prep.columns):
                raise DataError(f"the array has {rows.shape[1]} columns; the model takes {len(prep.columns)} "
                                f"({', '.join(prep.columns[:6])}{' ...' if len(prep.columns) > 6 else ''})")
            X = rows.set_axis(prep.columns, axis=1)
        return prep.encode(X.set_axis([str(c) for c in X.columns], axis=1), "the table")

    def __repr__(self) -> str:
        return f"FittedModel({str(self.folder)!r}, model {self.model_hash[:12]})"


class SweepResult:
    """A sweep, from `foldsweep.run(...)` or `foldsweep.open(name)`.

    Attributes answer from the sweep's record: `nested` (the estimate), `best_params` and `final_value`
    (the final study's winner), `summary` (the dict `foldsweep run --json` prints). Methods do what
    the CLI commands do: `report`, `trials_dataframe`, `plots`, `export`, `fit`, `test`, `status`.
    In Jupyter the result shows itself as the summary with the final config.
    """

    def __init__(self, name: str, *, data: Dataset | None = None, summary: dict[str, Any] | None = None) -> None:
        from foldsweep.record import SweepRecord  # pandas and scikit-learn load with it: not at `import foldsweep`

        self.record = SweepRecord.open(name)
        self.name = name
        self._data = data  # needed for fit/test when the sweep's rows live in memory
        self._run_summary = summary

    # -- numbers ---------------------------------------------------------------------------------------------
    @property
    def spec(self) -> SweepSpec:
        return self.record.spec

    @property
    def finished(self) -> bool:
        return "summary" in self.record.meta

    @property
    def summary(self) -> dict[str, Any]:
        """The sweep's summary: what this run returned, else the one the record keeps."""
        if self._run_summary is not None:
            return self._run_summary
        stored = self.record.meta.get("summary")
        if stored is None:
            raise FoldsweepError(f"sweep `{self.name}` has not finished yet; `foldsweep run` it to the end first")
        return cast(dict[str, Any], stored)

    @property
    def nested(self) -> NestedEstimate:
        return NestedEstimate.from_summary(self.summary)

    @property
    def best_params(self) -> dict[str, Any]:
        """The final study's best configuration (the searched knobs only)."""
        return dict(self.summary["final"]["best_params"])

    @property
    def final_value(self) -> float | None:
        """The final configuration's inner-CV value (optimistic: it won the search that measured it)."""
        best = self.summary["final"]["best_value"]
        return float(best) if best is not None else None

    @property
    def test_looks(self) -> list[dict[str, Any]]:
        """The ledger of looks at the sealed test set, oldest first."""
        return self.record.ledger

    def status(self) -> dict[str, Any]:
        """Per study: finished / n_trials, running, failed, best value, refit; who runs what (`foldsweep status`)."""
        from foldsweep.storage import backend, redact
        from foldsweep.studies import holders, study_status

        record, refs = self._studies()
        meta = record.meta
        url = str(meta["storage"])
        return {"sweep": self.name, "storage": redact(url), "backend": backend(url),
                "studies": study_status(refs, record.spec.optuna.n_trials), "workers": holders(refs),
                "nested": meta.get("summary", {}).get("nested"),
                "data": describe_data(record.spec, meta["fingerprint"])}

    def trial_rows(self, study: str | None = None) -> list[dict[str, Any]]:
        """One plain dict per trial (`foldsweep trials --json`); `study` picks one (`outer-0`, ..., `final`)."""
        refs = self._studies()[1]
        keys = [ref.key for ref in refs]
        if study is not None and study not in keys:
            raise FoldsweepError(f"sweep `{self.name}` has no study `{study}`; studies: {', '.join(keys)}")
        return [_trial_row(ref.key, trial) for ref in refs if study in (None, ref.key)
                for trial in ref.study.get_trials(deepcopy=False)]

    def trials_dataframe(self, study: str | None = None) -> pd.DataFrame:
        """Every trial as a row: study, number, state, value, fold scores, epochs, duration, `params_<knob>`."""
        import pandas as pd

        return pd.DataFrame(self.trial_rows(study))

    # -- views -----------------------------------------------------------------------------------------------
    def report(self) -> Shown:
        """`foldsweep report` as rich tables (a terminal, Jupyter or `print`); `.data` holds its numbers."""
        from foldsweep.console import Shown, report_view
        from foldsweep.report import build_report

        rep = build_report(self.name) | {"data": describe_data(self.spec, self.record.meta["fingerprint"])}
        return Shown(report_view(rep), rep)

    def report_markdown(self) -> str:
        """The report as Markdown (what the record's report.md and the MLflow artifact hold)."""
        from foldsweep.report import report_markdown

        return report_markdown(self.report().data)

    def plots(self) -> dict[str, Figure]:
        """The sweep's pictures as matplotlib Figures, by name: the PNGs logged to MLflow, drawn again.

        Learning curves need the trials' curves in MLflow (`tracking.enabled: true`); without them that
        figure is left out, as are figures with nothing honest to draw.
        """
        from foldsweep.evaluate import sweep_tracker
        from foldsweep.plots import figures
        from foldsweep.report import best_curves

        record, refs = self._studies()
        summary = self.summary
        curves = best_curves(refs, str(summary["metric"]), sweep_tracker(record))
        return figures([(ref.key, ref.study) for ref in refs], list(record.spec.search), str(summary["metric"]),
                       summary, curves)

    def __rich__(self) -> RenderableType:
        from foldsweep.console import summary_view

        return summary_view(self.summary)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        from foldsweep.console import Shown

        return Shown(self.__rich__())._repr_mimebundle_(include, exclude)

    def __repr__(self) -> str:
        if not self.finished and self._run_summary is None:
            return f"SweepResult({self.name!r}, not finished)"
        n = self.nested
        return (f"SweepResult({self.name!r}: nested {n.metric} {n.mean:.4f}, 95% CI {n.ci95[0]:.4f}.."
                f"{n.ci95[1]:.4f}, outer-fold sd {n.std:.4f}, optimism {n.optimism:+.4f})")

    # -- the winning config, the final model, the test look --------------------------------------------------
    def export(self, path: str | Path | None = None, *, fmt: Literal["yaml", "json"] = "yaml") -> dict[str, Any]:
        """The final config with provenance (a loadable spec, as `foldsweep export`); written to `path` if given."""
        from foldsweep.export import export_best, render

        doc = export_best(self.name)
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, render(doc, fmt))  # a full disk leaves no empty file behind
        return doc

    def fit(self, out: str | Path | None = None) -> FittedModel:
        """Train the final config on all development rows (as `foldsweep fit`) and return the model.

        Without `out` the model goes to the sweep's record (`mlruns/sweeps/NAME/model`), and a later
        call returns that model instead of training it again.
        """
        if out is None:
            reused = self._kept_model()
            if reused is not None:
                return reused
        folder = Path(out) if out is not None else self.record.folder / DEFAULT_MODEL
        return fit_model(self._config(), folder, self._data)

    def test(self, *, again: bool = False, model: FittedModel | str | Path | None = None) -> dict[str, Any]:
        """The one deliberate look at the sealed test rows (as `foldsweep test`), appended to the ledger.

        A second look needs `again=True` and is counted everywhere. `model` scores a fitted model (from this
        sweep's development rows) instead of refitting the final config.
        """
        from foldsweep.evaluate import look

        folder = model.folder if isinstance(model, FittedModel) else (Path(model) if model is not None else None)
        return look(self.name, again=again, model_dir=folder, data=self._data)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _studies(self) -> tuple[SweepRecord, list[StudyRef]]:
        from foldsweep.studies import open_existing

        return open_existing(self.name)

    def _config(self) -> SweepSpec:
        from foldsweep.spec import parse_spec

        return parse_spec(self.export(), source=f"export of {self.name}")

    def _kept_model(self) -> FittedModel | None:
        """The model a former `fit()` left in the record, if it was fit for this very sweep."""
        from foldsweep.evaluate import load_model

        folder = self.record.folder / DEFAULT_MODEL
        if not (folder / "model.pt").is_file():
            return None
        final = load_model(folder)
        prov = final.provenance
        if prov.get("sweep") != self.name or prov.get("sweep_spec_hash") != self.record.meta["spec_hash"]:
            return None
        return FittedModel(final, folder, model_info(final, folder))


def fit_model(config: SweepSpec | Path, folder: Path, data: Dataset | None) -> FittedModel:
    """`foldsweep fit` of an exported config (loaded, or its file) into `folder`; `data` when it is in memory."""
    from foldsweep.evaluate import fit_config, load_model

    info = fit_config(config, folder, data=data)
    return FittedModel(load_model(folder), folder, info)


def model_info(final: FinalModel, folder: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """What `foldsweep fit --json` prints about a model folder, from the provenance it carries."""
    prov = final.provenance
    return {"folder": str(folder), "model_hash": prov["model_hash"], "epochs": prov["epochs"],
            "dev_rows": prov["dev_rows"], "dev_source": prov["dev_source"], "train_score": prov["train_score"],
            "metric": prov["metric"], "notes": list(notes or []), "mlflow": prov.get("mlflow") or {}}


def _trial_row(study: str, trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    row = {"study": study, "number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
           "fold_scores": list(attrs.get("fold_scores", [])), "mean_best_epoch": attrs.get("mean_best_epoch"),
           "duration_s": duration, "reason": attrs.get("reason"), "worker": (attrs.get("worker") or {}).get("name")}
    return row | {f"params_{k}": v for k, v in trial.params.items()}
