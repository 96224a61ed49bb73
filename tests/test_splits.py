"""Fold plans: the sealed test set reaches no fold, every dev row is validated once, groups and time are respected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foldsweep.data import Dataset, hash_rows, load_dataset
from foldsweep.errors import FoldsweepError, SplitError
from foldsweep.spec import DataSpec, FoldSpec, SplitSpec
from foldsweep.splits import Fold, FoldPlan, make_plan, seal_test_set, sealed_rows_seen, seen_note


def dataset(y: np.ndarray, seed: int = 0, task: str = "classification", groups: np.ndarray | None = None,
            times: np.ndarray | None = None, X: np.ndarray | None = None) -> Dataset:
    """A small in-memory data set with distinct random rows unless `X` is given."""
    rng = np.random.default_rng(seed)
    if X is None:
        X = rng.normal(size=(len(y), 3)).astype(np.float32)
    classes = [f"c{i}" for i in range(int(y.max()) + 1)] if task == "classification" else None
    return Dataset(name="t", X=X, y=y, feature_names=["a", "b", "c"], task=task,
                   metric="accuracy" if task == "classification" else "rmse", classes=classes, groups=groups,
                   times=times, row_hashes=hash_rows(X, y))


def labels(counts: list[int], seed: int) -> np.ndarray:
    y = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(y).astype(np.int64)


def split(outer: dict | None = None, inner: dict | None = None, **kw: object) -> SplitSpec:
    return SplitSpec(outer=FoldSpec(**(outer or {})), inner=FoldSpec(**(inner or {})), **kw)  # type: ignore[arg-type]


def all_folds(plan: FoldPlan) -> list[Fold]:
    return [*plan.outer, *[f for fs in plan.inner for f in fs], *plan.final_inner]


def assert_partitions(folds: list[Fold], rows: np.ndarray) -> None:
    """Valid folds cover `rows` exactly once; each fold's train is the rest of `rows`."""
    valid = np.concatenate([f.valid for f in folds])
    assert np.array_equal(np.sort(valid), np.sort(rows))
    for fold in folds:
        assert np.intersect1d(fold.train, fold.valid).size == 0
        assert np.array_equal(np.union1d(fold.train, fold.valid), np.sort(rows))


def write_csv(tmp_path: Path, columns: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "data.csv"
    names = list(columns)
    lines = [",".join(names)] + [",".join(str(columns[n][i]) for n in names) for i in range(len(columns[names[0]]))]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the nested-CV invariants -----------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=st.lists(st.integers(15, 50), min_size=2, max_size=4),
    regression=st.booleans(),
    k_outer=st.integers(2, 5),
    k_inner=st.integers(2, 4),
    repeats=st.integers(1, 2),
    test_size=st.sampled_from([0.1, 0.2, 0.3]),
    seed=st.integers(0, 10_000),
    dupes=st.integers(0, 3),
)
def test_plan_invariants(counts: list[int], regression: bool, k_outer: int, k_inner: int, repeats: int,
                         test_size: float, seed: int, dupes: int) -> None:
    y = labels(counts, seed)
    rng = np.random.default_rng(seed + 1)
    X = rng.normal(size=(len(y), 3)).astype(np.float32)
    for _ in range(dupes):  # copy a row's features onto another row of the same class
        i, j = rng.choice(len(y), size=2, replace=False)
        if y[i] == y[j]:
            X[j] = X[i]
    if regression:
        data = dataset(rng.normal(size=len(y)).astype(np.float32), task="regression", X=X)
    else:
        data = dataset(y, X=X)
    spec = split({"k": k_outer, "repeats": repeats}, {"k": k_inner}, test_size=test_size, seed=seed,
                 duplicates="warn")
    plan = make_plan(data, spec)
    rows = np.arange(len(y))

    # the seal: dev and test split all rows (duplicates are only warned about)
    assert np.intersect1d(plan.dev, plan.test).size == 0
    assert np.array_equal(np.union1d(plan.dev, plan.test), rows)
    hashes = np.asarray(data.row_hashes)
    dev_hashes = hashes[plan.dev].tolist()
    leaks = len(set(dev_hashes)) < len(dev_hashes) or not set(dev_hashes).isdisjoint(hashes[plan.test].tolist())
    assert (len(plan.notes) > 0) == leaks  # copies inside the test set alone leak nothing
    assert all("kept (warn)" in note for note in plan.notes)

    # no sealed row reaches any fold
    test = set(plan.test.tolist())
    for fold in all_folds(plan):
        assert test.isdisjoint(fold.train.tolist()) and test.isdisjoint(fold.valid.tolist())

    # outer valid folds partition dev, once per repeat; inner folds partition their outer-train
    assert len(plan.outer) == k_outer * repeats and len(plan.inner) == len(plan.outer)
    for r in range(repeats):
        assert_partitions(plan.outer[r * k_outer:(r + 1) * k_outer], plan.dev)
    for outer, inner in zip(plan.outer, plan.inner, strict=True):
        assert len(inner) == k_inner
        assert_partitions(inner, outer.train)
    assert_partitions(plan.final_inner, plan.dev)

    # stratification: each class's count per outer valid fold is within one row of its share
    if not regression:
        for c in range(len(counts)):
            share = np.sum(data.y[plan.dev] == c) / k_outer
            for fold in plan.outer:
                assert abs(np.sum(data.y[fold.valid] == c) - share) < 1
        for c in range(len(counts)):  # the sealed test set is stratified too
            assert abs(np.sum(data.y[plan.test] == c) - counts[c] * len(plan.test) / len(y)) <= 1

    # seeded: the same inputs give the same plan
    again = make_plan(data, spec)
    assert np.array_equal(again.to_masks(len(y)), plan.to_masks(len(y))) and again.layout == plan.layout


def test_sonar_default_plan() -> None:
    data = load_dataset(DataSpec(dataset="sonar"))
    plan = make_plan(data, SplitSpec())
    assert len(plan.dev) == 166 and len(plan.test) == 42 and plan.notes == []
    assert len(plan.outer) == 5 and all(len(fs) == 5 for fs in plan.inner) and len(plan.final_inner) == 5
    assert_partitions(plan.outer, plan.dev)


def test_seed_changes_the_seal() -> None:
    data = dataset(labels([30, 30], 0))
    first, _ = seal_test_set(data, SplitSpec(seed=0))
    again, _ = seal_test_set(data, SplitSpec(seed=0))
    other, _ = seal_test_set(data, SplitSpec(seed=1))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_unshuffled_kfold_is_contiguous() -> None:
    data = dataset(np.arange(50, dtype=np.float32), task="regression")
    plan = make_plan(data, split({"kind": "kfold", "k": 2, "shuffle": False}))
    assert len(plan.dev) == 40
    assert np.array_equal(plan.outer[0].valid, plan.dev[:20]) and np.array_equal(plan.outer[1].valid, plan.dev[20:])


# --- groups -----------------------------------------------------------------------------------------


def grouped(tmp_path: Path, n_groups: int = 15, per_group: int = 4) -> Dataset:
    rng = np.random.default_rng(3)
    g = np.repeat([f"g{i:02d}" for i in range(n_groups)], per_group)
    y = np.where(rng.random(len(g)) < 0.5, "yes", "no")
    path = write_csv(tmp_path, {"f1": rng.normal(size=len(g)).round(4), "f2": rng.normal(size=len(g)).round(4),
                                "site": g, "y": y})
    return load_dataset(DataSpec(path=str(path), target="y", group="site"))


def assert_groups_apart(data: Dataset, plan: FoldPlan) -> None:
    groups = data.groups
    assert groups is not None
    assert set(groups[plan.test]).isdisjoint(groups[plan.dev])
    for fold in all_folds(plan):
        assert set(groups[fold.train]).isdisjoint(groups[fold.valid])
    assert_partitions(plan.outer, plan.dev)
    for outer, inner in zip(plan.outer, plan.inner, strict=True):
        assert_partitions(inner, outer.train)


@pytest.mark.parametrize("kind", ["group", "stratified_group", "auto"])
def test_groups_never_on_both_sides(tmp_path: Path, kind: str) -> None:
    data = grouped(tmp_path)
    plan = make_plan(data, split({"kind": kind, "k": 3}, {"kind": kind, "k": 3}, seed=7))
    assert_groups_apart(data, plan)


@pytest.mark.parametrize("where", ["outer", "inner"])
@pytest.mark.parametrize("kind", ["kfold", "stratified"])
def test_a_kind_that_ignores_the_groups_is_refused(tmp_path: Path, kind: str, where: str) -> None:
    data = grouped(tmp_path)
    folds = {"outer": {"kind": "group", "k": 3}, "inner": {"kind": "group", "k": 3}} | {where: {"kind": kind, "k": 3}}
    with pytest.raises(SplitError, match=rf"^`split.{where}.kind` {kind} ignores `data.group`: a group would sit on "
                                         r"both sides of a fold; use group, stratified_group or auto$"):
        make_plan(data, split(folds["outer"], folds["inner"]))


@pytest.mark.parametrize("seed", range(5))
def test_the_seal_keeps_groups_whole_whatever_the_fold_kinds(tmp_path: Path, seed: int) -> None:
    data = grouped(tmp_path)
    assert data.groups is not None
    dev, test = seal_test_set(data, split({"kind": "kfold", "k": 3}, {"kind": "kfold", "k": 3}, seed=seed))
    assert set(data.groups[test]).isdisjoint(data.groups[dev])


def test_group_k_larger_than_groups(tmp_path: Path) -> None:
    data = grouped(tmp_path, n_groups=6)
    with pytest.raises(SplitError, match=r"`split.outer.k`=5 is larger than the \d groups it must split; lower k"):
        make_plan(data, split({"kind": "group", "k": 5}, {"kind": "group", "k": 2}))


def test_group_kind_needs_a_group_column() -> None:
    with pytest.raises(SplitError, match=r"needs `data.group`"):
        make_plan(dataset(labels([20, 20], 0)), split({"kind": "kfold"}, {"kind": "group", "k": 2}))


# --- time -------------------------------------------------------------------------------------------


def timed(tmp_path: Path, n: int = 60) -> Dataset:
    rng = np.random.default_rng(5)
    day = rng.permutation(n) * 10 + 1000  # unique times, rows not in time order
    path = write_csv(tmp_path, {"day": day, "f1": rng.normal(size=n).round(4), "y": rng.normal(size=n).round(4)})
    return load_dataset(DataSpec(path=str(path), target="y", time="day"))


@pytest.mark.parametrize("kind", ["time_series", "auto"])
def test_time_series_looks_only_forward(tmp_path: Path, kind: str) -> None:
    data = timed(tmp_path)
    times = data.times
    assert times is not None and data.task == "regression"
    plan = make_plan(data, split({"kind": kind, "k": 3}, {"kind": kind, "k": 3}, test_size=0.2))
    assert len(plan.test) == 12
    assert np.array_equal(np.sort(times[plan.test]), np.sort(times)[-12:])  # the latest rows are sealed
    assert times[plan.dev].max() < times[plan.test].min()
    assert np.array_equal(np.union1d(plan.dev, plan.test), np.arange(60))
    for fold in all_folds(plan):
        assert times[fold.train].max() < times[fold.valid].min()
    for outer, inner in zip(plan.outer, plan.inner, strict=True):
        assert set(np.concatenate([f.train for f in inner] + [f.valid for f in inner])) <= set(outer.train)
    valid = np.concatenate([f.valid for f in plan.outer])
    assert len(valid) == len(set(valid.tolist()))  # each dev row validated at most once


@pytest.mark.parametrize("kind", ["kfold", "group"])
def test_the_seal_holds_the_latest_rows_whatever_the_fold_kinds(tmp_path: Path, kind: str) -> None:
    data = timed(tmp_path)
    assert data.times is not None
    dev, test = seal_test_set(data, split({"kind": kind, "k": 3}, {"kind": "time_series", "k": 3}))
    assert data.times[dev].max() < data.times[test].min()


@pytest.mark.parametrize("kind", ["kfold", "group", "stratified_group"])
def test_a_kind_that_ignores_time_is_refused(tmp_path: Path, kind: str) -> None:
    data = timed(tmp_path)
    with pytest.raises(SplitError, match=rf"^`split.inner.kind` {kind} ignores `data.time`: later rows would train "
                                         r"models scored on earlier ones; use time_series or auto$"):
        make_plan(data, split({"kind": "time_series", "k": 3}, {"kind": kind, "k": 3}))


def test_group_and_time_together_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = write_csv(tmp_path, {"day": np.arange(40), "site": np.repeat(np.arange(8), 5),
                                "f1": rng.normal(size=40).round(4), "y": rng.normal(size=40).round(4)})
    data = load_dataset(DataSpec(path=str(path), target="y", group="site", time="day"))
    with pytest.raises(SplitError, match=r"^`data.group` and `data.time` are both set"):
        make_plan(data, split())


def test_time_series_needs_a_time_column() -> None:
    data = dataset(np.arange(40, dtype=np.float32), task="regression")
    with pytest.raises(SplitError, match=r"`split.outer.kind` time_series needs `data.time`"):
        make_plan(data, split({"kind": "time_series", "k": 3}))


# --- settings that cannot work ----------------------------------------------------------------------


def test_repeats_multiply_the_folds() -> None:
    data = dataset(labels([30, 30], 1))
    plan = make_plan(data, split({"k": 3, "repeats": 2}, {"k": 2, "repeats": 3}))
    assert len(plan.outer) == 6 and len(plan.inner) == 6
    assert all(len(fs) == 6 for fs in plan.inner) and len(plan.final_inner) == 6
    assert_partitions(plan.outer[:3], plan.dev)
    assert_partitions(plan.outer[3:], plan.dev)
    assert [f.valid.tolist() for f in plan.outer[:3]] != [f.valid.tolist() for f in plan.outer[3:]]


def test_repeats_need_kfold_or_stratified(tmp_path: Path) -> None:
    data = grouped(tmp_path)
    with pytest.raises(SplitError, match=r"`repeats` works with kind kfold or stratified, not group"):
        make_plan(data, split({"kind": "group", "k": 3, "repeats": 2}))


def test_k_larger_than_smallest_class() -> None:
    y = np.array([0] * 40 + [1] * 4, dtype=np.int64)
    with pytest.raises(SplitError) as info:
        make_plan(dataset(y), split({"k": 5}, {"k": 2}))
    message = str(info.value)
    assert "`split.outer.k`=5 is larger than the smallest class" in message
    assert "'c1'" in message and "lower k or use kind: kfold" in message and "\n" not in message
    assert isinstance(info.value, FoldsweepError)


def test_inner_k_larger_than_smallest_class() -> None:
    y = np.array([0] * 40 + [1] * 8, dtype=np.int64)
    with pytest.raises(SplitError, match=r"`split.inner.k`=5 is larger than the smallest class"):
        make_plan(dataset(y), split({"k": 2}, {"k": 5}))


def test_k_larger_than_rows() -> None:
    data = dataset(np.arange(10, dtype=np.float32), task="regression")
    with pytest.raises(SplitError, match=r"`split.outer.k`=9 is larger than the 8 rows it must split"):
        make_plan(data, split({"k": 9}))


def test_stratified_needs_classification() -> None:
    data = dataset(np.arange(40, dtype=np.float32), task="regression")
    with pytest.raises(SplitError, match=r"`split.outer.kind` stratified needs a classification target"):
        make_plan(data, split({"kind": "stratified"}))


# --- duplicates across the seal ---------------------------------------------------------------------


def planted() -> tuple[Dataset, np.ndarray, np.ndarray]:
    """60 rows whose dev part holds exact copies of 3 sealed test rows (the seal itself depends on y only)."""
    y = labels([30, 30], 2)
    clean = dataset(y)
    dev, test = seal_test_set(clean, SplitSpec())
    X = clean.X.copy()
    copies = []
    for t in test[:3]:
        d = next(int(r) for r in dev if y[r] == y[t] and r not in copies)
        X[d] = X[t]
        copies.append(d)
    data = dataset(y, X=X)
    assert np.array_equal(seal_test_set(data, SplitSpec())[1], test)
    return data, test, np.array(copies)


def test_duplicates_warn() -> None:
    data, test, copies = planted()
    plan = make_plan(data, SplitSpec(duplicates="warn"))
    assert np.array_equal(plan.test, test) and np.isin(copies, plan.dev).all()
    assert plan.notes == ["3 development rows duplicate a sealed test row and 0 development rows duplicate "
                          "another development row (split.duplicates): kept (warn); the test look scores rows the "
                          "model trained on"]


def test_duplicates_drop() -> None:
    data, test, copies = planted()
    plan = make_plan(data, SplitSpec(duplicates="drop"))
    assert not np.isin(copies, plan.dev).any()
    assert len(plan.dev) == 60 - len(test) - 3
    assert "3 development rows duplicate a sealed test row" in plan.notes[0] and "dropped" in plan.notes[0]
    for fold in all_folds(plan):
        assert not np.isin(copies, fold.train).any() and not np.isin(copies, fold.valid).any()


def test_duplicates_are_dropped_by_default() -> None:
    """A user who reads no warning must not get a test look inflated by rows the model trained on."""
    data, test, copies = planted()
    plan = make_plan(data, SplitSpec())
    assert not np.isin(copies, plan.dev).any() and "dropped" in plan.notes[0]
    assert sealed_rows_seen(data, plan.dev, plan.test)["test_rows_in_dev"] == 0


def test_sealed_rows_seen_counts_test_rows_the_model_trained_on() -> None:
    data, test, _ = planted()
    plan = make_plan(data, SplitSpec(duplicates="warn"))
    seen = sealed_rows_seen(data, plan.dev, plan.test)
    assert seen == {"test_rows_in_dev": 3, "test_rows": len(test), "share": 3 / len(test)}
    assert seen_note(seen) == (f"3 of {len(test)} sealed test rows are exact copies of development rows the model "
                               f"trained on: the test look is optimistic, by up to {3 / len(test):.1%} of its rows "
                               "(split.duplicates: drop removes them)")
    assert seen_note(sealed_rows_seen(data, make_plan(data, SplitSpec(duplicates="drop")).dev, test)) == ""


def test_duplicates_error() -> None:
    data, _, _ = planted()
    with pytest.raises(SplitError, match=r"^3 development rows duplicate a sealed test row.*split.duplicates: drop"):
        make_plan(data, SplitSpec(duplicates="error"))


def test_duplicates_within_dev() -> None:
    y = labels([30, 30], 4)
    X = dataset(y).X.copy()
    dev, _ = seal_test_set(dataset(y), SplitSpec())
    same = [int(r) for r in dev if y[r] == 0][:3]
    X[same[1]] = X[same[0]]
    X[same[2]] = X[same[0]]
    plan = make_plan(dataset(y, X=X), SplitSpec(duplicates="drop"))
    assert "0 development rows duplicate a sealed test row and 2 development rows duplicate" in plan.notes[0]
    assert same[0] in plan.dev and same[1] not in plan.dev and same[2] not in plan.dev


# --- storage ----------------------------------------------------------------------------------------


def test_plan_mask_round_trip() -> None:
    data, _, _ = planted()
    plan = make_plan(data, split({"k": 3}, {"k": 2}))
    n = len(data.y)
    back = FoldPlan.from_masks(plan.to_masks(n), n, plan.layout, plan.notes)
    assert back.layout == plan.layout == [3, 2, 2, 2, 2] and back.notes == plan.notes
    assert np.array_equal(back.to_masks(n), plan.to_masks(n))
    assert np.array_equal(back.dev, plan.dev) and back.dev.dtype == np.int64
    assert np.array_equal(back.test, plan.test)
    for a, b in zip(all_folds(back), all_folds(plan), strict=True):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.valid, b.valid)
        assert a.train.dtype == np.int64 and a.valid.dtype == np.int64


def test_a_group_column_with_one_group_is_refused_in_one_line() -> None:
    """Found by the fuzz test: one group reached GroupShuffleSplit and escaped as a ValueError traceback."""
    data = dataset(labels([20, 20], 0), groups=np.zeros(40, dtype=np.int64))
    with pytest.raises(SplitError, match=r"`data.group` has 1 group"):
        seal_test_set(data, split(test_size=0.25))


def test_a_test_size_that_seals_every_time_row_is_refused() -> None:
    data = dataset(labels([2, 1], 0), times=np.arange(3))
    with pytest.raises(SplitError, match=r"seals all 3 rows"):
        seal_test_set(data, split(test_size=0.9))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=4, max_size=60), st.integers(0, 2 ** 16))
def test_the_duplicate_guard_matches_a_plain_set_reading(values: list[int], seed: int) -> None:
    """The guard works on the rows whose hash repeats only; a row-by-row reading of the rule must agree."""
    from foldsweep.splits import _guard_duplicates

    hashes = np.asarray(values, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    data = Dataset(name="h", X=np.zeros((len(values), 1), np.float32), y=np.zeros(len(values), np.int64),
                   feature_names=["a"], task="classification", metric="accuracy", classes=["a", "b"],
                   row_hashes=hashes)
    rows = np.random.default_rng(seed).permutation(len(values))
    test, dev = np.sort(rows[: len(values) // 4]), np.sort(rows[len(values) // 4:])
    in_test = {int(hashes[t]) for t in test}
    seen: set[int] = set()
    crossing, repeated = [], []
    for r in dev:
        crossing.append(int(hashes[r]) in in_test)
        repeated.append(int(hashes[r]) in seen)
        seen.add(int(hashes[r]))
    kept, notes = _guard_duplicates(data, dev, test, "drop")
    expected = dev[~(np.array(crossing) | np.array(repeated))]
    assert np.array_equal(kept, expected)
    assert notes == ([] if len(expected) == len(dev) else
                     [f"{sum(crossing)} development rows duplicate a sealed test row and {sum(repeated)} development "
                      "rows duplicate another development row (split.duplicates): dropped"])
    assert sealed_rows_seen(data, dev, test)["test_rows_in_dev"] == sum(int(hashes[t]) in seen for t in test)
