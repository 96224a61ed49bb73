"""Load a data set into arrays, encode labels, and fingerprint it.

The fingerprint and per-row hashes let a later command prove it sees exactly the rows the sweep saw:
the sealed test set is only meaningful if nobody can swap rows (or column names) under it.

Every path (a bundled set, a CSV or Parquet file, an in-memory DataFrame) ends in `dataset_from_arrow`,
so the same table gives the same fingerprint whichever way it came in. The row-major float32 matrix is
filled straight from Arrow record batches (a Parquet file one row group at a time, so no whole Arrow
table sits beside the matrix), one-hot and label codes come from `pyarrow.compute.dictionary_encode`,
no pandas frame is built on the file path, and nothing visits rows one by one in Python: every check
is one vectorised pass over the rows or the columns.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from foldsweep.errors import DataError
from foldsweep.spec import CLASSIFICATION_METRICS, DataSpec
from foldsweep.tables import MAX_COLUMNS, Source, arrow_errors, check_names, open_table, require_columns

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MAX_COLUMNS", "Dataset", "dataset_from_arrow", "dataset_from_frame", "hash_features", "hash_rows",
           "load_dataset"]

MAXIMIZE = {"accuracy": True, "roc_auc": True, "f1_macro": True, "r2": True,
            "log_loss": False, "rmse": False, "mae": False}
SONAR_ATTRIBUTION = (
    "Sonar, Mines vs. Rocks (UCI Machine Learning Repository, CC BY 4.0), contributed by "
    "T. Sejnowski and R. P. Gorman; Gorman & Sejnowski (1988), Neural Networks 1, 75-89."
)
FINGERPRINT_VERSION = b"foldsweep/data-fingerprint/v2\0"
BATCH_ROWS = 1 << 16  # rows of an Arrow table copied into the matrix at a time: a (65,536, F) block
PIECE_VALUES = 1 << 23  # values of a Parquet row group decoded at a time: a few of its columns, ~32 MB


@dataclass(frozen=True)
class Dataset:
    """Features as float32, labels as class codes (classification) or float32 (regression).

    `row_hashes` holds one uint64 per row (`hash_rows`); the sweep's record keeps those of the sealed
    test rows. `feature_hashes` (`hash_features`, the label left out) find rows with identical features;
    None (a table built by hand) means they are worked out from X when asked for.
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
    feature_hashes: np.ndarray | None = field(default=None, repr=False)

    @property
    def pattern_hashes(self) -> np.ndarray:
        """One uint64 per row of its features alone: equal for rows whose features are identical."""
        return self.feature_hashes if self.feature_hashes is not None else hash_features(self.X)

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


def load_dataset(spec: DataSpec, base_dir: Path | None = None) -> Dataset:
    """Load the spec's data set; relative paths are resolved against `base_dir` (the spec's folder)."""
    if spec.frame is not None:
        raise DataError(f"data.frame `{spec.frame}` is an in-memory table, not a file: pass it again from Python, "
                        "e.g. foldsweep.open(NAME, data=frame)")
    if spec.dataset is not None:
        table, target = _bundled(spec.dataset)
        return dataset_from_arrow(table, spec, name=spec.dataset, target=target)
    path = _resolve(spec.path or "", base_dir)
    source = open_table(path)
    with arrow_errors(path):
        return dataset_from_arrow(source, spec, name=path.stem)


def dataset_from_frame(frame: pd.DataFrame, spec: DataSpec, *, name: str, target: str | None = None) -> Dataset:
    """A Dataset from a pandas DataFrame (the Python API): converted to Arrow, then `dataset_from_arrow`.

    The caller's frame is not modified. `target` defaults to `spec.target`.
    """
    columns = [str(c) for c in frame.columns]  # names as a file's header reads them back
    check_names(columns, name)
    try:
        table = pa.Table.from_pandas(frame.set_axis(columns, axis=1), preserve_index=False)
    except (pa.ArrowException, ValueError) as err:
        raise DataError(f"`{name}`: a column cannot be read as one type: {str(err).splitlines()[0]}") from None
    return dataset_from_arrow(table, spec, name=name, target=target)


def dataset_from_arrow(source: Source, spec: DataSpec, *, name: str, target: str | None = None) -> Dataset:
    """A Dataset from an Arrow table or an open Parquet file: the one path every loader takes.

    Args:
        source: N rows; its numeric feature columns are copied into the (N, F) float32 matrix batch by
            batch, its target, group, time and text columns are read whole.
        spec: the `data` section (target, group, time, categorical and missing policies, task, metric).
        name: how messages name the table.
        target: the label column, when not `spec.target` (bundled sets name their own).
    """
    target = target or spec.target
    if not target:
        raise DataError(f"`{name}`: no target column given (data.target)")
    schema = source.schema_arrow if isinstance(source, pq.ParquetFile) else source.schema
    columns = list(schema.names)
    check_names(columns, name)
    n_rows = source.metadata.num_rows if isinstance(source, pq.ParquetFile) else source.num_rows
    if n_rows == 0:
        raise DataError(f"`{name}` has a header but no rows")
    roles = [c for c in (target, spec.group, spec.time) if c]
    require_columns(columns, roles, name)
    features = [c for c in columns if c not in roles]
    numeric = [c for c in features if _is_numeric(schema.field(c).type)]
    text = [c for c in features if not _is_numeric(schema.field(c).type)]
    if text and spec.categorical == "error":
        raise DataError(f"feature column `{text[0]}` is not numeric "
                        f"({len(text)} such column(s)); set data.categorical: onehot to encode them")
    side = _read_columns(source, roles + text)
    labels = _decoded(side.column(target))
    _refuse_empty_labels(labels, target)
    X, names = _feature_matrix(source, n_rows, numeric, {c: side.column(c) for c in text})
    X, keep = _handle_missing(X, names, spec.missing)
    groups = _decoded(side.column(spec.group)).to_numpy() if spec.group else None
    times = _decoded(side.column(spec.time)).to_numpy() if spec.time else None
    if keep is not None:
        labels = labels.filter(pa.array(keep))
        groups, times = (v[keep] if v is not None else None for v in (groups, times))
    task = _infer_task(labels) if spec.task == "auto" else spec.task
    y, classes = _encode_target(labels, task, target)
    metric = _metric(spec, task, target, classes)
    features = hash_features(X)
    return Dataset(name=name, X=X, y=y, feature_names=names, task=task, metric=metric, classes=classes,
                   groups=groups, times=times, row_hashes=_with_label(features, y), target=target,
                   feature_hashes=features)


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


def _bundled(name: str) -> tuple[pa.Table, str]:
    if name == "sonar":
        raw = resources.files("foldsweep.datasets").joinpath("sonar.csv").read_bytes()
        names = [f"band_{i:02d}" for i in range(60)] + ["label"]
        return pacsv.read_csv(io.BytesIO(raw), read_options=pacsv.ReadOptions(column_names=names)), "label"
    from sklearn import datasets

    loader = getattr(datasets, f"load_{name}")
    bunch = loader(as_frame=True)
    table = pa.Table.from_pandas(bunch.frame, preserve_index=False)
    if name != "diabetes":
        names = np.asarray(bunch.target_names).astype(str)[bunch.target.to_numpy()]
        table = table.set_column(table.schema.get_field_index("target"), "target", pa.array(names))
    return table, "target"


# -- columns -----------------------------------------------------------------------------------------------
def _is_numeric(kind: pa.DataType) -> bool:
    """Integers, floats, booleans and all-empty columns become features as they are; the rest is text."""
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) \
        or pa.types.is_null(kind)


def _read_columns(source: Source, names: list[str]) -> pa.Table:
    if isinstance(source, pq.ParquetFile):
        return source.read(columns=names, use_threads=True)
    return source.select(names)


def _feature_matrix(source: Source, n_rows: int, numeric: list[str], text: dict[str, pa.ChunkedArray]
                    ) -> tuple[np.ndarray, list[str]]:
    """Numeric columns first (in file order), then one-hot columns; one C-ordered (N, F) float32 array.

    Row-major because training gathers rows (3-5x slower from a column-major array). No float64 copy
    of the whole table is ever made, and a Parquet file never exists whole as an Arrow table.
    """
    levels = {name: _levels(column) for name, column in text.items()}
    n_levels = sum(len(names) for _, names in levels.values())
    if n_levels > MAX_COLUMNS:
        raise DataError(f"one-hot encoding of {len(text)} text column(s) would make {n_levels:,} features (more "
                        f"than {MAX_COLUMNS:,}); drop identifier-like columns such as `{next(iter(text))}`")
    width = len(numeric) + n_levels
    if width == 0:
        raise DataError("no feature columns left besides the target")
    X = np.zeros((n_rows, width), dtype=np.float32) if text else np.empty((n_rows, width), dtype=np.float32)
    if numeric:
        _fill_numeric(X, source, numeric)
    names = list(numeric)
    offset = len(numeric)
    rows = np.arange(n_rows)
    for name, (codes, values) in levels.items():
        present = codes >= 0  # an empty cell is all zeros, as pandas.get_dummies leaves it
        X[rows[present], offset + codes[present]] = 1.0
        names += [f"{name}_{value}" for value in values]
        offset += len(values)
    return X, names


def _fill_numeric(X: np.ndarray, source: Source, names: list[str]) -> None:
    """Copy the numeric columns into X[:, :len(names)] in blocks of rows (a table) or of columns (Parquet).

    A Parquet row group is decoded a few columns at a time (PIECE_VALUES values), so the peak is the
    matrix plus one such piece; an Arrow table is copied BATCH_ROWS rows at a time (contiguous writes).
    """
    if isinstance(source, pq.ParquetFile):
        start = 0
        for group in range(source.num_row_groups):
            rows = source.metadata.row_group(group).num_rows
            step = max(1, PIECE_VALUES // max(rows, 1))
            for first in range(0, len(names), step):
                piece = source.read_row_group(group, columns=names[first:first + step], use_threads=True)
                X[start:start + rows, first:first + piece.num_columns] = _block(piece.columns)
            start += rows
        return
    start = 0
    for batch in source.select(names).to_batches(max_chunksize=BATCH_ROWS):
        X[start:start + batch.num_rows, :len(names)] = _block(batch.columns)
        start += batch.num_rows


def _block(columns: list[pa.Array] | list[pa.ChunkedArray]) -> np.ndarray:
    return np.column_stack([_as_floats(column) for column in columns])


def _as_floats(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One column as floats, an empty cell as NaN (integers and booleans are cast in Arrow first)."""
    if not pa.types.is_floating(column.type):
        column = pc.cast(column, pa.float32())
    return column.to_numpy(zero_copy_only=False)


def _levels(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Codes per row (-1 where empty) and the level names, in pandas.get_dummies' order.

    A text column's levels are sorted (as `sorted` orders str); a categorical column from a DataFrame
    keeps its categories' order. One hashed pass (`dictionary_encode`) over the rows; the sort is over
    the levels only.
    """
    if pa.types.is_dictionary(column.type):
        encoded = column.unify_dictionaries() if column.num_chunks > 1 else column
        ordered = True
    else:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.cast(column, pa.string())
        encoded = pc.dictionary_encode(column)
        ordered = False
    chunks = encoded.chunks
    values = [str(v) for v in chunks[0].dictionary.to_pylist()] if chunks else []
    codes = np.concatenate([_codes(chunk.indices) for chunk in chunks]) if chunks else np.zeros(0, dtype=np.int64)
    if ordered or len(values) > MAX_COLUMNS:
        return codes, values
    order = sorted(range(len(values)), key=values.__getitem__)
    rank = np.empty(len(values) + 1, dtype=np.int64)
    rank[order] = np.arange(len(values))
    rank[-1] = -1  # code -1 (empty) stays -1
    return rank[codes], [values[i] for i in order]


def _codes(indices: pa.Array) -> np.ndarray:
    """Dictionary indices as int64, -1 where empty (numpy reads an integer array with nulls as floats with NaN)."""
    values = indices.to_numpy(zero_copy_only=False)
    return np.nan_to_num(values, nan=-1).astype(np.int64) if indices.null_count else values.astype(np.int64)


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


# -- labels ------------------------------------------------------------------------------------------------
def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary column (pandas `Categorical`, a Parquet dictionary page) as its plain values.

    A label, group or time column means its values, not the codes a writer happened to give them.
    """
    return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column


def _refuse_empty_labels(labels: pa.ChunkedArray, name: str) -> None:
    """An empty cell (null) or a NaN in a float column: the row has no label to learn."""
    empty = labels.null_count
    if pa.types.is_floating(labels.type):
        empty += int(pc.sum(pc.is_nan(labels)).as_py() or 0)
    if empty:
        raise DataError(f"target column `{name}` has {empty} empty rows")


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _infer_task(labels: pa.ChunkedArray) -> str:
    """Text or booleans are classes; numbers are classes when they are whole and at most 20 distinct."""
    if not _is_number(labels.type):
        return "classification"
    values = labels.to_numpy().astype(np.float64, copy=False)
    integral = bool(np.all(np.mod(values, 1) == 0))
    return "classification" if integral and pc.count_distinct(labels).as_py() <= 20 else "regression"


def _encode_target(labels: pa.ChunkedArray, task: str, name: str) -> tuple[np.ndarray, list[str] | None]:
    """Class codes in the sorted order of the classes' text (as `str` writes them), by hashing, not sorting rows."""
    if task == "regression":
        if not (_is_number(labels.type) or pa.types.is_boolean(labels.type)):
            raise DataError(f"target column `{name}` is not numeric; set data.task: classification")
        return np.array(pc.cast(labels, pa.float32()).to_numpy(), dtype=np.float32), None  # a writable copy
    encoded = pc.dictionary_encode(labels)
    texts = [str(u) for u in encoded.chunks[0].dictionary.to_pylist()]
    classes = sorted(set(texts))
    if len(classes) < 2:
        raise DataError(f"target column `{name}` has one class only ({classes[0]!r}); need at least 2")
    position = {text: i for i, text in enumerate(classes)}
    remap = np.asarray([position[t] for t in texts], dtype=np.int64)
    codes = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in encoded.chunks])
    return remap[codes.astype(np.int64, copy=False)], classes


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
    """A 64-bit hash per row of features and label, for the sealed-test record and the fingerprint.

    Defined on bit patterns, so it is the same on every run, machine and numpy version: each row's
    float32 values (-0.0 as 0.0, every NaN as one NaN) are read as little-endian uint32 pairs, i.e.
    uint64 words; word j is XORed with a column key, mixed by splitmix64's finaliser, and the words are
    summed modulo 2^64 (`hash_features`); the sum is mixed with the label (as float64 bits, mixed
    likewise). Vectorised over blocks of rows: about 10 numpy passes over the table. Not cryptographic:
    it detects edits and duplicates, it does not resist a forger (nor does anything else here: the files
    are not signed).
    """
    return _with_label(hash_features(X), y)


def hash_features(X: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of its features alone (the sum of `hash_rows`' mixed words).

    Duplicate checks use this one: a check that saw the label would let labels decide which rows
    count as copies (a sealed row's label would choose which development rows are kept).
    """
    X = np.asarray(X, dtype=np.float32)
    n, width = X.shape
    n_words = (width + 1) // 2
    keys = _column_keys(n_words)
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
            out[start:start + len(rows)] = _mix(words).sum(axis=1, dtype=np.uint64)
    return out


def _with_label(features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`hash_rows` from `hash_features`: the feature sum mixed with the label's word."""
    with np.errstate(over="ignore"):
        return _mix(features ^ _label_words(np.asarray(y), len(features)))


def _label_words(y: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(y, dtype="<f8").reshape(n) + 0.0
    words = values.view("<u8").astype(np.uint64) ^ _LABEL_KEY
    with np.errstate(over="ignore"):
        return _mix(words)
