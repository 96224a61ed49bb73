"""Validation in row chunks: each epoch's loss and metric per model, and best-epoch predictions on demand.

At scale a model's validation rows outnumber everything else it holds, so nothing here keeps a tensor
of (models, validation rows) between epochs: targets and masks are kept once per distinct fold
(`ValidTargets`, models on one fold share them), each chunk's outputs are reduced to per-model sums
(`metrics.metric_sums`) as soon as they exist, and the best epoch's predictions, which scoring needs
once per fit, are computed again from the best epoch's weights when a fit finishes
(`predictions`) instead of being copied every time a model improves. Only `roc_auc`, a rank
statistic, keeps one score per validation row and model for the current epoch.

Shapes: M models, U distinct validation folds, V the longest of them (shorter ones padded), C classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from foldsweep.metrics import SUMMED, auc, metric_from_sums, metric_sums
from foldsweep.model import StackedMLP
from foldsweep.preprocess import RowSets, Transform

__all__ = ["ValidTargets", "predictions", "valid_targets", "validate"]


@dataclass(frozen=True)
class ValidTargets:
    """Per distinct validation fold: its targets `y` (U, V) (class codes, or values in the engine's
    dtype) and `mask` (U, V) of real rows, in the engine's dtype."""

    y: Tensor
    mask: Tensor


def valid_targets(y: Tensor, rows: RowSets, regression: bool, dtype: torch.dtype) -> ValidTargets:
    """Each validation fold's targets and mask, once per fold (not per model)."""
    positions = torch.arange(rows.width, device=rows.rows.device)
    mask = (positions < rows.n.unsqueeze(1)).to(dtype)
    y_valid = y[rows.rows]
    return ValidTargets(y_valid.to(dtype) if regression else y_valid, mask)


def _outputs(net: StackedMLP, transform: Transform, X: Tensor, rows: RowSets, chunk: int
             ) -> Iterator[tuple[slice, Tensor]]:
    """(rows of the chunk, the models' outputs (M, chunk, C)) over every validation position."""
    positions = torch.arange(rows.width, device=X.device)
    M = rows.of.shape[0]
    for a in range(0, rows.width, chunk):
        part = slice(a, a + chunk)
        yield part, net.forward(transform.apply(X, rows.model_rows(positions[part].expand(M, -1))), None)


@torch.no_grad()
def validate(net: StackedMLP, transform: Transform, X: Tensor, rows: RowSets, targets: ValidTargets, metric: str,
             y_shift: Tensor, y_scale: Tensor, *, regression: bool, chunk: int, into: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
    """Validation loss and metric per model, both (M,), from (M, chunk, width) activations at a time.

    `y_shift`, `y_scale` (M, 1): a regression model's output is standardised (0 and 1 otherwise).
    The loss is the mean over real rows of cross-entropy (or the squared error in standardised units).
    `into` (M, V[, C]): also write the predictions there (`predictions`' numbers), for a small table.
    """
    M, of = rows.of.shape[0], rows.of
    loss = torch.zeros(M, dtype=y_shift.dtype, device=X.device)
    sums: Tensor | None = None
    scores = torch.empty((M, rows.width), dtype=y_shift.dtype, device=X.device) if metric not in SUMMED else None
    for part, out in _outputs(net, transform, X, rows, chunk):
        target, mask = targets.y[of, part], targets.mask[of, part]
        if regression:
            loss += (((out[..., 0] - (target - y_shift) / y_scale) ** 2) * mask).sum(1)
            pred = out[..., 0] * y_scale + y_shift
        else:
            logp = F.log_softmax(out, -1)
            loss += (-logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask).sum(1)
            pred = logp.exp()
        if into is not None:
            into[:, part] = pred
        if scores is not None:  # roc_auc: the positive class's probability, ranked once every row is in
            scores[:, part] = pred[..., 1]
            continue
        add = metric_sums(metric, pred, target, mask, y_shift if metric == "r2" else None)
        sums = add if sums is None else sums + add
    n = rows.n[of].to(loss.dtype).clamp(min=1)
    if scores is not None:
        value = auc(scores, targets.y[of], targets.mask[of])
    else:
        assert sums is not None  # every fold has a row, so there was a chunk
        value = metric_from_sums(metric, sums)
    return loss / n, value


@torch.no_grad()
def predictions(net: StackedMLP, transform: Transform, X: Tensor, rows: RowSets, y_shift: Tensor, y_scale: Tensor,
                *, regression: bool, chunk: int) -> Tensor:
    """Every model's predictions on its validation rows: probabilities (M, V, C) or values (M, V).

    The same chunks and arithmetic as `validate`, so the best epoch's weights give back exactly the
    predictions that epoch was scored on.
    """
    M = rows.of.shape[0]
    out_shape = (M, rows.width) if regression else (M, rows.width, net.n_out)
    pred = torch.empty(out_shape, dtype=y_shift.dtype, device=X.device)
    for part, out in _outputs(net, transform, X, rows, chunk):
        pred[:, part] = out[..., 0] * y_scale + y_shift if regression else F.log_softmax(out, -1).exp()
    return pred
