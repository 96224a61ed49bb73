"""Per-fold inputs: each model's rows, imputation, scaling, feature selection and target scaling.

Every statistic here (fill values, shift and scale, the selected features, the regression target's
mean and spread) comes from each model's own training rows only, never from its validation rows or
another model's: a fold scored on rows that shaped its preprocessing would leak them into the score.
`train` batches many models over one dataset, so these work on (M, ...) tensors, one slice per model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from foldsweep.spec import TrainSpec


def pad_rows(rows: list[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(M, N) row indices padded with each model's own first row, so padding never reaches other rows."""
    width = max(len(r) for r in rows)
    idx = np.stack([np.concatenate([r, np.full(width - len(r), r[0])]) for r in rows])
    mask = np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None]
    n = torch.tensor([len(r) for r in rows], dtype=torch.float32, device=device)
    return torch.as_tensor(idx, device=device), torch.as_tensor(mask, device=device), n


def gather_rows(inputs: Tensor, rows: Tensor) -> Tensor:
    """inputs (M, N, F), rows (M, B) -> (M, B, F).

    As whole rows of the (M * N, F) view: on a CPU, 5x faster than `gather` with an expanded index.
    """
    M, N, F = inputs.shape
    offset = torch.arange(0, M * N, N, device=rows.device).unsqueeze(1)
    return inputs.reshape(M * N, F).index_select(0, (rows + offset).flatten()).view(M, rows.shape[1], F)


def fit_preprocessing(X: Tensor, y: Tensor, train_idx: Tensor, train_mask: Tensor, train: TrainSpec,
                      seeds: list[int]) -> tuple[Tensor, dict[str, list[list[float]]]]:
    """Impute, scale and select features with statistics of each model's training rows only.

    `train` is the batch's shared spec (its models share `preprocess` and `select_k`: see
    `train.structure_key`); `seeds`, one per model, make each model's feature scores reproducible.
    """
    M = len(seeds)
    x_train = X[train_idx]  # (M, N, F)
    present = (~torch.isnan(x_train)) & train_mask.unsqueeze(-1)
    count = present.sum(1).clamp(min=1)
    fill = torch.where(present, x_train, 0.0).sum(1) / count  # (M, F) mean of the observed values
    inputs = torch.where(torch.isnan(X).unsqueeze(0), fill.unsqueeze(1), X.unsqueeze(0).expand(M, -1, -1))
    kind = train.preprocess
    train_vals = torch.where(present, x_train, fill.unsqueeze(1))
    if kind == "standard":
        shift = fill
        centred = (train_vals - shift.unsqueeze(1)) * train_mask.unsqueeze(-1)
        var = (centred**2).sum(1) / train_mask.sum(1, keepdim=True)
        scale = var.sqrt()
    elif kind == "minmax":
        big = torch.finfo(X.dtype).max
        shift = torch.where(train_mask.unsqueeze(-1), train_vals, big).amin(1)
        scale = torch.where(train_mask.unsqueeze(-1), train_vals, -big).amax(1) - shift
    else:
        shift, scale = torch.zeros_like(fill), torch.ones_like(fill)
    scale = torch.where(scale > 0, scale, 1.0)
    inputs = (inputs - shift.unsqueeze(1)) / scale.unsqueeze(1)
    stats = {"fill": fill.tolist(), "shift": shift.tolist(), "scale": scale.tolist()}
    k = train.select_k
    if k is not None and k < X.shape[1]:
        features = select_features(inputs, y, train_idx, train_mask, seeds, k)
        inputs = inputs.gather(2, features.unsqueeze(1).expand(-1, inputs.shape[1], -1))
        stats["features"] = features.tolist()
    return inputs, stats


def select_features(inputs: Tensor, y: Tensor, train_idx: Tensor, train_mask: Tensor, seeds: list[int],
                    k: int) -> Tensor:
    """Top-k features by mutual information with the target, scored on each model's training rows only."""
    from sklearn.feature_selection import mutual_info_classif, mutual_info_regression

    score = mutual_info_regression if y.is_floating_point() else mutual_info_classif
    chosen = []
    for m, seed in enumerate(seeds):
        rows = train_idx[m][train_mask[m]]
        mi = score(inputs[m, rows].cpu().numpy(), y[rows].cpu().numpy(), random_state=seed % 2**32)
        chosen.append(np.sort(np.argsort(-mi, kind="stable")[:k]))
    return torch.as_tensor(np.stack(chosen), device=inputs.device)


def fit_targets(y: Tensor, train_idx: Tensor, train_mask: Tensor, regression: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Regression targets standardised per model (train rows only); class codes pass through."""
    M = train_idx.shape[0]
    if not regression:
        return y.unsqueeze(0).expand(M, -1), torch.zeros(M, 1, device=y.device), torch.ones(M, 1, device=y.device)
    y_train = y[train_idx]
    mask = train_mask.float()
    n = mask.sum(1, keepdim=True)
    shift = (y_train * mask).sum(1, keepdim=True) / n
    scale = torch.sqrt((((y_train - shift) * mask) ** 2).sum(1, keepdim=True) / n).clamp(min=1e-8)
    return (y.unsqueeze(0) - shift) / scale, shift, scale
