"""Scores, on the host (sklearn, exact) and on the device (batched over models, every epoch).

The device versions feed learning curves and the pruner without a host sync per epoch; the final
fold scores that Optuna optimises come from sklearn on the best epoch's predictions.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as skm
from torch import Tensor


def score(metric: str, y_true: np.ndarray, pred: np.ndarray) -> float:
    """`pred` holds class probabilities (n, C) for classification, values (n,) for regression."""
    if metric == "accuracy":
        return float(skm.accuracy_score(y_true, pred.argmax(1)))
    if metric == "f1_macro":
        return float(skm.f1_score(y_true, pred.argmax(1), average="macro"))
    if metric == "roc_auc":
        return float(skm.roc_auc_score(y_true, pred[:, 1])) if len(np.unique(y_true)) > 1 else 0.5
    if metric == "log_loss":
        return float(skm.log_loss(y_true, pred, labels=np.arange(pred.shape[1])))
    if metric == "rmse":
        return float(np.sqrt(skm.mean_squared_error(y_true, pred)))
    if metric == "mae":
        return float(skm.mean_absolute_error(y_true, pred))
    return float(skm.r2_score(y_true, pred))


def device_metric(metric: str, pred: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Per-model metric, shape (M,). pred (M, V, C) probabilities or (M, V) values; mask (M, V)."""
    n = mask.sum(1).clamp(min=1)
    if metric in ("accuracy", "f1_macro", "roc_auc", "log_loss"):
        return _classification_metric(metric, pred, y, mask, n)
    err = (pred - y) * mask
    if metric == "rmse":
        return torch.sqrt((err**2).sum(1) / n)
    if metric == "mae":
        return err.abs().sum(1) / n
    mean = (y * mask).sum(1, keepdim=True) / n.unsqueeze(1)
    total = (((y - mean) * mask) ** 2).sum(1).clamp(min=1e-12)
    return 1 - (err**2).sum(1) / total


def _classification_metric(metric: str, prob: Tensor, y: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    if metric == "accuracy":
        return ((prob.argmax(-1) == y).float() * mask).sum(1) / n
    if metric == "log_loss":
        picked = prob.gather(-1, y.unsqueeze(-1)).squeeze(-1).clamp(min=1e-15)
        return -(picked.log() * mask).sum(1) / n
    if metric == "roc_auc":
        return _auc(prob[..., 1], y, mask)
    n_classes = prob.shape[-1]
    hit = torch.nn.functional.one_hot(prob.argmax(-1), n_classes).float() * mask.unsqueeze(-1)
    true = torch.nn.functional.one_hot(y, n_classes).float() * mask.unsqueeze(-1)
    tp = (hit * true).sum(1)
    f1 = 2 * tp / (hit.sum(1) + true.sum(1)).clamp(min=1e-12)
    present = (hit.sum(1) + true.sum(1)) > 0
    return (f1 * present).sum(1) / present.sum(1).clamp(min=1)


def _auc(score: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mann-Whitney AUC per model; padded rows sink to the bottom and are not counted."""
    score = torch.where(mask.bool(), score, torch.full_like(score, -torch.inf))
    ranks = score.argsort(1).argsort(1).float() + 1  # 1-based ranks, padded rows lowest
    n_pad = (1 - mask).sum(1)
    pos = (y == 1).float() * mask
    n_pos = pos.sum(1)
    n_neg = mask.sum(1) - n_pos
    rank_sum = ((ranks - n_pad.unsqueeze(1)) * pos).sum(1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp(min=1)
