"""Seal the test set, then plan the outer and inner folds of the development rows.

Every index here is a row index of the loaded data set, so "no test row reaches a fold" is a plain set
check. Plans are built once from seeds and stored with the sweep; a resumed sweep reloads them.
Rows that must stay together (`data.group`'s groups, and rows with identical features under
`split.duplicates: group`) are `Units`: each sits on one side of the seal and of every fold; with
`data.time`, rows sharing a time are kept together by moving every cut to a change of time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from sklearn import model_selection as ms

from foldsweep.data import Dataset
from foldsweep.errors import SplitError
from foldsweep.spec import CategoricalParam, FoldSpec, SplitSpec, SweepSpec

__all__ = ["Fold", "FoldPlan", "Units", "check_batch_size", "check_fold_classes", "check_fold_kinds",
           "duplicate_count", "make_plan", "plan_folds", "seal_test_set", "sealed_rows_seen", "seen_note",
           "split_units"]


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

    @property
    def folds(self) -> list[Fold]:
        """Every fold in one fixed order: outer, each outer fold's inner folds, the final inner folds."""
        return [*self.outer, *(f for fs in self.inner for f in fs), *self.final_inner]

    @property
    def layout(self) -> list[int]:
        """How many folds each split has: outer, inner of each outer fold, final inner."""
        return [len(self.outer), *(len(fs) for fs in self.inner), len(self.final_inner)]

    def to_masks(self, n_rows: int) -> np.ndarray:
        """dev, test, then each fold's train and valid rows as bit masks over the rows (np.packbits).

        (2 + 2 x folds, ceil(n_rows / 8)) uint8: 90 MB for a 5 x 5 plan at 10^7 rows, where index lists
        as JSON took about a GB. Exact because every index set here is sorted and has no repeats.
        """
        sets = [self.dev, self.test, *(rows for f in self.folds for rows in (f.train, f.valid))]
        masks = np.empty((len(sets), (n_rows + 7) // 8), dtype=np.uint8)
        member = np.empty(n_rows, dtype=bool)
        for i, rows in enumerate(sets):
            member[:] = False
            member[rows] = True
            masks[i] = np.packbits(member)
        return masks

    @classmethod
    def from_masks(cls, masks: np.ndarray, n_rows: int, layout: list[int], notes: list[str]) -> FoldPlan:
        """The plan `to_masks` wrote; `layout` is `FoldPlan.layout`."""
        def rows(i: int) -> np.ndarray:
            # on a bool view: np.flatnonzero is ~4x faster on bool than on uint8 (14 vs 52 ms at 10^7 rows)
            return np.flatnonzero(np.unpackbits(masks[i], count=n_rows).view(bool)).astype(np.int64, copy=False)

        folds = [Fold(rows(2 + 2 * i), rows(3 + 2 * i)) for i in range(sum(layout))]
        ends = np.cumsum(layout).tolist()
        outer, inner = folds[:ends[0]], [folds[a:b] for a, b in zip(ends[:-2], ends[1:-1])]
        return cls(dev=rows(0), test=rows(1), outer=outer, inner=inner, final_inner=folds[ends[-2]:],
                   notes=list(notes))

    def summary(self) -> dict[str, Any]:
        """Row counts of every set and the notes: what the sweep's MLflow run keeps as `plan.json`."""
        def sizes(fs: list[Fold]) -> list[dict[str, int]]:
            return [{"train": len(f.train), "valid": len(f.valid)} for f in fs]

        return {"dev": len(self.dev), "test": len(self.test), "outer": sizes(self.outer),
                "inner": [sizes(fs) for fs in self.inner], "final_inner": sizes(self.final_inner),
                "notes": self.notes}


def make_plan(data: Dataset, split: SplitSpec) -> FoldPlan:
    """Seal first, then guard against duplicates, then fold what is left; refuse folds a metric cannot score."""
    check_fold_kinds(data, split)
    units = split_units(data, split.duplicates)
    dev, test, notes = _seal(data, split, units)
    dev, guarded = _guard_duplicates(data, dev, test, split.duplicates)
    outer = plan_folds(data, dev, split.outer, split.seed, "split.outer", units=units)
    inner = [plan_folds(data, fold.train, split.inner, split.seed + 1 + i, "split.inner", units=units)
             for i, fold in enumerate(outer)]
    final_inner = plan_folds(data, dev, split.inner, split.seed + 1000, "split.inner", units=units)
    plan = FoldPlan(dev=dev, test=test, outer=outer, inner=inner, final_inner=final_inner, notes=[*notes, *guarded])
    check_fold_classes(data, plan)
    return plan


@dataclass(frozen=True)
class Units:
    """Rows that go to one side of the seal and of every fold together: a unit per row, numbered 0..U-1
    in the order of their first row (so an unshuffled split follows the rows' order).

    `what` names them in messages: the groups of `data.group`, rows with identical features, or both.
    """

    codes: np.ndarray
    what: str

    @property
    def count(self) -> int:
        return int(self.codes.max()) + 1 if len(self.codes) else 0


def split_units(data: Dataset, policy: str) -> Units | None:
    """What must stay together: `data.group`'s groups, and under `duplicates: group` rows with identical
    features (merged into the groups they touch). None: every row is free.

    Rows with identical features are found on the features alone, never the label, so the labels of
    sealed rows cannot decide which rows are grouped. With `data.time` time decides (a pattern may recur
    later); the guard reports such repeats instead.
    """
    groups = _group_units(data)
    patterns = _pattern_codes(data.pattern_hashes) if policy == "group" and data.times is None else None
    if patterns is None:
        return groups
    if groups is None:
        return Units(patterns, "groups of rows with identical features")
    return Units(_merged(groups.codes, patterns), "groups of `data.group` (merged where identical rows span groups)")


def _group_units(data: Dataset) -> Units | None:
    """`data.group`'s groups as units (None without the column)."""
    if data.groups is None:
        return None
    return Units(_first_seen_codes(np.unique(data.groups, return_inverse=True)[1]), "groups of `data.group`")


def _pattern_codes(hashes: np.ndarray) -> np.ndarray | None:
    """A code per row, equal for equal feature hashes; None when no hash repeats (the usual case: one sort)."""
    if len(_repeated_values(hashes)) == 0:
        return None
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    codes = np.empty(len(hashes), dtype=np.int64)
    codes[order] = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    return _first_seen_codes(codes)


def _merged(groups: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Connected components of groups and patterns (a row joins its group to its pattern)."""
    n_groups, n_patterns = int(groups.max()) + 1, int(patterns.max()) + 1
    size = n_groups + n_patterns
    edges = sparse.coo_matrix((np.ones(len(groups), dtype=np.int8), (groups, n_groups + patterns)),
                              shape=(size, size))
    _, component = csgraph.connected_components(edges, directed=False)
    return _first_seen_codes(component[groups].astype(np.int64))


def _first_seen_codes(codes: np.ndarray) -> np.ndarray:
    """The same partition, renumbered 0..U-1 in the order of each unit's first row."""
    first = np.full(int(codes.max()) + 1, len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[codes]


def seal_test_set(data: Dataset, split: SplitSpec) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the test rows: the latest rows when `data.time` is set, whole units (groups of `data.group`,
    rows with identical features) when there are any, else a stratified share of the rows.

    The data's own columns decide, never the fold kinds: a sealed group or a future row on the
    development side would let the one test look score rows the model had, in effect, seen.
    """
    dev, test, _ = _seal(data, split, split_units(data, split.duplicates))
    return dev, test


def _seal(data: Dataset, split: SplitSpec, units: Units | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if data.times is not None:
        return _seal_time(data.times, split)
    if units is not None:
        return _seal_units(data, units, split)
    stratify = data.y if data.task == "classification" else None
    try:
        dev, test = ms.train_test_split(np.arange(len(data.y)), test_size=split.test_size, random_state=split.seed,
                                        stratify=stratify)
    except ValueError as err:
        raise SplitError(f"split.test_size={split.test_size} cannot be sealed: {err}") from None
    return np.sort(dev), np.sort(test), []


def _seal_time(times: np.ndarray, split: SplitSpec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The latest rows; rows sharing a time stay on one side (the cut moves to the nearest change of time)."""
    n = len(times)
    order = np.argsort(times, kind="stable")
    n_test = max(1, int(round(split.test_size * n)))
    if n_test >= n:
        raise SplitError(f"split.test_size={split.test_size} seals all {n} rows of the time column "
                         "`data.time`: nothing is left to develop on; lower it or add rows")
    changes = _time_changes(times[order])
    if len(changes) == 0:
        raise SplitError(f"every row has the same `data.time`: rows with equal times stay on one side, so "
                         f"split.test_size={split.test_size} cannot seal any; name another time column")
    cut = _nearest(changes, n - n_test)
    notes = [] if cut == n - n_test else [
        f"the seal moved to a change of `data.time` (rows with equal times stay on one side): {n - cut} of {n} "
        f"rows sealed ({(n - cut) / n:.1%}; split.test_size {split.test_size})"]
    return np.sort(order[:cut]), np.sort(order[cut:]), notes


def _time_changes(ordered_times: np.ndarray) -> np.ndarray:
    """Positions (in time order) where the time changes: the only cuts that keep equal times together."""
    return np.flatnonzero(ordered_times[1:] != ordered_times[:-1]) + 1


def _nearest(sorted_values: np.ndarray, value: int) -> int:
    at = int(np.searchsorted(sorted_values, value))
    candidates = sorted_values[max(at - 1, 0):at + 1]
    return int(candidates[np.argmin(np.abs(candidates - value))])


def _seal_units(data: Dataset, units: Units, split: SplitSpec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Whole units to each side, aiming at `test_size` of the rows (not of the units) and stratified by
    each unit's most common class; the share reached is said in a note."""
    if units.count < 2 and data.groups is not None:
        raise SplitError(f"the group column `data.group` has {units.count} group: sealing a test set by groups needs "
                         "at least 2 (a group is never split); name another column or drop data.group")
    if units.count < 2:
        raise SplitError("every row has the same features: split.duplicates: group keeps identical rows on one side, "
                         "so nothing can be sealed; set split.duplicates: warn to seal rows one by one")
    parts = _balanced_parts(units, _unit_strata(data, units), np.array([1 - split.test_size, split.test_size]),
                            np.random.default_rng(split.seed))
    sealed = parts[units.codes] == 1
    n, n_test = len(sealed), int(sealed.sum())
    note = (f"the seal keeps whole {units.what} together: {n_test} of {n} rows sealed ({n_test / n:.1%}; "
            f"split.test_size {split.test_size})")
    return np.flatnonzero(~sealed), np.flatnonzero(sealed), [note]


def _unit_strata(data: Dataset, units: Units) -> np.ndarray:
    """Each unit's most common class (ties: the lower code); one stratum for regression."""
    if data.task != "classification":
        return np.zeros(units.count, dtype=np.int64)
    counts = np.bincount(units.codes * data.n_classes + data.y, minlength=units.count * data.n_classes)
    return counts.reshape(units.count, data.n_classes).argmax(axis=1)


def _balanced_parts(units: Units, strata: np.ndarray, shares: np.ndarray, rng: np.random.Generator | None,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """The part (0..len(shares)-1) of each unit, each part holding about its share of each stratum's rows.

    Systematic sampling: each stratum's units (shuffled by `rng`, in first-row order without one) are
    laid end to end by their rows on a circle of circumference 1, turned by a random start, and each
    unit goes to the part whose arc holds its midpoint: a part gets its share of the stratum's rows
    within a unit, in a few vectorised passes. sklearn's StratifiedGroupKFold walks the units one by
    one in Python (minutes at 10^6 units); GroupShuffleSplit counts units, not rows, and ignores
    classes. Units with no row in `rows` (all rows when None) get part -1. A part left without a unit
    takes the unit nearest to its arc from a part that holds two or more.
    """
    sizes = np.bincount(units.codes if rows is None else units.codes[rows], minlength=units.count)
    order = rng.permutation(units.count) if rng is not None else np.arange(units.count)
    order = order[sizes[order] > 0]
    stratum = strata[order].astype(np.int16 if strata.max(initial=0) < 2 ** 15 else np.int64)  # int16: a radix sort
    by_stratum = np.argsort(stratum, kind="stable")
    order, stratum = order[by_stratum], stratum[by_stratum]
    first = np.flatnonzero(np.r_[True, stratum[1:] != stratum[:-1]])
    which = np.cumsum(np.r_[True, stratum[1:] != stratum[:-1]]) - 1
    weight = sizes[order].astype(np.float64)
    before = np.cumsum(weight) - weight
    totals = np.add.reduceat(weight, first)
    starts = rng.random(len(first)) if rng is not None else np.zeros(len(first))
    where = ((before - before[first][which] + weight / 2) / totals[which] + starts[which]) % 1.0
    edges = np.r_[0.0, np.cumsum(shares)[:-1], 1.0]
    placed = np.searchsorted(edges[1:-1], where, side="right")
    for part in range(len(shares)):
        if not (placed == part).any():
            placed[_nearest_movable(where, placed, part, edges)] = part
    parts = np.full(units.count, -1, dtype=np.int64)
    parts[order] = placed
    return parts


def _nearest_movable(where: np.ndarray, placed: np.ndarray, part: int, edges: np.ndarray) -> int:
    """The unit nearest (around the circle) to `part`'s arc among those of parts holding two or more."""
    movable = np.bincount(placed, minlength=len(edges) - 1)[placed] > 1
    low, high = edges[part], edges[part + 1]
    gap = np.minimum((low - where) % 1.0, (where - high) % 1.0)
    return int(np.flatnonzero(movable)[np.argmin(gap[movable])])


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


def plan_folds(data: Dataset, rows: np.ndarray, fold: FoldSpec, seed: int, key: str, *,
               units: Units | None = None) -> list[Fold]:
    """Folds over `rows` (absolute indices) with the splitter the spec names; `units` stay whole."""
    kind = _kind(fold, data)
    units = units if units is not None else _group_units(data)
    _check_k(data, rows, fold, kind, key, units)
    if kind == "time_series":
        return _time_folds(data, rows, fold.k, key)
    if units is not None and kind in ("kfold", "stratified"):  # rows with identical features, no data.group
        return _unit_folds(data, rows, units, fold, seed, key, stratified=kind == "stratified")
    splitter = _splitter(kind, fold, seed)
    y = data.y[rows]
    groups = units.codes[rows] if units is not None and kind in ("group", "stratified_group") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [Fold(_sorted(rows[tr]), _sorted(rows[va]))
                for tr, va in splitter.split(np.zeros(len(rows)), y, groups)]


def _time_folds(data: Dataset, rows: np.ndarray, k: int, key: str) -> list[Fold]:
    """TimeSeriesSplit's forward folds, each cut moved to the nearest change of time: equal times stay together."""
    assert data.times is not None  # _check_k refused time_series without a time column
    ordered = rows[np.argsort(data.times[rows], kind="stable")]
    changes = _time_changes(data.times[ordered])
    cuts = [_nearest(changes, int(va[0])) for _, va in ms.TimeSeriesSplit(n_splits=k).split(ordered)]
    if len(set(cuts)) < k:
        raise SplitError(f"`{key}.k`={k}: rows with equal `data.time` stay on one side, and their "
                         f"{len(changes) + 1} distinct times cannot make {k} forward folds here; lower k")
    ends = [*cuts[1:], len(ordered)]
    return [Fold(np.sort(ordered[:a]), np.sort(ordered[a:b])) for a, b in zip(cuts, ends, strict=True)]


def _unit_folds(data: Dataset, rows: np.ndarray, units: Units, fold: FoldSpec, seed: int, key: str, *,
                stratified: bool) -> list[Fold]:
    """k folds of whole units per repeat, about equal in rows, stratified by each unit's most common class."""
    strata = _unit_strata(data, units) if stratified else np.zeros(units.count, dtype=np.int64)
    shares = np.full(fold.k, 1.0 / fold.k)
    folds = []
    for repeat in range(fold.repeats):
        rng = np.random.default_rng([seed, repeat]) if fold.shuffle else None
        parts = _balanced_parts(units, strata, shares, rng, rows)[units.codes[rows]]
        folds += [Fold(rows[parts != part], rows[parts == part]) for part in range(fold.k)]
    return folds


def _sorted(rows: np.ndarray) -> np.ndarray:
    """Most splitters hand back sorted indices of sorted rows: one linear check spares the sort."""
    return rows if len(rows) < 2 or bool(np.all(rows[1:] > rows[:-1])) else np.sort(rows)


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
    return ms.StratifiedGroupKFold(n_splits=fold.k, shuffle=fold.shuffle, random_state=state)


def _check_k(data: Dataset, rows: np.ndarray, fold: FoldSpec, kind: str, key: str, units: Units | None) -> None:
    if kind in ("stratified", "stratified_group") and data.task != "classification":
        raise SplitError(f"`{key}.kind` {kind} needs a classification target; use kfold for regression")
    if kind in ("group", "stratified_group") and data.groups is None:
        raise SplitError(f"`{key}.kind` {kind} needs `data.group` (the column that holds the groups)")
    if kind == "time_series" and data.times is None:
        raise SplitError(f"`{key}.kind` time_series needs `data.time` (the column that orders the rows)")
    # counted by a sort or a bincount: numpy 2's hashed np.unique took 1 s a split at 2 * 10^6 rows here
    if kind == "time_series":
        n_units, unit = len(_time_changes(np.sort(data.times[rows]))) + 1, "distinct times"  # type: ignore[index]
    elif units is not None:
        n_units, unit = int(np.count_nonzero(np.bincount(units.codes[rows], minlength=units.count))), units.what
    else:
        n_units, unit = len(rows), "rows"
    if fold.k > n_units - (1 if kind == "time_series" else 0):
        raise SplitError(f"`{key}.k`={fold.k} is larger than the {n_units} {unit} it must split; lower k")
    if kind == "stratified":
        counts = np.bincount(data.y[rows])  # class codes 0..C-1: a count per class, no sort
        labels = np.flatnonzero(counts)
        counts = counts[labels]
        if counts.min() < fold.k:
            raise SplitError(f"`{key}.k`={fold.k} is larger than the smallest class ({counts.min()} rows of "
                             f"{_class_name(data, int(labels[counts.argmin()]))!r}); lower k or use kind: kfold")


def _class_name(data: Dataset, code: int) -> str | int:
    return data.classes[code] if data.classes else code


def check_fold_classes(data: Dataset, plan: FoldPlan) -> None:
    """Refuse a plan with a fold a classification metric cannot score honestly.

    A training part with one class teaches a constant; a validation part with one class has no
    `roc_auc` (it would read 0.5, as if the model ranked at random). Only the validation parts are
    counted where a fold splits all of its rows (a training part's classes are then its split's rows' less
    its validation part's); forward time folds count their training part too.
    """
    if data.task != "classification":
        return
    for key, name, parent, folds in _named_splits(plan):
        total = np.bincount(data.y[parent], minlength=data.n_classes)
        for i, fold in enumerate(folds):
            valid = np.bincount(data.y[fold.valid], minlength=data.n_classes)
            train = total - valid if len(fold.train) + len(fold.valid) == len(parent) else \
                np.bincount(data.y[fold.train], minlength=data.n_classes)
            for part, counts in (("training", train), ("validation", valid)):
                if np.count_nonzero(counts) > 1 or (part == "validation" and data.metric != "roc_auc"):
                    continue
                label = _class_name(data, int(np.argmax(counts)))
                harm = "a model trained there learns one class" if part == "training" else \
                    "roc_auc is undefined there (it would read 0.5)"
                raise SplitError(f"{name} {i}: all {int(counts.sum())} {part} rows are of class {label!r}, so {harm}; "
                                 f"lower `{key}.k` or change split.seed" + (
                                     " (or use kind stratified_group)" if data.groups is not None else ""))


def _named_splits(plan: FoldPlan) -> list[tuple[str, str, np.ndarray, list[Fold]]]:
    """(spec key, how messages name the folds, the rows split, the folds) of every split in the plan."""
    return [("split.outer", "outer fold", plan.dev, plan.outer),
            *(("split.inner", f"outer fold {i}'s inner fold", outer.train, inner)
              for i, (outer, inner) in enumerate(zip(plan.outer, plan.inner, strict=True))),
            ("split.inner", "final inner fold (all development rows)", plan.dev, plan.final_inner)]


def _guard_duplicates(data: Dataset, dev: np.ndarray, test: np.ndarray, policy: str) -> tuple[np.ndarray, list[str]]:
    """Rows with identical features on both sides of a split let a model score on rows it trained on.

    Features only, never the label: a guard that compared labels too would let a sealed row's label
    decide which development rows exist (a copy with the same label dropped, one with the other kept).
    One sort of the feature hashes finds the hashes that repeat (usually none: then that is all); the
    per-side detail is worked out on the rows that carry one of them only. Under `group` the seal and
    the folds kept each repeated pattern on one side already; this only counts them.
    """
    hashes = data.pattern_hashes
    repeats = _repeated_values(hashes)
    if len(repeats) == 0:
        return dev, []
    if policy == "group" and data.times is None:
        count = duplicate_count(data)
        return dev, [f"{count['duplicate_groups']} groups of rows with identical features ({count['duplicate_rows']} "
                     "rows; labels not compared) each stay on one side of the seal and of every fold "
                     "(split.duplicates: group)"]
    dev_dup, test_dup = dev[_member(hashes[dev], repeats)], test[_member(hashes[test], repeats)]
    crossing = _member(hashes[dev_dup], np.sort(hashes[test_dup]))
    _, first = np.unique(hashes[dev_dup], return_index=True)
    repeated = np.ones(len(dev_dup), dtype=bool)
    repeated[first] = False
    n_cross, n_repeat = int(crossing.sum()), int(repeated.sum())
    if n_cross == 0 and n_repeat == 0:
        return dev, []
    message = (f"{n_cross} development rows have the features of a sealed test row and {n_repeat} development rows "
               f"those of another development row (split.duplicates: {policy}; labels not compared)")
    if policy == "error":
        raise SplitError(message + "; set split.duplicates: group to keep identical rows on one side of every split")
    if policy == "drop":
        return dev[~_member(dev, dev_dup[crossing | repeated])], [message + ": dropped"]
    why = "`data.time` orders the split" if policy == "group" else "kept"
    return dev, [message + f": {why}; the folds and the test look score rows whose features were trained on"]


def duplicate_count(data: Dataset) -> dict[str, int]:
    """How many groups of rows share identical features (labels not compared), and how many rows they hold."""
    hashes = data.pattern_hashes
    repeats = _repeated_values(hashes)
    return {"duplicate_groups": int(len(repeats)), "duplicate_rows": int(_member(hashes, repeats).sum())}


def _repeated_values(values: np.ndarray) -> np.ndarray:
    """The values that occur more than once, sorted, once each.

    np.sort, not np.unique: numpy 2's hashed unique took 19 s on 10^7 distinct uint64 here, the sort 0.24 s.
    """
    ordered = np.sort(values)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    return repeated[np.r_[True, repeated[1:] != repeated[:-1]]] if len(repeated) else repeated


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """`values` in `sorted_set` (sorted) by binary search: O(N log D) for D values in the set."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def sealed_rows_seen(data: Dataset, dev: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Sealed test rows whose features a development row repeats, what that does to the look, and how many
    groups of identical rows the table holds.

    A model scores rows it trained on better than new ones, so each such row can lift the test look by
    up to one row's share: the look is optimistic by at most `share`. Zero under `duplicates: group`
    (the default) and `drop`.
    """
    hashes = data.pattern_hashes
    seen = int(_member(hashes[test], np.sort(hashes[dev])).sum())
    share = seen / len(test) if len(test) else 0.0
    return {"test_rows_in_dev": seen, "test_rows": int(len(test)), "share": share} | duplicate_count(data)


def seen_note(seen: dict[str, Any]) -> str:
    """One line for `test`, `report` and the summary; empty when no test row was trained on and no rows repeat."""
    groups = (f"{seen['duplicate_groups']} groups of rows with identical features ({seen['duplicate_rows']} rows)"
              if seen.get("duplicate_groups") else "")
    if not seen["test_rows_in_dev"]:
        return f"{groups}: none straddles the seal" if groups else ""
    return (f"{seen['test_rows_in_dev']} of {seen['test_rows']} sealed test rows have the features of development "
            f"rows the model trained on: the test look is optimistic, by up to {seen['share']:.1%} of its rows "
            "(split.duplicates: group keeps identical rows on one side)" + (f"; {groups}" if groups else ""))


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
