"""Load a data set into arrays, encode labels, and fingerprint it.

The fingerprint and per-row hashes let a later command prove it sees exactly the rows the sweep saw:
the sealed test set is only meaningful if nobody can swap rows (or column names) under it.

Every path (a bundled set, a CSV or Parquet file, an in-memory DataFrame) ends in `dataset_from_frame`,
so the same table gives the same fingerprint whichever way it came in. Files are read by pyarrow
(multi-threaded, columnar), feature columns become float32 before pandas sees them, and nothing on the
way visits rows one by one in Python: every check is one vectorised pass over the rows or the columns.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from foldsweep.errors import DataError
from foldsweep.spec import CLASSIFICATION_METRICS, DataSpec

MAXIMIZE = {"accuracy": True, "roc_auc": True, "f1_macro": True, "r2": True,
            "log_loss": False, "rmse": False, "mae": False}
SONAR_ATTRIBUTION = (
    "Sonar, Mines vs. Rocks (UCI Machine Learning Repository, CC BY 4.0), contributed by "
    "T. Sejnowski and R. P. Gorman; Gorman & Sejnowski (1988), Neural Networks 1, 75-89."
)
MAX_COLUMNS = 10_000  # columns of a table, and features after one-hot encoding: an MLP input, not a text corpus
MAX_HEADER_BYTES = 4 << 20  # a header line longer than this cannot be MAX_COLUMNS names of sane length
PARQUET_SUFFIXES = (".parquet", ".pq")
FINGERPRINT_VERSION = b"foldsweep/data-fingerprint/v2\0"


@dataclass(frozen=True)
class Dataset:
    """Features as float32, labels as class codes (classification) or float32 (regression).

    `row_hashes` holds one uint64 per row (`hash_rows`); `row_hex` turns some of them into the hex
    strings the sweep's record stores.
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    task: str
    metric: str
    classes: list[str] | None = None
    groups: np.ndarray | None = None
    times: np.ndarray | None = None
    row_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64), repr=False)
    target: str = ""  # the label column's name (a prediction file may carry it; it is ignored there)

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 0

    @property
    def maximize(self) -> bool:
        return MAXIMIZE[self.metric]

    @property
    def fingerprint(self) -> str:
        """One hash over the column names (in order), the classes and every row in order.

        Any edit, addition or reordering of rows changes it, and so does renaming or swapping columns:
        `predict` matches columns by name, so a swapped header is another table. One sha256 over
        8 bytes a row (about 0.1 s at 10^7 rows).
        """
        header = json.dumps({"features": self.feature_names, "target": self.target, "classes": self.classes,
                             "task": self.task}, sort_keys=True).encode()
        digest = hashlib.sha256(FINGERPRINT_VERSION + header + b"\0")
        digest.update(np.ascontiguousarray(self.row_hashes, dtype="<u8").tobytes())
        return digest.hexdigest()[:16]

    def row_hex(self, rows: np.ndarray | list[int]) -> list[str]:
        """The hashes of `rows` as 16-digit hex strings, the form the sweep's record keeps."""
        return row_hex(np.asarray(self.row_hashes)[np.asarray(rows, dtype=np.int64)])


def load_dataset(spec: DataSpec, base_dir: Path | None = None) -> Dataset:
    """Load the spec's data set; relative paths are resolved against `base_dir` (the spec's folder)."""
    if spec.frame is not None:
        raise DataError(f"data.frame `{spec.frame}` is an in-memory table, not a file: pass it again from Python, "
                        "e.g. foldsweep.open(NAME, data=frame)")
    if spec.dataset is not None:
        frame, target = _bundled(spec.dataset)
        return dataset_from_frame(frame, spec, name=spec.dataset, target=target)
    path = _resolve(spec.path or "", base_dir)
    keep = {c for c in (spec.target, spec.group, spec.time) if c}
    return dataset_from_frame(read_table(path, exact=keep), spec, name=path.stem)


def dataset_from_frame(frame: pd.DataFrame, spec: DataSpec, *, name: str, target: str | None = None) -> Dataset:
    """A Dataset from a table in memory: the one path every loader takes (the frame is not modified).

    `target` defaults to `spec.target` (bundled sets name their own label column).
    """
    target = target or spec.target
    if not all(isinstance(c, str) for c in frame.columns):  # names as a file's header reads them back
        frame = frame.rename(columns=str)  # a renamed copy: the caller's frame stays as it is
    if not target:
        raise DataError(f"`{name}`: no target column given (data.target)")
    _check_columns(frame, name)
    if frame.shape[0] == 0:
        raise DataError(f"`{name}` has a header but no rows")
    _require_columns(frame, [c for c in (target, spec.group, spec.time) if c], name)
    groups = frame[spec.group].to_numpy() if spec.group else None
    times = frame[spec.time].to_numpy() if spec.time else None
    labels = frame[target]
    if labels.isna().any():
        raise DataError(f"target column `{target}` has {int(labels.isna().sum())} empty rows")
    features = [c for c in frame.columns if c not in (target, spec.group, spec.time)]
    X, names = _feature_matrix(frame, features, spec.categorical)
    X, keep = _handle_missing(X, names, spec.missing)
    if keep is not None:
        labels, groups = labels[keep], groups[keep] if groups is not None else None
        times = times[keep] if times is not None else None
    task = _infer_task(labels) if spec.task == "auto" else spec.task
    y, classes = _encode_target(labels, task, target)
    metric = _metric(spec, task, target, classes)
    return Dataset(name=name, X=X, y=y, feature_names=names, task=task, metric=metric, classes=classes,
                   groups=groups, times=times, row_hashes=hash_rows(X, y), target=target)


def _metric(spec: DataSpec, task: str, target: str, classes: list[str] | None) -> str:
    metric = spec.metric if spec.metric != "auto" else ("accuracy" if task == "classification" else "rmse")
    if task == "regression" and metric in CLASSIFICATION_METRICS:
        raise DataError(f"metric `{metric}` needs a classification target; `{target}` was inferred as "
                        "regression (set data.task: classification if the values are class codes)")
    if task == "classification" and metric not in CLASSIFICATION_METRICS:
        raise DataError(f"metric `{metric}` needs a regression target; `{target}` is a classification target")
    if metric == "roc_auc" and classes is not None and len(classes) != 2:
        raise DataError(f"metric `roc_auc` needs a binary target; `{target}` has {len(classes)} classes")
    return metric


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
        frame["target"] = np.asarray(bunch.target_names).astype(str)[bunch.target.to_numpy()]
    return frame, "target"


# -- files -------------------------------------------------------------------------------------------------
def read_table(path: Path, *, exact: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame; numeric columns not in `exact` arrive as float32.

    Whatever the file holds, the answer is a DataFrame or a one-line DataError naming the file.
    """
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            table = _read_parquet(path)
        else:
            table = _read_csv(path)
        names = table.column_names  # decoding a name that is not UTF-8 fails here
    except (pa.ArrowException, UnicodeError, OSError) as err:
        kind = "Parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "CSV"
        raise DataError(f"data file `{path}` cannot be read as {kind}: {_arrow_message(err)}") from None
    _check_names(names, str(path))
    _refuse_binary(table, path)
    table = _float32_features(table, exact)
    return table.to_pandas(split_blocks=True, self_destruct=True)


def read_header(path: Path) -> list[str]:
    """A file's column names without reading its rows (the schema, or the CSV's first block)."""
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            return list(pq.read_schema(path).names)
        _check_header_width(path)
        with pacsv.open_csv(path) as reader:
            return list(reader.schema.names)
    except (pa.ArrowException, UnicodeError, OSError) as err:
        raise DataError(f"data file `{path}` cannot be read: {_arrow_message(err)}") from None


def _read_parquet(path: Path) -> pa.Table:
    width = len(pq.read_schema(path).names)
    if width > MAX_COLUMNS:
        raise DataError(f"data file `{path}` has {width:,} columns; foldsweep reads at most {MAX_COLUMNS:,}")
    return pq.read_table(path)


def _read_csv(path: Path) -> pa.Table:
    _check_header_width(path)
    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except pa.ArrowInvalid as err:
        if str(err).startswith("Empty CSV file"):
            raise DataError(f"data file `{path}` is empty") from None
        raise


def _check_header_width(path: Path) -> None:
    """Count the header's fields before pyarrow infers a type for each: a 10^5-column file is refused in ms."""
    with path.open("rb") as handle:
        line = handle.readline(MAX_HEADER_BYTES + 1)
    if not line.strip():
        raise DataError(f"data file `{path}` is empty")
    if len(line) > MAX_HEADER_BYTES:
        raise DataError(f"data file `{path}` has a first line longer than {MAX_HEADER_BYTES >> 20} MiB; foldsweep "
                        f"reads CSV files with a header of at most {MAX_COLUMNS:,} columns")
    fields = next(csv.reader([line.decode("utf-8", errors="replace")]), [])
    if len(fields) > MAX_COLUMNS:
        raise DataError(f"data file `{path}` has {len(fields):,} columns; foldsweep reads at most {MAX_COLUMNS:,}")


def _arrow_message(err: BaseException) -> str:
    if isinstance(err, UnicodeError):
        return "it is not UTF-8 text"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _refuse_binary(table: pa.Table, path: Path) -> None:
    """pyarrow reads a column that is not UTF-8 as bytes; as labels or categories they would print as b'...'."""
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            raise DataError(f"column `{name}` of data file `{path}` is not UTF-8 text; save the file as UTF-8")


def _float32_features(table: pa.Table, exact: set[str] | frozenset[str]) -> pa.Table:
    """Cast numeric columns to float32 in Arrow: a 10^7 x 50 table never exists as float64 in pandas.

    The table is built once from its columns (a `set_column` per column would copy the schema each time).
    """
    columns = []
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)  # null: all empty
        cast = numeric and name not in exact and kind != pa.float32()
        columns.append(pc.cast(column, pa.float32(), safe=False) if cast else column)
    return pa.Table.from_arrays(columns, names=table.column_names)


# -- columns -----------------------------------------------------------------------------------------------
def _check_names(names: list[str], source: str) -> None:
    """Duplicate names (one hashed pass) and a sane width; pandas would rename a repeated column silently."""
    if len(names) > MAX_COLUMNS:
        raise DataError(f"`{source}` has {len(names):,} columns; foldsweep reads at most {MAX_COLUMNS:,}")
    index = pd.Index([str(n) for n in names])
    if index.has_duplicates:
        dupes = sorted(set(index[index.duplicated()]))
        raise DataError(f"data file `{source}` has duplicate column names: {', '.join(dupes[:12])}"
                        + (f" and {len(dupes) - 12} more" if len(dupes) > 12 else ""))


def _check_columns(frame: pd.DataFrame, source: str) -> None:
    _check_names(list(frame.columns), source)


def _require_columns(frame: pd.DataFrame, names: list[str], source: str) -> None:
    columns = [str(c) for c in frame.columns]
    present = set(columns)
    for name in names:
        if name not in present:
            close = difflib.get_close_matches(name, columns[:MAX_COLUMNS], n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise DataError(f"column `{name}` not found in `{source}`{hint}; columns: {', '.join(columns[:12])}"
                            + (" ..." if len(columns) > 12 else ""))


def _feature_matrix(frame: pd.DataFrame, columns: list[str], categorical: str) -> tuple[np.ndarray, list[str]]:
    """Numeric columns first (in file order), then one-hot columns; one C-ordered float32 array.

    Row-major because training gathers rows (3-5x slower from a column-major array); filled column by
    column, so no float64 copy of the table is ever made.
    """
    dtypes = frame.dtypes
    is_text = {c: not pd.api.types.is_numeric_dtype(dtypes[c]) and not pd.api.types.is_bool_dtype(dtypes[c])
               for c in columns}
    text = [c for c in columns if is_text[c]]
    numeric = [c for c in columns if not is_text[c]]
    if text and categorical == "error":
        raise DataError(f"feature column `{text[0]}` is not numeric "
                        f"({len(text)} such column(s)); set data.categorical: onehot to encode them")
    dummies = _one_hot(frame, text) if text else None
    width = len(numeric) + (dummies.shape[1] if dummies is not None else 0)
    if width == 0:
        raise DataError("no feature columns left besides the target")
    X = np.empty((len(frame), width), dtype=np.float32)
    for j, column in enumerate(numeric):
        X[:, j] = frame[column].to_numpy(dtype=np.float32, na_value=np.nan)
    if dummies is not None:
        X[:, len(numeric):] = dummies.to_numpy(dtype=np.float32)
    names = [str(c) for c in numeric] + ([str(c) for c in dummies.columns] if dummies is not None else [])
    return X, names


def _one_hot(frame: pd.DataFrame, text: list[str]) -> pd.DataFrame:
    """Refuse before encoding when the categories would make the table wider than MAX_COLUMNS."""
    levels = sum(int(frame[c].nunique()) for c in text)
    if levels > MAX_COLUMNS:
        raise DataError(f"one-hot encoding of {len(text)} text column(s) would make {levels:,} features (more "
                        f"than {MAX_COLUMNS:,}); drop identifier-like columns such as `{text[0]}`")
    return pd.get_dummies(frame[text], columns=text, dtype=np.float32)


def _handle_missing(X: np.ndarray, names: list[str], policy: str) -> tuple[np.ndarray, np.ndarray | None]:
    """NaN/inf: refuse, drop the rows, or leave NaN for in-fold imputation by the trainer.

    One float64 row sum finds the bad rows (a finite float32 row cannot overflow it); the per-column
    detail is worked out on those rows only. Returns the rows kept (None: all of them).
    """
    bad_rows = ~np.isfinite(X.sum(axis=1, dtype=np.float64))
    if not bad_rows.any():
        return X, None
    bad = ~np.isfinite(X[bad_rows])
    if policy == "error":
        column = int(np.argmax(bad.any(axis=0)))
        raise DataError(
            f"feature column `{names[column]}` has {int(bad[:, column].sum())} rows with NaN or inf "
            f"({int(bad_rows.sum())} rows in all); set data.missing: drop or impute")
    if policy == "drop":
        keep = ~bad_rows
        if not keep.any():
            raise DataError("every row has a NaN or inf feature; nothing is left after data.missing: drop")
        return np.ascontiguousarray(X[keep]), keep
    rows = X[bad_rows]
    rows[bad] = np.nan  # inf becomes NaN: the trainer imputes NaN with the training-row mean
    X[bad_rows] = rows
    return X, None


def _infer_task(labels: pd.Series) -> str:
    if not pd.api.types.is_numeric_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        return "classification"
    values = labels.to_numpy(dtype=float)
    integral = np.all(np.mod(values, 1) == 0)
    return "classification" if integral and labels.nunique() <= 20 else "regression"


def _encode_target(labels: pd.Series, task: str, name: str) -> tuple[np.ndarray, list[str] | None]:
    """Class codes in the sorted order of the classes' text (as `str` writes them), by hashing, not sorting rows."""
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(labels):
            raise DataError(f"target column `{name}` is not numeric; set data.task: classification")
        return labels.to_numpy(dtype=np.float32), None
    codes, uniques = pd.factorize(labels, sort=False)
    texts = [str(u) for u in uniques]
    classes = sorted(set(texts))
    if len(classes) < 2:
        raise DataError(f"target column `{name}` has one class only ({classes[0]!r}); need at least 2")
    position = {text: i for i, text in enumerate(classes)}
    remap = np.asarray([position[t] for t in texts], dtype=np.int64)
    return remap[codes], classes


# -- row hashes --------------------------------------------------------------------------------------------
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_LABEL_KEY = np.uint64(0x9E3779B97F4A7C15)
_CANONICAL_NAN = np.uint32(0x7FC00000)
_CHUNK_ROWS = 1 << 14


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on uint64 (a bijection: distinct inputs stay distinct)."""
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def _column_keys(n_words: int) -> np.ndarray:
    keys = np.arange(1, n_words + 1, dtype=np.uint64) * _LABEL_KEY
    return _mix(keys)


def hash_rows(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of features and label, for the sealed-test record and duplicate checks.

    Defined on bit patterns, so it is the same on every run, machine and numpy version: each row's
    float32 values (-0.0 as 0.0, every NaN as one NaN) are read as little-endian uint32 pairs, i.e.
    uint64 words; word j is XORed with a column key, mixed by splitmix64's finaliser, and the words are
    summed modulo 2^64; the sum is mixed with the label (as float64 bits, mixed likewise). Vectorised
    over blocks of rows: about 10 numpy passes over the table. Not cryptographic: it detects edits and
    duplicates, it does not resist a forger (nor does anything else here: the files are not signed).
    """
    X = np.asarray(X, dtype=np.float32)
    n, width = X.shape
    n_words = (width + 1) // 2
    keys = _column_keys(n_words)
    labels = _label_words(np.asarray(y), n)
    out = np.empty(n, dtype=np.uint64)
    block = np.zeros((min(n, _CHUNK_ROWS), 2 * n_words), dtype="<f4")
    with np.errstate(over="ignore"):
        for start in range(0, n, _CHUNK_ROWS):
            rows = X[start:start + _CHUNK_ROWS]
            view = block[: len(rows)]
            np.add(rows, np.float32(0.0), out=view[:, :width])  # -0.0 + 0.0 == +0.0
            bits = view.view("<u4")
            bits[np.isnan(view)] = _CANONICAL_NAN
            words = view.view("<u8") ^ keys
            summed = _mix(words).sum(axis=1, dtype=np.uint64)
            out[start:start + len(rows)] = _mix(summed ^ labels[start:start + len(rows)])
    return out


def _label_words(y: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(y, dtype="<f8").reshape(n) + 0.0
    words = values.view("<u8").astype(np.uint64) ^ _LABEL_KEY
    with np.errstate(over="ignore"):
        return _mix(words)


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def row_hex(hashes: np.ndarray) -> list[str]:
    """uint64 hashes as 16-digit big-endian hex strings, built by table lookup rather than a loop of `format`."""
    raw = np.ascontiguousarray(np.asarray(hashes, dtype=">u8")).view(np.uint8).reshape(-1, 8)
    digits = np.empty((len(raw), 16), dtype=np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 15]
    return digits.view("S16").ravel().astype(str).tolist()
