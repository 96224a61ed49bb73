"""Scores, on the host (sklearn, exact) and on the device (batched over models, every epoch).

The device versions feed learning curves and the pruner without a host sync per epoch; the final
fold scores that Optuna optimises come from sklearn on the best epoch's predictions.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as skm
from torch import Tensor

__all__ = ["SUMMED", "auc", "metric_from_sums", "metric_sums", "score", "score_se"]


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


def score_se(metric: str, y_true: np.ndarray, pred: np.ndarray) -> float:
    """The standard error of `score` from the sampling of its rows alone (the model held fixed).

    It is what the nested interval needs as a floor: an outer-test score of 69/80 is not known to be
    exactly 0.8625 because those 80 rows were a draw. Per-row metrics (accuracy, log_loss, mae) take the
    spread of the per-row losses over sqrt(n) (accuracy: the binomial sqrt(p(1-p)/n)); rmse and r2 the
    delta method on the per-row squared errors (r2 holding the rows' target variance fixed). The rest have
    no per-row form and use an approximation: roc_auc the Hanley-McNeil (1982) standard error, f1_macro
    the binomial one at its value, sqrt(f(1-f)/n).
    """
    n = len(y_true)
    if metric == "accuracy":
        return _mean_se((pred.argmax(1) == y_true).astype(float))
    if metric == "log_loss":
        picked = np.clip(pred[np.arange(n), y_true.astype(int)], 1e-15, None)
        return _mean_se(-np.log(picked))
    if metric == "mae":
        return _mean_se(np.abs(pred - y_true))
    if metric == "roc_auc":
        return _hanley_mcneil_se(score(metric, y_true, pred), int((y_true == 1).sum()), int((y_true != 1).sum()))
    if metric == "f1_macro":
        f1 = score(metric, y_true, pred)
        return float(np.sqrt(f1 * (1 - f1) / n))
    squared = _mean_se((pred - y_true) ** 2)
    if metric == "rmse":
        rmse = score(metric, y_true, pred)
        return squared / (2 * rmse) if rmse > 0 else 0.0
    spread = float(np.var(y_true))
    return squared / spread if spread > 0 else 0.0


def _mean_se(values: np.ndarray) -> float:
    """The standard error of a mean of per-row values (population variance: for 0/1 values p(1-p)/n)."""
    return float(np.sqrt(np.var(values) / len(values)))


def _hanley_mcneil_se(auc_value: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982, Radiology 143) standard error of an AUC from its value and the class counts."""
    if n_pos == 0 or n_neg == 0:
        return 0.0
    q1, q2 = auc_value / (2 - auc_value), 2 * auc_value**2 / (1 + auc_value)
    var = (auc_value * (1 - auc_value) + (n_pos - 1) * (q1 - auc_value**2) + (n_neg - 1) * (q2 - auc_value**2))
    return float(np.sqrt(max(var, 0.0) / (n_pos * n_neg)))


# metrics that are sums over rows: computed chunk by chunk (`metric_sums`), never over (M, V) at once;
# roc_auc, a rank statistic, is computed over every row (`auc`)
SUMMED = ("accuracy", "f1_macro", "log_loss", "rmse", "mae", "r2")


def metric_sums(metric: str, pred: Tensor, y: Tensor, mask: Tensor, center: Tensor | None = None) -> Tensor:
    """Per-model sums over some rows (M, K), to add up over chunks of the validation rows (`SUMMED`).

    pred (M, R, C) probabilities or (M, R) values, y and mask (M, R). `center` (M, 1) (r2 only): a value
    near each model's mean target (the train rows' mean), so the spread is a sum of small squares.
    """
    n = mask.sum(1, keepdim=True)
    if metric == "accuracy":
        return torch.cat([((pred.argmax(-1) == y).float() * mask).sum(1, keepdim=True), n], 1)
    if metric == "log_loss":
        picked = pred.gather(-1, y.unsqueeze(-1)).squeeze(-1).clamp(min=1e-15)
        return torch.cat([-(picked.log() * mask).sum(1, keepdim=True), n], 1)
    if metric == "f1_macro":  # per class: true positives, predicted, true
        n_classes = pred.shape[-1]
        hit = torch.nn.functional.one_hot(pred.argmax(-1), n_classes).float() * mask.unsqueeze(-1)
        true = torch.nn.functional.one_hot(y, n_classes).float() * mask.unsqueeze(-1)
        return torch.cat([(hit * true).sum(1), hit.sum(1), true.sum(1)], 1)
    err = (pred - y) * mask
    if metric == "rmse":
        return torch.cat([(err**2).sum(1, keepdim=True), n], 1)
    if metric == "mae":
        return torch.cat([err.abs().sum(1, keepdim=True), n], 1)
    spread = (y - (0.0 if center is None else center)) * mask
    return torch.cat([(err**2).sum(1, keepdim=True), spread.sum(1, keepdim=True), (spread**2).sum(1, keepdim=True),
                      n], 1)


def metric_from_sums(metric: str, sums: Tensor) -> Tensor:
    """The metric (M,) from `metric_sums` added up over every validation row."""
    n = sums[:, -1].clamp(min=1)
    if metric in ("accuracy", "log_loss", "mae"):
        return sums[:, 0] / n
    if metric == "rmse":
        return torch.sqrt(sums[:, 0] / n)
    if metric == "r2":
        total = (sums[:, 2] - sums[:, 1] ** 2 / n).clamp(min=1e-12)
        return 1 - sums[:, 0] / total
    tp, hit, true = sums.chunk(3, 1)  # f1_macro
    f1 = 2 * tp / (hit + true).clamp(min=1e-12)
    present = (hit + true) > 0
    return (f1 * present).sum(1) / present.sum(1).clamp(min=1)


def auc(score: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mann-Whitney AUC per model (M,), tied scores at their mid-rank as in sklearn's `roc_auc_score`.

    score, y, mask (M, V). Padded rows sink below every real row and are not counted. Without mid-ranks a
    constant score (an untrained model) would score 0, not 0.5, and pruners and curves would read it as
    worse than chance. Ranks come from one sort and two binary searches (rows below, rows below or tied),
    summed in int64 so the statistic is exact; the one division is in float64. A model whose rows hold
    one class scores 0.5, as `score` says on the host.
    """
    real = mask.bool()
    score_or_pad = torch.where(real, score, torch.full_like(score, -torch.inf))
    ordered = score_or_pad.sort(1).values
    below = torch.searchsorted(ordered, score_or_pad, side="left")
    up_to = torch.searchsorted(ordered, score_or_pad, side="right")  # a row's tied ranks: below + 1 .. up_to
    pos = (y == 1) & real
    n_pos, n_pad = pos.sum(1), (~real).sum(1)
    n_neg = real.sum(1) - n_pos
    twice_rank_sum = ((below + up_to + 1) * pos).sum(1)  # of the positives' mid-ranks, counting padding
    twice_u = twice_rank_sum - 2 * n_pad * n_pos - n_pos * (n_pos + 1)
    value = twice_u.double() / (2 * n_pos * n_neg).clamp(min=1).double()
    return torch.where((n_pos > 0) & (n_neg > 0), value, 0.5).to(score.dtype)
