"""Per-fold inputs: the table once, and per model only its rows' indices and a few statistics.

Every statistic here (fill values, shift and scale, the selected features, the regression target's
mean and spread) comes from each model's own training rows only, never from its validation rows or
another model's: a fold scored on rows that shaped its preprocessing would leak them into the score.

Memory: the table X (N, F) stays as it is, once. Models on the same fold share one padded index array
(`RowSets`); statistics are computed once per distinct fold in row chunks (never an (M, N, F) copy);
each model holds vectors of F (or k) numbers (`Transform`), applied to the rows of each mini-batch or
validation chunk as they are gathered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from foldsweep.spec import TrainSpec

__all__ = ["CHUNK_BYTES", "RowSets", "Transform", "fit_targets", "fit_transform", "select_features", "share_rows"]

CHUNK_BYTES = 32 * 2**20  # rows per pass over a fold: about this much of X at a time


@dataclass
class RowSets:
    """Distinct row sets, padded: `rows` (U, N) int64 (padded with the set's own first row), `n` (U,),
    `of` (M,) the set of each model. Models whose rows are equal share one set."""

    rows: Tensor
    n: Tensor
    of: Tensor
    sizes: list[int]  # len of each model's rows, on the host

    @property
    def width(self) -> int:
        return int(self.rows.shape[1])

    def model_rows(self, positions: Tensor) -> Tensor:
        """Row indices at `positions` (M, B) of each model's own list -> (M, B)."""
        return self.rows.view(-1)[(self.of * self.width).unsqueeze(1) + positions]

    def select(self, keep: Tensor, keep_host: list[int]) -> None:
        self.of = self.of[keep]
        self.sizes = [self.sizes[i] for i in keep_host]


def share_rows(rows: list[np.ndarray], device: torch.device) -> RowSets:
    """Deduplicate the models' row arrays (hashing their bytes: linear) and pad them to one width."""
    index: dict[tuple[int, bytes], int] = {}
    distinct: list[np.ndarray] = []
    of = []
    for r in rows:
        key = (len(r), np.ascontiguousarray(r, dtype=np.int64).tobytes())
        if key not in index:
            index[key] = len(distinct)
            distinct.append(np.asarray(r, dtype=np.int64))
        of.append(index[key])
    width = max(len(r) for r in distinct)
    padded = np.stack([np.concatenate([r, np.full(width - len(r), r[0])]) for r in distinct])
    n = torch.tensor([len(r) for r in distinct], dtype=torch.int64, device=device)
    return RowSets(torch.as_tensor(padded, device=device), n, torch.tensor(of, device=device),
                   [len(r) for r in rows])


@dataclass
class Transform:
    """Each model's imputation, scaling and feature selection: `fill`, `shift`, `scale` (M, F) over all
    features, `features` (M, k) or None. Applied as select -> impute -> scale (the same numbers as
    impute -> scale -> select, on k columns instead of F)."""

    fill: Tensor
    shift: Tensor
    scale: Tensor
    features: Tensor | None
    has_nan: bool

    def apply(self, X: Tensor, rows: Tensor) -> Tensor:
        """X (N, F), rows (M, R) -> the models' inputs (M, R, k), in X's dtype."""
        M, R = rows.shape
        if self.features is None:
            x = X.index_select(0, rows.flatten()).view(M, R, X.shape[1])
            fill, shift, scale = self.fill, self.shift, self.scale
        else:
            F = X.shape[1]
            x = X.view(-1)[(rows * F).unsqueeze(-1) + self.features.unsqueeze(1)]
            fill, shift, scale = (self.fill.gather(1, self.features), self.shift.gather(1, self.features),
                                  self.scale.gather(1, self.features))
        if self.has_nan:
            x = torch.where(torch.isnan(x), fill.unsqueeze(1), x)
        return (x - shift.unsqueeze(1)) / scale.unsqueeze(1)

    def select(self, keep: Tensor) -> None:
        self.fill, self.shift, self.scale = self.fill[keep], self.shift[keep], self.scale[keep]
        if self.features is not None:
            self.features = self.features[keep]

    def stats(self, m: int) -> dict[str, list[float] | list[int]]:
        """What an exported model needs to prepare raw features the same way (host lists)."""
        out: dict[str, list[float] | list[int]] = {
            "fill": self.fill[m].tolist(), "shift": self.shift[m].tolist(), "scale": self.scale[m].tolist()}
        if self.features is not None:
            out["features"] = self.features[m].tolist()
        return out


def fit_transform(X: Tensor, y: Tensor, train: RowSets, spec: TrainSpec, seeds: list[int]) -> Transform:
    """Impute, scale and select features with statistics of each model's training rows only.

    `spec` is the batch's shared spec (its models share `preprocess` and `select_k`: see
    `train.structure_key`); `seeds`, one per model, make each model's feature scores reproducible.
    """
    per_set = [_fold_stats(X, train.rows[u, : int(n)], spec.preprocess) for u, n in enumerate(train.n.tolist())]
    fill, shift, scale = (torch.stack([s[i] for s in per_set])[train.of] for i in range(3))
    has_nan = bool(torch.isnan(X).any())
    transform = Transform(fill, shift, scale, None, has_nan)
    k = spec.select_k
    if k is not None and k < X.shape[1]:
        transform.features = select_features(X, y, train, transform, seeds, k)
    return transform


def _fold_stats(X: Tensor, rows: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """fill, shift, scale (F,) of one fold's training rows, in chunked passes over them."""
    chunk = max(1, CHUNK_BYTES // (X.shape[1] * X.element_size()))

    def parts() -> Iterator[Tensor]:  # one chunk of the fold's rows at a time
        return (X.index_select(0, rows[i : i + chunk]) for i in range(0, len(rows), chunk))

    count = sum(((~torch.isnan(p)).sum(0) for p in parts()), torch.zeros(X.shape[1], device=X.device))
    total = sum((torch.nan_to_num(p, nan=0.0).sum(0) for p in parts()), torch.zeros_like(X[0]))
    fill = total / count.clamp(min=1)  # mean of the observed values

    def filled(p: Tensor) -> Tensor:
        return torch.where(torch.isnan(p), fill, p)

    if kind == "standard":
        shift = fill
        squares = sum((((filled(p) - shift) ** 2).sum(0) for p in parts()), torch.zeros_like(fill))
        scale = torch.sqrt(squares / len(rows))
    elif kind == "minmax":
        bounds = [(filled(p).amin(0), filled(p).amax(0)) for p in parts()]
        shift = torch.stack([low for low, _ in bounds]).amin(0)
        scale = torch.stack([high for _, high in bounds]).amax(0) - shift
    else:
        shift, scale = torch.zeros_like(fill), torch.ones_like(fill)
    return fill, shift, torch.where(scale > 0, scale, 1.0)


def select_features(X: Tensor, y: Tensor, train: RowSets, transform: Transform, seeds: list[int], k: int) -> Tensor:
    """Top-k features by mutual information with the target, scored on each model's training rows only."""
    from sklearn.feature_selection import mutual_info_classif, mutual_info_regression

    score = mutual_info_regression if y.is_floating_point() else mutual_info_classif
    chosen = []
    for m, seed in enumerate(seeds):
        u = int(train.of[m])
        rows = train.rows[u, : int(train.n[u])]
        one = Transform(transform.fill[m : m + 1], transform.shift[m : m + 1], transform.scale[m : m + 1], None,
                        transform.has_nan)
        inputs = one.apply(X, rows.unsqueeze(0))[0]  # (n_train, F): one model's rows, on the host briefly
        mi = score(inputs.cpu().numpy(), y[rows].cpu().numpy(), random_state=seed % 2**32)
        chosen.append(np.sort(np.argsort(-mi, kind="stable")[:k]))
    return torch.as_tensor(np.stack(chosen), device=X.device)


def fit_targets(y: Tensor, train: RowSets, regression: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per model (M, 1) shift and scale that standardise a regression target (train rows only); 0, 1 else."""
    M = len(train.of)
    if not regression:
        return torch.zeros(M, 1, device=y.device, dtype=dtype), torch.ones(M, 1, device=y.device, dtype=dtype)
    mask = (torch.arange(train.width, device=y.device) < train.n.unsqueeze(1)).to(dtype)  # (U, N)
    y_train = y[train.rows].to(dtype)
    n = train.n.unsqueeze(1).to(dtype)
    shift = (y_train * mask).sum(1, keepdim=True) / n
    scale = torch.sqrt((((y_train - shift) * mask) ** 2).sum(1, keepdim=True) / n).clamp(min=1e-8)
    return shift[train.of], scale[train.of]
