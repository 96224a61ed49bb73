"""Load a data set into arrays, encode labels, and fingerprint it.

The fingerprint and per-row hashes let a later command prove it sees exactly the rows the sweep saw:
the sealed test set is only meaningful if nobody can swap rows under it.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from foldsweep.errors import DataError
from foldsweep.spec import CLASSIFICATION_METRICS, DataSpec

MAXIMIZE = {"accuracy": True, "roc_auc": True, "f1_macro": True, "r2": True,
            "log_loss": False, "rmse": False, "mae": False}
SONAR_ATTRIBUTION = (
    "Sonar, Mines vs. Rocks (UCI Machine Learning Repository, CC BY 4.0), contributed by "
    "T. Sejnowski and R. P. Gorman; Gorman & Sejnowski (1988), Neural Networks 1, 75-89."
)


@dataclass(frozen=True)
class Dataset:
    """Features as float32, labels as class codes (classification) or float32 (regression)."""

    name: str
    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    task: str
    metric: str
    classes: list[str] | None = None
    groups: np.ndarray | None = None
    times: np.ndarray | None = None
    row_hashes: list[str] = field(default_factory=list, repr=False)
    target: str = ""  # the label column's name (a prediction file may carry it; it is ignored there)

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 0

    @property
    def maximize(self) -> bool:
        return MAXIMIZE[self.metric]

    @property
    def fingerprint(self) -> str:
        """One hash over every row in order: any edit, addition or reordering changes it."""
        return hashlib.sha256("".join(self.row_hashes).encode()).hexdigest()[:16]


def load_dataset(spec: DataSpec, base_dir: Path | None = None) -> Dataset:
    """Load the spec's data set; relative paths are resolved against `base_dir` (the spec's folder)."""
    if spec.frame is not None:
        raise DataError(f"data.frame `{spec.frame}` is an in-memory table, not a file: pass it again from Python, "
                        "e.g. foldsweep.open(NAME, data=frame)")
    if spec.dataset is not None:
        frame, target = _bundled(spec.dataset)
        name: str = spec.dataset
    else:
        path = _resolve(spec.path or "", base_dir)
        frame, target = _read_table(path), spec.target or ""
        name = path.stem
    return _to_dataset(frame, target, spec, name)


def dataset_from_frame(frame: pd.DataFrame, spec: DataSpec, *, name: str) -> Dataset:
    """An in-memory table as a Dataset: the rows, row hashes and fingerprint are those of the same table
    read from a CSV/Parquet file, so the seal and the test look treat both alike.

    Args:
        frame: (n rows, features + the `spec.target` column, and `group`/`time` columns if set); not modified.
        spec: the data block; its `target`, `task`, `metric`, `missing`, `categorical`, `group`, `time` apply.
        name: what the data set is called in messages and records.
    """
    if frame.empty:
        raise DataError(f"table `{name}` has no rows")
    if frame.columns.duplicated().any():
        dupes = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
        raise DataError(f"table `{name}` has duplicate column names: {', '.join(dupes)}")
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]  # as a file's header reads back
    return _to_dataset(frame, spec.target or "", spec, name)


def _resolve(path: str, base_dir: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and base_dir is not None:
        candidate = base_dir / candidate
    if not candidate.is_file():
        raise DataError(f"data file `{path}` not found (data.path)")
    return candidate


def _bundled(name: str) -> tuple[pd.DataFrame, str]:
    if name == "sonar":
        text = resources.files("foldsweep.datasets").joinpath("sonar.csv").read_text()
        rows = [line.split(",") for line in text.strip().splitlines()]
        frame = pd.DataFrame([r[:-1] for r in rows], columns=[f"band_{i:02d}" for i in range(60)]).astype(float)
        frame["label"] = [r[-1] for r in rows]
        return frame, "label"
    from sklearn import datasets

    loader = getattr(datasets, f"load_{name}")
    bunch = loader(as_frame=True)
    frame = bunch.frame.copy()
    if name != "diabetes":
        frame["target"] = [str(bunch.target_names[i]) for i in bunch.target]
    return frame, "target"


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        _refuse_duplicate_header(path)
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            raise DataError(f"data file `{path}` is empty") from None
    if frame.empty:
        raise DataError(f"data file `{path}` has a header but no rows")
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise DataError(f"data file `{path}` has duplicate column names: {', '.join(map(str, dupes))}")
    return frame


def _refuse_duplicate_header(path: Path) -> None:
    """pandas silently renames a repeated column (`a`, `a.1`); catch it before it does."""
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(f"data file `{path}` is empty")
    seen = [c for i, c in enumerate(header) if c in header[:i]]
    if seen:
        raise DataError(f"data file `{path}` has duplicate column names: {', '.join(sorted(set(seen)))}")


def _to_dataset(frame: pd.DataFrame, target: str, spec: DataSpec, name: str) -> Dataset:
    _require_columns(frame, [c for c in (target, spec.group, spec.time) if c], name)
    groups = frame.pop(spec.group).to_numpy() if spec.group else None
    times = frame.pop(spec.time).to_numpy() if spec.time else None
    labels = frame.pop(target)
    if labels.isna().any():
        raise DataError(f"target column `{target}` has {int(labels.isna().sum())} empty rows")
    features = _numeric_features(frame, spec.categorical)
    features, keep = _handle_missing(features, spec.missing)
    labels = labels[keep]
    groups = groups[keep] if groups is not None else None
    times = times[keep] if times is not None else None
    task = _infer_task(labels) if spec.task == "auto" else spec.task
    y, classes = _encode_target(labels, task, target)
    metric = spec.metric if spec.metric != "auto" else ("accuracy" if task == "classification" else "rmse")
    if task == "regression" and metric in CLASSIFICATION_METRICS:
        raise DataError(f"metric `{metric}` needs a classification target; `{target}` was inferred as "
                        "regression (set data.task: classification if the values are class codes)")
    if task == "classification" and metric not in CLASSIFICATION_METRICS:
        raise DataError(f"metric `{metric}` needs a regression target; `{target}` is a classification target")
    if metric == "roc_auc" and classes is not None and len(classes) != 2:
        raise DataError(f"metric `roc_auc` needs a binary target; `{target}` has {len(classes)} classes")
    # a copy (a pandas view is read-only: torch warns on stderr), row-major: pandas hands out columns, and
    # training gathers rows, 3-5x slower from a column-major array
    X = np.ascontiguousarray(features.to_numpy(dtype=np.float32, copy=True))
    return Dataset(name=name, X=X, y=y, feature_names=[str(c) for c in features.columns], task=task,
                   metric=metric, classes=classes, groups=groups, times=times, row_hashes=hash_rows(X, y),
                   target=target)


def _require_columns(frame: pd.DataFrame, names: list[str], source: str) -> None:
    columns = [str(c) for c in frame.columns]
    for name in names:
        if name not in columns:
            close = difflib.get_close_matches(name, columns, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise DataError(f"column `{name}` not found in `{source}`{hint}; columns: {', '.join(columns[:12])}"
                            + (" ..." if len(columns) > 12 else ""))


def _numeric_features(frame: pd.DataFrame, categorical: str) -> pd.DataFrame:
    text_columns = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
                    and not pd.api.types.is_bool_dtype(frame[c])]
    if text_columns and categorical == "error":
        raise DataError(f"feature column `{text_columns[0]}` is not numeric "
                        f"({len(text_columns)} such column(s)); set data.categorical: onehot to encode them")
    if text_columns:
        frame = pd.get_dummies(frame, columns=text_columns, dtype=float)
    if frame.shape[1] == 0:
        raise DataError("no feature columns left besides the target")
    return frame.astype(float)


def _handle_missing(features: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, np.ndarray]:
    """NaN/inf: refuse, drop the rows, or leave NaN for in-fold imputation by the trainer."""
    values = features.to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if not bad.any():
        return features, np.ones(len(features), dtype=bool)
    if policy == "error":
        column = int(np.argmax(bad.any(axis=0)))
        raise DataError(
            f"feature column `{features.columns[column]}` has {int(bad[:, column].sum())} rows with NaN or inf "
            f"({int(bad.any(axis=1).sum())} rows in all); set data.missing: drop or impute")
    if policy == "drop":
        keep = ~bad.any(axis=1)
        if not keep.any():
            raise DataError("every row has a NaN or inf feature; nothing is left after data.missing: drop")
        return features[keep], keep
    return features.mask(bad), np.ones(len(features), dtype=bool)


def _infer_task(labels: pd.Series) -> str:
    if not pd.api.types.is_numeric_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        return "classification"
    values = labels.to_numpy(dtype=float)
    integral = np.all(np.mod(values, 1) == 0)
    return "classification" if integral and labels.nunique() <= 20 else "regression"


def _encode_target(labels: pd.Series, task: str, name: str) -> tuple[np.ndarray, list[str] | None]:
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(labels):
            raise DataError(f"target column `{name}` is not numeric; set data.task: classification")
        return labels.to_numpy(dtype=np.float32), None
    classes, codes = np.unique(labels.astype(str).to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"target column `{name}` has one class only ({classes[0]!r}); need at least 2")
    return codes.astype(np.int64), [str(c) for c in classes]


def hash_rows(X: np.ndarray, y: np.ndarray) -> list[str]:
    """A short hash per row (features and label), for the sealed-test record and duplicate checks."""
    yb = np.ascontiguousarray(y.astype(np.float64)).reshape(len(y), 1).view(np.uint8)
    xb = np.ascontiguousarray(np.nan_to_num(X.astype(np.float64), nan=np.pi)).view(np.uint8)
    return [hashlib.blake2b(xr.tobytes() + yr.tobytes(), digest_size=8).hexdigest() for xr, yr in zip(xb, yb)]
