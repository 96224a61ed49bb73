"""Data sets: bundled ones load with the right shape and classes; CSV/Parquet files are checked and fingerprinted."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from foldsweep.data import (
    MAX_COLUMNS,
    Dataset,
    dataset_from_frame,
    hash_rows,
    load_dataset,
)
from foldsweep.errors import DataError, FoldsweepError
from foldsweep.spec import DataSpec
from foldsweep.tables import read_header, read_table


def csv(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_csv(tmp_path: Path, text: str, **spec: object) -> Dataset:
    spec.setdefault("target", "y")
    return load_dataset(DataSpec(path=str(csv(tmp_path, text)), **spec))  # type: ignore[arg-type]


def refused(tmp_path: Path, text: str, **spec: object) -> str:
    with pytest.raises(DataError) as info:
        load_csv(tmp_path, text, **spec)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_data_error_is_a_foldsweep_error() -> None:
    assert issubclass(DataError, FoldsweepError)


# --- bundled sets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows", "features", "classes"),
    [
        ("sonar", 208, 60, ["M", "R"]),
        ("breast_cancer", 569, 30, ["benign", "malignant"]),
        ("digits", 1797, 64, [str(i) for i in range(10)]),
        ("wine", 178, 13, ["class_0", "class_1", "class_2"]),
        ("iris", 150, 4, ["setosa", "versicolor", "virginica"]),
    ],
)
def test_bundled_classification_sets(name: str, rows: int, features: int, classes: list[str]) -> None:
    data = load_dataset(DataSpec(dataset=name))
    assert data.name == name
    assert data.X.shape == (rows, features) and data.X.dtype == np.float32
    assert data.y.shape == (rows,) and data.y.dtype == np.int64
    assert data.classes == classes and data.n_classes == len(classes)
    assert set(np.unique(data.y)) == set(range(len(classes)))
    assert data.task == "classification" and data.metric == "accuracy" and data.maximize
    assert len(data.feature_names) == features and "target" not in data.feature_names
    assert len(data.row_hashes) == rows and np.isfinite(data.X).all()
    assert data.groups is None and data.times is None


def test_sonar_labels() -> None:
    data = load_dataset(DataSpec(dataset="sonar"))
    assert np.bincount(data.y).tolist() == [111, 97]  # 111 mines, 97 rocks
    assert data.feature_names[0] == "band_00" and data.feature_names[-1] == "band_59"
    assert 0.0 <= data.X.min() and data.X.max() <= 1.0


def test_bundled_regression_set() -> None:
    data = load_dataset(DataSpec(dataset="diabetes"))
    assert data.X.shape == (442, 10) and data.y.dtype == np.float32
    assert data.task == "regression" and data.metric == "rmse" and not data.maximize
    assert data.classes is None and data.n_classes == 0


def test_bundled_metric_is_kept() -> None:
    assert load_dataset(DataSpec(dataset="sonar", metric="roc_auc")).metric == "roc_auc"
    assert load_dataset(DataSpec(dataset="diabetes", metric="r2")).maximize


def test_roc_auc_needs_a_binary_target() -> None:
    with pytest.raises(DataError, match=r"metric `roc_auc` needs a binary target; `target` has 3 classes"):
        load_dataset(DataSpec(dataset="iris", metric="roc_auc"))


def test_classification_metric_on_inferred_regression() -> None:
    with pytest.raises(DataError, match=r"metric `accuracy` needs a classification target.*inferred as regression"):
        load_dataset(DataSpec(dataset="diabetes", metric="accuracy"))


def test_regression_metric_on_a_classification_target() -> None:
    with pytest.raises(DataError, match=r"metric `rmse` needs a regression target"):
        load_dataset(DataSpec(dataset="sonar", metric="rmse"))


# --- files ------------------------------------------------------------------------------------------


def test_csv_loads(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "a,b,y\n1,2,x\n3,4,z\n5,6,x\n7,8.5,z\n")
    assert data.name == "data"
    assert data.X.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8.5]] and data.X.dtype == np.float32
    assert data.y.tolist() == [0, 1, 0, 1] and data.classes == ["x", "z"]
    assert data.feature_names == ["a", "b"] and data.task == "classification"


def test_integer_codes_are_classes_and_floats_are_regression(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "a,y\n1,2\n2,0\n3,1\n4,2\n")
    assert data.task == "classification" and data.classes == ["0", "1", "2"] and data.y.tolist() == [2, 0, 1, 2]
    data = load_csv(tmp_path, "a,y\n1,0.5\n2,1.5\n3,2.25\n")
    assert data.task == "regression" and data.metric == "rmse" and data.y.tolist() == [0.5, 1.5, 2.25]
    data = load_csv(tmp_path, "a,y\n1,2\n2,0\n3,1\n", task="regression")
    assert data.task == "regression" and data.y.dtype == np.float32


def test_relative_path_resolves_against_the_spec_folder(tmp_path: Path) -> None:
    csv(tmp_path, "a,y\n1,p\n2,q\n")
    data = load_dataset(DataSpec(path="data.csv", target="y"), base_dir=tmp_path)
    assert data.X.shape == (2, 1)


def test_parquet_loads(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [4, 5, 6], "y": ["p", "q", "p"]}).to_parquet(path)
    data = load_dataset(DataSpec(path=str(path), target="y"))
    assert data.name == "t" and data.X.tolist() == [[1, 4], [2, 5], [3, 6]] and data.classes == ["p", "q"]


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pd.DataFrame({"a": pd.Series([], dtype=float), "y": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(DataError, match=r"has a header but no rows"):
        load_dataset(DataSpec(path=str(path), target="y"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file `.*nope\.csv` not found \(data\.path\)"):
        load_dataset(DataSpec(path=str(tmp_path / "nope.csv"), target="y"))


def test_empty_file(tmp_path: Path) -> None:
    assert "is empty" in refused(tmp_path, "")


def test_header_only(tmp_path: Path) -> None:
    assert "has a header but no rows" in refused(tmp_path, "a,b,y\n")


def test_duplicate_column_names(tmp_path: Path) -> None:
    message = refused(tmp_path, "a,b,a,y\n1,2,3,x\n4,5,6,z\n")
    assert "duplicate column names: a" in message


def test_missing_target_column(tmp_path: Path) -> None:
    message = refused(tmp_path, "a,b,label\n1,2,x\n3,4,z\n", target="lable")
    assert "column `lable` not found" in message and "did you mean `label`?" in message
    assert "columns: a, b, label" in message


def test_missing_group_column(tmp_path: Path) -> None:
    message = refused(tmp_path, "a,site,y\n1,2,x\n3,4,z\n", group="sites")
    assert "column `sites` not found" in message and "did you mean `site`?" in message


def test_non_numeric_feature_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, "a,color,y\n1,red,x\n3,blue,z\n5,red,x\n")
    assert "feature column `color` is not numeric" in message and "data.categorical: onehot" in message


def test_non_numeric_feature_is_one_hot_encoded(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "a,color,y\n1,red,x\n3,blue,z\n5,red,x\n", categorical="onehot")
    assert data.feature_names == ["a", "color_blue", "color_red"]
    assert data.X.tolist() == [[1, 0, 1], [3, 1, 0], [5, 0, 1]]


MISSING = "a,b,y\n1,,x\n3,inf,z\n,6,x\n7,8,z\n9,10,x\n11,12,z\n"


def test_missing_values_are_refused_by_default(tmp_path: Path) -> None:
    message = refused(tmp_path, MISSING)
    assert "feature column `a` has 1 rows with NaN or inf" in message and "(3 rows in all)" in message
    assert "data.missing: drop or impute" in message


def test_missing_values_dropped(tmp_path: Path) -> None:
    data = load_csv(tmp_path, MISSING, missing="drop")
    assert data.X.tolist() == [[7, 8], [9, 10], [11, 12]] and data.y.tolist() == [1, 0, 1]
    assert len(data.row_hashes) == 3


def test_missing_values_kept_for_imputation(tmp_path: Path) -> None:
    data = load_csv(tmp_path, MISSING, missing="impute")
    assert data.X.shape == (6, 2)
    assert np.isnan(data.X[0, 1]) and np.isnan(data.X[1, 1]) and np.isnan(data.X[2, 0])  # inf becomes NaN
    assert np.isfinite(data.X[3:]).all()


def test_every_row_missing_is_refused_on_drop(tmp_path: Path) -> None:
    assert "nothing is left after data.missing: drop" in refused(tmp_path, "a,y\n,0\n,1\n", missing="drop")


def test_empty_target_rows(tmp_path: Path) -> None:
    assert "target column `y` has 1 empty rows" in refused(tmp_path, "a,y\n1,p\n2,\n3,q\n")


def test_target_with_one_class(tmp_path: Path) -> None:
    assert "target column `y` has one class only ('x'); need at least 2" in refused(tmp_path, "a,y\n1,x\n2,x\n")


def test_roc_auc_on_a_multiclass_file(tmp_path: Path) -> None:
    message = refused(tmp_path, "a,y\n1,p\n2,q\n3,r\n", metric="roc_auc")
    assert "metric `roc_auc` needs a binary target; `y` has 3 classes" in message


def test_text_target_for_regression(tmp_path: Path) -> None:
    assert "target column `y` is not numeric" in refused(tmp_path, "a,y\n1,p\n2,q\n", task="regression")


def test_group_and_time_columns_are_not_features(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "a,site,day,y\n1,s1,3,x\n2,s2,1,z\n3,s1,2,x\n", group="site", time="day")
    assert data.feature_names == ["a"]
    assert data.groups is not None and data.groups.tolist() == ["s1", "s2", "s1"]
    assert data.times is not None and data.times.tolist() == [3, 1, 2]


def test_drop_keeps_groups_and_times_aligned(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "a,g,t,y\n1,g1,1,x\n,g2,2,z\n3,g3,3,x\n4,g4,4,z\n", group="g", time="t",
                    missing="drop")
    assert data.groups is not None and data.groups.tolist() == ["g1", "g3", "g4"]
    assert data.times is not None and data.times.tolist() == [1, 3, 4]


# --- fingerprints -----------------------------------------------------------------------------------

ROWS = "a,b,y\n1,2,x\n3,4,z\n5,6,x\n7,8,z\n"


def test_fingerprint_is_reproducible(tmp_path: Path) -> None:
    first = load_csv(tmp_path, ROWS).fingerprint
    assert load_csv(tmp_path, ROWS).fingerprint == first
    assert len(first) == 16 and all(c in "0123456789abcdef" for c in first)


def test_fingerprint_changes_with_one_value(tmp_path: Path) -> None:
    base = load_csv(tmp_path, ROWS)
    edited = load_csv(tmp_path, ROWS.replace("5,6,x", "5,6.001,x"))
    assert edited.fingerprint != base.fingerprint
    changed = [i for i, (a, b) in enumerate(zip(base.row_hashes, edited.row_hashes, strict=True)) if a != b]
    assert changed == [2]


def test_fingerprint_changes_with_a_label(tmp_path: Path) -> None:
    base = load_csv(tmp_path, "a,y\n1,x\n2,z\n3,x\n4,z\n")
    edited = load_csv(tmp_path, "a,y\n1,x\n2,z\n3,z\n4,z\n")
    assert edited.fingerprint != base.fingerprint


def test_fingerprint_changes_when_rows_are_swapped(tmp_path: Path) -> None:
    base = load_csv(tmp_path, ROWS)
    swapped = load_csv(tmp_path, "a,b,y\n3,4,z\n1,2,x\n5,6,x\n7,8,z\n")
    assert swapped.fingerprint != base.fingerprint
    assert sorted(swapped.row_hashes) == sorted(base.row_hashes)


def test_duplicate_rows_hash_equal(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "a,b,y\n1,2,x\n3,4,z\n1,2,x\n1,2,z\n")
    assert data.row_hashes[0] == data.row_hashes[2]
    assert len(set(data.row_hashes)) == 3  # same features, other label: another row


def test_hash_rows_treats_nan_alike() -> None:
    X = np.array([[1.0, np.nan], [1.0, np.nan], [1.0, 0.0]], dtype=np.float32)
    hashes = hash_rows(X, np.array([0, 0, 0]))
    assert hashes[0] == hashes[1] != hashes[2]


def test_row_hashes_are_pinned_across_runs_and_machines() -> None:
    """The record stores these hashes: a change of the function would make every sealed sweep refuse its data."""
    X = np.array([[1.0, 2.0, 3.0], [0.0, np.nan, -1.5]], dtype=np.float32)
    y = np.array([0, 1])
    data = Dataset(name="t", X=X, y=y, feature_names=["a", "b", "c"], task="classification", metric="accuracy",
                   classes=["p", "q"], row_hashes=hash_rows(X, y), target="y")
    assert [f"{h:016x}" for h in data.row_hashes[:2]] == ["e9e06743c4518ffd", "9778b471e8a0a9b8"]
    assert data.row_hashes[:2].tolist() == [_reference_hash(row, label) for row, label in zip(X, y)]
    assert data.fingerprint == "d6dbf23eb38e46d5"


def _mix(z: int) -> int:
    mask = (1 << 64) - 1
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
    return z ^ (z >> 31)


def _reference_hash(row: np.ndarray, label: float) -> int:
    """hash_rows as its docstring defines it, one row in plain Python: the definition, checked."""
    golden = 0x9E3779B97F4A7C15
    values = [0.0 if v == 0 else v for v in row.tolist()] + [0.0] * (len(row) % 2)
    raw = b"".join(struct.pack("<I", 0x7FC00000) if v != v else struct.pack("<f", v) for v in values)
    words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
    total = sum(_mix(w ^ _mix((j + 1) * golden % (1 << 64))) for j, w in enumerate(words)) % (1 << 64)
    label_word = int.from_bytes(struct.pack("<d", float(label) + 0.0), "little")
    return _mix(total ^ _mix(label_word ^ golden))


def test_hash_rows_treats_negative_zero_and_every_nan_alike() -> None:
    quiet, other_nan = np.float32(np.nan), np.array([0x7FC00001], dtype=np.uint32).view(np.float32)[0]
    X = np.array([[0.0, quiet], [-0.0, other_nan], [0.0, 1.0]], dtype=np.float32)
    hashes = hash_rows(X, np.zeros(3))
    assert hashes[0] == hashes[1] != hashes[2]


def test_hash_rows_sees_which_column_holds_which_value() -> None:
    X = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [1.0, 3.0, 2.0]], dtype=np.float32)
    assert len(set(hash_rows(X, np.zeros(3)).tolist())) == 3


def test_swapped_column_names_change_the_fingerprint(tmp_path: Path) -> None:
    """`predict` matches columns by name: the same values under swapped names are another table."""
    base = load_csv(tmp_path, ROWS)
    swapped = load_csv(tmp_path, "b,a,y\n1,2,x\n3,4,z\n5,6,x\n7,8,z\n")
    assert swapped.row_hashes.tolist() == base.row_hashes.tolist()  # the values are unchanged ...
    assert swapped.fingerprint != base.fingerprint  # ... the table is not
    renamed = load_csv(tmp_path, "a,c,y\n1,2,x\n3,4,z\n5,6,x\n7,8,z\n")
    assert renamed.fingerprint != base.fingerprint


def test_a_frame_and_its_files_give_one_fingerprint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=50), "b": rng.integers(0, 9, size=50), "y": rng.choice(["u", "v"], 50)})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    before = frame.copy()
    in_memory = dataset_from_frame(frame, DataSpec(path="unused.csv", target="y"), name="t")
    pd.testing.assert_frame_equal(frame, before)  # the caller's frame is left alone
    for name in ("t.csv", "t.parquet"):
        loaded = load_dataset(DataSpec(path=str(tmp_path / name), target="y"))
        assert loaded.fingerprint == in_memory.fingerprint, name
        np.testing.assert_array_equal(loaded.X, in_memory.X)


def test_a_hundred_thousand_columns_are_refused_quickly(tmp_path: Path) -> None:
    """The old duplicate-header check was quadratic: this file hung `validate` for minutes."""
    header = ",".join(f"c{i}" for i in range(100_000)) + ",y"
    path = csv(tmp_path, header + "\n" + "\n".join(",".join(["1"] * 100_001) for _ in range(5)) + "\n")
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"`.*data\.csv` has 100,001 columns; foldsweep reads at most 10,000$"):
        load_dataset(DataSpec(path=str(path), target="y"))
    assert time.perf_counter() - started < 2.0


def test_a_wide_table_within_the_limit_is_read_in_linear_time(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(MAX_COLUMNS - 1)]
    path = csv(tmp_path, ",".join([*names, "y"]) + "\n" + "\n".join(",".join(["1"] * (len(names)) + [lab])
                                                                     for lab in "abab") + "\n")
    started = time.perf_counter()
    data = load_dataset(DataSpec(path=str(path), target="y"))
    assert data.X.shape == (4, MAX_COLUMNS - 1)
    assert time.perf_counter() - started < 15.0  # ~3 s alone; the machine is shared
    header = ",".join([*names[:-1], "c5", "y"])
    duplicated = csv(tmp_path, header + "\n" + ",".join(["1"] * (MAX_COLUMNS - 1) + ["a"]) + "\n", name="dupes.csv")
    with pytest.raises(DataError, match=r"duplicate column names: c5$"):
        load_dataset(DataSpec(path=str(duplicated), target="y"))


def test_one_hot_encoding_that_would_explode_is_refused(tmp_path: Path) -> None:
    ids = "\n".join(f"{i},id{i},{'ab'[i % 2]}" for i in range(MAX_COLUMNS + 1))
    message = refused(tmp_path, "a,row_id,y\n" + ids + "\n", categorical="onehot")
    assert "would make 10,001 features (more than 10,000)" in message and "`row_id`" in message


@pytest.mark.parametrize(("name", "content", "words"), [
    ("text.parquet", b"a,b,y\n1,2,x\n", ("cannot be read as Parquet", "magic bytes")),
    ("random.csv", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
     ("cannot be read as CSV",)),
    ("latin1.csv", "a,y\n1,caf\u00e9\n2,the\n".encode("latin-1"), ("column `y`", "not UTF-8 text")),
    ("latin1_header.csv", "a,caf\u00e9,y\n1,2,x\n".encode("latin-1"), ("cannot be read as CSV", "not UTF-8")),
    ("ragged.csv", b"a,b,y\n1,2,x\n3,4,z,9\n", ("cannot be read as CSV", "Expected 3 columns, got 4")),
])
def test_unreadable_files_are_one_line(tmp_path: Path, name: str, content: bytes, words: tuple[str, ...]) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(path=str(tmp_path / name), target="y"))
    message = str(info.value)
    assert "\n" not in message and f"`{tmp_path / name}`" in message, message
    for word in words:
        assert word in message, message


def test_etc_passwd_as_data_is_one_line() -> None:
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(path="/etc/passwd", target="y"))
    assert "\n" not in str(info.value) and "/etc/passwd" in str(info.value)


def test_a_text_value_far_down_a_numeric_column_names_the_column(tmp_path: Path) -> None:
    """pyarrow infers types from the first block; a text value 200,000 rows down still makes the column text."""
    rows = "\n".join(f"{i},{i % 2}" for i in range(200_000))
    assert "feature column `a` is not numeric" in refused(tmp_path, "a,y\n" + rows + "\nseven,1\n")


def test_labels_are_encoded_by_hashing_in_the_text_order_of_the_classes(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "a,y\n1,10\n2,2\n3,1\n4,2\n", task="classification")
    assert data.classes == ["1", "10", "2"] and data.y.tolist() == [1, 2, 0, 2]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_header_is_read_without_the_rows(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"b": [1.0, 2.0], "a": ["x", "y"], "y": [0, 1]})
    path = tmp_path / f"t{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    assert read_header(path) == ["b", "a", "y"] == list(read_table(path).columns)
    (tmp_path / "bad.parquet").write_text("b,a,y\n1,x,0\n")
    with pytest.raises(DataError, match=r"bad.parquet` cannot be read: .*magic bytes"):
        read_header(tmp_path / "bad.parquet")


# --- Arrow path at scale --------------------------------------------------------------------------------


def test_parquet_row_groups_nulls_and_text_load_as_pandas_encodes_them(tmp_path: Path) -> None:
    """The matrix is filled batch by batch from several row groups; one-hot and labels match pandas'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    n = 200_000  # > BATCH_ROWS: several batches, and several row groups
    a = rng.normal(size=n).astype(np.float32)
    b = rng.integers(0, 9, size=n)
    flag = rng.integers(0, 2, size=n).astype(bool)
    color = rng.choice(["red", "blue", "green"], size=n).astype(object)
    color[::7] = None
    y = rng.choice(["u", "v", "w"], size=n)
    table = pa.table({"a": a, "b": pa.array(b, mask=(np.arange(n) % 11 == 0)), "flag": flag,
                      "color": color, "y": y})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=30_000)
    data = load_dataset(DataSpec(path=str(tmp_path / "t.parquet"), target="y", categorical="onehot",
                                 missing="impute"))
    frame = table.to_pandas()
    dummies = pd.get_dummies(frame[["color"]], columns=["color"], dtype=np.float32)
    assert data.feature_names == ["a", "b", "flag", *dummies.columns]
    expected = np.column_stack([frame["a"], frame["b"], frame["flag"], dummies]).astype(np.float32)
    np.testing.assert_array_equal(data.X, expected)  # NaN where b is empty, in the same places
    assert data.X.flags.c_contiguous and data.X.dtype == np.float32
    assert data.classes == ["u", "v", "w"] and np.array_equal(data.y, pd.factorize(frame["y"], sort=True)[0])
    in_memory = dataset_from_frame(frame, DataSpec(path="unused.csv", target="y", categorical="onehot",
                                                   missing="impute"), name="t")
    assert in_memory.fingerprint == data.fingerprint


def test_a_categorical_frame_column_keeps_its_categories_order() -> None:
    frame = pd.DataFrame({"size": pd.Categorical(["M", "S", "L", "M"], categories=["S", "M", "L"]),
                          "y": ["a", "b", "a", "b"]})
    data = dataset_from_frame(frame, DataSpec(path="unused.csv", target="y", categorical="onehot"), name="t")
    assert data.feature_names == list(pd.get_dummies(frame[["size"]]).columns) == ["size_S", "size_M", "size_L"]
    assert data.X.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]]


def test_a_nan_label_in_a_parquet_float_column_is_an_empty_row(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": [0.5, np.nan, 1.5]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"^target column `y` has 1 empty rows$"):
        load_dataset(DataSpec(path=str(tmp_path / "t.parquet"), target="y"))



@pytest.mark.parametrize("source", ["csv", "parquet", "bundled"])
def test_regression_labels_are_a_writable_array(tmp_path: Path, source: str) -> None:
    """A zero-copy view of Arrow's buffer is read-only: torch.from_numpy warned on it (found by the diabetes sweep)."""
    if source == "bundled":
        data = load_dataset(DataSpec(dataset="diabetes"))
    else:
        frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "y": [0.5, 1.5, 2.25, 3.0]})
        path = tmp_path / f"t.{source}"
        frame.to_csv(path, index=False) if source == "csv" else frame.to_parquet(path)
        data = load_dataset(DataSpec(path=str(path), target="y"))
    assert data.task == "regression" and data.y.dtype == np.float32 and data.y.flags.writeable
    assert data.X.flags.writeable


def test_a_categorical_label_reads_like_a_text_label(tmp_path: Path) -> None:
    """A pandas Categorical target (and one saved as a Parquet dictionary column) is its values, not its codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = ["yes", "no", "no", "yes", "no", "yes"]
    frame = pd.DataFrame({"a": np.arange(6, dtype=np.float32), "g": pd.Categorical(list("aabbcc")),
                          "y": pd.Categorical(values, categories=["yes", "no", "maybe"])})
    frame.to_parquet(tmp_path / "t.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "t.parquet").field("y").type)
    plain = dataset_from_frame(frame.astype({"y": str, "g": str}), DataSpec(path="unused.csv", target="y", group="g"),
                               name="t")
    read = load_dataset(DataSpec(path=str(tmp_path / "t.parquet"), target="y", group="g"))
    in_memory = dataset_from_frame(frame, DataSpec(path="unused.csv", target="y", group="g"), name="t")
    for data in (read, in_memory):
        assert data.classes == ["no", "yes"] and data.y.tolist() == plain.y.tolist()
        assert data.fingerprint == plain.fingerprint and list(data.groups) == list(plain.groups)
