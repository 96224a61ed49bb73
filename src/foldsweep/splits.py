"""Seal the test set, then plan the outer and inner folds of the development rows.

Every index here is a row index of the loaded data set, so "no test row reaches a fold" is a plain set
check. Plans are built once from seeds and stored with the sweep; a resumed sweep reloads them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn import model_selection as ms

from foldsweep.data import Dataset
from foldsweep.errors import SplitError
from foldsweep.spec import CategoricalParam, FoldSpec, SplitSpec, SweepSpec


@dataclass(frozen=True)
class Fold:
    train: np.ndarray
    valid: np.ndarray


@dataclass(frozen=True)
class FoldPlan:
    """Sealed test rows, outer folds of dev, inner folds of each outer-train and of all of dev."""

    dev: np.ndarray
    test: np.ndarray
    outer: list[Fold]
    inner: list[list[Fold]]
    final_inner: list[Fold]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def folds(fs: list[Fold]) -> list[dict[str, list[int]]]:
            return [{"train": f.train.tolist(), "valid": f.valid.tolist()} for f in fs]

        return {"dev": self.dev.tolist(), "test": self.test.tolist(), "outer": folds(self.outer),
                "inner": [folds(fs) for fs in self.inner], "final_inner": folds(self.final_inner),
                "notes": self.notes}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FoldPlan:
        def folds(fs: list[dict[str, list[int]]]) -> list[Fold]:
            return [Fold(np.asarray(f["train"], dtype=np.int64), np.asarray(f["valid"], dtype=np.int64)) for f in fs]

        return cls(dev=np.asarray(raw["dev"], dtype=np.int64), test=np.asarray(raw["test"], dtype=np.int64),
                   outer=folds(raw["outer"]), inner=[folds(fs) for fs in raw["inner"]],
                   final_inner=folds(raw["final_inner"]), notes=list(raw.get("notes", [])))


def make_plan(data: Dataset, split: SplitSpec) -> FoldPlan:
    """Seal first, then guard against duplicates, then fold what is left."""
    check_fold_kinds(data, split)
    dev, test = seal_test_set(data, split)
    dev, notes = _guard_duplicates(data, dev, test, split.duplicates)
    outer = plan_folds(data, dev, split.outer, split.seed, "split.outer")
    inner = [plan_folds(data, fold.train, split.inner, split.seed + 1 + i, "split.inner")
             for i, fold in enumerate(outer)]
    final_inner = plan_folds(data, dev, split.inner, split.seed + 1000, "split.inner")
    return FoldPlan(dev=dev, test=test, outer=outer, inner=inner, final_inner=final_inner, notes=notes)


def seal_test_set(data: Dataset, split: SplitSpec) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the test rows: the latest rows when `data.time` is set, whole groups when `data.group` is.

    The data's own columns decide, never the fold kinds: a sealed group or a future row on the
    development side would let the one test look score rows the model had, in effect, seen.
    """
    rows = np.arange(len(data.y))
    if data.times is not None:
        order = rows[np.argsort(data.times, kind="stable")]
        n_test = max(1, int(round(split.test_size * len(rows))))
        if n_test >= len(rows):
            raise SplitError(f"split.test_size={split.test_size} seals all {len(rows)} rows of the time column "
                             "`data.time`: nothing is left to develop on; lower it or add rows")
        return np.sort(order[:-n_test]), np.sort(order[-n_test:])
    if data.groups is not None:
        return _seal_groups(rows, data.groups, split)
    stratify = data.y if data.task == "classification" else None
    try:
        dev, test = ms.train_test_split(rows, test_size=split.test_size, random_state=split.seed,
                                        stratify=stratify)
    except ValueError as err:
        raise SplitError(f"split.test_size={split.test_size} cannot be sealed: {err}") from None
    return np.sort(dev), np.sort(test)


def _seal_groups(rows: np.ndarray, groups: np.ndarray, split: SplitSpec) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups to each side; a column with one group (or a test_size leaving a side empty) is refused."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise SplitError(f"the group column `data.group` has {n_groups} group: sealing a test set by groups needs "
                         "at least 2 (a group is never split); name another column or drop data.group")
    splitter = ms.GroupShuffleSplit(n_splits=1, test_size=split.test_size, random_state=split.seed)
    try:
        dev, test = next(splitter.split(rows, groups=groups))
    except ValueError as err:
        raise SplitError(f"split.test_size={split.test_size} cannot seal whole groups of `data.group` "
                         f"({n_groups} groups): {err}") from None
    return np.sort(rows[dev]), np.sort(rows[test])


def check_fold_kinds(data: Dataset, split: SplitSpec) -> None:
    """Refuse a fold kind that ignores the group or time column the data names: it would leak across folds."""
    if data.groups is not None and data.times is not None:
        raise SplitError("`data.group` and `data.time` are both set; a split follows one of them (groups would "
                         "straddle time splits, later rows would train group folds): keep one")
    for key, fold in (("split.outer", split.outer), ("split.inner", split.inner)):
        if data.groups is not None and fold.kind in ("kfold", "stratified", "time_series"):
            raise SplitError(f"`{key}.kind` {fold.kind} ignores `data.group`: a group would sit on both sides of a "
                             "fold; use group, stratified_group or auto")
        if data.times is not None and fold.kind in ("kfold", "stratified", "group", "stratified_group"):
            raise SplitError(f"`{key}.kind` {fold.kind} ignores `data.time`: later rows would train models scored "
                             "on earlier ones; use time_series or auto")


def plan_folds(data: Dataset, rows: np.ndarray, fold: FoldSpec, seed: int, key: str) -> list[Fold]:
    """Folds over `rows` (absolute indices) with the splitter the spec names."""
    kind = _kind(fold, data)
    _check_k(data, rows, fold, kind, key)
    splitter = _splitter(kind, fold, seed)
    ordered = rows[np.argsort(data.times[rows], kind="stable")] if kind == "time_series" and data.times is not None \
        else rows
    y = data.y[ordered]
    groups = _groups(data)[ordered] if kind in ("group", "stratified_group") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [Fold(np.sort(ordered[tr]), np.sort(ordered[va]))
                for tr, va in splitter.split(np.zeros(len(ordered)), y, groups)]


def _kind(fold: FoldSpec, data: Dataset) -> str:
    if fold.kind != "auto":
        return fold.kind
    # a named time or group column must shape the folds: random folds would leak across it
    if data.times is not None:
        return "time_series"
    if data.groups is not None:
        return "stratified_group" if data.task == "classification" else "group"
    return "stratified" if data.task == "classification" else "kfold"


def _splitter(kind: str, fold: FoldSpec, seed: int) -> Any:
    state = seed if fold.shuffle else None
    if fold.repeats > 1:
        if kind not in ("kfold", "stratified"):
            raise SplitError(f"`repeats` works with kind kfold or stratified, not {kind}")
        cls = ms.RepeatedStratifiedKFold if kind == "stratified" else ms.RepeatedKFold
        return cls(n_splits=fold.k, n_repeats=fold.repeats, random_state=seed)
    if kind == "stratified":
        return ms.StratifiedKFold(n_splits=fold.k, shuffle=fold.shuffle, random_state=state)
    if kind == "kfold":
        return ms.KFold(n_splits=fold.k, shuffle=fold.shuffle, random_state=state)
    if kind == "group":
        return ms.GroupKFold(n_splits=fold.k)
    if kind == "stratified_group":
        return ms.StratifiedGroupKFold(n_splits=fold.k, shuffle=fold.shuffle, random_state=state)
    return ms.TimeSeriesSplit(n_splits=fold.k)


def _check_k(data: Dataset, rows: np.ndarray, fold: FoldSpec, kind: str, key: str) -> None:
    if kind in ("stratified", "stratified_group") and data.task != "classification":
        raise SplitError(f"`{key}.kind` {kind} needs a classification target; use kfold for regression")
    if kind in ("group", "stratified_group") and data.groups is None:
        raise SplitError(f"`{key}.kind` {kind} needs `data.group` (the column that holds the groups)")
    if kind == "time_series" and data.times is None:
        raise SplitError(f"`{key}.kind` time_series needs `data.time` (the column that orders the rows)")
    n_units = len(np.unique(_groups(data)[rows])) if kind in ("group", "stratified_group") else len(rows)
    if fold.k > n_units - (1 if kind == "time_series" else 0):
        unit = "groups" if kind in ("group", "stratified_group") else "rows"
        raise SplitError(f"`{key}.k`={fold.k} is larger than the {n_units} {unit} it must split; lower k")
    if kind == "stratified":
        labels, counts = np.unique(data.y[rows], return_counts=True)
        if counts.min() < fold.k:
            name = data.classes[int(labels[counts.argmin()])] if data.classes else labels[counts.argmin()]
            raise SplitError(f"`{key}.k`={fold.k} is larger than the smallest class ({counts.min()} rows of "
                             f"{name!r}); lower k or use kind: kfold")


def _groups(data: Dataset) -> np.ndarray:
    if data.groups is None:
        raise SplitError("this split needs `data.group` (the column that holds the groups)")
    return data.groups


def _guard_duplicates(data: Dataset, dev: np.ndarray, test: np.ndarray, policy: str) -> tuple[np.ndarray, list[str]]:
    """Exact duplicate rows on both sides of a split let a model score on rows it trained on."""
    hashes = np.asarray(data.row_hashes)
    crossing = np.isin(hashes[dev], hashes[test])
    _, first = np.unique(hashes[dev], return_index=True)
    repeated = np.ones(len(dev), dtype=bool)
    repeated[first] = False
    n_cross, n_repeat = int(crossing.sum()), int(repeated.sum())
    if n_cross == 0 and n_repeat == 0:
        return dev, []
    message = (f"{n_cross} development rows duplicate a sealed test row and {n_repeat} development rows "
               "duplicate another development row (split.duplicates)")
    if policy == "error":
        raise SplitError(message + "; set split.duplicates: drop to remove them")
    if policy == "drop":
        return dev[~(crossing | repeated)], [message + ": dropped"]
    return dev, [message + ": kept (warn); the test look scores rows the model trained on"]


def sealed_rows_seen(data: Dataset, dev: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Sealed test rows with an exact twin among the development rows, and what that does to the look.

    A model scores its training rows better than new ones, so each such row can lift the test look by
    up to one row's share: the look is optimistic by at most `share`. Zero under `duplicates: drop`.
    """
    dev_hashes = set(np.asarray(data.row_hashes)[dev])
    seen = sum(h in dev_hashes for h in np.asarray(data.row_hashes)[test])
    share = seen / len(test) if len(test) else 0.0
    return {"test_rows_in_dev": int(seen), "test_rows": int(len(test)), "share": share}


def seen_note(seen: dict[str, Any]) -> str:
    """One line for `test`, `report` and the summary; empty when no test row was trained on."""
    if not seen["test_rows_in_dev"]:
        return ""
    return (f"{seen['test_rows_in_dev']} of {seen['test_rows']} sealed test rows are exact copies of development rows "
            f"the model trained on: the test look is optimistic, by up to {seen['share']:.1%} of its rows "
            "(split.duplicates: drop removes them)")


def check_batch_size(spec: SweepSpec, plan: FoldPlan) -> None:
    """A batch larger than a fold's training rows is one full-batch step an epoch, not what was asked for."""
    smallest = min(len(fold.train) for fold in [*plan.final_inner, *(f for fs in plan.inner for f in fs)])
    param = spec.search.get("batch_size")
    if param is None:
        key, largest = "train.batch_size", spec.train.batch_size
    else:
        key = "search.batch_size"
        largest = max(int(c) for c in param.choices) if isinstance(param, CategoricalParam) else int(param.high)
    if largest > smallest:
        verb = "is" if param is None else "reaches"
        raise SplitError(f"`{key}` {verb} {largest} but the smallest inner-fold training set has {smallest} rows; "
                         f"lower it to at most {smallest}")
