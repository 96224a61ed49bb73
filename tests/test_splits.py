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
    hashes = data.pattern_hashes  # features only: a copy with another label is a copy too
    dev_hashes = hashes[plan.dev].tolist()
    leaks = len(set(dev_hashes)) < len(dev_hashes) or not set(dev_hashes).isdisjoint(hashes[plan.test].tolist())
    assert (len(plan.notes) > 0) == leaks  # copies inside the test set alone leak nothing
    assert all("(split.duplicates: warn; labels not compared): kept;" in note for note in plan.notes)

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
    with pytest.raises(SplitError, match=r"`split.outer.k`=6 is larger than the \d groups of `data.group` it must "
                                         r"split; lower k"):
        make_plan(data, split({"kind": "group", "k": 6}, {"kind": "group", "k": 2}))


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
    """60 rows whose dev part holds exact copies of 3 sealed test rows (a row-by-row seal depends on y only)."""
    y = labels([30, 30], 2)
    clean = dataset(y)
    dev, test = seal_test_set(clean, SplitSpec(duplicates="warn"))
    X = clean.X.copy()
    copies = []
    for t in test[:3]:
        d = next(int(r) for r in dev if y[r] == y[t] and r not in copies)
        X[d] = X[t]
        copies.append(d)
    data = dataset(y, X=X)
    assert np.array_equal(seal_test_set(data, SplitSpec(duplicates="warn"))[1], test)
    return data, test, np.array(copies)


def discrete(seed: int = 0, n: int = 1000) -> Dataset:
    """The audit's table: 4 features of 3 values each (81 patterns, ~12 rows each), a noisy binary label."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 3, size=(n, 4)).astype(np.float32)
    y = (X.sum(axis=1) + rng.normal(size=n) > 4).astype(np.int64)
    return Dataset(name="d", X=X, y=y, feature_names=["a", "b", "c", "d"], task="classification",
                   metric="accuracy", classes=["0", "1"], row_hashes=hash_rows(X, y))


def assert_patterns_apart(data: Dataset, plan: FoldPlan) -> None:
    """No feature pattern on both sides of the seal, nor of any outer or inner fold."""
    hashes = data.pattern_hashes
    assert set(hashes[plan.test].tolist()).isdisjoint(hashes[plan.dev].tolist())
    for fold in all_folds(plan):
        assert set(hashes[fold.train].tolist()).isdisjoint(hashes[fold.valid].tolist())


def test_duplicates_warn() -> None:
    data, test, copies = planted()
    plan = make_plan(data, SplitSpec(duplicates="warn"))
    assert np.array_equal(plan.test, test) and np.isin(copies, plan.dev).all()
    assert plan.notes == ["3 development rows have the features of a sealed test row and 0 development rows those of "
                          "another development row (split.duplicates: warn; labels not compared): kept; the folds and "
                          "the test look score rows whose features were trained on"]


def test_duplicates_drop() -> None:
    data, test, copies = planted()
    plan = make_plan(data, SplitSpec(duplicates="drop"))
    assert not np.isin(copies, plan.dev).any()
    assert len(plan.dev) == 60 - len(test) - 3
    assert "3 development rows have the features of a sealed test row" in plan.notes[0] and "dropped" in plan.notes[0]
    for fold in all_folds(plan):
        assert not np.isin(copies, fold.train).any() and not np.isin(copies, fold.valid).any()


def test_duplicates_are_kept_together_by_default() -> None:
    """Every row stays, and each copy sits on the side of the seal its twin sits on."""
    data, _, copies = planted()
    plan = make_plan(data, SplitSpec())
    assert len(plan.dev) + len(plan.test) == 60
    hashes = data.pattern_hashes
    for row in copies:
        twins = np.flatnonzero(hashes == hashes[row])
        assert len(twins) == 2 and (np.isin(twins, plan.test).all() or np.isin(twins, plan.dev).all())
    assert_patterns_apart(data, plan)
    assert sealed_rows_seen(data, plan.dev, plan.test)["test_rows_in_dev"] == 0
    assert plan.notes[-1] == ("3 groups of rows with identical features (6 rows; labels not compared) each stay on one "
                              "side of the seal and of every fold (split.duplicates: group)")


def test_sealed_labels_do_not_decide_which_rows_train_on_the_discrete_table() -> None:
    """Issue: the old default dropped 774 of 800 dev rows, those whose (features, label) matched a sealed row."""
    data = discrete()
    plan = make_plan(data, SplitSpec())
    assert len(plan.dev) + len(plan.test) == 1000
    assert abs(len(plan.test) - 200) <= 25
    assert abs(data.y[plan.dev].mean() - data.y[plan.test].mean()) < 0.08
    assert_patterns_apart(data, plan)
    assert_partitions(plan.outer, plan.dev)
    for outer, inner in zip(plan.outer, plan.inner, strict=True):
        assert_partitions(inner, outer.train)


@pytest.mark.parametrize("policy", ["drop", "warn", "group"])
def test_the_guard_is_blind_to_the_sealed_labels(policy: str) -> None:
    """Flipping every sealed label changes neither which rows the guard keeps nor its notes (the seal itself is
    stratified, so it reads labels as a stratified split does)."""
    data = discrete(seed=1)
    dev, test = seal_test_set(data, SplitSpec(duplicates=policy))
    y = data.y.copy()
    y[test] = 1 - y[test]
    flipped = Dataset(name="d", X=data.X, y=y, feature_names=data.feature_names, task="classification",
                      metric="accuracy", classes=["0", "1"], row_hashes=hash_rows(data.X, y))
    from foldsweep.splits import _guard_duplicates as guard

    kept, notes = guard(data, dev, test, policy)
    kept_flipped, notes_flipped = guard(flipped, dev, test, policy)
    assert np.array_equal(kept, kept_flipped) and notes == notes_flipped


def test_identical_features_with_another_label_are_duplicates() -> None:
    """The old guard hashed the label too: the same features with the other label went unseen."""
    y = labels([30, 30], 2)
    X = dataset(y).X.copy()
    dev, test = seal_test_set(dataset(y), SplitSpec(duplicates="warn"))
    d = next(int(r) for r in dev if y[r] != y[test[0]])
    X[d] = X[test[0]]
    plan = make_plan(dataset(y, X=X), SplitSpec(duplicates="warn"))
    assert plan.notes and plan.notes[0].startswith("1 development rows have the features of a sealed test row")
    grouped_plan = make_plan(dataset(y, X=X), SplitSpec())
    assert np.isin([d, test[0]], grouped_plan.test).all() or np.isin([d, test[0]], grouped_plan.dev).all()


def test_duplicates_merge_into_the_users_groups() -> None:
    """Identical rows in two groups join the groups: neither the groups nor the patterns straddle a split."""
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(30), 4)
    y = rng.integers(0, 2, size=120).astype(np.int64)
    X = rng.normal(size=(120, 3)).astype(np.float32)
    for a, b in [(0, 5), (9, 50), (51, 101), (60, 61)]:  # 0-5 and 9-50-51-101 chain groups together
        X[b] = X[a]
    data = dataset(y, X=X, groups=groups)
    plan = make_plan(data, split({"k": 3}, {"k": 3}, seed=2))
    assert_patterns_apart(data, plan)
    assert set(groups[plan.test]).isdisjoint(groups[plan.dev])
    for fold in all_folds(plan):
        assert set(groups[fold.train]).isdisjoint(groups[fold.valid])
    chained = {int(groups[r]) for r in (9, 50, 51, 101)}
    assert len(chained) == 3 and (chained <= set(groups[plan.test]) or chained <= set(groups[plan.dev]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), values=st.integers(2, 4), k_outer=st.integers(2, 4), k_inner=st.integers(2, 3),
       repeats=st.integers(1, 2), shuffle=st.booleans())
def test_grouped_duplicates_keep_every_invariant(seed: int, values: int, k_outer: int, k_inner: int, repeats: int,
                                                 shuffle: bool) -> None:
    rng = np.random.default_rng(seed)
    X = rng.integers(0, values, size=(150, 3)).astype(np.float32)
    y = (X.sum(axis=1) + rng.normal(size=150) > X.shape[1] * (values - 1) / 2).astype(np.int64)
    if y.min() == y.max():
        y[:20] = 1 - y[:20]
    data = dataset(y, X=X)
    spec = split({"k": k_outer, "repeats": repeats, "shuffle": shuffle}, {"k": k_inner}, seed=seed)
    try:
        plan = make_plan(data, spec)
    except SplitError as err:  # too few patterns for k, or a fold of one class: said in one line
        assert "\n" not in str(err)
        return
    assert len(plan.dev) + len(plan.test) == 150
    assert_patterns_apart(data, plan)
    for r in range(repeats):
        assert_partitions(plan.outer[r * k_outer:(r + 1) * k_outer], plan.dev)
    for outer, inner in zip(plan.outer, plan.inner, strict=True):
        assert_partitions(inner, outer.train)
    assert_partitions(plan.final_inner, plan.dev)
    assert np.array_equal(make_plan(data, spec).to_masks(150), plan.to_masks(150))


def test_sealed_rows_seen_counts_test_rows_the_model_trained_on() -> None:
    data, test, _ = planted()
    plan = make_plan(data, SplitSpec(duplicates="warn"))
    seen = sealed_rows_seen(data, plan.dev, plan.test)
    assert seen == {"test_rows_in_dev": 3, "test_rows": len(test), "share": 3 / len(test), "duplicate_groups": 3,
                    "duplicate_rows": 6}
    assert seen_note(seen) == (f"3 of {len(test)} sealed test rows have the features of development rows the model "
                               f"trained on: the test look is optimistic, by up to {3 / len(test):.1%} of its rows "
                               "(split.duplicates: group keeps identical rows on one side); 3 groups of rows with "
                               "identical features (6 rows)")
    grouped_plan = make_plan(data, SplitSpec())
    assert seen_note(sealed_rows_seen(data, grouped_plan.dev, grouped_plan.test)) == (
        "3 groups of rows with identical features (6 rows): none straddles the seal")
    assert seen_note(sealed_rows_seen(dataset(labels([30, 30], 2)), plan.dev, plan.test)) == ""


def test_duplicates_error() -> None:
    data, _, _ = planted()
    with pytest.raises(SplitError, match=r"^3 development rows have the features of a sealed test row.*"
                                         r"set split.duplicates: group to keep identical rows"):
        make_plan(data, SplitSpec(duplicates="error"))


def test_duplicates_within_dev() -> None:
    y = labels([30, 30], 4)
    X = dataset(y).X.copy()
    dev, _ = seal_test_set(dataset(y), SplitSpec())
    same = [int(r) for r in dev if y[r] == 0][:3]
    X[same[1]] = X[same[0]]
    X[same[2]] = X[same[0]]
    plan = make_plan(dataset(y, X=X), SplitSpec(duplicates="drop"))
    assert "0 development rows have the features of a sealed test row and 2 development rows those of" in plan.notes[0]
    assert same[0] in plan.dev and same[1] not in plan.dev and same[2] not in plan.dev


def test_validate_accounts_for_every_row_of_the_discrete_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """`foldsweep validate --json` with default settings: every row on one side, the groups counted."""
    import json

    import yaml
    from click.testing import CliRunner

    from foldsweep.cli import cli

    data = discrete()
    columns = {name: data.X[:, i].astype(int) for i, name in enumerate(data.feature_names)} | {"y": data.y}
    write_csv(tmp_path, columns)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"name": "d", "data": {"path": "data.csv", "target": "y"},
                                                     "search": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["validate", "d.yaml", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["dev_rows"] + info["test_rows"] == info["rows"] == 1000
    assert info["duplicate_groups"] == 81 and info["duplicate_rows"] == 1000
    assert any("81 groups of rows with identical features" in note for note in info["notes"])
    loaded = load_dataset(DataSpec(path=str(tmp_path / "data.csv"), target="y"))
    plan = make_plan(loaded, SplitSpec())
    assert len(plan.dev) == info["dev_rows"]
    assert_patterns_apart(loaded, plan)


# --- time ties, the group seal's share, folds of one class -------------------------------------------


def tied(n_days: int = 20, per_day: int = 5, task: str = "regression") -> Dataset:
    """Rows in blocks sharing a timestamp (several readings a day), not in time order."""
    rng = np.random.default_rng(8)
    times = rng.permutation(np.repeat(np.arange(n_days) * 10, per_day))
    y = rng.normal(size=len(times)).astype(np.float32) if task == "regression" else \
        (rng.random(len(times)) < 0.5).astype(np.int64)
    return dataset(y, task=task, times=times)


def test_rows_sharing_a_time_never_straddle_the_seal_or_a_fold() -> None:
    """Issue: 0.2 x 161 rows put the cut at row 129, inside a day of 7 readings; the folds' cuts likewise."""
    data = tied(n_days=23, per_day=7)
    times = data.times
    assert times is not None
    plan = make_plan(data, split({"k": 3}, {"k": 2}, test_size=0.2))
    assert times[plan.dev].max() < times[plan.test].min()
    assert np.array_equal(np.union1d(plan.dev, plan.test), np.arange(161))
    assert plan.notes and "rows with equal times stay on one side" in plan.notes[0]
    for fold in all_folds(plan):
        assert times[fold.train].max() < times[fold.valid].min()


def test_too_few_distinct_times_for_k_is_refused() -> None:
    data = tied(n_days=4, per_day=10)
    with pytest.raises(SplitError, match=r"^`split.outer.k`=3 is larger than the 3 distinct times"):
        make_plan(data, split({"k": 3}, {"k": 2}, test_size=0.2))


def unequal_groups(seed: int = 0) -> Dataset:
    """30 groups of 1 to 39 rows, labels drawn per row with a per-group lean."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, size=30)
    groups = np.repeat(np.arange(30), sizes)
    lean = rng.random(30)[groups]
    y = (rng.random(len(groups)) < lean).astype(np.int64)
    return dataset(y, groups=groups)


def test_the_group_seal_aims_at_the_row_share_and_stratifies() -> None:
    """Issue: GroupShuffleSplit took test_size of the groups: over seeds 0-5 it sealed 21.9% to 31.4% of these rows."""
    data = unequal_groups()
    for seed in range(6):
        dev, test = seal_test_set(data, split(seed=seed))
        share = len(test) / len(data.y)
        assert abs(share - 0.2) < 0.03
        assert abs(data.y[test].mean() - data.y[dev].mean()) < 0.15
        note = make_plan(data, split({"k": 3}, {"k": 2}, seed=seed)).notes[0]
        assert note == (f"the seal keeps whole groups of `data.group` together: {len(test)} of {len(data.y)} rows "
                        f"sealed ({share:.1%}; split.test_size 0.2)")


def test_a_training_part_of_one_class_is_refused() -> None:
    """Forward folds over labels that start all-negative train the first fold on one class."""
    times = np.arange(100)
    y = (times >= 40).astype(np.int64)
    data = dataset(y, times=times)
    with pytest.raises(SplitError, match=r"^outer fold 0: all 20 training rows are of class 'c0', so a model trained "
                                         r"there learns one class; lower `split.outer.k` or change split.seed$"):
        make_plan(data, split({"k": 3}, {"k": 2}, test_size=0.2))


def test_a_validation_part_of_one_class_is_refused_for_roc_auc() -> None:
    """Issue: roc_auc of a fold with one class read 0.5 silently; accuracy can still score such a fold."""
    groups = np.repeat(np.arange(12), 10)
    y = np.where(groups < 6, np.random.default_rng(0).integers(0, 2, 120), 0).astype(np.int64)  # 6 groups all c0
    base = dataset(y, groups=groups)
    spec = split({"kind": "group", "k": 5}, {"kind": "group", "k": 2}, seed=3)
    with pytest.raises(SplitError, match=r"^outer fold 4: all 10 validation rows are of class 'c0', so roc_auc is "
                                         r"undefined there \(it would read 0.5\); lower `split.outer.k` or change "
                                         r"split.seed \(or use kind stratified_group\)$"):
        make_plan(Dataset(**{**base.__dict__, "metric": "roc_auc"}), spec)
    make_plan(base, spec)


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
                   row_hashes=hashes, feature_hashes=hashes)
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
                     [f"{sum(crossing)} development rows have the features of a sealed test row and {sum(repeated)} "
                      "development rows those of another development row (split.duplicates: drop; labels not "
                      "compared): dropped"])
    assert sealed_rows_seen(data, dev, test)["test_rows_in_dev"] == sum(int(hashes[t]) in seen for t in test)


def test_with_a_time_column_repeated_features_are_reported_not_grouped() -> None:
    """Time decides the split (a pattern may recur later): the guard counts development rows repeating sealed ones."""
    times = np.arange(120)
    y = labels([60, 60], 6)
    X = dataset(y).X.copy()
    X[10] = X[115]  # a development row with the features of a sealed (late) row
    plan = make_plan(dataset(y, X=X, times=times), split({"k": 2}, {"k": 2}, test_size=0.2))
    assert np.array_equal(plan.test, np.arange(96, 120))
    assert plan.notes == ["1 development rows have the features of a sealed test row and 0 development rows those of "
                          "another development row (split.duplicates: group; labels not compared): `data.time` orders "
                          "the split; the folds and the test look score rows whose features were trained on"]
